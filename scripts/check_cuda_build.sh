#!/usr/bin/env bash
# Compile-check the CUDA kernels (csrc/cuda/) for sm_90 on a machine without a GPU.
#
# Not part of CI: it downloads the CUDA 13.0 build of torch 2.14.1 (about 5.4 GB, about a minute
# here) into a venv outside the repository and compiles for about a minute on 2 cores. Run it
# after changing anything under csrc/:
#
#     scripts/check_cuda_build.sh            # venv in /tmp/fxdrop-cuda-venv (reused), build, report
#
# Needs nvcc 13.0 (/usr/local/bin/nvcc, CUDA_HOME=/usr/local/cuda), g++ and network access to PyPI
# for the first run. It builds through fxdrop's own loader (python -m fxdrop.build --variant cuda,
# the same path users take) into a throwaway cache, with ptxas's resource report (-Xptxas -v),
# prints registers / shared memory / spills per kernel, and checks that the library's CUDA
# registrations are there (dlopen only: there is no GPU to run them on). Exit status 0 = builds.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FXDROP_CUDA_VENV:-/tmp/fxdrop-cuda-venv}"
TORCH_VERSION="${FXDROP_CUDA_TORCH:-2.14.1}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="/usr/local/bin:$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export FXDROP_NVCC_FLAGS="${FXDROP_NVCC_FLAGS:--Xptxas -v}"
export FXDROP_CACHE="$(mktemp -d /tmp/fxdrop-cuda-cache.XXXXXX)"
export MAX_JOBS="${MAX_JOBS:-2}"

nvcc --version | tail -2
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION' or torch.version.cuda is None)" 2>/dev/null; then
  "$VENV/bin/pip" install --quiet "torch==$TORCH_VERSION" ninja networkx rich
fi
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

LOG="$FXDROP_CACHE/build.log"
start=$(date +%s)
cd "$REPO"
if ! "$VENV/bin/python" -m fxdrop.build --variant cuda --verbose >"$LOG" 2>&1; then
  grep -E "error|Error" "$LOG" | head -40 || true
  tail -40 "$LOG"
  echo "CUDA BUILD FAILED (log: $LOG)"
  exit 1
fi
echo "CUDA build OK in $(( $(date +%s) - start )) s (log: $LOG)"

# ptxas resource usage, one line per kernel: registers, shared memory, spills.
"$VENV/bin/python" - "$LOG" <<'PY'
import re, sys, subprocess
text = open(sys.argv[1]).read()
entries = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+a?)'(.*?)(?=ptxas info\s+: Compiling entry|\Z)", text, re.S)
rows = []
for name, arch, body in entries:
    regs = re.search(r"Used (\d+) registers", body)
    smem = re.search(r"(\d+) bytes smem", body)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body)
    stack = re.search(r"(\d+) bytes stack frame", body)
    try:
        pretty = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
    except OSError:
        pretty = name
    pretty = pretty.replace("(anonymous namespace)::", "")
    pretty = re.sub(r"\(.*", "", pretty)[:70]
    rows.append((pretty, arch, regs and regs.group(1), smem and smem.group(1), stack and stack.group(1),
                 spill and f"{spill.group(1)}/{spill.group(2)}"))
print(f"{'kernel':70s} {'arch':6s} {'regs':>5s} {'smem':>6s} {'stack':>6s} {'spill st/ld':>11s}")
for r in sorted(set(rows)):
    print(f"{r[0]:70s} {r[1]:6s} {r[2] or '-':>5s} {r[3] or '0':>6s} {r[4] or '0':>6s} {r[5] or '-':>11s}")
PY

"$VENV/bin/python" - <<'PY'
import torch, fxdrop
from fxdrop.ops import extension
info = fxdrop.backend_info()
print("backend_info:", info)
for op in extension.COMPILED_OPS:
    table = torch._C._dispatch_dump(f"fxdrop::{op}")
    line = next((l for l in table.splitlines() if l.startswith("CUDA:")), None)
    assert line is not None and "kernels.cu" in line, f"no CUDA kernel registered for fxdrop::{op}:\n{table}"
print("CUDA kernels registered for:", ", ".join(extension.COMPILED_OPS))
PY

"""Compiled C++ kernels (csrc/) against the composite PyTorch kernels, same op, same steps.

The workload is benchmarks/ops.py's (forward + backward of Linear -> ReLU -> dropout -> Linear,
hidden 4096, batch 256, fp32, a fresh pattern each step). The two backends alternate step by step
(the composite kernels are swapped onto the CPU key outside the timed region) and the figure is the
median of the paired ratios composite / compiled: above 1 means the C++ kernels are faster.
Writes ``benchmarks/results/backends.json``.

    python benchmarks/backends.py [--hidden 4096] [--batch 256] [--pairs 15] [--families row block tile]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ops import make_steps  # noqa: E402  (the same workload as benchmarks/ops.py)

from fxdrop.ops import extension  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired(step, pairs: int, warmup: int = 2) -> tuple[list[float], list[float], list[float]]:
    """Per pair: composite time, compiled time, and their ratio; the order alternates within pairs."""
    for _ in range(warmup):
        step()
        with extension.composite_kernels("CPU"):
            step()
    composite, compiled = [], []
    for i in range(pairs):
        if i % 2:
            compiled.append(_timed(step))
        with extension.composite_kernels("CPU"):
            composite.append(_timed(step))
        if not i % 2:
            compiled.append(_timed(step))
    return composite, compiled, [a / b for a, b in zip(composite, compiled)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--ps", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--families", nargs="+", default=["row", "block", "tile"])
    parser.add_argument("--out", type=Path, default=RESULTS / "backends.json")
    args = parser.parse_args(argv)
    if extension.ensure_loaded() is None:
        print(f"no compiled kernels: {extension.backend_info()['reason']}", file=sys.stderr)
        return 1
    rows = []
    for p in args.ps:
        for family in args.families:
            _, step = make_steps(args.hidden, args.batch, family, p)
            composite, compiled, ratios = paired(step, args.pairs)
            row = {"p": p, "family": family, "composite_ms": 1e3 * statistics.median(composite),
                   "compiled_ms": 1e3 * statistics.median(compiled), "speedup": statistics.median(ratios),
                   "ratios": ratios}
            rows.append(row)
            print(f"p={p} {family:5s} composite {row['composite_ms']:.1f} ms  compiled {row['compiled_ms']:.1f} ms  "
                  f"compiled is {row['speedup']:.3f}x", flush=True)
    result = {"benchmark": "fxdrop step, compiled CPU kernels vs composite kernels (median paired ratio)",
              "hidden": args.hidden, "batch": args.batch, "dtype": "float32", "pairs": args.pairs,
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "threads": torch.get_num_threads()},
              "torch": torch.__version__, "backend": extension.backend_info(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    table = Table(title=f"compiled vs composite, hidden {args.hidden}, batch {args.batch}")
    for col in ("p", "family", "composite ms", "compiled ms", "compiled speedup"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['p']}", r["family"], f"{r['composite_ms']:.1f}", f"{r['compiled_ms']:.1f}",
                      f"{r['speedup']:.3f}x")
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

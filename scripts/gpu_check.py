"""GPU checks of the fxdrop ops and the H200 training-step benchmark (run by scripts/gpu_check.sh).

1. Correctness on CUDA, compiled kernels and composite kernels: every op against the dense
   reference run in float64 on the CPU with the same inputs (relative error of outputs and of every
   gradient: fp32 < 1e-4, fp16 < 1e-2, bf16 < 5e-2, or up to 3x what the dense reference itself
   reaches in that dtype on the GPU; NaN never passes). Fresh random inputs per case.
2. Whole bf16 training step (forward, cross-entropy, backward, SGD step) of the MLP
   784 -> 8192 -> 8192 -> 8192 -> 10, batch 1024, ReLU, dropout p after each hidden layer:
   standard dropout (eager and torch.compile'd) vs fxdrop.ops.chain (compiled and composite
   kernels, row and block families). CUDA-event timing, median of many steps after warm-up.

Writes one JSON file (--out) and prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fxdrop  # noqa: E402
import fxdrop.ops as ops  # noqa: E402
from fxdrop import PatternScheduler, search_distribution  # noqa: E402
from fxdrop.ops import extension  # noqa: E402
from fxdrop.ops import reference as ref  # noqa: E402

DEV = "cuda"
LIMIT = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}  # kink flips (ReLU) dominate
ACTS = ["relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "leaky_relu:0.2", "elu:0.7", "none"]


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def grads(fn, inputs, grad_out):
    present = [t for t in inputs if t is not None]
    out = fn(*inputs)
    return [out, *torch.autograd.grad(out, present, grad_out.to(out.dtype).to(out.device))]


def leaf(t: torch.Tensor, dtype, device) -> torch.Tensor:
    return t.to(dtype=dtype, device=device).detach().requires_grad_()


def check_chain(gen, family, dtype, dp_pair, bias, lead):
    widths = [int(torch.randint(3, 300, (1,), generator=gen)) for _ in range(4)]
    base = [torch.randn(*lead, widths[0], generator=gen, dtype=torch.float64)]
    base += [torch.randn(o, i, generator=gen, dtype=torch.float64) / i ** 0.5 for i, o in zip(widths, widths[1:])]
    base += [torch.randn(o, generator=gen, dtype=torch.float64) if bias else None for o in widths[1:]]
    patterns = torch.tensor([[dp, int(torch.randint(dp, (1,), generator=gen))] for dp in dp_pair], dtype=torch.int64)
    acts = [ACTS[int(torch.randint(len(ACTS), (1,), generator=gen))] for _ in range(3)]
    kw = dict(family=family, activations=acts, input_dropout=True, output_dropout=True, rates=[0.5] * 4,
              scale="kept")

    def fn(module):
        return lambda x, w0, w1, w2, b0, b1, b2: module.chain(x, [w0, w1, w2], [b0, b1, b2], patterns, **kw)

    exact_in = [t.clone().requires_grad_() if t is not None else None for t in base]
    grad_out = torch.randn(*lead, widths[-1], generator=gen, dtype=torch.float64)
    exact = grads(fn(ref), exact_in, grad_out)
    dev_in = [leaf(t, dtype, DEV) if t is not None else None for t in base]
    got = grads(fn(ops), dev_in, grad_out)
    same_precision = grads(fn(ref), dev_in, grad_out)
    return max(rel(g, e) for g, e in zip(got, exact)), max(rel(g, e) for g, e in zip(same_precision, exact))


def check_chain_classes(gen, family, dtype, bias, classes):
    """Row classes (granularity="rows"): row r uses class r mod M's patterns; M = 4 with a period-2
    pattern (the op merges classes c and c + 2 into one strided half), or M = 3 (rows 0 mod 3 ... each strided)."""
    widths = [int(torch.randint(3, 300, (1,), generator=gen)) for _ in range(3)]
    rows = 57
    base = [torch.randn(rows, widths[0], generator=gen, dtype=torch.float64)]
    base += [torch.randn(o, i, generator=gen, dtype=torch.float64) / i ** 0.5 for i, o in zip(widths, widths[1:])]
    base += [torch.randn(o, generator=gen, dtype=torch.float64) if bias else None for o in widths[1:]]
    distinct = 2 if classes == 4 else classes
    sets = [torch.tensor([[dp, int(torch.randint(dp, (1,), generator=gen))] for dp in
                          (int(torch.randint(1, 9, (1,), generator=gen)) for _ in range(2))])
            for _ in range(distinct)]
    patterns = torch.stack([sets[c % distinct] for c in range(classes)])
    kw = dict(family=family, activations=["relu"], input_dropout=True, rates=[0.5] * 2, scale="kept")

    def fn(module):
        if module is ref:
            return lambda x, w0, w1, b0, b1: ref.chain_classes(x, [w0, w1], [b0, b1], patterns, **kw)
        return lambda x, w0, w1, b0, b1: module.chain(x, [w0, w1], [b0, b1], patterns, **kw)

    grad_out = torch.randn(rows, widths[-1], generator=gen, dtype=torch.float64)
    exact = grads(fn(ref), [t.clone().requires_grad_() if t is not None else None for t in base], grad_out)
    dev_in = [leaf(t, dtype, DEV) if t is not None else None for t in base]
    got = grads(fn(ops), dev_in, grad_out)
    same_precision = grads(fn(ref), dev_in, grad_out)
    return max(rel(g, e) for g, e in zip(got, exact)), max(rel(g, e) for g, e in zip(same_precision, exact))


def check_tile(gen, dtype, dp, tile, bias):
    out_f, in_f = (int(torch.randint(5, 700, (1,), generator=gen)) for _ in range(2))
    base = [torch.randn(37, in_f, generator=gen, dtype=torch.float64),
            torch.randn(out_f, in_f, generator=gen, dtype=torch.float64) / in_f ** 0.5,
            torch.randn(out_f, generator=gen, dtype=torch.float64) if bias else None]
    pattern = torch.tensor([dp, int(torch.randint(dp, (1,), generator=gen))])

    def fn(module):
        return lambda x, w, b: module.tile_linear(x, w, b, pattern, tile=tile, p=0.5)

    grad_out = torch.randn(37, out_f, generator=gen, dtype=torch.float64)
    exact = grads(fn(ref), [t.clone().requires_grad_() if t is not None else None for t in base], grad_out)
    dev_in = [leaf(t, dtype, DEV) if t is not None else None for t in base]
    got = grads(fn(ops), dev_in, grad_out)
    same_precision = grads(fn(ref), dev_in, grad_out)
    return max(rel(g, e) for g, e in zip(got, exact)), max(rel(g, e) for g, e in zip(same_precision, exact))


def check_unit_dropout(gen, dtype, family, dp):
    x = torch.randn(7, 3, 301, generator=gen, dtype=torch.float64)
    pattern = torch.tensor([dp, dp - 1])
    got = ops.unit_dropout(x.to(dtype).to(DEV), pattern, family=family, p=0.5)
    want = ref.unit_dropout(x, pattern, family=family, p=0.5)
    return rel(got, want), rel(ref.unit_dropout(x.to(dtype).to(DEV), pattern, family=family, p=0.5), want)


def correctness(backend: str) -> dict:
    gen = torch.Generator().manual_seed(1234 if backend == "compiled" else 4321)
    worst: dict[str, float] = {}
    failures = []

    def record(name, dtype, errors):
        """Fails above the dtype's limit, or above 3x the dense reference run in the same dtype."""
        value, same_precision = errors
        key = f"{name} {str(dtype).replace('torch.', '')}"
        worst[key] = max(worst.get(key, 0.0), value)
        limit = max(LIMIT[dtype], 3 * same_precision)
        if not value <= limit:
            failures.append(f"{key}: rel error {value:.3g} > {limit:.3g} (dense reference in {dtype}: "
                            f"{same_precision:.3g})")

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for family in ("row", "block"):
            for dp in range(1, 9):
                dps = (dp, 1 + (dp * 3) % 8, 1 + (dp * 5) % 8, 1 + (dp + 3) % 8)
                for bias, lead in ((True, (33,)), (False, (4, 9))):
                    record(f"chain/{family}", dtype, check_chain(gen, family, dtype, dps, bias, lead))
                record(f"unit_dropout/{family}", dtype, check_unit_dropout(gen, dtype, family, dp))
            for bias, classes in ((True, 4), (False, 3)):
                record(f"chain_classes/{family}", dtype, check_chain_classes(gen, family, dtype, bias, classes))
        for kernel in ("groups", "tile_gemm"):  # cuBLAS per residue group (default) / tile-skipping GEMM
            os.environ["FXDROP_TILE_GEMM"] = "1" if kernel == "tile_gemm" else "0"
            for dp in range(1, 9):
                for tile in (32, 5):
                    record(f"tile_linear/{kernel}/t{tile}", dtype, check_tile(gen, dtype, dp, tile, bias=dp % 2 == 0))
        os.environ.pop("FXDROP_TILE_GEMM", None)
    if DEV == "cuda":
        torch.cuda.synchronize()
    return {"worst_rel_error": worst, "failures": failures}


# ---------------------------------------------------------------- training-step benchmark

WIDTHS = [784, 8192, 8192, 8192, 10]


def make_mlp(p: float) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(WIDTHS, WIDTHS[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(WIDTHS) - 2:
            layers += [nn.ReLU(), nn.Dropout(p)]
    return nn.Sequential(*layers).to(DEV, torch.bfloat16).train()


def dense_step(model, opt, x, y):
    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def fxdrop_step(model, opt, x, y, family, p):
    linears = [m for m in model if isinstance(m, nn.Linear)]
    weights = [m.weight for m in linears]
    biases = [m.bias for m in linears]
    sites = len(linears) - 1
    schedulers = [PatternScheduler(search_distribution(p), seed=i) for i in range(sites)]

    def step():
        opt.zero_grad(set_to_none=True)
        patterns = torch.stack([s.sample_tensor() for s in schedulers])
        out = ops.chain(x, weights, biases, patterns, family=family, activations=["relu"] * sites,
                        rates=[p] * sites)
        F.cross_entropy(out, y).backward()
        opt.step()
    return step


def time_steps(step, warmup: int = 10, iters: int = 60) -> float:
    """Median ms per step, CUDA events around each step."""
    for _ in range(warmup):
        step()
    if DEV == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def benchmark(compile_baseline: bool) -> dict:
    x = torch.randn(1024, WIDTHS[0], device=DEV, dtype=torch.bfloat16)
    y = torch.randint(0, WIDTHS[-1], (1024,), device=DEV)
    rows = []
    for p in (0.5, 0.7):
        model = make_mlp(p)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        row = {"p": p, "dropout_eager_ms": time_steps(dense_step(model, opt, x, y))}
        if compile_baseline:
            try:
                compiled = torch.compile(model)
                row["dropout_compiled_ms"] = time_steps(dense_step(compiled, opt, x, y), warmup=5)
            except Exception as error:  # noqa: BLE001 - report, keep going
                row["dropout_compiled_error"] = repr(error)[:300]
        for family in ("block", "row"):
            row[f"fxdrop_{family}_ms"] = time_steps(fxdrop_step(model, opt, x, y, family, p))
            with extension.composite_kernels("CUDA"):
                row[f"fxdrop_{family}_composite_ms"] = time_steps(fxdrop_step(model, opt, x, y, family, p))
        best = min(row["fxdrop_block_ms"], row["fxdrop_row_ms"])
        row["speedup_vs_dropout"] = row["dropout_eager_ms"] / best
        if "dropout_compiled_ms" in row:
            row["speedup_vs_compiled"] = row["dropout_compiled_ms"] / best
        row["target"] = 2.5 if p == 0.5 else 4.0
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu.json"))
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no GPU"
    extension.ensure_loaded()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "backend": fxdrop.backend_info()}
    t0 = time.time()
    try:
        result["correctness_compiled"] = correctness("compiled")
        with extension.composite_kernels("CUDA"):
            result["correctness_composite"] = correctness("composite")
    except Exception:  # noqa: BLE001
        result["correctness_error"] = traceback.format_exc()[-3000:]
    result["correctness_s"] = time.time() - t0
    args.out.write_text(json.dumps(result, indent=2))
    try:
        result["benchmark"] = benchmark(not args.no_compile)
    except Exception:  # noqa: BLE001
        result["benchmark_error"] = traceback.format_exc()[-3000:]
    args.out.write_text(json.dumps(result, indent=2))

    print("backend:", result["backend"]["cuda"], result["backend"].get("reason"))
    for key in ("correctness_compiled", "correctness_composite"):
        if key in result:
            fails = result[key]["failures"]
            print(f"{key}: {'OK' if not fails else f'{len(fails)} FAILURES'}; worst:",
                  {k: f"{v:.2g}" for k, v in result[key]["worst_rel_error"].items()})
            for f in fails[:10]:
                print("  ", f)
    if "correctness_error" in result:
        print(result["correctness_error"])
    for row in result.get("benchmark", {}).get("rows", []):
        print(f"p={row['p']}: dropout {row['dropout_eager_ms']:.2f} ms, compiled-baseline "
              f"{row.get('dropout_compiled_ms', float('nan')):.2f} ms, fxdrop block {row['fxdrop_block_ms']:.2f} / "
              f"row {row['fxdrop_row_ms']:.2f} ms (composite {row['fxdrop_block_composite_ms']:.2f} / "
              f"{row['fxdrop_row_composite_ms']:.2f}); speedup {row['speedup_vs_dropout']:.2f}x "
              f"(target {row['target']}x), vs compiled {row.get('speedup_vs_compiled', float('nan')):.2f}x")
    if "benchmark_error" in result:
        print(result["benchmark_error"])
    ok = "correctness_error" not in result and not result.get("correctness_compiled", {}).get("failures")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

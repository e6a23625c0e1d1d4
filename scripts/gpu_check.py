"""GPU checks of the fxdrop ops and the H200 training-step benchmark (run by scripts/gpu_check.sh).

1. Correctness on CUDA, compiled kernels and composite kernels: every op against the dense
   reference run in float64 on the CPU with the same inputs (relative error of outputs and of every
   gradient: fp32 < 1e-4, fp16 < 1e-2, bf16 < 5e-2, or up to 3x what the dense reference itself
   reaches in that dtype on the GPU; NaN never passes). Fresh random inputs per case.
2. Training runs, bf16, AdamW, of the MLP 784 -> 8192 -> 8192 -> 8192 -> 10, batch 1024, ReLU,
   dropout p after each hidden layer, p = 0.5 and 0.7: standard dropout (eager, and torch.compile'd)
   against fxdrop.convert (block, and block with granularity="rows"), blocks of 30 consecutive
   steps after warm-up, alternating in ABBA order over 3 rounds; the median ratio.
   ``--dry-run`` runs step 2 on the CPU at a small width (checks the script, times nothing real).

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


# ---------------------------------------------------------------- training-run benchmark

WIDTHS = [784, 8192, 8192, 8192, 10]


def make_mlp(p: float, widths) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers += [nn.ReLU(), nn.Dropout(p)]
    return nn.Sequential(*layers).to(DEV, torch.bfloat16).train()


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def block(model, x, y, steps: int, warmup: int, compiled: bool = False) -> float:
    """ms per step of ``steps`` consecutive AdamW training steps (zero_grad, forward, loss, backward, step)
    after ``warmup``, with a fresh optimizer: the training-run protocol of benchmarks/training_runs.py."""
    run = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad()
        F.cross_entropy(run(x), y).backward()
        opt.step()

    for _ in range(warmup):
        step()
    _sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    return 1e3 * (time.perf_counter() - start) / steps


def benchmark(compile_baseline: bool, widths=WIDTHS, batch: int = 1024, steps: int = 30, warmup: int = 5,
              rounds: int = 3) -> dict:
    """Standard dropout against fxdrop.convert (block; block with granularity="rows"), bf16, AdamW: whole
    blocks alternate in ABBA order, the speedup is the median over rounds (every round recorded)."""
    x = torch.randn(batch, widths[0], device=DEV, dtype=torch.bfloat16)
    y = torch.randint(0, widths[-1], (batch,), device=DEV)
    rows = []
    for p in (0.5, 0.7):
        sides = {"standard": lambda: block(make_mlp(p, widths), x, y, steps, warmup)}
        for name, options in (("block", {"pattern": "block"}),
                              ("block_rows", {"pattern": "block", "granularity": "rows"})):
            sides[name] = (lambda options=options: block(fxdrop.convert(make_mlp(p, widths), example_inputs=(x,),
                                                                          **options), x, y, steps, warmup))
        if compile_baseline:
            sides["standard_compiled"] = lambda: block(make_mlp(p, widths), x, y, steps, warmup, compiled=True)
        times = {name: [] for name in sides}
        for round_ in range(rounds):
            for name in (list(sides) if round_ % 2 == 0 else list(sides)[::-1]):
                try:
                    times[name].append(sides[name]())
                except Exception as error:  # noqa: BLE001 - report, keep going
                    times[name].append(float("nan"))
                    print(f"p={p} {name}: {error!r}"[:400], flush=True)
        row = {"p": p, "optimizer": "adamw", "dtype": "bfloat16", "batch": batch, "steps": steps, "warmup": warmup,
               "ms": times}
        for name in sides:
            if name != "standard":
                ratios = [a / b for a, b in zip(times["standard"], times[name])]
                row[f"speedup_{name}"] = statistics.median(ratios)
                row[f"ratios_{name}"] = ratios
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"protocol": "training runs: blocks of consecutive AdamW steps per side, ABBA rounds, median ratio",
            "widths": list(widths), "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu.json"))
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="the benchmark only, on the CPU, tiny widths")
    args = parser.parse_args()
    if args.dry_run:
        global DEV
        DEV = "cpu"
        result = benchmark(False, widths=[32, 64, 64, 64, 10], batch=16, steps=2, warmup=1, rounds=2)
        print(json.dumps(result)[:2000])
        return 0
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
        print(f"p={row['p']} bf16 AdamW: standard {statistics.median(row['ms']['standard']):.2f} ms/step; "
              + ", ".join(f"{k[8:]} {v:.2f}x" for k, v in row.items() if k.startswith("speedup_")))
    if "benchmark_error" in result:
        print(result["benchmark_error"])
    ok = "correctness_error" not in result and not result.get("correctness_compiled", {}).get("failures")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

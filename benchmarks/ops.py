"""Forward + backward of the fused chain against ``Linear -> ReLU -> Dropout -> Linear``.

Hidden 4096, batch 256, fp32 on this machine's CPU; each step draws a fresh pattern. Baseline and
fxdrop steps alternate and the figure is the median of the paired ratios (baseline / fxdrop), so
load from other processes hits both sides alike. Writes ``benchmarks/results/ops.json``.

    python benchmarks/ops.py [--quick] [--hidden 4096] [--batch 256] [--pairs 15]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import fxdrop.ops as ops
from fxdrop import PatternScheduler, search_distribution

RESULTS = Path(__file__).resolve().parent / "results"


def ideal_speedup(family: str, p: float) -> float:
    """FLOP ideal: x needs no grad, so Linear 1 does 2 GEMMs (fwd, wgrad) and Linear 2 does 3."""
    if family == "tile":  # only Linear 2 becomes structured
        return 5.0 / (2.0 + 3.0 * (1.0 - p))
    return 1.0 / (1.0 - p)


def paired_ratios(baseline, candidate, pairs: int, warmup: int = 2) -> list[float]:
    """``baseline_time / candidate_time`` for ``pairs`` interleaved pairs, after ``warmup`` of each."""
    for _ in range(warmup):
        baseline()
        candidate()
    ratios = []
    for i in range(pairs):
        order = (baseline, candidate) if i % 2 == 0 else (candidate, baseline)
        times = {}
        for fn in order:
            start = time.perf_counter()
            fn()
            times[fn] = time.perf_counter() - start
        ratios.append(times[baseline] / times[candidate])
    return ratios


def make_steps(hidden: int, batch: int, family: str, p: float, seed: int = 0):
    torch.manual_seed(seed)
    first, second = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
    dense = nn.Sequential(first, nn.ReLU(), nn.Dropout(p), second).train()
    x = torch.randn(batch, hidden)
    grad = torch.randn(batch, hidden)
    scheduler = PatternScheduler(search_distribution(p), seed=seed)
    params = [first.weight, first.bias, second.weight, second.bias]

    def clear():
        for t in params:
            t.grad = None

    def baseline():
        clear()
        dense(x).backward(grad)

    if family == "tile":
        def candidate():
            clear()
            hidden_act = torch.relu(first(x))
            ops.tile_linear(hidden_act, second.weight, second.bias, scheduler.sample_tensor(),
                            tile=32, p=p).backward(grad)
    else:
        def candidate():
            clear()
            patterns = scheduler.sample_tensor().unsqueeze(0)
            ops.chain(x, [first.weight, second.weight], [first.bias, second.bias], patterns, family=family,
                      activations=["relu"], rates=[p]).backward(grad)
    return baseline, candidate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="hidden 1024, 5 pairs")
    parser.add_argument("--out", type=Path, default=RESULTS / "ops.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.pairs = 1024, 5
    rows = []
    for p in (0.3, 0.5, 0.7):
        for family in ("row", "block", "tile"):
            baseline, candidate = make_steps(args.hidden, args.batch, family, p)
            ratios = paired_ratios(baseline, candidate, args.pairs)
            speedup = statistics.median(ratios)
            ideal = ideal_speedup(family, p)
            rows.append({"p": p, "family": family, "speedup": speedup, "ideal": ideal,
                         "efficiency": speedup / ideal, "ratios": ratios})
            print(f"p={p} {family:5s} speedup {speedup:.2f}x  ideal {ideal:.2f}x", flush=True)
    result = {
        "benchmark": "fused chain forward+backward vs Linear->ReLU->Dropout->Linear",
        "hidden": args.hidden, "batch": args.batch, "dtype": "float32", "pairs": args.pairs,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads()},
        "torch": torch.__version__, "backend": _backend(), "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    table = Table(title=f"fused chain fwd+bwd, hidden {args.hidden}, batch {args.batch} (median of paired ratios)")
    for col in ("p", "family", "speedup", "ideal", "efficiency"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['p']}", r["family"], f"{r['speedup']:.2f}x", f"{r['ideal']:.2f}x",
                      f"{100 * r['efficiency']:.0f}%")
    Console().print(table)
    return 0


def _backend() -> str:
    try:
        from fxdrop import backend_info
    except ImportError:
        return "composite"
    return str(backend_info())


if __name__ == "__main__":
    raise SystemExit(main())

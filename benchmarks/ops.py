"""Forward + backward of the fused chain against ``Linear -> ReLU -> Dropout -> Linear``.

Hidden 4096, batch 256, fp32 on this machine's CPU; each step draws a fresh pattern. Baseline and
fxdrop steps alternate (``fxdrop.harness.timing.paired_timing``) and the figures are the median of the paired ratios
(baseline / fxdrop) and the ratio of total times, so
load from other processes hits both sides alike. Writes ``benchmarks/results/ops.json``.

    python benchmarks/ops.py [--quick] [--hidden 4096] [--batch 256] [--pairs 31] [--retain-freed-memory]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import fxdrop.ops as ops
from fxdrop import PatternScheduler, allocator, search_distribution
from fxdrop.harness.audit_cli import max_dp_arg
from fxdrop.harness.timing import machine_info, paired_timing

RESULTS = Path(__file__).resolve().parent / "results"


def ideal_speedup(family: str, p: float) -> float:
    """FLOP ideal: x needs no grad, so Linear 1 does 2 GEMMs (fwd, wgrad) and Linear 2 does 3."""
    if family == "tile":  # only Linear 2 becomes structured
        return 5.0 / (2.0 + 3.0 * (1.0 - p))
    return 1.0 / (1.0 - p)


def make_steps(hidden: int, batch: int, family: str, p: float, seed: int = 0, max_dp: int | str = "auto"):
    torch.manual_seed(seed)
    first, second = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
    dense = nn.Sequential(first, nn.ReLU(), nn.Dropout(p), second).train()
    x = torch.randn(batch, hidden)
    grad = torch.randn(batch, hidden)
    scheduler = PatternScheduler(search_distribution(p, max_dp=max_dp), seed=seed)
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
    parser.add_argument("--pairs", type=int, default=31,
                        help="timed pairs (default 31: per-step ratios are bimodal when P(dp=1) > 0, see README)")
    parser.add_argument("--max-dp", type=max_dp_arg, default="auto", help="support of P(dp) (default auto, as convert)")
    parser.add_argument("--quick", action="store_true", help="hidden 1024, 5 pairs")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="keep freed memory in the process (fxdrop.allocator); default output ops_retained.json")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/ops.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.pairs = 1024, 5
    if args.retain_freed_memory and not allocator.retain_freed_memory():
        parser.error("--retain-freed-memory needs glibc (Linux)")
    if args.out is None:
        args.out = RESULTS / ("ops_retained.json" if args.retain_freed_memory else "ops.json")
    rows = []
    for p in (0.3, 0.5, 0.7):
        for family in ("row", "block", "tile"):
            baseline, candidate = make_steps(args.hidden, args.batch, family, p, max_dp=args.max_dp)
            timing = paired_timing(baseline, candidate, pairs=args.pairs)
            ideal = ideal_speedup(family, p)
            rows.append({"p": p, "family": family, "speedup": timing.speedup, "total_ratio": timing.total_ratio,
                         "ideal": ideal, "efficiency": timing.total_ratio / ideal, **timing.to_dict()})
            print(f"p={p} {family:5s} median {timing.speedup:.2f}x  total {timing.total_ratio:.2f}x  "
                  f"ideal {ideal:.2f}x", flush=True)
    result = {
        "benchmark": "fused chain forward+backward vs Linear->ReLU->Dropout->Linear",
        "hidden": args.hidden, "batch": args.batch, "dtype": "float32", "pairs": args.pairs,
        "max_dp": args.max_dp, "machine": machine_info(), "backend": _backend(), "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    table = Table(title=f"fused chain fwd+bwd, hidden {args.hidden}, batch {args.batch} (median of paired ratios)")
    for col in ("p", "family", "median ratio", "total ratio", "ideal", "efficiency (total)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['p']}", r["family"], f"{r['speedup']:.2f}x", f"{r['total_ratio']:.2f}x",
                      f"{r['ideal']:.2f}x", f"{100 * r['efficiency']:.0f}%")
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

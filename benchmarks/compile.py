"""torch.compile: whole training steps of the paper's MNIST MLP, compiled original against compiled fxdrop.

The MLP is 784 -> h -> h -> h -> 10 with ReLU + Dropout(p) after each hidden layer, batch 256, fp32,
a step is zero_grad, forward, cross-entropy, backward and an SGD update. Compared pairwise, each
figure being the median of interleaved paired ratios (baseline time / candidate time; see
:mod:`fxdrop.harness.timing`):

* ``compiled``: ``torch.compile(original)`` (Inductor, ordinary dropout) against
  ``torch.compile(fxdrop.convert(original), fullgraph=True)`` (Inductor);
* ``backend``: ``torch.compile(original)`` against ``torch.compile(original, backend="fxdrop")``;
* ``eager``: the original against ``fxdrop.convert(original)``, both eager, for reference.

Writes ``benchmarks/results/compile.json`` (``compile_quick.json`` with ``--quick``) with the machine.

    python benchmarks/compile.py [--quick] [--hidden 2048] [--p 0.5] [--pairs 10]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import fxdrop
from fxdrop.harness.bench import training_step
from fxdrop.harness.models import mnist_mlp
from fxdrop.harness.timing import machine_info, paired_timing

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 256


def _first_steps(step, n: int) -> float:
    """Seconds for the first ``n`` calls (compilation happens in the first, and on a mode's first call)."""
    start = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - start


def run(hidden: int, p: float, pairs: int, warmup: int, family: str, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    original = mnist_mlp(hidden, p)
    converted = fxdrop.convert(original, p=p, pattern=family, seed=seed)  # shares original's Parameters
    for_backend = copy.deepcopy(original)
    images = torch.rand(BATCH, 784)
    labels = torch.randint(0, 10, (BATCH,))

    steps = {
        "eager original": training_step(original, images, labels),
        "eager fxdrop": training_step(converted, images, labels),
        "compiled original": training_step(torch.compile(original), images, labels),
        "compiled fxdrop": training_step(torch.compile(converted, fullgraph=True), images, labels),
        "backend fxdrop": training_step(
            torch.compile(for_backend, backend="fxdrop", options={"pattern": family, "seed": seed, "p": p}),
            images, labels),
    }
    first_step_s = {name: _first_steps(step, 1) for name, step in steps.items()}
    comparisons = {
        "compiled": ("compiled original", "compiled fxdrop"),
        "backend": ("compiled original", "backend fxdrop"),
        "eager": ("eager original", "eager fxdrop"),
    }
    rows = []
    for label, (baseline, candidate) in comparisons.items():
        timing = paired_timing(steps[baseline], steps[candidate], pairs=pairs, warmup=warmup)
        rows.append({"comparison": label, "baseline": baseline, "candidate": candidate,
                     "baseline_ms": 1e3 * timing.baseline_median_s, "candidate_ms": 1e3 * timing.candidate_median_s,
                     "speedup": timing.speedup, "ratios": timing.ratios})
    return {
        "benchmark": (f"MNIST MLP 784-{hidden}-{hidden}-{hidden}-10, p={p}, {family} patterns, batch {BATCH}: whole "
                      "training step (forward, cross-entropy, backward, SGD) under torch.compile"),
        "protocol": {"pairs": pairs, "warmup_pairs": warmup, "dtype": "float32", "batch": BATCH,
                     "inner_backend": "inductor",
                     "figure": "median over interleaved pairs of baseline_time / candidate_time"},
        "sites_converted_by_backend": len(fxdrop.backend.sites(for_backend)),
        "first_step_s": first_step_s,
        "machine": machine_info(),
        "rows": rows,
    }


def table(result: dict) -> Table:
    out = Table(title=result["benchmark"])
    for column in ("comparison", "baseline ms", "candidate ms", "speedup (median ratio)"):
        out.add_column(column, justify="right")
    for row in result["rows"]:
        out.add_row(f"{row['baseline']} / {row['candidate']}", f"{row['baseline_ms']:.1f}",
                    f"{row['candidate_ms']:.1f}", f"{row['speedup']:.2f}x")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--family", default="row", choices=["row", "block"])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="h=512, 4 pairs: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.pairs, args.warmup = 512, 4, 1
    result = run(args.hidden, args.p, args.pairs, args.warmup, args.family)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("compile_quick.json" if args.quick else "compile.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    console = Console()
    console.print(table(result))
    console.print("first step (compilation included), s: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in result["first_step_s"].items()))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()

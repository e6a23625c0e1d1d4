"""Drop statistics of the pattern schedules: per-unit drop rate, co-drop correlation, distinct masks.

Bernoulli dropout drops each unit with probability p, independently (pairwise correlation 0, 2^n
masks). A pattern schedule drops each unit with probability exactly p too, but units fall together;
this measures by how much, for ``max_dp=8`` (the paper's) and ``max_dp="auto"`` (fxdrop's default).

    python benchmarks/codrop.py [--units 64] [--samples 20000]

Writes ``benchmarks/results/codrop.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fxdrop import PatternScheduler, search_distribution
from fxdrop import patterns as P
from fxdrop.harness.timing import machine_info

RESULTS = Path(__file__).resolve().parent / "results"


def statistics(family: str, p: float, max_dp: int | str, units: int, samples: int, seed: int = 11) -> dict:
    dist = search_distribution(p, max_dp=max_dp)
    scheduler = PatternScheduler(dist, seed=seed)
    kept = torch.zeros(samples, units, dtype=torch.bool)
    for s in range(samples):
        dp, offset = scheduler.sample()
        kept[s, P.kept_slice(family, units, dp, offset)] = True
    dropped = (~kept).double()
    corr = torch.corrcoef(dropped.T)
    off_diagonal = corr[~torch.eye(units, dtype=torch.bool)]
    return {"family": family, "p": p, "max_dp": max_dp, "support": dist.max_dp, "entropy": dist.entropy,
            "max_rate_error": float((dropped.mean(0) - p).abs().max()),
            "mean_pairwise_correlation": float(off_diagonal.mean()),
            "mean_abs_pairwise_correlation": float(off_diagonal.abs().mean()),
            "distinct_masks": len({tuple(row.tolist()) for row in kept})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", type=int, default=64)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=RESULTS / "codrop.json")
    args = parser.parse_args(argv)
    rows = [statistics(family, p, max_dp, args.units, args.samples)
            for p in (0.3, 0.5, 0.7) for max_dp in (8, "auto") for family in ("row", "block")]
    for row in rows:
        print(f"p={row['p']} max_dp={row['max_dp']!s:4} {row['family']:5} rate error {row['max_rate_error']:.4f} "
              f"corr {row['mean_pairwise_correlation']:+.3f} |corr| {row['mean_abs_pairwise_correlation']:.3f} "
              f"masks {row['distinct_masks']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"units": args.units, "samples": args.samples, "machine": machine_info(),
                                    "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

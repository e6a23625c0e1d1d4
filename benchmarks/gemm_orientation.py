"""Which orientation of a Linear's product this machine's BLAS runs faster: ``x @ w.t()`` or ``(w @ x.t()).t()``.

The chain op's CPU forward (``linear_product`` in csrc/structured.cpp) computes ``z = x @ w.t()`` for each
Linear of a chain, where ``x`` holds a row class's rows (a strided view of the batch) and ``w`` the kept
block of the weight (a column-sliced view). For few rows MKL runs the transposed product ``w @ x.t()``
faster, the copy back to row-major included; for many rows and a short inner dimension it runs it slower.
This script measures both on the operands the chain passes (strided rows, the kept half of a weight's
columns, whose row stride is then twice the inner size) over a grid of rows x inner x output sizes, in one
process, in alternating turns (``fxdrop.harness.timing.paired_timing``), and writes the median ms of each
and their ratio (transposed / plain: below 1, the transposed product is faster) to
``benchmarks/results/gemm_orientation.json``.
``linear_product``'s threshold was read off this grid (README's table splits it at the same inner size).

    python benchmarks/gemm_orientation.py [--rows 32,64,128,256,700] [--inner 325,650,784,1229,2048]
                                          [--outputs 1229,2048,4096,10000] [--reps 3] [--rounds 8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fxdrop.harness.timing import machine_info, paired_timing

RESULTS = Path(__file__).resolve().parent / "results"
MAX_FLOPS = 2 * 700 * 650 * 10_000  # larger products take too long to time here (the PTB decoder's size)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=_ints, default=[32, 64, 128, 256, 700])
    parser.add_argument("--inner", type=_ints, default=[325, 650, 784, 1229, 2048])
    parser.add_argument("--outputs", type=_ints, default=[1229, 2048, 4096, 10_000])
    parser.add_argument("--reps", type=int, default=3, help="consecutive products per turn (the last is timed)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "gemm_orientation.json")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    cells = []
    for m in args.rows:
        for k in args.inner:
            for n in args.outputs:
                if 2 * m * k * n > MAX_FLOPS:
                    continue
                x = torch.randn(2 * m, k)[::2]  # every other row: a row class's strided view
                w = torch.randn(n, 2 * k)[:, :k]  # the kept half of a weight's columns, as at p = 0.5

                def plain(x=x, w=w):
                    return torch.mm(x, w.t())

                def transposed(x=x, w=w):
                    return torch.mm(w, x.t()).t().contiguous()

                torch.testing.assert_close(plain(), transposed(), rtol=1e-4, atol=1e-3)
                timing = paired_timing(plain, transposed, pairs=args.rounds, warmup=1, steps_per_turn=args.reps)
                plain_ms, transposed_ms = 1e3 * timing.baseline_median_s, 1e3 * timing.candidate_median_s
                cells.append({"rows": m, "inner": k, "outputs": n, "plain_ms": plain_ms,
                              "transposed_ms": transposed_ms, "ratio": transposed_ms / plain_ms})
                print(f"rows {m:4d} inner {k:5d} outputs {n:6d}: x @ w.t() {plain_ms:7.2f} ms, "
                      f"(w @ x.t()).t() {transposed_ms:7.2f} ms, ratio {transposed_ms / plain_ms:.2f}", flush=True)
    result = {"title": "Orientation of a Linear's product on this machine's BLAS: (w @ x.t()).t() against x @ w.t(), "
                       "strided rows and a column-sliced fp32 weight, as the chain op passes them",
              "command": " ".join(["python benchmarks/gemm_orientation.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "reps": args.reps, "rounds": args.rounds, "cells": cells, "machine": machine_info()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a per-step permutation of the hidden units would cost on this machine, against fxdrop's step.

The dense mask references (README, "What a mask needs to train") show that fxdrop's block pattern over a
fresh random permutation of the units each step (``ref/shuffled``) trains like standard dropout at small
learning rates where the fixed partition lags. A kernel for it must read every weight in permuted order
once per step (the permuted copy, or a GEMM that gathers as it packs) and write the gradients back in
the user's order. This script prices that on the MNIST MLP 784-h-h-h-10 (batch 256), in one process, in
rounds that alternate four blocks of consecutive repetitions:

- ``fxdrop step``: a training step of ``fxdrop.convert(model)`` (the defaults, p as given) with SGD momentum;
- ``clone``: a copy of every Linear weight: the least any per-step permutation costs (a perfect gather);
- ``permute``: the permuted copies with ATen (``index_select`` of rows and columns by fresh permutations);
- ``permute + backward``: the same and its backward (the gradients scattered back into dense ones).

The figures are the medians over rounds of each block's mean ms. Writes ``benchmarks/results/shuffle_cost.json``.

    python benchmarks/shuffle_cost.py [--width 4096] [--p 0.7] [--reps 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fxdrop
from fxdrop.harness.models import mnist_mlp
from fxdrop.harness.timing import machine_info
from fxdrop.roofline import make_optimizer

RESULTS = Path(__file__).resolve().parent / "results"


def _permuted(weights: list[torch.Tensor], hidden: int) -> list[torch.Tensor]:
    """Every weight with its hidden rows and columns in a fresh random order (first layer: rows; last: columns)."""
    orders = [torch.randperm(hidden) for _ in range(len(weights) - 1)]
    out = []
    for i, weight in enumerate(weights):
        if i < len(orders):
            weight = weight.index_select(0, orders[i])
        if i > 0:
            weight = weight.index_select(1, orders[i - 1])
        out.append(weight)
    return out


def _block(fn, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return 1e3 * (time.perf_counter() - start) / reps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--p", type=float, default=0.7)
    parser.add_argument("--reps", type=int, default=10, help="consecutive repetitions per block")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "shuffle_cost.json")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = fxdrop.convert(mnist_mlp(args.width, args.p), seed=0).train()
    optimizer = make_optimizer("momentum", model.parameters(), 0.01)
    images, labels = torch.rand(256, 784), torch.randint(0, 10, (256,))
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    leaves = [w.detach().clone().requires_grad_() for w in weights]
    upstream = [torch.ones_like(w) for w in weights]  # the permuted copies' gradients, made once

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    def clone():
        with torch.no_grad():
            for w in weights:
                w.clone()

    def permute():
        with torch.no_grad():
            _permuted(weights, args.width)

    def permute_backward():
        outs = _permuted(leaves, args.width)
        torch.autograd.backward(outs, upstream)
        for leaf in leaves:
            leaf.grad = None

    blocks = {"fxdrop step": step, "clone": clone, "permute": permute, "permute + backward": permute_backward}
    for fn in blocks.values():  # warm-up
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in blocks}
    for round_ in range(args.rounds):
        order = list(blocks) if round_ % 2 == 0 else list(blocks)[::-1]
        for name in order:
            times[name].append(_block(blocks[name], args.reps))
        print(f"round {round_ + 1}: " + ", ".join(f"{n} {times[n][-1]:.1f} ms" for n in blocks), flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    result = {"title": f"Per-step permutation of the hidden units against fxdrop's step, MLP 784-{args.width}x3-10, "
                       f"p = {args.p}, batch 256, SGD momentum",
              "command": " ".join(["python benchmarks/shuffle_cost.py", *(argv if argv is not None else sys.argv[1:])]),
              "width": args.width, "p": args.p, "reps": args.reps, "rounds": args.rounds,
              "weight_mib": weight_bytes / 2**20, "ms": times, "median_ms": medians,
              "fxdrop_sites": [{"name": s.name, "row_classes": s.row_classes} for s in fxdrop.sites(model)],
              "machine": machine_info()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    step_ms = medians["fxdrop step"]
    for name, value in medians.items():
        print(f"{name:>20}: {value:7.1f} ms ({value / step_ms:.2f} of fxdrop's step)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

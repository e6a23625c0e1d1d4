"""fxdrop under torch.compile, both ways, on a small MLP with random data.

1. ``torch.compile(fxdrop.convert(model), fullgraph=True)``: convert first, then compile. The whole
   step is one graph; a new pattern every step does not recompile (the pattern reaches the ops as a
   tensor drawn by the ``fxdrop::sample_pattern`` op).
2. ``torch.compile(model, backend="fxdrop")``: the backend finds and rewrites the dropout sites in
   each graph Dynamo captures (so it also converts models that ``torch.fx`` cannot trace), then
   hands the graph to Inductor; ``fxdrop.backend.sites(model)`` lists the sites it made.

    python examples/compile_mlp.py [--inner inductor|aot_eager|eager] [--steps 5]

``FXDROP_LOG=1`` prints every decision of the backend.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import fxdrop
import fxdrop.backend


def make_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, 10))


def train(model: nn.Module, steps: int, images: torch.Tensor, labels: torch.Tensor) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inner", default="inductor", help="the backend that compiles the rewritten graphs")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = make_model()
    images, labels = torch.rand(128, 784), torch.randint(0, 10, (128,))

    # 1. convert, then compile
    converted = fxdrop.convert(copy.deepcopy(model), seed=0)
    compiled = torch.compile(converted, fullgraph=True, backend=args.inner)
    losses = train(compiled, args.steps, images, labels)
    print("convert, then compile:", " ".join(f"{x:.3f}" for x in losses))
    for site in fxdrop.sites(converted):
        print(f"  {site.name}: p={site.p}, last pattern {site.last_pattern}")
    print(f"  graphs compiled: {counters['stats']['unique_graphs']} (one per step would mean recompiling)")

    # 2. backend="fxdrop"
    counters.clear()
    compiled = torch.compile(model, backend="fxdrop", options={"inner": args.inner, "seed": 0})
    losses = train(compiled, args.steps, images, labels)
    print('backend="fxdrop":     ', " ".join(f"{x:.3f}" for x in losses))
    for site in fxdrop.backend.sites(model):
        print(f"  {site.name}: p={site.p}, last pattern {site.last_pattern}")
    print(f"  sites converted: {counters['fxdrop']['sites_converted']}, skipped: {counters['fxdrop']['sites_skipped']}")

    # eval: the original computation, exactly
    compiled.eval()
    model.eval()
    with torch.no_grad():
        same = torch.allclose(compiled(images), model(images), atol=1e-5)
    print(f"eval output equals the uncompiled model's: {same}")


if __name__ == "__main__":
    main()

"""The MNIST MLP under DistributedDataParallel: standard dropout against fxdrop, side by side.

    torchrun --nproc-per-node 2 examples/ddp_mlp.py [--width 1024] [--epochs 3] [--sync] [--comm-hook]

Both models start from the same weights and see the same data order; each rank trains on its own shard
of every epoch's permutation (``fxdrop.harness.data.load_mnist()``, 60,000 training images); epochs alternate
between the two models so that machine load hits both alike. fxdrop's patterns are independent per
rank by default (like standard dropout, whose masks come from each rank's own RNG); ``--sync`` shares
them across ranks, and ``--comm-hook`` (needs ``--sync``) then all-reduces only the kept rows/columns.
Rank 0 prints seconds per epoch (slowest rank), test accuracy and the speedup, and with ``--out`` writes
them as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fxdrop
from fxdrop import distributed as fd
from fxdrop.harness.data import load_mnist
from fxdrop.harness.models import mnist_mlp


def slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def shard(n: int, epoch: int, seed: int, rank: int, world: int, per_rank: int) -> list[torch.Tensor]:
    """This rank's batches of one epoch: the same permutation on every rank, every world-th index."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))[rank::world]
    steps = n // (world * per_rank)  # equal step counts on every rank (DDP needs them)
    return [order[i * per_rank:(i + 1) * per_rank] for i in range(steps)]


def train_epoch(ddp: DDP, optimizer, images, labels, batches) -> float:
    ddp.train()
    dist.barrier()
    start = time.perf_counter()
    for index in batches:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(images[index]), labels[index]).backward()
        optimizer.step()
    return slowest(time.perf_counter() - start)


@torch.no_grad()
def test_accuracy(model: nn.Module, images, labels, rank: int, world: int) -> float:
    model.eval()
    mine = slice(rank * len(images) // world, (rank + 1) * len(images) // world)
    correct = torch.tensor([(model(images[mine]).argmax(1) == labels[mine]).sum().item()], dtype=torch.float64)
    dist.all_reduce(correct)
    return float(correct) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024, help="hidden width h (default 1024)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256, help="global batch, split over ranks (default 256)")
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--pattern", default="block", choices=["row", "block"])
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate, momentum 0.9 (default 0.01)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sync", action="store_true", help="share fxdrop's patterns across ranks "
                        "(default: independent per rank)")
    parser.add_argument("--comm-hook", action="store_true", help="all-reduce only kept rows/columns (needs --sync)")
    parser.add_argument("--out", help="write the results as JSON here (rank 0)")
    args = parser.parse_args()
    if args.comm_hook and not args.sync:
        parser.error("--comm-hook needs --sync (the kept rows must be the same on every rank)")

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        parser.error(f"--batch {args.batch} must be divisible by the {world} ranks")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    data = load_mnist()

    torch.manual_seed(args.seed)
    standard = mnist_mlp(args.width, args.p)
    fast = fd.prepare(fxdrop.convert(copy.deepcopy(standard), pattern=args.pattern, seed=args.seed),
                      sync=args.sync)
    torch.manual_seed(args.seed + 1 + rank)  # standard dropout: each rank its own masks
    models = {"standard dropout": DDP(standard), f"fxdrop ({args.pattern})": DDP(fast)}
    hook = fd.register_comm_hook(models[f"fxdrop ({args.pattern})"]) if args.comm_hook else None
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9) for name, m in models.items()}
    epoch_s: dict[str, list[float]] = {name: [] for name in models}
    accuracy: dict[str, list[float]] = {name: [] for name in models}
    for epoch in range(args.epochs):
        batches = shard(len(data.train_images), epoch, args.seed, rank, world, args.batch // world)
        for name, ddp in models.items():
            epoch_s[name].append(train_epoch(ddp, optimizers[name], data.train_images, data.train_labels, batches))
            accuracy[name].append(test_accuracy(ddp.module, data.test_images, data.test_labels, rank, world))
            if rank == 0:
                print(f"epoch {epoch + 1}/{args.epochs}  {name:18s} {epoch_s[name][-1]:7.2f} s  "
                      f"test accuracy {accuracy[name][-1]:.2%}", flush=True)

    if rank == 0:
        names = list(models)
        result = {
            "command": f"torchrun --nproc-per-node {world} examples/ddp_mlp.py --width {args.width} --epochs "
                       f"{args.epochs} --batch {args.batch} --p {args.p} --pattern {args.pattern}"
                       + (" --sync" if args.sync else "") + (" --comm-hook" if args.comm_hook else ""),
            "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count(),
                        "world_size": world, "backend": "gloo", "threads_per_rank": torch.get_num_threads(),
                        "fxdrop_kernels": fxdrop.backend_info()["cpu"]},
            "patterns": "shared across ranks" if args.sync else "independent per rank",
            "models": {name: {"epoch_s": epoch_s[name], "median_epoch_s": statistics.median(epoch_s[name]),
                              "test_accuracy": accuracy[name]} for name in names},
            "speedup_median_epoch": statistics.median(epoch_s[names[0]]) / statistics.median(epoch_s[names[1]]),
        }
        if hook is not None:
            result["comm_hook_traffic_saving"] = hook.saving
        print(f"\nfxdrop kernels: {result['machine']['fxdrop_kernels']}; patterns {result['patterns']}")
        print(f"{'model':18s} {'median s/epoch':>15s} {'final test acc':>15s}")
        for name in names:
            print(f"{name:18s} {result['models'][name]['median_epoch_s']:15.2f} {accuracy[name][-1]:15.2%}")
        print(f"speedup (median epoch, standard / fxdrop): {result['speedup_median_epoch']:.2f}x"
              + (f"; comm hook sent {1 - hook.saving:.0%} of the plain all-reduce's bytes" if hook else ""))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

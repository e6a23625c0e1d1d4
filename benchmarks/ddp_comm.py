"""All-reduce traffic of DDP on the benchmark MLP: the plain all-reduce against fxdrop's kept-block hook.

    torchrun --nproc-per-node 2 benchmarks/ddp_comm.py [--widths 1024 2048] [--steps 12]

With patterns shared across ranks (``fxdrop.distributed.prepare(model, sync=True)``) the gradient of
each structured Linear is zero outside its kept rows/columns on every rank, so
``fxdrop.distributed.register_comm_hook`` all-reduces only the kept blocks. This measures, per training
step of the MLP ``784 -> h -> h -> h -> 10`` (batch per rank, fp32, SGD): bytes all-reduced, the
all-reduce alone (gloo, this machine's loopback) at the dense and the mean kept size, and the whole
DDP step with each hook, interleaved (ABBA), slowest rank per step, medians. Rank 0 prints a table
and writes ``benchmarks/results/ddp_comm.json``.
"""

from __future__ import annotations

import argparse
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


def mlp(width: int, p: float) -> nn.Module:
    return nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Dropout(p), nn.Linear(width, width), nn.ReLU(),
                         nn.Dropout(p), nn.Linear(width, width), nn.ReLU(), nn.Dropout(p), nn.Linear(width, 10))


def slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def time_allreduce(numel: int, reps: int) -> float:
    buf = torch.randn(numel)
    dist.all_reduce(buf)
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buf)
        times.append(slowest(time.perf_counter() - start))
    return statistics.median(times)


def measure(width: int, p: float, family: str, steps: int, batch: int) -> dict:
    rank = dist.get_rank()
    models = {}
    for name in ("plain", "kept-block"):
        torch.manual_seed(0)
        model = fd.prepare(fxdrop.convert(mlp(width, p), pattern=family), sync=True, seed=0)
        models[name] = DDP(model)
    hook = fd.register_comm_hook(models["kept-block"])
    optims = {name: torch.optim.SGD(m.parameters(), lr=0.01) for name, m in models.items()}
    g = torch.Generator().manual_seed(rank)
    x, y = torch.rand(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)

    def step(name: str) -> float:
        dist.barrier()
        start = time.perf_counter()
        optims[name].zero_grad()
        F.cross_entropy(models[name](x), y).backward()
        optims[name].step()
        return slowest(time.perf_counter() - start)

    for _ in range(2):  # warm-up (DDP rebuilds its buckets after the first step)
        step("plain"), step("kept-block")
    hook.sent_elements = hook.dense_elements = hook.steps = 0
    times: dict[str, list[float]] = {"plain": [], "kept-block": []}
    for i in range(steps):
        order = ("plain", "kept-block") if i % 2 == 0 else ("kept-block", "plain")
        for name in order:
            times[name].append(step(name))
    dense = hook.dense_elements // hook.steps
    sent = hook.sent_elements // hook.steps
    return {
        "width": width, "p": p, "family": family, "batch_per_rank": batch, "steps": steps,
        "dense_bytes_per_step": dense * 4, "kept_bytes_per_step": sent * 4, "traffic_saving": 1 - sent / dense,
        "allreduce_dense_s": time_allreduce(dense, 5), "allreduce_kept_s": time_allreduce(sent, 5),
        "step_plain_s": statistics.median(times["plain"]), "step_kept_block_s": statistics.median(times["kept-block"]),
        "step_speedup": statistics.median(a / b for a, b in zip(times["plain"], times["kept-block"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--families", nargs="+", default=["row", "block"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=128, help="per rank (256 over two ranks)")
    parser.add_argument("--out", default="benchmarks/results/ddp_comm.json")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    dist.init_process_group("gloo")
    rows = [measure(w, args.p, f, args.steps, args.batch) for w in args.widths for f in args.families]
    if dist.get_rank() == 0:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"DDP all-reduce per step, gloo loopback, {dist.get_world_size()} ranks, p={args.p}")
        for col in ("h", "family", "dense MB", "kept MB", "saving", "all-reduce dense ms", "all-reduce kept ms",
                    "step plain ms", "step hook ms", "step speedup"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(str(r["width"]), r["family"], f"{r['dense_bytes_per_step'] / 1e6:.1f}",
                          f"{r['kept_bytes_per_step'] / 1e6:.1f}", f"{r['traffic_saving']:.0%}",
                          f"{r['allreduce_dense_s'] * 1e3:.1f}", f"{r['allreduce_kept_s'] * 1e3:.1f}",
                          f"{r['step_plain_s'] * 1e3:.1f}", f"{r['step_kept_block_s'] * 1e3:.1f}",
                          f"{r['step_speedup']:.2f}x")
        Console(width=160).print(table)
        machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                   "cpus": os.cpu_count(), "world_size": dist.get_world_size(), "backend": "gloo",
                   "threads_per_rank": torch.get_num_threads(), "fxdrop_kernels": fxdrop.backend_info()["cpu"]}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": machine, "results": rows}, indent=2))
        print(f"wrote {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

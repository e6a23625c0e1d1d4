"""Quality parity on the real MNIST: standard dropout against fxdrop, over rates, seeds, families and scale modes.

The engine is ``fxdrop demo``'s (fxdrop/demo.py): the paper's MLP 784-h-h-h-10, every variant of one
(p, seed) starting from the same weights and seeing the same data order, epochs interleaved. Variants:
standard dropout, and ``fxdrop.convert`` with each pattern family (row, block) and scale mode
(``kept`` = n / kept units, ``rate`` = 1 / (1 - p)). Results are written after every (p, seed), so an
interrupted run still leaves its figures.

    python examples/mnist_mlp.py                                   # the full study: p 0.3/0.5/0.7 x 3 seeds x 20 epochs
    python examples/mnist_mlp.py --epochs 5 --seeds 0 --width 512  # a shorter look
    python examples/mnist_mlp.py --table examples/results/mnist_mlp.json

Writes ``examples/results/mnist_mlp.json``; prints a rich summary table and its markdown twin.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import fxdrop
from fxdrop.harness.audit_cli import max_dp_arg
from fxdrop.harness.data import load_mnist
from fxdrop.harness.demo import DemoConfig, train_interleaved
from fxdrop.harness.models import mnist_mlp
from fxdrop.harness.timing import machine_info

RESULTS = Path(__file__).resolve().parent / "results" / "mnist_mlp.json"
STANDARD = "standard"


def variants_for(config: DemoConfig, families, scales) -> dict[str, torch.nn.Module]:
    """Standard dropout and every (family, scale) conversion, all from the same initial weights.

    (``config.max_dp``: fxdrop.convert's; "auto" by default.)
    """
    torch.manual_seed(config.seed)
    standard = mnist_mlp(config.width, config.p)
    models = {STANDARD: standard}
    for family in families:
        for scale in scales:
            models[f"{family}/{scale}"] = fxdrop.convert(copy.deepcopy(standard), p=config.p, pattern=family,
                                                         seed=config.seed, scale=scale, max_dp=config.max_dp)
    return models


def summarise(result: dict) -> list[dict]:
    """Per (p, variant): mean and std of final test accuracy over seeds, difference to standard, speedup."""
    groups: dict[tuple, list[dict]] = {}
    for run in result["runs"]:
        groups.setdefault((run["p"], run["variant"]), []).append(run)
    rows = []
    for (p, variant), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != STANDARD, kv[0][1])):
        final = [100 * r["test_accuracy"][-1] for r in runs]
        standard_runs = {r["seed"]: r for r in groups.get((p, STANDARD), [])}
        standard_final = [100 * standard_runs[r["seed"]]["test_accuracy"][-1] for r in runs if r["seed"] in standard_runs]
        speedups = [sum(standard_runs[r["seed"]]["epoch_seconds"]) / sum(r["epoch_seconds"])
                    for r in runs if r["seed"] in standard_runs]
        rows.append({
            "p": p, "variant": variant, "seeds": len(runs),
            "mean_accuracy": statistics.mean(final),
            "std_accuracy": statistics.stdev(final) if len(final) > 1 else 0.0,
            "difference_points": statistics.mean(final) - statistics.mean(standard_final) if standard_final else None,
            "speedup": statistics.median(speedups) if speedups else None,
            "epoch_seconds": statistics.mean(s for r in runs for s in r["epoch_seconds"]),
        })
    return rows


def markdown_summary(result: dict) -> str:
    config = result["config"]
    lines = ["| p | variant | seeds | test accuracy (mean ± std) | Δ vs standard (points) | s/epoch | speedup |",
             "|---:|:---|---:|---:|---:|---:|---:|"]
    for row in summarise(result):
        difference = "" if row["variant"] == STANDARD or row["difference_points"] is None else \
            f"{row['difference_points']:+.2f}"
        speedup = "" if row["variant"] == STANDARD or row["speedup"] is None else f"{row['speedup']:.2f}×"
        lines.append(f"| {row['p']:g} | {row['variant']} | {row['seeds']} | {row['mean_accuracy']:.2f} ± "
                     f"{row['std_accuracy']:.2f} | {difference} | {row['epoch_seconds']:.1f} | {speedup} |")
    lines.append("")
    lines.append(f"MLP 784-{config['width']}-{config['width']}-{config['width']}-10, {config['epochs']} epochs, batch "
                 f"{config['batch']}, SGD lr {config['lr']} momentum {config['momentum']}, "
                 f"max_dp {config.get('max_dp', 8)}; "
                 f"{result['machine']['cpu']}, {result['machine']['torch_threads']} threads.")
    return "\n".join(lines)


def rich_summary(result: dict) -> Table:
    table = Table(title="MNIST MLP quality parity (final test accuracy)")
    for column in ("p", "variant", "seeds", "accuracy %", "Δ points", "s/epoch", "speedup"):
        table.add_column(column, justify="right")
    for row in summarise(result):
        standard = row["variant"] == STANDARD
        table.add_row(f"{row['p']:g}", row["variant"], str(row["seeds"]),
                      f"{row['mean_accuracy']:.2f} ± {row['std_accuracy']:.2f}",
                      "" if standard or row["difference_points"] is None else f"{row['difference_points']:+.2f}",
                      f"{row['epoch_seconds']:.1f}", "" if standard or row["speedup"] is None else f"{row['speedup']:.2f}x")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="0.3,0.5,0.7", help="comma-separated drop rates")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--families", default="row,block")
    parser.add_argument("--scales", default="kept,rate")
    parser.add_argument("--max-dp", type=max_dp_arg, default="auto", help="fxdrop.convert's max_dp (default auto)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--width", type=int, default=DemoConfig.width)
    parser.add_argument("--batch", type=int, default=DemoConfig.batch)
    parser.add_argument("--lr", type=float, default=DemoConfig.lr)
    parser.add_argument("--momentum", type=float, default=DemoConfig.momentum)
    parser.add_argument("--train-limit", type=int, default=None, help="train on the first N images only")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table", type=Path, default=None, metavar="JSON", help="summarise an existing results file")
    args = parser.parse_args(argv)
    console = Console()
    if args.table is not None:
        result = json.loads(args.table.read_text())
        console.print(rich_summary(result))
        print(markdown_summary(result))
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        rates = [float(v) for v in args.rates.split(",")]
        seeds = [int(v) for v in args.seeds.split(",")]
    except ValueError as error:
        parser.error(f"--rates/--seeds: {error}")
    families, scales = args.families.split(","), args.scales.split(",")
    data = load_mnist()
    base = DemoConfig(width=args.width, epochs=args.epochs, batch=args.batch, lr=args.lr, momentum=args.momentum,
                      max_dp=args.max_dp, train_limit=args.train_limit)
    result = {"study": "MNIST MLP quality parity: standard dropout vs fxdrop families x scale modes",
              "config": {k: v for k, v in vars(base).items() if k not in ("p", "seed", "pattern", "scale")},
              "rates": rates, "seeds": seeds, "families": families, "scales": scales,
              "machine": machine_info(), "runs": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    columns = (TextColumn("{task.description:>28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    for p in rates:
        for seed in seeds:
            config = DemoConfig(**{**vars(base), "p": p, "seed": seed})
            models = variants_for(config, families, scales)
            with Progress(*columns, console=console, transient=True) as progress:
                records = train_interleaved(models, config, data, progress=progress)
            for record in records:
                result["runs"].append({"p": p, "seed": seed, "variant": record.name, **record.to_dict()})
            result["elapsed_s"] = time.time() - started
            args.out.write_text(json.dumps(result, indent=2))
            console.print(f"p={p} seed={seed}: " + ", ".join(
                f"{r.name} {100 * r.test_accuracy[-1]:.2f}%" for r in records))
    console.print(rich_summary(result))
    print(markdown_summary(result))
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

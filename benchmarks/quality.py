"""Quality where dropout matters: no dropout, standard dropout and fxdrop variants on the MNIST MLP.

    python benchmarks/quality.py overfit     # 2,000 training images, p 0.7, SGD momentum lr 0.02, 60 epochs, 6 seeds
    python benchmarks/quality.py full        # all 60,000 images, p 0.5, SGD momentum lr 0.05, 2 epochs, 3 seeds
    python benchmarks/quality.py overfit_adamw   # 2,000 images, p 0.7, AdamW lr 1e-3, 60 epochs, 6 seeds
    python benchmarks/quality.py custom --images 2000 --p 0.5 --lr 0.05 --optimizer momentum --epochs 60 \\
        --seeds 0,1,2 --variants none,standard,block/rows/8 --name quality_mine
    python benchmarks/quality.py grid --images 2000 --optimizer momentum --lrs 0.01,0.02,0.05,0.1 \\
        --ps 0.3,0.5,0.7 --epochs 60 --seeds 0,1,2 --name quality_grid_momentum_2000
                                             # the stability grid: every (p, lr) cell, one file

Every variant of a seed starts from the same weights and sees the same data order
(:mod:`fxdrop.harness.quality`); variants are ``none``, ``standard`` and ``family/granularity[/classes]``.
Runs go two at a time, one torch thread each (this machine has 2 cores: do not time anything else
meanwhile). Writes ``benchmarks/results/<name>.json`` (every run, and per variant: mean test accuracy
over the last 5 epochs, divergences, paired differences against standard dropout and against no dropout
with standard errors, and the share of standard dropout's gain over no dropout that the variant keeps).
A ``grid`` file holds one such summary per (p, lr) cell; a cell's variants share seeds, so its paired
differences are within the cell. README's quality tables and stability grid are rendered from these files
(benchmarks/readme.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fxdrop.harness.quality import MnistRun, format_difference, run_many, summarize, summarize_cells

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = "none,standard,block/forward,row/forward,block/rows/2,block/rows/8,row/rows/8"
SUITES = {
    "overfit": dict(images=2000, p=0.7, lr=0.02, optimizer="momentum", epochs=60, seeds="0,1,2,3,4,5"),
    "full": dict(images=None, p=0.5, lr=0.05, optimizer="momentum", epochs=2, seeds="0,1,2"),
    "overfit_adamw": dict(images=2000, p=0.7, lr=1e-3, optimizer="adamw", epochs=60, seeds="0,1,2,3,4,5",
                          variants="none,standard,block/forward,block/rows/2"),
}


def table(result: dict) -> Table:
    out = Table(title=result["title"])
    for column in ("variant", "mean test acc.", "diverged", "Δ vs standard (± s.e.)", "Δ vs none (± s.e.)",
                   "share of standard's gain"):
        out.add_column(column, justify="right")
    for variant, row in result["summary"].items():
        out.add_row(variant, f"{100 * row['mean_accuracy']:.2f}%", f"{row['diverged']}/{row['runs']}",
                    format_difference(row.get("vs_standard")), format_difference(row.get("vs_none")),
                    "-" if row.get("share_of_standard_gain") is None else f"{100 * row['share_of_standard_gain']:.0f}%")
    return out


def grid_table(result: dict) -> Table:
    """Per variant and cell: the paired difference against standard dropout, and divergences."""
    out = Table(title=result["title"])
    out.add_column("variant")
    for cell in result["cells"]:
        out.add_column(f"p {cell['p']:g}, lr {cell['lr']:g}", justify="right")
    for variant in result["variants"]:
        row = []
        for cell in result["cells"]:
            summary = cell["summary"][variant]
            text = (f"{100 * summary['mean_accuracy']:.2f}%" if variant == "standard"
                    else format_difference(summary.get("vs_standard")))
            if summary["diverged"]:
                text += f" ({summary['diverged']}/{summary['runs']} div.)"
            row.append(text)
        out.add_row(variant, *row)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=(*SUITES, "custom", "grid"))
    parser.add_argument("--images", type=int, default=None, help="training images (default: the suite's; 0 = all)")
    parser.add_argument("--p", type=float, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--optimizer", choices=("momentum", "adamw"), default=None)
    parser.add_argument("--lrs", default=None, help="grid: comma-separated learning rates")
    parser.add_argument("--ps", default=None, help="grid: comma-separated dropout rates")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seeds", default=None, help="comma-separated seeds")
    parser.add_argument("--variants", default=None, help=f"comma-separated (default: the suite's, or {VARIANTS})")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--name", default=None, help="results file stem (default quality_<suite>)")
    args = parser.parse_args(argv)
    settings = dict(SUITES.get(args.suite, SUITES["overfit"]))
    for key in ("images", "p", "lr", "optimizer", "epochs", "seeds"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if settings["images"] == 0:
        settings["images"] = None
    variants = (args.variants or settings.pop("variants", VARIANTS)).split(",")
    settings.pop("variants", None)
    seeds = [int(s) for s in str(settings["seeds"]).split(",")]
    if args.suite == "grid":
        if not (args.lrs and args.ps):
            parser.error("grid needs --lrs and --ps")
        cells = [(float(p), float(lr)) for p in args.ps.split(",") for lr in args.lrs.split(",")]
    else:
        cells = [(settings["p"], settings["lr"])]
    runs = [MnistRun(variant=v, p=p, optimizer=settings["optimizer"], lr=lr,
                     train_images=settings["images"], epochs=settings["epochs"], width=args.width, seed=s,
                     average_last=min(5, settings["epochs"]))
            for s in seeds for (p, lr) in cells for v in variants]
    console = Console()
    data = "all 60,000" if settings["images"] is None else f"{settings['images']:,}"
    if args.suite == "grid":
        settings.update(p=sorted({p for p, _ in cells}), lr=sorted({lr for _, lr in cells}))
        title = (f"Stability grid: MNIST MLP 784-{args.width}x3-10, {data} training images, {settings['optimizer']}, "
                 f"p {settings['p']} x lr {settings['lr']}, {settings['epochs']} epochs, batch 128, seeds {seeds}")
    else:
        title = (f"MNIST MLP 784-{args.width}x3-10, {data} training images, p={settings['p']}, "
                 f"{settings['optimizer']} lr {settings['lr']}, {settings['epochs']} epochs, batch 128, seeds {seeds}")
    console.print(title)
    start, done = time.perf_counter(), []

    def progress(result):
        done.append(result)
        console.print(f"  [{len(done)}/{len(runs)}] {result['key']}: {100 * result['accuracy']:.2f}%"
                      f"{' (diverged)' if result['diverged'] else ''} in {result['seconds']:.0f} s")

    results = run_many(runs, workers=args.workers, on_result=progress)
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"title": title, "suite": args.suite, "settings": {**settings, "width": args.width, "batch": 128},
              "variants": variants, "seeds": seeds, "command": command, "elapsed_s": time.perf_counter() - start}
    if args.suite == "grid":
        result["cells"] = summarize_cells(results, cells, variants)
    else:
        result["summary"] = summarize(results, variants)
    result["runs"] = results
    from fxdrop.harness.timing import machine_info

    result["machine"] = machine_info()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.name or 'quality_' + args.suite}.json"
    out.write_text(json.dumps(result, indent=2))
    if args.suite == "grid":
        console.print(grid_table(result))
    else:
        console.print(table(result))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

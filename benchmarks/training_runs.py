"""Training-run speed benchmarks: standard dropout against fxdrop.convert, blocks of consecutive optimizer steps.

    python benchmarks/training_runs.py mlp       # MNIST MLP, widths 1024-4096, p 0.5/0.7, SGD / momentum / AdamW
    python benchmarks/training_runs.py ptb       # PTB word LM 2 x 650, p 0.5, SGD with clipping, block (forward
                                                 # and rows granularity)
    python benchmarks/training_runs.py check     # rerun each suite's last row; warn if it moved by more than 15%

Each row: ``repeats`` rounds of one standard block and one fxdrop block (each its own process, ABBA order),
``steps`` timed steps per block after ``warmup`` (fxdrop.harness.training_runs). Writes
``benchmarks/results/training_runs_<suite>.json`` (every block's time and phases, peak memory, the audit's
FLOP-only and roofline ideals, the machine) and prints a rich table. README's speed tables are rendered from
these files (benchmarks/readme.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fxdrop.harness.training_runs import DRIFT, Workload, drift, measure

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT = (("pattern", "block"),)  # fxdrop.convert's options for the fxdrop side (plus the suite's)
PTB_DEFAULT = ((("pattern", "block"),), (("granularity", "rows"), ("pattern", "block")))


def mlp_rows(widths, rates, optimizers, variants, steps, warmup):
    return [Workload("mlp", width, p, optimizer, 256, variant, steps, warmup)
            for width in widths for p in rates for optimizer in optimizers for variant in variants]


def ptb_rows(rates, optimizers, variants, steps, warmup):
    return [Workload("ptb", 650, p, optimizer, 20, variant, steps, warmup)
            for p in rates for optimizer in optimizers for variant in variants]


def ideals(workload: Workload) -> tuple[float | None, float | None]:
    """The audit's FLOP-only and roofline ideal step speedups for this workload."""
    import fxdrop
    from fxdrop.harness.training_runs import _build

    model, inputs, loss = _build(workload, converted=False)
    report = fxdrop.audit(model, inputs, optimizer=workload.optimizer, loss=loss, **workload.options())
    return report.ideal_speedup, report.roofline_speedup


def table(result: dict) -> Table:
    out = Table(title=result["title"])
    for column in ("workload", "fxdrop options", "std ms", "fxdrop ms", "speedup (median)", "rounds",
                   "FLOP ideal", "roofline", "std peak MiB", "fxdrop peak MiB"):
        out.add_column(column, justify="right")
    for row in result["rows"]:
        w = row["workload"]
        out.add_row(f"{w['model']} h={w['width']} p={w['p']} {w['optimizer']}",
                    ", ".join(f"{k}={v}" for k, v in w["convert"].items()),
                    f"{sorted(row['standard_ms'])[len(row['standard_ms']) // 2]:.1f}",
                    f"{sorted(row['fxdrop_ms'])[len(row['fxdrop_ms']) // 2]:.1f}", f"{row['speedup']:.2f}x",
                    " ".join(f"{r:.2f}" for r in row["ratios"]),
                    f"{row['ideal_flops']:.2f}x" if row.get("ideal_flops") else "-",
                    f"{row['ideal_roofline']:.2f}x" if row.get("ideal_roofline") else "-",
                    _mib(row, "standard"), _mib(row, "fxdrop"))
    return out


def _mib(row: dict, side: str) -> str:
    value = row.get(f"{side}_peak_rss_bytes")
    return "-" if value is None else f"{value / 2**20:.1f}"


def run(name: str, title: str, workloads: list[Workload], repeats: int, out: Path, console: Console) -> dict:
    rows, machine = [], None
    for index, workload in enumerate(workloads):
        console.print(f"[{index + 1}/{len(workloads)}] {workload.label()}")
        row, machine = measure(workload, repeats=repeats)
        row.ideal_flops, row.ideal_roofline = ideals(workload)
        record = asdict(row)
        record["speedup"] = row.speedup
        rows.append(record)
        console.print(f"    speedup {row.speedup:.2f}x (rounds {', '.join(f'{r:.2f}' for r in row.ratios)})")
        result = {"title": title, "suite": name, "repeats": repeats,
                  "protocol": "each side: its own process per block; warm-up steps, then consecutive timed steps "
                              "(zero_grad(set_to_none=True), forward, loss, backward, optimizer step); blocks in "
                              "ABBA order; speedup = median over rounds of standard ms / fxdrop ms",
                  "machine": machine, "rows": rows}
        out.write_text(json.dumps(result, indent=2))  # partial results survive an interrupted run
    console.print(table(result))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=("mlp", "ptb", "check", "custom"))
    parser.add_argument("--widths", default="1024,2048,4096")
    parser.add_argument("--rates", default="0.5,0.7")
    parser.add_argument("--optimizers", default="sgd,momentum,adamw")
    parser.add_argument("--variant", action="append", default=None, metavar="KEY=VALUE,...",
                        help="fxdrop.convert options of one fxdrop variant (repeatable); default pattern=block")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default=None, help="results file stem (default training_runs_<suite>)")
    args = parser.parse_args(argv)
    console = Console()
    variants = [tuple(sorted(_options(text).items())) for text in args.variant] if args.variant else \
        list(PTB_DEFAULT) if args.suite == "ptb" else [DEFAULT]
    rates = [float(v) for v in args.rates.split(",")]
    optimizers = args.optimizers.split(",")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.name or 'training_runs_' + args.suite}.json"
    if args.suite == "check":
        return check(console)
    if args.suite in ("mlp", "custom"):
        workloads = mlp_rows([int(v) for v in args.widths.split(",")], rates, optimizers, variants, args.steps,
                             args.warmup)
        title = "MNIST MLP 784-h-h-h-10, batch 256: training runs, standard dropout vs fxdrop"
    else:
        workloads = ptb_rows([0.5] if args.rates == parser.get_default("rates") else rates,
                             ["sgd"] if args.optimizers == parser.get_default("optimizers") else optimizers,
                             variants, args.steps, args.warmup)
        title = "PTB word LM 2 x 650, BPTT 35, batch 20: training runs, standard dropout vs fxdrop"
    run(args.suite, title, workloads, args.repeats, out, console)
    return 0


def _options(text: str) -> dict:
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        out[key] = int(value) if value.isdigit() else value
    return out


def check(console: Console, suites=("mlp", "ptb")) -> int:
    """Rerun the last (widest, costliest) row of each published suite; warn when one moved by more than 15%."""
    status = 0
    for suite in suites:
        path = RESULTS / f"training_runs_{suite}.json"
        if not path.exists():
            console.print(f"{path.name}: not published yet")
            continue
        published = json.loads(path.read_text())
        last = published["rows"][-1]
        workload = Workload(**{**last["workload"], "convert": tuple(sorted(last["workload"]["convert"].items()))})
        row, _ = measure(workload, repeats=published["repeats"])
        moved = drift(last, row)
        console.print(f"{workload.label()}: published {last['speedup']:.2f}x, now {row.speedup:.2f}x "
                      f"(rounds {', '.join(f'{r:.2f}' for r in row.ratios)}; {100 * moved:.0f}% apart)")
        if moved > DRIFT:
            console.print(f"[yellow]warning: moved by more than {100 * DRIFT:.0f}%: not a figure yet; rerun the suite")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())

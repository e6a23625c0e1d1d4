"""``fxdrop bench``: speed as a training run sees it, standard dropout against ``fxdrop.convert``.

    fxdrop bench                               # MNIST MLP, widths 1024-4096, p 0.5/0.7, SGD / momentum / AdamW
    fxdrop bench --suite ptb                   # PTB word LM 2 x 650, p 0.5, SGD with clipping
    fxdrop bench --suite chain --widths 4096   # the fused chain op alone: Linear -> ReLU -> Dropout -> Linear
    fxdrop bench --kernels composite           # the fxdrop side on the composite PyTorch kernels
    fxdrop bench --widths 4096 --rates 0.7 --optimizers adamw --variant pattern=block,granularity=rows
    fxdrop bench --quick                       # h = 1024, p = 0.5, momentum, one round: a one-minute look

Every row is :func:`fxdrop.harness.training_runs.measure`: ``repeats`` rounds of one standard block and
one fxdrop block, each its own process, in ABBA order; ``steps`` consecutive timed steps per block after
``warmup`` (``granularity`` and the row-class count are always named, so a row keeps its meaning when a
default changes; narrower MLPs get proportionally more steps, so every block runs for a similar time: a
20-step block of a 30 ms step is too short to time). Next to each speedup: the audit's FLOP-only and
roofline ideals for the same optimizer. Writes one JSON file (every block's time and phases, peak
memory, the ideals, the machine) and prints a rich table; ``benchmarks/training_runs.py`` writes the
published files with this code and README's tables are rendered from them.

Imports torch, rich, fxdrop (audit) and the harness's training runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from .training_runs import (COMPILE_MODES, DRIFT, KERNELS, OPTIMIZERS, RUN_OPTIONS, Workload, drift, measure,
                            option_value)

DEFAULT_OUT = Path("bench-results")  # relative to the working directory
MLP_DEFAULT = ((("granularity", "forward"), ("pattern", "block")),)
PTB_DEFAULT = ((("granularity", "forward"), ("pattern", "block")), (("granularity", "rows"), ("pattern", "block")))
TITLES = {"mlp": "MNIST MLP 784-h-h-h-10, batch 256: training runs, standard dropout vs fxdrop",
          "chain": "The fused chain op alone, Linear(h, h) -> ReLU -> Dropout -> Linear(h, h), batch 256: training "
                   "runs, standard dropout vs fxdrop",
          "ptb": "PTB word LM 2 x 650, BPTT 35, batch 20: training runs, standard dropout vs fxdrop"}
PROTOCOL = ("each side: its own process per block; warm-up steps, then consecutive timed steps (zero_grad("
            "set_to_none=True), forward, loss, backward, optimizer step); blocks in ABBA order; speedup = median "
            "over rounds of standard ms / fxdrop ms")


def steps_for(width: int, steps: int) -> int:
    """Timed steps of an MLP block: ``steps`` at h = 4096, proportionally more for narrower layers."""
    return max(steps, steps * 4096 // max(width, 1))


def named(variant: tuple, p: float, *, rnn: bool = False) -> tuple:
    """A variant's convert options with its family, granularity and row-class count named (defaults filled
    in, ``row_classes="auto"`` resolved at the row's rate), so that a published row keeps its meaning when
    a default changes. The standard side (no options) stays empty. ``"auto"`` resolves as for a Linear
    site; for a model with RNN sites (``rnn``) it stays ``"auto"``, because no single count says what it
    does there (:func:`fxdrop.scheduler.classes_for`: 2 time chunks at an LSTM site, 4 or 8 row classes at a
    Linear one); the row's fxdrop version, in its machine record, then pins what it meant."""
    if not variant:
        return variant
    from ..config import DropoutConfig
    from ..scheduler import AUTO_CLASSES, classes_for

    # the config decides, as for convert: defaults, validation, and where "rows" applies (not to tile sites)
    config = DropoutConfig.from_options({k: v for k, v in variant if k not in RUN_OPTIONS},
                                        where="fxdrop bench --variant")
    options = {"pattern": config.pattern, "granularity": config.granularity, **dict(variant)}
    if config.granularity_for(config.pattern) == "rows":
        keep_auto = rnn and config.row_classes == AUTO_CLASSES
        options["row_classes"] = AUTO_CLASSES if keep_auto else classes_for(config.row_classes, p)
    return tuple(sorted(options.items()))


def workloads(suite: str, *, widths, rates, optimizers, variants, steps: int, warmup: int,
              compile: str = "eager", kernels: str = "compiled") -> list[Workload]:
    if suite in ("mlp", "chain"):
        return [Workload(suite, width, p, optimizer, 256, named(variant, p), steps_for(width, steps), warmup,
                         compile=compile, kernels=kernels)
                for width in widths for p in rates for optimizer in optimizers for variant in variants]
    if suite == "ptb":
        return [Workload("ptb", 650, p, optimizer, 20, named(variant, p, rnn=True), steps, warmup, compile=compile,
                         kernels=kernels)
                for p in rates for optimizer in optimizers for variant in variants]
    raise ValueError(f"unknown suite {suite!r}; expected 'mlp', 'chain' or 'ptb'")


def ideals(workload: Workload) -> tuple[float | None, float | None]:
    """The audit's FLOP-only and roofline ideal step speedups for this workload (its optimizer and loss)."""
    from ..audit import audit
    from .training_runs import _build

    model, inputs, loss = _build(dataclasses.replace(workload, compile="eager"), converted=False)
    report = audit(model, inputs, optimizer=workload.optimizer, loss=loss, **workload.options())
    return report.ideal_speedup, report.roofline_speedup


def table(result: dict):
    from rich.table import Table

    out = Table(title=result["title"])
    for column in ("workload", "fxdrop options", "std ms", "fxdrop ms", "speedup", "rounds", "FLOP ideal",
                   "roofline", "peak MiB std", "peak MiB fxdrop"):
        out.add_column(column, justify="right")
    for row in result["rows"]:
        workload = Workload.from_row(row)
        out.add_row(workload.describe(), ", ".join(f"{k}={v}" for k, v in workload.convert),
                    f"{sorted(row['standard_ms'])[len(row['standard_ms']) // 2]:.1f}",
                    f"{sorted(row['fxdrop_ms'])[len(row['fxdrop_ms']) // 2]:.1f}", f"{row['speedup']:.2f}x",
                    " ".join(f"{r:.2f}" for r in row["ratios"]),
                    f"{row['ideal_flops']:.2f}x" if row.get("ideal_flops") else "-",
                    f"{row['ideal_roofline']:.2f}x" if row.get("ideal_roofline") else "-",
                    _mib(row.get("standard_peak_rss_bytes")), _mib(row.get("fxdrop_peak_rss_bytes")))
    return out


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def run_rows(suite: str, rows_to_run: list[Workload], *, repeats: int, out: Path, command: str, console,
             keep: list[dict] | None = None, earlier_commands: list[str] | None = None,
             notes: list[str] | None = None) -> dict:
    """Measure every workload (written to ``out`` after each row, so an interrupted run keeps its rows);
    ``keep``: rows of an earlier file that this run does not replace, ``earlier_commands`` the commands that
    measured them (the file's ``commands`` lists every command its rows came from, in order), ``notes``
    the earlier file's notes about its rows."""
    from rich.markup import escape

    rows, machine = list(keep or []), None
    commands = [c for c in (earlier_commands or []) if c != command] + [command]
    result: dict = {}
    for index, workload in enumerate(rows_to_run):
        console.print(escape(f"[{index + 1}/{len(rows_to_run)}] {workload.label()}"))  # "[options]" is not markup
        row, machine = measure(workload, repeats=repeats)
        row.ideal_flops, row.ideal_roofline = ideals(workload)
        record = asdict(row)
        record["speedup"] = row.speedup
        record["machine"] = machine  # per row: a merged file can hold rows measured on different machines
        rows.append(record)
        console.print(f"    speedup {row.speedup:.2f}x (rounds {', '.join(f'{r:.2f}' for r in row.ratios)})")
        result = {"title": TITLES[suite], "suite": suite, "repeats": repeats, "protocol": PROTOCOL,
                  "command": command, "commands": commands, "machine": machine, "rows": sorted(rows, key=_order)}
        if notes:
            result["notes"] = list(notes)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return result


def _order(row: dict) -> tuple:
    w = Workload.from_row(row)
    return (w.width, w.p, OPTIMIZERS.index(w.optimizer), COMPILE_MODES.index(w.compile), KERNELS.index(w.kernels),
            w.convert)


def _key(w: Workload) -> tuple:
    """What makes two rows the same measurement (a merge replaces the earlier one)."""
    return (w.model, w.width, w.p, w.optimizer, w.compile, w.kernels, w.convert)


def check(files: list[Path], out: Path, console) -> int:
    """Rerun the last (widest, costliest) row of each published file; warn when one moved by more than 15%."""
    status, rows, machine = 0, [], None
    for path in files:
        if not path.exists():
            console.print(f"{path.name}: not published yet")
            continue
        published = json.loads(path.read_text())
        last = published["rows"][-1]
        workload = Workload.from_row(last)
        row, machine = measure(workload, repeats=published["repeats"])
        moved = drift(last, row)
        console.print(f"{workload.label()}: published {last['speedup']:.2f}x, now {row.speedup:.2f}x "
                      f"(rounds {', '.join(f'{r:.2f}' for r in row.ratios)}; {100 * moved:.0f}% apart)")
        rows.append({"file": path.name, "workload": workload.label(), "published": last["speedup"],
                     "rerun": row.speedup, "rerun_ratios": row.ratios, "drift": moved,
                     "rerun_standard_ms": row.standard_ms, "rerun_fxdrop_ms": row.fxdrop_ms})
        if moved > DRIFT:
            console.print(f"[yellow]warning: moved by more than {100 * DRIFT:.0f}%: not a figure yet; rerun the suite")
            status = 1
    if rows:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"limit": DRIFT, "machine": machine, "rows": rows}, indent=2))
    return status


def reprice(files: list[Path], console) -> int:
    """Recompute every row's FLOP and roofline ideals with the current ``fxdrop.audit`` (the measured times
    stay as they were): for a model change, not a measurement. Records the machine constants used, when,
    and the previous roofline figure of each row."""
    from ..roofline import measure_machine

    for path in files:
        if not path.exists():
            console.print(f"{path.name}: not published yet")
            continue
        published = json.loads(path.read_text())
        for row in published["rows"]:
            workload = Workload.from_row(row)
            previous = row.get("ideal_roofline")
            row["ideal_flops"], row["ideal_roofline"] = ideals(workload)
            row.setdefault("ideal_roofline_as_measured", previous)
            was = "-" if previous is None else f"{previous:.2f}x"
            console.print(f"{path.name} {workload.label()}: measured {row['speedup']:.2f}x, roofline "
                          f"{row['ideal_roofline']:.2f}x (was {was})")
        published["roofline_repriced"] = {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                          "machine": measure_machine().to_dict(),
                                          "load_average_1m": os.getloadavg()[0]}
        path.write_text(json.dumps(published, indent=2))
    return 0


def _variant(text: str) -> tuple:
    options = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--variant {text!r}: expected key=value[,key=value...]")
        options[key] = option_value(value)
    return tuple(sorted(options.items()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=("mlp", "chain", "ptb"), default="mlp")
    parser.add_argument("--widths", default="1024,2048,4096", help="MLP hidden widths (mlp suite)")
    parser.add_argument("--rates", default=None, help="drop rates (default 0.5,0.7; ptb: 0.5)")
    parser.add_argument("--optimizers", default=None,
                        help="of sgd, momentum, adamw (default all three; ptb: sgd, with clipping)")
    parser.add_argument("--variant", action="append", type=_variant, default=None, metavar="KEY=VALUE,...",
                        help="fxdrop.convert options of one fxdrop variant (repeatable; default pattern=block, "
                             "and for ptb also granularity=rows)")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="eager",
                        help="eager; inductor: torch.compile of both sides (fxdrop's converted model with "
                             "fullgraph=True); backend: torch.compile(standard) against backend=fxdrop")
    parser.add_argument("--kernels", choices=KERNELS, default="compiled",
                        help="the fxdrop side's kernels: compiled (csrc/) or composite (FXDROP_NO_EXT=1)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per block (at h = 4096 for the MLP)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="ABBA rounds per row")
    parser.add_argument("--quick", action="store_true", help="h = 1024, p = 0.5, momentum, one round")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"the results file (default {DEFAULT_OUT}/training_runs_<suite>.json)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of an existing --out file that this run does not measure")


def run(args: argparse.Namespace, command: str = "fxdrop bench") -> int:
    from rich.console import Console

    console = Console()
    if args.quick:
        args.widths, args.rates, args.optimizers, args.repeats = "1024", "0.5", "momentum", 1
    rates = args.rates or ("0.5" if args.suite == "ptb" else "0.5,0.7")
    optimizers = (args.optimizers or ("sgd" if args.suite == "ptb" else "sgd,momentum,adamw")).split(",")
    for name in optimizers:
        if name not in OPTIMIZERS:
            console.print(f"fxdrop bench: error: --optimizers: {name!r} is not one of {', '.join(OPTIMIZERS)}")
            return 2
    try:
        widths = [int(v) for v in args.widths.split(",")]
        rate_values = [float(v) for v in rates.split(",")]
    except ValueError as err:
        console.print(f"fxdrop bench: error: --widths/--rates: {err}")
        return 2
    variants = args.variant or list(PTB_DEFAULT if args.suite == "ptb" else MLP_DEFAULT)
    try:
        rows = workloads(args.suite, widths=widths, rates=rate_values, optimizers=optimizers, variants=variants,
                         steps=args.steps, warmup=args.warmup, compile=args.compile, kernels=args.kernels)
    except (TypeError, ValueError) as err:  # a --variant that fxdrop.convert would reject
        console.print(f"fxdrop bench: error: --variant: {err}")
        return 2
    out = args.out or DEFAULT_OUT / f"training_runs_{args.suite}.json"
    keep, earlier, notes = [], [], []
    if args.merge and out.exists():
        measured = {_key(w) for w in rows}
        published = json.loads(out.read_text())
        # rows from before per-row machine records ran on the machine the file names
        keep = [{**r, "machine": r.get("machine", published.get("machine"))} for r in published["rows"]
                if _key(Workload.from_row(r)) not in measured]
        earlier = published.get("commands", [published["command"]] if "command" in published else [])
        notes = published.get("notes", [])
    result = run_rows(args.suite, rows, repeats=args.repeats, out=out, command=command, console=console, keep=keep,
                      earlier_commands=earlier, notes=notes)
    console.print(table(result))
    console.print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:  # `python -m fxdrop.harness.bench`
    parser = argparse.ArgumentParser(prog="fxdrop bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    import sys

    sys.exit(main())

"""``fxdrop bench``: whole training steps of the paper's MNIST MLP, original against converted.

A step is forward, cross-entropy, backward and an SGD update. For every hidden width h, drop rate p
and pattern family, the original model (``nn.Dropout``) and ``fxdrop.convert`` of it alternate step by
step, and the speedup is reported twice: the median of the paired ratios after warm-up, and the ratio of
total times (the speedup of a training run; see :mod:`fxdrop.harness.timing` for why they differ).
Next to each speedup stands the ideal from FLOPs (``fxdrop.audit``; see :func:`ideal_speedup`) and
their ratio, the efficiency; and the peak memory of one step of each. Results go to
``benchmarks/results/mlp.json`` (``mlp_quick.json`` with ``--quick``) with the machine recorded, a
markdown table (:func:`markdown_table`, for README.md) and a PNG of speedup against p with the
paper's published MNIST-MLP range marked.

Imports torch, rich, fxdrop (convert, audit, demo's model, timing) and, for the plot only, matplotlib.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import allocator
from .models import mnist_mlp
from .timing import machine_info, paired_timing, peak_step_memory

WIDTHS = (1024, 2048, 4096)
RATES = (0.3, 0.5, 0.7)
FAMILIES = ("row", "block")
BATCH = 256
PAIRS = 12
WARMUP = 2
MEMORY_STEPS = 5
QUICK = {"widths": (1024,), "pairs": 5, "warmup": 1}
# Song et al. (DATE 2019), MNIST MLP training speedup on GPU at dropout 0.3-0.7.
PAPER_MNIST_MLP_SPEEDUP = (1.18, 2.16)
DEFAULT_OUT = Path("fxdrop-bench")  # relative to the working directory; benchmarks/run.py passes its own


def training_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                  lr: float = 0.01) -> Callable[[], None]:
    """One whole training step of ``model`` (zero grads, forward, loss, backward, SGD), as a closure."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step


def ideal_speedup(model: nn.Module, example_inputs: tuple, *, p: float, pattern: str) -> tuple[float, str]:
    """The predicted ideal step speedup (FLOPs only) and where it came from: ``fxdrop.audit``."""
    from ..audit import ideal_speedup as audit_ideal

    return audit_ideal(model, example_inputs, p=p, pattern=pattern), "fxdrop.audit"


def measure(width: int, p: float, family: str, *, batch: int = BATCH, pairs: int = PAIRS, warmup: int = WARMUP,
            seed: int = 0, memory: bool = True, convert: Callable[..., nn.Module] | None = None,
            on_pair: Callable[[int], None] | None = None) -> dict:
    """One benchmark row: paired step timing, ideal, efficiency and peak step memory of both models."""
    if convert is None:
        import fxdrop

        convert = fxdrop.convert
    torch.manual_seed(seed)
    original = mnist_mlp(width, p)
    converted = convert(original, p=p, pattern=family, seed=seed)  # shares original's Parameters
    images = torch.rand(batch, original[0].in_features)
    labels = torch.randint(0, original[-1].out_features, (batch,))
    baseline_step = training_step(original, images, labels)
    fxdrop_step = training_step(converted, images, labels)
    timing = paired_timing(baseline_step, fxdrop_step, pairs=pairs, warmup=warmup, on_pair=on_pair)
    ideal, ideal_source = ideal_speedup(original, (images,), p=p, pattern=family)
    row = {"width": width, "p": p, "family": family, "batch": batch,
           "baseline_ms": 1e3 * timing.baseline_median_s, "fxdrop_ms": 1e3 * timing.candidate_median_s,
           "speedup": timing.speedup, "speedup_total": timing.total_ratio, "ideal": ideal,
           "ideal_source": ideal_source, "efficiency": timing.total_ratio / ideal, "ratios": timing.ratios,
           "baseline_s": timing.baseline_s, "fxdrop_s": timing.candidate_s}
    if memory:
        # fxdrop's working set depends on the step's patterns (dp = 1 keeps everything): median of several steps.
        for name, step in (("baseline", baseline_step), ("fxdrop", fxdrop_step)):
            peaks = sorted(peak_step_memory(step) for _ in range(MEMORY_STEPS))
            row[f"{name}_peak_bytes"] = peaks[len(peaks) // 2]
            row[f"{name}_peak_bytes_max"] = peaks[-1]
    return row


def run_suite(*, widths=WIDTHS, rates=RATES, families=FAMILIES, batch: int = BATCH, pairs: int = PAIRS,
              warmup: int = WARMUP, seed: int = 0, memory: bool = True, progress=None,
              convert: Callable[..., nn.Module] | None = None) -> dict:
    """Every (width, p, family) row, with the machine and the protocol recorded."""
    rows = []
    for width in widths:
        for p in rates:
            for family in families:
                task = None
                if progress is not None:
                    task = progress.add_task(f"h={width} p={p} {family}", total=pairs)
                on_pair = (lambda _i, task=task: progress.advance(task)) if task is not None else None
                rows.append(measure(width, p, family, batch=batch, pairs=pairs, warmup=warmup, seed=seed,
                                    memory=memory, convert=convert, on_pair=on_pair))
    return {
        "benchmark": "MNIST MLP 784-h-h-h-10 whole training step (forward, backward, SGD), original vs fxdrop.convert",
        "protocol": {"pairs": pairs, "warmup_pairs": warmup, "dtype": "float32", "batch": batch,
                     "figure": "median over interleaved pairs of baseline_time / fxdrop_time; each side runs "
                               "2 consecutive steps per turn and the second is timed",
                     "memory": f"largest rise of allocated bytes during one step, median (and max) over "
                               f"{MEMORY_STEPS} steps (torch.profiler profile_memory allocation events; params "
                               f"and optimizer state excluded)"},
        "paper_speedup_range": list(PAPER_MNIST_MLP_SPEEDUP),
        "machine": machine_info(),
        "rows": rows,
    }


def _mib(value: float | None) -> str:
    return "" if value is None else f"{value / 2**20:.1f}"


def _total(row: dict) -> float:
    return row.get("speedup_total", row["speedup"])


def markdown_table(result: dict) -> str:
    """The README table for a ``run_suite`` result (or its JSON)."""
    has_memory = any("baseline_peak_bytes" in row for row in result["rows"])
    header = ["h", "p", "family", "standard ms/step", "fxdrop ms/step", "speedup (median)", "speedup (total)",
              "ideal", "efficiency"]
    if has_memory:
        header += ["peak MiB standard", "peak MiB fxdrop"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    for row in result["rows"]:
        cells = [str(row["width"]), f"{row['p']:g}", row["family"], f"{row['baseline_ms']:.1f}",
                 f"{row['fxdrop_ms']:.1f}", f"{row['speedup']:.2f}×", f"**{_total(row):.2f}×**", f"{row['ideal']:.2f}×",
                 f"{100 * row['efficiency']:.0f}%"]
        if has_memory:
            cells += [_mib(row.get("baseline_peak_bytes")), _mib(row.get("fxdrop_peak_bytes"))]
        lines.append("| " + " | ".join(cells) + " |")
    machine = result.get("machine", {})
    protocol = result.get("protocol", {})
    lines.append("")
    lines.append(f"Batch {protocol.get('batch', '?')}, fp32; {protocol.get('pairs', '?')} interleaved pairs of timed "
                 f"steps after {protocol.get('warmup_pairs', '?')} warm-up pairs: median of the paired ratios, and "
                 f"total standard time over total fxdrop time (the training-run speedup; efficiency = total / "
                 f"FLOP ideal); {machine.get('cpu', '?')}, "
                 f"{machine.get('torch_threads', '?')} threads, torch {machine.get('torch', '?')}. "
                 f"Paper (MNIST MLP): {PAPER_MNIST_MLP_SPEEDUP[0]}–{PAPER_MNIST_MLP_SPEEDUP[1]}×.")
    return "\n".join(lines)


def rich_table(result: dict):
    from rich.table import Table

    table = Table(title="MNIST MLP training step: standard dropout vs fxdrop (median of paired ratios)")
    for column in ("h", "p", "family", "std ms", "fxdrop ms", "median", "total", "ideal", "effic.",
                   "MiB std", "MiB fxdrop"):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        table.add_row(str(row["width"]), f"{row['p']:g}", row["family"], f"{row['baseline_ms']:.1f}",
                      f"{row['fxdrop_ms']:.1f}", f"{row['speedup']:.2f}x", f"{_total(row):.2f}x", f"{row['ideal']:.2f}x",
                      f"{100 * row['efficiency']:.0f}%", _mib(row.get("baseline_peak_bytes")),
                      _mib(row.get("fxdrop_peak_bytes")))
    return table


def plot_speedup(result: dict, path: Path) -> Path | None:
    """PNG of measured speedup against p, one line per (h, family), the paper's range shaded; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    low, high = result.get("paper_speedup_range", PAPER_MNIST_MLP_SPEEDUP)
    axes.axhspan(low, high, color="tab:gray", alpha=0.2, label=f"paper, MNIST MLP ({low}–{high}×)")
    series: dict[tuple, list] = {}
    for row in result["rows"]:
        series.setdefault((row["width"], row["family"]), []).append(row)
    for (width, family), rows in sorted(series.items()):
        rows.sort(key=lambda r: r["p"])
        axes.plot([r["p"] for r in rows], [_total(r) for r in rows], marker="o" if family == "block" else "s",
                  linestyle="-" if family == "block" else "--", label=f"h={width} {family}")
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xlabel("dropout rate p")
    axes.set_ylabel("training speedup, total time ratio (×)")
    axes.set_title("fxdrop vs standard dropout, MNIST MLP, whole training step", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ---------------------------------------------------------------- command line

def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="h=1024 only, 5 pairs: under a minute")
    parser.add_argument("--widths", type=_int_list, default=None, help="hidden widths (default 1024,2048,4096)")
    parser.add_argument("--rates", type=_float_list, default=RATES, help="drop rates (default 0.3,0.5,0.7)")
    parser.add_argument("--families", type=lambda s: tuple(s.split(",")), default=FAMILIES,
                        help="pattern families (default row,block)")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"batch size (default {BATCH})")
    parser.add_argument("--pairs", type=int, default=None, help=f"timed pairs per row (default {PAIRS})")
    parser.add_argument("--warmup", type=int, default=None, help=f"untimed warm-up pairs (default {WARMUP})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice; on a machine shared with other busy "
                             "processes, --threads 1 avoids OpenMP oversubscription, which can cost 10x)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="keep freed memory in the process for both sides (fxdrop.allocator); results go to "
                             "mlp_retained.json")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--table", type=Path, default=None, metavar="JSON",
                        help="print the markdown table of an existing results file and exit")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    if args.table is not None:
        if not args.table.is_file():
            console.print(f"[red]fxdrop bench: --table {args.table} does not exist")
            return 2
        print(markdown_table(json.loads(args.table.read_text())))
        return 0
    if args.threads is not None:
        if args.threads < 1:
            console.print(f"[red]fxdrop bench: --threads must be >= 1, got {args.threads}")
            return 2
        torch.set_num_threads(args.threads)
    if args.retain_freed_memory and not allocator.retain_freed_memory():
        console.print("[red]fxdrop bench: --retain-freed-memory needs glibc (Linux)")
        return 2
    widths = args.widths or (QUICK["widths"] if args.quick else WIDTHS)
    pairs = args.pairs or (QUICK["pairs"] if args.quick else PAIRS)
    warmup = args.warmup if args.warmup is not None else (QUICK["warmup"] if args.quick else WARMUP)
    for family in args.families:
        if family not in FAMILIES:
            console.print(f"[red]fxdrop bench: --families: {family!r} is not one of {', '.join(FAMILIES)}")
            return 2
    for p in args.rates:
        if not 0.0 <= p < 1.0:
            console.print(f"[red]fxdrop bench: --rates: {p} is outside [0, 1)")
            return 2
    columns = (TextColumn("{task.description:>22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        result = run_suite(widths=widths, rates=args.rates, families=args.families, batch=args.batch, pairs=pairs,
                           warmup=warmup, seed=args.seed, memory=not args.no_memory, progress=progress)
    console.print(rich_table(result))
    stem = ("mlp_quick" if args.quick else "mlp") + ("_retained" if args.retain_freed_memory else "")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {json_path}")
    png = plot_speedup(result, args.out / f"{stem}.png")
    console.print(f"wrote {png}" if png else "matplotlib is not installed: skipped the plot")
    return 0

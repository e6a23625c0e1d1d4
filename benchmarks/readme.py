"""Render README.md's results section from the committed result files (nothing here is typed by hand).

    python benchmarks/readme.py           # rewrite the block between the results markers in README.md
    python benchmarks/readme.py --check   # exit 1 if README.md is out of date (tests/test_readme.py runs this)

Each subsection reads one JSON file under ``benchmarks/results/`` or ``examples/results/``, says how
the figures were produced (command, machine) and is left out when its file is missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import fxdrop
from fxdrop.harness.ptb import mask_mode_words
from fxdrop.harness.quality import format_difference
from fxdrop.harness.training_runs import Workload

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"

TRAINING_RUNS = (RESULTS / "training_runs_mlp.json", RESULTS / "training_runs_ptb.json",
                 RESULTS / "training_runs_chain.json", RESULTS / "training_runs_variants.json",
                 RESULTS / "training_runs_compile.json", RESULTS / "training_runs_kernels.json",
                 RESULTS / "training_runs_reshuffle.json")
TRAINING_CHECK = RESULTS / "training_runs_check.json"
QUALITY = (RESULTS / "quality_overfit.json", RESULTS / "quality_overfit_adamw.json", RESULTS / "quality_full.json")
# benchmarks/quality.py grid: the stability grid (one file per optimizer and data), and candidate defaults
GRIDS = ("quality_grid_*.json", "quality_candidates_*.json", "quality_mask_references*.json")
PTB_OVERFIT = "ptb_overfit_*.json"  # examples/ptb_lstm.py --with-none on part of the training text
WITHIN = 0.003  # the stability target: within 0.3 points of standard dropout's accuracy
ROOFLINE_WITHIN = 0.15  # the roofline target: predicted and measured speedups within 15% of each other
COVERAGE = RESULTS / "coverage.json"
DEMO = RESULTS / "demo" / "demo.json"
DEMO_RERUNS = RESULTS / "demo" / "reruns"  # the same command run again: README shows how far they spread
DDP = (RESULTS / "ddp_mlp_independent.json", RESULTS / "ddp_mlp_sync_comm_hook.json")
DDP_COMM = RESULTS / "ddp_comm.json"
MAX_DP_STUDY = ROOT / "examples" / "results" / "max_dp_study"
MASK_STUDY = ROOT / "examples" / "results" / "ptb_mask_study"
MASK_STUDY_OVERFIT = ROOT / "examples" / "results" / "ptb_mask_study_overfit"  # seed<k>/<mode>.json
CODROP = RESULTS / "codrop.json"
SHUFFLE_COST = RESULTS / "shuffle_cost.json"
SHUFFLE_RERUN = RESULTS / "shuffle_cost_rerun.json"  # the same command again: the figures' spread
GEMM_ORIENTATION = RESULTS / "gemm_orientation.json"


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _machine(machine: dict) -> str:
    cpu = machine.get("cpu") or machine.get("processor") or "?"
    threads = machine.get("torch_threads", machine.get("threads", machine.get("threads_per_rank", "?")))
    return f"{cpu}, {threads} torch threads, torch {machine.get('torch', '?')}"


def _kernels(machine: dict) -> str:
    backend = machine.get("fxdrop_backend")
    if isinstance(backend, dict):
        return f"fxdrop CPU kernels: {backend.get('cpu', '?')}"
    if machine.get("fxdrop_kernels"):
        return f"fxdrop CPU kernels: {machine['fxdrop_kernels']}"
    return ""


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _options(workload: Workload) -> str:
    """A row's fxdrop options, with its execution modes (:meth:`Workload.modes`) written for README."""
    text = ", ".join(f"{k}={v}" for k, v in workload.convert) or "defaults"
    written = {f"kernels={workload.kernels}": f"**{workload.kernels} kernels**: ",
               "compile=backend": '`torch.compile(backend="fxdrop")`: ', "compile=inductor": "`torch.compile(convert(m))`: "}
    for mode in reversed(workload.modes()):  # the compile mode outermost, as Workload.label writes it
        text = written[mode] + text
    return text


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:.0f}"


def training_runs_section(path: Path, result: dict) -> list[str]:
    machine = result["machine"]
    title = result["title"]
    if "variants" in path.name:
        title = f"Other fxdrop options against the same standard model (MLP, {title.split(', ', 1)[1]})"
    if "reshuffle" in path.name:
        title = ("`fxdrop.reshuffle`'s cost: the default with and without it, each against the same standard model "
                 f"(MLP, {title.split(', ', 1)[1]})")
    if "compile" in path.name:
        title = "torch.compile on both sides, MLP batch 256: compiled standard dropout against compiled fxdrop"
    if "kernels" in path.name:
        title = ("fxdrop's compiled C++ kernels against its composite PyTorch kernels, each against the same "
                 f"standard model (MLP, {title.split(', ', 1)[1]})")
    lines = [f"### {title} ({_rel(path)})", "",
             "Each side runs in its own process per block: warm-up steps, then consecutive timed steps of "
             "`zero_grad()` (set_to_none, PyTorch's default), forward, loss, backward"
             + (", gradient clipping" if any(r["workload"]["model"] == "ptb" for r in result["rows"]) else "")
             + " and the optimizer step; blocks alternate in ABBA order; the speedup is the median over rounds "
             "of standard ms / fxdrop ms (every round listed). *FLOP ideal*: `fxdrop.audit`'s GEMM-FLOP ratio; "
             "*roofline*: `fxdrop.audit(..., optimizer=...)`'s prediction with this machine's measured GEMM rate, "
             "copy bandwidth and optimizer cost (`fxdrop/roofline.py`); *measured / roofline* is the efficiency "
             "against it. *Peak MiB*: the rise of the process's peak resident memory over the steps "
             "(everything a step holds at once, fxdrop's resident gradient pool included).", "",
             "| model | p | optimizer | fxdrop options | standard ms | fxdrop ms | speedup | rounds | FLOP ideal | "
             "roofline | measured / roofline | peak MiB standard / fxdrop |",
             "|:---|---:|:---|:---|---:|---:|---:|:---|---:|---:|---:|---:|"]
    cpus = {(row.get("machine") or machine).get("cpu") for row in result["rows"]}
    for row in result["rows"]:
        w = row["workload"]
        model = {"mlp": f"MLP h={w['width']}", "chain": f"chain h={w['width']}"}.get(w["model"],
                                                                                    f"LSTM LM 2 × {w['width']}")
        if len(cpus) > 1:  # a merged file with rows from different machines: say which ran where
            model += f" ({(row.get('machine') or machine).get('cpu')})"
        roofline = row.get("ideal_roofline")
        lines.append(f"| {model} | {w['p']:g} | {w['optimizer']} | {_options(Workload.from_row(row))} | "
                     f"{_median(row['standard_ms']):.1f} | {_median(row['fxdrop_ms']):.1f} | "
                     f"**{row['speedup']:.2f}×** | {' '.join(f'{r:.2f}' for r in row['ratios'])} | "
                     f"{row['ideal_flops']:.2f}× | " + (f"{roofline:.2f}× | {100 * row['speedup'] / roofline:.0f}% | "
                                                       if roofline else "– | – | ")
                     + f"{_mib(row.get('standard_peak_rss_bytes'))} / {_mib(row.get('fxdrop_peak_rss_bytes'))} |")
    first = result["rows"][0]["workload"]
    suite = result.get("suite", "mlp")
    steps = {}
    for row in result["rows"]:
        steps.setdefault(row["workload"]["steps"], set()).add(row["workload"]["width"])
    counts = ", ".join(f"{n} (h = {', '.join(str(w) for w in sorted(widths))})" for n, widths in sorted(steps.items()))
    priced = [row for row in result["rows"] if row.get("ideal_roofline")]
    agree = sum(abs(row["ideal_roofline"] / row["speedup"] - 1) <= ROOFLINE_WITHIN for row in priced)
    lines += ["", f"The roofline is within {100 * ROOFLINE_WITHIN:.0f}% of the measured speedup in "
              f"**{agree} of {len(priced)} rows**."]
    if (repriced := result.get("roofline_repriced")) is not None:
        m = repriced["machine"]
        lines[-1] += (f" Its figures were recomputed on {repriced['time_utc'][:10]} with the current model "
                      f"(`python benchmarks/training_runs.py reprice`: GEMMs {m['gemm_gflops']:.0f} GFLOP/s, copy "
                      f"{m['bandwidth_gb_s']:.1f} GB/s, load average {repriced['load_average_1m']:.2f}); each row's "
                      "figure from the time it was measured is kept in the file as `ideal_roofline_as_measured`.")
    if len(cpus) > 1:
        lines += ["", "**These rows ran on different machines** (named in the model column): compare speedups "
                  "only between rows of one machine."]
    lines += ["", f"{_machine(machine)}; allocator: {machine.get('allocator', 'glibc malloc')}; "
              f"timed steps per block: {counts}, after {first['warmup']} warm-up steps; "
              f"{result['repeats']} rounds. Reproduce: "
              + ", then ".join(f"`{c}`" for c in result.get("commands") or [result.get(
                  "command", f"python benchmarks/training_runs.py {suite}")])
              + " (or `fxdrop bench` with the same flags).", ""]
    if result.get("notes"):  # the file's own history of its rows (what a row replaced, what changed since)
        notes = (note if note.endswith(".") else note + "." for note in result["notes"])
        lines += ["History of these rows (the file's notes): " + " ".join(notes), ""]
    return lines


def training_check_section(result: dict) -> list[str]:
    lines = [f"Reproducibility check ({_rel(TRAINING_CHECK)}, `python benchmarks/training_runs.py check`: reruns "
             "each suite's last row "
             f"and warns above {100 * result['limit']:.0f}%):", "",
             "| row | published | rerun | rerun rounds | moved |", "|:---|---:|---:|:---|---:|"]
    for row in result["rows"]:
        flag = " (**over the limit: not a figure yet**)" if row["drift"] > result["limit"] else ""
        lines.append(f"| {row['workload']} | {row['published']:.2f}× | {row['rerun']:.2f}× | "
                     f"{' '.join(f'{r:.2f}' for r in row['rerun_ratios'])} | {100 * row['drift']:.0f}%{flag} |")
    commands = [f"`{row['command']}`" for row in result["rows"] if row.get("command")]
    return lines + ([""] + [f"Rerun outside `check`, with: {', '.join(commands)}."] if commands else []) + [""]


def quality_section(path: Path, result: dict) -> list[str]:
    lines = [f"### {result['title']} ({_rel(path)})", "",
             "Test accuracy averaged over the last epochs (the mean over runs that did not diverge; a run "
             "diverges when its loss stops being finite or its accuracy falls to chance); every variant of a seed starts from the same weights and "
             "sees the same data order. Δ: paired differences over seeds, in points, ± their standard error. "
             "*Share of standard's gain*: (variant − no dropout) / (standard − no dropout). Variants "
             "`family/granularity[/row classes]`; `forward` is the paper's one pattern per forward.", "",
             "| variant | mean test accuracy | diverged | Δ vs standard dropout | Δ vs no dropout | "
             "share of standard's gain |", "|:---|---:|---:|---:|---:|---:|"]
    for variant, row in result["summary"].items():
        share = row.get("share_of_standard_gain")
        lines.append(f"| {variant} | {100 * row['mean_accuracy']:.2f}% | {row['diverged']}/{row['runs']} | "
                     f"{format_difference(row.get('vs_standard'), '–')} | {format_difference(row.get('vs_none'), '–')} | "
                     f"{'–' if share is None else f'{100 * share:.0f}%'} |")
    lines += ["", f"{_machine(result['machine'])}, {result['elapsed_s'] / 60:.0f} min. Reproduce: "
              f"`{result['command']}`.", ""]
    return lines


def default_variant(p: float | None = None) -> str:
    """convert's default options written as a quality variant: ``block/rows/auto``, or with ``p`` the
    variant they resolve to at that rate (``block/rows/2`` at p = 0.5, ``block/rows/8`` at 0.7)."""
    from fxdrop.config import DropoutConfig
    from fxdrop.scheduler import classes_for

    config = DropoutConfig()
    if config.granularity != "rows":
        return f"{config.pattern}/{config.granularity}"
    classes = config.row_classes if p is None else classes_for(config.row_classes, p)
    return f"{config.pattern}/{config.granularity}/{classes}"


def _default_in(summary: dict, p: float) -> str | None:
    """The variant of a grid cell that is convert's default at rate ``p``: the default itself
    (``block/rows/auto``) if it ran, else the variant it resolves to at ``p``; None if neither ran."""
    for variant in (default_variant(), default_variant(p)):
        if variant in summary:
            return variant
    return None


def _cell_mark(summary: dict, variant: str) -> tuple[str, bool | None]:
    """A grid cell's text for ``variant`` (paired difference, divergences, ✓/✗) and whether it meets the
    target (None where standard dropout itself diverges: not a target)."""
    mine, diff = summary[variant], summary[variant].get("vs_standard") or {}
    ok = bool(not mine["diverged"] and diff.get("n") and diff["mean"] >= -WITHIN)
    text = format_difference(diff, "–")
    if mine["diverged"]:
        text += f" div {mine['diverged']}/{mine['runs']}"
    if summary["standard"]["diverged"]:
        return text, None
    return f"{text} {'✓' if ok else '✗'}", ok


def grid_section(path: Path, result: dict) -> list[str]:
    """The stability grid: per (p, lr) cell, standard dropout's accuracy and each variant's paired difference."""
    default, variants = default_variant(), [v for v in result["variants"] if v != "standard"]
    title, about = result["title"], []
    if path.name.startswith("quality_candidates"):
        title = "Candidates for the default: " + title.removeprefix("Stability grid: ")
    if path.name.startswith("quality_mask_references"):
        title = "What a mask needs to train, dense references: " + title.removeprefix("Stability grid: ")
        about = ["`ref/<kind>/<classes>`: the original model, each `nn.Dropout` replaced by a mask drawn each "
                 "forward, no fxdrop kernel (`fxdrop/harness/mask_references.py`). *subset*: a random "
                 "n(1 − p) of the units; *window*: n(1 − p) cyclically contiguous units from a random start; "
                 "*block*: fxdrop's block pattern (dp, offset) drawn from the searched P(dp), times dp; "
                 "*rot*: *block* after a random cyclic rotation of the units; *perm&lt;g&gt;*: *block* over a "
                 "random order of the chunks of g contiguous units (*perm1*: a random n/dp of the units); "
                 "*shuffled*: *block* over one random permutation of the units per forward, shared by the "
                 "classes (what permuting each weight once per step and then running *block* would give); "
                 "*shuffled&lt;K&gt;*: the same permutation for K steps, then a new one (what `fxdrop.reshuffle` "
                 "every K steps gives). "
                 "*row*: every row its own mask, as Bernoulli dropout; *8*: row r uses class r mod 8, one "
                 "mask per 16 rows of a batch of 128, as fxdrop's row classes do.", ""]
    lines = [f"### {title} ({_rel(path)})", "",
             "Each cell: standard dropout's mean test accuracy, and each variant's paired difference from it "
             "(points ± standard error over the seeds); **div k/n**: k of n runs diverged (loss not finite, or "
             f"accuracy at chance). ✓: within {100 * WITHIN:.1f} points of standard dropout, or above; ✗: further "
             "below. A cell where standard dropout itself diverges is not a target. "
             f"`{default}` is convert's default (`{default_variant(0.5)}` at p ≤ 0.5, `{default_variant(0.7)}` "
             "above).", "", *about,
             "| p | lr | standard | " + " | ".join(f"`{v}`" for v in variants) + " |",
             "|---:|---:|---:|" + "---:|" * len(variants)]
    met = targets = 0
    for cell in result["cells"]:
        summary = cell["summary"]
        standard = summary["standard"]
        row = [f"{cell['p']:g}", f"{cell['lr']:g}", f"{100 * standard['mean_accuracy']:.2f}%"
               + (f" div {standard['diverged']}/{standard['runs']}" if standard["diverged"] else "")]
        for variant in variants:
            text, ok = _cell_mark(summary, variant)
            row.append(text)
            if ok is not None and variant == _default_in(summary, cell["p"]):
                targets += 1
                met += ok
        lines.append("| " + " | ".join(row) + " |")
    if targets:
        lines += ["", f"`{default}` (as the variant it resolves to at each p) is within {100 * WITHIN:.1f} points "
                  f"of standard dropout in **{met} of the {targets} cells** of this file where it ran and standard "
                  "dropout trains."]
    lines += ["", f"{_machine(result['machine'])}, {result['elapsed_s'] / 60:.0f} min. Reproduce: "
              f"`{result['command']}`.", ""]
    return lines


# The grids measured with the default's current row plans (4 classes at p <= 0.5, consecutive chain sites
# splitting the rows by different bits: fxdrop 0.3.0). Earlier grids ran other plans under the same variant
# names (block/rows/8 drew every chain site's classes from the same bits), so they do not describe it.
CURRENT_DEFAULT_GRIDS = ("quality_grid_momentum_2000_split", "quality_grid_momentum_2000_split_p0.7",
                         "quality_grid_adamw_2000_split", "quality_grid_adamw_2000_split_p0.7",
                         "quality_grid_momentum_full_split", "quality_grid_momentum_full_split8",
                         "quality_grid_momentum_full_split_small", "quality_grid_momentum_full_split_small_p0.7")


def default_grid_section(grids: list[tuple[Path, dict]]) -> list[str]:
    """convert's default on every stability grid cell where it ran: per optimizer and training set, the
    variant the default resolves to at each p (row classes by rate), from whichever grid file holds it."""
    cells: dict[tuple, dict] = {}
    for path, result in grids:
        if path.name.startswith("quality_mask_references"):
            continue
        settings = result["settings"]
        for cell in result["cells"]:
            variant = _default_in(cell["summary"], cell["p"])
            if variant is None:
                continue
            key = (settings["optimizer"], settings["images"] or 0, settings["epochs"], cell["p"], cell["lr"])
            rank = (cell["summary"][variant]["runs"], variant == default_variant())  # more seeds, then its own
            if key not in cells or rank > cells[key]["rank"]:
                cells[key] = {"summary": cell["summary"], "variant": variant, "rank": rank, "file": path.name}
    if not cells:
        return []
    default = default_variant()
    lines = [f"### convert's default on the stability grids (`{default}`)", "",
             f"Each cell: the default's runs (`{default}` itself where a grid ran it, else the variant "
             f"it resolves to at that p: `{default_variant(0.5)}` at p ≤ 0.5, "
             f"`{default_variant(0.7)}` above), its paired difference from standard dropout in points ± standard "
             f"error over the seeds (their count in brackets), ✓ within {100 * WITHIN:.1f} points or above, ✗ "
             "below; empty: not run. The runs come from the grid files listed under each table (their tables "
             "follow).", ""]
    met = targets = 0
    for optimizer, images, epochs in sorted({key[:3] for key in cells}):
        mine = {key[3:]: value for key, value in cells.items() if key[:3] == (optimizer, images, epochs)}
        lrs = sorted({lr for _, lr in mine})
        data = f"{images:,} training images" if images else "all 60,000 training images"
        lines += [f"{optimizer}, {data}, {epochs} epochs:", "",
                  "| p | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---:|" + "---:|" * len(lrs)]
        for p in sorted({p for p, _ in mine}):
            row = [f"{p:g}"]
            for lr in lrs:
                if (p, lr) not in mine:
                    row.append("")
                    continue
                entry = mine[(p, lr)]
                text, ok = _cell_mark(entry["summary"], entry["variant"])
                row.append(f"{text} ({entry['rank'][0]})")
                if ok is not None:
                    targets += 1
                    met += ok
            lines.append("| " + " | ".join(row) + " |")
        files = sorted({entry["file"] for entry in mine.values()})
        lines += ["", "From " + ", ".join(f"`{name}`" for name in files) + ".", ""]
    lines += [f"`{default}` is within {100 * WITHIN:.1f} points of standard dropout in **{met} of the {targets} "
              "cells** where it ran and standard dropout trains.", ""]
    return lines


def shuffle_cost_section(result: dict, rerun: dict | None) -> list[str]:
    """What permuting the units every step would cost, against fxdrop's own step (benchmarks/shuffle_cost.py)."""
    medians, step = result["median_ms"], result["median_ms"]["fxdrop step"]
    lines = [f"### {result['title']} ({_rel(SHUFFLE_COST)})", "",
             "The shuffled pattern of the mask references needs every weight read in permuted order each step. "
             f"Medians over {result['rounds']} rounds of {result['reps']} consecutive repetitions each, one process: "
             "a training step of `fxdrop.convert(model)` (the defaults), a plain copy of every Linear weight "
             f"({result['weight_mib']:.0f} MiB: the least any per-step permutation costs), the permuted copies with "
             "ATen's `index_select`, and those with their backward (gradients scattered back).", "",
             "| block | ms | share of fxdrop's step |" + (" rerun ms |" if rerun else ""),
             "|:---|---:|---:|" + ("---:|" if rerun else "")]
    for name, value in medians.items():
        lines.append(f"| {name} | {value:.1f} | {value / step:.2f} |"
                     + (f" {rerun['median_ms'][name]:.1f} |" if rerun else ""))
    lines += ["", f"{_machine(result['machine'])}. Reproduce: `{result['command']}`"
              + (f" (run twice: the rerun is {_rel(SHUFFLE_RERUN)})." if rerun else "."), ""]
    return lines


def gemm_orientation_section(result: dict) -> list[str]:
    """Which orientation of a Linear's product the chain's CPU forward takes (benchmarks/gemm_orientation.py)."""
    by_rows: dict[int, tuple[list[float], list[float]]] = {}
    for cell in result["cells"]:
        by_rows.setdefault(cell["rows"], ([], []))[cell["inner"] >= 512].append(cell["ratio"])

    def spread(ratios: list[float]) -> str:
        if not ratios:
            return "–"
        return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}, {len(ratios)} shapes)"

    lines = [f"### {result['title']} ({_rel(GEMM_ORIENTATION)})", "",
             "Time of `(w @ x.t()).t()` (the copy back to rows included) over `x @ w.t()`: below 1 the transposed "
             f"product is faster. Medians over {result['rounds']} alternating turns of {result['reps']} consecutive "
             "products each, the last of a turn timed; "
             "then the median (min–max) over the grid's inner and output sizes. The chain's CPU forward takes the "
             "transposed product for at most 64 rows, or at most 256 rows with an inner size of 512 or more "
             "(`linear_product` in csrc/structured.cpp).", "",
             "| rows | inner < 512 | inner ≥ 512 |", "|---:|:---|:---|"]
    for rows, (short, long_) in sorted(by_rows.items()):
        lines.append(f"| {rows} | {spread(short)} | {spread(long_)} |")
    lines += ["", f"{_machine(result['machine'])}. Reproduce: `{result['command']}`.", ""]
    return lines


def ptb_overfit_section(runs: list[tuple[Path, dict]]) -> list[str]:
    """examples/ptb_lstm.py --with-none: a PTB regime where dropout matters, and the share of its gain kept."""
    lines = ["### LSTM language model, Penn Treebank, where dropout matters", "",
             "The first *batches* batches of the training text every epoch, so that the model without dropout "
             "overfits; the three models start from the same weights and see the same batches. Validation "
             "perplexity after the last epoch. *Gain*: standard dropout's perplexity reduction over no dropout; "
             "*share kept*: (none − fxdrop) / (none − standard). Quality only: the three models train "
             "interleaved in one process, so the times in these files are not training-run speed figures.", "",
             "| file | LSTM, p, family, patterns | epochs × batches | val ppl none | val ppl standard | "
             "val ppl fxdrop | fxdrop vs standard | standard's gain | share kept | test ppl none / standard / fxdrop |",
             "|:---|:---|---:|---:|---:|---:|---:|---:|---:|:---|"]
    for path, run in runs:
        config, s = run["config"], run["summary"]
        share = s.get("share_of_standard_gain")
        lines.append(f"| {path.name} | {config['layers']} × {config['hidden']}, {config['p']:g}, {config['family']}, "
                     f"{_decoder_patterns(config)} | {s['epochs']} × {config['batches_per_epoch']} | "
                     f"{s['val_ppl_none']:.1f} | {s['val_ppl_standard']:.1f} | {s['val_ppl_fxdrop']:.1f} | "
                     f"{100 * s['val_ppl_relative_difference']:+.1f}% | {100 * s['standard_gain_over_none']:.1f}% | "
                     f"{'–' if share is None else f'{100 * share:.0f}%'} | "
                     f"{s['test_ppl_none']:.1f} / {s['test_ppl_standard']:.1f} / {s['test_ppl_fxdrop']:.1f} |")
    lines += ["", "Reproduce: `" + runs[-1][1]["command"] + "`.", ""]
    return lines


def coverage_section(result: dict) -> list[str]:
    lines = [f"### Real architectures ({_rel(COVERAGE)})", "",
             f"{result['benchmark']}. *Converted*: sites fxdrop rewrites (of the model's dropout sites), *both GEMMs*: "
             "sites between two Linears. Checked against the original model: eval output bit for bit (*eval*), "
             "training output and gradients equal to the original's with each dropout replaced by its mask "
             f"(*train*), the user's class kept (*class*), `torch.compile(convert(m))` with {result['inner_backend']} "
             "and `torch.compile(m, backend=\"fxdrop\")` (*compile*, *backend*). Every site left has its reason "
             "in `fxdrop.audit`.", "",
             "| architecture | dropout sites | converted | both GEMMs | eval | train | class | compile | backend | "
             "left as they were, and why |",
             "|:---|---:|---:|---:|:---:|:---:|:---:|:---:|:---:|:---|"]
    for row in result["rows"]:
        if not row.get("available", True):
            lines.append(f"| {row['architecture']} | not installed | | | | | | | | |")
            continue
        marks = ["yes" if row[k] else "**no**" for k in ("eval_exact", "train_contract", "model_kept", "compile",
                                                            "backend")]
        left = "; ".join(f"`{name}`: {reason}" for name, reason in row["left"].items()) or "–"
        lines.append(f"| {row['architecture']} | {row['dropouts']} | {len(row['converted'])} | "
                     f"{len(row['both_gemms'])} | " + " | ".join(marks) + f" | {left.replace('|', '/')} |")
    lines += ["", "Reproduce: `python -m fxdrop.harness.coverage --out benchmarks/results/coverage.json` "
              "(torchvision and timm installed with `--no-deps`, as `.ci/run` does).", ""]
    return lines


def _demo_classes(result: dict) -> str:
    """The row classes each demo site resolved to (files from before fxdrop_sites was recorded: nothing)."""
    counts = sorted({site["row_classes"] for site in result.get("fxdrop_sites", [])})
    if not counts:
        return ""
    sites = len(result["fxdrop_sites"])
    if len(counts) == 1:
        return f"; {counts[0]} row classes at each of its {sites} sites"
    return f"; {'/'.join(map(str, counts))} row classes across its {sites} sites"


def demo_section(result: dict) -> list[str]:
    config, standard, fast = result["config"], result["standard"], result["fxdrop"]
    lines = [f"### The main job: `fxdrop demo` ({_rel(DEMO)})", "",
             f"{result['model']}, {config['epochs']} epochs, batch {config['batch']}, SGD lr {config['lr']} "
             f"momentum {config['momentum']}, seed {config['seed']}; fxdrop `pattern={config['pattern']!r}, "
             f"granularity={config.get('granularity', 'forward')!r}, scale={config['scale']!r}, "
             f"max_dp={config.get('max_dp', 8)!r}`" + _demo_classes(result) + ".", "",
             "| | standard dropout | fxdrop |", "|:---|---:|---:|",
             f"| training time | {sum(standard['epoch_seconds']):.1f} s | {sum(fast['epoch_seconds']):.1f} s |",
             f"| test accuracy after {config['epochs']} epochs | {100 * standard['test_accuracy'][-1]:.2f}% | "
             f"{100 * fast['test_accuracy'][-1]:.2f}% |", "",
             f"Speedup **{result['speedup']:.2f}×** (total training time); {_machine(result['machine'])}; "
             f"{_kernels(result['machine'])}. Reproduce: `fxdrop demo --threads {result['machine']['torch_threads']} "
             f"--out {_rel(DEMO.parent)}`.", ""]
    reruns = [json.loads(path.read_text()) for path in sorted(DEMO_RERUNS.glob("*.json"))]
    if reruns:
        speedups = [result["speedup"], *(run["speedup"] for run in reruns)]
        spread = max(speedups) / min(speedups) - 1.0
        lines[-1:] = [f"Reruns of the same command ({_rel(DEMO_RERUNS)}/): "
                      + ", ".join(f"{run['speedup']:.2f}×" for run in reruns)
                      + f" (test accuracy the same in every run); the speedups spread {100 * spread:.0f}%"
                      + (": more than 15%, so read the speedup as a range, not a figure." if spread > 0.15 else "."),
                      ""]
    return lines


def max_dp_section(studies: list[tuple[Path, dict]]) -> list[str]:
    lines = [f"### Choosing max_dp and scale ({_rel(MAX_DP_STUDY)}/)", "",
             "Final test accuracy of the demo's MLP after a few epochs, standard dropout against fxdrop "
             "variants `family/scale/max_dp`, all from the same weights and data order. Every variant does the "
             "same expected work; a large `max_dp` lets single steps keep as little as 1/max_dp of a layer.", "",
             "| p | variant | test accuracy | Δ vs standard (points) | file |", "|---:|:---|---:|---:|:---|"]
    for path, study in studies:
        accuracy = study["test_accuracy"]
        standard = accuracy["standard"][-1]
        config = study["config"]
        for name in sorted(accuracy, key=lambda n: (n != "standard", n)):
            delta = "" if name == "standard" else f"{accuracy[name][-1] - standard:+.2f}"
            lines.append(f"| {config['p']:g} | {name} | {accuracy[name][-1]:.2f}% | {delta} | {path.name} |")
    config = studies[0][1]["config"]
    lines += ["", f"MLP 784-{config['width']}×3-10, {config['epochs']} epochs, seed {config['seed']}, batch "
              f"{config['batch']}, SGD lr {config['lr']} momentum {config['momentum']}. Reproduce: the `command` "
              "in each file (`python examples/max_dp_study.py ...`).", ""]
    return lines


def codrop_section(result: dict) -> list[str]:
    lines = [f"What the tight support costs in randomness ({_rel(CODROP)}; {result['units']} units, "
             f"{result['samples']:,} draws; Bernoulli dropout has correlation 0 and 2^{result['units']} masks):", "",
             "| p | max_dp | family | largest unit drop-rate error | mean pairwise co-drop correlation | "
             "mean abs. correlation | distinct masks |", "|---:|:---|:---|---:|---:|---:|---:|"]
    for row in result["rows"]:
        max_dp = row["max_dp"] if row["max_dp"] != "auto" else f"auto ({row['support']})"
        lines.append(f"| {row['p']:g} | {max_dp} | {row['family']} | {row['max_rate_error']:.4f} | "
                     f"{row['mean_pairwise_correlation']:+.3f} | {row['mean_abs_pairwise_correlation']:.3f} | "
                     f"{row['distinct_masks']} |")
    lines += ["", "Reproduce: `python benchmarks/codrop.py`.", ""]
    return lines


def _decoder_patterns(config: dict) -> str:
    granularity = config.get("granularity", "forward")
    classes = config.get("row_classes")
    text = f"{granularity}, {classes} classes" if granularity == "rows" and classes else granularity
    lstm = config.get("sites", {}).get("rnn.layer0", {"granularity": "forward"})  # files before sites were recorded
    if granularity == "rows":
        text += "; LSTM sites: " + ("one pattern per forward" if lstm["granularity"] == "forward" else
                                    f"{lstm['row_classes']} time chunks")
    return text


def lstm_section(quality: list[tuple[Path, dict]]) -> list[str]:
    lines = ["### LSTM language model, Penn Treebank: quality", "",
             "Same seed and schedule for both; a full epoch is 1,328 batches, some runs use fewer. *decoder "
             "patterns*: `forward` = one pattern per forward for all 700 tokens of a batch (the paper's method), "
             "`rows, M classes` = `granularity=\"rows\"`: token r of the flattened (35, 20) batch uses row class "
             "r mod M of M patterns drawn per forward (the 3-class runs are from commit bbea7e6); the LSTM sites "
             "draw one pattern per forward in every run. The *training speedup* column is the old protocol's.", "",
             "| file | LSTM, dropout, family | decoder patterns | epochs × batches | scale | max_dp | "
             "val ppl standard | val ppl fxdrop | Δ | test ppl standard | test ppl fxdrop | training speedup | "
             "time to standard's final val ppl |",
             "|:---|:---|:---|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for path, run in quality:
        config, summary = run["config"], run["summary"]
        reached = summary.get("fxdrop_seconds_to_standard_final_val_ppl")
        lines.append(f"| {path.name} | {config['layers']} × {config['hidden']}, {config['p']:g}, {config['family']} | "
                     f"{_decoder_patterns(config)} | "
                     f"{summary['epochs']} × {config['batches_per_epoch']} | {config['scale']} | "
                     f"{config.get('max_dp', 8)} | {summary['val_ppl_standard']:.1f} | "
                     f"{summary['val_ppl_fxdrop']:.1f} | {100 * summary['val_ppl_relative_difference']:+.1f}% | "
                     f"{summary['test_ppl_standard']:.1f} | {summary['test_ppl_fxdrop']:.1f} | "
                     f"{summary['train_speedup']:.2f}× | "
                     f"{'not reached' if reached is None else f'{reached:.0f} s'} |")
    lines += ["", "Reproduce: the `command` in each file, e.g. `" + quality[-1][1]["command"] + "`.", ""]
    return lines


def mask_study_overfit_section(runs: list[dict]) -> list[str]:
    """examples/ptb_mask_study.py in the overfitting regime, several seeds: the share of dropout's gain kept."""
    by_mode: dict[str, dict[int, float]] = {}
    for run in runs:
        by_mode.setdefault(run["mode"], {})[run["config"]["seed"]] = run["epochs"][-1]["val_ppl"]
    none, standard = by_mode.get("none", {}), by_mode.get("bernoulli", {})
    config = runs[0]["config"]
    lines = [f"### PTB mask granularity where dropout matters ({_rel(MASK_STUDY_OVERFIT)})", "",
             f"Dense masks (quality only, no speed): {config['layers']} × {config['hidden']} LSTM, p = {config['p']:g}, "
             f"{config['family']} patterns, max_dp {config['max_dp']}, {config['epochs']} epochs × "
             f"{config['max_batches']} batches (the model without dropout overfits), SGD lr {config['lr']:g} with "
             "clipping; every mode of a seed starts from the same weights and sees the same batches. *LSTM inputs*: "
             "the embedding and between-layer sites; *decoder*: the site before the vocabulary GEMM. fxdrop's "
             "`granularity=\"rows\"` with M classes is *M patterns drawn as fxdrop does, one per chunk of time "
             "steps* at the LSTM inputs and *..., token r in class r mod M* at the decoder: it draws a site's M "
             "patterns by systematic sampling (at p = 0.5 its 2 classes always take the two opposite halves); "
             "the other class modes draw them independently. Before this study its LSTM sites drew *one pattern "
             "per forward*. Δ and share kept: per seed, then averaged.", "",
             "| LSTM inputs | decoder | seeds | val ppl (each seed) | Δ vs standard dropout | share of dropout's gain kept |",
             "|:---|:---|---:|:---|---:|---:|"]

    def mean(values):
        return sum(values) / len(values)

    order = sorted(by_mode, key=lambda m: mean(list(by_mode[m].values())))
    for mode in order:
        vals = by_mode[mode]
        seeds = sorted(vals)
        paired = [s for s in seeds if s in standard]
        delta = f"{100 * mean([vals[s] / standard[s] - 1 for s in paired]):+.1f}%" if paired else "–"
        gained = [s for s in paired if s in none]
        share = f"{100 * mean([(none[s] - vals[s]) / (none[s] - standard[s]) for s in gained]):.0f}%" if gained else "–"
        inputs, decoder = mode.split("/")[0], mode.split("/")[-1]
        lines.append(f"| {mask_mode_words(inputs)} | {mask_mode_words(decoder)} | {len(seeds)} | "
                     f"{' / '.join(f'{vals[s]:.1f}' for s in seeds)} | {delta} | {share} |")
    lines += ["", "Reproduce, per mode and seed (about "
              f"{mean([r['epochs'][-1]['train_seconds'] for r in runs]) / 60:.0f} min each here, two at a time): "
              "`python examples/ptb_mask_study.py --modes MODE --family block --epochs 12 --max-batches 150 "
              "--threads 1 --seed SEED --out examples/results/ptb_mask_study_overfit/seedSEED`.", ""]
    return lines


def mask_study_section(studies: list[tuple[Path, dict]]) -> list[str]:
    """examples/ptb_mask_study.py: which mask granularity a PTB LSTM needs (dense masks, quality only)."""
    config = studies[0][1]["config"]
    lines = [f"### Mask granularity on PTB ({_rel(MASK_STUDY)})", "",
             f"Dense masks (quality only, no speed): {config['layers']} × {config['hidden']} LSTM, p = {config['p']:g}, "
             f"{config['family']} patterns, max_dp {config['max_dp']}, {config['epochs']} epochs × "
             f"{config['max_batches']} batches, seed {config['seed']}. *LSTM inputs* are the embedding and "
             "between-layer sites, *decoder* the site before the vocabulary GEMM.", "",
             "| LSTM inputs | decoder | val ppl | Δ vs Bernoulli | test ppl |", "|:---|:---|---:|---:|---:|"]
    runs = {run["mode"]: run for _, run in studies}
    base = runs.get("bernoulli")
    order = sorted(runs, key=lambda m: runs[m]["epochs"][-1]["val_ppl"])
    for mode in order:
        run = runs[mode]
        inputs, decoder = mode.split("/")[0], mode.split("/")[-1]
        val = run["epochs"][-1]["val_ppl"]
        delta = "" if base is None else f"{100 * (val / base['epochs'][-1]['val_ppl'] - 1):+.1f}%"
        lines.append(f"| {mask_mode_words(inputs)} | {mask_mode_words(decoder)} | {val:.1f} | {delta} | {run['test_ppl']:.1f} |")
    lines += ["", "One pattern per forward at every site costs ~20% perplexity here; a pattern per token at the "
              "decoder alone brings it to Bernoulli's, with the LSTM sites still locked (one pattern per forward, "
              "as the issue asks). `granularity=\"rows\"` approximates a pattern per token with 2 row classes "
              "per forward (the quality table above). Reproduce: `python examples/ptb_mask_study.py "
              "--modes bernoulli shared row shared/row --threads 1 --out examples/results/ptb_mask_study` (each mode "
              f"about {studies[0][1]['epochs'][-1]['train_seconds'] / 60:.0f} min here; its command is in its file).", ""]
    return lines


def ddp_section(runs: list[dict], comm: dict | None) -> list[str]:
    lines = ["### DistributedDataParallel (2 ranks, gloo, this 2-core CPU)", ""]
    if runs:
        lines += ["| run | standard s/epoch (median) | fxdrop s/epoch (median) | speedup | standard accuracy | "
                  "fxdrop accuracy |", "|:---|---:|---:|---:|---:|---:|"]
        for path, run in runs:
            models = run["models"]
            standard = models["standard dropout"]
            name, fast = next((k, v) for k, v in models.items() if k != "standard dropout")
            lines.append(f"| {run['patterns']} ({_rel(path)}) | {standard['median_epoch_s']:.1f} | "
                         f"{fast['median_epoch_s']:.1f} | {run['speedup_median_epoch']:.2f}× | "
                         f"{100 * standard['test_accuracy'][-1]:.2f}% | {100 * fast['test_accuracy'][-1]:.2f}% |")
        lines += ["", "Reproduce: " + "; ".join(f"`{run['command']}`" for _, run in runs) + ".", ""]
    if comm is not None:
        savings = [row["traffic_saving"] for row in comm["results"]]
        lines += [f"The kept-block comm hook ({_rel(DDP_COMM)}) sends {100 * min(savings):.0f}–"
                  f"{100 * max(savings):.0f}% fewer all-reduce bytes on the benchmark MLP "
                  "(`python benchmarks/ddp_comm.py`).", ""]
    return lines


def render() -> str:
    lines = ["## Measured results", "",
             "Generated by `python benchmarks/readme.py` from the result files named in each heading; nothing is "
             "typed by hand. Speed is measured as training runs (below); the machines are shared, so every round "
             "is listed and a rerun check is kept. No GPU was available: the CUDA kernels are compile-checked "
             "only (`scripts/check_cuda_build.sh`); no CUDA kernel has run.", ""]
    if (result := _load(DEMO)) is not None:
        lines += demo_section(result)
    for path in TRAINING_RUNS:
        if (result := _load(path)) is not None:
            lines += training_runs_section(path, result)
    if (result := _load(TRAINING_CHECK)) is not None:
        lines += training_check_section(result)
    grids = [(path, json.loads(path.read_text())) for path in sorted(p for pattern in GRIDS for p in RESULTS.glob(pattern))]
    lines += default_grid_section([(path, result) for path, result in grids if path.stem in CURRENT_DEFAULT_GRIDS])
    for path, result in grids:
        lines += grid_section(path, result)
    for path in (*QUALITY, *sorted(RESULTS.glob("quality_overfit_p*.json"))):
        if (result := _load(path)) is not None:
            lines += quality_section(path, result)
    ptb = [(path, json.loads(path.read_text())) for path in sorted(RESULTS.glob(PTB_OVERFIT))]
    if ptb:
        lines += ptb_overfit_section(ptb)
    overfit_masks = [json.loads(path.read_text()) for path in sorted(MASK_STUDY_OVERFIT.glob("seed*/*.json"))]
    if overfit_masks:
        lines += mask_study_overfit_section(overfit_masks)
    if (result := _load(SHUFFLE_COST)) is not None:
        lines += shuffle_cost_section(result, _load(SHUFFLE_RERUN))
    if (result := _load(GEMM_ORIENTATION)) is not None:
        lines += gemm_orientation_section(result)
    if (result := _load(COVERAGE)) is not None:
        lines += coverage_section(result)
    old = ["## Earlier measurements (previous protocol)", "",
           "**Not training runs.** These figures come from the earlier protocol: steps of both sides interleaved "
           "in one process, plain SGD without momentum or AdamW, per-step medians. A rerun of that protocol's MLP "
           "table later gave about half its speedups, because its baseline steps were twice as slow as a training "
           "run's; the MLP and LSTM speed tables it produced were removed. The quality studies below ran in "
           "regimes that do not overfit (20 MNIST epochs on 60,000 images, 6 PTB epochs at 2 × 200): they show "
           "parity where dropout matters little, not that fxdrop regularises like dropout (the quality tables "
           "above are the overfitting regime).", ""]
    studies = [(path, json.loads(path.read_text())) for path in sorted(MAX_DP_STUDY.glob("*.json"))]
    if studies:
        old += max_dp_section(studies)
    if (result := _load(CODROP)) is not None:
        old += codrop_section(result)
    quality = [(path, json.loads(path.read_text())) for path in sorted(RESULTS.glob("ptb_lstm_*.json"))]
    if quality:
        old += lstm_section(quality)
    studies = [(path, json.loads(path.read_text())) for path in sorted(MASK_STUDY.glob("*.json"))]
    if studies:
        old += mask_study_section(studies)
    runs = [(path, run) for path in DDP if (run := _load(path)) is not None]
    comm = _load(DDP_COMM)
    if runs or comm is not None:
        old += ddp_section(runs, comm)
    if len(old) > 4:
        lines += old
    return "\n".join(lines).rstrip() + "\n"


def updated_readme(text: str) -> str:
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"README.md must hold one {START} ... {END} block")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{render()}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is not what the files give")
    args = parser.parse_args(argv)
    text = README.read_text()
    new = updated_readme(text)
    if args.check:
        if new != text:
            print("README.md's results are out of date: run python benchmarks/readme.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Render README.md's results section from the committed result files (nothing here is typed by hand).

    python benchmarks/readme.py           # rewrite the block between the results markers in README.md
    python benchmarks/readme.py --check   # exit 1 if README.md is out of date (tests/test_readme.py runs this)

Each subsection reads one JSON file under ``benchmarks/results/`` or ``examples/results/``, says how
the figures were produced (command, machine) and is left out when its file is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"

DEMO = RESULTS / "demo" / "demo.json"
MLP = RESULTS / "mlp.json"
MLP_RETAINED = RESULTS / "mlp_retained.json"
PARITY = ROOT / "examples" / "results" / "mnist_mlp_w512_e20.json"
LSTM = RESULTS / "lstm.json"
LSTM_RETAINED = RESULTS / "lstm_retained.json"
LSTM_FORWARD = RESULTS / "lstm_forward.json"
OPS = RESULTS / "ops.json"
OPS_RETAINED = RESULTS / "ops_retained.json"
COMPILE = RESULTS / "compile.json"
DDP = (RESULTS / "ddp_mlp_independent.json", RESULTS / "ddp_mlp_sync_comm_hook.json")
DDP_COMM = RESULTS / "ddp_comm.json"
BACKENDS = RESULTS / "backends.json"
MAX_DP_STUDY = ROOT / "examples" / "results" / "max_dp_study"
MASK_STUDY = ROOT / "examples" / "results" / "ptb_mask_study"
CODROP = RESULTS / "codrop.json"


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


def demo_section(result: dict) -> list[str]:
    config, standard, fast = result["config"], result["standard"], result["fxdrop"]
    lines = [f"### The main job: `fxdrop demo` ({_rel(DEMO)})", "",
             f"{result['model']}, {config['epochs']} epochs, batch {config['batch']}, SGD lr {config['lr']} "
             f"momentum {config['momentum']}, seed {config['seed']}; fxdrop `pattern={config['pattern']!r}, "
             f"scale={config['scale']!r}, max_dp={config.get('max_dp', 8)!r}`.", "",
             "| | standard dropout | fxdrop |", "|:---|---:|---:|",
             f"| training time | {sum(standard['epoch_seconds']):.1f} s | {sum(fast['epoch_seconds']):.1f} s |",
             f"| test accuracy after {config['epochs']} epochs | {100 * standard['test_accuracy'][-1]:.2f}% | "
             f"{100 * fast['test_accuracy'][-1]:.2f}% |", "",
             f"Speedup **{result['speedup']:.2f}×** (total training time); {_machine(result['machine'])}; "
             f"{_kernels(result['machine'])}. Reproduce: `fxdrop demo --threads {result['machine']['torch_threads']} "
             f"--out {_rel(DEMO.parent)}`.", ""]
    return lines


RETAINED_NOTE = ("With `fxdrop.allocator.retain_freed_memory()` (both sides, one process): glibc keeps freed "
                 "memory, so each step's new weight gradients land on resident pages instead of fresh ones "
                 "that the kernel faults in and zeroes (see `fxdrop/allocator.py`; jemalloc/tcmalloc do the same).")


def mlp_section(path: Path, result: dict) -> list[str]:
    bench = importlib.import_module("fxdrop.harness.bench")
    retained = result["machine"].get("retain_freed_memory", False)
    lines = [f"### Training-step speed, MNIST MLP ({_rel(path)})", "",
             "Whole training steps (forward, loss, backward, SGD) of the original model and of "
             "`fxdrop.convert(model)`; the ideal is `fxdrop.audit`'s FLOP estimate. "
             + (RETAINED_NOTE if retained else "glibc's default allocator settings."), "",
             bench.markdown_table(result), ""]
    if path.with_suffix(".png").is_file():
        lines += [f"![speedup against p]({_rel(path.with_suffix('.png'))})", ""]
    command = "fxdrop bench" + (" --retain-freed-memory" if retained else "")
    lines += [f"{_kernels(result['machine'])}. Reproduce: `{command}` (or `python benchmarks/run.py`; "
              "`--quick` for a one-minute look).", ""]
    return lines


def parity_section(result: dict) -> list[str]:
    study = _import_file(ROOT / "examples" / "mnist_mlp.py")
    config = result["config"]
    command = (f"python examples/mnist_mlp.py --width {config['width']} --epochs {config['epochs']} "
               f"--out {_rel(PARITY)}")
    return [f"### Quality parity, MNIST MLP ({_rel(PARITY)})", "",
            "Final test accuracy, mean ± std over seeds; every variant of a (p, seed) starts from the same "
            "weights and sees the same data order. `kept` scales kept units by n / kept, `rate` by 1 / (1 − p).",
            "", study.markdown_summary(result), "", f"Reproduce: `{command}` "
            f"({result.get('elapsed_s', 0) / 60:.0f} min here).", ""]


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
    return f"{granularity}, {classes} classes" if granularity == "rows" and classes else granularity


def lstm_section(speeds: list[tuple[Path, dict]], quality: list[tuple[Path, dict]]) -> list[str]:
    lines = ["### LSTM language model, Penn Treebank", ""]
    for path, speed in speeds:
        config = speed["config"]
        retained = speed["machine"].get("retain_freed_memory", False)
        lines += [f"Training-step speed ({_rel(path)}): {config['layers']} × {config['hidden']} LSTM, vocabulary "
                  f"{config['vocab']}, BPTT {config['bptt']}, batch {config['batch']}, fp32 (forward, loss, backward, "
                  f"clipping, SGD); decoder patterns **{_decoder_patterns(config)}**; "
                  + ("`retain_freed_memory()` (both sides)" if retained else "glibc's default allocator settings")
                  + ". The recurrent GEMMs do not shrink, so the FLOP ideal is low.", "",
                  "| p | family | standard ms | fxdrop ms | speedup (median) | speedup (total) | ideal | efficiency |",
                  "|---:|:---|---:|---:|---:|---:|---:|---:|"]
        for row in speed["rows"]:
            total = row.get("throughput_speedup", row["speedup"])
            lines.append(f"| {row['p']:g} | {row['family']} | {row['standard_ms']:.0f} | {row['fxdrop_ms']:.0f} | "
                         f"{row['speedup']:.2f}× | **{total:.2f}×** | {row['ideal']:.2f}× | "
                         f"{100 * total / row['ideal']:.0f}% |")
        lines += ["", f"{_machine(speed['machine'])}. Paper: 1.24–1.85× at p 0.3–0.7. "
                  f"Reproduce: `{speed.get('command', 'python benchmarks/lstm.py')}`.", ""]
    if quality:
        lines += ["Quality (same seed and schedule for both; a full epoch is 1,328 batches, some runs use fewer). "
                  "*decoder patterns*: `forward` = one pattern per forward for all 700 tokens of a batch (the "
                  "paper's method), `rows, M classes` = `granularity=\"rows\"`: token r of the flattened "
                  "(35, 20) batch uses row class r mod M of M patterns drawn per forward (M = "
                  "`fxdrop.scheduler.ROW_CLASSES` = 2; the 3-class runs are from commit bbea7e6, which used 3 "
                  "for this layout); the LSTM sites draw one pattern per forward in every run:", "",
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


MODE_NAMES = {"bernoulli": "Bernoulli per element (standard dropout)", "shared": "one pattern per forward",
              "sample": "a pattern per sequence (shared over time)", "row": "a pattern per token",
              "time": "a pattern per time step (shared by the batch)",
              "chunk": "one contiguous chunk of time steps per pattern"}


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
        lines.append(f"| {MODE_NAMES[inputs]} | {MODE_NAMES[decoder]} | {val:.1f} | {delta} | {run['test_ppl']:.1f} |")
    lines += ["", "One pattern per forward at every site costs ~20% perplexity here; a pattern per token at the "
              "decoder alone brings it to Bernoulli's, with the LSTM sites still locked (one pattern per forward, "
              "as the issue asks). `granularity=\"rows\"` approximates a pattern per token with 2 row classes "
              "per forward (the quality table above). Reproduce: `python examples/ptb_mask_study.py "
              "--modes bernoulli shared row shared/row --threads 1 --out examples/results/ptb_mask_study` (each mode "
              f"about {studies[0][1]['epochs'][-1]['train_seconds'] / 60:.0f} min here; its command is in its file).", ""]
    return lines


def ops_section(path: Path, result: dict) -> list[str]:
    retained = result["machine"].get("retain_freed_memory", False)
    lines = [f"### The fused chain op ({_rel(path)})", "",
             f"`Linear → ReLU → Dropout → Linear`, hidden {result['hidden']}, batch {result['batch']}, forward + "
             "backward, against `fxdrop::chain` (row, block) and `fxdrop::tile_linear` (tile: only the second "
             "GEMM shrinks). " + (RETAINED_NOTE if retained else "glibc's default allocator settings."), "",
             "| p | family | speedup (median) | speedup (total) | ideal | efficiency |", "|---:|:---|---:|---:|---:|---:|"]
    for row in result["rows"]:
        total = row.get("total_ratio", row["speedup"])
        lines.append(f"| {row['p']:g} | {row['family']} | {row['speedup']:.2f}× | **{total:.2f}×** | "
                     f"{row['ideal']:.2f}× | {100 * total / row['ideal']:.0f}% |")
    lines += ["", f"{_machine(result['machine'])}; {_kernels(result['machine'])}. Reproduce: "
              f"`python benchmarks/ops.py{' --retain-freed-memory' if retained else ''}`.", ""]
    return lines


def compile_section(result: dict) -> list[str]:
    lines = [f"### torch.compile ({_rel(COMPILE)})", "", result["benchmark"] + ".", "",
             "| comparison | baseline ms | fxdrop ms | speedup (median) |", "|:---|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['candidate']} vs {row['baseline']} | {row['baseline_ms']:.0f} | "
                     f"{row['candidate_ms']:.0f} | **{row['speedup']:.2f}×** |")
    first = result.get("first_step_s", {})
    if first:
        lines += ["", "First step (compilation included): " + ", ".join(f"{k} {v:.1f} s" for k, v in first.items())
                  + "."]
    lines += ["", f"{_machine(result['machine'])}. Reproduce: `python benchmarks/compile.py`.", ""]
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


def backends_section(result: dict) -> list[str]:
    lines = [f"### Compiled C++ CPU kernels against the composite PyTorch ones ({_rel(BACKENDS)})", "",
             f"{result['benchmark']}, hidden {result['hidden']}, batch {result['batch']}.", "",
             "| p | family | composite ms | compiled ms | speedup (median) |", "|---:|:---|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['p']:g} | {row['family']} | {row['composite_ms']:.0f} | {row['compiled_ms']:.0f} | "
                     f"{row['speedup']:.2f}× |")
    lines += ["", "Reproduce: `python benchmarks/backends.py`.", ""]
    return lines


def render() -> str:
    lines = ["## Measured results", "",
             "Generated by `python benchmarks/readme.py` from the result files named in each heading. Speed "
             "figures compare both sides in one run, interleaved (median of paired ratios, and the ratio of total "
             "times, which is what a training run gains); the machines are shared, so expect noise. Where P(dp = 1) > 0 "
             "(at p = 0.3, `max_dp=\"auto\"` draws dp = 1, the full work, in 40% of the steps and dp = 2 in 60%) "
             "the per-step ratios are bimodal and their median jumps between the modes with the draw: read the "
             "total-time ratio there. No GPU was available: the CUDA kernels are compile-checked only "
             "(`scripts/check_cuda_build.sh`).", ""]
    if (result := _load(DEMO)) is not None:
        lines += demo_section(result)
    for path in (MLP, MLP_RETAINED):
        if (result := _load(path)) is not None:
            lines += mlp_section(path, result)
    if (result := _load(PARITY)) is not None:
        lines += parity_section(result)
    studies = [(path, json.loads(path.read_text())) for path in sorted(MAX_DP_STUDY.glob("*.json"))]
    if studies:
        lines += max_dp_section(studies)
    if (result := _load(CODROP)) is not None:
        lines += codrop_section(result)
    speeds = [(path, result) for path in (LSTM, LSTM_RETAINED, LSTM_FORWARD) if (result := _load(path)) is not None]
    quality = [(path, json.loads(path.read_text())) for path in sorted(RESULTS.glob("ptb_lstm_*.json"))]
    if speeds or quality:
        lines += lstm_section(speeds, quality)
    studies = [(path, json.loads(path.read_text())) for path in sorted(MASK_STUDY.glob("*.json"))]
    if studies:
        lines += mask_study_section(studies)
    for path in (OPS, OPS_RETAINED):
        if (result := _load(path)) is not None:
            lines += ops_section(path, result)
    if (result := _load(COMPILE)) is not None:
        lines += compile_section(result)
    runs = [(path, run) for path in DDP if (run := _load(path)) is not None]
    comm = _load(DDP_COMM)
    if runs or comm is not None:
        lines += ddp_section(runs, comm)
    if (result := _load(BACKENDS)) is not None:
        lines += backends_section(result)
    return "\n".join(lines).rstrip() + "\n"


def _import_file(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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

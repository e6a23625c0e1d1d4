"""Word-level Penn Treebank language model: standard dropout vs fxdrop, trained side by side.

Zaremba et al. (2014) "medium" setting by default: 2 LSTM layers x 650 units, BPTT 35, batch 20, dropout
0.5 on the embeddings, between the layers and before the decoder, uniform init in [-0.05, 0.05], SGD with
lr 1 on the loss summed over time steps (mean over the batch), gradient norm clipped at 5, lr x 0.8 per
epoch after epoch 6. Both models start from the same weights, see the same batches in the same order
and run with the same schedule; their steps are interleaved batch by batch so that both see the same
machine load, and each model's wall-clock is the sum of its own training steps (evaluation is timed
apart: it is the same computation for both).

    python examples/ptb_lstm.py                                    # the full medium run (slow on a CPU)
    python examples/ptb_lstm.py --epochs 6 --hidden 200 --max-batches 200 --out runs/ptb_quick
    python examples/ptb_lstm.py --epochs 12 --max-batches 150 --with-none --out runs/ptb_overfit
                        # where dropout matters: the first 150 batches of the training text each epoch,
                        # and a third model without dropout as the floor

Writes ``<out>/ptb_lstm.json`` (config, machine, per-epoch validation perplexity and wall-clock, test
perplexity) and ``<out>/ptb_lstm.png`` (validation perplexity against wall-clock).

The fxdrop model is ``fxdrop.convert`` of the standard one (all three dropouts: embedding -> LSTM input,
between the LSTM layers, LSTM output -> decoder). The model and the training step are
:mod:`fxdrop.harness.models` and :mod:`fxdrop.harness.ptb`, the ones the benchmarks use.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fxdrop
from fxdrop.harness.audit_cli import max_dp_arg
from fxdrop.harness.models import WordLM, without_dropout
from fxdrop.harness.ptb import batches, batchify, load_corpus, num_batches, perplexity, train_step
from fxdrop.harness.timing import machine_info

EXPECTED_SITES = {"drop_in", "rnn.layer0", "drop_out"}


def fxdrop_model(model: WordLM, *, p: float, family: str, seed: int, scale: str = "kept", max_dp: int | str = "auto",
                 granularity: str = "rows", row_classes: int = 2) -> nn.Module:
    """``fxdrop.convert`` of ``model`` (shares its Parameters), checked to have structured every dropout."""
    converted = fxdrop.convert(model, p=p, pattern=family, seed=seed, scale=scale, max_dp=max_dp,
                               granularity=granularity, row_classes=row_classes)
    names = {site.name for site in fxdrop.sites(converted)}
    expected = {"drop_in", "drop_out"} | {f"rnn.layer{i}" for i in range(model.rnn.num_layers - 1)}
    if not names >= expected:
        raise RuntimeError(f"fxdrop.convert structured {sorted(names)}, not every dropout {sorted(expected)}")
    return converted


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=39)
    parser.add_argument("--hidden", type=int, default=650)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--family", choices=("row", "block"), default="row")
    parser.add_argument("--scale", choices=("kept", "rate"), default="kept",
                        help="kept units x n / kept (default) or x 1 / (1 - p)")
    parser.add_argument("--max-dp", type=max_dp_arg, default="auto",
                        help="largest pattern period, or auto (fxdrop.convert's max_dp; default)")
    parser.add_argument("--granularity", choices=("rows", "forward"), default="rows",
                        help="rows (default): the decoder input site draws a pattern per row class of tokens, "
                             "the LSTM sites one per class of contiguous time chunks; forward: one per site per "
                             "forward (fxdrop.convert's granularity)")
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--eval-batch", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--lr-decay", type=float, default=0.8)
    parser.add_argument("--decay-after", type=int, default=6, help="epochs at the initial lr")
    parser.add_argument("--clip", type=float, default=5.0)
    parser.add_argument("--max-batches", type=int, default=None, help="training batches per epoch (quick runs)")
    parser.add_argument("--max-eval-batches", type=int, default=None, help="validation batches (smoke tests)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="fxdrop.allocator.retain_freed_memory() first (glibc keeps freed memory for reuse, so "
                             "fresh activations do not page-fault; both models run in this process alike)")
    parser.add_argument("--row-classes", type=int, default=2, help="row classes with --granularity rows (default 2)")
    parser.add_argument("--with-none", action="store_true",
                        help="also train the model without dropout (same weights, same batches)")
    parser.add_argument("--out", type=Path, default=Path("runs/ptb_lstm"))
    return parser.parse_args(argv)



def main(argv=None) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.retain_freed_memory:
        from fxdrop.allocator import retain_freed_memory

        retain_freed_memory()
    console = Console()
    splits, vocab = load_corpus()
    train = batchify(splits["train"], args.batch)
    valid = batchify(splits["valid"], args.eval_batch)
    test = batchify(splits["test"], args.eval_batch)

    torch.manual_seed(args.seed)
    standard = WordLM(vocab, args.hidden, args.layers, args.p)
    structured = fxdrop_model(copy.deepcopy(standard), p=args.p, family=args.family, seed=args.seed,
                              scale=args.scale, max_dp=args.max_dp, granularity=args.granularity,
                              row_classes=args.row_classes)
    console.print(f"fxdrop sites: {[site.name for site in fxdrop.sites(structured)]}")
    # what each converted site draws, read off the model (the results file records it; README labels by it)
    args.sites = {site.name: {"granularity": site.granularity, "row_classes": site.row_classes}
                  for site in fxdrop.sites(structured)}
    runs = {"standard": {"model": standard}, "fxdrop": {"model": structured}}
    if args.with_none:
        runs["none"] = {"model": without_dropout(copy.deepcopy(standard))}
    for run in runs.values():
        run.update(optimizer=torch.optim.SGD(run["model"].parameters(), lr=args.lr), seconds=0.0, epochs=[])

    per_epoch = num_batches(train, args.bptt, args.max_batches)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("ppl {task.fields[ppl]:>8.1f}  {task.fields[ms]:>6.0f} ms/step"), TimeElapsedColumn(),
                  console=console) as progress:
        tasks = {name: progress.add_task(name, total=per_epoch, ppl=float("nan"), ms=float("nan")) for name in runs}
        for epoch in range(1, args.epochs + 1):
            lr = args.lr * args.lr_decay ** max(epoch - args.decay_after, 0)
            for name, run in runs.items():
                for group in run["optimizer"].param_groups:
                    group["lr"] = lr
                run.update(hidden=None, loss=0.0, steps=0, epoch_seconds=0.0)
                progress.reset(tasks[name], total=per_epoch, description=f"{name:8s} epoch {epoch}")
            for inputs, targets in batches(train, args.bptt, args.max_batches):
                for name, run in runs.items():  # interleaved: both models see the same load
                    start = time.perf_counter()
                    loss, run["hidden"] = train_step(run["model"], run["optimizer"], inputs, targets, run["hidden"],
                                                     args.clip)
                    elapsed = time.perf_counter() - start
                    run["epoch_seconds"] += elapsed
                    run["loss"] += loss
                    run["steps"] += 1
                    progress.update(tasks[name], advance=1, ppl=math.exp(run["loss"] / run["steps"]),
                                    ms=1e3 * run["epoch_seconds"] / run["steps"])
            for name, run in runs.items():
                run["seconds"] += run["epoch_seconds"]
                start = time.perf_counter()
                val = perplexity(run["model"], valid, args.bptt, args.max_eval_batches)
                run["epochs"].append({"epoch": epoch, "lr": lr, "train_ppl": math.exp(run["loss"] / run["steps"]),
                                      "val_ppl": val, "train_seconds": run["seconds"],
                                      "epoch_seconds": run["epoch_seconds"],
                                      "eval_seconds": time.perf_counter() - start})
                progress.console.print(f"epoch {epoch:2d} {name:8s} val ppl {val:8.2f}  "
                                       f"train {run['epoch_seconds']:7.1f} s (total {run['seconds']:8.1f} s)")
            args.out.mkdir(parents=True, exist_ok=True)  # partial results survive an interrupted run
            (args.out / "ptb_lstm.json").write_text(json.dumps(summarize(args, runs, vocab, per_epoch), indent=2))

    for run in runs.values():
        run["test_ppl"] = perplexity(run["model"], test, args.bptt, args.max_eval_batches)
    result = summarize(args, runs, vocab, per_epoch)
    show(console, result, Table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ptb_lstm.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "ptb_lstm.png")
    console.print(f"wrote {args.out / 'ptb_lstm.json'} and {args.out / 'ptb_lstm.png'}")
    return result


def time_to_reach(epochs: list[dict], target: float) -> float | None:
    """Training seconds at the first epoch whose validation perplexity is at most ``target``."""
    for record in epochs:
        if record["val_ppl"] <= target:
            return record["train_seconds"]
    return None


def summarize(args, runs, vocab: int, per_epoch: int) -> dict:
    std, fx = runs["standard"], runs["fxdrop"]
    target = std["epochs"][-1]["val_ppl"]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(vocab=vocab, batches_per_epoch=per_epoch)
    extra = {}
    if "none" in runs:  # how much dropout matters here, and how much of that fxdrop keeps
        none = runs["none"]["epochs"][-1]["val_ppl"]
        extra = {"val_ppl_none": none, "test_ppl_none": runs["none"].get("test_ppl"),
                 "standard_gain_over_none": 1.0 - target / none,
                 "share_of_standard_gain": ((none - fx["epochs"][-1]["val_ppl"]) / (none - target)
                                            if none > target else None)}
    return {
        "command": "python examples/ptb_lstm.py " + " ".join(sys.argv[1:]),
        "config": config,
        "machine": machine_info(),
        "runs": {name: {"epochs": run["epochs"], "test_ppl": run.get("test_ppl"), "train_seconds": run["seconds"]}
                 for name, run in runs.items()},
        "summary": {
            "epochs": len(std["epochs"]),
            "val_ppl_standard": target,
            "val_ppl_fxdrop": fx["epochs"][-1]["val_ppl"],
            "val_ppl_relative_difference": fx["epochs"][-1]["val_ppl"] / target - 1.0,
            "test_ppl_standard": std.get("test_ppl"),
            "test_ppl_fxdrop": fx.get("test_ppl"),
            "train_speedup": std["seconds"] / fx["seconds"],
            "fxdrop_seconds_to_standard_final_val_ppl": time_to_reach(fx["epochs"], target),
            "standard_seconds_to_final_val_ppl": std["seconds"],
            **extra,
        },
    }


def show(console, result, Table) -> None:
    table = Table(title="PTB word LM: standard dropout vs fxdrop")
    table.add_column("epoch", justify="right")
    names = list(result["runs"])
    for name in names:
        table.add_column(f"{name} val ppl", justify="right")
        table.add_column(f"{name} train s", justify="right")
    for records in zip(*(result["runs"][name]["epochs"] for name in names)):
        table.add_row(str(records[0]["epoch"]),
                      *(f"{value:.{digits}f}" for r in records
                        for value, digits in ((r["val_ppl"], 2), (r["train_seconds"], 0))))
    console.print(table)
    s = result["summary"]
    console.print(f"test ppl: standard {s['test_ppl_standard']:.2f}, fxdrop {s['test_ppl_fxdrop']:.2f}; "
                  f"val ppl difference {100 * s['val_ppl_relative_difference']:+.2f}%; "
                  f"training time speedup {s['train_speedup']:.2f}x")
    if "val_ppl_none" in s:
        share = s["share_of_standard_gain"]
        console.print(f"without dropout: val ppl {s['val_ppl_none']:.2f}; standard dropout's gain "
                      f"{100 * s['standard_gain_over_none']:.1f}%, of which fxdrop keeps "
                      f"{'-' if share is None else f'{100 * share:.0f}%'}")


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, style in (("standard", "o-"), ("fxdrop", "s-"), ("none", "^--")):
        if name not in result["runs"]:
            continue
        epochs = result["runs"][name]["epochs"]
        ax.plot([e["train_seconds"] / 60 for e in epochs], [e["val_ppl"] for e in epochs], style,
                label=f"{name} (test ppl {result['runs'][name]['test_ppl']:.1f})")
    cfg = result["config"]
    ax.set_xlabel("training wall-clock (minutes)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"PTB, {cfg['layers']}x{cfg['hidden']} LSTM, p={cfg['p']}, {cfg['family']} patterns")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

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

Writes ``<out>/ptb_lstm.json`` (config, machine, per-epoch validation perplexity and wall-clock, test
perplexity) and ``<out>/ptb_lstm.png`` (validation perplexity against wall-clock).

The fxdrop model comes from ``fxdrop.convert`` when it converts all three dropouts of this model
(embedding -> LSTM input, between the LSTM layers, LSTM output -> decoder); otherwise (``--conversion
manual``, or an fxdrop whose converter does not handle LSTMs yet) it is built from the same pieces
directly: :class:`fxdrop.lstm.StructuredLSTM` with an input site, and an input-structured decoder on
``fxdrop.ops.chain``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fxdrop
import fxdrop.ops
from fxdrop.audit_cli import max_dp_arg
from fxdrop.lstm import StructuredLSTM, structure_lstm
from fxdrop.modules import StructuredChain
from fxdrop.scheduler import ROW_CLASSES, derive_seed
from fxdrop.site import Site


# ---------------------------------------------------------------- the model

class WordLM(nn.Module):
    """Embedding -> Dropout -> LSTM(dropout between layers) -> Dropout -> Linear decoder.

    ``tokens: (T, B)`` int64 -> logits ``(T, B, vocab)`` and the new ``(h, c)``.
    """

    def __init__(self, vocab: int, hidden: int = 650, layers: int = 2, p: float = 0.5, init: float = 0.05):
        super().__init__()
        self.encoder = nn.Embedding(vocab, hidden)
        self.drop_in = nn.Dropout(p)
        self.rnn = nn.LSTM(hidden, hidden, num_layers=layers, dropout=p)
        self.drop_out = nn.Dropout(p)
        self.decoder = nn.Linear(hidden, vocab)
        for param in self.parameters():
            nn.init.uniform_(param, -init, init)

    def forward(self, tokens, hidden=None):
        output, hidden = self.rnn(self.drop_in(self.encoder(tokens)), hidden)
        return self.decoder(self.drop_out(output)), hidden


class InputStructuredDecoder(nn.Module):
    """``Dropout -> Linear`` with the dropout structured: only the kept input columns are multiplied.

    Holds the original Linear's Parameters under the same names (``weight``, ``bias``); the work is
    :class:`fxdrop.modules.StructuredChain`'s (one pattern per forward, or per row class with ``rows``).
    """

    def __init__(self, linear: nn.Linear, site: Site):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.site = site
        self.chain = StructuredChain([site], family=site.family, activations=[], has_bias=[linear.bias is not None],
                                     input_dropout=True, output_dropout=False, scale=site.scale,
                                     linears=["decoder"])

    def fxdrop_sites(self) -> list[Site]:
        return [self.site]

    def forward(self, x):
        if not self.training:
            return F.linear(x, self.weight, self.bias)
        return self.chain(x, self.weight, *([self.bias] if self.bias is not None else []))


class StructuredWordLM(nn.Module):
    """:class:`WordLM` with all three dropouts structured, built by hand; same Parameters, same keys."""

    def __init__(self, model: WordLM, *, p: float, family: str, seed: int, max_dp: int | str = "auto",
                 scale: str = "kept", granularity: str = "rows"):
        super().__init__()
        self.encoder = model.encoder
        self.rnn = structure_lstm(model.rnn, name="rnn", p=p, input_name="drop_in", input_p=p, family=family,
                                  max_dp=max_dp, seed=seed, scale=scale)
        site = Site.create("drop_out", p, family, max_dp=max_dp, seed=derive_seed(seed, 1 << 20), scale=scale,
                           units=model.decoder.in_features, producer="rnn", consumer="decoder",
                           granularity=granularity)
        self.decoder = InputStructuredDecoder(model.decoder, site)

    def forward(self, tokens, hidden=None):
        output, hidden = self.rnn(self.encoder(tokens), hidden)
        return self.decoder(output), hidden


EXPECTED_SITES = {"drop_in", "rnn.layer0", "drop_out"}


def fxdrop_model(model: WordLM, *, p: float, family: str, seed: int, scale: str = "kept", max_dp: int | str = "auto",
                 conversion: str = "auto", granularity: str = "rows") -> nn.Module:
    """The fxdrop twin of ``model`` (shares its Parameters): ``fxdrop.convert`` when it converts every site.

    ``granularity="rows"`` (default here): the decoder's input site draws a pattern per token row;
    the LSTM sites draw one per forward (locked dropout) either way.
    """
    if conversion in ("auto", "convert") and hasattr(fxdrop, "convert"):
        try:
            converted = fxdrop.convert(model, p=p, pattern=family, seed=seed, scale=scale, max_dp=max_dp,
                                       granularity=granularity)
            names = {site.name for site in fxdrop.sites(converted)}
        except Exception as err:  # noqa: BLE001  (auto: fall back, and say why)
            if conversion == "convert":
                raise
            names, reason = set(), f"{type(err).__name__}: {err}"
        else:
            reason = f"converted sites {sorted(names)}"
        expected = EXPECTED_SITES if model.rnn.num_layers == 2 else (
            {"drop_in", "drop_out"} | {f"rnn.layer{i}" for i in range(model.rnn.num_layers - 1)})
        if names >= expected:
            converted.fxdrop_conversion = "fxdrop.convert"
            return converted
        if conversion == "convert":
            raise RuntimeError(f"fxdrop.convert did not convert every dropout of the model ({reason})")
        print(f"[fxdrop.convert does not structure every dropout yet ({reason}); building the model by hand]")
    twin = StructuredWordLM(model, p=p, family=family, seed=seed, scale=scale, max_dp=max_dp,
                            granularity=granularity)
    twin.fxdrop_conversion = "manual (StructuredLSTM + fxdrop.ops.chain decoder)"
    return twin


# ---------------------------------------------------------------- data

def load_corpus():
    """The three splits as int64 token-id tensors and the vocabulary size (``fxdrop.data.load_ptb``)."""
    from fxdrop.data import load_ptb

    ptb = load_ptb()
    return {"train": ptb.train, "valid": ptb.valid, "test": ptb.test}, ptb.vocab_size


def batchify(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """``(N,)`` -> ``(N // batch, batch)``: column ``b`` is the ``b``-th contiguous slice of the corpus."""
    steps = ids.numel() // batch
    return ids[: steps * batch].view(batch, steps).t().contiguous()


def batches(data: torch.Tensor, bptt: int, limit: int | None = None):
    count = 0
    for start in range(0, data.shape[0] - 1, bptt):
        if limit is not None and count >= limit:
            return
        length = min(bptt, data.shape[0] - 1 - start)
        yield data[start: start + length], data[start + 1: start + 1 + length]
        count += 1


def num_batches(data: torch.Tensor, bptt: int, limit: int | None) -> int:
    total = math.ceil((data.shape[0] - 1) / bptt)
    return total if limit is None else min(total, limit)


# ---------------------------------------------------------------- training

def detach(hidden):
    return None if hidden is None else tuple(h.detach() for h in hidden)


def train_step(model, optimizer, inputs, targets, hidden, clip: float):
    """One SGD step on the loss summed over time, averaged over the batch (Zaremba et al.)."""
    optimizer.zero_grad(set_to_none=True)
    logits, hidden = model(inputs, hidden)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
    (loss * inputs.shape[0]).backward()
    nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return float(loss.detach()), detach(hidden)


@torch.no_grad()
def perplexity(model, data, bptt: int, limit: int | None = None) -> float:
    model.eval()
    total, tokens, hidden = 0.0, 0, None
    for inputs, targets in batches(data, bptt, limit):
        logits, hidden = model(inputs, hidden)
        total += float(F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        tokens += targets.numel()
    model.train()
    return math.exp(total / tokens)


def machine() -> dict:
    from fxdrop.allocator import retained

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "fxdrop": getattr(fxdrop, "__version__", "?"),
            "retain_freed_memory": retained()}


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
                        help="decoder input site: a pattern per token row (default) or one per forward; the LSTM "
                             "sites draw one per forward either way (fxdrop.convert's granularity)")
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
    parser.add_argument("--conversion", choices=("auto", "convert", "manual"), default="auto")
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
                              scale=args.scale, max_dp=args.max_dp, conversion=args.conversion,
                              granularity=args.granularity)
    console.print(f"fxdrop model: {structured.fxdrop_conversion}; sites: "
                  f"{[site.name for site in fxdrop.sites(structured)] if hasattr(fxdrop, 'sites') else '?'}")
    runs = {"standard": {"model": standard}, "fxdrop": {"model": structured}}
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
    config.update(vocab=vocab, batches_per_epoch=per_epoch, conversion=fx["model"].fxdrop_conversion)
    if args.granularity == "rows":
        config["row_classes"] = ROW_CLASSES
    return {
        "command": "python examples/ptb_lstm.py " + " ".join(sys.argv[1:]),
        "config": config,
        "machine": machine(),
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
        },
    }


def show(console, result, Table) -> None:
    table = Table(title="PTB word LM: standard dropout vs fxdrop")
    table.add_column("epoch", justify="right")
    for name in ("standard", "fxdrop"):
        table.add_column(f"{name} val ppl", justify="right")
        table.add_column(f"{name} train s", justify="right")
    for std, fx in zip(result["runs"]["standard"]["epochs"], result["runs"]["fxdrop"]["epochs"]):
        table.add_row(str(std["epoch"]), f"{std['val_ppl']:.2f}", f"{std['train_seconds']:.0f}",
                      f"{fx['val_ppl']:.2f}", f"{fx['train_seconds']:.0f}")
    console.print(table)
    s = result["summary"]
    console.print(f"test ppl: standard {s['test_ppl_standard']:.2f}, fxdrop {s['test_ppl_fxdrop']:.2f}; "
                  f"val ppl difference {100 * s['val_ppl_relative_difference']:+.2f}%; "
                  f"training time speedup {s['train_speedup']:.2f}x")


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, style in (("standard", "o-"), ("fxdrop", "s-")):
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

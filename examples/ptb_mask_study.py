"""Which mask granularity does a PTB LSTM need? Dense-mask study (quality only, no speed).

The PTB word LM of ``examples/ptb_lstm.py`` (Embedding -> Dropout -> LSTM layers with dropout between
them -> Dropout -> Linear decoder) trained with each dropout replaced by an explicit mask, for several
ways of drawing the mask. Every structured mode draws fxdrop's patterns (``search_distribution(p,
max_dp)``, offset uniform, ``row`` or ``block`` family, ``kept`` or ``rate`` scale); they differ in how
many rows of the ``(T, B, units)`` activation share one draw:

``bernoulli``  independent per element (``nn.Dropout``: the standard-dropout baseline)
``shared``     one pattern per forward for all time steps and batch elements (fxdrop's LSTM sites so far)
``sample``     one pattern per batch element, shared by its time steps (variational / locked)
``row``        one pattern per (time step, batch element) row
``time``       one pattern per time step, shared by the batch
``chunk``      the time steps cut into one contiguous chunk per pattern of the distribution, chunk
               lengths proportional to the pattern's probability (stratified), chunks in random order
``classesK``   K patterns per forward, row ``r`` of the flattened ``(T * B)`` rows using pattern
               ``r mod K`` (fxdrop's ``granularity="rows"`` with ``row_classes=K``)
``tchunksK``   K patterns per forward, the time steps cut into K equal contiguous chunks, each chunk's
               steps and batch elements sharing one pattern
``tshuffK``    ``tchunksK`` over one uniformly random permutation of the units per forward (the
               permutation shared by the chunks: fxdrop's block partition no longer fixed)
``cshuffK``    ``classesK`` over one random permutation of the units per forward, likewise
``tsysK``      ``tchunksK`` with the K patterns drawn as fxdrop draws a row-class plan (systematic
               sampling: quantiles ``(u + j) / K`` of the distribution, rotated at random), not independently
``csysK``      ``classesK`` drawn that way
``none``       no dropout at that site (with ``none`` alone: the model without dropout)

A mode ``A/B`` uses ``A`` for the LSTM-input sites (embedding and between layers) and ``B`` for the
decoder's input (e.g. ``shared/row``).

All modes start from the same weights and see the same batches; masks are applied densely, so this
measures quality, not speed. Writes ``<out>/<mode>.json`` with per-epoch validation perplexity.

    python examples/ptb_mask_study.py --modes bernoulli shared sample row --hidden 200 --epochs 6 \
        --max-batches 150 --threads 1 --out examples/results/ptb_mask_study
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fxdrop.harness import ptb
from fxdrop.harness.audit_cli import max_dp_arg
from fxdrop.harness.models import WordLM
from fxdrop.patterns import unit_mask
from fxdrop.search import search_distribution

GRANULARITIES = tuple(ptb.MASK_MODES)  # the modes and their README words live in fxdrop.harness.ptb
COUNTED = tuple(ptb.COUNTED_MASK_MODES)  # followed by a pattern count, e.g. classes8


def _known(part: str) -> bool:
    return part in GRANULARITIES or ptb.mask_mode_count(part) is not None


def check_mode(mode: str) -> str:
    parts = mode.split("/")
    if len(parts) not in (1, 2) or not all(_known(part) for part in parts):
        raise argparse.ArgumentTypeError(f"mode {mode!r}: expected one of {GRANULARITIES}, "
                                         f"{' or '.join(p + 'K' for p in COUNTED)}, or A/B of them")
    return mode


class PatternTable:
    """Every (dp, offset) pattern of a distribution as a dense mask row, with its probability."""

    def __init__(self, p: float, units: int, family: str, max_dp, scale: str):
        dist = search_distribution(p, max_dp=max_dp)
        rows, probs = [], []
        for k, prob in enumerate(dist.probs.tolist()):
            dp = k + 1
            if prob <= 0:
                continue
            for offset in range(dp):
                rows.append(unit_mask(family, units, dp, offset, scale, p))
                probs.append(prob / dp)
        self.masks = torch.stack(rows)
        self.probs = torch.tensor(probs, dtype=torch.float64)

    def draw(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Masks for ``shape`` independent draws: ``shape + (units,)``."""
        count = math.prod(shape)
        idx = torch.multinomial(self.probs, count, replacement=True, generator=generator)
        return self.masks[idx].reshape(*shape, -1)

    def systematic(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` masks at the quantiles ``(u + j) / count`` of the distribution, rotated by a random
        shift (what ``fxdrop.scheduler.draw_classes`` does for a row-class plan): ``(count, units)``."""
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        cdf = self.probs.cumsum(0)
        quantiles = (u + torch.arange(count, dtype=torch.float64)) / count
        idx = torch.searchsorted(cdf, quantiles, right=True).clamp(max=len(self.probs) - 1)
        shift = int(torch.randint(count, (), generator=generator))
        return self.masks[idx.roll(shift)]

    def chunks(self, steps: int, generator: torch.Generator) -> torch.Tensor:
        """Per-step masks ``(steps, 1, units)``: one contiguous chunk per pattern, stratified lengths."""
        expected = self.probs * steps
        counts = expected.floor()
        frac = expected - counts
        extra = int(round(steps - float(counts.sum())))
        if extra:  # systematic sampling: pattern k gets one more step with probability frac[k]
            u = float(torch.rand((), generator=generator, dtype=torch.float64))
            edges = torch.cat([torch.zeros(1, dtype=torch.float64), frac.cumsum(0)])
            for j in range(extra):
                counts[int(torch.searchsorted(edges, u + j, right=True)) - 1] += 1
        order = torch.randperm(len(counts), generator=generator)
        idx = torch.repeat_interleave(order, counts[order].long())
        return self.masks[idx].unsqueeze(1)


class MaskedLM(nn.Module):
    """WordLM's computation with single-layer LSTMs and an explicit mask at every dropout."""

    def __init__(self, model: WordLM, mode: str, p: float, family: str, max_dp, scale: str, seed: int):
        super().__init__()
        self.encoder, self.decoder = model.encoder, model.decoder
        rnn = model.rnn
        self.layers = nn.ModuleList()
        for layer in range(rnn.num_layers):
            single = nn.LSTM(rnn.input_size if layer == 0 else rnn.hidden_size, rnn.hidden_size)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                setattr(single, f"{name}_l0", getattr(rnn, f"{name}_l{layer}"))
            single._init_flat_weights()
            self.layers.append(single)
        parts = mode.split("/")
        self.input_mode, self.output_mode = parts[0], parts[-1]
        self.p = p
        self.table = PatternTable(p, rnn.hidden_size, family, max_dp, scale)
        self.generator = torch.Generator().manual_seed(seed)

    def drop(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        if not self.training or mode == "none":
            return x
        if mode == "bernoulli":
            keep = torch.rand(x.shape, generator=self.generator) >= self.p
            return x * keep / (1 - self.p)
        T, B, _ = x.shape
        if mode == "chunk":
            return x * self.table.chunks(T, self.generator)
        counted = ptb.mask_mode_count(mode)
        if counted is not None:
            prefix, count = counted
            plan = self.table.systematic(count, self.generator) if prefix in ("csys", "tsys") else \
                self.table.draw((count,), self.generator)
            if prefix in ("cshuff", "tshuff"):
                plan = plan[:, torch.randperm(plan.shape[1], generator=self.generator)]
            if prefix in ("classes", "cshuff", "csys"):
                rows = torch.arange(T * B) % plan.shape[0]
                return x * plan[rows].reshape(T, B, -1)
            chunk = torch.arange(T) * plan.shape[0] // T  # equal contiguous chunks of time steps
            return x * plan[chunk].unsqueeze(1)
        shape = {"shared": (1, 1), "sample": (1, B), "row": (T, B), "time": (T, 1)}[mode]
        return x * self.table.draw(shape, self.generator)

    def forward(self, tokens, hidden=None):
        x = self.drop(self.encoder(tokens), self.input_mode)
        states = []
        for layer, lstm in enumerate(self.layers):
            if layer > 0:
                x = self.drop(x, self.input_mode)
            state = None if hidden is None else (hidden[0][layer: layer + 1], hidden[1][layer: layer + 1])
            x, state = lstm(x, state)
            states.append(state)
        hidden = (torch.cat([s[0] for s in states]), torch.cat([s[1] for s in states]))
        return self.decoder(self.drop(x, self.output_mode)), hidden


def run(args, mode: str, splits, vocab: int) -> dict:
    train = ptb.batchify(splits["train"], args.batch)
    valid = ptb.batchify(splits["valid"], args.eval_batch)
    test = ptb.batchify(splits["test"], args.eval_batch)
    torch.manual_seed(args.seed)
    base = WordLM(vocab, args.hidden, args.layers, args.p)
    model = MaskedLM(base, mode, args.p, args.family, args.max_dp, args.scale, seed=args.seed + 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    epochs, seconds = [], 0.0
    for epoch in range(1, args.epochs + 1):
        lr = args.lr * args.lr_decay ** max(epoch - args.decay_after, 0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        hidden, loss_sum, steps, start = None, 0.0, 0, time.perf_counter()
        for inputs, targets in ptb.batches(train, args.bptt, args.max_batches):
            loss, hidden = ptb.train_step(model, optimizer, inputs, targets, hidden, args.clip)
            loss_sum += loss
            steps += 1
        seconds += time.perf_counter() - start
        val = ptb.perplexity(model, valid, args.bptt)
        epochs.append({"epoch": epoch, "lr": lr, "train_ppl": math.exp(loss_sum / steps), "val_ppl": val,
                       "train_seconds": seconds})
        print(f"{mode:9s} epoch {epoch} val ppl {val:8.2f} ({seconds:.0f} s)", flush=True)
    return {"mode": mode, "epochs": epochs, "test_ppl": ptb.perplexity(model, test, args.bptt)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", type=check_mode, default=list(GRANULARITIES))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--family", choices=("row", "block"), default="row")
    parser.add_argument("--scale", choices=("kept", "rate"), default="kept")
    parser.add_argument("--max-dp", type=max_dp_arg, default="auto")
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--eval-batch", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--lr-decay", type=float, default=0.8)
    parser.add_argument("--decay-after", type=int, default=6)
    parser.add_argument("--clip", type=float, default=5.0)
    parser.add_argument("--max-batches", type=int, default=150)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/ptb_mask_study"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    splits, vocab = ptb.load_corpus()
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    for mode in args.modes:
        result = run(args, mode, splits, vocab)
        result.update(config=config, command="python examples/ptb_mask_study.py " + " ".join(sys.argv[1:]))
        (args.out / f"{mode.replace('/', '-')}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

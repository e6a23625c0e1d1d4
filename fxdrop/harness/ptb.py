"""The Penn Treebank language-model workload: corpus splits, batching, the training step and perplexity.

Zaremba et al. (2014): BPTT over contiguous slices of the corpus, the loss summed over time steps
(mean over the batch), gradient norm clipping, SGD. Used by ``examples/ptb_lstm.py``, its mask study and
the LSTM benchmark; :data:`MASK_MODES` names the mask study's modes (its parser and README both read it).
Imports torch, :mod:`.data` and the training runs' name parsing (:func:`.training_runs.counted`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .training_runs import counted


# examples/ptb_mask_study.py's modes, in README's words: the study accepts exactly these (the counted ones
# followed by a pattern count K), so a mode cannot exist without its words. The study's docstring says more.
MASK_MODES = {"bernoulli": "Bernoulli per element (standard dropout)", "shared": "one pattern per forward",
              "sample": "a pattern per sequence (shared over time)", "row": "a pattern per token",
              "time": "a pattern per time step (shared by the batch)",
              "chunk": "one contiguous chunk of time steps per pattern", "none": "no dropout"}
COUNTED_MASK_MODES = {
    "classes": "{K} patterns, token r in class r mod {K}",
    "tchunks": "{K} patterns, one per contiguous chunk of time steps",
    "cshuff": "{K} patterns, token r in class r mod {K}, units permuted per forward",
    "tshuff": "{K} patterns, one per chunk of time steps, units permuted per forward",
    "csys": "{K} patterns drawn as fxdrop does (systematic), token r in class r mod {K}",
    "tsys": "{K} patterns drawn as fxdrop does (systematic), one per chunk of time steps"}


def mask_mode_count(part: str) -> tuple[str, int] | None:
    """``classes8`` -> ``("classes", 8)``; None for anything that is not a counted mode with a count >= 1."""
    return next(((prefix, count) for prefix in COUNTED_MASK_MODES if (count := counted(part, prefix))), None)


def mask_mode_words(part: str) -> str:
    """README's words for one part (LSTM inputs or decoder) of a mask-study mode; KeyError if unknown."""
    counted = mask_mode_count(part)
    if counted is not None:
        return COUNTED_MASK_MODES[counted[0]].format(K=counted[1])
    return MASK_MODES[part]


def load_corpus():
    """The three splits as int64 token-id tensors and the vocabulary size (:func:`fxdrop.harness.data.load_ptb`)."""
    from .data import load_ptb

    ptb = load_ptb()
    return {"train": ptb.train, "valid": ptb.valid, "test": ptb.test}, ptb.vocab_size


def batchify(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """``(N,)`` -> ``(N // batch, batch)``: column ``b`` is the ``b``-th contiguous slice of the corpus."""
    steps = ids.numel() // batch
    return ids[: steps * batch].view(batch, steps).t().contiguous()


def batches(data: torch.Tensor, bptt: int, limit: int | None = None):
    """``(inputs, targets)`` windows of ``bptt`` time steps, at most ``limit`` of them."""
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


def detach(hidden):
    return None if hidden is None else tuple(h.detach() for h in hidden)


def train_step(model, optimizer, inputs, targets, hidden, clip: float):
    """One optimizer step on the loss summed over time, averaged over the batch (Zaremba et al.)."""
    optimizer.zero_grad(set_to_none=True)
    logits, hidden = model(inputs, hidden)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
    (loss * inputs.shape[0]).backward()
    if clip:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return float(loss.detach()), detach(hidden)


@torch.no_grad()
def perplexity(model, data, bptt: int, limit: int | None = None) -> float:
    """exp(mean cross-entropy per token) over ``data`` in eval mode."""
    was_training = model.training
    model.eval()
    total, tokens, hidden = 0.0, 0, None
    for inputs, targets in batches(data, bptt, limit):
        logits, hidden = model(inputs, hidden)
        total += float(F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        tokens += targets.numel()
    model.train(was_training)
    return math.exp(total / max(tokens, 1))

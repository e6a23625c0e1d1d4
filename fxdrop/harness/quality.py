"""Quality runs: one MNIST MLP training run per configuration, for the stability grid and the overfitting study.

A :class:`MnistRun` fixes everything a run depends on (data regime, width, rate, optimizer and learning
rate, seed, epochs, the dropout variant); :func:`train_mnist` trains it and returns the test accuracy
averaged over the last ``average_last`` epochs, the final one, the training loss curve and whether it
diverged (a non-finite loss, or accuracy at chance). Every variant of a (rate, seed) starts from the same
weights and sees the same data order: variants differ only in their dropout. Variants: ``none`` (rate
0), ``standard`` (``nn.Dropout``) and fxdrop ones written ``family/granularity[/classes][/key=value...]``
(``block/rows/8``, ``row/forward``, ``block/rows/2/scale=rate``: any other convert option, and
``reshuffle=K``: :func:`fxdrop.reshuffle` with the run's optimizer, every ``K`` steps), and dense
mask references ``ref/<kind>/<classes>`` (:mod:`fxdrop.harness.mask_references`: the original model with
masks of chosen statistics, no fxdrop kernel).
:func:`run_many` runs a list of runs on worker processes (one torch thread each).

Imports torch, fxdrop and the harness's data and models.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .mask_references import parse_reference, with_reference_masks
from .models import mnist_mlp, without_dropout
from .training_runs import RUN_OPTIONS, option_value

CHANCE = 0.2  # below this test accuracy after training, a run counts as diverged (10 classes)


@dataclass(frozen=True)
class MnistRun:
    variant: str = "standard"
    p: float = 0.5
    optimizer: str = "momentum"  # "momentum" (SGD 0.9) or "adamw"
    lr: float = 0.02
    train_images: int | None = 2000  # None: the full 60,000
    epochs: int = 60
    batch: int = 128
    width: int = 1024
    seed: int = 0
    average_last: int = 5

    def key(self) -> str:
        data = "full" if self.train_images is None else f"{self.train_images}"
        return f"{data}/{self.optimizer}/lr{self.lr}/p{self.p}/{self.variant}/s{self.seed}"


def fxdrop_options(variant: str) -> dict[str, Any] | None:
    """``family/granularity[/classes][/key=value...]`` as fxdrop.convert options (``block/rows/8/scale=rate``);
    None for ``standard``, ``none`` and the mask references ``ref/...``."""
    if variant in ("standard", "none") or parse_reference(variant) is not None:
        return None
    parts = variant.split("/")
    options: dict[str, Any] = {"pattern": parts[0], "granularity": parts[1] if len(parts) > 1 else "forward"}
    for part in parts[2:]:
        key, sep, value = part.partition("=")
        if not sep:
            options["row_classes"] = option_value(part)  # a count, or "auto"
        elif not key:
            raise ValueError(f"variant {variant!r}: {part!r} is not key=value")
        else:
            options[key] = option_value(value)
    return options


def _model(run: MnistRun):
    torch.manual_seed(run.seed)
    model = mnist_mlp(run.width, run.p)
    if run.variant == "none":
        return without_dropout(model)
    reference = parse_reference(run.variant)
    if reference is not None:
        return with_reference_masks(model, *reference, seed=run.seed + 2)
    options = fxdrop_options(run.variant)
    if options is None:
        return model
    import fxdrop

    convert_options = {k: v for k, v in options.items() if k not in RUN_OPTIONS}  # reshuffle: in train_mnist
    return fxdrop.convert(model, seed=run.seed, **convert_options)


@torch.no_grad()
def _accuracy(model, images, labels) -> float:
    model.eval()
    correct = sum(int((model(images[i:i + 2000]).argmax(1) == labels[i:i + 2000]).sum())
                  for i in range(0, len(images), 2000))
    model.train()
    return correct / len(images)


def train_mnist(run: MnistRun, data=None) -> dict[str, Any]:
    """Train one run; returns its figures (see the module docstring)."""
    if data is None:
        from .data import load_mnist

        data = load_mnist()
    images, labels = data.train_images, data.train_labels
    if run.train_images is not None:
        images, labels = images[:run.train_images], labels[:run.train_images]
    model = _model(run).train()
    if run.optimizer not in ("momentum", "adamw"):
        raise ValueError(f"unknown optimizer {run.optimizer!r}; expected 'momentum' or 'adamw'")
    from ..roofline import make_optimizer

    optimizer = make_optimizer(run.optimizer, model.parameters(), run.lr)
    every = (fxdrop_options(run.variant) or {}).get("reshuffle")
    if every is not None:
        from ..reshuffle import reshuffle

        reshuffle(model, optimizer, every=every, seed=run.seed + 3)
    order = torch.Generator().manual_seed(run.seed)
    torch.manual_seed(run.seed + 1)  # standard dropout's masks
    losses, accuracies, diverged, start = [], [], False, time.perf_counter()
    for epoch in range(run.epochs):
        permutation = torch.randperm(len(images), generator=order)
        total = 0.0
        for first in range(0, len(permutation), run.batch):
            index = permutation[first:first + run.batch]
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        losses.append(total / len(permutation))
        if not math.isfinite(losses[-1]):
            diverged = True
            break
        if epoch >= run.epochs - run.average_last:
            accuracies.append(_accuracy(model, data.test_images, data.test_labels))
    accuracy = sum(accuracies) / len(accuracies) if accuracies and not diverged else float("nan")
    diverged = diverged or not accuracy >= CHANCE
    return {"run": asdict(run), "key": run.key(), "accuracy": accuracy,
            "final_accuracy": accuracies[-1] if accuracies and not diverged else float("nan"),
            "diverged": diverged, "train_loss": losses, "seconds": time.perf_counter() - start}


def _worker(run: MnistRun) -> dict[str, Any]:
    torch.set_num_threads(1)
    return train_mnist(run)


def run_many(runs: list[MnistRun], *, workers: int = 2, on_result=None) -> list[dict[str, Any]]:
    """Every run, ``workers`` at a time (spawned processes, one torch thread each), in the order given."""
    results: list[dict[str, Any] | None] = [None] * len(runs)
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, maxtasksperchild=20) as pool:
        for index, result in pool.imap_unordered(_indexed, list(enumerate(runs))):
            results[index] = result
            if on_result is not None:
                on_result(result)
    return [r for r in results if r is not None]


def _indexed(item):
    index, run = item
    return index, _worker(run)


def paired_differences(results: list[dict[str, Any]], variant: str, against: str) -> dict[str, float]:
    """Mean and standard error of (variant - against) accuracy over the seeds both ran, and the count."""
    by = {}
    for r in results:
        run = r["run"]
        by[(run["variant"], run["seed"])] = r["accuracy"]
    diffs = [by[(variant, s)] - by[(against, s)] for (v, s) in by if v == variant and (against, s) in by]
    diffs = [d for d in diffs if math.isfinite(d)]
    if not diffs:
        return {"mean": float("nan"), "se": float("nan"), "n": 0}
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) if len(diffs) > 1 else float("nan")
    return {"mean": mean, "se": math.sqrt(var / len(diffs)) if len(diffs) > 1 else float("nan"), "n": len(diffs)}


def summarize(results: list[dict[str, Any]], variants: list[str]) -> dict[str, dict[str, Any]]:
    """Per variant: mean accuracy, divergences, paired differences against standard dropout and against no
    dropout, and the share of standard dropout's gain over no dropout that the variant keeps
    (``(variant - none) / (standard - none)``, from the paired means; None when standard gains nothing)."""
    out: dict[str, dict[str, Any]] = {}
    gain = paired_differences(results, "standard", "none") if "none" in variants and "standard" in variants else None
    for variant in variants:
        mine = [r for r in results if r["run"]["variant"] == variant]
        finite = [r["accuracy"] for r in mine if math.isfinite(r["accuracy"])]
        row: dict[str, Any] = {"mean_accuracy": sum(finite) / len(finite) if finite else float("nan"),
                               "accuracies": [r["accuracy"] for r in mine],
                               "diverged": sum(bool(r["diverged"]) for r in mine), "runs": len(mine)}
        if variant != "standard" and "standard" in variants:
            row["vs_standard"] = paired_differences(results, variant, "standard")
        if gain is not None and variant not in ("none", "standard"):
            row["vs_none"] = paired_differences(results, variant, "none")
            row["share_of_standard_gain"] = (row["vs_none"]["mean"] / gain["mean"]
                                             if gain["n"] and gain["mean"] > 0 else None)
        out[variant] = row
    if gain is not None:
        out["standard"]["vs_none"] = gain
    return out


def summarize_cells(results: list[dict[str, Any]], cells: list[tuple[float, float]],
                    variants: list[str]) -> list[dict[str, Any]]:
    """:func:`summarize` per (p, lr) cell of a stability grid: paired differences stay within a cell."""
    return [{"p": p, "lr": lr, "summary": summarize(
        [r for r in results if (r["run"]["p"], r["run"]["lr"]) == (p, lr)], variants)} for p, lr in cells]


def format_difference(d: dict[str, float] | None, missing: str = "-") -> str:
    """A paired difference in points, ``+mean ± se`` (``+mean`` without a standard error), for tables."""
    if not d or not d.get("n"):
        return missing
    se = d.get("se")
    if se is not None and math.isfinite(se):
        return f"{100 * d['mean']:+.2f} ± {100 * se:.2f}"
    return f"{100 * d['mean']:+.2f}"


__all__ = ["MnistRun", "format_difference", "fxdrop_options", "paired_differences", "run_many", "summarize",
           "summarize_cells", "train_mnist"]

"""``fxdrop demo``: the paper's MNIST MLP trained twice, with standard dropout and with fxdrop, side by side.

The model is ``784 → h → h → h → 10`` with ReLU and Dropout after each hidden layer (Song et al. 2019,
the MNIST MLP experiment). Both runs start from the same weights and see the same data in the same
order; their epochs alternate (standard epoch 1, fxdrop epoch 1, standard epoch 2, ...) so that load
from other processes on a shared machine slows both alike. The result is a rich table (time per epoch,
test accuracy, speedup), ``demo.json`` and ``demo.png`` (test accuracy against training wall-clock time).

This file is also the engine of ``examples/mnist_mlp.py`` (the quality-parity study) and provides the
model for ``fxdrop bench``. Imports torch, rich, fxdrop (convert, data, timing) and, for the plot only,
matplotlib.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .audit_cli import max_dp_arg
from .models import mnist_mlp

DEFAULT_WIDTH = 1024
DEFAULT_EPOCHS = 2
DEFAULT_BATCH = 128
DEFAULT_LR = 0.05
DEFAULT_MOMENTUM = 0.9
EVAL_BATCH = 2000


@dataclass
class DemoConfig:
    """Everything one demo comparison depends on."""

    p: float = 0.5
    pattern: str = "block"
    granularity: str = "rows"  # fxdrop.convert's default: patterns per row class
    width: int = DEFAULT_WIDTH
    epochs: int = DEFAULT_EPOCHS
    batch: int = DEFAULT_BATCH
    seed: int = 0
    lr: float = DEFAULT_LR
    momentum: float = DEFAULT_MOMENTUM
    scale: str = "kept"  # fxdrop.convert's defaults; README "Choosing max_dp and scale" has the measurements
    max_dp: int | str = "auto"
    train_limit: int | None = None  # use only the first N training images (tests, quick looks)

    def check(self) -> None:
        for name in ("width", "epochs", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"p must be a drop rate in [0, 1), got {self.p!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.train_limit is not None and self.train_limit < 1:
            raise ValueError(f"train_limit must be >= 1 or None, got {self.train_limit!r}")


@dataclass
class RunRecord:
    """One model's training: per-epoch training seconds (evaluation excluded), accuracy, loss."""

    name: str
    epoch_seconds: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)

    @property
    def wall_clock(self) -> list[float]:
        """Cumulative training seconds at the end of each epoch."""
        total, out = 0.0, []
        for seconds in self.epoch_seconds:
            total += seconds
            out.append(total)
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "wall_clock": self.wall_clock}


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images: (N, 784)`` classified as ``labels: (N,)``, in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(images), EVAL_BATCH):
        logits = model(images[start:start + EVAL_BATCH])
        correct += int((logits.argmax(dim=1) == labels[start:start + EVAL_BATCH]).sum())
    model.train(was_training)
    return correct / len(images)


class Trainer:
    """One model's training state: its optimizer and its own data-order generator (seeded identically for every model)."""

    def __init__(self, name: str, model: nn.Module, config: DemoConfig, images: torch.Tensor, labels: torch.Tensor):
        self.record = RunRecord(name)
        self.model = model.train()
        self.optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
        self.order = torch.Generator().manual_seed(config.seed)
        self.images, self.labels, self.batch = images, labels, config.batch

    def batches(self) -> int:
        return (len(self.images) + self.batch - 1) // self.batch

    def train_epoch(self, on_step: Callable[[], None] | None = None) -> float:
        """One epoch over a fresh permutation; returns its training seconds."""
        permutation = torch.randperm(len(self.images), generator=self.order)
        total_loss, start = 0.0, time.perf_counter()
        for first in range(0, len(permutation), self.batch):
            index = permutation[first:first + self.batch]
            loss = F.cross_entropy(self.model(self.images[index]), self.labels[index])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total_loss += float(loss.detach()) * len(index)
            if on_step is not None:
                on_step()
        seconds = time.perf_counter() - start
        self.record.epoch_seconds.append(seconds)
        self.record.train_loss.append(total_loss / len(permutation))
        return seconds


def build_pair(config: DemoConfig, convert: Callable[..., nn.Module] | None = None) -> tuple[nn.Module, nn.Module]:
    """The standard-dropout model and its fxdrop conversion, starting from identical weights (separate copies)."""
    if convert is None:
        import fxdrop

        convert = fxdrop.convert
    torch.manual_seed(config.seed)
    standard = mnist_mlp(config.width, config.p)
    converted = convert(copy.deepcopy(standard), p=config.p, pattern=config.pattern, seed=config.seed,
                        scale=config.scale, max_dp=config.max_dp, granularity=config.granularity)
    return standard, converted


def _training_images(config: DemoConfig, data):
    images, labels = data.train_images, data.train_labels
    if config.train_limit is not None:
        images, labels = images[:config.train_limit], labels[:config.train_limit]
    return images, labels


def train_interleaved(models: dict[str, nn.Module], config: DemoConfig, data, *, progress=None) -> list[RunRecord]:
    """Train every model for ``config.epochs``, epochs alternating between models, each with the same data order.

    ``data``: an object with ``train_images, train_labels, test_images, test_labels``. Test accuracy is
    taken after every epoch (outside the timed part). ``progress``: a ``rich.progress.Progress`` or None.
    """
    config.check()
    images, labels = _training_images(config, data)
    trainers = [Trainer(name, model, config, images, labels) for name, model in models.items()]
    tasks = {}
    if progress is not None:
        for trainer in trainers:
            tasks[trainer.record.name] = progress.add_task(trainer.record.name,
                                                           total=config.epochs * trainer.batches())
    # Standard dropout draws its masks from the global RNG; fxdrop's sites have their own generators.
    torch.manual_seed(config.seed)
    for _epoch in range(config.epochs):
        for trainer in trainers:
            task = tasks.get(trainer.record.name)
            on_step = (lambda task=task: progress.advance(task)) if task is not None else None
            seconds = trainer.train_epoch(on_step)
            trainer.record.test_accuracy.append(accuracy(trainer.model, data.test_images, data.test_labels))
            if progress is not None:
                progress.console.log(f"{trainer.record.name}: epoch {_epoch + 1} in {seconds:.1f} s, "
                                     f"test accuracy {100 * trainer.record.test_accuracy[-1]:.2f}%")
    return [trainer.record for trainer in trainers]


def compare(config: DemoConfig, data=None, *, convert: Callable[..., nn.Module] | None = None,
            progress=None) -> dict:
    """Train the standard-dropout model and its fxdrop conversion, epochs alternating; the JSON-ready result.

    ``data``: default :func:`fxdrop.harness.data.load_mnist`. ``convert``: stand-in for :func:`fxdrop.convert` (tests).
    """
    config.check()
    if data is None:
        from .data import load_mnist

        data = load_mnist()
    standard, converted = build_pair(config, convert)
    standard_record, fxdrop_record = train_interleaved(
        {"standard dropout": standard, f"fxdrop ({config.pattern})": converted}, config, data, progress=progress)
    from ..convert import sites
    from .timing import machine_info

    return {
        "config": asdict(config),
        # what the options resolved to (row_classes="auto" depends on p): one entry per converted site
        "fxdrop_sites": [{"name": site.name, "p": site.p, "row_classes": site.row_classes} for site in sites(converted)],
        "model": f"MLP 784-{config.width}-{config.width}-{config.width}-10, ReLU + Dropout({config.p})",
        "train_images": len(_training_images(config, data)[0]), "test_images": len(data.test_images),
        "machine": machine_info(),
        "standard": standard_record.to_dict(),
        "fxdrop": fxdrop_record.to_dict(),
        "speedup": sum(standard_record.epoch_seconds) / sum(fxdrop_record.epoch_seconds),
        "accuracy_difference_points": 100 * (fxdrop_record.test_accuracy[-1] - standard_record.test_accuracy[-1]),
    }


def results_table(result: dict):
    """A rich table: per-epoch seconds and test accuracy of both runs, and the speedup."""
    from rich.table import Table

    config = result["config"]
    table = Table(title=f"{result['model']}; fxdrop pattern={config['pattern']}, scale={config['scale']}, "
                        f"max_dp={config.get('max_dp', 8)}; "
                        f"batch {config['batch']}, seed {config['seed']}")
    table.add_column("epoch", justify="right")
    for side in ("standard", "fxdrop"):
        table.add_column(f"{result[side]['name']} s", justify="right")
        table.add_column("test acc", justify="right")
    table.add_column("speedup", justify="right")
    standard, converted = result["standard"], result["fxdrop"]
    for i, (s_sec, f_sec) in enumerate(zip(standard["epoch_seconds"], converted["epoch_seconds"])):
        table.add_row(str(i + 1), f"{s_sec:.1f}", f"{100 * standard['test_accuracy'][i]:.2f}%",
                      f"{f_sec:.1f}", f"{100 * converted['test_accuracy'][i]:.2f}%", f"{s_sec / f_sec:.2f}x")
    table.add_row("total", f"{sum(standard['epoch_seconds']):.1f}", "", f"{sum(converted['epoch_seconds']):.1f}", "",
                  f"{result['speedup']:.2f}x", style="bold")
    return table


def plot_accuracy(result: dict, path: Path) -> Path | None:
    """PNG of test accuracy against training wall-clock time for both runs; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(6, 4))
    for side, marker in (("standard", "o"), ("fxdrop", "s")):
        run = result[side]
        axes.plot([0.0] + run["wall_clock"], [None] + [100 * a for a in run["test_accuracy"]], marker=marker,
                  label=run["name"])
    axes.set_xlabel("training wall-clock time (s)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(f"{result['model']}\nspeedup {result['speedup']:.2f}x", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ---------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--p", type=float, default=0.5, help="drop rate of every dropout (default 0.5)")
    parser.add_argument("--pattern", choices=("row", "block"), default="block",
                        help="fxdrop pattern family (default block: contiguous kept units, no gathers)")
    parser.add_argument("--granularity", choices=("rows", "forward"), default="rows",
                        help="patterns per row class (default, as fxdrop.convert) or one per forward (the paper's)")
    parser.add_argument("--scale", choices=("kept", "rate"), default="kept",
                        help="scale of kept units: n/kept (default) or 1/(1-p)")
    parser.add_argument("--max-dp", type=max_dp_arg, default="auto",
                        help="largest pattern period, or auto (default: the tightest that reaches p)")
    parser.add_argument("--width", type=int, default=DEFAULT_WIDTH, help=f"hidden width h (default {DEFAULT_WIDTH})")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"epochs (default {DEFAULT_EPOCHS})")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help=f"batch size (default {DEFAULT_BATCH})")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"SGD learning rate (default {DEFAULT_LR}, "
                                                                      f"momentum {DEFAULT_MOMENTUM})")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, data order and patterns (default 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice; on a machine shared with other busy "
                             "processes, --threads 1 avoids OpenMP oversubscription, which can cost 10x)")
    parser.add_argument("--train-limit", type=int, default=None, help="train on the first N images only")
    parser.add_argument("--out", type=Path, default=Path("demo-results"),
                        help="output folder for demo.json and demo.png (default ./demo-results)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .data import DatasetError, load_mnist

    console = Console()
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    config = DemoConfig(p=args.p, pattern=args.pattern, granularity=args.granularity, width=args.width, epochs=args.epochs, batch=args.batch,
                        seed=args.seed, lr=args.lr, scale=args.scale, max_dp=args.max_dp,
                        train_limit=args.train_limit)
    try:
        config.check()
        data = load_mnist()
    except (ValueError, DatasetError) as error:
        console.print(f"[red]fxdrop demo: {error}")
        return 2
    console.print(f"MNIST: {len(data.train_images):,} training / {len(data.test_images):,} test images; "
                  f"MLP 784-{config.width}-{config.width}-{config.width}-10, p={config.p}, "
                  f"{torch.get_num_threads()} threads")
    columns = (TextColumn("{task.description:>24}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        result = compare(config, data, progress=progress)
    console.print(results_table(result))
    for side in ("standard", "fxdrop"):
        if any(loss != loss for loss in result[side]["train_loss"]):  # NaN
            console.print(f"[yellow]{result[side]['name']} diverged (NaN loss): try a smaller --lr")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "demo.json"
    json_path.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {json_path}")
    png = plot_accuracy(result, args.out / "demo.png")
    if png is None:
        console.print("matplotlib is not installed: skipped the plot (pip install matplotlib, or the dev extra)")
    else:
        console.print(f"wrote {png}")
    return 0

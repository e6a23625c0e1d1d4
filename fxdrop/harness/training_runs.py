"""Speed as a training run sees it: blocks of consecutive optimizer steps, each side in its own process.

A *block* is one process that builds a model (the same weights for both sides), its optimizer and a
fixed batch, runs ``warmup`` steps, then times ``steps`` consecutive steps (zero_grad with PyTorch's
default ``set_to_none=True``, forward, loss, backward, optimizer step) and reports the mean step time,
the time of each phase, and its peak memory: the rise of the process's peak resident set over the
warm-up and timed steps (Linux ``clear_refs``/``VmHWM``: everything the steps hold at once, whatever
allocated it, fxdrop's resident gradient pool included), and the profiler's peak of one more step. The standard and the converted model
alternate block by block (ABBA order over ``repeats`` rounds), so slow drift of a shared machine hits
both alike; the figure is the median over rounds of standard time / fxdrop time, with every round's
ratio recorded. Nothing here is a test: ``benchmarks/training_runs.py`` drives it and writes result
files, and it warns when a rerun of a published row moves by more than 15%.

Workloads: the paper's MNIST MLP (:func:`fxdrop.harness.models.mnist_mlp`, batch 256, random images:
the cost does not depend on the pixels), the fused chain op alone (``chain``: ``Linear(h, h) -> ReLU ->
Dropout -> Linear(h, h)``, batch 256, mean squared error against a fixed random target: the smallest model
that is one ``fxdrop::chain`` call) and the PTB word LM (:class:`fxdrop.harness.models.WordLM`,
BPTT 35, batch 20, random token ids, gradient norm clipped at 5 as Zaremba et al. do). Optimizers:
``sgd`` (plain), ``momentum`` (SGD, 0.9) and ``adamw`` (PyTorch's default implementation). ``compile``:
``eager`` (both sides as they are), ``inductor`` (``torch.compile(standard)`` against
``torch.compile(fxdrop.convert(standard), fullgraph=True)``) or ``backend`` (``torch.compile(standard)``
against ``torch.compile(standard, backend=fxdrop.backend.make_backend(...))`` with the row's convert options);
compilation happens in the warm-up steps, outside the timed ones. ``kernels``: ``compiled`` (fxdrop's C++
kernels, csrc/) or ``composite`` (the fxdrop block runs with ``FXDROP_NO_EXT=1``: the composite PyTorch
kernels); each fxdrop block records which ones it ran.

Imports torch, fxdrop and the harness's models and timing records.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..roofline import OPTIMIZERS as ROOFLINE_OPTIMIZERS

OPTIMIZERS = tuple(name for name in ROOFLINE_OPTIMIZERS if name)  # the names make_optimizer knows
DRIFT = 0.15  # a rerun that moves a published figure by more than this is not a figure yet
COMPILE_MODES = ("eager", "inductor", "backend")
KERNELS = ("compiled", "composite")
MODELS = ("mlp", "chain", "ptb")
RUN_OPTIONS = ("reshuffle",)  # variant options the training run applies itself, not fxdrop.convert


@dataclass(frozen=True)
class Workload:
    """One row of a benchmark: the model, its size, the rate, the optimizer and the fxdrop options."""

    model: str = "mlp"  # one of MODELS
    width: int = 4096
    p: float = 0.5
    optimizer: str = "momentum"
    batch: int = 256
    convert: tuple = ()  # fxdrop.convert options as (key, value) pairs; () is the standard model
    steps: int = 20
    warmup: int = 3
    threads: int | None = None
    retain_freed_memory: bool = False
    seed: int = 0
    compile: str = "eager"  # one of COMPILE_MODES
    kernels: str = "compiled"  # one of KERNELS: the fxdrop side's kernels

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"Workload.compile={self.compile!r}; expected one of {', '.join(COMPILE_MODES)}")
        if self.kernels not in KERNELS:
            raise ValueError(f"Workload.kernels={self.kernels!r}; expected one of {', '.join(KERNELS)}")
        if self.model not in MODELS:
            raise ValueError(f"Workload.model={self.model!r}; expected one of {', '.join(MODELS)}")

    def options(self) -> dict[str, Any]:
        """The fxdrop.convert options (the variant's options less :data:`RUN_OPTIONS`)."""
        return {k: v for k, v in self.convert if k not in RUN_OPTIONS}

    def reshuffle(self) -> int | None:
        """``reshuffle=K``: :func:`fxdrop.reshuffle` with the block's optimizer, every ``K`` steps."""
        return dict(self.convert).get("reshuffle")

    @classmethod
    def from_row(cls, row: dict) -> "Workload":
        """The workload of a row of a results file (``convert`` back as a sorted tuple; fields an older
        file lacks take their defaults here, and nowhere else)."""
        w = row["workload"]
        return cls(**{**w, "convert": tuple(sorted(w["convert"].items()))})

    def modes(self) -> list[str]:
        """The execution modes that differ from the default (eager, compiled kernels), as ``key=value``."""
        return ([] if self.compile == "eager" else [f"compile={self.compile}"]) + \
            ([] if self.kernels == "compiled" else [f"kernels={self.kernels}"])

    def describe(self) -> str:
        """The workload without its fxdrop options: model, width, rate, optimizer and modes."""
        return " ".join([f"{self.model} h={self.width} p={self.p} {self.optimizer}", *self.modes()])

    def label(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.convert) or "standard"
        return f"{self.describe()} [{options}]"


def option_value(text: str) -> int | str:
    """A convert option's value as written on a command line (``row_classes=8``, ``scale=rate``): digits
    are an int, anything else stays a string. ``fxdrop bench --variant`` and the quality variants read
    their options with it."""
    return int(text) if text.isdigit() else text


def counted(text: str, stem: str) -> int | None:
    """``K`` of a name written ``<stem><K>`` with ``K`` an int >= 1 (``shuffled16``, ``classes8``), else None:
    how the mask references and the PTB mask study write a count into a name."""
    tail = text[len(stem):] if text.startswith(stem) else ""
    return int(tail) if tail.isdigit() and int(tail) >= 1 else None


# ---------------------------------------------------------------- one block (in its own process)


def _optimizer(name: str, params, model: str):
    """The block's optimizer (:func:`fxdrop.roofline.make_optimizer`): SGD at lr 1.0 for the PTB LM (Zaremba
    et al.), 0.01 for the MLP; AdamW at 1e-3."""
    from ..roofline import make_optimizer

    return make_optimizer(name, params, 1e-3 if name == "adamw" else 1.0 if model == "ptb" else 0.01)


def _build(workload: Workload, converted: bool):
    from .models import WordLM, mnist_mlp

    torch.manual_seed(workload.seed)
    if workload.model == "mlp":
        model = mnist_mlp(workload.width, workload.p)
        inputs = (torch.rand(workload.batch, 784),)
        target = torch.randint(0, 10, (workload.batch,))

        def loss_of(out):
            return F.cross_entropy(out, target)
    elif workload.model == "chain":
        width = workload.width
        model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Dropout(workload.p), nn.Linear(width, width))
        inputs = (torch.rand(workload.batch, width),)
        target = torch.randn(workload.batch, width)

        def loss_of(out):
            return F.mse_loss(out, target)
    else:  # "ptb" (Workload checks the name)
        vocab, bptt = 10_000, 35
        model = WordLM(vocab, workload.width, 2, workload.p)
        tokens = torch.randint(0, vocab, (bptt + 1, workload.batch))
        inputs = (tokens[:-1],)
        target = tokens[1:].reshape(-1)

        def loss_of(out):
            logits, _ = out
            return F.cross_entropy(logits.view(-1, vocab), target) * bptt
    model.train()
    if converted and workload.compile == "backend":
        from ..backend import make_backend

        return torch.compile(model, backend=make_backend(seed=workload.seed, **workload.options())), inputs, loss_of
    if converted:
        import fxdrop

        model = fxdrop.convert(model, seed=workload.seed, example_inputs=inputs, **workload.options()).train()
    if workload.compile != "eager":
        model = torch.compile(model, fullgraph=converted)
    return model, inputs, loss_of


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> int | None:
    """Reset the process's peak resident set to its current one (Linux >= 4.0); the current one, bytes."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        return None
    rss = _status_kib("VmRSS")
    return None if rss is None else rss * 1024


def run_block(workload: Workload, converted: bool) -> dict[str, Any]:
    """Time ``workload.steps`` consecutive training steps after ``warmup``; this process's figures."""
    from .timing import machine_info, peak_step_memory

    if workload.threads:
        torch.set_num_threads(workload.threads)
    if workload.retain_freed_memory:
        from .. import allocator

        allocator.retain_freed_memory()
    model, inputs, loss_of = _build(workload, converted)
    optimizer = _optimizer(workload.optimizer, model.parameters(), workload.model)
    if converted and workload.reshuffle() is not None:
        from ..reshuffle import reshuffle

        reshuffle(model, optimizer, every=workload.reshuffle(), seed=workload.seed)
    clip = workload.model == "ptb"
    phases = {"zero_grad": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    def step(record: bool) -> None:
        t0 = time.perf_counter()
        optimizer.zero_grad()
        t1 = time.perf_counter()
        loss = loss_of(model(*inputs))
        t2 = time.perf_counter()
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        t3 = time.perf_counter()
        optimizer.step()
        t4 = time.perf_counter()
        if record:
            for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[name] += seconds

    rss_before = _reset_peak_rss()
    for _ in range(workload.warmup):
        step(False)
    start = time.perf_counter()
    for _ in range(workload.steps):
        step(True)
    elapsed = time.perf_counter() - start
    hwm = _status_kib("VmHWM")
    peak_rss = None if rss_before is None or hwm is None else hwm * 1024 - rss_before
    peak = peak_step_memory(lambda: step(False))
    result = {"ms_per_step": 1e3 * elapsed / workload.steps,
              "phases_ms": {k: 1e3 * v / workload.steps for k, v in phases.items()},
              "peak_rss_bytes": peak_rss, "peak_bytes": peak, "machine": machine_info()}
    if converted:
        from ..ops import extension

        result["kernels_ran"] = extension.ensure_loaded() or "composite"
    return result


def _worker(payload: str) -> int:
    data = json.loads(payload)
    workload = Workload(**{**data["workload"], "convert": tuple(tuple(kv) for kv in data["workload"]["convert"])})
    print(json.dumps(run_block(workload, data["converted"])))
    return 0


def block_in_process(workload: Workload, converted: bool, timeout: float = 1800) -> dict[str, Any]:
    """:func:`run_block` in a fresh interpreter (its own allocator, caches and threads)."""
    payload = json.dumps({"workload": asdict(workload), "converted": converted})
    env = {**os.environ}
    if converted and workload.kernels == "composite":
        env["FXDROP_NO_EXT"] = "1"
    result = subprocess.run([sys.executable, "-m", "fxdrop.harness.training_runs", "--worker", payload],
                            capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark block failed ({workload.label()}, converted={converted}):\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- a row


@dataclass
class Row:
    workload: dict
    standard_ms: list[float] = field(default_factory=list)
    fxdrop_ms: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    standard_phases_ms: dict = field(default_factory=dict)
    fxdrop_phases_ms: dict = field(default_factory=dict)
    standard_peak_rss_bytes: int | None = None  # the rise of peak resident memory over the steps
    fxdrop_peak_rss_bytes: int | None = None
    standard_peak_bytes: int = 0  # the profiler's peak of one step (misses fxdrop's resident pool)
    fxdrop_peak_bytes: int = 0
    ideal_flops: float | None = None
    ideal_roofline: float | None = None
    fxdrop_kernels_ran: list[str] = field(default_factory=list)  # each fxdrop block's kernels

    @property
    def speedup(self) -> float:
        return statistics.median(self.ratios)


def _median_phases(blocks: list[dict]) -> dict:
    return {k: statistics.median(b["phases_ms"][k] for b in blocks) for k in blocks[0]["phases_ms"]}


def measure(workload: Workload, *, repeats: int = 3, progress=None) -> tuple[Row, dict]:
    """Alternating blocks (ABBA), ``repeats`` rounds: the row and the machine record of its last block."""
    standard = Workload(**{**asdict(workload), "convert": (), "kernels": "compiled"})
    row = Row(workload={**asdict(workload), "convert": dict(workload.convert)})
    blocks = {"standard": [], "fxdrop": []}
    for round_ in range(repeats):
        order = (("standard", standard, False), ("fxdrop", workload, True))
        for name, load, converted in (order if round_ % 2 == 0 else order[::-1]):
            blocks[name].append(block_in_process(load, converted))
            if converted:
                row.fxdrop_kernels_ran.append(blocks[name][-1]["kernels_ran"])
            if progress is not None:
                progress()
        row.standard_ms.append(blocks["standard"][-1]["ms_per_step"])
        row.fxdrop_ms.append(blocks["fxdrop"][-1]["ms_per_step"])
        row.ratios.append(row.standard_ms[-1] / row.fxdrop_ms[-1])
    row.standard_phases_ms = _median_phases(blocks["standard"])
    row.fxdrop_phases_ms = _median_phases(blocks["fxdrop"])
    for name in ("standard", "fxdrop"):
        values = [b["peak_rss_bytes"] for b in blocks[name] if b.get("peak_rss_bytes") is not None]
        setattr(row, f"{name}_peak_rss_bytes", int(statistics.median(values)) if values else None)
    row.standard_peak_bytes = int(statistics.median(b["peak_bytes"] for b in blocks["standard"]))
    row.fxdrop_peak_bytes = int(statistics.median(b["peak_bytes"] for b in blocks["fxdrop"]))
    return row, blocks["fxdrop"][-1]["machine"]


def drift(published: dict, rerun: Row) -> float:
    """Relative move of a rerun's speedup against the published row's."""
    before = statistics.median(published["ratios"])
    return abs(rerun.speedup / before - 1.0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return _worker(argv[1])
    print("fxdrop.harness.training_runs is driven by benchmarks/training_runs.py", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

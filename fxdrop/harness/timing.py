"""Measuring a training step fairly: interleaved paired timing, peak step memory, and the machine record.

Every fxdrop speed figure is a *median of paired ratios*: turns of the baseline and the candidate
alternate (ABBA order, so neither always runs first; each turn is two steps of which the second is
timed, so a timed step always follows a step of its own kind), each pair gives
``baseline_time / candidate_time``, and the figure is the median of those ratios. Load from other processes on a shared machine then hits both
sides of a pair alike and drops out of the ratio; warm-up steps are run and discarded first.

Peak memory of a step is read from ``torch.profiler`` with ``profile_memory=True``: the CPU allocator
reports every allocation and free to the profiler, and the running sum of those events, in time order,
peaks at the largest amount of memory the step held on top of what existed when it started (parameters
and optimizer state are therefore excluded; activations saved for backward, gradients allocated during
the step and temporaries are included). This works for CPU tensors, where ``torch.cuda.max_memory_allocated``
has no counterpart.

Used by ``fxdrop bench``, the demo and the scripts under ``benchmarks/``. Imports torch and the standard library.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import allocator


@dataclass
class PairedTiming:
    """Seconds per call of ``baseline`` and ``candidate``, one entry per interleaved pair."""

    baseline_s: list[float] = field(default_factory=list)
    candidate_s: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        """``baseline / candidate`` per pair: above 1 means the candidate was faster."""
        return [b / c for b, c in zip(self.baseline_s, self.candidate_s)]

    @property
    def speedup(self) -> float:
        """The median of the paired ratios."""
        return statistics.median(self.ratios)

    @property
    def total_ratio(self) -> float:
        """Total baseline time over total candidate time: the wall-clock speedup of a training run.

        When the candidate's work varies from step to step (fxdrop draws a pattern per step, and a step
        with dp = 1 does all the work), the median of per-step ratios overstates this (Jensen): compare
        the FLOP ideal, an expectation, with this figure.
        """
        return sum(self.baseline_s) / sum(self.candidate_s)

    @property
    def baseline_median_s(self) -> float:
        return statistics.median(self.baseline_s)

    @property
    def candidate_median_s(self) -> float:
        return statistics.median(self.candidate_s)

    def to_dict(self) -> dict:
        return {"speedup": self.speedup, "total_ratio": self.total_ratio, "baseline_median_s": self.baseline_median_s,
                "candidate_median_s": self.candidate_median_s, "ratios": self.ratios,
                "baseline_s": self.baseline_s, "candidate_s": self.candidate_s}


def paired_timing(baseline: Callable[[], object], candidate: Callable[[], object], *, pairs: int,
                  warmup: int = 2, steps_per_turn: int = 2,
                  on_pair: Callable[[int], None] | None = None) -> PairedTiming:
    """Time ``pairs`` interleaved turns of each function after ``warmup`` untimed turns of each.

    A turn is ``steps_per_turn`` consecutive calls of one function, and only its last call is timed, so
    every timed call follows a call of the same function, as in a real training loop. Timing a call
    right after the other function's call measures the switch as well: large tensors freed by one and
    allocated again by the other (page faults, cache state) made ratios alternate by a factor of 2-4
    between orders on a 2-core CPU. Turns alternate the order (baseline first, then candidate first).
    ``on_pair(i)`` is called after each pair (progress bars).
    """
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1:
        raise ValueError(f"pairs must be an int >= 1, got {pairs!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if isinstance(steps_per_turn, bool) or not isinstance(steps_per_turn, int) or steps_per_turn < 1:
        raise ValueError(f"steps_per_turn must be an int >= 1, got {steps_per_turn!r}")

    def turn(fn: Callable[[], object]) -> float:
        for _ in range(steps_per_turn - 1):
            fn()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    for _ in range(warmup):
        turn(baseline)
        turn(candidate)
    timing = PairedTiming()
    for i in range(pairs):
        seconds = {}
        order = (("baseline", baseline), ("candidate", candidate))
        for name, fn in order if i % 2 == 0 else order[::-1]:
            seconds[name] = turn(fn)
        timing.baseline_s.append(seconds["baseline"])
        timing.candidate_s.append(seconds["candidate"])
        if on_pair is not None:
            on_pair(i)
    return timing


def peak_step_memory(step: Callable[[], object]) -> int:
    """Bytes: the largest rise of allocated memory during one call of ``step``.

    Read from the allocation and free events that the CPU allocator reports to ``torch.profiler``:
    the running sum of those events, in time order, minus its lowest value before that point. Taking the
    rise from the lowest point (not from the start) matters because frees of tensors from an earlier
    step (e.g. gradients released by ``zero_grad(set_to_none=True)``) are reported with their size when
    the profiler saw them allocated, and without it otherwise; the rise counts every tensor the step
    itself allocates and holds at once either way. Run ``step`` once before, so lazily created state
    (optimizer buffers, caches) does not count.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # device_type() is a c10 DeviceType enum; select CPU events by its name.
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    events.sort(key=lambda e: e.start_ns())
    live = lowest = rise = 0
    for event in events:
        live += event.nbytes()
        lowest = min(lowest, live)
        rise = max(rise, live - lowest)
    return rise


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _allocator() -> str:
    """The C allocator the process runs on: a preloaded one (jemalloc, tcmalloc) or the C library's."""
    preload = os.environ.get("LD_PRELOAD", "").strip()
    if preload:
        return f"LD_PRELOAD={preload}"
    name, version = platform.libc_ver()
    tunables = os.environ.get("GLIBC_TUNABLES")
    return f"{name or 'libc'} {version} malloc" + (f" (GLIBC_TUNABLES={tunables})" if tunables else "")


def machine_info() -> dict:
    """What a benchmark figure depends on: platform, CPU, cores, threads, versions, and the load when measured."""
    import fxdrop

    try:
        backend = fxdrop.backend_info()
    except Exception as error:  # a benchmark record must not fail because the extension is unavailable
        backend = f"unavailable: {error}"
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "fxdrop": fxdrop.__version__,
        "fxdrop_backend": backend if isinstance(backend, (str, int, float, dict, list)) else repr(backend),
        "allocator": _allocator(),
        "retain_freed_memory": allocator.retained(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

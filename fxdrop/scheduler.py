"""PatternScheduler: draws one ``Pattern(dp, offset)`` per training step from a searched distribution.

The random stream is counter based: draw number ``k`` is a pure function of ``(seed, k)``
(SplitMix64). That gives what a stateful generator would, and three things it would not:
a draw never touches the global RNG; the state is two integers, so a resumed run continues the
identical sequence; and the state lives in one small int64 tensor that the ``fxdrop::sample_pattern``
op mutates, so ``torch.compile`` sees a custom op instead of Python RNG calls and never
specialises on the drawn values. Imports torch, patterns and search.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

from .patterns import Pattern
from .search import PatternDistribution, search_distribution

_MASK64 = (1 << 64) - 1
_SEED_BITS = 62


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _uniforms(seed: int, counter: int) -> tuple[float, float]:
    """Two independent uniforms in [0, 1) for draw ``counter`` of stream ``seed``."""
    a = _splitmix64(_splitmix64(seed) ^ (2 * counter))
    b = _splitmix64(_splitmix64(seed) ^ (2 * counter + 1))
    return (a >> 11) / 2.0**53, (b >> 11) / 2.0**53


def draw(seed: int, counter: int, cdf: list[float]) -> Pattern:
    """Draw number ``counter`` of stream ``seed`` from the distribution with cumulative ``cdf``."""
    u_dp, u_offset = _uniforms(seed, counter)
    dp = min(bisect.bisect_right(cdf, u_dp * cdf[-1]), len(cdf) - 1) + 1
    return Pattern(dp, min(int(u_offset * dp), dp - 1))


def support(max_dp: int) -> list[Pattern]:
    """Every pattern of periods ``1 .. max_dp``, in row-plan order: dp ascending, then offset."""
    return [Pattern(dp, offset) for dp in range(1, max_dp + 1) for offset in range(dp)]


# Row classes per site per forward with granularity="rows": row r of the input flattened to 2-D
# uses class r mod ROW_CLASSES. Each class is one more pass of shrunken GEMMs over the weight, so
# this is the cost knob: on the PTB step (2 x 650, p = 0.5, block, retain_freed_memory) 2 classes
# gave 1.54x against 1.43x for 3 (benchmarks/lstm.py, 30 pairs). For a (time, batch) input with an
# even batch a class is every other sequence of the batch; that was enough for PTB quality (README).
ROW_CLASSES = 2


def draw_classes(seed: int, counter: int, probs: list[float], classes: int) -> list[Pattern]:
    """Row-class plan number ``counter`` of stream ``seed``: one pattern per class ``0 .. classes-1``.

    The ``M = classes`` patterns are the distribution's quantiles ``(u + j) / M`` over :func:`support`
    (``(dp, offset)`` has mass ``probs[dp - 1] / dp``), ``u`` uniform: systematic sampling, so a step's
    classes spread over the distribution (with ``probs = [0, 1]``, dp = 2 only, half the rows keep the
    even units and half the odd ones). Quantile ``j`` goes to class ``(j + s) mod M``, ``s`` a uniform
    rotation, so every class, and with it every row, takes quantile ``j`` with probability 1/M and uses
    ``(dp, offset)`` with probability exactly its mass: it drops every unit with probability exactly
    the distribution's rate. When every class draws the same pattern (likely where one pattern has a
    large mass: dp = 1 at p = 0.3 fills both quantiles of a two-class plan 14% of the time), the chain
    op runs all rows as one.
    """
    patterns = support(len(probs))
    total = sum(probs)
    mass = [probs[pat.dp - 1] / (total * pat.dp) for pat in patterns]
    u, u_shift = _uniforms(seed, counter)
    shift = min(int(u_shift * classes), classes - 1)
    plan: list[Pattern | None] = [None] * classes
    for j in range(classes):
        target = (u + j) / classes
        acc, chosen = 0.0, None
        for pattern, m in zip(patterns, mass):
            acc += m
            if m > 0 and target < acc:
                chosen = pattern
                break
        if chosen is None:  # rounding at the top end: the last pattern with mass
            chosen = next(pat for pat, m in zip(reversed(patterns), reversed(mass)) if m > 0)
        plan[(j + shift) % classes] = chosen
    return plan


def derive_seed(base: int, *salt: int) -> int:
    """A seed for a sub-stream (a site, a rank) derived from a base seed."""
    z = int(base) & _MASK64
    for s in salt:
        z = _splitmix64(z ^ _splitmix64(int(s) & _MASK64))
    return z & ((1 << _SEED_BITS) - 1)


class PatternScheduler:
    """Samples ``dp ~ P`` and ``offset ~ U[0, dp)``; same seed, same sequence.

    ``state`` is an int64 tensor ``[seed, draws, count(dp=1), ..., count(dp=max_dp)]``; it stays
    on the CPU whatever device the model is on.
    """

    def __init__(self, distribution: PatternDistribution | float, seed: int | None = None,
                 max_dp: int | str = "auto"):
        if not isinstance(distribution, PatternDistribution):
            distribution = search_distribution(distribution, max_dp=max_dp)
        self.distribution = distribution
        if seed is None:
            # Drawn once from the global RNG so torch.manual_seed makes conversion reproducible;
            # the draws themselves never touch it.
            seed = int(torch.randint(0, 2**_SEED_BITS, (), dtype=torch.int64))
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.cdf = torch.cumsum(distribution.probs, 0)
        self._cdf_list = self.cdf.tolist()
        self._probs_list = distribution.probs.tolist()
        self.state = torch.zeros(2 + distribution.max_dp, dtype=torch.int64)
        self.state[0] = seed & ((1 << _SEED_BITS) - 1)

    @property
    def seed(self) -> int:
        return int(self.state[0])

    @property
    def draws(self) -> int:
        """How many patterns have been drawn."""
        return int(self.state[1])

    @property
    def counts(self) -> torch.Tensor:
        """``counts[k]``: how many draws had ``dp = k + 1`` (for row-class plans: how many rows)."""
        return self.state[2:].clone()

    @property
    def last_pattern(self) -> Pattern | None:
        if self.draws == 0:
            return None
        return draw(self.seed, self.draws - 1, self._cdf_list)

    def peek(self, ahead: int = 0) -> Pattern:
        """The pattern that draw ``draws + ahead`` will return, without drawing it."""
        return draw(self.seed, self.draws + ahead, self._cdf_list)

    def sample(self) -> Pattern:
        pattern = draw(self.seed, self.draws, self._cdf_list)
        self.state[1] += 1
        self.state[2 + pattern.dp - 1] += 1
        return pattern

    def sample_classes(self, rows: int, classes: int) -> list[Pattern]:
        """Draw a row-class plan (:func:`draw_classes`) for ``rows`` rows; advances the stream by one draw."""
        plan = draw_classes(self.seed, self.draws, self._probs_list, classes)
        self._count_classes(self.state, plan, rows)
        return plan

    @staticmethod
    def _count_classes(state: torch.Tensor, plan: list[Pattern], rows: int) -> None:
        state[1] += 1
        for c, pattern in enumerate(plan):
            state[2 + pattern.dp - 1] += len(range(c, rows, len(plan)))

    def sample_tensor(self) -> torch.Tensor:
        """Draw through the ``fxdrop::sample_pattern`` op: ``int64 (2,) = [dp, offset]`` on the CPU."""
        return torch.ops.fxdrop.sample_pattern(self.state, self.cdf)

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state.clone(), "probs": self.distribution.probs.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        probs = state.get("probs")
        if probs is None or "state" not in state:
            raise KeyError("PatternScheduler.load_state_dict expects keys 'state' and 'probs'")
        if probs.shape != self.distribution.probs.shape or not torch.allclose(
                probs.to(torch.float64), self.distribution.probs, atol=1e-12):
            raise ValueError("PatternScheduler.load_state_dict: the saved distribution differs from this "
                             f"scheduler's (saved {probs.tolist()}, have {self.distribution.probs.tolist()})")
        self.state.copy_(state["state"])

    def __repr__(self) -> str:
        return (f"PatternScheduler(p={self.distribution.p}, max_dp={self.distribution.max_dp}, "
                f"seed={self.seed}, draws={self.draws})")

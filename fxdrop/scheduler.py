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


ROW_GROUPS = 4  # row groups per site per forward with granularity="rows"


def merged_row_plan_size(sites: int) -> int:
    """Pieces of ``sites`` merged row plans (:func:`merge_row_plans`): fixed, so compiled graphs know it."""
    return sites * ROW_GROUPS - sites + 1


def draw_rows(seed: int, counter: int, probs: list[float], rows: int) -> list[tuple[Pattern, int]]:
    """Row plan number ``counter`` of stream ``seed``: ``ROW_GROUPS`` pieces ``(pattern, count)``.

    The rows are cut into ``K = ROW_GROUPS`` contiguous groups of ``rows // K`` or one more (which
    groups get the extra rows is random), and group ``j`` uses the pattern at quantile ``(u + j) / K``
    of the distribution over :func:`support` (``(dp, offset)`` has mass ``probs[dp - 1] / dp``), ``u``
    uniform: systematic sampling, so a step's groups spread over the distribution (at p = 0.5 with
    ``max_dp="auto"``, half the rows keep the even units and half the odd ones). Consecutive groups
    with the same pattern are merged (the plan is padded with empty pieces). Group ``j``'s pattern
    depends on ``j``, so the plan is for rows in a random order (:func:`row_order`; ``fxdrop::sample_rows``
    permutes them): a row then lands in each group with probability 1/K (in expectation over the
    group sizes) and uses ``(dp, offset)`` with probability exactly its mass, so it drops every unit
    with probability exactly the distribution's rate.
    """
    patterns = support(len(probs))
    total = sum(probs)
    mass = [probs[pat.dp - 1] / (total * pat.dp) for pat in patterns]
    u, u_extra = _uniforms(seed, counter)
    k = ROW_GROUPS
    base, extra = divmod(rows, k)
    first_extra = min(int(u_extra * k), k - 1)
    plan: list[tuple[Pattern, int]] = []
    for j in range(k):
        target = (u + j) / k
        acc, chosen = 0.0, None
        for pattern, m in zip(patterns, mass):
            acc += m
            if m > 0 and target < acc:
                chosen = pattern
                break
        if chosen is None:  # rounding at the top end: the last pattern with mass
            chosen = next(pat for pat, m in zip(reversed(patterns), reversed(mass)) if m > 0)
        count = base + int((j - first_extra) % k < extra)
        if plan and plan[-1][0] == chosen:
            plan[-1] = (chosen, plan[-1][1] + count)
        else:
            plan.append((chosen, count))
    return plan + [(Pattern(1, 0), 0)] * (k - len(plan))


def row_order(seed: int, counter: int, rows: int) -> torch.Tensor:
    """The random row order that goes with row plan ``counter`` of stream ``seed`` (int64 permutation)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, counter, 0x0D0E))
    return torch.randperm(rows, generator=generator)


def merge_row_plans(plans: list[list[tuple[Pattern, int]]]) -> list[tuple[tuple[Pattern, ...], int]]:
    """Several sites' row plans over the same rows as one: pieces ``(pattern per site, count)``.

    Every boundary of every plan is a boundary of the merge; the result is padded with empty pieces
    to ``sum(len(plan)) - len(plans) + 1`` pieces, a number that does not depend on the draws.
    """
    size = sum(len(plan) for plan in plans) - len(plans) + 1
    cursors = [[0, plan[0][1]] for plan in plans]  # [piece index, rows left in it]
    merged: list[tuple[tuple[Pattern, ...], int]] = []
    while True:
        for cursor, plan in zip(cursors, plans):
            while cursor[1] == 0 and cursor[0] + 1 < len(plan):
                cursor[0] += 1
                cursor[1] = plan[cursor[0]][1]
        step = min(cursor[1] for cursor in cursors)
        if step == 0:
            break
        merged.append((tuple(plan[cursor[0]][0] for cursor, plan in zip(cursors, plans)), step))
        for cursor in cursors:
            cursor[1] -= step
    filler = tuple(Pattern(1, 0) for _ in plans)
    return merged + [(filler, 0)] * (size - len(merged))


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
        """``counts[k]``: how many draws had ``dp = k + 1`` (for row plans: how many rows)."""
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

    def sample_rows(self, rows: int) -> list[tuple[Pattern, int]]:
        """Draw a row plan for ``rows`` rows (see :func:`draw_rows`); advances the stream by one draw."""
        plan = draw_rows(self.seed, self.draws, self._probs_list, rows)
        self._count_rows(self.state, plan)
        return plan

    @staticmethod
    def _count_rows(state: torch.Tensor, plan: list[tuple[Pattern, int]]) -> None:
        state[1] += 1
        for pattern, count in plan:
            state[2 + pattern.dp - 1] += count

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

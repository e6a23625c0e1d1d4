"""The distribution over ``dp`` whose expected drop rate equals the target ``p``.

A pattern with period ``dp`` drops ``(dp - 1) / dp`` of the units, so a distribution ``P`` over
``dp = 1 .. max_dp`` drops ``rate(P) = sum_dp P(dp) (dp - 1) / dp`` in expectation; with the offset
uniform, every unit is dropped with probability exactly ``rate(P)``.

Three methods: ``exact`` (maximum entropy subject to ``rate == p``: a Gibbs distribution found by
1-D root finding), ``sgd`` (the paper's search) and ``narrow`` (the least spread: ``dp`` only on the two
periods next to ``1 / (1 - p)``, so no step keeps much more or much less than ``1 - p`` of the units).
Imports only torch and math.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

# The largest period a site may draw. Each pattern period is an entry of the site's distribution (and of
# the row-class draw), so this bounds their size; it reaches p = 1 - 1/1024 (about 0.999).
MAX_DP = 1024


@dataclass(frozen=True)
class PatternDistribution:
    """``probs[k] = P(dp = k + 1)`` (float64), with its drop rate and entropy (nats)."""

    probs: torch.Tensor
    p: float
    method: str

    @property
    def max_dp(self) -> int:
        return self.probs.numel()

    @property
    def rate(self) -> float:
        return float((self.probs * _drop_rates(self.max_dp)).sum())

    @property
    def entropy(self) -> float:
        nz = self.probs[self.probs > 0]
        return float(-(nz * nz.log()).sum()) + 0.0  # + 0.0: a point mass has entropy 0.0, not -0.0

    def __repr__(self) -> str:
        probs = ", ".join(f"{v:.4f}" for v in self.probs.tolist())
        return (f"PatternDistribution(p={self.p}, method={self.method!r}, rate={self.rate:.6f}, "
                f"entropy={self.entropy:.4f}, probs=[{probs}])")


def _drop_rates(max_dp: int) -> torch.Tensor:
    dp = torch.arange(1, max_dp + 1, dtype=torch.float64)
    return (dp - 1) / dp


def largest_reachable(max_dp: int) -> float:
    return (max_dp - 1) / max_dp


def max_dp_for(p: float) -> int:
    """The smallest ``max_dp`` with ``(max_dp - 1) / max_dp >= p``."""
    m = max(1, math.ceil(1.0 / (1.0 - p) - 1e-12))
    while largest_reachable(m) < p:
        m += 1
    return m


AUTO = "auto"
METHODS = ("exact", "sgd", "narrow")


def resolve_max_dp(p: float, max_dp: int | str) -> int:
    """``max_dp="auto"`` is the tightest support that reaches ``p``: :func:`max_dp_for`.

    Why tight: every distribution with rate ``p`` keeps ``1 - p`` of the units in expectation, so the
    expected work (and the speedup) does not depend on ``max_dp``; but a step with a large ``dp`` keeps
    only ``1/dp`` of a layer and scales it ``dp``-fold, and on MNIST such steps cost accuracy (README,
    "Choosing max_dp and scale"). With the tightest support, ``dp`` stays next to ``1 / (1 - p)``.
    """
    check_max_dp(max_dp)
    return max_dp_for(p) if max_dp == AUTO else max_dp


def check_max_dp(max_dp: int | str) -> None:
    """``max_dp`` must be ``"auto"`` or an int in ``[1, MAX_DP]`` (the one place this is checked)."""
    if max_dp == AUTO:
        return
    if isinstance(max_dp, bool) or not isinstance(max_dp, numbers.Integral) or max_dp < 1:
        raise ValueError(f"max_dp must be an int >= 1 or 'auto', got {max_dp!r}")
    if max_dp > MAX_DP:
        raise ValueError(f"max_dp={max_dp} is above fxdrop's limit of {MAX_DP}; a step that keeps 1/{max_dp} of a "
                         f"layer is not dropout any more: use max_dp='auto' (the tightest support for p)")


def as_rate(p, where: str = "p") -> float:
    """A real scalar (float, int, NumPy scalar, 0-d tensor) as a float; anything else is a ``TypeError``."""
    if isinstance(p, bool):
        raise TypeError(f"{where} must be a real number in [0, 1), got bool")
    if hasattr(p, "shape") and hasattr(p, "item") and tuple(p.shape) == ():
        p = p.item()  # a 0-d tensor or NumPy array
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{where} must be a real number in [0, 1), got {type(p).__name__}")
    return float(p)


def check_rate(p: float, max_dp: int | str, where: str = "p") -> float:
    """Validate a target drop rate against ``max_dp``; errors name the argument and the fix."""
    p = as_rate(p, where)
    check_max_dp(max_dp)
    if not 0.0 <= p < 1.0 or math.isnan(p):
        raise ValueError(f"{where}={p} is outside [0, 1): a drop rate must be at least 0 and below 1")
    if max_dp == AUTO and max_dp_for(p) > MAX_DP:
        raise ValueError(f"{where}={p} needs patterns that keep 1 unit in {max_dp_for(p)}; fxdrop draws periods up "
                         f"to {MAX_DP}, so p can be at most {largest_reachable(MAX_DP):.6g}")
    max_dp = resolve_max_dp(p, max_dp)
    if p > largest_reachable(max_dp) + 1e-12:
        raise ValueError(
            f"{where}={p} is not reachable with max_dp={max_dp}: the largest reachable drop rate is "
            f"{largest_reachable(max_dp):.6g}; use max_dp={max_dp_for(p)} or more")
    return p


def _gibbs(beta: float, r: torch.Tensor) -> torch.Tensor:
    logits = beta * r
    return torch.softmax(logits, 0)


def _exact(p: float, max_dp: int) -> torch.Tensor:
    r = _drop_rates(max_dp)
    if p == 0.0 or max_dp == 1:
        probs = torch.zeros(max_dp, dtype=torch.float64)
        probs[0] = 1.0
        return probs
    if p >= largest_reachable(max_dp) - 1e-15:
        probs = torch.zeros(max_dp, dtype=torch.float64)
        probs[-1] = 1.0
        return probs
    # rate(beta) rises monotonically (its derivative is Var_beta(r) > 0): bracket, then bisect.
    lo, hi = -1.0, 1.0
    while float((_gibbs(lo, r) * r).sum()) > p:
        lo *= 2.0
    while float((_gibbs(hi, r) * r).sum()) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float((_gibbs(mid, r) * r).sum()) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15 * max(1.0, abs(mid)):
            break
    return _gibbs(0.5 * (lo + hi), r)


def _narrow(p: float, max_dp: int) -> torch.Tensor:
    """The two periods around ``1 / (1 - p)`` (one when it is an integer), mixed to reach ``p`` exactly.

    Among distributions with rate ``p`` (mean kept share ``E[1 / dp] = 1 - p``) this one has the least
    variance of the kept share: the shares ``1 / dp`` lie on a grid, and for a fixed mean the two grid points
    around it carry the least spread.
    """
    probs = torch.zeros(max_dp, dtype=torch.float64)
    keep = 1.0 - p
    lo = min(max(1, math.floor(1.0 / keep + 1e-12)), max_dp)
    hi = min(lo + 1, max_dp)
    if lo == hi or abs(1.0 / lo - keep) < 1e-12:
        probs[lo - 1] = 1.0
        return probs
    # P(lo) / lo + (1 - P(lo)) / hi = 1 - p
    share = (keep - 1.0 / hi) / (1.0 / lo - 1.0 / hi)
    probs[lo - 1], probs[hi - 1] = share, 1.0 - share
    return probs


def _sgd(p: float, max_dp: int, lam: float, steps: int, lr: float, seed: int) -> torch.Tensor:
    """The paper's search: gradient descent on softmax logits of ``(rate - p)^2 - lam * H(P)``.

    ``lam`` is annealed towards zero so that the rate constraint wins at the end: with a fixed
    ``lam`` the optimum sits ``O(lam)`` away from the target rate.
    """
    r = _drop_rates(max_dp)
    gen = torch.Generator().manual_seed(seed)
    logits = (0.01 * torch.randn(max_dp, generator=gen, dtype=torch.float64)).requires_grad_()
    opt = torch.optim.Adam([logits], lr=lr)
    for step in range(steps):
        probs = torch.softmax(logits, 0)
        entropy = -(probs * torch.log(probs.clamp_min(1e-300))).sum()
        weight = lam * (1.0 - step / steps) ** 2
        loss = (probs @ r - p) ** 2 - weight * entropy
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.softmax(logits.detach(), 0)


def search_distribution(p: float, max_dp: int | str = 8, method: str = "exact", *, lam: float = 1e-2,
                        steps: int = 2000, lr: float = 0.05, seed: int = 0) -> PatternDistribution:
    """Find ``P(dp)`` over ``dp = 1 .. max_dp`` with expected drop rate ``p`` and high entropy.

    ``method="exact"`` returns the maximum-entropy solution, ``|rate - p| < 1e-9``;
    ``method="sgd"`` runs the paper's search (``lam``, ``steps``, ``lr``, ``seed`` tune it),
    ``|rate - p| < 1e-3``; ``method="narrow"`` puts all mass on the two periods around ``1 / (1 - p)``
    (:func:`_narrow`), ``|rate - p| < 1e-9``. ``max_dp="auto"``: the tightest support (:func:`resolve_max_dp`), which
    is what :func:`fxdrop.convert` uses by default; 8 here is the paper's setting.
    """
    p = check_rate(p, max_dp)
    max_dp = resolve_max_dp(p, max_dp)
    if method == "exact":
        probs = _exact(p, max_dp)
    elif method == "narrow":
        probs = _narrow(p, max_dp)
    elif method == "sgd":
        if p == 0.0 or max_dp == 1 or p >= largest_reachable(max_dp) - 1e-15:
            probs = _exact(p, max_dp)  # a point mass: nothing to search
        else:
            probs = _sgd(p, max_dp, lam, steps, lr, seed)
    else:
        raise ValueError(f"unknown search method {method!r}; expected one of {', '.join(METHODS)}")
    return PatternDistribution(probs=probs, p=p, method=method)

"""The options of a conversion, validated once: :class:`DropoutConfig`.

``fxdrop.convert``, ``fxdrop.audit`` and ``backend="fxdrop"`` all take exactly these keywords
(:data:`OPTIONS`) and build one frozen ``DropoutConfig`` from them; every per-site decision that
depends on an option (the rate, the family, the seed, the granularity, the row classes) is a method
here, so the two conversion paths cannot drift. Imports patterns, search and scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

from .patterns import DEFAULT_TILE, FAMILIES, SCALE_MODES, UNIT_FAMILIES
from .scheduler import AUTO_CLASSES, classes_for, derive_seed, name_salt
from .search import AUTO, METHODS, as_rate, check_max_dp, check_rate

GRANULARITIES = ("forward", "rows")
RateOption = Any  # None | float | Mapping[str, float] | Callable[[str], float | None]
FamilyOption = Any  # str | Mapping[str, str] | Callable[[str], str]


class FxdropError(ValueError):
    """An option or a model that fxdrop cannot work with; the message names the culprit and the fix."""


def _is_callable_option(value: Any) -> bool:
    return callable(value) and not isinstance(value, (str, bytes, Mapping))


def _check_rate_value(value: Any, where: str) -> float:
    rate = as_rate(value, where)
    if not 0.0 <= rate < 1.0 or math.isnan(rate):
        raise ValueError(f"{where}={value!r} is outside [0, 1): a drop rate must be at least 0 and below 1")
    return rate


@dataclass(frozen=True)
class DropoutConfig:
    """What a conversion does at every site.

    ``p``: None keeps each dropout's own rate; a float overrides every site; a dict (site name ->
    rate) or a callable (site name -> rate or None) overrides some. ``pattern``: the family (``row``,
    ``block``, ``tile``), globally, as a dict or a callable. ``max_dp``: ``"auto"`` (the tightest
    support of ``P(dp)`` that reaches the rate) or the largest period. ``seed``: per-site streams derive
    from it and the site's name (None: drawn from the global RNG at conversion). ``scale``: ``"kept"``
    (kept units times ``dp``) or ``"rate"`` (times ``1 / (1 - p)``). ``tile``: the tile family's tile
    size. ``granularity``: ``"rows"`` (Linear sites draw one pattern per row class, row ``r`` in class
    ``r mod row_classes``; RNN sites one per class of equal contiguous chunks of time steps) or
    ``"forward"`` (one pattern per site per forward, the paper's method).
    ``row_classes``: a power of two, or ``"auto"``: 8 for a site whose rate at conversion is above 0.5,
    4 otherwise, 2 for an LSTM/GRU site, whose classes are chunks of the time steps
    (:func:`fxdrop.scheduler.classes_for`; the count is fixed at conversion, so a later change of p keeps
    it). ``distribution``: how ``P(dp)`` is found for a rate (:mod:`fxdrop.search`):
    ``"exact"`` (maximum entropy, the paper's target), ``"sgd"`` (the paper's search) or ``"narrow"``
    (only the two periods around ``1 / (1 - p)``: no step much sparser or denser than ``1 - p``).

    The defaults (``block``, ``rows``, ``"auto"`` classes) are measured: one pattern per forward shares
    the mask across the batch and diverged or fell far behind standard dropout at p = 0.7 and at lr 0.05
    on MNIST; 2 row classes diverge at p = 0.7 with SGD momentum lr >= 0.05, where 8 train; ``block`` is
    the fastest family on CPU. They are not enough everywhere: on README's stability grids the default
    trails standard dropout by 0.3-0.9 points at small learning rates and at p = 0.7 with lr 0.05, and
    diverges at p = 0.7 with lr 0.1, where standard dropout trains.
    """

    p: RateOption = None
    pattern: FamilyOption = "block"
    max_dp: int | str = AUTO
    seed: int | None = None
    scale: str = "kept"
    tile: int = DEFAULT_TILE
    granularity: str = "rows"
    row_classes: int | str = AUTO_CLASSES
    distribution: str = "exact"

    def __post_init__(self) -> None:
        p = self.p
        if p is None or _is_callable_option(p):
            pass
        elif isinstance(p, Mapping):
            object.__setattr__(self, "p", {str(k): _check_rate_value(v, f"p[{k!r}]") for k, v in p.items()})
        else:
            try:
                object.__setattr__(self, "p", _check_rate_value(p, "p"))
            except TypeError:
                raise TypeError(f"p must be None, a real number, a dict of site name -> rate or a callable, got "
                                f"{type(p).__name__}") from None
        pattern = self.pattern
        if isinstance(pattern, str):
            _check_family(pattern, "pattern")
        elif isinstance(pattern, Mapping):
            object.__setattr__(self, "pattern", {str(k): _check_family(v, f"pattern[{k!r}]") for k, v in pattern.items()})
        elif not _is_callable_option(pattern):
            raise TypeError(f"pattern must be a family name, a dict or a callable, got {type(pattern).__name__}")
        check_max_dp(self.max_dp)
        if isinstance(self.p, float):
            check_rate(self.p, self.max_dp, where="p")
        if isinstance(self.p, dict):
            for name, rate in self.p.items():
                check_rate(rate, self.max_dp, where=f"p[{name!r}]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")
        if self.scale not in SCALE_MODES:
            raise ValueError(f"scale={self.scale!r} is not a scale mode; expected one of {', '.join(SCALE_MODES)}")
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 1:
            raise ValueError(f"tile must be an int >= 1, got {self.tile!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r}: expected one of {', '.join(GRANULARITIES)} "
                             "('forward': one pattern per forward call; 'rows': patterns per row class)")
        if self.distribution not in METHODS:
            raise ValueError(f"distribution={self.distribution!r}: expected one of {', '.join(METHODS)} (how P(dp) "
                             "is found for a rate, see fxdrop.search)")
        try:
            classes_for(self.row_classes, None)  # the resolver validates: "auto" or a power of two
        except ValueError:
            raise ValueError(f"row_classes must be 'auto' or a power of two >= 1, got {self.row_classes!r}") from None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, *, where: str = "fxdrop",
                     **keywords: Any) -> "DropoutConfig":
        """A config from keyword options; an unknown keyword is a ``TypeError`` naming the known ones."""
        merged = {**dict(options or {}), **keywords}
        if isinstance(merged.get("config"), DropoutConfig):
            base = merged.pop("config")
            if merged:
                raise TypeError(f"{where}: pass either config= or keyword options, not both ({sorted(merged)})")
            return base
        unknown = sorted(set(merged) - set(OPTIONS))
        if unknown:
            raise TypeError(f"{where}: unknown options {unknown}; the options are {list(OPTIONS)}")
        return cls(**merged)

    def options(self) -> dict[str, Any]:
        """The options as keywords (what :meth:`from_options` takes back)."""
        return {name: getattr(self, name) for name in OPTIONS}

    def describe(self) -> dict[str, Any]:
        """JSON-friendly options (callables by repr)."""
        out = {}
        for name in OPTIONS:
            value = getattr(self, name)
            out[name] = value if isinstance(value, (str, int, float, dict, type(None))) else repr(value)
        return out

    # ------------------------------------------------------------------ per-site decisions

    def rate_for(self, name: str, own: float | None) -> float | None:
        """The rate of site ``name``: the override if one names it, else the dropout's own ``own``."""
        p = self.p
        if p is None:
            value = own
        elif isinstance(p, dict):
            value = p.get(name, own)
        elif _is_callable_option(p):
            value = p(name)
            value = own if value is None else _check_rate_value(value, f"p({name!r})")
        else:
            value = p
        return None if value is None else float(value)

    def overrides_rate(self, name: str) -> bool:
        p = self.p
        if p is None:
            return False
        if isinstance(p, dict):
            return name in p
        if _is_callable_option(p):
            return p(name) is not None
        return True

    def family_for(self, name: str) -> str:
        pattern = self.pattern
        if isinstance(pattern, dict):
            family = pattern.get(name, "row")
        elif _is_callable_option(pattern):
            family = pattern(name)
        else:
            family = pattern
        return _check_family(family, f"pattern for site {name!r}")

    def seed_for(self, name: str) -> int | None:
        """The stream seed of site ``name`` (None: the scheduler draws one from the global RNG)."""
        return None if self.seed is None else derive_seed(self.seed, name_salt(name))

    def granularity_for(self, family: str) -> str:
        """``"rows"`` applies to unit sites: of Linears and unit dropouts (row ``r`` in class
        ``r mod row_classes``) and of RNNs (inter-layer and input: class per chunk of time steps,
        :mod:`fxdrop.modules.rnn`); tile sites mask the weight every row shares."""
        if self.granularity == "rows" and family in UNIT_FAMILIES:
            return "rows"
        return "forward"

    def check_site_rate(self, name: str, rate: float) -> float:
        return check_rate(rate, self.max_dp, where=f"p of dropout site {name!r}")

    def check_names(self, known: set[str]) -> None:
        """A per-site dict naming no site is a typo: say so, with the names there are."""
        for option in ("p", "pattern"):
            value = getattr(self, option)
            if isinstance(value, dict):
                unknown = sorted(set(value) - known)
                if unknown:
                    raise ValueError(f"{option} names no dropout site: {unknown}; the sites are {sorted(known)}")


def _check_family(family: Any, where: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"{where}={family!r} is not a pattern family; expected one of {', '.join(FAMILIES)}")
    return family


OPTIONS = tuple(f.name for f in fields(DropoutConfig))

__all__ = ["DropoutConfig", "FxdropError", "GRANULARITIES", "OPTIONS"]

"""Site: one converted dropout at run time (what ``fxdrop.sites(model)`` lists).

A site draws this step's pattern from its :class:`~fxdrop.scheduler.PatternScheduler` and knows the
width (or weight) it masks. Its *rate and mode are read from its owner at every forward*, as the
original dropout reads its own: a module dropout's owner is the ``nn.Dropout`` at its original path
(``model.classifier[2].p = 0.1`` or ``model.backbone.eval()`` take effect at the next forward), a
functional dropout's owner is the module whose forward called it, an RNN's inter-layer sites are
owned by the RNN (``lstm.dropout``). A site whose owner is in eval mode, or whose rate is 0, is
*inactive*: it keeps every unit with scale 1, exactly like the dropout it replaced.

From the scheduler's last draw a site rebuilds the mask it applied (draws are a pure function of
the stream state, so nothing extra is stored). Imports torch, patterns, scheduler and search.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .patterns import (DEFAULT_TILE, FULL, Pattern, check_family, check_scale, tile_weight_mask, time_classes,
                       unit_mask)
from .scheduler import PatternScheduler, classes_for, draw, draw_classes
from .search import PatternDistribution, check_rate, search_distribution

GRANULARITIES = ("forward", "rows")
KINDS = ("dropout", "lstm", "gru")
TIME_CHUNKED = ("rnn", "rnn_input")  # plans whose row classes are chunks of an RNN's time steps


class ModuleOwner:
    """A ``nn.Dropout`` module: its ``p`` and ``training`` are the site's."""

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    def p(self) -> float:
        return self.module.p

    @p.setter
    def p(self, value: float) -> None:
        self.module.p = value

    @property
    def training(self) -> bool:
        return self.module.training


class CallerOwner:
    """A functional dropout: the mode of the module whose forward called it; the rate is the site's own
    (a constant in that forward: change it with ``fxdrop.set_p``)."""

    def __init__(self, module: nn.Module | None, p: float, follows_mode: bool = True):
        self.module = module
        self.p = p
        self.follows_mode = follows_mode

    @property
    def training(self) -> bool:
        return self.module.training if self.module is not None and self.follows_mode else True


class RNNOwner:
    """An ``nn.LSTM``/``nn.GRU``'s inter-layer dropout: ``rnn.dropout`` and ``rnn.training``."""

    def __init__(self, rnn: nn.Module):
        self.rnn = rnn

    @property
    def p(self) -> float:
        return self.rnn.dropout

    @p.setter
    def p(self, value: float) -> None:
        self.rnn.dropout = value

    @property
    def training(self) -> bool:
        return self.rnn.training


class Site:
    """A converted dropout site.

    ``units`` is the masked width (unit families) and ``weight_shape`` the masked weight ``(out, in)``
    (tile family); the one that does not apply is ``None``. ``position``: the site's index in its chain,
    which picks the bits of a row's class that choose its pattern (:func:`fxdrop.scheduler.draw_classes`).
    """

    def __init__(self, name: str, family: str, owner: Any, *, scale: str = "kept", max_dp: int | str = "auto",
                 seed: int | None = None, units: int | None = None, weight_shape: tuple[int, int] | None = None,
                 tile: int = DEFAULT_TILE, granularity: str = "forward", row_classes: int | str = 2,
                 kind: str = "dropout", producer: str | None = None, consumer: str | None = None,
                 distribution: str = "exact", position: int = 0):
        check_family(family)
        check_scale(scale)
        if granularity not in GRANULARITIES:
            raise ValueError(f"site {name!r}: unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
        if granularity == "rows" and family == "tile":
            raise ValueError(f"site {name!r}: granularity='rows' needs a unit family (row or block); a tile "
                             "pattern masks the weight, which every row shares")
        self.name = name
        self.family = family
        self.owner = owner
        self.scale = scale
        self.max_dp = max_dp
        self.distribution = distribution
        self.units = units
        self.weight_shape = weight_shape
        self.tile = tile
        self.granularity = granularity
        # "auto" from the rate at conversion (the plan's, see from_record): the count is a shape of
        # compiled graphs, so it stays when p changes
        classes = classes_for(row_classes, self.p, over_time=kind in ("lstm", "gru"))
        self.row_classes = classes if granularity == "rows" else 1
        self.position = position
        self.kind = kind
        self.producer = producer
        self.consumer = consumer
        self._time_layout: tuple[int | None, tuple[int, ...]] | None = None  # an RNN site's last call
        self._distributions: dict[float, PatternDistribution] = {}
        self.scheduler = PatternScheduler(self._distribution(self.p), seed=seed)

    @classmethod
    def from_record(cls, record: Any, config: Any, owner: Any) -> "Site":
        """The site of a plan record (:class:`fxdrop.passes.plan.DropoutSite`) under a
        :class:`~fxdrop.config.DropoutConfig`: the one place where a site's seed, scale, granularity
        and row classes come from the options, for ``convert`` and the backend alike."""
        kind = record.kind if record.kind in KINDS else "dropout"
        return cls(record.name, record.family, owner, scale=config.scale, max_dp=config.max_dp,
                   seed=config.seed_for(record.name), units=record.units, weight_shape=record.weight_shape,
                   tile=config.tile, granularity=config.granularity_for(record.family),
                   row_classes=classes_for(config.row_classes, record.p, over_time=record.plan in TIME_CHUNKED),
                   kind=kind, producer=record.producer,
                   consumer=record.consumer, distribution=config.distribution, position=record.position)

    # ------------------------------------------------------------------ rate and mode

    @property
    def p(self) -> float:
        return float(self.owner.p)

    @p.setter
    def p(self, value: float) -> None:
        self.owner.p = check_rate(value, self.max_dp, where=f"p of dropout site {self.name!r}")
        self.sync()

    @property
    def active(self) -> bool:
        """Whether this forward drops anything: the owner is in training mode and the rate is above 0."""
        return bool(self.owner.training) and self.owner.p > 0

    @property
    def rate(self) -> float:
        """The rate this forward applies (0 when inactive)."""
        return self.p if self.active else 0.0

    def _distribution(self, p: float) -> PatternDistribution:
        found = self._distributions.get(p)
        if found is None:
            check_rate(p, self.max_dp, where=f"p of dropout site {self.name!r}")
            found = search_distribution(p, max_dp=self.max_dp, method=self.distribution)
            self._distributions[p] = found
        return found

    def sync(self) -> None:
        """Point the scheduler at the distribution of the current rate (a rate schedule changed it)."""
        p = self.p
        if self.scheduler.distribution.p != p:
            self.scheduler.distribution = self._distribution(p)

    # ------------------------------------------------------------------ drawing

    def sample(self) -> torch.Tensor:
        """This step's pattern ``int64 (2,) = [dp, offset]``: drawn when active, ``[1, 0]`` (keep all) else."""
        if not self.active:
            return torch.tensor(FULL, dtype=torch.int64)
        self.sync()
        return self.scheduler.sample_tensor()

    def sample_rows(self) -> torch.Tensor:
        """This step's row-class plan ``int64 (row_classes, 2)``: row ``r`` uses plan ``r mod row_classes``."""
        if not self.active:
            return torch.tensor([FULL] * self.row_classes, dtype=torch.int64)
        self.sync()
        return torch.ops.fxdrop.sample_classes(self.scheduler.state, self.scheduler.cdf, self.row_classes,
                                               self.position)

    def sample_over_time(self, steps: int | None, shape: tuple[int, ...]) -> torch.Tensor:
        """An RNN site's plan for one call (``granularity="rows"``): :meth:`sample_rows`, class ``c`` for the
        ``c``-th of ``row_classes`` equal contiguous chunks of the call's ``steps`` time steps
        (:func:`fxdrop.patterns.time_chunks`), shared by the batch; ``steps=None`` (a ``PackedSequence``)
        gives every step class 0. ``shape``: the per-step mask's shape over the RNN's input for
        :attr:`last_mask`: ``(steps, 1, units)`` time-major, ``(1, steps, units)`` batch-first,
        ``(steps, units)`` unbatched."""
        self._time_layout = (steps, shape)
        return self.sample_rows()

    def draw(self) -> torch.Tensor:
        """What the op of this site's granularity takes: :meth:`sample` or :meth:`sample_rows`."""
        return self.sample_rows() if self.granularity == "rows" else self.sample()

    # ------------------------------------------------------------------ what was drawn

    @property
    def last_pattern(self) -> Pattern | None:
        """The pattern of the last draw (None before the first; for a ``"rows"`` site see :attr:`last_plan`)."""
        scheduler = self.scheduler
        if scheduler.draws == 0 or self.granularity == "rows":
            return None
        return draw(scheduler.seed, scheduler.draws - 1, scheduler.cdf.tolist())

    @property
    def last_plan(self) -> list[Pattern] | None:
        """A ``"rows"`` site's last row-class plan: the pattern of residue ``r mod row_classes``."""
        scheduler = self.scheduler
        if scheduler.draws == 0 or self.granularity != "rows":
            return None
        return draw_classes(scheduler.seed, scheduler.draws - 1, scheduler.cdf.tolist(), self.row_classes,
                            self.position)

    @property
    def last_mask(self) -> torch.Tensor | None:
        """The multiplier of the last draw: ``(units,)`` or the weight's shape (tile); for a ``"rows"`` site
        ``(row_classes, units)``, row ``r`` of the input (flattened to 2-D) using row ``r mod row_classes``;
        for a ``"rows"`` RNN site (:meth:`sample_over_time`) the last call's per-step mask, broadcast over
        the batch (``(units,)`` after a ``PackedSequence``)."""
        if self.granularity == "rows":
            plan = self.last_plan
            if plan is None:
                return None
            per_class = torch.stack([self.mask(pattern) for pattern in plan])
            if self._time_layout is None:
                return per_class
            steps, shape = self._time_layout
            return per_class[0] if steps is None else per_class[time_classes(steps, len(plan))].reshape(shape)
        pattern = self.last_pattern
        return None if pattern is None else self.mask(pattern)

    def mask(self, pattern: Pattern, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        dp, offset = (int(v) for v in pattern)
        if self.family == "tile":
            if self.weight_shape is None:
                raise ValueError(f"site {self.name!r}: a tile site needs weight_shape")
            return tile_weight_mask(self.weight_shape, self.tile, dp, offset, self.scale, self.p, dtype=dtype)
        if self.units is None:
            raise ValueError(f"site {self.name!r}: a unit site needs units")
        return unit_mask(self.family, self.units, dp, offset, self.scale, self.p, dtype=dtype)

    def row_masks(self, rows: int, plan: list[Pattern] | None = None) -> torch.Tensor:
        """The multipliers of a row-class plan for ``rows`` rows: ``(rows, units)``."""
        plan = self.last_plan if plan is None else plan
        per_class = torch.stack([self.mask(pattern) for pattern in plan])
        return per_class[torch.arange(rows) % per_class.shape[0]]

    def __repr__(self) -> str:
        rows = f", granularity='rows', row_classes={self.row_classes}" if self.granularity == "rows" else ""
        return (f"Site({self.name!r}, p={self.p}, family={self.family!r}, scale={self.scale!r}{rows}, "
                f"active={self.active}, draws={self.scheduler.draws})")

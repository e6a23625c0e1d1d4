"""Site: one converted dropout at run time (what ``fxdrop.sites(model)`` lists).

A site knows its name, drop rate, pattern family, scale mode and scheduler, and the width it masks;
from the scheduler's last draw it rebuilds the mask it applied (draws are a pure function of the
scheduler state, so nothing extra is stored). Imports patterns and scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .patterns import (DEFAULT_TILE, Pattern, check_family, tile_weight_mask, unit_mask)
from .scheduler import PatternScheduler
from .search import check_rate, search_distribution

SCALE_MODES = ("kept", "rate")
# "forward": one pattern per forward call for every row (the paper's method); "rows": patterns per
# row class (fxdrop.scheduler.draw_classes), for sites whose rows are many tokens of a sequence.
GRANULARITIES = ("forward", "rows")


@dataclass(eq=False)
class Site:
    """A converted dropout site.

    ``units`` is the masked width (unit families) and ``weight_shape`` the masked weight ``(out, in)``
    (tile family); the one that does not apply is ``None``.
    """

    name: str
    p: float
    family: str
    scheduler: PatternScheduler
    scale: str = "kept"
    units: int | None = None
    weight_shape: tuple[int, int] | None = None
    tile: int = DEFAULT_TILE
    producer: str | None = None
    consumer: str | None = None
    granularity: str = "forward"
    notes: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, name: str, p: float, family: str, *, max_dp: int | str = "auto", seed: int | None = None,
               scale: str = "kept", **kwargs) -> "Site":
        check_family(family)
        if scale not in SCALE_MODES:
            raise ValueError(f"site {name!r}: unknown scale mode {scale!r}; expected one of {SCALE_MODES}")
        granularity = kwargs.get("granularity", "forward")
        if granularity not in GRANULARITIES:
            raise ValueError(f"site {name!r}: unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
        if granularity == "rows" and family == "tile":
            raise ValueError(f"site {name!r}: granularity='rows' needs a unit family (row or block); a tile "
                             "pattern masks the weight, which every row shares")
        try:
            p = check_rate(p, max_dp, where=f"p of dropout site {name!r}")
        except ValueError as err:
            raise ValueError(str(err)) from None
        scheduler = PatternScheduler(search_distribution(p, max_dp=max_dp), seed=seed)
        return cls(name=name, p=p, family=family, scheduler=scheduler, scale=scale, **kwargs)

    @property
    def last_pattern(self) -> Pattern | None:
        """The pattern of the last training forward (None before the first, and for a ``"rows"`` site,
        whose rows have patterns of their own: see ``StructuredChain.last_row_masks``)."""
        if self.granularity == "rows":
            return None
        return self.scheduler.last_pattern

    @property
    def last_mask(self) -> torch.Tensor | None:
        """The multiplier of the last training forward: ``(units,)`` or the weight's shape; 0 where dropped."""
        if self.granularity == "rows":
            raise ValueError(f"site {self.name!r} draws a pattern per row (granularity='rows'): its last masks "
                             "are StructuredChain.last_row_masks(), one row per input row")
        pattern = self.last_pattern
        if pattern is None:
            return None
        return self.mask(pattern)

    def mask(self, pattern: Pattern, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.family == "tile":
            if self.weight_shape is None:
                raise ValueError(f"site {self.name!r}: a tile site needs weight_shape")
            return tile_weight_mask(self.weight_shape, self.tile, pattern.dp, pattern.offset, self.scale,
                                    self.p, dtype=dtype)
        if self.units is None:
            raise ValueError(f"site {self.name!r}: a unit site needs units")
        return unit_mask(self.family, self.units, pattern.dp, pattern.offset, self.scale, self.p, dtype=dtype)

    def sample(self) -> torch.Tensor:
        """Draw this step's pattern: ``int64 (2,) = [dp, offset]`` (through the sample op)."""
        return self.scheduler.sample_tensor()

    def row_masks(self, patterns: torch.Tensor, rows: int, index: int = 0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The multipliers of a row-class plan, ``(rows, units)``: row ``r`` uses class ``r mod M``.

        ``patterns`` is what ``fxdrop::sample_rows`` returned, ``(M, sites, 2)`` (``index``: this site's
        position among the sites drawn together).
        """
        if self.units is None:
            raise ValueError(f"site {self.name!r}: a unit site needs units")
        per_class = torch.stack([unit_mask(self.family, self.units, int(pat[index][0]), int(pat[index][1]),
                                           self.scale, self.p, dtype=dtype) for pat in patterns])
        return per_class[torch.arange(rows) % per_class.shape[0]]

    def __repr__(self) -> str:
        rows = ", granularity='rows'" if self.granularity == "rows" else ""
        return (f"Site({self.name!r}, p={self.p}, family={self.family!r}, scale={self.scale!r}{rows}, "
                f"last_pattern={self.last_pattern})")

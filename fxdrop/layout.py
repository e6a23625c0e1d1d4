"""Which dimensions of which weights a structured op shrinks: the one description of a chain's layout.

A chain is ``[site ->] Linear_0 -> act_0 -> site -> Linear_1 -> ... -> Linear_{m-1} [-> act -> site]``.
Its sites are numbered in order: the input site first (when there is one), then one between each
pair of consecutive Linears, then the output site (when there is one). Linear ``l`` *reads* the units
of ``in_site(l)``, so the columns of its weight shrink to that site's kept units, and *writes* the
units of ``out_site(l)``, so its rows and its bias shrink to that site's kept units.

Everything that needs this asks :class:`ChainLayout`: the composite kernels and the dense reference
(which masks go where), the audit (the expected work of each GEMM), the DDP comm hook (the kept
block of each weight gradient), the runtime modules, and tests that check the C++ kernels' zeros
against :meth:`ChainLayout.weight_support`. Imports only the pattern math.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .patterns import kept_slice


@dataclass(frozen=True)
class ChainLayout:
    layers: int
    input_dropout: bool = False
    output_dropout: bool = False

    def __post_init__(self) -> None:
        if self.layers < 1:
            raise ValueError("a chain needs at least one weight")
        if self.sites < 1:
            raise ValueError("a chain needs at least one dropout site (input_dropout, output_dropout or two weights)")

    @property
    def sites(self) -> int:
        return self.layers - 1 + int(self.input_dropout) + int(self.output_dropout)

    @property
    def activations(self) -> int:
        """One activation per Linear that a site follows (every Linear but the last, and the last with
        an output site)."""
        return self.layers - 1 + int(self.output_dropout)

    def in_site(self, layer: int) -> int | None:
        """The site whose kept units Linear ``layer`` reads (its weight's columns), or None."""
        self._check(layer)
        if layer == 0:
            return 0 if self.input_dropout else None
        return layer - 1 + int(self.input_dropout)

    def out_site(self, layer: int) -> int | None:
        """The site whose kept units Linear ``layer`` writes (its weight's rows and bias), or None."""
        self._check(layer)
        if layer == self.layers - 1 and not self.output_dropout:
            return None
        return layer + int(self.input_dropout)

    def writer(self, site: int) -> int | None:
        """The Linear that writes ``site``'s units (the inverse of :meth:`out_site`), or None (an input site)."""
        return next((l for l in range(self.layers) if self.out_site(l) == site), None)

    def reader(self, site: int) -> int | None:
        """The Linear that reads ``site``'s units (the inverse of :meth:`in_site`), or None (an output site)."""
        return next((l for l in range(self.layers) if self.in_site(l) == site), None)

    def site_width(self, site: int, in_features: int, out_features: Sequence[int]) -> int:
        """The masked width of ``site`` for a chain on ``in_features`` whose Linears have ``out_features``."""
        if self.input_dropout and site == 0:
            return in_features
        return out_features[site - int(self.input_dropout)]

    def weight_support(self, layer: int, shape: tuple[int, int], family: str,
                       patterns: Sequence[tuple[int, int]]) -> tuple[slice | None, slice | None]:
        """The block ``W[rows][:, cols]`` of Linear ``layer``'s weight that one pattern set uses (None: all)."""
        rows = cols = None
        out_site, in_site = self.out_site(layer), self.in_site(layer)
        if out_site is not None:
            rows = kept_slice(family, shape[0], *patterns[out_site])
        if in_site is not None:
            cols = kept_slice(family, shape[1], *patterns[in_site])
        return rows, cols

    def expected_keep(self, layer: int, rates: Sequence[float]) -> float:
        """The expected fraction of Linear ``layer``'s GEMM work that is done: ``(1 - p_in)(1 - p_out)``."""
        keep = 1.0
        for site in (self.in_site(layer), self.out_site(layer)):
            if site is not None:
                keep *= 1.0 - rates[site]
        return keep

    def _check(self, layer: int) -> None:
        if not 0 <= layer < self.layers:
            raise IndexError(f"layer {layer} of a {self.layers}-Linear chain")

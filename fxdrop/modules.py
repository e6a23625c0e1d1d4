"""The modules that replace matched subgraphs in a converted model.

They own the :class:`~fxdrop.site.Site` objects (``fxdrop_sites()`` lists them, the protocol that
:func:`fxdrop.sites` collects) and hold no parameters: weights and biases arrive as call arguments
(``get_attr`` of the original Linears' own Parameters), so the converted model's ``state_dict`` keys
are exactly the original's and the same modules serve Dynamo graphs, where weights are graph inputs.

In eval mode each computes exactly the original ops (dropout is the identity), so eval output is
bit-identical; in training it draws each site's pattern and calls :mod:`fxdrop.ops`.
Imports torch, fxdrop.ops, fxdrop.scheduler and fxdrop.site.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .ops import activations as act
from .scheduler import ROW_CLASSES
from .site import Site


def _split(params: Sequence[torch.Tensor], has_bias: Sequence[bool]):
    weights, biases, i = [], [], 0
    for bias_present in has_bias:
        weights.append(params[i])
        i += 1
        if bias_present:
            biases.append(params[i])
            i += 1
        else:
            biases.append(None)
    return weights, biases


def _check_local(params: Sequence[torch.Tensor | None], where: str) -> None:
    """A DTensor weight means fully_shard went onto a module the converted graph bypasses: say so.

    (Without this the op fails with "mixed torch.Tensor and DTensor". No DTensor can exist unless
    torch.distributed.tensor was imported, so this costs nothing otherwise; never inside a trace.)
    """
    if torch.compiler.is_compiling():
        return
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if dtensor is not None and any(isinstance(t, dtensor) for t in params):
        raise ValueError(f"{where}: its weights are DTensor shards, so fully_shard (FSDP2) was applied to a "
                         "module that the converted graph never calls and its shards are never gathered; "
                         "shard the converted model as a whole: fxdrop.distributed.fully_shard(model)")


class StructuredChain(nn.Module):
    """``[dropout ->] Linear_0 -> act -> dropout -> ... -> Linear_{m-1} [-> act -> dropout]`` as one op.

    ``forward(x, W_0, [b_0,] W_1, [b_1,] ...)`` with ``x: (..., in_features of Linear_0)``. With
    ``share_input`` (an input dropout that has other users too) it returns ``(y, dropped x)``, both
    from the one pattern drawn for the input site.
    """

    def __init__(self, sites: Sequence[Site], *, family: str, activations: Sequence[str],
                 has_bias: Sequence[bool], input_dropout: bool, output_dropout: bool, scale: str,
                 linears: Sequence[str] = (), share_input: bool = False):
        super().__init__()
        if share_input and not input_dropout:
            raise ValueError("StructuredChain: share_input needs an input dropout")
        self.share_input = bool(share_input)
        self.sites = list(sites)
        self.family = family
        self.activations = list(activations)
        self.has_bias = list(has_bias)
        self.input_dropout = bool(input_dropout)
        self.output_dropout = bool(output_dropout)
        self.scale = scale
        self.linears = list(linears)

    def fxdrop_sites(self) -> list[Site]:
        return list(self.sites)

    def forward(self, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        _check_local(params, f"fxdrop chain of {', '.join(self.linears) or 'Linears'}")
        weights, biases = _split(params, self.has_bias)
        if not self.training:
            y = self._original(x, weights, biases)
            return (y, x) if self.share_input else y
        if self.granularity == "rows":
            return self._forward_rows(x, weights, biases)
        patterns = torch.stack([site.sample() for site in self.sites])
        y = ops.chain(x, weights, biases, patterns, family=self.family, activations=self.activations,
                      input_dropout=self.input_dropout, output_dropout=self.output_dropout, scale=self.scale,
                      rates=[site.p for site in self.sites])
        if not self.share_input:
            return y
        site = self.sites[0]
        return y, ops.unit_dropout(x, patterns[0], family=self.family, scale=self.scale, p=site.p)

    @property
    def granularity(self) -> str:
        return self.sites[0].granularity

    def _forward_rows(self, x, weights, biases):
        """Patterns per row class: row r of x (flattened to 2-D) uses class r mod M
        (:data:`fxdrop.scheduler.ROW_CLASSES`); each site draws a pattern per class (``fxdrop::sample_rows``)."""
        width = x.shape[-1]
        rows = x.numel() // width if width else 0
        patterns = ops.sample_rows([site.scheduler.state for site in self.sites],
                                   [site.scheduler.cdf for site in self.sites], rows, ROW_CLASSES)
        if not torch.compiler.is_compiling():
            self.last_plan = (patterns, rows)
        y = ops.chain(x, weights, biases, patterns, family=self.family, activations=self.activations,
                      input_dropout=self.input_dropout, output_dropout=self.output_dropout, scale=self.scale,
                      rates=[site.p for site in self.sites])
        if not self.share_input:
            return y
        mask = self.sites[0].row_masks(patterns, rows, 0, dtype=x.dtype).to(x.device)
        return y, (x.reshape(rows, width) * mask).reshape(x.shape)

    def last_row_masks(self) -> list[torch.Tensor]:
        """Each site's multipliers in the last training forward of a ``granularity="rows"`` chain:
        ``(rows, units)``, row r of the input flattened to 2-D (for dense references)."""
        plan = getattr(self, "last_plan", None)
        if plan is None:
            raise RuntimeError("last_row_masks: no training forward with granularity='rows' has run")
        return [site.row_masks(*plan, index=i) for i, site in enumerate(self.sites)]

    def _original(self, x, weights, biases):
        """Eval: the original ops in the original order (dropouts are the identity)."""
        last = len(weights) - 1
        for layer, (weight, bias) in enumerate(zip(weights, biases)):
            x = F.linear(x, weight, bias)
            if layer < last or self.output_dropout:
                x = act.apply(self.activations[layer], x)
        return x

    def extra_repr(self) -> str:
        sites = ", ".join(f"{s.name}(p={s.p})" for s in self.sites)
        return (f"linears=[{', '.join(self.linears)}], activations={self.activations}, sites=[{sites}], "
                f"family={self.family!r}, input_dropout={self.input_dropout}, "
                f"output_dropout={self.output_dropout}, scale={self.scale!r}"
                + (", share_input=True" if self.share_input else "")
                + (", granularity='rows'" if self.granularity == "rows" else ""))


class TileLinear(nn.Module):
    """``Dropout -> Linear`` as DropConnect on the Linear's weight at tile granularity.

    ``forward(x, W, [b])``; the site's mask has the weight's shape.
    """

    def __init__(self, site: Site, *, has_bias: bool, linear: str = ""):
        super().__init__()
        self.site = site
        self.has_bias = bool(has_bias)
        self.linear = linear

    def fxdrop_sites(self) -> list[Site]:
        return [self.site]

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        _check_local((weight, bias), f"fxdrop tile Linear {self.linear or self.site.name}")
        if not self.training:
            return F.linear(x, weight, bias)
        site = self.site
        return ops.tile_linear(x, weight, bias, site.sample(), tile=site.tile, scale=site.scale, p=site.p)

    def extra_repr(self) -> str:
        return f"linear={self.linear}, site={self.site.name}(p={self.site.p}), tile={self.site.tile}"


class UnitDropout(nn.Module):
    """A dropout whose output has several users: one structured unit mask along the last dim."""

    def __init__(self, site: Site):
        super().__init__()
        self.site = site

    def fxdrop_sites(self) -> list[Site]:
        return [self.site]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        site = self.site
        return ops.unit_dropout(x, site.sample(), family=site.family, scale=site.scale, p=site.p)

    def extra_repr(self) -> str:
        return f"site={self.site.name}(p={self.site.p}), family={self.site.family!r}"

"""Dense references for the structured ops: the same computation with the mask applied explicitly.

Every structured op (and every converted model) is tested against these: full-size GEMMs with the
dropped units (or tiles) multiplied by zero. Patterns are ``(dp, offset)`` pairs or int64 tensors.
They are also the differentiable backward of the ops under ``create_graph=True``.
Imports torch, patterns, layout and activations.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .. import patterns as P
from ..layout import ChainLayout
from . import activations as act


def _pair(pattern) -> tuple[int, int]:
    dp, offset = (int(v) for v in (pattern.tolist() if isinstance(pattern, torch.Tensor) else pattern))
    return dp, offset


def unit_dropout(x: torch.Tensor, pattern, *, family: str, scale: str = "kept", p: float = 0.0) -> torch.Tensor:
    """``x * mask``; a ``(classes, 2)`` pattern gives row ``r`` of ``x`` (flattened) the mask of class ``r % classes``."""
    if isinstance(pattern, torch.Tensor) and pattern.dim() == 2:
        masks = torch.stack([P.unit_mask(family, x.shape[-1], *_pair(row), scale, p, dtype=x.dtype)
                             for row in pattern]).to(x.device)
        x2 = x.reshape(-1, x.shape[-1])
        return (x2 * masks[torch.arange(x2.shape[0], device=x.device) % masks.shape[0]]).reshape(x.shape)
    dp, offset = _pair(pattern)
    mask = P.unit_mask(family, x.shape[-1], dp, offset, scale, p, dtype=x.dtype).to(x.device)
    return x * mask


def chain(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
          patterns, *, family: str, activations: Sequence[str], input_dropout: bool = False,
          output_dropout: bool = False, scale: str = "kept", rates: Sequence[float] = ()) -> torch.Tensor:
    layout = ChainLayout(len(weights), input_dropout, output_dropout)
    rates = list(rates) or [0.0] * layout.sites
    if input_dropout:
        x = unit_dropout(x, patterns[0], family=family, scale=scale, p=rates[0])
    for layer, (weight, bias) in enumerate(zip(weights, biases)):
        x = F.linear(x, weight, bias)
        site = layout.out_site(layer)
        if site is not None:
            x = act.apply(activations[layer], x)
            x = unit_dropout(x, patterns[site], family=family, scale=scale, p=rates[site])
    return x


def tile_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pattern, *,
                tile: int = P.DEFAULT_TILE, scale: str = "kept", p: float = 0.0) -> torch.Tensor:
    dp, offset = _pair(pattern)
    mask = P.tile_weight_mask(tuple(weight.shape), tile, dp, offset, scale, p, dtype=weight.dtype)
    return F.linear(x, weight * mask.to(weight.device), bias)


def chain_classes(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                  patterns: torch.Tensor, **kw) -> torch.Tensor:
    """:func:`chain` with row classes: row ``r`` of ``x`` (flattened to 2-D) uses ``patterns[r % M]``
    (``(M, sites, 2)``); each class is the dense reference with its own masks (no merging)."""
    x2 = x.reshape(-1, x.shape[-1])
    classes = patterns.shape[0]
    pieces = [chain(x2[c::classes], weights, biases, patterns[c], **kw) for c in range(classes)]
    order = torch.cat([torch.arange(x2.shape[0], device=x.device)[c::classes] for c in range(classes)])
    y = torch.cat(pieces).index_select(0, torch.argsort(order))  # differentiable (double backward uses it)
    return y.reshape(*x.shape[:-1], y.shape[-1])

"""Dense references for the structured ops: the same computation with the mask applied explicitly.

Every structured op (and every converted model) is tested against these: full-size GEMMs with the
dropped units (or tiles) multiplied by zero. Patterns are ``(dp, offset)`` pairs or int64 tensors.
Imports torch, patterns and activations.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .. import patterns as P
from . import activations as act


def _pair(pattern) -> tuple[int, int]:
    dp, offset = (int(v) for v in (pattern.tolist() if isinstance(pattern, torch.Tensor) else pattern))
    return dp, offset


def unit_dropout(x: torch.Tensor, pattern, *, family: str, scale: str = "kept", p: float = 0.0) -> torch.Tensor:
    dp, offset = _pair(pattern)
    mask = P.unit_mask(family, x.shape[-1], dp, offset, scale, p, dtype=x.dtype).to(x.device)
    return x * mask


def chain(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
          patterns, *, family: str, activations: Sequence[str], input_dropout: bool = False,
          output_dropout: bool = False, scale: str = "kept", rates: Sequence[float] = ()) -> torch.Tensor:
    site = 0
    if input_dropout:
        x = unit_dropout(x, patterns[site], family=family, scale=scale, p=rates[site])
        site += 1
    for layer, (weight, bias) in enumerate(zip(weights, biases)):
        x = F.linear(x, weight, bias)
        if layer < len(weights) - 1 or output_dropout:
            x = act.apply(activations[layer], x)
            x = unit_dropout(x, patterns[site], family=family, scale=scale, p=rates[site])
            site += 1
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
    y = x2.new_zeros(x2.shape[0], weights[-1].shape[0])
    for c in range(patterns.shape[0]):
        y[c::patterns.shape[0]] = chain(x2[c::patterns.shape[0]], weights, biases, patterns[c], **kw)
    return y.reshape(*x.shape[:-1], y.shape[-1])

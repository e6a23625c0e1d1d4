"""Pattern families: which units (or weight tiles) a pattern ``(dp, offset)`` keeps.

This is the one place the index math lives: ops, masks, audits and tests all call it (the C++
kernels mirror it, and tests/test_extension.py checks them against it). It imports only torch.

Families
--------
``row``   (the paper's RBD) keep units ``offset, offset + dp, offset + 2 dp, ...``.
``block`` keep one contiguous block of a balanced partition of the ``n`` units into ``dp`` blocks:
          block ``b`` is ``[floor(b n / dp), floor((b + 1) n / dp))``.
``tile``  (the paper's TBD) split a weight ``(out, in)`` into ``tile x tile`` tiles and keep tile
          ``(i, j)`` iff ``(i + j - offset) mod dp == 0`` (diagonal enumeration).

Exactness. In every family each unit (tile) is kept by exactly one of the ``dp`` offsets, so with
the offset uniform every unit is kept with probability exactly ``1 / dp``, whatever the width. A
pattern may therefore keep nothing (a layer narrower than ``dp``, a weight smaller than ``dp``
tiles): that step drops the whole site, as Bernoulli dropout sometimes does.

Scales. ``"kept"`` multiplies kept units by ``dp``: given the draw, every unit's expected
multiplier is exactly 1 (when ``dp`` divides the width this is ``n / kept``). ``"rate"`` multiplies
by ``1 / (1 - p)``, as ``nn.Dropout`` does: unbiased over the draws.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

UNIT_FAMILIES = ("row", "block")
FAMILIES = ("row", "block", "tile")
SCALE_MODES = ("kept", "rate")
DEFAULT_TILE = 32


class Pattern(NamedTuple):
    """Keep one unit in every ``dp``, starting from ``offset`` (``0 <= offset < dp``)."""

    dp: int
    offset: int

    def check(self) -> "Pattern":
        if int(self.dp) < 1:
            raise ValueError(f"Pattern.dp must be >= 1, got {self.dp}")
        if not 0 <= int(self.offset) < int(self.dp):
            raise ValueError(f"Pattern.offset must satisfy 0 <= offset < dp={self.dp}, got {self.offset}")
        return self


FULL = Pattern(1, 0)  # keeps every unit, scale 1: what an inactive site (eval mode, p = 0) applies


def check_family(family: str, allowed: tuple[str, ...] = FAMILIES) -> str:
    if family not in allowed:
        raise ValueError(f"unknown pattern family {family!r}; expected one of {', '.join(allowed)}")
    return family


def check_scale(scale: str) -> str:
    if scale not in SCALE_MODES:
        raise ValueError(f"unknown scale mode {scale!r}; expected one of {', '.join(SCALE_MODES)}")
    return scale


def _check(n: int, dp: int, offset: int) -> None:
    if n < 1:
        raise ValueError(f"a pattern needs at least one unit, got n={n}")
    Pattern(dp, offset).check()


def kept_slice(family: str, n: int, dp: int, offset: int) -> slice:
    """The kept units of ``n`` as a slice (step 1 for ``block``, ``dp`` for ``row``); may be empty.

    A slice is what the ops want: a block is a plain view, a row is a strided view.
    """
    check_family(family, UNIT_FAMILIES)
    _check(n, dp, offset)
    if family == "row":
        return slice(min(offset, n), n, dp)
    return slice(offset * n // dp, (offset + 1) * n // dp, 1)


def num_kept(family: str, n: int, dp: int, offset: int) -> int:
    s = kept_slice(family, n, dp, offset)
    return len(range(s.start, s.stop, s.step))


def kept(family: str, n: int, dp: int, offset: int) -> torch.Tensor:
    """Indices of the kept units, ascending: ``LongTensor`` of shape ``(num_kept,)``."""
    s = kept_slice(family, n, dp, offset)
    return torch.arange(s.start, s.stop, s.step, dtype=torch.long)


def time_chunks(steps: int, classes: int) -> list[tuple[int, int, int]]:
    """The ``classes`` equal contiguous chunks of ``steps`` time steps as ``(class, start, stop)``, empty
    chunks left out: step ``t`` is in class ``t * classes // steps``. An RNN site with ``row_classes``
    gives each chunk its own pattern (the RNN runs chunk after chunk, its state carried across)."""
    if steps < 0 or classes < 1:
        raise ValueError(f"time_chunks needs steps >= 0 and classes >= 1, got steps={steps}, classes={classes}")
    bounds = [-(-c * steps // classes) for c in range(classes + 1)]  # first step of class c: ceil(c T / K)
    return [(c, bounds[c], bounds[c + 1]) for c in range(classes) if bounds[c] < bounds[c + 1]]


def time_classes(steps: int, classes: int) -> torch.Tensor:
    """The class of each of ``steps`` time steps (:func:`time_chunks`): ``LongTensor (steps,)``."""
    out = torch.empty(steps, dtype=torch.long)
    for c, start, stop in time_chunks(steps, classes):
        out[start:stop] = c
    return out


def scale_value(dp: int, scale: str = "kept", p: float = 0.0) -> float:
    """Multiplier for kept units or tiles: ``dp`` (``scale="kept"``) or ``1 / (1 - p)`` (``"rate"``).

    ``dp = 1`` (nothing dropped) gives 1 under ``"kept"``; ``"rate"`` with ``p = 0`` gives 1 too.
    """
    check_scale(scale)
    if scale == "kept":
        return float(dp)
    return 1.0 / (1.0 - p)


def unit_scale(family: str, n: int, dp: int, offset: int, scale: str = "kept", p: float = 0.0) -> float:
    """Multiplier for the kept units of a unit pattern (see :func:`scale_value`)."""
    _check(n, dp, offset)
    check_family(family, UNIT_FAMILIES)
    return scale_value(dp, scale, p)


def unit_mask(family: str, n: int, dp: int, offset: int, scale: str = "kept", p: float = 0.0,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The multiplier a unit pattern applies: shape ``(n,)``, 0 where dropped, the scale where kept."""
    mask = torch.zeros(n, dtype=dtype)
    mask[kept_slice(family, n, dp, offset)] = unit_scale(family, n, dp, offset, scale, p)
    return mask


def tile_grid(shape: tuple[int, int], tile: int) -> tuple[int, int]:
    out_features, in_features = shape
    if tile < 1:
        raise ValueError(f"tile size must be >= 1, got {tile}")
    if out_features < 1 or in_features < 1:
        raise ValueError(f"tile patterns need a non-empty weight, got shape {tuple(shape)}")
    return -(-out_features // tile), -(-in_features // tile)


def tile_mask(shape: tuple[int, int], tile: int, dp: int, offset: int) -> torch.Tensor:
    """Which tiles of a weight ``(out, in)`` are kept, per tile: ``BoolTensor (rows, cols)`` (maybe none)."""
    Pattern(dp, offset).check()
    rows, cols = tile_grid(shape, tile)
    i = torch.arange(rows).unsqueeze(1)
    j = torch.arange(cols).unsqueeze(0)
    return (i + j - offset) % dp == 0


def tile_scale(shape: tuple[int, int], tile: int, dp: int, offset: int, scale: str = "kept",
               p: float = 0.0) -> float:
    tile_grid(shape, tile)
    Pattern(dp, offset).check()
    return scale_value(dp, scale, p)


def tile_weight_mask(shape: tuple[int, int], tile: int, dp: int, offset: int, scale: str = "kept",
                     p: float = 0.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The multiplier a tile pattern applies to the weight: shape ``(out, in)``."""
    per_tile = tile_mask(shape, tile, dp, offset)
    full = per_tile.repeat_interleave(tile, 0).repeat_interleave(tile, 1)[: shape[0], : shape[1]]
    return full.to(dtype) * tile_scale(shape, tile, dp, offset, scale, p)


def tile_groups(shape: tuple[int, int], tile: int, dp: int, offset: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The kept tiles grouped by residue class of the tile row: ``[(rows, cols), ...]``.

    Tile row ``i`` keeps exactly the tile columns ``j = (offset - i) mod dp (+ k dp)``, so all output
    rows whose tile row has the same residue ``i mod dp`` read the same input columns: each group is
    one dense GEMM ``y[:, rows] = x[:, cols] @ W[rows][:, cols]^T``. Every output row is in exactly one
    group; ``cols`` may be empty (that row tile keeps nothing). Indices are unit indices (LongTensor).
    """
    Pattern(dp, offset).check()
    out_features, in_features = shape
    grid_rows, _ = tile_grid(shape, tile)
    row_ids = torch.arange(out_features)
    col_ids = torch.arange(in_features)
    groups = []
    for residue in range(min(dp, grid_rows)):
        rows = row_ids[(row_ids // tile) % dp == residue]
        cols = col_ids[(col_ids // tile) % dp == (offset - residue) % dp]
        groups.append((rows, cols))
    return groups

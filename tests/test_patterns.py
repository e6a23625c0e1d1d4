"""fxdrop.patterns: index math of the row, block and tile families against direct definitions."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxdrop import patterns as P


def _row_by_definition(n, dp, offset):
    kept = [u for u in range(n) if u % dp == offset]
    return kept or [offset % n]


def _block_by_definition(n, dp, offset):
    k = n // dp
    if k == 0:
        return [offset % n]
    blocks = [list(range(b * k, (b + 1) * k)) for b in range(dp)]
    blocks[-1] = list(range((dp - 1) * k, n))  # the last block absorbs the remainder
    return blocks[offset]


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 200), dp=st.integers(1, 12), data=st.data())
def test_unit_families_match_definition(n, dp, data):
    offset = data.draw(st.integers(0, dp - 1))
    assert P.kept("row", n, dp, offset).tolist() == _row_by_definition(n, dp, offset)
    assert P.kept("block", n, dp, offset).tolist() == _block_by_definition(n, dp, offset)
    for family in P.UNIT_FAMILIES:
        assert P.num_kept(family, n, dp, offset) == len(P.kept(family, n, dp, offset)) >= 1


@pytest.mark.parametrize("family", P.UNIT_FAMILIES)
@pytest.mark.parametrize("n,dp", [(64, 4), (70, 8), (5, 8), (1, 3), (9, 9)])
def test_every_unit_in_exactly_one_pattern_when_dp_fits(family, n, dp):
    if dp > n:
        for offset in range(dp):
            assert P.num_kept(family, n, dp, offset) == 1
        return
    counts = torch.zeros(n, dtype=torch.long)
    for offset in range(dp):
        counts[P.kept(family, n, dp, offset)] += 1
    assert counts.eq(1).all()


@pytest.mark.parametrize("family", P.UNIT_FAMILIES)
def test_unit_mask_scale(family):
    mask = P.unit_mask(family, 10, 3, 2)
    kept = P.kept(family, 10, 3, 2)
    assert mask[kept].eq(10 / len(kept)).all() and mask.sum().item() == pytest.approx(10.0)
    rate = P.unit_mask(family, 10, 3, 2, scale="rate", p=0.6)
    assert rate[kept].allclose(torch.full((len(kept),), 2.5))


def _tile_by_definition(shape, tile, dp, offset):
    rows, cols = -(-shape[0] // tile), -(-shape[1] // tile)
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        for j in range(cols):
            keep[i, j] = (i + j - offset) % dp == 0
    if not keep.any():
        return _tile_by_definition(shape, tile, dp, offset % (rows + cols - 1))
    return keep


@settings(max_examples=200, deadline=None)
@given(out_f=st.integers(1, 100), in_f=st.integers(1, 100), tile=st.sampled_from([1, 4, 8, 32]),
       dp=st.integers(1, 8), data=st.data())
def test_tile_mask_diagonal_and_never_empty(out_f, in_f, tile, dp, data):
    offset = data.draw(st.integers(0, dp - 1))
    mask = P.tile_mask((out_f, in_f), tile, dp, offset)
    assert torch.equal(mask, _tile_by_definition((out_f, in_f), tile, dp, offset))
    assert mask.any()
    groups = P.tile_groups((out_f, in_f), tile, dp, offset)
    rebuilt = torch.zeros(out_f, in_f, dtype=torch.bool)
    for rows, cols in groups:
        rebuilt[rows.unsqueeze(1), cols.unsqueeze(0)] = True
    full = mask.repeat_interleave(tile, 0).repeat_interleave(tile, 1)[:out_f, :in_f]
    assert torch.equal(rebuilt, full)
    assert sorted(torch.cat([r for r, _ in groups]).tolist()) == list(range(out_f))


def test_tile_rows_see_different_columns():
    """Diagonal numbering: with dp dividing the tile columns, rows still see different columns."""
    mask = P.tile_mask((128, 128), 32, 2, 0)
    assert not torch.equal(mask[0], mask[1])


def test_tile_weight_mask_scale():
    mask = P.tile_weight_mask((64, 64), 32, 2, 1)
    assert set(mask.unique().tolist()) == {0.0, 2.0}


@pytest.mark.parametrize("bad", [(0, 0), (3, 3), (3, -1)])
def test_bad_patterns(bad):
    with pytest.raises(ValueError, match="Pattern"):
        P.kept("row", 10, *bad)


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown pattern family 'diag'"):
        P.kept("diag", 10, 2, 0)
    with pytest.raises(ValueError, match="unknown pattern family 'tile'"):
        P.kept("tile", 10, 2, 0)

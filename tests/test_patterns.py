"""fxdrop.patterns: index math of the row, block and tile families against direct definitions, and the
exactness every site relies on: each unit (tile) kept with probability exactly 1/dp, and an expected
multiplier of exactly 1 per unit, for every width."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxdrop import patterns as P
from fxdrop.search import search_distribution


def _row_by_definition(n, dp, offset):
    return [u for u in range(n) if u % dp == offset]


def _block_by_definition(n, dp, offset):
    """Block b of the balanced partition: units u with floor(b n / dp) <= u < floor((b + 1) n / dp)."""
    return [u for u in range(n) if (offset * n) // dp <= u < ((offset + 1) * n) // dp]


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 200), dp=st.integers(1, 12), data=st.data())
def test_unit_families_match_definition(n, dp, data):
    offset = data.draw(st.integers(0, dp - 1))
    assert P.kept("row", n, dp, offset).tolist() == _row_by_definition(n, dp, offset)
    assert P.kept("block", n, dp, offset).tolist() == _block_by_definition(n, dp, offset)
    for family in P.UNIT_FAMILIES:
        assert P.num_kept(family, n, dp, offset) == len(P.kept(family, n, dp, offset))


@pytest.mark.parametrize("family", P.UNIT_FAMILIES)
@pytest.mark.parametrize("n,dp", [(64, 4), (70, 8), (5, 8), (1, 3), (9, 9), (10, 3), (3, 4)])
def test_every_unit_in_exactly_one_pattern(family, n, dp):
    """Whatever the width, even narrower than dp: so a uniform offset keeps each unit with probability 1/dp."""
    counts = torch.zeros(n, dtype=torch.long)
    for offset in range(dp):
        counts[P.kept(family, n, dp, offset)] += 1
    assert counts.eq(1).all()


@pytest.mark.parametrize("family", P.UNIT_FAMILIES)
@pytest.mark.parametrize("n", [1, 3, 10, 16, 33])
@pytest.mark.parametrize("p", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("scale", P.SCALE_MODES)
def test_per_unit_drop_rate_and_expected_multiplier_are_exact(family, n, p, scale):
    """Exact expectation over the distribution (no sampling): drop rate p and mean multiplier 1 per unit."""
    dist = search_distribution(p, max_dp="auto")
    drop = torch.zeros(n, dtype=torch.float64)
    mean = torch.zeros(n, dtype=torch.float64)
    for dp, weight in enumerate(dist.probs.tolist(), start=1):
        for offset in range(dp):
            mask = P.unit_mask(family, n, dp, offset, scale, p, dtype=torch.float64)
            drop += weight / dp * (mask == 0).double()
            mean += weight / dp * mask
    torch.testing.assert_close(drop, torch.full((n,), p, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(mean, torch.ones(n, dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("family", P.UNIT_FAMILIES)
@pytest.mark.parametrize("n,dp", [(10, 3), (7, 4), (3, 5)])
def test_kept_scale_is_unbiased_given_the_period(family, n, dp):
    """``"kept"`` multiplies by dp: for each drawn period alone, every unit's mean multiplier is 1."""
    mean = sum(P.unit_mask(family, n, dp, offset, dtype=torch.float64) for offset in range(dp)) / dp
    torch.testing.assert_close(mean, torch.ones(n, dtype=torch.float64))


@pytest.mark.parametrize("family", P.UNIT_FAMILIES)
def test_unit_mask_scale(family):
    mask = P.unit_mask(family, 12, 3, 2)
    kept = P.kept(family, 12, 3, 2)
    assert mask[kept].eq(3.0).all() and mask.sum().item() == pytest.approx(12.0)
    rate = P.unit_mask(family, 12, 3, 2, scale="rate", p=0.6)
    assert rate[kept].allclose(torch.full((len(kept),), 2.5))
    assert P.unit_mask(family, 10, 1, 0).eq(1).all()  # dp = 1 keeps everything, scale 1


def _tile_by_definition(shape, tile, dp, offset):
    rows, cols = -(-shape[0] // tile), -(-shape[1] // tile)
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        for j in range(cols):
            keep[i, j] = (i + j - offset) % dp == 0
    return keep


@settings(max_examples=200, deadline=None)
@given(out_f=st.integers(1, 100), in_f=st.integers(1, 100), tile=st.sampled_from([1, 4, 8, 32]),
       dp=st.integers(1, 8), data=st.data())
def test_tile_mask_diagonal_and_groups(out_f, in_f, tile, dp, data):
    offset = data.draw(st.integers(0, dp - 1))
    mask = P.tile_mask((out_f, in_f), tile, dp, offset)
    assert torch.equal(mask, _tile_by_definition((out_f, in_f), tile, dp, offset))
    groups = P.tile_groups((out_f, in_f), tile, dp, offset)
    rebuilt = torch.zeros(out_f, in_f, dtype=torch.bool)
    for rows, cols in groups:
        rebuilt[rows.unsqueeze(1), cols.unsqueeze(0)] = True
    full = mask.repeat_interleave(tile, 0).repeat_interleave(tile, 1)[:out_f, :in_f]
    assert torch.equal(rebuilt, full)
    assert sorted(torch.cat([r for r, _ in groups]).tolist()) == list(range(out_f))


@pytest.mark.parametrize("shape,tile,dp", [((8, 8), 32, 3), ((64, 40), 32, 4), ((100, 7), 8, 5)])
def test_every_tile_in_exactly_one_pattern_even_below_one_tile(shape, tile, dp):
    """A weight smaller than one tile still drops: its one tile is kept by one offset in dp."""
    counts = sum(P.tile_mask(shape, tile, dp, offset).long() for offset in range(dp))
    assert counts.eq(1).all()


def test_tile_rows_see_different_columns():
    """Diagonal numbering: with dp dividing the tile columns, rows still see different columns."""
    mask = P.tile_mask((128, 128), 32, 2, 0)
    assert not torch.equal(mask[0], mask[1])


def test_tile_weight_mask_scale():
    mask = P.tile_weight_mask((64, 64), 32, 2, 1)
    assert set(mask.unique().tolist()) == {0.0, 2.0}
    for shape, offset in itertools.product([(8, 8), (40, 72)], range(3)):
        assert P.tile_scale(shape, 32, 3, offset) == 3.0


@pytest.mark.parametrize("bad", [(0, 0), (3, 3), (3, -1)])
def test_bad_patterns(bad):
    with pytest.raises(ValueError, match="Pattern"):
        P.kept("row", 10, *bad)


def test_unknown_family_and_scale():
    with pytest.raises(ValueError, match="unknown pattern family 'diag'"):
        P.kept("diag", 10, 2, 0)
    with pytest.raises(ValueError, match="unknown pattern family 'tile'"):
        P.kept("tile", 10, 2, 0)
    with pytest.raises(ValueError, match="unknown scale mode 'dense'"):
        P.unit_mask("row", 10, 2, 0, scale="dense")

"""fxdrop.site.Site: creation errors, last pattern and mask."""

import pytest
import torch

import fxdrop.ops  # noqa: F401
from fxdrop import patterns as P
from fxdrop.site import Site


def test_last_mask_follows_last_draw():
    site = Site.create("drop1", 0.5, "block", seed=3, units=10)
    assert site.last_pattern is None and site.last_mask is None
    drawn = site.sample()
    pattern = site.last_pattern
    assert tuple(drawn.tolist()) == tuple(pattern)
    assert torch.equal(site.last_mask, P.unit_mask("block", 10, *pattern))


def test_tile_site_mask_has_weight_shape():
    site = Site.create("fc", 0.5, "tile", seed=0, weight_shape=(40, 70), tile=8)
    site.sample()
    mask = site.last_mask
    assert mask.shape == (40, 70)
    assert torch.equal(mask, P.tile_weight_mask((40, 70), 8, *site.last_pattern))


def test_errors_name_the_site():
    with pytest.raises(ValueError, match="site 'encoder.drop'.*unknown scale mode"):
        Site.create("encoder.drop", 0.5, "row", scale="auto", units=4)
    with pytest.raises(ValueError, match="p of dropout site 'head.drop'=0.95 is not reachable with max_dp=8"):
        Site.create("head.drop", 0.95, "row", max_dp=8, units=4)
    with pytest.raises(ValueError, match="unknown pattern family 'diag'"):
        Site.create("x", 0.5, "diag", units=4)

"""fxdrop.site.Site: rate and mode from the owner, last pattern and mask, errors naming the site."""

import pytest
import torch
from torch import nn

import fxdrop.ops  # noqa: F401
from fxdrop import patterns as P
from fxdrop.site import CallerOwner, ModuleOwner, Site


def test_last_mask_follows_last_draw():
    site = Site("drop1", "block", CallerOwner(None, 0.5), seed=3, units=10)
    assert site.last_pattern is None and site.last_mask is None
    drawn = site.sample()
    pattern = site.last_pattern
    assert tuple(drawn.tolist()) == tuple(pattern)
    assert torch.equal(site.last_mask, P.unit_mask("block", 10, *pattern))


def test_tile_site_mask_has_weight_shape():
    site = Site("fc", "tile", CallerOwner(None, 0.5), seed=0, weight_shape=(40, 70), tile=8)
    site.sample()
    mask = site.last_mask
    assert mask.shape == (40, 70)
    assert torch.equal(mask, P.tile_weight_mask((40, 70), 8, *site.last_pattern))


def test_rate_and_mode_are_the_owners():
    dropout = nn.Dropout(0.5)
    site = Site("drop", "row", ModuleOwner(dropout), seed=1, units=8)
    assert site.active and site.p == 0.5
    dropout.p = 0.7
    site.sample()
    assert site.scheduler.distribution.p == 0.7  # the next draw follows a changed rate
    dropout.eval()
    assert not site.active and site.rate == 0.0
    assert site.sample().tolist() == [1, 0] and site.scheduler.draws == 1  # inactive: keep all, no draw
    dropout.train()
    dropout.p = 0.0
    assert not site.active
    site.p = 0.3  # the setter writes the owner's rate
    assert dropout.p == 0.3


def test_errors_name_the_site():
    with pytest.raises(ValueError, match="unknown scale mode 'auto'"):
        Site("encoder.drop", "row", CallerOwner(None, 0.5), scale="auto", units=4)
    with pytest.raises(ValueError, match="p of dropout site 'head.drop'=0.95 is not reachable with max_dp=8"):
        Site("head.drop", "row", CallerOwner(None, 0.95), max_dp=8, units=4)
    with pytest.raises(ValueError, match="unknown pattern family 'diag'"):
        Site("x", "diag", CallerOwner(None, 0.5), units=4)
    with pytest.raises(ValueError, match="site 'x': granularity='rows' needs a unit family"):
        Site("x", "tile", CallerOwner(None, 0.5), granularity="rows", weight_shape=(4, 4))
    dropout = nn.Dropout(0.5)
    site = Site("drop", "row", ModuleOwner(dropout), units=4)
    dropout.p = 1.0
    with pytest.raises(ValueError, match=r"p of dropout site 'drop'=1.0 is outside \[0, 1\)"):
        site.sample()

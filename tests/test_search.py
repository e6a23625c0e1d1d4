"""fxdrop.search_distribution: rate, entropy and errors."""

import math

import pytest
import torch

from fxdrop import search_distribution
from fxdrop.search import largest_reachable, max_dp_for


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.7, 0.8])
@pytest.mark.parametrize("max_dp", [8, 12])
def test_exact_rate_and_max_entropy(p, max_dp):
    dist = search_distribution(p, max_dp=max_dp)
    assert dist.probs.dtype == torch.float64 and dist.probs.shape == (max_dp,)
    assert dist.probs.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert abs(dist.rate - p) < 1e-9
    # Maximum entropy: no feasible perturbation keeping sum and rate raises the entropy.
    r = torch.tensor([(d - 1) / d for d in range(1, max_dp + 1)], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        v = torch.randn(max_dp, generator=gen, dtype=torch.float64)
        basis = torch.stack([torch.ones_like(r), r])
        v = v - basis.T @ torch.linalg.lstsq(basis.T, v).solution  # orthogonal to both constraints
        moved = dist.probs + 1e-4 * v / v.norm()
        if (moved > 0).all():
            entropy = -(moved * moved.log()).sum().item()
            assert entropy <= dist.entropy + 1e-12


@pytest.mark.parametrize("p", [0.3, 0.5, 0.7])
def test_sgd_search_close_to_exact(p):
    exact = search_distribution(p)
    sgd = search_distribution(p, method="sgd")
    assert abs(sgd.rate - p) < 1e-3
    # The paper's search reaches (nearly) the maximum entropy; report both in the failure message.
    assert sgd.entropy <= exact.entropy + 1e-9
    assert sgd.entropy >= 0.95 * exact.entropy, f"sgd entropy {sgd.entropy:.4f} vs exact {exact.entropy:.4f}"


def test_zero_rate_is_dense():
    dist = search_distribution(0.0)
    assert dist.probs[0] == 1.0 and dist.rate == 0.0


def test_largest_reachable_is_point_mass():
    dist = search_distribution(0.875, max_dp=8)
    assert dist.probs[-1] == 1.0


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, math.nan])
def test_out_of_range(p):
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        search_distribution(p)


def test_unreachable_names_fix():
    with pytest.raises(ValueError, match=r"largest reachable drop rate is 0.75.*max_dp=10"):
        search_distribution(0.9, max_dp=4)
    assert max_dp_for(0.9) == 10 and max_dp_for(0.5) == 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown search method"):
        search_distribution(0.5, method="adam")
    with pytest.raises(TypeError, match="p must be a real number"):
        search_distribution("0.5")
    with pytest.raises(ValueError, match="max_dp must be an int"):
        search_distribution(0.5, max_dp=0)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.3, 0.5, 0.6, 0.7, 0.9])
def test_auto_is_the_tightest_support_that_reaches_p(p):
    dist = search_distribution(p, max_dp="auto")
    assert abs(dist.rate - p) < 1e-9
    assert dist.max_dp == max_dp_for(p)
    assert largest_reachable(dist.max_dp) >= p and (dist.max_dp == 1 or largest_reachable(dist.max_dp - 1) < p)
    assert dist.entropy >= 0.0


def test_auto_at_half_is_always_every_other_unit():
    dist = search_distribution(0.5, max_dp="auto")
    assert dist.probs.tolist() == [0.0, 1.0] and dist.entropy == 0.0


def test_max_dp_names_auto_in_errors():
    with pytest.raises(ValueError, match="max_dp must be an int >= 1 or 'auto', got 'tight'"):
        search_distribution(0.5, max_dp="tight")


def test_any_real_scalar_is_a_rate():
    np = pytest.importorskip("numpy")
    for value in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25), 0.25):
        assert search_distribution(value, max_dp="auto").p == pytest.approx(0.25)


@pytest.mark.parametrize("p", [0.9999, 1 - 1e-12])
def test_rates_beyond_the_largest_period_are_a_clear_error(p):
    """p just below 1 with max_dp='auto' would need 10^4..10^12 periods: refused, not allocated."""
    with pytest.raises(ValueError, match="fxdrop draws periods up to 1024"):
        search_distribution(p, max_dp="auto")
    with pytest.raises(ValueError, match="above fxdrop's limit of 1024"):
        search_distribution(0.5, max_dp=10**5)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.6, 0.7, 0.85, 0.93])
def test_narrow_reaches_p_on_the_two_periods_around_it_with_the_least_spread(p):
    """method="narrow": all mass on floor and ceil of 1 / (1 - p), the rate exact, and the kept share 1/dp
    spread less than under the maximum-entropy distribution (which draws sparser and denser steps)."""
    narrow, widest = search_distribution(p, max_dp="auto", method="narrow"), search_distribution(p, max_dp=16)
    assert abs(narrow.rate - p) < 1e-9 and narrow.probs.sum().item() == pytest.approx(1.0, abs=1e-12)
    lo = math.floor(1 / (1 - p))
    support = {k + 1 for k in range(narrow.max_dp) if narrow.probs[k] > 0}
    assert support == {lo, lo + 1}, support
    share = 1.0 / torch.arange(1, 17, dtype=torch.float64)

    def spread(dist):
        probs = torch.nn.functional.pad(dist.probs, (0, 16 - dist.max_dp))
        return float((probs * share**2).sum() - (probs * share).sum() ** 2)

    assert spread(narrow) < spread(widest)
    assert torch.equal(search_distribution(p, max_dp=16, method="narrow").probs[:narrow.max_dp], narrow.probs)


@pytest.mark.parametrize("p, dp", [(0.0, 1), (0.5, 2), (0.75, 4), (0.9, 10)])
def test_narrow_is_a_point_mass_where_one_period_has_rate_p(p, dp):
    dist = search_distribution(p, max_dp="auto", method="narrow")
    assert dist.probs[dp - 1] == 1.0 and dist.rate == pytest.approx(p, abs=1e-12)

"""fxdrop.PatternScheduler: reproducibility, resume, independence from the global RNG, statistics."""

import pytest
import torch

import fxdrop.ops  # noqa: F401  (registers fxdrop::sample_pattern)
from fxdrop import PatternScheduler, search_distribution
from fxdrop import patterns as P


def test_same_seed_same_sequence_and_global_rng_untouched():
    a = PatternScheduler(search_distribution(0.5), seed=7)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    seq_a = [a.sample() for _ in range(50)]
    assert torch.equal(before, torch.get_rng_state())
    b = PatternScheduler(search_distribution(0.5), seed=7)
    assert [b.sample() for _ in range(50)] == seq_a
    c = PatternScheduler(search_distribution(0.5), seed=8)
    assert [c.sample() for _ in range(50)] != seq_a


def test_resume_continues_identical_sequence():
    a = PatternScheduler(search_distribution(0.3), seed=1)
    for _ in range(13):
        a.sample()
    state = a.state_dict()
    expected = [a.sample() for _ in range(20)]
    b = PatternScheduler(search_distribution(0.3), seed=99)
    b.load_state_dict(state)
    assert [b.sample() for _ in range(20)] == expected


def test_op_and_python_draws_agree_and_count():
    a = PatternScheduler(search_distribution(0.7), seed=3)
    b = PatternScheduler(search_distribution(0.7), seed=3)
    for _ in range(30):
        assert tuple(a.sample_tensor().tolist()) == tuple(b.sample())
    assert a.last_pattern == b.last_pattern
    assert a.draws == 30 and a.counts.sum().item() == 30 and torch.equal(a.counts, b.counts)


def test_load_state_dict_rejects_other_distribution():
    a = PatternScheduler(search_distribution(0.3), seed=1)
    b = PatternScheduler(search_distribution(0.5), seed=1)
    with pytest.raises(ValueError, match="saved distribution differs"):
        b.load_state_dict(a.state_dict())


def test_sample_frequencies_follow_distribution():
    dist = search_distribution(0.5)
    sched = PatternScheduler(dist, seed=0)
    for _ in range(20000):
        sched.sample()
    freq = sched.counts.double() / 20000
    se = (dist.probs * (1 - dist.probs) / 20000).sqrt()
    assert ((freq - dist.probs).abs() <= 4 * se + 1e-12).all()


@pytest.mark.parametrize("max_dp", [8, "auto"])
@pytest.mark.parametrize("family", ["row", "block"])
@pytest.mark.parametrize("p", [0.3, 0.5, 0.7])
def test_every_unit_dropped_with_probability_p(family, p, max_dp, record_property):
    n, samples = 64, 20000
    sched = PatternScheduler(search_distribution(p, max_dp=max_dp), seed=11)
    kept = torch.zeros(samples, n, dtype=torch.bool)
    for s in range(samples):
        dp, offset = sched.sample()
        kept[s, P.kept_slice(family, n, dp, offset)] = True
    dropped = (~kept).double()
    rate = dropped.mean(0)
    se = (p * (1 - p) / samples) ** 0.5
    assert ((rate - p).abs() <= 4 * se).all(), f"worst unit off by {(rate - p).abs().max():.4f}, 4 se = {4 * se:.4f}"
    # Mean pairwise co-drop correlation (Bernoulli dropout has 0); reported, not bounded.
    corr = torch.corrcoef(dropped.T)
    off_diag = corr[~torch.eye(n, dtype=torch.bool)]
    record_property(f"codrop_corr_{family}_{p}_{max_dp}", round(off_diag.mean().item(), 4))


@pytest.mark.parametrize("p,max_dp", [(0.3, "auto"), (0.5, "auto"), (0.7, "auto"), (0.5, 8)])
@pytest.mark.parametrize("classes", [3, 4, 5])
def test_class_plans_give_every_class_each_pattern_with_its_mass(p, max_dp, classes):
    """Every class (and so every row) uses (dp, offset) with probability P(dp)/dp."""
    from fxdrop.scheduler import draw_classes, support

    dist = search_distribution(p, max_dp=max_dp)
    probs = dist.probs.tolist()
    patterns = support(len(probs))
    index = {pattern: k for k, pattern in enumerate(patterns)}
    q = torch.tensor([probs[pat.dp - 1] / pat.dp for pat in patterns], dtype=torch.float64)
    draws = 6000
    hits = torch.zeros(classes, len(patterns), dtype=torch.float64)
    for counter in range(draws):
        plan = draw_classes(17, counter, probs, classes)
        assert len(plan) == classes
        for c, pattern in enumerate(plan):
            hits[c, index[pattern]] += 1
    freq = hits / draws
    se = (q * (1 - q) / draws).sqrt()
    assert ((freq - q).abs() <= 4.5 * se + 1e-12).all(), f"worst {(freq - q).abs().max():.4f}"
    assert draw_classes(17, 5, probs, classes) == draw_classes(17, 5, probs, classes)  # pure in (seed, counter)


def test_class_plan_at_half_keeps_even_units_in_alternate_rows():
    """p = 0.5, dp = 2 only, two classes: the quantiles u/2 and (u+1)/2 give (2, 0) to one class and
    (2, 1) to the other; the rotation moves which class keeps the even units."""
    from fxdrop.scheduler import Pattern, draw_classes

    seen = set()
    for counter in range(50):
        plan = draw_classes(3, counter, [0.0, 1.0], 2)
        assert set(plan) == {Pattern(2, 0), Pattern(2, 1)}
        seen.add(plan[0])
    assert len(seen) == 2


def test_class_plan_repeats_where_one_pattern_has_a_large_mass():
    """p = 0.3: dp = 1 has mass 0.57, so both quantiles of a two-class plan fall on it whenever u < 0.14:
    the op then runs one full-width pass instead of two."""
    from fxdrop.scheduler import Pattern, draw_classes

    probs = search_distribution(0.3).probs.tolist()
    same = sum(draw_classes(5, counter, probs, 2) == [Pattern(1, 0)] * 2 for counter in range(4000)) / 4000
    assert abs(same - (2 * probs[0] - 1)) < 0.03, same

"""fxdrop.PatternScheduler: reproducibility, resume, independence from the global RNG, statistics."""

import math

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
    """p = 0.5, dp = 2 only: the quantiles u/4 .. (u+3)/4 give (2, 0) to two classes and (2, 1) to two,
    interleaved (classes c and c + 2 agree), so the op runs them as two strided halves."""
    from fxdrop.scheduler import Pattern, draw_classes

    seen = set()
    for counter in range(50):
        plan = draw_classes(3, counter, [0.0, 1.0], 4)
        assert plan[0] == plan[2] and plan[1] == plan[3] and {plan[0], plan[1]} == {Pattern(2, 0), Pattern(2, 1)}
        seen.add(plan[0])
    assert len(seen) == 2  # the rotation moves which half keeps the even units


def test_row_classes_avoid_the_inner_dimensions():
    """M is 4, or the smallest M >= 3 coprime to the leading dimensions after the first."""
    from fxdrop.scheduler import row_classes

    assert row_classes((700, 650)) == 4 and row_classes((35, 21, 650)) == 4 and row_classes((7, 650)) == 4
    assert row_classes((35, 20, 650)) == 3 and row_classes((20, 35, 650)) == 4  # (time, batch) / (batch, time)
    assert row_classes((8, 24, 16)) == 5 and row_classes((8, 30, 16)) == 7 and row_classes((2, 210, 3)) == 11
    assert row_classes((4, 5, 6, 16)) == 7  # inner 30
    for shape in ((35, 20, 650), (9, 24, 4), (3, 2, 5, 8)):  # every leading index moves rows through all classes
        m = row_classes(shape)
        cls = (torch.arange(math.prod(shape[:-1])) % m).reshape(shape[:-1])
        for dim in range(len(shape) - 1):
            moved = cls.movedim(dim, 0).reshape(shape[dim], -1)
            assert all(len(set(moved[:, k].tolist())) == min(m, shape[dim]) for k in range(moved.shape[1]))

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
def test_row_plans_give_every_position_each_pattern_with_its_mass(p, max_dp):
    """Every row, in the plan's random row order, uses (dp, offset) with probability P(dp)/dp; plans
    have ROW_GROUPS pieces and cover the rows."""
    from fxdrop.scheduler import ROW_GROUPS, draw_rows, row_order, support

    dist = search_distribution(p, max_dp=max_dp)
    probs = dist.probs.tolist()
    patterns = support(len(probs))
    index = {pattern: k for k, pattern in enumerate(patterns)}
    q = torch.tensor([probs[pat.dp - 1] / pat.dp for pat in patterns], dtype=torch.float64)
    rows, draws = 23, 6000
    hits = torch.zeros(rows, len(patterns), dtype=torch.float64)
    for counter in range(draws):
        plan = draw_rows(17, counter, probs, rows)
        assert len(plan) == ROW_GROUPS and sum(count for _, count in plan) == rows
        order = row_order(17, counter, rows)
        position = 0
        for pattern, count in plan:
            hits[order[position: position + count], index[pattern]] += 1
            position += count
    freq = hits / draws
    se = (q * (1 - q) / draws).sqrt()
    assert ((freq - q).abs() <= 4.5 * se + 1e-12).all(), f"worst {(freq - q).abs().max():.4f}"
    assert draw_rows(17, 5, probs, rows) == draw_rows(17, 5, probs, rows)  # a pure function of (seed, counter)


def test_row_plan_at_half_keeps_even_units_in_half_the_rows():
    """p = 0.5, max_dp auto: the quantiles u/4 .. (u+3)/4 give (2, 0) to two groups and (2, 1) to two."""
    from fxdrop.scheduler import Pattern, draw_rows

    for counter in range(50):
        plan = [(pattern, count) for pattern, count in draw_rows(3, counter, [0.0, 1.0], 700) if count]
        assert plan == [(Pattern(2, 0), 350), (Pattern(2, 1), 350)]


def test_merged_row_plans_keep_each_sites_rows():
    from fxdrop.scheduler import draw_rows, merge_row_plans

    a, b = draw_rows(1, 0, [0.4, 0.6], 10), draw_rows(2, 0, [0.0, 0.2, 0.8], 10)
    merged = merge_row_plans([a, b])
    assert len(merged) == len(a) + len(b) - 1 and sum(count for _, count in merged) == 10
    for site, plan in enumerate((a, b)):
        want = [pattern for pattern, count in plan for _ in range(count)]
        assert [pats[site] for pats, count in merged for _ in range(count)] == want

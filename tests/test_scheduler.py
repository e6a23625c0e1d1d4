"""fxdrop.PatternScheduler: reproducibility, resume, replays inside a backward, statistics, row-class plans."""

import pytest
import torch

import fxdrop.ops  # noqa: F401  (registers fxdrop::sample_pattern)
from fxdrop import PatternScheduler, search_distribution
from fxdrop import patterns as P
from fxdrop.scheduler import Pattern, bit_reverse, draw_classes, rotate_bits


def test_same_seed_same_sequence_whatever_the_global_rng():
    a = PatternScheduler(search_distribution(0.5), seed=7)
    torch.manual_seed(0)
    seq_a = [a.sample() for _ in range(50)]
    b = PatternScheduler(search_distribution(0.5), seed=7)
    torch.manual_seed(123)
    assert [b.sample() for _ in range(50)] == seq_a
    c = PatternScheduler(search_distribution(0.5), seed=8)
    assert [c.sample() for _ in range(50)] != seq_a


def test_a_draw_takes_one_number_from_the_global_rng_like_a_dropout_call():
    a = PatternScheduler(search_distribution(0.5), seed=7)
    torch.manual_seed(0)
    a.sample()
    after = torch.rand(1)
    torch.manual_seed(0)
    torch.randint(0, 2**62, (), dtype=torch.int64)
    assert torch.equal(torch.rand(1), after)


def test_outside_a_backward_every_draw_advances_even_from_the_same_rng_state():
    a = PatternScheduler(search_distribution(0.5), seed=7)
    for _ in range(5):
        torch.manual_seed(0)  # the same token every time
        a.sample()
    assert a.draws == 5


class _Recompute(torch.autograd.Function):
    """Draws in forward; in backward, restores the forward's RNG state and draws again (what
    torch.utils.checkpoint does), returning the patterns it drew as the gradient's side channel."""

    @staticmethod
    def forward(ctx, x, scheduler, out):
        ctx.scheduler, ctx.out, ctx.rng = scheduler, out, torch.get_rng_state()
        out.append(tuple(scheduler.sample_tensor().tolist()))
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        with torch.random.fork_rng():
            torch.set_rng_state(ctx.rng)
            ctx.out.append(tuple(ctx.scheduler.sample_tensor().tolist()))
        return grad, None, None


def test_a_draw_inside_a_backward_from_a_remembered_rng_state_replays():
    scheduler = PatternScheduler(search_distribution(0.7), seed=2)
    drawn: list = []
    x = torch.ones(3, requires_grad=True)
    ys = [_Recompute.apply(x, scheduler, drawn) for _ in range(4)]
    sum(y.sum() for y in ys).backward()
    forward, replayed = drawn[:4], drawn[4:]
    assert sorted(replayed) == sorted(forward) and scheduler.draws == 4
    reference = PatternScheduler(search_distribution(0.7), seed=2)
    assert [tuple(reference.sample()) for _ in range(4)] == forward


def test_resume_continues_identical_sequence():
    a = PatternScheduler(search_distribution(0.3), seed=1)
    for _ in range(13):
        a.sample()
    state = a.state_dict()
    expected = [a.sample() for _ in range(20)]
    b = PatternScheduler(search_distribution(0.3), seed=99)
    b.load_state_dict(state)
    assert [b.sample() for _ in range(20)] == expected


def test_op_and_python_draws_agree():
    a = PatternScheduler(search_distribution(0.7), seed=3)
    b = PatternScheduler(search_distribution(0.7), seed=3)
    for _ in range(30):
        assert tuple(a.sample_tensor().tolist()) == tuple(b.sample())
    assert a.last_pattern == b.last_pattern and a.draws == 30


def test_load_state_dict_rejects_another_layout():
    with pytest.raises(ValueError, match="saved state has shape"):
        PatternScheduler(0.5, seed=1).load_state_dict({"state": torch.zeros(5, dtype=torch.int64)})


def test_sample_frequencies_follow_distribution():
    dist = search_distribution(0.5, max_dp=8)
    sched = PatternScheduler(dist, seed=0)
    counts = torch.zeros(8, dtype=torch.float64)
    for _ in range(20000):
        counts[sched.sample().dp - 1] += 1
    freq = counts / 20000
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


def _support(max_dp):
    return [Pattern(dp, offset) for dp in range(1, max_dp + 1) for offset in range(dp)]


@pytest.mark.parametrize("p,max_dp", [(0.3, "auto"), (0.5, "auto"), (0.7, "auto"), (0.5, 8)])
@pytest.mark.parametrize("classes,position", [(2, 0), (4, 0), (8, 0), (4, 1), (8, 2)])
def test_class_plans_give_every_row_each_pattern_with_its_mass(p, max_dp, classes, position):
    """Every residue (and so every row) uses (dp, offset) with probability P(dp)/dp, at any chain position."""
    dist = search_distribution(p, max_dp=max_dp)
    cdf = torch.cumsum(dist.probs, 0).tolist()
    probs = dist.probs.tolist()
    patterns = _support(len(probs))
    index = {pattern: k for k, pattern in enumerate(patterns)}
    q = torch.tensor([probs[pat.dp - 1] / pat.dp for pat in patterns], dtype=torch.float64)
    draws = 6000
    hits = torch.zeros(classes, len(patterns), dtype=torch.float64)
    for counter in range(draws):
        plan = draw_classes(17, counter, cdf, classes, position)
        assert len(plan) == classes
        for c, pattern in enumerate(plan):
            hits[c, index[pattern]] += 1
    freq = hits / draws
    se = (q * (1 - q) / draws).sqrt()
    assert ((freq - q).abs() <= 4.5 * se + 1e-12).all(), f"worst {(freq - q).abs().max():.4f}"
    assert draw_classes(17, 5, cdf, classes) == draw_classes(17, 5, cdf, classes)  # pure in (seed, counter)


@pytest.mark.parametrize("classes", [2, 4, 8, 16])
def test_class_plan_at_half_keeps_even_or_odd_units_in_alternate_rows(classes):
    """p = 0.5, dp = 2 only: the bit-reversed quantiles give one pattern to the even residues and the other
    to the odd ones, so the chain op runs two strided row sets whatever the class count."""
    cdf = [0.0, 1.0]
    seen = set()
    for counter in range(50):
        plan = draw_classes(3, counter, cdf, classes)
        assert set(plan[0::2]) | set(plan[1::2]) == {Pattern(2, 0), Pattern(2, 1)}
        assert len(set(plan[0::2])) == 1 and len(set(plan[1::2])) == 1 and plan[0] != plan[1]
        seen.add(plan[0])
    assert len(seen) == 2


def test_consecutive_chain_sites_split_the_rows_of_a_class_between_their_masks():
    """p = 0.5 with 4 classes: the site at position 0 gives one half to the residues of one parity of bit 0,
    the site at position 1 by bit 1, so every (first-site half, second-site half) pair is used by exactly
    one residue class: rows sharing a mask at one site split evenly at the next. Position 2 uses bit 0
    again (only consecutive sites share a weight)."""
    cdf = [0.0, 1.0]
    for counter in range(40):
        first, second, third = (draw_classes(5, counter, cdf, 4, position) for position in range(3))
        assert len({(a, b) for a, b in zip(first, second)}) == 4
        assert len({(b, c) for b, c in zip(second, third)}) == 4
        assert first[0] == first[2] != first[1] == first[3]  # bit 0
        assert second[0] == second[1] != second[2] == second[3]  # bit 1
    # position 0 is the plan of before (a lone site, or a chain's first)
    assert draw_classes(5, 3, cdf, 8) == draw_classes(5, 3, cdf, 8, 0) == draw_classes(5, 3, cdf, 8, 3)


def test_rotate_bits():
    assert [rotate_bits(c, 1, 8) for c in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]
    assert [rotate_bits(c, 1, 4) for c in range(4)] == [0, 2, 1, 3]
    assert [rotate_bits(c, 5, 2) for c in range(2)] == [0, 1] and rotate_bits(0, 3, 1) == 0
    assert all(sorted(rotate_bits(c, by, 16) for c in range(16)) == list(range(16)) for by in range(6))


def test_bit_reverse():
    assert [bit_reverse(c, 8) for c in range(8)] == [0, 4, 2, 6, 1, 5, 3, 7]
    assert bit_reverse(0, 1) == 0


def test_class_plans_at_the_largest_support_are_cheap_to_draw():
    """O(classes log max_dp) per plan: max_dp = 1024 draws like max_dp = 2 (no loop over the support)."""
    cdf = torch.cumsum(search_distribution(0.999, max_dp=1024).probs, 0).tolist()
    plans = [draw_classes(1, counter, cdf, 8) for counter in range(2000)]
    assert all(1 <= pattern.dp <= 1024 and 0 <= pattern.offset < pattern.dp for plan in plans for pattern in plan)


@pytest.mark.parametrize("bad", [3, 0, 6, True])
def test_class_counts_must_be_powers_of_two(bad):
    with pytest.raises(ValueError, match="power of two"):
        draw_classes(1, 0, [1.0], bad)

"""fxdrop ops against their dense references (mask applied by multiplication), gradcheck and opcheck."""

import random
import zlib

import pytest
import torch

import fxdrop.ops as ops
from fxdrop.ops import reference as ref

ACTS = ["none", "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "leaky_relu:0.2", "elu:0.7"]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def _patterns(sites, rng, dps=range(1, 9)):
    rows = []
    for _ in range(sites):
        dp = rng.choice(list(dps))
        rows.append([dp, rng.randrange(dp)])
    return torch.tensor(rows, dtype=torch.int64)


def _chain_case(widths, lead, dtype, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, widths[0], generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weights = [(torch.randn(o, i, generator=gen, dtype=torch.float64) / i ** 0.5).to(dtype).requires_grad_()
               for i, o in zip(widths, widths[1:])]
    biases = [torch.randn(o, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
              for o in widths[1:]]
    return x, weights, biases


def _rel(got, want):
    want = want.double()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-12)).item()


def _compare(out, expect, inputs, dtype, reference=None, tol=None):
    """``out`` (the op) against ``expect`` (the dense reference) in value and in every gradient.

    bf16 rounds differently step by step, so there both are measured against the reference run in
    float64 on upcast inputs: the op may be at most twice as far from it as the bf16 reference, plus 3e-2
    (a wrong index is off by O(1)).
    """
    present = [t for t in inputs if t is not None]
    # A fixed upstream gradient: the same check every run (an unseeded one made bf16 cases flaky).
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(out.numel()), dtype=torch.float64)
    grad = grad.to(out.dtype)
    got = [out, *torch.autograd.grad(out, present, grad)]
    want = [expect, *torch.autograd.grad(expect, present, grad)]
    if dtype != torch.bfloat16:
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            torch.testing.assert_close(g, w, **(tol or TOL[dtype]))
        return
    exact_inputs = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    exact_out = reference(*exact_inputs)
    exact_present = [t for t in exact_inputs if t is not None]
    exact = [exact_out, *torch.autograd.grad(exact_out, exact_present, grad.double())]
    for g, w, e in zip(got, want, exact):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert _rel(g, e) <= 2 * _rel(w, e) + 3e-2, f"op error {_rel(g, e):.3g}, bf16 reference {_rel(w, e):.3g}"


CASES = [  # (widths, input_dropout, output_dropout)
    ([17, 13, 11], False, False),     # the fused chain
    ([17, 13], True, False),          # input-structured Linear
    ([17, 13], False, True),          # output-structured Linear, scattered
    ([17, 13, 11, 7], True, True),    # a whole MLP segment
    ([9, 31, 5], True, False),
]


@pytest.mark.parametrize("family", ["row", "block"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("lead", [(6,), (2, 3)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_chain_matches_reference(family, case, lead, bias, dtype):
    widths, inp, outp = CASES[case]
    rng = random.Random(zlib.crc32(repr((family, case, lead, bias, dtype)).encode()))  # same cases every run
    x, weights, biases = _chain_case(widths, lead, dtype, bias, rng.randrange(2**31))
    sites = len(weights) - 1 + inp + outp
    patterns = _patterns(sites, rng)
    kw = dict(family=family, activations=[rng.choice(ACTS) for _ in range(len(weights) - 1 + outp)],
              input_dropout=inp, output_dropout=outp, rates=[rng.choice([0.3, 0.5]) for _ in range(sites)],
              scale=rng.choice(["kept", "rate"]))
    out = ops.chain(x, weights, biases, patterns, **kw)
    expect = ref.chain(x, weights, biases, patterns, **kw)
    layers = len(weights)

    def reference(x, *params):
        return ref.chain(x, params[:layers], params[layers:], patterns, **kw)

    _compare(out, expect, [x, *weights, *biases], dtype, reference)


@pytest.mark.parametrize("rows, inner", [(20, 40), (100, 40), (100, 600), (300, 40)])
@pytest.mark.parametrize("family", ["row", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chain_matches_reference_in_both_gemm_orientations(rows, inner, family, dtype):
    """The CPU forward runs a Linear as w @ x.t() for few rows (or up to 256 rows with an inner size of
    512 or more) and as x @ w.t() otherwise (csrc/structured.cpp, linear_product): these shapes take each
    branch, with one pattern per forward and with 4 row classes, against the dense reference."""
    rng = random.Random(zlib.crc32(repr(("orientation", rows, inner, family, dtype)).encode()))
    x, weights, biases = _chain_case([inner, 24, 7], (rows,), dtype, True, rng.randrange(2**31))
    kw = dict(family=family, activations=["relu"], input_dropout=True, output_dropout=False, rates=[0.5, 0.5],
              scale="kept")
    layers = len(weights)
    for patterns, reference in ((_patterns(2, rng, dps=(2, 3)), ref.chain),
                                (torch.stack([_patterns(2, rng, dps=(2, 3)) for _ in range(4)]), ref.chain_classes)):
        out = ops.chain(x, weights, biases, patterns, **kw)
        expect = reference(x, weights, biases, patterns, **kw)
        tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else None
        _compare(out, expect, [x, *weights, *biases], dtype,
                 lambda x, *params: reference(x, params[:layers], params[layers:], patterns, **kw), tol)


@pytest.mark.parametrize("family", ["row", "block"])
@pytest.mark.parametrize("dp", range(1, 9))
def test_chain_every_dp_and_offset(family, dp):
    x, weights, biases = _chain_case([19, 23, 5], (4,), torch.float32, True, dp)
    for offset in range(dp):
        patterns = torch.tensor([[dp, offset]])
        kw = dict(family=family, activations=["relu"], rates=[0.5])
        _compare(ops.chain(x, weights, biases, patterns, **kw), ref.chain(x, weights, biases, patterns, **kw),
                 [x, *weights, *biases], torch.float32)


@pytest.mark.parametrize("family", ["row", "block"])
def test_chain_gradcheck(family):
    x, weights, biases = _chain_case([7, 9, 5, 3], (2, 3), torch.float64, True, 0)
    patterns = torch.tensor([[3, 1], [2, 0], [4, 3], [2, 1]])
    kw = dict(family=family, activations=["gelu", "tanh", "silu"], input_dropout=True, output_dropout=True,
              rates=[0.5] * 4)
    assert torch.autograd.gradcheck(lambda x, *p: ops.chain(x, p[:3], p[3:], patterns, **kw),
                                    (x, *weights, *biases))


def test_chain_without_input_grad_gives_weight_grads():
    x, weights, biases = _chain_case([17, 13, 11], (6,), torch.float32, True, 1)
    x = x.detach()
    patterns = torch.tensor([[3, 2]])
    kw = dict(family="block", activations=["relu"], rates=[0.5])
    _compare(ops.chain(x, weights, biases, patterns, **kw), ref.chain(x, weights, biases, patterns, **kw),
             [*weights, *biases], torch.float32)


@pytest.mark.parametrize("family", ["row", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_unit_dropout(family, dtype):
    x = torch.randn(3, 4, 21, dtype=dtype, requires_grad=True)
    for dp in range(1, 9):
        pattern = torch.tensor([dp, dp - 1])
        _compare(ops.unit_dropout(x, pattern, family=family, p=0.5),
                 ref.unit_dropout(x, pattern, family=family, p=0.5), [x], dtype,
                 lambda x: ref.unit_dropout(x, pattern, family=family, p=0.5))


@pytest.mark.parametrize("tile", [4, 32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_tile_linear(tile, bias, dtype):
    gen = torch.Generator().manual_seed(tile)
    x = torch.randn(2, 5, 70, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(45, 70, generator=gen) / 8).to(dtype).requires_grad_()
    b = torch.randn(45, generator=gen).to(dtype).requires_grad_() if bias else None
    for dp in range(1, 9):
        for offset in {0, dp - 1, dp // 2}:
            pattern = torch.tensor([dp, offset])
            _compare(ops.tile_linear(x, w, b, pattern, tile=tile, p=0.5),
                     ref.tile_linear(x, w, b, pattern, tile=tile, p=0.5), [x, w, b], dtype,
                     lambda x, w, b: ref.tile_linear(x, w, b, pattern, tile=tile, p=0.5))


def test_tile_gradcheck():
    x = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, 20, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, requires_grad=True)
    pattern = torch.tensor([3, 1])
    assert torch.autograd.gradcheck(lambda *a: ops.tile_linear(*a, pattern, tile=4, p=0.5), (x, w, b))


def _class_patterns(sites, count, rng):
    """``(count, sites, 2)`` random class patterns; half the time periodic (a shorter period the op merges)."""
    periods = [d for d in range(1, count + 1) if count % d == 0]
    period = rng.choice(periods) if rng.random() < 0.5 else count
    base = [_patterns(sites, rng) for _ in range(period)]
    return torch.stack([base[c % period] for c in range(count)])


@pytest.mark.parametrize("family", ["row", "block"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("lead", [(9,), (3, 5), (2,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_chain_row_classes_match_reference(family, case, lead, dtype):
    """Row classes: row r with class r mod M's patterns, against the dense reference class by class
    (M up to 6, so some classes have no rows; periodic patterns exercise the op's merging)."""
    widths, inp, outp = CASES[case]
    rng = random.Random(zlib.crc32(repr(("classes", family, case, lead, dtype)).encode()))
    bias = rng.random() < 0.5
    x, weights, biases = _chain_case(widths, lead, dtype, bias, rng.randrange(2**31))
    sites = len(weights) - 1 + inp + outp
    patterns = _class_patterns(sites, rng.choice([1, 2, 3, 4, 6]), rng)
    kw = dict(family=family, activations=[rng.choice(ACTS) for _ in range(len(weights) - 1 + outp)],
              input_dropout=inp, output_dropout=outp, rates=[rng.choice([0.3, 0.5]) for _ in range(sites)],
              scale=rng.choice(["kept", "rate"]))
    out = ops.chain(x, weights, biases, patterns, **kw)
    expect = ref.chain_classes(x, weights, biases, patterns, **kw)
    layers = len(weights)

    def reference(x, *params):
        return ref.chain_classes(x, params[:layers], params[layers:], patterns, **kw)

    # Weight gradients add up the classes' products in another order than the reference's autograd sum:
    # float32 rounding then differs by up to ~2e-5 at the dropout scales used (an index error is O(1)).
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else None
    _compare(out, expect, [x, *weights, *biases], dtype, reference, tol)


def test_chain_row_classes_gradcheck_merging_and_one_class_equals_one_pattern():
    x, weights, biases = _chain_case([7, 9, 5, 3], (2, 5), torch.float64, True, 0)
    a, b = [[3, 1], [2, 0], [4, 3], [2, 1]], [[1, 0], [2, 1], [3, 0], [2, 0]]
    kw = dict(family="row", activations=["gelu", "tanh", "silu"], input_dropout=True, output_dropout=True,
              rates=[0.5] * 4)
    for patterns in (torch.tensor([a, b, [[2, 0], [1, 0], [1, 0], [3, 2]]]), torch.tensor([a, b, a, b])):
        assert torch.autograd.gradcheck(lambda x, *p: ops.chain(x, p[:3], p[3:], patterns, **kw),
                                        (x, *weights, *biases))
        # One set of saved tensors per class, whether or not classes merged (compiled graphs fix the count).
        _, saved = torch.ops.fxdrop.chain(x, weights, biases, [True] * 3, patterns, "row", kw["activations"], True,
                                          True, "kept", kw["rates"])
        assert len(saved) == 2 * 3 * patterns.shape[0]
    one = ops.chain(x, weights, biases, torch.tensor(a), **kw)
    for classes in (1, 3):
        same = ops.chain(x, weights, biases, torch.tensor([a] * classes), **kw)
        torch.testing.assert_close(same, one, atol=1e-12, rtol=1e-12)


def test_chain_row_classes_bad_inputs():
    x, weights, biases = _chain_case([17, 13], (2,), torch.float32, True, 3)
    kw = dict(family="block", activations=[], input_dropout=True, rates=[0.5])
    with pytest.raises(ValueError, match=r"or \(classes, 1, 2\) with row r using class r mod classes, got"):
        ops.chain(x, weights, biases, torch.tensor([[[2, 0], [2, 1]]]), **kw)
    with pytest.raises(ValueError, match=r"or \(classes, 1, 2\)"):
        ops.chain(x, weights, biases, torch.zeros(0, 1, 2, dtype=torch.int64), **kw)
    with pytest.raises(ValueError, match=r"or \(classes, 1, 2\)"):
        ops.chain(x, weights, biases, torch.tensor([[[2.0, 0.0]]]), **kw)
    with pytest.raises(ValueError, match="offset"):  # a class without rows (2 rows, 4 classes) is checked too
        ops.chain(x, weights, biases, torch.tensor([[[2, 0]], [[2, 1]], [[2, 0]], [[2, 5]]]), **kw)


def test_sample_classes_draws_the_streams_row_class_plan():
    from fxdrop.scheduler import PatternScheduler, draw_classes

    a = PatternScheduler(0.7, seed=1)
    twin = PatternScheduler(0.7, seed=1)
    cdf = twin.cdf.tolist()
    for counter, classes in enumerate((1, 2, 8, 4)):
        plan = torch.ops.fxdrop.sample_classes(a.state, a.cdf, classes)
        assert plan.shape == (classes, 2) and plan.dtype == torch.int64
        assert [tuple(row.tolist()) for row in plan] == draw_classes(twin.seed, counter, cdf, classes)
    assert a.draws == 4
    with pytest.raises(ValueError, match="power of two"):
        torch.ops.fxdrop.sample_classes(a.state, a.cdf, 3)


def test_opcheck_every_op():
    x, weights, biases = _chain_case([17, 13, 11], (2, 3), torch.float32, True, 5)
    patterns = torch.tensor([[3, 1], [2, 0], [4, 1]])
    for family in ("row", "block"):
        torch.library.opcheck(torch.ops.fxdrop.chain.default,
                              (x, weights, biases, [True, True], patterns, family, ["gelu", "relu"], True, True,
                               "kept", [0.5, 0.5, 0.5]))
        torch.library.opcheck(torch.ops.fxdrop.unit_dropout.default, (x, patterns[0], family, "kept", 0.5))
    torch.library.opcheck(torch.ops.fxdrop.tile_linear.default, (x, weights[0], biases[0], patterns[0], 4,
                                                                  "kept", 0.5))
    from fxdrop.scheduler import new_state

    cdf = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    torch.library.opcheck(torch.ops.fxdrop.sample_pattern.default, (new_state(5), cdf))
    torch.library.opcheck(torch.ops.fxdrop.sample_classes.default, (new_state(5), cdf, 4))
    torch.library.opcheck(torch.ops.fxdrop.unit_dropout.default,
                          (x, torch.tensor([[3, 1], [2, 0], [2, 1], [1, 0]]), "row", "kept", 0.5))
    a, b = [[3, 1], [2, 0], [4, 1]], [[1, 0], [2, 1], [3, 0]]
    for classes in ([a, b, [[2, 0], [1, 0], [1, 0]]], [a, b, a, b], [a, a]):  # 3 classes; merged to 2; to 1
        for family in ("row", "block"):
            torch.library.opcheck(torch.ops.fxdrop.chain.default,
                                  (x, weights, biases, [True, True], torch.tensor(classes), family, ["gelu", "relu"],
                                   True, True, "kept", [0.5, 0.5, 0.5]))


def test_weight_grads_are_dense_parameter_shaped():
    x, weights, biases = _chain_case([16, 32, 8], (4,), torch.float32, True, 2)
    out = ops.chain(x, weights, biases, torch.tensor([[4, 1]]), family="block", activations=["relu"], rates=[0.7])
    out.sum().backward()
    hidden_grad = weights[0].grad
    assert hidden_grad.shape == weights[0].shape and hidden_grad.layout == torch.strided
    assert hidden_grad[:8].eq(0).all() and hidden_grad[16:].eq(0).all() and hidden_grad[8:16].ne(0).any()


def test_bad_inputs_name_the_culprit():
    x, weights, biases = _chain_case([17, 13, 11], (6,), torch.float32, True, 3)
    kw = dict(family="block", activations=["relu"], rates=[0.5])
    p = torch.tensor([[2, 0]])
    with pytest.raises(ValueError, match=r"weights\[1\] expects 12 input features, but weights\[0\] gives 13"):
        ops.chain(x, [weights[0], torch.randn(11, 12)], biases, p, **kw)
    with pytest.raises(TypeError, match=r"weights\[0\] is torch.float64 but x is torch.float32"):
        ops.chain(x, [weights[0].double(), weights[1]], biases, p, **kw)
    with pytest.raises(ValueError, match=r"biases\[1\] must be"):
        ops.chain(x, weights, [biases[0], torch.randn(3)], p, **kw)
    with pytest.raises(ValueError, match=r"patterns must be an int64 tensor of shape \(1, 2\)"):
        ops.chain(x, weights, biases, torch.tensor([[2, 0], [2, 1]]), **kw)
    with pytest.raises(ValueError, match="offset"):
        ops.chain(x, weights, biases, torch.tensor([[2, 2]]), **kw)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        ops.chain(x, weights, biases, p, family="block", activations=["swish"], rates=[0.5])
    with pytest.raises(ValueError, match="unknown pattern family"):
        ops.chain(x, weights, biases, p, family="tile", activations=["relu"], rates=[0.5])
    with pytest.raises(TypeError, match="floating-point"):
        ops.chain(x.long(), weights, biases, p, **kw)
    with pytest.raises(ValueError, match="unknown scale mode"):
        ops.unit_dropout(x, p[0], family="row", scale="auto")


@pytest.mark.parametrize("classes", [2, 8])
def test_sample_classes_gives_every_row_each_pattern_with_its_probability(classes):
    """Through the op: row r (residue r mod M) uses (dp, offset) with probability P(dp)/dp."""
    from fxdrop.scheduler import PatternScheduler

    sched = PatternScheduler(0.7, seed=4)
    probs = sched.distribution.probs.tolist()
    patterns = [(dp, offset) for dp in range(1, len(probs) + 1) for offset in range(dp)]
    q = torch.tensor([probs[dp - 1] / dp for dp, _ in patterns], dtype=torch.float64)
    index = {pattern: k for k, pattern in enumerate(patterns)}
    rows, draws = 11, 4000
    hits = torch.zeros(rows, len(patterns), dtype=torch.float64)
    for _ in range(draws):
        plan = torch.ops.fxdrop.sample_classes(sched.state, sched.cdf, classes)
        for row in range(rows):
            hits[row, index[tuple(plan[row % classes].tolist())]] += 1
    freq = hits / draws
    se = (q * (1 - q) / draws).sqrt()
    assert ((freq - q).abs() <= 4.5 * se + 1e-12).all(), f"worst {(freq - q).abs().max():.4f}"


@pytest.mark.parametrize("family", ["row", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unit_dropout_row_classes(family, dtype):
    x = torch.randn(7, 3, 10, dtype=dtype, requires_grad=True)
    pattern = torch.tensor([[2, 0], [3, 2], [2, 0], [1, 0]])
    out = ops.unit_dropout(x, pattern, family=family, scale="kept", p=0.5)
    expect = ref.unit_dropout(x, pattern, family=family, scale="kept", p=0.5)
    _compare(out, expect, [x], dtype)


def test_sites_narrower_than_the_period_keep_nothing_in_some_steps():
    """dp > width: the pattern keeps no unit; the op computes the bias (and zeros) for it, exactly as the
    dense reference with an all-zero mask does."""
    x, weights, biases = _chain_case([3, 2, 5], (4,), torch.float64, True, 7)
    for family in ("row", "block"):
        for patterns in ([[5, 4], [3, 2], [4, 3]], [[4, 0], [3, 2], [8, 7]]):
            kw = dict(family=family, activations=["relu", "gelu"], input_dropout=True, output_dropout=True,
                      rates=[0.7] * 3)
            out = ops.chain(x, weights, biases, torch.tensor(patterns), **kw)
            expect = ref.chain(x, weights, biases, torch.tensor(patterns), **kw)
            _compare(out, expect, [x, *weights, *biases], torch.float64)


def test_outputs_are_not_views_and_take_in_place_ops():
    """``Dropout -> Linear -> ReLU(inplace=True)`` (AlexNet's head): the op's output may be modified in place."""
    x, weights, biases = _chain_case([17, 13], (2, 3), torch.float32, True, 1)
    pattern = torch.tensor([[2, 1]])
    y = ops.chain(x, weights, biases, pattern, family="row", activations=[], input_dropout=True, rates=[0.5])
    assert not y._is_view() and y.is_contiguous()
    torch.relu_(y).sum().backward()
    z = ops.tile_linear(x, weights[0], biases[0], pattern[0], tile=4, p=0.5)
    assert not z._is_view() and z.is_contiguous()
    torch.relu_(z)
    u = ops.unit_dropout(x.transpose(0, 1), pattern[0], family="row", p=0.5)
    assert not u._is_view() and u.is_contiguous()  # the fake kernel says contiguous too


def test_double_backward_is_the_dense_references():
    """Gradient penalties (create_graph=True): the backward is then differentiable, with the same masks."""
    x, weights, biases = _chain_case([6, 7, 4], (5,), torch.float64, True, 2)
    patterns = torch.tensor([[2, 1], [3, 0], [2, 0]])
    kw = dict(family="row", activations=["tanh", "gelu"], input_dropout=True, output_dropout=True, rates=[0.5] * 3)
    assert torch.autograd.gradgradcheck(lambda x, *p: ops.chain(x, p[:2], p[2:], patterns, **kw),
                                        (x, *weights, *biases))
    classes = torch.stack([patterns, torch.tensor([[1, 0], [3, 2], [2, 1]])])
    assert torch.autograd.gradgradcheck(lambda x, *p: ops.chain(x, p[:2], p[2:], classes, **kw),
                                        (x, *weights, *biases))
    assert torch.autograd.gradgradcheck(lambda x, w, b: ops.tile_linear(x, w, b, torch.tensor([3, 1]), tile=2, p=0.5),
                                        (x, weights[0], biases[0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_like_linear(dtype):
    """Under torch.autocast the GEMM ops run in the autocast dtype, as F.linear does; float64 stays."""
    x, weights, biases = _chain_case([17, 13, 11], (6,), torch.float32, True, 4)
    patterns = torch.tensor([[2, 1], [2, 0]])
    with torch.autocast("cpu", dtype=dtype):
        y = ops.chain(x, weights, biases, patterns, family="block", activations=["relu"], input_dropout=True,
                      rates=[0.5, 0.5])
        z = ops.tile_linear(x, weights[0], biases[0], patterns[0], tile=4, p=0.5)
        assert torch.nn.functional.linear(x, weights[0], biases[0]).dtype == dtype
        d = ops.chain(x.double(), [w.double() for w in weights], [b.double() for b in biases], patterns,
                      family="block", activations=["relu"], input_dropout=True, rates=[0.5, 0.5])
    assert y.dtype == z.dtype == dtype and d.dtype == torch.float64
    expect = ref.chain(x.to(dtype), [w.to(dtype) for w in weights], [b.to(dtype) for b in biases], patterns,
                       family="block", activations=["relu"], input_dropout=True, rates=[0.5, 0.5])
    torch.testing.assert_close(y, expect, atol=5e-2, rtol=5e-2)
    y.float().sum().backward()
    assert weights[0].grad.dtype == torch.float32


def test_chain_row_classes_with_no_rows_give_zero_gradients():
    x = torch.randn(0, 5, requires_grad=True)
    w = torch.randn(3, 5, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    y = ops.chain(x, [w], [b], torch.tensor([[[2, 0]], [[2, 1]]]), family="row", activations=[], input_dropout=True,
                  rates=[0.5])
    assert y.shape == (0, 3)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))

"""fxdrop.modules.rnn: StructuredLSTM and StructuredGRU against nn.LSTM / nn.GRU with each dropout replaced
by its site's mask.

The reference runs one single-layer ``nn.LSTM``/``nn.GRU`` per layer, sharing the original Parameters,
and multiplies each layer's input by the mask its site reports (``last_mask``): broadcast over time and
batch for granularity ``"forward"``, per time step (broadcast over the batch) for ``"rows"``.
"""

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils._python_dispatch import TorchDispatchMode

from fxdrop import patterns as P
from fxdrop.config import DropoutConfig
from fxdrop.modules.rnn import StructuredGRU, StructuredLSTM, structure_rnn
from fxdrop.passes.plan import plan_rnn, rnn_blocker
from fxdrop.site import CallerOwner, Site

T, B, IN, H = 5, 3, 7, 6
KINDS = {"lstm": nn.LSTM, "gru": nn.GRU}


def make_rnn(kind="lstm", layers=2, *, bidirectional=False, batch_first=False, proj_size=0, bias=True,
             dtype=torch.float32, p=0.5, input_size=IN):
    torch.manual_seed(0)
    extra = {"proj_size": proj_size} if kind == "lstm" else {}
    return KINDS[kind](input_size, H, num_layers=layers, dropout=p, bidirectional=bidirectional,
                       batch_first=batch_first, bias=bias, dtype=dtype, **extra)


def structure(rnn, family="row", seed=3, **options):
    config = DropoutConfig(pattern=family, seed=seed, **options)
    plan = plan_rnn("rnn", rnn, config)
    return structure_rnn(rnn, name="rnn", records=plan.sites if plan else [], config=config)


def input_site(rnn, p=0.5, family="row", seed=7, granularity="forward", row_classes=2):
    """An input site whose mode follows ``rnn`` (in a converted model it follows its Dropout module)."""
    return Site("drop", family, CallerOwner(rnn, p), seed=seed, units=rnn.input_size, granularity=granularity,
                row_classes=row_classes)


def single_layers(rnn) -> list[nn.Module]:
    """One single-layer module per layer of ``rnn``, holding ``rnn``'s own Parameters."""
    directions = 2 if rnn.bidirectional else 1
    proj = getattr(rnn, "proj_size", 0)
    width = directions * (proj or rnn.hidden_size)
    layers = []
    for layer in range(rnn.num_layers):
        extra = {"proj_size": proj} if isinstance(rnn, nn.LSTM) else {}
        ref = type(rnn).__mro__[[c in (nn.LSTM, nn.GRU) for c in type(rnn).__mro__].index(True)](
            rnn.input_size if layer == 0 else width, rnn.hidden_size, bias=rnn.bias, batch_first=rnn.batch_first,
            bidirectional=rnn.bidirectional, dtype=rnn.weight_ih_l0.dtype, **extra)
        for name in ref._flat_weights_names:
            setattr(ref, name, getattr(rnn, name.replace("_l0", f"_l{layer}")))
        layers.append(ref)
    return layers


def reference(rnn, structured, x, hx=None, site=None):
    """``rnn`` with its dropouts replaced by multiplication with the sites' last masks."""
    lstm = isinstance(rnn, nn.LSTM)
    directions = 2 if rnn.bidirectional else 1
    packed = isinstance(x, nn.utils.rnn.PackedSequence)

    def masked(t, site):
        if site is None:
            return t
        mask = site.last_mask.to(t.data.dtype if packed else t.dtype)
        return t._replace(data=t.data * mask) if packed else t * mask

    h_n, c_n = [], []
    for layer, ref in enumerate(single_layers(rnn)):
        rows = slice(layer * directions, (layer + 1) * directions)
        state = None if hx is None else ((hx[0][rows], hx[1][rows]) if lstm else hx[rows])
        x, state = ref(masked(x, site), state)
        h_n.append(state[0] if lstm else state)
        if lstm:
            c_n.append(state[1])
        site = structured.layer_sites[layer] if layer < len(structured.layer_sites) else None
    return x, ((torch.cat(h_n, 0), torch.cat(c_n, 0)) if lstm else torch.cat(h_n, 0))


def _flat(out):
    x, state = out
    return [x, *(state if isinstance(state, tuple) else (state,))]


def grads(outputs, inputs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outputs]
    return torch.autograd.grad(outputs, inputs, upstream, allow_unused=True, retain_graph=True)


def check_training(rnn, structured, x, hx, atol, site=None):
    params = list(rnn.parameters())
    states = list(hx) if isinstance(hx, tuple) else ([hx] if hx is not None else [])
    inputs = [x] + states + params
    for _ in range(3):  # several draws: different patterns
        if site is not None:
            with structured.input_site_for_call(site):
                out = _flat(structured(x, hx))
        else:
            out = _flat(structured(x, hx))
        want_out = _flat(reference(rnn, structured, x, hx, site))
        for o, w in zip(out, want_out):
            torch.testing.assert_close(o, w, atol=atol, rtol=0)
        for g, w, t in zip(grads(out, inputs), grads(want_out, inputs), inputs):
            assert g.shape == t.shape  # dense, of the parameter's shape
            torch.testing.assert_close(g, w, atol=atol, rtol=0)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("family", ["row", "block"])
@pytest.mark.parametrize("granularity", ["rows", "forward"])
@pytest.mark.parametrize("layers,bidirectional,batch_first,with_hx", [
    (2, False, False, False), (3, False, True, True), (2, True, False, True), (3, True, True, False)])
def test_training_matches_masked_reference(kind, family, granularity, layers, bidirectional, batch_first, with_hx):
    rnn = make_rnn(kind, layers, bidirectional=bidirectional, batch_first=batch_first)
    structured = structure(rnn, family, granularity=granularity, row_classes=4)
    assert isinstance(structured, KINDS[kind])
    assert all(s.granularity == granularity for s in structured.layer_sites)
    x = torch.randn(B, T, IN) if batch_first else torch.randn(T, B, IN)
    x.requires_grad_()
    hx = None
    if with_hx:
        h = torch.randn(layers * (2 if bidirectional else 1), B, H, requires_grad=True)
        hx = (h, torch.randn_like(h, requires_grad=True)) if kind == "lstm" else h
    check_training(rnn, structured, x, hx, atol=1e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("family", ["row", "block"])
@pytest.mark.parametrize("granularity", ["rows", "forward"])
def test_input_site_and_fp64(kind, family, granularity):
    rnn = make_rnn(kind, 2, dtype=torch.float64)
    structured = structure(rnn, family, granularity=granularity)
    site = input_site(rnn, family=family, granularity=granularity, row_classes=8)
    x = torch.randn(T, B, IN, dtype=torch.float64, requires_grad=True)
    check_training(rnn, structured, x, None, atol=1e-10, site=site)


def test_single_layer_with_input_site_only():
    rnn = make_rnn("lstm", 1, p=0.0)
    structured = structure(rnn)
    assert structured.layer_sites == []
    x = torch.randn(T, B, IN, requires_grad=True)
    check_training(rnn, structured, x, None, atol=1e-5, site=input_site(rnn))


def test_proj_size():
    rnn = make_rnn("lstm", 3, proj_size=4, bidirectional=True)
    structured = structure(rnn, "block")
    assert all(s.units == 8 for s in structured.layer_sites)
    check_training(rnn, structured, torch.randn(T, B, IN, requires_grad=True), None, atol=1e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("granularity", ["rows", "forward"])
def test_unbatched_and_no_bias(kind, granularity):
    rnn = make_rnn(kind, 2, bias=False)
    structured = structure(rnn, granularity=granularity)
    x = torch.randn(T, IN, requires_grad=True)
    out, state = structured(x)
    ref_out, ref_state = reference(rnn, structured, x)  # nn.LSTM / nn.GRU take unbatched input too
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    h = state[0] if kind == "lstm" else state
    ref_h = ref_state[0] if kind == "lstm" else ref_state
    assert h.shape == (2, H)
    torch.testing.assert_close(h, ref_h, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("granularity", ["rows", "forward"])
def test_packed_sequence(kind, enforce_sorted, granularity):
    """A packed call takes one pattern for all its steps (with ``"rows"``: its plan's first)."""
    rnn = make_rnn(kind, 2)
    structured = structure(rnn, granularity=granularity)
    lengths = torch.tensor([5, 3, 2]) if enforce_sorted else torch.tensor([2, 5, 3])
    padded = torch.randn(T, B, IN)
    packed = pack_padded_sequence(padded, lengths, enforce_sorted=enforce_sorted)
    out, _ = structured(packed)
    ref_out, _ = reference(rnn, structured, packed)
    torch.testing.assert_close(out.data, ref_out.data, atol=1e-5, rtol=0)
    assert structured.layer_sites[0].last_mask.shape == (H,)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_eval_is_bit_identical(kind, bidirectional, batch_first):
    rnn = make_rnn(kind, 3, bidirectional=bidirectional, batch_first=batch_first)
    structured = structure(rnn)
    rnn.eval(), structured.eval()
    x = torch.randn(B, T, IN) if batch_first else torch.randn(T, B, IN)
    with structured.input_site_for_call(input_site(structured)):
        got = _flat(structured(x))
    for g, w in zip(got, _flat(rnn(x))):
        assert torch.equal(g, w)
    assert all(site.last_pattern is None for site in structured.fxdrop_sites())  # eval draws nothing


def test_rate_and_mode_are_the_modules_own():
    """``rnn.dropout`` and ``rnn.train()/eval()`` drive the layer sites, as for nn.LSTM."""
    rnn = make_rnn("lstm", 2, p=0.5)
    structured = structure(rnn)
    (site,) = structured.layer_sites
    structured.dropout = 0.0
    assert not site.active
    x = torch.randn(T, B, IN)
    rnn.dropout = 0.0  # the shared reference: both without dropout now
    assert torch.equal(structured(x)[0], nn.LSTM.forward(structured, x)[0])
    structured.dropout = 0.7
    assert site.active and site.p == 0.7
    structured(x)
    assert site.scheduler.distribution.p == 0.7 and site.scheduler.draws == 1


def test_same_parameters_and_state_dict():
    rnn = make_rnn("lstm", 3, bidirectional=True, proj_size=2)
    structured = structure(rnn)
    assert [id(p) for p in structured.parameters()] == [id(p) for p in rnn.parameters()]
    assert list(structured.state_dict()) == list(rnn.state_dict())
    other = make_rnn("lstm", 3, bidirectional=True, proj_size=2)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(1.0)
    structured.load_state_dict(other.state_dict(), strict=True)
    assert torch.equal(rnn.weight_hh_l2_reverse, other.weight_hh_l2_reverse)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_deepcopy_save_and_dtype(kind):
    rnn = make_rnn(kind, 2)
    structured = structure(rnn, seed=9)
    x = torch.randn(T, B, IN)
    twin = copy.deepcopy(structured)
    buffer = io.BytesIO()
    torch.save(structured, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    # Same scheduler state, so the same next pattern and the same output.
    out = structured(x)[0]
    assert torch.equal(twin(x)[0], out) and torch.equal(loaded(x)[0], out)
    assert torch.equal(twin.layer_sites[0].last_mask, structured.layer_sites[0].last_mask)
    assert twin.layer_sites[0].owner.rnn is twin  # the copy's sites read the copy's rate and mode
    doubled = copy.deepcopy(structured).double()
    assert doubled(x.double())[0].dtype == torch.float64


class _KernelWidths(TorchDispatchMode):
    """Records the input width of every RNN-layer kernel and GEMM run under it.

    On CPU, fp32 LSTMs run oneDNN's ``mkldnn_rnn_layer`` (its input projection is inside it); other
    builds (and GRUs) decompose into ``addmm``/``mm`` or run ``gru`` with the input projection inside.
    Either way the kernel must see the compact input.
    """

    def __init__(self):
        super().__init__()
        self.widths = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.mkldnn_rnn_layer.default:
            self.widths.append(args[0].shape[-1])
            assert args[1].shape[-1] == args[0].shape[-1]  # weight_ih shrank with the input
        elif func in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default, torch.ops.aten.matmul.default):
            a = args[1] if func is torch.ops.aten.addmm.default else args[0]
            self.widths.append(a.shape[-1])
        elif func in (torch.ops.aten.gru.input, torch.ops.aten.lstm.input):
            self.widths.append(args[0].shape[-1])
        return func(*args, **kwargs)


def used_patterns(site, granularity):
    """The patterns the last T-step call ran: with ``"rows"``, those of the classes that own a time chunk
    (8 classes at p = 0.7 leave some of the 5 steps' chunks empty)."""
    if granularity != "rows":
        return [site.last_pattern]
    plan = site.last_plan
    return [plan[c] for c, _, _ in P.time_chunks(T, len(plan))]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("family", ["row", "block"])
@pytest.mark.parametrize("granularity", ["rows", "forward"])
def test_input_kernels_see_only_kept_columns(kind, family, granularity):
    """Each kernel call's input is the compact one: with ``"rows"``, one call per time chunk, each on its
    own chunk's kept columns (T = 5 steps in 2 chunks)."""
    rnn = make_rnn(kind, 2, input_size=16, p=0.7)
    structured = structure(rnn, family, seed=11, granularity=granularity)
    site = input_site(rnn, p=0.7, family=family, granularity=granularity)
    x = torch.randn(T, B, 16)
    hidden = structured.layer_sites[0]
    for _ in range(5):
        with _KernelWidths() as kernels, structured.input_site_for_call(site):
            structured(x)
        kept_in = [P.num_kept(family, 16, *pattern) for pattern in used_patterns(site, granularity)]
        kept_hidden = [P.num_kept(family, H, *pattern) for pattern in used_patterns(hidden, granularity)]
        assert all(k in kernels.widths for k in kept_in + kept_hidden), kernels.widths
        assert 16 not in kernels.widths or 16 in kept_in


def test_rows_sites_draw_a_pattern_per_time_chunk():
    """The plan's classes are contiguous chunks of time steps: the mask is constant within a chunk, shared
    by the batch, and differs between chunks on some draw."""
    rnn = make_rnn("lstm", 2, input_size=16, p=0.5)
    structured = structure(rnn, "block", seed=5, granularity="rows", row_classes=4)
    (site,) = structured.layer_sites
    assert site.row_classes == 4
    x = torch.randn(11, B, 16)
    differ = False
    for _ in range(10):
        structured(x)
        mask = site.last_mask
        assert mask.shape == (11, 1, H)
        for c, start, stop in P.time_chunks(11, 4):
            assert (mask[start:stop] == mask[start]).all()
            assert torch.equal(mask[start, 0], site.mask(site.last_plan[c]))
        differ |= not (mask == mask[0]).all()
    assert differ


def test_blockers_and_errors():
    rnn = make_rnn("lstm", 2)
    structured = structure(rnn)
    with pytest.raises(ValueError, match="an input site of rnn must be a unit site of 7 units"):
        with structured.input_site_for_call(Site("drop", "row", CallerOwner(None, 0.5), units=5)):
            pass

    class MyLSTM(nn.LSTM):
        pass

    assert "not exactly torch.nn.LSTM or torch.nn.GRU" in rnn_blocker(MyLSTM(3, 3))
    assert rnn_blocker(rnn) is None and rnn_blocker(structured) is None
    assert "tile family does not apply" in rnn_blocker(nn.GRU(3, 3), "tile")
    rnn.register_forward_hook(lambda *a: None)
    assert "has hooks" in rnn_blocker(rnn)
    with pytest.raises(ValueError, match="p of dropout site 'rnn.layer0'=0.95 is not reachable"):
        DropoutConfig(max_dp=8).check_site_rate("rnn.layer0", 0.95)


@pytest.mark.parametrize("keeps", [
    [slice(0, 5, 1)],                                   # one block
    [slice(5, 10, 1), slice(0, 5, 1)],                  # two chunks, disjoint blocks
    [slice(2, 7, 1), slice(0, 10, 1), slice(3, 3, 1)],  # overlapping, all kept, nothing kept
    [slice(1, 10, 2), slice(0, 10, 3)],                 # row patterns (strided columns)
])
def test_input_columns_gradient_equals_plain_slicing(keeps):
    """The Function that gives a call's per-chunk weight_ih slices one dense gradient, against autograd
    through plain slices of the same weight. Freed memory is filled with NaN first, so a region of the
    gradient it forgot to zero shows (the allocator hands the same block back)."""
    from fxdrop.modules.rnn import _InputColumns

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 10, generator=gen, requires_grad=True)
    pieces = _InputColumns.apply(weight, *keeps)
    upstream = [torch.randn(piece.shape, generator=gen) for piece in pieces]
    want, = torch.autograd.grad([weight[:, keep] for keep in keeps], weight, upstream)
    for _ in range(4):
        torch.full((24, 10), float("nan"))  # allocated and freed at once
    got, = torch.autograd.grad(pieces, weight, upstream)
    assert torch.equal(got, want)

"""fxdrop.lstm.StructuredLSTM: the contract against nn.LSTM with each dropout replaced by its site's mask.

The reference runs one single-layer ``nn.LSTM`` per layer, sharing the original Parameters, and multiplies
each layer's input by the mask its site reports (``last_mask``), broadcast over time and batch.
"""

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils._python_dispatch import TorchDispatchMode

from fxdrop import patterns as P
from fxdrop.lstm import StructuredLSTM, lstm_blocker, structure_lstm
from fxdrop.site import Site

T, B, IN, H = 5, 3, 7, 6


def make_lstm(layers=2, *, bidirectional=False, batch_first=False, proj_size=0, bias=True, dtype=torch.float32,
              p=0.5, input_size=IN):
    torch.manual_seed(0)
    return nn.LSTM(input_size, H, num_layers=layers, dropout=p, bidirectional=bidirectional,
                   batch_first=batch_first, proj_size=proj_size, bias=bias, dtype=dtype)


def single_layers(lstm: nn.LSTM) -> list[nn.LSTM]:
    """One single-layer nn.LSTM per layer of ``lstm``, holding ``lstm``'s own Parameters."""
    directions = 2 if lstm.bidirectional else 1
    width = directions * (lstm.proj_size or lstm.hidden_size)
    layers = []
    for layer in range(lstm.num_layers):
        ref = nn.LSTM(lstm.input_size if layer == 0 else width, lstm.hidden_size, bias=lstm.bias,
                      batch_first=lstm.batch_first, bidirectional=lstm.bidirectional, proj_size=lstm.proj_size,
                      dtype=lstm.weight_ih_l0.dtype)
        for name in ref._flat_weights_names:
            setattr(ref, name, getattr(lstm, name.replace("_l0", f"_l{layer}")))
        layers.append(ref)
    return layers


def reference(lstm: nn.LSTM, structured: StructuredLSTM, x, hx=None):
    """``lstm`` with its dropouts replaced by multiplication with the sites' last masks."""
    directions = 2 if lstm.bidirectional else 1
    packed = isinstance(x, nn.utils.rnn.PackedSequence)

    def masked(t, site):
        if site is None:
            return t
        # site.mask in the data's dtype: last_mask is fp32, whose rounded scale (n / kept) would cost fp64 bits.
        mask = site.mask(site.last_pattern, dtype=t.data.dtype if packed else t.dtype)
        return t._replace(data=t.data * mask) if packed else t * mask

    h_n, c_n = [], []
    site = structured.input_site
    for layer, ref in enumerate(single_layers(lstm)):
        rows = slice(layer * directions, (layer + 1) * directions)
        state = None if hx is None else (hx[0][rows], hx[1][rows])
        x, (h, c) = ref(masked(x, site), state)
        h_n.append(h)
        c_n.append(c)
        site = structured.layer_sites[layer] if layer < len(structured.layer_sites) else None
    return x, (torch.cat(h_n, 0), torch.cat(c_n, 0))


def grads(outputs, inputs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outputs]
    return torch.autograd.grad(outputs, inputs, upstream, allow_unused=True, retain_graph=True)


def check_training(lstm, structured, x, hx, atol):
    params = list(lstm.parameters())
    inputs = [x] + ([hx[0], hx[1]] if hx is not None else []) + params
    for _ in range(3):  # several draws: different patterns, dp = 1 included eventually
        out, (h, c) = structured(x, hx)
        ref_out, (ref_h, ref_c) = reference(lstm, structured, x, hx)
        torch.testing.assert_close(out, ref_out, atol=atol, rtol=0)
        torch.testing.assert_close(h, ref_h, atol=atol, rtol=0)
        torch.testing.assert_close(c, ref_c, atol=atol, rtol=0)
        got = grads([out, h, c], inputs)
        want = grads([ref_out, ref_h, ref_c], inputs)
        for g, w, t in zip(got, want, inputs):
            assert g.shape == t.shape  # dense, of the parameter's shape
            torch.testing.assert_close(g, w, atol=atol, rtol=0)


@pytest.mark.parametrize("family", ["row", "block"])
@pytest.mark.parametrize("layers,bidirectional,batch_first,with_hx", [
    (2, False, False, False), (3, False, True, True), (2, True, False, True), (3, True, True, False)])
def test_training_matches_masked_reference(family, layers, bidirectional, batch_first, with_hx):
    lstm = make_lstm(layers, bidirectional=bidirectional, batch_first=batch_first)
    structured = StructuredLSTM.from_lstm(lstm, name="rnn", family=family, seed=7)
    directions = 2 if bidirectional else 1
    x = torch.randn((B, T, IN) if batch_first else (T, B, IN), requires_grad=True)
    hx = None
    if with_hx:
        hx = (torch.randn(layers * directions, B, H, requires_grad=True),
              torch.randn(layers * directions, B, H, requires_grad=True))
    check_training(lstm, structured, x, hx, atol=1e-5)


@pytest.mark.parametrize("family", ["row", "block"])
def test_input_site_and_fp64(family):
    lstm = make_lstm(2, bidirectional=True, dtype=torch.float64, input_size=11)
    structured = structure_lstm(lstm, name="rnn", input_name="drop_in", input_p=0.5, family=family, seed=3)
    assert [s.name for s in structured.fxdrop_sites()] == ["drop_in", "rnn.layer0"]
    x = torch.randn(T, B, 11, dtype=torch.float64, requires_grad=True)
    check_training(lstm, structured, x, None, atol=1e-10)


def test_single_layer_with_input_site_only():
    """Dropout -> single-layer LSTM, as in AWD-LSTM stacks: only the input site, no inter-layer sites."""
    lstm = make_lstm(1, p=0.0)
    structured = structure_lstm(lstm, name="rnns.1", input_name="drop.1", input_p=0.3, seed=0)
    assert [s.name for s in structured.fxdrop_sites()] == ["drop.1"]
    x = torch.randn(T, B, IN, requires_grad=True)
    check_training(lstm, structured, x, None, atol=1e-5)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_proj_size():
    lstm = make_lstm(3, bidirectional=True, proj_size=4)
    structured = StructuredLSTM.from_lstm(lstm, name="rnn", family="block", seed=2)
    assert all(site.units == 8 for site in structured.layer_sites)
    x = torch.randn(T, B, IN, requires_grad=True)
    hx = (torch.randn(6, B, 4, requires_grad=True), torch.randn(6, B, H, requires_grad=True))
    check_training(lstm, structured, x, hx, atol=1e-5)


def test_unbatched_and_no_bias():
    lstm = make_lstm(2, bias=False)
    structured = StructuredLSTM.from_lstm(lstm, name="rnn", seed=4)
    x = torch.randn(T, IN, requires_grad=True)
    hx = (torch.randn(2, H), torch.randn(2, H))
    out, (h, c) = structured(x, hx)
    ref_out, (ref_h, ref_c) = reference(lstm, structured, x.unsqueeze(1), (hx[0].unsqueeze(1), hx[1].unsqueeze(1)))
    assert out.shape == (T, H) and h.shape == (2, H)
    torch.testing.assert_close(out, ref_out.squeeze(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(c, ref_c.squeeze(1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequence(enforce_sorted):
    lstm = make_lstm(2, bidirectional=True)
    structured = structure_lstm(lstm, name="rnn", input_name="drop", input_p=0.5, seed=5)
    lengths = torch.tensor([5, 3, 2]) if enforce_sorted else torch.tensor([3, 5, 2])
    x = torch.randn(T, B, IN, requires_grad=True)
    hx = (torch.randn(4, B, H), torch.randn(4, B, H))
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    out, (h, c) = structured(packed, hx)
    ref_out, (ref_h, ref_c) = reference(lstm, structured, packed, hx)
    assert isinstance(out, nn.utils.rnn.PackedSequence)
    torch.testing.assert_close(out.data, ref_out.data, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, ref_h, atol=1e-5, rtol=0)
    got = grads([out.data, h], [x] + list(lstm.parameters()))
    want = grads([ref_out.data, ref_h], [x] + list(lstm.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("bidirectional,batch_first,proj_size", [(False, False, 0), (True, True, 0), (True, False, 3)])
def test_eval_is_bit_identical(bidirectional, batch_first, proj_size):
    lstm = make_lstm(3, bidirectional=bidirectional, batch_first=batch_first, proj_size=proj_size)
    structured = structure_lstm(copy.deepcopy(lstm), name="rnn", input_name="drop", input_p=0.5, seed=0).eval()
    lstm.eval()
    x = torch.randn(B, T, IN) if batch_first else torch.randn(T, B, IN)
    out, (h, c) = structured(x)
    ref_out, (ref_h, ref_c) = lstm(x)
    assert torch.equal(out, ref_out) and torch.equal(h, ref_h) and torch.equal(c, ref_c)
    assert all(site.last_pattern is None for site in structured.fxdrop_sites())  # eval draws nothing


def test_same_parameters_and_state_dict():
    lstm = make_lstm(3, bidirectional=True, proj_size=2)
    structured = StructuredLSTM.from_lstm(lstm, name="rnn")
    assert [id(p) for p in structured.parameters()] == [id(p) for p in lstm.parameters()]
    assert list(structured.state_dict()) == list(lstm.state_dict())
    other = make_lstm(3, bidirectional=True, proj_size=2)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(1.0)
    structured.load_state_dict(other.state_dict(), strict=True)
    assert torch.equal(lstm.weight_hh_l2_reverse, other.weight_hh_l2_reverse)
    other.load_state_dict(structured.state_dict(), strict=True)
    assert lstm.training and structured.training


def test_deepcopy_save_and_dtype():
    lstm = make_lstm(2)
    structured = StructuredLSTM.from_lstm(lstm, name="rnn", seed=9)
    x = torch.randn(T, B, IN)
    twin = copy.deepcopy(structured)
    buffer = io.BytesIO()
    torch.save(structured, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    # Same scheduler state, so the same next pattern and the same output.
    out = structured(x)[0]
    assert torch.equal(twin(x)[0], out) and torch.equal(loaded(x)[0], out)
    assert twin.layer_sites[0].last_pattern == structured.layer_sites[0].last_pattern
    doubled = copy.deepcopy(structured).double()
    assert doubled(x.double())[0].dtype == torch.float64


class _KernelWidths(TorchDispatchMode):
    """Records the input width of every LSTM-layer kernel and GEMM run under it.

    On CPU, fp32 LSTMs run oneDNN's ``mkldnn_rnn_layer`` (its input projection is inside it); other
    builds decompose into ``addmm``/``mm``. Either way the kernel must see the compact input.
    """

    def __init__(self):
        super().__init__()
        self.widths = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.mkldnn_rnn_layer.default:
            self.widths.append(args[0].shape[-1])
            assert args[1].shape[-1] == args[0].shape[-1]  # weight_ih shrank with the input
        elif func in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default):
            a = args[1] if func is torch.ops.aten.addmm.default else args[0]
            self.widths.append(a.shape[-1])
        return func(*args, **kwargs)


@pytest.mark.parametrize("family", ["row", "block"])
def test_input_kernels_see_only_kept_columns(family):
    lstm = make_lstm(2, input_size=16, p=0.7)
    structured = structure_lstm(lstm, name="rnn", input_name="drop", input_p=0.7, family=family, seed=11)
    x = torch.randn(T, B, 16)
    for _ in range(5):
        with _KernelWidths() as kernels:
            structured(x)
        kept_in = P.num_kept(family, 16, *structured.input_site.last_pattern)
        kept_hidden = P.num_kept(family, H, *structured.layer_sites[0].last_pattern)
        assert kept_in in kernels.widths and kept_hidden in kernels.widths
        assert 16 not in kernels.widths or kept_in == 16


def test_errors():
    lstm = make_lstm(2)
    with pytest.raises(ValueError, match="site 'drop': input_site must mask 7 units, got units=5"):
        StructuredLSTM.from_lstm(lstm, name="rnn", input_site=Site.create("drop", 0.5, "row", units=5))
    with pytest.raises(ValueError, match="StructuredLSTM 'rnn': family must be one of"):
        StructuredLSTM.from_lstm(lstm, name="rnn", family="tile")
    with pytest.raises(TypeError, match="expects an nn.LSTM, got GRU"):
        StructuredLSTM.from_lstm(nn.GRU(3, 3), name="rnn")
    with pytest.raises(ValueError, match="give both input_name and input_p"):
        structure_lstm(lstm, name="rnn", input_p=0.5)
    with pytest.raises(ValueError, match="p of dropout site 'rnn.layer0'=0.95 is not reachable"):
        StructuredLSTM.from_lstm(lstm, name="rnn", p=0.95, max_dp=8)

    class MyLSTM(nn.LSTM):
        pass

    assert "not exactly torch.nn.LSTM" in lstm_blocker(MyLSTM(3, 3))
    assert lstm_blocker(lstm) is None
    assert lstm_blocker(StructuredLSTM.from_lstm(lstm, name="rnn")) == "already a StructuredLSTM"

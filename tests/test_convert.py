"""fxdrop.convert / fxdrop.sites: the contract of issue 3 on the model zoo, plus errors.

The training reference is the *original* model with each dropout replaced by multiplication with
its site's ``last_mask`` (module dropouts by overriding their forward, functional ones by patching
``F.dropout``/``torch.dropout``), never fxdrop's own code path.
"""

from __future__ import annotations

import contextlib
import copy
import io
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxdrop
from fxdrop.convert import conversion, convert, load_state_dict, sites, state_dict
from fxdrop.passes.rewrite import COUNTERS
from fxdrop.scheduler import ROW_CLASSES

import zoo

ZOO = {m.name: m for m in zoo.ZOO}


@contextlib.contextmanager
def masked(model: nn.Module, masks: dict[str, torch.Tensor]):
    """Run ``model`` with every dropout named in ``masks`` replaced by ``x * mask``; others untouched."""
    calls: dict[str, int] = {}

    def mask_for(base: str):
        k = calls.get(base, 0)
        calls[base] = k + 1
        return masks.get(base if k == 0 else f"{base}:{k}")

    patched = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout):
            original = module.forward

            def forward(x, name=name, original=original):
                mask = mask_for(name)
                return original(x) if mask is None else x * mask

            module.forward = forward
            patched.append(module)
    for name, module in model.named_modules():
        if type(module) is nn.LSTM and f"{name}.layer0" in masks:
            module.forward = _masked_lstm(module, name, masks)
            patched.append(module)
    functional = {"k": 0}
    real_f, real_t = F.dropout, torch.dropout

    def fake(real):
        def dropout(x, *args, **kwargs):
            k = functional["k"]
            functional["k"] += 1
            mask = masks.get("dropout" if k == 0 else f"dropout_{k}")
            return real(x, *args, **kwargs) if mask is None else x * mask
        return dropout

    try:
        with mock.patch.object(F, "dropout", fake(real_f)), mock.patch.object(torch, "dropout", fake(real_t)):
            yield model
    finally:
        for module in patched:
            del module.forward


def _masked_lstm(lstm: nn.LSTM, name: str, masks):
    """A unidirectional ``lstm`` run one layer at a time (single-layer nn.LSTMs on its own Parameters),
    layer ``l``'s output multiplied by ``masks[f"{name}.layer{l}"]``."""
    def forward(x, hx=None):
        assert hx is None and not lstm.bidirectional and not lstm.proj_size
        h_n, c_n = [], []
        for layer in range(lstm.num_layers):
            ref = nn.LSTM(x.shape[-1], lstm.hidden_size, batch_first=lstm.batch_first)
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                setattr(ref, f"{kind}_l0", getattr(lstm, f"{kind}_l{layer}"))
            x, (h, c) = ref(x)
            h_n.append(h)
            c_n.append(c)
            if layer < lstm.num_layers - 1:
                x = x * masks[f"{name}.layer{layer}"]
        return x, (torch.cat(h_n), torch.cat(c_n))
    return forward


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def _step(model, inputs, weight):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    y = model(*inputs)
    (y * weight).sum().backward()
    return y.detach(), _grads(model)


@pytest.mark.parametrize("entry", zoo.ZOO, ids=lambda e: e.name)
def test_zoo_plan(entry):
    torch.manual_seed(0)
    converted = convert(entry.build(), seed=3, **entry.options)
    plans = {s.name: s.plan for s in conversion(converted).sites}
    assert plans == entry.expect
    for record in conversion(converted).sites:
        assert record.reason, record
    assert sorted(s.name for s in sites(converted)) == sorted(n for n, plan in entry.expect.items() if plan)


@pytest.mark.parametrize("entry", zoo.ZOO, ids=lambda e: e.name)
def test_zoo_eval_bit_identical(entry):
    torch.manual_seed(0)
    model = entry.build()
    inputs = entry.example()
    converted = convert(model, seed=3, **entry.options)
    model.eval(), converted.eval()
    with torch.no_grad():  # seeded: an always-on functional dropout stays random in eval, as written
        torch.manual_seed(9)
        y = converted(*inputs)
        torch.manual_seed(9)
        assert torch.equal(y, model(*inputs))


@pytest.mark.parametrize("entry", zoo.ZOO, ids=lambda e: e.name)
def test_zoo_training_matches_masked_original(entry):
    torch.manual_seed(0)
    model = entry.build()
    inputs = entry.example()
    converted = convert(model, seed=5, **entry.options)
    model.train(), converted.train()
    for step in range(2):  # two steps: a fresh pattern each time
        y, grads = _step(converted, inputs, weight := torch.randn_like(converted(*inputs)))
        masks = {s.name: s.last_mask for s in sites(converted)}
        assert all(m is not None for m in masks.values())
        with masked(model, masks):
            y_ref, grads_ref = _step(model, inputs, weight)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        assert grads.keys() == grads_ref.keys()
        for name in grads:
            if grads_ref[name] is None:
                assert grads[name] is None or not grads[name].any(), name
            else:
                torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("entry", [ZOO[n] for n in ("mlp", "t5_ffn", "functional", "data_dependent", "looped",
                                                                  "lstm_lm", "untraced_lstm")],
                         ids=lambda e: e.name)
def test_module_contract(entry, tmp_path):
    torch.manual_seed(0)
    model = entry.build()
    inputs = entry.example()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structure = repr(model)
    modes = [m.training for m in model.modules()]
    converted = convert(model, seed=7)
    converted.eval()
    # the input model is not modified (not even its modes, after converted.eval())
    assert repr(model) == structure and [m.training for m in model.modules()] == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the same Parameter objects, the same state_dict keys in the same order
    assert [id(p) for p in converted.parameters()] == [id(p) for p in model.parameters()] or \
        {id(p) for p in converted.parameters()} == {id(p) for p in model.parameters()}
    assert list(converted.state_dict()) == list(model.state_dict())
    model.load_state_dict(converted.state_dict(), strict=True)
    converted.load_state_dict(model.state_dict(), strict=True)
    # train()/eval()
    converted.train()
    assert all(m.training for m in converted.modules())
    converted(*inputs)
    converted.eval()
    assert not any(m.training for m in converted.modules())
    model.eval()
    with torch.no_grad():
        expected = model(*inputs)
    # deepcopy and torch.save / torch.load of the whole module
    clone = copy.deepcopy(converted)
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    # the copies carry the scheduler state: the next draw is the same
    assert [s.scheduler.peek() for s in sites(clone)] == [s.scheduler.peek() for s in sites(converted)]
    assert [s.scheduler.peek() for s in sites(loaded)] == [s.scheduler.peek() for s in sites(converted)]
    for other in (clone, loaded):
        assert [s.name for s in sites(other)] == [s.name for s in sites(converted)]
        assert not any(p1 is p2 for p1, p2 in zip(other.parameters(), model.parameters()))
        with torch.no_grad():
            assert torch.equal(other(*inputs), expected)
        other.train()
        other(*inputs)


def test_to_dtype():
    torch.manual_seed(0)
    model = zoo.MLP()
    converted = convert(model, seed=1).to(torch.float64)
    x = torch.randn(4, 20, dtype=torch.float64)
    assert model.net[0].weight.dtype == torch.float64  # shared Parameters
    model.eval(), converted.eval()
    assert torch.equal(converted(x), model(x))
    converted.train()
    assert converted(x).dtype == torch.float64
    assert all(s.scheduler.state.dtype == torch.int64 for s in sites(converted))


def test_one_chain_for_the_mlp():
    before = COUNTERS["chain"]
    converted = convert(zoo.MLP(), seed=0)
    assert COUNTERS["chain"] == before + 1
    chains = [m for m in converted.modules() if isinstance(m, fxdrop.modules.StructuredChain)]
    assert len(chains) == 1 and len(chains[0].linears) == 4 and len(chains[0].sites) == 3
    assert "fxdrop.chain_0" in converted.code.replace("self.", "")


def test_sites_fields_and_masks():
    converted = convert(zoo.MLP(p=0.5), seed=0)
    listed = sites(converted)
    assert [s.name for s in listed] == ["net.2", "net.5", "net.8"]
    assert all(s.last_pattern is None and s.last_mask is None for s in listed)
    converted.train()
    converted(torch.randn(3, 20))
    for s in listed:
        assert s.p == 0.5 and s.family == "row" and s.last_mask.shape == (s.units,)
        mask = s.last_mask
        assert ((mask == 0) | (mask == mask.max())).all() and mask.max() > 0


def test_rate_override_and_per_site_family():
    converted = convert(zoo.MLP(p=0.5), p={"net.5": 0.25}, pattern=lambda name: "block", seed=0)
    assert [(s.p, s.family) for s in sites(converted)] == [(0.5, "block"), (0.25, "block"), (0.5, "block")]
    converted = convert(zoo.MLP(p=0.5), p=0.1, seed=0)
    assert all(s.p == 0.1 for s in sites(converted))


def test_seed_reproducible_and_distinct_per_site():
    a, b = convert(zoo.MLP(), seed=11), convert(zoo.MLP(), seed=11)
    assert [s.scheduler.seed for s in sites(a)] == [s.scheduler.seed for s in sites(b)]
    assert len({s.scheduler.seed for s in sites(a)}) == 3


def test_tile_family_is_dropconnect_on_the_consumer_weight():
    torch.manual_seed(0)
    model = zoo.EmbeddingInput()
    converted = convert(model, pattern="tile", tile=4, seed=2)
    (site,) = sites(converted)
    assert site.family == "tile" and site.weight_shape == (7, 24)
    idx = torch.randint(0, 50, (3, 5))
    converted.train()
    y = converted(idx)
    h = model.norm(model.emb(idx))
    torch.testing.assert_close(y, F.linear(h, model.fc.weight * site.last_mask, model.fc.bias), atol=1e-5, rtol=0)
    assert site.last_mask.shape == model.fc.weight.shape


def test_scheduler_state_dict_roundtrip():
    converted = convert(zoo.MLP(), seed=4)
    converted.train()
    converted(torch.randn(2, 20))
    saved = state_dict(converted)
    nxt = [s.scheduler.peek() for s in sites(converted)]
    fresh = convert(zoo.MLP(), seed=99)
    load_state_dict(fresh, saved)
    assert [s.scheduler.peek() for s in sites(fresh)] == nxt
    with pytest.raises(KeyError, match="missing sites"):
        load_state_dict(fresh, {})


def test_partial_conversion_records_skipped_modules():
    converted = convert(zoo.DataDependent(), seed=0)
    report = conversion(converted)
    assert report.regions == ["head"]
    (skipped,) = report.skipped
    assert skipped.name == "<root>" and "TraceError" in skipped.message or "control flow" in skipped.message
    assert type(converted) is zoo.DataDependent


# ---------------------------------------------------------------- errors


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        convert(lambda x: x)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_rate_out_of_range(p):
    with pytest.raises(ValueError, match=r"p=.* outside \[0, 1\)"):
        convert(zoo.MLP(), p=p)


def test_unknown_family():
    with pytest.raises(ValueError, match="pattern='diagonal'"):
        convert(zoo.MLP(), pattern="diagonal")
    with pytest.raises(ValueError, match="net.5"):
        convert(zoo.MLP(), pattern={"net.5": "stripes"})


def test_max_dp_too_small_names_the_site():
    with pytest.raises(ValueError, match=r"'net.2'.*max_dp"):
        convert(zoo.MLP(p=0.9), max_dp=4)


def test_default_support_is_the_tightest_per_site():
    from fxdrop.search import max_dp_for

    model = convert(zoo.MLP(p=0.3), p={"net.2": 0.7})
    supports = {site.name: site.scheduler.distribution.max_dp for site in fxdrop.sites(model)}
    assert supports["net.2"] == max_dp_for(0.7) == 4
    assert all(v == max_dp_for(0.3) == 2 for name, v in supports.items() if name != "net.2"), supports
    wide = convert(zoo.MLP(p=0.3), max_dp=8)
    assert {site.scheduler.distribution.max_dp for site in fxdrop.sites(wide)} == {8}
    with pytest.raises(ValueError, match="max_dp must be an int >= 1 or 'auto'"):
        convert(zoo.MLP(), max_dp="tight")


def test_wrong_example_input_shape():
    with pytest.raises(ValueError, match=r"example_inputs \(\(4, 7\)\)"):
        convert(zoo.MLP(), example_inputs=torch.randn(4, 7))
    convert(zoo.MLP(), example_inputs=torch.randn(4, 20))


class OptionalMask(nn.Module):
    """fx takes ``mask is not None`` as True for a placeholder: the traced graph needs a mask that
    callers do not pass. With example inputs, convert notices and converts the child instead."""

    def __init__(self):
        super().__init__()
        self.mlp = zoo.MLP((8, 16, 4))

    def forward(self, x, mask=None):
        if mask is not None:
            x = x * mask
        return self.mlp(x)


def test_example_inputs_reject_a_graph_that_disagrees():
    model = OptionalMask()
    x = torch.randn(3, 8)
    converted = convert(model, example_inputs=x, seed=0)
    report = conversion(converted)
    assert report.regions == ["mlp"] and "fails on the example inputs" in report.skipped[0].message
    model.eval(), converted.eval()
    assert torch.equal(converted(x), model(x))
    # without example inputs the graph would be taken as traced (and need the mask)
    assert conversion(convert(model, seed=0)).regions == [""]


def test_per_site_dict_with_an_unknown_name():
    with pytest.raises(ValueError, match=r"p names no dropout site: \['net.7'\]; the sites are"):
        convert(zoo.MLP(), p={"net.7": 0.2})
    with pytest.raises(ValueError, match="pattern names no dropout site"):
        convert(zoo.MLP(), pattern={"nett.2": "block"})


def test_hooks_survive():
    model = zoo.T5LayerFF()
    calls = []
    model.DenseReluDense.register_forward_hook(lambda m, args, out: calls.append("inner"))
    model.register_forward_hook(lambda m, args, out: calls.append("root"))
    converted = convert(model, seed=0)
    converted(torch.randn(2, 3, 24))
    assert calls == ["inner", "root"]
    # the hooked block stays a call (not inlined), converted as a region of its own
    assert "DenseReluDense" in converted.code
    assert conversion(converted).regions == ["", "DenseReluDense"]
    assert [s.name for s in sites(converted)] == ["DenseReluDense.dropout"]
    model.eval(), converted.eval()
    x = torch.randn(2, 3, 24)
    assert torch.equal(converted(x), model(x))


# ---------------------------------------------------------------- granularity="rows"

class _Seq(nn.Module):
    """Linear -> act -> Dropout -> Linear -> act -> Dropout -> Linear on (batch, time, features)."""

    def __init__(self, share: bool = False):
        super().__init__()
        self.share = share
        self.l0, self.l1, self.l2 = nn.Linear(16, 32), nn.Linear(32, 24), nn.Linear(24, 8)
        self.d0, self.d1 = nn.Dropout(0.5), nn.Dropout(0.3)
        self.side = nn.Linear(32, 8)

    def forward(self, x):
        h = self.d0(torch.relu(self.l0(x)))
        y = self.l2(self.d1(F.gelu(self.l1(h))))
        return y + self.side(h) if self.share else y


@pytest.mark.parametrize("family", ["row", "block"])
@pytest.mark.parametrize("share", [False, True])
def test_rows_granularity_matches_per_row_masks(family, share):
    """granularity="rows": each row has its own masks (last_row_masks); outputs and gradients equal the
    original model with every dropout replaced by those per-row masks; eval is bit-identical."""
    torch.manual_seed(0)
    model = _Seq(share)
    converted = convert(model, seed=5, pattern=family, granularity="rows")
    assert all(site.granularity == "rows" for site in sites(converted))
    x = torch.randn(3, 7, 16, requires_grad=True)
    chains = [m for m in converted.modules() if hasattr(m, "last_row_masks")]
    for _ in range(3):
        y = converted(x)
        masks = {}
        for chain in chains:
            for site, mask in zip(chain.sites, chain.last_row_masks()):
                masks[site.name] = mask.reshape(3, 7, -1)
        assert set(masks) == {"d0", "d1"}
        assert all(chain.last_plan[0].shape[0] == ROW_CLASSES for chain in chains)
        for mask in masks.values():  # patterns differ between rows
            assert len({tuple(row.tolist()) for row in mask.reshape(-1, mask.shape[-1])}) > 1
        with masked(model, masks):
            expect = model(x)
        grad = torch.randn_like(y)
        params = [x, *(p for n, p in model.named_parameters() if share or not n.startswith("side"))]
        for got, want in zip(torch.autograd.grad(y, params, grad), torch.autograd.grad(expect, params, grad)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y, expect, atol=1e-5, rtol=1e-5)
    converted.eval(), model.eval()
    assert torch.equal(converted(x), model(x))


def test_rows_granularity_rows_alternate_between_classes():
    """Row r of the flattened input (here (time, batch) = (5, 4), r = t * 4 + b) has class r mod 2's masks."""
    torch.manual_seed(0)
    converted = convert(_Seq(), seed=2, granularity="rows")
    converted(torch.randn(5, 4, 16))
    (chain,) = [m for m in converted.modules() if hasattr(m, "last_row_masks")]
    assert chain.last_plan[0].shape == (ROW_CLASSES, 2, 2)
    for mask in chain.last_row_masks():
        assert mask.shape == (20, mask.shape[1])
        assert all(torch.equal(mask[r], mask[r % ROW_CLASSES]) for r in range(20))


def test_rows_granularity_errors_and_tile_sites():
    with pytest.raises(ValueError, match="granularity='cols'"):
        convert(_Seq(), granularity="cols")
    converted = convert(_Seq(), pattern="tile", granularity="rows")  # tile masks the weight: one per forward
    assert {site.granularity for site in sites(converted)} == {"forward"}
    from fxdrop.site import Site
    with pytest.raises(ValueError, match="site 'x': granularity='rows' needs a unit family"):
        Site.create("x", 0.5, "tile", granularity="rows", weight_shape=(4, 4))

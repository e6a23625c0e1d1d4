"""fxdrop.convert / fxdrop.sites: the contract on the model zoo, the user's model kept, and errors.

The training reference is the *original* model with each dropout replaced by multiplication with
its site's ``last_mask`` (tests/masking.py), never fxdrop's own code path.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxdrop
from fxdrop.convert import conversion, convert, load_state_dict, regions, sites, state_dict
from fxdrop.passes.rewrite import COUNTERS

import zoo
from fxdrop.harness.masking import masked

ZOO = {m.name: m for m in zoo.ZOO}


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def _step(model, inputs, weight):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)  # always-on dropouts (left as written) draw the same in both models
    y = model(*inputs)
    (y * weight).sum().backward()
    return y.detach(), _grads(model)


def check_training_contract(model, converted, inputs, steps=2, tol=1e-5):
    """Outputs and gradients of ``converted`` equal the original's with every converted dropout replaced
    by its site's mask, for ``steps`` consecutive steps (a fresh pattern each time)."""
    model.train(), converted.train()
    weight = None
    for _ in range(steps):
        if weight is None:
            with torch.no_grad():
                weight = torch.randn_like(converted(*inputs))
        y, grads = _step(converted, inputs, weight)
        masks = {s.name: s.last_mask for s in sites(converted) if s.active}  # inactive sites: the identity
        assert all(m is not None for m in masks.values())
        with masked(model, masks):
            y_ref, grads_ref = _step(model, inputs, weight)
        torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
        assert grads.keys() == grads_ref.keys()
        for name in grads:
            if grads_ref[name] is None:
                assert grads[name] is None or not grads[name].any(), name
            else:
                torch.testing.assert_close(grads[name], grads_ref[name], atol=tol, rtol=tol, msg=name)


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


@pytest.mark.parametrize("granularity", ["forward", "rows"])
@pytest.mark.parametrize("entry", zoo.ZOO, ids=lambda e: e.name)
def test_zoo_training_matches_masked_original(entry, granularity):
    torch.manual_seed(0)
    model = entry.build()
    for module in model.modules():  # raise zero rates so every converted site drops something
        if isinstance(module, nn.Dropout) and module.p == 0:
            module.p = 0.2
    converted = convert(model, seed=5, granularity=granularity, row_classes=4, **entry.options)
    check_training_contract(model, converted, entry.example())


@pytest.mark.parametrize("entry", [ZOO[n] for n in ("mlp", "t5_ffn", "functional", "data_dependent", "looped",
                                                    "lstm_lm", "untraced_lstm")], ids=lambda e: e.name)
def test_the_users_model_is_kept(entry, tmp_path):
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
    # the same class, the same module tree and Parameter objects, the same state_dict keys in the same order
    assert type(converted) is type(model) and isinstance(converted, type(model))
    for new, old in zip(converted.modules(), model.modules()):  # RNNs become their structured subclasses
        assert type(new) is type(old) or (isinstance(old, (nn.LSTM, nn.GRU)) and isinstance(new, type(old)))
    assert [name for name, _ in converted.named_modules()] == [name for name, _ in model.named_modules()]
    assert [id(p) for p in converted.parameters()] == [id(p) for p in model.parameters()]
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


def test_indexing_methods_and_attributes_survive():
    model = zoo.VGGLike()
    model.extra_attribute = "kept"
    converted = convert(model, seed=0)
    assert isinstance(converted.classifier, nn.Sequential) and isinstance(converted.classifier[2], nn.Dropout)
    assert converted.classifier[0] is not model.classifier[0]  # a copy of the module ...
    assert converted.classifier[0].weight is model.classifier[0].weight  # ... sharing the Parameter
    assert converted.extra_attribute == "kept" and converted.features[0].weight is model.features[0].weight
    assert [r.label for r in regions(converted)] == ["classifier"]


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
    (region,) = regions(converted)
    (program,) = region.programs.values()
    chains = [c for c in program.self_._structured.values() if isinstance(c, fxdrop.modules.StructuredChain)]
    assert len(chains) == 1 and len(chains[0].linears) == 4 and len(chains[0].sites) == 3
    assert "fxdrop_chain_0" in program.code


def test_sites_fields_and_masks():
    converted = convert(zoo.MLP(p=0.5), seed=0, pattern="row", granularity="forward")
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
    assert converted.net[5].p == 0.25  # a module dropout's rate lives in its module
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
    assert [r.name for r in report.regions] == ["head.net"]  # the smallest module that holds the chain
    (skipped,) = report.skipped
    assert skipped.name == "<root>" and "control flow" in skipped.message
    assert type(converted) is zoo.DataDependent


# ---------------------------------------------------------------- errors


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        convert(lambda x: x)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_rate_out_of_range(p):
    with pytest.raises(ValueError, match=r"p=.* outside \[0, 1\)"):
        convert(zoo.MLP(), p=p)


def test_unknown_family_and_option():
    with pytest.raises(ValueError, match="pattern='diagonal'"):
        convert(zoo.MLP(), pattern="diagonal")
    with pytest.raises(ValueError, match="net.5"):
        convert(zoo.MLP(), pattern={"net.5": "stripes"})
    with pytest.raises(TypeError, match=r"unknown options \['patern'\]"):
        convert(zoo.MLP(), patern="block")


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
    """fx takes ``mask is not None`` as True for a placeholder; the smallest region with a site is ``mlp.net``."""

    def __init__(self):
        super().__init__()
        self.mlp = zoo.MLP((8, 16, 4))

    def forward(self, x, mask=None):
        if mask is not None:
            x = x * mask
        return self.mlp(x)


class OptionalMaskedHead(nn.Module):
    """The site is in the root's own forward, whose branch on ``mask`` a trace bakes in."""

    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 4)

    def forward(self, x, mask=None):
        h = self.fc2(self.drop(torch.relu(self.fc1(x))))
        return h * mask if mask is not None else h


def test_only_the_smallest_region_with_sites_changes():
    model = OptionalMask()
    converted = convert(model, seed=0)
    assert [r.name for r in conversion(converted).regions] == ["mlp.net"]
    assert "forward" not in vars(converted) and "forward" not in vars(converted.mlp)
    assert "forward" in vars(converted.mlp.net)


@pytest.mark.parametrize("example", [False, True])
def test_each_call_spec_gets_a_checked_program(example):
    """Calls with and without the optional mask run programs traced for each (the branch fx took), each
    checked against the module on its first call; eval is the original bit for bit."""
    torch.manual_seed(0)
    model = OptionalMaskedHead()
    x, mask = torch.randn(3, 8), torch.rand(3, 4)
    converted = convert(model, seed=0, **({"example_inputs": (x, mask)} if example else {}))
    (region,) = regions(converted)
    check_training_contract(model, converted, (x,))
    check_training_contract(model, converted, (x, mask))
    programs = {id(p): p for p in region.programs.values()}.values()  # also keyed by dtype-free specs
    assert len(programs) == 2 and all(p.verified for p in programs)
    model.eval(), converted.eval()
    assert torch.equal(converted(x, mask=mask), model(x, mask=mask))


def test_per_site_dict_with_an_unknown_name():
    with pytest.raises(ValueError, match=r"p names no dropout site: \['net.7'\]; the sites are"):
        convert(zoo.MLP(), p={"net.7": 0.2})
    with pytest.raises(ValueError, match="pattern names no dropout site"):
        convert(zoo.MLP(), pattern={"nett.2": "block"})


def test_hooks_at_conversion_keep_their_modules_as_calls():
    model = zoo.T5LayerFF()
    calls = []
    model.DenseReluDense.register_forward_hook(lambda m, args, out: calls.append("inner"))
    model.register_forward_hook(lambda m, args, out: calls.append("root"))
    converted = convert(model, seed=0)
    converted.train()
    converted(torch.randn(2, 3, 24))
    assert calls == ["inner", "root"]
    # the hooked block stays a call (not inlined) and converts as a region of its own
    assert [r.name for r in conversion(converted).regions] == ["DenseReluDense"]
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
@pytest.mark.parametrize("classes", [2, 4, 8])
def test_rows_granularity_matches_per_row_masks(family, share, classes):
    """granularity="rows": row r of the input (flattened) has its own masks (row r mod row_classes of
    last_mask); outputs and gradients equal the original model with every dropout replaced by those."""
    torch.manual_seed(0)
    model = _Seq(share)
    converted = convert(model, seed=5, pattern=family, granularity="rows", row_classes=classes)
    assert all(site.granularity == "rows" and site.row_classes == classes for site in sites(converted))
    x = torch.randn(3, 7, 16)
    check_training_contract(model, converted, (x,), steps=3)
    for site in sites(converted):
        assert site.last_mask.shape == (classes, site.units)
        assert len({tuple(row.tolist()) for row in site.last_mask}) > 1  # patterns differ between rows
    converted.eval(), model.eval()
    assert torch.equal(converted(x), model(x))


def test_consecutive_sites_of_a_chain_split_the_rows_of_a_mask_and_keep_the_contract():
    """p = 0.5 at both sites of one chain with 4 classes: the first site (position 0) and the second
    (position 1) pick their halves by different bits of the class, so in every step the four classes use
    the four (first half, second half) pairs and the Linear between them gets a gradient in each of its
    four blocks; the chain still computes the original with each dropout replaced by its mask."""
    torch.manual_seed(0)
    model = _Seq()
    model.d1.p = 0.5
    converted = convert(model, seed=2, pattern="block", row_classes=4)
    assert {site.name: site.position for site in sites(converted)} == {"d0": 0, "d1": 1}
    x = torch.randn(4, 3, 16)
    check_training_contract(model, converted, (x,), steps=3)
    first, second = (site for site in sites(converted))
    for _ in range(8):
        converted(x)
        pairs = {(tuple(a.tolist()), tuple(b.tolist())) for a, b in zip(first.last_mask, second.last_mask)}
        assert len(pairs) == 4


def test_rows_granularity_errors_and_tile_sites():
    with pytest.raises(ValueError, match="granularity='cols'"):
        convert(_Seq(), granularity="cols")
    with pytest.raises(ValueError, match="row_classes must be .auto. or a power of two"):
        convert(_Seq(), granularity="rows", row_classes=3)
    converted = convert(_Seq(), pattern="tile", granularity="rows")  # tile masks the weight: one per forward
    assert {site.granularity for site in sites(converted)} == {"forward"}


def test_the_default_draws_block_patterns_per_row_class_and_the_papers_method_stays_available():
    """convert's default (block, granularity="rows", "auto" classes: 4 at p = 0.5; measured to train where one
    pattern per forward diverges) gives the rows of a batch different masks; pattern="row",
    granularity="forward" is the paper's."""
    torch.manual_seed(0)
    model = zoo.MLP(p=0.5)
    default = convert(model, seed=0).train()
    differ = 0
    for _ in range(10):
        default(torch.randn(8, 20))
        for site in sites(default):
            assert site.family == "block" and site.granularity == "rows" and site.last_mask.shape == (4, site.units)
            differ += not torch.equal(site.last_mask[0], site.last_mask[1])
    assert differ > 0  # the two row classes draw different patterns
    x = torch.randn(8, 20, requires_grad=True)
    paper = convert(model, seed=0, pattern="row", granularity="forward").train()
    paper(x)
    assert all(site.family == "row" and site.granularity == "forward" for site in sites(paper))
    assert all(site.last_mask.shape == (site.units,) for site in sites(paper))


@pytest.mark.parametrize("share", [False, True])
def test_auto_row_classes_follow_each_sites_rate_at_conversion_and_keep_the_contract(share):
    """row_classes="auto" (the default): 8 classes for a site above p = 0.5, 4 at or below, decided from the
    rate at conversion (a later p keeps the count). One chain with both counts: the site with 4 classes
    keeps its own r mod 4 masks, and the chain still computes the original with each dropout replaced by
    its mask."""
    torch.manual_seed(0)
    model = _Seq(share)
    model.d0.p = 0.7
    converted = convert(model, seed=3)
    assert {site.name: site.row_classes for site in sites(converted)} == {"d0": 8, "d1": 4}
    check_training_contract(model, converted, (torch.randn(3, 7, 16),), steps=3)
    assert {site.name: site.last_mask.shape[0] for site in sites(converted)} == {"d0": 8, "d1": 4}
    fxdrop.set_p(converted, 0.3)
    converted(torch.randn(3, 7, 16))
    assert {site.name: site.last_mask.shape[0] for site in sites(converted)} == {"d0": 8, "d1": 4}
    assert {site.row_classes for site in sites(convert(model, seed=3, p=0.5))} == {4}
    assert {site.row_classes for site in sites(convert(model, seed=3, p=0.6))} == {8}
    assert {site.row_classes for site in sites(convert(model, seed=3, row_classes=2))} == {2}


def test_the_narrow_distribution_draws_only_the_periods_around_p_and_keeps_the_contract():
    """distribution="narrow" at p = 0.7: every class of every step keeps 1/3 or 1/4 of the units (never
    1/2 or all of them), and the converted model still computes the original with each dropout replaced by
    its mask; a bad name is refused with the choices."""
    torch.manual_seed(0)
    model = _Seq(False)
    model.d0.p = model.d1.p = 0.7
    converted = convert(model, seed=5, distribution="narrow")
    check_training_contract(model, converted, (torch.randn(3, 7, 16),), steps=4)
    seen = set()
    for _ in range(20):
        converted(torch.randn(3, 7, 16))
        for site in sites(converted):
            assert site.scheduler.distribution.method == "narrow"
            seen |= {round(row.numel() / int((row != 0).sum())) for row in site.last_mask}
    assert seen == {3, 4}, seen  # the period each class's kept block implies (32 and 24 units)
    with pytest.raises(ValueError, match="distribution='flat'.*exact, sgd, narrow"):
        convert(model, distribution="flat")


def test_a_dropout_of_rate_one_is_left_as_it_is_with_its_reason():
    """nn.Dropout(1.0) is valid PyTorch (it outputs zeros); no pattern reaches p = 1, so the site is left and
    the audit says why, while its neighbour converts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(1.0), nn.Linear(16, 16), nn.ReLU(),
                          nn.Dropout(0.5), nn.Linear(16, 4))
    report = fxdrop.audit(model, torch.randn(2, 8), roofline=False)
    decisions = {s.name: (s.decision, s.reason) for s in report.sites}
    assert decisions["2"][0] != "converted" and "p = 1" in decisions["2"][1]
    assert decisions["5"][0] == "converted"
    converted = convert(model, seed=0)
    assert [s.name for s in sites(converted)] == ["5"]
    converted.eval()
    x = torch.randn(3, 8)
    assert torch.equal(converted(x), model.eval()(x))

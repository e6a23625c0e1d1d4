"""fxdrop.passes (spec, trace, normalise, plan, rewrite): graph-level behaviour on small inline modules and on
Dynamo-style functional graphs (weights as graph inputs)."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxdrop.config import DropoutConfig
from fxdrop.convert import install_regions
from fxdrop.passes.normalise import NormalisedGraph, drop_identities
from fxdrop.passes.plan import plan_graph
from fxdrop.passes.rewrite import COUNTERS, apply_plan
from fxdrop.passes.spec import TENSOR, CallSpec
from fxdrop.passes.trace import clone_modules, discover, trace_region, trace_with_retries

CONFIG = DropoutConfig()


def _trace(module, spec=None):
    spec = spec or CallSpec.default(inspect.signature(type(module).forward))
    return trace_region(module, spec).graph


def _plan(module: nn.Module, config=CONFIG):
    graph = _trace(module)
    drop_identities(graph, module)
    g = NormalisedGraph(graph, module)
    return g, plan_graph(g, config)


def _plans(module, config=CONFIG):
    return {s.name: s.plan for s in _plan(module, config)[1].sites}


# ---------------------------------------------------------------- call specs


def test_call_specs_bake_constants_and_slot_tensors():
    def forward(self, x, mask=None, *rest, flag=False, **kwargs):
        pass

    sig = inspect.signature(forward)
    t = torch.ones(2)
    tensor = (TENSOR, torch.float32, "cpu")
    spec = CallSpec.of(sig, (t,), {"flag": True, "scale": 2.0, "extra": t})
    assert spec.entries == (("param", "x", tensor), ("param", "mask", ("const", None)), ("kwonly", "flag", ("const", True)),
                            ("kwarg", "extra", tensor), ("kwarg", "scale", ("const", 2.0)))
    assert spec == CallSpec.of(sig, (), {"x": t, "flag": True, "extra": t, "scale": 2.0})  # keyword or not
    assert spec != CallSpec.of(sig, (t, t), {"flag": True, "scale": 2.0, "extra": t})
    assert spec != CallSpec.of(sig, (t.double(),), {"flag": True, "scale": 2.0, "extra": t})  # another dtype
    args, kwargs = spec.call(["X", "E"])  # parameters by keyword: wrappers may add to kwargs
    assert args == () and kwargs == {"x": "X", "mask": None, "flag": True, "extra": "E", "scale": 2.0}
    assert spec.tensors(sig, (t,), {"flag": True, "scale": 2.0, "extra": t})[1] is t
    assert "does not fit" in CallSpec.of(sig, (), {})


def test_call_specs_slot_tuples_and_objects():
    def forward(self, x, hidden=None, cache=None):
        pass

    class Cache:
        pass

    sig = inspect.signature(forward)
    h, c, cache = torch.ones(2), torch.zeros(2), Cache()
    spec = CallSpec.of(sig, (h, (h, c), cache), {})
    assert spec.tensor_names == ["x", "hidden_0", "hidden_1", "cache"]
    values = spec.tensors(sig, (h, (h, c), cache), {})
    assert values[1] is h and values[2] is c and values[3] is cache
    _, kwargs = spec.call(["X", "H", "C", "K"])
    assert kwargs["hidden"] == ("H", "C") and kwargs["cache"] == "K"
    assert spec.erased() == CallSpec.of(sig, (h.double(), (h, c.half()), cache), {}).erased()


# ---------------------------------------------------------------- tracing


class Activations(nn.Module):
    """The same activation in module, function and method form, each between Linears."""

    def __init__(self):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(8, 8) for _ in range(5))
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        x = self.drop(self.relu(self.fc[0](x)))
        x = self.drop(torch.relu(self.fc[1](x)))
        x = self.drop(F.relu(self.fc[2](x)))
        x = self.drop(self.fc[3](x).relu())
        return self.fc[4](x)


def test_activation_forms_normalise_to_one_chain():
    _, plan = _plan(Activations())
    (chain,) = plan.chains
    assert len(chain.linears) == 5 and chain.activations == ["relu"] * 4
    assert [s.name for s in plan.sites] == ["drop", "drop:1", "drop:2", "drop:3"]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return F.dropout(self.fc(x), p=0.2, training=self.training)


def test_functional_dropout_flags_read_the_callers_mode_at_run_time():
    outer = nn.Sequential(Block(), Block())
    graph = _trace(outer)
    flags = [n.kwargs["training"] for n in graph.nodes if n.target is F.dropout]
    assert [(f.op, f.target) for f in flags] == [("get_attr", "0.training"), ("get_attr", "1.training")]
    names = {s.name for s in _plan(outer)[1].sites}
    assert names == {"0.dropout", "1.dropout"}


class Fragile(nn.Module):
    """A norm fx cannot trace (it branches on a tensor's value), between two traceable parts."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x):
        if x.abs().max() > 1e4:
            x = x.clamp(-1e4, 1e4)
        return x * self.weight


class DtypeBranch(nn.Module):
    """T5LayerNorm's shape: a branch on a parameter's dtype, which the tracer answers (so it traces)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x):
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


def test_branches_on_dtypes_trace_and_the_spec_keys_them():
    module = DtypeBranch()
    spec = CallSpec.of(inspect.signature(DtypeBranch.forward), (torch.ones(3, 4),), {})
    trace = trace_region(module, spec)
    assert not trace.specialized  # a parameter's dtype: valid for any input dtype

    class InputDtype(nn.Module):
        def forward(self, x):
            return x.float() if x.dtype == torch.float16 else x * 2

    trace = trace_region(InputDtype(), CallSpec.of(inspect.signature(InputDtype.forward), (torch.ones(2),), {}))
    assert trace.specialized and not any(n.target == "float" for n in trace.graph.nodes)


class WithFragile(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = Fragile()
        self.fc1, self.drop, self.fc2 = nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 4)
        self.out = nn.Dropout(0.1)

    def forward(self, x):
        return x + self.out(self.fc2(self.drop(torch.relu(self.fc1(self.norm(x))))))


def test_an_untraceable_child_becomes_a_leaf_and_the_parent_keeps_its_sites():
    module = WithFragile()
    trace, leaves, made = trace_with_retries(module, CallSpec.default(inspect.signature(WithFragile.forward)))
    assert made == ["norm"] and id(module.norm) in leaves
    assert any(n.op == "call_module" and n.target == "norm" for n in trace.graph.nodes)
    found = discover(clone_modules(module))
    assert [r.name for r in found.regions] == [""] and [s.name for s in found.skipped] == ["norm"]


def test_containers_are_descended_into():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Dropout(0.3), nn.Linear(4, 4))
                                        for _ in range(2))
            self.heads = nn.ModuleDict({"a": Block()})

        def forward(self, x):
            if x.sum() > 0:
                return self.layers[0](x)
            return self.layers[1](x)

    found = discover(clone_modules(Untraceable()))
    assert [r.name for r in found.regions] == ["layers.0", "layers.1", "heads.a"]
    assert [s.name for s in found.skipped] == ["<root>"]


def test_transformer_layers_trace_their_blocks_as_methods():
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1), 2, enable_nested_tensor=False)
    found = discover(clone_modules(model))
    assert [(r.name, r.method) for r in found.regions] == [
        ("layers.0", "_ff_block"), ("layers.0", "_sa_block"), ("layers.1", "_ff_block"), ("layers.1", "_sa_block")]
    g = NormalisedGraph(found.regions[0].graph, found.regions[0].module, prefix="layers.0")
    plan = plan_graph(g, CONFIG, region="layers.0")
    assert {s.name: s.plan for s in plan.sites} == {"layers.0.dropout": "chain", "layers.0.dropout2": "output"}
    g = NormalisedGraph(found.regions[1].graph, found.regions[1].module, prefix="layers.0")
    (site,) = plan_graph(g, CONFIG, region="layers.0").sites
    assert site.name == "layers.0.dropout1" and not site.converted and "MultiheadAttention" in site.reason


def test_clone_shares_tensors_not_modules_and_takes_parametrized_modules():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    clone = clone_modules(model)
    assert all(a is b for a, b in zip(clone.parameters(), model.parameters()))
    assert all(a is b for a, b in zip(clone.buffers(), model.buffers()))
    assert all(a is not b for a, b in zip(clone.modules(), model.modules()))
    clone.eval()
    assert model.training and model[1].training


# ---------------------------------------------------------------- planning


def test_linear_output_with_other_users_is_not_shrunk():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(self.drop(torch.relu(h))) + h

    assert _plans(M()) == {"drop": "input"}


def test_two_activations_in_a_row_stop_the_producer():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.fc2(self.drop(torch.tanh(torch.relu(self.fc1(x)))))

    assert _plans(M()) == {"drop": "input"}


def test_identity_between_linear_activation_and_dropout_keeps_the_chain():
    """timm's Mlp: fc1 -> act -> drop1 -> norm (Identity) -> fc2 -> drop2."""
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.drop1 = nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.3)
            self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(16, 8), nn.Dropout(0.3)

        def forward(self, x):
            return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))

    g, plan = _plan(Mlp())
    assert {s.name: s.plan for s in plan.sites} == {"drop1": "chain", "drop2": "output"}
    assert len(plan.chains[0].linears) == 2


def test_family_change_splits_the_chain():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
            self.d1, self.d2 = nn.Dropout(0.5), nn.Dropout(0.5)

        def forward(self, x):
            return self.fc[2](self.d2(F.relu(self.fc[1](self.d1(F.relu(self.fc[0](x)))))))

    _, plan = _plan(M(), DropoutConfig(pattern={"d1": "row", "d2": "block"}))
    assert sorted(len(c.linears) for c in plan.chains) == [1, 2]
    assert {s.name: (s.plan, s.family) for s in plan.sites} == {"d1": ("output", "row"), "d2": ("chain", "block")}


class LoRA(nn.Module):
    """peft's LoRA layer after a dropout: ``h = drop(x)``; ``base(h) + B(A(lora_drop(h)))``."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1)
        self.base, self.lora_a, self.lora_b = nn.Linear(8, 8), nn.Linear(8, 2, bias=False), nn.Linear(2, 8, bias=False)
        self.lora_drop = nn.Dropout(0.2)

    def forward(self, x):
        h = self.drop(x)
        return self.base(h) + self.lora_b(self.lora_a(self.lora_drop(h)))


def test_lora_shape_plans_a_shared_input_and_an_input_site():
    assert _plans(LoRA()) == {"drop": "input", "lora_drop": "input"}


@pytest.mark.parametrize("dropout, reason", [
    (nn.Dropout2d(0.3), "Dropout2d"), (nn.AlphaDropout(0.3), "AlphaDropout")])
def test_left_as_is_with_a_reason(dropout, reason):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), dropout, nn.Linear(4, 4))
    (site,) = _plan(model)[1].sites
    assert not site.converted and reason in site.reason


def test_zero_rate_converts_and_is_inactive_until_raised():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Dropout(0.0), nn.Linear(4, 4))
    (site,) = _plan(model)[1].sites
    assert site.converted and site.p == 0.0


# ---------------------------------------------------------------- where each rewrite is installed


class Outer(nn.Module):
    """A chain inside ``ffn``; a chain that crosses from ``ffn`` into the root (T5LayerFF's outer dropout)."""

    def __init__(self, cross: bool):
        super().__init__()
        self.cross = cross
        self.ffn = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 4))
        self.drop = nn.Dropout(0.1)
        self.other = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Dropout(0.2), nn.Linear(4, 4))

    def forward(self, x):
        y = self.ffn(x)
        return (self.drop(y) if self.cross else y) + self.other(x)


@pytest.mark.parametrize("cross", [False, True])
def test_each_rewrite_is_installed_at_the_smallest_module_that_holds_it(cross):
    model = clone_modules(Outer(cross))
    (region,) = discover(model).regions
    g = NormalisedGraph(region.graph, region.module)
    plan = plan_graph(g, CONFIG)
    installs = sorted(r.name for r in install_regions(region, plan, {}))
    assert installs == (["", "other"] if cross else ["ffn", "other"])


# ---------------------------------------------------------------- rewriting


class _RecordingEmitter:
    """An emitter that inserts a marker call per rewrite (the graph surgery alone)."""

    def param(self, graph, value):
        return graph.get_attr(value) if isinstance(value, str) else value

    def chain(self, graph, chain, source, params):
        node = graph.call_function(torch.add, (source, 0))
        if not chain.input_shared:
            return node, None
        return node, graph.call_function(torch.mul, (source, 1))

    def tile(self, graph, tile, source, params):
        return graph.call_function(torch.add, (source, 0))

    def unit(self, graph, unit, source):
        return graph.call_function(torch.mul, (source, 1))

    def rnn_input(self, graph, rnn_input, source):
        return None


def test_rewrite_counts_and_removes_the_matched_nodes():
    module = Activations()
    g, plan = _plan(module)
    before = COUNTERS["chain"]
    applied = apply_plan(g.graph, plan, _RecordingEmitter())
    assert len(applied) == 1 and COUNTERS["chain"] == before + 1
    targets = [n.target for n in g.graph.nodes if n.op == "call_module"]
    assert targets == []


def test_rewrite_of_the_lora_shape_reads_the_shared_value():
    module = LoRA()
    g, plan = _plan(module)
    apply_plan(g.graph, plan, _RecordingEmitter())  # used to fail with KeyError in the topological sort
    g.graph.lint()
    # The second chain's source is the masked input the first one shares.
    adds = [n for n in g.graph.nodes if n.target is torch.add and n.args[1] == 0]
    muls = [n for n in g.graph.nodes if n.target is torch.mul]
    assert len(adds) == 2 and len(muls) == 1 and adds[1].args[0] is muls[0]


def _dynamo_style_graph(conv1d: bool = False):
    """What Dynamo hands a backend: parameters are placeholders, ``linear``/``dropout`` are functions,
    and ``self.training`` is already a constant (``conv1d``: GPT-2's view -> addmm -> view)."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    w1, b1, w2, b2 = (graph.placeholder(n) for n in ("w1", "b1", "w2", "b2"))
    shapes = ((x, (2, 2, 6)), (w1, (10, 6)), (b1, (10,)), (w2, (10, 3) if conv1d else (3, 10)), (b2, (3,)))
    for node, shape in shapes:
        node.meta["example_value"] = torch.empty(shape)
    h = graph.call_function(F.linear, (x, w1, b1))
    h.meta["example_value"] = torch.empty(2, 2, 10)
    h = graph.call_function(F.gelu, (h,))
    h = graph.call_function(F.dropout, (h, 0.3, True, False))
    h.meta["example_value"] = torch.empty(2, 2, 10)
    if conv1d:
        flat = graph.call_method("view", (h, -1, 10))
        mm = graph.call_function(torch.addmm, (b2, flat, w2))
        y = graph.call_method("view", (mm, (2, 2, 3)))
        y.meta["example_value"] = torch.empty(2, 2, 3)
    else:
        y = graph.call_function(F.linear, (h, w2, b2))
    graph.output(y)
    return graph


@pytest.mark.parametrize("conv1d", [False, True])
def test_functional_graph_with_weights_as_inputs(conv1d):
    graph = _dynamo_style_graph(conv1d)
    plan = plan_graph(NormalisedGraph(graph, None, constant_training_follows_mode=True), CONFIG)
    (site,) = plan.sites
    assert (site.plan, site.units, site.p) == ("chain", 10, 0.3)
    (chain,) = plan.chains
    assert chain.activations == ["gelu"] and [l.in_features for l in chain.linears] == [6, 10]
    assert [l.transposed for l in chain.linears] == [False, conv1d]
    # without the Dynamo convention, a literal training=True is an always-on dropout
    (site,) = plan_graph(NormalisedGraph(_dynamo_style_graph(conv1d), None), CONFIG).sites
    assert not site.converted and "training=True" in site.reason

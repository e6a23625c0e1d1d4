"""fxdrop.passes (trace, find, rewrite): graph-level behaviour on small inline modules and on a
Dynamo-style functional graph (weights as graph inputs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxdrop.passes.find import NormalisedGraph, plan_graph
from fxdrop.passes.rewrite import COUNTERS, apply_plan
from fxdrop.passes.trace import clone_modules, graph_module, trace_module, trace_regions
from fxdrop.site import Site


def _plan(module: nn.Module, **options):
    gm = graph_module(module, trace_module(module))
    return gm, plan_graph(NormalisedGraph(gm.graph, gm), **options)


def _plans(module, **options):
    return {s.name: s.plan for s in _plan(module, **options)[1].sites}


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
    gm, plan = _plan(Activations())
    (chain,) = plan.chains
    assert len(chain.linears) == 5 and chain.activations == ["relu"] * 4
    assert [s.name for s in plan.sites] == ["drop", "drop:1", "drop:2", "drop:3"]


def test_functional_dropout_flags_read_the_mode_at_run_time():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return F.dropout(self.fc(x), p=0.2, training=self.training)

    graph = trace_module(M())
    (node,) = [n for n in graph.nodes if n.target is F.dropout]
    assert node.kwargs["training"].op == "get_attr" and node.kwargs["training"].target == "training"


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


def test_family_change_splits_the_chain():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
            self.d1, self.d2 = nn.Dropout(0.5), nn.Dropout(0.5)

        def forward(self, x):
            return self.fc[2](self.d2(F.relu(self.fc[1](self.d1(F.relu(self.fc[0](x)))))))

    gm, plan = _plan(M(), pattern={"d1": "row", "d2": "block"})
    assert sorted(len(c.linears) for c in plan.chains) == [1, 2]
    assert {s.name: (s.plan, s.family) for s in plan.sites} == {"d1": ("output", "row"), "d2": ("chain", "block")}


def test_rewrite_counts_and_code():
    gm, plan = _plan(Activations())
    before = COUNTERS["chain"]
    changed = apply_plan(gm, plan, lambda s: Site.create(s.name, s.p, s.family, seed=0, units=s.units))
    assert changed and COUNTERS["chain"] == before + 1
    code = gm.code
    assert code.count("self.fxdrop.chain_0(") == 1
    assert "drop" not in code.replace("fxdrop", "") and "relu" not in code


def test_untouched_graph_reports_no_change():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 1)

        def forward(self, x):
            return self.conv(x)

    gm, plan = _plan(M())
    assert not apply_plan(gm, plan, lambda s: None)


def _dynamo_style_graph():
    """What Dynamo hands a backend: parameters are placeholders, ``linear``/``dropout`` are functions,
    and ``self.training`` is already a constant."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    w1, b1, w2, b2 = (graph.placeholder(n) for n in ("w1", "b1", "w2", "b2"))
    for node, shape in ((x, (4, 6)), (w1, (10, 6)), (b1, (10,)), (w2, (3, 10)), (b2, (3,))):
        node.meta["example_value"] = torch.empty(shape)
    h = graph.call_function(F.linear, (x, w1, b1))
    h = graph.call_function(F.gelu, (h,))
    h = graph.call_function(F.dropout, (h, 0.3, True, False))
    y = graph.call_function(F.linear, (h, w2, b2))
    graph.output(y)
    return graph


def test_functional_graph_with_weights_as_inputs():
    graph = _dynamo_style_graph()
    plan = plan_graph(NormalisedGraph(graph, None, constant_training_follows_mode=True))
    (site,) = plan.sites
    assert (site.plan, site.units, site.p) == ("chain", 10, 0.3)
    (chain,) = plan.chains
    assert chain.activations == ["gelu"] and [l.in_features for l in chain.linears] == [6, 10]
    # without the Dynamo convention, a literal training=True is an always-on dropout
    (site,) = plan_graph(NormalisedGraph(_dynamo_style_graph(), None)).sites
    assert not site.converted and "training=True" in site.reason


def test_functional_graph_rewrite_runs():
    graph = _dynamo_style_graph()
    gm = fx.GraphModule(nn.Module(), graph)
    plan = plan_graph(NormalisedGraph(gm.graph, gm, constant_training_follows_mode=True))
    apply_plan(gm, plan, lambda s: Site.create(s.name, s.p, s.family, seed=0, units=s.units))
    args = [torch.randn(4, 6), torch.randn(10, 6), torch.randn(10), torch.randn(3, 10), torch.randn(3)]
    gm.eval()
    torch.testing.assert_close(gm(*args), F.linear(F.gelu(F.linear(args[0], args[1], args[2])), args[3], args[4]),
                               rtol=0, atol=0)


def test_trace_regions_records_the_tracer_message():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            if x.max() > 0:  # data-dependent
                return self.inner(x)
            return x

    result = trace_regions(clone_modules(Outer()))
    assert [r.name for r in result.regions] == ["inner"]
    (skipped,) = result.skipped
    assert skipped.name == "<root>" and skipped.type == "Outer" and "TraceError" in skipped.message


def test_clone_shares_tensors_not_modules():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    clone = clone_modules(model)
    assert all(a is b for a, b in zip(clone.parameters(), model.parameters()))
    assert all(a is b for a, b in zip(clone.buffers(), model.buffers()))
    assert all(a is not b for a, b in zip(clone.modules(), model.modules()))
    clone.eval()
    assert model.training and model[1].training


@pytest.mark.parametrize("dropout, reason", [
    (nn.Dropout2d(0.3), "Dropout2d"), (nn.AlphaDropout(0.3), "AlphaDropout"),
    (nn.Dropout(0.0), "p = 0")])
def test_left_as_is_with_a_reason(dropout, reason):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), dropout, nn.Linear(4, 4))
    (site,) = _plan(model)[1].sites
    assert not site.converted and reason in site.reason

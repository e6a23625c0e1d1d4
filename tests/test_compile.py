"""torch.compile: fxdrop's ops and converted models compile whole; ``backend="fxdrop"`` converts Dynamo graphs.

References are independent of the compiled path: the eager twin of a module (same seeds, so the same
patterns), or the original model with each dropout replaced by multiplication with its site's
``last_mask``. Compilation is slow on a CPU, so most cases use the ``aot_eager`` inner backend (it
runs AOTAutograd's trace, functionalisation and the fake kernels, everything but Inductor's codegen)
and two cases use Inductor.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import subprocess
import sys
import warnings

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import fxdrop
import fxdrop.ops as ops
from fxdrop.backend import fxdrop_backend, make_backend
from fxdrop.backend import sites as backend_sites
from fxdrop.site import CallerOwner, Site

from fxdrop.harness.masking import masked


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each case starts with an empty Dynamo cache (Sequential.forward is one code object for all) and counters."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


class CountingBackend:
    """An inner backend that records every graph Dynamo hands it."""

    def __init__(self, inner: str = "aot_eager"):
        self.inner = torch._dynamo.lookup_backend(inner)
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return self.inner(gm, example_inputs)


def mlp(sizes=(12, 32, 32, 4), p=(0.5, 0.3)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(p):
            layers += [nn.ReLU(), nn.Dropout(p[i])]
    return nn.Sequential(*layers)


class Block(nn.Module):
    """A functional dropout inside a user module's forward."""

    def __init__(self, d=32, inner=24, p=0.3):
        super().__init__()
        self.fc = nn.Linear(d, inner)
        self.out = nn.Linear(inner, d)
        self.p = p

    def forward(self, x):
        return self.out(F.dropout(torch.relu(self.fc(x)), self.p, self.training))


def mixed_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Dropout(0.5), Block(), nn.Linear(32, 4))


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def loss_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(x).square().mean()
    loss.backward()
    return loss.detach(), grads(model)


def assert_all_close(got, want, **tol):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tol)


# ---------------------------------------------------------------- the ops inside a hand-written module


class HandWritten(nn.Module):
    """Calls the fxdrop ops directly in training, the plain ops in eval (what the converted modules do)."""

    def __init__(self, kind: str, seed: int = 0):
        super().__init__()
        self.kind = kind
        self.l1 = nn.Linear(12, 32)
        self.l2 = nn.Linear(32, 8)
        units = 12 if kind == "input" else 32
        shape = (32, 12) if kind == "tile" else None
        self.site = Site("h", "row" if kind != "tile" else "tile", CallerOwner(self, 0.5), seed=seed, units=units,
                         weight_shape=shape, tile=4)

    def forward(self, x):
        if not self.training:
            return self.l2(torch.relu(self.l1(x)))
        if self.kind == "chain":
            patterns = self.site.sample().unsqueeze(0)
            return ops.chain(x, [self.l1.weight, self.l2.weight], [self.l1.bias, self.l2.bias], patterns,
                             family="row", activations=["relu"], rates=[0.5])
        if self.kind == "unit":
            h = ops.unit_dropout(torch.relu(self.l1(x)), self.site.sample(), family="row", p=0.5)
            return self.l2(h)
        if self.kind == "tile":
            h = ops.tile_linear(x, self.l1.weight, self.l1.bias, self.site.sample(), tile=4, p=0.5)
            return self.l2(torch.relu(h))
        patterns = torch.stack([self.site.sample()])  # "input": input-structured l1
        return self.l2(torch.relu(ops.chain(x, [self.l1.weight], [self.l1.bias], patterns, family="row",
                                            activations=[], input_dropout=True, rates=[0.5])))


@pytest.mark.parametrize("kind", ["chain", "unit", "tile", "input"])
def test_ops_compile_whole_and_new_patterns_never_recompile(kind):
    torch.manual_seed(0)
    module = HandWritten(kind, seed=11)
    twin = copy.deepcopy(module)  # same weights, same scheduler state: the same patterns in eager
    backend = CountingBackend()
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    x = torch.randn(6, 12)
    patterns = set()
    for step in range(4):
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            got = loss_and_grads(compiled, x)
        want = loss_and_grads(twin, x)
        torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
        assert_all_close(got[1], want[1], atol=1e-6, rtol=1e-6)
        patterns.add(module.site.last_pattern)
        assert module.site.last_pattern == twin.site.last_pattern
    assert len(backend.graphs) == 1
    assert len(patterns) > 1, "the pattern should change between steps"
    assert module.site.scheduler.draws == 4

    # one more graph per mode, and switching back and forth recompiles nothing
    for mode, expected in [("eval", 2), ("train", 2), ("eval", 2)]:
        getattr(compiled, mode)()
        getattr(twin, mode)()
        with torch.no_grad() if mode == "eval" else contextlib.nullcontext():
            out = compiled(x)
        assert len(backend.graphs) == expected
    with torch.no_grad():
        torch.testing.assert_close(out, twin(x), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- converted models under torch.compile


def test_converted_model_compiles_whole_and_matches_eager():
    torch.manual_seed(0)
    original = mlp()
    converted = fxdrop.convert(original, seed=7)
    twin = fxdrop.convert(copy.deepcopy(original), seed=7)
    backend = CountingBackend()
    compiled = torch.compile(converted, backend=backend, fullgraph=True)
    opt, twin_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (converted, twin))
    x = torch.randn(16, 12)
    for step in range(4):
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            got = loss_and_grads(compiled, x)
        want = loss_and_grads(twin, x)
        torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
        assert_all_close(got[1], want[1], atol=1e-6, rtol=1e-6)
        opt.step()
        twin_opt.step()
    assert len(backend.graphs) == 1
    assert [s.last_pattern for s in fxdrop.sites(converted)] == [s.last_pattern for s in fxdrop.sites(twin)]
    compiled.eval()
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), twin(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(compiled(x), original.eval()(x), atol=1e-6, rtol=1e-6)
    compiled.train()
    compiled(x)
    assert len(backend.graphs) == 2


# ---------------------------------------------------------------- backend="fxdrop"


def test_backend_is_registered_under_its_name():
    assert torch._dynamo.lookup_backend("fxdrop") is fxdrop_backend
    assert "fxdrop" in torch._dynamo.list_backends()


def test_backend_found_through_the_entry_point_without_importing_fxdrop():
    """A fresh interpreter that never imports fxdrop: the torch_dynamo_backends entry point loads it
    (registering at import as well must not make Dynamo's own registration fail)."""
    code = ("import torch\n"
            "from torch._dynamo.utils import counters\n"
            "m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.5),"
            " torch.nn.Linear(8, 2))\n"
            "torch.compile(m, backend='fxdrop', options={'inner': 'eager'})(torch.randn(3, 4)).sum().backward()\n"
            "print(counters['fxdrop']['sites_converted'])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "1"


def test_backend_converts_and_matches_the_masked_original():
    torch.manual_seed(0)
    model = mixed_model()
    backend = make_backend("aot_eager", seed=3)
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(16, 12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            got = loss_and_grads(compiled, x)
        by_name = {site.name: site for site in backend_sites(model)}
        assert set(by_name) == {"2", "3.dropout"}
        with masked(model, {name: site.last_mask for name, site in by_name.items()}):
            want = loss_and_grads(model, x)
        torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
        assert_all_close(got[1], want[1], atol=1e-6, rtol=1e-5)
        for p, g in zip(model.parameters(), got[1]):
            p.grad = g
        opt.step()
    assert counters["fxdrop"]["sites_converted"] == 2
    assert counters["fxdrop"]["chain"] == 1  # Linear -> gelu -> drop -> Block.fc -> relu -> drop -> Block.out
    (graph,) = backend.graphs
    assert graph.training and "fxdrop_ops_chain" in graph.code and "dropout" not in graph.code.split("chain")[1]
    assert [r.name for r in graph.converted] == ["2", "3.dropout"]
    assert "3.fc -> 3.out" in graph.records[1].reason
    assert by_name["2"].scheduler.draws == 3

    # eval: a graph of its own, left exactly as Dynamo captured it
    before = dict(counters["fxdrop"])
    compiled.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=0, rtol=0)
    assert dict(counters["fxdrop"]) == before
    assert not backend.graphs[1].training and "fxdrop" not in backend.graphs[1].code


class Untraceable(nn.Module):
    """Data-dependent control flow: symbolic_trace fails, Dynamo breaks the graph at the branch."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 32)
        self.drop2 = nn.Dropout(0.25)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = self.drop(torch.relu(self.fc1(x)))
        h = self.fc2(h) if h.sum() > 0 else self.fc3(h)
        return self.out(self.drop2(torch.tanh(h)))


def test_backend_converts_what_symbolic_trace_cannot():
    torch.manual_seed(0)
    model = Untraceable()
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    backend = make_backend("aot_eager", seed=5)
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(8, 12)
    got = loss_and_grads(compiled, x)
    by_name = {site.name: site for site in backend_sites(model)}
    assert set(by_name) == {"drop", "drop2"}
    # each site converted in its own graph
    assert sorted(len(g.converted) for g in backend.graphs if g.training) == [1, 1]
    with masked(model, {name: site.last_mask for name, site in by_name.items()}):
        want = loss_and_grads(model, x)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
    assert_all_close(got[1], want[1], atol=1e-6, rtol=1e-5)


def test_backend_keeps_sites_across_recompiles():
    """A new input shape recompiles; the sites (and their random streams) carry on."""
    torch.manual_seed(0)
    model = mlp()
    backend = make_backend("aot_eager", seed=0)
    compiled = torch.compile(model, backend=backend)
    compiled(torch.randn(8, 12))
    first = backend_sites(model)
    draws = [s.scheduler.draws for s in first]
    compiled(torch.randn(5, 12))
    compiled(torch.randn(7, 12))
    assert len(backend.graphs) >= 2
    again = backend_sites(model)
    assert [id(s) for s in again] == [id(s) for s in first]
    assert [s.scheduler.draws for s in again] == [d + 2 for d in draws]
    assert backend.sites == first


def test_backend_options_through_torch_compile():
    torch.manual_seed(0)
    model = mixed_model()
    compiled = torch.compile(model, backend="fxdrop",
                             options={"inner": "eager", "p": {"2": 0.25}, "pattern": "block", "seed": 1})
    compiled(torch.randn(4, 12)).sum().backward()
    by_name = {site.name: site for site in backend_sites(model)}
    assert by_name["2"].p == 0.25 and by_name["3.dropout"].p == 0.3
    assert {s.family for s in by_name.values()} == {"block"}
    with pytest.raises(Exception, match="unknown options"):
        torch.compile(mlp(), backend="fxdrop", options={"inner": "eager", "colour": "red"})(torch.randn(2, 12))
    with pytest.raises(ValueError, match="pattern family"):
        make_backend("eager", pattern="diagonal")


def test_backend_tile_family():
    torch.manual_seed(0)
    model = mlp()
    backend = make_backend("aot_eager", pattern="tile", tile=4, seed=0)
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(8, 12)
    loss, _ = loss_and_grads(compiled, x)
    assert torch.isfinite(loss)
    assert counters["fxdrop"]["tile_linear"] == 2 and counters["fxdrop"]["sites_converted"] == 2
    assert all(s.weight_shape == (32, 32) or s.weight_shape == (4, 32) for s in backend_sites(model))


class Skipped(nn.Module):
    """Dropouts fxdrop leaves alone: on attention probabilities, and one feeding a convolution."""

    def __init__(self):
        super().__init__()
        self.qk = nn.Linear(8, 8)
        self.attn_drop = nn.Dropout(0.1)
        self.conv_drop = nn.Dropout(0.2)
        self.conv = nn.Conv1d(4, 4, 3, padding=1)

    def forward(self, x):  # x: (batch, 4, 8)
        attn = self.attn_drop(torch.softmax(self.qk(x) @ x.transpose(1, 2), dim=-1))
        return self.conv(self.conv_drop(attn @ x))


def test_backend_counts_and_logs_skipped_sites(caplog, monkeypatch):
    monkeypatch.setenv("FXDROP_LOG", "1")
    model = Skipped()
    with caplog.at_level(logging.DEBUG, logger="fxdrop.backend"):
        torch.compile(model, backend=make_backend("eager"))(torch.randn(2, 4, 8))
    assert counters["fxdrop"]["sites_skipped"] == 2 and counters["fxdrop"]["sites_converted"] == 0
    text = caplog.text
    assert "attn_drop" in text and "attention probabilities" in text
    assert "conv_drop" in text and "convolution" in text
    monkeypatch.delenv("FXDROP_LOG")
    torch.compile(Skipped(), backend=make_backend("eager"))(torch.randn(2, 4, 8))
    assert not logging.getLogger("fxdrop.backend").handlers  # FXDROP_LOG unset: back to normal


# ---------------------------------------------------------------- nn.LSTM


class WordModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.drop = nn.Dropout(0.3)
        self.lstm = nn.LSTM(8, 12, num_layers=2, dropout=0.3)
        self.out_drop = nn.Dropout(0.4)
        self.dec = nn.Linear(12, 20)

    def forward(self, idx):
        h, _ = self.lstm(self.drop(self.emb(idx)))
        return self.dec(self.out_drop(h))


@pytest.mark.parametrize("granularity", ["forward", "rows"])
def test_lstm_convert_before_compiling(granularity):
    """What works for LSTMs: convert first (StructuredLSTM), then compile; Dynamo breaks the graph
    at the LSTM's pattern (a data-dependent slice), the rest compiles. With granularity="rows" the
    decoder's row-class plans and the LSTM sites' time-chunk plans come through fxdrop::sample_classes, so
    the compiled model draws what eager does."""
    torch.manual_seed(0)
    model = WordModel()
    converted = fxdrop.convert(model, seed=0, granularity=granularity)
    twin = fxdrop.convert(copy.deepcopy(model), seed=0, granularity=granularity)
    assert {s.name for s in fxdrop.sites(converted)} == {"drop", "lstm.layer0", "out_drop"}
    assert {s.name: s.granularity for s in fxdrop.sites(converted)} == {
        "drop": granularity, "lstm.layer0": granularity, "out_drop": granularity}
    compiled = torch.compile(converted, backend="aot_eager")
    idx = torch.randint(0, 20, (5, 3))
    for _ in range(2):
        got, want = loss_and_grads(compiled, idx), loss_and_grads(twin, idx)
        torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
        assert_all_close(got[1], want[1], atol=1e-6, rtol=1e-5)
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx), model.eval()(idx), atol=1e-6, rtol=1e-6)


class RNNModel(nn.Module):
    """PyTorch's word_language_model RNNModel: ``drop(encoder) -> rnn -> drop -> decoder``."""

    def __init__(self, kind="LSTM"):
        super().__init__()
        self.drop = nn.Dropout(0.3)
        self.encoder = nn.Embedding(20, 8)
        self.rnn = getattr(nn, kind)(8, 12, num_layers=2, dropout=0.3)
        self.decoder = nn.Linear(12, 20)

    def forward(self, input, hidden=None):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        return self.decoder(self.drop(output)), hidden


def test_lstm_under_the_backend_warns_once_and_names_the_fix():
    """Dynamo does not trace nn.LSTM: the graph before it reaches the backend, the rest runs eagerly."""
    torch.manual_seed(0)
    model = RNNModel()
    idx = torch.randint(0, 20, (5, 3))
    compiled = torch.compile(model, backend=make_backend("eager"))
    with pytest.warns(UserWarning, match=r"recurrent modules \(rnn\).*torch.compile\(fxdrop.convert\(model\)\)"):
        compiled(idx)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled(idx)
    assert counters["fxdrop"]["sites_converted"] == 0
    # the fix: convert, then compile
    converted = fxdrop.convert(model, seed=0)
    assert {s.name for s in fxdrop.sites(converted)} == {"drop", "drop:1", "rnn.layer0"}
    loss = torch.compile(converted, backend="aot_eager")(idx)[0].square().mean()
    loss.backward()
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- Inductor


def test_inductor_converted_and_backend():
    torch.manual_seed(0)
    original = mlp()
    x = torch.randn(16, 12)
    # fxdrop.convert, then torch.compile with Inductor
    converted = fxdrop.convert(original, seed=2)
    twin = fxdrop.convert(copy.deepcopy(original), seed=2)
    compiled = torch.compile(converted, fullgraph=True)
    for _ in range(2):
        got, want = loss_and_grads(compiled, x), loss_and_grads(twin, x)
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        assert_all_close(got[1], want[1], atol=1e-5, rtol=1e-4)
    # backend="fxdrop" with its default inner backend, Inductor
    torch._dynamo.reset()
    model = copy.deepcopy(original)
    compiled = torch.compile(model, backend="fxdrop", options={"seed": 4})
    for _ in range(2):
        got = loss_and_grads(compiled, x)
        masks = {s.name: s.last_mask for s in backend_sites(model)}
        with masked(model, masks):
            want = loss_and_grads(model, x)
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        assert_all_close(got[1], want[1], atol=1e-5, rtol=1e-4)
    assert counters["fxdrop"]["sites_converted"] == 2


# ---------------------------------------------------------------- a real model library

def _t5(transformers):
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1,
                                   num_heads=2, dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0)
    ids = torch.randint(1, 64, (2, 6))
    return transformers.T5ForConditionalGeneration(config), dict(input_ids=ids, labels=ids)


def _bert(transformers):
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    return (transformers.BertForSequenceClassification(config),
            dict(input_ids=torch.randint(1, 64, (2, 6)), labels=torch.tensor([0, 2])))


def _gpt2(transformers):
    config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    ids = torch.randint(1, 64, (2, 6))
    return transformers.GPT2LMHeadModel(config), dict(input_ids=ids, labels=ids)


@pytest.mark.parametrize("name", ["t5", "bert", "gpt2"])
def test_transformers_models(name):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    torch.manual_seed(0)
    model, batch = {"t5": _t5, "bert": _bert, "gpt2": _gpt2}[name](transformers)
    backend = make_backend("eager", seed=0)
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        loss = compiled(**batch).loss
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    records = {r.name: r for g in backend.graphs for r in g.records}
    converted = {name for name, r in records.items() if r.converted}
    if name == "t5":
        dense = records["encoder.block.0.layer.1.DenseReluDense.dropout"]
        assert dense.plan == "chain" and "DenseReluDense.wi -> encoder.block.0.layer.1.DenseReluDense.wo" in dense.reason
        assert {"encoder.block.0.layer.0.dropout", "decoder.block.0.layer.2.DenseReluDense.dropout"} <= converted
    elif name == "bert":
        assert {"bert.encoder.layer.0.attention.output.dropout", "bert.encoder.layer.0.output.dropout",
                "bert.embeddings.dropout"} <= converted
    else:
        # GPT-2's projections are transformers' Conv1D (view -> addmm on a transposed weight -> view).
        assert {"transformer.h.0.mlp.dropout", "transformer.h.0.attn.resid_dropout"} <= converted
    assert {s.name for s in backend_sites(model)} == converted
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(**batch).logits, model(**batch).logits, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("granularity", ["forward", "rows"])
@pytest.mark.parametrize("pattern", ["row", "block", "tile"])
def test_convert_and_the_backend_draw_the_same_patterns(granularity, pattern):
    """One planner, one config: for the same model and seed, convert and backend="fxdrop" convert the same
    sites under the same names, draw the same patterns and compute the same training steps."""
    torch.manual_seed(0)
    model = mixed_model()
    x = torch.randn(16, 12)
    options = dict(seed=7, granularity=granularity, pattern=pattern, row_classes=4)
    converted = fxdrop.convert(copy.deepcopy(model), **options)
    compiled = torch.compile(model, backend="fxdrop", options={"inner": "aot_eager", **options})
    for _ in range(3):
        got, want = loss_and_grads(compiled, x), loss_and_grads(converted, x)
        torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
        assert_all_close(got[1], want[1], atol=1e-6, rtol=1e-5)
    eager = {s.name: s for s in fxdrop.sites(converted)}
    compiled_sites = {s.name: s for s in backend_sites(model)}
    assert set(eager) == set(compiled_sites) == {"2", "3.dropout"}
    for name, site in eager.items():  # the same stream at the same draw (the replay tokens are random)
        assert (site.scheduler.seed, site.scheduler.draws) == (compiled_sites[name].scheduler.seed,
                                                               compiled_sites[name].scheduler.draws)


def test_the_backend_takes_exactly_converts_options():
    from fxdrop.config import OPTIONS

    assert set(OPTIONS) == set(inspect_options(fxdrop.convert)) - {"example_inputs", "example_kwargs"}
    with pytest.raises(TypeError, match=r"unknown options \['granularty'\]"):
        make_backend("eager", granularty="rows")


def inspect_options(fn):
    """The keywords ``fn`` takes, its ``**options`` expanded to DropoutConfig's fields."""
    import inspect

    from fxdrop.config import OPTIONS

    names = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    return [n for n in names if n != "config"] + list(OPTIONS)


def test_a_single_linear_after_dropout_compiles_with_row_classes():
    """Dropout -> Linear -> ReLU (AlexNet's head) in rows mode: the chain saves nothing, and Inductor must not
    see unbacked sizes it never gets (a fake kernel that made them broke the backend)."""
    import torch._dynamo

    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(16, 32), nn.ReLU(inplace=True), nn.Linear(32, 4))
    x = torch.randn(6, 16)
    for make in (lambda: torch.compile(fxdrop.convert(model, seed=0, granularity="rows", example_inputs=(x,)),
                                       fullgraph=True),
                 lambda: torch.compile(copy.deepcopy(model), backend="fxdrop",
                                       options={"seed": 0, "granularity": "rows"})):
        torch._dynamo.reset()
        compiled = make().train()
        out = compiled(x)
        out.sum().backward()
        assert out.shape == (6, 4) and torch.isfinite(out).all()
        compiled.eval()
        with torch.no_grad():
            assert torch.equal(compiled(x), model.eval()(x))
        model.train()

"""The training-run benchmark harness: a block runs real optimizer steps on both sides and reports its
figures; rows alternate processes; drift is measured against the published median. No speed targets."""

from __future__ import annotations

import pytest
import torch

import fxdrop

from fxdrop.harness.training_runs import Row, Workload, block_in_process, drift, measure, run_block


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adamw"])
def test_a_block_trains_and_reports_its_phases(optimizer):
    workload = Workload("mlp", 32, 0.5, optimizer, 16, (("pattern", "block"),), steps=2, warmup=1)
    for converted in (False, True):
        out = run_block(workload, converted)
        assert out["ms_per_step"] > 0 and set(out["phases_ms"]) == {"zero_grad", "forward", "backward", "optimizer"}
        assert out["machine"]["torch_threads"] == torch.get_num_threads()


def test_a_reshuffle_option_is_the_runs_not_converts(monkeypatch):
    """``reshuffle=K`` in a variant: not passed to fxdrop.convert (which would reject it), named in the row's
    options, and applied with the block's optimizer on the fxdrop side only."""
    import importlib

    module = importlib.import_module("fxdrop.reshuffle")  # the module (fxdrop.reshuffle is the function)
    from fxdrop.harness.bench import named

    calls = []
    real = module.reshuffle
    monkeypatch.setattr(module, "reshuffle", lambda *a, **k: calls.append(k) or real(*a, **k))
    variant = named((("pattern", "block"), ("reshuffle", 2)), 0.5)
    assert dict(variant)["reshuffle"] == 2 and dict(variant)["granularity"] == "rows"
    workload = Workload("mlp", 32, 0.5, "momentum", 16, variant, steps=4, warmup=1)
    assert "reshuffle" not in workload.options() and workload.reshuffle() == 2
    assert "reshuffle=2" in workload.label()
    run_block(workload, converted=False)
    assert calls == []
    run_block(workload, converted=True)
    assert calls == [{"every": 2, "seed": 0}]


def test_named_keeps_auto_row_classes_for_a_model_with_rnn_sites():
    """One count cannot name what "auto" does in a model with LSTM and Linear sites (2 time chunks at
    the LSTM, 4 row classes at the decoder at p = 0.5): the PTB suite's default row keeps "auto"; the MLP
    suite's resolves it; a count the user names stays as named in both."""
    from fxdrop.harness.bench import named, workloads

    assert dict(named((("pattern", "block"),), 0.5))["row_classes"] == 4
    assert dict(named((("pattern", "block"),), 0.5, rnn=True))["row_classes"] == "auto"
    assert dict(named((("row_classes", 8),), 0.5, rnn=True))["row_classes"] == 8
    ptb, = workloads("ptb", widths=None, rates=[0.5], optimizers=["sgd"],
                     variants=[(("granularity", "rows"), ("pattern", "block"))], steps=2, warmup=1)
    assert dict(ptb.convert)["row_classes"] == "auto" and "row_classes=auto" in ptb.label()


def test_compiled_workloads_compile_both_sides_and_name_their_mode():
    """``compile``: inductor compiles the standard model and the converted one (the converted one really
    converted), backend compiles the standard model with fxdrop's backend; an unknown mode is named."""
    from torch._dynamo.eval_frame import OptimizedModule

    from fxdrop.harness.bench import workloads
    from fxdrop.harness.training_runs import _build

    workload = Workload("mlp", 16, 0.5, "momentum", 8, (("pattern", "block"),), compile="inductor")
    standard, _, _ = _build(workload, converted=False)
    converted, _, _ = _build(workload, converted=True)
    assert isinstance(standard, OptimizedModule) and isinstance(converted, OptimizedModule)
    assert [site.name for site in fxdrop.sites(converted._orig_mod)] == ["2", "5", "8"]
    backend, _, _ = _build(Workload("mlp", 16, 0.5, compile="backend"), converted=True)
    assert isinstance(backend, OptimizedModule) and not fxdrop.sites(backend._orig_mod)  # converted when run
    assert "compile=backend" in Workload(compile="backend").label() and "compile" not in Workload().label()
    rows = workloads("mlp", widths=[64], rates=[0.5, 0.7], optimizers=["sgd"], variants=[(("pattern", "block"),)],
                     steps=2, warmup=1, compile="inductor")
    assert [w.compile for w in rows] == ["inductor", "inductor"]
    # a row names what it measured: the default granularity and the row classes "auto" resolved at its rate
    assert [w.options() for w in rows] == [{"pattern": "block", "granularity": "rows", "row_classes": 4},
                                           {"pattern": "block", "granularity": "rows", "row_classes": 8}]
    with pytest.raises(ValueError, match="compile='jit'"):
        Workload(compile="jit")


def test_the_converted_side_is_converted_and_learns():
    """The fxdrop block's model is really converted (structured ops run) and its loss falls."""
    from fxdrop.harness.training_runs import _build, _optimizer

    workload = Workload("mlp", 64, 0.5, "momentum", 32, (("pattern", "block"),))
    model, inputs, loss_of = _build(workload, converted=True)
    assert [site.name for site in fxdrop.sites(model)] == ["2", "5", "8"]
    opt = _optimizer("momentum", model.parameters(), "mlp")
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = loss_of(model(*inputs))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])


def test_rows_alternate_processes_and_record_every_round():
    workload = Workload("ptb", 16, 0.5, "sgd", 2, (("pattern", "block"),), steps=2, warmup=1)
    row, machine = measure(workload, repeats=2)
    assert len(row.standard_ms) == len(row.fxdrop_ms) == len(row.ratios) == 2
    assert row.speedup == pytest.approx(sorted(row.ratios)[0] / 2 + sorted(row.ratios)[1] / 2)
    assert machine["torch_threads"] >= 1 and "malloc" in machine["allocator"] and row.workload["convert"] == {"pattern": "block"}


def test_drift_and_bad_workloads():
    assert drift({"ratios": [2.0, 2.0, 2.0]}, Row({}, ratios=[2.2])) == pytest.approx(0.1)
    with pytest.raises(RuntimeError, match="benchmark block failed"):
        block_in_process(Workload("mlp", 8, 0.5, "lamb", 4, steps=1, warmup=0), False)


def test_the_chain_workload_is_one_chain_op_and_composite_blocks_run_without_the_extension():
    """``model="chain"`` is Linear -> ReLU -> Dropout -> Linear, converted into one fused chain; a row with
    ``kernels="composite"`` runs its fxdrop blocks with FXDROP_NO_EXT=1 and records that they did, while
    its standard side is the same as any row's; a bad kernels or model name is named."""
    from fxdrop.harness.training_runs import _build

    workload = Workload("chain", 32, 0.5, "momentum", 8, (("pattern", "block"),), steps=2, warmup=1,
                        kernels="composite")
    model, inputs, loss_of = _build(workload, converted=True)
    [site] = fxdrop.sites(model)
    assert (site.name, site.producer, site.consumer) == ("2", "0 -> relu", "3 (Linear)")  # both GEMMs shrink
    assert loss_of(model(*inputs)).dim() == 0
    row, _ = measure(workload, repeats=1)
    assert row.fxdrop_kernels_ran == ["composite"] and "kernels=composite" in workload.label()
    compiled, _ = measure(Workload("chain", 32, 0.5, "sgd", 8, (("pattern", "block"),), steps=1, warmup=0), repeats=1)
    from fxdrop.ops import extension

    assert compiled.fxdrop_kernels_ran == [extension.ensure_loaded() or "composite"]
    with pytest.raises(ValueError, match="kernels='cuda'"):
        Workload(kernels="cuda")
    with pytest.raises(ValueError, match="model='cnn'"):
        Workload("cnn")

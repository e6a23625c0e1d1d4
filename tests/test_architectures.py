"""Public architectures (fxdrop.harness.architectures): the coverage check of fxdrop.harness.coverage on each.

Every architecture: conversion without a crash, every dropout listed (converted or with its reason), eval
output bit for bit, one training step against the masked original, the user's class and Parameters kept.
The compile columns (``torch.compile(convert(m))`` and ``backend="fxdrop"``, one training step each, with
the ``aot_eager`` inner backend) run on a representative subset, and Inductor on the transposed-input case;
``python -m fxdrop.harness.coverage`` runs them all, with Inductor, for README's table.
"""

from __future__ import annotations

import pytest
import torch

from fxdrop.harness import architectures as A
from fxdrop.harness import coverage

COMPILED = ("torchvision AlexNet", "timm MLP-Mixer", "transformers BERT", "transformers GPT-2",
            "word_language_model Transformer")


def _check(name: str, **kw) -> coverage.CoverageRow:
    row = coverage.check(A.BY_NAME[name], **kw)
    if not row.available:
        pytest.skip(row.errors["build"])
    return row


@pytest.mark.parametrize("name", [a.name for a in A.ARCHITECTURES])
def test_architecture_keeps_the_contract(name):
    row = _check(name, compile_checks=False)
    assert not row.errors, row.errors
    assert row.eval_exact and row.train_contract and row.model_kept
    assert row.converted, "no site converted"
    assert len(row.converted) + len(row.left) == row.dropouts
    assert all(reason for reason in row.left.values())


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_steps(name):
    row = _check(name, inner="aot_eager")
    assert row.compile and row.backend, row.errors


EXPECTED = {  # what each family of architectures must convert (the README table lists everything)
    "torchvision AlexNet": {"classifier.0": "input", "classifier.3": "chain"},
    "timm Mlp block": {"drop1": "chain", "drop2": "output"},
    "transformers T5": {"encoder.block.0.layer.1.DenseReluDense.dropout": "chain",
                        "encoder.block.0.layer.1.dropout": "output"},
    "transformers GPT-2": {"transformer.h.0.mlp.dropout": "output"},  # a Conv1D projection
    "transformers StableLM (Llama family, hidden dropout)": {"model.layers.0.dropout": "output"},
    "word_language_model LSTM": {"drop": "rnn_input", "rnn.layer0": "rnn", "drop:1": "input"},
    "word_language_model GRU": {"drop": "rnn_input", "rnn.layer0": "rnn", "drop:1": "input"},
    "word_language_model Transformer": {"encoder.layers.0.dropout": "chain", "encoder.layers.0.dropout2": "output"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_feed_forward_blocks_shrink_both_gemms_where_they_can(name):
    import fxdrop
    from fxdrop.convert import conversion

    arch = A.BY_NAME[name]
    try:
        model, batch = A.build(arch)
    except A.Unavailable as err:
        pytest.skip(str(err))
    converted = fxdrop.convert(model, seed=0, example_inputs=batch.args, example_kwargs=batch.kwargs)
    plans = {s.name: s.plan for s in conversion(converted).sites}
    assert {k: plans.get(k) for k in EXPECTED[name]} == EXPECTED[name]
    if name.startswith("word_language_model") and "Transformer" not in name:
        assert callable(converted.init_hidden)  # the user's class: its training loop's methods are there


def test_inductor_on_a_chain_over_a_transposed_input():
    """timm Mixer's token mixing runs its chain on a transposed input: the op's outputs must have the strides its
    fake kernel promises, or Inductor's stride assertion fails (fullgraph, Inductor)."""
    import torch._dynamo

    import fxdrop

    arch = A.BY_NAME["timm MLP-Mixer"]
    try:
        model, batch = A.build(arch)
    except A.Unavailable as err:
        pytest.skip(str(err))
    torch._dynamo.reset()
    converted = fxdrop.convert(model, seed=0, example_inputs=batch.args).train()
    compiled = torch.compile(converted, fullgraph=True)
    out = compiled(*batch.args)
    out.sum().backward()
    assert torch.isfinite(out).all()
    torch._dynamo.reset()

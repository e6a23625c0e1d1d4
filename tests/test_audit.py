"""fxdrop.audit: sites, decisions and reasons as convert makes them; FLOPs and the Amdahl speedup
against hand-computed values; the model is left unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxdrop
from fxdrop.audit import AuditReport, audit, ideal_speedup
from fxdrop.convert import conversion, convert

import zoo


def _mlp_step(sizes, batch, p):
    """Hand count: forward GEMM 2*B*in*out; backward adds grad-weight, and grad-input except for layer 0
    (its input is data); expected work scales by (1 - p) per structured side."""
    dense = expected = 0.0
    last = len(sizes) - 2
    for i in range(len(sizes) - 1):
        forward = 2.0 * batch * sizes[i] * sizes[i + 1]
        step = forward * (2 if i == 0 else 3)
        sides = (i > 0) + (i < last)
        dense += step
        expected += step * (1 - p) ** sides
    return dense, expected


def test_mlp_speedup_matches_hand_count():
    sizes, p = (20, 48, 40, 36, 10), 0.5
    report = audit(zoo.MLP(sizes, p=p), torch.randn(6, 20))
    dense, expected = _mlp_step(sizes, 6, p)
    assert report.step_flops == pytest.approx(dense)
    assert report.expected_flops == pytest.approx(expected)
    assert report.ideal_speedup == pytest.approx(dense / expected)
    assert ideal_speedup(zoo.MLP(sizes, p=p), torch.randn(6, 20)) == pytest.approx(dense / expected)
    # net.5 (between Linears 1 and 2) structures exactly those two GEMMs
    row = {s.name: s for s in report.sites}["net.5"]
    assert row.gemm_flops == pytest.approx(3 * 2.0 * 6 * (48 * 40 + 40 * 36))
    assert row.share == pytest.approx(row.gemm_flops / dense)


def test_rate_override_changes_the_prediction():
    low = audit(zoo.MLP(), torch.randn(6, 20), p=0.1).ideal_speedup
    high = audit(zoo.MLP(), torch.randn(6, 20), p=0.7).ideal_speedup
    assert 1.0 < low < high


@pytest.mark.parametrize("entry", zoo.ZOO, ids=lambda e: e.name)
def test_sites_and_decisions_match_convert(entry):
    torch.manual_seed(0)
    model = entry.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    report = audit(model, entry.example(), **entry.options)
    converted = convert(model, seed=0, **entry.options)
    expected = {s.name: (s.decision, s.plan, s.reason) for s in conversion(converted).sites}
    assert {s.name: (s.decision, s.plan, s.reason) for s in report.sites} == expected
    assert report.step_flops > 0 and report.ideal_speedup >= 1.0
    for row in report.sites:
        assert (row.gemm_flops is not None) == (row.decision == "converted")
    # the model is not changed
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_attention_dropout_is_left_with_its_reason():
    report = audit(zoo.GPT2Block(), torch.randn(2, 5, 24))
    row = {s.name: s for s in report.sites}["attn.attn_dropout"]
    assert row.decision == "left as is" and "attention probabilities" in row.reason and row.gemm_flops is None


def test_without_inputs_no_flops():
    report = audit(zoo.MLP())
    assert report.step_flops is None and report.ideal_speedup is None
    assert [s.decision for s in report.sites] == ["converted"] * 3
    assert "give example inputs" in str(report)


def test_tile_family_expected_work():
    report = audit(zoo.EmbeddingInput(), torch.randint(0, 50, (3, 5)), pattern="tile", p=0.5)
    forward = 2.0 * 15 * 24 * 7
    dense = forward * 3  # the normed embedding needs a gradient (LayerNorm and Embedding train)
    assert report.step_flops == pytest.approx(dense)
    assert report.expected_flops == pytest.approx(dense * 0.5)


def test_lstm_sites_and_gemms():
    report = audit(zoo.LSTMLanguageModel(), torch.randint(0, 50, (6, 3)))
    rows = {s.name: s for s in report.sites}
    assert rows["rnn.layer0"].plan == "rnn" and rows["drop_in"].plan == "rnn_input"
    t_b, d, h = 18, 16, 24
    layer1_ih = 3 * 2.0 * t_b * h * 4 * h
    assert rows["rnn.layer0"].gemm_flops == pytest.approx(layer1_ih)
    # layer 0's input GEMM: its input (the embedding output) needs a gradient, so three passes too
    assert rows["drop_in"].gemm_flops == pytest.approx(3 * 2.0 * t_b * d * 4 * h)


def test_partial_model_reports_skipped_modules_in_json():
    report = audit(zoo.DataDependent(), torch.randn(5, 16))
    data = json.loads(report.to_json())
    assert data["skipped"][0]["name"] == "<root>" and "control flow" in data["skipped"][0]["message"]
    assert [s["name"] for s in data["sites"]] == ["head.net.2", "head.net.5"]
    assert data["ideal_speedup"] > 1.0


def test_rich_rendering():
    report = audit(zoo.T5LayerFF(), torch.randn(2, 5, 24))
    text = str(report)
    assert "fxdrop audit: T5LayerFF" in text and "ideal step speedup" in text
    assert "DenseReluDense.dropout" in text
    assert isinstance(report, AuditReport) and fxdrop.audit is audit


def test_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        audit("model")
    with pytest.raises(ValueError, match=r"example_inputs \(\(6, 3\)\)"):
        audit(zoo.MLP(), torch.randn(6, 3))
    with pytest.raises(ValueError, match="pattern="):
        audit(zoo.MLP(), pattern="zigzag")


def test_tile_family_on_an_lstm_lm_reports_each_site():
    """pattern='tile' on an LSTM LM: the RNN sites are left with a reason, the decoder's converts."""
    report = audit(zoo.LSTMLanguageModel(), torch.randint(0, 50, (6, 3)), pattern="tile")
    rows = {s.name: s for s in report.sites}
    assert rows["drop_out"].plan == "tile_linear"
    assert rows["rnn.dropout"].decision == "left as is" and "tile family does not apply" in rows["rnn.dropout"].reason
    assert rows["drop_in"].decision == "left as is" and "tile family does not apply" in rows["drop_in"].reason


class ConvHead(nn.Module):
    """Convolutions inside a traced region count: the head's share is its share of the whole step."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5),
                                        nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def test_convolutions_and_grus_count_in_the_dense_step():
    report = audit(ConvHead(), torch.randn(2, 3, 16, 16))
    conv = 2.0 * 2 * 16 * 16 * 16 * 3 * 3 * 3 * 2  # forward + weight gradient (its input is data)
    linears = 2.0 * 2 * (64 * 32 + 32 * 10) * 3
    assert report.step_flops == pytest.approx(conv + linears, rel=0.01)
    assert report.ideal_speedup < 1.1  # the convolutions dominate: a small, honest prediction

    class GRUModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(8, 16, num_layers=2, dropout=0.5)
            self.out = nn.Linear(16, 4)

        def forward(self, x):
            return self.out(self.rnn(x)[0])

    report = audit(GRUModel(), torch.randn(5, 3, 8))
    rows = {s.name: s for s in report.sites}
    t_b = 15
    layer1_ih = 3 * 2.0 * t_b * 16 * 3 * 16
    assert rows["rnn.layer0"].plan == "rnn" and rows["rnn.layer0"].gemm_flops == pytest.approx(layer1_ih)
    gru = 2.0 * t_b * 3 * 16 * (8 * 2 + 16 * 3 + 16 * 3 + 16 * 3)  # ih0 (2 passes), hh0, ih1, hh1 (3 passes)
    assert report.step_flops == pytest.approx(gru + 2.0 * t_b * 16 * 4 * 2)


def test_keyword_arguments_reach_the_model():
    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = zoo.MLP((8, 16, 4))

        def forward(self, x, *, position_ids=None):
            return self.mlp(x if position_ids is None else x + position_ids)

    report = audit(Keywords(), torch.randn(3, 8), example_kwargs={"position_ids": torch.ones(3, 8)})
    assert report.step_flops > 0 and [s.decision for s in report.sites] == ["converted"]


def test_a_zero_rate_site_promises_nothing():
    model = zoo.MLP((20, 48, 40, 10), p=0.0)
    report = audit(model, torch.randn(6, 20))
    assert all(s.decision == "converted" for s in report.sites) and report.ideal_speedup == pytest.approx(1.0)


def test_roofline_prediction_counts_what_does_not_shrink():
    """The roofline speedup is above 1 and falls as the optimizer costs more; without the dense side's
    mask draws (which fxdrop does not make) it sits below the FLOP-only ideal; a bad optimizer is named; a
    model whose training step fails reports why instead of a figure."""
    model, x = zoo.MLP((64, 256, 256, 10), p=0.7), torch.randn(32, 64)
    plain = audit(model, x, optimizer=None, pattern="block")
    adamw = audit(model, x, optimizer="adamw", pattern="block")
    assert 1.0 < adamw.roofline_speedup < plain.roofline_speedup
    dense, converted = plain.roofline["dense"], plain.roofline["converted"]
    assert dense["random_s"] > 0 and converted["random_s"] == 0
    assert (dense["seconds"] - dense["random_s"]) / converted["seconds"] < plain.ideal_speedup
    dense, converted = adamw.roofline["dense"], adamw.roofline["converted"]
    assert dense["optimizer_s"] == pytest.approx(converted["optimizer_s"]) and dense["optimizer_s"] > 0
    assert converted["flops"] < dense["flops"]
    assert "roofline step speedup with the adamw optimizer" in str(adamw)
    assert json.loads(adamw.to_json())["roofline_speedup"] == pytest.approx(adamw.roofline_speedup)
    with pytest.raises(ValueError, match="optimizer='lamb'"):
        audit(model, x, optimizer="lamb")
    failing = audit(zoo.InplaceDropout(), torch.randn(5, 16))  # ReLU_ then Dropout_: PyTorch's backward raises
    assert failing.roofline_speedup is None and "inplace" in failing.roofline["unavailable"]
    assert "no roofline speedup" in str(failing)


def test_roofline_counts_the_gemms_inside_fused_lstm_layers():
    """nn.LSTM runs as fused mkldnn_rnn_layer ops that flop_counter has no formula for: the roofline counts
    their GEMMs, so its dense and converted FLOPs are the audit's (which counts the LSTM from its shapes)."""
    model, idx = zoo.LSTMLanguageModel(), torch.randint(0, 50, (6, 3))
    report = audit(model, idx, optimizer=None, pattern="block", seed=0)
    dense, converted = report.roofline["dense"], report.roofline["converted"]
    assert dense["flops"] == pytest.approx(report.step_flops, rel=1e-6)
    # The LSTM layers run on drawn patterns: the converted cost is the mean over RNN_DRAWS of them.
    assert converted["flops"] == pytest.approx(report.expected_flops, rel=0.05)

"""Tests for fxdrop/demo.py: a tiny-width, tiny-epoch run of the demo engine on a subset of the real MNIST."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fxdrop.harness import demo, models
from fxdrop.harness.data import load_mnist


@pytest.fixture(scope="module")
def small_mnist():
    mnist = load_mnist()
    return SimpleNamespace(train_images=mnist.train_images[:1024], train_labels=mnist.train_labels[:1024],
                           test_images=mnist.test_images[:500], test_labels=mnist.test_labels[:500])


def identity_convert(model, **_options):
    return model


def test_mnist_mlp_shape():
    model = models.mnist_mlp(32, 0.3)
    kinds = [type(m) for m in model]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout] * 3 + [nn.Linear]
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [32, 32, 32, 10]
    assert model(torch.zeros(2, 784)).shape == (2, 10)


def test_both_runs_see_the_same_weights_and_data_order(small_mnist):
    # With p = 0 and an identity "conversion", the two runs must be bit-identical: same initial weights,
    # same batches in the same order, same optimizer.
    config = demo.DemoConfig(p=0.0, width=16, epochs=2, batch=64, seed=3)
    result = demo.compare(config, small_mnist, convert=identity_convert)
    assert result["standard"]["train_loss"] == result["fxdrop"]["train_loss"]
    assert result["standard"]["test_accuracy"] == result["fxdrop"]["test_accuracy"]


def test_build_pair_gives_separate_models_with_equal_weights():
    standard, converted = demo.build_pair(demo.DemoConfig(width=8, seed=1), convert=identity_convert)
    assert standard is not converted
    for a, b in zip(standard.parameters(), converted.parameters()):
        assert a is not b and torch.equal(a, b)


def test_real_conversion_trains_and_result_is_json(small_mnist, tmp_path):
    config = demo.DemoConfig(p=0.3, pattern="block", width=128, epochs=2, batch=32, lr=0.02, seed=0)
    result = demo.compare(config, small_mnist)
    for side in ("standard", "fxdrop"):
        assert len(result[side]["epoch_seconds"]) == 2 and len(result[side]["test_accuracy"]) == 2
        # Chance is 0.1; both reach about 0.35-0.45 after 2 epochs of 1,024 images.
        assert result[side]["test_accuracy"][-1] > 0.25
    assert result["speedup"] > 0
    json.loads(json.dumps(result))
    pytest.importorskip("matplotlib")
    assert demo.plot_accuracy(result, tmp_path / "demo.png").stat().st_size > 1000


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="width must be an int >= 1"):
        demo.DemoConfig(width=0).check()
    with pytest.raises(ValueError, match="p must be a drop rate"):
        demo.DemoConfig(p=1.0).check()


def test_cli_help_lists_the_flags(capsys):
    from fxdrop.harness.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    text = capsys.readouterr().out
    for flag in ("--p", "--pattern", "--width", "--epochs", "--batch", "--seed", "--out"):
        assert flag in text


def test_cli_run_writes_json_and_skips_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    from fxdrop.harness.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = main(["demo", "--width", "8", "--epochs", "1", "--batch", "128", "--train-limit", "256",
                 "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "demo.json").read_text())
    assert result["train_images"] == 256 and result["test_images"] == 10_000
    assert not (tmp_path / "demo.png").exists()
    assert "skipped the plot" in capsys.readouterr().out

"""fxdrop.harness.quality: variants, paired differences, the share of dropout's gain, and one real run."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fxdrop.harness.quality import MnistRun, fxdrop_options, paired_differences, summarize, train_mnist


def _result(variant, seed, accuracy, diverged=False):
    return {"run": {"variant": variant, "seed": seed}, "accuracy": accuracy, "diverged": diverged}


def test_variant_names_are_convert_options():
    assert fxdrop_options("standard") is None and fxdrop_options("none") is None
    assert fxdrop_options("block/rows/8") == {"pattern": "block", "granularity": "rows", "row_classes": 8}
    assert fxdrop_options("row") == {"pattern": "row", "granularity": "forward"}
    assert fxdrop_options("block/rows/8/scale=rate/max_dp=4") == {
        "pattern": "block", "granularity": "rows", "row_classes": 8, "scale": "rate", "max_dp": 4}
    with pytest.raises(ValueError, match="'=rate'"):
        fxdrop_options("block/rows/=rate")


def test_paired_differences_and_share_of_gain():
    results = [_result("none", s, a) for s, a in enumerate([0.80, 0.82, 0.84])]
    results += [_result("standard", s, a) for s, a in enumerate([0.90, 0.90, 0.92])]
    results += [_result("block/rows/8", s, a) for s, a in enumerate([0.85, 0.87, 0.88])]
    results += [_result("block/forward", 0, float("nan"), diverged=True)]
    gain = paired_differences(results, "standard", "none")
    assert gain["mean"] == pytest.approx((0.10 + 0.08 + 0.08) / 3) and gain["n"] == 3
    assert gain["se"] == pytest.approx(math.sqrt(((0.10 - 0.0867) ** 2 + (0.08 - 0.0867) ** 2 + (0.08 - 0.0867) ** 2)
                                                 / 2 / 3), rel=1e-2)
    summary = summarize(results, ["none", "standard", "block/rows/8", "block/forward"])
    row = summary["block/rows/8"]
    assert row["vs_standard"]["mean"] == pytest.approx(-0.04)
    assert row["share_of_standard_gain"] == pytest.approx((0.0467) / 0.0867, rel=1e-2)
    assert summary["block/forward"]["diverged"] == 1 and summary["block/forward"]["vs_standard"]["n"] == 0
    assert summary["standard"]["vs_none"] == gain


def test_a_run_trains_from_the_same_weights_for_every_variant():
    """Tiny synthetic data: standard dropout and an fxdrop variant both learn; bad optimizers are named."""
    torch.manual_seed(0)
    centers = torch.rand(10, 784)
    labels = torch.arange(200) % 10
    images = (centers[labels] + 0.05 * torch.rand(200, 784)).clamp(0, 0.999)
    data = SimpleNamespace(train_images=images, train_labels=labels, test_images=images[:100],
                           test_labels=labels[:100])
    out = {}
    for variant in ("standard", "block/rows/4"):
        run = MnistRun(variant=variant, p=0.5, lr=0.05, train_images=None, epochs=3, batch=32, width=64,
                       average_last=2)
        out[variant] = train_mnist(run, data)
        assert not out[variant]["diverged"] and out[variant]["accuracy"] > 0.5
        assert len(out[variant]["train_loss"]) == 3
    assert out["standard"]["key"] == "full/momentum/lr0.05/p0.5/standard/s0"
    with pytest.raises(ValueError, match="'lamb'"):
        train_mnist(MnistRun(optimizer="lamb", width=8, epochs=1, train_images=None), data)


def _cell_result(variant, seed, p, lr, accuracy, diverged=False):
    return {"run": {"variant": variant, "seed": seed, "p": p, "lr": lr}, "accuracy": accuracy, "diverged": diverged}


def test_grid_cells_pair_seeds_within_a_cell_and_readme_marks_the_targets():
    """Two cells share seeds 0 and 1: each cell's differences use its own runs only; README's grid marks a
    variant ✓ within 0.3 points of standard dropout, ✗ below, and a cell where standard diverges is no target."""
    import sys
    from pathlib import Path

    from fxdrop.harness.quality import summarize_cells

    results = []
    for seed in (0, 1):
        results += [_cell_result("standard", seed, 0.5, 0.05, 0.92),
                    _cell_result("block/rows/2", seed, 0.5, 0.05, 0.918),
                    _cell_result("block/forward", seed, 0.5, 0.05, 0.90)]
        results += [_cell_result("standard", seed, 0.7, 0.1, float("nan"), diverged=True),
                    _cell_result("block/rows/2", seed, 0.7, 0.1, 0.5),
                    _cell_result("block/forward", seed, 0.7, 0.1, 0.6)]
    variants = ["standard", "block/rows/2", "block/forward"]
    cells = summarize_cells(results, [(0.5, 0.05), (0.7, 0.1)], variants)
    first, second = cells
    assert first["summary"]["block/rows/2"]["vs_standard"]["mean"] == pytest.approx(-0.002)
    assert first["summary"]["block/forward"]["vs_standard"]["mean"] == pytest.approx(-0.02)
    assert second["summary"]["standard"]["diverged"] == 2 and second["summary"]["block/rows/2"]["vs_standard"]["n"] == 0

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import readme

    result = {"title": "grid", "variants": variants, "cells": cells, "command": "python benchmarks/quality.py grid",
              "elapsed_s": 60.0, "machine": {"cpu": "test", "torch_threads": 1, "torch": "x"}}
    lines = readme.grid_section(readme.RESULTS / "quality_grid_test.json", result)
    row = next(line for line in lines if line.startswith("| 0.5 | 0.05 |"))
    assert row.count("✓") == 1 and row.count("✗") == 1 and "-0.20 ± 0.00 ✓" in row
    target = next(line for line in lines if line.startswith("| 0.7 | 0.1 |"))
    assert "div 2/2" in target and "✓" not in target and "✗" not in target
    assert any(f"`{readme.default_variant()}` is within 0.3 points of standard dropout in **1 of the 1 cells**" in line
               for line in lines)


def test_the_no_dropout_reference_zeroes_every_dropout_and_keeps_the_weights():
    from fxdrop.harness.models import WordLM, mnist_mlp, without_dropout

    lm = WordLM(50, 16, 2, 0.5)
    weights = {k: v.clone() for k, v in lm.state_dict().items()}
    assert without_dropout(lm) is lm and lm.drop_in.p == lm.drop_out.p == lm.rnn.dropout == 0.0
    assert all(torch.equal(weights[k], v) for k, v in lm.state_dict().items())
    mlp = without_dropout(mnist_mlp(32, 0.7))
    assert [m.p for m in mlp.modules() if isinstance(m, torch.nn.Dropout)] == [0.0, 0.0, 0.0]

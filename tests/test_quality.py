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
    assert fxdrop_options("block/rows/auto/reshuffle=16") == {
        "pattern": "block", "granularity": "rows", "row_classes": "auto", "reshuffle": 16}
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


def test_a_run_trains_from_the_same_weights_for_every_variant(monkeypatch):
    """Tiny synthetic data: standard dropout and fxdrop variants (one with fxdrop.reshuffle on the run's
    optimizer) learn; bad optimizers are named."""
    import importlib

    module = importlib.import_module("fxdrop.reshuffle")  # the module (fxdrop.reshuffle is the function)

    shufflers = []
    real = module.reshuffle
    monkeypatch.setattr(module, "reshuffle", lambda *a, **k: shufflers.append(real(*a, **k)) or shufflers[-1])
    torch.manual_seed(0)
    centers = torch.rand(10, 784)
    labels = torch.arange(200) % 10
    images = (centers[labels] + 0.05 * torch.rand(200, 784)).clamp(0, 0.999)
    data = SimpleNamespace(train_images=images, train_labels=labels, test_images=images[:100],
                           test_labels=labels[:100])
    out = {}
    for variant in ("standard", "block/rows/4", "block/rows/4/reshuffle=3"):
        run = MnistRun(variant=variant, p=0.5, lr=0.05, train_images=None, epochs=3, batch=32, width=64,
                       average_last=2)
        out[variant] = train_mnist(run, data)
        assert not out[variant]["diverged"] and out[variant]["accuracy"] > 0.5
        assert len(out[variant]["train_loss"]) == 3
    assert out["standard"]["key"] == "full/momentum/lr0.05/p0.5/standard/s0"
    assert len(shufflers) == 1 and shufflers[0].steps == 3 * 7 and shufflers[0].shuffles == 7  # 200 / 32: 7 steps
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

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import readme

    default = readme.default_variant(0.5)  # what convert's default resolves to at p = 0.5
    results = []
    for seed in (0, 1):
        results += [_cell_result("standard", seed, 0.5, 0.05, 0.92),
                    _cell_result(default, seed, 0.5, 0.05, 0.918),
                    _cell_result("block/forward", seed, 0.5, 0.05, 0.90)]
        results += [_cell_result("standard", seed, 0.7, 0.1, float("nan"), diverged=True),
                    _cell_result(default, seed, 0.7, 0.1, 0.5),
                    _cell_result("block/forward", seed, 0.7, 0.1, 0.6)]
    variants = ["standard", default, "block/forward"]
    cells = summarize_cells(results, [(0.5, 0.05), (0.7, 0.1)], variants)
    first, second = cells
    assert first["summary"][default]["vs_standard"]["mean"] == pytest.approx(-0.002)
    assert first["summary"]["block/forward"]["vs_standard"]["mean"] == pytest.approx(-0.02)
    assert second["summary"]["standard"]["diverged"] == 2 and second["summary"][default]["vs_standard"]["n"] == 0

    result = {"title": "grid", "variants": variants, "cells": cells, "command": "python benchmarks/quality.py grid",
              "elapsed_s": 60.0, "machine": {"cpu": "test", "torch_threads": 1, "torch": "x"}}
    lines = readme.grid_section(readme.RESULTS / "quality_grid_test.json", result)
    row = next(line for line in lines if line.startswith("| 0.5 | 0.05 |"))
    assert row.count("✓") == 1 and row.count("✗") == 1 and "-0.20 ± 0.00 ✓" in row
    target = next(line for line in lines if line.startswith("| 0.7 | 0.1 |"))
    assert "div 2/2" in target and "✓" not in target and "✗" not in target
    assert any(f"`{readme.default_variant()}` (as the variant it resolves to at each p) is within 0.3 points of "
               "standard dropout in **1 of the 1 cells**" in line for line in lines)
    summary = readme.default_grid_section([(readme.RESULTS / "quality_grid_test.json",
                                            {**result, "settings": {"optimizer": "momentum", "images": 2000, "epochs": 60}})])
    assert any(line.startswith("| 0.5 | -0.20 ± 0.00 ✓ (2) |") for line in summary)
    assert any("within 0.3 points of standard dropout in **1 of the 1 cells**" in line for line in summary)


def test_the_no_dropout_reference_zeroes_every_dropout_and_keeps_the_weights():
    from fxdrop.harness.models import WordLM, mnist_mlp, without_dropout

    lm = WordLM(50, 16, 2, 0.5)
    weights = {k: v.clone() for k, v in lm.state_dict().items()}
    assert without_dropout(lm) is lm and lm.drop_in.p == lm.drop_out.p == lm.rnn.dropout == 0.0
    assert all(torch.equal(weights[k], v) for k, v in lm.state_dict().items())
    mlp = without_dropout(mnist_mlp(32, 0.7))
    assert [m.p for m in mlp.modules() if isinstance(m, torch.nn.Dropout)] == [0.0, 0.0, 0.0]


def test_mask_references_keep_the_rate_share_masks_by_class_and_leave_eval_alone():
    from fxdrop.harness.mask_references import ReferenceMask, parse_reference, with_reference_masks
    from fxdrop.harness.models import mnist_mlp

    assert parse_reference("ref/subset/row") == ("subset", None, False)
    assert parse_reference("ref/block/8") == ("block", 8, False) and parse_reference("ref/block/8r") == ("block", 8, True)
    assert parse_reference("block/rows/8") is None and fxdrop_options("ref/window/4") is None
    assert parse_reference("ref/perm16/2") == ("perm16", 2, False)
    assert parse_reference("ref/shuffled/row") == ("shuffled", None, False)
    for bad in ("ref/bernoulli/8", "ref/subset", "ref/subset/0", "ref/window/x", "ref/perm/2", "ref/perm0/2",
                "ref/block/0r", "ref/block/r", "ref/block/rowr"):
        with pytest.raises(ValueError, match="mask reference"):
            parse_reference(bad)
    x = torch.rand(24, 40) + 0.5
    for kind in ("subset", "window", "block", "rot", "perm4", "shuffled"):
        mask = ReferenceMask(0.7, kind, 4, torch.Generator().manual_seed(0)).train()
        y = mask(x)
        kept = y != 0
        ratio = (y / x)[kept]
        if kind not in ("subset", "window"):  # a block of fxdrop's partition (maybe reordered), times dp
            counts = kept.sum(1)
            assert set(ratio.round().tolist()) <= {2.0, 3.0, 4.0} and torch.allclose(ratio, ratio.round(), atol=1e-5)
            assert torch.allclose(ratio, (40 / counts.float()).repeat_interleave(counts), rtol=0.15)  # chunks of 4
        else:  # exactly round(40 * 0.3) = 12 units per row, times 40 / 12
            assert kept.sum(1).tolist() == [12] * 24 and torch.allclose(ratio, torch.full_like(ratio, 40 / 12))
        assert torch.equal(kept[0::4], kept[0:1].expand(6, -1)), "rows of one class share a mask"
        if kind in ("window", "rot", "block"):  # cyclically contiguous
            row = kept[0].int()
            assert int((row - row.roll(1)).abs().sum()) <= 2
        if kind == "perm4":  # whole chunks of 4 units
            assert torch.equal(kept.view(24, 10, 4), kept.view(24, 10, 4)[:, :, :1].expand(-1, -1, 4))
        assert torch.equal(mask.eval()(x), x)
    # shuffled: one permutation per forward shared by the classes, so classes with the same dp keep disjoint or
    # equal sets; over forwards the units a class keeps together change (block's never do)
    mask = ReferenceMask(0.5, "shuffled", 8, torch.Generator().manual_seed(0)).train()
    draws = [mask(x[:8]) != 0 for _ in range(4)]
    for kept in draws:
        first, second = kept[0], next(k for k in kept if not torch.equal(k, kept[0]))
        assert not (first & second).any() and kept.sum(1).tolist() == [20] * 8  # dp = 2 at p = 0.5
    assert len({tuple(k[0].tolist()) for k in draws}) == 4
    # shuffled3: the same permutation for 3 forwards, then a new one: at dp = 2 each forward splits the units
    # into the same two halves until the permutation is drawn again
    assert parse_reference("ref/shuffled3/8") == ("shuffled3", 8, False)
    with pytest.raises(ValueError, match="shuffled<K>"):
        parse_reference("ref/shuffled0/8")
    mask = ReferenceMask(0.5, "shuffled3", 8, torch.Generator().manual_seed(0)).train()
    halves = [frozenset(frozenset(torch.nonzero(k).flatten().tolist()) for k in mask(x[:8]) != 0) for _ in range(6)]
    assert all(len(h) == 2 for h in halves) and halves[0] == halves[1] == halves[2] and halves[3] == halves[5]
    assert halves[3] != halves[0]
    per_row = ReferenceMask(0.5, "subset", None, torch.Generator().manual_seed(0)).train()(x) != 0
    assert len({tuple(r.tolist()) for r in per_row}) > 20, "one mask per row"
    # 8r: the same 8 masks, but which rows share each is drawn again each forward, independently per site
    randomly = ReferenceMask(0.7, "subset", 8, torch.Generator().manual_seed(0), random_rows=True).train()
    rows = [randomly(x) != 0 for _ in range(3)]
    for kept in rows:
        groups = sorted(sum(torch.equal(k, other) for other in kept) for k in kept)
        assert set(groups) == {3}, "each of the 8 masks serves 24 / 8 rows"
        assert not torch.equal(kept[0::8], kept[0:1].expand(3, -1)) or not torch.equal(kept[1::8], kept[1:2].expand(3, -1))
    assert not torch.equal(rows[0], rows[1])
    model = with_reference_masks(mnist_mlp(16, 0.5), "window", 2, False, seed=3)
    assert sum(isinstance(m, ReferenceMask) for m in model.modules()) == 3
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())

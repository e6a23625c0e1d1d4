"""fxdrop.harness.timing (paired timing, peak memory) and ``fxdrop bench`` (training runs) on a tiny model."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fxdrop.harness.timing import PairedTiming, machine_info, paired_timing, peak_step_memory


def test_paired_timing_interleaves_and_excludes_warmup():
    calls = []
    timing = paired_timing(lambda: calls.append("a"), lambda: calls.append("b"), pairs=4, warmup=2,
                           steps_per_turn=1)
    assert calls[:4] == ["a", "b", "a", "b"]  # warm-up, untimed
    assert calls[4:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # ABBA: neither always runs first
    assert len(timing.baseline_s) == len(timing.candidate_s) == 4


def test_each_timed_call_follows_a_call_of_the_same_function():
    calls, timed_after = [], []

    def make(name):
        def fn():
            calls.append(name)
        return fn

    paired_timing(make("a"), make("b"), pairs=3, warmup=1, steps_per_turn=2)
    assert calls == ["a", "a", "b", "b"] * 1 + ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
    for i in range(1, len(calls), 2):  # the second call of each turn is the timed one
        timed_after.append(calls[i - 1] == calls[i])
    assert all(timed_after)


def test_speedup_is_the_median_of_paired_ratios():
    timing = PairedTiming(baseline_s=[2.0, 9.0, 3.0], candidate_s=[1.0, 1.0, 3.0])
    assert timing.ratios == [2.0, 9.0, 1.0]
    assert timing.speedup == 2.0
    assert timing.baseline_median_s == 3.0 and timing.candidate_median_s == 1.0
    assert timing.total_ratio == pytest.approx(14.0 / 5.0)


def test_paired_timing_errors_name_the_argument():
    with pytest.raises(ValueError, match="pairs must be an int >= 1"):
        paired_timing(lambda: None, lambda: None, pairs=0)
    with pytest.raises(ValueError, match="warmup must be an int >= 0"):
        paired_timing(lambda: None, lambda: None, pairs=1, warmup=-1)
    with pytest.raises(ValueError, match="steps_per_turn must be an int >= 1"):
        paired_timing(lambda: None, lambda: None, pairs=1, steps_per_turn=0)


def test_peak_step_memory_counts_live_tensors():
    mib = 2**20

    def one_at_a_time():
        for _ in range(3):
            torch.empty(mib, dtype=torch.uint8).fill_(1)

    def three_alive():
        held = [torch.empty(mib, dtype=torch.uint8).fill_(1) for _ in range(3)]
        return len(held)

    one, three = peak_step_memory(one_at_a_time), peak_step_memory(three_alive)
    assert mib <= one < 1.5 * mib
    assert 3 * mib <= three < 3.5 * mib


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    """``fxdrop bench`` on a tiny MLP: two variants, two optimizers, one round each."""
    from fxdrop.harness.cli import main

    out = tmp_path_factory.mktemp("bench") / "runs.json"
    assert main(["bench", "--widths", "32", "--rates", "0.5", "--optimizers", "sgd,adamw", "--steps", "2",
                 "--warmup", "1", "--repeats", "1", "--variant", "pattern=block", "--variant",
                 "pattern=row,granularity=rows", "--out", str(out)]) == 0
    return out, json.loads(out.read_text())


def test_bench_rows_have_every_figure(tiny_result):
    _, result = tiny_result
    # each row names what it measured: convert's defaults filled in, row_classes="auto" resolved (4 at p = 0.5)
    block, row = ({"granularity": "rows", "pattern": family, "row_classes": 4} for family in ("block", "row"))
    assert [(r["workload"]["optimizer"], r["workload"]["convert"]) for r in result["rows"]] == [
        ("sgd", block), ("sgd", row), ("adamw", block), ("adamw", row)]
    for row in result["rows"]:
        assert row["speedup"] == pytest.approx(row["standard_ms"][0] / row["fxdrop_ms"][0])
        assert row["ideal_flops"] > 1.0 and row["ideal_roofline"] > 0
        assert row["workload"]["steps"] == 2 * 4096 // 32  # narrow layers get proportionally more steps
        assert row["machine"]["cpu"] == result["machine"]["cpu"]  # each row names where it ran
    for key in ("platform", "cpu", "torch", "torch_threads", "cpu_count", "allocator"):
        assert key in result["machine"]
    assert result["command"] == "fxdrop bench"


def test_bench_merge_replaces_only_the_rows_it_measures(tiny_result, tmp_path):
    from fxdrop.harness.cli import main

    path, result = tiny_result
    copy = tmp_path / "runs.json"
    elsewhere = {**result["machine"], "cpu": "an earlier machine"}
    earlier = [{k: v for k, v in row.items() if k != "machine"} for row in result["rows"]]  # an older file
    copy.write_text(json.dumps({**result, "rows": earlier, "machine": elsewhere, "notes": ["about the earlier rows"]}))
    assert main(["bench", "--widths", "32", "--rates", "0.5", "--optimizers", "sgd", "--steps", "1", "--warmup", "0",
                 "--repeats", "1", "--variant", "pattern=block", "--out", str(copy), "--merge"]) == 0
    file = json.loads(copy.read_text())
    merged = file["rows"]
    assert len(merged) == 4 and [r["workload"]["steps"] for r in merged] == [128, 256, 256, 256]
    assert file["notes"] == ["about the earlier rows"] and file["commands"] == ["fxdrop bench"]  # listed once
    # kept rows keep the machine they ran on (the older file's), the new row names this one
    assert [r["machine"]["cpu"] == "an earlier machine" for r in merged] == [False, True, True, True]
    from test_readme import _readme_module

    readme = _readme_module()
    text = "\n".join(readme.training_runs_section(readme.RESULTS / "training_runs_mlp.json", file))
    assert "ran on different machines" in text and "(an earlier machine)" in text


def test_bench_rejects_bad_flags(capsys):
    from fxdrop.harness.cli import main

    assert main(["bench", "--optimizers", "lamb"]) == 2
    assert "'lamb'" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "--variant", "pattern"])
    assert main(["bench", "--variant", "pattern=blok"]) == 2  # rejected before anything is measured
    assert "pattern='blok'" in capsys.readouterr().out


def test_machine_info_records_versions():
    info = machine_info()
    assert info["torch"] == torch.__version__ and info["torch_threads"] == torch.get_num_threads()


def test_reprice_recomputes_the_ideals_and_keeps_the_times(tiny_result, tmp_path):
    """A model change reprices published rows: ideals recomputed, times and the old figure kept."""
    from rich.console import Console

    from fxdrop.harness.bench import reprice

    _, result = tiny_result
    copy = tmp_path / "runs.json"
    stale = json.loads(json.dumps(result))
    for row in stale["rows"]:
        row["ideal_roofline"], row["ideal_flops"] = 123.0, 456.0
    copy.write_text(json.dumps(stale))
    assert reprice([copy, tmp_path / "missing.json"], Console(file=open(os.devnull, "w"))) == 0
    repriced = json.loads(copy.read_text())
    for before, after in zip(result["rows"], repriced["rows"]):
        assert after["standard_ms"] == before["standard_ms"] and after["speedup"] == before["speedup"]
        assert after["ideal_roofline_as_measured"] == 123.0 and 0 < after["ideal_roofline"] != 123.0
        assert after["ideal_flops"] == pytest.approx(before["ideal_flops"])
    assert repriced["roofline_repriced"]["machine"]["gemm_gflops"] > 0

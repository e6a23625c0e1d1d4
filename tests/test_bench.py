"""fxdrop.harness.timing and fxdrop.harness.bench: paired timing, peak memory, table and plot on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from fxdrop.harness import bench, models
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
def tiny_result():
    return bench.run_suite(widths=(32,), rates=(0.5,), families=("row", "block"), batch=16, pairs=2, warmup=1)


def test_measure_rows_have_every_figure(tiny_result):
    assert [row["family"] for row in tiny_result["rows"]] == ["row", "block"]
    for row in tiny_result["rows"]:
        assert row["speedup"] > 0 and row["ideal"] > 1.0
        assert row["efficiency"] == pytest.approx(row["speedup_total"] / row["ideal"])
        assert row["speedup_total"] == pytest.approx(sum(row["baseline_s"]) / sum(row["fxdrop_s"]))
        assert row["baseline_peak_bytes"] > 0 and row["fxdrop_peak_bytes"] > 0
        assert len(row["ratios"]) == 2
    for key in ("platform", "cpu", "torch", "torch_threads", "cpu_count"):
        assert key in tiny_result["machine"]
    json.loads(json.dumps(tiny_result))


def test_markdown_table_has_one_line_per_row(tiny_result):
    text = bench.markdown_table(tiny_result)
    lines = text.splitlines()
    assert lines[0].startswith("| h | p | family |") and "peak MiB fxdrop" in lines[0]
    assert lines[2].startswith("| 32 | 0.5 | row |") and lines[3].startswith("| 32 | 0.5 | block |")
    assert "1.18–2.16×" in text


def test_plot_marks_the_paper_range(tiny_result, tmp_path):
    pytest.importorskip("matplotlib")
    assert bench.plot_speedup(tiny_result, tmp_path / "speedup.png").stat().st_size > 1000


def test_cli_table_renders_an_existing_json(tiny_result, tmp_path, capsys):
    from fxdrop.harness.cli import main

    path = tmp_path / "mlp.json"
    path.write_text(json.dumps(tiny_result))
    assert main(["bench", "--table", str(path)]) == 0
    assert capsys.readouterr().out.startswith("| h | p | family |")
    assert main(["bench", "--table", str(tmp_path / "missing.json")]) == 2


def test_machine_info_records_versions():
    info = machine_info()
    assert info["torch"] == torch.__version__ and info["torch_threads"] == torch.get_num_threads()

"""The benchmark scripts run end to end on a 2-layer model and report what they claim (structure, not speed)."""

import json
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import eval_speed  # noqa: E402
import harness  # noqa: E402
import preference_stages  # noqa: E402
import scaling  # noqa: E402
import train_throughput as bench  # noqa: E402


@pytest.mark.parametrize("interleave, expected", [(True, "abab"), (False, "aabb")])
def test_turns_run_one_configuration_at_a_time(interleave, expected):
    turns, order = harness.Turns(["a", "b"], interleave), []

    def work(name):
        for window in range(2):
            turns.wait(name)
            order.append(name)
            if window == 0:
                turns.hand_over(name)
        turns.hand_over(name, finished=True)

    threads = [threading.Thread(target=work, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert "".join(order) == expected


def test_each_timed_window_follows_an_untimed_re_warm_step():
    settings = bench.settings_of(bench.parse_args(["--warmup", "2", "--steps", "3", "--repeats", "2"]))
    runner = harness.Runner("lora", build=None, turns=harness.Turns(["lora"], interleave=True), settings=settings)
    now = [0.0]
    runner._sync = lambda: now[0]
    runner._begin_turn()
    re_warm_steps = {settings.warmup + 1, settings.warmup + settings.steps + 2}
    for step in range(1, settings.total_steps + 1):
        now[0] += 100.0 if step in re_warm_steps else 10.0  # a re-warm step faults memory in: slow, untimed
        runner.on_step_end(step, tokens=step * 500)
    assert runner.result.windows == [{"tokens": 1500, "seconds": 30.0, "steps": 3, "tokens_per_second": 50.0}] * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the GPU variant would run")
def test_gpu_variant_skips_with_a_message_on_cpu(capsys, tmp_path):
    assert bench.main(["--device", "cuda", "--out", str(tmp_path / "gpu")]) is None
    assert "skipped" in capsys.readouterr().out and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_throughput_benchmark_reports_every_configuration(shared_data, tmp_path):
    stem = tmp_path / "throughput"
    summary = bench.main(["--smoke", "--warmup", "1", "--steps", "1", "--repeats", "2", "--out", str(stem)])
    rows = {row["name"]: row for row in summary["configs"]}
    assert list(rows) == ["reference", "lora", "full"]
    reference = rows["reference"]
    for row in rows.values():
        assert len(row["tokens_per_second_windows"]) == 2 and row["tokens_per_second"] > 0
        assert row["tokens_per_step"] > 0 and row["peak_memory_mib"] > 0
    for name in ("lora", "full"):
        assert rows[name]["ratio_to_reference"] == pytest.approx(
            rows[name]["tokens_per_second"] / reference["tokens_per_second"])
        assert len(rows[name]["ratio_per_round"]) == 2
    assert rows["lora"]["trainable_params"] < rows["full"]["trainable_params"] == reference["trainable_params"]
    assert "packed" in rows["lora"]["description"] and "padded rows" in reference["description"]
    assert "| reference |" in stem.with_suffix(".md").read_text() and stem.with_suffix(".json").is_file()


@pytest.mark.slow
def test_scaling_benchmark_writes_a_figure(shared_data, tmp_path):
    stem = tmp_path / "scaling"
    summary = scaling.main(["--smoke", "--lengths", "64,128", "--batches", "1,2", "--out", str(stem)])
    assert [(p["seq_length"], p["batch_size"]) for p in summary["points"]] == [(64, 1), (64, 2), (128, 1), (128, 2)]
    assert all(p["tokens_per_second"] > 0 and p["peak_memory_mib"] > 0 for p in summary["points"])
    assert stem.with_suffix(".png").stat().st_size > 10_000
    assert not list(tmp_path.glob(".*.tmp*"))


def test_eval_speed_benchmark_times_answering_against_scoring(shared_data, tmp_path):
    assert eval_speed.main(["--smoke", "--rows", "4", "--new-tokens", "4", "--repeats", "1", "--out",
                            str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "smoke.json").read_text())
    assert summary["rows"] == 4 and summary["scoring_seconds"] > 0 and summary["answering_seconds"] > 0
    assert summary["ratio"] == pytest.approx(summary["answering_seconds"] / summary["scoring_seconds"])
    assert 0 <= summary["answers_scores"]["rougeL"] <= 100 and summary["answers_scores"]["rows"] == 4
    assert "| answering one row at a time |" in (tmp_path / "smoke.md").read_text()


def test_preference_stages_benchmark_reports_every_stage_from_one_sft_run(tmp_path):
    assert preference_stages.main(["--smoke", "--out", str(tmp_path / "stages")]) == 0
    summary = json.loads((tmp_path / "stages.json").read_text())
    stages = [run["stage"] for run in summary["runs"]]
    assert stages[0] == "SFT, 4 steps" and len(stages) == 1 + len(preference_stages.STAGES)
    assert all(0 <= run["exact_match"] <= 1 for run in summary["runs"])
    assert "rewards/accuracies" in summary["runs"][2]["stage_metrics"] and "reward" in summary["runs"][4]["stage_metrics"]
    text = (tmp_path / "stages.md").read_text()
    assert "| + GRPO, exact-match reward, 2 steps |" in text and "points**" in text

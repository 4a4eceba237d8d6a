"""Answers scored against references (sacrebleu, rouge-score, exact match), and `convobot eval generate=true` with
its results in a tracker, read back by compare."""

import io
import json

import pytest
from rich.console import Console

from convobot.config import EvalConfig, LoggerConfig, SlidingConfig, Tracker
from convobot.reports import compare
from convobot.runs.tracking import evaluation_metrics
from convobot.scoring.answer_scores import METRICS, score_answers
from convobot.scoring.evaluate import evaluate


def test_scores_are_100_for_the_reference_and_0_for_nothing_in_common():
    references = ["the cat sat on the mat", "cat bird apple"]
    summary, rows = score_answers(["the cat sat on the mat", " cat  bird apple "], references)
    assert all(summary[name] == pytest.approx(100) for name in METRICS)
    assert all(row[name] == pytest.approx(100) for row in rows for name in METRICS)
    summary, rows = score_answers(["zzz qqq", "xxx"], references)
    assert all(summary[name] == pytest.approx(0, abs=1e-6) for name in METRICS if name != "chrf")
    assert summary["chrf"] < 10


def test_partial_answers_score_between_and_a_row_scores_on_its_own():
    summary, rows = score_answers(["the cat sat on a mat", "bird apple cat"], ["the cat sat on the mat",
                                                                                "cat bird apple"])
    assert 0 < summary["bleu"] < 100 and 0 < summary["rouge1"] < 100 and summary["exact_match"] == 0
    # ROUGE-1 of "the cat sat on a mat" against its reference: 5 of 6 words shared both ways -> F1 5/6.
    assert rows[0]["rouge1"] == pytest.approx(500 / 6)
    assert rows[1]["rouge1"] == pytest.approx(100) and rows[1]["rougeL"] < 100  # same words, other order


def test_eval_answers_the_held_out_rows_and_merging_changes_no_answer(smoke_release, tmp_path):
    pytest.importorskip("mlflow")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = LoggerConfig(name=Tracker.mlflow, tracking_uri=store, artifact_location=(tmp_path / "art").as_uri())
    report = evaluate(EvalConfig(run_dir=str(smoke_release.run_dir), model=str(smoke_release.release),
                                 compare=["adapter", "merged"], generate=True, max_new_tokens=8, max_rows=6,
                                 sliding=SlidingConfig(enabled=False), output=str(tmp_path / "eval" / "report.json"),
                                 logger=logger),
                      console=Console(file=io.StringIO()))
    written = {label: [json.loads(line) for line in (tmp_path / "eval" / f"predictions-{label}.jsonl").open()]
               for label in ("adapter", "merged")}
    heldout = [json.loads(line) for line in (smoke_release.run_dir / "heldout.jsonl").open()][:6]
    for label, records in written.items():
        generation = report["models"][label]["generation"]
        assert generation["rows"] == len(records) == 6 and generation["max_new_tokens"] == 8
        assert [r["reference"] for r in records] == [row["output"] for row in heldout]
        assert all(r["prompt"].endswith("### Response:\n") and set(METRICS) <= r.keys() for r in records)
        assert generation["exact_match"] == pytest.approx(sum(r["exact_match"] for r in records) / 6)
    # Greedy answers of the adapter and of the bundle merged from it are the same text.
    assert [r["answer"] for r in written["adapter"]] == [r["answer"] for r in written["merged"]]

    # The evaluation is a tracker run of its own; compare reads back its scores and answers.
    runs, (logged,) = compare.load_mlflow(store)
    assert runs == [] and logged.evaluated == str(smoke_release.release)
    assert logged.report == json.loads((tmp_path / "eval" / "report.json").read_text())
    assert logged.answers == written
    from mlflow.tracking import MlflowClient

    (tracked,) = MlflowClient(store).search_runs([MlflowClient(store).get_experiment_by_name("convobot").experiment_id])
    assert tracked.data.metrics["merged.generation.rougeL"] == pytest.approx(report["models"]["merged"]["generation"]
                                                                            ["rougeL"])
    assert tracked.data.metrics["adapter.full.perplexity"] == pytest.approx(report["models"]["adapter"]["full"]
                                                                           ["perplexity"])
    assert tracked.data.params["generate"] == "True" and tracked.data.tags["convobot.kind"] == "eval"
    text = compare.report_on(runs, store, tmp_path / "compared", "evaluations", False, [logged]).read_text()
    assert "## Evaluations" in text and "## Answers side by side" in text
    assert f"| {logged.name} | " in text and f"{report['models']['merged']['full']['perplexity']:.3f}" in text
    assert (tmp_path / "compared" / "answers.html").is_file()


def test_harness_results_become_tracker_metrics_named_without_commas():
    report = {"models": {"bundle": {"full": {"perplexity": 3.5, "tokens": 10}, "max_length": 256}},
              "harness": {"results": {"convobot_tasks": {"alias": "convobot_tasks", "exact_match,none": 0.25,
                                                         "exact_match_stderr,none": 0.1, "acc,strict": 0.5}}}}
    assert evaluation_metrics(report) == {
        "bundle.full.perplexity": 3.5, "bundle.full.tokens": 10.0, "harness.convobot_tasks.exact_match": 0.25,
        "harness.convobot_tasks.exact_match_stderr": 0.1, "harness.convobot_tasks.acc/strict": 0.5}

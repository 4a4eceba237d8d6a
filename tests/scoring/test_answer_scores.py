"""Answers scored against references (sacrebleu, rouge-score, exact match), and `convobot eval generate=true`."""

import io
import json

import pytest
from rich.console import Console

from convobot.config import EvalConfig, SlidingConfig
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
    report = evaluate(EvalConfig(run_dir=str(smoke_release.run_dir), model=str(smoke_release.release),
                                 compare=["adapter", "merged"], generate=True, max_new_tokens=8, max_rows=6,
                                 sliding=SlidingConfig(enabled=False), output=str(tmp_path / "eval" / "report.json")),
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

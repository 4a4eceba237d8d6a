"""lm-evaluation-harness on a bundle: convobot's offline task answers as convobot does, results land in the report."""

import io

import pytest
from rich.console import Console

from convobot.config import EvalConfig, HarnessConfig, SlidingConfig
from convobot.errors import ConfigError
from convobot.runs.loading import load_model
from convobot.scoring.evaluate import evaluate
from convobot.scoring.generate import answer
from convobot.scoring.harness import heldout_task_rows

pytest.importorskip("lm_eval")


def quiet_evaluate(**options) -> dict:
    return evaluate(EvalConfig(max_rows=2, sliding=SlidingConfig(enabled=False), **options),
                    console=Console(file=io.StringIO()))


def test_convobot_tasks_run_offline_and_answer_as_convobot_does(smoke_release):
    report = quiet_evaluate(model=str(smoke_release.release),
                            harness=HarnessConfig(tasks=["convobot_tasks"], limit=6))
    harness = report["harness"]
    samples = harness["samples"]["convobot_tasks"]
    rows = heldout_task_rows()[:6]
    assert [s["target"] for s in samples] == [row["answer"] for row in rows]
    # The harness's greedy answers (stopped at EOS or the next "###" block) begin with convobot's own 32 tokens for
    # the same prompts (the bundle's generation config lets the harness's run longer).
    model, tokenizer = load_model(str(smoke_release.release))
    ours = answer(model, tokenizer, [{"prompt": r["prompt"], "completion": r["answer"]} for r in rows],
                  max_new_tokens=32)
    for sample, text in zip(samples, ours):
        assert sample["response"][0].startswith(text.split("\n\n###")[0].lstrip())
    matches = sum(s["response"][0] == s["target"] for s in samples) / 6
    assert harness["results"]["convobot_tasks"]["exact_match,strip"] == pytest.approx(matches)
    assert "perplexity" in str(report["models"])  # beside convobot's own scores


def test_the_harness_needs_a_bundle(smoke_release):
    with pytest.raises(ConfigError, match="config key 'harness.tasks'.*merged bundle"):
        quiet_evaluate(run_dir=str(smoke_release.run_dir), harness=HarnessConfig(tasks=["convobot_tasks"]))

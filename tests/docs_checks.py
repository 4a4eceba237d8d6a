"""What a docs page's commands must have produced, checked after tests/test_docs.py runs them: the page's commands
are the end-to-end run of their feature (sweeps and their report, experiment tracking, an Optuna search, a
data-parallel run, the memory planner), so the assertions of that run live here instead of in a second run.

Each check takes the folder the page's commands ran in and the output of each of its blocks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from safetensors.torch import load_file

from convobot.reports import compare
from convobot.training.distributed import weights_fingerprint


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_sweep_report(sweep: Path) -> None:
    """A LoRA vs full sweep: Hydra's job dirs, each finished, and the report the sweep callback wrote."""
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name != "plots")
    assert [job.split("_", 1)[0] for job in jobs] == ["0", "1"] and "peft=lora" in jobs[0] and "peft=full" in jobs[1]
    assert all((sweep / job / "metrics.json").is_file() for job in jobs)
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["run"], r["method"], r["status"]) for r in rows] == [("peft=lora", "lora", "finished"),
                                                                   ("peft=full", "full", "finished")]
    assert all((sweep / "plots" / f"{name}.png").stat().st_size > 10_000 for name in compare.PLOTS)
    # report.generate_metrics=true: both jobs answered the same held-out prompts, side by side in the report.
    predictions = [read_jsonl(sweep / job / "predictions.jsonl") for job in jobs]
    assert len(predictions[0]) == len(predictions[1]) == 32
    assert [r["prompt"] for r in predictions[0]] == [r["prompt"] for r in predictions[1]]
    assert all(0 <= float(r["rougeL"]) <= 100 for r in rows)
    assert "## Answers side by side" in (sweep / "summary.md").read_text()
    assert (sweep / "answers.html").read_text().count("<tr>") == 33


def check_mlflow_sweep(folder: Path, sweep: Path) -> None:
    """The sweep is one MLflow parent run with a child run per job, read back as compare reads it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'outputs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("convobot").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.data.params["peft.method"] for r in children} == {"lora", "full"}
    for child in children:
        job = next(sweep.glob(f"*peft={child.data.params['peft.method']}*"))
        metrics = json.loads((job / "metrics.json").read_text())
        assert child.data.metrics["eval_loss"] == pytest.approx(metrics["eval_loss"])
        assert child.data.params["optim.lr"] == "0.001" and "peft=" in child.data.tags["overrides"]
        assert child.data.tags["override.peft"] == child.data.params["peft.method"]
        logged = [row for row in read_jsonl(job / "metrics.jsonl") if "loss" in row]
        assert len(client.get_metric_history(child.info.run_id, "loss")) == len(logged) == 3  # steps 2, 4, 6
        assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {"metrics.json", "config.yaml",
                                                                            "predictions.jsonl"}
        assert child.data.metrics["answers.rougeL"] == pytest.approx(metrics["answers"]["rougeL"])
        assert child.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id)} >= {"summary.md", "plots"}
    # convobot compare reads the same runs back from the store: LoRA vs full, as from the sweep dir.
    from_store, evaluations = compare.load_mlflow(client.tracking_uri, parent=parents[0].info.run_id)
    from_dirs = compare.load_runs([sweep])
    assert sorted(r.label for r in from_store) == sorted(r.label for r in from_dirs) == ["peft=full", "peft=lora"]
    assert sorted(r.row()["eval_loss"] for r in from_store) == sorted(r.row()["eval_loss"] for r in from_dirs)
    assert sorted(len(r.curve) for r in from_store) == sorted(len(r.curve) for r in from_dirs) != [0, 0]
    assert sorted(len(r.answers) for r in from_store) == sorted(len(r.answers) for r in from_dirs) == [32, 32]


def check_optuna_sweep(sweep: Path) -> None:
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 2 and {r["method"] for r in rows} == {"lora"}
    assert all("peft.r=" in r["overrides"] and "optim.lr=" in r["overrides"] for r in rows)
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == pytest.approx(min(float(r["eval_loss"]) for r in rows))
    assert "Optuna best trial" in (sweep / "summary.md").read_text()


def check_sweeps_page(folder: Path, outputs: list[str]) -> None:
    check_sweep_report(folder / "sweeps" / "lora_vs_full")
    check_mlflow_sweep(folder, folder / "sweeps" / "lora_vs_full")
    check_optuna_sweep(folder / "sweeps" / "optuna")
    assert (folder / "reports" / "lora_vs_full" / "report.md").is_file()
    assert (folder / "reports" / "from-mlflow" / "report.md").is_file()


def check_data_parallel_run(run_dir: Path, output: str) -> None:
    """Two ranks over gloo: disjoint shards, rank 0 alone writes the run dir, every rank ends with the saved weights."""
    results = json.loads((run_dir / "metrics.json").read_text())
    assert results["world_size"] == 2 and results["effective_batch_size"] == 2 * 8 and results["steps"] == 6
    assert output.count("convobot · smoke · lora") == 1  # one summary, from rank 0
    steps = [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row]
    assert steps == [2, 4, 6]  # rank 0 alone writes metrics.jsonl
    assert {p.name for p in (run_dir / "checkpoints" / "checkpoint-6").glob("rng_state_*")} == {
        "rng_state_0.pth", "rng_state_1.pth"}  # both ranks wrote into the shared checkpoints
    ranks = [read_jsonl(run_dir / "samples" / f"rank{k}.jsonl") for k in (0, 1)]
    seen = [[h for row in rows if "samples" in row for h in row["samples"]] for rows in ranks]
    assert len(seen[0]) == len(seen[1]) == 6 * 8
    assert not set(seen[0]) & set(seen[1])  # different data on each rank
    # The Trainer's token count (gathered over ranks) is what the two ranks trained on together.
    assert sum(sum(row["tokens"]) for rows in ranks for row in rows if "tokens" in row) == results["train_tokens"]
    assert results["tokens_per_second"] > 0
    saved = weights_fingerprint(load_file(run_dir / "adapter" / "adapter_model.safetensors").values())
    assert ranks[0][-1]["trainable_sha256"] == ranks[1][-1]["trainable_sha256"] == saved


def check_scaling_page(folder: Path, outputs: list[str]) -> None:
    check_data_parallel_run(folder / "outputs" / "ddp_cpu", outputs[0])
    jobs = [p for p in (folder / "outputs" / "sweep_lr").iterdir() if (p / "metrics.json").is_file()]
    assert len(jobs) == 2  # joblib ran both


def check_planner_page(folder: Path, outputs: list[str]) -> None:
    for text in ("optimizer states", "activations", "loss head", "eval logits", "CUDA context", "FITS"):
        assert text in outputs[0]
    assert not list(folder.iterdir())  # plans run in place: no log file, no outputs/ folder


def check_evaluation_page(folder: Path, outputs: list[str]) -> None:
    """Base and adapter each answered the same 8 held-out rows; the report and the predictions files agree."""
    report = json.loads((folder / "eval" / "report.json").read_text())
    for model in ("base", "adapter"):
        generation = report["models"][model]["generation"]
        records = read_jsonl(folder / "eval" / f"predictions-{model}.jsonl")
        assert generation["rows"] == len(records) == 8 and generation["max_new_tokens"] == 16
        assert generation["rougeL"] == pytest.approx(sum(r["rougeL"] for r in records) / 8)
    heldout = read_jsonl(folder / "outputs" / "smoke-run" / "heldout.jsonl")[:8]
    assert [r["reference"] for r in records] == [row["output"] for row in heldout]
    assert '"reference"' in outputs[0] and "answers scored against the references" in outputs[0]
    harness = json.loads((folder / "eval" / "harness.json").read_text())["harness"]
    assert len(harness["samples"]["convobot_tasks"]) == 20
    assert 0 <= harness["results"]["convobot_tasks"]["exact_match,strip"] <= 1 and "lm-evaluation-harness" in outputs[1]
    # The evaluation logged to MLflow and read back by compare: perplexity, answer scores and harness results.
    report = (folder / "reports" / "evaluations" / "report.md").read_text()
    assert "## Evaluations" in report and "| eval smoke | " in report and "exact_match,strip" in report
    assert "## Answers side by side" in report and (folder / "reports" / "evaluations" / "answers.html").is_file()


def check_preference_page(folder: Path, outputs: list[str]) -> None:
    """SFT, then DPO and GRPO on top of it; the DPO chain merged into one bundle whose card names both stages; the
    three runs in one comparison."""
    for stage in ("dpo", "grpo"):
        metrics = json.loads((folder / "outputs" / stage / "metrics.json").read_text())
        assert metrics["stage"] == stage and [step["stage"] for step in metrics["lineage"]] == ["sft"]
        assert (folder / "outputs" / stage / "base_model" / "model.safetensors").is_file()
    card = (folder / "release" / "dpo" / "README.md").read_text()
    assert "**Stages:** sft (lora) on bundled, then dpo (lora) on bundled_preferences" in card
    report = (folder / "reports" / "stages" / "report.md").read_text()
    assert "| sft → dpo |" in report and "| sft → grpo |" in report and "reward accuracy" in report
    assert (folder / "reports" / "stages" / "plots" / "stage_curves.png").is_file()


CHECKS = {"preference.md": check_preference_page, "sweeps.md": check_sweeps_page, "evaluation.md": check_evaluation_page, "scaling.md": check_scaling_page, "planner.md": check_planner_page}

"""Trackers, read back through each tool's own reader: MLflow's client on the SQLite store (a two-job sweep as a
parent and two child runs), TensorBoard's event reader, W&B's offline run files; and an unreachable store."""

import json
import os
import subprocess
import sys
import time

import pytest

from convobot.config import compose, validate
from convobot.errors import ConfigError
from convobot.train import run

SMOKE = ["experiment=smoke", "report.before=false", "report.samples=0", "report.exact_match_rows=0",
         "train.max_steps=4", "train.logging_steps=2", "data.num_rows=120", "data.eval_size=16"]


def test_logger_configs_compose(compose_train):
    for name in ("none", "mlflow", "tensorboard", "wandb"):
        assert compose_train(f"logger={name}").logger.name.value == name


@pytest.mark.slow
def test_a_sweep_is_one_mlflow_parent_run_with_a_child_run_per_job(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "convobot.train", "-m", *SMOKE, "logger=mlflow", "peft=lora,full",
                             f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("convobot")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.data.params["peft.method"] for r in children} == {"lora", "full"}
    for child in children:
        metrics = json.loads((tmp_path / "sweep").glob(f"*peft={child.data.params['peft.method']}*").__next__()
                             .joinpath("metrics.json").read_text())
        assert child.data.metrics["eval_loss"] == pytest.approx(metrics["eval_loss"])
        assert child.data.params["optim.lr"] == "0.001" and "peft=" in child.data.tags["overrides"]
        assert child.data.tags["override.peft"] == child.data.params["peft.method"]
        assert len(client.get_metric_history(child.info.run_id, "loss")) == 2  # steps 2 and 4
        assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {"metrics.json", "config.yaml"}
        assert child.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id)} >= {"summary.md", "plots"}

    # convobot-compare reads the same runs back from the store: LoRA vs full, as from the sweep dir.
    from convobot.compare import load_mlflow_runs, load_runs

    from_store = load_mlflow_runs(client.tracking_uri, parent=parents[0].info.run_id)
    from_dirs = load_runs([tmp_path / "sweep"])
    assert sorted(r.label for r in from_store) == sorted(r.label for r in from_dirs) == ["peft=full", "peft=lora"]
    assert sorted(r.row()["eval_loss"] for r in from_store) == sorted(r.row()["eval_loss"] for r in from_dirs)
    assert sorted(len(r.curve) for r in from_store) == sorted(len(r.curve) for r in from_dirs) != [0, 0]


def test_tensorboard_gets_step_and_final_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = run(validate(compose(SMOKE + ["logger=tensorboard"])), tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert [event.step for event in events.Scalars("loss")] == [2, 4]
    assert events.Scalars("final/eval_loss")[0].value == pytest.approx(results["eval_loss"], rel=1e-6)
    assert "learning_rate" in scalars and "tokens_seen" in scalars
    assert any("config" in tag for tag in events.Tags()["tensors"])  # the composed config, as a text table


def test_wandb_offline_writes_a_run_that_wandb_sync_can_upload(tmp_path):
    """wandb 0.31 keeps history and summary in its binary run record (read by its Go core, not from Python): what
    can be read back offline is its config file, the saved files, and `wandb sync` finding the run."""
    pytest.importorskip("wandb")
    import yaml

    run(validate(compose(SMOKE + ["logger=wandb"])), tmp_path / "run")
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    config = yaml.safe_load((offline / "files" / "config.yaml").read_text())
    assert config["peft"]["method"] == "lora" and config["optim"]["lr"] == 0.001
    assert json.loads((offline / "files" / "metrics.json").read_text())["steps"] == 4
    wandb_cli = os.path.join(os.path.dirname(sys.executable), "wandb")
    found = subprocess.run([wandb_cli, "sync", "--dry-run", str(offline)], capture_output=True, text=True, timeout=120)
    assert found.returncode == 0 and "Would sync 1 run" in found.stdout + found.stderr


def test_an_unreachable_tracking_store_fails_at_start_up_in_one_line(tmp_path):
    pytest.importorskip("mlflow")
    cfg = validate(compose(SMOKE + ["logger=mlflow", "logger.tracking_uri=http://127.0.0.1:9"]))
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"config key 'logger.tracking_uri': cannot use MLflow store http://127"):
        run(cfg, tmp_path / "run")
    assert time.perf_counter() - started < 60
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing trained, nothing half-written

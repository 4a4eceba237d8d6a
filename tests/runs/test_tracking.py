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
from convobot.training.recipe import run

SMOKE = ["experiment=smoke", "report.before=false", "report.samples=0", "report.exact_match_rows=0",
         "train.max_steps=4", "train.logging_steps=2", "data.num_rows=120", "data.eval_size=16"]


def test_logger_configs_compose(compose_train):
    for name in ("none", "mlflow", "tensorboard", "wandb"):
        assert compose_train(f"logger={name}").logger.name.value == name


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

"""Sweeps: the multirun summary callback, the Optuna search config, and real multiruns (slow)."""

import csv
import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from convobot.config import CONF_DIR
from convobot.reports import compare
from convobot.reports.sweep import SweepSummary

REPO = Path(__file__).resolve().parents[2]
TRAIN = Path(sys.executable).parent / "convobot-train"  # the console script of this environment
QUICK = ["report.before=false", "report.samples=0", "report.exact_match_rows=8"]


def hydra_config(config_name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A sweep dir as Hydra lays it out: two finished jobs (real smoke runs, one process, as the basic
    launcher runs them) and one that failed early."""
    from convobot.config import validate
    from convobot.training.recipe import run

    root = tmp_path_factory.mktemp("sweep")
    for number, method in enumerate(("full", "lora")):
        job = root / f"{number}_peft={method}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- experiment=smoke\n- peft={method}\n")
        run(validate(hydra_config("train", "experiment=smoke", f"peft={method}", "optim=adamw_8bit", *QUICK)), job)
    failed = root / "2_peft=full,optim.lr=10"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text("- experiment=smoke\n- peft=full\n- optim.lr=10\n")
    return root


def test_callback_summarises_every_job_into_the_sweep_dir(sweep_dir):
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}}))
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [r["method"] for r in rows] == ["full", "lora", "?"]
    assert [r["status"] for r in rows] == ["finished", "finished", "incomplete: no metrics.json"]
    assert rows[1]["run"] == "peft=lora" and rows[2]["run"] == "peft=full optim.lr=10"
    assert all(rows[i]["eval_loss"] and rows[i]["trainable_params"] and rows[i]["exact_match"] for i in (0, 1))
    summary = (sweep_dir / "summary.md").read_text()
    assert "2 of 3 runs finished" in summary and "| peft=lora | lora |" in summary
    assert sorted(p.name for p in (sweep_dir / "plots").iterdir()) == sorted(f"{n}.png" for n in compare.PLOTS)


def test_jobs_sharing_a_process_each_get_the_8bit_optimizer(sweep_dir):
    """bitsandbytes' process-wide overrides from the full fine-tune must not leak into the next job."""
    for job in ("0_peft=full", "1_peft=lora"):
        metrics = json.loads((sweep_dir / job / "metrics.json").read_text())
        assert metrics["optimizer_fallback_reason"] is None and "uint8" in metrics["optimizer"], job


def test_callback_is_registered_for_training_and_off_for_plans():
    callback = instantiate(hydra_config("train").hydra.callbacks.sweep_summary)
    assert isinstance(callback, SweepSummary) and callback.enabled
    assert not instantiate(hydra_config("plan").hydra.callbacks.sweep_summary).enabled


def test_disabled_callback_writes_nothing(tmp_path):
    SweepSummary(enabled=False).on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("experiment", ["embedded", "seed_repro"])
def test_optuna_search_is_an_in_memory_lora_search_of_eval_loss(experiment):
    cfg = hydra_config("train", "hparams_search=lora_optuna", f"experiment={experiment}")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.storage is None
    assert sweeper.direction == "minimize" and sweeper.n_trials <= 10
    assert {"peft.r", "optim.lr"} <= set(sweeper.params)
    assert cfg.peft.method == "lora"  # even where the experiment picked a full fine-tune

"""Preference and reward stages through TRL's trainers, on top of an SFT run: DPO then merge, ORPO, KTO (adapter and
full) and GRPO; their configs, reward and metrics."""

import json

import pytest

from convobot.config import Stage
from convobot.errors import ConfigError
from convobot.runs.loading import load_base
from convobot.runs.rundir import open_run
from convobot.training.recipe import build_sft_config, run
from convobot.training.stages import exact_match_reward, stage_metrics

STAGE = ["experiment=smoke", "report.before=false", "report.samples=0", "report.exact_match_rows=8",
         "train.max_steps=2", "train.logging_steps=1", "data.num_rows=120", "data.eval_size=8", "optim.lr=1e-4"]


@pytest.mark.parametrize("stage, data", [("dpo", "bundled_preferences"), ("orpo", "bundled_preferences"),
                                         ("kto", "bundled_preferences"), ("grpo", "bundled")])
def test_every_stage_composes_with_its_data(compose_train, stage, data):
    cfg = compose_train(f"stage={stage}", f"data={data}")
    assert cfg.stage.name == Stage(stage) and cfg.init_from is None


@pytest.mark.parametrize("overrides, key", [
    (["stage=dpo"], "data.format"),  # instruction rows have no rejected answer
    (["stage=grpo", "data=bundled_preferences"], "data.format"),
    (["stage=dpo", "data=bundled_preferences", "train.packing=true"], "train.packing"),
    (["stage=grpo", "hardware.batch_size=3"], "hardware.batch_size"),
    (["stage=grpo", "stage.num_generations=1"], "stage.num_generations"),
    (["train.neftune_alpha=0"], "train.neftune_alpha"),
])
def test_a_stage_with_the_wrong_data_or_options_is_one_config_error(compose_train, overrides, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        compose_train(*overrides)


def test_neftune_is_one_switch(compose_train, tmp_path):
    import torch

    cfg = compose_train("train.neftune_alpha=5")
    assert build_sft_config(cfg, tmp_path, torch.device("cpu"), cfg.hardware.precision, "adamw_torch") \
        .neftune_noise_alpha == 5


def test_exact_match_reward_and_stage_metrics():
    assert exact_match_reward(["4", " dog  cat ", "5"], reference=["4", "dog cat", "4"], prompts=["p"] * 3) == \
        [1.0, 1.0, 0.0]
    history = [{"loss": 1.0, "rewards/margins": 0.1, "step": 1}, {"rewards/margins": 0.3, "kl": 0.2, "step": 2},
               {"eval_rewards/margins": 9.0, "train_loss": 0.5}]
    assert stage_metrics(history) == {"rewards/margins": 0.3, "kl": 0.2}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, train_smoke):
    return train_smoke(tmp_path_factory.mktemp("stages") / "sft", "data.num_rows=120", "data.eval_size=8")


@pytest.fixture(scope="module")
def stage_runs(sft_run, tmp_path_factory):
    """SFT -> DPO (with its SFT term) and SFT -> GRPO, a few steps each."""
    from convobot.config import compose, validate

    root = tmp_path_factory.mktemp("on_sft")
    for stage, overrides in {"dpo": ["data=bundled_preferences", "stage.sft_weight=1"],
                             "grpo": ["stage.max_completion_length=4"]}.items():
        run(validate(compose([*STAGE, f"stage={stage}", f"init_from={sft_run}", *overrides])), root / stage)
    return {stage: root / stage for stage in ("dpo", "grpo")}


def test_dpo_on_an_sft_run_then_merged_into_one_verified_bundle(sft_run, stage_runs, tmp_path, quiet_merge):
    dpo_dir = stage_runs["dpo"]
    results = json.loads((dpo_dir / "metrics.json").read_text())
    assert results["stage"] == "dpo" and results["lineage"][0]["run"] == str(sft_run)
    assert {"rewards/accuracies", "rewards/margins", "rewards/chosen"} <= results["stage_metrics"].keys()
    logged = [json.loads(line) for line in (dpo_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "rewards/margins" in row] == [1, 2]
    # The run's base is the SFT run's model, its adapter merged: what the DPO reference was.
    sft_model = open_run(sft_run)
    import torch

    from convobot.runs.loading import load_trained

    merged_sft = load_trained(sft_model).merge_and_unload()
    dpo_base = load_base(open_run(dpo_dir))
    probe = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(merged_sft(probe).logits, dpo_base(probe).logits, atol=1e-5)
    assert not torch.allclose(load_base(sft_model)(probe).logits, dpo_base(probe).logits, atol=1e-3)
    report = quiet_merge(run_dir=str(dpo_dir), output_dir=str(tmp_path / "release"))
    assert report["verification"]["adapter_vs_merged_max_abs_logit_diff"] <= 1e-4
    assert report["verification"]["reloaded_vs_merged_max_abs_logit_diff"] <= 1e-4
    card = (tmp_path / "release" / "README.md").read_text()
    assert "**Stages:** sft (lora) on bundled, then dpo (lora) on bundled_preferences" in card
    assert "tags: [convobot, gpt2" in card and "dpo]" in card


@pytest.mark.parametrize("stage, peft", [("orpo", "lora"), ("kto", "full")])
def test_orpo_and_kto_train_and_log_their_own_metrics(sft_run, tmp_path, compose_train, stage, peft):
    overrides = [*STAGE, f"stage={stage}", "data=bundled_preferences", f"peft={peft}", f"init_from={sft_run}"]
    results = run(compose_train(*overrides), tmp_path / stage)
    expected = {"orpo": "log_odds_ratio", "kto": "kl"}[stage]
    assert expected in results["stage_metrics"] and results["steps"] == 2
    # ORPO's batches hold no input_ids for the Trainer to count: no count rather than a wrong one.
    assert (results["train_tokens"] is None) == (stage == "orpo")
    assert results["method"] == peft and 0 <= results["exact_match"] <= 1
    assert (tmp_path / stage / ("model" if peft == "full" else "adapter")).is_dir()


def test_compare_puts_sft_dpo_and_grpo_in_one_table(sft_run, stage_runs, tmp_path):
    from convobot.reports import compare

    grpo = json.loads((stage_runs["grpo"] / "metrics.json").read_text())
    assert {"reward", "kl", "completions/mean_length"} <= grpo["stage_metrics"].keys()
    rows = {row["stage"]: row for row in (run.row() for run in compare.load_runs([sft_run, *stage_runs.values()]))}
    assert rows.keys() == {"sft", "sft → dpo", "sft → grpo"}
    assert rows["sft → dpo"]["reward_accuracy"] is not None and rows["sft → grpo"]["reward"] == grpo["stage_metrics"][
        "reward"]
    text = compare.compare([sft_run, *stage_runs.values()], tmp_path / "report").read_text()
    assert "| stage |" in text and "reward accuracy" in text and "mean reward" in text and "| sft → grpo |" in text
    assert "![Preference and reward stages" in text and (tmp_path / "report" / "plots" / "stage_curves.png").is_file()


def test_init_from_what_is_not_a_run_is_one_line_naming_the_key(tmp_path, compose_train):
    with pytest.raises(ConfigError, match=r"config key 'init_from': .*is not a convobot run dir"):
        run(compose_train(*STAGE, "stage=dpo", "data=bundled_preferences", f"init_from={tmp_path}"), tmp_path / "dpo")


def test_a_stage_that_fails_before_training_leaves_its_run_dir_reusable(sft_run, tmp_path, compose_train):
    from convobot.errors import DataError

    overrides = [*STAGE, "stage=dpo", "data=bundled_preferences", f"init_from={sft_run}"]
    with pytest.raises(DataError, match="data.eval_size"):
        run(compose_train(*overrides, "data.eval_size=500"), tmp_path / "dpo")
    assert not (tmp_path / "dpo" / "base_model").exists()
    assert run(compose_train(*overrides), tmp_path / "dpo")["stage"] == "dpo"  # the same dir, no overwrite


def test_init_from_a_run_that_never_finished_is_refused(tmp_path, compose_train, sft_run):
    import shutil

    unfinished = tmp_path / "unfinished"
    shutil.copytree(sft_run, unfinished)
    (unfinished / "metrics.json").unlink()
    with pytest.raises(ConfigError, match="config key 'init_from': .* has not finished training"):
        run(compose_train(*STAGE, "stage=dpo", "data=bundled_preferences", f"init_from={unfinished}"),
            tmp_path / "dpo")


def test_an_interrupted_stage_resumes_on_the_base_it_saved(sft_run, tmp_path, compose_train):
    import shutil

    overrides = [*STAGE, "stage=dpo", "data=bundled_preferences", f"init_from={sft_run}", "train.max_steps=4",
                 "train.save_steps=2"]
    run_dir = tmp_path / "dpo"
    run(compose_train(*overrides), run_dir)
    # Killed after the checkpoint at step 2: nothing after it on disk.
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-4")
    shutil.rmtree(run_dir / "adapter")
    (run_dir / "metrics.json").unlink()
    results = run(compose_train(*overrides, "resume=true"), run_dir)
    assert results["steps"] == 4 and results["resumed_from_step"] == 2 and results["stage"] == "dpo"
    assert results["lineage"][0]["run"] == str(sft_run)

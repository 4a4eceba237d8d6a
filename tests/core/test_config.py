from enum import Enum
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from convobot.config import CONF_DIR, PeftMethod, compose, validate
from convobot.errors import ConfigError

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
TRAIN_GROUPS = ("model", "data", "peft", "optim", "hardware", "stage")
# What an option needs beside it: preference data trains a preference stage, and the other way round.
COMPANIONS = {("data", "local"): ["data.path=rows.jsonl"], ("data", "bundled_preferences"): ["stage=dpo"],
              **{("stage", stage): ["data=bundled_preferences"] for stage in ("dpo", "orpo", "kto")}}
GROUP_OPTIONS = [(group, option.stem) for group in TRAIN_GROUPS for option in sorted((CONF_DIR / group).glob("*.yaml"))]


def test_there_are_experiments():
    assert {"smoke", "seed_repro", "lora_4gb"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    cfg = validate(compose([f"experiment={experiment}"]))
    assert cfg.experiment_name == experiment


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes_with_its_values(group, option):
    overrides = [f"{group}={option}", *COMPANIONS.get((group, option), [])]
    typed = getattr(validate(compose(overrides)), group)
    set_by_default_experiment = OmegaConf.load(CONF_DIR / "experiment" / "embedded.yaml").get(group, {})
    for key, value in OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml")).items():
        if key == "defaults" or key in set_by_default_experiment:  # a parent option's values; the experiment's
            continue
        if key == "path" and value == "???":
            value = "rows.jsonl"
        got = getattr(typed, key)
        assert (got.value if isinstance(got, Enum) else got) == value, f"{group}={option}: {key}"


def test_seed_repro_is_the_reference_recipe(compose_train):
    cfg = compose_train("experiment=seed_repro")
    assert cfg.model.name == "gpt2" and cfg.data.path == "vicgalle/alpaca-gpt4"
    assert cfg.hardware.precision.value == "fp16" and cfg.hardware.batch_size == 2
    assert cfg.train.epochs == 3 and "8bit" in cfg.optim.name
    assert cfg.data.completion_only is False  # the reference put the loss on the whole text


def test_command_line_overrides_apply(compose_train):
    cfg = compose_train("experiment=lora_4gb", "peft.r=16", "optim=paged_adamw_8bit")
    assert cfg.peft.r == 16 and cfg.optim.name == "paged_adamw_8bit"
    assert compose_train("peft=full").peft.method == PeftMethod.full


def test_misspelt_key_fails_naming_it():
    with pytest.raises(ConfigError, match=r"peft\.rr"):
        validate(compose(["+peft.rr=8"]))


def test_wrong_type_fails_naming_key():
    with pytest.raises(ConfigError, match=r"peft\.r"):
        validate(compose(["peft.r=eight"]))


def test_unknown_choice_fails_naming_key():
    with pytest.raises(ConfigError, match=r"peft\.method"):
        validate(compose(["peft.method=lorax"]))


def test_local_data_requires_a_path():
    with pytest.raises(ConfigError, match=r"data\.path"):
        validate(compose(["data=local"]))


def test_experiment_files_show_their_command():
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        lines = Path(path).read_text().splitlines()
        assert lines[0] == "# @package _global_", path
        assert f"experiment={path.stem}" in lines[1], f"{path}: second line should show the launch command"


@pytest.mark.parametrize("override, key", [
    ("train.max_steps=0", "train.max_steps"), ("train.epochs=0", "train.epochs"), ("data.max_rows=0", "data.max_rows"),
    ("hardware.eval_tokens=0", "hardware.eval_tokens"),
])
def test_settings_that_would_train_nothing_are_refused(override, key):
    with pytest.raises(ConfigError, match=rf"config key '{key}'"):
        validate(compose([override]))


@pytest.mark.parametrize("command, overrides, key", [
    ("eval", ["model=m", "max_rows=0"], "max_rows"),
    ("eval", ["model=m", "sliding.stride=0"], "sliding.stride"),
    ("chat", ["model=m", "prompt=' '"], "prompt"),
    ("merge", ["run_dir=r", "output_dir=o", "verify_rows=0"], "verify_rows"),
])
def test_command_settings_out_of_range_name_their_key(command, overrides, key):
    from convobot.config import compose_command

    with pytest.raises(ConfigError, match=rf"config key '{key}'"):
        compose_command(command, overrides)


@pytest.mark.parametrize("overrides, method", [
    ([], "lora"), (["peft=dora"], "dora"), (["peft=rslora"], "rslora"), (["peft=qlora"], "qlora"),
    (["peft=full"], "full"), (["peft.use_dora=true"], "dora"), (["peft=qlora", "peft.use_dora=true"], "qdora"),
])
def test_the_method_is_named_by_what_the_settings_train(compose_train, overrides, method):
    assert compose_train(*overrides).peft.method_name == method


@pytest.mark.parametrize("overrides, licence", [
    (["model=gpt2", "data=alpaca_gpt4"], "cc-by-nc-4.0"),  # non-commercial data binds the weights
    (["model=distilgpt2"], "apache-2.0"),
    (["model=gpt2-xl", "data=bundled_chat"], "mit"),
    (["data=local", "data.path=rows.jsonl"], "other"),  # the data's licence is unknown
    (["data=local", "data.path=rows.jsonl", "data.license=cc-by-4.0"], "apache-2.0"),
])
def test_the_release_licence_comes_from_the_model_and_data_configs(compose_train, overrides, licence):
    from convobot.release.card import release_license

    assert release_license(compose_train(*overrides), None) == licence
    assert release_license(compose_train(*overrides), "mit") == "mit"

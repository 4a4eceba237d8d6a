"""Stages on top of stages: `init_from=<run dir>` starts a run from the model an earlier run computes.

    convobot train hydra.run.dir=outputs/sft
    convobot train stage=dpo data=bundled_preferences init_from=outputs/sft hydra.run.dir=outputs/dpo

The earlier run's model, its adapter merged into its base, is saved as this run's base_model/ and model=... becomes
that run's model config pointing there: the new stage trains a fresh adapter (or the whole model) on it, with it as
the reference, and everything that reads a run's base (merge and its checks, eval's compare=[base,...], chat) reads
the model the chain computes. metrics.json lists the chain under `lineage`; the model card names every stage.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

from convobot.config import ModelSource, TrainConfig
from convobot.errors import ConfigError, ModelPathError
from convobot.runs import rundir
from convobot.training import distributed

log = logging.getLogger(__name__)

WAIT_SECONDS = 600  # other ranks wait this long for rank 0 to save the starting model


def earlier_run(cfg: TrainConfig) -> rundir.RunDir:
    """The init_from run, opened; one line naming the key if it is not a finished run."""
    try:
        return rundir.open_run(cfg.init_from)
    except ModelPathError as err:
        raise ConfigError(f"config key 'init_from': {err}") from err


def start_from(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """cfg with the init_from run's model as its base (saved in run_dir/base_model once; a resumed run reuses it)."""
    earlier = earlier_run(cfg)
    if cfg.model.name != earlier.config.model.name:
        log.warning("init_from=%s starts from that run's model (%s, then trained); model=%s is not used",
                    cfg.init_from, earlier.config.model.name, cfg.model.name)
    if rundir.read_metrics(earlier.path) is None:
        raise ConfigError(f"config key 'init_from': {earlier.path} has not finished training (no metrics.json)")
    if Path(earlier.path).resolve() == Path(run_dir).resolve():
        raise ConfigError(f"config key 'init_from': {earlier.path} is this run's own dir")
    folder = Path(run_dir) / rundir.BASE_MODEL
    if distributed.rank() == 0 and not (folder / "config.json").is_file():
        from convobot.model.tokenizer import load_tokenizer
        from convobot.runs.loading import load_trained

        model = load_trained(earlier)
        if earlier.config.peft.adapter:
            model = model.merge_and_unload()
        rundir.save_model(folder, model, load_tokenizer(str(earlier.weights_dir)))
    deadline = time.monotonic() + WAIT_SECONDS
    while not (folder / "config.json").is_file():
        if time.monotonic() > deadline:
            raise ConfigError(f"config key 'init_from': {folder} did not appear (rank 0 saves it)")
        time.sleep(1)
    model = dataclasses.replace(earlier.config.model, name=str(folder), source=ModelSource.run, tokenizer=str(folder),
                                revision=None)
    return dataclasses.replace(cfg, model=model)


def discard_start(run_dir: Path) -> None:
    """The starting model a run saved before it failed to set up (bad data, a wrong option): a run dir with no
    config.yaml yet holds no run, so the next attempt can start there."""
    if not (Path(run_dir) / rundir.CONFIG).is_file():
        shutil.rmtree(Path(run_dir) / rundir.BASE_MODEL, ignore_errors=True)


def lineage(cfg: TrainConfig) -> list[dict]:
    """The runs this one starts from, oldest first: each one's dir, stage, peft option, data and its licence."""
    if not cfg.init_from:
        return []
    earlier = earlier_run(cfg)
    config = earlier.config
    return earlier.metrics().get("lineage", []) + [
        {"run": str(earlier.path), "stage": config.stage.name.value, "peft": config.peft.name,
         "data": config.data.origin, "data_license": config.data.license, "base": earlier.base_description}]

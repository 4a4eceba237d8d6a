"""Where an interrupted run continues from, and tidying its run dir before it does.

The Trainer restores optimizer, scheduler, RNG and data position from a `checkpoint-N/` folder;
this module only decides which folder (the `resume` config key):

    resume=false                          start fresh
    resume=true hydra.run.dir=<run dir>   the newest complete checkpoint of that run; an error if there is none
    resume=auto                           the same, but start fresh when there is none (SLURM requeue)
    resume=<run dir> | <checkpoint-N>     continue another run's training into this run dir
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import sort_checkpoints

from convobot import atomic
from convobot.config import TrainConfig, flatten, to_container
from convobot.errors import ConfigError
from convobot.runs.rundir import CHECKPOINTS, CONFIG, METRICS_LOG, SAMPLES, read_config

log = logging.getLogger(__name__)

# The Trainer writes trainer_state.json last: a checkpoint without it was cut off mid-save.
STATE_FILE = "trainer_state.json"


def is_complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def newest_checkpoint(folder: Path) -> Path | None:
    """The highest-numbered complete `checkpoint-N` in `folder`, or None."""
    for path in reversed(sort_checkpoints(str(folder))):
        if is_complete(Path(path)):
            return Path(path)
        log.warning("skipping %s: no readable %s (interrupted while saving)", path, STATE_FILE)
    return None


def find_checkpoint(resume: bool | str, run_dir: Path) -> Path | None:
    """The checkpoint the `resume` setting points at, or None to start fresh. Raises ConfigError."""
    if resume is False:
        return None
    if resume is True or resume == "auto":
        found = newest_checkpoint(run_dir / CHECKPOINTS)
        if found is None and resume is True:
            raise ConfigError(
                f"config key 'resume': resume=true but {run_dir / CHECKPOINTS} holds no complete checkpoint-N; "
                "pass hydra.run.dir=<the interrupted run's dir>, or resume=<run dir or checkpoint path>, "
                "or resume=auto to start fresh when there is nothing to resume")
        return found
    path = Path(resume).expanduser()
    if is_complete(path):
        return path
    found = newest_checkpoint(path / CHECKPOINTS) or newest_checkpoint(path)
    if found is None:
        raise ConfigError(f"config key 'resume': {path} is neither a checkpoint-N folder with {STATE_FILE} "
                          "nor a run dir with complete checkpoints in checkpoints/")
    return found


def steps_and_tokens(checkpoint: Path | None) -> tuple[int, int]:
    """(global step, tokens seen) saved in a checkpoint; (0, 0) for a fresh start."""
    if checkpoint is None:
        return 0, 0
    state = TrainerState.load_from_json(str(checkpoint / STATE_FILE))
    return state.global_step, state.num_input_tokens_seen


def end_of_training(trainer, checkpoint: Path) -> tuple[int, int] | None:
    """(step, planned steps) if `checkpoint` is the last step the run plans, else None. Resuming from there would
    make transformers' Trainer train one step past the end."""
    state = TrainerState.load_from_json(str(checkpoint / STATE_FILE))
    if state.global_step < state.max_steps:
        return None
    planned = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]
    return (state.global_step, planned) if state.global_step >= planned else None


def load_finished(trainer, checkpoint: Path) -> float:
    """Put the last checkpoint's weights and state into `trainer` instead of training; returns the mean of the
    logged training losses (the checkpoint keeps no running total)."""
    trainer._load_from_checkpoint(str(checkpoint))  # the Trainer's own loader: adapter or full weights alike
    trainer.state = TrainerState.load_from_json(str(checkpoint / STATE_FILE))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return sum(losses) / len(losses) if losses else float("nan")


# Config groups a resumed run must keep: they decide the model, the adapter and the rows it trains on.
FIXED_ON_RESUME = ("model", "peft", "data")
# Keys that say how to start or what to call it, not what to train.
LAUNCH_KEYS = {"resume", "overwrite", "model.license", "data.license"}


def check_config(checkpoint: Path, run_dir: Path, cfg: TrainConfig) -> dict[str, list]:
    """Compare `cfg` with the config the checkpoint's run saved, before anything is written: a change to a
    FIXED_ON_RESUME key is refused naming the keys; the others (max_steps, logging, ...) are returned as
    {key: [saved, now]} for metrics.json."""
    source = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else run_dir
    saved_file = source / CONFIG
    if not saved_file.is_file():
        return {}
    saved = flatten(to_container(read_config(saved_file)))
    now = flatten(to_container(cfg))
    changed = {key: [saved.get(key), now.get(key)] for key in sorted(saved.keys() | now.keys())
               if saved.get(key) != now.get(key) and key not in LAUNCH_KEYS}
    fixed = [key for key in changed if key.split(".", 1)[0] in FIXED_ON_RESUME]
    if fixed:
        shown = ", ".join(f"{key}: {changed[key][0]!r} -> {changed[key][1]!r}" for key in fixed[:5])
        raise ConfigError(f"config key 'resume': {saved_file} was trained with other {'/'.join(FIXED_ON_RESUME)} "
                          f"settings ({shown}); resume with the same ones, or start a new run")
    if changed:
        log.info("resuming with changed settings: %s", changed)
    return changed


def rewind_run_dir(run_dir: Path, step: int) -> None:
    """Make `run_dir` look as it did when checkpoint `step` was saved (main process, before training).

    Logs lose the lines for steps the resumed run will train again (and any line cut off by the kill);
    half-saved checkpoints and the temp files of interrupted atomic writes are removed.
    """
    for stale in run_dir.glob(".*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    for path in sort_checkpoints(str(run_dir / CHECKPOINTS)):
        if not is_complete(Path(path)):
            log.warning("removing %s: interrupted while saving", path)
            shutil.rmtree(path)
    for jsonl in [run_dir / METRICS_LOG, *sorted((run_dir / SAMPLES).glob("rank*.jsonl"))]:
        if jsonl.is_file():
            atomic.write_jsonl(jsonl, [row for row in _complete_lines(jsonl) if row.get("step", 0) <= step])


def _complete_lines(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # the last line of a killed run may be cut off
            log.warning("dropping a truncated line in %s", path)
    return rows

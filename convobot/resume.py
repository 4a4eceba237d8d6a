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
from convobot.errors import ConfigError
from convobot.rundir import CHECKPOINTS, METRICS_LOG, SAMPLES

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
                f"config key 'resume': resume=true but {run_dir / 'checkpoints'} holds no complete checkpoint-N; "
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


def check_unfinished(trainer, checkpoint: Path) -> None:
    """Refuse to resume from the end of training: transformers' Trainer would train one step past it."""
    state = TrainerState.load_from_json(str(checkpoint / STATE_FILE))
    if state.global_step < state.max_steps:
        return
    planned = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]
    if state.global_step >= planned:
        raise ConfigError(f"config key 'resume': {checkpoint} already finished training (step {state.global_step} of "
                          f"{planned}); raise train.max_steps or train.epochs to train further")


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

"""Trainer callbacks: a progress bar that shows loss and tokens/s, metrics.jsonl, and step metrics to a tracker."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from convobot.runs.tracking import Tracking, numeric


class LossAndThroughputProgress(ProgressCallback):
    """The Trainer's tqdm bar, with the latest loss and trained (non-padding) tokens/s on it
    instead of a dict printed on each logging step."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._start, self._start_tokens = time.perf_counter(), state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        postfix = {}
        if "loss" in logs:
            postfix["loss"] = f"{logs['loss']:.4f}"
        if "eval_loss" in logs:
            postfix["eval_loss"] = f"{logs['eval_loss']:.4f}"
        elapsed = time.perf_counter() - self._start
        if elapsed > 0 and state.num_input_tokens_seen:
            postfix["tok/s"] = f"{(state.num_input_tokens_seen - self._start_tokens) / elapsed:,.0f}"
        self.training_bar.set_postfix(postfix, refresh=True)

    def close(self) -> None:
        """End the bar's line, also when training stopped with an error (the error then starts a line of its own)."""
        if self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None


class MetricsJsonl(TrainerCallback):
    """One JSON line per logging step (train and eval logs), written by the main process only."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "tokens_seen": state.num_input_tokens_seen,
                  "time": time.time(), **logs}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


class TrackingCallback(TrainerCallback):
    """Every logging step's numbers (train loss, learning rate, eval loss, ...) to the tracker, from rank 0."""

    def __init__(self, tracking: Tracking):
        self.tracking = tracking

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            metrics = numeric(logs) | {"tokens_seen": float(state.num_input_tokens_seen)}
            self.tracking.safely("log step metrics", self.tracking.log_metrics, metrics, state.global_step)

"""The run dir convobot train writes: its layout, the lock a run holds on it, and reading and writing its files.

Every command that reads or writes a run goes through this module, so the layout is spelled once:

    <run dir>/
      config.yaml         the validated training config
      heldout.jsonl       the held-out Alpaca rows (scoring, merge checks, the model card's example)
      base_model/         the base of model.source=bundled/random (the package may change, random init cannot
                          be downloaded)
      .lock               held by the run while it lasts (its PID inside)
      adapter/ | model/   the LoRA adapter, or the fully fine-tuned model, with the tokenizer
      metrics.json        the run's results; metrics.jsonl: one line per logging step
      checkpoints/        Trainer checkpoints (resume=true); samples/: per-rank sample logs (train.log_samples)
      .hydra/             what Hydra recorded (overrides.yaml: the command line, sweep values included)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from omegaconf import OmegaConf

from convobot import atomic
from convobot.config import ModelSource, PeftMethod, TrainConfig, to_container, validate
from convobot.errors import ConfigError, ModelPathError, RunDirError
from convobot.template import format_example

CONFIG = "config.yaml"
HELDOUT = "heldout.jsonl"
BASE_MODEL = "base_model"
METRICS = "metrics.json"
METRICS_LOG = "metrics.jsonl"
PREDICTIONS = "predictions.jsonl"  # answers to held-out rows, scored (report.generate_metrics)
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"
LOCK = ".lock"


def weights_dirname(method: PeftMethod) -> str:
    """What training saves: a LoRA adapter, or the whole model."""
    return "adapter" if method == PeftMethod.lora else "model"


@dataclass
class RunDir:
    """A finished convobot train run: its folder and validated config."""

    path: Path
    config: TrainConfig

    @property
    def method(self) -> PeftMethod:
        return self.config.peft.method

    @property
    def weights_dir(self) -> Path:
        return self.path / weights_dirname(self.method)

    @property
    def base_description(self) -> str:
        model = self.config.model
        if model.source == ModelSource.random:
            return f"{model.name} (random init, saved in {self.path / BASE_MODEL})"
        if model.source == ModelSource.bundled:
            return f"{model.name} (convobot's pretrained base, saved in {self.path / BASE_MODEL})"
        if model.source == ModelSource.run:
            return f"the model of run {self.config.init_from} (saved in {self.path / BASE_MODEL})"
        return model.name + (f"@{model.revision}" if model.revision else "")

    def metrics(self) -> dict:
        return read_metrics(self.path) or {}

    def heldout_rows(self) -> list[dict]:
        path = self.path / HELDOUT
        if not path.is_file():
            raise ModelPathError(f"{path} is missing: the run's held-out rows are needed to verify and score")
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def heldout_pairs(self):
        from datasets import Dataset

        return Dataset.from_list([format_example(row) for row in self.heldout_rows()])


def open_run(path: str | Path) -> RunDir:
    """A finished run dir: its validated config.yaml and its adapter/ or model/ folder."""
    path = Path(path)
    if not path.is_dir():
        raise ModelPathError(f"run dir {path} does not exist")
    config_file = path / CONFIG
    if not config_file.is_file():
        raise ModelPathError(f"{path} is not a convobot run dir: {CONFIG} is missing")
    run = RunDir(path, read_config(config_file))
    if not run.weights_dir.is_dir():
        raise ModelPathError(f"{run.weights_dir} is missing: the run has not saved its "
                             f"{weights_dirname(run.method)} (did training finish?)")
    return run


def read_config(config_file: Path) -> TrainConfig:
    """A run's config.yaml, validated; one line naming the file if it is not a readable training config."""
    try:
        return validate(OmegaConf.load(config_file))
    except ConfigError as err:
        raise RunDirError(f"{config_file}: {err}") from err
    except Exception as err:  # YAML syntax, encoding
        raise RunDirError(f"{config_file}: not a readable config ({str(err).splitlines()[0]})") from err


# --- owning it (convobot train, main process)


@contextmanager
def claimed(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `run_dir` for the life of a run (flock on its .lock file, which names the
    holder); a second process is refused at once. The kernel drops the lock when its process dies, however."""
    run_dir = usable_dir(run_dir)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunDirError(f"{run_dir} is in use by another run (process {holder}); wait for it to finish or pick "
                          "another hydra.run.dir") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def usable_dir(run_dir: Path) -> Path:
    """`run_dir`, created if need be; one line naming it if it cannot be (a file there, no permission)."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=run_dir)
        probe.close()
    except OSError as err:
        raise RunDirError(f"cannot use {run_dir} as a run dir: {err.strerror or err}") from err
    return run_dir


def earlier_run(run_dir: Path) -> list[str]:
    """What an earlier run left in `run_dir`: everything but what Hydra writes before a run starts (.hydra/ and
    its log) and the lock."""
    return sorted(p.name for p in Path(run_dir).iterdir()
                  if p.name not in (".hydra", LOCK) and not (p.is_file() and p.suffix == ".log"))


def start_fresh(run_dir: Path, overwrite: bool) -> None:
    """Make `run_dir` ready for a run from step 0: refuse one that holds an earlier run unless `overwrite`, in
    which case its files go (a fresh start never appends to an old metrics.jsonl or mixes checkpoints)."""
    found = earlier_run(run_dir)
    if found and not overwrite:
        raise RunDirError(f"{run_dir} already holds a run ({', '.join(found[:6])}): pass resume=true to continue "
                          "it, overwrite=true to replace it, or another hydra.run.dir")
    for name in found:
        path = Path(run_dir) / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


# --- writing (convobot train, main process)


def write_config(run_dir: Path, cfg: TrainConfig) -> None:
    atomic.write_text(run_dir / CONFIG, OmegaConf.to_yaml(to_container(cfg)))


def write_heldout(run_dir: Path, rows: list[dict]) -> None:
    atomic.write_jsonl(run_dir / HELDOUT, rows)


def write_predictions(run_dir: Path, records: list[dict]) -> None:
    atomic.write_jsonl(run_dir / PREDICTIONS, records)


def save_model(folder: Path, model, tokenizer) -> None:
    """`model` (a transformers model or a peft adapter) and its tokenizer into `folder`, as safetensors,
    written whole or not at all."""
    with atomic.directory(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def write_metrics(run_dir: Path, results: dict) -> None:
    atomic.write_json(run_dir / METRICS, results)


# --- reading (merge, eval, compare, sweep summaries)


def read_metrics(run_dir: Path) -> dict | None:
    """metrics.json, or None if the run never wrote it (still running, or failed)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunDirError(f"{path}: not valid JSON ({err})") from err


def _read_jsonl(path: Path) -> list[dict]:
    """One dict per line of a JSON-lines file; [] if absent; a bad line named by its number."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise RunDirError(f"{path} line {number}: not valid JSON ({err})") from err
    return records


def read_predictions(run_dir: Path, name: str = PREDICTIONS) -> list[dict]:
    """predictions.jsonl (or another file of scored answers): answers to held-out rows; [] if absent."""
    return _read_jsonl(Path(run_dir) / name)


def read_metrics_log(run_dir: Path) -> list[dict]:
    """metrics.jsonl: one dict per logging step (train and eval logs); [] if absent."""
    return _read_jsonl(Path(run_dir) / METRICS_LOG)


def read_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides Hydra recorded for the run, without hydra.* launch details."""
    path = Path(run_dir) / HYDRA_OVERRIDES
    recorded = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else []
    return [override for override in recorded if not override.startswith("hydra.")]


def is_run_dir(path: Path) -> bool:
    """A run dir that finished, or a sweep's job dir (Hydra makes .hydra/ when the job starts)."""
    return (path / METRICS).is_file() or (path / ".hydra").is_dir()

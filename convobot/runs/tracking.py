"""Experiment tracking: a run's config, step metrics, results and files in MLflow, TensorBoard or W&B.

    convobot train logger=mlflow                       # SQLite store: outputs/mlflow.db (the launch dir's outputs/)
    convobot train -m logger=mlflow peft=lora,full     # a parent run for the sweep, a child run per job
    convobot train logger=tensorboard                  # <run dir>/tensorboard
    convobot train logger=wandb                        # offline: <run dir>/wandb
    convobot eval run_dir=outputs/demo generate=true logger=mlflow     # an evaluation as a run of its own

Each tracker gets the composed config flattened into params (`peft.method`, `optim.lr`, ...), the Hydra overrides
as tags, every logging step's metrics (what metrics.jsonl holds), the final metrics.json values, and the run's
config.yaml, metrics.json and metrics.jsonl as files. This is glue over each tool's own client rather than the
Trainer's integrations, which log TrainingArguments instead of the composed config, close their run before the
held-out scores exist, and know no sweep. A tracker that cannot be used is a ConfigError before training starts;
one that fails during the run is warned about once and dropped: the run dir still has everything.

`convobot eval` logs one tracker run per evaluation, tagged `convobot.kind=eval`: each model's scores as metrics
(`adapter.full.perplexity`, `merged.generation.rougeL`, `harness.convobot_tasks.exact_match`), the report as
eval_report.json and each model's answers as predictions-<model>.jsonl; `convobot compare --mlflow` reads them back.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from convobot import atomic
from convobot.config import LoggerConfig, Tracker, TrainConfig, flatten, to_container
from convobot.errors import ConfigError, MissingExtraError
from convobot.runs import rundir

log = logging.getLogger(__name__)

PACKAGES = {Tracker.mlflow: "mlflow", Tracker.tensorboard: "tensorboard", Tracker.wandb: "wandb"}
PARENT_RUN = "mlflow_parent_run.json"  # in a sweep dir: the sweep's parent run


def numeric(values: dict) -> dict[str, float]:
    """The numbers of a (nested) metrics dict, flattened: what a tracker can plot."""
    return {key: float(value) for key, value in flatten(values).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def default_store() -> Path:
    return Path.cwd() / "outputs"


class Tracking:
    """One tracker for one run; every call after a failure is a no-op (the run goes on)."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, sweep_dir: Path | None, name: str | None = None):
        self.cfg, self.run_dir, self.sweep_dir = cfg, Path(run_dir), sweep_dir
        self.name = name or self.run_dir.name
        self.broken = False

    # --- the per-tool parts
    def check(self) -> None:
        """Fail now, before training, if the tracker cannot be used (nothing to check by default)."""

    def start(self, params: dict, tags: dict) -> None:
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self, results: dict[str, float], files: list[Path]) -> None:
        raise NotImplementedError

    # --- failure containment
    def safely(self, what: str, call, *args) -> None:
        if self.broken:
            return
        try:
            call(*args)
        except Exception as err:  # a tracker outage must not cost the run
            self.broken = True
            log.warning("%s: could not %s (%s: %s); tracking stops, the run goes on", self.cfg.name.value, what,
                        type(err).__name__, err)


class MLflowTracking(Tracking):
    def __init__(self, cfg, run_dir, sweep_dir, name=None):
        super().__init__(cfg, run_dir, sweep_dir, name)
        self.uri = cfg.tracking_uri or f"sqlite:///{default_store() / 'mlflow.db'}"
        self.artifacts = cfg.artifact_location or (default_store() / "mlflow-artifacts").as_uri()

    def check(self) -> None:
        """Reach the store now: an unreachable or unusable URI fails before any training."""
        from mlflow.tracking import MlflowClient

        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # One quick try, not MLflow's minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            client = MlflowClient(self.uri)
            experiment = client.get_experiment_by_name(self.cfg.experiment)
            self.experiment_id = (experiment.experiment_id if experiment else
                                  client.create_experiment(self.cfg.experiment, artifact_location=self.artifacts))
        except Exception as err:
            raise ConfigError(f"config key 'logger.tracking_uri': cannot use MLflow store {self.uri}: "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
        self.client = client

    def parent_run(self) -> str | None:
        """The sweep's parent run, made by whichever job gets here first (a lock in the sweep dir)."""
        if self.sweep_dir is None:
            return None
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        with open(self.sweep_dir / ".mlflow.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            record = self.sweep_dir / PARENT_RUN
            if record.is_file():
                return json.loads(record.read_text())["run_id"]
            parent = self.client.create_run(self.experiment_id, run_name=self.sweep_dir.name,
                                            tags={"convobot.sweep_dir": str(self.sweep_dir)})
            atomic.write_json(record, {"run_id": parent.info.run_id, "tracking_uri": self.uri})
            return parent.info.run_id

    def start(self, params, tags):
        parent = self.parent_run()
        tags = tags | ({"mlflow.parentRunId": parent} if parent else {})
        self.run_id = self.client.create_run(self.experiment_id, run_name=self.name, tags=tags).info.run_id
        from mlflow.entities import Param

        items = [Param(key, str(value)[:6000]) for key, value in params.items()]
        for begin in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[begin:begin + 100])

    def log_metrics(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self, results, files):
        self.log_metrics(results, step=int(results.get("steps", 0)))
        for path in files:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id)


class TensorBoardTracking(Tracking):
    def start(self, params, tags):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        table = "\n".join(f"| {key} | {value} |" for key, value in params.items())
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + table)
        self.writer.add_text("overrides", " ".join(tags.get("overrides", "").split()) or "(none)")

    def log_metrics(self, metrics, step):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, results, files):
        step = int(results.get("steps", 0))
        for key, value in results.items():
            self.writer.add_scalar(f"final/{key}", value, step)
        self.writer.close()


class WandbTracking(Tracking):
    def check(self) -> None:
        if self.cfg.mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"config key 'logger.mode': {self.cfg.mode!r}; use offline, online or disabled")

    def start(self, params, tags):
        import wandb

        self.run = wandb.init(project=self.cfg.experiment, dir=str(self.run_dir), mode=self.cfg.mode,
                              name=self.name, config=params,
                              group=self.sweep_dir.name if self.sweep_dir else None,
                              tags=[tag[:64] for tag in tags.get("overrides", "").split()][:20])

    def log_metrics(self, metrics, step):
        self.run.log(metrics, step=step)

    def finish(self, results, files):
        self.run.summary.update(results)
        for path in files:
            if path.is_file():
                self.run.save(str(path), base_path=str(path.parent), policy="now")
        self.run.finish()


TRACKERS = {Tracker.mlflow: MLflowTracking, Tracker.tensorboard: TensorBoardTracking, Tracker.wandb: WandbTracking}


def open_tracking(cfg: LoggerConfig, run_dir: Path, sweep_dir: Path | None = None,
                  run_name: str | None = None) -> Tracking | None:
    """The configured tracker, checked (package installed, store reachable), or None for logger=none. `run_dir`
    holds what TensorBoard and W&B write locally and, without `run_name`, names the tracker's run."""
    name = cfg.name
    if name == Tracker.none:
        return None
    if importlib.util.find_spec(PACKAGES[name]) is None:
        raise MissingExtraError(f"logger={name.value} needs {PACKAGES[name]}: pip install 'convobot[track]'")
    tracking = TRACKERS[name](cfg, run_dir, sweep_dir, run_name)
    tracking.check()
    return tracking


def begin(tracking: Tracking | None, cfg: TrainConfig, run_dir: Path) -> None:
    if tracking is None:
        return
    overrides = rundir.read_overrides(run_dir)
    tags = {"overrides": " ".join(overrides), "convobot.run_dir": str(run_dir), "convobot.experiment":
            cfg.experiment_name}
    # Each override its own tag too (override.peft = lora), to filter and group runs by.
    tags |= {f"override.{key.lstrip('+~')}": value for key, _, value in (o.partition("=") for o in overrides)}
    tracking.safely("start the run", tracking.start, flatten(to_container(cfg)), tags)


def end(tracking: Tracking | None, results: dict, run_dir: Path) -> None:
    if tracking is None:
        return
    files = [run_dir / name for name in (rundir.CONFIG, rundir.METRICS, rundir.METRICS_LOG, rundir.PREDICTIONS)
             if (run_dir / name).is_file()]
    tracking.safely("log the results", tracking.finish, numeric(results), files)


EVAL_REPORT = "eval_report.json"  # an evaluation's report, as an artifact of its tracker run


def evaluation_metrics(report: dict) -> dict[str, float]:
    """convobot eval's numbers as tracker metrics: `<model>.<measure>...` and `harness.<task>.<metric>` (the
    harness's "metric,filter" keys become metric/filter: MLflow takes no commas in names)."""
    metrics = numeric({label: {key: value for key, value in scores.items() if key != "max_length"}
                       for label, scores in report["models"].items()})
    for task, values in report.get("harness", {}).get("results", {}).items():
        for key, value in values.items():
            name, _, kind = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"harness.{task}.{name}" + ("" if kind in ("", "none") else f"/{kind}")] = float(value)
    return metrics


def log_evaluation(tracking: Tracking | None, params: dict, evaluated: str, report: dict,
                   predictions: dict[str, list[dict]]) -> None:
    """One evaluation as a tracker run of its own: the command's config as params, the scores as metrics, the
    report and each model's answers as files."""
    if tracking is None:
        return
    tags = {"convobot.kind": "eval", "convobot.evaluated": evaluated, "convobot.data": report["data"]}
    tracking.safely("start the run", tracking.start, params, tags)
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp) / EVAL_REPORT]
        atomic.write_json(files[0], report)
        for label, records in predictions.items():
            files.append(Path(tmp) / f"predictions-{label}.jsonl")
            atomic.write_jsonl(files[-1], records)
        tracking.safely("log the results", tracking.finish, evaluation_metrics(report), files)


def close_sweep(sweep_dir: Path, files: list[Path]) -> None:
    """The sweep's report (summary.md, summary.csv, plots/) as artifacts of its MLflow parent run, which then ends."""
    record = Path(sweep_dir) / PARENT_RUN
    if not record.is_file():
        return
    from mlflow.tracking import MlflowClient

    parent = json.loads(record.read_text())
    try:
        client = MlflowClient(parent["tracking_uri"])
        for path in files:
            if path.is_dir():
                client.log_artifacts(parent["run_id"], str(path), artifact_path=path.name)
            elif path.is_file():
                client.log_artifact(parent["run_id"], str(path))
        client.set_terminated(parent["run_id"])
    except Exception as err:  # the sweep's own report is written; the tracker only mirrors it
        log.warning("mlflow: could not log the sweep summary to run %s (%s)", parent["run_id"], err)

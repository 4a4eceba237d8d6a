"""Compare training runs (LoRA vs full fine-tune, or every job of a sweep): a table and four plots.

Examples:
    convobot compare outputs/multirun/2026-01-01/12-00-00-000000_smoke          # every job of a sweep
    convobot compare outputs/2026-01-01/10-00-00-000000_embedded outputs/2026-01-01/10-09-00-000000_embedded
    convobot compare outputs/multirun/*/*_smoke --out reports/smoke --title "LoRA vs full, smoke"

Writes <out>/report.md, <out>/summary.csv and <out>/plots/: loss_curves.png (LoRA vs full overlaid),
perplexity_vs_params.png, peak_memory.png and throughput.png; stage_curves.png where runs are DPO, ORPO, KTO or GRPO
stages (their reward margin, mean reward and KL per step). Runs trained with report.generate_metrics=true add
their answers' scores (BLEU, chrF, ROUGE-L) to the table, answers_vs_params.png, and the answers themselves side by
side: the first held-out prompts in report.md, all of them in answers.html. Arguments are run dirs (holding
metrics.json) or folders of them; a sweep's job that never finished is listed as incomplete.
Run dirs are positional paths (not Hydra key=value): sweep job dirs have "=" in their names.
`--mlflow URI` reads the runs back from an MLflow store instead (logger=mlflow), `--parent RUN_ID` one sweep's;
evaluations logged there by `convobot eval ... logger=mlflow` get a table of their own, their answers side by side:

    convobot compare --mlflow sqlite:///outputs/mlflow.db --out reports/mlflow
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator, NullFormatter

from convobot import atomic
from convobot.cli import one_line_errors
from convobot.errors import CompareError
from convobot.runs import rundir

PLOTS = ("loss_curves", "perplexity_vs_params", "peak_memory", "throughput")
METHOD_STYLE = {"lora": ("tab:blue", "-", "o"), "full": ("tab:orange", "--", "s"), "dora": ("tab:green", "-.", "D"),
                "qlora": ("tab:purple", "-", "v"), "rslora": ("tab:cyan", "-", "P")}
COLUMNS = (
    "run", "overrides", "stage", "method", "trainable_params", "trainable_percent", "peak_memory_mib", "device",
    "tokens_per_second", "wall_seconds", "train_loss_final", "train_loss_mean", "eval_loss",
    "eval_perplexity", "exact_match", "bleu", "chrf", "rougeL", "reward_accuracy", "reward_margin", "reward", "kl",
    "status", "path",
)
ANSWER_COLUMNS = ("bleu", "chrf", "rougeL")  # of the answers to held-out rows (report.generate_metrics)
# A preference or reward stage's own metrics at their last logged values (metrics.json `stage_metrics`).
STAGE_COLUMNS = {"reward_accuracy": "rewards/accuracies", "reward_margin": "rewards/margins", "reward": "reward",
                 "kl": "kl"}
ANSWERS_IN_MARKDOWN = 5  # prompts shown side by side in report.md; answers.html has them all


@dataclass
class ComparedRun:
    """One run dir as the report sees it: what it was launched with and what it wrote."""

    path: Path
    overrides: list[str]
    metrics: dict | None  # None: the job never wrote metrics.json (failed or still running)
    curve: list[dict] = field(default_factory=list)  # metrics.jsonl, one dict per logging step
    answers: list[dict] = field(default_factory=list)  # predictions.jsonl: scored answers to held-out rows
    label: str = ""

    @property
    def finished(self) -> bool:
        return self.metrics is not None

    @property
    def method(self) -> str:
        """The peft option (lora, dora, qlora, rslora, full); runs from before it was recorded give lora / full."""
        return self.metrics.get("peft", self.metrics.get("method", "?")) if self.metrics else "?"

    def row(self) -> dict:
        m = self.metrics or {}
        train_losses = [point["loss"] for point in self.curve if "loss" in point]
        peak = m.get("peak_memory_bytes")
        return {
            "run": self.label,
            "overrides": " ".join(self.overrides),
            "stage": " → ".join([step["stage"] for step in m.get("lineage", [])] + [m.get("stage", "sft")])
            if self.finished else None,
            "method": self.method,
            "trainable_params": m.get("trainable_params"),
            "trainable_percent": m.get("trainable_percent"),
            "peak_memory_mib": None if peak is None else peak / 2**20,
            "device": m.get("device"),
            "tokens_per_second": m.get("tokens_per_second"),
            "wall_seconds": m.get("wall_seconds"),
            "train_loss_final": train_losses[-1] if train_losses else m.get("train_loss"),
            "train_loss_mean": m.get("train_loss"),
            "eval_loss": m.get("eval_loss"),
            "eval_perplexity": m.get("eval_perplexity"),
            "exact_match": m.get("exact_match"),
            **{name: (m.get("answers") or {}).get(name) for name in ANSWER_COLUMNS},
            **{name: (m.get("stage_metrics") or {}).get(key) for name, key in STAGE_COLUMNS.items()},
            "status": "finished" if self.finished else "incomplete: no metrics.json",
            "path": str(self.path.absolute()),  # the report may be read from another folder (convobot serve ui)
        }


# ----------------------------------------------------------------------------- finding and loading runs


def _job_order(path: Path) -> tuple:
    number = path.name.split("_", 1)[0]
    return (int(number), path.name) if number.isdigit() else (math.inf, path.name)


def find_run_dirs(path: Path) -> list[Path]:
    """`path` itself if it is a run dir; else its job dirs (sweep), else run dirs anywhere below it."""
    path = Path(path)
    if not path.is_dir():
        raise CompareError(f"{path}: no such directory")
    if (path / rundir.METRICS).is_file():
        return [path]
    jobs = [d for d in path.iterdir() if d.is_dir() and rundir.is_run_dir(d)]
    if not jobs:
        jobs = [f.parent for f in path.rglob(rundir.METRICS)]
    if not jobs:
        raise CompareError(f"{path}: no {rundir.METRICS} in it or below it (expected a run dir or a sweep dir)")
    return sorted(jobs, key=_job_order)


def load_run(path: Path) -> ComparedRun:
    return ComparedRun(Path(path), rundir.read_overrides(path), rundir.read_metrics(path), rundir.read_metrics_log(path),
                       rundir.read_predictions(path))


def load_runs(paths) -> list[ComparedRun]:
    """Every run under `paths`, labelled by the overrides that differ between them."""
    dirs = []
    for path in paths:
        dirs += [d for d in find_run_dirs(path) if d not in dirs]
    return labelled([load_run(d) for d in dirs])


@dataclass
class Evaluation:
    """One `convobot eval` logged to a tracker: what it scored, on which rows, each model's scores and answers."""

    name: str
    evaluated: str
    report: dict
    answers: dict[str, list[dict]]

    def answering(self) -> list[ComparedRun]:
        """Each model that answered, shaped as a run for the answers side by side."""
        return [ComparedRun(Path(self.evaluated), [], None, answers=records, label=f"{self.name}: {label}")
                for label, records in self.answers.items()]


def load_mlflow(tracking_uri: str, experiment: str = "convobot",
                parent: str | None = None) -> tuple[list[ComparedRun], list[Evaluation]]:
    """The training runs and evaluations convobot logged to an MLflow store (all of `experiment`, or the child runs
    of the sweep run `parent`), from the files each one logged as artifacts: metrics.json, metrics.jsonl and
    predictions.jsonl of a run; eval_report.json and predictions-<model>.jsonl of an evaluation."""
    import json
    import tempfile

    from mlflow.tracking import MlflowClient

    from convobot.runs.tracking import EVAL_REPORT

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise CompareError(f"{tracking_uri}: no MLflow experiment named {experiment!r}")
    query = f"tags.mlflow.parentRunId = '{parent}'" if parent else ""
    runs, evaluations = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for logged in client.search_runs([found.experiment_id], query, order_by=["attributes.start_time ASC"]):
            tags = logged.data.tags
            if "convobot.run_dir" not in tags and tags.get("convobot.kind") != "eval":  # a sweep's parent run
                continue
            names = {artifact.path for artifact in client.list_artifacts(logged.info.run_id)}
            local = Path(tmp) / logged.info.run_id
            local.mkdir()
            for name in names & {rundir.METRICS, rundir.METRICS_LOG, rundir.PREDICTIONS, EVAL_REPORT} | \
                    {n for n in names if n.startswith("predictions-") and n.endswith(".jsonl")}:
                client.download_artifacts(logged.info.run_id, name, str(local))
            if tags.get("convobot.kind") == "eval":
                if (local / EVAL_REPORT).is_file():
                    evaluations.append(Evaluation(
                        logged.info.run_name, tags["convobot.evaluated"], json.loads((local / EVAL_REPORT).read_text()),
                        {path.stem.removeprefix("predictions-"): rundir.read_predictions(local, path.name)
                         for path in sorted(local.glob("predictions-*.jsonl"))}))
                continue
            metrics = json.loads((local / rundir.METRICS).read_text()) if (local / rundir.METRICS).is_file() else None
            runs.append(ComparedRun(Path(tags["convobot.run_dir"]), tags.get("overrides", "").split(), metrics,
                                    rundir.read_metrics_log(local), rundir.read_predictions(local)))
    if not runs and not evaluations:
        raise CompareError(f"{tracking_uri}: no convobot runs in experiment {experiment!r}"
                           + (f" under parent run {parent}" if parent else ""))
    return labelled(runs) if runs else [], evaluations


# Overrides that say how a run was launched, not what it trained: left out of its label.
BOOKKEEPING = ("overwrite=", "resume=", "hydra.")


def labelled(runs: list[ComparedRun]) -> list[ComparedRun]:
    """Label each run by the overrides that differ between them."""
    shared = set.intersection(*(set(r.overrides) for r in runs)) if len(runs) > 1 else set()
    for run in runs:
        distinct = [o for o in run.overrides if o not in shared and not o.startswith(BOOKKEEPING)]
        run.label = " ".join(distinct) or run.path.name
    labels = [r.label for r in runs]
    for run in runs:
        if labels.count(run.label) > 1:
            run.label = f"{run.path.name}: {run.label}" if run.label != run.path.name else str(run.path)
    return runs


# ----------------------------------------------------------------------------- table


def _cell(value, column: str) -> str:
    if value is None:
        return "-"
    formats = {
        "trainable_params": "{:,}", "trainable_percent": "{:.2f}%", "peak_memory_mib": "{:,.0f}",
        "tokens_per_second": "{:,.0f}", "wall_seconds": "{:.1f}", "eval_perplexity": "{:.3f}",
        "exact_match": "{:.1%}", **{name: "{:.1f}" for name in ANSWER_COLUMNS}, "reward_accuracy": "{:.1%}",
        "reward": "{:.3f}", "reward_margin": "{:.3f}", "kl": "{:.4f}",
    }
    if column in formats:
        return formats[column].format(value)
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def csv_text(runs: list[ComparedRun]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for run in runs:
        writer.writerow({k: ("" if v is None else v) for k, v in run.row().items()})
    return buffer.getvalue()


def markdown_table(runs: list[ComparedRun]) -> str:
    headers = {
        "run": "run", "stage": "stage", "method": "method", "trainable_params": "trainable params",
        "trainable_percent": "trainable",
        "peak_memory_mib": "peak memory (MiB)", "tokens_per_second": "tokens/s", "wall_seconds": "wall time (s)",
        "train_loss_final": "final train loss", "eval_loss": "eval loss", "eval_perplexity": "eval perplexity",
        "exact_match": "exact match", "bleu": "BLEU", "chrf": "chrF", "rougeL": "ROUGE-L",
        "reward_accuracy": "reward accuracy", "reward_margin": "reward margin", "reward": "mean reward", "kl": "KL",
        "status": "status",
    }
    rows = [run.row() for run in runs]
    if not any(r.answers for r in runs):
        headers = {k: v for k, v in headers.items() if k not in ANSWER_COLUMNS}
    # Stage columns only where some run has them; the stage column only where some run is not plain SFT.
    headers = {k: v for k, v in headers.items() if k not in STAGE_COLUMNS or any(row[k] is not None for row in rows)}
    if all(row["stage"] in ("sft", None) for row in rows):
        del headers["stage"]
    lines = ["| " + " | ".join(headers.values()) + " |",
             "|" + "|".join("---" if k in ("run", "stage", "method", "status") else "---:" for k in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[k], k).replace("|", "\\|") for k in headers) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- answers side by side


def answer_rows(runs: list[ComparedRun]) -> tuple[list[ComparedRun], list[dict]]:
    """The runs that answered held-out rows, and per prompt (in the first such run's order, kept only where every
    run answered it: a sweep's jobs share their held-out split): the prompt, the reference and each run's answer."""
    answering = [r for r in runs if r.answers]
    if not answering:
        return [], []
    by_run = [{record["prompt"]: record for record in r.answers} for r in answering]
    rows = []
    for record in answering[0].answers:
        if all(record["prompt"] in answered for answered in by_run):
            rows.append({"prompt": record["prompt"], "reference": record["reference"],
                         "answers": [answered[record["prompt"]] for answered in by_run]})
    return answering, rows


def _inline(text: str, limit: int = 160) -> str:
    """Text for one markdown table cell: one line, pipes escaped, cut at `limit` characters."""
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return text.replace("|", "\\|") or "(empty)"


def answers_markdown(runs: list[ComparedRun], rows: list[dict]) -> list[str]:
    lines = ["## Answers side by side", "",
             f"The first {min(len(rows), ANSWERS_IN_MARKDOWN)} of {len(rows)} held-out prompts, greedy; each answer "
             "with its ROUGE-L against the reference. All of them: [answers.html](answers.html).", "",
             "| prompt | reference | " + " | ".join(_inline(r.label, 60) for r in runs) + " |",
             "|---|---|" + "---|" * len(runs)]
    for row in rows[:ANSWERS_IN_MARKDOWN]:
        prompt = row["prompt"].split("### Instruction:")[-1]  # the Alpaca preamble is the same everywhere
        cells = [_inline(prompt), _inline(row["reference"])]
        cells += [f"{_inline(a['answer'])} ({a['rougeL']:.0f})" for a in row["answers"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def answers_html(title: str, runs: list[ComparedRun], rows: list[dict]) -> str:
    """Every held-out prompt with the reference and each run's answer, one row per prompt."""
    def cell(text: str, scores: dict | None = None) -> str:
        note = "" if scores is None else (f'<div class="score">BLEU {scores["bleu"]:.1f} · chrF {scores["chrf"]:.1f}'
                                          f' · ROUGE-L {scores["rougeL"]:.1f}</div>')
        return f"<td><div class=\"text\">{html.escape(text)}</div>{note}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["prompt", "reference", *(r.label for r in runs)])
    body = "\n".join("<tr>" + cell(row["prompt"]) + cell(row["reference"])
                     + "".join(cell(a["answer"], a) for a in row["answers"]) + "</tr>" for row in rows)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}: answers</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; table-layout: fixed; width: 100%; }}
th, td {{ border: 1px solid #ccc; padding: .4em; vertical-align: top; text-align: left; }}
th {{ background: #f3f3f3; position: sticky; top: 0; }}
.text {{ white-space: pre-wrap; font-size: .9em; }}
.score {{ color: #666; font-size: .8em; margin-top: .3em; }}
</style></head>
<body><h1>{html.escape(title)}: answers to {len(rows)} held-out prompts</h1>
<table><thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody></table></body></html>
"""


# ----------------------------------------------------------------------------- plots


def _style(run: ComparedRun) -> tuple[str, str, str]:
    return METHOD_STYLE.get(run.method, ("tab:gray", ":", "^"))


def plot_loss_curves(runs: list[ComparedRun]) -> Figure:
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, color in zip(runs, colors):
        _, line, marker = _style(run)
        if len(runs) <= 2:  # LoRA vs full: the method's own colour
            color = _style(run)[0]
        steps = [p["step"] for p in run.curve if "loss" in p]
        ax.plot(steps, [p["loss"] for p in run.curve if "loss" in p], line, color=color, label=f"{run.label} (train)")
        evals = [(p["step"], p["eval_loss"]) for p in run.curve if "eval_loss" in p]
        if evals:
            ax.plot(*zip(*evals), marker, color=color, label=f"{run.label} (eval)")
        if run.metrics.get("eval_loss") is not None and steps:
            ax.plot([run.metrics.get("steps", steps[-1])], [run.metrics["eval_loss"]], "*", color=color,
                    markersize=12, markeredgecolor="black", label=f"{run.label} (final held-out)")
    ax.set_title("Training loss: LoRA (solid) vs full fine-tune (dashed)")
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


# Each stage's own curve: what its trainer optimises beside the loss.
STAGE_CURVES = {"rewards/margins": "reward margin (DPO, ORPO, KTO)", "reward": "mean reward (GRPO)",
                "kl": "KL to the reference (KTO, GRPO)"}


def plot_stage_curves(runs: list[ComparedRun]) -> Figure:
    """Reward margins, mean rewards and KL per logging step, one panel each, for the runs that log them."""
    shown = [key for key in STAGE_CURVES if any(key in point for run in runs for point in run.curve)]
    fig = Figure(figsize=(8, 3.2 * len(shown)), layout="constrained")
    for ax, key in zip(fig.subplots(len(shown), 1, squeeze=False)[:, 0], shown):
        for index, run in enumerate(runs):
            points = [(point["step"], point[key]) for point in run.curve if key in point]
            if points:
                ax.plot(*zip(*points), "-o", markersize=3, color=f"C{index % 10}", label=run.label)
        ax.set_ylabel(STAGE_CURVES[key])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Preference and reward stages: their own metrics per logging step")
    fig.supxlabel("optimizer step")
    return fig


def _vs_params(runs: list[ComparedRun], value, title: str, ylabel: str) -> Figure:
    """A scatter of value(run) against trainable parameters (log scale), one colour and marker per method."""
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    for method in sorted({r.method for r in runs}):
        group = [r for r in runs if r.method == method]
        color, _, marker = _style(group[0])
        ax.scatter([r.metrics["trainable_params"] for r in group], [value(r) for r in group],
                   color=color, marker=marker, s=60, label=method)
        for r in group:
            params = r.metrics["trainable_params"]
            ax.annotate(f"{r.label} ({EngFormatter(places=1, sep='')(params)})", (params, value(r)),
                        textcoords="offset points", xytext=(6, 4), fontsize="small")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.25, y=0.1)  # room for the labels
    ax.set_title(title)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="method")
    return fig


def plot_perplexity_vs_params(runs: list[ComparedRun]) -> Figure:
    return _vs_params(runs, lambda r: r.metrics["eval_perplexity"], "Held-out perplexity vs trainable parameters",
                      "eval perplexity (lower is better)")


def plot_answers_vs_params(runs: list[ComparedRun]) -> Figure:
    return _vs_params(runs, lambda r: r.metrics["answers"]["rougeL"], "Answers' ROUGE-L vs trainable parameters",
                      "ROUGE-L F1 of held-out answers (higher is better)")


def _bars(runs: list[ComparedRun], values: list[float], title: str, xlabel: str, fmt: str) -> Figure:
    fig = Figure(figsize=(8, max(3.0, 1.2 + 0.5 * len(runs))), layout="constrained")
    ax = fig.subplots()
    positions = range(len(runs))
    bars = ax.barh(positions, values, color=[_style(r)[0] for r in runs])
    ax.bar_label(bars, labels=[fmt.format(v) for v in values], padding=3, fontsize="small")
    ax.set_yticks(list(positions), [r.label for r in runs])
    ax.invert_yaxis()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.margins(x=0.15)
    ax.grid(alpha=0.3, axis="x")
    handles = {r.method: bar for r, bar in zip(runs, bars)}
    ax.legend(handles.values(), handles.keys(), title="method", fontsize="small", loc="upper left",
              bbox_to_anchor=(1.01, 1))
    return fig


def plot_peak_memory(runs: list[ComparedRun]) -> Figure:
    devices = {r.metrics.get("device") for r in runs}
    measure = {"cuda": "CUDA max allocated", "cpu": "process peak RSS"}
    what = " / ".join(measure.get(d, str(d)) for d in sorted(devices, key=str))
    return _bars(runs, [r.metrics["peak_memory_bytes"] / 2**20 for r in runs], "Peak memory per run",
                 f"peak memory (MiB; {what})", "{:,.0f} MiB")


def plot_throughput(runs: list[ComparedRun]) -> Figure:
    return _bars(runs, [r.metrics["tokens_per_second"] for r in runs], "Training throughput",
                 "trained tokens per second (non-padding)", "{:,.0f}")


def write_plots(runs: list[ComparedRun], folder: Path) -> list[Path]:
    """The PNGs into `folder` (replaced as a whole, atomically); only finished runs are drawn."""
    finished = [r for r in runs if r.finished]
    if not finished:
        return []
    figures = {
        "loss_curves": plot_loss_curves(finished),
        "perplexity_vs_params": plot_perplexity_vs_params(finished),
        "peak_memory": plot_peak_memory(finished),
    }
    counted = [r for r in finished if r.metrics.get("tokens_per_second") is not None]  # ORPO counts no tokens
    if counted:
        figures["throughput"] = plot_throughput(counted)
    staged = [r for r in finished if any(key in point for key in STAGE_CURVES for point in r.curve)]
    if staged:
        figures["stage_curves"] = plot_stage_curves(staged)
    answered = [r for r in finished if r.metrics.get("answers")]
    if answered:
        figures["answers_vs_params"] = plot_answers_vs_params(answered)
    with atomic.directory(folder, overwrite=True) as tmp:
        for name, fig in figures.items():
            fig.savefig(tmp / f"{name}.png", dpi=120)
    return [folder / f"{name}.png" for name in figures]


# ----------------------------------------------------------------------------- the report


def evaluations_markdown(evaluations: list[Evaluation]) -> list[str]:
    """Each evaluation's models with their perplexities and answer scores; harness results below them."""
    lines = ["## Evaluations", "", "Logged by `convobot eval`: perplexity of the held-out rows and, where the models "
             "answered them, the answers' scores (0-100).", "",
             "| evaluation | data | model | perplexity | response perplexity | BLEU | chrF | ROUGE-L | exact match |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    harness = []
    for evaluation in evaluations:
        for label, scores in evaluation.report["models"].items():
            answers = scores.get("generation", {})
            cells = [f"{scores[kind]['perplexity']:.3f}" for kind in ("full", "response")]
            cells += [f"{answers[name]:.1f}" if name in answers else "-" for name in (*ANSWER_COLUMNS, "exact_match")]
            lines.append(f"| {_inline(evaluation.name, 60)} | {_inline(evaluation.report['data'], 60)} | {label} | "
                         + " | ".join(cells) + " |")
        for task, values in evaluation.report.get("harness", {}).get("results", {}).items():
            harness += [f"| {_inline(evaluation.name, 60)} | {task} | {key} | {value:.4f} |"
                        for key, value in values.items()
                        if isinstance(value, (int, float)) and "_stderr" not in key and key != "sample_len"]
    if harness:
        lines += ["", "lm-evaluation-harness:", "", "| evaluation | task | metric | value |", "|---|---|---|---:|",
                  *harness]
    return lines + [""]


def write_report(runs: list[ComparedRun], out_dir: Path, markdown_name: str, title: str,
                 evaluations: list[Evaluation] = ()) -> Path:
    """<out_dir>/<markdown_name>, summary.csv, plots/*.png and, where runs or evaluated models answered held-out
    prompts, answers.html. Returns the markdown path."""
    out_dir = Path(out_dir)
    plots = write_plots(runs, out_dir / "plots")
    finished = [r for r in runs if r.finished]
    lines = [f"# {title}", ""]
    if runs:
        lines += [f"{len(finished)} of {len(runs)} runs finished. "
                  "Peak memory is CUDA max allocated on GPU, the process's peak RSS on CPU.", "",
                  markdown_table(runs), ""]
    if any(r.metrics.get("device") == "cpu" for r in finished):
        lines += ["A process's peak RSS never goes down: jobs run one after another in one process (a multirun "
                  "with the basic launcher) report at least the peaks of the jobs before them.", ""]
    if finished:
        best = min(finished, key=lambda r: r.metrics.get("eval_loss", math.inf))
        lines += [f"Lowest eval loss: **{best.label}** ({best.metrics['eval_loss']:.4f}, "
                  f"perplexity {best.metrics['eval_perplexity']:.3f}).", ""]
    captions = {
        "loss_curves": "Training loss per logging step; stars: final held-out loss.",
        "perplexity_vs_params": "Held-out perplexity against trainable parameters.",
        "peak_memory": "Peak memory per run.",
        "throughput": "Trained (non-padding) tokens per second.",
        "answers_vs_params": "ROUGE-L of the answers to held-out prompts against trainable parameters.",
        "stage_curves": "Preference and reward stages: reward margin, mean reward and KL per logging step.",
    }
    for plot in plots:
        lines += [f"![{captions[plot.stem]}](plots/{plot.name})", ""]
    if evaluations:
        lines += evaluations_markdown(evaluations)
    answering, rows = answer_rows(finished + [model for e in evaluations for model in e.answering()])
    if rows:
        lines += answers_markdown(answering, rows)
        atomic.write_text(out_dir / "answers.html", answers_html(title, answering, rows))
    atomic.write_text(out_dir / "summary.csv", csv_text(runs))
    atomic.write_text(out_dir / markdown_name, "\n".join(lines))
    return out_dir / markdown_name


def compare(paths, out_dir: Path, title: str = "convobot run comparison", overwrite: bool = False) -> Path:
    """Report over the runs under `paths` into a fresh `out_dir`; returns report.md."""
    return report_on(load_runs(paths), ", ".join(map(str, paths)), out_dir, title, overwrite)


def report_on(runs: list[ComparedRun], origin: str, out_dir: Path, title: str, overwrite: bool,
              evaluations: list[Evaluation] = ()) -> Path:
    """Report over loaded runs and evaluations (from `origin`: their dirs or a tracking store) into a fresh
    `out_dir`."""
    if not evaluations and not any(r.finished for r in runs):
        raise CompareError(f"none of the {len(runs)} runs under {origin} finished")
    with atomic.directory(out_dir, overwrite=overwrite) as tmp:
        write_report(runs, tmp, "report.md", title, evaluations)
    return Path(out_dir) / "report.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="convobot-compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("paths", nargs="*", type=Path, help="run dirs or sweep dirs")
    parser.add_argument("--mlflow", metavar="URI", help="read the runs from this MLflow store instead "
                        "(e.g. sqlite:///outputs/mlflow.db)")
    parser.add_argument("--experiment", default="convobot", help="with --mlflow: the experiment")
    parser.add_argument("--parent", metavar="RUN_ID", help="with --mlflow: only this sweep run's jobs")
    parser.add_argument("--out", type=Path, default=None,
                        help="report folder (default: outputs/compare/<date>_<time>)")
    parser.add_argument("--title", default="convobot run comparison")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args(argv)
    out = args.out or Path("outputs/compare") / time.strftime("%Y-%m-%d_%H-%M-%S")
    if bool(args.paths) == bool(args.mlflow):
        parser.error("give run dirs / sweep dirs, or --mlflow URI")
    with one_line_errors("convobot-compare"):
        if args.mlflow:
            runs, evaluations = load_mlflow(args.mlflow, args.experiment, args.parent)
            report = report_on(runs, args.mlflow, out, args.title, args.overwrite, evaluations)
        else:
            report = compare(args.paths, out, args.title, args.overwrite)
    print(report.read_text())
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

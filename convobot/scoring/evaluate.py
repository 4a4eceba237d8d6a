"""Perplexity on held-out instructions: full-sequence, response-only and strided sliding-window.

Examples:
    convobot eval model=release/convobot-gpt2-alpaca data=alpaca_gpt4          # the data's held-out split
    convobot eval run_dir=outputs/demo                                         # the run's held-out rows
    convobot eval run_dir=outputs/demo compare=[base,adapter,merged]           # side by side
    convobot eval run_dir=outputs/demo model=outputs/demo/release compare=[base,merged]   # merged = the bundle
    convobot eval model=outputs/demo/release data=local data.path=rows.jsonl rows=all sliding.stride=64
    convobot eval run_dir=outputs/demo compare=[base,adapter] generate=true output=eval/report.json
    convobot eval run_dir=outputs/demo compare=[base,adapter] generate=true logger=mlflow     # + a tracker run

Perplexity is exp(sum of token NLL / number of scored tokens), so it does not depend on batching
(convobot/scoring.py). What is scored is named by position, never by pad id: GPT-2's pad is its EOS, and
each answer's final EOS is scored. `data=` picks a conf/data config as convobot train does (a file:
`data=local data.path=rows.jsonl`); its seeded held-out split, the rows training held out, is scored, or
every row with `rows=all`. Without it, the run's heldout.jsonl is used (a bundle remembers its run in
merge_report.json).

With `generate=true` each model also answers the rows (greedy, `max_new_tokens`, prompts cut from the left to fit
the context) and the answers are scored against the references (answer_scores.py: BLEU, chrF, ROUGE, exact match);
each model's answers go to <predictions_dir or output's folder>/predictions-<model>.jsonl.

With `logger=mlflow|tensorboard|wandb` the evaluation is a tracker run of its own (runs/tracking.py): the scores as
metrics, the report and the answers as files, read back by `convobot compare --mlflow`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
from datasets import Dataset
from rich.console import Console
from rich.table import Table

from convobot import atomic
from convobot.cli import run_command
from convobot.config import COMMANDS_CONF_DIR, Device, EvalConfig, EvalRows, PeftMethod, flatten, to_container
from convobot.data.examples import to_examples
from convobot.data.load import load_rows, split_rows
from convobot.errors import ConfigError, ModelPathError, VerificationError
from convobot.model.base import context_length, fit_context, resolve_device
from convobot.model.tokenizer import load_tokenizer
from convobot.runs import bundle, tracking
from convobot.runs.loading import load_base, load_model, load_trained, run_behind
from convobot.runs.rundir import HELDOUT, RunDir, open_run
from convobot.scoring import perplexity
from convobot.scoring.answer_scores import METRICS, answered_and_scored, require_eval_extra
from convobot.scoring.harness import require_harness_extra, run_harness

MODELS = ("base", "adapter", "merged")


@dataclass
class HeldOut:
    pairs: Dataset
    max_length: Optional[int]
    source: str


def find_run(cfg: EvalConfig) -> RunDir | None:
    """The run behind the evaluation: run_dir, or `model` if it is a run dir / adapter / bundle of one."""
    if cfg.run_dir:
        return open_run(cfg.run_dir)
    if not cfg.model:
        raise ModelPathError("nothing to evaluate: pass model=<bundle or run dir> or run_dir=<run dir>")
    return run_behind(cfg.model)


def held_out(cfg: EvalConfig, run: RunDir | None) -> HeldOut:
    """The examples to score (prompt/completion pairs or conversations), the row length to score them at, and
    their origin."""
    if cfg.data is not None:
        rows, _ = load_rows(cfg.data)
        origin = cfg.data.path or cfg.data.name
        if cfg.rows == EvalRows.heldout:
            _, rows = split_rows(rows, cfg.data)
            origin += f" (held-out split, seed {cfg.data.split_seed})"
        else:
            origin += " (all rows)"
        found = HeldOut(to_examples(rows), cfg.data.max_length, origin)
    elif run is not None:
        found = HeldOut(run.heldout_pairs(), run.config.data.max_length, str(run.path / HELDOUT))
    else:
        raise ModelPathError(f"no held-out data for {cfg.model}: pass data=<conf/data name> (data=local "
                             "data.path=<file> for a file) or run_dir=<run>")
    if cfg.max_rows is not None:
        found.pairs = found.pairs.select(range(min(cfg.max_rows, len(found.pairs))))
    found.max_length = cfg.max_length or found.max_length
    return found


def score(model, tokenizer, heldout: HeldOut, cfg: EvalConfig) -> dict:
    """Full-sequence and response-only perplexity of the rows (one pass), and sliding-window perplexity of
    all rows as one stream (longer than the context, so windows overlap by window - stride)."""
    context = context_length(model.config)
    max_length = fit_context(heldout.max_length, context, "max_length" if cfg.max_length else "data.max_length")
    result = perplexity.perplexities(model, heldout.pairs, tokenizer, max_length, cfg.batch_tokens)
    if cfg.sliding.enabled:
        window = min(cfg.sliding.window or context, context)
        stride = window // 2 if cfg.sliding.stride is None else cfg.sliding.stride
        if not 0 < stride < window:
            raise ConfigError(f"config key 'sliding.stride' must be in [1, {window - 1}] (window {window}), got {stride}")
        stream = perplexity.token_stream(heldout.pairs, tokenizer)
        result["sliding"] = perplexity.sliding_window_perplexity(model, stream, window, stride, tokenizer.pad_token_id,
                                                              cfg.batch_tokens)
    return result | {"max_length": max_length}


def predictions_dir(cfg: EvalConfig) -> Path | None:
    if cfg.predictions_dir:
        return Path(cfg.predictions_dir)
    return Path(cfg.output).parent if cfg.output else None


def tracker_dir(cfg: EvalConfig) -> Path:
    """Where a tracker writes locally (TensorBoard events, W&B's offline run): beside the answers, else a folder
    of its own in outputs/eval/."""
    return predictions_dir(cfg) or Path("outputs/eval") / time.strftime("%Y-%m-%d_%H-%M-%S")


def models_to_score(cfg: EvalConfig, run: RunDir | None):
    """(label, loader) pairs; each model is loaded only when its turn comes, to hold one at a time."""
    if not cfg.compare:
        path = cfg.model or cfg.run_dir
        return [(Path(path).name or path, lambda: load_model(path, cfg.verify_checksums))]
    unknown = sorted(set(cfg.compare) - set(MODELS))
    if unknown:
        raise ConfigError(f"config key 'compare': unknown model(s) {unknown}; choose from {list(MODELS)}")
    if run is None:
        raise ModelPathError("compare needs a run: pass run_dir=<run dir> (base and adapter come from it)")
    tokenizer = load_tokenizer(str(run.weights_dir))

    def merged():
        if cfg.model:
            return load_model(cfg.model, cfg.verify_checksums)
        trained = load_trained(run)
        return (trained.merge_and_unload() if run.method == PeftMethod.lora else trained), tokenizer

    loaders = {"base": lambda: (load_base(run), tokenizer), "adapter": lambda: (load_trained(run), tokenizer),
               "merged": merged}
    return [(name, loaders[name]) for name in MODELS if name in cfg.compare]


def evaluate(cfg: EvalConfig, console: Console | None = None) -> dict:
    """Score one model, or several side by side; prints a table and returns the report."""
    console = console or Console()
    if cfg.generate:
        require_eval_extra()  # before any model is loaded
    if cfg.harness.tasks:
        require_harness_extra()
    run = find_run(cfg)
    heldout = held_out(cfg, run)
    evaluated = cfg.model or cfg.run_dir
    # Reached before any model is loaded: an unusable tracker fails now.
    tracker = tracking.open_tracking(cfg.logger, tracker_dir(cfg), run_name=f"eval {Path(evaluated).name}")
    report = {"data": heldout.source, "rows": len(heldout.pairs), "models": {}}
    folder = predictions_dir(cfg) if cfg.generate else None
    predictions = {}
    for label, load in models_to_score(cfg, run):
        model, tokenizer = load()
        report["models"][label] = score(model, tokenizer, heldout, cfg)
        if cfg.generate:
            report["models"][label]["generation"], predictions[label] = answered_and_scored(
                model, tokenizer, heldout.pairs.to_list(), cfg.max_new_tokens, cfg.generate_batch_size)
            if folder is not None:
                atomic.write_jsonl(folder / f"predictions-{label}.jsonl", predictions[label])
        del model
    if {"adapter", "merged"} <= report["models"].keys():
        report["adapter_vs_merged"] = check_same_perplexity(report["models"]["adapter"], report["models"]["merged"],
                                                            cfg.tolerance)
    if cfg.harness.tasks:
        report["harness"] = harness_scores(cfg, run)
    print_table(report, console)
    if cfg.generate:
        print_answer_scores(report, folder, console)
    if cfg.harness.tasks:
        print_harness(report["harness"], console)
    if cfg.output:
        atomic.write_json(Path(cfg.output), report)
    tracking.log_evaluation(tracker, flatten(to_container(cfg)), evaluated, report, predictions)
    return report


def check_same_perplexity(adapter: dict, merged: dict, tolerance: float) -> dict:
    """Merging must not change what the model predicts: equal perplexities, to `tolerance` (relative)."""
    differences = {kind: abs(merged[kind]["perplexity"] / adapter[kind]["perplexity"] - 1)
                   for kind in ("full", "response", "sliding") if kind in adapter}
    worst = max(differences, key=differences.get)
    if not differences[worst] <= tolerance:
        raise VerificationError(f"adapter and merged {worst} perplexity differ by {differences[worst]:.3g} "
                                     f"(relative) > tolerance {tolerance:g}")
    return {"max_relative_difference": differences[worst], "tolerance": tolerance}


def print_table(report: dict, console: Console) -> None:
    table = Table(title=f"convobot eval · {report['data']} · {report['rows']} rows",
                  caption="perplexity; sliding: all rows as one stream, window/stride tokens")
    for column in ("model", "full", "response", "sliding", "window/stride", "tokens full/response"):
        table.add_column(column, justify="left" if column == "model" else "right", overflow="fold")
    for label, result in report["models"].items():
        sliding = result.get("sliding")
        table.add_row(label, f"{result['full']['perplexity']:.3f}", f"{result['response']['perplexity']:.3f}",
                      f"{sliding['perplexity']:.3f}" if sliding else "-",
                      f"{sliding['window']}/{sliding['stride']}" if sliding else "-",
                      f"{result['full']['tokens']:,}/{result['response']['tokens']:,}")
    console.print(table)
    if "adapter_vs_merged" in report:
        console.print(f"adapter vs merged: perplexities agree to {report['adapter_vs_merged']['max_relative_difference']:.1e}"
                      f" (relative; tolerance {report['adapter_vs_merged']['tolerance']:g})")


def harness_scores(cfg: EvalConfig, run: RunDir | None) -> dict:
    """lm-evaluation-harness's results for `harness.tasks` on the bundle `model`, checked against its checksums."""
    if not cfg.model or not bundle.is_model_folder(Path(cfg.model)):
        raise ConfigError("config key 'harness.tasks': lm-evaluation-harness runs on a merged bundle: pass "
                          f"model=<bundle> (got {cfg.model or cfg.run_dir}; convobot merge makes one)")
    bundle.verify(Path(cfg.model), cfg.verify_checksums)
    output = run_harness(cfg.model, cfg.harness, resolve_device(Device.auto, key="device").type)
    return {"tasks": list(cfg.harness.tasks), "limit": cfg.harness.limit, "results": output["results"],
            "versions": output.get("versions", {}),
            "samples": {task: [{"doc": s["doc"], "target": s["target"], "response": s["filtered_resps"]}
                               for s in samples] for task, samples in output.get("samples", {}).items()}}


def print_harness(harness: dict, console: Console) -> None:
    table = Table(title="lm-evaluation-harness", caption=f"limit {harness['limit'] or 'none'} documents per task")
    for column in ("task", "metric", "value", "stderr"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for task, metrics in harness["results"].items():
        for key, value in metrics.items():
            name, _, kind = key.partition(",")
            if name.endswith("_stderr") or not isinstance(value, (int, float)) or name == "sample_len":
                continue
            stderr = metrics.get(f"{name}_stderr,{kind}")
            table.add_row(task, key, f"{value:.4f}", f"{stderr:.4f}" if isinstance(stderr, (int, float)) else "-")
    console.print(table)


def print_answer_scores(report: dict, folder: Path | None, console: Console) -> None:
    table = Table(title="answers scored against the references", caption="0-100; BLEU and chrF over all rows, "
                  "ROUGE F1 and exact match averaged over the rows")
    for column in ("model", *METRICS, "cut", "s/row"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for label, result in report["models"].items():
        scores = result["generation"]
        table.add_row(label, *(f"{scores[name]:.1f}" for name in METRICS), str(scores["prompts_cut"]),
                      f"{scores['seconds'] / max(scores['rows'], 1):.2f}")
    console.print(table)
    if folder is not None:
        console.print(f"answers: {folder}/predictions-<model>.jsonl")
    else:
        console.print("answers not written: pass predictions_dir=DIR or output=FILE to keep them")


@hydra.main(config_path=str(COMMANDS_CONF_DIR), config_name="eval", version_base="1.3")
def main(raw) -> None:
    """Hydra entry point: `convobot eval model=... | run_dir=... [data=...] [compare=[base,adapter,merged]]`."""
    run_command("convobot-eval", EvalConfig, evaluate, raw)


if __name__ == "__main__":
    main()

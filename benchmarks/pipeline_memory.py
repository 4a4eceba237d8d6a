"""Wall time and peak memory of each stage of the pipeline at GPT-2 small shape, optionally side by side with a
git revision: train (4 packed LoRA steps and the held-out scoring), merge, eval (the run's 50 held-out rows, all
three perplexities), ONNX export, one chat answer, GGUF export (f32, f16 and q8_0, each checked with llama.cpp).

Examples:
    python benchmarks/pipeline_memory.py                        # this checkout (~2.5 min on 2 CPU cores)
    python benchmarks/pipeline_memory.py --baseline e6d6749     # and a revision, stage by stage (~10 min)
    python benchmarks/pipeline_memory.py --stages train,merge --no-save

Each stage is its own process, `python -m convobot.<command>`, under /usr/bin/time -v: the peak is that process's
maximum resident set. The model is GPT-2 small's architecture (GPT2Config(), random init) saved with
save_pretrained beside the real GPT-2 tokenizer from ../shared/data/gpt2-tokenizer and loaded through the hub code
path (model.name=DIR), as the Hub model would be; the rows are the real alpaca-gpt4 rows in
../shared/data/alpaca_gpt4. A baseline revision is checked out into a temporary git worktree and run with
PYTHONPATH pointing at it on the same model and rows, each of its stages right after this checkout's, so both see
the same machine. Every command is spelt the same for both (eval scores the run's held-out rows).
Writes benchmarks/results/pipeline_memory_<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from harness import REPO, RESULTS_DIR, ROWS_FILE, TOKENIZER_DIR, machine, save_report

MiB = 2**20
STAGES = ("train", "merge", "eval", "export", "chat", "gguf")
# Targets on 2 CPU cores: (wall seconds, peak GiB); None: no target.
TARGETS = {"train": (None, 4.0), "merge": (40, 2.5), "eval": (30, 2.0), "export": (None, None), "chat": (None, None),
           "gguf": (None, None)}
HELD_OUT = 50


def commands(work: Path, model: Path, rows: Path, tag: str) -> dict[str, list[str]]:
    run, release = work / f"run_{tag}", work / f"release_{tag}"
    return {
        "train": ["convobot.training.recipe", "experiment=lora_4gb", "hardware=cpu", f"model.name={model}",
                  f"model.tokenizer={model}", "data=local", f"data.path={rows}", "train.max_steps=4",
                  "hardware.batch_size=2", f"data.eval_size={HELD_OUT}", f"hydra.run.dir={run}"],
        "merge": ["convobot.release.merge", f"run_dir={run}", f"output_dir={release}"],
        "eval": ["convobot.scoring.evaluate", f"model={release}"],
        "export": ["convobot.release.onnx_export", f"model={release}"],
        "chat": ["convobot.serving.chat", f"model={release}", "prompt=Give three tips for staying healthy.",
                 "generation.temperature=0", "generation.max_new_tokens=32"],
        "gguf": ["convobot.release.gguf", f"model={release}", "types=[f32,f16,q8_0]"],
    }


def measure(module_and_args: list[str], source: Path | None, cwd: Path) -> dict:
    """One stage in its own process: wall seconds and peak RSS from /usr/bin/time -v."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    if source is not None:  # the baseline's package, ahead of this checkout's editable install
        env["PYTHONPATH"] = str(source)
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", *module_and_args], cwd=cwd, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(module_and_args[:1])} failed ({source or 'this checkout'}):\n"
                           f"{done.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", done.stderr)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    hours, minutes, seconds = (float(g or 0) for g in wall.groups())
    return {"seconds": hours * 3600 + minutes * 60 + seconds, "peak_mib": int(peak.group(1)) * 1024 / MiB}


def save_gpt2_small(folder: Path) -> None:
    """GPT-2 small's architecture, random init, beside the real tokenizer: what model.name=<folder> loads."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    GPT2TokenizerFast.from_pretrained(str(TOKENIZER_DIR)).save_pretrained(folder)


def all_rows(folder: Path) -> Path:
    """The train and eval samples as one file (985 rows): the held-out split is taken from it."""
    path = folder / "rows.jsonl"
    path.write_text("".join(p.read_text() for p in sorted(ROWS_FILE.parent.glob("*.jsonl"))))
    return path


def render(summary: dict) -> str:
    info = summary["machine"]
    lines = [f"# Pipeline at GPT-2 small shape: wall time and peak RSS per stage ({summary['date']})", "",
             f"- machine: {info['cpu']} ({info['cpu_cores']} cores; vector ISA: {', '.join(info['isa']) or '?'}), "
             f"{info['memory_gib']} GiB RAM; torch {info['versions']['torch']}",
             f"- this checkout: {summary['revision']}"
             + (f"; baseline: {summary['baseline']}" if summary["baseline"] else ""),
             "- each stage its own process under /usr/bin/time -v; GPT-2 small (random init, real tokenizer) "
             f"through the hub code path; {summary['rows']} real alpaca-gpt4 rows, {HELD_OUT} held out", ""]
    baseline = bool(summary["baseline"])
    header = "| stage | wall s | peak MiB |" + (" baseline wall s | baseline peak MiB | faster | less memory |"
                                                 if baseline else "") + " target |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for stage, row in summary["stages"].items():
        seconds, peak = TARGETS[stage]
        target = " / ".join(t for t in (f"<= {seconds} s" if seconds else "", f"<= {peak} GiB" if peak else "") if t)
        cells = [stage, f"{row['seconds']:.1f}", f"{row['peak_mib']:,.0f}"]
        if baseline and "baseline" not in row:
            cells += ["-"] * 4
        elif baseline:
            old = row["baseline"]
            cells += [f"{old['seconds']:.1f}", f"{old['peak_mib']:,.0f}", f"**{old['seconds'] / row['seconds']:.2f}x**",
                      f"**{old['peak_mib'] / row['peak_mib']:.2f}x**"]
        lines.append("| " + " | ".join(cells + [target or "-"]) + " |")
    checks = summary["stages"].get("gguf", {}).get("checks")
    if checks:
        lines += ["", "| GGUF | MiB | max abs logit diff vs PyTorch | tolerance | greedy rows (near-ties) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {kind} | {c['bytes'] / MiB:,.0f} | {c['max_abs_logit_diff']:.2e} | {c['tolerance']:g} | "
                  f"{c['greedy_rows']} ({c['greedy_near_ties']}) |" for kind, c in checks.items()]
    if summary["note"]:
        lines += ["", f"Note: {summary['note']}"]
    return "\n".join(lines) + "\n"


def revision(source: Path) -> str:
    return subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "?"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="a git revision to measure side by side (checked out into a worktree)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, in order, from {STAGES}")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=None, help="results stem (default: benchmarks/results/...)")
    parser.add_argument("--no-save", dest="save", action="store_false")
    args = parser.parse_args(argv)
    args.stages = args.stages.split(",")
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown {unknown}; choose from {STAGES}")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    absent = [str(p) for p in (ROWS_FILE, TOKENIZER_DIR) if not p.exists()]
    if absent or not Path("/usr/bin/time").exists():
        print(f"skipped: {', '.join(absent) or '/usr/bin/time'} absent")
        return None
    started = datetime.now()
    with tempfile.TemporaryDirectory(prefix="convobot-pipeline-") as tmp:
        work = Path(tmp)
        save_gpt2_small(work / "gpt2-small")
        rows = all_rows(work)
        baseline = None
        if args.baseline:
            baseline = work / "baseline"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(baseline), args.baseline],
                           check=True, capture_output=True)
        try:
            versions = {"current": (None, commands(work, work / "gpt2-small", rows, "current"))}
            if baseline is not None:
                versions["baseline"] = (baseline, commands(work, work / "gpt2-small", rows, "baseline"))
            stages = {}
            for stage in args.stages:
                for tag, (source, stage_commands) in versions.items():
                    if source is not None and not (source / stage_commands[stage][0].replace(".", "/")).with_suffix(
                            ".py").is_file():
                        print(f"{stage} ({tag}): not in {args.baseline}", flush=True)
                        continue
                    result = measure(stage_commands[stage], source, work)
                    print(f"{stage} ({tag}): {result['seconds']:.1f} s, {result['peak_mib']:,.0f} MiB", flush=True)
                    if stage == "gguf":  # what llama.cpp's check measured, per file, from the bundle's report
                        report = json.loads((work / f"release_{tag}" / "merge_report.json").read_text())
                        result["checks"] = report["gguf"]["types"]
                    if tag == "current":
                        stages[stage] = result
                    else:
                        stages[stage]["baseline"] = result
        finally:
            if baseline is not None:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)],
                               capture_output=True)
                shutil.rmtree(baseline, ignore_errors=True)
        row_count = sum(1 for line in rows.read_text().splitlines() if line.strip())
    summary = {"benchmark": "pipeline_memory", "date": started.isoformat(timespec="seconds"),
               "revision": revision(REPO), "baseline": args.baseline, "machine": machine("cpu"), "rows": row_count,
               "stages": stages, "targets": TARGETS, "note": args.note}
    text = render(summary)
    print(text)
    if args.save:
        save_report(args.out or RESULTS_DIR / f"pipeline_memory_{started:%Y-%m-%d}", text, summary)
    return summary


if __name__ == "__main__":
    main()

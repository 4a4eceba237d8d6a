"""Preference and reward stages on top of SFT, offline: held-out exact match of an SFT run that leaves room, of
that run continued by more SFT (the control), by DPO (plain, and with an SFT term), and by GRPO rewarded by exact
match, all on the embedded default (tiny GPT-2, the bundled tasks), on the same held-out rows.

    python benchmarks/preference_stages.py            # ~4 min on 2 CPU cores
    python benchmarks/preference_stages.py --smoke    # a few steps each (tests)

Each stage starts from the same SFT run (init_from) and trains the same number of steps. The SFT run stops early
(--sft-steps, a fifth of the embedded default's three epochs) so its answers leave room. The bundled preference
pairs reject the wrong answers that SFT run gives (run-ons such as "bird lamp bird" for "bird lamp", counts off
by one). Writes benchmarks/results/preference_stages_<device>_<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import RESULTS_DIR, machine, save_report  # noqa: E402

QUIET = ["report.before=false", "report.samples=0"]
# What each stage on top of the SFT run trains with: (label, overrides).
STAGES = [
    ("SFT continued (control)", ["optim.lr=2e-4"]),
    ("DPO", ["stage=dpo", "data=bundled_preferences", "optim.lr=2e-4"]),
    ("DPO + SFT term (RPO)", ["stage=dpo", "data=bundled_preferences", "optim.lr=2e-4", "stage.sft_weight=1"]),
    ("GRPO, exact-match reward", ["stage=grpo", "optim.lr=1e-3", "stage.temperature=0.7", "stage.num_generations=8"]),
]
SHOWN = {"rewards/accuracies": "reward accuracy {:.0%}", "rewards/margins": "margin {:.2f}",
         "reward": "mean reward {:.3f}", "kl": "KL {:.3f}"}


def train(overrides: list[str], run_dir: Path) -> dict:
    from convobot.config import compose, validate
    from convobot.training.recipe import run

    return run(validate(compose(QUIET + overrides)), run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=200, help="steps of each stage on top of the SFT run")
    parser.add_argument("--smoke", action="store_true", help="a few steps of each, fewer rows (tests)")
    parser.add_argument("--out", type=Path, default=None, help="results stem (default: benchmarks/results/...)")
    args = parser.parse_args(argv)
    from convobot.cli import quiet_libraries

    quiet_libraries()
    sizes = ["data.num_rows=200", "data.eval_size=16", "report.exact_match_rows=16"] if args.smoke else []
    sft_steps, steps = (4, 2) if args.smoke else (args.sft_steps, args.steps)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sft = Path(tmp) / "sft"
        started = time.perf_counter()
        results = train([f"train.max_steps={sft_steps}", *sizes], sft)
        rows.append({"stage": f"SFT, {sft_steps} steps", "seconds": time.perf_counter() - started, **pick(results)})
        for label, overrides in STAGES:
            started = time.perf_counter()
            results = train([*overrides, f"init_from={sft}", f"train.max_steps={steps}", *sizes], Path(tmp) / label)
            rows.append({"stage": f"+ {label}, {steps} steps", "overrides": " ".join(overrides),
                         "seconds": time.perf_counter() - started, **pick(results)})
    info = machine("cpu")
    text = report(rows, info, sft_steps, steps)
    print(text)
    stem = args.out or RESULTS_DIR / f"preference_stages_cpu_{time.strftime('%Y-%m-%d')}"
    save_report(stem, text, {"machine": info, "sft_steps": sft_steps, "steps": steps, "runs": rows})
    return 0


def pick(results: dict) -> dict:
    return {"exact_match": results["exact_match"], "eval_loss": results["eval_loss"],
            "stage_metrics": results.get("stage_metrics", {})}


def report(rows: list[dict], info: dict, sft_steps: int, steps: int) -> str:
    lines = [f"### Preference and reward stages on the embedded default (cpu, {time.strftime('%Y-%m-%dT%H:%M:%S')})",
             "", f"- machine: {info['cpu']} ({info['cpu_cores']} cores); torch {info['versions'].get('torch', '?')}",
             f"- tiny GPT-2 + bundled tasks, LoRA; SFT for {sft_steps} steps, then each stage {steps} steps from it "
             "(init_from); exact match on the same held-out rows, greedy", "",
             "| run | held-out exact match | held-out loss | stage metrics (last logged) | seconds |",
             "|---|---:|---:|---|---:|"]
    for row in rows:
        shown = ", ".join(form.format(row["stage_metrics"][key]) for key, form in SHOWN.items()
                          if key in row["stage_metrics"]) or "-"
        lines.append(f"| {row['stage']} | {row['exact_match']:.1%} | {row['eval_loss']:.4f} | {shown} | "
                     f"{row['seconds']:.0f} |")
    base = rows[0]["exact_match"]
    lines += ["", "- held-out exact match against the SFT run's: " + ", ".join(
        f"{row['stage'].split(',')[0].lstrip('+ ')} **{100 * (row['exact_match'] - base):+.1f} points**"
        for row in rows[1:])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

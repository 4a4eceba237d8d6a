"""Answering held-out rows against scoring them, at GPT-2 small shape: the seconds `convobot eval generate=true`
spends on greedy answers (batched by length, and one row at a time for comparison) against the seconds its
perplexity scoring takes (full, response and sliding window, as `convobot eval` runs it), on the same rows, in one
process; and convobot's scoring against lm-evaluation-harness's on the same log-likelihoods, when it is installed.

    python benchmarks/eval_speed.py                          # ~5 min on 2 CPU cores
    python benchmarks/eval_speed.py --rows 50 --new-tokens 64 --repeats 2

The model is GPT-2 small's architecture (GPT2Config(), random init, seed 0) with the real GPT-2 tokenizer from
../shared; the rows are real alpaca-gpt4 rows. A random-init model does not stop at EOS, so every answer is
--new-tokens long: the slowest case. Each measurement is repeated and the fastest kept. Targets: answering in
batches takes at most 2x the time of scoring, and scoring no longer than the harness's. Writes
benchmarks/results/eval_speed_<device>_<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CONVOBOT_SHARED_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import machine, save_report  # noqa: E402


def fastest(work, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = work()
        best = min(best, time.perf_counter() - started)
    return best, result


HARNESS_TASK = """task: answers_loglikelihood
dataset_path: json
dataset_kwargs:
  data_files:
    test: ROWS
test_split: test
output_type: loglikelihood
doc_to_text: "{{prompt}}"
doc_to_target: "{{completion}}"
target_delimiter: ""
metric_list:  # (not perplexity: its per-document mean of a random model's log-likelihoods overflows exp)
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def harness_loglikelihood(model_dir: Path, examples: list[dict]) -> dict:
    """lm-evaluation-harness scoring each answer given its prompt, on the model saved in `model_dir`."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        rows = Path(tmp) / "rows.jsonl"
        rows.write_text("".join(json.dumps(example) + "\n" for example in examples))
        (Path(tmp) / "task.yaml").write_text(HARNESS_TASK.replace("ROWS", json.dumps(str(rows))))
        return simple_evaluate(model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"},
                               tasks=["answers_loglikelihood"], task_manager=TaskManager(include_path=tmp),
                               batch_size=16, device="cpu")["results"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--smoke", action="store_true", help="a 2-layer model: checks the script, measures nothing")
    args = parser.parse_args(argv)

    import torch
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from convobot.config import EvalConfig
    from convobot.scoring.answer_scores import answered_and_scored
    from convobot.scoring.evaluate import HeldOut, score
    from convobot.scoring.perplexity import perplexities
    from convobot.template import format_example, with_chat_template

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2) if args.smoke else GPT2Config()).eval().to(args.device)
    tokenizer = with_chat_template(GPT2TokenizerFast.from_pretrained(str(SHARED / "gpt2-tokenizer")))
    tokenizer.pad_token = tokenizer.eos_token
    lines = (SHARED / "alpaca_gpt4" / "eval_sample.jsonl").read_text().splitlines()[:args.rows]
    rows = [json.loads(line) for line in lines]
    heldout = HeldOut(Dataset.from_list([format_example(row) for row in rows]), 1024, "alpaca-gpt4 eval sample")

    scoring, _ = fastest(lambda: score(model, tokenizer, heldout, EvalConfig()), args.repeats)
    # The same rows' answers scored, given their prompts: convobot's one pass (full + response perplexity) against
    # lm-evaluation-harness's loglikelihood requests on the same model, saved and loaded by the harness itself.
    one_pass, _ = fastest(lambda: perplexities(model, heldout.pairs, tokenizer, 1024, 4096), args.repeats)
    harness = None
    if importlib.util.find_spec("lm_eval") is not None and args.device == "cpu":
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            harness, _ = fastest(lambda: harness_loglikelihood(Path(tmp), heldout.pairs.to_list()), args.repeats)
    batched, (summary, _) = fastest(lambda: answered_and_scored(model, tokenizer, rows, args.new_tokens,
                                                                args.batch_size), args.repeats)
    alone, _ = fastest(lambda: answered_and_scored(model, tokenizer, rows, args.new_tokens, 1), 1)

    from datetime import datetime

    when, info = datetime.now(), machine(args.device)
    ratio = batched / scoring
    lines = [f"# Answering vs scoring held-out rows at GPT-2 small shape ({args.device}, {when:%Y-%m-%dT%H:%M:%S})",
             "",
             f"- machine: {info['cpu']} ({info['cpu_cores']} cores; vector ISA: {', '.join(info['isa'])}), "
             f"{info['memory_gib']} GiB RAM; torch {info['versions']['torch']}" + (f"; {info['gpu']}" if "gpu" in info
                                                                                else ""),
             f"- {len(rows)} real alpaca-gpt4 rows; GPT2Config() random init, real GPT-2 tokenizer; greedy answers of "
             f"{args.new_tokens} new tokens each (no early EOS); fastest of {args.repeats} runs", "",
             "| what | seconds | per row |", "|---|---:|---:|",
             f"| scoring: perplexity full, response, sliding window (convobot eval) | {scoring:.1f} | "
             f"{scoring / len(rows):.2f} |",
             f"| answering + BLEU/chrF/ROUGE, batches of {args.batch_size} by length (generate=true) | {batched:.1f} | "
             f"{batched / len(rows):.2f} |",
             f"| answering one row at a time | {alone:.1f} | {alone / len(rows):.2f} |",
             f"| convobot: answers' log-likelihood given their prompts, full + response in one pass | {one_pass:.1f} | "
             f"{one_pass / len(rows):.2f} |",
             *([f"| lm-evaluation-harness: the same log-likelihoods (hf model, loglikelihood requests) | "
                f"{harness:.1f} | {harness / len(rows):.2f} |"] if harness is not None else []), "",
             f"- answering in batches / scoring: **{ratio:.2f}x** (target <= 2x); batches vs one at a time: "
             f"**{alone / batched:.1f}x** faster",
             *([f"- convobot's scoring / lm-evaluation-harness's on the same log-likelihoods: **{one_pass / harness:.2f}x**"
                " the time (target <= 1x)"] if harness is not None else []), ""]
    print("\n".join(lines))
    stem = args.out / ("smoke" if args.smoke else f"eval_speed_{args.device}_{when:%Y-%m-%d}")
    save_report(stem, "\n".join(lines),
                {"date": when.isoformat(), "machine": info, "rows": len(rows), "new_tokens": args.new_tokens,
                 "batch_size": args.batch_size, "scoring_seconds": scoring, "answering_seconds": batched,
                 "answering_one_at_a_time_seconds": alone, "ratio": ratio, "one_pass_scoring_seconds": one_pass,
                 "harness_loglikelihood_seconds": harness,
                 "answers_scores": {k: v for k, v in summary.items() if k != "seconds"}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

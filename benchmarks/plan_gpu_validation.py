"""Check convobot-plan against what a GPU really allocates: GPT-2 small under the rtx3050_4gb profile.

    python benchmarks/plan_gpu_validation.py                          # LoRA and full, seed_repro settings
    python benchmarks/plan_gpu_validation.py --steps 6 --out benchmarks/results/plan_gpu_validation.json
    python benchmarks/plan_gpu_validation.py hardware.gradient_checkpointing=false data.max_length=512

GPT-2 small is built from GPT2Config() with random weights (memory does not depend on their values,
so nothing is downloaded), saved as safetensors next to the bundled tokenizer, and trained for a few
steps by convobot.training.recipe.run on rows long enough that every batch is padded to data.max_length, the
planner's worst case. For each method it prints estimate / measured for:
  weights, gradients, optimizer states   distinct tensor storages after the first optimizer step
  training peak                          torch.cuda.max_memory_allocated over the training steps,
                                         against the largest of the plan's three training moments
  evaluation peak                        the same over scoring after training, against the plan's
  allocator slack, CUDA context          max_memory_reserved / max_memory_allocated - 1, and the
                                         device's used memory (mem_get_info) minus reserved
The card's own size does not matter: budgets come from hardware.vram_gb (4 GiB here), not the card.
Without a CUDA device it prints why and exits 0 (nothing to measure).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

MiB = 2**20


def long_rows(count: int, words: int, seed: int = 0) -> list[dict]:
    from convobot.data.tasks import WORDS

    rng = random.Random(seed)
    return [{"instruction": "Continue the list of words.", "input": "",
             "output": " ".join(rng.choice(WORDS) for _ in range(words))} for _ in range(count)]


def save_random_gpt2(folder: Path) -> None:
    """GPT-2 small's architecture (GPT2Config() is the hub config), random init, safetensors."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from convobot.model.tokenizer import load_tokenizer

    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder, safe_serialization=True)
    load_tokenizer("bundled").save_pretrained(folder)


def measure(cfg, run_dir: Path) -> dict:
    """Train `cfg` through convobot.training.recipe.run, reading memory at the moments the plan models."""
    from transformers import TrainerCallback

    from convobot.plan.formulas import storage_bytes
    from convobot.training import recipe as train

    measured: dict = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            torch.cuda.reset_peak_memory_stats()

        def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            if "weights" in measured:
                return
            inner = getattr(optimizer, "optimizer", optimizer)
            states = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.is_cuda]
            measured.update(weights=storage_bytes([*model.parameters(), *model.buffers()]),
                            gradients=storage_bytes([p.grad for p in model.parameters() if p.grad is not None]),
                            optimizer_states=storage_bytes(states), optimizer=type(inner).__name__)

        def on_train_end(self, args, state, control, **kwargs):
            measured["training_peak"] = torch.cuda.max_memory_allocated()
            measured["training_reserved"] = torch.cuda.max_memory_reserved()
            free, total = torch.cuda.mem_get_info()
            measured["device_used"] = total - free
            torch.cuda.reset_peak_memory_stats()  # from here on: scoring

    results = train.run(cfg, run_dir, callbacks=[Probe()])
    measured["evaluation_peak"] = torch.cuda.max_memory_allocated()
    measured["truncated_rows"] = results["data"]["truncated_train_rows"]
    measured["optimizer_described"] = results["optimizer"]
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="extra convobot-train overrides (key=value)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--out", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("SKIP: no CUDA device visible; this benchmark measures torch.cuda.max_memory_allocated "
              "(the CPU checks of the planner are in tests/test_plan.py)")
        return 0

    from convobot import atomic, plan
    from convobot.config import compose, validate
    from convobot.plan.formulas import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES

    report = {"device": torch.cuda.get_device_name(0), "runs": {}}
    print(f"device: {report['device']}; CUDA context assumed {CUDA_CONTEXT_BYTES / MiB:.0f} MiB, "
          f"allocator slack {ALLOCATOR_SLACK:.0%}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_random_gpt2(tmp / "gpt2")
        atomic.write_jsonl(tmp / "rows.jsonl", long_rows(count=2 * args.steps + 8, words=1500))
        for method in args.methods.split(","):
            cfg = validate(compose([
                "experiment=seed_repro", "hardware=rtx3050_4gb", f"peft={method}",
                "model.source=hub", f"model.name={tmp / 'gpt2'}", "model.tokenizer=bundled",
                "data=local", f"data.path={tmp / 'rows.jsonl'}", "data.eval_size=4", "data.max_length=1024",
                f"train.max_steps={args.steps}", f"train.save_steps={10 * args.steps}", "train.logging_steps=1",
                "report.before=false", "report.samples=0", "hardware.allow_over_budget=true", *args.overrides,
            ]))
            estimate = plan.estimate(cfg, "cuda")
            torch.cuda.empty_cache()
            measured = measure(cfg, tmp / f"run_{method}")
            training_phases = {k: v for k, v in estimate.phases.items() if k != "evaluation"}
            rows = [
                ("weights", estimate.parts["weights"].bytes, measured["weights"]),
                ("gradients", estimate.parts["gradients"].bytes, measured["gradients"]),
                ("optimizer states", estimate.parts["optimizer states"].bytes, measured["optimizer_states"]),
                ("training peak", max(training_phases.values()), measured["training_peak"]),
                ("evaluation peak", estimate.phases["evaluation"], measured["evaluation_peak"]),
            ]
            print(f"\n{method}: {estimate.title}; optimizer {measured['optimizer_described']}; "
                  f"{measured['truncated_rows']} training rows truncated to {cfg.data.max_length} tokens")
            print(f"  {'part':<18}{'estimate MiB':>14}{'measured MiB':>14}{'ratio':>8}")
            for name, planned, real in rows:
                print(f"  {name:<18}{planned / MiB:>14,.1f}{real / MiB:>14,.1f}{planned / real:>8.3f}")
            slack = measured["training_reserved"] / measured["training_peak"] - 1
            context = measured["device_used"] - measured["training_reserved"]
            print(f"  allocator slack measured {slack:.1%} (assumed {ALLOCATOR_SLACK:.0%}); "
                  f"CUDA context + other processes {context / MiB:,.0f} MiB (assumed "
                  f"{CUDA_CONTEXT_BYTES / MiB:,.0f})")
            print(f"  plan: {estimate.total / MiB:,.0f} MiB total ({estimate.peak_phase}), "
                  f"{'fits' if estimate.fits else 'does not fit'} {cfg.hardware.vram_gb} GiB")
            report["runs"][method] = {"plan_phases": estimate.phases, "plan_total": estimate.total,
                                      "rows": {n: {"estimate": p, "measured": r} for n, p, r in rows},
                                      "allocator_slack": slack, "context_bytes": context,
                                      "config_overrides": args.overrides, "steps": args.steps}
    if args.out:
        atomic.write_json(args.out, report)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

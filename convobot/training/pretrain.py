"""Pretrain the embedded base: a small GPT-2 that knows the bundled tasks' skills, but not the Alpaca format.

    python -m convobot.training.pretrain                 # rebuilds convobot/assets/pretrained/ (~8 min on 2 CPU cores)
    python -m convobot.training.pretrain --steps 200 --out /tmp/base   # a quick look

GPT-2 learnt text before anyone fine-tuned it on Alpaca; this base learns the skills of the bundled tasks the same
way: as plain text lines, many to a sequence, in a terse notation ("reverse | cat dog sun = sun dog cat") or as
the task's instruction with its input in brackets ("Reverse the order of the words. [cat dog sun] => sun dog
cat"), with no "### Instruction:"/"### Response:" template and no end-of-answer token. Given an Alpaca prompt it has never seen that format,
so before fine-tuning it answers almost nothing right; the fine-tune teaches the format and when to stop, which a
LoRA adapter learns in under a minute. The result is written as safetensors beside the bundled tokenizer, with
recipe.json: the settings, the loss curve and the SHA-256 of model.safetensors (tests check the shipped file
against it). Licence: the project's (Apache-2.0); the data is generated here.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import time
from pathlib import Path

import torch

from convobot import atomic
from convobot.data.tasks import TASKS, WORDS

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "pretrained"
# The same shape as the random-init tiny model (conf/model/tiny_random.yaml), so either can be the base.
ARCHITECTURE = {"n_layer": 2, "n_head": 4, "n_embd": 128, "n_positions": 256}


def skill_line(rng: random.Random) -> str:
    """One fact as plain text: half in a terse notation of the skills, half as the task's own instruction with its
    input in brackets; never in the Alpaca template, never closed by an end-of-answer token."""
    if rng.random() < 0.5:
        instruction, input_text, output = rng.choice(list(TASKS.values()))(rng)
        return f"{instruction} [{input_text}] => {output}"
    return terse_line(rng)


def terse_line(rng: random.Random) -> str:
    """One fact in the terse notation: "reverse | cat dog sun = sun dog cat"."""
    words = rng.sample(WORDS, rng.randint(1, 6))
    skill = rng.choice(("reverse", "upper", "last", "count", "sort", "add"))
    if skill == "reverse":
        return f"reverse | {' '.join(words)} = {' '.join(reversed(words))}"
    if skill == "upper":
        return f"upper | {' '.join(words)} = {' '.join(words).upper()}"
    if skill == "last":
        return f"last | {' '.join(words)} = {words[-1]}"
    if skill == "count":
        return f"count | {' '.join(words)} = {len(words)}"
    if skill == "sort":
        return f"sort | {' '.join(words)} = {' '.join(sorted(words))}"
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"add | {a} {b} = {a + b}"


def sequences(tokenizer, rng: random.Random, count: int, length: int) -> torch.Tensor:
    """`count` sequences of exactly `length` tokens, each a run of skill lines (cut at the length)."""
    rows = []
    for _ in range(count):
        ids: list[int] = []
        while len(ids) < length:
            ids += tokenizer(skill_line(rng) + "\n", add_special_tokens=False)["input_ids"]
        rows.append(ids[:length])
    return torch.tensor(rows)


def pretrain(steps: int, batch: int, length: int, lr: float, seed: int, out: Path, log_every: int = 50) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel, get_cosine_schedule_with_warmup

    from convobot.model.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = load_tokenizer("bundled")
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ARCHITECTURE)
    model = GPT2LMHeadModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=True)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=steps // 20, num_training_steps=steps)
    held_out = sequences(tokenizer, random.Random(seed + 1), 64, length)
    curve, started = [], time.perf_counter()
    for step in range(1, steps + 1):
        ids = sequences(tokenizer, rng, batch, length)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps:
            with torch.no_grad():
                model.eval()
                eval_loss = model(input_ids=held_out, labels=held_out).loss.item()
                model.train()
            curve.append({"step": step, "loss": round(loss.item(), 4), "eval_loss": round(eval_loss, 4)})
            print(f"step {step}/{steps}: loss {loss.item():.4f}, held-out {eval_loss:.4f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    # Dropout back to GPT-2's for whoever fine-tunes it with model.dropout=null (convobot sets 0.0 by default).
    model.config.update({"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1})
    with atomic.directory(out, overwrite=True) as tmp:
        model.eval().save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        recipe = {
            "what": "GPT-2 architecture pretrained on generated skill lines (not the Alpaca format)",
            "licence": "apache-2.0",
            "architecture": ARCHITECTURE, "parameters": sum(p.numel() for p in model.parameters()),
            "steps": steps, "batch": batch, "sequence_length": length, "tokens": steps * batch * length,
            "optimizer": f"AdamW lr {lr}, weight decay 0.01, cosine schedule, 5% warm-up", "seed": seed,
            "seconds": round(time.perf_counter() - started), "final_eval_loss": curve[-1]["eval_loss"],
            "final_eval_perplexity": round(math.exp(curve[-1]["eval_loss"]), 4),
            "loss_curve": curve,
            "model_sha256": hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest(),
            "command": f"python -m convobot.training.pretrain --steps {steps} --batch {batch} --length {length} --lr {lr} "
                       f"--seed {seed}",
        }
        atomic.write_json(tmp / "recipe.json", recipe)
    return recipe


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ASSET_DIR)
    args = parser.parse_args(argv)
    recipe = pretrain(args.steps, args.batch, args.length, args.lr, args.seed, args.out)
    print(f"wrote {args.out}: held-out loss {recipe['final_eval_loss']}, {recipe['tokens']:,} tokens in "
          f"{recipe['seconds']} s")


if __name__ == "__main__":
    main()

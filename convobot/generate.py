"""Batched generation from Alpaca prompts, used for exact-match scoring and sample answers."""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from convobot.template import format_prompt


def generation_config(tokenizer, max_new_tokens: int = 64, **sampling) -> GenerationConfig:
    """Greedy by default; pad = eos as in the reference (GPT-2 has no pad token)."""
    do_sample = sampling.get("temperature", 0.0) > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=sampling.get("temperature") if do_sample else None,
        top_p=sampling.get("top_p") if do_sample else None,
        repetition_penalty=sampling.get("repetition_penalty", 1.0),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@torch.no_grad()
def answer(model, tokenizer, rows: list[dict], max_new_tokens: int = 32, batch_size: int = 32) -> list[str]:
    """Greedy answers to Alpaca rows (instruction/input), decoded without the prompt."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
    device = next(model.parameters()).device
    config = generation_config(tokenizer, max_new_tokens)
    answers = []
    try:
        for start in range(0, len(rows), batch_size):
            prompts = [format_prompt(r["instruction"], r.get("input", "")) for r in rows[start:start + batch_size]]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            output = model.generate(**batch, generation_config=config)
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers

"""Generation: greedy answers to held-out rows in batches (exact match, sample answers), the generation settings of
convobot's commands, and prompts fitted to the model's context."""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from convobot.errors import PromptTooLongError
from convobot.template import prompt_of, render_prompt


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
    """Greedy answers to rows (Alpaca, or conversations: to the last user turn), decoded without the prompt."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
    device = next(model.parameters()).device
    config = generation_config(tokenizer, max_new_tokens)
    answers = []
    try:
        for start in range(0, len(rows), batch_size):
            prompts = [prompt_of(row, tokenizer) for row in rows[start:start + batch_size]]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            output = model.generate(**batch, generation_config=config)
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def prompt_ids(tokenizer, prompt: str, context: int) -> list[int]:
    """The token ids of a prompt; a PromptTooLongError if they leave no room in the context for an answer."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) >= context:
        raise PromptTooLongError(f"the prompt is {len(ids)} tokens; the model's context is {context}: shorten the "
                                 "instruction or its input")
    return ids


def fit_conversation(tokenizer, messages: list[dict], context: int, room: int) -> tuple[list[dict], int]:
    """`messages` without as many of the oldest user/assistant exchanges (a system message stays) as it takes for
    the prompt to leave `room` tokens of the context for the answer; and how many turns were dropped. The last
    user turn always stays (prompt_ids says when even it does not fit)."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    dropped = 0
    while len(turns) > 1:
        ids = tokenizer(render_prompt(tokenizer, system + turns), add_special_tokens=False)["input_ids"]
        if len(ids) + room <= context:
            break
        turns, dropped = turns[2:], dropped + 2
    return system + turns, dropped

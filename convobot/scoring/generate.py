"""Generation: greedy answers to held-out rows in batches (exact match, sample answers), the generation settings of
convobot's commands, and prompts fitted to the model's context."""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from convobot.errors import ConfigError, PromptTooLongError
from convobot.model.base import context_length
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


class Answers(list):
    """Answers in the rows' order, and how many prompts were cut to leave room for them in the context."""

    def __init__(self, texts=(), cut: int = 0):
        super().__init__(texts)
        self.cut = cut


def fitted_prompt(row: dict, tokenizer, context: int, room: int) -> tuple[list[int], bool]:
    """The ids of a row's prompt, cut to leave `room` tokens of the context for its answer, and whether it was cut: a
    conversation loses its oldest exchanges first (as chat does), then any prompt keeps only its last tokens."""
    if "messages" in row:
        messages, dropped = fit_conversation(tokenizer, row["messages"][:-1], context, room)
        ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    else:
        dropped, ids = 0, tokenizer(prompt_of(row, tokenizer), add_special_tokens=False)["input_ids"]
    keep = context - room
    return ids[-keep:], dropped > 0 or len(ids) > keep


@torch.no_grad()
def answer(model, tokenizer, rows: list[dict], max_new_tokens: int = 32, batch_size: int = 32) -> Answers:
    """Greedy answers to rows (Alpaca, or conversations: to the last user turn), decoded without the prompt. Prompts
    too long for the context and the new tokens are cut from the left; rows go in batches of similar lengths."""
    context = context_length(model.config)
    if max_new_tokens >= context:
        raise ConfigError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                          f"{context}-token context")
    fitted = [fitted_prompt(row, tokenizer, context, max_new_tokens) for row in rows]
    order = sorted(range(len(rows)), key=lambda i: len(fitted[i][0]))  # less padding, same answers
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
    device = next(model.parameters()).device
    config = generation_config(tokenizer, max_new_tokens)
    texts = [""] * len(rows)
    try:
        for start in range(0, len(rows), batch_size):
            indices = order[start:start + batch_size]
            batch = tokenizer.pad({"input_ids": [fitted[i][0] for i in indices]}, return_tensors="pt").to(device)
            output = model.generate(**batch, generation_config=config)
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            for i, text in zip(indices, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                texts[i] = text
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return Answers(texts, cut=sum(cut for _, cut in fitted))


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

"""Generation from Alpaca prompts: batched (exact-match scoring, sample answers) and streamed (chat)."""

from __future__ import annotations

from dataclasses import asdict
from threading import Thread
from typing import Iterator

import torch
from transformers import GenerationConfig, TextIteratorStreamer

from convobot.config import GenerationOptions
from convobot.errors import PromptTooLongError
from convobot.modeling import context_length
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


def stream_answer(model, tokenizer, instruction: str, input: str = "",
                  options: GenerationOptions | None = None) -> Iterator[str]:
    """Yield the answer to one instruction as text pieces while it is generated; stops at EOS.

    generate() runs in a thread and feeds a TextIteratorStreamer, which this generator drains.
    """
    options = options or GenerationOptions()
    device = next(model.parameters()).device
    batch = tokenizer(format_prompt(instruction, input), return_tensors="pt", add_special_tokens=False).to(device)
    context = context_length(model.config)
    room = context - batch["input_ids"].shape[1]
    if room <= 0:
        raise PromptTooLongError(f"the prompt is {batch['input_ids'].shape[1]} tokens; the model's context is "
                                 f"{context}: shorten the instruction or its input")
    # Positions past the context have no embedding: cap the answer rather than crash mid-stream.
    config = generation_config(tokenizer, **(asdict(options) | {"max_new_tokens": min(options.max_new_tokens, room)}))
    if not config.do_sample:  # generate() fills unset (None) fields from the model's saved sampling defaults
        config.temperature, config.top_p = 1.0, 1.0
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def generate():
        try:
            with torch.no_grad():
                model.generate(**batch, generation_config=config, streamer=streamer)
        except BaseException as err:  # re-raised below; end the stream so the reader is not left waiting
            failure.append(err)
            streamer.end()

    was_training = model.training
    model.eval()
    thread = Thread(target=generate, daemon=True)
    thread.start()
    try:
        yield from streamer
    finally:
        thread.join()
        model.train(was_training)
    if failure:
        raise failure[0]

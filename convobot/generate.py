"""Generation: batched answers to held-out rows (exact-match scoring, sample answers) and a streamed answer to a
conversation (chat, serving)."""

from __future__ import annotations

from dataclasses import asdict
from threading import Thread
from typing import Iterator

import torch
from transformers import GenerationConfig, TextIteratorStreamer

from convobot.config import GenerationOptions
from convobot.errors import PromptTooLongError
from convobot.modeling import context_length
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


class RecordingStreamer(TextIteratorStreamer):
    """A TextIteratorStreamer that also keeps the generated token ids (usage counts, finish reason)."""

    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.token_ids: list[int] = []

    def put(self, value):
        is_prompt = self.skip_prompt and self.next_tokens_are_prompt
        super().put(value)
        if not is_prompt:
            self.token_ids += value.flatten().tolist()


def stream_answer(model, tokenizer, messages: list[dict], options: GenerationOptions | None = None,
                  generated: list[int] | None = None) -> Iterator[str]:
    """Yield the assistant's next turn after `messages` as text pieces while it is generated; stops at EOS. The
    generated token ids (EOS included) are appended to `generated` when it is given.

    generate() runs in a thread and feeds the streamer, which this generator drains.
    """
    ids = prompt_ids(tokenizer, render_prompt(tokenizer, messages), context_length(model.config))
    yield from stream_continuation(model, tokenizer, ids, options, generated)


def stream_continuation(model, tokenizer, ids: list[int], options: GenerationOptions | None = None,
                        generated: list[int] | None = None) -> Iterator[str]:
    """Yield the continuation of the prompt `ids` as text pieces (see stream_answer)."""
    options = options or GenerationOptions()
    device = next(model.parameters()).device
    context = context_length(model.config)
    input_ids = torch.tensor([ids], device=device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    # Positions past the context have no embedding: cap the answer rather than crash mid-stream.
    config = generation_config(tokenizer, **(asdict(options) | {"max_new_tokens": min(options.max_new_tokens,
                                                                                        context - len(ids))}))
    if not config.do_sample:  # generate() fills unset (None) fields from the model's saved sampling defaults
        config.temperature, config.top_p = 1.0, 1.0
    streamer = RecordingStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
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
    if generated is not None:
        generated += streamer.token_ids

"""A streamed answer for `convobot chat`: the server's engine with one row, so that chat and the server compute an
answer the same way (the same cache, sampling and stopping), text pieces arriving as they are decoded."""

from __future__ import annotations

import queue
from typing import Iterator

from convobot.config import GenerationOptions
from convobot.model.base import context_length
from convobot.scoring.generate import prompt_ids
from convobot.serving.engine import Delta, Done, Engine, Failed, Request
from convobot.serving.row_lora import BASE
from convobot.serving.sampling import SamplingParams
from convobot.serving.torch_runner import TorchRunner
from convobot.template import render_prompt


def stream_answer(model, tokenizer, messages: list[dict], options: GenerationOptions | None = None,
                  generated: list[int] | None = None) -> Iterator[str]:
    """Yield the assistant's next turn after `messages` as text pieces while it is generated; stops at EOS. The
    number of tokens it sampled (EOS included) is appended to `generated` when it is given."""
    options = options or GenerationOptions()
    context = context_length(model.config)
    ids = prompt_ids(tokenizer, render_prompt(tokenizer, messages), context)
    params = SamplingParams(max_tokens=min(options.max_new_tokens, context - len(ids)),
                            temperature=options.temperature, top_p=options.top_p,
                            repetition_penalty=options.repetition_penalty)
    events: queue.Queue = queue.Queue()
    request = Request(ids, params, events.put, BASE)
    engine = Engine(TorchRunner(model, slots=1, adapters=False), tokenizer, "chat").start()
    try:
        engine.submit(request)
        while True:
            event = events.get()
            if isinstance(event, Delta) and event.text:
                yield event.text
            elif isinstance(event, Failed):
                raise RuntimeError(event.message)
            elif isinstance(event, Done):
                if generated is not None:
                    generated.append(event.completion_tokens)
                return
    finally:
        request.cancel()  # a reader that stops early frees the row
        engine.stop()

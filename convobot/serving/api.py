"""The OpenAI API as clients send it: request bodies checked field by field, and response bodies built as the
official client reads them (chat completions and their stream chunks, text completions, logprobs, usage, errors).

Every field OpenAI defines is either honoured or refused with a 400 that names it: a field convobot does not
implement is accepted only at its neutral value (`frequency_penalty: 0`, `tools: []`, ...), which is what many
clients send by default; an unknown field is refused too, never ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from convobot.serving.engine import Delta
from convobot.serving.sampling import TokenLogprob, token_bytes


class RequestError(Exception):
    """A request the server cannot answer: an OpenAI-style error body with this status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.param, self.status, self.code, self.headers = param, status, code, headers or {}
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


# Fields OpenAI defines that convobot does not implement, with the values that mean "not used".
NEUTRAL = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "response_format":
    ({"type": "text"},), "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "parallel_tool_calls": (True, False), "store": (False,), "metadata": ({},), "service_tier": ("auto", "default"),
    "modalities": (["text"],), "echo": (False,), "suffix": ("",), "prediction": (), "audio": (),
    "reasoning_effort": (), "web_search_options": (), "prompt_cache_key": (), "safety_identifier": (),
}


class Sampling(Strict):
    """What both endpoints take."""
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0)  # vLLM's extra parameter
    ignore_eos: bool = False  # vLLM's extra parameter: generate max_tokens tokens whatever the model says
    seed: Optional[int] = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    user: Optional[str] = None  # an end-user id for abuse monitoring: nothing to do with the answer
    # Defined by OpenAI, not implemented: only their neutral values pass (checked in `refuse_unsupported`).
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    metadata: Optional[dict[str, Any]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None

    def stops(self) -> tuple[str, ...]:
        found = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(found) > 4:
            raise RequestError("stop: at most 4 sequences", "stop")
        return tuple(found)


class Message(Strict):
    role: str
    content: Union[str, list[dict[str, Any]], None] = None
    input: Optional[str] = None  # the Alpaca input of a user turn (convobot's chat template)
    name: Optional[str] = None


class ChatRequest(Sampling):
    messages: list[Message]
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[dict[str, Any]] = None
    modalities: Optional[list[str]] = None
    audio: Optional[dict[str, Any]] = None
    prediction: Optional[dict[str, Any]] = None
    reasoning_effort: Optional[str] = None
    web_search_options: Optional[dict[str, Any]] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None

    @property
    def max_new(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Sampling):
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @property
    def max_new(self) -> int | None:
        return self.max_tokens

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise RequestError("prompt: one prompt per request (send a string, or a list of one)", "prompt")
        return self.prompt[0]


class LoadAdapter(Strict):
    """POST /v1/load_lora_adapter, as vLLM takes it."""
    lora_name: str
    lora_path: str


class UnloadAdapter(Strict):
    lora_name: str


def refuse_unsupported(request: Sampling, max_n: int) -> None:
    """A 400 naming the first field that asks for something convobot does not do."""
    for name, neutral in NEUTRAL.items():
        value = getattr(request, name, None)
        if value is not None and value not in neutral:
            raise RequestError(f"{name} is not supported by this server (only {neutral[0]!r} or null)"
                               if neutral else f"{name} is not supported by this server", name)
    if isinstance(request, CompletionRequest) and request.best_of not in (None, 1, request.n):
        raise RequestError("best_of is not supported by this server (only null or equal to n)", "best_of")
    if request.n > max_n:
        raise RequestError(f"n: at most {max_n} choices per request", "n")
    if isinstance(request, ChatRequest) and request.top_logprobs and not request.logprobs:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")


# ----------------------------------------------------------------------------- responses


def response_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    def item(token: int, logprob: float) -> dict:
        raw = token_bytes(tokenizer, token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {"content": [item(e.token_id, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion_logprobs(tokenizer, entries: list[TokenLogprob], offset: int) -> dict:
    """The legacy completions shape: parallel lists, `text_offset` counting characters from the answer's start."""
    tokens = [token_bytes(tokenizer, e.token_id).decode("utf-8", errors="replace") for e in entries]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_bytes(tokenizer, t).decode("utf-8", errors="replace"): lp for t, lp in e.top}
                             for e in entries], "text_offset": offsets}


class Answer:
    """One request's response, built from the engine's deltas: whole, or as stream chunks."""

    def __init__(self, kind: Literal["chat", "text"], model: str, tokenizer, n: int, logprobs: bool):
        self.kind, self.tokenizer, self.logprobs = kind, tokenizer, logprobs
        self.head = {"id": response_id(kind), "created": int(time.time()), "model": model}
        self.texts, self.entries = [""] * n, [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n

    def _logprobs(self, index: int, entries: list[TokenLogprob], offset: int):
        if not self.logprobs:
            return None
        if self.kind == "chat":
            return chat_logprobs(self.tokenizer, entries)
        return completion_logprobs(self.tokenizer, entries, offset)

    def add(self, delta: Delta) -> None:
        self.texts[delta.choice] += delta.text
        self.entries[delta.choice] += delta.logprobs
        self.finish[delta.choice] = delta.finish_reason

    def whole(self, prompt_tokens: int, completion_tokens: int) -> dict:
        choices = []
        for index, (text, finish) in enumerate(zip(self.texts, self.finish)):
            logprobs = self._logprobs(index, self.entries[index], 0)
            if self.kind == "chat":
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": finish})
            else:
                choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
        return self.head | {"object": "chat.completion" if self.kind == "chat" else "text_completion",
                            "choices": choices, "usage": usage(prompt_tokens, completion_tokens),
                            "system_fingerprint": None}

    def chunk(self, choices: list[dict], **extra) -> dict:
        return self.head | {"object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                            "choices": choices, "system_fingerprint": None} | extra

    def opening(self, index: int) -> dict:
        """The first chunk of a chat choice: its role."""
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def delta_choice(self, delta: Delta) -> dict:
        offset = len(self.texts[delta.choice])
        self.add(delta)
        logprobs = self._logprobs(delta.choice, delta.logprobs, offset)
        if self.kind == "chat":
            content = {"content": delta.text} if delta.text else {}
            return {"index": delta.choice, "delta": content, "logprobs": logprobs,
                    "finish_reason": delta.finish_reason}
        return {"index": delta.choice, "text": delta.text, "logprobs": logprobs, "finish_reason": delta.finish_reason}

"""From a row of logits to the next token, per request: repetition penalty, greedy or temperature and top-p
sampling from the request's own seeded generator, log-probabilities; and from tokens to text: incremental decoding
and stop sequences, holding back text that could still become one.

The logits processing is transformers' (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
TopPLogitsWarper), written for one row at a time so that every sequence of a batch keeps its own settings and
generator: a greedy answer is what `generate()` gives, and a seeded one is the same whatever else is in the batch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives returned with each token's log-probability
    ignore_eos: bool = False  # go on past EOS until max_tokens (benchmarks: answers of a fixed length)


def generator_for(seed: int | None, choice: int) -> torch.Generator | None:
    """A choice's own generator: choice j of a request with seed s samples from seed s + j (None: unseeded)."""
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(seed + choice)
    return generator


def next_token(logits: torch.Tensor, history: torch.Tensor, params: SamplingParams,
               generator: torch.Generator | None) -> int:
    """The next token after `history` (prompt and generated ids, a 1-D tensor) from one row of fp32 logits."""
    scores = logits.clone()
    if params.repetition_penalty != 1.0 and len(history):
        seen = scores.gather(0, history)
        scores.scatter_(0, history, torch.where(seen < 0, seen * params.repetition_penalty,
                                                seen / params.repetition_penalty))
    if params.temperature <= 0:
        return int(scores.argmax())
    scores = scores / params.temperature
    if params.top_p < 1.0:
        ordered, order = scores.sort(descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - params.top_p
        drop[-1] = False  # keep at least the most likely token
        scores = scores.masked_fill(drop.scatter(0, order, drop), -math.inf)
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the most likely tokens and their log-probabilities


def logprob_of(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The model's log-probability of `token` (before penalty, temperature and top-p, as vLLM reports them) and the
    `top` most likely alternatives."""
    log_probs = logits.float().log_softmax(-1)
    best = log_probs.topk(top) if top else None
    return TokenLogprob(token, float(log_probs[token]),
                        list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else [])


class Detokenizer:
    """A sequence's text as its tokens arrive, with the text each token added (for logprobs) and stop sequences.

    `text` is decoded from all the ids at once (so a character split over several byte-level tokens comes out
    whole); `ready` is what may be sent: not a trailing incomplete character, nor a tail that could be the start
    of a stop sequence.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.offsets: list[int] = []  # where each token's text starts in `text`
        self.stopped = False

    def add(self, token: int) -> None:
        self.offsets.append(len(self.text))
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.stop:
            at = self.text.find(stop, max(0, self.offsets[-1] - len(stop)))
            if at != -1:
                self.text, self.stopped = self.text[:at], True

    @property
    def ready(self) -> str:
        """The text that can be sent now (all of it once the sequence has finished)."""
        text = self.text if self.stopped else self.text.rstrip("\ufffd")
        if self.stop and not self.stopped:
            longest = max(len(s) for s in self.stop)
            held = next((k for k in range(min(longest - 1, len(text)), 0, -1)
                         if any(s.startswith(text[-k:]) for s in self.stop)), 0)
            text = text[:len(text) - held]
        return text

    def tokens_within(self, length: int) -> int:
        """How many tokens' text starts before `length` characters: the tokens a text of that length shows."""
        return sum(1 for offset in self.offsets if offset < length)


@functools.cache
def byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable bytes stand for themselves, the other 68 are shifted to the
    characters from U+0100 on, in byte order (GPT-2's `bytes_to_unicode`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [byte for byte in range(256) if byte not in printable]
    return {chr(byte): byte for byte in printable} | {chr(256 + i): byte for i, byte in enumerate(shifted)}


def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes a token stands for: byte-level BPE writes each byte as one character of its alphabet, so a token's
    string maps back to its bytes; other tokenizers give their decoded text."""
    piece = tokenizer.convert_ids_to_tokens(token)
    alphabet = byte_of_char()
    if piece is not None and all(char in alphabet for char in piece):
        return bytes(alphabet[char] for char in piece)
    return tokenizer.decode([token]).encode("utf-8")

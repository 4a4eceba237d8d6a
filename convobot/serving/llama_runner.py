"""The llama.cpp side of the engine, for merged releases on the CPU: the bundle's GGUF (checked against PyTorch by
`convobot export-gguf`) in one llama.cpp context with a sequence id per row, so that each decode step is one
`llama_decode` over a token of every running sequence, as llama.cpp's own server batches its slots.

Prompts are tokenized and rendered by the bundle's tokenizer and chat template, like the PyTorch runner's (the GGUF
check proves llama.cpp tokenizes the same), and tokens are picked by the same sampling code from llama.cpp's logits.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import torch

from convobot.release.gguf import llama_model_params


class Prefill:
    """A prompt on its way into the sequence of the row it was given."""

    def __init__(self, ids: list[int], seq: int):
        self.ids, self.seq, self.done = ids, seq, 0
        self.logits: torch.Tensor | None = None
        self.taken = False  # the first choice to join keeps the prompt's sequence; the others copy it

    @property
    def finished(self) -> bool:
        return self.done == len(self.ids)


class LlamaRunner:
    """Prefill, decode and sequence bookkeeping over one llama.cpp context of `slots` sequences, each with the whole
    model context (`context` tokens)."""

    def __init__(self, gguf: Path, context: int, slots: int, threads: int | None = None, batch_tokens: int = 512):
        import llama_cpp
        from llama_cpp import _internals

        self.llama_cpp, self.context, self.slots = llama_cpp, context, slots
        llama_cpp.llama_backend_init()
        self.model = _internals.LlamaModel(path_model=str(gguf), params=llama_model_params(), verbose=False)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = context * slots
        params.n_batch = params.n_ubatch = max(batch_tokens, slots)
        params.n_seq_max = slots
        params.kv_unified = False  # a separate span of the cache per sequence: no sequence attends over another's
        params.n_threads = params.n_threads_batch = threads or os.cpu_count()
        params.no_perf = True
        self.ctx = _internals.LlamaContext(model=self.model, params=params, verbose=False)
        self.batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        self.batch_tokens = params.n_batch
        self.vocab = self.model.n_vocab()
        self.free_seqs = list(range(slots))
        self.seq_of: dict[object, int] = {}
        self.lengths: dict[object, int] = {}

    @property
    def free(self) -> int:
        return len(self.free_seqs)

    def close(self) -> None:
        self.llama_cpp.llama_batch_free(self.batch)
        self.ctx.close()
        self.model.close()

    def new_prefill(self, ids: list[int], adapter: str) -> Prefill:
        return Prefill(ids, self.free_seqs.pop(0))

    def forget(self, job: Prefill) -> None:
        """The prompt's sequence goes back to the free ones unless a choice kept it."""
        if not job.taken:
            self._clear(job.seq)
            self.free_seqs.append(job.seq)

    def _clear(self, seq: int) -> None:
        self.llama_cpp.llama_memory_seq_rm(self.ctx.memory, seq, -1, -1)

    def _fill(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """(token, position, sequence, wants logits) into the batch."""
        batch = self.batch
        batch.n_tokens = len(entries)
        for i, (token, position, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, 1, logits
            batch.seq_id[i][0] = seq
        code = self.llama_cpp.llama_decode(self.ctx.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def _logits(self, index: int) -> torch.Tensor:
        pointer = self.llama_cpp.llama_get_logits_ith(self.ctx.ctx, index)
        row = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.vocab,))
        return torch.from_numpy(row.copy())

    def prefill(self, job: Prefill, budget: int) -> int:
        chunk = job.ids[job.done:job.done + min(budget, self.batch_tokens)]
        last = job.done + len(chunk) == len(job.ids)
        self._fill([(token, job.done + i, job.seq, last and i == len(chunk) - 1) for i, token in enumerate(chunk)])
        job.done += len(chunk)
        if last:
            job.logits = self._logits(len(chunk) - 1)
        return len(chunk)

    def join(self, key, job: Prefill) -> None:
        """A prefilled choice decodes in the prompt's sequence, or in a free one with a copy of its keys and values."""
        if job.taken:
            seq = self.free_seqs.pop(0)
            self._clear(seq)
            self.llama_cpp.llama_memory_seq_cp(self.ctx.memory, job.seq, seq, -1, -1)
        else:
            seq, job.taken = job.seq, True
        self.seq_of[key], self.lengths[key] = seq, len(job.ids)

    def leave(self, key) -> None:
        seq = self.seq_of.pop(key)
        del self.lengths[key]
        self._clear(seq)
        self.free_seqs.append(seq)

    def decode(self, tokens: dict) -> dict:
        keys = list(tokens)
        self._fill([(tokens[key], self.lengths[key], self.seq_of[key], True) for key in keys])
        for key in keys:
            self.lengths[key] += 1
        return {key: self._logits(i) for i, key in enumerate(keys)}

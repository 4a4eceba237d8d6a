"""The checks and measurements train, merge, eval and export report beside perplexity (convobot/scoring.py):
the logit comparisons that verify a merged or exported model, peak memory, and package versions."""

from __future__ import annotations

import copy
import hashlib
import math
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Iterator

import torch

from convobot import scoring
from convobot.errors import VerificationError

# The label of a position no loss is computed for (transformers' and TRL's convention).
IGNORE_INDEX = -100


def probe_batch(pairs, tokenizer, rows: int, max_length: int) -> dict[str, torch.Tensor]:
    """A padded batch of whole held-out rows (prompt + response + EOS) for the logit comparisons."""
    encoded = scoring.encode_examples(pairs.select(range(min(rows, len(pairs)))), tokenizer, max_length)
    return scoring.pad([row["input_ids"] for row in encoded], tokenizer.pad_token_id)


def first_rows(batch: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """The first `rows` rows of a padded batch, trimmed to their longest."""
    width = int(batch["attention_mask"][:rows].sum(1).max())
    return {name: tensor[:rows, :width] for name, tensor in batch.items()}


@dataclass
class LogitProbe:
    """A model's logits at a padded batch's real tokens, kept as what they are computed from: the last hidden
    states (tokens x hidden) and the LM head. Tokens x vocab fp32 logits (0.8 GB for 16 alpaca rows at GPT-2's
    50,257 columns) only ever exist scoring.HEAD_CHUNK positions at a time."""

    hidden: torch.Tensor
    head: torch.nn.Module

    @classmethod
    @torch.no_grad()
    def capture(cls, model, batch: dict[str, torch.Tensor]) -> LogitProbe:
        """Row by row, each at its own length: padding the rows to the longest would double the work."""
        was_training = model.training
        model.eval()
        decoder, head = scoring.decoder_and_head(model)
        rows = [ids[mask.bool()].unsqueeze(0) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        hidden = torch.cat([decoder(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
                            .last_hidden_state[0] for ids in rows])
        model.train(was_training)
        if next(head.children(), None) is not None:  # an adapted head: merging rewrites it in place
            head = copy.deepcopy(head)
        return cls(hidden, head)

    @torch.no_grad()
    def logits(self) -> Iterator[torch.Tensor]:
        for begin in range(0, len(self.hidden), scoring.HEAD_CHUNK):
            yield self.head(self.hidden[begin:begin + scoring.HEAD_CHUNK]).float()


def max_logit_difference(reference: LogitProbe, candidate: LogitProbe) -> float:
    """Max |reference logit - candidate logit| over every real token and vocabulary entry (NaN if either has one)."""
    worst = 0.0
    for a, b in zip(reference.logits(), candidate.logits()):
        difference = (a - b).abs().max().item()  # NaN if either chunk holds one
        if math.isnan(difference):
            return difference
        worst = max(worst, difference)
    return worst


@torch.no_grad()
def real_token_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits at the non-padding positions only, whole (for small batches: the ONNX parity check)."""
    logits = model(**batch).logits.float()
    return logits[batch["attention_mask"].bool()]


def check_within(difference: float, tolerance: float, what: str) -> float:
    """`difference` if it is within `tolerance`; else VerificationError naming `what`."""
    if not difference <= tolerance:  # also catches NaN
        raise VerificationError(f"{what}: logits differ by max |diff| = {difference:.3g} > tolerance {tolerance:g}")
    return difference


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes: equal digests, bit-identical values."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


class Stopwatch:
    """Wall seconds per named stage: `with clock("merge"): ...`, then `clock.seconds`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started


def peak_memory_bytes(device: torch.device | str) -> int:
    """CUDA max allocated on GPU; peak resident set size of this process on CPU."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(peak_kib if sys.platform == "darwin" else peak_kib * 1024)


def versions() -> dict[str, str]:
    packages = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate")
    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found

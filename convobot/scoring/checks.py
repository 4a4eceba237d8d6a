"""The logit comparisons that verify a merged or exported model against the model it came from, and weight digests."""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch

from convobot.errors import VerificationError
from convobot.scoring import perplexity


def probe_batch(pairs, tokenizer, rows: int, max_length: int) -> dict[str, torch.Tensor]:
    """A padded batch of whole held-out rows (prompt + response + EOS) for the logit comparisons."""
    encoded = perplexity.encode_examples(pairs.select(range(min(rows, len(pairs)))), tokenizer, max_length)
    return perplexity.pad([row["input_ids"] for row in encoded], tokenizer.pad_token_id)


def first_rows(batch: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """The first `rows` rows of a padded batch, trimmed to their longest."""
    width = int(batch["attention_mask"][:rows].sum(1).max())
    return {name: tensor[:rows, :width] for name, tensor in batch.items()}


@dataclass
class LogitProbe:
    """A model's logits at a padded batch's real tokens, kept as what they are computed from: the last hidden
    states (tokens x hidden) and the LM head. Tokens x vocab fp32 logits (0.8 GB for 16 alpaca rows at GPT-2's
    50,257 columns) only ever exist perplexity.HEAD_CHUNK positions at a time."""

    hidden: torch.Tensor
    head: torch.nn.Module

    @classmethod
    @torch.no_grad()
    def capture(cls, model, batch: dict[str, torch.Tensor]) -> LogitProbe:
        """Row by row, each at its own length: padding the rows to the longest would double the work."""
        was_training = model.training
        model.eval()
        decoder, head = perplexity.decoder_and_head(model)
        rows = [ids[mask.bool()].unsqueeze(0) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        hidden = torch.cat([decoder(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
                            .last_hidden_state[0] for ids in rows])
        model.train(was_training)
        if next(head.children(), None) is not None:  # an adapted head: merging rewrites it in place
            head = copy.deepcopy(head)
        return cls(hidden, head)

    @torch.no_grad()
    def logits(self) -> Iterator[torch.Tensor]:
        for begin in range(0, len(self.hidden), perplexity.HEAD_CHUNK):
            yield self.head(self.hidden[begin:begin + perplexity.HEAD_CHUNK]).float()


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

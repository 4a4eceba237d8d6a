"""The numbers train, merge, eval and export report: perplexity (whole rows, response only, sliding windows),
the logit comparisons that verify a merged or exported model, peak memory, and package versions."""

from __future__ import annotations

import math
import resource
import sys
from importlib import metadata

import torch
import torch.nn.functional as F
from datasets import Dataset

from convobot.errors import VerificationError

IGNORE_INDEX = -100


def tokenize_for_scoring(pairs: Dataset, tokenizer, max_length: int, completion_only: bool) -> list[dict]:
    """prompt/completion pairs -> input_ids and labels, the way TRL's SFTTrainer builds them.

    EOS closes every completion and is scored. Prompt tokens get IGNORE_INDEX when
    `completion_only`. Rows keep their first `max_length` tokens.
    """
    prompts = tokenizer(list(pairs["prompt"]), add_special_tokens=False)["input_ids"]
    full = tokenizer([p + c for p, c in zip(pairs["prompt"], pairs["completion"])], add_special_tokens=False)
    rows = []
    for prompt_ids, ids in zip(prompts, full["input_ids"]):
        ids = (ids + [tokenizer.eos_token_id])[:max_length]
        labels = list(ids)
        if completion_only:
            masked = min(len(prompt_ids), len(ids))
            labels[:masked] = [IGNORE_INDEX] * masked
        if any(label != IGNORE_INDEX for label in labels):
            rows.append({"input_ids": ids, "labels": labels})
    return rows


def pad_batch(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Labels pad with IGNORE_INDEX, never by pad id: GPT-2's pad is its EOS,
    and the final EOS of each row must still be scored."""
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def token_nll(model, rows: list[dict], pad_token_id: int, batch_size: int = 16) -> tuple[float, int]:
    """Sum of next-token NLL over scored (label != IGNORE_INDEX) tokens, and their count."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = pad_batch(rows[start:start + batch_size], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift_logits = logits[:, :-1].float()
        shift_labels = batch["labels"][:, 1:]
        nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((shift_labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total_nll, total_tokens


def perplexity(model, rows: list[dict], pad_token_id: int, batch_size: int = 16) -> dict:
    """exp(sum of token NLL / number of scored tokens): independent of batch size and padding."""
    nll, tokens = token_nll(model, rows, pad_token_id, batch_size)
    if tokens == 0:
        raise ValueError("no scored tokens: every label is masked")
    mean = nll / tokens
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": tokens}


def perplexities(model, pairs: Dataset, tokenizer, max_length: int, batch_size: int = 16) -> dict:
    """Full-sequence and response-only perplexity of prompt/completion pairs (the two ways to score SFT)."""
    return {
        name: perplexity(model, tokenize_for_scoring(pairs, tokenizer, max_length, completion_only),
                         tokenizer.pad_token_id, batch_size)
        for name, completion_only in (("full", False), ("response", True))
    }


def token_stream(pairs: Dataset, tokenizer) -> list[int]:
    """All pairs as one token stream (prompt + completion + EOS, back to back), untruncated."""
    rows = tokenize_for_scoring(pairs, tokenizer, max_length=sys.maxsize, completion_only=False)
    return [token for row in rows for token in row["input_ids"]]


def sliding_windows(input_ids: list[int], window: int, stride: int) -> list[dict]:
    """Cut a token stream longer than the context into windows of `window` tokens, one every `stride`.

    Each window scores only the tokens the previous one did not, so every token after the first is
    scored exactly once, and (past the first window) with at least window - stride tokens of context.
    """
    if not 0 < stride < window:
        raise ValueError(f"sliding window needs 0 < stride < window, got stride={stride}, window={window}")
    rows, scored_until = [], 0
    for begin in range(0, len(input_ids), stride):
        end = min(begin + window, len(input_ids))
        ids = input_ids[begin:end]
        seen = scored_until - begin  # these were targets of the previous window: context only
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * seen + ids[seen:]})
        scored_until = end
        if end == len(input_ids):
            break
    return rows


def sliding_window_perplexity(model, input_ids: list[int], window: int, stride: int, pad_token_id: int,
                              batch_size: int = 16) -> dict:
    """Strided sliding-window perplexity of one long token stream (the usual way to score text
    longer than the model's context)."""
    rows = sliding_windows(input_ids, window, stride)
    return perplexity(model, rows, pad_token_id, batch_size) | {"window": window, "stride": stride,
                                                                  "windows": len(rows)}


def probe_batch(pairs: Dataset, tokenizer, rows: int, max_length: int) -> dict[str, torch.Tensor]:
    """A padded batch of whole held-out rows (prompt + response) for the logit comparisons."""
    scored = tokenize_for_scoring(pairs.select(range(min(rows, len(pairs)))), tokenizer, max_length, False)
    batch = pad_batch(scored, tokenizer.pad_token_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def real_token_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits at the non-padding positions only (padding positions carry no meaning)."""
    logits = model(**batch).logits.float()
    return logits[batch["attention_mask"].bool()]


def check_logits_match(reference: torch.Tensor, candidate: torch.Tensor, tolerance: float, what: str) -> float:
    """Max |reference - candidate|; raises VerificationError naming `what` above `tolerance`."""
    diff = (reference - candidate).abs().max().item()
    if not diff <= tolerance:  # also catches NaN
        raise VerificationError(f"{what}: logits differ by max |diff| = {diff:.3g} > tolerance {tolerance:g}")
    return diff


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

"""Perplexity of held-out rows and of token streams, streamed so that GPT-2's 50,257-column logits never exist for
a whole batch.

A scored row is its token ids and, per kind of score, the first position whose token is a target, or the
[start, end) spans of target positions:

    {"input_ids": [...], "scored_from": {"full": 1, "response": 23}}                  an Alpaca pair
    {"input_ids": [...], "scored_from": {"full": 1, "response": [[23, 31], [52, 60]]}}   a conversation

"full" scores every token after the first (the whole text), "response" the answers and their EOS (what SFT trains
with completion-only / assistant-only loss), "sliding" the tokens a window adds to a stream. One forward pass per
batch serves every kind: the transformer runs once, then the LM head runs only on the positions some kind scores,
HEAD_CHUNK at a time. Batches are sized by padded tokens, not rows, so long rows do not multiply memory. Perplexity is
exp(sum of token NLL / number of scored tokens): independent of batching and padding.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from convobot.data.examples import char_budget, cut_example, cut_pair, encode_conversation

# Positions the LM head scores at once: their fp32 logits and cross-entropy's log-softmax of them are
# 2 x 512 x 50,257 x 4 bytes = 206 MB for GPT-2, whatever the batch.
HEAD_CHUNK = 512
# Padded tokens per forward batch: the transformer's activations are freed layer by layer without grad, so this
# bounds them (and the attention scores of the longest row) rather than a row count.
BATCH_TOKENS = 4096


def encode_pairs(pairs, tokenizer, max_length: int) -> list[dict]:
    """prompt/completion pairs -> scored rows, the way TRL's SFTTrainer tokenizes them: prompt + completion + EOS,
    keeping the first `max_length` tokens. A row whose answer was cut away scores nothing as "response"."""
    budget = char_budget(tokenizer, max_length)  # a huge row costs what max_length tokens cost
    cut = [cut_pair(pair, budget) for pair in pairs]
    prompts = tokenizer([pair["prompt"] for pair in cut], add_special_tokens=False)["input_ids"]
    texts = [pair["prompt"] + pair["completion"] for pair in cut]
    rows = []
    for prompt_ids, ids in zip(prompts, tokenizer(texts, add_special_tokens=False)["input_ids"]):
        ids = (ids + [tokenizer.eos_token_id])[:max_length]
        rows.append({"input_ids": ids, "scored_from": {"full": 1, "response": max(1, len(prompt_ids))}})
    return rows


def encode_conversations(conversations, tokenizer, max_length: int) -> list[dict]:
    """Conversations -> scored rows as TRL tokenizes them (the chat template, first `max_length` tokens): "response"
    is every assistant turn with its EOS."""
    budget = char_budget(tokenizer, max_length)
    rows = []
    for messages in conversations:
        ids, mask = encode_conversation(cut_example({"messages": messages}, budget)["messages"], tokenizer)
        ids, mask = ids[:max_length], mask[:max_length]
        starts = [t for t in range(len(mask)) if mask[t] and (t == 0 or not mask[t - 1])]
        ends = [t + 1 for t in range(len(mask)) if mask[t] and (t + 1 == len(mask) or not mask[t + 1])]
        rows.append({"input_ids": ids, "scored_from": {"full": 1, "response": [[max(1, a), b] for a, b in
                                                                              zip(starts, ends)]}})
    return rows


def encode_examples(examples, tokenizer, max_length: int) -> list[dict]:
    """Examples (a Dataset of prompt/completion pairs or of conversations) -> scored rows."""
    if "messages" in examples.column_names:
        return encode_conversations(examples["messages"], tokenizer, max_length)
    return encode_pairs(examples, tokenizer, max_length)


def token_stream(examples, tokenizer) -> list[int]:
    """All examples as one token stream (prompt + completion + EOS, back to back), untruncated."""
    return [token for row in encode_examples(examples, tokenizer, max_length=sys.maxsize) for token in row["input_ids"]]


def _scored(where, length: int) -> list[tuple[int, int]]:
    """A kind's target positions as [start, end) spans: from a first position to the end, or spans."""
    return [(where, length)] if isinstance(where, int) else [(start, min(end, length)) for start, end in where]


def sliding_windows(input_ids: list[int], window: int, stride: int) -> list[dict]:
    """Cut a token stream longer than the context into windows of `window` tokens, one every `stride`.

    Each window scores only the tokens the previous one did not, so every token after the first is scored
    exactly once, and (past the first window) with at least window - stride tokens of context.
    """
    if not 0 < stride < window:
        raise ValueError(f"sliding window needs 0 < stride < window, got stride={stride}, window={window}")
    rows, scored_until = [], 0
    for begin in range(0, len(input_ids), stride):
        end = min(begin + window, len(input_ids))
        # Tokens before `scored_until` were targets of the previous window: context only here.
        rows.append({"input_ids": input_ids[begin:end], "scored_from": {"sliding": max(1, scored_until - begin)}})
        scored_until = end
        if end == len(input_ids):
            break
    return rows


def token_batches(rows: list[dict], batch_tokens: int) -> list[list[dict]]:
    """Rows grouped, longest first, so that each batch's padded size (rows x longest) stays within
    `batch_tokens`; a row longer than that is a batch of its own."""
    ordered = sorted(rows, key=lambda row: len(row["input_ids"]), reverse=True)
    batches: list[list[dict]] = []
    for row in ordered:
        if batches and (len(batches[-1]) + 1) * len(batches[-1][0]["input_ids"]) <= batch_tokens:
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


def pad(sequences: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids and attention_mask. Padding is never scored: what is scored is named by
    position, not by token id (GPT-2's pad is its EOS, and each answer's final EOS is scored)."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, ids in enumerate(sequences):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def decoder_and_head(model):
    """The transformer and the LM head of a causal LM whose logits are lm_head(last hidden state) (GPT-2, Llama,
    ...), a PEFT model's adapted base included."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model, inner.get_output_embeddings()


@torch.no_grad()
def nll_sums(model, rows: list[dict], pad_token_id: int, batch_tokens: int = BATCH_TOKENS) -> dict[str, tuple]:
    """Per kind of score: (sum of next-token NLL, number of scored tokens) over `rows`."""
    was_training = model.training
    model.eval()
    decoder, head = decoder_and_head(model)
    device = head.weight.device
    kinds = sorted({kind for row in rows for kind in row["scored_from"]})
    totals = {kind: [0.0, 0] for kind in kinds}
    try:
        for batch in token_batches(rows, batch_tokens):
            inputs = {name: t.to(device) for name, t in pad([r["input_ids"] for r in batch], pad_token_id).items()}
            hidden = decoder(**inputs, use_cache=False).last_hidden_state
            # Target position t is predicted by the hidden state at t - 1.
            rows_at, targets_at, scored = [], [], {kind: [] for kind in kinds}
            for i, row in enumerate(batch):
                length = len(row["input_ids"])
                spans = {kind: _scored(where, length) for kind, where in row["scored_from"].items()}
                first = min((start for kind_spans in spans.values() for start, _ in kind_spans), default=length)
                positions = range(first, length)
                rows_at += [i] * len(positions)
                targets_at += positions
                for kind in kinds:
                    flags = [False] * len(positions)
                    for start, end in spans.get(kind, []):
                        flags[start - first:end - first] = [True] * max(0, end - start)
                    scored[kind] += flags
            if not targets_at:
                continue
            rows_at, targets_at = torch.tensor(rows_at, device=device), torch.tensor(targets_at, device=device)
            states, targets = hidden[rows_at, targets_at - 1], inputs["input_ids"][rows_at, targets_at]
            masks = {kind: torch.tensor(flags, dtype=torch.bool, device=device) for kind, flags in scored.items()}
            for begin in range(0, len(targets), HEAD_CHUNK):
                chunk = slice(begin, begin + HEAD_CHUNK)
                logits = head(states[chunk]).float()
                nll = F.cross_entropy(logits, targets[chunk], reduction="none").double()
                for kind in kinds:
                    totals[kind][0] += nll[masks[kind][chunk]].sum().item()
                    totals[kind][1] += int(masks[kind][chunk].sum())
    finally:
        model.train(was_training)
    return {kind: tuple(total) for kind, total in totals.items()}


def perplexity(nll: float, tokens: int) -> dict:
    """exp(sum of token NLL / number of scored tokens)."""
    if tokens == 0:
        raise ValueError("no scored tokens: every position is masked")
    return {"loss": nll / tokens, "perplexity": math.exp(nll / tokens), "tokens": tokens}


def score_rows(model, rows: list[dict], pad_token_id: int, batch_tokens: int = BATCH_TOKENS) -> dict[str, dict]:
    """Perplexity of `rows` for each kind of score they name."""
    return {kind: perplexity(*sums) for kind, sums in nll_sums(model, rows, pad_token_id, batch_tokens).items()}


def perplexities(model, examples, tokenizer, max_length: int, batch_tokens: int = BATCH_TOKENS) -> dict[str, dict]:
    """Full-sequence and response-only perplexity of examples (the two ways to score SFT), from one pass."""
    return score_rows(model, encode_examples(examples, tokenizer, max_length), tokenizer.pad_token_id, batch_tokens)


def sliding_window_perplexity(model, input_ids: list[int], window: int, stride: int, pad_token_id: int,
                              batch_tokens: int = BATCH_TOKENS) -> dict:
    """Strided sliding-window perplexity of one long token stream (the usual way to score text longer than the
    model's context)."""
    rows = sliding_windows(input_ids, window, stride)
    result = score_rows(model, rows, pad_token_id, batch_tokens)["sliding"]
    return result | {"window": window, "stride": stride, "windows": len(rows)}

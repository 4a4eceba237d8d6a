"""The streaming scorer against the plain definition of perplexity (whole logits, cross-entropy over labels), and
what makes it stream: batches sized by tokens, the LM head only on scored positions, a chunk at a time."""

import math

import pytest
import torch
import torch.nn.functional as F

from convobot.config import DataConfig, ModelConfig
from convobot.data.examples import prepare
from convobot.model.base import load_base_model
from convobot.model.loss_head import IGNORE_INDEX
from convobot.model.tokenizer import load_tokenizer
from convobot.scoring import perplexity


@pytest.fixture(scope="module")
def setup():
    tokenizer = load_tokenizer("bundled")
    model = load_base_model(ModelConfig(), tokenizer).eval()  # no dropout in the definition either
    pairs = prepare(DataConfig(num_rows=120, eval_size=24), tokenizer).eval
    return tokenizer, model, pairs


@torch.no_grad()
def plain_perplexity(model, rows, kind, pad_token_id, batch_size=4) -> dict:
    """The definition: each batch's whole logits, labels masked before the kind's first scored position."""
    nll, tokens = 0.0, 0
    for begin in range(0, len(rows), batch_size):
        batch = rows[begin:begin + batch_size]
        width = max(len(row["input_ids"]) for row in batch)
        ids = torch.full((len(batch), width), pad_token_id)
        labels = torch.full((len(batch), width), IGNORE_INDEX)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            n, start = len(row["input_ids"]), row["scored_from"][kind]
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, start:n] = ids[i, start:n]
            mask[i, :n] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum").item()
        tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return perplexity.perplexity(nll, tokens)


def test_streamed_scores_equal_the_plain_definition(setup):
    tokenizer, model, pairs = setup
    rows = perplexity.encode_pairs(pairs, tokenizer, 128)
    streamed = perplexity.score_rows(model, rows, tokenizer.pad_token_id)
    for kind in ("full", "response"):
        plain = plain_perplexity(model, rows, kind, tokenizer.pad_token_id)
        assert streamed[kind]["tokens"] == plain["tokens"] > 0
        assert math.isclose(streamed[kind]["perplexity"], plain["perplexity"], rel_tol=1e-6), kind
    assert streamed["full"]["tokens"] > streamed["response"]["tokens"]


@pytest.mark.parametrize("batch_tokens", [1, 200, 10_000])
def test_perplexity_is_independent_of_the_token_budget(setup, batch_tokens):
    tokenizer, model, pairs = setup
    rows = perplexity.encode_pairs(pairs, tokenizer, 128)
    reference = perplexity.score_rows(model, rows, tokenizer.pad_token_id, batch_tokens=1_000_000)
    scores = perplexity.score_rows(model, rows, tokenizer.pad_token_id, batch_tokens=batch_tokens)
    for kind in ("full", "response"):
        assert scores[kind]["tokens"] == reference[kind]["tokens"]
        assert math.isclose(scores[kind]["perplexity"], reference[kind]["perplexity"], rel_tol=1e-6)


def test_batches_hold_at_most_the_token_budget(setup):
    tokenizer, _, pairs = setup
    rows = perplexity.encode_pairs(pairs, tokenizer, 128)
    batches = perplexity.token_batches(rows, batch_tokens=300)
    assert sorted(map(id, (r for b in batches for r in b))) == sorted(map(id, rows))  # every row, once
    assert all(len(b) * max(len(r["input_ids"]) for r in b) <= 300 or len(b) == 1 for b in batches)
    assert len(perplexity.token_batches(rows, batch_tokens=1)) == len(rows)  # a row over the budget: alone


def test_the_head_runs_on_scored_positions_a_chunk_at_a_time(setup, monkeypatch):
    tokenizer, model, pairs = setup
    rows = perplexity.encode_pairs(pairs, tokenizer, 128)
    before = perplexity.score_rows(model, rows, tokenizer.pad_token_id)
    monkeypatch.setattr(perplexity, "HEAD_CHUNK", 16)
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    try:
        after = perplexity.score_rows(model, rows, tokenizer.pad_token_id)
    finally:
        hook.remove()
    assert all(len(shape) == 2 and shape[0] <= 16 for shape in seen)  # (positions, hidden), never (batch, seq, .)
    # Every scored position once (all positions after each row's first token), and nothing else.
    assert sum(shape[0] for shape in seen) == sum(len(r["input_ids"]) - 1 for r in rows) == after["full"]["tokens"]
    for kind in ("full", "response"):
        assert math.isclose(after[kind]["perplexity"], before[kind]["perplexity"], rel_tol=1e-6)


def test_perplexity_is_exp_of_token_weighted_nll(setup):
    tokenizer, model, pairs = setup
    rows = perplexity.encode_pairs(pairs, tokenizer, 128)
    nll, tokens = perplexity.nll_sums(model, rows, tokenizer.pad_token_id)["response"]
    assert math.isclose(perplexity.score_rows(model, rows, tokenizer.pad_token_id)["response"]["perplexity"],
                        math.exp(nll / tokens))


def test_final_eos_is_scored_although_pad_equals_eos(setup):
    tokenizer, model, pairs = setup
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    rows = perplexity.encode_pairs(pairs, tokenizer, 128)
    assert all(row["input_ids"][-1] == tokenizer.eos_token_id for row in rows)
    # Response tokens counted: each row's positions from its first answer token to its last, the EOS.
    _, tokens = perplexity.nll_sums(model, rows, tokenizer.pad_token_id, batch_tokens=10_000)["response"]
    assert tokens == sum(len(row["input_ids"]) - row["scored_from"]["response"] for row in rows)


def test_response_scoring_starts_after_the_prompt(setup):
    tokenizer, _, pairs = setup
    row = perplexity.encode_pairs(pairs, tokenizer, 128)[0]
    prompt_len = len(tokenizer(pairs[0]["prompt"], add_special_tokens=False)["input_ids"])
    assert row["scored_from"] == {"full": 1, "response": prompt_len}
    cut = perplexity.encode_pairs(pairs.select([0]), tokenizer, prompt_len - 3)[0]  # the answer cut away
    assert len(cut["input_ids"]) == prompt_len - 3 < cut["scored_from"]["response"]


def test_no_scored_tokens_raise(setup):
    tokenizer, model, _ = setup
    with pytest.raises(ValueError, match="no scored tokens"):
        perplexity.score_rows(model, [{"input_ids": [5, 6, 7], "scored_from": {"response": 3}}], tokenizer.pad_token_id)

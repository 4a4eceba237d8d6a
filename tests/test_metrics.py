import math

import pytest
import torch

from convobot.config import ModelConfig
from convobot.data import prepare
from convobot.config import DataConfig
from convobot.metrics import IGNORE_INDEX, pad_batch, perplexity, token_nll, tokenize_for_scoring
from convobot.modeling import load_base_model, load_tokenizer


@pytest.fixture(scope="module")
def setup():
    tokenizer = load_tokenizer("bundled")
    model = load_base_model(ModelConfig(), tokenizer)
    pairs = prepare(DataConfig(num_rows=120, eval_size=24), tokenizer).eval
    return tokenizer, model, pairs


def test_perplexity_is_independent_of_batch_size(setup):
    tokenizer, model, pairs = setup
    rows = tokenize_for_scoring(pairs, tokenizer, 128, completion_only=False)
    one = perplexity(model, rows, tokenizer.pad_token_id, batch_size=1)
    eight = perplexity(model, rows, tokenizer.pad_token_id, batch_size=8)
    assert one["tokens"] == eight["tokens"]
    assert math.isclose(one["perplexity"], eight["perplexity"], rel_tol=1e-5)


def test_perplexity_is_exp_of_token_weighted_nll(setup):
    tokenizer, model, pairs = setup
    rows = tokenize_for_scoring(pairs, tokenizer, 128, completion_only=True)
    nll, tokens = token_nll(model, rows, tokenizer.pad_token_id)
    assert math.isclose(perplexity(model, rows, tokenizer.pad_token_id)["perplexity"], math.exp(nll / tokens))


def test_final_eos_is_scored_although_pad_equals_eos(setup):
    tokenizer, _, pairs = setup
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    rows = tokenize_for_scoring(pairs, tokenizer, 128, completion_only=True)
    batch = pad_batch(rows[:4], tokenizer.pad_token_id)
    for row, labels, mask in zip(rows, batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        assert labels[n - 1] == tokenizer.eos_token_id  # last real token: EOS, scored
        assert (labels[n:] == IGNORE_INDEX).all()  # padding: not scored, though it is the same id


def test_completion_only_masks_the_prompt(setup):
    tokenizer, _, pairs = setup
    full = tokenize_for_scoring(pairs, tokenizer, 128, completion_only=False)
    response = tokenize_for_scoring(pairs, tokenizer, 128, completion_only=True)
    prompt_len = len(tokenizer(pairs[0]["prompt"], add_special_tokens=False)["input_ids"])
    assert response[0]["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert full[0]["labels"] == full[0]["input_ids"]


def test_all_masked_rows_raise(setup):
    tokenizer, model, _ = setup
    with pytest.raises(ValueError, match="no scored tokens"):
        perplexity(model, [], tokenizer.pad_token_id)

"""Logit probes (logits kept as hidden states + head) against whole logits, and the tolerance check."""

import copy
import math

import pytest
import torch

from convobot import metrics
from convobot.config import DataConfig, ModelConfig
from convobot.data import prepare
from convobot.errors import VerificationError
from convobot.modeling import load_base_model, load_tokenizer


@pytest.fixture(scope="module")
def setup():
    tokenizer = load_tokenizer("bundled")
    model = load_base_model(ModelConfig(), tokenizer).eval()
    pairs = prepare(DataConfig(num_rows=60, eval_size=12), tokenizer).eval
    return tokenizer, model, metrics.probe_batch(pairs, tokenizer, rows=6, max_length=128)


def test_a_probe_holds_the_logits_of_the_real_tokens(setup):
    _, model, batch = setup
    probe = metrics.LogitProbe.capture(model, batch)
    assert probe.hidden.shape == (int(batch["attention_mask"].sum()), model.config.n_embd)  # not x vocab
    whole = metrics.real_token_logits(model, batch)
    assert torch.allclose(torch.cat(list(probe.logits())), whole, atol=1e-5)


def test_max_logit_difference_is_that_of_the_whole_logits(setup):
    _, model, batch = setup
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.transformer.h[0].mlp.c_fc.weight[0, :] += 0.5
    expected = (metrics.real_token_logits(model, batch) - metrics.real_token_logits(changed, batch)).abs().max().item()
    measured = metrics.max_logit_difference(metrics.LogitProbe.capture(model, batch),
                                            metrics.LogitProbe.capture(changed, batch))
    assert expected > 1e-3 and math.isclose(measured, expected, rel_tol=1e-4)
    same = metrics.LogitProbe.capture(model, batch)
    assert metrics.max_logit_difference(same, metrics.LogitProbe.capture(model, batch)) == 0.0


def test_nan_logits_fail_the_check(setup):
    _, model, batch = setup
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.transformer.ln_f.weight[0] = float("nan")
    difference = metrics.max_logit_difference(metrics.LogitProbe.capture(model, batch),
                                              metrics.LogitProbe.capture(broken, batch))
    assert math.isnan(difference)
    with pytest.raises(VerificationError, match="nan > tolerance"):
        metrics.check_within(difference, 1e-4, "broken")
    assert metrics.check_within(5e-5, 1e-4, "fine") == 5e-5


def test_first_rows_trims_padding(setup):
    _, _, batch = setup
    first = metrics.first_rows(batch, 2)
    assert first["input_ids"].shape[0] == 2
    assert first["attention_mask"][:, -1].any()  # no all-padding column left


def test_stopwatch_adds_up_each_stage():
    clock = metrics.Stopwatch()
    for _ in range(2):
        with clock("stage"):
            pass
    with pytest.raises(RuntimeError):
        with clock("failed"):
            raise RuntimeError("still timed")
    assert set(clock.seconds) == {"stage", "failed"} and all(s >= 0 for s in clock.seconds.values())

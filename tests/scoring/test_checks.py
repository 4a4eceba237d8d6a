"""Logit probes (logits kept as hidden states + head) against whole logits, and the tolerance check."""

import copy
import math

import pytest
import torch

from convobot.config import DataConfig, ModelConfig
from convobot.data.examples import prepare
from convobot.errors import VerificationError
from convobot.model.base import load_base_model
from convobot.model.tokenizer import load_tokenizer
from convobot.scoring import checks
from convobot.scoring.measure import Stopwatch


@pytest.fixture(scope="module")
def setup():
    tokenizer = load_tokenizer("bundled")
    model = load_base_model(ModelConfig(), tokenizer).eval()
    pairs = prepare(DataConfig(num_rows=60, eval_size=12), tokenizer).eval
    return tokenizer, model, checks.probe_batch(pairs, tokenizer, rows=6, max_length=128)


def test_a_probe_holds_the_logits_of_the_real_tokens(setup):
    _, model, batch = setup
    probe = checks.LogitProbe.capture(model, batch)
    assert probe.hidden.shape == (int(batch["attention_mask"].sum()), model.config.n_embd)  # not x vocab
    whole = checks.real_token_logits(model, batch)
    assert torch.allclose(torch.cat(list(probe.logits())), whole, atol=1e-5)


def test_max_logit_difference_is_that_of_the_whole_logits(setup):
    _, model, batch = setup
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.transformer.h[0].mlp.c_fc.weight[0, :] += 0.5
    expected = (checks.real_token_logits(model, batch) - checks.real_token_logits(changed, batch)).abs().max().item()
    measured = checks.max_logit_difference(checks.LogitProbe.capture(model, batch),
                                            checks.LogitProbe.capture(changed, batch))
    assert expected > 1e-3 and math.isclose(measured, expected, rel_tol=1e-4)
    same = checks.LogitProbe.capture(model, batch)
    assert checks.max_logit_difference(same, checks.LogitProbe.capture(model, batch)) == 0.0


def test_nan_logits_fail_the_check(setup):
    _, model, batch = setup
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.transformer.ln_f.weight[0] = float("nan")
    difference = checks.max_logit_difference(checks.LogitProbe.capture(model, batch),
                                              checks.LogitProbe.capture(broken, batch))
    assert math.isnan(difference)
    with pytest.raises(VerificationError, match="nan > tolerance"):
        checks.check_within(difference, 1e-4, "broken")
    assert checks.check_within(5e-5, 1e-4, "fine") == 5e-5


def test_first_rows_trims_padding(setup):
    _, _, batch = setup
    first = checks.first_rows(batch, 2)
    assert first["input_ids"].shape[0] == 2
    assert first["attention_mask"][:, -1].any()  # no all-padding column left


def test_stopwatch_adds_up_each_stage():
    clock = Stopwatch()
    for _ in range(2):
        with clock("stage"):
            pass
    with pytest.raises(RuntimeError):
        with clock("failed"):
            raise RuntimeError("still timed")
    assert set(clock.seconds) == {"stage", "failed"} and all(s >= 0 for s in clock.seconds.values())

"""The embedded base: the shipped weights are the ones its recipe recorded, it knows the skills in its own notation
and not the Alpaca format, and the script that made it runs."""

import hashlib
import json
import random

import pytest
import torch

from convobot.config import ModelConfig
from convobot.data.tasks import exact_match, generate_rows
from convobot.model.base import BUNDLED_BASE_DIR, load_base_model
from convobot.model.tokenizer import load_tokenizer
from convobot.scoring.generate import answer
from convobot.training import pretrain


@pytest.fixture(scope="module")
def base():
    tokenizer = load_tokenizer("bundled")
    return load_base_model(ModelConfig(), tokenizer).eval(), tokenizer


def test_the_shipped_weights_match_their_recorded_checksum():
    recipe = json.loads((BUNDLED_BASE_DIR / "recipe.json").read_text())
    digest = hashlib.sha256((BUNDLED_BASE_DIR / "model.safetensors").read_bytes()).hexdigest()
    assert digest == recipe["model_sha256"]
    assert recipe["licence"] == "apache-2.0" and recipe["loss_curve"][-1]["eval_loss"] < recipe["loss_curve"][0]["loss"]
    assert (BUNDLED_BASE_DIR / "model.safetensors").stat().st_size < 4 * 2**20  # a few MB in the package


def test_the_base_loads_with_the_recorded_architecture(base):
    model, _ = base
    shape = {key: getattr(model.config, key) for key in pretrain.ARCHITECTURE}
    assert shape == pretrain.ARCHITECTURE


@torch.no_grad()
def test_it_knows_the_skills_in_its_own_notation(base):
    model, tokenizer = base
    rng, right = random.Random(7), 0
    lines = [pretrain.terse_line(rng) for _ in range(60)]
    for line in lines:
        question, expected = line.rsplit(" = ", 1)
        # The space before an answer belongs to its first token (byte-level BPE): the prompt stops at "=".
        ids = tokenizer(question + " =", return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        right += tokenizer.decode(out[0, ids.shape[1]:]).split("\n")[0].strip() == expected
    assert right / len(lines) >= 0.8


def test_it_does_not_know_the_alpaca_format(base):
    """Before fine-tuning: the Alpaca prompts of the bundled tasks get almost no exact answer."""
    model, tokenizer = base
    rows = generate_rows(60, seed=5)
    assert exact_match(answer(model, tokenizer, rows, max_new_tokens=16), [r["output"] for r in rows]) <= 0.1


def test_the_pretraining_script_writes_a_loadable_base(tmp_path):
    recipe = pretrain.pretrain(steps=4, batch=4, length=32, lr=1e-3, seed=0, out=tmp_path / "base", log_every=2)
    assert [point["step"] for point in recipe["loss_curve"]] == [2, 4]
    assert hashlib.sha256((tmp_path / "base" / "model.safetensors").read_bytes()).hexdigest() == recipe["model_sha256"]
    config = ModelConfig(source="hub", name=str(tmp_path / "base"))
    assert load_base_model(config, load_tokenizer(str(tmp_path / "base"))).config.n_layer == 2

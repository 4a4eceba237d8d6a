"""Each row with its own LoRA adapter in two batched matmuls per layer: the logits peft gives each row alone."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from convobot.serving.row_lora import BASE, use_row_lora


@pytest.fixture(scope="module")
def two_adapters():
    """A 2-layer GPT-2 with two random LoRA adapters of different ranks and targets (rsLoRA on one)."""
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                            init_lora_weights=False), adapter_name="a0")
    model.add_adapter("a1", LoraConfig(r=8, lora_alpha=32, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                       use_rslora=True, init_lora_weights=False))
    return model.eval()


@torch.no_grad()
def test_rows_of_mixed_adapters_get_what_each_adapter_gives_alone(two_adapters):
    model = two_adapters
    ids = torch.randint(0, 128, (4, 6))
    names = ["a0", BASE, "a1", "a0"]
    alone = []
    for row, name in zip(ids, names):
        if name == BASE:
            with model.disable_adapter():
                alone.append(model(row[None]).logits[0])
        else:
            model.set_adapter(name)
            alone.append(model(row[None]).logits[0])
    peft_mixed = model(ids, adapter_names=names).logits
    assert use_row_lora(model) == 2 * 4  # c_attn, c_proj (attention and MLP), c_fc: the layers some adapter targets
    rows = model(ids, adapter_names=names).logits
    assert torch.allclose(rows, torch.stack(alone), atol=1e-5)
    assert torch.allclose(rows, peft_mixed, atol=1e-5)
    assert use_row_lora(model) == 0  # swapped once

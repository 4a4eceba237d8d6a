import pytest
import torch

from convobot.config import ModelConfig, PeftConfig
from convobot.errors import AdapterError
from convobot.model.adapters import apply_peft
from convobot.model.base import count_parameters, load_base_model, set_dropout, use_fused_gelu
from convobot.model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("bundled")


def tiny(tokenizer, **kw):
    return load_base_model(ModelConfig(**kw), tokenizer)


def test_lora_trainable_params_match_hand_count(tokenizer):
    layers, d, r = 2, 128, 8
    model = apply_peft(tiny(tokenizer, n_layer=layers, n_embd=d), PeftConfig(r=r))
    # Per block, LoRA adds r*(in+out) per target: c_attn d->3d, attn.c_proj d->d, c_fc d->4d, mlp.c_proj 4d->d.
    per_block = r * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    assert count_parameters(model).trainable == layers * per_block == 32_768


def test_full_fine_tune_trains_everything(tokenizer):
    model = apply_peft(tiny(tokenizer), PeftConfig(method="full"))
    params = count_parameters(model)
    assert params.trainable == params.total > 0


def test_lora_update_has_conv1d_shape(tokenizer):
    """fan_in_fan_out=True: Conv1D stores (in, out); the merged delta must match that layout."""
    model = apply_peft(tiny(tokenizer), PeftConfig(r=4))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    assert layer.get_delta_weight("default").shape == layer.base_layer.weight.shape == (128, 384)


def test_target_matching_nothing_is_refused(tokenizer):
    with pytest.raises(AdapterError, match=r"q_proj"):
        apply_peft(tiny(tokenizer), PeftConfig(target_modules=["q_proj"]))


def test_tiny_model_is_reproducible_and_uses_sdpa(tokenizer):
    first, second = tiny(tokenizer), tiny(tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    assert first.config._attn_implementation == "sdpa"
    assert first.config.vocab_size == len(tokenizer)


def test_gradient_checkpointing_with_lora_reaches_adapters(tokenizer):
    model = apply_peft(tiny(tokenizer), PeftConfig(), gradient_checkpointing=True)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    ids = torch.randint(0, len(tokenizer), (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    # lora_B starts at zero (so lora_A's first gradient is zero); lora_B's must be non-zero.
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_set_dropout_switches_training_dropout_off_but_not_the_config(tokenizer):
    model = load_base_model(ModelConfig(), tokenizer).train()
    ids = torch.randint(0, len(tokenizer), (2, 16))
    assert set_dropout(model, None) == 0
    assert not torch.equal(model(ids).logits, model(ids).logits)  # control: GPT-2's 0.1 dropout is random
    assert set_dropout(model, 0.0) > 0
    assert torch.equal(model(ids).logits, model(ids).logits)
    assert model.config.attn_pdrop == model.config.resid_pdrop == 0.1  # a saved/released config keeps GPT-2's


def test_fused_gelu_computes_what_gelu_new_does(tokenizer):
    import copy

    from transformers.activations import NewGELUActivation

    model = load_base_model(ModelConfig(), tokenizer)
    set_dropout(model, 0.0)
    fused = copy.deepcopy(model)
    assert use_fused_gelu(fused) == ModelConfig().n_layer
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    ids = torch.randint(0, len(tokenizer), (2, 16))
    for m in (model, fused):
        m(ids, labels=ids).loss.backward()
    assert torch.allclose(fused(ids).logits, model(ids).logits, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), fused.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_asking_for_cuda_without_a_gpu_names_the_key():
    from convobot.config import Device
    from convobot.errors import ConfigError
    from convobot.model.base import resolve_device

    with pytest.raises(ConfigError, match=r"config key 'hardware.device': hardware.device=cuda but no CUDA device"):
        resolve_device(Device.cuda)
    assert resolve_device(Device.cuda, require=False).type == "cuda"  # planning for a card needs none
    assert resolve_device(Device.auto).type == "cpu"

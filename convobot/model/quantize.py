"""QLoRA's base: the frozen model's linear layers in 4 bits (bitsandbytes NF4/FP4), and the exact fp32 values of
those 4-bit weights for merging an adapter trained on them."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from convobot.config import ModelConfig, ModelSource, PeftConfig
from convobot.errors import ConfigError
from convobot.model.base import BUNDLED_BASE_DIR

QUANTIZED_SKIP = ("lm_head",)  # bitsandbytes keeps the output layer (GPT-2: tied to the embeddings) unquantised
BNB_BLOCKSIZE = 64  # transformers' 4-bit block size


def quantization_config(cfg: PeftConfig, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if cfg.quantization not in ("nf4", "fp4"):
        raise ConfigError(f"config key 'peft.quantization': {cfg.quantization!r}; use nf4, fp4 or null")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization,
                              bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=list(QUANTIZED_SKIP))


def load_quantized_base(cfg: ModelConfig, peft: PeftConfig, compute_dtype: torch.dtype, device: torch.device):
    """The base with its linear layers in 4 bits (QLoRA), prepared for k-bit training by peft: layer norms and
    the head in fp32, inputs that require grad under checkpointing."""
    if cfg.source == ModelSource.random:
        raise ConfigError("peft=qlora quantises pretrained weights: model.source=random has none (use model=tiny)")
    source = BUNDLED_BASE_DIR if cfg.source == ModelSource.bundled else cfg.name
    model = AutoModelForCausalLM.from_pretrained(
        source, revision=None if cfg.source == ModelSource.bundled else cfg.revision, dtype=compute_dtype,
        quantization_config=quantization_config(peft, compute_dtype), device_map={"": str(device)},
        attn_implementation=cfg.attn_implementation, use_safetensors=True, trust_remote_code=False)
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for inference at its first eval-mode
            # forward without grad (the held-out scoring before training), and the repacked layer cannot train.
            module.support_avx512bf16_for_cpu = False
    return model


def quantizable_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The layers bitsandbytes holds in 4 bits: every linear layer (GPT-2's Conv1D too) but the output layer and a
    LoRA adapter's own."""
    from transformers.pytorch_utils import Conv1D

    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (Conv1D, torch.nn.Linear)) and "lora_" not in name
            and name.rsplit(".", 1)[-1] not in QUANTIZED_SKIP]


@torch.no_grad()
def round_trip_4bit(model: torch.nn.Module, cfg: PeftConfig) -> int:
    """Replace each weight bitsandbytes quantises with its 4-bit value, dequantised to fp32, in place: the base a
    QLoRA adapter trained on, to merge into. transformers quantises a Conv1D in nn.Linear layout (transposed), so
    its blocks are taken the same way. Returns how many weights changed."""
    import bitsandbytes.functional as bnb
    from transformers.pytorch_utils import Conv1D

    changed = 0
    for _, module in quantizable_layers(model):
        linear = module.weight.T if isinstance(module, Conv1D) else module.weight
        packed, state = bnb.quantize_4bit(linear.float().contiguous(), blocksize=BNB_BLOCKSIZE,
                                          compress_statistics=cfg.double_quant, quant_type=cfg.quantization)
        restored = bnb.dequantize_4bit(packed, state).float()
        module.weight.copy_(restored.T if isinstance(module, Conv1D) else restored)
        changed += 1
    return changed

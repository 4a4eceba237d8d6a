"""PEFT wrapping: LoRA and its variants (DoRA, rsLoRA; QLoRA on a 4-bit base) through peft, and the checks that
refuse an adapter that would train nothing."""

from __future__ import annotations

import torch

from convobot.config import PeftConfig, PeftMethod
from convobot.errors import AdapterError
from convobot.model.base import count_parameters


def lora_config(cfg: PeftConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        # GPT-2's attention and MLP layers are transformers' Conv1D, which stores weights transposed
        # (in_features, out_features); LoRA must know or its update has the wrong shape.
        fan_in_fan_out=cfg.fan_in_fan_out,
        bias=cfg.bias,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        task_type="CAUSAL_LM",
    )


def apply_peft(model, cfg: PeftConfig, gradient_checkpointing: bool = False):
    """Wrap `model` for the configured method and refuse an adapter that would train nothing."""
    if cfg.method == PeftMethod.full:
        return model
    from peft import get_peft_model

    check_targets_exist(model, cfg.target_modules)
    if gradient_checkpointing:
        # Frozen embeddings give the checkpointed blocks inputs without grad, so nothing would flow
        # back into the adapters; make the embedding outputs require grad.
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, lora_config(cfg))
    params = count_parameters(peft_model)
    if params.trainable == 0:
        raise AdapterError(f"LoRA adapter has zero trainable parameters (targets {list(cfg.target_modules)})")
    return peft_model


def check_targets_exist(model: torch.nn.Module, targets) -> None:
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaf_names]
    if missing:
        raise AdapterError(
            f"peft.target_modules {missing} matched no module of {type(model).__name__}; "
            f"available leaf modules include {sorted(n for n in leaf_names if n)[:20]}"
        )

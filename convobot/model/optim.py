"""Which optimizer really steps: bitsandbytes 8-bit AdamW where it runs, torch AdamW otherwise.

bitsandbytes >= 0.45 has a CPU backend, so its 8-bit optimizers may run without a GPU; rather
than assume, `resolve_optimizer` probes one real step and falls back loudly if it fails.

`optim.name=auto` (the default) picks by device. On CUDA: 8-bit AdamW, whose uint8 states take a quarter
of the VRAM. On CPU: torch's fused AdamW. There memory is RAM, and bitsandbytes' CPU backend takes 1.6 s
per step over GPT-2 small's 124M parameters where fused AdamW takes 0.08 s (benchmarks/results).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# The transformers `optim` names whose optimizer is bitsandbytes' (8- and 32-bit, paged or not); torchao's
# adamw_torch_4bit / adamw_torch_8bit are not among them.
BNB_OPTIMIZERS = {"adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "lion_32bit",
                  "paged_lion_8bit", "paged_lion_32bit", "ademamix", "ademamix_8bit", "paged_ademamix_8bit",
                  "paged_ademamix_32bit", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit"}
FALLBACK = "adamw_torch"
AUTO = {"cuda": "adamw_bnb_8bit", "cpu": "adamw_torch_fused"}


@dataclass
class OptimizerChoice:
    requested: str
    name: str  # what the Trainer is given
    fallback_reason: str | None = None


def forget_bitsandbytes_overrides() -> None:
    """bitsandbytes keeps optimizer overrides (the Trainer's 32-bit embeddings) in a process-wide singleton
    keyed by parameter position. Cleared before each run, so a later run in this process (a multirun job)
    cannot inherit them: after a full fine-tune, a LoRA run's 8-bit probe got fp32 state and fell back."""
    try:
        from bitsandbytes.optim import GlobalOptimManager
    except Exception:  # not importable: the probe says why
        return
    GlobalOptimManager.get_instance().initialize()


def bnb_8bit_runs_on(device: torch.device) -> str | None:
    """None if a bitsandbytes 8-bit AdamW step works on `device` with uint8 state, else why not."""
    try:
        import bitsandbytes as bnb
    except Exception as err:  # ImportError, or a broken native library
        return f"bitsandbytes cannot be imported: {err}"
    forget_bitsandbytes_overrides()
    try:
        # 8-bit state is only used for tensors of >= 4096 elements (bitsandbytes' min_8bit_size).
        param = torch.nn.Parameter(torch.randn(64, 64, device=device))
        optimizer = bnb.optim.AdamW8bit([param], lr=1e-3)
        param.grad = torch.randn_like(param)
        optimizer.step()
        state_dtype = optimizer.state[param]["state1"].dtype
    except Exception as err:
        return f"bitsandbytes 8-bit AdamW failed on {device.type}: {err}"
    if state_dtype != torch.uint8:
        return f"bitsandbytes kept {state_dtype} optimizer state on {device.type}, not uint8"
    return None


def optimizer_name(requested: str, device_type: str) -> str:
    """The transformers `optim` name a config asks for on a device ("auto" resolved)."""
    return AUTO.get(device_type, AUTO["cpu"]) if requested == "auto" else requested


def resolve_optimizer(requested: str, device: torch.device) -> OptimizerChoice:
    name = optimizer_name(requested, device.type)
    if name not in BNB_OPTIMIZERS:
        return OptimizerChoice(requested, name)
    problem = bnb_8bit_runs_on(device)
    if problem is None:
        return OptimizerChoice(requested, name)
    message = f"optimizer '{name}' unavailable ({problem}); FALLING BACK to '{FALLBACK}' (32-bit states)"
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    log.warning(message)
    return OptimizerChoice(requested, FALLBACK, fallback_reason=problem)


def describe_optimizer(optimizer) -> str:
    """The class that actually steps, plus the dtype of its first moment state (uint8 = 8-bit)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # unwrap accelerate's AcceleratedOptimizer
    cls = type(inner)
    dtypes = {
        str(state[key].dtype).replace("torch.", "")
        for state in inner.state.values() for key in ("state1", "exp_avg") if key in state
    }
    return f"{cls.__module__}.{cls.__name__}" + (f" (state {'/'.join(sorted(dtypes))})" if dtypes else "")

"""The base model (hub, bundled or random init), its context, the device and dtype it trains in, and its training-time
settings (dropout, fused GELU)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from convobot.config import Device, ModelConfig, ModelSource, PeftMethod, Precision
from convobot.errors import ConfigError

log = logging.getLogger(__name__)

# The embedded default's base: pretrained by convobot.training.pretrain on the bundled tasks' skills (recipe.json).
BUNDLED_BASE_DIR = Path(__file__).resolve().parent.parent / "assets" / "pretrained"


def resolve_device(requested: Device, key: str = "hardware.device", require: bool = True) -> torch.device:
    """`auto`: cuda if a GPU is visible, else cpu. `require=False` names a device without checking it is here
    (planning memory for a card this machine does not have)."""
    if requested == Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if require and requested == Device.cuda and not torch.cuda.is_available():
        raise ConfigError(f"config key '{key}': {key}=cuda but no CUDA device is visible; use {key}=cpu")
    return torch.device(requested.value)


def base_dtype(precision: Precision, method: PeftMethod) -> torch.dtype:
    """LoRA under fp16 keeps a frozen fp16 base (half the memory); full fine-tuning needs fp32 weights,
    and bf16 autocasts from fp32 weights."""
    return torch.float16 if precision == Precision.fp16 and method == PeftMethod.lora else torch.float32


def tiny_gpt2_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> GPT2Config:
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        initializer_range=cfg.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def context_length(config) -> int:
    """Positions a model config, or its config.json as a dict, has embeddings for (GPT-2: n_positions)."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    return get("n_positions") or get("max_position_embeddings")


# Canonical GPT-2 sizes: their hub config.json files equal these GPT2Config arguments, so no download.
GPT2_SIZES = {
    "gpt2": {},
    "distilgpt2": {"n_layer": 6},
    "gpt2-medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16},
    "gpt2-large": {"n_layer": 36, "n_embd": 1280, "n_head": 20},
    "gpt2-xl": {"n_layer": 48, "n_embd": 1600, "n_head": 25},
}


def model_config(cfg: ModelConfig):
    """A hub, local or bundled model's config without its weights: GPT-2 sizes are built in (offline), any other
    model reads its config.json."""
    from transformers import AutoConfig

    if cfg.source == ModelSource.bundled:
        return AutoConfig.from_pretrained(BUNDLED_BASE_DIR)
    short = cfg.name.rsplit("/", 1)[-1]
    if short in GPT2_SIZES and not Path(cfg.name).is_dir():
        return GPT2Config(**GPT2_SIZES[short])
    try:
        return AutoConfig.from_pretrained(cfg.name, revision=cfg.revision, trust_remote_code=False)
    except OSError as err:
        raise ConfigError(f"config key 'model.name': cannot read the config.json of {cfg.name!r} ({err})") from err


def configured_context(cfg: ModelConfig) -> int:
    """The context of the configured model (its config.json, or the tiny model's settings), without loading it."""
    return cfg.n_positions if cfg.source == ModelSource.random else context_length(model_config(cfg))


def fit_context(max_length: int, context: int, key: str = "data.max_length") -> int:
    """Rows longer than the model's positions cannot be embedded: cut them at the context, and say so."""
    if max_length <= context:
        return max_length
    log.warning("%s=%d exceeds the model's context of %d positions: rows are cut at %d tokens",
                key, max_length, context, context)
    return context


def load_base_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype = torch.float32):
    """GPT-2 from the hub (or a local folder), or a tiny randomly initialised GPT-2.

    Weights load as safetensors only (`use_safetensors=True`); remote code is never trusted.
    """
    if cfg.source == ModelSource.bundled:
        return AutoModelForCausalLM.from_pretrained(BUNDLED_BASE_DIR, dtype=dtype, use_safetensors=True,
                                                    attn_implementation=cfg.attn_implementation,
                                                    trust_remote_code=False)
    if cfg.source == ModelSource.random:
        config = tiny_gpt2_config(cfg, tokenizer)
        config._attn_implementation = cfg.attn_implementation
        # Seeded apart from the global RNG: the same base every time, without disturbing run seeds.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            return GPT2LMHeadModel(config).to(dtype)
    return AutoModelForCausalLM.from_pretrained(
        cfg.name,
        revision=cfg.revision,
        dtype=dtype,
        attn_implementation=cfg.attn_implementation,
        use_safetensors=True,
        trust_remote_code=False,
    )


@dataclass
class ParamCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} / {self.total:,} ({self.percent:.2f}%)"


def count_parameters(model: torch.nn.Module) -> ParamCount:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_values(p) for p in model.parameters())
    return ParamCount(trainable, total)


def _values(parameter: torch.Tensor) -> int:
    """How many weights a parameter holds: a 4-bit one packs two per byte, its quant_state knows its shape."""
    state = getattr(parameter, "quant_state", None)
    return state.shape.numel() if state is not None else parameter.numel()


def prepare_for_training(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """The base model's training-time settings: dropout, and the one-kernel GELU (same maths)."""
    set_dropout(model, cfg.dropout)
    use_fused_gelu(model)


def use_fused_gelu(model: torch.nn.Module) -> int:
    """Swap transformers' `gelu_new` (GPT-2's activation) for torch's GELU with the same tanh approximation;
    returns how many were swapped. `gelu_new` is eight Python-level elementwise ops, each saving a tensor for
    backward; torch's is one kernel: ~10% of a LoRA step on CPU, less activation memory. Modules, not the config.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
                swapped += 1
    return swapped


def set_dropout(model: torch.nn.Module, probability: float | None) -> int:
    """Set every dropout module of the base model to `probability` (None: leave the checkpoint's); returns
    how many were set. Modules, not the config: a released model keeps its checkpoint's config.json.

    Why 0 is convobot's default: on CPU, SDPA has no fused kernel with dropout and falls back to the math
    path (4x the attention time at 512 tokens), and the masks cost the rest: a LoRA step on GPT-2 small
    takes ~1.5x as long with GPT-2's and LoRA's dropout, a full fine-tuning step ~1.3x (benchmarks/results).
    Recent decoders (Llama, Mistral) fine-tune without dropout.
    """
    if probability is None:
        return 0
    modules = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    for module in modules:
        module.p = probability
    return len(modules)


def upcast_trainable_to_fp32(model: torch.nn.Module) -> int:
    """With fp16 mixed precision the optimizer must step fp32 master weights: GradScaler refuses
    to unscale fp16 gradients. Returns how many tensors were upcast."""
    upcast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            upcast += 1
    return upcast

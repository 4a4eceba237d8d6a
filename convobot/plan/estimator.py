"""The plan of one training config: the model convobot-train would build, on PyTorch's meta device (real shapes
and dtypes, no storage, nothing downloaded), measured part by part at the four moments of a step."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from convobot import modeling
from convobot.config import LossHead, ModelSource, Precision, TrainConfig
from convobot.scoring import HEAD_CHUNK
from convobot.optim import optimizer_name
from convobot.plan.formulas import (ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, GiB, TRL_TOKEN_TILE, Architecture,
                                    activation_bytes, block_activation_bytes, eval_logits_bytes, loss_head_bytes,
                                    optimizer_state_bytes, quantized_4bit_bytes, tensor_bytes, triton_head)


@dataclass
class Part:
    name: str
    bytes: int
    detail: str


@dataclass
class Plan:
    title: str
    device: str
    parts: dict[str, Part]
    phases: dict[str, int]  # moment of a training run -> tensor bytes allocated then
    phase_parts: dict[str, tuple[str, ...]]
    budget: int | None  # bytes on the card (hardware.vram_gb), None = no limit known
    notes: list[str] = field(default_factory=list)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def allocated(self) -> int:
        """Peak of tensor bytes: what torch.cuda.max_memory_allocated measures."""
        return self.phases[self.peak_phase]

    @property
    def overhead(self) -> int:
        return CUDA_CONTEXT_BYTES + int(ALLOCATOR_SLACK * self.allocated) if self.device == "cuda" else 0

    @property
    def total(self) -> int:
        return self.allocated + self.overhead

    @property
    def fits(self) -> bool:
        return self.budget is None or self.total <= self.budget

    @property
    def dominant(self) -> Part:
        return max((self.parts[name] for name in self.phase_parts[self.peak_phase]), key=lambda p: p.bytes)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "peak_phase": self.peak_phase, "allocated": self.allocated,
                "overhead": self.overhead, "total": self.total, "fits": self.fits, "dominant": self.dominant.name}


def meta_model(cfg: TrainConfig, precision: Precision) -> torch.nn.Module:
    """The model `convobot.train.run` would train, with shapes and dtypes but no storage."""
    from transformers import AutoModelForCausalLM

    dtype = modeling.base_dtype(precision, cfg.peft.method)
    with torch.device("meta"):
        if cfg.model.source == ModelSource.random:
            tokenizer = modeling.load_tokenizer(cfg.model.tokenizer, cfg.model.revision)
            base = modeling.load_base_model(cfg.model, tokenizer, dtype)
        else:
            config = modeling.model_config(cfg.model)
            base = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                    attn_implementation=cfg.model.attn_implementation)
        model = modeling.apply_peft(base, cfg.peft, cfg.hardware.gradient_checkpointing)
        if precision == Precision.fp16:
            modeling.upcast_trainable_to_fp32(model)
    return model


def estimate(cfg: TrainConfig, device: str | None = None, precision: Precision | None = None,
             budget_gb: float | None = None) -> Plan:
    """The memory plan of training `cfg` on `device` ("cuda"/"cpu"; default: where it would run)."""
    device = device or modeling.resolve_device(cfg.hardware.device, require=False).type
    precision = precision or (cfg.hardware.precision if device == "cuda" else Precision.fp32)
    autocast = precision != Precision.fp32
    model = meta_model(cfg, precision)
    arch = Architecture.from_config(model.config)
    if cfg.model.dropout is not None:  # set on the modules at training time (modeling.set_dropout)
        arch = dataclasses.replace(arch, attn_dropout=cfg.model.dropout, resid_dropout=cfg.model.dropout,
                                   embd_dropout=cfg.model.dropout)
    seq = min(cfg.data.max_length, arch.positions)
    # Packed, a step is batch_size accumulated micro-batches of one sequence (convobot.train.build_sft_config).
    batch = 1 if cfg.train.packing else cfg.hardware.batch_size
    eval_tokens = max(cfg.hardware.eval_tokens, seq)  # a row longer than the budget is a batch of its own
    optim_name = optimizer_name(cfg.optim.name, device)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    frozen_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params if not p.requires_grad})

    weights = tensor_bytes(params) + tensor_bytes(model.buffers())
    quantized = [layer.weight for _, layer in modeling.quantizable_layers(model)] if cfg.peft.quantization else []
    if quantized:  # QLoRA: these are 4-bit on the card, dequantised one at a time while they compute
        weights -= sum(w.numel() * w.element_size() for w in quantized)
        weights += sum(quantized_4bit_bytes(w.numel(), cfg.peft.double_quant, modeling.BNB_BLOCKSIZE)
                       for w in quantized)
    dequantized = max((w.numel() for w in quantized), default=0) * modeling.base_dtype(precision,
                                                                                         cfg.peft.method).itemsize
    grads = 4 * sum(p.numel() for p in trainable)
    states, states_detail, paged, step_copy = optimizer_state_bytes(model, optim_name, device)
    saved, block = activation_bytes(arch, cfg, batch, seq, device, autocast)
    head = loss_head_bytes(arch, batch, seq, device, autocast, cfg.hardware.loss_head)
    lm_head_grad = 4 * sum(p.numel() for p in model.get_output_embeddings().parameters() if p.requires_grad)
    logits_dtype = model.get_output_embeddings().weight.dtype
    eval_logits = eval_logits_bytes(arch, eval_tokens, logits_dtype)
    eval_block = block_activation_bytes(arch, cfg, 1, eval_tokens, device, autocast, training=False)
    checkpointing = "on" if cfg.hardware.gradient_checkpointing else "off"
    attention = cfg.model.attn_implementation
    on_card_states = 0 if paged else states

    parts = {
        "weights": Part("weights", weights,
                        f"{sum(p.numel() for p in params):,} params: {len(trainable)} trainable tensors fp32"
                        + (f", frozen {'/'.join(frozen_dtypes)}" if frozen_dtypes else "")
                        + (f" ({len(quantized)} linear weights in 4-bit {cfg.peft.quantization}"
                           f"{' + double-quantised scales' if cfg.peft.double_quant else ' + fp32 scales'})"
                           if quantized else "")),
        "dequantization buffer": Part("dequantization buffer", dequantized,
                                      "the largest 4-bit weight dequantised to compute precision" if quantized
                                      else "none: no 4-bit weights"),
        "gradients": Part("gradients", grads, f"{sum(p.numel() for p in trainable):,} trainable values, fp32"),
        "optimizer states": Part("optimizer states", states, states_detail),
        "activations": Part("activations", saved,
                            f"{'packed, ' if cfg.train.packing else ''}batch {batch} x {seq} tokens x "
                            f"{arch.layers} layers, {attention}, "
                            f"{precision.value}, checkpointing {checkpointing}"),
        "block working set": Part("block working set", block, "one block's activations during backward"
                                  + (" (recomputed)" if cfg.hardware.gradient_checkpointing else "")),
        "loss head": Part("loss head", head + lm_head_grad,
                          (f"TRL chunked log-prob, {min(batch * seq, TRL_TOKEN_TILE)}-token tiles"
                           + (", Triton" if triton_head(device) else ", plain torch")
                           if cfg.hardware.loss_head == LossHead.chunked
                           else f"plain: fp32 logits of up to {batch * seq} labelled tokens")
                          + (" + lm_head grad" if lm_head_grad else "")),
        "optimizer step temporaries": Part("optimizer step temporaries", 4 * sum(p.numel() for p in trainable)
                                           if step_copy else 0, "foreach AdamW: sqrt of all second moments at once"
                                           if step_copy else f"{optim_name} steps tensor by tensor"),
        "eval logits": Part("eval logits", eval_logits + eval_block,
                            f"scoring batches of {eval_tokens:,} tokens, the LM head {min(eval_tokens, HEAD_CHUNK)} "
                            f"positions x {arch.vocab} vocab at a time ({str(logits_dtype).replace('torch.', '')} "
                            "+ fp32 copies)"),
    }
    phase_parts = {
        "end of forward (loss head)": ("weights", "optimizer states", "activations", "loss head"),
        "end of backward": ("weights", "optimizer states", "gradients", "block working set",
                            "dequantization buffer"),
        "optimizer step": ("weights", "optimizer states", "gradients", "optimizer step temporaries"),
        "evaluation": ("weights", "optimizer states", "eval logits"),
    }
    phases = {phase: sum(on_card_states if n == "optimizer states" else parts[n].bytes for n in names)
              for phase, names in phase_parts.items()}
    notes = []
    if paged:
        notes.append(f"optimizer states ({states / GiB:.2f} GiB) are paged: CUDA unified memory the driver can "
                     "evict to CPU RAM, so they are listed but not counted against the card")
    if device == "cuda" and cfg.hardware.loss_head == LossHead.chunked and not triton_head(device):
        notes.append("triton is not installed here: planned TRL's plain-torch loss head, whose fp32 tile "
                     "temporaries a CUDA machine with triton does not need")
    if device == "cpu":
        notes.append("on CPU this counts tensors only: the process itself (torch, transformers) adds several "
                     "hundred MiB of RSS")
    if arch.model_type != "gpt2":
        notes.append(f"the activation model follows GPT-2's block; for {arch.model_type} treat it as rough")
    if cfg.data.max_length > arch.positions:
        notes.append(f"data.max_length={cfg.data.max_length} exceeds the model's {arch.positions} positions")
    if budget_gb is None:
        budget_gb = cfg.hardware.vram_gb
    if budget_gb is None and device == "cuda" and torch.cuda.is_available():
        budget_gb = torch.cuda.get_device_properties(0).total_memory / GiB
    title = f"{cfg.experiment_name} · {cfg.peft.method.value} · {cfg.hardware.name} ({device}, {precision.value})"
    return Plan(title, device, parts, phases, phase_parts, None if budget_gb is None else int(budget_gb * GiB), notes)

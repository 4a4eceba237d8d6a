"""The plan of one training config: the model convobot train would build, on PyTorch's meta device (real shapes
and dtypes, no storage, nothing downloaded), measured part by part at the four moments of a step."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from convobot.config import LossHead, ModelSource, PeftMethod, Precision, Stage, TrainConfig
from convobot.model.adapters import apply_peft
from convobot.model.base import base_dtype, load_base_model, model_config, resolve_device, upcast_trainable_to_fp32
from convobot.model.optim import optimizer_name
from convobot.model.quantize import BNB_BLOCKSIZE, quantizable_layers
from convobot.model.tokenizer import load_tokenizer
from convobot.plan.formulas import (
    ALLOCATOR_SLACK,
    CUDA_CONTEXT_BYTES,
    TRL_TOKEN_TILE,
    Architecture,
    GiB,
    activation_bytes,
    block_activation_bytes,
    eval_logits_bytes,
    loss_head_bytes,
    optimizer_state_bytes,
    quantized_4bit_bytes,
    tensor_bytes,
    triton_head,
)
from convobot.scoring.perplexity import HEAD_CHUNK


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
    """The model `convobot.training.recipe.run` would train, with shapes and dtypes but no storage."""
    from transformers import AutoModelForCausalLM

    dtype = base_dtype(precision, cfg.peft.method)
    with torch.device("meta"):
        if cfg.model.source == ModelSource.random:
            tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.revision)
            base = load_base_model(cfg.model, tokenizer, dtype)
        else:
            config = model_config(cfg.model)
            base = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                    attn_implementation=cfg.model.attn_implementation)
        model = apply_peft(base, cfg.peft, cfg.hardware.gradient_checkpointing)
        if precision == Precision.fp16:
            upcast_trainable_to_fp32(model)
    return model


# The four moments of a training run and the parts allocated at each: the peak is the largest.
PHASE_PARTS = {
    "end of forward (loss head)": ("weights", "reference model", "optimizer states", "activations", "loss head"),
    "end of backward": ("weights", "reference model", "optimizer states", "gradients", "block working set",
                        "dequantization buffer"),
    "optimizer step": ("weights", "reference model", "optimizer states", "gradients", "optimizer step temporaries"),
    "evaluation": ("weights", "reference model", "optimizer states", "eval logits"),
}
# Sequences a stage's forward holds per example: a preference pair's chosen and rejected answers (DPO, ORPO); an
# answer and the mismatched one KTO estimates its KL term with.
SEQUENCES_PER_EXAMPLE = {Stage.dpo: 2, Stage.orpo: 2, Stage.kto: 2}


@dataclass
class Setting:
    """What a plan is of: the config, where it runs, in what precision, and the model's shapes."""
    cfg: TrainConfig
    device: str
    precision: Precision
    model: torch.nn.Module
    arch: Architecture

    @property
    def autocast(self) -> bool:
        return self.precision != Precision.fp32

    @property
    def seq(self) -> int:
        return min(self.cfg.data.max_length, self.arch.positions)

    @property
    def batch(self) -> int:
        """Sequences per forward. Packed, a step is batch_size accumulated micro-batches of one sequence
        (recipe.build_sft_config); a preference stage holds each example's two answers."""
        per_example = SEQUENCES_PER_EXAMPLE.get(self.cfg.stage.name, 1)
        return 1 if self.cfg.train.packing else self.cfg.hardware.batch_size * per_example

    @property
    def trainable(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]


def estimate(cfg: TrainConfig, device: str | None = None, precision: Precision | None = None,
             budget_gb: float | None = None) -> Plan:
    """The memory plan of training `cfg` on `device` ("cuda"/"cpu"; default: where it would run)."""
    device = device or resolve_device(cfg.hardware.device, require=False).type
    precision = precision or (cfg.hardware.precision if device == "cuda" else Precision.fp32)
    model = meta_model(cfg, precision)
    arch = Architecture.from_config(model.config)
    if cfg.model.dropout is not None:  # set on the modules at training time (convobot.model.base.set_dropout)
        arch = dataclasses.replace(arch, attn_dropout=cfg.model.dropout, resid_dropout=cfg.model.dropout,
                                   embd_dropout=cfg.model.dropout)
    setting = Setting(cfg, device, precision, model, arch)
    states, states_detail, paged, step_copy = optimizer_state_bytes(model, optimizer_name(cfg.optim.name, device),
                                                                    device)
    parts = {part.name: part for part in [
        *weight_parts(setting),
        reference_part(setting),
        Part("gradients", 4 * sum(p.numel() for p in setting.trainable),
             f"{sum(p.numel() for p in setting.trainable):,} trainable values, fp32"),
        Part("optimizer states", states, states_detail),
        *activation_parts(setting),
        Part("optimizer step temporaries", 4 * sum(p.numel() for p in setting.trainable) if step_copy else 0,
             "foreach AdamW: sqrt of all second moments at once" if step_copy
             else f"{optimizer_name(cfg.optim.name, device)} steps tensor by tensor"),
        eval_part(setting),
    ]}
    on_card = {name: 0 if paged and name == "optimizer states" else part.bytes for name, part in parts.items()}
    phases = {phase: sum(on_card[name] for name in names) for phase, names in PHASE_PARTS.items()}
    if budget_gb is None:
        budget_gb = cfg.hardware.vram_gb
    if budget_gb is None and device == "cuda" and torch.cuda.is_available():
        budget_gb = torch.cuda.get_device_properties(0).total_memory / GiB
    title = f"{cfg.experiment_name} · {cfg.peft.method_name} · {cfg.hardware.name} ({device}, {precision.value})"
    return Plan(title, device, parts, phases, dict(PHASE_PARTS), None if budget_gb is None else int(budget_gb * GiB),
                notes(setting, states if paged else 0))


def weight_parts(setting: Setting) -> list[Part]:
    """The weights (4-bit ones at half a byte plus their scales) and the buffer a 4-bit weight dequantises into."""
    cfg, model = setting.cfg, setting.model
    params = list(model.parameters())
    frozen_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params if not p.requires_grad})
    weights = tensor_bytes(params) + tensor_bytes(model.buffers())
    quantized = [layer.weight for _, layer in quantizable_layers(model)] if cfg.peft.quantization else []
    if quantized:  # QLoRA: these are 4-bit on the card, dequantised one at a time while they compute
        weights -= sum(w.numel() * w.element_size() for w in quantized)
        weights += sum(quantized_4bit_bytes(w.numel(), cfg.peft.double_quant, BNB_BLOCKSIZE) for w in quantized)
    dequantized = max((w.numel() for w in quantized), default=0) * base_dtype(setting.precision,
                                                                              cfg.peft.method).itemsize
    detail = (f"{sum(p.numel() for p in params):,} params: {len(setting.trainable)} trainable tensors fp32"
              + (f", frozen {'/'.join(frozen_dtypes)}" if frozen_dtypes else "")
              + (f" ({len(quantized)} linear weights in 4-bit {cfg.peft.quantization}"
                 f"{' + double-quantised scales' if cfg.peft.double_quant else ' + fp32 scales'})" if quantized else ""))
    return [Part("weights", weights, detail),
            Part("dequantization buffer", dequantized, "the largest 4-bit weight dequantised to compute precision"
                 if quantized else "none: no 4-bit weights")]


def reference_part(setting: Setting) -> Part:
    """The frozen reference of a preference or reward stage: a copy of the starting model for peft=full; with an
    adapter the base with the adapter disabled is the reference, so nothing is added."""
    stage, cfg = setting.cfg.stage, setting.cfg
    if stage.name in (Stage.sft, Stage.orpo):
        return Part("reference model", 0, f"none: {stage.name.value} has no reference")
    if stage.name == Stage.grpo and stage.beta == 0:
        return Part("reference model", 0, "none: GRPO with stage.beta=0 has no KL term")
    if stage.name != Stage.grpo and stage.precompute_ref_log_probs:
        return Part("reference model", 0, "none: its log-probabilities are computed once before training")
    if cfg.peft.method != PeftMethod.full:
        return Part("reference model", 0, "none: the base with the adapter disabled is the reference")
    params = list(setting.model.parameters())
    return Part("reference model", tensor_bytes(params) + tensor_bytes(setting.model.buffers()),
                f"a frozen copy of the starting model, {sum(p.numel() for p in params):,} params")


def activation_parts(setting: Setting) -> list[Part]:
    """What the forward saves for backward, one block's working set during backward, and the loss head."""
    cfg, arch, device, batch, seq = setting.cfg, setting.arch, setting.device, setting.batch, setting.seq
    saved, block = activation_bytes(arch, cfg, batch, seq, device, setting.autocast)
    head = loss_head_bytes(arch, batch, seq, device, setting.autocast, cfg.hardware.loss_head)
    lm_head_grad = 4 * sum(p.numel() for p in setting.model.get_output_embeddings().parameters() if p.requires_grad)
    checkpointing = cfg.hardware.gradient_checkpointing
    head_detail = (f"TRL chunked log-prob, {min(batch * seq, TRL_TOKEN_TILE)}-token tiles"
                   + (", Triton" if triton_head(device) else ", plain torch")
                   if cfg.hardware.loss_head == LossHead.chunked
                   else f"plain: fp32 logits of up to {batch * seq} labelled tokens")
    return [
        Part("activations", saved, f"{'packed, ' if cfg.train.packing else ''}batch {batch}"
                                   f"{' (both answers)' if cfg.stage.name in SEQUENCES_PER_EXAMPLE else ''} x {seq} tokens x "
                                   f"{arch.layers} layers, {cfg.model.attn_implementation}, "
                                   f"{setting.precision.value}, checkpointing {'on' if checkpointing else 'off'}"),
        Part("block working set", block,
             "one block's activations during backward" + (" (recomputed)" if checkpointing else "")),
        Part("loss head", head + lm_head_grad, head_detail + (" + lm_head grad" if lm_head_grad else "")),
    ]


def eval_part(setting: Setting) -> Part:
    """Scoring after training: batches of hardware.eval_tokens, the LM head on HEAD_CHUNK positions at a time."""
    arch = setting.arch
    eval_tokens = max(setting.cfg.hardware.eval_tokens, setting.seq)  # a longer row is a batch of its own
    logits_dtype = setting.model.get_output_embeddings().weight.dtype
    logits = eval_logits_bytes(arch, eval_tokens, logits_dtype)
    block = block_activation_bytes(arch, setting.cfg, 1, eval_tokens, setting.device, setting.autocast,
                                   training=False)
    return Part("eval logits", logits + block,
                f"scoring batches of {eval_tokens:,} tokens, the LM head {min(eval_tokens, HEAD_CHUNK)} positions x "
                f"{arch.vocab} vocab at a time ({str(logits_dtype).replace('torch.', '')} + fp32 copies)")


def notes(setting: Setting, paged_bytes: int) -> list[str]:
    """What the reader of a plan should know about what it does not count."""
    cfg, device, arch = setting.cfg, setting.device, setting.arch
    found = []
    if paged_bytes:
        found.append(f"optimizer states ({paged_bytes / GiB:.2f} GiB) are paged: CUDA unified memory the driver can "
                     "evict to CPU RAM, so they are listed but not counted against the card")
    if device == "cuda" and cfg.hardware.loss_head == LossHead.chunked and not triton_head(device):
        found.append("triton is not installed here: planned TRL's plain-torch loss head, whose fp32 tile "
                     "temporaries a CUDA machine with triton does not need")
    if device == "cpu":
        found.append("on CPU this counts tensors only: the process itself (torch, transformers) adds several "
                     "hundred MiB of RSS")
    if arch.model_type != "gpt2":
        found.append(f"the activation model follows GPT-2's block; for {arch.model_type} treat it as rough")
    if cfg.data.max_length > arch.positions:
        found.append(f"data.max_length={cfg.data.max_length} exceeds the model's {arch.positions} positions")
    return found

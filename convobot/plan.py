"""Will it fit? Peak GPU memory of a training run, estimated from its composed config.

Examples:
    convobot-plan experiment=seed_repro hardware=rtx3050_4gb       # the reference run on a 4 GB card
    convobot-plan experiment=lora_4gb peft.r=64 hardware.batch_size=8
    convobot-plan experiment=seed_repro hardware.gradient_checkpointing=false
    convobot-plan -m experiment=seed_repro hardware=rtx3050_4gb,rtx4090_24gb peft=lora,full

`convobot-train` runs the same check before every CUDA run and refuses a plan over `hardware.vram_gb`
(the visible card's memory when that is null); `hardware.allow_over_budget=true` trains anyway.

The model is built exactly as `convobot.train` builds it, but on PyTorch's meta device: every tensor
has its real shape and dtype and nothing is allocated or downloaded. From it:
  weights      frozen parameters in the base dtype, trainable ones in fp32 (mixed-precision masters)
  gradients    trainable parameters only, fp32
  optimizer    AdamW's two moments: 8 bytes per value at 32-bit; bitsandbytes 8-bit keeps 2 bytes plus one
               fp32 absmax per 256 values, except tensors under 4096 values and embeddings, which stay
               32-bit (transformers' Trainer registers that override). Paged states live in CUDA unified
               memory that the driver can evict to CPU RAM: listed, not counted against the card.
  activations  what the GPT-2 block saves for backward at batch_size x max_length (the worst padded batch):
               layer-norm inputs (fp32 under autocast), matmul inputs, q/k/v, attention scores unless SDPA
               runs a fused kernel, dropout masks, GELU intermediates; with gradient checkpointing only each
               block's input is kept and one block is recomputed at a time.
  loss head    TRL's chunked log-prob head: one logits tile, never batch x seq x vocab during training.
  eval logits  scoring after training materialises eval_batch_size x seq x vocab logits plus fp32 copies.
  overhead     CUDA context and caching-allocator slack: assumed constants, outside max_memory_allocated.
The peak is the largest of four moments of a step (end of forward, end of backward, optimizer step,
evaluation). benchmarks/plan_gpu_validation.py measures the real peak on a GPU and prints the ratios.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from convobot.config import CONF_DIR, Device, LossHead, ModelSource, PeftMethod, Precision, TrainConfig, validate
from convobot.optim import optimizer_name

log = logging.getLogger(__name__)

GiB = 2**30
# Not in torch.cuda.max_memory_allocated but on the card: the CUDA context (kernels, cuBLAS handles),
# typically 0.3-0.5 GiB, and the caching allocator's reserved-but-unused slack.
CUDA_CONTEXT_BYTES = int(0.4 * GiB)
ALLOCATOR_SLACK = 0.10
# bitsandbytes: tensors under this many values keep 32-bit state; 8-bit state has one absmax per block.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256
# TRL's chunked log-prob head: token rows x vocab columns per logits tile (trl/kernels/chunked_logprob.py).
TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32768
# Peak fp32 tile-sized temporaries of its plain-torch path (no Triton: CPU, or CUDA without triton),
# measured with torch.profiler on CPU in the backward of trl.kernels.chunked_logprob (tests/test_plan.py).
TRL_TORCH_TILE_TEMPS = 7.25
# Peak fp32 (labelled tokens x vocab) tensors of convobot.loss_head's plain head in forward + backward, measured
# the same way (tests/test_plan.py).
PLAIN_HEAD_TEMPS = 4
# Canonical GPT-2 sizes: their hub config.json files equal these GPT2Config arguments, so no download.
GPT2_SIZES = {
    "gpt2": {},
    "gpt2-medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16},
    "gpt2-large": {"n_layer": 36, "n_embd": 1280, "n_head": 20},
    "gpt2-xl": {"n_layer": 48, "n_embd": 1600, "n_head": 25},
}
# transformers `optim` names -> (state bits, paged, a second fp32 copy of the parameters during the step).
OPTIMIZERS = {
    "adamw_torch": (32, False, True),  # foreach implementation: sqrt(exp_avg_sq) for all tensors at once
    "adamw_torch_fused": (32, False, False),
    "adamw_bnb_8bit": (8, False, False),
    "adamw_8bit": (8, False, False),
    "paged_adamw_8bit": (8, True, False),
    "paged_adamw_32bit": (32, True, False),
    "sgd": (0, False, False),
}


class PlanError(RuntimeError):
    """The plan exceeds the card's memory (message: by how much, the dominant part, what to change)."""


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


@dataclass
class Architecture:
    """The numbers of a GPT-2-style decoder that activation memory depends on."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    inner: int
    vocab: int
    positions: int
    attn_dropout: float
    resid_dropout: float
    embd_dropout: float

    @classmethod
    def from_config(cls, config) -> Architecture:
        return cls(
            model_type=config.model_type,
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            inner=getattr(config, "n_inner", None) or getattr(config, "intermediate_size", None)
            or 4 * config.hidden_size,
            vocab=config.vocab_size,
            positions=getattr(config, "n_positions", None) or config.max_position_embeddings,
            attn_dropout=getattr(config, "attn_pdrop", 0.0),
            resid_dropout=getattr(config, "resid_pdrop", 0.0),
            embd_dropout=getattr(config, "embd_pdrop", 0.0),
        )


# ----------------------------------------------------------------------------- the model, on meta


def plan_device(cfg: TrainConfig) -> str:
    """The device a run of `cfg` would train on (planning for CUDA needs no GPU here)."""
    if cfg.hardware.device == Device.auto:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.hardware.device.value


def base_dtype(precision: Precision, method: PeftMethod) -> torch.dtype:
    """LoRA under fp16 keeps a frozen fp16 base (half the memory); full fine-tuning needs fp32 weights,
    and bf16 autocasts from fp32 weights."""
    return torch.float16 if precision == Precision.fp16 and method == PeftMethod.lora else torch.float32


def hub_config(name: str, revision: str | None):
    """GPT-2 sizes are built in (works offline); any other model reads its config.json."""
    from transformers import AutoConfig, GPT2Config

    short = name.rsplit("/", 1)[-1]
    if short in GPT2_SIZES and not Path(name).is_dir():
        return GPT2Config(**GPT2_SIZES[short])
    try:
        return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=False)
    except OSError as err:
        raise PlanError(f"model.name={name!r}: cannot read its config.json to plan memory ({err})") from err


def meta_model(cfg: TrainConfig, precision: Precision) -> torch.nn.Module:
    """The model `convobot.train.run` would train, with shapes and dtypes but no storage."""
    from transformers import AutoModelForCausalLM

    from convobot import modeling

    dtype = base_dtype(precision, cfg.peft.method)
    with torch.device("meta"):
        if cfg.model.source == ModelSource.tiny:
            tokenizer = modeling.load_tokenizer(cfg.model.tokenizer, cfg.model.revision)
            base = modeling.load_base_model(cfg.model, tokenizer, dtype)
        else:
            config = hub_config(cfg.model.name, cfg.model.revision)
            base = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                    attn_implementation=cfg.model.attn_implementation)
        model = modeling.apply_peft(base, cfg.peft, cfg.hardware.gradient_checkpointing)
        if precision == Precision.fp16:
            modeling.upcast_trainable_to_fp32(model)
    return model


# ----------------------------------------------------------------------------- the parts


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind real `tensors` (tied weights and shared qmaps count once):
    what a plan is checked against (tests/test_plan.py, benchmarks/plan_gpu_validation.py)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def optimizer_state_bytes(model: torch.nn.Module, name: str, device: str) -> tuple[int, str, bool, bool]:
    """(bytes, detail, paged, needs a parameter-sized temporary during the step)."""
    known = name in OPTIMIZERS
    bits, paged, step_copy = OPTIMIZERS.get(name, (32, False, False))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if bits == 32:
        states = sum(8 * p.numel() for p in trainable)
        detail = f"{name}: 2 fp32 moments per trainable value"
    elif bits == 0:
        states, detail = 0, f"{name}: no state"
    else:
        # transformers keeps embeddings at 32-bit for bitsandbytes optimizers (stability).
        embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
        stays_32bit = {id(p) for p in trainable if p.numel() < BNB_MIN_8BIT_SIZE or id(p) in embeddings}
        wide = [p for p in trainable if id(p) in stays_32bit]
        narrow = [p for p in trainable if id(p) not in stays_32bit]
        absmax = sum(2 * 4 * math.ceil(p.numel() / BNB_BLOCK) for p in narrow)
        qmaps = 2 * 256 * 4 if narrow else 0  # one shared signed and one unsigned quantile map
        states = sum(8 * p.numel() for p in wide) + sum(2 * p.numel() for p in narrow) + absmax + qmaps
        detail = (f"{name}: {len(narrow)} tensors 8-bit, {len(wide)} kept 32-bit "
                  f"(< {BNB_MIN_8BIT_SIZE} values or embeddings)")
    if not known:
        detail = f"unknown optimizer {name!r}: assumed 2 fp32 moments per trainable value"
    paged = paged and device == "cuda"  # bitsandbytes pages only on CUDA
    return states, detail + (" (paged)" if paged else ""), paged, step_copy


def element_bytes(device: str, autocast: bool) -> tuple[int, int]:
    """(bytes of an activation value, of a dropout-mask value): CUDA keeps bool masks, CPU masks in the
    activation dtype."""
    act = 2 if autocast else 4
    return act, 1 if device == "cuda" else act


# GPT-2's four matmuls per block and the LoRA target names that reach them.
BLOCK_MATMULS = {"attn.c_attn": "c_attn", "attn.c_proj": "c_proj", "mlp.c_fc": "c_fc", "mlp.c_proj": "c_proj"}


def block_activation_bytes(arch: Architecture, cfg: TrainConfig, batch: int, seq: int, device: str,
                           autocast: bool, training: bool = True, first: bool = False) -> int:
    """Bytes one GPT-2 block saves for backward at (batch, seq).

    Counted per block: the two layer-norm inputs (fp32: autocast runs layer_norm in fp32), q/k/v and
    the attention scores or output, dropout masks (bool on CUDA; the activation dtype on CPU), the GELU
    intermediates, and the input of each matmul whose weight trains (full) or that LoRA adapts (plus
    LoRA's dropout mask and rank-r activation); a frozen matmul needs no input for its backward.
    Without grad (evaluation) a block holds about its MLP activations. In LoRA's `first` block nothing
    before the first adapter needs a gradient, so nothing there is saved.
    """
    tokens = batch * seq
    hidden, inner = tokens * arch.hidden, tokens * arch.inner
    act, mask = element_bytes(device, autocast)
    if not training:
        return 2 * inner * act
    # SDPA runs a fused kernel (flash / memory-efficient) on CUDA; on CPU with dropout it falls back to
    # the math path, which materialises the scores like eager attention does.
    fused = cfg.model.attn_implementation == "sdpa" and (device == "cuda" or arch.attn_dropout == 0)
    scores = batch * arch.heads * seq * seq
    if fused:
        attention = 4 * hidden * act + batch * arch.heads * seq * 4  # q/k/v storage, output, logsumexp
    else:
        attention = 3 * hidden * act + scores * 4  # q/k/v copies, fp32 softmax
        if autocast or arch.attn_dropout:
            attention += scores * act  # the probabilities that meet V (cast or dropped out)
        if arch.attn_dropout:
            attention += scores * mask
    lora = cfg.peft.method == PeftMethod.lora
    frozen_start = lora and first
    total = hidden * 4 * (1 if frozen_start else 2)  # layer-norm inputs
    if not (frozen_start and "c_attn" not in cfg.peft.target_modules):
        total += attention
    if arch.resid_dropout:
        total += 2 * hidden * mask
    # GELU saves its input (training swaps GPT-2's Python gelu_new for torch's kernel: modeling.use_fused_gelu).
    total += inner * act
    for matmul, target in BLOCK_MATMULS.items():
        if lora and target not in cfg.peft.target_modules:
            continue
        width = arch.inner if matmul == "mlp.c_proj" else arch.hidden
        total += tokens * width * act
        if lora:
            total += tokens * (width * mask * (cfg.peft.dropout > 0) + cfg.peft.r * act)
    return total


def activation_bytes(arch: Architecture, cfg: TrainConfig, batch: int, seq: int, device: str,
                     autocast: bool) -> tuple[int, int]:
    """(bytes saved for backward at the end of the forward, bytes of one block's working set)."""
    hidden = batch * seq * arch.hidden
    block = block_activation_bytes(arch, cfg, batch, seq, device, autocast)
    first = block_activation_bytes(arch, cfg, batch, seq, device, autocast, first=True)
    _, mask = element_bytes(device, autocast)
    # The embedding dropout mask, the final layer norm's input and the head's copy of its input (fp32).
    outside = hidden * mask * (arch.embd_dropout > 0) + 2 * hidden * 4
    if cfg.hardware.gradient_checkpointing:
        return arch.layers * hidden * 4 + outside, block  # each block keeps only its input
    return first + (arch.layers - 1) * block + outside, block


def loss_head_bytes(arch: Architecture, batch: int, seq: int, device: str, autocast: bool,
                    head: LossHead = LossHead.chunked) -> int:
    """Working memory of the loss head, plus the fp32 gradient of its input. TRL's chunked head: its logits
    buffer (always TRL_VOCAB_TILE columns wide) and fp32 tile temporaries on its plain-torch path. The plain
    head (convobot/loss_head.py): fp32 logits for every labelled token (at most all of them) and their copies."""
    if head == LossHead.plain:
        return int(PLAIN_HEAD_TEMPS * batch * seq * arch.vocab * 4) + batch * seq * arch.hidden * 4
    rows, cols = min(batch * seq, TRL_TOKEN_TILE), min(arch.vocab, TRL_VOCAB_TILE)
    buffer = rows * TRL_VOCAB_TILE * (2 if autocast else 4)
    temps = 0 if triton_head(device) else int(TRL_TORCH_TILE_TEMPS * rows * cols * 4)
    return buffer + temps + batch * seq * arch.hidden * 4


def triton_head(device: str) -> bool:
    """TRL folds each logits tile in place with a Triton kernel on CUDA when triton is installed."""
    from transformers.utils import is_triton_available

    return device == "cuda" and is_triton_available()


def eval_logits_bytes(arch: Architecture, batch: int, seq: int, logits_dtype: torch.dtype) -> int:
    """convobot.metrics.token_nll: logits, an fp32 copy and cross-entropy's fp32 log-softmax."""
    return batch * seq * arch.vocab * (logits_dtype.itemsize + 4 + 4)


def estimate(cfg: TrainConfig, device: str | None = None, precision: Precision | None = None,
             budget_gb: float | None = None) -> Plan:
    """The memory plan of training `cfg` on `device` ("cuda"/"cpu"; default: where it would run)."""
    device = device or plan_device(cfg)
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
    eval_batch = cfg.hardware.eval_batch_size
    optim_name = optimizer_name(cfg.optim.name, device)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    frozen_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params if not p.requires_grad})

    weights = tensor_bytes(params) + tensor_bytes(model.buffers())
    grads = 4 * sum(p.numel() for p in trainable)
    states, states_detail, paged, step_copy = optimizer_state_bytes(model, optim_name, device)
    saved, block = activation_bytes(arch, cfg, batch, seq, device, autocast)
    head = loss_head_bytes(arch, batch, seq, device, autocast, cfg.hardware.loss_head)
    lm_head_grad = 4 * sum(p.numel() for p in model.get_output_embeddings().parameters() if p.requires_grad)
    logits_dtype = model.get_output_embeddings().weight.dtype
    eval_logits = eval_logits_bytes(arch, eval_batch, seq, logits_dtype)
    eval_block = block_activation_bytes(arch, cfg, eval_batch, seq, device, autocast, training=False)
    checkpointing = "on" if cfg.hardware.gradient_checkpointing else "off"
    attention = cfg.model.attn_implementation
    on_card_states = 0 if paged else states

    parts = {
        "weights": Part("weights", weights,
                        f"{sum(p.numel() for p in params):,} params: {len(trainable)} trainable tensors fp32"
                        + (f", frozen {'/'.join(frozen_dtypes)}" if frozen_dtypes else "")),
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
                            f"eval_batch_size {eval_batch} x {seq} x {arch.vocab} vocab, "
                            f"{str(logits_dtype).replace('torch.', '')} + fp32 copies"),
    }
    phase_parts = {
        "end of forward (loss head)": ("weights", "optimizer states", "activations", "loss head"),
        "end of backward": ("weights", "optimizer states", "gradients", "block working set"),
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


# ----------------------------------------------------------------------------- advice and the check


def _change(cfg: TrainConfig, **overrides) -> tuple[dict, TrainConfig]:
    """`group__key=value` keyword pairs -> ({"group.key": value}, the changed config)."""
    for dotted, value in overrides.items():
        group, key = dotted.split("__")
        cfg = dataclasses.replace(cfg, **{group: dataclasses.replace(getattr(cfg, group), **{key: value})})
    return {dotted.replace("__", "."): value for dotted, value in overrides.items()}, cfg


def remedies(cfg: TrainConfig, part: str) -> list[tuple[dict, TrainConfig]]:
    """Overrides that shrink `part`, least disruptive first, each with the config it gives."""
    hw, options = cfg.hardware, []
    if part in ("activations", "block working set") and not hw.gradient_checkpointing:
        options.append(_change(cfg, hardware__gradient_checkpointing=True))
    if part in ("activations", "block working set") and cfg.model.attn_implementation == "eager":
        options.append(_change(cfg, model__attn_implementation="sdpa"))
    if part in ("activations", "block working set", "loss head") and hw.batch_size > 1 and not cfg.train.packing:
        # Same effective batch: half the rows per step, twice the accumulation.
        options.append(_change(cfg, hardware__batch_size=hw.batch_size // 2, hardware__grad_accum=hw.grad_accum * 2))
    if part == "eval logits" and hw.eval_batch_size > 1:
        options.append(_change(cfg, hardware__eval_batch_size=max(1, hw.eval_batch_size // 4)))
    optim_name = optimizer_name(cfg.optim.name, "cuda")  # only a card's budget is ever exceeded
    if part == "loss head" and hw.loss_head == LossHead.plain:
        options.append(_change(cfg, hardware__loss_head=LossHead.chunked))
    if part in ("optimizer states", "optimizer step temporaries") and OPTIMIZERS.get(optim_name, (32,))[0] == 32:
        options.append(_change(cfg, optim__name="adamw_bnb_8bit"))
    if part == "optimizer states" and not optim_name.startswith("paged"):
        options.append(_change(cfg, optim__name="paged_adamw_8bit"))
    if part in ("gradients", "optimizer states", "weights") and cfg.peft.method == PeftMethod.full:
        options.append(_change(cfg, peft__method=PeftMethod.lora))
    if part == "weights" and cfg.hardware.precision == Precision.fp32 and cfg.peft.method == PeftMethod.lora:
        options.append(_change(cfg, hardware__precision=Precision.fp16))
    if part in ("activations", "block working set", "loss head", "eval logits"):
        options.append(_change(cfg, data__max_length=cfg.data.max_length // 2))  # last: it truncates the data
    return options


def _overrides(changes: dict) -> str:
    """Command-line form: the optimizer and the method are picked through their groups (conf/optim/, conf/peft/)."""
    groups = {"optim.name": "optim", "peft.method": "peft"}
    names = {"adamw_bnb_8bit": "adamw_8bit"}
    words = []
    for key, value in changes.items():
        value = str(getattr(value, "value", value)).lower()
        words.append(f"{groups[key]}={names.get(value, value)}" if key in groups else f"{key}={value}")
    return " ".join(words)


def refusal(plan: Plan, cfg: TrainConfig) -> str:
    """Why the plan does not fit, which part dominates, what each change would give, and a set of
    changes that fits together (greedily: the first remedy that helps, for whatever dominates next)."""
    part = plan.dominant
    replan = lambda changed: estimate(changed, plan.device, budget_gb=plan.budget / GiB)  # noqa: E731
    lines = [
        f"{plan.title}: planned peak {plan.total / GiB:.2f} GiB ({plan.peak_phase}) exceeds "
        f"hardware.vram_gb={plan.budget / GiB:.1f} GiB by {(plan.total - plan.budget) / GiB:.2f} GiB.",
        f"The largest part is {part.name}: {part.bytes / GiB:.2f} GiB ({part.detail}).",
    ]
    options = [(changes, replan(changed)) for changes, changed in remedies(cfg, part.name)]
    if options:
        lines.append("Change one of:")
        lines += [f"  {_overrides(changes)}  -> {after.total / GiB:.2f} GiB ({'fits' if after.fits else 'still over'})"
                  for changes, after in options]
    together, steps, current, current_plan = {}, 0, cfg, plan
    while not current_plan.fits and steps < 6:
        for changes, changed in remedies(current, current_plan.dominant.name):
            after = replan(changed)
            if after.total < current_plan.total:
                together, steps, current, current_plan = {**together, **changes}, steps + 1, changed, after
                break
        else:
            break
    if current_plan.fits and steps > 1:
        lines.append(f"Together: {_overrides(together)}  -> {current_plan.total / GiB:.2f} GiB (fits)")
    lines.append("Or train anyway with hardware.allow_over_budget=true.")
    return "\n".join(lines)


def check_fits(cfg: TrainConfig, device: str, precision: Precision) -> Plan:
    """Plan a run about to start; raise PlanError if it exceeds the card (unless allowed)."""
    plan = estimate(cfg, device, precision)
    log.info("memory plan: %.2f GiB peak (%s) of %s", plan.total / GiB, plan.peak_phase,
             "no budget" if plan.budget is None else f"{plan.budget / GiB:.1f} GiB")
    if plan.fits:
        return plan
    message = refusal(plan, cfg)
    if not cfg.hardware.allow_over_budget:
        raise PlanError(message)
    log.warning("%s\nhardware.allow_over_budget=true: training anyway", message)
    return plan


# ----------------------------------------------------------------------------- the command


def print_plan(plan: Plan, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    peak_parts = plan.phase_parts[plan.peak_phase]
    table = Table(title=f"memory plan · {plan.title}")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    table.add_column("in peak", justify="center")
    table.add_column("what")
    for part in plan.parts.values():
        table.add_row(part.name, f"{part.bytes / GiB:.3f}", "x" if part.name in peak_parts else "", part.detail)
    if plan.device == "cuda":
        table.add_row("CUDA context + allocator", f"{plan.overhead / GiB:.3f}", "x",
                      f"assumed: {CUDA_CONTEXT_BYTES / GiB:.1f} GiB + {ALLOCATOR_SLACK:.0%} of allocated")
    console.print(table)
    for phase, size in plan.phases.items():
        marker = "  <- peak" if phase == plan.peak_phase else ""
        console.print(f"  {phase:<28} {size / GiB:7.3f} GiB allocated{marker}")
    for note in plan.notes:
        console.print(f"  [dim]note: {note}[/]")
    if plan.budget is None:
        console.print(f"peak {plan.total / GiB:.2f} GiB; no budget (hardware.vram_gb is null)")
    elif plan.fits:
        console.print(f"[bold green]FITS[/]: peak {plan.total / GiB:.2f} GiB of {plan.budget / GiB:.1f} GiB "
                      f"({(plan.budget - plan.total) / GiB:.2f} GiB, {1 - plan.total / plan.budget:.0%} to spare)")
    else:
        console.print(f"[bold red]DOES NOT FIT[/]: peak {plan.total / GiB:.2f} GiB of {plan.budget / GiB:.1f} GiB")


@hydra.main(config_path=str(CONF_DIR), config_name="plan", version_base="1.3")
def main(raw: DictConfig) -> float:
    """`convobot-plan [train overrides]`: print the plan; exit status 1 if it does not fit.
    With -m, each combination's plan.json goes to its job dir and nothing stops the sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from convobot import io

    cfg = validate(raw)
    plan = estimate(cfg)
    print_plan(plan)
    if not plan.fits:
        print(refusal(plan, cfg))
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        io.write_json(Path(HydraConfig.get().runtime.output_dir) / "plan.json", plan.to_dict())
    elif not plan.fits:
        raise SystemExit(1)
    return plan.total / GiB


if __name__ == "__main__":
    main()

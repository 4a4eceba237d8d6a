"""The memory formulas: bytes of each part of a training step, from a model's tensors and a GPT-2 block's
shapes (the package docstring says what each part counts)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from convobot.config import LossHead, PeftMethod, TrainConfig
from convobot.model.base import context_length

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
# Peak fp32 (labelled tokens x vocab) tensors of convobot.model.loss_head's plain head in forward + backward, measured
# the same way (tests/test_plan.py).
PLAIN_HEAD_TEMPS = 4
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
            positions=context_length(config),
            attn_dropout=getattr(config, "attn_pdrop", 0.0),
            resid_dropout=getattr(config, "resid_pdrop", 0.0),
            embd_dropout=getattr(config, "embd_pdrop", 0.0),
        )


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


def eval_logits_bytes(arch: Architecture, tokens: int, dtype: torch.dtype) -> int:
    """convobot.scoring.perplexity.nll_sums on a batch of `tokens` padded tokens: the last hidden states and their copy at
    the scored positions, and one HEAD_CHUNK of logits with its fp32 copy and cross-entropy's fp32 log-softmax."""
    from convobot.scoring.perplexity import HEAD_CHUNK

    hidden = 2 * tokens * arch.hidden * dtype.itemsize
    return hidden + min(tokens, HEAD_CHUNK) * arch.vocab * (dtype.itemsize + 4 + 4)


def quantized_4bit_bytes(numel: int, double_quant: bool, blocksize: int) -> int:
    """A weight in bitsandbytes' 4-bit format: two values per byte, plus one absmax per block of `blocksize` values:
    fp32, or with double quantisation 8-bit with one fp32 scale per 256 of them (QLoRA's ~0.127 bits per value)."""
    blocks = math.ceil(numel / blocksize)
    constants = blocks + 4 * math.ceil(blocks / 256) if double_quant else 4 * blocks
    return math.ceil(numel / 2) + constants

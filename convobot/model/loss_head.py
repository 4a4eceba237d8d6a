"""The LM head and loss in training: TRL's chunked log-prob head (GPUs), or plain logits on labelled positions (CPU).

TRL's SFTTrainer patches the model with a fused LM head (`model(..., fused_lm_head=True)`) that scores tokens in
4096 x 32768 tiles, so batch x seq x 50257 logits never exist at once: what a 4 GB card needs. Without Triton (on
CPU) its torch fallback scores every position, prompt tokens included, recomputes each tile in the backward and
builds a (tokens x vocab) mask for its accuracy metric: GPT-2 small LoRA steps take ~1.3x as long with it. RAM is not
scarce there, so `use_plain_head` answers the same call with the same outputs from ordinary logits, computed only
where a label is set (its tests check loss, gradients and metrics against TRL's head).
"""

from __future__ import annotations

import functools
import types

import torch
from trl.trainer.utils import FusedCausalLMOutput

# The label of a position no loss is computed for (transformers' and TRL's convention).
IGNORE_INDEX = -100



def score_labelled(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor):
    """Log-probability of each target (with gradient), the entropy and whether the target is the top-1 token
    (without): (n, hidden) states and (n,) targets -> three (n,) tensors."""
    logits = lm_head(hidden).float()
    all_log_probs = torch.log_softmax(logits, dim=-1)
    log_probs = all_log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(all_log_probs.exp() * all_log_probs).sum(-1)
        is_top1 = logits.argmax(-1) == targets  # the first maximum, as TRL counts ties
    return log_probs, entropy, is_top1


def use_plain_head(model: torch.nn.Module) -> None:
    """Replace the fused head TRL installed on `model` (the base model, under a PEFT wrapper)."""
    fused_forward = model.__dict__.get("forward")
    if fused_forward is None:
        raise RuntimeError(f"{type(model).__name__} has no fused LM head to replace: SFTTrainer installs it, "
                           "so call use_plain_head after building the trainer")

    # Keep the class signature: `generate` validates its keyword arguments against it.
    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:  # generation, scoring: the model's own forward, through TRL's wrapper
            return fused_forward(*args, labels=labels, shift_labels=shift_labels,
                                 num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:  # position t predicts token t+1
            hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
        mask = shift_labels != IGNORE_INDEX
        log_probs, entropy, is_top1 = score_labelled(hidden[mask], self.get_output_embeddings(), shift_labels[mask])

        def spread(values: torch.Tensor) -> torch.Tensor:
            """Back to (batch, seq), zero where there is no label (TRL's convention)."""
            return values.new_zeros(mask.shape).masked_scatter(mask, values)

        per_token = spread(log_probs)
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-per_token.sum() / denominator, log_probs=per_token,
                                   entropy=spread(entropy), is_top1=spread(is_top1), label_mask=mask)

    model.forward = types.MethodType(forward, model)

"""Will it fit? Peak GPU memory of a training run, estimated from its composed config.

    formulas.py   bytes of each part (weights, gradients, optimizer states, activations, loss head, eval logits)
    estimator.py  the model convobot train would build, on the meta device, and the plan: parts and peak moments
    advice.py     what to change when a plan does not fit, and the check convobot train runs before a CUDA run
    cli.py        convobot plan

Examples:
    convobot plan experiment=seed_repro hardware=rtx3050_4gb       # the reference run on a 4 GB card
    convobot plan experiment=lora_4gb peft.r=64 hardware.batch_size=8
    convobot plan experiment=seed_repro hardware.gradient_checkpointing=false
    convobot plan -m experiment=seed_repro hardware=rtx3050_4gb,rtx4090_24gb peft=lora,full

`convobot train` runs the same check before every CUDA run and refuses a plan over `hardware.vram_gb`
(the visible card's memory when that is null); `hardware.allow_over_budget=true` trains anyway.

The model is built exactly as `convobot.training.recipe` builds it, but on PyTorch's meta device: every tensor
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
  eval logits  scoring after training: a batch of hardware.eval_tokens tokens through the model without grad,
               and the LM head on HEAD_CHUNK positions at a time (never batch x seq x vocab logits).
  overhead     CUDA context and caching-allocator slack: assumed constants, outside max_memory_allocated.
The peak is the largest of four moments of a step (end of forward, end of backward, optimizer step,
evaluation). benchmarks/plan_gpu_validation.py measures the real peak on a GPU and prints the ratios.
"""

from convobot.plan.advice import check_fits, refusal, remedies
from convobot.plan.estimator import Plan, estimate

__all__ = ["Plan", "check_fits", "estimate", "refusal", "remedies"]

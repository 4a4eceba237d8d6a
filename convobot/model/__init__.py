"""The model: what is trained, and how it trains fast on the hardware at hand.

    tokenizer.py    the bundled or a hub tokenizer, with convobot's chat template
    base.py         the base model (hub, bundled or random init), its context, device, dtype, dropout, fused GELU
    adapters.py     LoRA, DoRA, rsLoRA through peft (GPT-2's Conv1D layers need fan_in_fan_out=True)
    quantize.py     QLoRA's 4-bit base through bitsandbytes, and its exact fp32 values for merging
    attention.py    SDPA row by row over packed sequences
    loss_head.py    logits and loss on labelled positions only (CPU), in place of TRL's chunked head
    optim.py        which optimizer really steps: bitsandbytes 8-bit AdamW where it runs, torch's otherwise
    cpu_memory.py   glibc malloc settings that stop each CPU training step faulting its tensors in again
"""

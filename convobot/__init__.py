"""convobot: parameter-efficient fine-tuning of GPT-2 on instruction data (Hydra + TRL + LoRA + bitsandbytes)."""

import logging

# bitsandbytes logs a warning at import when the optional `kernels` package (4-bit CPU matmul) is
# absent; convobot never uses 4-bit CPU kernels, so the line is only noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"

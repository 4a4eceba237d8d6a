"""The Alpaca prompt template, shared by training, scoring and chat.

These strings are the exact ones of the reference run (Stanford Alpaca's template); changing a
character here changes what the model was trained to continue, so chat and eval import them
from this one place.
"""

from __future__ import annotations

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(instruction: str, input: str = "") -> str:
    """The prompt part: everything up to and including "### Response:\\n"."""
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def format_example(row: dict) -> dict:
    """An Alpaca row -> the prompt/completion pair SFTTrainer trains on (EOS is added by TRL)."""
    return {"prompt": format_prompt(row["instruction"], row.get("input", "")), "completion": row["output"]}

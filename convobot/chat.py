"""Chat with a merged bundle or a run's adapter: the training template, streamed, stopping at EOS.

Examples:
    convobot-chat model=release/convobot-gpt2-alpaca                                 # REPL
    convobot-chat model=release/convobot-gpt2-alpaca prompt="Give three tips for staying healthy."
    convobot-chat model=outputs/demo prompt="Reverse the order of the words." input="apple bird cat"
    convobot-chat model=outputs/demo/release generation.temperature=0 generation.max_new_tokens=32
    convobot-chat model=outputs/demo/release prompt="'Name a fruit, then a colour.'"   # commas: quote twice

`model` is a bundle from convobot-merge, a run dir (its adapter runs unmerged on the base), or a
run's adapter/ folder. In the REPL each line is an instruction; `instruction || input` adds an input;
an empty line, `exit` or Ctrl-D ends it.
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

import hydra
from transformers import set_seed

from convobot.cli import run_command
from convobot.config import COMMANDS_CONF_DIR, ChatConfig, GenerationOptions
from convobot.errors import PromptTooLongError
from convobot.generate import stream_answer
from convobot.modeling import resolve_device
from convobot.rundir import load_model

INPUT_SEPARATOR = "||"


def respond(model, tokenizer, instruction: str, input: str, options: GenerationOptions, out: TextIO) -> str:
    """Stream the answer to `out` as it is generated; return it whole."""
    pieces = []
    for piece in stream_answer(model, tokenizer, instruction, input, options):
        out.write(piece)
        out.flush()
        pieces.append(piece)
    out.write("\n")
    return "".join(pieces)


def repl(model, tokenizer, options: GenerationOptions, read: Callable[[str], str] = input,
         out: TextIO = sys.stdout) -> int:
    """Answer instructions until an empty line, `exit` or end of input; returns how many were answered."""
    out.write(f"Alpaca-template chat. 'instruction {INPUT_SEPARATOR} input' adds an input; "
              "empty line or 'exit' quits.\n")
    answered = 0
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return answered
        if not line or line.lower() in {"exit", "quit"}:
            return answered
        instruction, _, extra = line.partition(INPUT_SEPARATOR)
        out.write("bot> ")
        try:
            respond(model, tokenizer, instruction.strip(), extra.strip(), options, out)
        except PromptTooLongError as err:  # the session goes on: the next prompt may fit
            out.write(f"[{err}]\n")
            continue
        answered += 1


def chat(cfg: ChatConfig, out: TextIO = sys.stdout) -> str | None:
    """One-shot answer to `cfg.prompt` (returned), or a REPL when there is none."""
    device = resolve_device(cfg.device, key="device")
    model, tokenizer = load_model(cfg.model, cfg.verify_checksums)
    model.to(device)
    set_seed(cfg.seed)
    if cfg.prompt is not None:
        return respond(model, tokenizer, cfg.prompt, cfg.input, cfg.generation, out)
    repl(model, tokenizer, cfg.generation, out=out)
    return None


@hydra.main(config_path=str(COMMANDS_CONF_DIR), config_name="chat", version_base="1.3")
def main(raw) -> None:
    """Hydra entry point: `convobot-chat model=<bundle or run dir> [prompt=...] [generation.temperature=0]`."""
    run_command("convobot-chat", ChatConfig, chat, raw)


if __name__ == "__main__":
    main()

"""Chat with a merged bundle or a run's adapter: the chat template of training, streamed, stopping at EOS.

Examples:
    convobot chat model=release/convobot-gpt2-alpaca                                 # multi-turn REPL
    convobot chat model=release/convobot-gpt2-alpaca prompt="Give three tips for staying healthy."
    convobot chat model=outputs/demo prompt="Reverse the order of the words." input="apple bird cat"
    convobot chat model=outputs/demo/release generation.temperature=0 generation.max_new_tokens=32
    convobot chat model=outputs/demo/release prompt="'Name a fruit, then a colour.'"   # commas: quote twice

`model` is a bundle from convobot merge, a run dir (its adapter runs unmerged on the base), or a
run's adapter/ folder. The REPL keeps the conversation: each line is a user turn (`instruction || input`
adds an Alpaca input), answered with everything said so far; when the context fills, the oldest turns are
dropped, with a notice. `/reset` starts over; an empty line, `/exit` or Ctrl-D ends it.
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

import hydra
import torch

from convobot.cli import run_command
from convobot.config import COMMANDS_CONF_DIR, ChatConfig, GenerationOptions
from convobot.errors import PromptTooLongError
from convobot.model.base import context_length, resolve_device
from convobot.runs.loading import load_model
from convobot.scoring.generate import fit_conversation
from convobot.serving.streaming import stream_answer
from convobot.template import user_message

INPUT_SEPARATOR = "||"
RESET, EXIT = "/reset", {"/exit", "exit", "quit"}


def respond(model, tokenizer, messages: list[dict], options: GenerationOptions, out: TextIO) -> str:
    """Stream the assistant's next turn to `out` as it is generated; return it whole."""
    pieces = []
    for piece in stream_answer(model, tokenizer, messages, options):
        out.write(piece)
        out.flush()
        pieces.append(piece)
    out.write("\n")
    return "".join(pieces)


def repl(model, tokenizer, options: GenerationOptions, read: Callable[[str], str] = input,
         out: TextIO = sys.stdout, system: str | None = None) -> list[dict]:
    """A conversation until an empty line, `/exit` or end of input; returns it (as messages)."""
    out.write(f"convobot chat. 'instruction {INPUT_SEPARATOR} input' adds an input; {RESET} starts over; "
              "an empty line or /exit quits.\n")
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    context = context_length(model.config)
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return messages
        if not line or line.lower() in EXIT:
            return messages
        if line.lower() == RESET:
            messages = list(start)
            out.write("[conversation reset]\n")
            continue
        instruction, _, extra = line.partition(INPUT_SEPARATOR)
        asked, dropped = fit_conversation(tokenizer, messages + [user_message(instruction.strip(), extra.strip())],
                                          context, options.max_new_tokens)
        if dropped:
            out.write(f"[context full: dropped the oldest {dropped} turns]\n")
        out.write("bot> ")
        try:
            reply = respond(model, tokenizer, asked, options, out)
        except PromptTooLongError as err:  # the session goes on: the next turn may fit
            out.write(f"[{err}]\n")
            continue
        messages = asked + [{"role": "assistant", "content": reply}]


def chat(cfg: ChatConfig, out: TextIO = sys.stdout) -> str | None:
    """One-shot answer to `cfg.prompt` (returned), or a REPL when there is none."""
    device = resolve_device(cfg.device, key="device")
    model, tokenizer = load_model(cfg.model, cfg.verify_checksums)
    model.to(device)
    torch.manual_seed(cfg.seed)
    if cfg.prompt is not None:
        system = [{"role": "system", "content": cfg.system}] if cfg.system else []
        return respond(model, tokenizer, system + [user_message(cfg.prompt, cfg.input)], cfg.generation, out)
    repl(model, tokenizer, cfg.generation, out=out, system=cfg.system)
    return None


@hydra.main(config_path=str(COMMANDS_CONF_DIR), config_name="chat", version_base="1.3")
def main(raw) -> None:
    """Hydra entry point: `convobot chat model=<bundle or run dir> [prompt=...] [generation.temperature=0]`."""
    run_command("convobot-chat", ChatConfig, chat, raw)


if __name__ == "__main__":
    main()

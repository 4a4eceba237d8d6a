"""`convobot <command> [overrides]`: one front door over every command.

    convobot --help                         # the commands, one line each
    convobot train experiment=smoke         # the same as: convobot-train experiment=smoke
    convobot merge --help                   # that command's own help (Hydra's: its config groups and keys)
    python -m convobot serve model=outputs/demo/release

Each command is also installed as `convobot-<command>`. A command's module is imported only when it runs, so
`convobot --help` answers at once.
"""

from __future__ import annotations

import difflib
import importlib
import sys

from convobot import __version__

# command -> (module:function, what it does)
COMMANDS = {
    "train": ("convobot.training.recipe:main", "fine-tune GPT-2 with LoRA (or fully) on instruction data"),
    "merge": ("convobot.release.merge:main", "merge a run's adapter into its base, verify it, write a release bundle"),
    "eval": ("convobot.scoring.evaluate:main", "score a bundle, run or adapter: perplexity, side by side"),
    "chat": ("convobot.serving.chat:main", "chat with a bundle or run in the terminal (one answer, or a REPL)"),
    "serve": ("convobot.serving.server:main", "serve bundles, runs and adapters over an OpenAI-compatible HTTP API"),
    "export-onnx": ("convobot.release.onnx_export:main", "export a bundle to ONNX, checked with onnxruntime"),
    "export-gguf": ("convobot.release.gguf:main", "export a bundle to GGUF for llama.cpp and Ollama, checked"),
    "compare": ("convobot.reports.compare:main", "compare runs or a sweep: a table and plots"),
    "plan": ("convobot.plan.cli:main", "will a training config fit the GPU? Peak memory, part by part"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: convobot <command> [overrides | --help]    (convobot {__version__})", "",
             "Fine-tune GPT-2 with LoRA on instruction data, then release, score, chat with and serve it.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "`convobot <command> --help` shows a command's options. Overrides are Hydra's: group=option, "
              "key=value.", "Example: convobot train experiment=smoke hydra.run.dir=outputs/smoke"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"convobot {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"convobot: unknown command '{command}'{hint} (convobot --help lists them)", file=sys.stderr)
        return 2
    module, function = COMMANDS[command][0].split(":")
    entry = getattr(importlib.import_module(module), function)
    # Hydra and argparse read sys.argv: the command sees its own arguments, named as `convobot <command>`.
    sys.argv = [f"convobot {command}", *rest]
    result = entry()
    return result if type(result) is int else 0


if __name__ == "__main__":
    sys.exit(main())

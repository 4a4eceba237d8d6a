"""`convobot <command>`: one front door that lists every command and hands each its own arguments and help."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from convobot.__main__ import COMMANDS, main

REPO = Path(__file__).resolve().parents[2]


def convobot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convobot", *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO)


def test_help_lists_every_command_with_one_line():
    done = convobot("--help")
    assert done.returncode == 0
    for name, (_, summary) in COMMANDS.items():
        assert f"  {name}" in done.stdout and summary in done.stdout


def test_no_command_or_an_unknown_one_is_a_usage_error(capsys):
    assert main([]) == 2 and "commands:" in capsys.readouterr().out
    assert main(["trian"]) == 2
    assert "unknown command 'trian'; did you mean 'train'?" in capsys.readouterr().err


def test_every_command_is_also_its_console_script():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["convobot"] == "convobot.__main__:main"
    assert {f"convobot-{name}": target for name, (target, _) in COMMANDS.items()} == {
        name: target for name, target in scripts.items() if name != "convobot"}
    for target, _ in COMMANDS.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function))


@pytest.mark.parametrize("command, expected", [
    ("merge", ["convobot merge: merge a run's adapter", "run_dir: ???", "verify_rows: 8"]),
    ("train", ["convobot train: fine-tune GPT-2", "peft: dora, full, lora, qlora, rslora", "experiment_name:"]),
    ("serve", ["convobot serve: serve bundles", "max_queued: 64", "api_key: null"]),
])
def test_a_commands_help_is_its_own(convobot_command, command, expected):
    status, out, err = convobot_command(command, "--help")
    assert status == 0, err
    for text in expected:
        assert text in out


def test_a_command_gets_its_arguments_and_reports_in_one_line(tmp_path):
    """As a user runs it: a process, the error its last line."""
    done = convobot("merge", f"run_dir={tmp_path / 'missing'}", f"output_dir={tmp_path / 'out'}")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("convobot-merge: ModelPathError: run dir")
    assert "Traceback" not in done.stderr

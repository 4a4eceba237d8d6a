"""The README's commands work as written: blocks marked offline-safe run here, in order, in one folder."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- offline-test -->"
BLOCK = re.compile(re.escape(MARKER) + r"\s*```(?:bash|sh|console)?\n(.*?)```", re.S)


def offline_blocks() -> list[str]:
    return BLOCK.findall(README.read_text())


def test_readme_marks_offline_commands():
    blocks = offline_blocks()
    assert len(blocks) >= 5, "the README should mark its offline-safe command blocks"
    assert README.read_text().count(MARKER) == len(blocks), "a marker is not followed by a code block"


@pytest.mark.slow
def test_offline_readme_commands_run(tmp_path):
    script = "set -euo pipefail\n" + "\n".join(offline_blocks())
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, f"README commands failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

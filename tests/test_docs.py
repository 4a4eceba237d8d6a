"""The README and docs/ work as written: command blocks marked offline-safe run here, each page's in order in a
fresh folder; the figures are the benchmark results files'; links and code paths point at what exists."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = "<!-- offline-test -->"
BLOCK = re.compile(re.escape(MARKER) + r"\s*```(?:bash|sh|console)?\n(.*?)```", re.S)
RUNNABLE = [page for page in PAGES if BLOCK.search(page.read_text())]

sys.path.insert(0, str(REPO / "benchmarks"))
from docs_checks import CHECKS  # noqa: E402
from results_in_docs import stale_blocks  # noqa: E402

BLOCK_START = "--- a docs block starts ---"  # printed before each block: the checks get each block's output


def offline_blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def test_every_marker_is_followed_by_a_block():
    for page in PAGES:
        assert page.read_text().count(MARKER) == len(offline_blocks(page)), f"{page}: a marker without a code block"
    assert len(offline_blocks(REPO / "README.md")) >= 1 and len(RUNNABLE) >= 6


def test_readme_introduces_and_links_every_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300, "the README introduces; topics in depth live in docs/"
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"README does not link docs/{page.name}"


def test_links_and_code_paths_exist():
    """Relative links, and `convobot/...` / `benchmarks/...` paths named in the text, point at real files."""
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
        for path in re.findall(r"`((?:convobot|benchmarks)/[\w/.-]+\.(?:py|yaml|md|json|png))`", text):
            assert (REPO / path).exists(), f"{page.name}: names {path}, which does not exist"


def test_figures_are_the_results_files():
    assert stale_blocks() == []


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE, ids=[page.name for page in RUNNABLE])
def test_offline_commands_run(page, tmp_path):
    """The page's blocks as one bash script in a fresh folder; whatever it started in the background (a server) is
    stopped with it, whether it passed or not."""
    blocks = offline_blocks(page)
    script = "set -euo pipefail\n" + "".join(f"echo '{BLOCK_START}'\n{block}" for block in blocks)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = process.wait(timeout=900)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        output.seek(0)
        text = output.read().decode(errors="replace")
    assert status == 0, f"{page.name} commands failed:\n{text[-6000:]}"
    if page.name in CHECKS:  # what the page's run must have produced: the feature's end-to-end checks
        CHECKS[page.name](tmp_path, text.split(f"{BLOCK_START}\n")[1:])

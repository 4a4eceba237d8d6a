"""Copy benchmark results into the docs: every `<!-- results: FILE -->` ... `<!-- /results -->` block of README.md
and docs/*.md holds FILE (a benchmarks/results/*.md), its headings moved under the page's, so figures in the docs
are the measured ones, never retyped.

    python benchmarks/results_in_docs.py            # rewrite the blocks from the results files
    python benchmarks/results_in_docs.py --check    # exit 1 naming each block that differs (the tests run this)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- results: (?P<file>\S+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def rendered(results_file: str) -> str:
    """The results file as a docs block: its headings two levels down (a page's sections are `##`)."""
    text = (REPO / results_file).read_text(encoding="utf-8")
    return re.sub(r"^(#+) ", lambda m: "#" * min(len(m.group(1)) + 2, 6) + " ", text, flags=re.M).rstrip("\n") + "\n"


def refreshed(page: Path) -> str:
    return BLOCK.sub(lambda m: m.group(1) + rendered(m.group("file")) + m.group(4), page.read_text(encoding="utf-8"))


def stale_blocks() -> list[str]:
    """`page: file` for each block whose text is not its results file's."""
    stale = []
    for page in pages():
        for match in BLOCK.finditer(page.read_text(encoding="utf-8")):
            if match.group("body") != rendered(match.group("file")):
                stale.append(f"{page.relative_to(REPO)}: {match.group('file')}")
    return stale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report blocks that differ from their files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_blocks()
        for block in stale:
            print(f"stale results block: {block} (run python benchmarks/results_in_docs.py)", file=sys.stderr)
        return 1 if stale else 0
    for page in pages():
        text = refreshed(page)
        if text != page.read_text(encoding="utf-8"):
            page.write_text(text, encoding="utf-8")
            print(f"updated {page.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

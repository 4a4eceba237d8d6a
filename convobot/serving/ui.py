"""The web page beside the API (`convobot serve ... ui=true`): chat, an arena, and run reports, at /ui.

    convobot serve models=[merged:release/bot,outputs/lora-run,outputs/full-run] ui=true reports=[reports/methods]
    # then open http://127.0.0.1:8000/ui

The page (ui/index.html, app.js, style.css: no build step, nothing fetched from elsewhere) speaks the same OpenAI
API as any client: it streams /v1/chat/completions, lists /v1/models, and sends the API key a user types in. This
module adds only what the API has no route for, under /ui/api (guarded by the same key):

    GET  /ui/api/heldout?model=ID     the held-out rows of the run behind a served model, with their references
    GET  /ui/api/reports              the report folders of `reports=[...]`: summary table, plots, answers page
    GET  /ui/api/reports/N/FILE       a file of report N (a plot, answers.html)
    POST /ui/api/load {"path": ...}   serve a run dir, adapter or bundle from a report (the arena's "load")

A static page over the API rather than Gradio: what a user sees is exactly what API clients get (streaming,
errors, the key), it adds no dependency to the server, and it loads offline in a few kilobytes.
"""

from __future__ import annotations

import csv
from pathlib import Path

from convobot.config import ServeConfig
from convobot.errors import ModelPathError, UserError
from convobot.runs.loading import run_behind
from convobot.runs.rundir import CONFIG, RunDir
from convobot.serving.models import Registry
from convobot.template import answer_of

PAGE = Path(__file__).with_name("ui")
HELDOUT_ROWS = 200  # held-out rows the arena lists per model
REPORT_FILES = (".png", ".html", ".csv", ".md")  # what /ui/api/reports/N/FILE hands out


def add_ui(app, registry: Registry, cfg: ServeConfig) -> None:
    from fastapi import Body
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import FileResponse, RedirectResponse
    from fastapi.staticfiles import StaticFiles

    from convobot.serving.api import RequestError

    app.mount("/ui/static", StaticFiles(directory=PAGE), name="ui-static")

    @app.get("/", include_in_schema=False)
    def root():
        return RedirectResponse("/ui")

    @app.get("/ui", include_in_schema=False)
    def page():
        return FileResponse(PAGE / "index.html", headers={"cache-control": "no-cache"})

    @app.get("/ui/api/heldout")
    def heldout(model: str):
        run = run_of(registry.get(model).path)
        if run is None:
            return {"model": model, "run": None, "rows": []}
        return {"model": model, "run": str(run.path), "rows": [row_for_page(row) for row in
                                                               run.heldout_rows()[:HELDOUT_ROWS]]}

    @app.get("/ui/api/reports")
    def reports():
        return {"reports": [report_summary(index, Path(folder)) for index, folder in enumerate(cfg.reports)]}

    @app.get("/ui/api/reports/{index}/{name:path}")
    def report_file(index: int, name: str):
        if not 0 <= index < len(cfg.reports):
            raise RequestError(f"no report {index}: this server shows {len(cfg.reports)}", "index", status=404)
        folder = Path(cfg.reports[index]).resolve()
        path = (folder / name).resolve()
        if folder not in path.parents or path.suffix not in REPORT_FILES or not path.is_file():
            raise RequestError(f"report {index} has no file {name!r}", "name", status=404)
        return FileResponse(path)

    @app.post("/ui/api/load")
    async def load(path: str = Body(embed=True)):
        try:
            served = await run_in_threadpool(registry.add, path)
        except UserError as err:
            raise RequestError(str(err), "path") from err
        return {"id": served.model_id, "path": served.path}


def run_of(path: str) -> RunDir | None:
    """The run behind a served model's weights (a run's adapter/ or model/, or a bundle merged from a run), if any."""
    folder = Path(path)
    if not folder.exists():  # an adapter group's base, described rather than a folder
        return None
    if (folder.parent / CONFIG).is_file():
        folder = folder.parent
    try:
        return run_behind(folder)
    except (ModelPathError, UserError):
        return None


def row_for_page(row: dict) -> dict:
    """A held-out row as the arena asks it: the turns before the answer (the last one the user's, with the Alpaca
    input as its own field) and the reference answer."""
    if "messages" in row:
        turns = [{key: value for key, value in turn.items() if value is not None} for turn in row["messages"][:-1]]
    else:
        turns = [{"role": "user", "content": row["instruction"]} | ({"input": row["input"]} if row.get("input") else {})]
    return {"messages": turns, "reference": answer_of(row)}


def report_summary(index: int, folder: Path) -> dict:
    """What the Runs tab shows of a report folder: its title, summary table (each run's path, to load it), plots and
    whether it has the answers side by side."""
    if not folder.is_dir():
        return {"index": index, "folder": str(folder), "title": folder.name, "error": f"{folder} is not a folder",
                "rows": [], "plots": [], "answers": False}
    markdown = next((folder / name for name in ("report.md", "summary.md") if (folder / name).is_file()), None)
    title = next((line[2:].strip() for line in markdown.read_text().splitlines() if line.startswith("# ")),
                 folder.name) if markdown else folder.name
    table = folder / "summary.csv"
    rows = list(csv.DictReader(table.open())) if table.is_file() else []
    return {"index": index, "folder": str(folder), "title": title, "rows": rows,
            "plots": sorted(str(p.relative_to(folder)) for p in folder.glob("plots/*.png")),
            "answers": (folder / "answers.html").is_file()}

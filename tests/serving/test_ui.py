"""The page beside the API (`convobot serve ... ui=true`) in a real browser: Debian's chromium driven by Playwright.
Chat streams the right answer to a bundled task, the arena answers with two models side by side and takes a
held-out row in one click, the Runs tab shows a report and loads its run into the arena, and a wrong API key is
shown as an error. The chat and arena screenshots are taken on the way: into CONVOBOT_SCREENSHOTS (docs/images to
refresh the docs' pictures) or a temp folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import made_once, start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (Debian: apt-get install chromium)"),
]
KEY = "secret"
# A bundled task the model below answers right: what 300 steps of the embedded default learn first.
QUESTION, INPUT, ANSWER = "How many words are in the input?", "apple bird cat", "3"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, quiet_merge):
    """The embedded default trained 300 steps (it counts words right by then), merged, and compared; once per
    session for all workers."""
    from convobot.config import compose, validate
    from convobot.reports.compare import compare
    from convobot.training.recipe import run

    def make(root: Path) -> None:
        run(validate(compose(["train.max_steps=300", "report.before=false", "report.samples=0",
                              "report.exact_match_rows=0"])), root / "sft")
        quiet_merge(run_dir=str(root / "sft"), output_dir=str(root / "bot"))
        compare([root / "sft"], root / "report", title="one run")

    return made_once(tmp_path_factory, "ui", make)


@pytest.fixture(scope="module")
def server(trained):
    running = start_server(f"models=[merged:{trained / 'bot'},sft:{trained / 'sft'}]", "backend=torch", "ui=true",
                           f"reports=[{trained / 'report'}]", f"api_key={KEY}")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is in the dev extra")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on /ui with the API key entered, and the console's errors collected."""
    opened = browser.new_page(viewport={"width": 1280, "height": 760})
    opened.errors = []
    opened.on("pageerror", lambda error: opened.errors.append(str(error)))
    opened.goto(f"{server.url}/ui")
    opened.fill("#api-key", KEY)
    opened.locator("#api-key").dispatch_event("change")
    yield opened
    assert not opened.errors
    opened.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("CONVOBOT_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def test_chat_streams_the_answer_and_regenerates_and_resets(page, screenshots):
    sent = []
    page.on("request", lambda request: sent.append(json.loads(request.post_data))
            if request.url.endswith("/v1/chat/completions") else None)
    expect(page.locator("#chat-model option")).to_have_count(3)  # merged, sft and its base
    expect(page.locator("#arena")).to_be_hidden()
    expect(page.locator("#runs")).to_be_hidden()
    page.select_option("#chat-model", "merged")
    page.fill("#chat-message", QUESTION)
    page.fill("#chat-input", INPUT)
    page.click("#chat-send")
    answer = page.locator(".message.assistant")
    expect(answer.locator(".meta")).to_contain_text("tok/s")
    assert answer.first.inner_text().splitlines()[0] == ANSWER
    assert sent[0]["stream"] is True and sent[0]["messages"] == [{"role": "user", "content": QUESTION,
                                                                   "input": INPUT}]
    page.screenshot(path=str(screenshots / "ui-chat.png"))
    page.click("#chat-regenerate")
    expect(page.locator(".message")).to_have_count(2)
    expect(answer.locator(".meta")).to_contain_text("tok/s")
    assert len(sent) == 2 and sent[1]["messages"] == sent[0]["messages"]
    # A regenerate the API refuses (more new tokens than the context) shows why and keeps the answer there was.
    page.fill("#chat-max-tokens", "100000")
    page.click("#chat-regenerate")
    expect(page.locator("#error")).to_contain_text("maximum context length")
    expect(page.locator(".message")).to_have_count(2)
    assert answer.first.inner_text().splitlines()[0] == ANSWER
    page.click("#chat-reset")
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#error")).to_be_hidden()


def test_arena_answers_side_by_side_from_a_held_out_row(page, server, screenshots):
    page.click("[data-tab=arena]")
    for model in ("tiny-gpt2", "sft", "merged"):
        page.locator(f"#arena-models input[value='{model}']").uncheck()
    page.locator("#arena-models input[value='sft']").check()
    page.fill("#arena-message", QUESTION)
    page.click("#arena-send")
    expect(page.locator("#error")).to_have_text("choose 2 to 4 models to compare")
    for model in ("tiny-gpt2", "sft", "merged"):  # the base, the adapter trained on it, the release merged from it
        page.locator(f"#arena-models input[value='{model}']").check()
    page.select_option("#arena-heldout-model", "sft")
    page.locator("#arena-heldout li").first.click()
    first_row = json.loads((Path(server_run(server)) / "heldout.jsonl").read_text().splitlines()[0])
    expect(page.locator("#arena-reference")).to_have_text(f"Reference: {first_row['output']}")
    assert page.input_value("#arena-message") == first_row["instruction"]
    page.locator("#arena-message").press_sequentially("!")  # edited: no longer the held-out row
    expect(page.locator("#arena-reference")).to_be_hidden()
    page.locator("#arena-heldout li").first.click()
    page.click("#arena-send")
    expect(page.locator(".column[data-done=true]")).to_have_count(3)
    answers = {column.get_attribute("data-model"): column.locator(".answer").inner_text()
               for column in page.locator(".column").all()}
    # The merged release and the adapter it was merged from answer alike, greedily.
    assert answers["merged"] == answers["sft"] and answers["merged"].strip()
    expect(page.locator(".column .meta").first).to_contain_text("tokens in")
    page.screenshot(path=str(screenshots / "ui-arena.png"))


def test_runs_tab_shows_the_report_and_loads_its_run_into_the_arena(page):
    page.click("[data-tab=runs]")
    expect(page.locator("#chat")).to_be_hidden()
    expect(page.locator("#arena")).to_be_hidden()
    expect(page.locator("#runs-title")).to_have_text("one run")
    expect(page.locator("#runs-table tr")).to_have_count(2)
    expect(page.locator("#runs-plots img")).to_have_count(4)
    assert page.locator("#runs-plots img").first.evaluate("image => image.decode().then(() => image.naturalWidth)")
    page.click("#runs-table button")
    expect(page.locator("#arena")).to_be_visible()
    expect(page.locator("#arena-models input[value='sft']")).to_be_checked()


def test_a_wrong_api_key_is_shown_not_swallowed(browser, server):
    page = browser.new_page()
    page.goto(f"{server.url}/ui")
    page.fill("#api-key", "wrong")
    page.locator("#api-key").dispatch_event("change")
    expect(page.locator("#error")).to_contain_text("401: missing or wrong API key")
    page.fill("#chat-message", QUESTION)
    page.click("#chat-send")
    expect(page.locator("#error")).to_contain_text("401")
    expect(page.locator(".message")).to_have_count(0)
    assert page.input_value("#chat-message") == QUESTION  # kept, to send again with the right key
    page.close()


def server_run(server) -> str:
    """The run dir the server's `sft` model comes from (the fixture's)."""
    import urllib.request

    request = urllib.request.Request(f"{server.url}/v1/models", headers={"authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request) as response:
        models = {model["id"]: model for model in json.load(response)["data"]}
    return str(Path(models["sft"]["root"]).parent)

"""The page's routes without a browser: the page is public and its data guarded by the API key, held-out rows come
from the run behind a served model, report files stay inside their report folder, and loading a run serves it."""

import json
import urllib.error
import urllib.request

import pytest
from conftest import post, start_server

KEY = "secret"


def get(url: str, key: str | None = KEY) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture(scope="module")
def server(smoke_release, tmp_path_factory):
    from convobot.reports.compare import compare

    report = compare([smoke_release.run_dir], tmp_path_factory.mktemp("ui_api") / "report", title="smoke")
    (report.parent.parent / "secret.md").write_text("not part of the report")
    running = start_server(f"models=[bot:{smoke_release.release}]", "backend=torch", "ui=true",
                           f"reports=[{report.parent},{report.parent.parent / 'missing'}]", f"api_key={KEY}")
    running.report = report.parent
    yield running
    running.stop()


def test_the_page_is_public_and_its_data_needs_the_key(server):
    status, page = get(f"{server.url}/", key=None)  # / redirects to /ui
    assert status == 200 and b"<title>convobot</title>" in page
    assert get(f"{server.url}/ui/static/app.js", key=None)[0] == 200
    status, body = get(f"{server.url}/ui/api/reports", key=None)
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"


def test_held_out_rows_come_from_the_run_behind_a_bundle(server, smoke_release):
    status, body = get(f"{server.url}/ui/api/heldout?model=bot")
    rows = json.loads(body)["rows"]
    heldout = [json.loads(line) for line in (smoke_release.run_dir / "heldout.jsonl").read_text().splitlines()]
    assert status == 200 and json.loads(body)["run"] == str(smoke_release.run_dir) and len(rows) == len(heldout)
    assert rows[0]["reference"] == heldout[0]["output"]
    assert rows[0]["messages"][-1]["content"] == heldout[0]["instruction"]
    assert get(f"{server.url}/ui/api/heldout?model=nope")[0] == 404


def test_reports_list_their_runs_and_hand_out_only_their_own_files(server, smoke_release):
    report, missing = json.loads(get(f"{server.url}/ui/api/reports")[1])["reports"]
    assert report["title"] == "smoke" and len(report["rows"]) == 1 and "plots/loss_curves.png" in report["plots"]
    assert report["rows"][0]["path"] == str(smoke_release.run_dir)  # absolute: loadable from any folder
    assert missing["error"].endswith("missing is not a folder") and missing["rows"] == [] == missing["plots"]
    status, png = get(f"{server.url}/ui/api/reports/0/plots/loss_curves.png")
    assert status == 200 and png.startswith(b"\x89PNG")
    for name in ("../secret.md", "%2E%2E/secret.md", "report.py", "missing.png"):
        assert get(f"{server.url}/ui/api/reports/0/{name}")[0] == 404, name
    assert get(f"{server.url}/ui/api/reports/7/report.md")[0] == 404


def test_loading_a_run_serves_it_and_a_path_that_is_no_model_is_refused(server, smoke_release, tmp_path):
    status, body, _ = post(f"{server.url}/ui/api/load", json.dumps({"path": str(smoke_release.run_dir)}).encode(),
                           {"authorization": f"Bearer {KEY}"})
    assert status == 200 and body["id"] == smoke_release.run_dir.name
    models = json.loads(get(f"{server.url}/v1/models")[1])["data"]
    assert body["id"] in {model["id"] for model in models}
    again = post(f"{server.url}/ui/api/load", json.dumps({"path": str(smoke_release.run_dir)}).encode(),
                 {"authorization": f"Bearer {KEY}"})
    assert again[0] == 200 and again[1]["id"] == body["id"]  # already served: the same model
    status, body, _ = post(f"{server.url}/ui/api/load", json.dumps({"path": str(tmp_path)}).encode(),
                           {"authorization": f"Bearer {KEY}"})
    assert status == 400 and "is not a model" in body["error"]["message"] and body["error"]["param"] == "path"

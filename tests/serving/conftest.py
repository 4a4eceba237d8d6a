"""Starting `convobot serve` as a real process on a free loopback port, and speaking to it over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    """Status, JSON body and headers of a POST (errors included)."""
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw.startswith(b"{") else {"text": raw.decode()}, \
                {key.lower(): value for key, value in response.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), {key.lower(): value for key, value in err.headers.items()}


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: object  # the process's output, a temp file

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def client(self, api_key: str = "unused"):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_server(*overrides: str, timeout: float = 300) -> Server:
    """`convobot serve` with these overrides on a free port, once /health answers."""
    port, log = free_port(), tempfile.TemporaryFile()
    process = subprocess.Popen([sys.executable, "-m", "convobot", "serve", f"port={port}", "log_level=warning",
                                "device=cpu", *overrides], stdout=log, stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"convobot serve exited: {server.output()[-3000:]}")
        if healthy(f"{server.url}/health"):
            return server
        time.sleep(0.3)
    server.stop()
    pytest.fail(f"convobot serve did not answer /health within {timeout} s: {server.output()[-3000:]}")


def made_once(tmp_path_factory, name: str, make) -> Path:
    """A folder `make(folder)` fills once per test session, however many xdist workers ask: the first makes it under
    a lock in the session's shared temp folder, the others wait and reuse it (module and session fixtures are per
    worker, and xdist 3.8 cannot keep a module's tests on one worker under pytest 9)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-N/: this session's, shared by its workers
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (folder / ".made").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            make(folder)
            (folder / ".made").touch()
    return folder

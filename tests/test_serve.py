"""convobot-serve as a real process on a free localhost port, spoken to with the official openai client."""

import io
import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import urllib.error
import urllib.request

import pytest

from convobot.chat import chat
from convobot.config import ChatConfig, GenerationOptions

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

QUESTION = ("Reverse the order of the words.", "apple bird cat")
# What an OpenAI client sends: role and content only, the Alpaca input inside the content.
CONTENT = f"{QUESTION[0]}\n\n### Input:\n{QUESTION[1]}"


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(smoke_release):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "convobot.serve", f"model={smoke_release.release}",
                                f"port={port}", "model_id=smoke", "log_level=warning", "device=cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"convobot-serve exited: {process.stdout.read()}")
        if healthy(f"{base_url}/health"):
            break
        time.sleep(0.3)
    else:
        process.kill()
        pytest.fail("convobot-serve did not answer /health within 120 s")
    yield process, base_url, openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    if process.poll() is None:
        process.kill()
        process.wait()


def greedy_chat_answer(release, max_new_tokens) -> str:
    """convobot-chat's greedy answer, with the bundle's other generation settings (as the server's defaults)."""
    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=0.0)
    return chat(ChatConfig(model=str(release), prompt=QUESTION[0], input=QUESTION[1], generation=options),
                out=io.StringIO())


def test_models_lists_the_served_bundle(server):
    _, _, client = server
    assert [model.id for model in client.models.list()] == ["smoke"]


def test_streamed_and_whole_answers_equal_convobot_chat(server, smoke_release):
    _, _, client = server
    expected = greedy_chat_answer(smoke_release.release, 24)
    messages = [{"role": "user", "content": CONTENT}]
    whole = client.chat.completions.create(model="smoke", messages=messages, temperature=0, max_tokens=24)
    assert whole.choices[0].message.content == expected and whole.choices[0].message.role == "assistant"
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="smoke", messages=messages, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # The `input` key of convobot's chat template reaches the template too.
    keyed = client.chat.completions.create(model="smoke", temperature=0, max_tokens=24, messages=[
        {"role": "user", "content": QUESTION[0], "input": QUESTION[1]}])
    assert keyed.choices[0].message.content == expected


def test_eight_concurrent_requests_are_each_answered_correctly(server, smoke_release):
    _, _, client = server
    questions = [("What is 2 plus 3?", ""), QUESTION, ("Sort the words alphabetically.", "owl cat"),
                 ("Repeat the last word.", "sun moon")] * 2

    def ask(question):
        content = question[0] + (f"\n\n### Input:\n{question[1]}" if question[1] else "")
        reply = client.chat.completions.create(model="smoke", temperature=0, max_tokens=12,
                                               messages=[{"role": "user", "content": content}])
        return reply.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, questions))
    alone = {q: chat(ChatConfig(model=str(smoke_release.release), prompt=q[0], input=q[1],
                                generation=GenerationOptions(max_new_tokens=12, temperature=0.0)), out=io.StringIO())
             for q in questions[:4]}
    assert answers == [alone[q] for q in questions]


@pytest.mark.parametrize("body,status,says", [
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "expected a user turn"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000}, 400, "maximum context length is 256"),
    ({"messages": [{"role": "user", "content": "hi " * 400}]}, 400, "maximum context length is 256"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": "hi"}, 400, "messages"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
])
def test_malformed_requests_get_a_4xx_with_a_clear_message(server, body, status, says):
    _, base_url, _ = server
    code, answer = post(f"{base_url}/v1/chat/completions", json.dumps(body).encode())
    assert code == status and says in answer["error"]["message"]


def test_broken_json_is_a_400(server):
    _, base_url, _ = server
    code, answer = post(f"{base_url}/v1/chat/completions", b"{not json")
    assert code == 400 and "JSON" in answer["error"]["message"]


def test_text_completions_continue_the_raw_prompt(server):
    _, _, client = server
    reply = client.completions.create(model="smoke", prompt="### Instruction:\n", max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason in {"stop", "length"} and reply.usage.completion_tokens <= 4


def test_the_server_shuts_down_on_sigterm(server):
    process, base_url, _ = server
    process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit status -SIGTERM).
    assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    assert not healthy(f"{base_url}/health")


def test_a_tampered_bundle_is_refused_before_serving(tampered_bundle):
    result = subprocess.run([sys.executable, "-m", "convobot.serve", f"model={tampered_bundle}",
                             f"port={free_port()}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "VerificationError" in result.stderr and "model.safetensors: checksum differs" in result.stderr


def test_the_config_composes_with_the_cli_defaults(compose_command):
    cfg = compose_command("serve", "model=m", "port=8123")
    assert cfg.host == "127.0.0.1" and cfg.port == 8123 and cfg.verify_checksums

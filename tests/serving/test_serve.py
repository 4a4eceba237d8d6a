"""convobot serve as a real process on a free loopback port, spoken to with the official openai client, point by
point as llama.cpp's server tests and vLLM's OpenAI entrypoint tests check theirs: answers, streaming invariants,
stop, n, logprobs, seed, usage, refused fields, errors, the API key, body and queue limits, SIGTERM."""

import io
import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import free_port, healthy, post, start_server

from convobot.config import ChatConfig, GenerationOptions
from convobot.serving.chat import chat

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

QUESTION = ("Reverse the order of the words.", "apple bird cat")
# What an OpenAI client sends: role and content only, the Alpaca input inside the content.
CONTENT = f"{QUESTION[0]}\n\n### Input:\n{QUESTION[1]}"
MESSAGES = [{"role": "user", "content": CONTENT}]


@pytest.fixture(scope="module")
def server(smoke_release):
    running = start_server(f"model={smoke_release.release}", "model_id=smoke", "backend=torch")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def greedy_chat_answer(release, max_new_tokens, prompt=QUESTION[0], input=QUESTION[1]) -> str:
    """convobot chat's greedy answer, with the bundle's other generation settings (as the server's defaults)."""
    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=0.0)
    return chat(ChatConfig(model=str(release), prompt=prompt, input=input, generation=options), out=io.StringIO())


def test_models_lists_the_served_bundle(client):
    assert [model.id for model in client.models.list()] == ["smoke"]


def test_streamed_and_whole_answers_equal_convobot_chat(client, smoke_release):
    expected = greedy_chat_answer(smoke_release.release, 24)
    whole = client.chat.completions.create(model="smoke", messages=MESSAGES, temperature=0, max_tokens=24)
    assert whole.choices[0].message.content == expected and whole.choices[0].message.role == "assistant"
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="smoke", messages=MESSAGES, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # The `input` key of convobot's chat template reaches the template too.
    keyed = client.chat.completions.create(model="smoke", temperature=0, max_tokens=24, messages=[
        {"role": "user", "content": QUESTION[0], "input": QUESTION[1]}])
    assert keyed.choices[0].message.content == expected


def test_stream_invariants(client):
    """The role comes in the first delta of each choice, every chunk has one id, finish_reason only on a choice's
    last chunk, usage only on the extra last chunk when asked for, and the streamed text is the whole text."""
    chunks = list(client.chat.completions.create(model="smoke", messages=MESSAGES, temperature=0, max_tokens=16,
                                                 n=2, stream=True, stream_options={"include_usage": True}))
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(chunk.usage is None for chunk in chunks[:-1])
    for index in range(2):
        own = [chunk.choices[0] for chunk in chunks if chunk.choices and chunk.choices[0].index == index]
        assert own[0].delta.role == "assistant" and all(c.delta.role is None for c in own[1:])
        assert [c.finish_reason is not None for c in own] == [False] * (len(own) - 1) + [True]
        whole = client.chat.completions.create(model="smoke", messages=MESSAGES, temperature=0, max_tokens=16)
        assert "".join(c.delta.content or "" for c in own) == whole.choices[0].message.content
    plain = list(client.chat.completions.create(model="smoke", messages=MESSAGES, max_tokens=4, stream=True))
    assert all(chunk.usage is None for chunk in plain)


def test_stop_sequences_end_the_answer_before_them(client, smoke_release):
    full = greedy_chat_answer(smoke_release.release, 24)
    assert len(full) >= 4, full
    stop = full[len(full) // 2:len(full) // 2 + 2]
    for asked in (stop, ["never-there", stop]):
        reply = client.chat.completions.create(model="smoke", messages=MESSAGES, temperature=0, max_tokens=24,
                                               stop=asked)
        assert reply.choices[0].message.content == full[:full.index(stop)]
        assert reply.choices[0].finish_reason == "stop"
        streamed = client.chat.completions.create(model="smoke", messages=MESSAGES, temperature=0, max_tokens=24,
                                                  stop=asked, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[:full.index(stop)]


def test_n_choices_and_seeds(client):
    settings = {"model": "smoke", "messages": MESSAGES, "temperature": 1.2, "max_tokens": 12, "n": 3, "seed": 11}
    first, second = (client.chat.completions.create(**settings) for _ in range(2))
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert len({c.message.content for c in first.choices}) > 1
    other = client.chat.completions.create(**(settings | {"seed": 12}))
    assert [c.message.content for c in other.choices] != [c.message.content for c in first.choices]
    with pytest.raises(openai.BadRequestError, match="n: at most 8"):
        client.chat.completions.create(**(settings | {"n": 9}))


def test_logprobs_chat_and_completions(client):
    reply = client.chat.completions.create(model="smoke", messages=MESSAGES, temperature=0, max_tokens=6,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # greedy: the chosen token is the likeliest
        assert bytes(entry.bytes).decode() == entry.token
    text = client.completions.create(model="smoke", prompt="reverse | cat dog sun =", temperature=0, max_tokens=5,
                                     logprobs=2)
    logprobs = text.choices[0].logprobs
    assert "".join(logprobs.tokens) == text.choices[0].text and len(logprobs.top_logprobs[0]) == 2
    assert logprobs.text_offset[0] == 0 and all(lp <= 0 for lp in logprobs.token_logprobs)
    assert reply.choices[0].logprobs is not None
    plain = client.chat.completions.create(model="smoke", messages=MESSAGES, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_max_completion_tokens_and_usage(client):
    reply = client.chat.completions.create(model="smoke", messages=MESSAGES, temperature=0,
                                           max_completion_tokens=3, stop=None)
    assert reply.usage.completion_tokens <= 3 and reply.choices[0].finish_reason in ("length", "stop")
    text = client.completions.create(model="smoke", prompt="### Instruction:\n", temperature=0)
    assert text.usage.completion_tokens <= 16  # OpenAI's default max_tokens for completions


def test_eight_concurrent_requests_are_each_answered_correctly(client, smoke_release):
    questions = [("What is 2 plus 3?", ""), QUESTION, ("Sort the words alphabetically.", "owl cat"),
                 ("Repeat the last word.", "sun moon")] * 2

    def ask(question):
        content = question[0] + (f"\n\n### Input:\n{question[1]}" if question[1] else "")
        reply = client.chat.completions.create(model="smoke", temperature=0, max_tokens=12,
                                               messages=[{"role": "user", "content": content}])
        return reply.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, questions))
    alone = {q: greedy_chat_answer(smoke_release.release, 12, *q) for q in questions[:4]}
    assert answers == [alone[q] for q in questions]


@pytest.mark.parametrize("body,status,says,param", [
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "expected a user turn", "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000}, 400, "maximum context length is 256",
     "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi " * 400}]}, 400, "maximum context length is 256", "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature", "temperature"),
    ({"messages": "hi"}, 400, "messages", "messages"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist", "model"),
    ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 0.5}, 400, "frequency_penalty is not "
     "supported", "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools is not "
     "supported", "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, 400,
     "response_format is not supported", "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": 5}, 400, "top_k", "top_k"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "needs logprobs", "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4", "stop"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "only text parts", "messages[0].content"),
])
def test_malformed_or_unsupported_requests_get_a_4xx_naming_the_field(server, body, status, says, param):
    code, answer, _ = post(f"{server.url}/v1/chat/completions", json.dumps(body).encode())
    assert code == status and says in answer["error"]["message"], answer
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"


def test_neutral_values_of_unsupported_fields_are_accepted(client):
    reply = client.chat.completions.create(model="smoke", messages=MESSAGES, max_tokens=2, frequency_penalty=0,
                                           presence_penalty=0.0, logit_bias={}, tool_choice="none", user="u1",
                                           response_format={"type": "text"})
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_broken_json_is_a_400(server):
    code, answer, _ = post(f"{server.url}/v1/chat/completions", b"{not json")
    assert code == 400 and "JSON" in answer["error"]["message"]


def test_text_completions_continue_the_raw_prompt(client):
    reply = client.completions.create(model="smoke", prompt="### Instruction:\n", max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason in {"stop", "length"} and reply.usage.completion_tokens <= 4
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model="smoke", prompt="x", max_tokens=2, best_of=3)


def test_the_server_shuts_down_on_sigterm(server):
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0
    assert not healthy(f"{server.url}/health")


def test_a_tampered_bundle_is_refused_before_serving(tampered_bundle):
    result = subprocess.run([sys.executable, "-m", "convobot", "serve", f"model={tampered_bundle}",
                             f"port={free_port()}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "VerificationError" in result.stderr and "model.safetensors: checksum differs" in result.stderr


def test_the_config_composes_with_the_cli_defaults(compose_command):
    cfg = compose_command("serve", "model=m", "port=8123")
    assert cfg.host == "127.0.0.1" and cfg.port == 8123 and cfg.verify_checksums and cfg.backend == "auto"
    assert cfg.max_queued == 64 and cfg.max_body_bytes == 1048576 and cfg.api_key is None


# ----------------------------------------------------------------------------- locked down and bounded


@pytest.fixture(scope="module")
def guarded(smoke_release):
    """One row, no queue, a small body limit and an API key."""
    running = start_server(f"model={smoke_release.release}", "model_id=smoke", "backend=torch", "api_key=secret",
                           "max_batch=1", "max_queued=0", "max_body_bytes=4096")
    yield running
    running.stop()


def test_every_v1_route_needs_the_api_key_and_health_does_not(guarded):
    assert healthy(f"{guarded.url}/health")
    for key in ("unused", "secreT"):
        with pytest.raises(openai.AuthenticationError):
            guarded.client(key).models.list()
    for route in ("chat/completions", "completions", "load_lora_adapter"):
        code, answer, _ = post(f"{guarded.url}/v1/{route}", b"{}")
        assert code == 401 and answer["error"]["type"] == "authentication_error"
    reply = guarded.client("secret").chat.completions.create(model="smoke", messages=MESSAGES, max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_a_body_over_the_limit_is_a_413_before_it_is_read(guarded):
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 20_000_000}]}).encode()
    started = time.monotonic()
    code, answer, _ = post(f"{guarded.url}/v1/chat/completions", body, {"authorization": "Bearer secret"})
    assert code == 413 and "max_body_bytes" in answer["error"]["message"]
    assert time.monotonic() - started < 30


def test_a_full_queue_is_a_429_with_retry_after_and_the_running_request_finishes(guarded):
    client = guarded.client("secret")
    # The tiny model writes 200 tokens in well under a second: on a busy machine the running request can finish
    # before the second arrives, so the second is tried against a few fresh streams.
    for _ in range(3):
        stream = client.chat.completions.create(model="smoke", messages=MESSAGES, max_tokens=200, stream=True,
                                                extra_body={"ignore_eos": True})
        first = next(iter(stream))  # the one row is taken
        code, answer, headers = post(f"{guarded.url}/v1/chat/completions",
                                     json.dumps({"messages": MESSAGES, "max_tokens": 2}).encode(),
                                     {"authorization": "Bearer secret"})
        rest = list(stream)
        assert first.choices[0].delta.role == "assistant" and rest[-1].choices[0].finish_reason == "length"
        if code != 200:
            break
    assert code == 429 and headers.get("retry-after") == "1" and answer["error"]["code"] == "rate_limit_exceeded"


def test_sigterm_finishes_the_running_stream_then_exits_0(guarded):
    client = guarded.client("secret")
    stream = client.chat.completions.create(model="smoke", messages=MESSAGES, max_tokens=120, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = [next(iter(stream))]
    threading.Timer(0.2, guarded.process.send_signal, (signal.SIGTERM,)).start()
    chunks += list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(len(c.choices[0].delta.content or "") > 0 for c in chunks) > 1
    assert guarded.process.wait(timeout=60) == 0

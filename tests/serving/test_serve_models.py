"""Several models in one server: a merged bundle, two LoRA runs of one base (one copy of it, served too), adapters
loaded and dropped while serving; the llama.cpp backend behind the same API; and a load test on loopback."""

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import healthy, post, start_server

from convobot.config import ChatConfig, GenerationOptions
from convobot.serving.chat import chat

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

QUESTIONS = [("Reverse the order of the words.", "apple bird cat"), ("How many words are in the input?", "owl sun"),
             ("What is 2 plus 3?", "")]


def content(question) -> str:
    return question[0] + (f"\n\n### Input:\n{question[1]}" if question[1] else "")


def greedy(model_path, question, max_new_tokens=16) -> str:
    """convobot chat's greedy answer (repetition penalty as the server's default for runs: convobot's 1.1)."""
    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=0.0)
    return chat(ChatConfig(model=str(model_path), prompt=question[0], input=question[1], generation=options),
                out=io.StringIO())


def ask(client, model, question, max_tokens=16) -> str:
    reply = client.chat.completions.create(model=model, temperature=0, max_tokens=max_tokens,
                                           messages=[{"role": "user", "content": content(question)}])
    return reply.choices[0].message.content


@pytest.fixture(scope="module")
def runs(smoke_release, train_smoke, tmp_path_factory):
    """Three LoRA runs of the bundled base: the smoke run and two trained further (different answers)."""
    root = tmp_path_factory.mktemp("adapters")
    return {"first": smoke_release.run_dir, "second": train_smoke(root / "second", "seed=1", "train.max_steps=40"),
            "third": train_smoke(root / "third", "seed=2", "train.max_steps=40", "optim.lr=5e-3")}


@pytest.fixture(scope="module")
def server(smoke_release, runs):
    running = start_server(f"models=[bot:{smoke_release.release},first:{runs['first']},"
                           f"second:{runs['second']}/adapter]", "backend=torch")
    yield running
    running.stop()


def test_models_lists_each_with_its_parent_base(server):
    listed = {model.id: model for model in server.client().models.list()}
    assert set(listed) == {"bot", "first", "second", "tiny-gpt2"}
    assert listed["first"].parent == listed["second"].parent == "tiny-gpt2"
    assert listed["bot"].parent is None and listed["tiny-gpt2"].parent is None


def test_each_adapter_answers_as_convobot_chat_on_its_run(server, runs, smoke_release):
    client = server.client()
    for question in QUESTIONS:
        assert ask(client, "first", question) == greedy(runs["first"], question)
        assert ask(client, "second", question) == greedy(runs["second"], question)
        assert ask(client, "bot", question) == greedy(smoke_release.release, question)
    assert [ask(client, "second", q) for q in QUESTIONS] != [ask(client, "tiny-gpt2", q) for q in QUESTIONS]


def test_requests_for_different_adapters_and_the_base_decode_together(server, runs):
    client = server.client()
    work = [(model, question) for question in QUESTIONS for model in ("first", "second", "tiny-gpt2")]
    alone = {item: ask(client, *item) for item in work}
    with ThreadPoolExecutor(len(work)) as pool:
        together = list(pool.map(lambda item: ask(client, *item), work))
    assert together == [alone[item] for item in work]


def test_adapters_are_loaded_and_dropped_while_serving(server, runs, tmp_path):
    client = server.client()
    code, answer, _ = post(f"{server.url}/v1/load_lora_adapter",
                           json.dumps({"lora_name": "third", "lora_path": str(runs["third"])}).encode())
    assert code == 200 and "added" in answer["text"], answer
    assert "third" in {model.id for model in client.models.list()}
    assert ask(client, "third", QUESTIONS[0]) == greedy(runs["third"], QUESTIONS[0])
    for body, says in [({"lora_name": "third", "lora_path": str(runs["third"])}, "already served"),
                       ({"lora_name": "x", "lora_path": str(tmp_path)}, "is not a model"),
                       ({"lora_name": "y", "lora_path": str(tmp_path / "missing")}, "does not exist")]:
        code, answer, _ = post(f"{server.url}/v1/load_lora_adapter", json.dumps(body).encode())
        assert code == 400 and says in answer["error"]["message"]
    assert ask(client, "second", QUESTIONS[1]) == greedy(runs["second"], QUESTIONS[1])  # the others still serve
    code, answer, _ = post(f"{server.url}/v1/unload_lora_adapter", json.dumps({"lora_name": "third"}).encode())
    assert code == 200
    with pytest.raises(openai.NotFoundError):
        ask(client, "third", QUESTIONS[0])
    code, answer, _ = post(f"{server.url}/v1/unload_lora_adapter", json.dumps({"lora_name": "bot"}).encode())
    assert code == 400 and "not a served adapter" in answer["error"]["message"]


@pytest.mark.slow
def test_load_on_loopback_mixed_adapters_and_dropped_streams(server):
    """16 clients x 8 requests over three models, every fourth stream dropped after its first chunk: each request
    is answered (or its stream dropped as planned), the server still answers, its memory is flat."""
    client = server.client()
    pid = server.process.pid

    def rss() -> int:
        return int(next(line.split()[1] for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS")))

    def one_client(index: int) -> list[str]:
        outcomes = []
        for k in range(8):
            model = ("first", "second", "tiny-gpt2")[(index + k) % 3]
            messages = [{"role": "user", "content": content(QUESTIONS[k % 3])}]
            if (index + k) % 4 == 0:
                stream = client.chat.completions.create(model=model, messages=messages, max_tokens=40, stream=True,
                                                        extra_body={"ignore_eos": True})
                next(iter(stream))
                stream.close()
                outcomes.append("dropped")
            else:
                reply = client.chat.completions.create(model=model, messages=messages, max_tokens=12)
                outcomes.append(reply.choices[0].finish_reason)
        return outcomes

    ask(client, "first", QUESTIONS[0])
    before = rss()
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        outcomes = [o for part in pool.map(one_client, range(16)) for o in part]
    assert time.monotonic() - started < 600
    assert len(outcomes) == 128 and set(outcomes) <= {"stop", "length", "dropped"}
    assert outcomes.count("dropped") == 32
    assert ask(client, "first", QUESTIONS[0])  # alive and answering
    assert rss() < before * 1.25 + 50_000  # KiB: no growth with the requests served
    assert healthy(f"{server.url}/health")


# ----------------------------------------------------------------------------- the llama.cpp backend


@pytest.fixture(scope="module")
def llama_server(smoke_gguf):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the 'gguf' extra")
    running = start_server(f"model={smoke_gguf.bundle}", "model_id=smoke", "backend=llama_cpp", "gguf_type=f32")
    yield running
    running.stop()


def test_the_llama_cpp_backend_answers_as_llama_cpp_does_behind_the_same_api(llama_server, smoke_gguf):
    import llama_cpp

    from convobot.model.tokenizer import load_tokenizer
    from convobot.template import render_prompt, user_message

    client = llama_server.client()
    tokenizer = load_tokenizer(str(smoke_gguf.bundle))
    llm = llama_cpp.Llama(str(smoke_gguf.bundle / "gguf" / "model-f32.gguf"), n_ctx=256, verbose=False)
    try:
        for question in QUESTIONS:
            ids = tokenizer(render_prompt(tokenizer, [user_message(*question)]), add_special_tokens=False)["input_ids"]
            expected = llm.create_completion(ids, max_tokens=16, temperature=0.0, repeat_penalty=1.0)
            reply = client.chat.completions.create(model="smoke", temperature=0, max_tokens=16,
                                                   extra_body={"repetition_penalty": 1.0},
                                                   messages=[{"role": "user", "content": content(question)}])
            assert reply.choices[0].message.content == expected["choices"][0]["text"]
    finally:
        llm.close()
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):
        client.chat.completions.create(model="smoke", max_tokens=1000, messages=[{"role": "user", "content": "hi"}])
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda q: ask(client, "smoke", q), QUESTIONS * 2))
    assert answers[:3] == answers[3:]
    assert "llama.cpp" in llama_server.output()


def test_backend_llama_cpp_refuses_an_adapter(runs):
    from convobot.config import ServeConfig
    from convobot.errors import ConfigError
    from convobot.serving.models import Registry

    with pytest.raises(ConfigError, match="llama_cpp serves merged bundles"):
        Registry(ServeConfig(backend="llama_cpp")).load([str(runs["first"])])


def test_a_peft_adapter_saved_without_a_tokenizer_is_served_with_its_bases(smoke_release, runs, tmp_path):
    """A plain peft adapter folder (adapter_config.json naming its base, no tokenizer files) answers on that base,
    with the base's tokenizer."""
    import shutil

    from convobot.config import ServeConfig
    from convobot.model.tokenizer import load_tokenizer
    from convobot.serving.models import Registry

    folder = tmp_path / "plain-adapter"
    folder.mkdir()
    shutil.copy(runs["first"] / "adapter" / "adapter_model.safetensors", folder)
    config = json.loads((runs["first"] / "adapter" / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path":
                                                                     str(smoke_release.release)}))
    registry = Registry(ServeConfig(backend="torch"))
    registry.load([f"plain:{folder}"])
    try:
        served = registry.get("plain")
        assert served.parent == smoke_release.release.name and "plain" in served.group.adapters
        assert served.group.tokenizer.get_vocab() == load_tokenizer(str(smoke_release.release)).get_vocab()
    finally:
        registry.stop()


def test_two_models_cannot_share_a_name(smoke_release, runs):
    from convobot.config import ServeConfig
    from convobot.errors import ConfigError
    from convobot.serving.models import Registry

    with pytest.raises(ConfigError, match="two models are called 'x'"):
        Registry(ServeConfig()).load([f"x={smoke_release.release}", f"x:{runs['first']}"])


def test_a_warning_when_the_network_is_served_without_a_key(monkeypatch):
    from convobot.config import ServeConfig
    from convobot.serving.server import network_warning

    monkeypatch.delenv("CONVOBOT_API_KEY", raising=False)
    assert "anyone who can reach it" in network_warning(ServeConfig(host="0.0.0.0"))
    assert network_warning(ServeConfig(host="0.0.0.0", api_key="k")) is None
    assert network_warning(ServeConfig(host="127.0.0.1")) is None and network_warning(ServeConfig(host="::1")) is None
    monkeypatch.setenv("CONVOBOT_API_KEY", "k")
    assert network_warning(ServeConfig(host="0.0.0.0")) is None

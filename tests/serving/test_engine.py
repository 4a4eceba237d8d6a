"""The continuous-batching engine in this process: what a sequence gets is what it would get alone, whatever joins or
leaves the batch around it (greedy answers, seeded samples, stop sequences, log-probabilities), rows are freed, the
queue is bounded, and adapters of one base decode together."""

import threading
import time

import pytest
import torch

from convobot.scoring.generate import answer
from convobot.serving.engine import Delta, Engine, Failed, QueueFull, Request
from convobot.serving.row_lora import BASE
from convobot.serving.sampling import Detokenizer, SamplingParams, next_token
from convobot.serving.torch_runner import TorchRunner
from convobot.template import render_prompt, user_message

ROWS = [{"instruction": "Reverse the order of the words.", "input": "apple bird cat dog", "output": ""},
        {"instruction": "How many words are in the input?", "input": "apple bird cat", "output": ""},
        {"instruction": "What is 2 plus 3?", "input": "", "output": ""},
        {"instruction": "Sort the words alphabetically.", "input": "zebra apple moon owl", "output": ""},
        {"instruction": "Repeat the last word.", "input": "sun moon tree", "output": ""}]


@pytest.fixture(scope="module")
def bundle_model(smoke_release):
    from convobot.runs.loading import load_model

    return load_model(smoke_release.release)


def prompt_ids(tokenizer, row) -> list[int]:
    return tokenizer(render_prompt(tokenizer, [user_message(row["instruction"], row["input"])]),
                     add_special_tokens=False)["input_ids"]


class Collected:
    """A request's events, gathered; `wait` until it is done."""

    def __init__(self):
        self.deltas, self.done, self.finished = [], None, threading.Event()

    def __call__(self, event):
        if isinstance(event, Delta):
            self.deltas.append(event)
        else:
            self.done = event
            self.finished.set()

    def text(self, choice: int = 0) -> str:
        return "".join(d.text for d in self.deltas if d.choice == choice)

    def wait(self) -> "Collected":
        assert self.finished.wait(120), "the request never finished"
        assert not isinstance(self.done, Failed), self.done
        return self


def ask(engine, tokenizer, row, adapter=BASE, n=1, **params) -> Collected:
    collected = Collected()
    engine.submit(Request(prompt_ids(tokenizer, row), SamplingParams(**({"max_tokens": 24} | params)), collected,
                          adapter, n))
    return collected


@pytest.fixture
def engine(bundle_model):
    model, tokenizer = bundle_model
    running = Engine(TorchRunner(model, slots=3, adapters=False), tokenizer, "smoke", max_queued=4,
                     prefill_chunk=8).start()
    yield running
    running.stop()


def test_greedy_answers_in_a_batch_equal_each_answer_alone(engine, bundle_model):
    """Five requests on three rows with prompts prefilled 8 tokens a step: they join and leave while others
    decode, and each answer is generate()'s for that prompt alone."""
    model, tokenizer = bundle_model
    alone = [answer(model, tokenizer, [row], max_new_tokens=24, batch_size=1)[0] for row in ROWS]
    batched = [ask(engine, tokenizer, row) for row in ROWS]
    assert [c.wait().text() for c in batched] == alone
    assert engine.runner.free == 3 and not engine.running  # every row given back


def test_a_seeded_sample_is_the_same_whatever_runs_beside_it(engine, bundle_model):
    _, tokenizer = bundle_model
    settings = {"temperature": 1.0, "top_p": 0.95, "seed": 7, "max_tokens": 16}
    alone = ask(engine, tokenizer, ROWS[0], **settings).wait().text()
    crowded = [ask(engine, tokenizer, row, temperature=1.0, max_tokens=16) for row in ROWS[1:3]]
    again = ask(engine, tokenizer, ROWS[0], **settings)
    assert again.wait().text() == alone
    for other in crowded:
        other.wait()


def test_n_choices_share_a_prompt_and_sample_apart(engine, bundle_model):
    _, tokenizer = bundle_model
    first = ask(engine, tokenizer, ROWS[0], n=3, temperature=1.5, seed=1, max_tokens=12).wait()
    second = ask(engine, tokenizer, ROWS[0], n=3, temperature=1.5, seed=1, max_tokens=12).wait()
    texts = [first.text(i) for i in range(3)]
    assert texts == [second.text(i) for i in range(3)]  # reproducible per choice
    assert len(set(texts)) > 1  # choice j samples from seed + j
    assert all(d.finish_reason in (None, "stop", "length") for d in first.deltas)
    assert sum(d.finish_reason is not None for d in first.deltas) == 3  # one last delta per choice


def test_a_stop_sequence_ends_the_text_before_it(engine, bundle_model):
    _, tokenizer = bundle_model
    full = ask(engine, tokenizer, ROWS[0]).wait().text()
    assert len(full) >= 4, full
    stop = full[len(full) // 2:len(full) // 2 + 2]  # two characters from the middle of the greedy answer
    stopped = ask(engine, tokenizer, ROWS[0], stop=("zzz", stop)).wait()
    assert stopped.text() == full[:full.index(stop)] and stop not in stopped.text()
    assert stopped.deltas[-1].finish_reason == "stop"


def test_held_back_text_waits_for_a_stop_sequence_to_be_decided():
    class Characters:  # one token per character
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    text = Detokenizer(Characters(), stop=("END",))
    for char in "abcEN":
        text.add(ord(char))
    assert text.ready == "abc"  # "EN" may still become "END"
    text.add(ord("X"))
    assert text.ready == "abcENX" and not text.stopped
    for char in "yEND":
        text.add(ord(char))
    assert text.stopped and text.text == text.ready == "abcENXy"


def test_logprobs_are_the_models_and_sampling_follows_generate(bundle_model):
    model, tokenizer = bundle_model
    ids = prompt_ids(tokenizer, ROWS[1])
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    engine = Engine(TorchRunner(model, slots=1, adapters=False), tokenizer, "smoke").start()
    try:
        got = ask(engine, tokenizer, ROWS[1], max_tokens=1, logprobs=True, top_logprobs=3).wait()
    finally:
        engine.stop()
    entry = got.deltas[-1].logprobs[0] if got.deltas[-1].logprobs else None
    expected = logits.log_softmax(-1)
    first = int(expected.argmax())
    if first == tokenizer.eos_token_id:
        assert entry is None  # EOS is not text: its log-probability is not sent
    else:
        assert entry.token_id == first and entry.logprob == pytest.approx(float(expected[first]), abs=1e-4)
        assert [t for t, _ in entry.top] == expected.topk(3).indices.tolist()
    history = torch.tensor(ids)
    penalised = logits.clone()
    seen = penalised.gather(0, history)
    penalised.scatter_(0, history, torch.where(seen < 0, seen * 1.3, seen / 1.3))
    assert next_token(logits, history, SamplingParams(max_tokens=1, repetition_penalty=1.3), None) == int(
        penalised.argmax())  # transformers' RepetitionPenaltyLogitsProcessor


def test_cancelled_requests_give_their_rows_back(engine, bundle_model):
    _, tokenizer = bundle_model
    collected = Collected()
    request = Request(prompt_ids(tokenizer, ROWS[0]), SamplingParams(max_tokens=200), collected, BASE)
    engine.submit(request)
    deadline = time.monotonic() + 60
    while not collected.deltas and time.monotonic() < deadline:
        time.sleep(0.01)
    request.cancel()
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.running and engine.runner.free == 3


def test_the_queue_is_bounded(bundle_model):
    model, tokenizer = bundle_model
    engine = Engine(TorchRunner(model, slots=1, adapters=False), tokenizer, "smoke", max_queued=1)
    # Not started, so nothing runs: the first request has the free row, the second waits, the third is refused.
    for _ in range(2):
        engine.submit(Request([1, 2], SamplingParams(max_tokens=1), Collected(), BASE))
    with pytest.raises(QueueFull, match="1 requests are waiting"):
        engine.submit(Request([1, 2], SamplingParams(max_tokens=1), Collected(), BASE))


def test_adapters_of_one_base_decode_together_each_as_alone(smoke_release, train_smoke, tmp_path_factory):
    """Two LoRA runs of one base on one peft model, with the base itself: each row answers as its own model."""
    from peft import PeftModel

    from convobot.model.tokenizer import load_tokenizer
    from convobot.runs.loading import load_base, load_trained
    from convobot.runs.rundir import open_run

    second = train_smoke(tmp_path_factory.mktemp("engine") / "second", "seed=3", "train.max_steps=40")
    runs = [open_run(smoke_release.run_dir), open_run(second)]
    tokenizer = load_tokenizer(str(runs[0].weights_dir))
    served = PeftModel.from_pretrained(load_base(runs[0]), runs[0].weights_dir, adapter_name="a0")
    served.load_adapter(runs[1].weights_dir, adapter_name="a1")
    engine = Engine(TorchRunner(served.eval(), slots=6, adapters=True), tokenizer, "base").start()
    try:
        asked = {(name, i): ask(engine, tokenizer, row, adapter=name)
                 for i, row in enumerate(ROWS[:3]) for name in ("a0", "a1", BASE)}
        got = {key: collected.wait().text() for key, collected in asked.items()}
    finally:
        engine.stop()
    alone = {"a0": load_trained(runs[0]), "a1": load_trained(runs[1]), BASE: load_base(runs[0])}
    for (name, i), text in got.items():
        assert text == answer(alone[name], tokenizer, [ROWS[i]], max_new_tokens=24, batch_size=1)[0], (name, i)
    answers = {name: tuple(got[(name, i)] for i in range(3)) for name in ("a0", "a1", BASE)}
    assert answers["a1"] != answers[BASE]  # the trained adapter changes the answers


def test_the_llama_cpp_runner_batches_as_llama_cpp_answers_alone(smoke_gguf):
    """The bundle's f32 GGUF in one llama.cpp context of three sequences: each greedy answer is llama.cpp's own
    generation for that prompt alone."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the 'gguf' extra")
    from convobot.model.tokenizer import load_tokenizer
    from convobot.serving.llama_runner import LlamaRunner

    gguf = smoke_gguf.bundle / "gguf" / "model-f32.gguf"
    tokenizer = load_tokenizer(str(smoke_gguf.bundle))
    llm = llama_cpp.Llama(str(gguf), n_ctx=256, verbose=False)
    try:
        alone = []
        for row in ROWS:
            done = llm.create_completion(prompt_ids(tokenizer, row), max_tokens=24, temperature=0.0, repeat_penalty=1.0)
            alone.append(done["choices"][0]["text"])
    finally:
        llm.close()
    runner = LlamaRunner(gguf, context=256, slots=3)
    engine = Engine(runner, tokenizer, "smoke-gguf", prefill_chunk=8).start()
    try:
        batched = [ask(engine, tokenizer, row) for row in ROWS]
        assert [c.wait().text() for c in batched] == alone
        assert runner.free == 3
    finally:
        engine.stop()
        runner.close()

"""Streaming chat on a merged bundle and on a run dir with an adapter."""

import copy
import io

import pytest
import torch
from omegaconf import OmegaConf

from convobot.cli import run_command
from convobot.config import ChatConfig, GenerationOptions
from convobot.errors import ModelPathError, PromptTooLongError, VerificationError
from convobot.runs.loading import load_model
from convobot.scoring.generate import answer
from convobot.serving.chat import chat, repl
from convobot.serving.streaming import stream_answer
from convobot.template import format_prompt, render_prompt, user_message

GREEDY = GenerationOptions(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)
ROW = {"instruction": "Reverse the order of the words.", "input": "apple bird cat"}
TURN = [user_message(ROW["instruction"], ROW["input"])]


def one_shot(model_path, options=GREEDY) -> tuple[str, str]:
    out = io.StringIO()
    text = chat(ChatConfig(model=str(model_path), prompt=ROW["instruction"], input=ROW["input"], generation=options),
                out=out)
    return text, out.getvalue()


def test_chat_config_composes_with_the_cli_defaults(compose_command):
    cfg = compose_command("chat", "model=m", "prompt=Give three tips for staying healthy.")
    assert cfg.prompt == "Give three tips for staying healthy." and cfg.generation.max_new_tokens == 128


def test_one_shot_streams_the_greedy_answer(smoke_release):
    text, printed = one_shot(smoke_release.release)
    assert text.strip() and printed == text + "\n"
    model, tokenizer = load_model(smoke_release.release)
    assert text == answer(model, tokenizer, [ROW], max_new_tokens=12)[0]  # streaming changes nothing


def test_a_run_dir_with_its_adapter_answers_like_the_bundle(smoke_release):
    assert one_shot(smoke_release.run_dir)[0] == one_shot(smoke_release.release)[0]
    assert one_shot(smoke_release.run_dir / "adapter")[0] == one_shot(smoke_release.release)[0]


def test_sampling_options_reach_generate(smoke_release):
    sampled = [one_shot(smoke_release.release, GenerationOptions(max_new_tokens=12, temperature=1.5, top_p=1.0))[0]
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded
    assert sampled[0] != one_shot(smoke_release.release)[0]  # but not greedy


def test_generation_stops_at_eos(smoke_release):
    """A model made to say EOS first stops after that one token, though 50 were allowed."""
    model, tokenizer = load_model(smoke_release.release)
    eager, eos = copy.deepcopy(model), tokenizer.eos_token_id
    with torch.no_grad():
        # Every final hidden state becomes EOS's (output-tied) embedding, made the longest row, so
        # EOS wins every argmax (Cauchy-Schwarz).
        eager.transformer.wte.weight[eos] *= 100
        eager.transformer.ln_f.weight.zero_()
        eager.transformer.ln_f.bias.copy_(eager.transformer.wte.weight[eos])
    prompt = tokenizer(format_prompt(ROW["instruction"], ROW["input"]), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        assert int(eager(torch.tensor([prompt])).logits[0, -1].argmax()) == eos  # the first token is EOS
    sampled = []
    text = "".join(stream_answer(eager, tokenizer, TURN, GenerationOptions(max_new_tokens=50, temperature=0.0),
                                 sampled))
    assert text == "" and sampled == [1]  # one token, EOS, then nothing


def test_repl_keeps_the_conversation_until_exit(smoke_release):
    model, tokenizer = load_model(smoke_release.release)
    lines = iter([f"{ROW['instruction']} || {ROW['input']}", "What is 2 plus 3?", "/exit", "never read"])
    out = io.StringIO()
    conversation = repl(model, tokenizer, GREEDY, read=lambda _: next(lines), out=out)
    assert [m["role"] for m in conversation] == ["user", "assistant", "user", "assistant"]
    assert conversation[0] == TURN[0] and out.getvalue().count("bot> ") == 2
    assert next(lines) == "never read"
    # The second answer is the model's continuation of the whole conversation, not of the last turn alone.
    second = "".join(stream_answer(model, tokenizer, conversation[:3], GREEDY))
    assert conversation[3]["content"] == second


def test_reset_starts_a_new_conversation(smoke_release):
    model, tokenizer = load_model(smoke_release.release)
    lines = iter(["What is 2 plus 3?", "/reset", f"{ROW['instruction']} || {ROW['input']}", ""])
    out = io.StringIO()
    conversation = repl(model, tokenizer, GREEDY, read=lambda _: next(lines), out=out)
    assert "[conversation reset]" in out.getvalue()
    assert conversation[0] == TURN[0] and len(conversation) == 2
    assert conversation[1]["content"] == one_shot(smoke_release.release)[0]


def test_the_oldest_turns_are_dropped_when_the_context_fills(smoke_release):
    model, tokenizer = load_model(smoke_release.release)
    long_input = " ".join(["apple bird cat dog"] * 12)  # each exchange ~90 of the 256 positions
    lines = iter([f"{ROW['instruction']} || {long_input}"] * 4 + [""])
    out = io.StringIO()
    options = GenerationOptions(max_new_tokens=40, temperature=0.0, repetition_penalty=1.0)
    conversation = repl(model, tokenizer, options, read=lambda _: next(lines), out=out)
    assert "[context full: dropped the oldest 2 turns]" in out.getvalue()
    assert out.getvalue().count("bot> ") == 4 and len(conversation) < 8
    prompt = tokenizer(render_prompt(tokenizer, conversation[:-1]), add_special_tokens=False)["input_ids"]
    assert len(prompt) + options.max_new_tokens <= 256


def test_a_prompt_longer_than_the_context_is_refused_in_one_line(smoke_release):
    model, tokenizer = load_model(smoke_release.release)
    with pytest.raises(PromptTooLongError, match="the model's context is 256"):
        list(stream_answer(model, tokenizer, [user_message("word " * 300)]))
    raw = OmegaConf.structured(ChatConfig(model=str(smoke_release.release), prompt="word " * 300))
    with pytest.raises(SystemExit, match="convobot-chat: PromptTooLongError: the prompt is .* context is 256"):
        run_command("convobot-chat", ChatConfig, chat, raw)


def test_the_repl_goes_on_after_a_prompt_that_does_not_fit(smoke_release):
    model, tokenizer = load_model(smoke_release.release)
    lines = iter(["word " * 300, ROW["instruction"], ""])
    out = io.StringIO()
    assert len(repl(model, tokenizer, GREEDY, read=lambda _: next(lines), out=out)) == 2
    assert "[the prompt is" in out.getvalue() and out.getvalue().count("bot> ") == 2


def test_bad_paths_give_clear_errors(smoke_release, tmp_path):
    with pytest.raises(ModelPathError, match="does not exist"):
        chat(ChatConfig(model=str(tmp_path / "missing"), prompt="hi"))
    with pytest.raises(ModelPathError, match="is not a model"):
        chat(ChatConfig(model=str(tmp_path), prompt="hi"))
    with pytest.raises(SystemExit, match="convobot-chat: ModelPathError: .* is not a model"):
        run_command("convobot-chat", ChatConfig, chat, OmegaConf.structured(ChatConfig(model=str(tmp_path), prompt="hi")))


def test_a_tampered_bundle_is_refused_naming_the_file(tampered_bundle, caplog):
    with pytest.raises(VerificationError, match=r"does not match its SHA256SUMS: model.safetensors: checksum differs"):
        chat(ChatConfig(model=str(tampered_bundle), prompt="hi"), out=io.StringIO())
    with caplog.at_level("WARNING"):  # asked for: used anyway, and said so
        chat(ChatConfig(model=str(tampered_bundle), prompt="hi", generation=GREEDY, verify_checksums=False),
             out=io.StringIO())
    assert "verify_checksums=false" in caplog.text

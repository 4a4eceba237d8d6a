"""Greedy answers to held-out rows: batched by length, and bounded by the context whatever the rows' length."""

import pytest

from convobot.errors import ConfigError
from convobot.runs.loading import load_model
from convobot.scoring.generate import answer, fitted_prompt

SHORT = {"instruction": "Reverse the order of the words.", "input": "apple bird cat", "output": "cat bird apple"}
LONG_ALPACA = {"instruction": "Summarise this. " + "word " * 400, "input": "", "output": "a summary"}
TURN = "Tell me more about the words apple bird cat dog sun moon. " * 8  # ~100 tokens: the prompt fits the context, not with 32 new tokens
LONG_CONVERSATION = {"messages": [{"role": "user", "content": "first " + TURN}, {"role": "assistant", "content": TURN},
                                  {"role": "user", "content": "last question?"},
                                  {"role": "assistant", "content": "an answer"}]}


@pytest.fixture(scope="module")
def bundle_model(smoke_release):
    return load_model(str(smoke_release.release))  # the tiny model: a 256-token context


def test_prompts_longer_than_the_context_are_cut_from_the_left(bundle_model):
    model, tokenizer = bundle_model
    context = model.config.n_positions
    ids, cut = fitted_prompt(LONG_CONVERSATION, tokenizer, context, room=32)
    text = tokenizer.decode(ids)
    assert cut and len(ids) <= context - 32
    assert "last question?" in text and "first" not in text  # the oldest exchange went first
    ids, cut = fitted_prompt(LONG_ALPACA, tokenizer, context, room=32)
    assert cut and len(ids) == context - 32 and tokenizer.decode(ids).endswith("### Response:\n")
    assert fitted_prompt(SHORT, tokenizer, context, room=32)[1] is False


def test_answers_to_overlong_rows_come_back_in_order_and_counted(bundle_model):
    model, tokenizer = bundle_model
    rows = [LONG_ALPACA, SHORT, LONG_CONVERSATION]
    answers = answer(model, tokenizer, rows, max_new_tokens=24, batch_size=2)
    assert len(answers) == 3 and answers.cut == 2
    # Sorted into batches by length and padded beside cut rows, the short row answers as it does alone.
    assert answers[1] == answer(model, tokenizer, [SHORT], max_new_tokens=24)[0]
    with pytest.raises(ConfigError, match="max_new_tokens=256 leaves no room"):
        answer(model, tokenizer, [SHORT], max_new_tokens=256)


@pytest.mark.parametrize("data_format", ["messages", "sharegpt"])
def test_training_on_conversations_longer_than_the_context_ends_with_its_sample_answers(data_format, train_smoke,
                                                                                       tmp_path, capsys):
    import json

    turns = LONG_CONVERSATION["messages"]
    row = LONG_CONVERSATION if data_format == "messages" else {"conversations": [
        {"from": {"user": "human", "assistant": "gpt"}[turn["role"]], "value": turn["content"]} for turn in turns]}
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for _ in range(12)))
    train_smoke(tmp_path / "run", "data=local", f"data.path={data}", f"data.format={data_format}", "data.eval_size=4",
                "report.samples=2")
    assert "2 of 2 sample prompts were cut" in " ".join(capsys.readouterr().out.split())  # rich wraps lines

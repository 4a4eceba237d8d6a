"""Conversation data (OpenAI messages, ShareGPT): loading, validation naming file, row and turn, the loss on the
assistant turns as TRL computes it, and held-out scoring of conversations."""

import io
import json
import math

import pytest
from datasets import Dataset
from rich.console import Console

from convobot.config import DataConfig, EvalConfig, ModelConfig
from convobot.data.conversations import cut_messages
from convobot.data.examples import char_budget, encode_conversation, prepare
from convobot.data.load import load_rows
from convobot.errors import DataError
from convobot.model.base import load_base_model
from convobot.model.loss_head import IGNORE_INDEX
from convobot.model.tokenizer import load_tokenizer
from convobot.scoring import perplexity
from convobot.scoring.evaluate import evaluate
from convobot.template import format_example, user_message

CONVERSATION = [{"role": "user", "content": "Reverse the order of the words.", "input": "apple bird"},
                {"role": "assistant", "content": "bird apple"},
                {"role": "user", "content": "Now convert your answer to upper case."},
                {"role": "assistant", "content": "BIRD APPLE"}]
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello."},
                              {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye."}]}


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def local(path, data_format, **kw):
    return DataConfig(name="local", source="local", path=str(path), format=data_format, **kw)


def messages_of(dataset):
    """Turns as plain dicts, without the None a Dataset gives turns that have no input."""
    return [[{k: v for k, v in turn.items() if v is not None} for turn in row] for row in dataset["messages"]]


def test_messages_and_sharegpt_files_load_as_messages(tmp_path):
    rows, stats = load_rows(local(write_jsonl(tmp_path / "m.jsonl", [{"messages": CONVERSATION}] * 3), "messages"))
    assert messages_of(rows) == [CONVERSATION] * 3 and stats["rows_loaded"] == 3
    shared, _ = load_rows(local(write_jsonl(tmp_path / "s.jsonl", [SHAREGPT]), "sharegpt"))
    assert messages_of(shared)[0] == [{"role": "user", "content": "Hi there"},
                                      {"role": "assistant", "content": "Hello."},
                                      {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]
    (tmp_path / "s.json").write_text(json.dumps([SHAREGPT, SHAREGPT]))
    assert messages_of(load_rows(local(tmp_path / "s.json", "sharegpt"))[0]) == messages_of(shared) * 2


def test_a_parquet_file_of_conversations_loads(tmp_path):
    path = tmp_path / "rows.parquet"
    Dataset.from_list([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
                       SHAREGPT | {"messages": None}]).select([0]).to_parquet(str(path))
    rows, _ = load_rows(local(path, "messages"))
    assert messages_of(rows) == [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]]


@pytest.mark.parametrize("turns,problem", [
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "turn 2: unknown role 'bot'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}], "turn 2: assistant 'content' is empty"),
    ([{"role": "user", "content": "a"}], "turn 1: the conversation ends with a user turn"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}], "turn 1: expected a user turn"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "turn 2: expected a assistant turn"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "turn 2: a system message may only"),
    ([{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}], "turn 1: user 'content' is not a string"),
    ([], "must be a non-empty list"),
])
def test_a_bad_conversation_fails_naming_file_row_and_turn(tmp_path, turns, problem):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": CONVERSATION}, {"messages": turns}])
    with pytest.raises(DataError) as err:
        load_rows(local(path, "messages"))
    assert str(path) in str(err.value) and "row 2: " in str(err.value) and problem in str(err.value)


def test_a_sharegpt_speaker_that_is_not_known_is_named(tmp_path):
    bad = {"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}
    with pytest.raises(DataError, match=r"row 1: turn 2: unknown 'from' 'robot'"):
        load_rows(local(write_jsonl(tmp_path / "rows.jsonl", [bad]), "sharegpt"))


def test_the_wrong_format_says_which_one_to_set(tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match=r"row 1: field 'messages' is missing \(the row has 'instruction': set "
                                        r"data.format=alpaca\)"):
        load_rows(local(alpaca, "messages"))
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(DataError, match=r"set data.format=messages"):
        load_rows(local(chats, "alpaca"))


def test_bad_conversations_are_skipped_when_asked(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[:1]},
                                                 "{oops", {"messages": CONVERSATION}])
    rows, stats = load_rows(local(path, "messages", on_bad_row="skip"))
    assert len(rows) == 2 and stats["rows_skipped"] == 2 and stats["bad_rows"] == [2, 3]


def test_a_huge_conversation_is_cut_to_the_character_budget():
    huge = [user_message("x" * 10_000, "y" * 10_000), {"role": "assistant", "content": "z" * 10_000}] * 50
    cut = cut_messages(huge, 3_000)
    assert sum(len(m["content"]) + len(m.get("input", "")) for m in cut) <= 3_000
    assert [m["role"] for m in cut] == ["user", "assistant"] and cut[1]["content"] == ""


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("bundled")


def test_trl_trains_on_the_assistant_turns_and_their_eos_only(tokenizer, compose_train, tmp_path):
    from convobot.config import Precision
    from convobot.model.base import resolve_device
    from convobot.training.recipe import build_trainer

    cfg = compose_train("data=bundled_chat", "data.num_rows=40", "data.eval_size=8", "hardware=cpu")
    dataset = prepare(cfg.data, tokenizer)
    trainer, _ = build_trainer(cfg, tmp_path, resolve_device(cfg.hardware.device), Precision.fp32, tokenizer, dataset)
    assert trainer.args.assistant_only_loss and not trainer.args.completion_only_loss
    for messages, row in zip(dataset.train["messages"], trainer.train_dataset):
        ids, mask = encode_conversation(messages, tokenizer)
        assert row["input_ids"] == ids and row["labels"] == [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "".join(a + "<|endoftext|>" for a in answers)


def test_a_one_turn_conversation_scores_as_its_alpaca_row(tokenizer):
    row = {"instruction": "Reverse the order of the words.", "input": "apple bird cat", "output": "cat bird apple"}
    pair = Dataset.from_list([format_example(row)])
    chat = Dataset.from_list([{"messages": [user_message(row["instruction"], row["input"]),
                                            {"role": "assistant", "content": row["output"]}]}])
    (as_pair,) = perplexity.encode_examples(pair, tokenizer, 128)
    (as_chat,) = perplexity.encode_examples(chat, tokenizer, 128)
    assert as_pair["input_ids"] == as_chat["input_ids"]
    assert as_chat["scored_from"]["response"] == [[as_pair["scored_from"]["response"], len(as_pair["input_ids"])]]
    model = load_base_model(ModelConfig(), tokenizer).eval()
    for kind in ("full", "response"):
        assert perplexity.perplexities(model, pair, tokenizer, 128)[kind] == perplexity.perplexities(model, chat, tokenizer,
                                                                                               128)[kind]


def test_conversation_response_perplexity_is_the_mean_nll_of_the_assistant_tokens(tokenizer):
    import torch
    import torch.nn.functional as F

    model = load_base_model(ModelConfig(), tokenizer).eval()
    examples = Dataset.from_list([{"messages": CONVERSATION}, {"messages": CONVERSATION[:2]}])
    streamed = perplexity.perplexities(model, examples, tokenizer, 128)["response"]
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for messages in examples["messages"]:
            ids, mask = encode_conversation([{k: v for k, v in m.items() if v is not None} for m in messages],
                                            tokenizer)
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            targets = torch.tensor(ids[1:])
            scored = torch.tensor(mask[1:], dtype=torch.bool)
            nll += F.cross_entropy(logits[scored], targets[scored], reduction="sum").item()
            tokens += int(scored.sum())
    assert streamed["tokens"] == tokens and math.isclose(streamed["perplexity"], math.exp(nll / tokens), rel_tol=1e-6)


def test_a_cut_conversation_scores_within_max_length(tokenizer):
    long = [user_message("word " * 400), {"role": "assistant", "content": "fine"}]
    (row,) = perplexity.encode_examples(Dataset.from_list([{"messages": long}]), tokenizer, 64)
    assert len(row["input_ids"]) == 64 and row["scored_from"]["response"] == []
    assert char_budget(tokenizer, 64) < len("word " * 400)


def test_conversations_train_merge_and_score_end_to_end(train_smoke, quiet_merge, tmp_path):
    from convobot.runs.rundir import read_metrics

    run_dir = train_smoke(tmp_path / "chat", "data=bundled_chat", "data.num_rows=160", "data.eval_size=16",
                          "report.exact_match_rows=8")
    results = read_metrics(run_dir)
    assert results["data"]["format"] == "messages" and 0.0 <= results["exact_match"] <= 1.0
    report = quiet_merge(run_dir=str(run_dir), output_dir=str(tmp_path / "release"))
    assert report["perplexity"]["merged"]["response"]["tokens"] > 0
    card = (tmp_path / "release" / "README.md").read_text()  # the card says what it was trained on
    assert "conversations (OpenAI-style `messages`)" in card and "Alpaca-format" not in card
    assert "tags: [convobot, gpt2, conversational, lora, merged]" in card
    scores = evaluate(EvalConfig(model=str(tmp_path / "release"), run_dir=str(run_dir), compare=["adapter", "merged"]),
                      console=Console(file=io.StringIO()))
    merged = scores["models"]["merged"]
    # Held-out response loss is what training reported: the assistant turns, scored the same way.
    assert math.isclose(merged["response"]["loss"], results["eval_loss"], rel_tol=1e-4)
    assert merged["full"]["tokens"] > merged["response"]["tokens"] > 0 and merged["sliding"]["windows"] >= 1

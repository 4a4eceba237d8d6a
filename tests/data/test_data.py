import json

import pytest

from convobot.config import DataConfig
from convobot.data.examples import prepare
from convobot.data.load import load_rows
from convobot.errors import DataError
from convobot.model.tokenizer import load_tokenizer

GOOD = {"instruction": "Add the numbers.", "input": "2 + 2", "output": "4"}


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def local(path, **kw):
    return DataConfig(name="local", source="local", path=str(path), **kw)


@pytest.mark.parametrize(
    "bad,problem",
    [
        ({"instruction": "x", "input": ""}, "field 'output' is missing"),
        ({"instruction": "", "input": "", "output": "y"}, "field 'instruction' is empty"),
        ({"instruction": "x", "input": "", "output": 7}, "field 'output' is not a string"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_row_fails_naming_file_and_row(tmp_path, bad, problem):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as err:
        load_rows(local(path))
    assert str(path) in str(err.value) and "row 3" in str(err.value) and problem in str(err.value)


def test_skip_policy_skips_and_counts(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD, "{oops", {"instruction": "x"}, GOOD])
    rows, stats = load_rows(local(path, on_bad_row="skip"))
    assert len(rows) == 2 and stats["rows_skipped"] == 2 and stats["bad_rows"] == [2, 3]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="not found.*nope.jsonl"):
        load_rows(local(tmp_path / "nope.jsonl"))


def test_missing_column_is_named(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("instruction,input\nx,y\n")
    with pytest.raises(DataError, match=r"rows\.csv.*missing column.*output"):
        load_rows(local(path))


@pytest.mark.parametrize("suffix", ["csv", "parquet", "json"])
def test_other_formats_load(tmp_path, suffix):
    from datasets import Dataset

    path = tmp_path / f"rows.{suffix}"
    dataset = Dataset.from_list([GOOD] * 3 + [{"instruction": "Say hi.", "input": "", "output": "hi"}])
    {"csv": dataset.to_csv, "parquet": dataset.to_parquet, "json": dataset.to_json}[suffix](str(path))
    rows, stats = load_rows(local(path))
    assert len(rows) == 4 and stats["rows_skipped"] == 0


def test_split_is_deterministic_and_disjoint():
    tokenizer = load_tokenizer("bundled")
    config = DataConfig(num_rows=200, eval_size=0.1)
    first, second = prepare(config, tokenizer), prepare(config, tokenizer)
    assert first.eval_rows == second.eval_rows and len(first.eval_rows) == 20
    train_prompts = set(first.train["prompt"])
    assert not train_prompts & set(first.eval["prompt"])


def test_over_long_rows_are_counted(tmp_path):
    long_row = {"instruction": "Repeat.", "input": "", "output": "word " * 200}
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD] * 19 + [long_row])
    prepared = prepare(local(path, eval_size=0.5, max_length=64), load_tokenizer("bundled"))
    assert prepared.stats["truncated_train_rows"] + prepared.stats["truncated_eval_rows"] == 1


def test_real_alpaca_gpt4_rows_load_and_format(shared_data):
    """The 985 real alpaca-gpt4 rows in ../shared validate and render with both template variants."""
    from transformers import GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(shared_data / "gpt2-tokenizer")
    assert tokenizer.encode("Hello world") == [15496, 995]
    tokenizer.pad_token = tokenizer.eos_token
    config = local(shared_data / "alpaca_gpt4" / "train_sample.jsonl", eval_size=0.1, max_length=512)
    prepared = prepare(config, tokenizer)
    assert prepared.stats["rows_loaded"] == 788 and prepared.stats["rows_skipped"] == 0
    prompts = list(prepared.train["prompt"]) + list(prepared.eval["prompt"])
    assert any("### Input:\n" in p for p in prompts) and any("### Input:" not in p for p in prompts)
    assert all(p.endswith("### Response:\n") for p in prompts)
    # The README of the sample counts 23 of 788 rows over 512 tokens (template + EOS).
    assert 15 <= prepared.stats["truncated_train_rows"] + prepared.stats["truncated_eval_rows"] <= 30


def test_a_byte_order_mark_is_not_data(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\n").encode() * 3)
    rows, _ = load_rows(local(path))
    assert len(rows) == 3 and rows[0]["instruction"] == GOOD["instruction"]


def test_text_that_is_not_utf8_is_named_by_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n").encode() + b'{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl: line 2 is not UTF-8 text"):
        load_rows(local(path))


@pytest.mark.parametrize("content, message", [
    ("", "no rows"),
    ("{oops\n[1]\n", r"no rows left: all 2 were bad and skipped \(rows \[1, 2\]\)"),
])
def test_a_file_with_nothing_usable_says_so(tmp_path, content, message):
    (tmp_path / "rows.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        load_rows(local(tmp_path / "rows.jsonl", on_bad_row="skip"))


def test_a_directory_is_not_a_data_file(tmp_path):
    (tmp_path / "rows.jsonl").mkdir()
    with pytest.raises(DataError, match="is a directory, not a data file"):
        load_rows(local(tmp_path / "rows.jsonl"))


def test_a_held_out_split_larger_than_the_data_is_named(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD] * 5)
    with pytest.raises(DataError, match=r"config key 'data.eval_size': 10 does not split 5 rows"):
        prepare(local(path, eval_size=10), load_tokenizer("bundled"))


def test_max_length_with_no_room_for_any_answer_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD] * 20)
    with pytest.raises(DataError, match=r"data.max_length': 9 tokens leave no room for any answer"):
        prepare(local(path, eval_size=2, max_length=9), load_tokenizer("bundled"))


def test_a_huge_row_costs_what_max_length_tokens_cost(tmp_path):
    """A row of megabytes is cut by characters before tokenizing; what max_length tokens hold is unchanged."""
    from convobot.data.examples import char_budget
    from convobot.template import format_example

    tokenizer = load_tokenizer("bundled")
    huge = {"instruction": "Repeat the words.", "input": "", "output": "apple bird " * 400_000}  # 4.4 MB
    path = write_jsonl(tmp_path / "rows.jsonl", [huge] + [GOOD] * 9)
    dataset = prepare(local(path, eval_size=1, split_seed=3, max_length=64), tokenizer)
    pairs = [pair for pair in dataset.train if pair["completion"].startswith("apple")]
    budget = char_budget(tokenizer, 64)
    assert len(pairs) == 1 and len(pairs[0]["prompt"] + pairs[0]["completion"]) <= budget < 100_000
    whole = format_example(huge)
    cut = tokenizer(pairs[0]["prompt"] + pairs[0]["completion"], add_special_tokens=False)["input_ids"][:64]
    assert cut == tokenizer(whole["prompt"] + whole["completion"][:budget * 4],
                            add_special_tokens=False)["input_ids"][:64]

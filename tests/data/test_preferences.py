"""Preference rows in every accepted shape, checked by file and row; the bundled pairs; fitting the context."""

import json

import pytest

from convobot.config import DataConfig, DataFormat, DataSource, Stage
from convobot.data.examples import prepare_stage
from convobot.data.load import load_rows, split_rows
from convobot.data.preferences import normalize, trainer_rows
from convobot.data.tasks import generate_preference_rows, generate_rows
from convobot.errors import DataError
from convobot.model.tokenizer import load_tokenizer

EXPECTED = {"messages": [{"role": "user", "content": "Repeat the last word.", "input": "cat dog"}],
            "chosen": "dog", "rejected": "cat"}
SHAPES = [
    {"instruction": "Repeat the last word.", "input": "cat dog", "chosen": "dog", "rejected": "cat"},
    {"prompt": [{"role": "user", "content": "Repeat the last word.", "input": "cat dog"}],
     "chosen": [{"role": "assistant", "content": "dog"}], "rejected": [{"role": "assistant", "content": "cat"}]},
    # ShareGPT turns have no input field: a client writes it into the content, which renders the same.
    {"conversations": [{"from": "human", "value": "Repeat the last word.\n\n### Input:\ncat dog"}],
     "chosen": {"from": "gpt", "value": "dog"}, "rejected": {"from": "gpt", "value": "cat"}},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("bundled")


@pytest.mark.parametrize("row", SHAPES, ids=["alpaca", "trl-conversational", "sharegpt"])
def test_every_preference_shape_trains_on_the_same_prompt_and_answers(row, tokenizer):
    shaped, problem = normalize(row, DataFormat.preference)
    assert problem is None
    expected, _ = trainer_rows(_dataset([EXPECTED]), tokenizer, Stage.dpo, 128)
    found, _ = trainer_rows(_dataset([shaped]), tokenizer, Stage.dpo, 128)
    assert found[0] == expected[0]
    assert expected[0]["prompt"].endswith("### Instruction:\nRepeat the last word.\n\n### Input:\ncat dog\n\n"
                                          "### Response:\n")


def test_a_plain_string_prompt_is_the_users_instruction(tokenizer):
    shaped, _ = normalize({"prompt": "Say hi.", "chosen": "hi", "rejected": "bye"}, DataFormat.preference)
    rows, _ = trainer_rows(_dataset([shaped]), tokenizer, Stage.dpo, 128)
    assert rows[0]["prompt"].endswith("### Instruction:\nSay hi.\n\n### Response:\n")
    assert (rows[0]["chosen"], rows[0]["rejected"]) == ("hi", "bye")


@pytest.mark.parametrize("row, problem", [
    ({"chosen": "a", "rejected": "b"}, "no prompt"),
    ({"prompt": "p", "chosen": "a"}, "field 'rejected' is missing"),
    ({"prompt": "p", "chosen": " ", "rejected": "b"}, "field 'chosen' is empty"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "must be an assistant turn"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a",
      "rejected": "b"}, "ends with an assistant turn"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "field 'chosen' is not a string"),
])
def test_bad_preference_rows_say_what_is_wrong(row, problem):
    shaped, found = normalize(row, DataFormat.preference)
    assert shaped is None and problem in found


def test_unpaired_rows_need_a_boolean_label_and_a_row_of_the_other_format_says_so():
    good, _ = normalize({"prompt": "p", "completion": "a", "label": False}, DataFormat.unpaired)
    assert good["label"] is False and good["completion"] == "a"
    _, problem = normalize({"prompt": "p", "completion": "a", "label": "yes"}, DataFormat.unpaired)
    assert "field 'label' must be true or false" in problem
    _, problem = normalize({"prompt": "p", "completion": "a"}, DataFormat.unpaired)
    assert problem.startswith("field 'label' is missing")
    _, problem = normalize({"prompt": "p", "chosen": "a", "rejected": "b"}, DataFormat.unpaired)
    assert problem == ("field 'completion' is missing (the row has 'chosen' and 'rejected': set "
                       "data.format=preference)")


def test_a_bad_row_in_a_file_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(SHAPES[0]) + "\n" + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    cfg = DataConfig(name="local", source=DataSource.local, path=str(path), format=DataFormat.preference)
    with pytest.raises(DataError, match=r"pairs.jsonl: row 2: field 'rejected' is missing"):
        load_rows(cfg)
    rows, stats = load_rows(DataConfig(name="local", source=DataSource.local, path=str(path),
                                       format=DataFormat.preference, on_bad_row="skip"))
    assert len(rows) == 1 and stats["bad_rows"] == [2] and rows[0] == EXPECTED


def test_bundled_pairs_are_the_bundled_rows_with_a_near_miss_and_hold_out_the_same_prompts():
    pairs, rows = generate_preference_rows(600), generate_rows(600)
    assert [(p["instruction"], p["input"], p["chosen"]) for p in pairs] == \
        [(r["instruction"], r["input"], r["output"]) for r in rows]
    assert all(p["rejected"] != p["chosen"] and p["rejected"].strip() for p in pairs)
    counts = [p for p in pairs if p["instruction"].startswith("How many")]
    assert all(abs(int(p["rejected"]) - int(p["chosen"])) == 1 for p in counts)
    sft = DataConfig(num_rows=600, eval_size=0.1)
    dpo = DataConfig(name="bundled_preferences", num_rows=600, eval_size=0.1, format=DataFormat.preference)
    _, sft_heldout = split_rows(load_rows(sft)[0], sft)
    _, dpo_heldout = split_rows(load_rows(dpo)[0], dpo)
    assert [r["input"] for r in sft_heldout] == [r["messages"][0].get("input") or "" for r in dpo_heldout]


def test_prompts_are_cut_from_the_left_to_fit_and_rows_whose_answers_fill_the_context_are_dropped(tokenizer):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}], "chosen": "yes", "rejected": "no"}
    too_long_answer = {"messages": [{"role": "user", "content": "q"}], "chosen": "word " * 100, "rejected": "no"}
    rows, counts = trainer_rows(_dataset([long_prompt, too_long_answer, EXPECTED]), tokenizer, Stage.dpo, 64)
    assert counts == {"prompts_cut": 1, "rows_dropped": 1} and len(rows) == 2
    cut = rows[0]["prompt"]
    assert cut.endswith("### Response:\n") and len(tokenizer(cut)["input_ids"]) <= 64 - 1 - 1


def test_kto_counts_a_pair_as_one_desirable_and_one_undesirable_answer(tokenizer):
    rows, _ = trainer_rows(_dataset([EXPECTED] * 3), tokenizer, Stage.kto, 128)
    assert sorted((r["completion"], r["label"]) for r in rows) == [("cat", False)] * 3 + [("dog", True)] * 3


def test_a_stage_scores_held_out_rows_with_their_chosen_answer(tokenizer, tmp_path):
    cfg = DataConfig(name="bundled_preferences", num_rows=200, eval_size=20, format=DataFormat.preference)
    data = prepare_stage(cfg, tokenizer, Stage.dpo)
    assert len(data.train) == 180 and len(data.trainer_eval) == 20 == len(data.eval_rows)
    assert {"prompt", "chosen", "rejected"} == set(data.train.column_names)
    assert all(row["messages"][-1]["role"] == "assistant" for row in data.eval_rows)
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "word " * 30, "rejected": "no"}) + "\n"
                            for i in range(4)))
    with pytest.raises(DataError, match="config key 'data.max_length': 16 tokens leave no room"):
        prepare_stage(DataConfig(name="local", source=DataSource.local, path=str(path), eval_size=1,
                                 format=DataFormat.preference, max_length=16), tokenizer, Stage.dpo)


def _dataset(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)

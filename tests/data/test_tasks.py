from convobot.data.tasks import TASKS, exact_match, generate_rows
from convobot.model.tokenizer import load_tokenizer, train_tokenizer


def test_generation_is_deterministic_and_unique():
    rows = generate_rows(500, seed=3)
    assert rows == generate_rows(500, seed=3)
    assert rows != generate_rows(500, seed=4)
    assert len({(r["instruction"], r["input"]) for r in rows}) == 500


def test_every_task_appears_with_checkable_answers():
    rows = generate_rows(600)
    instructions = " ".join(r["instruction"] for r in rows)
    for marker in ("Reverse", "upper case", "last word", "How many", "Sort", "plus"):
        assert marker in instructions
    reverse = next(r for r in rows if r["instruction"].startswith("Reverse"))
    assert reverse["output"].split() == reverse["input"].split()[::-1]
    assert len(TASKS) == 6


def test_exact_match_normalises_whitespace():
    assert exact_match([" a  b\n", "c"], ["a b", "d"]) == 0.5
    assert exact_match([], []) == 0.0


def test_shipped_tokenizer_matches_a_rebuild():
    shipped, rebuilt = load_tokenizer("bundled"), train_tokenizer()
    assert shipped.get_vocab() == rebuilt.get_vocab()
    assert shipped.eos_token == shipped.pad_token == "<|endoftext|>"
    text = "Reverse the order of the words. ünïcode ✓"
    assert shipped.decode(shipped(text)["input_ids"]) == text  # byte-level: nothing is unknown

"""The bundled offline instruction tasks and their exact-match metric.

The embedded default must run with no hub, so convobot generates its own Alpaca-format rows:
short word and number tasks whose answers can be checked exactly, small enough that a tiny
GPT-2 visibly learns them in about a minute on two CPU cores. Generation is deterministic
(seeded), and rows are unique so the held-out split never repeats a training row.
"""

from __future__ import annotations

import random
from typing import Callable, Iterable

WORDS = (
    "apple", "bird", "cat", "dog", "egg", "fish", "goat", "hat", "ink", "jam", "kite", "lamp",
    "moon", "nut", "owl", "pig", "queen", "rose", "sun", "tree", "van", "wolf", "yak", "zebra",
)


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def _reverse(rng):
    w = _words(rng, 2, 4)
    return "Reverse the order of the words.", " ".join(w), " ".join(reversed(w))


def _upper(rng):
    w = _words(rng, 1, 3)
    return "Convert the words to upper case.", " ".join(w), " ".join(w).upper()


def _last(rng):
    w = _words(rng, 2, 5)
    return "Repeat the last word.", " ".join(w), w[-1]


def _count(rng):
    w = _words(rng, 1, 6)
    return "How many words are in the input?", " ".join(w), str(len(w))


def _sort(rng):
    w = _words(rng, 2, 3)
    return "Sort the words alphabetically.", " ".join(w), " ".join(sorted(w))


def _add(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    # No input field: exercises the template's no-input variant.
    return f"What is {a} plus {b}?", "", str(a + b)


TASKS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "reverse": _reverse, "upper": _upper, "last": _last, "count": _count, "sort": _sort, "add": _add,
}


def generate_rows(num_rows: int, seed: int = 0) -> list[dict]:
    """`num_rows` unique Alpaca rows (instruction/input/output), cycling through the tasks."""
    rng = random.Random(seed)
    makers = list(TASKS.values())
    rows, seen = [], set()
    attempts = 0
    while len(rows) < num_rows:
        attempts += 1
        if attempts > num_rows * 50:
            raise ValueError(f"cannot generate {num_rows} unique task rows; the task space is smaller")
        # Small task spaces (one-digit sums) saturate; the others then fill the remaining rows.
        instruction, input_text, output = rng.choice(makers)(rng)
        key = (instruction, input_text)
        if key in seen:
            continue
        seen.add(key)
        rows.append({"instruction": instruction, "input": input_text, "output": output})
    return rows


def _near_miss(instruction: str, input_text: str, output: str, rng: random.Random) -> str:
    """A wrong answer of the kind a small SFT model gives to a bundled task: half the word answers run on past the
    right answer with one of its words repeated (what it gets wrong most: "bird lamp bird" for "bird lamp"), the
    others are a list half reversed or left in its order, one word upper-cased of several, the first word for the
    last; a count or sum is off by one."""
    words = input_text.split()
    if output.isdigit():
        n = int(output)
        return str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
    if rng.random() < 0.5:
        return f"{output} {rng.choice(output.split())}"
    if instruction.startswith("Reverse"):
        return " ".join(words[1::-1] + words[2:]) if len(words) > 2 else input_text
    if instruction.startswith("Convert"):
        return " ".join([words[0].upper(), *words[1:]]) if len(words) > 1 else output.lower()
    if instruction.startswith("Repeat"):
        return words[0]
    if instruction.startswith("Sort"):
        return input_text if input_text != output else " ".join(reversed(words))
    raise ValueError(f"no near miss for the task {instruction!r}")


def generate_preference_rows(num_rows: int, seed: int = 0) -> list[dict]:
    """The rows of generate_rows (same seed, same order: the same held-out split) as preference pairs: the right
    answer chosen, a near miss rejected."""
    rng = random.Random(seed)
    return [{"instruction": row["instruction"], "input": row["input"], "chosen": row["output"],
             "rejected": _near_miss(row["instruction"], row["input"], row["output"], rng)}
            for row in generate_rows(num_rows, seed)]


# Follow-up turns of the bundled conversations: a task on the assistant's previous answer, so the answer depends
# on the conversation so far, not only on the last turn.
FOLLOW_UPS: dict[str, Callable[[str], str]] = {
    "Now reverse the order of the words of your answer.": lambda text: " ".join(reversed(text.split())),
    "Now convert your answer to upper case.": str.upper,
    "Now repeat the last word of your answer.": lambda text: text.split()[-1],
    "How many words are in your answer?": lambda text: str(len(text.split())),
}


def generate_conversations(num_rows: int, seed: int = 0) -> list[dict]:
    """`num_rows` unique conversations (`messages` rows): a bundled task with its input, then one or two follow-ups
    on the previous answer. Sums are left out: their answers have no words to follow up on."""
    rng = random.Random(seed)
    rows = [row for row in generate_rows(num_rows * 2, seed) if row["input"]][:num_rows]
    if len(rows) < num_rows:
        raise ValueError(f"cannot generate {num_rows} unique conversations; the task space is smaller")
    conversations = []
    for row in rows:
        messages = [{"role": "user", "content": row["instruction"], "input": row["input"]},
                    {"role": "assistant", "content": row["output"]}]
        for _ in range(rng.randint(1, 2)):
            if messages[-1]["content"].isdigit():  # a count: nothing left to follow up on
                break
            follow_up = rng.choice(list(FOLLOW_UPS))
            messages += [{"role": "user", "content": follow_up},
                         {"role": "assistant", "content": FOLLOW_UPS[follow_up](messages[-1]["content"])}]
        conversations.append({"messages": messages})
    return conversations


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().split())


def exact_match(predictions: Iterable[str], references: Iterable[str]) -> float:
    """Fraction of predictions equal to the reference after whitespace normalisation."""
    pairs = list(zip(predictions, references, strict=True))
    if not pairs:
        return 0.0
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in pairs) / len(pairs)

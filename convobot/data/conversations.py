"""Conversation rows: OpenAI-style `messages` and ShareGPT `conversations`, checked and brought to one shape.

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}
    {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...]}

Both become `messages` (role, content, and `input` where a user turn has one), which the chat template of
convobot/template.py renders and TRL trains with the loss on the assistant turns only. A conversation is an
optional system message, then user and assistant turns alternating, starting with a user turn and ending with
an assistant turn (a last user turn would have no answer to train on).
"""

from __future__ import annotations

from convobot.config import DataFormat
from convobot.template import ROLES

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
COLUMN = {DataFormat.messages: "messages", DataFormat.sharegpt: "conversations"}
# The column that says which data.format a row is in.
FORMAT_OF_COLUMN = {"instruction": DataFormat.alpaca, "messages": DataFormat.messages,
                    "conversations": DataFormat.sharegpt}


def format_hint(columns, expected: str, holder: str = "the row") -> str:
    """" (the row has 'messages': set data.format=messages)" when `columns` hold another format's column than
    the `expected` one, else ""."""
    other = next((column for column in FORMAT_OF_COLUMN if column in columns and column != expected), None)
    return f" ({holder} has '{other}': set data.format={FORMAT_OF_COLUMN[other].value})" if other else ""


def normalize(row: dict, data_format: DataFormat, last: str = "assistant") -> tuple[list[dict] | None, str | None]:
    """(messages, None) for a good row, (None, what is wrong) for a bad one; turns are numbered from 1. `last` is the
    role the conversation ends with (a preference row's prompt ends with the user's turn)."""
    column = COLUMN[data_format]
    turns = row.get(column)
    if turns is None:
        return None, f"field '{column}' is missing{format_hint(row, column)}"
    if not isinstance(turns, list) or not turns:
        return None, f"field '{column}' must be a non-empty list of turns"
    messages = []
    for number, turn in enumerate(turns, start=1):
        message, problem = _turn(turn, data_format)
        if problem:
            return None, f"turn {number}: {problem}"
        messages.append(message)
    problem = order_problem(messages, last)
    return (None, problem) if problem else (messages, None)


def _turn(turn, data_format: DataFormat) -> tuple[dict | None, str | None]:
    if not isinstance(turn, dict):
        return None, f"expected an object, got {type(turn).__name__}"
    if data_format == DataFormat.sharegpt:
        speaker, text = turn.get("from"), turn.get("value")
        if speaker not in SHAREGPT_ROLES:
            return None, f"unknown 'from' {speaker!r} (use one of {sorted(SHAREGPT_ROLES)})"
        role, content, extra = SHAREGPT_ROLES[speaker], text, {}
    else:
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            return None, f"unknown role {role!r} (use {', '.join(ROLES[:-1])} or {ROLES[-1]})"
        extra = {"input": turn["input"]} if turn.get("input") is not None else {}
    field = "value" if data_format == DataFormat.sharegpt else "content"
    if not isinstance(content, str):
        return None, f"{role} '{field}' is not a string (got {type(content).__name__})"
    if not content.strip():
        return None, f"{role} '{field}' is empty"
    if extra and (role != "user" or not isinstance(extra["input"], str)):
        return None, "'input' belongs to a user turn and must be a string"
    return {"role": role, "content": content} | extra, None


def order_problem(messages: list[dict], last: str = "assistant") -> str | None:
    """What is wrong with the order of turns, or None. `last` is the role the conversation must end with: an
    assistant turn in training data, a user turn in a request for the next answer."""
    for number, message in enumerate(messages, start=1):
        if message["role"] == "system" and number > 1:
            return f"turn {number}: a system message may only come first"
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        return "no user or assistant turn"
    offset = len(messages) - len(turns)
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            return (f"turn {index + offset + 1}: expected a {expected} turn, got {message['role']} (turns alternate "
                    "user, assistant, ..., starting with a user turn)")
    if turns[-1]["role"] != last:
        if last == "assistant":
            return f"turn {len(messages)}: the conversation ends with a user turn, which has no answer to train on"
        return f"turn {len(messages)}: the conversation ends with an {turns[-1]['role']} turn; the last must be {last}"
    return None


def cut_messages(messages: list[dict], budget: int) -> list[dict]:
    """The conversation with no more than `budget` characters of text in all: turns past the budget are dropped,
    the one it falls in is cut. The first assistant turn is always kept (perhaps empty) so the row stays a
    conversation with something to score."""
    kept, left = [], budget
    for message in messages:
        if left <= 0 and any(m["role"] == "assistant" for m in kept):
            break
        cut = {"role": message["role"], "content": message["content"][:max(left, 0)]}
        left -= len(message["content"])
        if message.get("input"):  # a loaded Dataset gives turns without an input one of None
            cut["input"] = message["input"][:max(left, 0)]
            left -= len(message["input"])
        kept.append(cut)
    return kept


"""Preference rows (DPO, ORPO, KTO) and prompts with checkable answers (GRPO), checked and brought to one shape.

`data.format=preference`: a prompt with a chosen and a rejected answer, in any of these shapes:

    {"prompt": "...", "chosen": "...", "rejected": "..."}                                  TRL standard
    {"prompt": [{"role": "user", "content": "..."}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}
    {"instruction": "...", "input": "...", "chosen": "...", "rejected": "..."}             Alpaca-style
    {"conversations": [{"from": "human", "value": "..."}, ...], "chosen": {"from": "gpt", "value": "..."},
     "rejected": {"from": "gpt", "value": "..."}}                                          ShareGPT-style

`data.format=unpaired` (KTO): {"prompt": ..., "completion": ..., "label": true|false}, prompt and completion
spelt as above. Every prompt becomes `messages` ending with a user turn and is rendered by the same chat template
as SFT (a string prompt is the user's instruction), so a preference-tuned bundle chats like an SFT one. A prompt
too long for data.max_length with its longest answer is cut from the left and counted; a row whose answers alone
fill it is dropped and counted.
"""

from __future__ import annotations

from datasets import Dataset

from convobot.config import DataFormat, Stage
from convobot.data import conversations
from convobot.template import answer_of, prompt_of, render_prompt, user_message

ANSWERS = {DataFormat.preference: ("chosen", "rejected"), DataFormat.unpaired: ("completion",)}


def normalize(row: dict, data_format: DataFormat) -> tuple[dict | None, str | None]:
    """(row as messages + answers, None) for a good row, (None, what is wrong) for a bad one."""
    messages, problem = _prompt(row)
    if problem:
        return None, problem
    shaped = {"messages": messages}
    for key in ANSWERS[data_format]:
        shaped[key], problem = _answer(row, key)
        if problem:
            return None, problem + _format_hint(row, data_format)
    if data_format == DataFormat.unpaired:
        if "label" not in row:
            return None, "field 'label' is missing (true: a desirable answer, false: an undesirable one)"
        if not isinstance(row["label"], bool):
            return None, f"field 'label' must be true or false (got {row['label']!r})"
        shaped["label"] = row["label"]
    return shaped, None


def _format_hint(row: dict, data_format: DataFormat) -> str:
    """" (the row has 'chosen' and 'rejected': set data.format=preference)" for a row of the other format."""
    for other, keys in ANSWERS.items():
        if other != data_format and all(key in row for key in keys):
            return f" (the row has {' and '.join(repr(key) for key in keys)}: set data.format={other.value})"
    return ""


def _prompt(row: dict) -> tuple[list[dict] | None, str | None]:
    if "instruction" in row:
        instruction, input_text = row["instruction"], row.get("input") or ""
        if not isinstance(instruction, str) or not instruction.strip():
            return None, "field 'instruction' must be a non-empty string"
        if not isinstance(input_text, str):
            return None, f"field 'input' is not a string (got {type(input_text).__name__})"
        return [user_message(instruction, input_text)], None
    for key, data_format in (("prompt", DataFormat.messages), ("conversations", DataFormat.sharegpt),
                             ("messages", DataFormat.messages)):
        if key not in row:
            continue
        value = row[key]
        if isinstance(value, str):
            return ([user_message(value)], None) if value.strip() else (None, f"field '{key}' is empty")
        if not isinstance(value, list) or not value:
            return None, f"field '{key}' must be a string or a non-empty list of turns"
        messages, problem = conversations.normalize({conversations.COLUMN[data_format]: value}, data_format,
                                                    last="user")
        return (None, f"field '{key}': {problem}") if problem else (messages, None)
    return None, "no prompt: expected a 'prompt', 'instruction' or 'conversations' field"


def _answer(row: dict, key: str) -> tuple[str | None, str | None]:
    """An answer given as text, as one assistant turn ({"role", "content"} or {"from", "value"}), or as a list
    holding one."""
    value = row.get(key)
    if value is None:
        return None, f"field '{key}' is missing"
    if isinstance(value, list):
        if len(value) != 1:
            return None, f"field '{key}' must hold one assistant turn, got {len(value)}"
        value = value[0]
    if isinstance(value, dict):
        role = value.get("role", conversations.SHAREGPT_ROLES.get(value.get("from")))
        if role != "assistant":
            return None, f"field '{key}' must be an assistant turn (got {role!r})"
        value = value.get("content", value.get("value"))
    if not isinstance(value, str):
        return None, f"field '{key}' is not a string (got {type(value).__name__})"
    if not value.strip():
        return None, f"field '{key}' is empty"
    return value, None


def _fitted(tokenizer, prompt: str, answers: list[str], max_length: int) -> tuple[str | None, bool]:
    """The prompt cut from the left so that it and its longest answer (with EOS) fit max_length tokens, and whether
    it was cut; None when the answer alone fills max_length."""
    room = max_length - 1 - max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    if room < 1:
        return None, False
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return (prompt, False) if len(ids) <= room else (tokenizer.decode(ids[-room:]), True)


def trainer_rows(rows: Dataset, tokenizer, stage: Stage, max_length: int) -> tuple[Dataset, dict]:
    """What TRL's trainer for `stage` takes, as text (prompt rendered by the chat template): prompt / chosen /
    rejected (DPO, ORPO), prompt / completion / label (KTO: a pair is one desirable and one undesirable answer),
    prompt / reference (GRPO, from instruction rows: the reward checks the answer against it); with the count of
    prompts cut and rows dropped to fit max_length."""
    out, cut, dropped = [], 0, 0
    for row in rows:
        if stage == Stage.grpo:
            answers, prompt = [answer_of(row)], prompt_of(row, tokenizer)
        else:
            answers = [row[key] for key in ANSWERS[DataFormat.preference if "chosen" in row else DataFormat.unpaired]]
            prompt = render_prompt(tokenizer, row["messages"])
        prompt, was_cut = _fitted(tokenizer, prompt, answers, max_length)
        if prompt is None:
            dropped += 1
            continue
        cut += was_cut
        if stage == Stage.grpo:
            out.append({"prompt": prompt, "reference": answers[0]})
        elif stage == Stage.kto and "chosen" in row:
            out += [{"prompt": prompt, "completion": row["chosen"], "label": True},
                    {"prompt": prompt, "completion": row["rejected"], "label": False}]
        elif stage == Stage.kto:
            out.append({"prompt": prompt, "completion": row["completion"], "label": row["label"]})
        else:
            out.append({"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]})
    shaped = Dataset.from_list(out)
    if stage == Stage.kto:  # KTO samples in order (its KL estimate needs it): not a pair's two answers side by side
        shaped = shaped.shuffle(seed=0).flatten_indices()
    return shaped, {"prompts_cut": cut, "rows_dropped": dropped}


def answered_rows(rows: Dataset) -> list[dict]:
    """Preference rows as conversations ending with their chosen (or desirable) answer: what held-out perplexity,
    exact match and the answers' scores are measured on, as after SFT."""
    return [{"messages": row["messages"] + [{"role": "assistant", "content": row.get("chosen") or row["completion"]}]}
            for row in rows if row.get("chosen") or row.get("label")]

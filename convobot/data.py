"""Instruction data: load (hub, local file or bundled tasks), validate rows, split, format.

Alpaca rows (instruction/input/output) become the prompt/completion pairs SFTTrainer trains on, so the loss
can be put on the response only (`data.completion_only`). Conversations (`data.format=messages|sharegpt`)
become `messages` rows that TRL renders through the chat template, the loss on the assistant turns only.
Either kind is an *example*: what training, scoring and generation take.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, load_dataset

from convobot import conversations
from convobot.config import BadRowPolicy, DataConfig, DataFormat, DataSource
from convobot.errors import DataError
from convobot.tasks import generate_conversations, generate_rows
from convobot.template import format_example

log = logging.getLogger(__name__)

FIELDS = ("instruction", "input", "output")
REQUIRED_NONEMPTY = ("instruction", "output")
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class InstructionData:
    train: Dataset  # examples: prompt/completion, or messages
    eval: Dataset  # examples
    eval_rows: list[dict]  # the held-out rows (Alpaca or messages), for exact-match and the saved split
    stats: dict = field(default_factory=dict)


def load_rows(cfg: DataConfig) -> tuple[Dataset, dict]:
    """The configured source as a Dataset of valid rows (Alpaca, or `messages` for conversations), plus load
    statistics."""
    unparsable: list[int] = []
    if cfg.source == DataSource.bundled:
        rows = (generate_rows(cfg.num_rows, cfg.generation_seed) if cfg.format == DataFormat.alpaca
                else generate_conversations(cfg.num_rows, cfg.generation_seed))
        dataset, origin = Dataset.from_list(rows), "bundled tasks"
    elif cfg.source == DataSource.local:
        (dataset, unparsable), origin = _load_local(Path(cfg.path), cfg.on_bad_row, cfg.format), str(cfg.path)
    else:
        dataset, origin = load_dataset(cfg.path, split=cfg.split), f"{cfg.path} [{cfg.split}]"
    if len(dataset) == 0:
        raise DataError(f"{origin}: no rows" + (f" left: all {len(unparsable)} were bad and skipped (rows "
                                               f"{sorted(unparsable)[:5]})" if unparsable else ""))
    dataset, invalid = _validate(dataset, origin, cfg.on_bad_row, cfg.format)
    bad = sorted(unparsable + invalid)
    if len(dataset) == 0:
        raise DataError(f"{origin}: no rows left: all {len(bad)} were bad and skipped (rows {bad[:5]})")
    if cfg.max_rows is not None:
        dataset = dataset.select(range(min(cfg.max_rows, len(dataset))))
    return dataset, {"source": origin, "rows_loaded": len(dataset), "rows_skipped": len(bad), "bad_rows": bad[:20]}


def _load_local(path: Path, policy: BadRowPolicy, data_format: DataFormat) -> tuple[Dataset, list[int]]:
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a data file (data.path names a .json/.jsonl/.csv/.parquet)")
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    builder = LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (use one of {sorted(LOCAL_BUILDERS)})")
    if builder == "json":
        # Validate the raw JSON values first: pyarrow's type inference would name no row, and can
        # silently turn a column of "4"-like strings into ints when one row holds a number.
        rows, bad = _scan_json(path, policy, data_format)
        return Dataset.from_list(rows), bad
    try:
        return load_dataset(builder, data_files=str(path), split="train"), []
    except Exception as err:
        raise DataError(f"{path}: cannot be read as {builder}: {err}") from err


def _scan_json(path: Path, policy: BadRowPolicy, data_format: DataFormat) -> tuple[list[dict], list[int]]:
    """Parse a JSON array or JSON-lines file and check each row; returns good rows and bad row numbers."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some editors write, is not data
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not UTF-8 text (byte {err.start}: {err.reason})") from err
    if text.lstrip().startswith("["):
        try:
            numbered = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON at line {err.lineno} ({err.msg})") from err
    else:
        numbered = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    numbered.append((line_number, json.loads(line)))
                except json.JSONDecodeError as err:
                    numbered.append((line_number, err))
    rows, bad = [], []
    for row_number, row in numbered:
        if isinstance(row, json.JSONDecodeError):
            good, problem = None, f"not valid JSON ({row.msg})"
        elif not isinstance(row, dict):
            good, problem = None, "expected a JSON object"
        else:
            good, problem = _checked(row, data_format)
        if problem is None:
            rows.append(good | {"_row": row_number})
        elif policy == BadRowPolicy.error:
            raise DataError(f"{path}: row {row_number}: {problem} (set data.on_bad_row=skip to skip bad rows)")
        else:
            bad.append(row_number)
    return rows, bad


def _checked(row: dict, data_format: DataFormat) -> tuple[dict | None, str | None]:
    """A row in its loaded shape (Alpaca fields, or `messages`), or what is wrong with it."""
    if data_format == DataFormat.alpaca:
        problem = _row_problem(row)
        return (None, problem) if problem else ({key: row.get(key) or "" for key in FIELDS}, None)
    messages, problem = conversations.normalize(row, data_format)
    return (None, problem) if problem else ({"messages": messages}, None)


def _validate(dataset: Dataset, origin: str, policy: BadRowPolicy,
              data_format: DataFormat) -> tuple[Dataset, list[int]]:
    """Check every row: string instruction/input/output with non-empty instruction and output, or a well-formed
    conversation."""
    if data_format != DataFormat.alpaca:
        return _validate_conversations(dataset, origin, policy, data_format)
    missing_columns = [c for c in REQUIRED_NONEMPTY if c not in dataset.column_names]
    if missing_columns:
        raise DataError(f"{origin}: missing column(s) {missing_columns}; need {list(FIELDS)}"
                        f"{conversations.format_hint(dataset.column_names, 'instruction', 'it')}")
    if "input" not in dataset.column_names:
        dataset = dataset.add_column("input", [""] * len(dataset))
    row_numbers = dataset["_row"] if "_row" in dataset.column_names else range(1, len(dataset) + 1)
    rows = dataset.select_columns(list(FIELDS))
    checked = ((number, index, _row_problem(row)) for index, (number, row) in enumerate(zip(row_numbers, rows)))
    good, bad = _kept(checked, origin, policy)
    dataset = dataset.select(good) if bad else dataset
    return dataset.select_columns(list(FIELDS)), bad


def _kept(checked, origin: str, policy: BadRowPolicy) -> tuple[list, list[int]]:
    """(row number, what to keep, problem or None) per row -> what is kept, and the bad row numbers; a bad row
    stops the run unless data.on_bad_row=skip."""
    good, bad = [], []
    for row_number, keep, problem in checked:
        if problem is None:
            good.append(keep)
        elif policy == BadRowPolicy.error:
            raise DataError(f"{origin}: row {row_number}: {problem} (set data.on_bad_row=skip to skip bad rows)")
        else:
            bad.append(row_number)
    if bad:
        log.warning("%s: skipped %d bad rows (first: %s)", origin, len(bad), bad[:5])
    return good, bad


def _validate_conversations(dataset: Dataset, origin: str, policy: BadRowPolicy,
                            data_format: DataFormat) -> tuple[Dataset, list[int]]:
    column = conversations.COLUMN[data_format]
    if column not in dataset.column_names and "_row" not in dataset.column_names:
        raise DataError(f"{origin}: no '{column}' column (columns: {dataset.column_names}); "
                        f"data.format={data_format.value} reads '{column}'")

    def checked():
        for index, row in enumerate(dataset):
            if "_row" in row:  # a JSON file's rows, checked as they were read
                yield row["_row"], {"messages": row["messages"]}, None
            else:
                messages, problem = conversations.normalize(row, data_format)
                yield index + 1, {"messages": messages}, problem

    good, bad = _kept(checked(), origin, policy)
    return Dataset.from_list(good), bad


def _row_problem(row: dict) -> str | None:
    hint = conversations.format_hint(row, "instruction")
    if hint and "instruction" not in row:
        return f"field 'instruction' is missing{hint}"
    for key in FIELDS:
        value = row.get(key)
        if value is None:
            if key == "input":  # Alpaca rows may omit the input
                continue
            return f"field '{key}' is missing"
        if not isinstance(value, str):
            return f"field '{key}' is not a string (got {type(value).__name__})"
        if key in REQUIRED_NONEMPTY and not value.strip():
            return f"field '{key}' is empty"
    return None


def split_rows(dataset: Dataset, cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """Deterministic held-out split (seeded), so every run of an experiment scores the same rows."""
    size = int(cfg.eval_size) if cfg.eval_size >= 1 else cfg.eval_size
    try:
        parts = dataset.train_test_split(test_size=size, seed=cfg.split_seed, shuffle=True)
    except ValueError as err:  # nothing left on one side
        raise DataError(f"config key 'data.eval_size': {cfg.eval_size} does not split {len(dataset)} rows into "
                        f"training and held-out rows ({err})") from err
    held_out = parts["test"]
    if cfg.max_eval_rows is not None:
        held_out = held_out.select(range(min(cfg.max_eval_rows, len(held_out))))
    return parts["train"], held_out


def char_budget(tokenizer, max_length: int) -> int:
    """Characters that always hold more than `max_length` tokens: no token is longer than the longest vocabulary
    entry (byte-level BPE: one character per byte), so cutting text there changes none of the tokens kept, and a
    50 MB row costs what max_length tokens cost. Twice that, for what the cut does to the token at the cut."""
    longest = max(len(token) for token in tokenizer.get_vocab())
    return 2 * (max_length + 1) * longest


def cut_pair(pair: dict, budget: int) -> dict:
    """A prompt/completion pair with no more than `budget` characters in all."""
    prompt = pair["prompt"][:budget]
    return {"prompt": prompt, "completion": pair["completion"][:budget - len(prompt)]}


def cut_example(example: dict, budget: int) -> dict:
    """An example (prompt/completion pair or conversation) with no more than `budget` characters of text."""
    if "messages" in example:
        return {"messages": conversations.cut_messages(example["messages"], budget)}
    return cut_pair(example, budget)


def _formatted_and_cut(row: dict, budget: int) -> dict:
    return cut_example(format_example(row), budget)


def _row_columns(rows: Dataset) -> list[str]:
    return [column for column in rows.column_names if column != "messages"]


def to_examples(rows: Dataset) -> Dataset:
    """Rows -> examples: prompt/completion pairs from Alpaca rows, conversations as they are."""
    return rows.map(format_example, remove_columns=_row_columns(rows))


def format_and_cut(rows: Dataset, tokenizer, max_length: int) -> Dataset:
    """Rows -> examples, each cut to what max_length tokens can hold."""
    return rows.map(_formatted_and_cut, fn_kwargs={"budget": char_budget(tokenizer, max_length)},
                    remove_columns=_row_columns(rows))


def encode_conversation(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """A conversation's token ids through the chat template, and the 0/1 mask of its assistant tokens (each answer
    and its EOS: what TRL's assistant_only_loss trains)."""
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    return list(encoded["input_ids"]), list(encoded["assistant_masks"])


def token_lengths(examples: Dataset, tokenizer) -> tuple[list[int], list[int]]:
    """Per example: the position of its first answer token, and its tokens in all (prompt + completion + EOS)."""
    if "messages" in examples.column_names:
        encoded = [encode_conversation(messages, tokenizer) for messages in examples["messages"]]
        return [mask.index(1) if 1 in mask else len(mask) for _, mask in encoded], [len(ids) for ids, _ in encoded]
    prompts = [len(ids) for ids in tokenizer(list(examples["prompt"]), add_special_tokens=False)["input_ids"]]
    texts = [p + c for p, c in zip(examples["prompt"], examples["completion"])]
    return prompts, [len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def prepare(cfg: DataConfig, tokenizer) -> InstructionData:
    """Load, validate, split and format the configured data."""
    rows, stats = load_rows(cfg)
    train_rows, eval_rows = split_rows(rows, cfg)
    train = format_and_cut(train_rows, tokenizer, cfg.max_length)
    evaluation = format_and_cut(eval_rows, tokenizer, cfg.max_length)
    (first_answer, train_lengths), (_, eval_lengths) = token_lengths(train, tokenizer), token_lengths(evaluation,
                                                                                                     tokenizer)
    stats |= {
        "format": cfg.format.value,
        "train_rows": len(train),
        "eval_rows": len(evaluation),
        "truncated_train_rows": sum(length > cfg.max_length for length in train_lengths),
        "truncated_eval_rows": sum(length > cfg.max_length for length in eval_lengths),
        # With the loss on the response only, these rows train nothing: the prompt fills data.max_length.
        "train_rows_without_answer": sum(start >= cfg.max_length for start in first_answer),
    }
    if stats["train_rows_without_answer"] == len(train) and cfg.completion_only:
        raise DataError(f"config key 'data.max_length': {cfg.max_length} tokens leave no room for any answer: every "
                        f"training prompt is at least that long (shortest {min(first_answer)} tokens)")
    if stats["truncated_train_rows"]:
        log.warning("%d training rows exceed data.max_length=%d tokens and will be truncated",
                    stats["truncated_train_rows"], cfg.max_length)
    return InstructionData(train=train, eval=evaluation, eval_rows=eval_rows.to_list(), stats=stats)

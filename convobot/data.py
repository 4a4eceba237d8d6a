"""Instruction data: load (hub, local file or bundled tasks), validate rows, split, format.

Every source ends as Alpaca rows (instruction/input/output), then as the prompt/completion pairs
SFTTrainer trains on, so the loss can be put on the response only (`data.completion_only`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, load_dataset

from convobot.config import BadRowPolicy, DataConfig, DataSource
from convobot.errors import DataError
from convobot.tasks import generate_rows
from convobot.template import format_example

log = logging.getLogger(__name__)

FIELDS = ("instruction", "input", "output")
REQUIRED_NONEMPTY = ("instruction", "output")
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class InstructionData:
    train: Dataset  # prompt/completion
    eval: Dataset  # prompt/completion
    eval_rows: list[dict]  # the held-out Alpaca rows, for exact-match and the saved split
    stats: dict = field(default_factory=dict)


def load_rows(cfg: DataConfig) -> tuple[Dataset, dict]:
    """The configured source as a Dataset of valid Alpaca rows, plus load statistics."""
    unparsable: list[int] = []
    if cfg.source == DataSource.bundled:
        dataset, origin = Dataset.from_list(generate_rows(cfg.num_rows, cfg.generation_seed)), "bundled tasks"
    elif cfg.source == DataSource.local:
        (dataset, unparsable), origin = _load_local(Path(cfg.path), cfg.on_bad_row), str(cfg.path)
    else:
        dataset, origin = load_dataset(cfg.path, split=cfg.split), f"{cfg.path} [{cfg.split}]"
    if len(dataset) == 0:
        raise DataError(f"{origin}: no rows" + (f" left: all {len(unparsable)} were bad and skipped (rows "
                                               f"{sorted(unparsable)[:5]})" if unparsable else ""))
    dataset, invalid = _validate(dataset, origin, cfg.on_bad_row)
    bad = sorted(unparsable + invalid)
    if len(dataset) == 0:
        raise DataError(f"{origin}: no rows left: all {len(bad)} were bad and skipped (rows {bad[:5]})")
    if cfg.max_rows is not None:
        dataset = dataset.select(range(min(cfg.max_rows, len(dataset))))
    return dataset, {"source": origin, "rows_loaded": len(dataset), "rows_skipped": len(bad), "bad_rows": bad[:20]}


def _load_local(path: Path, policy: BadRowPolicy) -> tuple[Dataset, list[int]]:
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
        rows, bad = _scan_json(path, policy)
        return Dataset.from_list(rows), bad
    try:
        return load_dataset(builder, data_files=str(path), split="train"), []
    except Exception as err:
        raise DataError(f"{path}: cannot be read as {builder}: {err}") from err


def _scan_json(path: Path, policy: BadRowPolicy) -> tuple[list[dict], list[int]]:
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
            problem = f"not valid JSON ({row.msg})"
        else:
            problem = _row_problem(row) if isinstance(row, dict) else "expected a JSON object"
        if problem is None:
            rows.append({key: row.get(key) or "" for key in FIELDS} | {"_row": row_number})
        elif policy == BadRowPolicy.error:
            raise DataError(f"{path}: row {row_number}: {problem} (set data.on_bad_row=skip to skip bad rows)")
        else:
            bad.append(row_number)
    return rows, bad


def _validate(dataset: Dataset, origin: str, policy: BadRowPolicy) -> tuple[Dataset, list[int]]:
    """Check every row has string instruction/input/output with non-empty instruction and output."""
    missing_columns = [c for c in REQUIRED_NONEMPTY if c not in dataset.column_names]
    if missing_columns:
        raise DataError(f"{origin}: missing column(s) {missing_columns}; need {list(FIELDS)}")
    if "input" not in dataset.column_names:
        dataset = dataset.add_column("input", [""] * len(dataset))
    row_numbers = dataset["_row"] if "_row" in dataset.column_names else range(1, len(dataset) + 1)
    good, bad = [], []
    for index, (row_number, row) in enumerate(zip(row_numbers, dataset.select_columns(list(FIELDS)))):
        problem = _row_problem(row)
        if problem is None:
            good.append(index)
        elif policy == BadRowPolicy.error:
            raise DataError(f"{origin}: row {row_number}: {problem} (set data.on_bad_row=skip to skip bad rows)")
        else:
            bad.append(row_number)
    if bad:
        log.warning("%s: skipped %d bad rows (first: %s)", origin, len(bad), bad[:5])
    dataset = dataset.select(good) if bad else dataset
    return dataset.select_columns(list(FIELDS)), bad


def _row_problem(row: dict) -> str | None:
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


def _formatted_and_cut(row: dict, budget: int) -> dict:
    return cut_pair(format_example(row), budget)


def format_and_cut(rows: Dataset, tokenizer, max_length: int) -> Dataset:
    """Alpaca rows -> prompt/completion pairs, each cut to what max_length tokens can hold."""
    return rows.map(_formatted_and_cut, fn_kwargs={"budget": char_budget(tokenizer, max_length)},
                    remove_columns=list(FIELDS))


def token_lengths(pairs: Dataset, tokenizer) -> tuple[list[int], list[int]]:
    """Tokens of each prompt, and of each whole row (prompt + completion + EOS)."""
    prompts = [len(ids) for ids in tokenizer(list(pairs["prompt"]), add_special_tokens=False)["input_ids"]]
    texts = [p + c for p, c in zip(pairs["prompt"], pairs["completion"])]
    return prompts, [len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def prepare(cfg: DataConfig, tokenizer) -> InstructionData:
    """Load, validate, split and format the configured data."""
    rows, stats = load_rows(cfg)
    train_rows, eval_rows = split_rows(rows, cfg)
    train = format_and_cut(train_rows, tokenizer, cfg.max_length)
    evaluation = format_and_cut(eval_rows, tokenizer, cfg.max_length)
    (train_prompts, train_lengths), (_, eval_lengths) = token_lengths(train, tokenizer), token_lengths(evaluation,
                                                                                                       tokenizer)
    stats |= {
        "train_rows": len(train),
        "eval_rows": len(evaluation),
        "truncated_train_rows": sum(length > cfg.max_length for length in train_lengths),
        "truncated_eval_rows": sum(length > cfg.max_length for length in eval_lengths),
        # With the loss on the response only, these rows train nothing: the prompt fills data.max_length.
        "train_rows_without_answer": sum(length >= cfg.max_length for length in train_prompts),
    }
    if stats["train_rows_without_answer"] == len(train) and cfg.completion_only:
        raise DataError(f"config key 'data.max_length': {cfg.max_length} tokens leave no room for any answer: every "
                        f"training prompt is at least that long (shortest {min(train_prompts)} tokens)")
    if stats["truncated_train_rows"]:
        log.warning("%d training rows exceed data.max_length=%d tokens and will be truncated",
                    stats["truncated_train_rows"], cfg.max_length)
    return InstructionData(train=train, eval=evaluation, eval_rows=eval_rows.to_list(), stats=stats)

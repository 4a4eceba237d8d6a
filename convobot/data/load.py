"""Instruction rows from the hub, a local file or the bundled tasks, checked row by row.

Alpaca rows (instruction / input / output), conversations (`data.format=messages|sharegpt`, brought to one
`messages` shape by conversations.py) and preference rows (`data.format=preference|unpaired`, preferences.py) are
validated as they are read: a bad row stops the run naming the file and
row, or is skipped and counted (`data.on_bad_row=skip`). `split_rows` holds out the same seeded rows every run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from datasets import Dataset, load_dataset

from convobot.config import PREFERENCE_FORMATS, BadRowPolicy, DataConfig, DataFormat, DataSource
from convobot.data import conversations, preferences
from convobot.data.tasks import generate_conversations, generate_preference_rows, generate_rows
from convobot.errors import DataError

log = logging.getLogger(__name__)

FIELDS = ("instruction", "input", "output")
REQUIRED_NONEMPTY = ("instruction", "output")
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(cfg: DataConfig) -> tuple[Dataset, dict]:
    """The configured source as a Dataset of valid rows (Alpaca, or `messages` for conversations), plus load
    statistics."""
    unparsable: list[int] = []
    if cfg.source == DataSource.bundled:
        dataset, origin = Dataset.from_list(_bundled(cfg)), "bundled tasks"
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


def _bundled(cfg: DataConfig) -> list[dict]:
    if cfg.format == DataFormat.alpaca:
        return generate_rows(cfg.num_rows, cfg.generation_seed)
    if cfg.format == DataFormat.preference:
        return generate_preference_rows(cfg.num_rows, cfg.generation_seed)
    if cfg.format == DataFormat.unpaired:
        raise DataError("config key 'data.format': the bundled tasks come as preference pairs, not unpaired rows: "
                        "use data=bundled_preferences (stage=kto counts each pair as one desirable and one "
                        "undesirable answer)")
    return generate_conversations(cfg.num_rows, cfg.generation_seed)


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
    if data_format in PREFERENCE_FORMATS:
        return preferences.normalize(row, data_format)
    messages, problem = conversations.normalize(row, data_format)
    return (None, problem) if problem else ({"messages": messages}, None)


def _validate(dataset: Dataset, origin: str, policy: BadRowPolicy,
              data_format: DataFormat) -> tuple[Dataset, list[int]]:
    """Check every row: string instruction/input/output with non-empty instruction and output, or a well-formed
    conversation."""
    if data_format in PREFERENCE_FORMATS:
        return _validate_preferences(dataset, origin, policy, data_format)
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


def _validate_preferences(dataset: Dataset, origin: str, policy: BadRowPolicy,
                          data_format: DataFormat) -> tuple[Dataset, list[int]]:
    def checked():
        for index, row in enumerate(dataset):
            if "_row" in row:  # a JSON file's rows, checked as they were read
                yield row["_row"], {key: value for key, value in row.items() if key != "_row"}, None
            else:
                shaped, problem = preferences.normalize(row, data_format)
                yield index + 1, shaped, problem

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

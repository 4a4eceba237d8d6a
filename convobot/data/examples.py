"""Rows -> examples, what training, scoring and generation take: Alpaca rows become prompt/completion pairs (so
the loss can be put on the response only, `data.completion_only`), conversations stay `messages` that TRL renders
through the chat template, the loss on the assistant turns. Text is cut by characters before tokenizing, so a
50 MB row costs what `data.max_length` tokens cost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from datasets import Dataset

from convobot.config import DataConfig, Stage
from convobot.data import conversations, preferences
from convobot.data.load import load_rows, split_rows
from convobot.errors import DataError
from convobot.template import format_example

log = logging.getLogger(__name__)


@dataclass
class InstructionData:
    train: Dataset  # what the trainer trains on: examples (prompt/completion, or messages) or a stage's rows
    eval: Dataset  # examples: held-out perplexity is measured on them
    eval_rows: list[dict]  # the held-out rows (Alpaca or messages), for exact-match and the saved split
    stats: dict = field(default_factory=dict)
    trainer_eval: Dataset | None = None  # a stage's held-out rows in its trainer's shape; None: `eval`


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


def prepare_stage(cfg: DataConfig, tokenizer, stage: Stage) -> InstructionData:
    """Load, validate and split the data of a preference or reward stage: the trainer's rows (preferences.py), and
    held-out rows ending with their chosen answer, scored as SFT's are."""
    if stage == Stage.sft:
        return prepare(cfg, tokenizer)
    rows, stats = load_rows(cfg)
    train_rows, eval_rows = split_rows(rows, cfg)
    train, fitted = preferences.trainer_rows(train_rows, tokenizer, stage, cfg.max_length)
    trainer_eval, _ = preferences.trainer_rows(eval_rows, tokenizer, stage, cfg.max_length)
    if not len(train):
        raise DataError(f"config key 'data.max_length': {cfg.max_length} tokens leave no room for any prompt: every "
                        "training row's answer alone fills them")
    answered = eval_rows.to_list() if stage == Stage.grpo else preferences.answered_rows(eval_rows)
    evaluation = format_and_cut(Dataset.from_list(answered), tokenizer, cfg.max_length)
    # eval_rows: the held-out rows scored (those with a chosen or desirable answer) of heldout_rows.
    stats |= {"format": cfg.format.value, "stage": stage.value, "train_rows": len(train), "eval_rows": len(evaluation),
              "heldout_rows": len(eval_rows),
              "prompts_cut_to_fit": fitted["prompts_cut"], "rows_dropped_too_long": fitted["rows_dropped"]}
    if fitted["prompts_cut"] or fitted["rows_dropped"]:
        log.warning("%d training prompts were cut from the left and %d rows dropped to fit data.max_length=%d",
                    fitted["prompts_cut"], fitted["rows_dropped"], cfg.max_length)
    return InstructionData(train=train, eval=evaluation, eval_rows=answered, stats=stats, trainer_eval=trainer_eval)

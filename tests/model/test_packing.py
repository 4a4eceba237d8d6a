"""Packing (train.packing=true) trains exactly what the unpacked path trains: same tokens, same loss, same count.

Packed rows share a sequence with position_ids restarting at 0 and no attention_mask; transformers then builds a
block-diagonal causal mask, so no row attends to another. These tests check that, the loss, the completion-only
labels with their EOS, and the trained-token count, on the tiny model (CPU, seconds).
"""

from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from trl import SFTTrainer

from convobot.config import Precision
from convobot.data.examples import prepare
from convobot.model import attention
from convobot.model.loss_head import IGNORE_INDEX
from convobot.model.tokenizer import load_tokenizer
from convobot.scoring.perplexity import encode_pairs
from convobot.training.recipe import build_trainer

CPU = torch.device("cpu")


@pytest.mark.parametrize("attn", ["sdpa", "eager", attention.NAME])
def test_gpt2_keeps_packed_rows_apart(attn):
    """Logits of two rows packed into one sequence equal those of each row run alone."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=97)
    config._attn_implementation = attn
    model = GPT2LMHeadModel(config).eval()
    first, second = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 5))
    packed = torch.cat([first, second], dim=1)
    restart = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        alone = torch.cat([model(first).logits, model(second).logits], dim=1)
        together = model(packed, position_ids=restart, use_cache=False).logits
        # Control: one continuous sequence lets the second row see the first, so the check can fail.
        continuous = model(packed, use_cache=False).logits
    assert torch.allclose(together, alone, atol=1e-5)
    assert (continuous[:, 7:] - alone[:, 7:]).abs().max() > 1e-3


def _trainer(cfg, tokenizer, dataset, run_dir: Path) -> SFTTrainer:
    """convobot's own trainer: packed, with row-by-row attention and the cpu profile's plain loss head."""
    trainer, _ = build_trainer(cfg, run_dir, CPU, Precision.fp32, tokenizer, dataset)
    trainer.args.disable_tqdm = True
    return trainer


def _scored_rows(batch: dict) -> list[tuple[int, ...]]:
    """The trained label ids of each row in a batch (a packed batch is split where position_ids restart).
    The first label of a row is never scored: the model predicts token t+1 from token t."""
    labels = batch["labels"]
    if "position_ids" in batch:  # packed: one sequence of several rows
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [labels.size(1)]
        rows = [labels[0, a:b] for a, b in zip(starts, starts[1:])]
    else:
        rows = list(labels)
    return [tuple(r[1:][r[1:] != IGNORE_INDEX].tolist()) for r in rows]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """Unpacked and packed trainers over the same 60 rows of bundled tasks, and one epoch of their batches."""
    from convobot.config import compose, validate

    built = {}
    for packing in (False, True):
        cfg = validate(compose(["experiment=smoke", "data.num_rows=64", "data.eval_size=4", "hardware.batch_size=4",
                                "train.max_steps=-1", "train.epochs=1", f"train.packing={str(packing).lower()}"]))
        tokenizer = load_tokenizer(cfg.model.tokenizer)
        dataset = prepare(cfg.data, tokenizer)
        trainer = _trainer(cfg, tokenizer, dataset, tmp_path_factory.mktemp(f"packing_{packing}"))
        built[packing] = (cfg, tokenizer, dataset, trainer, list(trainer.get_train_dataloader()))
    return built


def test_packing_trains_the_same_labels_with_eos(both):
    """Completion-only labels survive packing: the same completion tokens + EOS per row, nothing from prompts."""
    cfg, tokenizer, dataset, _, unpacked_batches = both[False]
    packed_batches = both[True][4]
    assert all("attention_mask" not in b and b["input_ids"].size(0) == 1 for b in packed_batches)
    assert all(b["input_ids"].size(1) <= cfg.data.max_length for b in packed_batches)
    expected = Counter(tuple(row["input_ids"][row["scored_from"]["response"]:])
                       for row in encode_pairs(dataset.train, tokenizer, cfg.data.max_length))
    unpacked = Counter(row for batch in unpacked_batches for row in _scored_rows(batch))
    packed = Counter(row for batch in packed_batches for row in _scored_rows(batch))
    assert packed == unpacked == expected
    assert sum(packed.values()) == len(dataset.train)
    assert all(row[-1] == tokenizer.eos_token_id for row in packed.elements())
    assert len(packed_batches) < len(dataset.train)  # several rows really share a sequence


def test_packed_loss_equals_unpacked_loss(both):
    """Summed token NLL over one epoch (TRL's own compute_loss, dropout off) is the same packed and unpacked."""
    totals = {}
    for packing, (_, _, _, trainer, batches) in both.items():
        trainer.model.eval()
        nll, tokens = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                # num_items_in_batch=1 makes the returned loss the batch's NLL sum instead of its mean
                nll += trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=1).item()
                tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        totals[packing] = (nll, tokens)
    (nll_unpacked, tokens_unpacked), (nll_packed, tokens_packed) = totals[False], totals[True]
    assert tokens_packed == tokens_unpacked > 0
    assert nll_packed == pytest.approx(nll_unpacked, rel=1e-5)


def test_packed_steps_keep_the_batch_and_count_every_trained_token(both):
    """A packed step is hardware.batch_size sequences (accumulated micro-batches of one), and
    num_input_tokens_seen counts every row token, EOS included, exactly as the unpacked path does."""
    seen = {}
    for packing, (cfg, tokenizer, dataset, trainer, batches) in both.items():
        args = trainer.args
        micro, accumulation = (1, cfg.hardware.batch_size) if packing else (cfg.hardware.batch_size, 1)
        assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (micro, accumulation)
        trainer.model.train()
        trainer.train()
        seen[packing] = trainer.state.num_input_tokens_seen
    cfg, tokenizer, dataset, _, packed_batches = both[True]
    rows = encode_pairs(dataset.train, tokenizer, cfg.data.max_length)
    assert seen[True] == seen[False] == sum(len(row["input_ids"]) for row in rows)
    # What the Trainer's "non_padding" count would say without an attention mask: GPT-2's pad is its EOS,
    # so every row's EOS would go uncounted.
    naive = sum(int((b["input_ids"] != tokenizer.pad_token_id).sum()) for b in packed_batches)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and naive == seen[True] - len(rows)

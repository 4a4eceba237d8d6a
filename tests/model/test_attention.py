"""Row-by-row SDPA over packed rows (convobot/attention.py) computes what the block-diagonal mask does."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from convobot.model import attention


def tiny_gpt2(implementation: str):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=97, attn_pdrop=0.0,
                        resid_pdrop=0.0, embd_pdrop=0.0)
    config._attn_implementation = implementation
    return GPT2LMHeadModel(config)


def test_packed_rows_are_found_only_in_one_packed_sequence():
    packed = torch.cat([torch.arange(7), torch.arange(5), torch.arange(3)])[None]
    assert attention.packed_rows(packed, batch=1) == [(0, 7), (7, 12), (12, 15)]
    assert attention.packed_rows(torch.arange(15)[None], batch=1) is None  # one row: plain SDPA
    assert attention.packed_rows(packed, batch=2) is None  # a padded batch sharing position ids
    assert attention.packed_rows(None, batch=1) is None


def test_row_by_row_matches_the_block_diagonal_mask_with_gradients(monkeypatch):
    masked, by_row = tiny_gpt2("sdpa"), tiny_gpt2("sdpa")
    assert attention.attend_row_by_row(by_row) and by_row.config._attn_implementation == attention.NAME
    calls, find_rows = [], attention.packed_rows
    monkeypatch.setattr(attention, "packed_rows", lambda *args: calls.append(find_rows(*args)) or calls[-1])
    ids = torch.randint(0, 97, (1, 15))
    positions = torch.cat([torch.arange(7), torch.arange(5), torch.arange(3)])[None]
    outputs = {}
    for name, model in (("masked", masked), ("by_row", by_row)):
        logits = model(ids, position_ids=positions, use_cache=False).logits
        logits.square().mean().backward()
        outputs[name] = (logits, [p.grad for p in model.parameters()])
    assert calls and all(rows == [(0, 7), (7, 12), (12, 15)] for rows in calls)  # the row path really ran
    assert torch.allclose(outputs["by_row"][0], outputs["masked"][0], atol=1e-5)
    for got, ref in zip(outputs["by_row"][1], outputs["masked"][1]):
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6)

"""Attention over packed rows: SDPA row by row.

Packed (train.packing=true), one sequence holds several rows whose position_ids restart at 0, and transformers
masks it block-diagonally so rows never see each other. SDPA's kernels still compute every masked block; run row
by row with is_causal=True they touch only each row's own triangle: ~1.8x less attention time per GPT-2 small
layer on CPU for three rows in 512 tokens. Registered with transformers' attention interface as "sdpa_packed";
whatever is not one packed sequence (padded batches, generation with a cache) goes to transformers' SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "sdpa_packed"


def packed_rows(position_ids: torch.Tensor | None, batch: int) -> list[tuple[int, int]] | None:
    """(start, end) of each row of one packed sequence, or None unless there are several."""
    if position_ids is None or batch != 1 or position_ids.shape[0] != 1:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return None
    return list(zip(starts, starts[1:] + [position_ids.shape[1]]))


def sdpa_by_row(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None, **kwargs):
    """transformers' attention-function signature; query/key/value are (batch, heads, seq, head_dim)."""
    same_shape = query.shape == key.shape == value.shape  # no cache, no grouped key/value heads
    rows = packed_rows(position_ids, query.shape[0]) if same_shape else None
    if rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # split, not slicing: one slice's backward writes a whole zero-filled gradient per row; split's is one cat.
    sizes = [b - a for a, b in rows]
    out = torch.cat([F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
                     for q, k, v in zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2))], dim=2)
    return out.transpose(1, 2).contiguous(), None  # (batch, seq, heads, head_dim), as transformers' SDPA returns


AttentionInterface.register(NAME, sdpa_by_row)
AttentionMaskInterface.register(NAME, sdpa_mask)


def attend_row_by_row(model) -> bool:
    """Switch a model on transformers' SDPA to `sdpa_by_row` (packed training); False if it uses another."""
    if model.config._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return True

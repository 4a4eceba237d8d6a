"""The PyTorch side of the engine: a transformers causal LM (a peft model when adapters are served) whose sequences
share one key/value cache of slots, so that each decode step is one forward pass over every running sequence.

Each sequence has a row of the cache and its own length: its new key and value are written at its own position,
and a 4D mask lets it attend to its own positions only. transformers takes such a mask as it is, and GPT-2's
absolute position embeddings take each row's position from `position_ids`. Rows are kept contiguous (a finishing
sequence's row is refilled with the last one), so a step computes only live rows. Prompts are prefilled with
transformers' own DynamicCache, a chunk per engine step, then copied into a free row: prefill is computed exactly
as `generate()` computes it. With adapters, each row names its own (`adapter_names`, as in peft's mixed-adapter
batches; "__base__" for the base itself), so requests for different adapters decode in the same pass, each LoRA
layer applying every row's adapter at once (row_lora.py).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from convobot.model.base import context_length
from convobot.serving.row_lora import use_row_lora


class SlotCache:
    """Keys and values of `slots` sequences for every layer, [slots, heads, capacity, head dim]; the capacity grows
    (doubling, up to the context) as sequences get longer. Quacks as the cache transformers' attention updates."""

    def __init__(self, layers: int, slots: int, heads: int, head_dim: int, context: int, dtype, device):
        self.shape, self.context, self.dtype, self.device = (slots, heads, head_dim), context, dtype, device
        self.capacity = min(256, context)
        self.keys = [self._empty() for _ in range(layers)]
        self.values = [self._empty() for _ in range(layers)]
        self.rows = 0  # rows of this step
        self.positions: torch.Tensor | None = None  # each row's write position this step
        self.width = 0  # key/value positions this step attends over

    def _empty(self) -> torch.Tensor:
        slots, heads, head_dim = self.shape
        return torch.zeros(slots, heads, self.capacity, head_dim, dtype=self.dtype, device=self.device)

    def reserve(self, length: int) -> None:
        """Room for `length` positions in every row."""
        if length <= self.capacity:
            return
        old = self.capacity
        self.capacity = min(max(length, 2 * old), self.context)
        for tensors in (self.keys, self.values):
            for layer, tensor in enumerate(tensors):
                grown = self._empty()
                grown[:, :, :old] = tensor
                tensors[layer] = grown

    def prepare(self, positions: torch.Tensor) -> None:
        """The next step writes row i's key and value at positions[i] and attends over positions 0..max."""
        self.rows, self.positions, self.width = len(positions), positions, int(positions.max()) + 1
        self.reserve(self.width)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer: int, *args, **kwargs):
        rows = torch.arange(self.rows, device=key.device)
        self.keys[layer][rows, :, self.positions] = key[:, :, 0]
        self.values[layer][rows, :, self.positions] = value[:, :, 0]
        return self.keys[layer][:self.rows, :, :self.width], self.values[layer][:self.rows, :, :self.width]

    def put(self, row: int, prefilled: DynamicCache) -> None:
        """A prefilled sequence's keys and values into `row`."""
        length = prefilled.get_seq_length()
        self.reserve(length)
        for layer, cached in enumerate(prefilled.layers):
            self.keys[layer][row, :, :length] = cached.keys[0]
            self.values[layer][row, :, :length] = cached.values[0]

    def move(self, source: int, target: int, length: int) -> None:
        for tensors in (self.keys, self.values):
            for tensor in tensors:
                tensor[target, :, :length] = tensor[source, :, :length]


class WideHead(torch.nn.Module):
    """The output layer (hidden -> vocabulary) computed as W @ h.T: on the CPU, MKL runs GPT-2's 50,257 x 768
    projection of a few rows ~3.5x faster that way round than as F.linear's h @ W.T (8 rows: 17 ms vs 63 ms on a
    2-core EPYC), which is a third of a decode step. The same weights (tied to the embeddings), the same maths."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        logits = torch.matmul(self.weight, flat.T).T
        if self.bias is not None:
            logits = logits + self.bias
        return logits.reshape(*hidden.shape[:-1], -1)


def use_wide_head(model) -> bool:
    """Swap a CPU model's plain Linear output layer for WideHead; False if it has another kind (an adapter on it)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.weight.device.type != "cpu":
        return False
    inner.set_output_embeddings(WideHead(head))
    return True


class Prefill:
    """A prompt on its way into the cache, a chunk at a time."""

    def __init__(self, ids: list[int], adapter: str):
        self.ids, self.adapter, self.done, self.cache = ids, adapter, 0, DynamicCache()
        self.logits: torch.Tensor | None = None  # after the last chunk: the logits of the first new token

    @property
    def finished(self) -> bool:
        return self.done == len(self.ids)


class TorchRunner:
    """Prefill, decode and row bookkeeping for one base model and the adapters loaded on it."""

    def __init__(self, model, slots: int, adapters: bool):
        self.model, self.adapters = model.eval(), adapters
        use_wide_head(model)
        if adapters:
            use_row_lora(model)
        config = model.config
        self.context = context_length(config)
        parameter = next(model.parameters())
        heads = config.num_attention_heads
        self.cache = SlotCache(config.num_hidden_layers, slots, heads, config.hidden_size // heads, self.context,
                               parameter.dtype, parameter.device)
        self.device, self.slots = parameter.device, slots
        self.keys: list[object] = []  # the sequence in each row, rows 0..len-1
        self.lengths: list[int] = []  # tokens in each row's cache
        self.row_adapters: list[str] = []

    @property
    def free(self) -> int:
        return self.slots - len(self.keys)

    def _mask(self, visible: torch.Tensor) -> torch.Tensor:
        """[rows, 1, 1, width] as the attention implementation takes it: SDPA a boolean mask, eager an additive one."""
        mask = visible[:, None, None, :]
        if self.model.config._attn_implementation == "eager":
            return torch.zeros(mask.shape, dtype=self.cache.dtype, device=self.device).masked_fill(
                ~mask, torch.finfo(self.cache.dtype).min)
        return mask

    def _forward(self, input_ids, adapters: list[str], **kwargs):
        if self.adapters:
            kwargs["adapter_names"] = adapters
        return self.model(input_ids=input_ids, use_cache=True, **kwargs).logits

    def new_prefill(self, ids: list[int], adapter: str) -> Prefill:
        return Prefill(ids, adapter)

    def forget(self, job: Prefill) -> None:
        job.cache = None  # its keys and values are in the rows now, or no longer wanted

    @torch.no_grad()
    def prefill(self, job: Prefill, budget: int) -> int:
        """Feed up to `budget` more prompt tokens; returns how many. The last chunk leaves `job.logits`."""
        chunk = job.ids[job.done:job.done + budget]
        ids = torch.tensor([chunk], device=self.device)
        positions = torch.arange(job.done, job.done + len(chunk), device=self.device).unsqueeze(0)
        logits = self._forward(ids, [job.adapter], cache=job.cache, position_ids=positions,
                               attention_mask=torch.ones(1, job.done + len(chunk), dtype=torch.long,
                                                         device=self.device))
        job.done += len(chunk)
        if job.finished:
            job.logits = logits[0, -1].float()
        return len(chunk)

    def join(self, key, job: Prefill) -> None:
        """A prefilled sequence takes the next free row."""
        row = len(self.keys)
        self.cache.put(row, job.cache)
        self.keys.append(key)
        self.lengths.append(len(job.ids))
        self.row_adapters.append(job.adapter)

    def leave(self, key) -> None:
        """Free a sequence's row: the last row moves into it."""
        row, last = self.keys.index(key), len(self.keys) - 1
        if row != last:
            self.cache.move(last, row, self.lengths[last])
            for column in (self.keys, self.lengths, self.row_adapters):
                column[row] = column[last]
        for column in (self.keys, self.lengths, self.row_adapters):
            column.pop()

    @torch.no_grad()
    def decode(self, tokens: dict) -> dict:
        """One step for every row: `tokens` maps each sequence to its last token; returns its next logits."""
        ids = torch.tensor([[tokens[key]] for key in self.keys], device=self.device)
        positions = torch.tensor(self.lengths, device=self.device)
        self.cache.prepare(positions)
        visible = torch.arange(self.cache.width, device=self.device).unsqueeze(0) <= positions.unsqueeze(1)
        logits = self._forward(ids, self.row_adapters, cache=self.cache,
                               position_ids=positions.unsqueeze(1), attention_mask=self._mask(visible))
        self.lengths = [length + 1 for length in self.lengths]
        return {key: logits[row, -1].float() for row, key in enumerate(self.keys)}

"""Each row of a batch with its own LoRA adapter, in a fixed number of tensor operations per layer.

peft's mixed-adapter batches (`adapter_names`) loop over the adapters in every LoRA layer, gathering each one's rows
with Python lists: at GPT-2 small shape on 2 CPU cores, eight clients over four adapters decoded at 0.64x a merged
model's tokens/s that way, and at 0.87x this way (benchmarks/results/serve_throughput_cpu_2026-12-05.md). Here a
layer's adapters are laid side by side once, as one A and one B matrix; a step multiplies every row by all of A (a
few dozen columns), masks each row down to its own adapter's columns, scaled, and multiplies by B: two small matmuls
and a mask per layer, whatever the mix, as punica's and S-LoRA's batched kernels do on GPUs. peft still loads, names
and drops the adapters.

Only plain LoRA layers (peft's `lora.Linear`, rsLoRA included: its scale is peft's) are swapped; anything else
(a DoRA variant, a 4-bit base layer) keeps peft's own forward.
"""

from __future__ import annotations

import types

import torch

BASE = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


class Stacked:
    """One layer's adapters side by side, for a given set of adapter names: A as [in, slots x r] and B as
    [slots x r, out], where slot s holds adapter s's rank-r pair (ranks padded with zeros) and the last slot is all
    zeros (the base, and adapters that do not target this layer)."""

    def __init__(self, layer, names: tuple[str, ...]):
        self.names, self.rank = names, max(layer.lora_A[name].weight.shape[0] for name in names)
        first = layer.lora_A[names[0]].weight
        slots, features_in, features_out = len(names) + 1, first.shape[1], layer.lora_B[names[0]].weight.shape[0]
        self.a = torch.zeros(features_in, slots * self.rank, dtype=first.dtype, device=first.device)
        self.b = torch.zeros(slots * self.rank, features_out, dtype=first.dtype, device=first.device)
        self.scale = torch.zeros(slots, dtype=first.dtype, device=first.device)
        self.slot = {name: index for index, name in enumerate(names)}
        for index, name in enumerate(names):
            start = index * self.rank
            columns = slice(start, start + layer.lora_A[name].weight.shape[0])
            self.a[:, columns] = layer.lora_A[name].weight.detach().T
            self.b[columns] = layer.lora_B[name].weight.detach().T
            self.scale[index] = layer.scaling[name]
        self.rows: tuple[tuple[str, ...], torch.Tensor] | None = None  # the last batch's names and its mask

    def mask(self, adapter_names: list[str]) -> torch.Tensor:
        """[rows, slots x r]: each row's adapter scale over its own slot's columns, zeros elsewhere."""
        key = tuple(adapter_names)
        if self.rows is None or self.rows[0] != key:
            slots = torch.tensor([self.slot.get(name, len(self.names)) for name in key], device=self.a.device)
            picked = torch.nn.functional.one_hot(slots, len(self.names) + 1).to(self.a.dtype) * self.scale
            self.rows = key, picked.repeat_interleave(self.rank, dim=1)
        return self.rows[1]


def row_forward(self, x: torch.Tensor, *args, adapter_names: list[str] | None = None, **kwargs) -> torch.Tensor:
    """peft's LoRA forward, with a batch whose rows name their adapters done in two matmuls and a mask."""
    if adapter_names is None or self.disable_adapters or self.merged or self.lora_variant:
        return self.peft_forward(x, *args, adapter_names=adapter_names, **kwargs)
    names = tuple(self.lora_A.keys())
    if self.stacked is None or self.stacked.names != names:
        self.stacked = Stacked(self, names)
    result = self.base_layer(x, *args, **kwargs)
    low = torch.matmul(x.to(self.stacked.a.dtype), self.stacked.a)  # [rows, tokens, slots x r]: every adapter
    low = low * self.stacked.mask(adapter_names)[:, None, :]  # ... kept only for the row's own, scaled
    return result + torch.matmul(low, self.stacked.b).to(result.dtype)


def use_row_lora(model) -> int:
    """Swap the forward of `model`'s plain LoRA layers for row_forward (again after an adapter is loaded: it may
    target layers the others did not); how many were swapped now. A layer's stack is rebuilt when its adapters'
    names change, and the server gives every adapter it loads a new name (a0, a1, ...)."""
    from peft.tuners.lora import layer as lora

    swapped = 0
    for module in model.modules():
        if type(module) is lora.Linear and not module.lora_variant and not hasattr(module, "peft_forward"):
            module.peft_forward, module.stacked = module.forward, None
            module.forward = types.MethodType(row_forward, module)
            swapped += 1
    return swapped


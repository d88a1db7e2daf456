"""The packed multi-LoRA engine: K LoRA adapters of one peft model trained together on its one
frozen base, one forward and one backward per step over all adapters' rows.

A batch holds the adapters' rows contiguously, one equal micro-batch each, in the order the
batch names them (`PackedLora.rows`). Each targeted linear then runs its frozen base weight
once over every row (one F.linear) and the adapters' A and B stacked as [K, r, d_in] and
[K, d_out, r] through two batched matmuls on views of the rows ([K, b*s, d]): no masks, no
index lists, no host sync in the layer. With equal segments a bmm is the grouped GEMM.

The A and B of each adapter stay peft's own parameters (separate leaves, their peft names), so
each adapter keeps its own optimizer state, gradient norm and learning rate exactly as if it
were trained alone, progress files and `save_pretrained` see the usual peft keys, and a saved
adapter is a plain peft adapter. The stacks are built in each forward (r x (d_in + d_out) per
adapter and layer: small beside the activations).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Layout:
    """The adapters of the batch being run, in row order; shared by every packed layer."""

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()


class PackedLoraLinear(nn.Module):
    """A peft LoRA Linear run packed: its base layer and its adapters' A and B modules (the same
    modules, under the same names), applied per contiguous row segment of the current layout."""

    def __init__(self, layer: nn.Module, layout: Layout) -> None:
        super().__init__()
        self.base_layer = layer.base_layer
        self.lora_A, self.lora_B = layer.lora_A, layer.lora_B
        self.scaling = dict(layer.scaling)
        self.rank = {n: int(layer.r[n]) for n in layer.lora_A}
        self.layout = layout

    def _stacked(self, names: Sequence[str], rank: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A as [K, rank, d_in] and B as [K, d_out, rank]: a smaller rank padded with zeros (which
        add nothing and get zero gradients), an adapter that does not target this layer all zeros."""
        d_in, d_out = self.base_layer.in_features, self.base_layer.out_features
        a, b = [], []
        for n in names:
            if n not in self.lora_A:
                a.append(x.new_zeros(rank, d_in))
                b.append(x.new_zeros(d_out, rank))
                continue
            pad = rank - self.rank[n]
            a.append(F.pad(self.lora_A[n].weight, (0, 0, 0, pad)) if pad else self.lora_A[n].weight)
            b.append(F.pad(self.lora_B[n].weight, (0, pad)) if pad else self.lora_B[n].weight)
        return torch.stack(a), torch.stack(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = self.layout.names
        out = self.base_layer(x)  # the frozen base: one F.linear over every adapter's rows
        k = len(names)
        rank = max(self.rank.get(n, 0) for n in names)
        if rank == 0:  # no adapter of this batch targets this layer
            return out
        a, b = self._stacked(names, rank, x)
        rows = x.reshape(k, -1, x.shape[-1])  # [K, b*s, d_in]: adapter k's rows
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the bmm casts; no fp32 copy
            rows = rows.to(a.dtype)
        h = torch.bmm(rows, a.transpose(1, 2))  # [K, b*s, r]
        scales = [self.scaling.get(n, 0.0) for n in names]
        result = out.reshape(k, -1, out.shape[-1])
        if len(set(scales)) == 1:
            result = torch.baddbmm(result, h, b.transpose(1, 2), alpha=scales[0])
        else:  # per-adapter scaling (its own alpha or r): scale the small [K, b*s, r] product
            scale = torch.tensor(scales, dtype=h.dtype).to(h.device, non_blocking=True)
            result = torch.baddbmm(result, h * scale[:, None, None], b.transpose(1, 2))
        return result.reshape(out.shape).to(out.dtype)


def _unsupported(layer: nn.Module, name: str) -> str | None:
    for n in layer.lora_A:
        if not isinstance(layer.lora_dropout[n], nn.Identity):
            return f"{name}: adapter {n} has lora dropout (packed training needs dropout 0)"
        if layer.use_dora.get(n) or layer.lora_bias.get(n) or n in getattr(layer, "lora_variant", {}):
            return f"{name}: adapter {n} is not plain LoRA (DoRA, lora_bias or a variant)"
    if getattr(layer, "fan_in_fan_out", False):
        return f"{name}: fan_in_fan_out layers are not supported"
    return None


class PackedLora:
    """The packed engine over a peft model's LoRA adapters: `with PackedLora(model) as pack:`
    swaps each LoRA Linear for its packed form; leaving restores peft's layers (holding the same,
    trained, parameters) so peft saves and serves the adapters as usual."""

    def __init__(self, model: nn.Module) -> None:
        from peft.tuners.lora import Linear as LoraLinear

        self.model = model
        self.layout = Layout()
        self._layers: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []  # parent, attr, peft, packed
        problems = []
        for name, module in model.named_modules():
            if not hasattr(module, "lora_A") or not len(module.lora_A):
                continue
            if not isinstance(module, LoraLinear):
                problems.append(f"{name}: {type(module).__name__} layers are not supported (Linear only)")
                continue
            problem = _unsupported(module, name)
            if problem:
                problems.append(problem)
                continue
            parent_name, _, attr = name.rpartition(".")
            self._layers.append((model.get_submodule(parent_name), attr, module, PackedLoraLinear(module, self.layout)))
        if problems:
            raise ValueError(f"the packed LoRA engine cannot run this model: {problems[0]}")
        if not self._layers:
            raise ValueError("the packed LoRA engine found no LoRA Linear layer in the model")

    def __enter__(self) -> "PackedLora":
        for parent, attr, _, packed in self._layers:
            setattr(parent, attr, packed)
        return self

    def __exit__(self, *exc) -> None:
        for parent, attr, layer, _ in self._layers:
            setattr(parent, attr, layer)

    @contextlib.contextmanager
    def rows(self, names: Sequence[str]) -> Iterator[None]:
        """Run a batch whose rows are `names`' micro-batches in that order, equal in size. The
        backward (and a checkpointed recompute) must run inside too."""
        if not names:
            raise ValueError("a packed batch needs at least one adapter")
        before, self.layout.names = self.layout.names, tuple(names)
        try:
            yield
        finally:
            self.layout.names = before

"""Mixed-adapter batches for LoRA / DoRA linear layers: one gather + two batched matmuls per layer.

Every adapter a layer holds is stacked once (A as (n + 1, in, r_max), B as (n + 1, r_max, out) with the
adapter's scaling folded in, ranks padded with zeros); slot 0 is all zeros, so "__base__" rows and rows
whose adapter this layer lacks add nothing. DoRA's per-row factor m / ||W + sBA|| is stacked too (ones
for plain LoRA and the base), which turns DoRA's output into (W x + s B A x) * factor + bias for every row.
"""
from __future__ import annotations

import operator
from typing import NamedTuple, Optional

import torch

from ..layers import MixedRows
from .lora_kernels import compute_dtype


class Stacks(NamedTuple):
    key: tuple
    slots: tuple[str, ...]  # adapter in slot i + 1
    a: torch.Tensor  # (n + 1, in, r_max)
    b: torch.Tensor  # (n + 1, r_max, out), scaling folded in
    factor: Optional[torch.Tensor]  # (n + 1, out) DoRA's m / ||W + sBA||; None without DoRA


_VERSION = operator.attrgetter("_version")


def _key(layer) -> tuple:
    # identity, storage and in-place version of every tensor the stacks derive from: a load, an optimizer
    # step, an added or deleted adapter, a device move or a merge into the base weight each change it.
    # Built with C-level map() calls: it runs per layer per forward, with up to hundreds of adapters.
    tensors = [*layer.lora_A._parameters.values(), *layer.lora_B._parameters.values()]
    if layer.lora_magnitude_vector._parameters:
        tensors += [*layer.lora_magnitude_vector._parameters.values(), layer.base_layer.weight]
    return (tuple(layer.lora_A._parameters), tuple(layer.lora_magnitude_vector._parameters),
            tuple(layer.scaling.values()), tuple(map(id, tensors)), tuple(map(torch.Tensor.data_ptr, tensors)),
            tuple(map(_VERSION, tensors)), layer.weight_writes)  # merges write through .data: counted apart


def _build(layer, key: tuple, dtype: torch.dtype) -> Stacks:
    slots = tuple(layer.lora_A)
    a0 = layer.lora_A[slots[0]]
    r_max = max(layer.lora_A[n].shape[0] for n in slots)
    a = a0.new_zeros(len(slots) + 1, layer.in_features, r_max, dtype=dtype)
    b = a0.new_zeros(len(slots) + 1, r_max, layer.out_features, dtype=dtype)
    dora = [n for n in slots if n in layer.lora_magnitude_vector]
    factor = a0.new_ones(len(slots) + 1, layer.out_features, dtype=dtype) if dora else None
    for i, name in enumerate(slots, start=1):
        r = layer.lora_A[name].shape[0]
        a[i, :, :r] = layer.lora_A[name].t()
        b[i, :r] = layer.lora_B[name].t() * layer.scaling[name]
        if name in dora:  # the norm is a constant in backprop (DoRA, Sec. 4.3)
            factor[i] = layer.lora_magnitude_vector[name] / layer.dora_norm(name).to(a0.dtype)  # cast on copy
    return Stacks(key, slots, a, b, factor)


def stacks(layer, dtype: torch.dtype) -> Stacks:
    """The layer's stacked adapters in ``dtype``, cached until any tensor they derive from changes."""
    key = (dtype, _key(layer))
    dicts = (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)
    if torch.is_grad_enabled() and any(p.requires_grad for d in dicts for p in d.values()):  # stacks built with autograd must not outlive this pass
        return _build(layer, key, dtype)
    cached = getattr(layer, "_mixed_stacks", None)
    if cached is None or cached.key != key:
        with torch.no_grad():
            cached = _build(layer, key, dtype)
        layer._mixed_stacks = cached
    return cached


def mixed_forward(layer, x: torch.Tensor, result: torch.Tensor, rows: MixedRows) -> torch.Tensor:
    """``result`` (the base output) plus each row's own adapter; rows are x's first dimension."""
    batch = x.shape[0]
    if batch != len(rows.names):
        raise ValueError(f"adapter_names has {len(rows.names)} names but a LoRA layer sees a batch of {batch} "
                         "rows; pass one name per row of the (expanded) batch")
    a0 = next(iter(layer.lora_A.values()))
    st = stacks(layer, compute_dtype(x.dtype, a0.dtype))  # float32 adapters run in bf16 activations' dtype, as autocast
    idx = rows.index(st.slots, x.device)  # (batch,)
    x3 = x.reshape(batch, -1, x.shape[-1]).to(st.a.dtype)  # (batch, seq, in)
    h = torch.bmm(x3, st.a[idx])  # (batch, seq, r_max)
    b = st.b[idx]  # (batch, r_max, out)
    res3 = result.reshape(batch, -1, result.shape[-1])  # (batch, seq, out)
    if st.factor is None:
        if res3.dtype == h.dtype:
            return torch.baddbmm(res3, h, b).view(result.shape)
        return (res3 + torch.bmm(h, b).to(res3.dtype)).view(result.shape)
    bias = layer.base_layer.bias
    wx = (res3 - bias if bias is not None else res3).to(h.dtype)  # W x
    out = torch.baddbmm(wx, h, b).mul_(st.factor[idx][:, None, :])  # (W x + s B A x) * m / ||W + sBA||
    if bias is not None:
        out = out + bias
    return out.to(result.dtype).view(result.shape)

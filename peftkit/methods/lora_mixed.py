"""Mixed-adapter batches for LoRA / DoRA linear layers: a gather and two batched matmuls per layer and rank.

A layer's adapters are stacked once per rank (A as (n_r + 1, in, r), B as (n_r + 1, r, out) with the adapter's
scaling folded in); slot 0 is all zeros, so "__base__" rows, rows whose adapter this layer lacks and rows of
another rank add nothing. Stacking by rank keeps one large adapter from padding every other one to its rank (one
rank-256 adapter beside twenty rank-4 ones made the stacks 17x the adapters' own size); a batch runs one pass per
rank its rows use. DoRA's per-row factor m / ||W + sBA|| is stacked over all adapters (ones for plain LoRA and
the base), which turns DoRA's output into (W x + s B A x) * factor + bias for every row.
"""
from __future__ import annotations

import operator
from typing import NamedTuple, Optional

import torch

from ..layers import MixedRows
from .lora_kernels import compute_dtype


class RankStack(NamedTuple):
    slots: tuple[str, ...]  # adapter in slot i + 1, all of one rank
    names: frozenset  # the same names, for the per-batch check of which stacks a batch uses
    a: torch.Tensor  # (n_r + 1, in, r)
    b: torch.Tensor  # (n_r + 1, r, out), scaling folded in


class Stacks(NamedTuple):
    key: tuple
    slots: tuple[str, ...]  # every adapter, in slot i + 1 of factor
    ranks: tuple[RankStack, ...]  # one per distinct rank, lowest first
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
    ranks = []
    for r in sorted({layer.lora_A[n].shape[0] for n in slots}):
        names = tuple(n for n in slots if layer.lora_A[n].shape[0] == r)
        a = a0.new_zeros(len(names) + 1, layer.in_features, r, dtype=dtype)
        b = a0.new_zeros(len(names) + 1, r, layer.out_features, dtype=dtype)
        for i, name in enumerate(names, start=1):
            a[i] = layer.lora_A[name].t()
            b[i] = layer.lora_B[name].t() * layer.scaling[name]
        ranks.append(RankStack(names, frozenset(names), a, b))
    dora = [n for n in slots if n in layer.lora_magnitude_vector]
    factor = a0.new_ones(len(slots) + 1, layer.out_features, dtype=dtype) if dora else None
    for i, name in enumerate(slots, start=1):
        if name in dora:  # the norm is a constant in backprop (DoRA, Sec. 4.3)
            factor[i] = layer.lora_magnitude_vector[name] / layer.dora_norm(name).to(a0.dtype)  # cast on copy
    return Stacks(key, slots, tuple(ranks), factor)


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
    dtype = compute_dtype(x.dtype, a0.dtype)  # float32 adapters run in bf16 activations' dtype, as autocast would
    st = stacks(layer, dtype)
    x3 = x.reshape(batch, -1, x.shape[-1]).to(dtype)  # (batch, seq, in)
    res3 = result.reshape(batch, -1, result.shape[-1])  # (batch, seq, out)
    bias = layer.base_layer.bias
    if st.factor is not None:  # DoRA: (W x + s B A x) * m / ||W + sBA|| + bias
        wx = (res3 - bias if bias is not None else res3).to(dtype)
        out = _add_deltas(wx, x3, st, rows) * st.factor[rows.index(st.slots, x.device)][:, None, :]
        out = out + bias if bias is not None else out
        return out.to(result.dtype).view(result.shape)
    if res3.dtype == dtype:
        return _add_deltas(res3, x3, st, rows).view(result.shape)
    delta = _add_deltas(None, x3, st, rows)  # float32 adapters over float16 activations: added in float16, as PEFT
    return result if delta is None else (res3 + delta.to(res3.dtype)).view(result.shape)


def _add_deltas(start: Optional[torch.Tensor], x3: torch.Tensor, st: Stacks, rows: MixedRows) -> Optional[torch.Tensor]:
    """``start`` (batch, seq, out) plus each row's s (x A) B, one gather and two bmm per rank the rows use (a
    row of another rank picks the stack's zero slot); a new tensor unless no row uses an adapter here."""
    used, out = rows.used_names(), start
    for stack in st.ranks:
        if used.isdisjoint(stack.names):
            continue
        idx = rows.index(stack.slots, x3.device)  # (batch,)
        h = torch.bmm(x3, stack.a[idx])  # (batch, seq, r)
        if out is None:
            out = torch.bmm(h, stack.b[idx])
        elif out is start:
            out = torch.baddbmm(start, h, stack.b[idx])
        else:
            out.baddbmm_(h, stack.b[idx])
    return out

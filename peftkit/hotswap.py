"""Hot swap: load another saved LoRA adapter into an existing adapter's tensors, in place.

The adapter keeps its tensor objects (``copy_``), so a ``torch.compile``d model runs on without recompiling.

Scaling: our layers keep it as a python float, and torch.compile guards on that value (changing it
recompiles). A swap therefore never changes it: the new adapter's scaling s' is folded into B, which is
stored as B' s' / s, so s B A = s' B' A' exactly, for any mix of alpha, rsLoRA and rank / alpha patterns.
The model's config for the adapter stays the old one, which is what the live tensors mean (saving the
swapped adapter writes B' s' / s with the old alpha: the same delta).

A smaller rank is zero-padded (A's extra rows, B's extra columns are 0: the output is unchanged). A larger
rank needs room first: ``prepare_for_hotswap(model, target_rank)`` before compiling.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from typing import Optional, Union

import torch
from torch import nn

from . import checkpoint
from .config import PeftConfig
from .inject import adapter_layers, block_wrappers, plain_name
from .methods.lora import LoraConfig, LoraLayer
from .methods.lora_arith import module_pattern


def hotswap_adapter(model, model_id_or_path: Union[str, os.PathLike], adapter_name: str = "default",
                    allow_pickle: bool = False) -> None:
    """Overwrite LoRA adapter ``adapter_name`` of PeftModel ``model`` with the adapter saved at ``model_id_or_path``.

    Same target modules required; a smaller rank is zero-padded, a larger one refused. Every check runs
    before any tensor changes.
    """
    directory = checkpoint.find_adapter_dir(os.fspath(model_id_or_path), None)
    new_config = PeftConfig.from_pretrained(directory)
    found = checkpoint.load_tensors(directory, allow_pickle)
    plan = _plan(model, adapter_name, new_config, found, directory)
    with torch.no_grad():
        for live, value in plan:
            live.copy_(value)


def _lora_layers(model, adapter_name: str) -> dict[str, LoraLayer]:
    # by plain name (inject.plain_name): what the config's patterns and the saved keys name
    blocks = block_wrappers(model.base_model)
    return {plain_name(p, blocks): m for p, m in adapter_layers(model.base_model)
            if isinstance(m, LoraLayer) and adapter_name in m.A}


def _plan(model, name: str, new_config: PeftConfig, found: dict, directory: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # (live tensor, value to copy into it) for every tensor of the adapter, after all checks
    _check_configs(model, name, new_config, directory)
    expected = model.adapter_parameters(name)  # disk key -> live tensor
    embeddings = checkpoint.embedding_tensors(model.base_model, model.peft_config[name].target_modules)
    expected.update({k: v for k, v in embeddings.items() if k in found})
    found = checkpoint.with_named_copies(expected, found)  # PEFT's head-copy bias keys, as from_pretrained reads them
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        key = (missing or extra)[0]
        raise ValueError(f"cannot hotswap {directory} into adapter {name!r}: the target modules differ ({key!r} "
                         f"{'is missing' if missing else 'is unexpected'}; {len(missing)} missing, {len(extra)} "
                         "unexpected). Hotswap needs the same targets; use load_adapter for a different adapter")
    plan, factor_keys = [], set()
    for path, layer in _lora_layers(model, name).items():
        a_key, b_key = (checkpoint.layer_key(path, attr) for attr in layer.adapter_attrs[:2])
        ratio = new_config.scaling_for(path) / layer.scaling[name]  # fold the new scaling into B
        a, b = _padded(layer.A[name], found[a_key], 0, a_key, directory), _padded(layer.B[name], found[b_key], 1, b_key, directory)
        plan += [(layer.A[name], a), (layer.B[name], b * ratio)]
        factor_keys |= {a_key, b_key}
    for key in sorted(set(expected) - factor_keys):  # biases, DoRA magnitudes, embeddings: same shape, as saved
        if tuple(found[key].shape) != tuple(expected[key].shape):
            raise ValueError(f"cannot hotswap {directory}: tensor {key!r} has shape {tuple(found[key].shape)}, the "
                             f"model's has {tuple(expected[key].shape)}")
        plan.append((expected[key], found[key]))
    return plan


def _check_configs(model, name: str, new_config: PeftConfig, directory: str) -> None:
    config = model.peft_config.get(name)
    if config is None:
        raise ValueError(f"no adapter named {name!r} to hotswap into; this model has {sorted(model.peft_config)}")
    for what, cfg in (("adapter " + repr(name), config), (directory, new_config)):
        if not isinstance(cfg, LoraConfig):
            raise ValueError(f"hotswap swaps LoRA adapters; {what} is a {cfg.peft_type} adapter")
    if config.use_dora != new_config.use_dora:
        raise ValueError(f"cannot hotswap {directory} into {name!r}: one uses DoRA and the other does not")
    for path, layer in _lora_layers(model, name).items():
        if name in layer.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into {path!r}; call unmerge_adapter() before hotswapping")
        if layer.scaling[name] == 0:
            raise ValueError(f"adapter {name!r} has scaling 0 at {path!r} (lora_alpha=0), so a new scaling cannot be "
                             "folded into its weights; give it a nonzero lora_alpha")


def _padded(live: torch.Tensor, new: torch.Tensor, dim: int, key: str, directory: str) -> torch.Tensor:
    # the new factor zero-padded along its rank dimension (A: 0, B: 1) to the live tensor's shape
    rank, room = new.shape[dim], live.shape[dim]
    other_new, other_live = [s for i, s in enumerate(new.shape) if i != dim], [s for i, s in enumerate(live.shape) if i != dim]
    if other_new != other_live:
        raise ValueError(f"cannot hotswap {directory}: {key!r} has shape {tuple(new.shape)}, the model's "
                         f"{tuple(live.shape)}; the adapter was trained for another model")
    if rank > room:
        raise ValueError(f"cannot hotswap {directory}: its rank {rank} at {key!r} exceeds the loaded adapter's rank "
                         f"{room}. Call peftkit.hotswap.prepare_for_hotswap(model, target_rank={rank}) (or higher) "
                         "once, before torch.compile, to pad every adapter to that rank")
    out = torch.zeros_like(live)
    out.narrow(dim, 0, rank).copy_(new)
    return out


def prepare_for_hotswap(model, target_rank: int, adapter_names: Optional[list[str]] = None) -> None:
    """Pad every LoRA adapter (or those named) to rank ``target_rank`` with zeros; outputs are unchanged.

    Call it once before ``torch.compile``: it replaces the adapters' parameters (an optimizer holding the old
    ones must be rebuilt). The configs get r = target_rank, with alpha (or alpha_pattern) set to keep each
    module's scaling, so the padded adapters save and reload as they are.
    """
    names = [n for n in (adapter_names or model.peft_config) if isinstance(model.peft_config.get(n), LoraConfig)]
    if adapter_names is not None and len(names) != len(adapter_names):
        raise ValueError(f"prepare_for_hotswap pads LoRA adapters; {adapter_names} includes an unknown or non-LoRA "
                         f"one (this model has {sorted(model.peft_config)})")
    for name in names:
        too_big = {p: m.A[name].shape[0] for p, m in _lora_layers(model, name).items() if m.A[name].shape[0] > target_rank}
        if too_big:
            path, rank = next(iter(too_big.items()))
            raise ValueError(f"adapter {name!r} has rank {rank} at {path!r}, above target_rank {target_rank}")
    for name in names:
        scalings = {}
        for path, layer in _lora_layers(model, name).items():
            for holder, dim in ((layer.A, 0), (layer.B, 1)):
                old = holder[name]
                holder[name] = nn.Parameter(_padded_zeros(old.detach(), dim, target_rank), requires_grad=old.requires_grad)
            scalings[path] = layer.scaling[name]
        _keep_scalings(model.peft_config[name], target_rank, scalings)
    if model.active_adapters:
        model._activate(model.active_adapters)  # the trainable flags follow the new parameter objects


def _padded_zeros(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size
    out = t.new_zeros(shape)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


def _keep_scalings(config: LoraConfig, rank: int, scalings: dict[str, float]) -> None:
    # alpha = s * r (or s * sqrt(r) with rsLoRA) keeps every module's scaling s at the new rank
    factor = math.sqrt(rank) if config.use_rslora else rank
    alphas = {path: s * factor for path, s in scalings.items()}
    counts = Counter(alphas.values())
    config.r, config.rank_pattern = rank, {}
    config.lora_alpha = max(counts, key=counts.__getitem__)
    config.alpha_pattern = module_pattern(alphas, config.lora_alpha)

"""Progressive refinement of a selective adapter: re-score the adapted model, re-select, carry values over.

Call ``refine`` from a training loop, e.g. every N steps with a shrinking budget::

    for step, batch in enumerate(loader):
        ...
        if step in (200, 400):
            refine(model, calibration, budget={200: 0.02, 400: 0.01}[step], optimizer=opt)

Decisions (why): scoring sees the current model, base plus this adapter (merged for the duration and unmerged
bit-exactly), so the scores rank the weights the model now uses. Entries that leave the selection lose their
delta: the adapter stays a delta on the untouched base, so a saved checkpoint still reloads onto the original
base (merging them into the base instead would break that). Entries that enter start at zero, so the output
changes only by the dropped deltas. The optimizer keeps its state for kept entries; new ones start at zero.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from ..inject import adapter_layers, find_targets, replace_modules, unwrap
from .selective import SelectiveConfig, SelectiveLayer, _counts, _make_layer, _scored_weight
from .selective_scoring import LossFn, score_weights, select, unit_scores


def refine(model: nn.Module, batches: Optional[Iterable[dict]], budget: float, adapter_name: str = "default",
           loss_fn: Optional[LossFn] = None, optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, int]:
    """Re-select ``adapter_name`` of a PeftModel at ``budget``; returns the new ``selected_counts``."""
    config = _checked_config(model, adapter_name, budget)
    base = model.base_model
    names = find_targets(base, config)
    weights = {name: _scored_weight(base, name) for name in names}
    scores = _score_adapted(base, weights, config, adapter_name, batches, loss_fn)
    units = [unit_scores(scores.pop(name), config.granularity) for name in names]
    chosen = dict(zip(names, select(units, budget, None, config.ranking)))
    for name in names:
        _reselect(model, name, chosen[name], config, adapter_name, optimizer)
    config.budget, config.threshold = budget, None
    config.selected_counts = {n: _counts(c, weights[n], config.granularity) for n, c in chosen.items() if c.numel()}
    model.set_adapter(model.active_adapters)  # new layers learn which adapters are active; trainable flags
    return dict(config.selected_counts)


def _checked_config(model: nn.Module, adapter_name: str, budget: float) -> SelectiveConfig:
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if not isinstance(config, SelectiveConfig):
        raise ValueError(f"refine needs a PeftModel with a selective adapter named {adapter_name!r}")
    if config.granularity == "module":
        raise ValueError("refine re-selects entries or rows; granularity='module' adapters train whole weights")
    SelectiveConfig(budget=budget)  # the same check and message as the config's
    merged = [p for p, layer in adapter_layers(model.base_model) if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged into {merged[0]!r}; call unmerge_adapter() before refine")
    return config


def _score_adapted(base: nn.Module, weights: dict, config: SelectiveConfig, adapter_name: str,
                   batches, loss_fn) -> dict[str, torch.Tensor]:
    # base + adapter as one weight: merged for scoring (forward skips merged adapters), unmerged exactly after
    layers = [layer for _, layer in adapter_layers(base) if isinstance(layer, SelectiveLayer)
              and adapter_name in layer.adapter_names]
    for layer in layers:
        layer.merge([adapter_name])
    try:
        return score_weights(base, weights, config.criterion, batches, loss_fn, config.num_batches)
    finally:
        for layer in layers:
            layer.unmerge([adapter_name])


def _reselect(model: nn.Module, name: str, new: torch.Tensor, config: SelectiveConfig, adapter_name: str,
              optimizer: Optional[torch.optim.Optimizer]) -> None:
    # one module: keep values of surviving units, zero for new ones; add / drop the module's adapter as needed
    base = model.base_model
    layer = base.get_submodule(name)
    held = isinstance(layer, SelectiveLayer) and adapter_name in layer.adapter_names
    if not held and new.numel():
        config._selection = {name: new}
        config.selected_counts = {**(config.selected_counts or {}), name: _counts(new, _scored_weight(base, name),
                                                                                  config.granularity)}
        try:
            replace_modules(base, config, adapter_name, _make_layer, [name])
        finally:
            config.__dict__.pop("_selection", None)
        if optimizer is not None:
            optimizer.param_groups[0]["params"].append(base.get_submodule(name).selective_values[adapter_name])
        return
    if not held:
        return
    values, index = layer.selective_values[adapter_name], layer.selective_indices[adapter_name]
    if not new.numel():
        _forget(optimizer, values)
        layer.delete_adapter(adapter_name)
        if not layer.adapter_names:
            unwrap(base, name, merge=False)
        return
    new = new.to(index.device)
    position = torch.searchsorted(index, new).clamp(max=max(index.numel() - 1, 0))  # (k_new,)
    kept = index[position] == new if index.numel() else torch.zeros_like(new, dtype=torch.bool)
    with torch.no_grad():
        state = optimizer.state.get(values, {}) if optimizer is not None else {}
        for key, tensor in list(state.items()):
            if isinstance(tensor, torch.Tensor) and tensor.shape == values.shape:
                state[key] = _carry(tensor, index.numel(), new.numel(), position, kept)
        values.data = _carry(values.data, index.numel(), new.numel(), position, kept)
        index.data = new.to(index.dtype)


def _carry(old: torch.Tensor, old_units: int, new_units: int, position: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    # (old_units * width,) -> (new_units * width,): surviving units copied, the others zero
    rows = old.view(old_units, -1)
    out = rows.new_zeros(new_units, rows.shape[1])
    out[kept] = rows[position[kept]]
    return out.view(-1)


def _forget(optimizer: Optional[torch.optim.Optimizer], param: nn.Parameter) -> None:
    if optimizer is None:
        return
    optimizer.state.pop(param, None)
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if p is not param]


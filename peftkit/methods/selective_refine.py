"""Progressive refinement of a selective adapter: re-score the adapted model, re-select, carry values over.

Call ``refine`` from a training loop, e.g. every N steps with a shrinking budget::

    for step, batch in enumerate(loader):
        ...
        if step in (200, 400):
            refine(model, calibration, budget={200: 0.02, 400: 0.01}[step], optimizer=opt)

With ``regrow=f`` the re-selection follows the drop-and-grow rule of dynamic sparse training (RigL, Evci et al.,
2020; SpIEL, Ansell et al., 2024) instead of a fresh ranking: of the ``k`` units the budget allows, the
(1 - f) k selected units whose trained delta is largest in magnitude stay (all of them if fewer are held), and
the rest of the budget goes to the best-scoring units not selected yet. Trained entries have small gradients
precisely because they have been trained, so re-ranking everything by a gradient score drops what was learned;
the magnitude of the delta keeps it.

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

from ..inject import adapter_layers, block_wrappers, find_targets, plain_name, replace_modules, unwrap
from ..layers import AdapterLayer
from .selective import SelectiveConfig, SelectiveLayer, _counts, _make_layer, _scored_weight, _widths
from .selective_scoring import LossFn, check_finite, score_weights, select, take_by_size, top_k, unit_scores


def refine(model: nn.Module, batches: Optional[Iterable[dict]], budget: float, adapter_name: str = "default",
           loss_fn: Optional[LossFn] = None, optimizer: Optional[torch.optim.Optimizer] = None,
           regrow: Optional[float] = None) -> dict[str, int]:
    """Re-select ``adapter_name`` of a PeftModel at ``budget``; returns the new ``selected_counts``.

    ``regrow`` (a fraction in (0, 1]): keep the selected units with the largest trained deltas and bring in that
    fraction of the budget as new units by score (see the module docstring); None re-ranks every unit by score.

    Release the last training step's graph first (``del loss``): a module's values change size in place, and a
    graph still alive keeps autograd's record of the old size, so the next backward would fail on the shape.
    """
    config = _checked_config(model, adapter_name, budget)
    if regrow is not None and not (isinstance(regrow, (int, float)) and 0.0 < regrow <= 1.0):
        raise ValueError(f"regrow must be a fraction in (0, 1] of the budget to re-select, got {regrow!r}")
    base = model.base_model
    names = find_targets(base, config)
    weights = {name: _scored_weight(base, name) for name in names}
    scores = _score_adapted(base, weights, config, adapter_name, batches, loss_fn)
    units = [unit_scores(scores.pop(name), config.granularity) for name in names]
    if regrow is None:
        chosen = dict(zip(names, select(units, budget, None, config.ranking, _widths(weights, names, config.granularity))))
    else:
        held = [_held(base, name, adapter_name, u.numel()) for name, u in zip(names, units)]
        widths = _widths(weights, names, config.granularity)
        chosen = dict(zip(names, _drop_and_grow(units, held, budget, regrow, config.ranking, widths)))
    _check_wrappable(base, names, chosen, adapter_name)
    blocks = block_wrappers(base)  # selections are recorded by plain name (inject.plain_name)
    for name in names:
        _reselect(model, name, plain_name(name, blocks), chosen[name], config, adapter_name, optimizer)
    config.budget, config.threshold = budget, None
    config.selected_counts = {plain_name(n, blocks): _counts(c, weights[n], config.granularity)
                              for n, c in chosen.items() if c.numel()}
    # new layers learn which adapters are active; their values, created trainable, train only if this one does
    model._activate(model.active_adapters, added=adapter_name)
    return dict(config.selected_counts)


def _check_wrappable(base: nn.Module, names: list[str], chosen: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Refuse, before any module changes, a new selection in a module another method's adapter wraps."""
    for name in names:
        module = base.get_submodule(name)
        if chosen[name].numel() and isinstance(module, AdapterLayer) and not isinstance(module, SelectiveLayer):
            raise ValueError(f"refine would select entries of {name!r}, which a {type(module).__name__} wraps; one module "
                             "cannot hold a selective and another method's adapter. Leave it out of this adapter's "
                             f"targets (model.peft_config[{adapter_name!r}].exclude_modules) and refine again; nothing "
                             "was changed")


def _held(base: nn.Module, name: str, adapter_name: str, n_units: int) -> torch.Tensor:
    """Per unit of one module: the magnitude of its trained delta (mean |value| over a row) where selected, -inf
    where not."""
    out = torch.full((n_units,), float("-inf"))
    layer = base.get_submodule(name)
    if isinstance(layer, SelectiveLayer) and adapter_name in layer.adapter_names:
        index = layer.selective_indices[adapter_name].detach().cpu()
        values = layer.selective_values[adapter_name].detach().float().cpu()
        if not torch.isfinite(values).all():
            raise ValueError(f"the trained values of {name!r} contain NaN/inf (training diverged); regrow ranks units "
                             "by them: lower the learning rate, or refine without regrow")
        out[index] = values.view(index.numel(), -1).abs().mean(1) if index.numel() else values[:0]
    return out


def _drop_and_grow(units: list[torch.Tensor], held: list[torch.Tensor], budget: float, regrow: float,
                   ranking: str, widths: Optional[list[int]] = None) -> list[torch.Tensor]:
    """Per module, the unit indices to train: within each ranking group (all modules, or each one) the budget's k
    units are the largest held deltas, (1 - regrow) k of them (fewer if fewer are held; more only where too few
    units are unselected to grow the rest), then the best scores among the others. regrow=1 keeps none.
    Ranked globally over units of different widths (rows of modules with different in_features), the budget is
    counted in parameters, as select counts it (see _drop_and_grow_by_size)."""
    check_finite(units)
    if ranking != "per_module" and widths is not None and len(set(widths)) > 1:
        return _drop_and_grow_by_size(units, held, budget, regrow, widths)
    groups = [[i] for i in range(len(units))] if ranking == "per_module" else [list(range(len(units)))]
    chosen: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long)] * len(units)
    for group in groups:
        total = sum(units[i].numel() for i in group)
        now = sum(int(torch.isfinite(held[i]).sum()) for i in group)
        k = round(budget * total)
        keep = min(now, max(round((1.0 - regrow) * k), k - (total - now)))  # enough unselected units to grow into
        kept = top_k([held[i] for i in group], keep) if keep else [torch.zeros(0, dtype=torch.long)] * len(group)
        fresh = [torch.where(torch.isfinite(held[i]), float("-inf"), units[i].float().cpu()) for i in group]
        grown = top_k(fresh, k - keep) if k - keep else [torch.zeros(0, dtype=torch.long)] * len(group)
        for j, i in enumerate(group):
            chosen[i] = torch.cat([kept[j], grown[j]]).sort().values
    if not any(c.numel() for c in chosen):
        raise ValueError(f"budget {budget} selects nothing; raise the budget (or use a finer granularity)")
    return chosen


def _drop_and_grow_by_size(units: list[torch.Tensor], held: list[torch.Tensor], budget: float, regrow: float,
                           widths: list[int]) -> list[torch.Tensor]:
    """_drop_and_grow over all modules with the budget in parameters: held units by |delta| until (1 - regrow) of
    the budget's parameters (all held ones if they hold fewer; more where too few unselected parameters are left to
    grow into), then unheld units by score until the budget is full, each unit taken only where it still fits."""
    total = sum(u.numel() * w for u, w in zip(units, widths))
    now = sum(int(torch.isfinite(h).sum()) * w for h, w in zip(held, widths))
    k = round(budget * total)
    keep = min(now, max(round((1.0 - regrow) * k), k - (total - now)))
    kept, used = take_by_size(held, widths, keep)
    fresh = [torch.where(torch.isfinite(h), float("-inf"), u.float().cpu()) for h, u in zip(held, units)]
    grown, _ = take_by_size(fresh, widths, k - used)
    chosen = [torch.cat([a, b]).sort().values for a, b in zip(kept, grown)]
    if not any(c.numel() for c in chosen):  # a budget under the narrowest unit: the best one, as select takes
        chosen = take_by_size(units, widths, 0, at_least_one=True)[0]
    return chosen


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


def _reselect(model: nn.Module, name: str, plain: str, new: torch.Tensor, config: SelectiveConfig, adapter_name: str,
              optimizer: Optional[torch.optim.Optimizer]) -> None:
    # one module: keep values of surviving units, zero for new ones; add / drop the module's adapter as needed
    base = model.base_model
    layer = base.get_submodule(name)
    held = isinstance(layer, SelectiveLayer) and adapter_name in layer.adapter_names
    if not held and new.numel():
        config._selection = {plain: new}
        config.selected_counts = {**(config.selected_counts or {}), plain: _counts(new, _scored_weight(base, name),
                                                                                   config.granularity)}
        try:
            replace_modules(base, config, adapter_name, _make_layer, [name], plain=True)
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
        # an accumulated gradient (zero_grad(set_to_none=False), gradient accumulation) follows its entries
        grad = None if values.grad is None else _carry(values.grad, index.numel(), new.numel(), position, kept)
        values.grad = None
        values.data = _carry(values.data, index.numel(), new.numel(), position, kept)
        values.grad = grad
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


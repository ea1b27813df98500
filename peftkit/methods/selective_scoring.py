"""Importance scores of weights on calibration batches, and the selection of the most important units.

Criteria (one score buffer per scored weight, accumulated in place while each gradient is freed as soon
as it is accumulated, so scoring holds at most one extra copy of the scored weights):

- ``grad``: mean over batches of |g|;
- ``fisher``: mean over batches of g^2, the empirical Fisher (FISH mask, Sung et al., 2021, Sec. 3);
- ``sensitivity``: mean over batches of |w * g|, the first-order Taylor estimate of the loss change when the
  weight is removed (SPT, He et al., 2023, Sec. 3.1);
- ``magnitude``: |w| (no data).

g is the gradient of one batch's loss (the model's mean loss, or ``loss_fn``); batches of one example give
the per-example Fisher of the paper.

The same scores, averaged per module, rank whole modules for ``target_modules="auto"`` of the layer methods
(LoRA, IA3): ``AutoTargetMethod``.
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from ..inject import Method, block_wrappers, expand_all_linear, find_targets, plain_name
from ..layers import AdapterLayer

CRITERIA = ("fisher", "grad", "sensitivity", "magnitude")
LossFn = Callable[[object, dict], torch.Tensor]  # (model outputs, batch) -> scalar loss


def _batch_loss(model: nn.Module, batch, loss_fn: Optional[LossFn], index: int) -> torch.Tensor:
    if not isinstance(batch, Mapping):  # a dict, or a tokenizer's / collator's BatchEncoding
        raise TypeError(f"calibration batch {index} is a {type(batch).__name__}; pass dicts of model inputs "
                        "(input_ids=..., labels=...)")
    batch = on_model_device(model, batch)
    outputs = model(**batch)
    if loss_fn is not None:
        loss = loss_fn(outputs, batch)
    else:
        loss = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(f"calibration batch {index} gave no scalar loss: include 'labels' in each batch so the "
                         "model computes its loss, or pass loss_fn=(outputs, batch) -> scalar tensor")
    return loss


def on_model_device(model: nn.Module, batch: Mapping) -> dict:
    """``batch`` with its tensors on the device of the model's input embeddings (calibration data read on the CPU
    for a model on a GPU); as it is for a model placed by accelerate (device_map), whose hooks move inputs."""
    if getattr(model, "hf_device_map", None) is not None or getattr(getattr(model, "base_model", None),
                                                                     "hf_device_map", None) is not None:
        return dict(batch)
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, torch.Tensor):
        weight = next(model.parameters(), None)
    if weight is None or getattr(embeddings, "_hf_hook", None) is not None:  # an accelerate hook moves inputs itself
        return dict(batch)
    device = weight.device
    return {k: v.to(device) if isinstance(v, torch.Tensor) and v.device != device else v for k, v in batch.items()}


def _accumulate(criterion: str, score: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> None:
    # in place: the one buffer per weight; grad is freed by the caller right after
    g = grad.detach().float()
    if criterion == "grad":
        score.add_(g.abs_())
    elif criterion == "fisher":
        score.add_(g.square_())
    else:  # sensitivity: |w * g|
        score.add_(g.mul_(weight.detach().float()).abs_())


def score_weights(model: nn.Module, weights: dict[str, nn.Parameter], criterion: str,
                  batches: Optional[Iterable[dict]], loss_fn: Optional[LossFn] = None,
                  num_batches: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Float32 importance scores shaped like each weight; the model is left exactly as it was.

    The model runs in eval mode (no dropout) while scoring; its mode, ``requires_grad`` flags and any
    ``.grad`` are restored afterwards.
    """
    if criterion == "magnitude":
        if batches is not None or loss_fn is not None:
            raise ValueError("criterion 'magnitude' scores |w| and uses no data; leave out calibration_batches / "
                             "loss_fn, or pick a data criterion ('fisher', 'grad', 'sensitivity')")
        return {name: w.detach().float().abs() for name, w in weights.items()}
    if batches is None:
        raise ValueError(f"criterion {criterion!r} scores weights on data: pass calibration_batches=[{{'input_ids': "
                         "..., 'labels': ...}}, ...] to get_peft_model, or use criterion='magnitude'")
    if isinstance(batches, Mapping):
        raise TypeError("calibration_batches is one batch (a dict of inputs); pass a list of batches: [batch]")
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = {name: w.grad for name, w in weights.items()}
    modes = [(m, m.training) for m in model.modules()]  # each module's own mode, put back as it was
    # one score (and one hook) per parameter: names that share a weight (tied) share its score
    unique: dict[int, torch.Tensor] = {}
    scores = {name: unique.setdefault(id(w), torch.zeros(w.shape, dtype=torch.float32, device=w.device))
              for name, w in weights.items()}
    hooks = []
    try:
        for p in params:
            p.requires_grad_(False)
        for name, w in weights.items():
            w.grad = None
            w.requires_grad_(True)
        for name, w in {id(w): (n, w) for n, w in weights.items()}.values():
            hooks.append(w.register_post_accumulate_grad_hook(_hook(criterion, scores[name])))
        model.eval()
        seen = _run_batches(model, batches, loss_fn, num_batches)
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag in zip(params, saved_flags):
            p.requires_grad_(flag)
        for name, w in weights.items():
            w.grad = saved_grads[name]
        for module, training in modes:
            module.training = training
    for score in unique.values():
        score.div_(seen)
    if all(not bool(score.any()) for score in scores.values()):
        raise ValueError(f"every {criterion!r} score is zero: the calibration loss gave the scored weights no gradient "
                         "(are all labels -100, or is the loss NaN or constant?); check the batches' labels / loss_fn")
    return scores


def _hook(criterion: str, score: torch.Tensor):
    def accumulate(weight: torch.Tensor) -> None:
        _accumulate(criterion, score, weight, weight.grad)
        weight.grad = None  # freed as we go: never more than one gradient alive per weight

    return accumulate


def _run_batches(model: nn.Module, batches: Iterable[dict], loss_fn: Optional[LossFn],
                 num_batches: Optional[int]) -> int:
    seen = 0
    # islice: a shared iterator loses no batch beyond the num_batches scored
    for index, batch in enumerate(itertools.islice(batches, num_batches)):
        with torch.enable_grad():
            _batch_loss(model, batch, loss_fn, index).backward()
        seen += 1
    if seen == 0:
        raise ValueError("calibration_batches is empty; pass at least one batch of model inputs with labels")
    return seen


# --- selection ---------------------------------------------------------------------------------------------
def unit_scores(score: torch.Tensor, granularity: str) -> torch.Tensor:
    """One score per selectable unit, flat: entries (element), mean per output row (row), or the mean (module)."""
    if granularity == "element":
        return score.flatten()
    if granularity == "row":
        return score.mean(dim=1)  # (out,)
    return score.mean().reshape(1)


def top_k(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Indices (ascending) of exactly the ``k`` highest scores across ``scores``.

    Ties at the cut are broken by position: earlier tensor first, then lower flat index. No concatenation of
    the full scores: the k-th value is found among each tensor's own top k.
    """
    candidates = torch.cat([s.topk(min(k, s.numel())).values for s in scores])
    cut = candidates.topk(k).values[-1]  # the k-th largest score
    need = k - sum(int((s > cut).sum()) for s in scores)
    chosen = []
    for s in scores:
        ties = (s == cut).nonzero().flatten()[:need]
        need -= ties.numel()
        chosen.append(torch.cat([(s > cut).nonzero().flatten(), ties]).sort().values)
    return chosen


def check_finite(scores: list[torch.Tensor]) -> None:
    """Refuse scores with NaN/inf, which no ranking can order."""
    for s in scores:
        if not torch.isfinite(s).all():
            raise ValueError("importance scores contain NaN/inf (the calibration loss diverged); check the batches")


def select(scores: list[torch.Tensor], budget: Optional[float], threshold: Optional[float],
           ranking: str, widths: Optional[list[int]] = None) -> list[torch.Tensor]:
    """Selected unit indices per tensor: the top ``budget`` fraction (global or per tensor), or above ``threshold``.

    ``widths``: the parameters each unit of a tensor holds (a row: the weight's in_features; a module: its size).
    Ranked globally, units of different widths are taken best first until they hold the budget's fraction of
    the parameters, not a fraction of the units (which a few wide modules or many narrow ones would miss).
    """
    check_finite(scores)
    if threshold is not None:
        chosen = [(s > threshold).nonzero().flatten() for s in scores]
        if not any(c.numel() for c in chosen):
            best = max(float(s.max()) for s in scores)
            raise ValueError(f"threshold {threshold} selects nothing (the highest score is {best:.6g}); lower it")
        return chosen
    if ranking == "per_module":  # every named module trains: at least its best unit (as global ranking keeps one)
        chosen = [_top_in(s, max(1, round(budget * s.numel()))) for s in scores]
    elif widths is not None and len(set(widths)) > 1:
        chosen = _top_by_size(scores, widths, budget)
    else:
        k = round(budget * sum(s.numel() for s in scores))
        chosen = top_k(scores, k) if k else []
    if not any(c.numel() for c in chosen):
        total = sum(s.numel() for s in scores)
        raise ValueError(f"budget {budget} of {total} units selects nothing; raise the budget (or use a finer "
                         "granularity)")
    return chosen


def _top_by_size(scores: list[torch.Tensor], widths: list[int], budget: float) -> list[torch.Tensor]:
    """Indices per tensor of the units taken in score order while they fit in ``budget`` of all the parameters
    (take_by_size); at least the best unit."""
    total = sum(s.numel() * w for s, w in zip(scores, widths))
    return take_by_size(scores, widths, round(budget * total), at_least_one=True)[0]


def take_by_size(values: list[torch.Tensor], widths: list[int], limit: int,
                 at_least_one: bool = False) -> tuple[list[torch.Tensor], int]:
    """Per tensor, the indices of the units taken best first (ties: earlier tensor, then lower index), each one that
    still fits in ``limit`` parameters (a unit of tensor i holds widths[i]); a unit too wide for what is left is
    passed over for narrower ones after it; -inf units are never taken. With ``at_least_one``, the best unit where
    none fits. Also the parameters taken."""
    flat = torch.cat([v.flatten().float().cpu() for v in values])
    owner = torch.cat([torch.full((v.numel(),), i, dtype=torch.long) for i, v in enumerate(values)])
    size = torch.tensor(widths, dtype=torch.long)[owner]
    order = torch.sort(flat, descending=True, stable=True).indices
    order = order[flat[order] > float("-inf")]
    spent = size[order].cumsum(0)
    take = int((spent <= limit).sum())  # the best units that fit one after another
    if at_least_one and take == 0 and order.numel():
        take = 1
    picked = torch.zeros(flat.numel(), dtype=torch.bool)
    picked[order[:take]] = True
    used = int(spent[take - 1]) if take else 0
    narrowest = min(widths)
    for unit in order[take:].tolist():  # then whatever still fits, best first
        if limit - used < narrowest:
            break
        if used + int(size[unit]) <= limit:
            picked[unit] = True
            used += int(size[unit])
    starts = [0]
    for v in values:
        starts.append(starts[-1] + v.numel())
    return [picked[starts[i]:starts[i + 1]].nonzero().flatten() for i in range(len(values))], used


def _top_in(score: torch.Tensor, k: int) -> torch.Tensor:
    return top_k([score], k)[0] if k else score.new_zeros(0, dtype=torch.long)


# --- module ranking: target_modules="auto" for the layer methods ------------------------------------------
def module_importance(model: nn.Module, weights: dict[str, nn.Parameter], criterion: str,
                      batches: Optional[Iterable[dict]], loss_fn: Optional[LossFn] = None) -> dict[str, float]:
    """Mean importance of each module's weight (the per-entry scores of ``score_weights``, averaged)."""
    scores = score_weights(model, weights, criterion, batches, loss_fn)
    return {name: float(scores.pop(name).mean()) for name in list(scores)}  # frees each buffer once reduced


def top_modules(importance: dict[str, float], budget: Union[int, float]) -> list[str]:
    """The ``budget`` most important names (an int count, or a fraction, at least one), in their given order.

    Ties are broken by order, as in ``top_k``.
    """
    names = list(importance)
    k = budget if isinstance(budget, int) else max(1, round(budget * len(names)))
    chosen = top_k([torch.tensor([importance[n] for n in names], dtype=torch.float64)], min(k, len(names)))[0]
    return [names[i] for i in chosen.tolist()]


def choose_auto_targets(model: nn.Module, config, batches: Optional[Iterable[dict]],
                        loss_fn: Optional[LossFn]) -> list[str]:
    """Replace ``target_modules="auto"`` by the exact full names of the most important linear layers.

    Candidates are the layers "all-linear" would name (the output head left out), narrowed by exclude_modules /
    layers_to_transform. Ranked by the mean score per weight entry: a sum would favour big modules, while an
    adapter's cost grows with in + out, not in x out. The full names go into the config, so the saved adapter
    reloads (in peftkit or PEFT) without data.
    """
    if config.auto_criterion != "magnitude" and batches is None:
        raise ValueError(f"target_modules='auto' ranks modules by {config.auto_criterion!r} importance on data: pass "
                         "calibration_batches=[{'input_ids': ..., 'labels': ...}, ...] to get_peft_model (or set "
                         "auto_criterion='magnitude', which needs none)")
    config.target_modules = expand_all_linear(model, config.task_type, (nn.Module,))
    try:
        candidates = find_targets(model, config)
        weights = {name: _weight_of(model.get_submodule(name)) for name in candidates}
        importance = module_importance(model, weights, config.auto_criterion, batches, loss_fn)
    except Exception:
        config.target_modules = "auto"
        raise
    blocks = block_wrappers(model)
    config.target_modules = [plain_name(n, blocks) for n in top_modules(importance, config.auto_budget)]
    return config.target_modules


def _weight_of(module: nn.Module) -> nn.Parameter:
    return (module.base_layer if isinstance(module, AdapterLayer) else module).weight


class AutoTargetMethod(Method):
    """A layer method whose ``target_modules="auto"`` is resolved on calibration batches before ``inject``."""

    def calibrate(self, model: nn.Module, config, batches, loss_fn) -> None:
        """Choose the targets for "auto"; any other target_modules takes no calibration data."""
        if config.target_modules != "auto":
            super().calibrate(model, config, batches, loss_fn)
            return
        choose_auto_targets(model, config, batches, loss_fn)

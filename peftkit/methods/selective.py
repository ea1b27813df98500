"""Importance-based selective fine-tuning: score the weights, train only the most important ones, store them sparsely.

The weights of the target Linear layers are scored on calibration batches (see ``selective_scoring``), the
top ``budget`` fraction (or those above ``threshold``) is selected, and only the selection trains: per
module a sparse delta of ``selective_values`` at ``selective_indices`` (flat entry indices for
``granularity="element"``, output-row indices for ``"row"``; ``"module"`` trains the whole weight of the
selected modules and has no indices). Forward adds ``x @ delta^T``: for elements through a custom autograd
function that keeps no dense delta for backward, for rows as (..., r) outputs added at their positions, so
gradients and optimiser state are O(k). Values start at zero: the model is unchanged at initialisation.
Merging writes the values into the selected base entries and keeps the overwritten ones, so unmerging
is bit-exact. On disk the indices are gap-coded (``selective_codec``): ~1.3 bytes per entry at a 1% budget.
``selective_refine.refine`` re-selects during training; save_pretrained writes a selection report
(``selective_report``).
peftkit's own ``peft_type`` ``SELECTIVE`` (no peer library has this method).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import layer_key
from ..config import TargetSpec, TargetedConfig, register
from ..inject import (Method, adapter_layers, block_wrappers, every_bias, find_targets, plain_name, real_names,
                      refuse_held, replace_modules, resolve_target_modules, shared_parameters)
from ..layers import AdapterLayer, adapter_dtype, param_device, plain_frozen_linear, sole_active_adapter
from .lora_kernels import linear
from .selective_codec import SAVE_DTYPES, pack, unpack
from .selective_report import write_selection_report
from .selective_scoring import CRITERIA, LossFn, score_weights, select, unit_scores

RANKINGS = ("global", "per_module")
BIAS_MODES = ("none", "all")
GRANULARITIES = ("element", "row", "module")
DEFAULT_BUDGET = 0.01


@dataclass
class SelectiveConfig(TargetedConfig):
    """Selective fine-tuning settings; ``selected_counts`` is written when the selection is made."""

    target_modules: TargetSpec = "all-linear"  # what is scored; nn.Linear layers only
    criterion: str = "fisher"  # one of CRITERIA
    budget: Optional[float] = None  # fraction of scored units selected, in (0, 1]; 0.01 when threshold is unset
    threshold: Optional[float] = None  # instead of budget: select exactly the units scoring above it
    ranking: str = "global"  # "global": one ranking over all targets; "per_module": per module, at least one unit
    granularity: str = "element"  # unit selected: "element", "row" (output neuron) or "module"
    num_batches: Optional[int] = None  # calibration batches used for scoring; None: all given
    selected_counts: Optional[dict[str, int]] = None  # trainable values per module path, set at selection
    save_dtype: Optional[str] = None  # values written as "float16" / "bfloat16" (lossy, smaller); None: exact
    bias: str = "none"  # "all": every bias (LayerNorms' too) also trains in full and is saved, as LoRA's bias="all"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is None and self.threshold is None:
            self.budget = DEFAULT_BUDGET
        if self.target_modules == "auto":
            raise ValueError("SelectiveConfig scores every target itself: set target_modules='all-linear' (or names); "
                             "target_modules='auto' picks whole modules for LoraConfig / IA3Config")
        self._check_choice("criterion", CRITERIA)
        self._check_choice("ranking", RANKINGS)
        self._check_choice("granularity", GRANULARITIES)
        if self.budget is not None and self.threshold is not None:
            raise ValueError(f"set budget ({self.budget}) or threshold ({self.threshold}), not both: budget selects "
                             "the top fraction, threshold the units scoring above it")
        if self.budget is not None and not (isinstance(self.budget, (int, float)) and 0 < self.budget <= 1):
            raise ValueError(f"budget must be a fraction in (0, 1] of the scored units, got {self.budget!r}; "
                             "e.g. budget=0.01 trains 1%")
        if self.granularity == "module" and self.ranking == "per_module" and self.threshold is None:
            raise ValueError("ranking='per_module' with granularity='module' keeps all or nothing of each module; "
                             "use ranking='global' to pick the most important modules")
        if self.num_batches is not None and (not isinstance(self.num_batches, int) or self.num_batches < 1):
            raise ValueError(f"num_batches must be a positive integer or None (all batches), got {self.num_batches!r}")
        if self.save_dtype is not None and self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype must be None (exact) or one of {sorted(SAVE_DTYPES)}, got {self.save_dtype!r}")
        if self.selected_counts is not None:
            self.selected_counts = {str(k): int(v) for k, v in self.selected_counts.items()}
        self._check_choice("bias", BIAS_MODES)

    def _check_choice(self, name: str, allowed: tuple) -> None:
        if getattr(self, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")


class SelectiveLayer(AdapterLayer):
    """A Linear whose selected weight entries carry a trainable delta, one sparse delta per adapter."""

    peft_type = "SELECTIVE"
    adapter_attrs = ("selective_values", "selective_indices")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.selective_values = nn.ParameterDict()  # (k,) trainable
        self.selective_indices = nn.ParameterDict()  # (k,) flat entries or (rows,) output rows; int64, frozen
        self.granularity: dict[str, str] = {}
        self._kept: dict[str, torch.Tensor] = {}  # base entries overwritten by merge, restored by unmerge

    def create_adapter(self, name: str, config: SelectiveConfig, module_name: str) -> None:
        """Adapter ``name`` with the selection stashed by the method, or sized from ``selected_counts`` (loading)."""
        weight = self.base_layer.weight
        _refuse_noncontiguous(module_name, weight)  # also where a saved adapter loads (no scoring ran)
        device, granularity = param_device(self.base_layer), config.granularity
        chosen = getattr(config, "_selection", {}).get(module_name)
        count = config.selected_counts[module_name]
        if chosen is None:  # loading: the checkpoint fills the indices; distinct placeholders until then
            units = count // weight.shape[1] if granularity == "row" else count
            chosen = torch.arange(units, device=device)
        self.granularity[name] = granularity
        self.selective_values[name] = nn.Parameter(torch.zeros(count, dtype=adapter_dtype(weight), device=device))
        if granularity != "module":
            self.selective_indices[name] = nn.Parameter(chosen.to(device=device, dtype=torch.long), requires_grad=False)

    def delta_weight(self, name: str) -> torch.Tensor:
        """The dense delta (out, in), built from the k values (differentiable in them)."""
        values, shape = self.selective_values[name], self.base_layer.weight.shape
        granularity = self.granularity[name]
        if granularity == "module":
            return values.view(shape)
        if granularity == "row":  # rows (r, in) at their output positions
            return values.new_zeros(shape).index_copy(0, self.selective_indices[name], values.view(-1, shape[1]))
        return _scatter(values, self.selective_indices[name], shape)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = None if args or kwargs else self._fusable(x)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        return _FusedScatteredLinear.apply(x, base.weight, base.bias, self.selective_values[name],
                                           self.selective_indices[name], self.granularity[name] == "row")

    def _fusable(self, x: torch.Tensor) -> Optional[str]:
        # training one element- or row-granular adapter on a frozen float32 nn.Linear on the CPU: base + delta in one
        # GEMM. Full float32 GEMMs only: W + delta rounded to bf16, or to TF32 on a GPU (or with a float32 matmul
        # precision below "highest"), would lose small deltas that the two separate products keep
        name = sole_active_adapter(self)
        if (name is None or self.granularity[name] == "module" or not plain_frozen_linear(self.base_layer, x)
                or x.device.type != "cpu" or x.dtype != torch.float32 or torch.get_float32_matmul_precision() != "highest"
                or self.selective_values[name].dtype != torch.float32 or not torch.is_grad_enabled()):
            return None
        return name

    def adapter_forward(self, name: str, x: torch.Tensor, result: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        values = self.selective_values[name]
        x = x.to(values.dtype)
        if self.granularity[name] == "row":  # only the selected rows: (..., r) added at their output positions
            rows = F.linear(x, values.view(-1, self.base_layer.weight.shape[1]))
            return result.index_add(-1, self.selective_indices[name], rows.to(result.dtype))
        if self.granularity[name] == "element":  # saves no dense delta for backward
            shape = tuple(self.base_layer.weight.shape)
            return result + _ScatteredLinear.apply(x, values, self.selective_indices[name], shape).to(result.dtype)
        return result + F.linear(x, values.view(self.base_layer.weight.shape)).to(result.dtype)  # (..., out)

    def _flat_positions(self, name: str) -> Optional[torch.Tensor]:
        # the flat weight entries this adapter touches, in the values' order; None: all of them
        granularity = self.granularity[name]
        if granularity == "module":
            return None
        index = self.selective_indices[name]
        if granularity == "element":
            return index
        width = self.base_layer.weight.shape[1]
        return (index[:, None] * width + torch.arange(width, device=index.device)).flatten()  # (rows * in,)

    def merge(self, names: list[str], safe: bool = False) -> None:
        """Add each adapter's values to its selected base entries; the old entries are kept for unmerge."""
        flat = self.weight_param.data.view(-1)
        for name in names:
            if name in self.merged_adapters or name not in self.adapter_names:
                continue
            positions = self._flat_positions(name)
            kept = (flat if positions is None else flat[positions]).clone()
            values = self.selective_values[name].detach()
            new = (kept.to(values.dtype) + values).to(flat.dtype)
            if safe and not torch.isfinite(new).all():
                raise ValueError(f"merging adapter {name!r} would put NaN/inf into the base weights; not merged")
            self._write(flat, positions, new)
            self._kept[name] = kept
            self._record_merge(name)

    def unmerge(self, names: Optional[list[str]] = None) -> None:
        """Put the kept base entries back, newest merge first: bit-identical to before merging.

        Unmerging some adapters undoes all, then merges the others again: kept entries of an older merge
        would otherwise wipe a newer adapter's delta where their selections overlap.
        """
        flat, merged = self.weight_param.data.view(-1), list(self.merged_adapters)
        for name in reversed(merged):
            # kept in a plain dict, which Module.to() does not move: to the weight's device and dtype now (exact
            # for a round trip to a wider dtype), and dropped only once written back
            kept = self._kept[name].to(device=flat.device, dtype=flat.dtype)
            self._write(flat, self._flat_positions(name), kept)
            del self._kept[name]
            self._record_unmerge(name)
        self.merge([n for n in merged if names is not None and n not in names])

    @staticmethod
    def _write(flat: torch.Tensor, positions: Optional[torch.Tensor], values: torch.Tensor) -> None:
        if positions is None:
            flat.copy_(values)
        else:
            flat[positions] = values

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.granularity.pop(name, None)


def _scatter(values: torch.Tensor, index: torch.Tensor, shape: tuple) -> torch.Tensor:
    # dense (out, in), zero but ``values`` at the flat positions ``index``
    return values.new_zeros(shape).view(-1).index_put((index,), values).view(shape)


class _ScatteredLinear(torch.autograd.Function):
    """``x @ delta^T`` for a delta that is zero but ``values`` at flat ``index``.

    Autograd through a scatter would keep the dense (out, in) delta alive until backward, a copy of the
    weight per layer; this saves only x (which the base layer keeps anyway), the k values and their indices,
    and rebuilds what backward needs. The gradient of the values is the selected entries of g^T x.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, shape: tuple) -> torch.Tensor:
        ctx.save_for_backward(x, values, index)
        ctx.shape = shape
        return F.linear(x, _scatter(values, index, shape))  # (..., out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, values, index = ctx.saved_tensors
        fast = not torch.is_grad_enabled()  # on only under create_graph=True: differentiable ops for a second order
        grad_x = grad_values = None
        # under autocast the forward ran in bf16/fp16, so grad arrives in that dtype while the values are float32:
        # g delta in grad's dtype (as the forward's product was), the values' gradient in their own
        if ctx.needs_input_grad[0]:
            grad_x = grad @ _scatter(values, index, ctx.shape).to(grad.dtype)  # (..., in)
        if ctx.needs_input_grad[1]:
            g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
            grad_values = _entry_grads(g2.to(values.dtype), x2.to(values.dtype), index, fast)
        return grad_x, grad_values, None, None


class _FusedScatteredLinear(torch.autograd.Function):
    """y = x (W + delta)^T + b for a frozen float32 W, delta zero but ``values`` at flat entries ``index``, or (``rows``)
    the (k, in) values at output rows ``index``.

    The plain path runs the base GEMM and a second product for the delta, and more in backward. Here W + delta is
    built transiently (a copy of W: a memory pass, not a GEMM), so forward is one GEMM and backward two (g (W +
    delta), and the values' gradient: the selected entries of g^T x, or for rows g[:, rows]^T x alone); nothing
    (out, in) is saved for backward. The GEMMs are peftkit's (oneDNN on CPUs where torch has it), as LoRA's are.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, values, index, rows):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        y = linear(x2, _with_delta(weight, values, index, rows), bias)  # (N, out)
        # the input itself, not its reshape (made here without a graph): a backward with a graph differentiates it
        ctx.save_for_backward(x, weight, values, index)
        ctx.x_shape, ctx.rows = x.shape, rows
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x, weight, values, index = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        # grad mode is on here only under create_graph=True: then differentiable ops (torch's GEMMs, an out-of-place
        # W + delta), so that gradients of these gradients (a gradient penalty, MAML) flow to x and the values
        fast = not torch.is_grad_enabled()
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            w = _with_delta(weight, values, index, ctx.rows, graph=not fast)
            grad_x = linear(g2, w.t(), fast=fast).view(ctx.x_shape)  # (..., in)
        if ctx.needs_input_grad[3]:
            grad_values = _row_grads(g2, x2, index, fast) if ctx.rows else _entry_grads(g2, x2, index, fast)
        grad_bias = g2.sum(0) if ctx.needs_input_grad[2] else None  # bias="all" trains it
        return grad_x, None, grad_bias, grad_values, None, None


def _entry_grads(g2: torch.Tensor, x2: torch.Tensor, index: torch.Tensor, fast: bool = True) -> torch.Tensor:
    # the selected flat entries of g^T x: (N, out), (N, in) -> (k,); the (out, in) product is transient
    return linear(g2.t(), x2.t(), fast=fast).reshape(-1)[index]


def _row_grads(g2: torch.Tensor, x2: torch.Tensor, rows: torch.Tensor, fast: bool = True) -> torch.Tensor:
    # the selected rows of g^T x, flat in the values' (rows, in) order: only those rows are computed
    return linear(g2.index_select(1, rows).t(), x2.t(), fast=fast).reshape(-1)


def _with_delta(weight: torch.Tensor, values: torch.Tensor, index: torch.Tensor, rows: bool = False,
                graph: bool = False) -> torch.Tensor:
    # a copy of W with the values added at their flat entries (or as whole rows), (out, in); with ``graph``, out of
    # place and differentiable in the values
    if graph:
        if rows:
            return weight.detach().index_add(0, index, values.view(-1, weight.shape[1]))
        return weight.detach().reshape(-1).index_add(0, index, values).view(weight.shape)
    if rows:
        return weight.detach().clone().index_add_(0, index, values.detach().view(-1, weight.shape[1]))
    return weight.detach().clone().view(-1).index_add_(0, index, values.detach()).view(weight.shape)


def _refuse_noncontiguous(name: str, weight: torch.Tensor) -> None:
    if not weight.is_contiguous():  # the delta is written through a flat view of the weight
        raise ValueError(f"target module {name!r} has a non-contiguous weight (strides {weight.stride()}, e.g. a "
                         "transposed or sliced tensor); selective fine-tuning writes into it flat. Give the module "
                         "a contiguous copy of its weight first, or leave it out of target_modules")


def _refuse_shared(model: nn.Module, weights: dict[str, nn.Parameter]) -> None:
    """Refuse a target whose weight another module shares (tied embeddings and output head): the delta would act
    in one module's forward but merge into both."""
    shared = shared_parameters(model)
    for name, weight in weights.items():
        others = [n for n in shared.get(id(weight), []) if n != name and not n.startswith(name + ".")]
        if others:
            raise ValueError(f"target module {name!r} shares its weight with {others[0]!r} (tied weights): a selective "
                             "delta would change both when merged. Leave it out of target_modules (exclude_modules), "
                             "or untie the weights first")


def _module_path(model: nn.Module, name: str) -> str:
    """``name``, or for a recorded path that went through a bottleneck adapter's wrapper (``mlp.base_layer.down_proj``,
    as adapters saved before plain names recorded them) on a model without that wrapper, the plain path; a clear
    error where neither names a module."""
    candidates = [name, re.sub(r"\.base_layer(?=\.)", "", name)]
    for path in candidates:
        try:
            model.get_submodule(path)
            return path
        except AttributeError:
            continue
    raise ValueError(f"the selection names module {name!r}, which this model does not have: was the adapter made on "
                     "another model?")


def _scored_weight(model: nn.Module, name: str) -> nn.Parameter:
    module = model.get_submodule(name)
    base = module.base_layer if isinstance(module, AdapterLayer) else module
    if not isinstance(base, nn.Linear):
        hint = (" GPT-2-style Conv1D layers (weights stored transposed) are not supported; use LoRA or IA3 there."
                if type(base).__name__ == "Conv1D" else " Name Linear layers in target_modules (e.g. 'q_proj').")
        raise ValueError(f"target module {name!r} is a {type(base).__name__}; selective fine-tuning scores nn.Linear "
                         f"weights only.{hint}")
    return base.weight


def _widths(weights: dict, names: list[str], granularity: str) -> list[int]:
    # parameters per selectable unit of each module: 1 (element), in_features (row), the weight's size (module)
    return [1 if granularity == "element" else weights[n].shape[1] if granularity == "row" else weights[n].numel()
            for n in names]


def _counts(chosen: torch.Tensor, weight: torch.Tensor, granularity: str) -> int:
    # trainable values of one module: entries, rows x in, or the whole weight
    if granularity == "module":
        return weight.numel() if chosen.numel() else 0
    return chosen.numel() * (weight.shape[1] if granularity == "row" else 1)


class SelectiveMethod(Method):
    """Scores and selects in ``calibrate`` (before anything is wrapped), wraps the selected modules in ``inject``."""

    config_cls = SelectiveConfig

    def calibrate(self, model: nn.Module, config: SelectiveConfig, batches: Optional[Iterable[dict]],
                  loss_fn: Optional[LossFn]) -> None:
        """Score the targets and stash the selection on ``config``; a config that holds one (loading) is kept."""
        if config.selected_counts is not None:
            if batches is not None or not getattr(config, "_from_saved", False):
                # only a saved adapter's values fill a recorded selection; anywhere else it would be placeholders
                raise ValueError("this SelectiveConfig already holds a selection (selected_counts), made on another "
                                 "model: load that adapter with PeftModel.from_pretrained, or set "
                                 "selected_counts=None to select again on this one")
            return
        resolve_target_modules(model, config, {}, "selective ", "'all-linear'")
        targets = find_targets(model, config)
        for name in targets:  # another method's layer: refused now, not after all the scoring
            module = model.get_submodule(name)
            if isinstance(module, AdapterLayer):
                refuse_held(module, name, config.peft_type)
        weights = {name: _scored_weight(model, name) for name in targets}
        for name, weight in weights.items():
            _refuse_noncontiguous(name, weight)
        _refuse_shared(model, weights)
        scores = score_weights(model, weights, config.criterion, batches, loss_fn, config.num_batches)
        names = list(scores)
        units = [unit_scores(scores.pop(name), config.granularity) for name in names]  # rows / modules: frees scores
        chosen = select(units, config.budget, config.threshold, config.ranking, _widths(weights, names, config.granularity))
        # keyed by plain names (inject.plain_name): the record fits a base without other adapters' wrappers too
        blocks = block_wrappers(model)
        selection = {n: c for n, c in zip(names, chosen) if c.numel()}
        config.selected_counts = {plain_name(n, blocks): _counts(c, weights[n], config.granularity)
                                  for n, c in selection.items()}
        config._selection = {plain_name(n, blocks): c for n, c in selection.items()}

    def inject(self, model: nn.Module, config: SelectiveConfig, adapter_name: str) -> list[str]:
        """Wrap the modules with a selection (``selected_counts``) for ``adapter_name``."""
        # recorded by plain name (by the real path in adapters saved before that: re-keyed, so both load)
        blocks = block_wrappers(model)
        real = real_names(model, blocks)
        targets = [_module_path(model, real.get(name, name)) for name in config.selected_counts]
        config.selected_counts = {plain_name(t, blocks): c for t, c in zip(targets, config.selected_counts.values())}
        for name in targets:
            _scored_weight(model, name)
        try:
            return replace_modules(model, config, adapter_name, _make_layer, targets, plain=True)
        finally:
            config.__dict__.pop("_selection", None)  # indices live in the layers now, not in the config

    def extra_tensors(self, model: nn.Module, config: SelectiveConfig, adapter_name: str) -> dict[str, torch.Tensor]:
        """With bias="all", every bias trains and is saved beside the sparse deltas (BitFit's parameters)."""
        return every_bias(model, adapter_name) if config.bias == "all" else {}

    def check_loaded(self, model: nn.Module, adapter_name: str, directory: str) -> None:
        """Loaded indices must be strictly increasing and inside the weight (rows or entries)."""
        for path, layer in adapter_layers(model):
            if isinstance(layer, SelectiveLayer) and adapter_name in layer.selective_indices:
                index = layer.selective_indices[adapter_name]
                weight = layer.base_layer.weight
                size = weight.shape[0] if layer.granularity[adapter_name] == "row" else weight.numel()
                if index.numel() and (index[0] < 0 or index[-1] >= size or (index[1:] <= index[:-1]).any()):
                    raise ValueError(f"adapter in {directory}: {path}.selective_indices must be strictly increasing "
                                     f"indices in [0, {size}); the file is corrupt or was saved for another model")

    def pack_tensors(self, model: nn.Module, config: SelectiveConfig, adapter_name: str,
                     tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Indices gap-coded or narrowed (exact); values cast only when ``config.save_dtype`` asks."""
        sizes = {}
        for path, layer in adapter_layers(model):
            if isinstance(layer, SelectiveLayer) and adapter_name in layer.selective_indices:
                weight = layer.base_layer.weight
                units = weight.shape[0] if layer.granularity[adapter_name] == "row" else weight.numel()
                sizes[layer_key(path, "selective_indices")] = units
        return pack(tensors, sizes, config.save_dtype)

    def unpack_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Indices back to int64 from any stored form (gap stream, int16/32, or the old int64)."""
        return unpack(tensors)

    def write_extras(self, model: nn.Module, config: SelectiveConfig, adapter_name: str, directory: str) -> None:
        """selection.md and selection.png (where matplotlib is installed) beside the adapter."""
        write_selection_report(model, adapter_name, directory, draw=None)


def _make_layer(module: nn.Module, name: str) -> SelectiveLayer:
    return SelectiveLayer(module)


register("SELECTIVE", SelectiveConfig, SelectiveMethod())

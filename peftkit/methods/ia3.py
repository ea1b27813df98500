"""(IA)^3 (Liu et al., 2022, Sec. 3.3): learned vectors that rescale inner activations.

A non-feedforward target (keys, values) computes l * (W x + b): its output is rescaled. A feedforward
target computes W (l * x) + b: its input is rescaled, the paper's l_ff applied to the hidden state after
the nonlinearity. The vectors start at 1, so the model is unchanged at initialisation. Layout as in
Hugging Face PEFT: ``ia3_l`` is (out, 1) for output scaling and (1, in) for input scaling of a Linear or
GPT-2 Conv1D, and (1, channels, 1, ...) for a Conv2d / Conv3d.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import TargetSpec, TargetedConfig, register
from ..inject import block_wrappers, find_targets, is_linear_like, plain_name, replace_modules, resolve_target_modules
from ..layers import AdapterLayer, MixedRows, adapter_dtype, current_rows, param_device
from .selective_scoring import AutoTargetMethod

logger = logging.getLogger("peftkit")

# PEFT's defaults (TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING), used when unset.
DEFAULT_TARGETS = {
    "t5": ["k", "v", "wo"], "mt5": ["k", "v", "wi_1"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"], "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"], "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"], "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"], "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"], "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"], "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"], "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"], "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"], "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"], "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"], "qwen3": ["q_proj", "v_proj", "down_proj"],
}
DEFAULT_FEEDFORWARD = {
    "t5": ["wo"], "mt5": [], "gpt2": ["mlp.c_proj"], "bloom": ["mlp.dense_4h_to_h"], "roberta": ["output.dense"],
    "opt": ["fc2"], "gptj": ["fc_out"], "gpt_neox": ["dense_4h_to_h"], "gpt_neo": ["c_proj"], "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"], "llama": ["down_proj"], "llama4": ["down_proj"], "mistral": ["down_proj"],
    "mixtral": ["w2"], "bert": ["output.dense"], "deberta-v2": ["output.dense"], "deberta": ["output.dense"],
    "falcon": ["dense_4h_to_h"], "phi": ["fc2"], "gemma": ["down_proj"], "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"], "qwen2": ["down_proj"], "qwen3": ["down_proj"],
}
_PEFT_LACKS = ("layers_to_transform", "layers_pattern")  # TargetedConfig fields PEFT's IA3Config does not have


@dataclass
class IA3Config(TargetedConfig):
    """(IA)^3 settings, field names as in Hugging Face PEFT."""

    feedforward_modules: TargetSpec = None  # targets whose input (not output) is scaled; a subset of target_modules
    fan_in_fan_out: bool = False  # kept for PEFT compatibility; GPT-2's Conv1D is detected by type
    init_ia3_weights: bool = True  # True: vectors start at 1 (model unchanged); False: random normal

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.feedforward_modules, (set, tuple)):
            self.feedforward_modules = sorted(self.feedforward_modules)
        elif self.feedforward_modules is not None and not isinstance(self.feedforward_modules, (str, list)):
            raise TypeError("feedforward_modules must be a list of names or a regex string, "
                            f"got {type(self.feedforward_modules).__name__}")
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        self.check_feedforward()

    def check_feedforward(self) -> None:
        """PEFT's check: with both given as lists, every feedforward name must also be a target name."""
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            stray = [f for f in self.feedforward_modules if f not in self.target_modules]
            if stray:
                raise ValueError(
                    f"feedforward_modules {stray} are not in target_modules {self.target_modules}: IA3 only scales "
                    "the input of a module it targets. Add them to target_modules or drop them from "
                    "feedforward_modules (an adapter_config.json written by PEFT with target_modules set and "
                    "feedforward_modules left to its default has this fault; PEFT cannot reload it either)."
                )

    def to_dict(self) -> dict:
        """As PeftConfig.to_dict, minus unset fields PEFT's IA3Config lacks (PEFT warns about them)."""
        data = super().to_dict()
        for name in _PEFT_LACKS:
            if data[name] is None:
                del data[name]
        return data


def _names_targeted(feedforward: str, targets: list[str]) -> bool:
    # a target name covers the feedforward name: "wo" / "wo", or the narrower "mlp.c_proj" / "c_proj"
    return any(feedforward == t or feedforward.endswith("." + t) for t in targets)


def is_feedforward(module_name: str, spec: TargetSpec) -> bool:
    """PEFT's rule: a regex string must match the whole name; a list entry need only END the name.

    A plain (undotted) suffix, so "o" also matches T5's "wo"; kept because it decides the shape and the
    meaning of a saved ``ia3_l``.
    """
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, module_name) is not None
    return any(module_name.endswith(f) for f in spec)


def _partial_only(module_name: str, spec: TargetSpec) -> bool:
    # feedforward only through PEFT's plain suffix rule ("o" matching "...wo"), worth a warning
    if not isinstance(spec, list) or not is_feedforward(module_name, spec):
        return False
    return not any(module_name == f or module_name.endswith("." + f) for f in spec)


class IA3Layer(AdapterLayer):
    """IA3 around nn.Linear, GPT-2's Conv1D (weight (in, out)) or nn.Conv2d / nn.Conv3d.

    Overrides forward and merge rather than providing adapter_forward / delta_weight: input scaling
    happens before the base layer, and merging multiplies the weight instead of adding to it.
    """

    peft_type = "IA3"
    adapter_attrs = ("ia3_l",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}  # per adapter: two adapters may treat one module differently
        # weight / bias slices of near-zero scales, saved at merge so unmerge is exact
        self._kept: dict[str, tuple] = {}
        self.is_conv = isinstance(base_layer, (nn.Conv2d, nn.Conv3d))
        # which weight axis holds the outputs and which the inputs: Conv1D stores (in, out)
        self.out_axis, self.in_axis = (1, 0) if transposed_weight(base_layer) else (0, 1)
        if self.is_conv:
            self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        else:
            shape = base_layer.weight.shape
            self.in_features, self.out_features = shape[self.in_axis], shape[self.out_axis]

    def create_adapter(self, name: str, config: IA3Config, module_name: str) -> None:
        feedforward = is_feedforward(module_name, config.feedforward_modules)
        if feedforward and self.is_conv and self.base_layer.groups != 1:
            raise ValueError(f"{module_name!r} is a grouped convolution; IA3 scales the input of convolutions with "
                             "groups=1 only. Leave it out of feedforward_modules.")
        size = self.in_features if feedforward else self.out_features
        if self.is_conv:
            shape = (1, size) + (1,) * (self.base_layer.weight.dim() - 2)  # (1, C, 1, 1[, 1])
        else:
            shape = (1, size) if feedforward else (size, 1)
        kwargs = {"device": param_device(self.base_layer), "dtype": adapter_dtype(self.base_layer.weight)}
        init = torch.ones(shape, **kwargs) if config.init_ia3_weights else torch.randn(shape, **kwargs)
        self.ia3_l[name] = nn.Parameter(init)
        self.feedforward[name] = feedforward

    def _activation_scale(self, names: list[str]) -> Optional[torch.Tensor]:
        # product of the vectors, shaped to broadcast over (..., features) or (batch, C, H, W)
        if not names:
            return None
        scale = self.ia3_l[names[0]]
        for name in names[1:]:
            scale = scale * self.ia3_l[name]
        tail = (1,) * (self.base_layer.weight.dim() - 2) if self.is_conv else ()
        return scale.reshape(-1, *tail)  # (features,) or (C, 1, 1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows = None if self.disabled else current_rows()
        if rows is not None:  # a mixed-adapter batch: each row's own vector
            return self._mixed_forward(x, rows, *args, **kwargs)
        live = [] if self.disabled else [n for n in self.active_adapters
                                         if n in self.ia3_l and n not in self.merged_adapters]
        into = self._activation_scale([n for n in live if self.feedforward[n]])
        out = self._activation_scale([n for n in live if not self.feedforward[n]])
        if into is not None:
            x = (x.to(into.dtype) * into).to(x.dtype)  # l_ff * hidden, (..., in)
        result = self.base_layer(x, *args, **kwargs)
        if out is not None:
            result = (result.to(out.dtype) * out).to(result.dtype)  # l * (W x + b), (..., out)
        return result

    def mixed_refusal(self, names: set[str]) -> Optional[str]:
        if self.is_conv and names & set(self.ia3_l):
            return "IA3 on convolutions does not support mixed-adapter batches"
        return None

    def _mixed_forward(self, x: torch.Tensor, rows: MixedRows, *args, **kwargs) -> torch.Tensor:
        # per-row vectors gathered from stacks whose slot 0 (the base, and adapters this layer lacks) is ones
        if x.shape[0] != len(rows.names):
            raise ValueError(f"adapter_names has {len(rows.names)} names but an IA3 layer sees a batch of "
                             f"{x.shape[0]} rows; pass one name per row")
        slots = tuple(self.ia3_l)
        idx = rows.index(slots, x.device)  # (batch,)
        into = self._row_scales(slots, idx, True, self.in_features, x.dim())  # (batch, 1.., in)
        x = (x.to(into.dtype) * into).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        out = self._row_scales(slots, idx, False, self.out_features, result.dim())  # (batch, 1.., out)
        return (result.to(out.dtype) * out).to(result.dtype)

    def _row_scales(self, slots: tuple, idx: torch.Tensor, feedforward: bool, size: int, ndim: int) -> torch.Tensor:
        ones = self.ia3_l[slots[0]].new_ones(size)
        stack = torch.stack([ones] + [self.ia3_l[n].flatten() if self.feedforward[n] == feedforward else ones
                                      for n in slots])  # (n + 1, size)
        return stack[idx].view(idx.shape[0], *([1] * (ndim - 2)), size)

    def _weight_scale(self, name: str) -> torch.Tensor:
        # the vector laid along the weight's input or output axis: (out, 1), (1, in), (1, out) for Conv1D, ...
        shape = [1] * self.base_layer.weight.dim()
        shape[self.in_axis if self.feedforward[name] else self.out_axis] = -1
        return self.ia3_l[name].reshape(shape)

    def merge(self, names: list[str], safe: bool = False) -> None:
        """Multiply each adapter's vector into the base weight (and, for output scaling, the bias)."""
        for name in names:
            if name in self.merged_adapters or name not in self.ia3_l:
                continue
            with torch.no_grad():
                self._merge_one(name, safe)
            self._record_merge(name)

    def _merge_one(self, name: str, safe: bool) -> None:
        # written through .data (see AdapterLayer.weight_writes): a backward pending over the weight still runs
        weight, bias = self.base_layer.weight.data, self._scaled_bias(name)
        bias = None if bias is None else bias.data
        scale = self._weight_scale(name)
        new_weight = (weight * scale).to(weight.dtype)
        new_bias = None if bias is None else (bias * self.ia3_l[name].flatten()).to(bias.dtype)
        if safe and not (torch.isfinite(new_weight).all() and (new_bias is None or torch.isfinite(new_bias).all())):
            raise ValueError(f"merging adapter {name!r} would put NaN/inf into the base weights; not merged")
        # scales too small to divide by again: keep the original slices so unmerge restores them exactly
        axis = self.in_axis if self.feedforward[name] else self.out_axis
        small = (self.ia3_l[name].flatten().abs() < torch.finfo(weight.dtype).eps).nonzero().flatten()
        if small.numel():
            kept_bias = None if bias is None else bias[small].clone()
            self._kept[name] = (small, weight.index_select(axis, small).clone(), kept_bias)
        weight.copy_(new_weight)
        if new_bias is not None:
            bias.copy_(new_bias)

    def _scaled_bias(self, name: str) -> Optional[torch.Tensor]:
        # output scaling rescales the bias too; input scaling leaves it alone
        return None if self.feedforward[name] else getattr(self.base_layer, "bias", None)

    def unmerge(self, names: Optional[list[str]] = None) -> None:
        """Divide merged vectors out again, newest first; near-zero entries come back from saved slices."""
        for name in reversed(list(self.merged_adapters)):
            if names is not None and name not in names:
                continue
            with torch.no_grad():
                self._unmerge_one(name)
            self._record_unmerge(name)

    def _unmerge_one(self, name: str) -> None:
        weight, bias = self.base_layer.weight.data, self._scaled_bias(name)
        bias = None if bias is None else bias.data
        small, kept_weight, kept_bias = self._kept.pop(name, (None, None, None))
        vector = self.ia3_l[name].flatten()
        safe_vector = vector if small is None else vector.index_fill(0, small, 1.0)  # no division by ~0
        weight.copy_((weight / safe_vector.reshape(self._weight_scale(name).shape)).to(weight.dtype))
        if bias is not None:
            bias.copy_((bias / safe_vector).to(bias.dtype))
        if small is not None:
            axis = self.in_axis if self.feedforward[name] else self.out_axis
            weight.index_copy_(axis, small, kept_weight)
            if bias is not None:
                bias.index_copy_(0, small, kept_bias)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.feedforward.pop(name, None)


def transposed_weight(module: nn.Module) -> bool:
    """True for GPT-2's Conv1D, whose weight is (in, out)."""
    return is_linear_like(module) and not isinstance(module, nn.Linear)


def _check_supported(module: nn.Module, name: str) -> None:
    if is_linear_like(module) or isinstance(module, (nn.Conv2d, nn.Conv3d)):
        return
    raise ValueError(
        f"target module {name!r} is a {type(module).__name__}; IA3 wraps Linear, GPT-2 Conv1D, Conv2d and Conv3d "
        "layers. Name those leaf layers in target_modules (e.g. 'k_proj', not 'self_attn')."
    )


def resolve_targets(model: nn.Module, config: IA3Config) -> None:
    """Fill unset target_modules / feedforward_modules with PEFT's per-model defaults; expand "all-linear"."""
    resolve_target_modules(model, config, DEFAULT_TARGETS, "IA3 ",
                           "['k_proj', 'v_proj', 'down_proj'] with feedforward_modules=['down_proj']")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if config.feedforward_modules is None:
        if model_type not in DEFAULT_FEEDFORWARD:
            raise ValueError(f"no default IA3 feedforward_modules for model type {model_type!r}; set "
                             "feedforward_modules to the targets whose input is scaled (e.g. ['down_proj']), "
                             "or to [] if every target should have its output scaled")
        defaults = DEFAULT_FEEDFORWARD[model_type]
        if isinstance(config.target_modules, list):
            # PEFT keeps every default and then fails its own subset check on reload. Keep the defaults a
            # target covers, listing a narrower one ("mlp.c_proj" under "c_proj") as a target too: same modules
            defaults = [f for f in defaults if _names_targeted(f, config.target_modules)]
            config.target_modules += [f for f in defaults if f not in config.target_modules]
        config.feedforward_modules = list(defaults)
    config.check_feedforward()


class IA3Method(AutoTargetMethod):
    """How IA3 enters a model: resolve targets, wrap them, nothing else to save."""

    config_cls = IA3Config

    def calibrate(self, model: nn.Module, config: IA3Config, batches, loss_fn) -> None:
        """``target_modules="auto"`` (see selective_scoring); feedforward_modules become the chosen full names
        that are feed-forward by the given or default spec, so PEFT's subset check holds."""
        auto = config.target_modules == "auto"
        super().calibrate(model, config, batches, loss_fn)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        spec = config.feedforward_modules if config.feedforward_modules is not None else DEFAULT_FEEDFORWARD.get(model_type)
        if auto and spec is not None:
            config.feedforward_modules = [n for n in config.target_modules if is_feedforward(n, spec)]

    def inject(self, model: nn.Module, config: IA3Config, adapter_name: str) -> list[str]:
        """Wrap the targets of ``config`` with IA3 layers for ``adapter_name``."""
        resolve_targets(model, config)
        targets = find_targets(model, config)
        for name in targets:
            module = model.get_submodule(name)
            _check_supported(module.base_layer if isinstance(module, AdapterLayer) else module, name)
        blocks = block_wrappers(model)
        partial = [n for n in targets if _partial_only(plain_name(n, blocks), config.feedforward_modules)]
        if partial:
            logger.warning("feedforward_modules %s match %s only as the end of a longer name; those get their "
                           "input scaled, as in PEFT. Use dotted names to be exact.",
                           config.feedforward_modules, partial[:3])
        wrapped = replace_modules(model, config, adapter_name, _make_layer, targets, plain=True)
        if config.layers_to_transform is not None:
            _record_layers(config, [plain_name(n, blocks) for n in targets])
        return wrapped


def _record_layers(config: IA3Config, names: list[str]) -> None:
    """Save the modules layers_to_transform chose as full names, with no layer filter: PEFT's IA3 has none (it
    adapted every layer of a saved adapter and filled the layers not in the file with its init)."""
    spec = config.feedforward_modules
    config.feedforward_modules = [n for n in names if spec is not None and is_feedforward(n, spec)]
    config.target_modules = names
    config.layers_to_transform = config.layers_pattern = None


def _make_layer(module: nn.Module, name: str) -> IA3Layer:
    return IA3Layer(module)


register("IA3", IA3Config, IA3Method())

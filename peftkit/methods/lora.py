"""LoRA (Hu et al., 2021), with rsLoRA scaling (Kalajdzievski, 2023) and DoRA (Liu et al., 2024).

W' = W + s * B @ A with A: (r, in), B: (out, r), s = alpha / r (rsLoRA: alpha / sqrt(r)). B starts at
zero, so the model is unchanged at initialisation.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TargetedConfig, register
from ..inject import (DEFAULT_TARGETS, every_bias, find_targets, is_linear_like, refuse_held, replace_modules,
                      resolve_target_modules)
from ..layers import (AdapterLayer, MixedRows, adapter_dtype, param_device, param_of, plain_frozen_linear,
                      shared_dropout, sole_active_adapter)
from . import lora_mixed
from .lora_kernels import FusedDoraLinear, FusedLoraLinear, compute_factors, linear
from .selective_scoring import AutoTargetMethod

BIAS_MODES = ("none", "all", "lora_only")
INIT_CHOICES = (True, False, "gaussian", "orthogonal", "eva")


@dataclass
class LoraConfig(TargetedConfig):
    """LoRA hyperparameters, field names as in Hugging Face PEFT."""

    r: int = 8  # rank of the update
    lora_alpha: float = 8  # the update is scaled by lora_alpha / r (or / sqrt(r) with rsLoRA)
    lora_dropout: float = 0.0  # dropout on the adapter's input
    fan_in_fan_out: bool = False  # kept for PEFT compatibility; GPT-2's Conv1D is detected by type
    bias: str = "none"  # "none" | "all" (train every bias) | "lora_only" (biases of adapted layers)
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    use_dora: bool = False  # weight-decomposed LoRA: a trained magnitude per output feature
    # True: Kaiming A, zero B; "gaussian": N(0, 1/r) A; "orthogonal": BA = 0 from orthogonal rows; False: random B.
    # "eva" (data-driven A, from PEFT) is taken only by loading a saved adapter, whose A and B are plain LoRA
    init_lora_weights: Union[bool, str] = True
    rank_pattern: dict = field(default_factory=dict)  # {regex of module name: rank}
    alpha_pattern: dict = field(default_factory=dict)  # {regex of module name: alpha}

    def __post_init__(self) -> None:
        super().__post_init__()
        if (isinstance(self.target_modules, str) and self.target_modules not in ("all-linear", "auto")
                and (self.layers_to_transform is not None or self.layers_pattern is not None)):
            # PEFT refuses this LoRA config (and would ignore the layers if it did not): the saved adapter must load there
            raise ValueError("layers_to_transform / layers_pattern narrow a list of target_modules, not a regex string "
                             "(PEFT refuses such a LoRA config too); put the layer indices into the regex, e.g. "
                             r"r'.*\.layers\.(0|1)\.self_attn\.q_proj', or list the module names")
        bad_ranks = {k: r for k, r in {"r": self.r, **{f"rank_pattern[{k!r}]": v for k, v in self.rank_pattern.items()}}
                     .items() if not isinstance(r, int) or isinstance(r, bool) or r <= 0}
        if bad_ranks:
            raise ValueError(f"LoRA rank must be a positive integer: {', '.join(f'{k}={r!r}' for k, r in bad_ranks.items())}")
        bad = {k: a for k, a in self.alpha_pattern.items()
               if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a)}
        if bad:
            raise ValueError(f"alpha_pattern values must be finite numbers, got {bad}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init_lora_weights not in INIT_CHOICES:
            raise ValueError(f"init_lora_weights must be one of {INIT_CHOICES}, got {self.init_lora_weights!r} (PEFT's "
                             "pissa / olora / corda / loftq / lora_ga rewrite the base weights: not supported)")

    def rank_for(self, module_name: str) -> int:
        """Rank of ``module_name``: rank_pattern's first matching key, else r."""
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        """Alpha of ``module_name``: alpha_pattern's first matching key, else lora_alpha."""
        return _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    def scaling_for(self, module_name: str) -> float:
        """The factor s in W + s B A."""
        r = self.rank_for(module_name)
        return self.alpha_for(module_name) / (math.sqrt(r) if self.use_rslora else r)


def _pattern_value(pattern: dict, module_name: str, default):
    # PEFT's rule: key matches the whole name or a dotted suffix of it
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


class LoraLayer(AdapterLayer):
    """State shared by every LoRA layer kind: ranks, scalings, dropout."""

    peft_type = "LORA"
    adapter_attrs = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for attr in self.adapter_attrs:  # lora_A, lora_B (+ DoRA's lora_magnitude_vector)
            setattr(self, attr, nn.ParameterDict())
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}

    @property
    def A(self) -> nn.ParameterDict:
        """Per-adapter down-projections (``lora_A``; ``lora_embedding_A`` for embeddings)."""
        return getattr(self, self.adapter_attrs[0])

    @property
    def r(self) -> dict[str, int]:
        """Each adapter's rank (PEFT's attribute), as its A holds it: a new dict per read (writing it changes no rank)."""
        return {name: a.shape[0] for name, a in self.A.items()}

    @property
    def B(self) -> nn.ParameterDict:
        """Per-adapter up-projections."""
        return getattr(self, self.adapter_attrs[1])

    def create_adapter(self, name: str, config: LoraConfig, module_name: str) -> None:
        if config.use_dora and not self.supports_dora:
            raise ValueError(f"use_dora is supported on Linear and Conv1D layers; {module_name!r} is a "
                             f"{type(self.base_layer).__name__}. Exclude it or turn DoRA off.")
        if config.use_dora and self.base_layer.weight.device.type == "meta":
            raise ValueError(f"use_dora needs {module_name!r}'s weight in memory (DoRA's magnitude is the row norm of "
                             "W + sBA, and W runs outside the offload hook), but it is offloaded (on 'meta'). Load the "
                             "base without CPU / disk offload for DoRA, or use LoRA.")
        r = config.rank_for(module_name)
        weight = self.base_layer.weight
        a_shape, b_shape = self.lora_shapes(r)
        kwargs = {"device": param_device(self.base_layer), "dtype": adapter_dtype(weight)}
        self.A[name] = nn.Parameter(torch.empty(a_shape, **kwargs))
        self.B[name] = nn.Parameter(torch.empty(b_shape, **kwargs))
        self.scaling[name] = config.scaling_for(module_name)
        self.dropout[name] = config.lora_dropout
        if config.init_lora_weights == "eva" and not getattr(config, "_from_saved", False):
            raise ValueError("init_lora_weights='eva' initialises A from activations on data, which peftkit does not "
                             "do; a saved EVA adapter loads with PeftModel.from_pretrained. For a new adapter use "
                             "True, 'gaussian' or 'orthogonal'")
        self.reset(name, config.init_lora_weights, r)
        if config.use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(self.dora_norm(name).to(kwargs["dtype"]))

    supports_dora = False

    def reset(self, name: str, init: Union[bool, str], r: int) -> None:
        """Initialise A and B as PEFT does (BA = 0 unless init is False)."""
        a, b = self.A[name], self.B[name]
        with torch.no_grad():
            if init == "orthogonal":
                _orthogonal_init(a, b, r)
                return
            if init == "gaussian":
                nn.init.normal_(a, std=1 / r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if init is False:
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            else:
                nn.init.zeros_(b)

    def dropped(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's input after its dropout (shared with sibling layers reading the same x)."""
        p = self.dropout[name]
        return shared_dropout(x, p) if p > 0 and self.training else x

    def lora_shapes(self, r: int) -> tuple[tuple, tuple]:
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.scaling.pop(name, None)
        self.dropout.pop(name, None)


class LoraLinear(LoraLayer):
    """LoRA for nn.Linear and GPT-2's Conv1D (weight stored as (in, out))."""

    supports_dora = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.transposed = not isinstance(base_layer, nn.Linear)  # Conv1D
        out_f, in_f = self.base_weight().shape
        self.in_features, self.out_features = in_f, out_f
        self._weight_sq: Optional[tuple] = None
        self._dora_merged_norm: dict[str, torch.Tensor] = {}  # a merged DoRA adapter's row norms over W0 + sBA

    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in), a view of the live tensor."""
        w = self.base_layer.weight
        return w.t() if self.transposed else w

    def pure_weight(self) -> torch.Tensor:
        """The base weight W0 without merged adapters, (out, in): the live weight's view when nothing is merged.

        Every merge adds a delta relative to W0, as the forward applies adapters: a plain one s B A, a DoRA one
        (g - 1) W0 + g s B A with g = m / ||W0 + s B A|| (the norms kept at merge). So the live W = c W0 + D row-wise,
        c = 1 + sum of the merged DoRA (g - 1), D the rest, and W0 = (W - D) / c."""
        w = self.base_weight()
        if not self.merged_adapters:
            return w
        with torch.no_grad():
            c = torch.ones(self.out_features, dtype=torch.float32, device=w.device)
            rest = w.float()  # a new tensor (or a copy, for float32: sub below is out of place)
            for name in self.merged_adapters:
                ba = self.scaling[name] * (self.lora_B[name] @ self.lora_A[name]).float()  # (out, in)
                if name in self._dora_merged_norm:  # (a plain dict: model.to() leaves it where the merge ran)
                    g = self.lora_magnitude_vector[name].float() / self._dora_merged_norm[name].to(w.device)
                    c += g - 1
                    ba = g[:, None] * ba
                rest = rest - ba
            return (rest / c[:, None]).to(w.dtype)

    def lora_shapes(self, r: int) -> tuple[tuple, tuple]:
        return (r, self.in_features), (self.out_features, r)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = None if args or kwargs else self._fusable(x)
        if name is None:
            return super().forward(x, *args, **kwargs)
        # this runs once per layer and call, and a GPU step is launch-bound: the submodules' dicts are read directly
        # (param_of), as nn.Module.__getattr__ and ParameterDict.__getitem__ cost about a microsecond each
        modules, s = self._modules, self.scaling[name]
        base = modules["base_layer"]
        weight, bias = param_of(base, "weight"), param_of(base, "bias")
        a, b = param_of(modules["lora_A"], name), param_of(modules["lora_B"], name)
        fast = torch.is_grad_enabled()  # oneDNN GEMMs under grad mode (lora_kernels.linear); no_grad: torch's own
        m = param_of(modules["lora_magnitude_vector"], name)
        if m is not None:
            return FusedDoraLinear.apply(x, weight, bias, a, b, m, self.dora_norm(name), s, fast)
        p = self.dropout[name] if self.training else 0.0
        return FusedLoraLinear.apply(x, shared_dropout(x, p) if p > 0 else None, weight, bias, a, b, s, fast)

    def _fusable(self, x: torch.Tensor) -> Optional[str]:
        # the fused kernel serves the common training case: one plain LoRA on a frozen, hook-free nn.Linear (autocast
        # casts per op, which the plain path's ops let it do)
        name, modules = sole_active_adapter(self), self._modules
        if name is None or not plain_frozen_linear(modules["base_layer"], x):
            return None
        if (name in modules["lora_magnitude_vector"] and self.dropout[name] > 0 and self.training
                or param_of(modules["lora_A"], name).dtype not in (x.dtype, torch.float32)):
            return None
        return name

    def adapter_forward(self, name: str, x: torch.Tensor, result: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        (a, b), s = compute_factors(self.lora_A[name], self.lora_B[name], x), self.scaling[name]
        xd = self.dropped(name, x).to(a.dtype)
        h = F.linear(xd, a)  # (..., r)
        if name in self.lora_magnitude_vector:
            return self._dora_forward(name, x, xd, h, b, result, base_out)
        if result.dtype != a.dtype:
            return result + (F.linear(h, b) * s).to(result.dtype)
        # one fused kernel: result + s * h @ B^T  -> (..., out)
        out = torch.addmm(result.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), b.t(), alpha=s)
        return out.view(result.shape)

    def mixed_refusal(self, names: set[str]) -> Optional[str]:
        held = names & set(self.lora_A)
        if self.training and any(self.dropout[n] > 0 for n in held):
            return "mixed-adapter batches run without LoRA dropout; call model.eval() (or use lora_dropout=0)"
        return None

    def mixed_forward(self, x: torch.Tensor, result: torch.Tensor, rows: MixedRows) -> torch.Tensor:
        return lora_mixed.mixed_forward(self, x, result, rows)

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]  # (out, in)
        return delta.t() if self.transposed else delta

    # --- DoRA, Liu et al. 2024, Eq. 5; the norm is a constant in backprop (Sec. 4.3) ----------
    def dora_norm(self, name: str) -> torch.Tensor:
        """Row norms of W + s B A, (out,), computed without forming the (out, in) matrix."""
        fast = torch.is_grad_enabled()  # under grad mode: oneDNN for W A^T (lora_kernels.linear)
        with torch.no_grad():
            a = self.lora_A[name].float()
            b = self.lora_B[name].float()
            s = self.scaling[name]
            w = self.pure_weight()  # over the base alone, also beside merged adapters, as the forward applies them
            wa = linear(w, a.to(w.dtype), fast=fast, out_dtype=torch.float32)  # (out, r)
            # ||W_o + s B_o A||^2 = ||W_o||^2 + b_o . (2s W_o A^T + s^2 B_o A A^T): few kernels, as on a GPU
            # each of these small products costs a launch
            cross = torch.addmm(wa, b, a @ a.t(), beta=2 * s, alpha=s * s)  # (out, r)
            sq = torch.baddbmm(self._row_sq().view(-1, 1, 1), b.unsqueeze(1), cross.unsqueeze(2)).view(-1)
            return sq.clamp_min_(0).sqrt_()

    def _row_sq(self) -> torch.Tensor:
        # ||W_o||^2 per row, cached until the base weight changes: an in-place write, a new tensor, or a merge (written
        # through .data, which leaves the version counter alone: counted in weight_writes)
        w = self.base_layer.weight
        key = (w.data_ptr(), w._version, self.weight_writes)
        if self._weight_sq is None or self._weight_sq[0] != key:
            self._weight_sq = (key, self.pure_weight().float().pow(2).sum(1))
        return self._weight_sq[1]

    def _dora_forward(self, name, x, xd, h, b, result, base_out):
        # out = result - W xd + m/||W + sBA|| * (W xd + s B A xd)   (PEFT's form, also with dropout)
        mag = (self.lora_magnitude_vector[name] / self.dora_norm(name)).to(h.dtype)
        bias = self.base_layer.bias
        alone = xd is x and result is base_out and not self.merged_adapters  # base_out is then W0 x + bias
        if alone:
            wx = base_out - bias if bias is not None else base_out
        else:
            wx = F.linear(xd.to(base_out.dtype), self.pure_weight())
        t = torch.addmm(wx.reshape(-1, self.out_features).to(h.dtype), h.reshape(-1, h.shape[-1]),
                        b.t(), alpha=self.scaling[name]).view(wx.shape)
        if alone:
            out = t * mag
            return (out + bias if bias is not None else out).to(result.dtype)
        return result + (t * mag - wx).to(result.dtype)

    def merge(self, names: list[str], safe: bool = False) -> None:
        """Add each adapter's delta relative to the base weight alone (pure_weight), as the forward applies them
        together: in any order, over any earlier merges, two DoRA adapters included."""
        for name in names:
            if name not in self.lora_magnitude_vector:
                super().merge([name], safe)
            elif name not in self.merged_adapters:
                self._dora_merge(name, safe)

    def _dora_delta(self, name: str, norm: torch.Tensor) -> torch.Tensor:
        """DoRA's merged delta (g - 1) W0 + g s B A, g = m / norm, (out, in) in float32."""
        g = (self.lora_magnitude_vector[name].float() / norm.to(self.lora_magnitude_vector[name].device))[:, None]
        ba = self.scaling[name] * (self.lora_B[name] @ self.lora_A[name]).float()
        return (g - 1) * self.pure_weight().float() + g * ba

    def _dora_merge(self, name: str, safe: bool) -> None:
        with torch.no_grad():
            norm = self.dora_norm(name)
            w = self.base_weight()
            new = w.float() + self._dora_delta(name, norm)
            if safe and not torch.isfinite(new).all():
                raise ValueError(f"merging adapter {name!r} would put NaN/inf into the base weights; not merged")
            self._dora_merged_norm[name] = norm
            w.data.copy_(new.to(w.dtype))  # .data: see AdapterLayer.weight_writes
        self._record_merge(name)

    def unmerge(self, names: Optional[list[str]] = None) -> None:
        """Subtract merged deltas again, newest first (each relative to the base alone, so in any order)."""
        for name in reversed(list(self.merged_adapters)):
            if names is None or name in names:
                self._unmerge_one(name)

    def _unmerge_one(self, name: str) -> None:
        if name not in self.lora_magnitude_vector:
            super().unmerge([name])
            return
        with torch.no_grad():
            w = self.base_weight()
            old = w.float() - self._dora_delta(name, self._dora_merged_norm[name])  # W0 while name is still merged
            w.data.copy_(old.to(w.dtype))
        del self._dora_merged_norm[name]
        self._record_unmerge(name)


class LoraEmbedding(LoraLayer):
    """LoRA for nn.Embedding; PEFT's layout: A (r, num_embeddings), B (embedding_dim, r)."""

    adapter_attrs = ("lora_embedding_A", "lora_embedding_B")

    def lora_shapes(self, r: int) -> tuple[tuple, tuple]:
        num, dim = self.base_layer.weight.shape
        return (r, num), (dim, r)

    def reset(self, name: str, init: Union[bool, str], r: int) -> None:
        # reversed w.r.t. Linear: A = 0, B random keeps the output unchanged
        with torch.no_grad():
            nn.init.zeros_(self.A[name]) if init is not False else nn.init.normal_(self.A[name])
            nn.init.normal_(self.B[name])

    def adapter_forward(self, name: str, x: torch.Tensor, result: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        h = F.embedding(x, self.A[name].t(), base.padding_idx, base.max_norm, base.norm_type,
                        base.scale_grad_by_freq, base.sparse)  # (..., r)
        return result + (h @ self.B[name].t() * self.scaling[name]).to(result.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        return (self.B[name] @ self.A[name]).t() * self.scaling[name]  # (num, dim)


class LoraConv(LoraLayer):
    """LoRA for nn.Conv1d / nn.Conv2d: A is a conv with the base's kernel, B a 1x1 conv (PEFT's layout)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        # model code reads the conv's geometry off the module (Whisper's encoder: conv1.stride[0])
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, attr, getattr(base_layer, attr))

    def lora_shapes(self, r: int) -> tuple[tuple, tuple]:
        base = self.base_layer
        ones = (1,) * len(base.kernel_size)
        return (r, base.in_channels, *base.kernel_size), (base.out_channels, r, *ones)

    def adapter_forward(self, name: str, x: torch.Tensor, result: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        conv = F.conv1d if isinstance(self.base_layer, nn.Conv1d) else F.conv2d
        xd = self.dropped(name, x).to(self.A[name].dtype)
        h = self.base_layer._conv_forward(xd, self.A[name], None)  # base stride / padding / padding_mode
        return result + (conv(h, self.B[name]) * self.scaling[name]).to(result.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        b = self.B[name].flatten(1)  # (out, r)
        return torch.einsum("or,ri...->oi...", b, self.A[name]) * self.scaling[name]


def _layer_class(module: nn.Module, name: str) -> type:
    if is_linear_like(module):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1 or any(d != 1 for d in module.dilation):
            raise ValueError(f"target {name!r}: LoRA supports convolutions with groups=1 and dilation=1 only")
        return LoraConv
    raise ValueError(
        f"target module {name!r} is a {type(module).__name__}; LoRA wraps Linear, Embedding, Conv1d, Conv2d and "
        "GPT-2 Conv1D layers. Name those leaf layers in target_modules (e.g. 'q_proj', not 'self_attn')."
    )


class LoraMethod(AutoTargetMethod):  # target_modules="auto": see selective_scoring
    """How LoRA enters a model: resolve targets, wrap them, name the extra trainable tensors."""

    config_cls = LoraConfig

    def inject(self, model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
        """Wrap the targets of ``config`` with LoRA layers for ``adapter_name``."""
        resolve_target_modules(model, config, DEFAULT_TARGETS, "",
                               "target_modules='all-linear' or a list such as ['q_proj', 'v_proj']")
        targets = find_targets(model, config)
        modules = [model.get_submodule(name) for name in targets]
        for name, module in zip(targets, modules):
            if isinstance(module, AdapterLayer) and not isinstance(module, LoraLayer):
                refuse_held(module, name, config.peft_type)  # e.g. a bottleneck adapter wraps BERT's dense itself
            _layer_class(module.base_layer if isinstance(module, LoraLayer) else module, name)
        if any(type(m).__name__ == "Conv1D" for m in modules):
            config.fan_in_fan_out = True  # as PEFT records it for GPT-2, so its loader does not warn
        return replace_modules(model, config, adapter_name, _make_layer, targets, plain=True)

    def extra_tensors(self, model: nn.Module, config: LoraConfig, adapter_name: str) -> dict[str, torch.Tensor]:
        """Biases trained and saved with the adapter, by their paths in the model."""
        if config.bias == "none":
            return {}
        if config.bias == "all":
            return every_bias(model, adapter_name)
        out = {}
        for mod_name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in module.scaling:
                bias = getattr(module.base_layer, "bias", None)
                if isinstance(bias, nn.Parameter):
                    out[f"{mod_name}.base_layer.bias"] = bias
        return out


def _make_layer(module: nn.Module, name: str) -> LoraLayer:
    return _layer_class(module, name)(module)


register("LORA", LoraConfig, LoraMethod())


def _orthogonal_init(a: torch.Tensor, b: torch.Tensor, r: int) -> None:
    """PEFT's "orthogonal" init (https://datta0.github.io/posts/rethink-lora-init/): the rows of one random
    orthogonal r x r matrix Q split into odd and even; A = (G_in Q_odd)^T / 10, B = G_out Q_even / 10 for Gaussian
    G, so B A = G_out Q_even Q_odd^T G_in^T / 100 = 0 while neither factor is zero."""
    if r % 2:
        raise ValueError(f"init_lora_weights='orthogonal' needs an even rank, got r={r}")
    q, _ = torch.linalg.qr(torch.randn(r, r))
    a_flat, b_flat = a.view(r, -1), b.view(b.shape[0], r)
    a_flat.copy_((torch.randn(a_flat.shape[1], r // 2) @ q[0::2]).T / 10.0)
    b_flat.copy_(torch.randn(b_flat.shape[0], r // 2) @ q[1::2] / 10.0)

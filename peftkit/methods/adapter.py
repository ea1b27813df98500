"""Bottleneck adapters: Houlsby et al. (2019), Pfeiffer et al. (2020), and parallel adapters (He et al., 2022).

An adapter is f(v) = W_up act(W_down v + b_down) + b_up, with W_down: (bottleneck, in), W_up: (out, bottleneck).
  sequential (Houlsby Sec. 2.1 / Fig. 2; Pfeiffer):  h' = h + s * f(h),  h = block(x)
  parallel (He et al. 2022, Sec. 3.3):               h' = block(x) + s * f(x)
"houlsby" adapts the attention block's and the feed-forward block's outputs, "pfeiffer" the feed-forward
block's only, before the residual add (and, in post-LN BERT, before the LayerNorm). W_up and b_up start
at zero, so the model is unchanged at initialisation. The nonlinearity means no weight update equals an
adapter: it cannot be merged. peft_type "BOTTLENECK" is peftkit's own (Hugging Face PEFT has no such method).
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TargetSpec, TargetedConfig, register
from ..inject import Method, find_targets, is_linear_like, replace_modules
from ..layers import AdapterLayer, adapter_dtype

ADAPTER_TYPES = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
DEFAULT_REDUCTION = 16  # AdapterHub's default, used when neither size field is set

# model_type -> (attention block, feed-forward block): the modules whose OUTPUT is adapted, before the
# residual add. BERT's blocks are not single modules; Houlsby's BERT adapter sits after each block's
# output projection, before the residual add + LayerNorm, so those projections are the hook points
# (Houlsby's code applies it after the dropout that follows the projection: the same at eval time).
_BERT_SITES = (["attention.output.dense"], r".*\.layer\.\d+\.output\.dense")
DEFAULT_SITES = {
    "llama": (["self_attn"], ["mlp"]), "mistral": (["self_attn"], ["mlp"]), "qwen2": (["self_attn"], ["mlp"]),
    "qwen3": (["self_attn"], ["mlp"]), "gpt2": (["attn"], ["mlp"]),
    "t5": (["SelfAttention"], ["DenseReluDense"]), "mt5": (["SelfAttention"], ["DenseReluDense"]),
    "bert": _BERT_SITES, "roberta": _BERT_SITES, "vit": (["attention"], ["mlp"]),
}
# A parallel adapter needs one module that takes the feed-forward block's input and returns its output.
# BERT splits the block over `intermediate` and `output` (which also adds the residual): there is none.
_NO_PARALLEL_DEFAULT = {"bert", "roberta"}


def _number(value, integer: bool = False) -> bool:
    kinds = (int,) if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value, integer: bool = False) -> bool:
    return _number(value, integer) and value > 0


def _as_spec(name: str, value):
    # the same forms as target_modules: a list of names / dotted suffixes, or a full-match regex string
    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    if value is not None and not isinstance(value, (str, list)):
        raise TypeError(f"{name} must be a list of module names or a regex string, got {type(value).__name__}")
    return value


@dataclass
class AdapterConfig(TargetedConfig):
    """Bottleneck adapter hyperparameters; placement by ``adapter_type``, hook points by module name."""

    adapter_type: str = "houlsby"  # "houlsby" (attention + FFN), "pfeiffer" (FFN only), "parallel" (beside the FFN)
    reduction_factor: Optional[float] = None  # bottleneck = width // reduction_factor; 16 if no size is given
    bottleneck_size: Optional[int] = None  # the bottleneck width itself; set this or reduction_factor, not both
    non_linearity: str = "relu"  # "relu" | "gelu" | "silu" | "tanh"
    scaling: float = 1.0  # s multiplying the adapter's output (He et al. use 4 for the parallel adapter)
    attn_modules: TargetSpec = None  # houlsby: attention blocks (None: the model type's default); parallel: optional
    ffn_modules: TargetSpec = None  # feed-forward blocks; None: the model type's default

    def __post_init__(self) -> None:
        super().__post_init__()
        self.attn_modules = _as_spec("attn_modules", self.attn_modules)
        self.ffn_modules = _as_spec("ffn_modules", self.ffn_modules)
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"adapter_type must be one of {ADAPTER_TYPES}, got {self.adapter_type!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity must be one of {sorted(ACTIVATIONS)}, got {self.non_linearity!r}")
        if self.target_modules is not None:
            raise ValueError("AdapterConfig places adapters with attn_modules / ffn_modules, not target_modules; "
                             "leave target_modules unset")
        if self.adapter_type == "pfeiffer" and self.attn_modules is not None:
            raise ValueError("adapter_type='pfeiffer' adapts the feed-forward block only; drop attn_modules, "
                             "or use adapter_type='houlsby' to adapt the attention block too")
        if not _number(self.scaling):
            raise ValueError(f"scaling must be a finite number, got {self.scaling!r}")
        self._check_size()

    def _check_size(self) -> None:
        if self.reduction_factor is not None and self.bottleneck_size is not None:
            raise ValueError(f"set reduction_factor or bottleneck_size, not both (got reduction_factor="
                             f"{self.reduction_factor}, bottleneck_size={self.bottleneck_size})")
        if self.bottleneck_size is not None and not _positive(self.bottleneck_size, integer=True):
            raise ValueError(f"bottleneck_size must be a positive integer, got {self.bottleneck_size!r}")
        if self.reduction_factor is not None and not _positive(self.reduction_factor):
            raise ValueError(f"reduction_factor must be a positive number, got {self.reduction_factor!r}")
        if self.bottleneck_size is None and self.reduction_factor is None:
            self.reduction_factor = DEFAULT_REDUCTION

    def size_for(self, width: int) -> int:
        """The bottleneck width of an adapter on a stream ``width`` wide."""
        return self.bottleneck_size or max(1, int(width // self.reduction_factor))


def block_widths(block: nn.Module, name: str) -> tuple[int, int]:
    """(input width, output width) of a block: its first linear layer's input, its last one's output."""
    linears = [m for m in block.modules() if is_linear_like(m)]
    if not linears:
        raise ValueError(f"hook point {name!r} is a {type(block).__name__} without linear layers, so its width is "
                         "unknown; name a block that holds linear layers (e.g. 'mlp', 'self_attn') or a linear layer")
    first, last = linears[0], linears[-1]
    # nn.Linear weight is (out, in); GPT-2's Conv1D stores (in, out)
    in_w = first.weight.shape[1] if isinstance(first, nn.Linear) else first.weight.shape[0]
    out_w = last.weight.shape[0] if isinstance(last, nn.Linear) else last.weight.shape[1]
    return in_w, out_w


class BottleneckLayer(AdapterLayer):
    """Wraps a block (or a linear layer) and adds each active adapter to its output (the first element of a tuple)."""

    peft_type = "BOTTLENECK"
    adapter_attrs = ("adapter_down", "adapter_up")
    wraps_block = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adapter_down = nn.ModuleDict()  # adapter name -> Linear(in, bottleneck)
        self.adapter_up = nn.ModuleDict()  # adapter name -> Linear(bottleneck, out), zero at init
        self.scaling: dict[str, float] = {}
        self.non_linearity: dict[str, str] = {}
        self.parallel: dict[str, bool] = {}
        self.module_name = ""

    def create_adapter(self, name: str, config: AdapterConfig, module_name: str) -> None:
        in_w, out_w = block_widths(self.base_layer, module_name)
        parallel = config.adapter_type == "parallel"
        size = config.size_for(out_w)
        ref = next(self.base_layer.parameters())
        kwargs = {"device": ref.device, "dtype": adapter_dtype(ref)}
        # a sequential adapter reads the block's output (out wide), a parallel one its input (in wide)
        self.adapter_down[name] = nn.Linear(in_w if parallel else out_w, size, **kwargs)
        self.adapter_up[name] = nn.Linear(size, out_w, **kwargs)
        nn.init.zeros_(self.adapter_up[name].weight)
        nn.init.zeros_(self.adapter_up[name].bias)
        self.scaling[name] = float(config.scaling)
        self.non_linearity[name] = config.non_linearity
        self.parallel[name] = parallel
        self.module_name = module_name

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """``adapter_down.weight``, ``adapter_down.bias``, ``adapter_up.weight``, ``adapter_up.bias``."""
        out = {}
        for attr in self.adapter_attrs:
            holder = getattr(self, attr)
            if name in holder:
                out.update({f"{attr}.{p}": t for p, t in holder[name].named_parameters()})
        return out

    def mixed_refusal(self, names: set[str]) -> Optional[str]:
        """A bottleneck adapter runs on every row of a batch: refused when a row names it, and when one is active at
        all (it would run on the base model's rows and other adapters' rows too)."""
        held = sorted(names & set(self.adapter_names)) or ([] if self.disabled else list(self.active_adapters))
        if held:
            return (f"bottleneck adapter {held[0]!r} runs on every row; mixed-adapter batches support LoRA / DoRA "
                    "adapters. Activate a LoRA adapter (set_adapter) or run the batch per adapter")
        return None

    def forward(self, *args, **kwargs):
        # the block's own signature passes through untouched (Llama calls self_attn with keywords only)
        out = self.base_layer(*args, **kwargs)
        names = [] if self.disabled else self.active_adapters
        if not names:
            return out
        hidden = out[0] if isinstance(out, tuple) else out  # attention blocks return (hidden, weights, ...)
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(f"bottleneck adapter on {self.module_name!r}: the block returned a "
                            f"{type(hidden).__name__}; adapters need a tensor or a tuple that starts with one")
        x = self._block_input(args, kwargs) if any(self.parallel[n] for n in names) else None
        base_out = hidden
        for name in names:
            hidden = self.adapter_forward(name, x, hidden, base_out)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    def _block_input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        x = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"parallel adapter on {self.module_name!r}: the block's input must be its first "
                            "positional argument or hidden_states=; adapt another block or use a sequential adapter")
        return x

    def adapter_forward(self, name: str, x: torch.Tensor, result: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        down, up = self.adapter_down[name], self.adapter_up[name]
        source = x if self.parallel[name] else result  # parallel: the block's input; sequential: its output
        h = ACTIVATIONS[self.non_linearity[name]](down(source.to(down.weight.dtype)))  # (..., bottleneck)
        return result + (up(h) * self.scaling[name]).to(result.dtype)  # (..., out)

    def merge(self, names: list[str], safe: bool = False) -> None:
        """Refuse: act(.) between the projections leaves no weight update equal to the adapter."""
        held = [n for n in names if n in self.adapter_names]
        if held:
            raise ValueError(f"bottleneck adapter {held[0]!r} cannot be merged into the base weights: its "
                             "nonlinearity has no equivalent weight update. Use unload() to remove it, or keep "
                             "the PeftModel for inference.")

    def unmerge(self, names: Optional[list[str]] = None) -> None:
        """Nothing is ever merged."""

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for per_adapter in (self.scaling, self.non_linearity, self.parallel):
            per_adapter.pop(name, None)


def resolve_sites(model: nn.Module, config: AdapterConfig) -> None:
    """Fill unset ``attn_modules`` / ``ffn_modules`` with the model type's defaults (saved with the adapter)."""
    wants_attn = config.adapter_type == "houlsby" and config.attn_modules is None
    if not wants_attn and config.ffn_modules is not None:
        return
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_SITES:
        raise ValueError(f"no default hook points for model type {model_type!r}; set ffn_modules (and attn_modules "
                         "for houlsby) to the blocks whose output to adapt, e.g. AdapterConfig(attn_modules="
                         "['self_attn'], ffn_modules=['mlp'])")
    if config.adapter_type == "parallel" and config.ffn_modules is None and model_type in _NO_PARALLEL_DEFAULT:
        raise ValueError(f"model type {model_type!r} has no default ffn_modules for adapter_type='parallel': its "
                         "feed-forward block spans 'intermediate' and 'output', and no single module takes the "
                         "block's input and returns its output. Use 'houlsby' or 'pfeiffer', or set ffn_modules "
                         r"yourself (e.g. r'.*\.layer\.\d+\.output\.dense', beside the FFN's output projection).")
    attn, ffn = DEFAULT_SITES[model_type]
    if wants_attn:
        config.attn_modules = list(attn) if isinstance(attn, list) else attn
    if config.ffn_modules is None:
        config.ffn_modules = list(ffn) if isinstance(ffn, list) else ffn


def hook_points(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules to wrap; an error if a site matches nothing, or sites overlap or nest."""
    found = {}
    for field_name in ("attn_modules", "ffn_modules"):
        spec = getattr(config, field_name)
        if spec is None:
            continue
        probe = SimpleNamespace(target_modules=spec, exclude_modules=config.exclude_modules,
                                layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern)
        try:
            found[field_name] = find_targets(model, probe)
        except ValueError:
            raise _missing_site(model, field_name, spec) from None
    names = [n for group in found.values() for n in group]
    both = sorted(set(found.get("attn_modules", ())) & set(found.get("ffn_modules", ())))
    if both:
        raise ValueError(f"module {both[0]!r} matches both attn_modules and ffn_modules; make one of them more "
                         "specific (a dotted suffix such as 'attention.output.dense', or a regex)")
    for outer in names:
        inner = next((n for n in names if n.startswith(outer + ".")), None)
        if inner:
            raise ValueError(f"hook points nest: {outer!r} contains {inner!r}; name the block or its part, not both")
    return names


def _missing_site(model: nn.Module, field_name: str, spec) -> ValueError:
    # suggest among block names (modules with children), which find_targets' leaf-only hint leaves out
    blocks = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if n and not n.rsplit(".", 1)[-1].isdigit() and any(True for _ in m.children())})
    close = difflib.get_close_matches(str(spec if isinstance(spec, str) else spec[0]), blocks, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ValueError(f"bottleneck adapter hook point {field_name}={spec!r} matches no module of this "
                      f"{type(model).__name__}; {hint}Set {field_name} to the blocks whose output to adapt "
                      f"(blocks here: {', '.join(blocks[:8])}{', ...' if len(blocks) > 8 else ''})")


class AdapterMethod(Method):
    """How bottleneck adapters enter a model: resolve the hook points, wrap them."""

    config_cls = AdapterConfig
    mergeable = False  # PeftModel.merge_adapter refuses before touching any weight

    def inject(self, model: nn.Module, config: AdapterConfig, adapter_name: str) -> list[str]:
        """Wrap the hook points of ``config`` with bottleneck layers for ``adapter_name``."""
        resolve_sites(model, config)
        targets = hook_points(model, config)
        for name in targets:  # check every width before the first swap
            module = model.get_submodule(name)
            block_widths(module.base_layer if isinstance(module, AdapterLayer) else module, name)
        return replace_modules(model, config, adapter_name, _make_layer, targets)


def _make_layer(module: nn.Module, name: str) -> BottleneckLayer:
    return BottleneckLayer(module)


register("BOTTLENECK", AdapterConfig, AdapterMethod())

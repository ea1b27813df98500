"""AdapterLayer: the one base class that owns the active / disabled / merged state of a wrapped module."""
from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from typing import ClassVar, Iterator, Optional, Sequence

import torch
from torch import nn


def param_device(module: nn.Module) -> torch.device:
    """Where a module's adapter tensors belong: an offloaded (meta) weight runs on its hook's execution device."""
    weight = module.weight
    if weight.device.type != "meta":
        return weight.device
    hook = getattr(module, "_hf_hook", None)
    return torch.device(getattr(hook, "execution_device", None) or "cpu")


def checkpointing(model: nn.Module) -> bool:
    """Whether transformers' gradient (activation) checkpointing is on for ``model``."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the newer name first (no warning)
        if name in dir(type(model)):
            return bool(getattr(model, name))
    return False


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters of a low-precision or quantised base are kept in float32, as in PEFT."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


class AdapterLayer(nn.Module):
    """Wraps ``base_layer`` and keeps each adapter's tensors in dicts keyed by adapter name.

    A method implements ``create_adapter``, ``adapter_forward`` (the delta applied to the base output)
    and ``delta_weight`` (what merging adds to the base weight). Everything else lives here once.
    """

    # Attributes holding per-adapter tensors (ParameterDict / ModuleDict keyed by adapter name).
    adapter_attrs: ClassVar[tuple[str, ...]] = ()
    # a wrapper of a whole block (bottleneck adapters) rather than of one layer: other adapters may target the
    # layers inside its base_layer
    wraps_block: ClassVar[bool] = False
    peft_type: ClassVar[str] = ""  # the method that owns this wrapper

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # merges / unmerges so far. They write the base weight through .data, as PEFT does, so that a backward
        # pending over it still runs (e.g. a reference pass under disable_adapter() before backward, as in DPO);
        # that leaves the weight's version counter alone, so caches derived from the weight key on this count
        self.weight_writes = 0

    # --- what a method provides -------------------------------------------------------------
    def create_adapter(self, name: str, config, module_name: str) -> None:
        raise NotImplementedError

    def adapter_forward(self, name: str, x: torch.Tensor, result: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """``result`` plus this adapter's effect; ``base_out`` is the base layer's own output."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def mixed_refusal(self, names: set[str]) -> Optional[str]:
        """Why this layer cannot serve a mixed batch using ``names`` (None: it can).

        The default serves rows whose adapters this layer does not hold (they see the base output).
        """
        held = sorted(names & set(self.adapter_names))
        if held:
            return f"{type(self).__name__} does not support mixed-adapter batches (adapter {held[0]!r})"
        return None

    def mixed_forward(self, x: torch.Tensor, result: torch.Tensor, rows: "MixedRows") -> torch.Tensor:
        """The output for a mixed batch; by default the base output (mixed_refusal vetted the names)."""
        return result

    # --- shared state logic -----------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds, in insertion order."""
        return list(getattr(self, self.adapter_attrs[0]).keys())

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """This adapter's tensors keyed by attribute name (``lora_A``), adapter name left out."""
        out = {}
        for attr in self.adapter_attrs:
            holder = getattr(self, attr)
            if name in holder:
                value = holder[name]
                out[attr] = value if isinstance(value, torch.Tensor) else value.weight
        return out

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base_out = result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        rows = current_rows()
        if rows is not None:  # a mixed-adapter batch: each row's own adapter, not the active ones
            return self.mixed_forward(x, result, rows)
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                result = self.adapter_forward(name, x, result, base_out)
        return result

    def set_active(self, names: list[str]) -> None:
        """Make ``names`` (those this layer holds) the active adapters."""
        self.active_adapters = [n for n in names if n in self.adapter_names]

    def delete_adapter(self, name: str) -> None:
        """Drop one adapter's tensors; unmerge it first if merged."""
        if name in self.merged_adapters:
            self.unmerge([name])
        for attr in self.adapter_attrs:
            holder = getattr(self, attr)
            if name in holder:
                del holder[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    # PEFT's tuner-layer attributes, for scripts that walk the layers
    def get_base_layer(self) -> nn.Module:
        """The wrapped module (PEFT's name)."""
        return self.base_layer

    @property
    def merged(self) -> bool:
        """Whether any adapter is merged into the base weight (PEFT's name)."""
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        """Whether the adapters are switched off (PEFT's name for ``disabled``)."""
        return self.disabled

    @property
    def weight_param(self) -> nn.Parameter:
        """The base weight that merging writes into."""
        return self.base_layer.weight

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight: model code reads it off the wrapped module (T5: ``self.wo.weight.dtype``)."""
        return self.base_layer.weight

    def merge(self, names: list[str], safe: bool = False) -> None:
        """Add each adapter's delta to the base weight (skipping ones already merged)."""
        weight = self.weight_param
        for name in names:
            if name in self.merged_adapters or name not in self.adapter_names:
                continue
            with torch.no_grad():
                delta = self.delta_weight(name).to(weight.dtype)
                if safe and not torch.isfinite(weight + delta).all():
                    raise ValueError(f"merging adapter {name!r} would put NaN/inf into the base weights; not merged")
                weight.data += delta  # .data: see weight_writes
            self._record_merge(name)

    def unmerge(self, names: list[str] | None = None) -> None:
        """Subtract merged deltas again, newest first."""
        weight = self.weight_param
        for name in reversed(list(self.merged_adapters)):
            if names is None or name in names:
                with torch.no_grad():
                    weight.data -= self.delta_weight(name).to(weight.dtype)
                self._record_unmerge(name)

    def _record_merge(self, name: str) -> None:
        """Book a merge of ``name`` just written into the base weight (every method's merge ends here)."""
        self.weight_writes += 1
        self.merged_adapters.append(name)

    def _record_unmerge(self, name: str) -> None:
        """Book an unmerge of ``name`` just written into the base weight."""
        self.weight_writes += 1
        self.merged_adapters.remove(name)


class ModulesToSaveWrapper(AdapterLayer):
    """A module trained in full per adapter (e.g. a fresh classification head); the original stays intact."""

    adapter_attrs = ("modules_to_save",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()

    def create_adapter(self, name: str, config=None, module_name: str = "") -> None:
        copy_ = copy.deepcopy(self.base_layer)
        for param in copy_.parameters():
            param.requires_grad_(True)
        self.modules_to_save[name] = copy_

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.modules_to_save[name].state_dict(keep_vars=True)) if name in self.modules_to_save else {}

    def forward(self, *args, **kwargs):
        rows = None if self.disabled else current_rows()
        if rows is not None and set(rows.names) & set(self.modules_to_save):
            return self._mixed_forward(rows, *args, **kwargs)
        # The first active adapter that owns a copy decides; with none, the original module runs.
        if not self.disabled and rows is None:
            for name in self.active_adapters:
                return self.modules_to_save[name](*args, **kwargs)
        return self.base_layer(*args, **kwargs)

    def mixed_refusal(self, names: set[str]) -> Optional[str]:
        if names & set(self.modules_to_save) and type(self.base_layer) is not nn.Linear:
            return f"mixed-adapter batches support nn.Linear heads in modules_to_save, not {type(self.base_layer).__name__}"
        return None

    def _mixed_forward(self, rows: "MixedRows", x: torch.Tensor) -> torch.Tensor:
        # each row through its adapter's copy of a Linear head: weights stacked (slot 0: the original), one bmm
        if x.shape[0] != len(rows.names):
            raise ValueError(f"adapter_names has {len(rows.names)} names for a head input of {x.shape[0]} rows")
        slots = tuple(self.modules_to_save)
        heads = [self.base_layer] + [self.modules_to_save[n] for n in slots]
        idx = rows.index(slots, x.device)  # (batch,)
        weight = torch.stack([h.weight for h in heads])[idx]  # (batch, out, in)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (batch, seq, in)
        out = torch.bmm(x3, weight.transpose(1, 2))  # (batch, seq, out)
        if self.base_layer.bias is not None:
            out = out + torch.stack([h.bias for h in heads])[idx][:, None, :]
        return out.view(*x.shape[:-1], out.shape[-1])

    def merge(self, names: list[str], safe: bool = False) -> None:
        """Nothing to merge: the trained copy replaces the original when unloading."""

    def unmerge(self, names: list[str] | None = None) -> None:
        """Nothing to unmerge."""

    def unwrapped(self, merge: bool) -> nn.Module:
        """The module to put back: the active trained copy when merging, else the original."""
        if merge and self.active_adapters:
            return self.modules_to_save[self.active_adapters[0]]
        return self.base_layer


# --- when a fused training kernel may stand in for the layer's plain path ---------------------------------------
def sole_active_adapter(layer: AdapterLayer) -> Optional[str]:
    """The one active, unmerged adapter of ``layer`` outside a mixed batch, else None."""
    if layer.disabled or len(layer.active_adapters) != 1 or layer.merged_adapters or current_rows() is not None:
        return None
    return layer.active_adapters[0]


def param_of(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """``module.<name>``, None where it has none: read from ``_parameters`` first, as nn.Module.__getattr__ costs about
    a microsecond, paid per layer and call on the forward's hot path (a GPU step is launch-bound). A tensor moved
    out of ``_parameters`` (torch.nn.utils.parametrize, prune, a plain attribute) comes through getattr."""
    params = module._parameters
    if name in params:
        return params[name]
    return getattr(module, name, None)


def plain_frozen_linear(base: nn.Module, x: torch.Tensor) -> bool:
    """True for a frozen, hook-free nn.Linear of ``x``'s dtype outside autocast: what the fused kernels compute."""
    if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks or "_hf_hook" in base.__dict__:
        return False
    weight = param_of(base, "weight")
    return not weight.requires_grad and x.dtype == weight.dtype and not torch.is_autocast_enabled(x.device.type)


# --- dropout shared by layers that read the same input (q/k/v, gate/up) -------------------------
_shared = threading.local()


def new_forward_pass() -> None:
    """Start a new forward pass: dropout masks are never reused across passes."""
    if torch.compiler.is_compiling():  # traced, the counter becomes a guard and torch.compile recompiles every call
        return
    _shared.last = None  # the previous pass's dropped activation (and the graph behind it) is let go
    _shared.step = getattr(_shared, "step", 0) + 1


def shared_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout of ``x`` that reuses the last mask when the same tensor is dropped again in one pass.

    q/k/v (and gate/up) read one hidden state; one mask for all of them saves two mask draws and two
    (batch, seq, in) activations per block, and is the same regulariser.

    The dropped tensor is held strongly, so sharing never depends on whether a layer kept the tensor object
    itself or only a view of it (the fused kernel saves a reshape); it is saved for backward anyway. It is let
    go at the next dropout, the next pass (PeftModel's forward and generate), or when its backward runs, so a
    caller that feeds one long-lived tensor to the layers without PeftModel still gets a new mask per step.
    (Left: such a caller whose tensor needs no gradient, with no other dropout in between, reuses the mask;
    call ``new_forward_pass()`` per step there.) The input is held weakly.

    Not shared (each call draws its own mask) while torch.compile traces, whose guards cannot follow this cache
    (a traced layer was handed another layer's dropped input), nor for an inference tensor (one made under
    torch.inference_mode), which has no version counter to key the cache on."""
    if torch.compiler.is_compiling() or x.is_inference():
        return _Dropout.apply(x, p, None)
    step = getattr(_shared, "step", 0)
    last = getattr(_shared, "last", None)
    if last is not None and last[0]() is x and last[1] == (p, step, x._version):
        return last[2]
    token = object()
    out = _Dropout.apply(x, p, token)
    _shared.last = (weakref.ref(x), (p, step, x._version), out, token)
    return out


def _forget_dropped(token: object) -> None:
    last = getattr(_shared, "last", None)
    if last is not None and last[3] is token:
        _shared.last = None


_SCATTER_MAX_P = 0.2  # above this, k ~ n * -ln(1 - p) index draws cost more than _lane_mask's n / 4


def _scatters(x: torch.Tensor, p: float) -> bool:
    """Whether dropout on ``x`` draws dropped positions (CPU, small p) rather than a per-element mask."""
    return x.device.type == "cpu" and 0.0 < p <= _SCATTER_MAX_P


def _native_dropout(x: torch.Tensor) -> bool:
    """Whether dropout on ``x`` runs torch's own fused kernel (off the CPU: on a GPU it draws the mask and scales in
    one pass, where _lane_mask's draw, compare and two multiplies are four launches and three times the traffic),
    and while torch.compile traces (drop_positions' count is data-dependent: a graph break)."""
    return x.device.type != "cpu" or torch.compiler.is_compiling()  # traced: no data-dependent draw sizes


def drop_positions(x: torch.Tensor, p: float) -> torch.Tensor:
    """Flat int64 indices into ``x`` (repeats possible) such that each element is among them, independently,
    with probability exactly p.

    Poisson splitting: k ~ Poisson(n * lam) uniform positions put Poisson(lam) hits on each of the n elements,
    independently; with lam = -ln(1 - p) an element is hit at least once with probability 1 - e^-lam = p.
    """
    n = x.numel()
    if n == 0:  # randint over an empty range is an error
        return torch.empty(0, dtype=torch.long, device=x.device)
    lam = -torch.log1p(torch.tensor(-p, dtype=torch.float64))
    return torch.randint(n, (int(torch.poisson(lam * n)),), device=x.device)


def _lane_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """Bool keep-mask with p rounded to 1/65536, and 1 / (1 - p').

    One 64-bit draw feeds four elements (16 random bits each): on CPU this is ~3x cheaper than
    bernoulli_, which draws per element.
    """
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2 ** 63), None)
    lanes = bits.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
    dropped = round(p * 65536)
    return lanes >= dropped - 32768, 65536 / (65536 - dropped)


def _scaled_without(t: torch.Tensor, scale: float, positions: torch.Tensor) -> torch.Tensor:
    """A new contiguous ``t * scale`` with the flat ``positions`` set to zero (differentiable when grad mode is on,
    as in a backward that builds a graph)."""
    positions = positions.long()
    if torch.is_grad_enabled() and t.requires_grad:
        return t.mul(scale).reshape(-1).index_fill(0, positions, 0).view(t.shape)
    out = torch.mul(t, scale, out=torch.empty(t.shape, dtype=t.dtype, device=t.device))
    out.view(-1).index_fill_(0, positions, 0)
    return out  # not a view: an autograd Function's output must own its tensor


class _Dropout(torch.autograd.Function):
    """Inverted dropout. On CPU with p <= 0.2 it saves the dropped positions, about -ln(1 - p) n of them, as
    int32 where they fit (0.21 bytes per element at p = 0.05, 0.89 at p = 0.2), and applies them as a scale plus
    a scattered zero fill, about 1.2x faster than multiplying by a uint8 keep-mask (``python bench/kernels.py
    --only dropout``). Otherwise it saves a bool mask (1 byte per element): on CPU from _lane_mask, elsewhere
    torch.native_dropout's."""

    @staticmethod
    def forward(ctx, x, p, token=None):
        ctx.scale, ctx.token = 1.0 / (1.0 - p), token
        ctx.native = _native_dropout(x)
        if ctx.native:
            out, mask = torch.native_dropout(x, p, True)
            ctx.save_for_backward(mask)
            return out
        if _scatters(x, p):
            positions = drop_positions(x, p)
            ctx.save_for_backward(positions.int() if x.numel() < 2 ** 31 else positions)
            ctx.scattered = True
            return _scaled_without(x, ctx.scale, positions)
        mask, ctx.scale = _lane_mask(x, p)
        ctx.save_for_backward(mask)
        ctx.scattered = False
        return x.mul(mask).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, g):
        _forget_dropped(ctx.token)
        (saved,) = ctx.saved_tensors
        if ctx.native:
            return torch.ops.aten.native_dropout_backward(g, saved, ctx.scale), None, None
        if ctx.scattered:
            return _scaled_without(g, ctx.scale, saved), None, None
        return g.mul(saved).mul_(ctx.scale), None, None


# --- mixed-adapter batches: which adapter each row uses, for the length of one forward / generate ---------
_mixed = threading.local()


class MixedRows:
    """One adapter name per batch row (BASE_ADAPTER or an adapter a layer lacks: the base output)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._index: dict = {}
        self._used = frozenset(self.names)

    def used_names(self) -> frozenset:
        """The names the rows use (BASE_ADAPTER included)."""
        return self._used

    def index(self, slots: tuple[str, ...], device: torch.device) -> torch.Tensor:
        """Per-row slot in a stack whose slot 0 is zeros and slot i + 1 holds ``slots[i]``; (batch,) int64."""
        key = (slots, device)
        if key not in self._index:  # layers holding the same adapters share one index tensor per pass
            pos = {name: i + 1 for i, name in enumerate(slots)}
            self._index[key] = torch.tensor([pos.get(n, 0) for n in self.names], dtype=torch.long, device=device)
        return self._index[key]


def current_rows() -> Optional[MixedRows]:
    """The mixed batch being run on this thread, if any."""
    return getattr(_mixed, "rows", None)


@contextlib.contextmanager
def mixed_rows(names: Sequence[str]) -> Iterator[MixedRows]:
    """Run the block with one adapter per batch row; cleared on exit, exceptions included."""
    previous = current_rows()
    _mixed.rows = MixedRows(names)
    try:
        yield _mixed.rows
    finally:
        _mixed.rows = previous

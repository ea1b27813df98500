"""PeftModel: holds the base model and its named adapters; add / switch / merge / mixed batches (disk: persist.py)."""
from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from typing import Callable, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from . import checkpoint, status
from .config import PeftConfig, as_config, lookup
from .inject import TASK_HEADS, adapter_layers, shared_parameters, unwrap, wrap_modules_to_save
from .layers import AdapterLayer, ModulesToSaveWrapper, checkpointing, mixed_rows, new_forward_pass
from .persist import SaveLoadMixin, peft_options

BASE_ADAPTER = "__base__"  # reserved: "no adapter" in mixed batches
_DICT_ATTRIBUTES = frozenset(dir(nn.ParameterDict())) | frozenset(dir(nn.ModuleDict()))  # the layers key adapters in these


class PeftModel(SaveLoadMixin, nn.Module):
    """A base model with one or more named adapters, of which one or more are active."""

    def __init__(self, model: nn.Module, config: PeftConfig, adapter_name: str = "default",
                 calibration_batches: Optional[Iterable[dict]] = None, loss_fn: Optional[Callable] = None) -> None:
        _refuse_wrapped(model)
        refuse_quantized(model)
        super().__init__()
        self.base_model = model
        self.training = model.training  # this wrapper's flag only: the model's submodules keep their own modes
        self.peft_config: dict[str, PeftConfig] = {}
        self._active: list[str] = []
        # per-adapter modules outside the base model (prompt methods: virtual-token embeddings / encoders)
        self.prompt_modules = nn.ModuleDict().train(self.training)
        self._inputs_off = False  # True inside disable_adapter: forward / generate leave the inputs alone
        # restored by unload() / a failed load, so the user's model comes back as it was
        self._grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
        self._trainable: Optional[list[torch.Tensor]] = None  # what _update_trainable turned on (None: walk all)
        self._head_hook = None
        self._input_grads_hooked = False  # whether we made the embeddings' output require grad (undone by unload)
        # per open disable_adapter() block: the merges it took off to put back on leaving ({name: its config}); calls
        # in the block that end a merge outside one (unmerge_adapter, set_adapter, delete_adapter) end them here too
        self._held_merges: list[dict[str, PeftConfig]] = []
        self.add_adapter(adapter_name, config, calibration_batches, loss_fn)
        self.set_adapter(adapter_name, inference_mode=self.peft_config[adapter_name].inference_mode)
        # last, so a constructor that raises leaves no hook behind on the caller's model
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(head, nn.Linear):
            self._head_hook = head.register_forward_pre_hook(_contiguous_input)
        if checkpointing(model):
            self._require_input_grads()

    def __getattr__(self, name: str):
        # attribute access falls through to the wrapped model (config, device, generation_config, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # --- running ------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """Call the base model (with the active adapters in place)."""
        new_forward_pass()
        rows = kwargs.pop("adapter_names", None)  # one adapter per batch row (mixed batch), or None
        if rows is not None:
            self._refuse_checkpointed_mixed_training()
            with self._mixed_batch(rows, args, kwargs):
                return self.base_model(*args, **kwargs)
        if self._input_adapter() is None:
            return self.base_model(*args, **kwargs)
        return self._run_on_inputs(args, kwargs, generate=False)

    def generate(self, *args, **kwargs):
        """``base_model.generate`` with the active adapters in place (or ``adapter_names=``: one per row)."""
        new_forward_pass()
        rows = kwargs.pop("adapter_names", None)
        if rows is not None:
            with self._mixed_batch(rows, args, kwargs):
                return self.base_model.generate(*args, **kwargs)
        if self._input_adapter() is None:
            return self.base_model.generate(*args, **kwargs)
        return self._run_on_inputs(args, kwargs, generate=True)

    def _mixed_batch(self, names, args: tuple, kwargs: dict) -> contextlib.AbstractContextManager:
        # every check runs before any compute; layers then read the rows from layers.current_rows()
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"adapter_names must be a list of adapter names, one per batch row; got {names!r}")
        names = list(names)
        unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise ValueError(f"adapter_names: no adapter named {unknown[0]!r}; this model has "
                             f"{sorted(self.peft_config)} (and {BASE_ADAPTER!r} for the base model)")
        inputs = kwargs.get("input_ids", args[0] if args else kwargs.get("inputs_embeds"))
        if inputs is not None and inputs.shape[0] != len(names):
            raise ValueError(f"adapter_names has {len(names)} names for a batch of {inputs.shape[0]} rows; "
                             "pass exactly one name per row")
        if (kwargs.get("num_beams") or 1) > 1 or (kwargs.get("num_return_sequences") or 1) > 1:
            raise ValueError("adapter_names with num_beams / num_return_sequences > 1 is not supported; "
                             "repeat the rows (and their names) yourself")
        used = set(names) - {BASE_ADAPTER}
        if used & set(self.prompt_modules):
            raise ValueError(f"adapter {sorted(used & set(self.prompt_modules))[0]!r} is a prompt adapter; "
                             "mixed-adapter batches support LoRA / DoRA adapters")
        for layer_name, layer in adapter_layers(self.base_model):
            if layer.merged_adapters:
                raise ValueError(f"adapter {layer.merged_adapters[0]!r} is merged into {layer_name!r}; mixed-adapter "
                                 "batches need unmerged adapters: call unmerge_adapter() first")
            reason = layer.mixed_refusal(used)
            if reason:
                raise ValueError(f"adapter_names: {layer_name}: {reason}")
        return mixed_rows(names)

    def _refuse_checkpointed_mixed_training(self) -> None:
        # a forward that builds a graph under transformers' checkpointing: its recompute in backward would run outside
        # the batch, with the active adapters instead of each row's (generate, eval and no_grad are fine)
        # (a model with nothing trainable is refused too: its inputs may still need gradients, e.g. embeddings from a
        # trained projector or enable_input_require_grads, and theirs would come out wrong just the same)
        if torch.is_grad_enabled() and self.base_model.training and checkpointing(self.base_model):
            raise ValueError("a mixed-adapter batch cannot train under gradient checkpointing: the recompute in "
                             "backward runs outside the batch, with the active adapters instead of each row's (wrong "
                             "gradients); call model.gradient_checkpointing_disable(), or train one adapter per batch")

    def _input_adapter(self) -> Optional[str]:
        # the active adapter whose method rewrites the inputs (a prompt method), if any and not disabled
        name = self.active_adapter
        if name is None or self._inputs_off or name not in self.prompt_modules:
            return None
        return name

    def _run_on_inputs(self, args: tuple, kwargs: dict, generate: bool):
        if len(args) > 1:
            raise TypeError("with a prompt adapter pass inputs by keyword (input_ids=..., attention_mask=...)")
        if args:
            kwargs["input_ids"] = args[0]
        name = self._input_adapter()
        config = self.peft_config[name]
        _, method = lookup(config.peft_type)
        return method.run(self.base_model, self.prompt_modules[name], config, kwargs, generate)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        """The base model's gradient checkpointing, with its embeddings' output requiring grad (as PEFT arranges):
        reentrant checkpointing only backpropagates through a block whose inputs require grad, and with a frozen
        base nothing before the first block does, so no adapter would get a gradient."""
        self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        self._require_input_grads()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """transformers 5's name for it, which its Trainer calls: as gradient_checkpointing_enable."""
        self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs,
                                                        every_n_layers=every_n_layers, offload=offload)
        self._require_input_grads()

    def _require_input_grads(self) -> None:
        base = self.base_model  # hooks the user already set (transformers 5 keeps a list, 4 kept one) are left alone
        set_before = getattr(base, "_require_grads_hooks", None) or getattr(base, "_require_grads_hook", None)
        if not self._input_grads_hooked and not set_before and hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()
            self._input_grads_hooked = True

    def _get_name(self) -> str:
        """The base model's class name: transformers' Trainer reads it to shift a causal LM's labels for label
        smoothing (it reads a PEFT model's base model's; "PeftModel" left them unshifted: a wrong loss, silently)."""
        return self.base_model._get_name()

    def __repr__(self) -> str:
        return type(self).__name__ + super().__repr__()[len(self._get_name()):]  # nn.Module's, headed by our name

    # --- adapters -----------------------------------------------------------------------------
    def get_base_model(self) -> nn.Module:
        """The wrapped model itself (with the adapter layers in place), as PEFT's get_base_model."""
        return self.base_model

    @property
    def active_adapter(self) -> Optional[str]:
        """The first active adapter's name."""
        return self._active[0] if self._active else None

    @property
    def active_adapters(self) -> list[str]:
        """Names of the active adapters."""
        return list(self._active)

    @property
    def active_peft_config(self) -> PeftConfig:
        """The first active adapter's config (PEFT's name)."""
        if not self._active:
            raise ValueError("no adapter is active; activate one with set_adapter(name)")
        return self.peft_config[self._active[0]]

    @property
    def peft_type(self) -> str:
        """The first active adapter's method, as adapter_config.json names it ("LORA", ...)."""
        return self.active_peft_config.peft_type

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        """The module names that the adapters' configs train in full (PEFT's attribute), or None."""
        names = {n for c in self.peft_config.values() for n in (getattr(c, "modules_to_save", None) or [])}
        return names or None

    def disable_adapter_layers(self) -> None:
        """Run the base model alone until enable_adapter_layers() (PEFT's pair; disable_adapter() is the block
        form). Merged adapters are unmerged first, with a warning, as in PEFT."""
        if any(layer.merged_adapters for _, layer in adapter_layers(self.base_model)):
            warnings.warn("disable_adapter_layers: unmerging the merged adapters first", stacklevel=2)
            self.unmerge_adapter()
        for _, layer in adapter_layers(self.base_model):
            layer.disabled = True
        self._inputs_off = True

    def enable_adapter_layers(self) -> None:
        """Undo disable_adapter_layers(): the active adapters run again."""
        for _, layer in adapter_layers(self.base_model):
            layer.disabled = False
        self._inputs_off = False

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig,
                    calibration_batches: Optional[Iterable[dict]] = None, loss_fn: Optional[Callable] = None, *,
                    low_cpu_mem_usage: bool = False, autocast_adapter_dtype: bool = True) -> None:
        """Inject a new adapter (not activated, unless none is: after the last one was deleted); the model is left
        unchanged if this fails.

        ``calibration_batches`` (dicts of model inputs with labels) and ``loss_fn`` ((outputs, batch) -> loss)
        feed methods that select by importance (SelectiveConfig); other methods refuse them.
        """
        peft_options(autocast_adapter_dtype)  # (low_cpu_mem_usage, PEFT's, changes no result)
        if isinstance(calibration_batches, bool):  # PEFT's positional mixed / low_cpu_mem_usage
            raise TypeError("calibration_batches is a bool: after the adapter name peftkit takes calibration_batches; "
                            "pass PEFT's mixed / low_cpu_mem_usage by keyword")
        self._check_new_name(adapter_name)
        config = copy.deepcopy(as_config(peft_config))  # targets get resolved in place; the caller's object stays
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(self.base_model, "config", None), "_name_or_path", None) or None
        _, method = lookup(config.peft_type)
        try:
            method.calibrate(self.base_model, config, calibration_batches, loss_fn)
            method.inject(self.base_model, config, adapter_name)
            module = method.input_module(self.base_model, config, adapter_name)
            if module is not None:
                self.prompt_modules[adapter_name] = module.train(self.training)  # dropout as the model's mode says
            self._wrap_heads(config, adapter_name)
        except Exception:
            self._remove(adapter_name)
            raise
        self.peft_config[adapter_name] = config
        self._update_trainable(adapter_name)
        if not self._active:  # the last adapter was deleted: the new one runs and trains, as the first one did
            self._activate([adapter_name])

    def _check_new_name(self, name: str) -> None:
        # no dots (module paths), no path separators (save_pretrained writes a non-default adapter to a subfolder
        # of that name, which must stay inside the save directory)
        if (not isinstance(name, str) or not name or "." in name or name == BASE_ADAPTER
                or any(c in name for c in ("/", "\\", "\0"))):
            raise ValueError(f"adapter name {name!r} is invalid: use a non-empty name without dots, slashes or "
                             f"backslashes, not {BASE_ADAPTER!r}")
        if name in _DICT_ATTRIBUTES:  # a key shadowing the adapter dicts' own attribute
            raise ValueError(f"adapter name {name!r} is taken by torch's ModuleDict / ParameterDict (the layers keep "
                             "adapters in them: 'training' broke model.train() / eval()); pick another name")
        if name in self.peft_config:
            raise ValueError(f"an adapter named {name!r} already exists; delete_adapter({name!r}) first or pick another name")

    def _wrap_heads(self, config: PeftConfig, adapter_name: str) -> None:
        user = list(getattr(config, "modules_to_save", None) or [])
        if user:
            wrap_modules_to_save(self.base_model, user, adapter_name, required=True)
        if config.task_type in TASK_HEADS and hasattr(config, "modules_to_save"):
            heads = [h for h in TASK_HEADS[config.task_type] if h not in user]
            wrap_modules_to_save(self.base_model, heads, adapter_name, required=False)
            config.modules_to_save = user + heads  # as PEFT records it

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Make one adapter (or several, applied together) active; only active ones train. As in PEFT, the adapters
        become trainable (also one loaded with is_trainable=False), or frozen with ``inference_mode=True``."""
        names = self._adapter_name_list(adapter_name, "set_adapter")
        if len(names) > 1 and any(name in self.prompt_modules for name in names):
            raise ValueError(f"adapters {names} include a prompt adapter, which runs alone; activate one at a time")
        self._refuse_two_heads(names)
        for name in names:
            self.peft_config[name].inference_mode = bool(inference_mode)
        merged = sorted({n for _, layer in adapter_layers(self.base_model) for n in layer.merged_adapters}
                        | {n for held in self._held_merges for n in held})
        if merged and set(merged) != set(names):  # the merged deltas would stay in the weights under the new choice
            warnings.warn(f"adapter(s) {merged} are merged into the base weights; unmerging them before activating "
                          f"{names}", stacklevel=2)
            self.unmerge_adapter()
        self._activate(names)

    def _refuse_two_heads(self, names: list[str]) -> None:
        """Refuse adapters that each hold their own copy of one head (modules_to_save): only one copy can run, and the
        other would be saved untrained (PEFT refuses the same)."""
        for path, layer in adapter_layers(self.base_model):
            owners = [n for n in names if isinstance(layer, ModulesToSaveWrapper) and n in layer.modules_to_save]
            if len(owners) > 1:
                raise ValueError(f"adapters {owners} each train their own copy of {path!r} (modules_to_save), and only "
                                 "one copy can run; activate them one at a time, or give only one of them that module")

    def set_requires_grad(self, adapter_names: Union[str, list[str]], requires_grad: bool = True) -> None:
        """Let the adapters train (or freeze them). Unlike PEFT's method, an inactive adapter's tensors turn
        trainable only once it is activated: in peftkit only active adapters train."""
        names = self._adapter_name_list(adapter_names, "set_requires_grad")
        for name in names:
            self.peft_config[name].inference_mode = not requires_grad
        self._update_trainable()

    def _adapter_name_list(self, names: Union[str, Iterable[str]], what: str) -> list[str]:
        """``names`` (one name, or several) as a list of this model's adapters; a clear error for a missing name
        or one named twice (set_adapter(["a", "a"]) would apply a's delta twice)."""
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"no adapter named {name!r}; this model has {sorted(self.peft_config)}")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"{what}: adapter(s) {repeated} named more than once in {names}; name each once")
        return names

    def _activate(self, names: list[str], added: Optional[str] = None) -> None:
        # the library's own re-activation (after a load, a delete, a refine): merges are the user's and stay.
        # ``added``: an adapter whose tensors were just created (trainable), frozen again unless active
        self._active = names
        for _, layer in adapter_layers(self.base_model):
            layer.set_active(names)
        self._update_trainable(added)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; layers left without adapters are unwrapped."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; this model has {sorted(self.peft_config)}")
        self._remove(adapter_name)
        del self.peft_config[adapter_name]
        for held in self._held_merges:
            held.pop(adapter_name, None)
        remaining = [n for n in self._active if n != adapter_name] or list(self.peft_config)[:1]
        if remaining:
            self._activate(remaining)
        else:  # the last one: the base parameters train again as they did before
            self._active = []
            self._restore_grads()

    def _remove(self, adapter_name: str) -> None:
        if adapter_name in self.prompt_modules:
            del self.prompt_modules[adapter_name]
        for name, layer in adapter_layers(self.base_model):
            if adapter_name in layer.adapter_names:
                layer.delete_adapter(adapter_name)
            _tie_back(layer)
            if not layer.adapter_names:
                unwrap(self.base_model, name, merge=False)
        if not self.peft_config:
            self._restore_grads()

    def _restore_grads(self) -> None:
        self._trainable = None
        for name, param in self.base_model.named_parameters():
            if name in self._grad_before:
                param.requires_grad_(self._grad_before[name])

    def adapter_parameters(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The tensors one adapter saves, keyed as on disk (live tensors)."""
        config = self.peft_config[adapter_name]
        _, method = lookup(config.peft_type)
        extras = method.extra_tensors(self.base_model, config, adapter_name)
        tensors = checkpoint.adapter_tensors(self.base_model, adapter_name, extras)
        if method.acts_on_inputs:  # a trained head's keys as PEFT's prompt methods name them
            tensors = {checkpoint.prompt_method_key(k): v for k, v in tensors.items()}
        if adapter_name in self.prompt_modules:
            tensors.update(checkpoint.prompt_tensors(self.prompt_modules[adapter_name]))
        return tensors

    def _update_trainable(self, added: Optional[str] = None) -> None:
        # freezes only what can be on (the last trainable set, a just-added adapter): a walk over every
        # parameter here made each load_adapter O(adapters held); the first call walks the whole model
        stale = list(self.parameters()) if self._trainable is None else list(self._trainable)
        if added is not None and self._trainable is not None:  # a new adapter's tensors are created trainable
            stale += self.adapter_parameters(added).values()
            if added in self.prompt_modules:
                stale += self.prompt_modules[added].parameters()
        for param in stale:
            if param.is_leaf:  # a prompt adapter's saved tensor may be computed (an encoder's output)
                param.requires_grad_(False)
        self._trainable = []
        originals = self._replaced_heads() if any(getattr(self.peft_config[n], "bias", None) == "all"
                                                  for n in self._active) else set()
        for name in self._active:
            if self.peft_config[name].inference_mode:
                continue
            if name in self.prompt_modules:  # trains in full (a P-tuning encoder's output is saved, not its weights)
                self._trainable += self.prompt_modules[name].requires_grad_(True).parameters()
            for tensor in self.adapter_parameters(name).values():
                if isinstance(tensor, nn.Parameter) and tensor.is_floating_point() and id(tensor) not in originals:
                    self._trainable.append(tensor.requires_grad_(True))

    def _replaced_heads(self) -> set[int]:
        # bias="all" saves every bias, the original of a head an adapter trains a copy of included (as PEFT), but
        # that original does not run while an active adapter's copy does: it stays frozen, as in PEFT. (With no
        # active copy the original runs, and its bias trains.)
        return {id(p) for _, layer in adapter_layers(self.base_model) if isinstance(layer, ModulesToSaveWrapper)
                and any(name in layer.modules_to_save for name in self._active) for p in layer.base_layer.parameters()}

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run exactly the base model inside the block (merged adapters are unmerged, then merged back)."""
        layers = [layer for _, layer in adapter_layers(self.base_model)]
        merged = [(layer, layer.disabled, list(layer.merged_adapters)) for layer in layers]
        held = {n: self.peft_config[n] for _, _, names in merged for n in names}  # which adapter each name was
        inputs_off = self._inputs_off  # True inside an outer disable_adapter block, which this one must not end
        copies = {}  # a tied weight's own copy, kept for the merges put back on leaving
        for layer in layers:
            layer.unmerge()
            if "_tied_weight" in layer.__dict__:
                copies[id(layer)] = layer.base_layer.weight
            _tie_back(layer)  # a tied weight shares again: exactly the base model inside the block
            layer.disabled = True
        self._inputs_off = True
        self._held_merges.append(held)
        try:
            yield
        finally:
            self._held_merges = [h for h in self._held_merges if h is not held]
            self._inputs_off = inputs_off
            present = {id(layer) for _, layer in adapter_layers(self.base_model)}
            # merged back: what the block's calls left of the merges (see _held_merges), if still the same adapter
            again = [n for n, config in held.items() if self.peft_config.get(n) is config]
            for layer, _, names in merged:
                if id(layer) in present and id(layer) in copies and any(n in again for n in names):
                    _own_copy_again(layer, copies[id(layer)])
            self._untie_for_merge(again)  # (any other shared weight a merge goes into)
            for layer, disabled, names in merged:
                if id(layer) not in present:  # unloaded inside the block: its base layer is the caller's now
                    continue
                layer.disabled = disabled
                for name in names:  # in the recorded order
                    if name in again:
                        layer.merge([name])

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: Optional[str] = None, svd_rank: Optional[int] = None,
                             svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                             density: Optional[float] = None, majority_sign_method: str = "total",
                             generator: Optional[torch.Generator] = None) -> None:
        """Add adapter ``adapter_name``: ``adapters`` combined with ``weights``. LoRA adapters combine by PEFT's
        ``combination_type`` ("svd" when unset; methods/lora_arith); IA3 adapters linearly, as in PEFT
        (methods/ia3_arith)."""
        from .methods import ia3_arith, lora_arith  # imported here so the core does not load a method at import

        self._check_new_name(adapter_name)
        if self._weighted_sources(adapters, weights) == "IA3":
            if combination_type not in (None, "linear"):
                raise ValueError(f"IA3 adapters combine linearly (PEFT's rule); leave combination_type out or pass "
                                 f"'linear', not {combination_type!r}")
            ia3_arith.add_weighted_ia3(self, adapters, weights, adapter_name)
            return
        lora_arith.add_weighted_adapter(self, adapters, weights, adapter_name, lora_arith.Options(
            combination_type or "svd", svd_rank, svd_clamp, svd_full_matrices, density, majority_sign_method, generator))

    def _weighted_sources(self, adapters: list[str], weights: list[float]) -> str:
        """The method (LORA or IA3) of add_weighted_adapter's sources, refusing what no method can combine."""
        if isinstance(adapters, str) or not adapters:
            raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
        if len(weights) != len(adapters) or not all(math.isfinite(float(w)) for w in weights):
            raise ValueError(f"weights must be {len(adapters)} finite numbers, one per adapter; got {weights!r}")
        kinds = {}
        for name in adapters:
            config = self.peft_config.get(name)
            if config is None:
                raise ValueError(f"no adapter named {name!r}; this model has {sorted(self.peft_config)}")
            if getattr(config, "modules_to_save", None):
                raise ValueError(f"adapter {name!r} trains whole modules {config.modules_to_save} (modules_to_save), "
                                 "which cannot be combined; combine adapters without modules_to_save")
            kinds[name] = config.peft_type
        kind = "IA3" if "IA3" in kinds.values() else "LORA"  # with IA3 among them, the others are the odd ones
        odd = next((n for n in adapters if kinds[n] != kind), None)
        if odd is not None:
            raise ValueError(f"adapter {odd!r} is a {kinds[odd]} adapter; add_weighted_adapter combines adapters of "
                             "one kind (LoRA with LoRA, IA3 with IA3)")
        return kind

    def hotswap_adapter(self, model_id: Union[str, os.PathLike], adapter_name: str = "default") -> None:
        """Load a saved LoRA adapter into ``adapter_name``'s tensors in place (see peftkit.hotswap)."""
        from .hotswap import hotswap_adapter  # LoRA-specific: imported here so the core does not load a method at import

        hotswap_adapter(self, model_id, adapter_name)

    # --- merging ------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Write the adapters' deltas into the base weights (undo with unmerge_adapter). Refused while the adapters
        are disabled: a disabled layer runs its base layer, which would then carry the delta."""
        if any(layer.disabled for _, layer in adapter_layers(self.base_model)):
            raise ValueError("merge_adapter: the adapters are disabled (disable_adapter_layers(), or inside a "
                             "disable_adapter() block), and a merged delta would run anyway; call "
                             "enable_adapter_layers() (or leave the block) first")
        names = self._adapter_name_list(adapter_names, "merge_adapter") if adapter_names is not None else list(self._active)
        for name in names:
            peft_type = self.peft_config[name].peft_type
            if not lookup(peft_type)[1].mergeable:  # refused before any weight changes
                raise ValueError(f"adapter {name!r} is a {peft_type} adapter, which cannot be merged into the base "
                                 "weights (it is not a weight update); use unload() to remove it, or keep the PeftModel")
        # a disk-offloaded base weight is a "meta" placeholder: adding to it would be silently lost
        offloaded = [n for n, layer in adapter_layers(self.base_model)
                     if getattr(getattr(layer.base_layer, "weight", None), "is_meta", False)]
        if offloaded:
            raise ValueError(f"cannot merge into {offloaded[0]!r} ({len(offloaded)} layers in all): its base weight is "
                             "offloaded (on 'meta'). Load the base without disk offload to merge, or run unmerged.")
        self._untie_for_merge(names)
        done = []  # (layer, the names this call merged into it)
        for path, layer in adapter_layers(self.base_model):
            before = set(layer.merged_adapters)
            try:
                layer.merge(names, safe=safe_merge)
            except Exception as err:  # a safe merge refused here: undo this call's merges, here and in the layers before
                done.append((layer, [n for n in layer.merged_adapters if n not in before]))
                for merged_layer, merged in reversed(done):
                    merged_layer.unmerge(merged)
                for _, untied in adapter_layers(self.base_model):  # _untie_for_merge's copies go too
                    _tie_back(untied)
                if isinstance(err, ValueError):
                    raise ValueError(f"{err} (at {path!r}); nothing of this call stays merged") from None
                raise
            done.append((layer, [n for n in layer.merged_adapters if n not in before]))

    def _untie_for_merge(self, names: list[str]) -> None:
        """Give a base weight that another module shares (an lm_head tied to the embedding) its own copy before a
        merge writes into it: the delta belongs to this layer only, and written into the shared tensor it would
        change the embedding too. unmerge_adapter ties it back."""
        shared = shared_parameters(self.base_model)
        for _, layer in adapter_layers(self.base_model):
            weight = getattr(layer.base_layer, "weight", None)
            if (isinstance(weight, nn.Parameter) and id(weight) in shared and "_tied_weight" not in layer.__dict__
                    and any(n in layer.adapter_names and n not in layer.merged_adapters for n in names)):
                layer.__dict__["_tied_weight"] = weight  # a plain attribute: not a parameter of the layer
                layer.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)

    def unmerge_adapter(self) -> None:
        """Restore the base weights from every merged adapter (tied weights are tied again); inside a
        disable_adapter() block, the merges it took off stay off on leaving it."""
        for held in self._held_merges:
            held.clear()
        for _, layer in adapter_layers(self.base_model):
            layer.unmerge()
            _tie_back(layer)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Merge the active (or given) adapters and return the plain base model. (PEFT's argument order;
        ``progressbar`` is taken and shows nothing: a merge here takes well under a second per billion weights.)
        Adapters turned off by disable_adapter_layers() are merged too, as in PEFT: the wrappers go (a refused
        merge leaves them off again)."""
        switches = [(layer, layer.disabled) for _, layer in adapter_layers(self.base_model)]
        inputs_off = self._inputs_off
        self.enable_adapter_layers()
        try:
            self.merge_adapter(adapter_names, safe_merge)
        except Exception:
            for layer, disabled in switches:
                layer.disabled = disabled
            self._inputs_off = inputs_off
            raise
        return self._unload(merge=True)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original base model."""
        self.unmerge_adapter()
        return self._unload(merge=False)

    def _unload(self, merge: bool) -> nn.Module:
        untied = any("_tied_weight" in layer.__dict__ for _, layer in adapter_layers(self.base_model))
        config = getattr(self.base_model, "config", None)
        if merge and untied and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False  # saved and reloaded, the merged head must not be tied back
        # innermost first: a LoRA / IA3 layer can sit inside a block a bottleneck adapter wraps, and unwrapping the
        # block first would move the inner layer's path (named_modules lists parents before their children)
        for name, _ in reversed(adapter_layers(self.base_model)):
            unwrap(self.base_model, name, merge)
        self.prompt_modules.clear()
        self.peft_config.clear()
        self._active = []
        self._restore_grads()
        if self._head_hook is not None:
            self._head_hook.remove()
            self._head_hook = None
        if self._input_grads_hooked:
            self.base_model.disable_input_require_grads()
            self._input_grads_hooked = False
        return self.base_model

    # --- counting -----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters)."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def get_layer_status(self) -> list[status.TunerLayerStatus]:
        """Each adapter layer's active / merged / trainable state and devices, in PEFT's format (peftkit.status)."""
        return status.get_layer_status(self)

    def get_model_status(self) -> status.TunerModelStatus:
        """The layers' status summed up over the model, in PEFT's format (peftkit.status)."""
        return status.get_model_status(self)

    def print_trainable_parameters(self) -> None:
        """Print the counts in PEFT's format."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def _contiguous_input(module: nn.Module, args: tuple) -> Optional[tuple]:
    # torch 2.13 on CPU runs F.linear on a strided 3-D input against a frozen weight as a bmm over the expanded
    # weight, ~6x slower than the mm it picks when the weight requires grad. transformers hands the output head
    # such a slice (logits_to_keep, generate's prefill) and a PEFT model's head is frozen: copy the kept rows.
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dim() > 2 and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                   calibration_batches: Optional[Iterable[dict]] = None, loss_fn: Optional[Callable] = None, *,
                   mixed: bool = False, autocast_adapter_dtype: bool = True, revision: Optional[str] = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Wrap ``model`` with a new trainable adapter described by ``peft_config``. PEFT's keyword arguments are
    taken at the values peftkit implements (persist.peft_options; ``low_cpu_mem_usage`` changes no result)."""
    peft_options(autocast_adapter_dtype, revision, mixed=mixed)
    return PeftModel(model, peft_config, adapter_name, calibration_batches, loss_fn)


def refuse_quantized(model: nn.Module) -> None:
    """A quantized base (bitsandbytes 4 / 8-bit, GPTQ, AWQ, a GGUF file kept packed, ...) is refused: its layers hold
    packed weights that peftkit's layers would read as plain ones (wrong outputs, or a crash deep inside). Seen by
    transformers' quantization_method (a GGUF file, dequantized as it loads, is no quantized base: the embedded
    SmolLM2 is one) or by a layer's packed weight (a model's inner module, a GGUF architecture transformers keeps
    packed); a dequantize()d model loads."""
    method = getattr(model, "quantization_method", None)
    method = str(getattr(method, "value", method)) if method is not None else None
    if method and method.lower() != "gguf":
        raise ValueError(_quantized_message(method))
    for name, module in model.named_modules():
        if isinstance(module, (nn.ParameterDict, nn.ModuleDict, nn.ParameterList)):
            continue  # peftkit's own adapter dicts (a selective adapter named "weight" keys int64 indices so)
        for attr in ("weight", "qweight"):
            tensor = module._parameters.get(attr, module._buffers.get(attr))
            if tensor is not None and _packed(tensor):
                raise ValueError(_quantized_message(f"{name}.{attr} is {type(tensor).__name__} of {tensor.dtype}"))


def _packed(tensor: torch.Tensor) -> bool:
    """An integer / float8 weight, or bitsandbytes' packed parameter classes."""
    return (type(tensor).__name__ in ("Params4bit", "Int8Params") or not tensor.dtype.is_floating_point
            or tensor.dtype.itemsize == 1)


def _quantized_message(what: str) -> str:
    return (f"the base model is quantized ({what}); peftkit trains and loads adapters over unquantized bases only: "
            "load it in bfloat16, float16 or float32 (or use PEFT for k-bit training)")


def _refuse_wrapped(model: nn.Module) -> None:
    """A PeftModel, or a model that already holds a PeftModel's adapter layers (its get_base_model()), cannot be the
    base of another: the new adapters would overwrite or stack on the first one's inside the shared layers."""
    if isinstance(model, PeftModel):
        raise ValueError("model is already a PeftModel; use model.add_adapter(name, config) or "
                         "model.load_adapter(path, name) to add another adapter")
    held = next((name for name, module in model.named_modules() if isinstance(module, AdapterLayer)), None)
    if held is not None:
        raise ValueError(f"model already holds peftkit adapter layers (e.g. {held!r}) of a PeftModel made over it; add "
                         "adapters through that PeftModel (add_adapter / load_adapter), or take the plain model back "
                         "with its unload() first")


def _own_copy_again(layer: AdapterLayer, own: nn.Parameter) -> None:
    """Give a tied weight back the copy it had for its merges before a disable_adapter() block, refreshed from the
    shared weight through .data (as merges write): a backward pending from before the block saved that tensor."""
    if "_tied_weight" in layer.__dict__:
        return
    shared = layer.base_layer.weight
    own.data.copy_(shared.data)
    layer.__dict__["_tied_weight"] = shared
    layer.base_layer.weight = own


def _tie_back(layer: AdapterLayer) -> None:
    """A layer whose tied weight was given its own copy for a merge (PeftModel._untie_for_merge) shares it again
    once nothing is merged into it."""
    if not layer.merged_adapters and "_tied_weight" in layer.__dict__:
        layer.base_layer.weight = layer.__dict__.pop("_tied_weight")

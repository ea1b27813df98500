"""Saving and loading adapters: the half of PeftModel that touches the disk, in PEFT's layout.

A mixin so model.py stays about holding and switching adapters; every method here works on a PeftModel
(``peft_config``, ``adapter_parameters``, ``add_adapter`` ...).
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Callable, Optional, Union

import torch
from torch import nn

from . import checkpoint
from .config import PeftConfig, as_config, lookup
from .inject import TASK_HEADS, name_matches, saved_name_matches, shared_parameters
from .layers import ModulesToSaveWrapper


_PLANNED = ("auto", "balanced", "balanced_low_0", "sequential")  # device_map strings accelerate plans from


class SaveLoadMixin:
    """save_pretrained / from_pretrained / load_adapter, and placing a loaded model on devices."""

    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: Optional[list[str]] = None, save_embedding_layers: Union[str, bool] = "auto",
                        is_main_process: bool = True) -> None:
        """Write each adapter in PEFT's layout: "default" at the top, others in a subfolder of their name. PEFT's
        arguments in PEFT's order: ``is_main_process=False`` writes nothing (the other ranks of a distributed run);
        ``save_embedding_layers`` "auto" saves the full weights of the embeddings an adapter targets (as PEFT),
        False leaves them out."""
        if save_embedding_layers not in ("auto", False):
            raise ValueError(f"save_embedding_layers={save_embedding_layers!r}: peftkit saves the embeddings an adapter "
                             "targets ('auto') or none (False); to save resized embeddings that no adapter targets, "
                             "name them in modules_to_save")
        if not is_main_process:
            return
        if not os.fspath(save_directory):
            raise ValueError("save_directory is empty; pass the directory to write the adapter into")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; pass a directory")
        names = list(self.peft_config) if selected_adapters is None else self._adapter_name_list(
            selected_adapters, "save_pretrained")
        clash = [n for n in names if n != "default" and os.path.lexists(os.path.join(save_directory, n))
                 and not os.path.isdir(os.path.join(save_directory, n))]
        if clash:  # checked before anything is written: a save stops half done otherwise
            raise ValueError(f"adapter {clash[0]!r} is saved in the subfolder {os.path.join(save_directory, clash[0])!r}, "
                             "which is a file there; rename the adapter or save into another directory")
        for name in names:
            directory = save_directory if name == "default" else os.path.join(save_directory, name)
            method = lookup(self.peft_config[name].peft_type)[1]
            tensors = self.saved_tensors(name, save_embedding_layers == "auto")
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            extra = None
            if config.task_type is None:  # as PEFT: where its AutoPeftModel finds the base class without a task_type
                base = type(self.base_model)
                extra = {"auto_mapping": {"base_model_class": base.__name__, "parent_library": base.__module__}}
            checkpoint.save_adapter_files(directory, tensors, config.to_json(extra), safe_serialization)
            method.write_extras(self.base_model, self.peft_config[name], name, directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: Union[str, os.PathLike], adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        subfolder: Optional[str] = None, allow_pickle: bool = False,
                        device_map: Optional[Union[str, dict]] = None,
                        max_memory: Optional[dict] = None, autocast_adapter_dtype: bool = True,
                        low_cpu_mem_usage: bool = False, torch_device: Optional[str] = None,
                        revision: Optional[str] = None, ephemeral_gpu_offload: bool = False,
                        key_mapping: Optional[dict] = None):
        """A PeftModel with a saved adapter loaded onto ``model``; on any error ``model`` is left exactly as it was.
        PEFT's other arguments: see ``peft_options`` (``low_cpu_mem_usage`` and ``torch_device`` change no result:
        the tensors are copied onto each layer's own device)."""
        peft_options(autocast_adapter_dtype, revision, ephemeral_gpu_offload, key_mapping)
        directory, config, tensors = _read_saved(model_id, subfolder, allow_pickle, is_trainable, config)
        peft_model = cls(model, config, adapter_name)
        overwritten: dict[str, torch.Tensor] = {}
        try:
            peft_model._fill(adapter_name, tensors, directory, overwritten)
            if device_map is not None or max_memory is not None:
                peft_model._dispatch(device_map, max_memory)
        except Exception:
            peft_model._put_back(adapter_name, overwritten)
            peft_model.unload()
            raise
        peft_model._loaded(adapter_name, is_trainable)
        return peft_model

    def load_adapter(self, model_id: Union[str, os.PathLike], adapter_name: str, is_trainable: bool = False,
                     subfolder: Optional[str] = None, allow_pickle: bool = False, autocast_adapter_dtype: bool = True,
                     low_cpu_mem_usage: bool = False, torch_device: Optional[str] = None,
                     revision: Optional[str] = None, ephemeral_gpu_offload: bool = False) -> None:
        """Load another saved adapter under ``adapter_name`` (not activated; see set_adapter). PEFT's other
        arguments as in from_pretrained."""
        peft_options(autocast_adapter_dtype, revision, ephemeral_gpu_offload)
        directory, config, tensors = _read_saved(model_id, subfolder, allow_pickle, is_trainable)
        self.add_adapter(adapter_name, config)
        overwritten: dict[str, torch.Tensor] = {}
        try:
            self._fill(adapter_name, tensors, directory, overwritten)
        except Exception:
            self._put_back(adapter_name, overwritten)
            self.delete_adapter(adapter_name)
            raise
        self._activate(self._active or [adapter_name])
        self._loaded(adapter_name, is_trainable)

    def _loaded(self, adapter_name: str, is_trainable: bool) -> None:
        # filled: the config no longer stands for saved values (reused, a selective config must select anew);
        # loaded for inference, the model runs in eval mode (dropout off), as PEFT does; train() turns it back
        self.peft_config[adapter_name].__dict__.pop("_from_saved", None)
        if not is_trainable:
            self.eval()

    def saved_tensors(self, adapter_name: str, embeddings: bool = True,
                      source: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """The tensors save_pretrained writes for one adapter, keyed as on disk: the adapter's own (packed as its
        method stores them) and, with ``embeddings``, the full weights of the embeddings it targets (as PEFT).
        ``source`` maps a live tensor to the one to write in its place (a gathered state dict's)."""
        pick = source or (lambda t: t)
        config = self.peft_config[adapter_name]
        own = {k: pick(v) for k, v in self.adapter_parameters(adapter_name).items()}
        tensors = lookup(config.peft_type)[1].pack_tensors(self.base_model, config, adapter_name, own)
        if embeddings:
            tensors.update({k: pick(v) for k, v in self._embedding_tensors(adapter_name).items()})
        return tensors

    def _put_back(self, adapter_name: str, overwritten: dict[str, torch.Tensor]) -> None:
        """Undo a failed load's writes into the base: the embedding weights ``_fill`` replaced (kept in ``overwritten``)."""
        live = self._embedding_tensors(adapter_name)
        checkpoint.copy_into({k: live[k] for k in overwritten}, overwritten)

    def _fill(self, adapter_name: str, tensors: dict[str, torch.Tensor], directory: str,
              overwritten: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Copy the saved ``tensors`` into the adapter (checked first); the base's embedding weights that they
        replace are cloned into ``overwritten`` (where given) for _put_back."""
        method = lookup(self.peft_config[adapter_name].peft_type)[1]
        tensors = method.unpack_tensors(tensors)
        expected = self.adapter_parameters(adapter_name)  # a prompt encoder's output: the saved key and shape
        # embedding weights saved beside the adapter (PEFT does so by default) are optional; load them if there
        embeddings = {k: v for k, v in self._embedding_tensors(adapter_name).items() if k in tensors}
        expected.update(embeddings)
        if method.acts_on_inputs:  # saved by an older peftkit: a trained head under base_model.model.*
            tensors = {k if k in expected else checkpoint.prompt_method_key(k): v for k, v in tensors.items()}
        tensors = checkpoint.with_named_copies(expected, tensors)
        for key in self._copies_saved_before_suffix_rule(adapter_name, expected, tensors):
            del expected[key]  # the fresh copy keeps the base's values: the module runs as it did when saved
        try:
            checkpoint.check_fit(expected, tensors, directory)
        except ValueError as err:
            if getattr(self.peft_config[adapter_name], "_ensure_weight_tying", False) and shared_parameters(self.base_model):
                raise ValueError(f"{err} This adapter was saved with ensure_weight_tying=True (PEFT ties the adapters of "
                                 "tied embeddings), which peftkit does not support; load it with PEFT") from None
            raise
        if adapter_name in self.prompt_modules:  # a saved prompt adapter is its embeddings: the encoder goes (checked
            self.prompt_modules[adapter_name].use_saved_embeddings()  # first, so a refused file leaves it in place)
            expected.update(checkpoint.prompt_tensors(self.prompt_modules[adapter_name]))
        if overwritten is not None:
            overwritten.update({k: v.detach().clone() for k, v in embeddings.items()})
        checkpoint.copy_into(expected, tensors)
        method.check_loaded(self.base_model, adapter_name, directory)

    def _copies_saved_before_suffix_rule(self, adapter_name: str, expected: dict, found: dict) -> list[str]:
        """Expected keys of the modules_to_save copies an earlier peftkit made no copy of, when the file lacks all of
        them: modules an entry matches only as a plain suffix while it also names another module as a dotted one
        (DistilBERT's pre_classifier beside "classifier", Llama's input_layernorm beside "norm" for model.norm), or
        that only a task's own head entry matches (not required then). Warned, as PEFT warns of missing keys."""
        config = self.peft_config[adapter_name]
        names = list(getattr(config, "modules_to_save", None) or [])
        heads = TASK_HEADS.get(getattr(config, "task_type", None), ())
        modules = list(self.base_model.named_modules())
        old_hits = {n for n in names if any(name_matches(p, [n]) for p, _ in modules)}
        copies = {}
        for path, layer in modules:
            if not isinstance(layer, ModulesToSaveWrapper) or adapter_name not in layer.modules_to_save:
                continue
            matching = [n for n in names if saved_name_matches(path, [n])]
            if name_matches(path, matching):
                continue  # wrapped by the old (target_modules') rule too: its copy must be in the file
            if all(n in old_hits or n in heads for n in matching):
                ids = {id(t) for t in layer.adapter_tensors(adapter_name).values()}
                copies[path] = [k for k, v in expected.items() if id(v) in ids]
        keys = [k for ks in copies.values() for k in ks]
        if not keys or any(k in found for k in keys):  # some saved: a file that lacks the others is damaged
            return []
        warnings.warn(f"the adapter has no saved copy of {sorted(copies)}, which its modules_to_save {names} match as "
                      "a name suffix (an adapter saved before peftkit matched names as PEFT does); they keep the base "
                      "model's values", stacklevel=4)
        return keys

    def _embedding_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return checkpoint.embedding_tensors(self.base_model, getattr(self.peft_config[adapter_name], "target_modules", None))

    def _dispatch(self, device_map, max_memory: Optional[dict]) -> None:
        from accelerate import dispatch_model, infer_auto_device_map
        from accelerate.hooks import remove_hook_from_submodules

        if getattr(self.base_model, "hf_device_map", None) is not None:
            return  # already placed by from_pretrained(device_map=...); adapters sit beside their layers
        if isinstance(device_map, (int, torch.device)) or (
                isinstance(device_map, str) and device_map not in _PLANNED + ("disk",)):
            _check_device(device_map)
            self.to(device_map)  # one device for everything: "cuda", "cuda:1", "cpu", 0
            return
        if isinstance(device_map, dict):  # the user's map is kept as given (max_memory plans only the named plans)
            device_map = {_peft_key(key): device for key, device in device_map.items()}
        elif device_map == "disk":
            device_map = {"": "disk"}  # refused below, with the way that works
        else:
            no_split = getattr(self.base_model, "_no_split_modules", None) or []
            device_map = infer_auto_device_map(self, max_memory=max_memory, no_split_module_classes=no_split)
        for device in set(device_map.values()):
            _check_device(device)
        on_disk = sorted(name for name, device in device_map.items() if device == "disk")
        if on_disk:  # accelerate would ask for an offload_dir, which this API does not take
            raise ValueError(
                f"this device_map / max_memory puts {on_disk} on 'disk', and PeftModel.from_pretrained takes no "
                "offload folder. Load the base with transformers' from_pretrained(device_map=..., max_memory=..., "
                "offload_folder=...), then call PeftModel.from_pretrained(base, adapter_path)."
            )
        self._refuse_offloaded_adapters(device_map)
        devices = {name: t.device for name, t in self.state_dict(keep_vars=True).items()}
        try:
            dispatch_model(self, device_map=device_map)
        except Exception:  # e.g. out of memory part-way: no hook stays behind, and what moved goes back (weights
            # that a CPU offload beside a GPU already put on 'meta' cannot; that needs a failure after them)
            remove_hook_from_submodules(self)
            with torch.no_grad():
                for name, t in self.state_dict(keep_vars=True).items():
                    if name in devices and t.device != devices[name] and t.device.type != "meta":
                        t.data = t.data.to(devices[name])
            self.__dict__.pop("hf_device_map", None)
            raise

    def _refuse_offloaded_adapters(self, device_map: dict) -> None:
        # With a GPU in the map, accelerate offloads the modules mapped to "cpu": it hooks every module holding
        # parameters, adapter containers too, whose forward never runs, so their tensors would stay on 'meta'
        gpus = [d for d in device_map.values() if d not in ("cpu", "disk")]
        offloaded = [k for k, d in device_map.items() if d == "cpu"] if gpus else []
        held = {id(t) for name in self.peft_config for t in self.adapter_parameters(name).values()}
        adapter_names = {n for n, t in self.named_parameters() if id(t) in held}
        hit = sorted(k for k in offloaded if any(k == "" or n.startswith(k + ".") for n in adapter_names))
        if hit:
            raise ValueError(
                f"this device_map / max_memory offloads {hit[:4]}{' ...' if len(hit) > 4 else ''} to the CPU beside "
                f"{sorted(set(map(str, gpus)))}, and these hold adapter weights, which accelerate's offloading would "
                "leave unloaded. Load the base with transformers' from_pretrained(device_map=..., max_memory=...), "
                "then call PeftModel.from_pretrained(base, adapter_path): adapters then sit on each layer's device."
            )


def _peft_key(key: str) -> str:
    """A device_map key as a name in the PeftModel: keys of the base model (transformers' ``hf_device_map``:
    "model.layers.0", "lm_head") get the "base_model." prefix; "" and keys already in PeftModel terms stay."""
    return key if key == "" or key.startswith(("base_model.", "prompt_modules")) else f"base_model.{key}"


def _check_device(device) -> None:
    """Refuse a device this machine does not have before anything moves."""
    if device in ("cpu", "disk"):
        return
    try:
        dev = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device_map names {device!r}, which is not a device: use 'cpu', 'cuda', 'cuda:N' or an "
                         "index N") from err
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise ValueError(f"device_map names {device!r}, but this machine has {count} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device_map names {device!r}, but MPS is not available here")


def peft_options(autocast_adapter_dtype: bool = True, revision: Optional[str] = None,
                 ephemeral_gpu_offload: bool = False, key_mapping: Optional[dict] = None, mixed: bool = False) -> None:
    """Refuse PEFT's loading / wrapping arguments at values peftkit does not implement (at their defaults they mean
    what peftkit does anyway)."""
    if not autocast_adapter_dtype:
        raise ValueError("autocast_adapter_dtype=False (adapters in a bf16 / fp16 base's dtype) is not supported: "
                         "peftkit keeps float32 adapters over a bf16 / fp16 base, PEFT's default")
    if revision is not None:
        raise ValueError(f"revision={revision!r}: peftkit reads local directories only, never a hub; fetch that "
                         "revision first and pass its directory")
    if ephemeral_gpu_offload:
        raise ValueError("ephemeral_gpu_offload=True is not supported; place the base on the GPU (device_map) instead")
    if key_mapping:
        raise ValueError("key_mapping is not supported; peftkit reads PEFT's key names, which transformers' current "
                         "module names give")
    if mixed:
        raise ValueError("mixed=True (PEFT's PeftMixedModel) is not supported; add further adapters with add_adapter "
                         "and activate them with set_adapter([...])")


def _read_saved(model_id, subfolder: Optional[str], allow_pickle: bool, is_trainable: bool,
                config: Optional[PeftConfig] = None) -> tuple[str, PeftConfig, dict[str, torch.Tensor]]:
    """(directory, config, tensors) of a saved adapter, all read before the model is touched. The config is marked
    as standing for saved values (``_from_saved``): an init that needs data (LoRA's "eva") or a recorded
    selection (selective) is then allowed, since the saved tensors replace the initial ones."""
    directory = checkpoint.find_adapter_dir(os.fspath(model_id), subfolder)
    config = copy.deepcopy(as_config(config)) if config is not None else PeftConfig.from_pretrained(directory)
    tensors = checkpoint.load_tensors(directory, allow_pickle)
    config.inference_mode = not is_trainable
    config._from_saved = True
    return directory, config, tensors

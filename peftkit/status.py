"""What each adapter layer holds and does, in Hugging Face PEFT's report format (``get_layer_status`` /
``get_model_status``): a check, before training or serving, that the adapters are where, as active, as merged and
as trainable as the script meant them to be."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional, Union

import torch.nn as nn

from .inject import adapter_layers
from .layers import AdapterLayer, ModulesToSaveWrapper

if TYPE_CHECKING:
    from .model import PeftModel

Irregular = Literal["irregular"]  # a flag that differs between the parameters (or layers) it summarises


@dataclass
class TunerLayerStatus:
    """One adapter layer: ``name`` is its path in the wrapped model (PeftModel.base_model)."""

    name: str
    module_type: str  # "lora.Linear", "ia3.Linear", ..., "ModulesToSaveWrapper"
    enabled: bool  # False while the adapters are switched off (disable_adapter(), disable_adapter_layers())
    active_adapters: list[str]  # the active adapters this layer holds
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]  # per adapter: whether its parameters train
    available_adapters: list[str]
    devices: dict[str, list[str]]  # per adapter: the device types its tensors are on
    quantization_backend: Optional[str] = None  # PEFT's field; peftkit wraps no quantized layers


@dataclass
class TunerModelStatus:
    """The layers' status summed up over the model; a flag that differs between layers reads "irregular"."""

    base_model_type: str
    adapter_model_type: str  # PEFT's tuner name for the method: "LoraModel", "IA3Model", ...
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str] = None


_TUNER_NAMES = {"LORA": "LoraModel", "IA3": "IA3Model"}  # PEFT's names; peftkit's own methods: "<Type>Model"


def get_layer_status(model: "PeftModel") -> list[TunerLayerStatus]:
    """The status of every layer an adapter wraps, in module order. Prompt, prefix and P-tuning adapters wrap no
    layer: a model holding only those is refused, as in PEFT."""
    _check_has_layers(model)
    return [_layer_status(name, layer) for name, layer in adapter_layers(model.base_model)]


def get_model_status(model: "PeftModel") -> TunerModelStatus:
    """get_layer_status summed up: a flag every layer agrees on, or "irregular". An adapter counts as active (or
    merged) when it is so in every layer that holds it."""
    layers = get_layer_status(model)
    trainable, total = model.get_nb_trainable_parameters()
    available = sorted({name for layer in layers for name in layer.available_adapters})
    devices: dict[str, set[str]] = {}
    grads: dict[str, list] = {}
    for layer in layers:
        for name, kinds in layer.devices.items():
            devices.setdefault(name, set()).update(kinds)
        for name, flag in layer.requires_grad.items():
            grads.setdefault(name, []).append(flag)
    types = {name: config.peft_type for name, config in model.peft_config.items()}
    methods = sorted({types[name] for name in available if name in types})
    return TunerModelStatus(
        base_model_type=type(model.get_base_model()).__name__,
        adapter_model_type=(_TUNER_NAMES.get(methods[0], f"{methods[0].title()}Model") if len(methods) == 1
                            else "MixedModel"),
        peft_types=types, trainable_params=trainable, total_params=total, num_adapter_layers=len(layers),
        enabled=_agreed([layer.enabled for layer in layers]),
        active_adapters=_held_by_all(layers, "active_adapters"),
        merged_adapters=_held_by_all(layers, "merged_adapters"),
        requires_grad={name: _agreed(flags) for name, flags in grads.items()},
        available_adapters=available, devices={name: sorted(kinds) for name, kinds in devices.items()})


def _check_has_layers(model: "PeftModel") -> None:
    if not adapter_layers(model.base_model):
        if getattr(model, "prompt_modules", None):
            raise TypeError("get_layer_status() / get_model_status() report on adapters that wrap layers; prompt "
                            "tuning, P-tuning and prefix tuning wrap none (their adapters are in model.prompt_modules)")
        raise ValueError("no adapter layers found in the model: it holds no adapter (add one with get_peft_model or "
                         "load_adapter)")


def _layer_status(name: str, layer: AdapterLayer) -> TunerLayerStatus:
    grads, devices = {}, {}
    for adapter in layer.adapter_names:
        tensors = layer.adapter_tensors(adapter).values()
        grads[adapter] = _agreed([t.requires_grad for t in tensors if isinstance(t, nn.Parameter)])
        devices[adapter] = sorted({t.device.type for t in tensors})
    return TunerLayerStatus(
        name=name, module_type=_module_type(layer), enabled=not layer.disabled,
        active_adapters=list(layer.active_adapters), merged_adapters=list(layer.merged_adapters),
        requires_grad=grads, available_adapters=sorted(layer.adapter_names), devices=devices)


def _module_type(layer: AdapterLayer) -> str:
    """PEFT's names for LoRA's layers ("lora.Linear", also over GPT-2's Conv1D), and the same form for the rest."""
    if isinstance(layer, ModulesToSaveWrapper):
        return "ModulesToSaveWrapper"
    kind = type(layer.base_layer).__name__
    return f"{layer.peft_type.lower()}.{'Linear' if kind == 'Conv1D' else kind}"


def _agreed(flags: list) -> Union[bool, Irregular]:
    """True or False when every flag is that value (an empty list: False, nothing trains), else "irregular"."""
    if all(flag is True for flag in flags) and flags:
        return True
    return False if all(flag is False for flag in flags) else "irregular"


def _held_by_all(layers: list[TunerLayerStatus], field: str) -> Union[list[str], Irregular]:
    """The adapters that are active (or merged) in some layer, if each of them is so in every layer holding it;
    in the layers' order (the order set_adapter gave), merged ones sorted as in PEFT."""
    named = list(dict.fromkeys(name for layer in layers for name in getattr(layer, field)))
    named = sorted(named) if field == "merged_adapters" else named
    for layer in layers:
        if any(name in layer.available_adapters and name not in getattr(layer, field) for name in named):
            return "irregular"
    return named

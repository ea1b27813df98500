"""IA3 adapter arithmetic: ``add_weighted_adapter`` over IA3 adapters, PEFT's linear combination of the vectors.

At each module the new vector is sum_i w_i l_i over the sources that scale it. As in PEFT, a source that does not
scale a module adds nothing there, so a module only one source scales gets w l (not a mix with the identity 1).
The new adapter's targets and feed-forward modules are the union of the sources' (a regex is joined with "|").
"""
from __future__ import annotations

import dataclasses

import torch

from ..inject import adapter_layers
from .ia3 import IA3Layer


def add_weighted_ia3(model, adapters: list[str], weights: list[float], adapter_name: str) -> None:
    """Add IA3 adapter ``adapter_name`` to the PeftModel ``model``: ``adapters`` combined with ``weights``. The
    sources are IA3 adapters of ``model``, checked as such by PeftModel.add_weighted_adapter."""
    _check(model, adapters)
    configs = [model.peft_config[name] for name in adapters]
    model.add_adapter(adapter_name, dataclasses.replace(
        configs[0], target_modules=_union([c.target_modules for c in configs]),
        feedforward_modules=_union([c.feedforward_modules for c in configs]), inference_mode=False))
    try:
        with torch.no_grad():
            for path, layer in adapter_layers(model.base_model):
                if isinstance(layer, IA3Layer) and adapter_name in layer.ia3_l:
                    new = layer.ia3_l[adapter_name]
                    new.zero_()
                    for name, weight in zip(adapters, weights):
                        if name in layer.ia3_l:
                            if layer.ia3_l[name].shape != new.shape:
                                raise ValueError(f"{path!r} is a feed-forward module for the combined adapter but not "
                                                 f"for {name!r}; combine adapters that agree on feedforward_modules")
                            new.add_(layer.ia3_l[name].to(new.dtype), alpha=float(weight))
    except Exception:
        model.delete_adapter(adapter_name)  # nothing half-made stays behind
        raise


def _union(specs: list):
    """Target specs of one kind combined: lists united (sorted), regex strings joined as alternatives."""
    if all(spec is None for spec in specs):
        return None
    if all(isinstance(spec, str) for spec in specs):
        return "|".join(f"({spec})" for spec in specs)
    return sorted(set().union(*(spec or [] for spec in specs)))


def _check(model, adapters: list[str]) -> None:
    # IA3's own refusals, before any change (PeftModel.add_weighted_adapter checked what every method shares)
    # (layers_to_transform is resolved into full target names at injection: ia3._record_layers)
    excluded = [model.peft_config[name].exclude_modules for name in adapters]
    if any(v != excluded[0] for v in excluded):  # the union of targets is narrowed by one filter: it must be theirs
        raise ValueError(f"the adapters' exclude_modules differ ({excluded}); combine adapters that narrow their "
                         "targets alike (the combined adapter would scale modules no source scales, or drop some)")
    for field in ("target_modules", "feedforward_modules"):
        kinds = {type(getattr(model.peft_config[name], field)) for name in adapters}
        if str in kinds and len(kinds) > 1:  # a regex and a list cannot be united into one spec (PEFT's rule too)
            raise ValueError(f"the adapters' {field} mix a regex string and a list of names; give them one kind")
    for path, layer in adapter_layers(model.base_model):
        shapes = {tuple(layer.ia3_l[n].shape) for n in adapters if isinstance(layer, IA3Layer) and n in layer.ia3_l}
        if len(shapes) > 1:  # one scales the module's input, another its output
            raise ValueError(f"the adapters scale {path!r} on different sides (shapes {sorted(shapes)}): it is a "
                             "feed-forward module in some of them only; combine adapters that agree on it")

"""Names that Hugging Face PEFT users import, with PEFT's meaning: the TaskType / PeftType enums and the adapter
state-dict functions (training scripts that save through DeepSpeed, FSDP or accelerate call them)."""
from __future__ import annotations

import enum
from typing import Optional

import torch

from .model import PeftModel


class TaskType(str, enum.Enum):
    """PEFT's task types; a config's ``task_type`` takes these or the same strings."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    """The methods peftkit has, by the ``peft_type`` names adapter_config.json records (PEFT's where PEFT has the
    method; BOTTLENECK and SELECTIVE are peftkit's own)."""

    LORA = "LORA"
    IA3 = "IA3"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    BOTTLENECK = "BOTTLENECK"
    SELECTIVE = "SELECTIVE"


def get_peft_model_state_dict(model: PeftModel, state_dict: Optional[dict] = None,
                              adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """One adapter's tensors keyed as save_pretrained writes them (PEFT's keys: the adapter name left out).

    ``state_dict``: a full state dict of ``model`` (``model.state_dict()``, or one gathered by DeepSpeed / FSDP),
    whose tensors are taken instead of the live ones."""
    _check_peft_model(model, "get_peft_model_state_dict")
    if adapter_name not in model.peft_config:
        raise ValueError(f"no adapter named {adapter_name!r}; this model has {sorted(model.peft_config)}")
    tensors = model.adapter_parameters(adapter_name)
    if state_dict is None:
        return {key: tensor.detach() for key, tensor in tensors.items()}
    names = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
    missing = [key for key, t in tensors.items() if names.get(id(t)) not in state_dict]
    if missing:
        raise ValueError(f"state_dict lacks {missing[0]!r} ({len(missing)} adapter tensors in all) under this model's "
                         f"own key {names.get(id(tensors[missing[0]]))!r}; pass a state dict of this PeftModel "
                         "(model.state_dict())")
    return {key: state_dict[names[id(t)]] for key, t in tensors.items()}


def set_peft_model_state_dict(model: PeftModel, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default"):
    """Copy an adapter's tensors, keyed as get_peft_model_state_dict / save_pretrained give them, into the adapter
    ``adapter_name`` of ``model``. Strict, unlike PEFT's: a missing, unexpected or misshapen key is refused, naming
    it, and nothing is copied. Returns torch's (missing_keys, unexpected_keys) pair, both empty."""
    _check_peft_model(model, "set_peft_model_state_dict")
    if adapter_name not in model.peft_config:
        raise ValueError(f"no adapter named {adapter_name!r}; this model has {sorted(model.peft_config)} (add one "
                         "with add_adapter first)")
    model._fill(adapter_name, dict(peft_model_state_dict), "the state dict given to set_peft_model_state_dict")
    return torch.nn.modules.module._IncompatibleKeys([], [])


def _check_peft_model(model, what: str) -> None:
    if not isinstance(model, PeftModel):
        raise TypeError(f"{what} takes a peftkit PeftModel (from get_peft_model or PeftModel.from_pretrained), "
                        f"not a {type(model).__name__}")

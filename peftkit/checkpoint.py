"""The only place that knows on-disk names: safetensors I/O, PEFT key names, atomic writes, safe loading."""
from __future__ import annotations

import os
import tempfile
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .inject import adapter_layers

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
DISK_PREFIX = "base_model.model."  # PEFT's PeftModel.base_model (tuner) .model (user model)
# Internal per-adapter attributes that PEFT stores as an nn.Linear/nn.Conv weight: the key gets ".weight".
_MODULE_WEIGHT_ATTRS = {"lora_A", "lora_B"}


def disk_key(path: str) -> str:
    """PEFT's key for the internal dotted ``path`` (adapter name already removed)."""
    owner, _, attr = path.rpartition(".")
    suffix = attr + ".weight" if attr in _MODULE_WEIGHT_ATTRS else attr
    return DISK_PREFIX + (f"{owner}.{suffix}" if owner else suffix)


def adapter_tensors(model: nn.Module, adapter_name: str, extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of one adapter under its on-disk key (the live tensors, not copies)."""
    out = {disk_key(path): tensor for path, tensor in extras.items()}
    for path, layer in adapter_layers(model):
        for attr, tensor in layer.adapter_tensors(adapter_name).items():
            out[disk_key(f"{path}.{attr}")] = tensor
    return out


def save_tensors(tensors: dict[str, torch.Tensor], directory: str) -> str:
    """Write ``adapter_model.safetensors`` atomically (temp file + rename)."""
    data = _cpu_copies(tensors)
    return _atomic_file(os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(data, tmp, metadata={"format": "pt"}))


def save_pickle(tensors: dict[str, torch.Tensor], directory: str) -> str:
    """Write ``adapter_model.bin`` (torch.save) atomically, for tools that want the old format."""
    data = _cpu_copies(tensors)
    return _atomic_file(os.path.join(directory, PICKLE_NAME), lambda tmp: torch.save(data, tmp))


def _cpu_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # independent contiguous copies: safetensors refuses shared or strided storage
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _atomic_file(path: str, write) -> str:
    # write to a temp name in the same directory, fsync, then rename over the target
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: str, text: str) -> None:
    """Write a text file so a crash leaves either the old file or the new one, never half of one."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    _atomic_file(path, write)


def load_tensors(directory: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read an adapter's weights: safetensors, or a pickle ``.bin`` only when ``allow_pickle``."""
    safe = os.path.join(directory, WEIGHTS_NAME)
    pickle = os.path.join(directory, PICKLE_NAME)
    if os.path.isfile(safe):
        try:
            return load_file(safe, device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"cannot read {safe}: the file is truncated or corrupt ({err}). Re-save the adapter.") from err
    if os.path.isfile(pickle):
        if not allow_pickle:
            raise ValueError(
                f"{directory} holds only {PICKLE_NAME}, a pickle file that can run code when loaded. "
                "Pass allow_pickle=True if you trust its source, or convert it to safetensors."
            )
        try:
            return torch.load(pickle, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a bad pickle
            raise ValueError(f"cannot read {pickle}: {err}") from err
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}; is this an adapter directory written by save_pretrained?")


def check_fit(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], directory: str) -> None:
    """Refuse a checkpoint whose keys or shapes do not fit, naming the first offending key."""
    for key, tensor in expected.items():
        if key not in found:
            raise ValueError(f"adapter in {directory} lacks tensor {key!r} that this model's adapter needs; "
                             "was it saved for another model or another config?")
        if tuple(found[key].shape) != tuple(tensor.shape):
            raise ValueError(f"adapter in {directory}: tensor {key!r} has shape {tuple(found[key].shape)} but the "
                             f"model expects {tuple(tensor.shape)}; the adapter was trained on a different model or rank")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ValueError(f"adapter in {directory} has tensor {extra[0]!r} ({len(extra)} unexpected in all) that matches "
                         "no module of this model; was it saved for another model?")


def copy_into(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    """Copy checked tensors into the live ones (casting dtype, moving device)."""
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(found[key].to(device=tensor.device, dtype=tensor.dtype))


def find_adapter_dir(path: str, subfolder: Optional[str]) -> str:
    """The directory holding the adapter files, or a clear error."""
    directory = os.path.join(path, subfolder) if subfolder else os.fspath(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"adapter directory {directory!r} does not exist")
    return directory


"""The only place that knows on-disk names: safetensors I/O, PEFT key names, atomic writes, safe loading."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Callable, Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .inject import adapter_layers
from .layers import ModulesToSaveWrapper

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
DISK_PREFIX = "base_model.model."  # PEFT's PeftModel.base_model (tuner) .model (user model)
# Internal per-adapter attributes that PEFT stores as an nn.Linear/nn.Conv weight: the key gets ".weight".
_MODULE_WEIGHT_ATTRS = {"lora_A", "lora_B"}
# PEFT saves the full base weight of a targeted input/output embedding beside the adapter (its
# save_embedding_layers="auto"), so an adapter trained on a resized vocabulary carries the new rows.
EMBEDDING_NAMES = ("embed_tokens", "lm_head")


def prompt_method_key(key: str) -> str:
    """A prompt method's key as PEFT writes it: there PeftModel.base_model is the user's model itself (no tuner in
    between), so a trained head is "base_model.classifier.weight", not "base_model.model.classifier.weight"."""
    return "base_model." + key[len(DISK_PREFIX):] if key.startswith(DISK_PREFIX) else key


def disk_key(path: str) -> str:
    """PEFT's key for the internal dotted ``path`` (adapter name already removed)."""
    owner, _, attr = path.rpartition(".")
    suffix = attr + ".weight" if attr in _MODULE_WEIGHT_ATTRS else attr
    return DISK_PREFIX + (f"{owner}.{suffix}" if owner else suffix)


def adapter_tensors(model: nn.Module, adapter_name: str, extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of one adapter under its on-disk key (the live tensors, not copies)."""
    heads = [path for path, layer in adapter_layers(model) if isinstance(layer, ModulesToSaveWrapper)]
    out = {disk_key(_head_inner_path(path, heads, adapter_name)): tensor for path, tensor in extras.items()}
    for path, layer in adapter_layers(model):
        for attr, tensor in layer.adapter_tensors(adapter_name).items():
            out[layer_key(path, attr)] = tensor
    return out


def layer_key(path: str, attr: str) -> str:
    """The disk key of adapter tensor ``attr`` of the layer at ``path``, named as if no other adapter wrapped a block
    above it: a layer's own path holds "base_layer" only from such a wrapper (a bottleneck adapter around
    self_attn), and the adapter's keys must not depend on it."""
    return disk_key(f"{path.replace('.base_layer.', '.')}.{attr}")


def _head_inner_path(path: str, heads: list[str], adapter_name: str) -> str:
    # PEFT's names inside a trained head: original_module (ours: base_layer), modules_to_save without the adapter
    for head in heads:
        for inner, disk in ((f"{head}.base_layer.", f"{head}.original_module."),
                            (f"{head}.modules_to_save.{adapter_name}.", f"{head}.modules_to_save.")):
            if path.startswith(inner):
                return disk + path[len(inner):]
    return path


PROMPT_KEY = "prompt_embeddings"  # PEFT's one key for a prompt-learning adapter (no base_model.model. prefix)


def prompt_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A prompt method's tensor under PEFT's key: the virtual-token embeddings (an encoder's output)."""
    return {PROMPT_KEY: module.prompt_embeddings()}


def embedding_tensors(model: nn.Module, target_modules) -> dict[str, torch.Tensor]:
    """Base weights of the wrapped input/output embeddings, keyed as PEFT saves them; empty unless targeted."""
    if not _targets_embedding(model, target_modules):
        return {}
    getters = [getattr(model, g, None) for g in ("get_input_embeddings", "get_output_embeddings")]
    embeddings = [get() for get in getters if callable(get)]
    out = {}
    for path, layer in adapter_layers(model):
        if any(layer is e for e in embeddings) and not isinstance(layer, ModulesToSaveWrapper):
            for name, tensor in layer.base_layer.state_dict(keep_vars=True).items():
                out[disk_key(f"{path}.base_layer.{name}")] = tensor
    return out


def _targets_embedding(model: nn.Module, target_modules) -> bool:
    # PEFT's test: a list naming embed_tokens / lm_head, or a regex matching a module called so
    if isinstance(target_modules, str):
        return any(re.fullmatch(target_modules, n) for n, _ in model.named_modules()
                   if n.rsplit(".", 1)[-1] in EMBEDDING_NAMES)
    return any(n in (target_modules or ()) for n in EMBEDDING_NAMES)


def save_adapter_files(directory: str, tensors: dict[str, torch.Tensor], config_json: str,
                       safe_serialization: bool = True) -> None:
    """Write one adapter's weights (safetensors, or a pickle ``.bin``) and ``adapter_config.json`` together.

    Both are written in full to temp names first; only then are they renamed into place, weights first,
    config last. A crash while writing leaves the old adapter as it was; only one between the two renames,
    back to back, can leave new weights beside the old config. The other format's weights file, left by an
    earlier save, is removed once both are written and before either is renamed (loading would prefer a stale
    ``.safetensors`` to a new ``.bin``, and beside the new config it would load silently wrong).
    """
    from .config import CONFIG_NAME

    data = _cpu_copies(tensors)
    weights, stale = (WEIGHTS_NAME, PICKLE_NAME) if safe_serialization else (PICKLE_NAME, WEIGHTS_NAME)
    write = (lambda tmp: save_file(data, tmp, metadata={"format": "pt"})) if safe_serialization else (
        lambda tmp: torch.save(data, tmp))
    write_together({os.path.join(directory, weights): write,
                    os.path.join(directory, CONFIG_NAME): lambda tmp: _write_text(tmp, config_json)},
                   remove=[os.path.join(directory, stale)])


def write_together(files: dict[str, Callable[[str], None]], remove: Sequence[str] = ()) -> None:
    """``write(tmp)`` for each path (in order) to a temp name beside it, fsynced; then delete the ``remove`` paths
    that exist, then rename each file into place."""
    staged: list[tuple[str, str]] = []
    try:
        for path, write in files.items():
            staged.append((_stage(path, write), path))
        for path in remove:
            if os.path.lexists(path):
                os.remove(path)
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)


def _stage(path: str, write: Callable[[str], None]) -> str:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; a saved file gets the usual permissions
    except BaseException:
        os.remove(tmp)
        raise
    return tmp


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _cpu_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # independent contiguous copies: safetensors refuses shared or strided storage
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def atomic_file(path: str, write: Callable[[str], None]) -> str:
    """Call ``write(tmp)`` on a temp name in ``path``'s directory, fsync, then rename it over ``path``."""
    write_together({path: write})
    return path


def atomic_dir(path: str, write: Callable[[str], None]) -> str:
    """Call ``write(tmp)`` on a fresh directory beside ``path``, fsync what it wrote, then rename it to ``path``.

    ``path`` must not exist or be an empty directory (a symlink to one is followed); anything else is refused
    before ``write`` runs. An error inside ``write`` removes the partial directory; a killed process can leave a
    hidden ``.<name>.partial-*`` beside ``path``, never a half-written ``path``.
    """
    target = os.path.realpath(path)
    if os.path.exists(target) and not (os.path.isdir(target) and not os.listdir(target)):
        raise FileExistsError(f"{path!r} exists and is not an empty directory; pass a new or empty directory")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.partial-", dir=parent)
    try:
        write(tmp)
        _fsync_tree(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        if os.path.isdir(target):
            try:
                os.rmdir(target)  # an empty target is replaced (os.replace onto a directory is POSIX-only)
            except OSError as err:  # the working directory, a mount point, ...
                raise OSError(f"cannot replace the empty directory {path!r} ({err.strerror}); pass a path that "
                              "does not exist yet") from err
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _fsync_tree(directory: str) -> None:
    # every file written, then the directory itself: the rename must not land before the data
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def atomic_write_text(path: str, text: str) -> None:
    """Write a text file so a crash leaves either the old file or the new one, never half of one."""
    atomic_file(path, lambda tmp: _write_text(tmp, text))


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


def with_named_copies(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``found`` with a head copy's tensor that PEFT saved with the adapter's name left in its key (bias="all" with
    a non-leaf modules_to_save: '...pooler.modules_to_save.default.dense.bias') renamed to the key it loads by."""
    renamed = {}
    for key in expected:
        if key not in found and ".modules_to_save." in key:
            head, rest = key.split(".modules_to_save.", 1)
            named = [k for k in found if k.startswith(head + ".modules_to_save.") and k.endswith("." + rest)
                     and k.count(".") == key.count(".") + 1]
            if len(named) == 1:
                renamed[named[0]] = key
    return {renamed.get(k, k): v for k, v in found.items()} if renamed else found


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
    if subfolder is not None and not isinstance(subfolder, (str, os.PathLike)):
        raise TypeError(f"subfolder must be a folder name, not {subfolder!r}; PEFT's other arguments (autocast_adapter_"
                        "dtype, torch_device, ...) go by keyword here")
    directory = os.path.join(path, subfolder) if subfolder else os.fspath(path)
    if not os.path.isdir(directory):
        hint = ""
        if subfolder and re.fullmatch(r"(cpu|mps|cuda|xpu)(:\d+)?", os.fspath(subfolder)):
            hint = f"; subfolder={subfolder!r} looks like a device: PEFT's torch_device goes by keyword here"
        raise FileNotFoundError(f"adapter directory {directory!r} does not exist{hint}")
    return directory


"""Lossless compact storage of the selective adapter's sorted indices (and optional low-precision values).

Indices are strictly increasing (flat weight entries, or output rows). On disk each module's indices take the
smaller of two forms, told apart by dtype, both decoded exactly:

- ``uint8``: a gap stream. gap_i = index_i - index_{i-1} - 1 (index_{-1} = -1), so every gap is >= 0, written
  as LEB128 varints (7 bits per byte, high bit = "more bytes follow"). At 1% density gaps average ~100,
  so most take one byte: ~1.3 bytes per index instead of 8.
- ``int16`` / ``int32``: the raw indices, when the module is small enough that they fit and that is shorter.

The old format (raw ``int64``) still loads. Encoding and decoding are vectorised (no Python loop per index).
"""
from __future__ import annotations

from typing import Optional

import torch

INDEX_KEY = "selective_indices"
VALUES_KEY = "selective_values"
SAVE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_MAX_BYTES = 10  # a LEB128 varint of a 64-bit value takes at most 10 bytes


def encode_gaps(index: torch.Tensor) -> torch.Tensor:
    """Strictly increasing int64 indices (k,) -> uint8 LEB128 stream of the gaps minus one."""
    index = index.detach().to("cpu", torch.int64)
    gaps = torch.diff(index, prepend=index.new_full((1,), -1)) - 1  # (k,) >= 0
    if gaps.numel() and int(gaps.min()) < 0:
        raise ValueError("selective indices must be strictly increasing to be gap-coded")
    shifts = 7 * torch.arange(_MAX_BYTES)
    groups = (gaps[:, None] >> shifts) & 0x7F  # (k, 10) 7-bit groups, least significant first
    length = torch.clamp((gaps[:, None] >> shifts > 0).sum(dim=1), min=1)  # (k,) bytes per gap
    used = torch.arange(_MAX_BYTES) < length[:, None]  # (k, 10)
    more = torch.arange(_MAX_BYTES) < (length - 1)[:, None]  # continuation bit on all but the last byte
    return (groups | (more.long() << 7))[used].to(torch.uint8)


def decode_gaps(stream: torch.Tensor) -> torch.Tensor:
    """The inverse of ``encode_gaps``: uint8 stream -> strictly increasing int64 indices."""
    data = stream.to(torch.int64).flatten()
    if data.numel() == 0:
        return data
    last = (data & 0x80) == 0  # (n,) the final byte of each varint
    if not bool(last[-1]):
        raise ValueError("selective index stream is truncated (its last byte says more bytes follow)")
    group = torch.cumsum(last.long(), 0) - last.long()  # (n,) which varint each byte belongs to
    starts = torch.nonzero(torch.cat([last.new_ones(1), last[:-1]])).flatten()  # first byte of each varint
    position = torch.arange(data.numel()) - starts[group]  # (n,) byte number inside its varint
    if int(position.max()) >= 9:
        raise ValueError("selective index stream has a varint longer than 9 bytes; the file is corrupt")
    gaps = torch.zeros(int(last.sum()), dtype=torch.int64).index_add_(0, group, (data & 0x7F) << (7 * position))
    return torch.cumsum(gaps + 1, 0) - 1


def encode_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """The shortest exact form of sorted indices into ``size`` units: a uint8 gap stream or int16/int32 raw."""
    stream = encode_gaps(index)
    raw_dtype = torch.int16 if size <= 2 ** 15 else torch.int32 if size <= 2 ** 31 else torch.int64
    raw_bytes = index.numel() * torch.empty(0, dtype=raw_dtype).element_size()
    if raw_bytes < stream.numel():
        return index.detach().to("cpu", raw_dtype)
    return stream


def decode_index(stored: torch.Tensor) -> torch.Tensor:
    """int64 indices from any stored form: uint8 gap stream, or raw int16 / int32 / int64 (the old format)."""
    if stored.dtype == torch.uint8:
        return decode_gaps(stored)
    if stored.dtype in (torch.int16, torch.int32, torch.int64):
        return stored.to(torch.int64)
    raise ValueError(f"selective indices stored as {stored.dtype}; expected uint8 (gap-coded) or int16/32/64")


def pack(tensors: dict[str, torch.Tensor], sizes: dict[str, int], save_dtype: Optional[str]) -> dict[str, torch.Tensor]:
    """The adapter's tensors as written: indices compacted (``sizes``: units per index key), values cast if asked."""
    out = {}
    for key, tensor in tensors.items():
        if key.endswith(INDEX_KEY):
            out[key] = encode_index(tensor, sizes[key])
        elif key.endswith(VALUES_KEY) and save_dtype is not None:
            out[key] = tensor.detach().to(SAVE_DTYPES[save_dtype])
        else:
            out[key] = tensor
    return out


def unpack(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A loaded file with every index key decoded to int64 (other tensors untouched)."""
    return {k: decode_index(v) if k.endswith(INDEX_KEY) else v for k, v in tensors.items()}

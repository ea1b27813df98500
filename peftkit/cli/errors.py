"""CLI errors and how any exception becomes one line and an exit code."""
from __future__ import annotations

import errno
import json


class CliError(Exception):
    """An error the command reports as one line; ``code`` 2 = usage error, 1 = runtime error."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _interrupted_types() -> tuple[type, ...]:
    try:
        from ..train import TrainingInterrupted
    except ImportError:
        return (KeyboardInterrupt,)
    return (KeyboardInterrupt, TrainingInterrupted)


def describe(err: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) for an exception reaching the top level."""
    if isinstance(err, CliError):
        return str(err), err.code
    if isinstance(err, _interrupted_types()):
        text = str(err) if str(err) else "interrupted"
        return text.splitlines()[0], 130
    if isinstance(err, ImportError):
        text = " ".join(str(err).split())
        return (text if "pip install" in text else f"{text} (install the demo extra: pip install 'peftkit[demo]')"), 1
    if isinstance(err, KeyError):  # str(KeyError) is the repr of the key; say what it is
        return f"missing key {err.args[0]!r}" if err.args else "missing key", 1
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON: {err}", 1
    text = " ".join(str(err).split()) or type(err).__name__
    if _disk_full(err, text):  # torch.save on a full disk says only "[enforce fail ...] unexpected pos 64 vs 0"
        return f"no space left on the device while writing ({text}); free some space or write elsewhere, then run " \
               "again (a killed training run goes on with --resume)", 1
    if isinstance(err, (ValueError, TypeError, FileNotFoundError, FileExistsError, OSError, RuntimeError)):
        return text, 1
    return f"{type(err).__name__}: {text} (run with --debug for the traceback)", 1


def _disk_full(err: BaseException, text: str) -> bool:
    """Whether ``err`` is a write that ran out of disk: ENOSPC, or torch's archive writer's short-write assert."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    if ("No space left on device" in text or "os error 28" in text) and "shared memory" not in text:
        return True  # safetensors' SafetensorError, other wrappers (not torch's shared-memory error: not the disk)
    return isinstance(err, RuntimeError) and "inline_container" in text and "unexpected pos" in text

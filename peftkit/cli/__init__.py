"""The ``peftkit`` command: train, eval, predict, generate, merge, inspect, compare, serve.

Flags for the job's data, training and method fields are generated from the config dataclasses
(see flags.py). Errors print one line on stderr and exit non-zero: 2 for usage errors, 1 for runtime
errors, 130 for Ctrl-C; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import ctypes
import difflib
import re
import sys
from typing import Optional

from .errors import CliError

DEFAULT_OUTPUT_DIR = "peftkit-run"
# options the commands define themselves; a config field wanting one of these names is a collision
RESERVED = ("--help", "--debug", "--config", "--output-dir", "--overwrite", "--resume", "--print-config", "--model",
            "--method", "--quiet", "--adapter", "--split", "--json", "--input", "--output", "--prompt",
            "--max-new-tokens", "--methods", "--low-data", "--limit", "--use-template", "--in-process", "--full-lr",
            "--method-lr")


class _Parser(argparse.ArgumentParser):
    """argparse that raises CliError (one line, exit 2) instead of printing usage and exiting, and that takes a
    negative number in exponent form as a value (argparse's own pattern knows only -1 and -0.5, so --lr -1e-3 was
    "expected one argument")."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str):  # type: ignore[override]
        raise CliError(f"{message} (see `{self.prog} --help`)", 2)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def build_parser() -> tuple[argparse.ArgumentParser, list]:
    """The full parser and the generated config flags."""
    from . import commands
    from .flags import add_flags, config_flags, method_classes_from_registry
    from ..train import DataConfig, TrainConfig

    methods = method_classes_from_registry()
    flags = config_flags(DataConfig, TrainConfig, methods, RESERVED)
    parser = _Parser(prog="peftkit", description="Parameter-efficient fine-tuning from the command line.")
    _add_common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    classes = {"data": DataConfig, "train": TrainConfig}
    parser.set_defaults(subparsers={})
    for name, setup in commands.all_commands().items():
        cmd = setup.add_parser(sub)
        parser.get_default("subparsers")[name] = cmd
        _add_common(cmd)
        picked = [f for f in flags if f.group in setup.groups]
        add_flags(cmd, picked, {g: c for g, c in classes.items() if g in setup.groups},
                  methods if "peft" in setup.groups else {})
        cmd.set_defaults(handler=setup.run)
    return parser, flags


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser, flags = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            _refuse_unknown(unknown, args.subparsers[args.command])
        if args.command in TRAINING_COMMANDS:
            keep_freed_memory()
        return int(args.handler(args, flags) or 0)
    except SystemExit as done:  # --help / --version
        return int(done.code or 0) if not isinstance(done.code, str) else 2
    except BaseException as err:  # noqa: BLE001  (the one place that turns errors into exit codes)
        if debug and not isinstance(err, SystemExit):
            raise
        return _report(err)


TRAINING_COMMANDS = ("train", "compare")  # the ones that set keep_freed_memory(); a long-lived serve does not
# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 * 2**20, 2**30


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse in this process; False where there is no glibc mallopt.

    A training step frees and re-allocates hundreds of MB of activations. With glibc's defaults, memory freed
    at the top of the heap goes back to the OS and blocks up to 32 MB are fresh mmaps, so the next step
    page-faults it all back in: on the 135M-shaped LoRA benchmark 213k faults and 1.40 s per step, against
    99k faults and 1.34 s with these settings (bench/train_step.py with and without --default-malloc). Only the training
    commands do this: they own their process; a library import does not change its host's allocator, and a
    long-lived ``serve`` should give memory back.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries without glibc's mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def _refuse_unknown(unknown: list[str], command: argparse.ArgumentParser) -> None:
    """A usage error for arguments ``command`` does not take, naming its own --help and the closest flag."""
    flags = [o for action in command._actions for o in action.option_strings]
    first = next((u for u in unknown if u.startswith("--")), unknown[0]).split("=")[0]
    close = difflib.get_close_matches(first, flags, n=1, cutoff=0.75)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise CliError(f"unrecognized arguments: {' '.join(unknown)}{hint} (see `{command.prog} --help`)", 2)


def _report(err: BaseException) -> int:
    from .errors import describe

    message, code = describe(err)
    print(f"peftkit: error: {message}" if code != 130 else f"peftkit: {message}", file=sys.stderr)
    return code

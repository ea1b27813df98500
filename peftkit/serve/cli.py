"""`peftkit serve` flags and entry point (FastAPI / uvicorn are imported only when the server starts)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Optional

from .limits import ServeLimits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the server's flags to ``parser``."""
    defaults = ServeLimits()
    parser.add_argument("--model", required=True,
                        help="base model: a local directory / .gguf file, or the embedded name 'smollm2-135m'")
    parser.add_argument("--adapters", default=None, metavar="DIR",
                        help="directory whose subdirectories (each with adapter_config.json) are served by name")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--base-name", default="base", help="the `model` name that selects the plain base model")
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch,
                        help="most requests run together in one mixed-adapter generate call")
    parser.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_ms,
                        help="how long the first queued request waits for others to join its batch")
    parser.add_argument("--max-tokens-limit", type=int, default=defaults.max_tokens_limit,
                        help="refuse requests asking for more max_tokens (400)")
    parser.add_argument("--default-max-tokens", type=int, default=defaults.default_max_tokens,
                        help="max_tokens of a request that gives none")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                        help="refuse larger request bodies (413)")
    parser.add_argument("--max-concurrency", type=int, default=defaults.max_concurrency,
                        help="requests admitted at once (queued or running); one more gets 503")
    parser.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens,
                        help="refuse longer prompts (400)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def limits_from_args(args: argparse.Namespace) -> ServeLimits:
    """The ServeLimits the flags describe; a bad combination is refused in the flags' names."""
    names = [f.name for f in dataclasses.fields(ServeLimits)]
    try:
        return ServeLimits(**{name: getattr(args, name) for name in names})
    except ValueError as err:
        message = str(err)
        for name in sorted(names, key=len, reverse=True):  # longest first: max_tokens_limit before max_tokens
            message = re.sub(rf"(ServeLimits\.)?\b{name}\b", f"--{name.replace('_', '-')}", message)
        raise ValueError(message) from None


def load_base(name_or_path: str, device: Optional[str] = None):
    """(model, tokenizer) in eval mode on ``device``: peftkit.train's loader when present, else transformers."""
    import torch

    try:
        from ..train.models import load_model
    except ImportError:  # the training package is optional here: a local directory is enough to serve
        load_model = None
    if load_model is not None:
        model, tokenizer = load_model(name_or_path, "sft")
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not os.path.isdir(name_or_path):
            raise ValueError(f"model {name_or_path!r} is not a local directory; pass one saved by save_pretrained")
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def main(args: argparse.Namespace) -> int:
    """Load the model and adapters, then serve until interrupted; the exit status."""
    import uvicorn

    from .app import build_app

    try:
        limits = limits_from_args(args)
        model, tokenizer = load_base(args.model, args.device)
        app = build_app(model, tokenizer, args.adapters, limits, args.base_name)
    except (ValueError, OSError) as exc:
        print(f"peftkit serve: error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0

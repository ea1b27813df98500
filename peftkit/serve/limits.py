"""ServeLimits: the server's batching knobs and request limits (no web imports, so the CLI can read the defaults)."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class ServeLimits:
    """Batching settings and per-request limits of ``peftkit serve``."""

    max_batch: int = 16  # most requests run together in one generate call
    batch_wait_ms: float = 5.0  # how long the batcher waits for more requests after the first one arrives
    max_tokens_limit: int = 512  # a request asking for more max_tokens is refused (400)
    default_max_tokens: int = 16  # max_tokens when a request gives none (OpenAI's default for completions)
    max_body_bytes: int = 1_000_000  # larger request bodies are refused (413)
    max_concurrency: int = 64  # requests admitted and not yet answered; one more is refused (503)
    max_prompt_tokens: int = 4096  # longer prompts are refused (400)

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_tokens_limit", "default_max_tokens", "max_body_bytes",
                     "max_concurrency", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeLimits.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.batch_wait_ms < math.inf:  # NaN fails too: the batcher spun on it (inf killed it)
            raise ValueError(f"ServeLimits.batch_wait_ms must be a finite number >= 0, got {self.batch_wait_ms}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"ServeLimits.default_max_tokens ({self.default_max_tokens}) exceeds "
                             f"max_tokens_limit ({self.max_tokens_limit}); lower it or raise the limit")

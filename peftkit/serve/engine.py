"""Engine: one base model, its named adapters, and a batcher thread that runs queued requests as mixed batches.

Every model call (generate, adapter load / unload) happens under one lock; generation runs on the batcher
thread, so the web server's event loop never blocks on the model. A batch groups requests with the same
sampling settings into ONE ``generate(..., adapter_names=[...])`` call over left-padded prompts; greedy rows
then equal what each prompt gives alone with its adapter. Streaming and seeded requests run alone.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..model import BASE_ADAPTER, PeftModel
from .limits import ServeLimits


class ServeError(Exception):
    """A request the server refuses; becomes an OpenAI-shaped error with this HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


@dataclass
class Sampling:
    """How one request picks tokens: temperature 0 is greedy; seeded requests run alone (reproducible)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.temperature < GREEDY_BELOW:  # sampling's limit as the temperature falls to 0; logits / 1e-45 are
            self.temperature = 0.0  # inf, and the probabilities NaN (a 500)


GREEDY_BELOW = 1e-6  # temperatures below this decode greedily


@dataclass
class Generated:
    """A request's new tokens (cut at end-of-sequence and max_tokens) and why generation ended."""

    tokens: list[int]
    finish_reason: str  # "stop" (end-of-sequence) or "length" (max_tokens reached)


class TokenStream(BaseStreamer):
    """Receives generate()'s new tokens on the batcher thread and hands them to an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()  # set by the reader (stop string seen, client gone): generation ends
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        """generate() calls this first with the prompt (skipped), then with each new token."""
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        """generate() is done: None tells the reader; the final Generated comes through the job's future."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class _Cancelled(StoppingCriteria):
    """Stops generation once the stream's reader has set its cancel event."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class Job:
    """One queued request: prompt ids, the adapter (or BASE_ADAPTER) and generation settings."""

    id: str
    adapter: str
    input_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stream: Optional[TokenStream] = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    loaded: Optional[int] = None  # which load of its adapter the request was queued for (set by Engine.submit)

    def group_key(self, solo: bool) -> tuple:
        """Jobs with equal keys may share one generate call."""
        if self.stream is not None or self.sampling.seed is not None:
            return ("alone", self.id)
        settings = (self.sampling.temperature, self.sampling.top_p if self.sampling.temperature > 0 else 1.0)
        return ("solo", self.adapter) + settings if solo else settings


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as (input_ids, attention_mask), both (batch, longest), padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


class Engine:
    """The model, its adapters and the batcher thread; thread-safe entry points for the web app."""

    def __init__(self, model: torch.nn.Module, tokenizer, adapters_dir: Optional[str] = None,
                 limits: Optional[ServeLimits] = None, base_name: str = "base") -> None:
        self.peft: Optional[PeftModel] = model if isinstance(model, PeftModel) else None
        self.base = model.base_model if isinstance(model, PeftModel) else model
        (self.peft if self.peft is not None else self.base).eval()  # the PeftModel's too: a prompt encoder's dropout
        self.tokenizer = tokenizer
        self.adapters_dir = adapters_dir
        self.limits = limits or ServeLimits()
        self.base_name = base_name
        self.device = next(self.base.parameters()).device
        self.pad_id = _pad_id(tokenizer, self.base)
        self.eos_ids = _eos_ids(tokenizer, self.base)
        self.lock = threading.Lock()  # held for every model call and adapter change
        self.gate = threading.Event()  # cleared = batcher paused before taking work (tests use pause / resume)
        self.gate.set()
        self._cond = threading.Condition()
        self._pending: list[Job] = []
        self._closing = False
        self._solo: set[str] = set()  # adapters whose method cannot join a mixed batch (prompt methods)
        self._names: tuple[str, ...] = ()  # a snapshot the event loop reads while the lock holder changes adapters
        self._ids = itertools.count(1)
        self._loads: dict[str, int] = {}  # adapter name -> the number of its current load (a reload gets a new one)
        self._load_numbers = itertools.count(1)
        self.stats = {"requests": 0, "batches": 0, "errors": 0, "max_batch_size": 0}
        self.batch_log: deque = deque(maxlen=256)  # {"size", "ids", "adapters"} per generate call
        if self.peft is not None:
            self.peft._activate([])  # see _classify
            for name in list(self.peft.peft_config):
                self._classify(name)
                self._loads[name] = next(self._load_numbers)
            self._refresh_names()
        if adapters_dir:
            self._load_directory(adapters_dir)
        self._thread = threading.Thread(target=self._loop, name="peftkit-serve-batcher", daemon=True)
        self._thread.start()

    # --- adapters -------------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        """Loaded adapters, sorted (the base model is not among them)."""
        return list(self._names)

    def _refresh_names(self) -> None:
        self._names = tuple(sorted(self.peft.peft_config)) if self.peft is not None else ()

    def resolve(self, model: str) -> str:
        """A request's ``model`` field as the name generate() takes; 404 listing the known names."""
        if model == self.base_name:
            return BASE_ADAPTER
        if model in self.adapter_names():
            return model
        known = [self.base_name] + self.adapter_names()
        raise ServeError(404, f"model {model!r} not found; this server has {known} (use {self.base_name!r} for "
                              "the base model without adapters, or load the adapter with POST /v1/adapters/load)",
                         param="model", code="model_not_found")

    def load(self, name: str, path: Optional[str] = None) -> str:
        """Load the adapter saved at ``path`` (default: adapters_dir/name) as ``name``; the resolved path."""
        reserved = (self.base_name, BASE_ADAPTER)
        if not isinstance(name, str) or not name or any(c in name for c in "./\\") or name in reserved:
            raise ServeError(400, f"adapter name {name!r} is invalid: use a non-empty name without dots or slashes "
                                  f"(/ or \\), and not {self.base_name!r} or {BASE_ADAPTER!r} (reserved)", param="name")
        path = self._adapter_path(name, path)
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ServeError(400, f"no adapter_config.json in {path!r}; pass the directory that "
                                  "save_pretrained wrote", param="path")
        with self.lock:
            if name in self.adapter_names():
                raise ServeError(409, f"an adapter named {name!r} is already loaded; unload it first",
                                 param="name", code="adapter_exists")
            try:
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=name)
                else:
                    self.peft.load_adapter(path, name)
                self.peft.eval()
                self.peft._activate([])  # from_pretrained activates what it loads; see _classify
                self._classify(name)
            except Exception as exc:  # a load or probe that fails leaves nothing half-loaded behind
                self._drop(name)
                raise ServeError(400, f"could not load adapter {name!r} from {path!r}: {exc}", param="path") from exc
            self._loads[name] = next(self._load_numbers)
            self._refresh_names()
        return path

    def unload(self, name: str) -> None:
        """Remove a loaded adapter; requests still queued for it get 404."""
        with self.lock:
            if name not in self.adapter_names():
                self.resolve(name)  # raises the 404 with the known names
                raise ServeError(400, f"{name!r} is the base model, which cannot be unloaded", param="name")
            self.peft.delete_adapter(name)
            self.peft._activate([])  # delete_adapter activates another one: see _classify
            self._solo.discard(name)
            self._loads.pop(name, None)
            self._refresh_names()

    def _drop(self, name: str) -> None:
        # forget an adapter that failed to load; the last one gone gives the plain base model back
        if self.peft is None or name not in self.peft.peft_config:
            return
        if len(self.peft.peft_config) == 1:
            self.peft.unload()
            self.peft = None
        else:
            self.peft.delete_adapter(name)
            self.peft._activate([])  # see _classify
        self._solo.discard(name)

    def _adapter_path(self, name: str, path: Optional[str]) -> str:
        root = self.adapters_dir or os.getcwd()
        return os.path.abspath(os.path.join(root, path if path else name))

    def _load_directory(self, directory: str) -> None:
        if not os.path.isdir(directory):
            raise ValueError(f"adapters directory {directory!r} does not exist; create it or pass another --adapters")
        for entry in sorted(os.listdir(directory)):
            path = os.path.join(directory, entry)
            if os.path.isfile(os.path.join(path, "adapter_config.json")):
                try:
                    self.load(entry, path)
                except ServeError as exc:
                    raise ValueError(f"adapters directory {directory!r}: {exc.message}; fix or move it") from exc

    def _classify(self, name: str) -> None:
        # one 1-token mixed forward tells whether this adapter's method supports adapter_names (prompt methods and
        # bottleneck adapters do not). No adapter stays active between calls: mixed batches name each row's adapter,
        # and an active bottleneck adapter would run on every row (refused), so it is active only for its own calls
        probe = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
        try:
            with torch.no_grad():
                self.peft(input_ids=probe, adapter_names=[name])
        except ValueError:
            self._solo.add(name)

    # --- queueing -------------------------------------------------------------------------------
    def new_id(self, prefix: str) -> str:
        """A unique request id such as ``cmpl-12``."""
        return f"{prefix}-{next(self._ids)}"

    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queue a job for the batcher; its future resolves to a Generated (or a ServeError / the model's error)."""
        with self._cond:
            if self._closing:
                raise ServeError(503, "the server is shutting down", type="server_error", code="shutting_down")
            job.loaded = self._loads.get(job.adapter)
            self._pending.append(job)
            self._cond.notify()
        return job.future

    def pending(self) -> int:
        """Jobs queued and not yet taken by the batcher."""
        with self._cond:
            return len(self._pending)

    def pause(self) -> None:
        """Hold the batcher before it takes its next batch (jobs keep queueing); for tests and maintenance."""
        self.gate.clear()

    def resume(self) -> None:
        """Let a paused batcher go on."""
        self.gate.set()

    def close(self) -> None:
        """Stop the batcher; queued jobs fail with 503."""
        with self._cond:
            self._closing = True
            left, self._pending = self._pending, []
            self._cond.notify_all()
        self.gate.set()
        for job in left:
            _fail(job, ServeError(503, "the server is shutting down", type="server_error", code="shutting_down"))
        self._thread.join(timeout=30)

    # --- the batcher thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception as exc:  # noqa: BLE001  (whatever goes wrong in a batch, the batcher serves the next)
                for job in batch:
                    _fail(job, exc)

    def alive(self) -> bool:
        """Whether the batcher thread runs (False after close(), or if it died)."""
        return self._thread.is_alive()

    def _take_batch(self) -> Optional[list[Job]]:
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            # the first job waits up to batch_wait_ms for company, unless the batch is already full
            deadline = time.monotonic() + self.limits.batch_wait_ms / 1000
            while len(self._pending) < self.limits.max_batch and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(timeout=left)
        self.gate.wait()
        with self._cond:
            if self._closing:
                return None
            batch, self._pending = self._pending[:self.limits.max_batch], self._pending[self.limits.max_batch:]
        # a request cancelled while queued (its client timed out or went away) is dropped; the rest are marked
        # running, so a later cancel() cannot succeed and set_result cannot meet a cancelled future
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _run(self, batch: list[Job]) -> None:
        groups: dict[tuple, list[Job]] = {}
        with self.lock:
            for job in batch:
                if job.adapter != BASE_ADAPTER and (job.adapter not in self.adapter_names()
                                                    or self._loads.get(job.adapter) != job.loaded):
                    # gone, or another adapter loaded under its name since: it would answer with other weights
                    _fail(job, ServeError(404, f"adapter {job.adapter!r} was unloaded (or replaced) before this "
                                               "request ran", param="model", code="model_not_found"))
                    continue
                groups.setdefault(job.group_key(job.adapter in self._solo), []).append(job)
            for jobs in groups.values():
                for part in self._within_context(jobs):
                    self._run_group(part)

    def _within_context(self, jobs: list[Job]) -> list[list[Job]]:
        """``jobs`` in consecutive parts whose padded width plus new tokens stay within the model's context: a
        batch pads every row to its longest prompt and runs for its largest max_tokens, so two requests that each
        fit could overrun it together (an index error on learned positions; on CUDA, an assert that breaks the
        context)."""
        context = self.context()
        if context is None:
            return [jobs]
        parts: list[list[Job]] = []
        width = new = 0
        for job in jobs:
            own = len(job.input_ids) + self.virtual_tokens(job.adapter)
            if parts and max(width, own) + max(new, job.max_tokens) <= context:
                parts[-1].append(job)
                width, new = max(width, own), max(new, job.max_tokens)
            else:
                parts.append([job])
                width, new = own, job.max_tokens
        return parts

    def context(self) -> Optional[int]:
        """The model's context in tokens (learned positions), or None where its config names none."""
        return getattr(getattr(self.base, "config", None), "max_position_embeddings", None)

    def virtual_tokens(self, adapter: str) -> int:
        """Positions a prompt-learning adapter puts before the prompt (prompt / P-tuning, prefix tuning); 0 else."""
        config = self.peft.peft_config.get(adapter) if self.peft is not None else None
        return int(getattr(config, "num_virtual_tokens", 0) or 0)

    def _run_group(self, jobs: list[Job]) -> None:
        try:
            results = self._generate(jobs)
        except Exception as exc:  # noqa: BLE001  (a failed call must not end the batcher)
            if len(jobs) > 1:  # find the request that fails: run each alone, so the others still get answers
                for job in jobs:
                    self._run_group([job])
                return
            self.stats["errors"] += 1
            _fail(jobs[0], exc)
            return
        for job, result in zip(jobs, results):
            if not job.future.done():
                job.future.set_result(result)

    def _generate(self, jobs: list[Job]) -> list[Generated]:
        ids, mask = left_pad([j.input_ids for j in jobs], self.pad_id)
        names = [j.adapter for j in jobs]
        max_new = max(j.max_tokens for j in jobs)  # greedy rows do not depend on later steps: cut each to its own
        out = self._call_generate(ids.to(self.device), mask.to(self.device), names, jobs[0], max_new)
        self.stats["batches"] += 1
        self.stats["requests"] += len(jobs)
        self.stats["max_batch_size"] = max(self.stats["max_batch_size"], len(jobs))
        self.batch_log.append({"size": len(jobs), "ids": [j.id for j in jobs], "adapters": names})
        return [self.cut(row.tolist(), job.max_tokens) for row, job in zip(out[:, ids.shape[1]:].cpu(), jobs)]

    def _call_generate(self, ids: torch.Tensor, mask: torch.Tensor, names: list[str], first: Job,
                       max_new: int) -> torch.Tensor:
        settings = first.sampling
        kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": max_new, "pad_token_id": self.pad_id,
                  "do_sample": settings.temperature > 0}
        if settings.temperature > 0:  # top_k=0: OpenAI has no top-k, so turn off transformers' default of 50
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
        if first.stream is not None:
            stopping = StoppingCriteriaList([_Cancelled(first.stream.cancel)])
            kwargs.update(streamer=first.stream, stopping_criteria=stopping)
        # a seeded request draws from its own seed and leaves the process's generator as it was; an unseeded one
        # draws on from the process's generator, so repeated requests get different samples
        seeded = settings.seed is not None
        with torch.no_grad(), torch.random.fork_rng(devices=_rng_devices(self.device), enabled=seeded):
            if seeded:
                torch.manual_seed(settings.seed)
            if self.peft is None or set(names) == {BASE_ADAPTER} and not self.peft.peft_config:
                return self.base.generate(**kwargs)
            if names[0] in self._solo:  # a group of one solo adapter: active for this call only, no adapter_names
                self.peft._activate([names[0]])
                try:
                    return self.peft.generate(**kwargs)
                finally:
                    self.peft._activate([])
            return self.peft.generate(adapter_names=names, **kwargs)

    def cut(self, tokens: list[int], max_tokens: int) -> Generated:
        """New tokens cut at the first end-of-sequence token and at max_tokens."""
        kept, at_eos = kept_tokens(tokens, self.eos_ids, max_tokens)
        return Generated(kept, "stop" if at_eos else "length")


def kept_tokens(tokens: list[int], eos_ids, max_tokens: Optional[int]) -> tuple[list[int], bool]:
    """The tokens of an answer: those before the first end-of-sequence id, at most ``max_tokens``; and whether an
    end-of-sequence id ended them (within the limit)."""
    window = tokens if max_tokens is None else tokens[:max_tokens]
    for i, token in enumerate(window):
        if token in eos_ids:
            return window[:i], True
    return window, False


def _fail(job: Job, exc: BaseException) -> None:
    if not job.future.done():  # a queued job may have been cancelled by its client
        job.future.set_exception(exc)
    if job.stream is not None:  # a stream's reader waits on its queue: wake it
        job.stream.end()


def _pad_id(tokenizer, model: torch.nn.Module) -> int:
    from_model = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, from_model):
        if isinstance(value, int):
            return value
    return 0


def _eos_ids(tokenizer, model: torch.nn.Module) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []

"""The FastAPI app: OpenAI-style completions / chat completions over one base model and its adapters.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /v1/adapters/load,
POST /v1/adapters/unload, DELETE /v1/adapters/{name}, GET /v1/stats (batch log), GET /health.
Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}; a failing request never stops
the server. Non-streaming requests are batched across adapters; streaming requests run alone.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from typing import AsyncIterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, Job, Sampling, ServeError, TokenStream
from .limits import ServeLimits
from .schemas import (
    ChatRequest, CompletionRequest, LoadRequest, TextSoFar, UnloadRequest, chat_body, chat_chunk, chat_prompt_ids,
    check_supported, completion_body, completion_prompt, error_body, first_stop, held_back, parse, render, stop_list,
    usage,
)


class Admission:
    """Counts requests admitted and not yet answered; refuses one more than the limit with 503."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0  # touched only on the event loop

    def enter(self) -> None:
        """Admit a request or refuse it (503) when the server is full."""
        if self.count >= self.limit:
            raise ServeError(503, f"server is at its limit of {self.limit} concurrent requests; retry shortly",
                             type="server_overloaded", code="too_many_requests")
        self.count += 1

    def leave(self) -> None:
        """A request was answered."""
        self.count -= 1


def build_app(model, tokenizer, adapters_dir: Optional[str] = None, limits: Optional[ServeLimits] = None,
              base_name: str = "base") -> FastAPI:
    """The server app for ``model`` (a transformers model or a PeftModel) and every adapter in ``adapters_dir``."""
    limits = limits or ServeLimits()
    engine = Engine(model, tokenizer, adapters_dir, limits, base_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="peftkit serve", lifespan=lifespan)
    app.state.engine = engine
    app.state.admission = Admission(limits.max_concurrency)
    app.state.started = int(time.time())
    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_api_route("/health", health, methods=["GET"], response_model=None)
    app.add_api_route("/v1/models", list_models, methods=["GET"], response_model=None)
    app.add_api_route("/v1/stats", stats, methods=["GET"], response_model=None)
    app.add_api_route("/v1/completions", completions, methods=["POST"], response_model=None)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], response_model=None)
    app.add_api_route("/v1/adapters/load", load_adapter, methods=["POST"], response_model=None)
    app.add_api_route("/v1/adapters/unload", unload_adapter, methods=["POST"], response_model=None)
    app.add_api_route("/v1/adapters/{name}", delete_adapter, methods=["DELETE"], response_model=None)
    return app


# --- errors -------------------------------------------------------------------------------------
async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), exc.status, headers=headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = f"{exc.detail}: {request.method} {request.url.path}; see GET /v1/models and the /v1/* endpoints"
    return JSONResponse(error_body(message, code=str(exc.status_code)), exc.status_code)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"])
    return JSONResponse(error_body(f"{where}: {first['msg']}", param=where, code="invalid_value"), 422)


async def read_body(request: Request) -> bytes:
    """The raw body, refused with 413 once it passes max_body_bytes (declared or actual size)."""
    limit = request.app.state.engine.limits.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ServeError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                         code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


# --- small endpoints ----------------------------------------------------------------------------
async def health(request: Request):
    """Liveness: 503 once the batcher thread no longer runs (no request would be answered)."""
    if not request.app.state.engine.alive():
        return JSONResponse({"status": "error", "reason": "the batcher thread has stopped"}, status_code=503)
    return {"status": "ok"}


async def list_models(request: Request) -> dict:
    """OpenAI's model list: the base model, then every loaded adapter (parent: the base)."""
    engine: Engine = request.app.state.engine
    created = request.app.state.started
    root = getattr(getattr(engine.base, "config", None), "_name_or_path", None) or engine.base_name
    data = [{"id": engine.base_name, "object": "model", "created": created, "owned_by": "peftkit", "root": root,
             "parent": None}]
    data += [{"id": name, "object": "model", "created": created, "owned_by": "peftkit", "root": root,
              "parent": engine.base_name} for name in engine.adapter_names()]
    return {"object": "list", "data": data}


async def stats(request: Request) -> dict:
    """Counters and the most recent batches (ids and adapters per generate call)."""
    engine: Engine = request.app.state.engine
    return dict(engine.stats, in_flight=request.app.state.admission.count, pending=engine.pending(),
                recent_batches=list(engine.batch_log)[-64:])


async def load_adapter(request: Request) -> dict:
    """Load an adapter directory under a name."""
    req = parse(LoadRequest, await read_body(request))
    path = await asyncio.to_thread(request.app.state.engine.load, req.name, req.path)
    return {"name": req.name, "path": path, "loaded": True}


async def unload_adapter(request: Request) -> dict:
    """Unload an adapter by name (JSON body)."""
    req = parse(UnloadRequest, await read_body(request))
    await asyncio.to_thread(request.app.state.engine.unload, req.name)
    return {"name": req.name, "unloaded": True}


async def delete_adapter(request: Request, name: str) -> dict:
    """Unload an adapter by name (path)."""
    await asyncio.to_thread(request.app.state.engine.unload, name)
    return {"name": name, "unloaded": True}


# --- completions --------------------------------------------------------------------------------
async def completions(request: Request) -> Union[dict, StreamingResponse]:
    """POST /v1/completions."""
    req = parse(CompletionRequest, await read_body(request))
    check_supported(req)
    ids = request.app.state.engine.tokenizer(completion_prompt(req))["input_ids"]
    return await _serve(request, req, ids, req.max_tokens, chat=False)


async def chat_completions(request: Request) -> Union[dict, StreamingResponse]:
    """POST /v1/chat/completions."""
    req = parse(ChatRequest, await read_body(request))
    check_supported(req)
    ids = chat_prompt_ids(request.app.state.engine.tokenizer, req.messages)
    return await _serve(request, req, ids, req.max_completion_tokens or req.max_tokens, chat=True)


def _checked_max_tokens(engine: Engine, prompt_ids: list[int], asked: Optional[int], adapter: str) -> int:
    limits = engine.limits
    max_tokens = asked if asked is not None else limits.default_max_tokens
    if max_tokens > limits.max_tokens_limit:
        raise ServeError(400, f"max_tokens={max_tokens} exceeds this server's limit of {limits.max_tokens_limit}",
                         param="max_tokens", code="max_tokens_exceeded")
    if not prompt_ids:
        raise ServeError(400, "the prompt is empty (no tokens); send some text", param="prompt")
    if len(prompt_ids) > limits.max_prompt_tokens:
        raise ServeError(400, f"the prompt has {len(prompt_ids)} tokens, over this server's limit of "
                              f"{limits.max_prompt_tokens}", param="prompt", code="context_length_exceeded")
    context = engine.context()
    virtual = engine.virtual_tokens(adapter)
    if context is not None and len(prompt_ids) + virtual + max_tokens > context:
        extra = f" + the adapter's {virtual} virtual tokens" if virtual else ""
        raise ServeError(400, f"prompt ({len(prompt_ids)} tokens){extra} + max_tokens ({max_tokens}) exceeds the "
                              f"model's context of {context} tokens; shorten the prompt or lower max_tokens",
                         param="max_tokens", code="context_length_exceeded")
    return max_tokens


async def _serve(request: Request, req, prompt_ids: list[int], asked: Optional[int],
                 chat: bool) -> Union[dict, StreamingResponse]:
    engine: Engine = request.app.state.engine
    admission: Admission = request.app.state.admission
    adapter = engine.resolve(req.model)
    max_tokens = _checked_max_tokens(engine, prompt_ids, asked, adapter)
    stops = stop_list(req.stop)
    sampling = Sampling(req.temperature, req.top_p, req.seed)
    rid = engine.new_id("chatcmpl" if chat else "cmpl")
    admission.enter()
    if req.stream:
        loop = asyncio.get_running_loop()
        job = Job(rid, adapter, prompt_ids, max_tokens, sampling, TokenStream(loop))
        try:
            engine.submit(job)
        except ServeError:
            admission.leave()
            raise
        # the slot frees when generation ends, even if the client left before the stream started
        job.future.add_done_callback(functools.partial(_leave_on_loop, loop, admission))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _events(engine, job, stops, req.model, chat, include_usage)
        return StreamingResponse(events, media_type="text/event-stream")
    try:
        result = await asyncio.wrap_future(engine.submit(Job(rid, adapter, prompt_ids, max_tokens, sampling)))
    except ServeError:
        raise
    except Exception as exc:  # noqa: BLE001  (the model's failure is this request's 500, nothing more)
        raise ServeError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error",
                         code="generation_failed") from exc
    finally:
        admission.leave()
    text, n_tokens, finish = render(engine.tokenizer, result, stops)
    body = chat_body(rid, req.model, text, finish) if chat else completion_body(rid, req.model, text, finish)
    return dict(body, usage=usage(len(prompt_ids), n_tokens))


def _leave_on_loop(loop: asyncio.AbstractEventLoop, admission: Admission, future) -> None:
    loop.call_soon_threadsafe(admission.leave)


def _sse(obj: Union[dict, str]) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def _chunk(rid: str, model: str, text: Optional[str], finish: Optional[str], chat: bool) -> str:
    if chat:
        return _sse(chat_chunk(rid, model, {"content": text} if text is not None else {}, finish))
    return _sse(completion_body(rid, model, text or "", finish))


def _sendable(text: str, stops: list[str], sent: int, final: bool) -> tuple[Optional[int], int]:
    """(where a stop string starts in the unsent text or None, how far the text may be sent): up to the stop, else
    all but an end that could begin one (all of it once final)."""
    cut = first_stop(text, stops, sent)
    return cut, cut if cut is not None else len(text) - (0 if final else held_back(text, stops))


async def _events(engine: Engine, job: Job, stops: list[str], model: str, chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
    """The SSE stream of one request: text deltas as tokens arrive, held back while they could start a stop string.

    The text is decoded incrementally (TextSoFar: each token costs a decode of the last few, not of the whole
    answer) and only its unsent end is searched for stop strings: a stop cannot begin in text already sent,
    since that text never ends in the start of one.
    """
    so_far, sent, cut = TextSoFar(engine.tokenizer, engine.eos_ids, job.max_tokens), 0, None
    try:
        if chat:
            yield _sse(chat_chunk(job.id, model, {"role": "assistant", "content": ""}, None))
        while (item := await job.stream.queue.get()) is not None:
            if cut is not None:
                continue  # drain until generate notices the cancel
            text = so_far.extend(item)
            cut, end = _sendable(text, stops, sent, final=False)
            if cut is not None:
                job.stream.cancel.set()
            if text[sent:end]:
                yield _chunk(job.id, model, text[sent:end], None, chat)
                sent = end
        result = await asyncio.wrap_future(job.future)
        _, n_tokens, finish = render(engine.tokenizer, result, stops)
        if cut is None:  # the end: nothing is held back any more, an unfinished last character included
            text = so_far.finish()
            _, end = _sendable(text, stops, sent, final=True)
            if text[sent:end]:
                yield _chunk(job.id, model, text[sent:end], None, chat)
        yield _chunk(job.id, model, None, finish, chat)
        if include_usage:
            yield _sse({"id": job.id, "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": int(time.time()), "model": model, "choices": [],
                        "usage": usage(len(job.input_ids), n_tokens)})
    except Exception as exc:  # noqa: BLE001  (headers are sent: report in the stream, as OpenAI does)
        status = exc if isinstance(exc, ServeError) else ServeError(500, f"generation failed: {exc}", "server_error")
        yield _sse(error_body(status.message, status.type, status.param, status.code))
    finally:
        job.stream.cancel.set()  # the client may be gone: stop generating
    yield _sse("[DONE]")

"""OpenAI-shaped request bodies (validated with pydantic), response bodies, and prompt / text helpers."""
from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from .engine import Generated, ServeError, kept_tokens

try:  # chat templates are jinja2 templates; their raise_exception() raises this
    from jinja2.exceptions import TemplateError
except ImportError:  # no jinja2: transformers cannot render a chat template at all
    class TemplateError(Exception):  # type: ignore[no-redef]
        """Stands in for jinja2's TemplateError, which nothing raises without jinja2."""


class _NullMeansDefault(BaseModel):
    """A body whose optional fields read null as not given, as OpenAI's API does (temperature, top_p, n, stream, ...);
    a required field's null stays an error."""

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields
                    or cls.model_fields[k].is_required() or cls.model_fields[k].default is None}
        return data


class StreamOptions(_NullMeansDefault):
    """``stream_options``: include_usage adds a last chunk with the token counts."""

    include_usage: bool = False


def _integral(value: Any) -> Any:
    """A JSON number with no fraction (16.0) as the integer it is; anything else (a bool included) as it came."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Count = Annotated[int, BeforeValidator(_integral)]  # strict int (true is no count), but 16.0 is 16


class _Request(_NullMeansDefault):
    """Fields both endpoints share; unknown fields are ignored, as OpenAI clients send many."""

    # strict: a JSON true is not the count 1, nor the string "yes" a true
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    max_tokens: Optional[Count] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default; 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    n: Count = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[Count] = Field(None, ge=-(2**63), le=2**64 - 1)  # the range torch.manual_seed takes
    # accepted only at their no-op values: refused otherwise rather than silently ignored
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict] = None
    logprobs: Union[bool, Count, None] = None
    best_of: Optional[Count] = None


class CompletionRequest(_Request):
    """Body of POST /v1/completions."""

    prompt: Union[str, list[str]]
    echo: bool = False
    suffix: Optional[str] = None


class ContentPart(BaseModel):
    """One part of a message's content list; only text parts are served."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None


class ChatRequest(_Request):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[Count] = Field(None, ge=1)  # newer name of max_tokens


class LoadRequest(BaseModel):
    """Body of POST /v1/adapters/load: path defaults to <adapters dir>/<name>; relative paths are under it."""

    model_config = ConfigDict(extra="forbid")
    name: str
    path: Optional[str] = None


class UnloadRequest(BaseModel):
    """Body of POST /v1/adapters/unload."""

    model_config = ConfigDict(extra="forbid")
    name: str


def parse(model: type[BaseModel], body: bytes) -> BaseModel:
    """Validate a JSON body; 400 naming the first wrong field and what it should be."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ServeError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError as exc:  # arrays / objects nested thousands deep
        raise ServeError(400, "request body nests JSON arrays / objects too deeply", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise ServeError(400, f"request body must be a JSON object, got {type(data).__name__}", code="invalid_body")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        # pydantic names the member of a Union it tried ("prompt.str"): the field is what the client sent
        where = ".".join(str(part) for part in first["loc"] if not _union_member(part)) or "body"
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise ServeError(400, f"{where}: {first['msg']}{more}", param=where, code="invalid_value") from exc


def _union_member(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict", "none") or "[" in part)


def check_supported(req: _Request) -> None:
    """Refuse settings this server cannot honour, naming the field and what to do."""
    if req.n != 1:
        raise ServeError(400, f"n={req.n} is not supported: this server returns one choice per request; "
                              "send n separate requests (they are batched on the server)", param="n")
    refused = {"presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
               "logit_bias": req.logit_bias, "logprobs": req.logprobs,
               "best_of": None if req.best_of in (None, 1) else req.best_of,
               "echo": getattr(req, "echo", False), "suffix": getattr(req, "suffix", None)}
    for name, value in refused.items():
        if value not in (None, 0, 0.0, False, {}):
            raise ServeError(400, f"{name}={value!r} is not supported by this server; leave it out", param=name)


def stop_list(stop: Union[str, list[str], None]) -> list[str]:
    """``stop`` as a list of up to 4 non-empty strings."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ServeError(400, f"stop must be up to 4 non-empty strings, got {stop!r}", param="stop")
    return stops


def completion_prompt(req: CompletionRequest) -> str:
    """The one prompt of a completion request (a list of one string is accepted)."""
    if isinstance(req.prompt, str):
        return req.prompt
    if len(req.prompt) != 1:
        raise ServeError(400, f"prompt is a list of {len(req.prompt)} strings; send one prompt per request "
                              "(concurrent requests are batched on the server)", param="prompt")
    return req.prompt[0]


def chat_prompt_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """Token ids of the conversation plus the assistant's turn: the chat template, else "role: content" lines."""
    turns = [{"role": m.role, "content": _content_text(m)} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        except TemplateError as err:  # the template's own refusal (raise_exception), e.g. roles that do not alternate
            raise ServeError(400, f"the model's chat template refused these messages: {err}", param="messages",
                             code="invalid_messages") from err
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "\n".join(f"{t['role']}: {t['content']}" for t in turns) + "\nassistant:"
    return tokenizer(text)["input_ids"]


def _content_text(message: ChatMessage) -> str:
    if isinstance(message.content, list):
        return "".join(part.text for part in message.content)
    return message.content or ""


class TextSoFar:
    """The text of a growing list of generated tokens, decoded a few tokens at a time.

    Decoding the whole list again for each new token costs O(n^2) over an n-token answer. Here each step
    decodes only the tokens since the last emitted text, twice: from the same starting token without and
    with the new ones, so tokenizers that treat a leading space or a word start specially (SentencePiece,
    byte-level BPE) agree on the shared part, and the difference is the new text. A step whose text ends in
    an unfinished UTF-8 character (U+FFFD) emits nothing until the character is complete. The text only
    grows: what was emitted is never rewritten. Tokens after the first end-of-sequence id, or past
    ``max_tokens``, are ignored, as ``Engine.cut`` does.

    A tokenizer that cleans up spaces after decoding (``clean_up_tokenization_spaces``: "it ' s" -> "it's")
    needs the text before a window to decode the window's start, so there every step decodes all tokens, as
    ``render`` does, and the last ``CLEANUP_REACH`` characters wait for the next step or ``finish``: the
    cleanup's patterns (" n't", " 's", " ." ...) rewrite at most the last 3 characters of a text when it grows.
    """

    CLEANUP_REACH = 8

    def __init__(self, tokenizer, eos_ids: frozenset = frozenset(), max_tokens: Optional[int] = None) -> None:
        self.tokenizer, self.eos_ids, self.max_tokens = tokenizer, eos_ids, max_tokens
        self.tokens: list[int] = []
        self.text = ""
        self.ended = False
        self._start = self._read = 0  # decode window: tokens[_start:_read] are already in text
        self._whole = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))

    def extend(self, new: list[int]) -> str:
        """Take the next tokens; the whole text so far."""
        if not self.ended:
            room = None if self.max_tokens is None else self.max_tokens - len(self.tokens)
            kept, at_eos = kept_tokens(new, self.eos_ids, room)
            self.tokens += kept
            self.ended = at_eos or (room is not None and len(kept) == room)
        self._advance(final=False)
        return self.text

    def finish(self) -> str:
        """The whole text, an unfinished last character included (as a full decode writes it)."""
        self._advance(final=True)
        return self.text

    def _advance(self, final: bool) -> None:
        if self._whole:
            now = self._decode(self.tokens)
            stable = now if final else now[:len(now) - self.CLEANUP_REACH]
            if final or (stable.startswith(self.text) and not stable.endswith("\ufffd")):
                self.text = stable
            return
        if len(self.tokens) == self._read:
            return
        done = self._decode(self.tokens[self._start:self._read])
        now = self._decode(self.tokens[self._start:])
        if len(now) > len(done) and (final or not now.endswith("\ufffd")):
            self.text += now[len(done):]
            self._start, self._read = self._read, len(self.tokens)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if tokens else ""


def render(tokenizer, result: Generated, stops: list[str]) -> tuple[str, int, str]:
    """(text, completion tokens, finish reason) of a finished request, cut before the first stop string.

    The token count runs to the first token whose prefix decodes to text holding a stop string (an unfinished
    last character decodes as U+FFFD, as in any full decode), found by bisection: log2(n) full decodes instead
    of one per token. (Bisection takes a prefix that holds a stop to keep it as tokens are added, which holds
    unless a decode rewrites text behind its end.)
    """
    text = tokenizer.decode(result.tokens, skip_special_tokens=True)
    cut = first_stop(text, stops)
    if cut is None:
        return text, len(result.tokens), result.finish_reason

    def stopped(k: int) -> bool:
        return first_stop(tokenizer.decode(result.tokens[:k], skip_special_tokens=True), stops) is not None

    low, high = 0, len(result.tokens)  # stopped(high); the first k with stopped(k) lies in (low, high]
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if stopped(mid) else (mid, high)
    return text[:cut], high, "stop"


def first_stop(text: str, stops: list[str], start: int = 0) -> Optional[int]:
    """Where the earliest stop string starts in ``text`` (at ``start`` or later), or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that could begin a stop string (a stream must not send it yet)."""
    for k in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's usage block."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, finish: Optional[str], chunk: bool = False) -> dict:
    """A text_completion object (or one streamed chunk of it)."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": [choice]}


def chat_body(rid: str, model: str, text: str, finish: Optional[str]) -> dict:
    """A chat.completion object."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model, "choices": [choice]}


def chat_chunk(rid: str, model: str, delta: dict, finish: Optional[str]) -> dict:
    """One chat.completion.chunk of a stream."""
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [choice]}


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}

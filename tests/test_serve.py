"""peftkit serve: a real uvicorn server on loopback, driven over HTTP; answers must equal offline generate."""
import argparse
import json
import socket
import threading
import time

import httpx
import pytest
import torch
import uvicorn
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from peftkit import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from peftkit.serve import ServeLimits, add_arguments, main
from peftkit.serve.cli import limits_from_args
from peftkit.serve.app import build_app

from conftest import randomize_adapters, tiny_llama

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = ("user assistant system : hello world the a cat dog sat on mat and is red blue green one two three four five "
         "six seven eight nine ten yes no stop go up down left right big small fast slow hot cold day night sun moon "
         "tree bird fish car book pen cup tea milk bread apple rain snow boom").split()
LIMITS = ServeLimits(max_batch=8, batch_wait_ms=20, max_tokens_limit=24, default_max_tokens=6, max_body_bytes=4096,
                     max_concurrency=6, max_prompt_tokens=40)
PROMPTS = ["hello world the cat", "a dog sat on the mat", "red blue", "one two three four five six", "big", "sun moon"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny Llama's 64 ids: 4 specials + 60 words; adds <s> like Llama."""
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + WORDS)}
    assert len(vocab) == 64
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_adapters(root) -> None:
    """LoRA adapters of different ranks / targets: a, b, c under root/adapters/<name>, d under root/extra/d."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=ALL), "a")
    model.add_adapter("b", LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=ALL))
    model.add_adapter("c", LoraConfig(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("d", LoraConfig(r=4, lora_alpha=32, target_modules=["v_proj", "down_proj"]))
    randomize_adapters(model, std=0.4)
    model.save_pretrained(str(root / "adapters"), selected_adapters=["a", "b", "c"])
    model.save_pretrained(str(root / "extra"), selected_adapters=["d"])


class Offline:
    """The oracle: a separate copy of the model, each prompt run alone with its adapter."""

    def __init__(self, root, tokenizer) -> None:
        self.model = PeftModel.from_pretrained(tiny_llama(), str(root / "adapters" / "a"), adapter_name="a")
        for name in ("b", "c"):
            self.model.load_adapter(str(root / "adapters" / name), name)
        self.model.load_adapter(str(root / "extra" / "d"), "d")
        self.model.eval()
        self.tokenizer = tokenizer

    def tokens(self, ids: list[int], adapter: str, max_tokens: int, **sampling) -> list[int]:
        """New tokens of generate() for one prompt, cut at </s>."""
        kwargs = dict(input_ids=torch.tensor([ids]), max_new_tokens=max_tokens, pad_token_id=0, do_sample=False)
        kwargs.update(sampling)
        if adapter == "base":
            with self.model.disable_adapter():
                out = self.model.generate(**kwargs)[0, len(ids):].tolist()
        else:
            self.model.set_adapter(adapter)
            out = self.model.generate(**kwargs)[0, len(ids):].tolist()
        return out[:out.index(2)] if 2 in out else out

    def text(self, prompt: str, adapter: str, max_tokens: int) -> str:
        """Decoded greedy completion of a plain prompt."""
        tokens = self.tokens(self.tokenizer(prompt)["input_ids"], adapter, max_tokens)
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


class Server:
    """uvicorn on a free loopback port in a background thread."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started)

    def close(self) -> None:
        """Stop serving (the app's lifespan stops the batcher)."""
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def wait_until(condition, timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds (a wait, not a timing assertion)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    save_adapters(root)
    tokenizer = tiny_tokenizer()
    app = build_app(tiny_llama(), tokenizer, str(root / "adapters"), LIMITS)
    server = Server(app)
    client = httpx.Client(base_url=server.url, timeout=60)
    yield {"root": root, "client": client, "engine": app.state.engine, "offline": Offline(root, tokenizer),
           "tokenizer": tokenizer, "url": server.url}
    client.close()
    server.close()


def complete(client, model: str, prompt: str, max_tokens: int = 8, **extra) -> httpx.Response:
    """POST /v1/completions, greedy unless told otherwise."""
    body = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    body.update(extra)
    return client.post("/v1/completions", json=body)


def error_of(response: httpx.Response, status: int) -> dict:
    """The OpenAI-shaped error of a response that must have ``status``."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def sse_events(client, path: str, body: dict) -> list:
    """The data: payloads of a streamed response (JSON objects, then the string "[DONE]")."""
    events = []
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_models_list(env):
    body = env["client"].get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["base", "a", "b", "c"]
    assert all(m["object"] == "model" for m in body["data"])
    assert [m["parent"] for m in body["data"]] == [None, "base", "base", "base"]


@pytest.mark.parametrize("model", ["a", "b", "c", "base"])
def test_completion_equals_offline_generate(env, model):
    prompt = PROMPTS[1]
    response = complete(env["client"], model, prompt, max_tokens=10)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = env["offline"].text(prompt, model, 10)
    assert body["object"] == "text_completion" and body["model"] == model
    assert body["choices"][0]["text"] == expected
    n_prompt = len(env["tokenizer"](prompt)["input_ids"])
    assert body["usage"]["prompt_tokens"] == n_prompt
    assert body["usage"]["total_tokens"] == n_prompt + body["usage"]["completion_tokens"]


def test_adapters_really_differ(env):
    texts = {m: complete(env["client"], m, PROMPTS[0], max_tokens=12).json()["choices"][0]["text"]
             for m in ("a", "b", "c", "base")}
    assert len(set(texts.values())) == 4, texts  # otherwise the equality tests above would prove little


def test_stop_string_cuts_the_text(env):
    full = env["offline"].text(PROMPTS[0], "a", 12)
    words = full.split()
    assert len(words) >= 4
    stop = " " + words[2]
    body = complete(env["client"], "a", PROMPTS[0], max_tokens=12, stop=[stop]).json()
    assert body["choices"][0]["text"] == full[:full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == full[:full.index(stop)].count(" ") + 2  # tokens up to the stop word


def test_chat_plain_join_and_template(env):
    messages = [{"role": "system", "content": "hello"}, {"role": "user", "content": "the cat sat"}]
    body = {"model": "b", "messages": messages, "max_tokens": 8, "temperature": 0}
    reply = env["client"].post("/v1/chat/completions", json=body).json()
    expected = env["offline"].text("system: hello\nuser: the cat sat\nassistant:", "b", 8)
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": expected}
    tokenizer = env["tokenizer"]
    tokenizer.chat_template = ("{% for m in messages %}{{ m.role }} : {{ m.content }} {% endfor %}"
                               "{% if add_generation_prompt %}<s> assistant :{% endif %}")
    try:
        reply = env["client"].post("/v1/chat/completions", json=body).json()
        ids = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                        add_special_tokens=False)["input_ids"]
        assert ids[-3] == 1  # the template's own <s>, not one added by the tokenizer
        expected = tokenizer.decode(env["offline"].tokens(ids, "b", 8), skip_special_tokens=True)
        assert reply["choices"][0]["message"]["content"] == expected
        assert reply["usage"]["prompt_tokens"] == len(ids)
    finally:
        tokenizer.chat_template = None


def test_streaming_reassembles_to_the_same_text(env):
    client = env["client"]
    whole = complete(client, "c", PROMPTS[3], max_tokens=10).json()["choices"][0]
    events = sse_events(client, "/v1/completions", dict(model="c", prompt=PROMPTS[3], max_tokens=10, temperature=0,
                                                        stream=True, stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["text"]]) > 1  # really streamed
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    messages = [{"role": "user", "content": "red blue"}]
    chat = dict(model="a", messages=messages, max_tokens=9, temperature=0)
    whole = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    events = sse_events(client, "/v1/chat/completions", dict(chat, stream=True))
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == whole
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    wait_until(lambda: client.get("/v1/stats").json()["in_flight"] == 0)  # stream slots are given back


def test_streaming_with_stop_string(env):
    full = env["offline"].text(PROMPTS[2], "b", 12)
    stop = " " + full.split()[3]
    events = sse_events(env["client"], "/v1/completions", dict(model="b", prompt=PROMPTS[2], max_tokens=12,
                                                               temperature=0, stream=True, stop=stop))
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == full[:full.index(stop)]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible_and_equals_offline(env):
    client, offline = env["client"], env["offline"]
    body = dict(model="a", prompt=PROMPTS[0], max_tokens=10, temperature=1.5, top_p=0.9, seed=123)
    first = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == first
    torch.manual_seed(123)
    tokens = offline.tokens(env["tokenizer"](PROMPTS[0])["input_ids"], "a", 10, do_sample=True, temperature=1.5,
                            top_p=0.9, top_k=0)
    assert first == env["tokenizer"].decode(tokens, skip_special_tokens=True)
    assert first != offline.text(PROMPTS[0], "a", 10)  # sampling at temperature 1.5 left the greedy path


def send_all(env, requests: list[dict]) -> tuple[list[threading.Thread], list]:
    """POST every body to /v1/completions from its own thread; (threads, responses filled in order once joined)."""
    out = [None] * len(requests)

    def send(i: int) -> None:
        with httpx.Client(base_url=env["url"], timeout=60) as client:
            out[i] = client.post("/v1/completions", json=requests[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    wait_until(lambda: env["engine"].pending() == len(requests) or not any(t.is_alive() for t in threads))
    return threads, out


def test_concurrent_requests_share_one_batch_and_equal_offline(env):
    names = ["a", "b", "c", "base", "a", "b"]
    requests = [dict(model=m, prompt=p, max_tokens=4 + i, temperature=0)  # different lengths: padding, cut per row
                for i, (m, p) in enumerate(zip(names, PROMPTS))]
    engine = env["engine"]
    engine.pause()  # hold the batcher so that every request is queued before it takes a batch
    try:
        threads, responses = send_all(env, requests)
        assert engine.pending() == len(requests)
    finally:
        engine.resume()
    for thread in threads:
        thread.join()
    ids = set()
    for req, response in zip(requests, responses):
        assert response.status_code == 200, response.text
        expected = env["offline"].text(req["prompt"], req["model"], req["max_tokens"])
        assert response.json()["choices"][0]["text"] == expected
        ids.add(response.json()["id"])
    batches = env["client"].get("/v1/stats").json()["recent_batches"]
    shared = [b for b in batches if ids <= set(b["ids"])]
    assert len(shared) == 1 and sorted(shared[0]["adapters"]) == sorted(["a", "b", "c", "__base__", "a", "b"])


def test_queue_full_is_refused_then_served(env):
    engine, client = env["engine"], env["client"]
    requests = [dict(model="a", prompt=PROMPTS[i % 6], max_tokens=3, temperature=0)
                for i in range(LIMITS.max_concurrency)]
    engine.pause()
    try:
        threads, responses = send_all(env, requests)
        error = error_of(complete(client, "b", "hello", max_tokens=2), 503)
        assert "6 concurrent requests" in error["message"]
    finally:
        engine.resume()
    for thread in threads:
        thread.join()
    assert all(r.status_code == 200 for r in responses)
    assert complete(client, "b", "hello", max_tokens=2).status_code == 200


def test_model_failure_is_a_500_for_that_request_only(env, monkeypatch):
    engine, client = env["engine"], env["client"]
    real = engine._call_generate
    boom = env["tokenizer"].convert_tokens_to_ids("boom")

    def failing(ids, *args):
        if (ids == boom).any():
            raise RuntimeError("boom")
        return real(ids, *args)

    monkeypatch.setattr(engine, "_call_generate", failing)
    requests = [dict(model="a", prompt="boom boom", max_tokens=4, temperature=0),
                dict(model="c", prompt=PROMPTS[4], max_tokens=4, temperature=0)]
    engine.pause()
    try:
        threads, responses = send_all(env, requests)
    finally:
        engine.resume()
    for thread in threads:
        thread.join()
    assert "boom" in error_of(responses[0], 500)["message"]
    assert responses[1].json()["choices"][0]["text"] == env["offline"].text(PROMPTS[4], "c", 4)
    assert complete(client, "b", PROMPTS[5]).json()["choices"][0]["text"] == env["offline"].text(PROMPTS[5], "b", 8)


def test_load_and_unload(env):
    client, root = env["client"], env["root"]
    loaded = client.post("/v1/adapters/load", json={"name": "d2", "path": str(root / "extra" / "d")})
    assert loaded.status_code == 200, loaded.text
    assert "d2" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    text = complete(client, "d2", PROMPTS[0]).json()["choices"][0]["text"]
    assert text == env["offline"].text(PROMPTS[0], "d", 8)
    assert error_of(client.post("/v1/adapters/load", json={"name": "d2", "path": str(root / "extra" / "d")}),
                    409)["param"] == "name"
    assert "adapter_config.json" in error_of(client.post("/v1/adapters/load", json={"name": "e", "path": str(root)}),
                                             400)["message"]
    assert client.post("/v1/adapters/unload", json={"name": "d2"}).json() == {"name": "d2", "unloaded": True}
    assert error_of(complete(client, "d2", PROMPTS[0]), 404)["code"] == "model_not_found"
    # load by name from the adapters directory, unload with DELETE
    assert client.post("/v1/adapters/load", json={"name": "d3", "path": "../extra/d"}).status_code == 200
    assert client.delete("/v1/adapters/d3").status_code == 200
    assert "d3" in error_of(client.delete("/v1/adapters/d3"), 404)["message"]
    assert error_of(client.post("/v1/adapters/unload", json={"name": "base"}), 400)["param"] == "name"
    for bad in ("x\\y", "__base__"):  # it blamed a missing adapter_config.json / named only 'base' as reserved
        message = error_of(client.post("/v1/adapters/load", json={"name": bad, "path": str(root / "extra" / "d")}),
                           400)["message"]
        assert f"adapter name {bad!r} is invalid" in message and "'__base__' (reserved)" in message
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base", "a", "b", "c"]


def test_a_bottleneck_adapter_runs_alone_and_leaves_mixed_batches_working(env, tmp_path):
    """A bottleneck adapter runs on every row, so it cannot join a mixed batch. It used to stay active after its
    own request (and after its load), and every later base / LoRA request was refused with a 500."""
    from peftkit import AdapterConfig, get_peft_model

    client, engine = env["client"], env["engine"]
    bottleneck = get_peft_model(tiny_llama(), AdapterConfig(adapter_type="houlsby", bottleneck_size=4))
    randomize_adapters(bottleneck, seed=11)
    bottleneck.save_pretrained(str(tmp_path / "bn"))
    assert client.post("/v1/adapters/load", json={"name": "bn", "path": str(tmp_path / "bn")}).status_code == 200
    try:
        assert engine._solo == {"bn"}
        for model in ("base", "a", "bn", "a", "base", "b"):
            reply = complete(client, model, PROMPTS[1])
            assert reply.status_code == 200, reply.text
            if model != "bn":
                assert reply.json()["choices"][0]["text"] == env["offline"].text(PROMPTS[1], model, 8)
        ids = env["tokenizer"](PROMPTS[1])["input_ids"]
        with torch.no_grad():
            want = bottleneck.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        want_text = env["tokenizer"].decode(want[0, len(ids):], skip_special_tokens=True)
        assert complete(client, "bn", PROMPTS[1]).json()["choices"][0]["text"] == want_text
        assert engine._solo == {"bn"}  # the LoRA adapters still batch together
        # unloading another adapter, or a load that fails, leaves no adapter active either (delete_adapter
        # activates the first one left: the bottleneck adapter, which then ran on every row)
        assert client.post("/v1/adapters/load", json={"name": "d2", "path": str(env["root"] / "extra" / "d")}).status_code == 200
        assert client.post("/v1/adapters/unload", json={"name": "d2"}).status_code == 200
        assert engine.peft._active == []
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "adapter_config.json").write_text((tmp_path / "bn" / "adapter_config.json").read_text())
        assert client.post("/v1/adapters/load", json={"name": "bad", "path": str(bad)}).status_code == 400  # no weights
        assert engine.peft._active == []
        for model in ("base", "a"):
            reply = complete(client, model, PROMPTS[1])
            assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == env["offline"].text(PROMPTS[1], model, 8)
    finally:
        client.post("/v1/adapters/unload", json={"name": "bn"})


def test_a_load_whose_probe_fails_leaves_nothing_behind(env, monkeypatch):
    client, engine, root = env["client"], env["engine"], env["root"]
    probe = engine._classify

    def broken(name):
        raise RuntimeError("probe failed")

    monkeypatch.setattr(engine, "_classify", broken)
    body = {"name": "d4", "path": str(root / "extra" / "d")}
    assert "probe failed" in error_of(client.post("/v1/adapters/load", json=body), 400)["message"]
    assert "d4" not in engine.peft.peft_config and "d4" not in engine.adapter_names()
    monkeypatch.setattr(engine, "_classify", probe)
    assert client.post("/v1/adapters/load", json=body).status_code == 200  # no "already exists" left over
    assert client.delete("/v1/adapters/d4").status_code == 200


def test_unseeded_sampling_draws_anew_each_request(env):
    """Each seeded request runs from its own seed; unseeded ones draw on, so they differ (they used to run from one
    restored generator state and returned the same text every time)."""
    body = dict(model="a", prompt=PROMPTS[0], max_tokens=12, temperature=1.5)
    texts = [env["client"].post("/v1/completions", json=body).json()["choices"][0]["text"] for _ in range(4)]
    assert len(set(texts)) > 1
    state = torch.random.get_rng_state()
    env["client"].post("/v1/completions", json=dict(body, seed=5))
    assert torch.equal(torch.random.get_rng_state(), state)  # a seeded request leaves the generator as it was


def test_a_chat_template_that_refuses_the_messages_is_a_400(env):
    tokenizer = env["tokenizer"]
    tokenizer.chat_template = ("{% for m in messages %}{% if loop.index0 % 2 == 1 and m.role == 'user' %}"
                               "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                               "{{ m.content }} {% endfor %}")
    try:
        messages = [{"role": "user", "content": "red"}, {"role": "user", "content": "blue"}]
        for stream in (False, True):
            body = {"model": "a", "messages": messages, "max_tokens": 4, "stream": stream}
            error = error_of(env["client"].post("/v1/chat/completions", json=body), 400)
            assert error["param"] == "messages" and "roles must alternate user/assistant" in error["message"]
    finally:
        tokenizer.chat_template = None
    assert complete(env["client"], "a", PROMPTS[2]).status_code == 200  # the connection and the server go on


def test_error_cases(env):
    client = env["client"]
    error = error_of(complete(client, "nope", "hello"), 404)
    assert error["param"] == "model" and all(f"'{n}'" in error["message"] for n in ("base", "a", "b", "c"))
    assert error_of(client.post("/v1/completions", content=b"{not json"), 400)["code"] == "invalid_json"
    assert error_of(client.post("/v1/completions", json={"prompt": "hi"}), 400)["param"] == "model"
    assert error_of(complete(client, "a", "hi", max_tokens="many"), 400)["param"] == "max_tokens"
    assert error_of(client.post("/v1/completions", json=[1, 2]), 400)["code"] == "invalid_body"
    no_messages = {"model": "a", "messages": []}
    assert error_of(client.post("/v1/chat/completions", json=no_messages), 400)["param"] == "messages"
    bad_role = {"model": "a", "messages": [{"role": "robot", "content": "hi"}]}
    assert error_of(client.post("/v1/chat/completions", json=bad_role), 400)["param"] == "messages.0.role"
    assert error_of(complete(client, "a", "hello", n=2), 400)["param"] == "n"
    assert "limit of 24" in error_of(complete(client, "a", "hello", max_tokens=25), 400)["message"]
    assert error_of(complete(client, "a", " ".join(["cat"] * 45)), 400)["code"] == "context_length_exceeded"
    assert error_of(complete(client, "a", ["one", "two"]), 400)["param"] == "prompt"
    assert error_of(complete(client, "a", [1, 2, 3]), 400)["param"] == "prompt"  # not "prompt.str"
    assert error_of(complete(client, "a", "hi", logprobs=3), 400)["param"] == "logprobs"
    assert error_of(complete(client, "a", "hi", temperature=3), 400)["param"] == "temperature"
    assert error_of(complete(client, "a", "hi", temperature=1, seed=2**64), 400)["param"] == "seed"
    assert error_of(complete(client, "a", "hi", temperature=1, seed=-(2**63) - 1), 400)["param"] == "seed"
    assert error_of(complete(client, "a", "hello " * 1000), 413)["code"] == "request_too_large"
    assert error_of(client.get("/v1/nothing"), 404)["message"].startswith("Not Found")
    # from a review: JSON true was the count 1 and "yes" a true; a body nested 1,900 deep was a bare 500
    assert error_of(complete(client, "a", "hi", max_tokens=True), 400)["param"] == "max_tokens"
    assert error_of(complete(client, "a", "hi", stream="yes"), 400)["param"] == "stream"
    assert error_of(complete(client, "a", "hi", max_tokens=8.5), 400)["param"] == "max_tokens"
    assert error_of(complete(client, None, "hi"), 400)["message"].startswith("model: Input should be a valid string")
    # but a count written 8.0, and null for an optional field (OpenAI's "not given"), are what they mean
    lax = complete(client, "a", PROMPTS[2], max_tokens=8.0, top_p=None, n=None, stream=None, echo=None,
                   stream_options={"include_usage": None}, logprobs=0.0)
    assert lax.json()["choices"][0]["text"] == env["offline"].text(PROMPTS[2], "a", 8)
    deep = b'{"model": "a", "prompt": "hi", "x": ' + b"[" * 1900 + b"]" * 1900 + b"}"  # within the 4 KB limit
    assert error_of(client.post("/v1/completions", content=deep), 400)["code"] == "invalid_json"
    # a temperature so small that logits / temperature overflow (NaN probabilities, a 500) decodes greedily
    assert complete(client, "a", PROMPTS[2], temperature=1e-45).json()["choices"][0]["text"] == env["offline"].text(
        PROMPTS[2], "a", 8)
    for wait in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="batch_wait_ms must be a finite number >= 0"):
            ServeLimits(batch_wait_ms=wait)
    # still alive and still right after all of that
    assert complete(client, "a", PROMPTS[2]).json()["choices"][0]["text"] == env["offline"].text(PROMPTS[2], "a", 8)
    assert client.get("/health").json() == {"status": "ok"}


def test_prompt_adapter_runs_alone_and_equals_offline(env):
    """A prompt-tuning adapter cannot join a mixed batch: the server runs its requests alone, with it active."""
    client, root = env["client"], env["root"]
    prompt_model = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"), "p")
    prompt_model.save_pretrained(str(root / "prompt"))
    assert client.post("/v1/adapters/load", json={"name": "p", "path": str(root / "prompt" / "p")}).status_code == 200
    try:
        requests = [dict(model="p", prompt=PROMPTS[0], max_tokens=6, temperature=0),
                    dict(model="a", prompt=PROMPTS[1], max_tokens=6, temperature=0)]
        env["engine"].pause()
        try:
            threads, responses = send_all(env, requests)
        finally:
            env["engine"].resume()
        for thread in threads:
            thread.join()
        offline = PeftModel.from_pretrained(tiny_llama(), str(root / "prompt" / "p"), adapter_name="p").eval()
        ids = torch.tensor([env["tokenizer"](PROMPTS[0])["input_ids"]])
        out = offline.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, -6:].tolist()
        expected = env["tokenizer"].decode(out[:out.index(2)] if 2 in out else out, skip_special_tokens=True)
        assert responses[0].json()["choices"][0]["text"] == expected
        assert responses[1].json()["choices"][0]["text"] == env["offline"].text(PROMPTS[1], "a", 6)
        batches = client.get("/v1/stats").json()["recent_batches"]
        assert [b["size"] for b in batches if responses[0].json()["id"] in b["ids"]] == [1]
    finally:
        assert client.delete("/v1/adapters/p").status_code == 200


def test_app_over_a_peft_model_serves_its_adapters(env):
    """build_app also takes a PeftModel: its adapters are served (in-process client, no adapters directory)."""
    from fastapi.testclient import TestClient

    root = env["root"]
    model = PeftModel.from_pretrained(tiny_llama(), str(root / "adapters" / "b"), adapter_name="b")
    model.load_adapter(str(root / "extra" / "d"), "d")
    with TestClient(build_app(model, env["tokenizer"], limits=LIMITS)) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base", "b", "d"]
        for name in ("d", "base"):
            text = complete(client, name, PROMPTS[3], max_tokens=7).json()["choices"][0]["text"]
            assert text == env["offline"].text(PROMPTS[3], name, 7)


def test_flags_and_a_missing_model(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path / "missing"), "--max-batch", "4", "--batch-wait-ms", "2.5",
                              "--max-tokens-limit", "64", "--max-body-bytes", "100", "--max-concurrency", "3"])
    limits = limits_from_args(args)
    assert (limits.max_batch, limits.batch_wait_ms, limits.max_tokens_limit, limits.max_body_bytes,
            limits.max_concurrency) == (4, 2.5, 64, 100, 3)
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    assert main(args) == 2  # a clear message, no traceback, no server
    assert "missing" in capsys.readouterr().err
    clash = parser.parse_args(["--model", "m", "--default-max-tokens", "16", "--max-tokens-limit", "8"])
    with pytest.raises(ValueError, match=r"^--default-max-tokens \(16\) exceeds --max-tokens-limit \(8\)"):
        limits_from_args(clash)  # in the flags' names, not ServeLimits' fields


# --- incremental decoding of a stream ------------------------------------------------------------------------
SAMPLE = ("Hello wörld, the café sells crème brûlée. 日本語のテキスト and emoji 🙂👍 mixed in; "
          "naïve façade, ✓ done. Ünïcödé again: 東京 🙂 end.")


def trained_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A small tokenizer trained here: byte-level BPE (GPT-2 / SmolLM2 style, multi-byte characters split over
    tokens) or Metaspace BPE (SentencePiece / Llama style, a word's leading space in its first token)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None if kind == "bytelevel" else "<unk>"))
    if kind == "bytelevel":
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        alphabet = sorted(set(SAMPLE))
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"], initial_alphabet=alphabet)
    tok.train_from_iterator([SAMPLE.replace("🙂", "")] * 3, trainer)  # the emoji stay split into bytes / unknown
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


class CountingTokenizer:
    """Forwards decode, counting the tokens it was given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, tokens, **kw) -> str:
        self.decoded += len(tokens)
        return self.tokenizer.decode(tokens, **kw)


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_text_so_far_equals_the_full_decode_at_every_step(kind):
    from peftkit.serve.schemas import TextSoFar

    tokenizer = trained_tokenizer(kind)
    ids = tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert len(ids) > 20 and "🙂" in full
    for chunk in (1, 3):
        so_far, unfinished = TextSoFar(tokenizer), 0
        for i in range(0, len(ids), chunk):
            text = so_far.extend(ids[i:i + chunk])
            prefix = tokenizer.decode(ids[:i + chunk], skip_special_tokens=True)
            assert not text.endswith("\ufffd") and full.startswith(text)
            if prefix.endswith("\ufffd"):  # a character split over tokens waits until it is whole
                unfinished += 1
                assert prefix.startswith(text) and len(text) < len(prefix)
            else:
                assert text == prefix
        assert so_far.finish() == full
        assert unfinished > 0 or kind == "metaspace"  # byte-level BPE does split the emoji


def test_text_so_far_decodes_each_token_a_bounded_number_of_times():
    from peftkit.serve.schemas import TextSoFar

    counting = CountingTokenizer(trained_tokenizer("bytelevel"))
    ids = counting.tokenizer(SAMPLE * 4, add_special_tokens=False)["input_ids"]
    so_far = TextSoFar(counting)
    for token in ids:
        so_far.extend([token])
    assert so_far.finish() == counting.tokenizer.decode(ids)
    assert counting.decoded <= 8 * len(ids)  # a full decode per token would be len(ids)^2 / 2 (about 60x more here)
    assert len(ids) ** 2 / 2 > 40 * counting.decoded


def test_text_so_far_stops_at_end_of_sequence_and_max_tokens():
    from peftkit.serve.schemas import TextSoFar

    tokenizer = tiny_tokenizer()
    ids = tokenizer("red blue green one two", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    so_far = TextSoFar(tokenizer, frozenset({eos}), max_tokens=10)
    assert so_far.extend(ids[:2]) == "red blue"
    assert so_far.extend([ids[2], eos, ids[3]]) == "red blue green" and so_far.ended
    assert so_far.extend([ids[4]]) == "red blue green" and so_far.finish() == "red blue green"
    capped = TextSoFar(tokenizer, frozenset({eos}), max_tokens=3)
    assert capped.extend(ids) == "red blue green" and capped.tokens == ids[:3]


def first_stopping_prefix(tokenizer, ids: list[int], stops: list[str]) -> int:
    """The definition of the completion count at a stop: the first k whose full decode of ids[:k] holds a stop."""
    return next(k for k in range(1, len(ids) + 1)
                if any(s in tokenizer.decode(ids[:k], skip_special_tokens=True) for s in stops))


def test_render_counts_the_tokens_up_to_the_stop_string():
    from peftkit.serve.engine import Generated
    from peftkit.serve.schemas import render

    tokenizer = tiny_tokenizer()
    ids = tokenizer("the cat sat on the mat and the dog", add_special_tokens=False)["input_ids"]
    assert render(tokenizer, Generated(ids, "length"), [" on the"]) == ("the cat sat", 5, "stop")
    assert render(tokenizer, Generated(ids, "length"), ["mat", " and"]) == ("the cat sat on the ", 6, "stop")
    assert render(tokenizer, Generated(ids, "length"), ["bird"]) == ("the cat sat on the mat and the dog", 9, "length")
    # multi-byte characters split over byte-level tokens: a stop just before one is complete when the token that
    # starts the character arrives (its decode ends in U+FFFD), not a token later
    tokenizer = trained_tokenizer("bytelevel")
    ids = tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(ids)
    checked = 0
    for start in range(0, len(text) - 4, 3):
        for width in (1, 2, 4):
            stop = text[start:start + width]
            if "\ufffd" in stop or not stop.strip():
                continue
            got = render(tokenizer, Generated(ids, "length"), [stop])
            assert got == (text[:text.index(stop)], first_stopping_prefix(tokenizer, ids, [stop]), "stop"), stop
            checked += 1
    assert checked > 80


class FakeEngine:
    """What _events reads of the engine: a tokenizer, its end-of-sequence ids and Engine.cut."""

    def __init__(self, tokenizer, eos_ids) -> None:
        from peftkit.serve.engine import Engine

        self.tokenizer, self.eos_ids, self._cut = tokenizer, set(eos_ids), Engine.cut

    def cut(self, tokens, max_tokens):
        return self._cut(self, tokens, max_tokens)


def streamed(tokenizer, ids: list[int], stops: list[str], chunk: int, eos_ids=(), max_tokens=100) -> tuple:
    """(text, completion tokens, finish reason) of peftkit.serve.app._events fed ``ids`` ``chunk`` at a time."""
    import asyncio
    import concurrent.futures
    import types

    from peftkit.serve.app import _events

    engine = FakeEngine(tokenizer, eos_ids)
    job = types.SimpleNamespace(id="x", max_tokens=max_tokens, input_ids=[1], future=concurrent.futures.Future(),
                                stream=types.SimpleNamespace(queue=asyncio.Queue(), cancel=threading.Event()))
    for i in range(0, len(ids), chunk):
        job.stream.queue.put_nowait(ids[i:i + chunk])
    job.stream.queue.put_nowait(None)
    job.future.set_result(engine.cut(ids, max_tokens))

    async def collect():
        return [event async for event in _events(engine, job, stops, "m", False, True)]

    texts, count, finish = [], None, None
    for event in asyncio.run(collect()):
        body = event[len("data: "):].strip()
        if body == "[DONE]":
            continue
        data = json.loads(body)
        assert "error" not in data, data
        if data["choices"]:
            texts.append(data["choices"][0]["text"])
            finish = data["choices"][0]["finish_reason"] or finish
        else:
            count = data["usage"]["completion_tokens"]
    assert not any("\ufffd" in t for t in texts[:-2])  # no half character was sent before the end
    return "".join(texts), count, finish


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_stream_equals_the_whole_response_with_multibyte_text(kind):
    from peftkit.serve.engine import Generated
    from peftkit.serve.schemas import render

    tokenizer = trained_tokenizer(kind)
    eos = tokenizer.eos_token_id
    ids = tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(ids)
    cases = [([], {}), ([text[40:44]], {}), ([text[-5:]], {}), (["zzz", text[10:12]], {}),  # a stop at the very end too
             ([], {"eos_ids": [eos], "ids": ids[:20] + [eos] + ids[20:]}), ([], {"max_tokens": 17})]
    for stops, extra in cases:
        seq = extra.get("ids", ids)
        engine = FakeEngine(tokenizer, extra.get("eos_ids", ()))
        whole = render(tokenizer, engine.cut(seq, extra.get("max_tokens", 100)), stops)
        for chunk in (1, 2, 5):
            got = streamed(tokenizer, seq, stops, chunk, extra.get("eos_ids", ()), extra.get("max_tokens", 100))
            assert got == whole, (stops, extra.keys(), chunk)
    assert render(tokenizer, Generated(ids, "length"), [text[-5:]])[2] == "stop"


def test_stream_with_a_tokenizer_that_cleans_up_spaces():
    # WordPiece-style decoding with clean_up_tokenization_spaces: "it ' s" decodes to "it's" only with the text
    # before it, so the stream decodes whole (as render does) and honours a stop that the cleanup creates
    from tokenizers import decoders

    from peftkit.serve.schemas import render

    vocab = {t: i for i, t in enumerate(["<unk>", "</s>", "it", "'", "s", "is", "ok", "."])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = Whitespace(), decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                                        clean_up_tokenization_spaces=True)
    ids = [vocab[w] for w in ["it", "'", "s", "is", "ok", "."]]
    assert tokenizer.decode(ids) == "it's is ok."
    for stops in ([], ["it's"], ["ok."], ["s is"]):
        for chunk in (1, 2):
            assert streamed(tokenizer, ids, stops, chunk) == render(tokenizer, FakeEngine(tokenizer, ()).cut(ids, 100), stops)
    assert streamed(tokenizer, ids, ["it's"], 1) == ("", 3, "stop")


def test_batches_are_split_to_stay_within_the_context():
    """Rows pad to the longest prompt and run for the largest max_tokens: a 24-token prompt asking 4 and a 2-token
    prompt asking 20 each fit a 32-token context, but not together (24 + 20)."""
    from types import SimpleNamespace

    from peftkit.serve.engine import Engine

    engine = SimpleNamespace(context=lambda: 32, virtual_tokens=lambda adapter: 6 if adapter == "prompt" else 0)
    jobs = [SimpleNamespace(input_ids=[1] * n, max_tokens=m, adapter="a")
            for n, m in ((24, 4), (2, 20), (3, 4), (20, 8), (6, 2))]
    parts = Engine._within_context(engine, jobs)
    assert [[jobs.index(j) for j in part] for part in parts] == [[0], [1, 2], [3, 4]]
    assert all(max(len(j.input_ids) for j in p) + max(j.max_tokens for j in p) <= 32 for p in parts)
    jobs[2].adapter = jobs[4].adapter = "prompt"  # 6 virtual tokens each: 9 and 12 wide, both still fit
    assert [[jobs.index(j) for j in part] for part in Engine._within_context(engine, jobs)] == [[0], [1, 2], [3, 4]]
    jobs[2].input_ids = [1] * 7  # 7 + 6 = 13 wide: beside job 1 (20 new tokens) 33 > 32, so a part of its own,
    # which job 3 (20 + 8) and job 4 (12 + 2) join
    assert [[jobs.index(j) for j in part] for part in Engine._within_context(engine, jobs)] == [[0], [1], [2, 3, 4]]
    engine.context = lambda: None  # no known context: one batch
    assert Engine._within_context(engine, jobs) == [jobs]


def test_the_engines_context_is_the_models_learned_positions(env):
    assert env["engine"].context() == tiny_llama().config.max_position_embeddings


def test_a_request_cancelled_while_queued_leaves_the_batcher_serving(env):
    """A client that gives up on a queued request (asyncio.wrap_future cancels the job's future) made set_result raise
    InvalidStateError in the batcher thread, which died: the other request of its batch and every later one hung,
    while /health said ok."""
    import asyncio

    from fastapi.testclient import TestClient

    from peftkit.serve.engine import Engine, Job, Sampling

    engine = Engine(tiny_llama(), env["tokenizer"], limits=ServeLimits(batch_wait_ms=0))
    ids = env["tokenizer"](PROMPTS[0])["input_ids"]

    async def scenario() -> tuple:
        engine.pause()
        gone = asyncio.ensure_future(asyncio.wrap_future(engine.submit(Job("r1", "__base__", ids, 4, Sampling()))))
        kept = asyncio.wrap_future(engine.submit(Job("r2", "__base__", ids, 4, Sampling())))
        await asyncio.sleep(0.05)
        gone.cancel()
        await asyncio.sleep(0.05)
        engine.resume()
        first = await asyncio.wait_for(kept, 20)
        later = await asyncio.wait_for(asyncio.wrap_future(engine.submit(Job("r3", "__base__", ids, 4, Sampling()))), 20)
        return first, later

    try:
        first, later = asyncio.run(scenario())
        assert first.tokens == later.tokens and len(first.tokens) == 4 and engine.alive()
    finally:
        engine.close()
    assert not engine.alive()
    with TestClient(build_app(tiny_llama(), env["tokenizer"], limits=LIMITS)) as client:
        assert client.get("/health").json() == {"status": "ok"}
        client.app.state.engine.close()
        assert client.get("/health").status_code == 503  # no request would be answered: not "ok"


def test_the_engine_puts_a_peft_model_in_training_mode_into_eval(env):
    """The engine set only the base to eval: a P-tuning encoder's dropout stayed on, so identical greedy requests
    gave different answers."""
    from peftkit import PromptEncoderConfig
    from peftkit.serve.engine import Engine

    model = get_peft_model(tiny_llama(), PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16,
                                                             encoder_dropout=0.5, task_type="CAUSAL_LM")).train()
    engine = Engine(model, env["tokenizer"], limits=LIMITS)
    try:
        assert not any(module.training for module in model.modules())
    finally:
        engine.close()


def test_a_queued_request_is_not_answered_by_another_adapter_loaded_under_its_name(env):
    """A request queued for adapter "x" ran with whatever was loaded as "x" when its batch came: after an unload and
    a load of other weights under the same name, it was answered by those."""
    from peftkit.serve.engine import Engine, Job, Sampling

    root = env["root"]
    engine = Engine(tiny_llama(), env["tokenizer"], limits=ServeLimits(batch_wait_ms=0))
    ids = env["tokenizer"](PROMPTS[0])["input_ids"]
    try:
        engine.load("x", str(root / "adapters" / "b"))
        engine.pause()
        queued = engine.submit(Job("r1", "x", ids, 4, Sampling()))
        engine.unload("x")
        engine.load("x", str(root / "extra" / "d"))
        engine.resume()
        with pytest.raises(Exception, match="'x' was unloaded \\(or replaced\\) before this request ran"):
            queued.result(timeout=20)
        assert len(engine.submit(Job("r2", "x", ids, 4, Sampling())).result(timeout=20).tokens) == 4  # queued now
    finally:
        engine.close()

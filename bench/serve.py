"""`peftkit serve` throughput: requests/s and generated tokens/s at 1, 8 and 32 concurrent clients, mixed adapters.

A SmolLM2-135M-shaped Llama with random weights (4 layers by default, to stay quick on CPU), a word-level
tokenizer over its 49152 ids, and 8 LoRA adapters (r=16 on q, k, v, o, gate, up, down, random nonzero B) are
saved to a temporary directory; `python -m peftkit.serve` serves them in a subprocess (as a user would run
it), and N client threads each send greedy /v1/completions requests (random prompt of 8-24 words,
max_tokens 32, adapter drawn at random from the 8 adapters and the base) back to back until the run's
request count is reached. Each server setting (--max-batch values, 1 = no batching) gets its own server.
Reported per row: requests/s, generated tokens/s, latency p50 / p95, mean requests per generate call
(from /v1/stats). Numbers on a shared machine are noisy.

Run (from the repository root):

    python bench/serve.py                           # clients 1, 8, 32; max-batch 32 and 1; CPU
    python bench/serve.py --clients 1,8 --requests 2 --max-batch 32   # a quick check

It prints a markdown table and writes bench/results/serve.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import SMOLLM2_135M, TARGETS  # noqa: E402  (shapes shared with the other benches)

RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4, help="decoder layers (SmolLM2-135M has 30)")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--clients", default="1,8,32", help="concurrent client counts")
    p.add_argument("--requests", type=int, default=2, help="requests per client (at least 8 in all per row)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", default="32,1", help="server --max-batch values (1 = no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def build_files(root: Path, args: argparse.Namespace) -> None:
    """Save the random base model + tokenizer to root/model and the adapters to root/adapters/<name>."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from peftkit import LoraConfig, get_peft_model

    shape = dict(SMOLLM2_135M, num_hidden_layers=args.layers)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(shape["vocab_size"] - 4)]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    names = [f"task{i}" for i in range(args.adapters)]
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS), names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero; random B makes every adapter change the output
        for pname, param in peft_model.named_parameters():
            if "lora_B" in pname:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    peft_model.save_pretrained(str(root / "adapters"), selected_adapters=names)


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(root: Path, max_batch: int, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """`python -m peftkit.serve` in a subprocess; (process, base url) once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "peftkit.serve", "--model", str(root / "model"), "--adapters", str(root / "adapters"),
           "--port", str(port), "--max-batch", str(max_batch), "--batch-wait-ms", str(args.batch_wait_ms),
           "--max-concurrency", "256", "--device", args.device, "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("the server did not start within 300 s")


def one_row(url: str, clients: int, per_client: int, models: list[str], vocab: int, max_tokens: int) -> dict:
    """Run `clients` threads of back-to-back requests; throughput and latency."""
    latencies, tokens, lock = [], [0], threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=600) as http:
            for _ in range(per_client):
                prompt = " ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(rng.randint(8, 24)))
                body = {"model": rng.choice(models), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
                start = time.perf_counter()
                response = http.post("/v1/completions", json=body)
                response.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - start)
                    tokens[0] += response.json()["usage"]["completion_tokens"]

    before = httpx.get(f"{url}/v1/stats").json()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    after = httpx.get(f"{url}/v1/stats").json()
    calls = max(after["batches"] - before["batches"], 1)
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "seconds": round(wall, 3),
            "requests_per_s": round(len(latencies) / wall, 3), "tokens_per_s": round(tokens[0] / wall, 1),
            "latency_p50_s": round(statistics.median(latencies), 3),
            "latency_p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3),
            "mean_batch": round((after["requests"] - before["requests"]) / calls, 2)}


def markdown_table(rows: list[dict]) -> str:
    """The results as a markdown table."""
    lines = ["| server max-batch | clients | requests | req/s | gen tokens/s | p50 latency s | p95 latency s | "
             "mean batch |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['max_batch']} | {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} | "
                     f"{r['mean_batch']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Build the files, then serve and measure each (max-batch, clients) pair."""
    args = parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    models = ["base"] + [f"task{i}" for i in range(args.adapters)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_files(root, args)
        for max_batch in [int(b) for b in args.max_batch.split(",")]:
            proc, url = start_server(root, max_batch, args)
            try:
                one_row(url, 1, 1, models, SMOLLM2_135M["vocab_size"], args.max_tokens)  # warm-up
                for c in clients:
                    per_client = max(args.requests, -(-8 // c))
                    row = one_row(url, c, per_client, models, SMOLLM2_135M["vocab_size"], args.max_tokens)
                    rows.append(dict(row, max_batch=max_batch))
                    print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    table = markdown_table(rows)
    settings = {"shape": dict(SMOLLM2_135M, num_hidden_layers=args.layers), "adapters": args.adapters,
                "lora": {"r": 16, "lora_alpha": 32, "targets": TARGETS}, "max_tokens": args.max_tokens,
                "batch_wait_ms": args.batch_wait_ms, "device": args.device, "torch": torch.__version__,
                "cpus": os.cpu_count(), "note": "shared machine: numbers are noisy"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": settings, "rows": rows, "table": table}, indent=2) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Loading many adapters onto one base: time per ``load_adapter`` call as the count grows, peftkit vs peft.

N random LoRA adapters (r=16, alpha=32 on q, k, v, o, gate, up, down of a SmolLM2-135M-shaped Llama with
--layers decoder layers) are saved once to a temporary directory in PEFT's format. Then, for each library in
its own fresh process, one base model gets the first adapter with ``PeftModel.from_pretrained`` and the
other N - 1 with ``load_adapter``, one after another; each call is timed. Reported per library: median
seconds per adapter over the first 10 and the last 10 loads (medians: a shared machine is noisy), their
ratio (flat = 1.0), the adapter file size, and resident memory (RSS) added per adapter over the whole run.

Run (from the repository root):

    python bench/adapter_load.py                           # 100 adapters, 4 layers, CPU
    python bench/adapter_load.py --adapters 30 --layers 2  # a quick check

It prints a markdown table and writes bench/results/adapter_load.json. Timings on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import SMOLLM2_135M, TARGETS  # noqa: E402  (shapes shared with the other benches)

RESULTS = Path(__file__).resolve().parent / "results" / "adapter_load.json"
WINDOW = 10  # loads averaged at the start and at the end


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapters", type=int, default=100)
    p.add_argument("--layers", type=int, default=4, help="decoder layers (SmolLM2-135M has 30)")
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="torch.set_num_threads")
    p.add_argument("--libraries", default="peftkit,peft")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: time one library on --dir
    p.add_argument("--dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def base_model(layers: int) -> torch.nn.Module:
    """A random SmolLM2-135M-shaped Llama with ``layers`` decoder layers, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**dict(SMOLLM2_135M, num_hidden_layers=layers))).eval()


def save_adapters(directory: str, n: int, layers: int) -> int:
    """Write n random adapters to directory/a{i}; the size of one adapter file in bytes."""
    from peftkit import LoraConfig, get_peft_model
    model = get_peft_model(base_model(layers), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    tensors = model.adapter_parameters("default").values()
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        with torch.no_grad():
            for t in tensors:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
        model.save_pretrained(os.path.join(directory, f"a{i}"))
    return os.path.getsize(os.path.join(directory, "a0", "adapter_model.safetensors"))


def rss_mb() -> float:
    """Resident memory of this process in MiB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def worker(library: str, directory: str, n: int, layers: int) -> dict:
    """Load the n adapters one after another with ``library``; per-load seconds and memory."""
    peft_model_cls = __import__("peft" if library == "peft" else "peftkit").PeftModel
    base = base_model(layers)
    rss0 = rss_mb()
    model = peft_model_cls.from_pretrained(base, os.path.join(directory, "a0"), adapter_name="a0")
    times = []
    for i in range(1, n):
        start = time.perf_counter()
        model.load_adapter(os.path.join(directory, f"a{i}"), adapter_name=f"a{i}")
        times.append(time.perf_counter() - start)
    return {"times": times, "rss_per_adapter_mb": (rss_mb() - rss0) / n, "adapters": len(model.peft_config)}


def run_worker(library: str, directory: str, args) -> dict:
    """One library in a fresh process, so memory and caches do not carry over."""
    cmd = [sys.executable, __file__, "--worker", library, "--dir", directory, "--adapters", str(args.adapters),
           "--layers", str(args.layers), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.dir, args.adapters, args.layers)))
        return
    results = {"adapters": args.adapters, "layers": args.layers, "threads": args.threads, "libraries": {}}
    with tempfile.TemporaryDirectory() as directory:
        results["adapter_mb"] = save_adapters(directory, args.adapters, args.layers) / 2 ** 20
        for library in args.libraries.split(","):
            run = run_worker(library, directory, args)
            first, last = run["times"][:WINDOW], run["times"][-WINDOW:]
            run.update(first_s=statistics.median(first), last_s=statistics.median(last))
            results["libraries"][library] = run
    report(args, results)


def report(args, results: dict) -> None:
    """Print the markdown table and write the JSON."""
    n = results["adapters"]
    print(f"\n{n} LoRA adapters (r=16, all linear, {results['adapter_mb']:.1f} MiB each) loaded one after another "
          f"onto a SmolLM2-135M-shaped Llama with {results['layers']} layers, CPU, {results['threads']} threads\n")
    print(f"| library | s / adapter, loads 1-{WINDOW} | s / adapter, last {WINDOW} | last / first | RSS MiB / adapter |")
    print("|---|---|---|---|---|")
    for library, run in results["libraries"].items():
        print(f"| {library} | {run['first_s']:.4f} | {run['last_s']:.4f} | {run['last_s'] / run['first_s']:.2f} "
              f"| {run['rss_per_adapter_mb']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

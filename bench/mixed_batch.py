"""Mixed-adapter batches: forward time of one base model serving many LoRA adapters, peftkit vs peft.

Rows timed (each library wraps its own copy of one randomly initialised Llama; same weights, same batch):

    base       the plain transformers model, no adapters
    1 adapter  one active adapter, no adapter_names
    mix N      adapter_names=[...] cycling over N adapters (N = 4, 16, 64) across the batch's rows

LoRA r=16, alpha=32 on q, k, v, o, gate, up, down; --adapters (64) adapters are loaded onto each model
whatever N is, so every mixed row also measures a layer holding many adapters. Forward passes run in
eval mode under torch.no_grad with logits for the last position only (``logits_to_keep=1``, as in a
generate prefill), so the vocabulary projection does not hide the adapters' cost. Each case is timed
--repeats times after a warm-up; the median is reported, and its ratio to the base.

Run (from the repository root):

    python bench/mixed_batch.py                         # SmolLM2-135M shape, 4 layers, 64 x 32 tokens, CPU
    python bench/mixed_batch.py --layers 2 --repeats 2  # a quick check
    python bench/mixed_batch.py --gpu-preset            # TinyLlama-1.1B shape, 32 x 256 tokens, bf16, cuda

It prints a markdown table and writes bench/results/mixed_batch.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import SMOLLM2_135M, TINYLLAMA_1B, TARGETS  # noqa: E402  (shapes shared with the other benches)

RESULTS = Path(__file__).resolve().parent / "results" / "mixed_batch.json"
MIXES = (4, 16, 64)


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4, help="decoder layers (SmolLM2-135M has 30)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--adapters", type=int, default=64, help="adapters loaded on each model")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per case (median reported)")
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="torch.set_num_threads")
    p.add_argument("--libraries", default="peftkit,peft")
    p.add_argument("--gpu-preset", action="store_true", help="TinyLlama-1.1B shape, 22 layers, 32 x 256, bf16, cuda")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.device, args.dtype, args.shape = "cpu", torch.float32, dict(SMOLLM2_135M, num_hidden_layers=args.layers)
    if args.gpu_preset:
        args.device, args.dtype, args.shape = "cuda", torch.bfloat16, TINYLLAMA_1B
        args.batch, args.seq = 32, 256
    return args


def base_model(args) -> torch.nn.Module:
    """A random Llama of the chosen shape, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**args.shape)).to(args.device, args.dtype).eval()


def wrap(library: str, model, n: int):
    """``model`` with n random LoRA adapters a0..a{n-1} under ``library``; a0 active."""
    if library == "peft":
        from peft import LoraConfig, get_peft_model
    else:
        from peftkit import LoraConfig, get_peft_model
    config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, config, "a0")
    for i in range(1, n):
        peft_model.add_adapter(f"a{i}", config)
    peft_model.set_adapter("a0")
    return peft_model.eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_forward(model, inputs: dict, args) -> float:
    """Median seconds of one forward over --repeats, after one warm-up."""
    times = []
    with torch.no_grad():
        for i in range(args.repeats + 1):
            sync(args.device)
            start = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            sync(args.device)
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, args.shape["vocab_size"], (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    model = base_model(args)
    rows = {"base": time_forward(model, {"input_ids": ids}, args)}
    results = {}
    for library in [s.strip() for s in args.libraries.split(",") if s.strip()]:
        wrapped = wrap(library, copy.deepcopy(model), args.adapters)
        res = {"base": rows["base"], "1 adapter": time_forward(wrapped, {"input_ids": ids}, args)}
        for n in (m for m in MIXES if m <= args.adapters):
            names = [f"a{i % n}" for i in range(args.batch)]
            res[f"mix {n}"] = time_forward(wrapped, {"input_ids": ids, "adapter_names": names}, args)
        results[library] = res
        del wrapped
    report(args, results)


def report(args, results: dict) -> None:
    """Print the markdown table and write the JSON."""
    cases = list(next(iter(results.values())))
    libs = list(results)
    print(f"\nforward ms (median of {args.repeats}), {args.layers if not args.gpu_preset else 22} layers, "
          f"batch {args.batch} x {args.seq}, {args.device}, {str(args.dtype).split('.')[-1]}, "
          f"{args.threads} threads; (x base)\n")
    print("| case | " + " | ".join(libs) + " |")
    print("|---|" + "---|" * len(libs))
    for case in cases:
        cells = [f"{results[lib][case] * 1e3:.1f} ({results[lib][case] / results[lib]['base']:.2f}x)" for lib in libs]
        print(f"| {case} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "dtype")}
    settings["dtype"] = str(args.dtype)
    args.out.write_text(json.dumps({"settings": settings, "seconds": results}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

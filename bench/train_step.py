"""Training-step benchmark: peftkit against Hugging Face PEFT, the limit and full fine-tuning.

What it measures, on one randomly initialised Llama model and one fixed batch (same seed everywhere):
the median (and min) wall time of a training step and the peak memory of each variant.

    limit              every weight frozen; forward + backward to the input embeddings only. No weight
                       gradients and no optimizer: the floor that any adapter method pays.
    limit-onednn       the limit with the seven target projections' matmuls run through the GEMM that
                       peftkit's LoRA kernel uses (oneDNN for float32 on CPU; elsewhere torch's own, so
                       the same as limit). torch's float32 CPU matmul is MKL's sgemm, which on AMD CPUs
                       runs at under half of oneDNN's speed: this is the floor for peftkit's kernels, and
                       peftkit-lora / limit-onednn is the adapter's own cost.
    peftkit-lora       LoRA r=16, alpha=32 on q, k, v, o, gate, up, down; dropout 0
    peft-lora          the same with Hugging Face PEFT
    peftkit-lora-drop  LoRA with lora_dropout=0.05 (likewise peft-lora-drop)
    peftkit-dora       DoRA, use_dora=True (likewise peft-dora)
    full               every parameter trained

A step is zero_grad + forward + causal-LM loss + backward + fused AdamW(lr 1e-4).step() (the limit has no
optimizer). Each variant builds the model, warms up for 2 steps, then times --steps steps.

Each variant runs in its own subprocess (this script re-invokes itself with --variant NAME), so peak
memory is per variant: peak RSS (Linux's VmHWM; ru_maxrss would also count this parent's memory up to the
fork) on CPU, torch.cuda.max_memory_allocated on CUDA; both
cover the whole child process (model, batch, activations, gradients, optimizer state). With
--repeats R the parent runs R rounds, alternating the order (forward, reversed, ...) so that drift in
machine load spreads over all variants; step times are pooled over the rounds.

Run (from the repository root):

    python bench/train_step.py                        # SmolLM2-135M shape, CPU, float32, 4 x 128 tokens
    python bench/train_step.py --layers 2 --steps 2   # a quick check that everything runs
    python bench/train_step.py --variants limit,peftkit-lora,peft-lora --repeats 3
    python bench/train_step.py --gpu-preset           # TinyLlama-1.1B shape, CUDA, bfloat16, 8 x 1024

It prints a markdown table and writes bench/results/train_step.json. Run it on a quiet machine: the
timings are only as good as the machine is idle. Every child runs with the same glibc malloc thresholds
(STEADY_MALLOC, below), so that page faults from memory returned to the OS between steps do not decide the
ranking; --default-malloc keeps glibc's defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from peftkit.cli import MMAP_THRESHOLD, TRIM_THRESHOLD  # what the peftkit command sets for itself

VARIANTS = (
    "limit", "limit-onednn", "peftkit-lora", "peft-lora", "peftkit-lora-drop", "peft-lora-drop",
    "peftkit-dora", "peft-dora", "full",
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}
LORA_EXTRA = {"lora": {}, "lora-drop": {"lora_dropout": 0.05}, "dora": {"use_dora": True}}
LR = 1e-4
WARMUP = 2

# Model shapes; the weights are random (nothing is downloaded).
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
TINYLLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
CPU_RUN = dict(shape=SMOLLM2_135M, batch=4, seq=128, device="cpu", dtype="float32")
GPU_RUN = dict(shape=TINYLLAMA_1B, batch=8, seq=1024, device="cuda", dtype="bfloat16")

RESULTS = Path(__file__).resolve().parent / "results" / "train_step.json"


# --- arguments ----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; unset ones take the preset's value (see ``resolve``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list from {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant and round")
    p.add_argument("--repeats", type=int, default=2, help="rounds over the variants, order alternating")
    p.add_argument("--layers", type=int, help="override the number of decoder layers (quick checks)")
    p.add_argument("--batch", type=int, help="sequences per batch (preset: 4 on CPU, 8 on GPU)")
    p.add_argument("--seq", type=int, help="tokens per sequence (preset: 128 on CPU, 1024 on GPU)")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    p.add_argument("--gpu-preset", action="store_true", help="TinyLlama-1.1B shape, 8 x 1024, bf16 on cuda")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each child")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS, help="where the JSON results go")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc thresholds at their defaults")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # set when the script re-invokes itself
    return resolve(p.parse_args(argv))


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset flags from the CPU or GPU preset; check the variant names."""
    preset = GPU_RUN if args.gpu_preset else CPU_RUN
    for key in ("batch", "seq", "device", "dtype"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.shape = dict(preset["shape"], num_hidden_layers=args.layers or preset["shape"]["num_hidden_layers"])
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda (or --gpu-preset) needs a GPU and a CUDA build of torch (this is "
                         f"{torch.__version__}); add --device cpu to run the preset's shape on the CPU")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants + [args.variant] if v is not None and v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def child_argv(args: argparse.Namespace, variant: str) -> list[str]:
    """The command that runs one variant in a fresh process, with every setting spelled out."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--steps", str(args.steps),
            "--batch", str(args.batch), "--seq", str(args.seq), "--device", args.device, "--dtype", args.dtype,
            "--threads", str(args.threads), "--seed", str(args.seed)]
    if args.layers:
        argv += ["--layers", str(args.layers)]
    return argv + (["--gpu-preset"] if args.gpu_preset else [])


# --- the child: one variant -----------------------------------------------------------------------
def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """A randomly initialised LlamaForCausalLM of the preset's shape, in train mode on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**args.shape, max_position_embeddings=2048, use_cache=False)
    torch.manual_seed(args.seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, args.dtype))  # build in the target dtype: no fp32 copy in the peak
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.train()


def apply_variant(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    """Freeze, unfreeze or wrap ``model`` with an adapter, as ``variant`` says."""
    if variant in ("limit", "full"):
        return model.requires_grad_(variant == "full")
    if variant == "limit-onednn":
        return frozen_targets_through_peftkit_gemm(model.requires_grad_(False))
    library, method = variant.split("-", 1)
    if library == "peft":
        from peft import LoraConfig, get_peft_model
    else:
        from peftkit import LoraConfig, get_peft_model
    config = LoraConfig(**{**LORA, **LORA_EXTRA[method]}, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    torch.manual_seed(1)  # same adapter-init stream for both libraries
    return get_peft_model(model, config)


class FrozenLinear(torch.autograd.Function):
    """y = x W^T + b and its input gradient g W, through peftkit's GEMM (lora_kernels.linear)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        from peftkit.methods.lora_kernels import linear

        ctx.save_for_backward(weight)
        ctx.x_shape = x.shape
        return linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g):
        from peftkit.methods.lora_kernels import linear

        (weight,) = ctx.saved_tensors
        return linear(g.reshape(-1, g.shape[-1]), weight.t()).view(ctx.x_shape), None, None


class FrozenTarget(torch.nn.Module):
    """A frozen target projection whose forward runs FrozenLinear."""

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FrozenLinear.apply(x, self.base.weight, self.base.bias)


def frozen_targets_through_peftkit_gemm(model: torch.nn.Module) -> torch.nn.Module:
    """The frozen model with every TARGETS projection wrapped in FrozenTarget (the limit-onednn variant)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and isinstance(child, torch.nn.Linear):
                setattr(module, child_name, FrozenTarget(child))
    return model


def make_batch(args: argparse.Namespace) -> torch.Tensor:
    """The token ids every variant trains on, (batch, seq); they double as the labels."""
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.shape["vocab_size"], (args.batch, args.seq), generator=gen)
    return ids.to(args.device)


def make_step(model: torch.nn.Module, variant: str, ids: torch.Tensor):
    """A no-argument function running one training step; returns (step, trainable parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW: one kernel over all tensors. The default (foreach) implementation took 70-290 ms per step
    # on the ~420 LoRA tensors of this model on the 2-core CPU, the same cost for every library compared.
    # The limit has none, also on a model whose adapters it bypasses (bench/ab_step.py --toggle adapter).
    opt = torch.optim.AdamW(params, lr=LR, fused=True) if params and not variant.startswith("limit") else None
    embed = model.get_input_embeddings()

    def step() -> torch.Tensor:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        if variant.startswith("limit"):
            x = embed(ids).detach().requires_grad_(True)  # (batch, seq, hidden): the only gradient taken
            loss = model(inputs_embeds=x, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
        return loss.detach()

    return step, params


def sync(device: str) -> None:
    """Wait for queued GPU work so that the clock sees it."""
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(step, n: int, device: str) -> list[float]:
    """Seconds taken by each of ``n`` calls of ``step``."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def peak_rss_mb() -> float:
    """This process's own peak resident set size in MB (peftkit.train.job.peak_rss_bytes)."""
    from peftkit.train.job import peak_rss_bytes

    return peak_rss_bytes() / 2**20


def peak_memory_mb(device: str) -> float:
    """Peak memory of the run: CUDA allocations on the GPU, RSS on the CPU."""
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()


def run_child(args: argparse.Namespace) -> dict:
    """Build, warm up and time one variant; the result as a JSON-ready dict."""
    torch.set_num_threads(args.threads)
    model = apply_variant(build_model(args), args.variant)
    step, params = make_step(model, args.variant, make_batch(args))
    first_loss = float(step())  # equal across variants: every adapter starts as the identity
    for _ in range(WARMUP - 1):
        step()
    sync(args.device)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = time_steps(step, args.steps, args.device)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps
    return {
        "variant": args.variant, "times_s": times, "median_s": statistics.median(times), "min_s": min(times),
        "page_faults_per_step": faults,
        "peak_mb": peak_memory_mb(args.device), "peak_rss_mb": peak_rss_mb(),
        "trainable_params": sum(p.numel() for p in params), "first_loss": first_loss,
    }


# --- the parent: schedule, collect, report ---------------------------------------------------------
def schedule(variants: list[str], repeats: int) -> list[str]:
    """Run order: the list, then reversed, then the list again, ... (drift spreads over all variants)."""
    return [v for r in range(repeats) for v in (variants if r % 2 == 0 else variants[::-1])]


# glibc returns freed heap memory to the OS once more than M_TRIM_THRESHOLD sits free at its top, and serves
# blocks above M_MMAP_THRESHOLD with fresh mmaps: in a training step, which frees and re-allocates hundreds of
# MB of activations, that means page faults on memory just given back. How often depends on each variant's
# allocation order, not on its arithmetic (measured with --variants limit-onednn,peftkit-lora --repeats 1
# --steps 4: with glibc's defaults 86k and 213k faults per step; with these settings 98k and 99k, the rest being
# the >32 MB logits buffers). Each child reports page_faults_per_step.
# Every variant's child gets the same settings; --default-malloc runs with glibc's defaults instead.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def run_variant(args: argparse.Namespace, variant: str, make_argv=child_argv) -> dict:
    """Run one variant in a subprocess (command: ``make_argv``); its JSON result, or the error it ended with."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if not getattr(args, "default_malloc", False):
        env.update(STEADY_MALLOC)
    proc = subprocess.run(make_argv(args, variant), capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"variant": variant, "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def summarise(variant: str, runs: list[dict]) -> dict:
    """Pool one variant's rounds: median / min over all timed steps, the largest peak."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"variant": variant, "error": runs[0]["error"]}
    times = [t for r in ok for t in r["times_s"]]
    return {
        "variant": variant, "trainable_params": ok[0]["trainable_params"], "median_s": statistics.median(times),
        "min_s": min(times), "round_medians_s": [r["median_s"] for r in ok], "peak_mb": max(r["peak_mb"] for r in ok),
        "first_loss": ok[0]["first_loss"], "failed_rounds": len(runs) - len(ok),
    }


def markdown_table(rows: list[dict], device: str) -> str:
    """variant | trainable params | median step s | ratio to limit (and to limit-onednn) | peak memory."""
    memory = "peak CUDA alloc MB" if device == "cuda" else "peak RSS MB"
    floors = {r["variant"]: r["median_s"] for r in rows if r["variant"].startswith("limit") and "error" not in r}
    names = [name for name in ("limit", "limit-onednn") if name in floors]
    header = " | ".join(f"ratio to {name}" for name in names)
    lines = [f"| variant | trainable params | median step s | {header} | {memory} |",
             "|---|---:|---:|" + "---:|" * len(names) + "---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} |" + " |" * (len(names) + 2))
            continue
        ratios = [f"{r['median_s'] / floors[name]:.3f}" for name in names]
        cells = (r["variant"], f"{r['trainable_params']:,}", f"{r['median_s']:.3f}", *ratios, f"{r['peak_mb']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment() -> dict:
    """Versions and machine facts to keep next to the numbers."""
    import peft
    import transformers

    import peftkit

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "peftkit": peftkit.__version__, "machine": platform.platform(),
            "cpu_count": os.cpu_count(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def run_parent(args: argparse.Namespace) -> dict:
    """Run every variant (``repeats`` rounds), print the table, write the JSON."""
    order = schedule(args.variants, args.repeats)
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for i, variant in enumerate(order, 1):
        result = run_variant(args, variant)
        runs[variant].append(result)
        note = result.get("error") or (f"median {result['median_s']:.3f} s, peak {result['peak_mb']:.0f} MB, "
                                       f"{result['page_faults_per_step']:,.0f} page faults per step")
        print(f"[{i}/{len(order)}] {variant}: {note}", file=sys.stderr, flush=True)
    rows = [summarise(v, runs[v]) for v in args.variants]
    keys = ("steps", "repeats", "batch", "seq", "device", "dtype", "threads", "seed", "shape")
    settings = dict({k: getattr(args, k) for k in keys}, warmup=WARMUP, lora=LORA, lora_variants=LORA_EXTRA,
                    targets=TARGETS, lr=LR, order=order,
                    malloc_env="glibc defaults" if args.default_malloc else STEADY_MALLOC)
    return write_report(args, settings, rows, runs, markdown_table(rows, args.device))


def write_report(args: argparse.Namespace, settings: dict, rows: list[dict], runs: dict, table: str) -> dict:
    """Write the JSON report to --out and print the markdown table."""
    report = {"settings": settings, "environment": environment(), "results": rows, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table)
    print(f"\nwrote {args.out}", file=sys.stderr)
    return report


def main() -> None:
    """Parent by default; a single variant's child when --variant is given."""
    args = parse_args()
    if args.variant:
        print(json.dumps(run_child(args)))
    else:
        run_parent(args)


if __name__ == "__main__":
    main()

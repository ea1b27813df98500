"""Per-method benchmark: every peftkit method, and Hugging Face PEFT's where it has the method, side by side.

On one randomly initialised Llama model and one fixed batch (same seed everywhere), one row per method and
library with: trainable parameters, the median training-step time and its ratio to the limit, peak
memory, and the bytes that save_pretrained writes.

    limit          every weight frozen; forward + backward to the input embeddings only (bench/train_step.py)
    lora           LoRA r=8, alpha=16, dropout 0 on q, k, v, o, gate, up, down
    dora           the same with use_dora=True
    ia3            IA3 with each library's defaults for Llama (k, v, down; down scaled at its input)
    houlsby        bottleneck adapters after attention and feed-forward blocks (peftkit only; defaults)
    pfeiffer       bottleneck adapter after the feed-forward block (peftkit only; defaults)
    parallel       bottleneck adapter beside the feed-forward block (peftkit only; defaults)
    prompt         prompt tuning, --virtual-tokens soft tokens (20)
    ptuning        P-tuning (PromptEncoderConfig), --virtual-tokens tokens
    prefix         prefix tuning, --virtual-tokens tokens per layer

prompt, ptuning and prefix are run for peftkit only when peftkit exposes the config class (checked with
hasattr at run time); otherwise their row says "not available". The prompt methods lengthen every
sequence by the virtual tokens, so their forward pass is longer than the limit's.

The step, the timing, the model and the batch come from bench/train_step.py (imported, not copied): a
step is zero_grad + forward + causal-LM loss + backward + fused AdamW(lr 1e-4).step(); each variant warms up
for 2 steps, then times --steps steps, in its own subprocess, so peak memory (peak RSS on CPU,
torch.cuda.max_memory_allocated on CUDA) is per variant. A variant that crashes shows as failed. After
timing, the child saves the adapter with save_pretrained into a temporary folder and sums the files'
sizes (weights + adapter_config.json + whatever else the library writes there, e.g. peft's README.md).

Run (from the repository root):

    python bench/methods.py                            # hidden 256, 4 layers, 4 x 128 tokens, CPU, 2 threads
    python bench/methods.py --layers 2 --steps 2 --repeats 1   # a quick check that everything runs
    python bench/methods.py --methods lora,ia3 --libraries peftkit,peft
    python bench/methods.py --hidden 2048 --intermediate 5632 --layers 22 --heads 32 --kv-heads 4 \\
        --vocab 32000 --batch 8 --seq 1024 --device cuda --dtype bfloat16

It prints a markdown table and writes bench/results/methods.json.
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # so that `train_step` imports however this is run
from train_step import (  # noqa: E402
    LR, TARGETS, WARMUP, build_model, write_report, make_batch, make_step, peak_memory_mb, run_variant, schedule,
    summarise, sync, time_steps,
)

LIBRARIES = ("peftkit", "peft")
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": list(TARGETS)}
# method -> (config class name, its arguments, the libraries that have the method); "num_virtual_tokens"
# is filled in from --virtual-tokens.
METHODS = {
    "lora": ("LoraConfig", LORA, LIBRARIES),
    "dora": ("LoraConfig", {**LORA, "use_dora": True}, LIBRARIES),
    "ia3": ("IA3Config", {}, LIBRARIES),
    "houlsby": ("AdapterConfig", {"adapter_type": "houlsby"}, ("peftkit",)),
    "pfeiffer": ("AdapterConfig", {"adapter_type": "pfeiffer"}, ("peftkit",)),
    "parallel": ("AdapterConfig", {"adapter_type": "parallel"}, ("peftkit",)),
    "prompt": ("PromptTuningConfig", {"num_virtual_tokens": None}, LIBRARIES),
    "ptuning": ("PromptEncoderConfig", {"num_virtual_tokens": None}, LIBRARIES),
    "prefix": ("PrefixTuningConfig", {"num_virtual_tokens": None}, LIBRARIES),
}
SHAPE_FLAGS = {  # flag -> LlamaConfig field
    "hidden": "hidden_size", "intermediate": "intermediate_size", "layers": "num_hidden_layers",
    "heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "vocab": "vocab_size",
}
RESULTS = Path(__file__).resolve().parent / "results" / "methods.json"


# --- arguments ----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags, with ``shape`` and ``variants`` derived from them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {', '.join(METHODS)}")
    p.add_argument("--libraries", default=",".join(LIBRARIES), help="comma list from peftkit, peft")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    p.add_argument("--repeats", type=int, default=2, help="rounds over the variants, order alternating")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4, help="sequences per batch")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--virtual-tokens", type=int, default=20, help="num_virtual_tokens of prompt/ptuning/prefix")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each child")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS, help="where the JSON results go")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # set when the script re-invokes itself
    return resolve(p.parse_args(argv))


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Check the names and the device; build the model shape and the variant list."""
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.libraries = [lib.strip() for lib in args.libraries.split(",") if lib.strip()]
    unknown = [m for m in args.methods if m not in METHODS] + [lib for lib in args.libraries if lib not in LIBRARIES]
    if unknown:
        raise SystemExit(f"unknown method(s) or library(ies) {unknown}; methods: {', '.join(METHODS)}; "
                         f"libraries: {', '.join(LIBRARIES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda needs a GPU and a CUDA build of torch (this is {torch.__version__})")
    args.shape = {field: getattr(args, flag) for flag, field in SHAPE_FLAGS.items()}
    args.shape["tie_word_embeddings"] = False
    args.variants = ["limit"] + [f"{lib}-{m}" for m in args.methods for lib in args.libraries if lib in METHODS[m][2]]
    return args


def child_argv(args: argparse.Namespace, variant: str) -> list[str]:
    """The command that runs one variant in a fresh process, with every setting spelled out."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--variant", variant]
    for flag in ("steps", "batch", "seq", "virtual_tokens", "device", "dtype", "threads", "seed", *SHAPE_FLAGS):
        argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return argv


def method_kwargs(method: str, virtual_tokens: int) -> dict:
    """The config arguments of ``method`` (without task_type), num_virtual_tokens filled in."""
    kwargs = dict(METHODS[method][1])
    return {**kwargs, "num_virtual_tokens": virtual_tokens} if "num_virtual_tokens" in kwargs else kwargs


def config_class(library: str, method: str):
    """The library's config class for ``method``, or None where the library (installed here) lacks it."""
    return getattr(importlib.import_module(library), METHODS[method][0], None)


# --- the child: one variant -----------------------------------------------------------------------
def apply_method(model: torch.nn.Module, variant: str, virtual_tokens: int) -> torch.nn.Module:
    """Freeze ``model`` (limit) or wrap it with the variant's library and method."""
    if variant == "limit":
        return model.requires_grad_(False)
    library, method = variant.split("-", 1)
    config = config_class(library, method)(**method_kwargs(method, virtual_tokens), task_type="CAUSAL_LM")
    torch.manual_seed(1)  # same adapter-init stream for both libraries
    return importlib.import_module(library).get_peft_model(model, config)


def checkpoint_bytes(model: torch.nn.Module) -> dict:
    """save_pretrained into a temporary folder: total bytes and each file's size."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(Path(tmp).rglob("*")) if f.is_file()}
    return {"checkpoint_bytes": sum(files.values()), "checkpoint_files": files}


def run_child(args: argparse.Namespace) -> dict:
    """Build, warm up and time one variant, then save it; the result as a JSON-ready dict."""
    torch.set_num_threads(args.threads)
    model = apply_method(build_model(args), args.variant, args.virtual_tokens)
    step, params = make_step(model, args.variant, make_batch(args))
    first_loss = float(step())
    for _ in range(WARMUP - 1):
        step()
    sync(args.device)
    times = time_steps(step, args.steps, args.device)
    result = {
        "variant": args.variant, "times_s": times, "median_s": statistics.median(times), "min_s": min(times),
        "peak_mb": peak_memory_mb(args.device),  # taken before saving: the training step's peak
        "trainable_params": sum(p.numel() for p in params), "first_loss": first_loss,
    }
    if args.variant != "limit":
        result.update(checkpoint_bytes(model))
    return result


# --- the parent: schedule, collect, report ---------------------------------------------------------
def unavailable(variant: str) -> str | None:
    """Why ``variant`` cannot run here (its library lacks the config class), or None."""
    if variant == "limit":
        return None
    library, method = variant.split("-", 1)
    return None if config_class(library, method) else f"not available ({library} has no {METHODS[method][0]})"


def summarise_variant(variant: str, runs: list[dict]) -> dict:
    """train_step's pooled summary plus the checkpoint size."""
    row = summarise(variant, runs)
    ok = [r for r in runs if "error" not in r]
    if ok and "checkpoint_bytes" in ok[0]:
        row.update(checkpoint_bytes=ok[0]["checkpoint_bytes"], checkpoint_files=ok[0]["checkpoint_files"])
    return row


def fmt_row(row: dict, limit: float | None, peft_median: float | None) -> list[str]:
    """The table cells after method | library, for one summarised row."""
    if "error" in row or "unavailable" in row:
        note = (row.get("unavailable") or f"failed: {row['error']}").replace("|", "\\|")  # keep the table's columns
        return [note, "", "", "", "", ""]
    ratio = f"{row['median_s'] / limit:.2f}" if limit else "n/a"
    vs_peft = f"{row['median_s'] / peft_median:.2f}" if peft_median else ""
    size = f"{row['checkpoint_bytes']:,}" if "checkpoint_bytes" in row else ""
    return [f"{row['trainable_params']:,}", f"{row['median_s']:.4f}", ratio, vs_peft, f"{row['peak_mb']:.0f}", size]


def markdown_table(rows: list[dict], device: str) -> str:
    """One line per variant: method | library | params | median | ratio to limit | vs peft | memory | bytes."""
    memory = "peak CUDA alloc MB" if device == "cuda" else "peak RSS MB"
    ok = {r["variant"]: r for r in rows if "median_s" in r}
    limit = ok["limit"]["median_s"] if "limit" in ok else None
    lines = [f"| method | library | trainable params | median step s | ratio to limit | time vs peft | {memory} "
             "| checkpoint bytes |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        library, method = r["variant"].split("-", 1) if "-" in r["variant"] else ("", r["variant"])
        peft_row = ok.get(f"peft-{method}") if library == "peftkit" else None
        cells = [method, library, *fmt_row(r, limit, peft_row["median_s"] if peft_row else None)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_parent(args: argparse.Namespace) -> dict:
    """Run every available variant (``repeats`` rounds), print the table, write the JSON."""
    skipped = {v: why for v in args.variants if (why := unavailable(v))}
    runnable = [v for v in args.variants if v not in skipped]
    order = schedule(runnable, args.repeats)
    runs: dict[str, list[dict]] = {v: [] for v in runnable}
    for i, variant in enumerate(order, 1):
        result = run_variant(args, variant, make_argv=child_argv)
        runs[variant].append(result)
        note = result.get("error") or f"median {result['median_s']:.4f} s, peak {result['peak_mb']:.0f} MB"
        print(f"[{i}/{len(order)}] {variant}: {note}", file=sys.stderr, flush=True)
    rows = [{"variant": v, "unavailable": skipped[v]} if v in skipped else summarise_variant(v, runs[v])
            for v in args.variants]
    keys = ("steps", "repeats", "batch", "seq", "virtual_tokens", "device", "dtype", "threads", "seed", "shape")
    methods = {m: {"config": METHODS[m][0], "kwargs": method_kwargs(m, args.virtual_tokens),
                   "libraries": METHODS[m][2]} for m in args.methods}
    settings = dict({k: getattr(args, k) for k in keys}, warmup=WARMUP, lr=LR, methods=methods, order=order)
    return write_report(args, settings, rows, runs, markdown_table(rows, args.device))


def main() -> None:
    """Parent by default; a single variant's child when --variant is given."""
    args = parse_args()
    if args.variant:
        print(json.dumps(run_child(args)))
    else:
        run_parent(args)


if __name__ == "__main__":
    main()

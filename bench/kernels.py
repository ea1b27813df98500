"""Kernel-level timings behind peftkit's CPU choices, each pair measured side by side in one process.

    gemm       torch's float32 matmul (MKL sgemm on x86) against lora_kernels.linear (oneDNN) for the
               SmolLM2-135M projection shapes at 4 x 128 tokens, forward (x W^T) and input gradient (g W)
    mask       dropout's draw at p = 0.05: a keep-mask from 16 random bits per element (_lane_mask) against
               drawing the dropped positions (drop_positions, Poisson splitting)
    dropout    inverted dropout at p = 0.05, forward and backward: multiplying by a uint8 keep-mask and the scale
               against scaling and zeroing the saved dropped positions (what peftkit's _Dropout does on CPU)
    rank16     LoRA's six rank-16 products per projection shape as its fused kernel runs them (r = 16): x A^T,
               y += s h B^T, g B, g_x += g_h A, and A's and B's gradients (one time each, no pair)
    grouped    LoRA's rank-16 products for the projections that read one input (q/k/v: 3, gate/up: 2) as the
               fused kernel runs them, one call per projection, against one grouped call: x [A_1; A_2; ...]^T,
               [g_h1 g_h2 ...]^T x, and g_x += [g_h1 g_h2 ...] [A_1; A_2; ...] (a K = 16 k accumulation)
    selective  one training step (forward, backward, AdamW) of a MiniLM-shaped BERT classifier (random weights)
               with an element selection of 1.5% of its linear weights, then with rows (3% per module, biases
               trained): the fused path (base + delta in one GEMM) against the plain path (a forward hook on each
               base layer sends it there)

Pairs alternate, medians of --repeats timings are printed. The process keeps freed memory for reuse as the
peftkit training commands do (peftkit.cli.keep_freed_memory), so that one side's frees returned to the OS do
not make the other side page-fault; --default-malloc leaves glibc's defaults. Run on a quiet machine:

    python bench/kernels.py                 # all six, 2 threads
    python bench/kernels.py --only gemm --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = {"q/o": (576, 576), "k/v": (576, 192), "gate/up": (576, 1536), "down": (1536, 576)}  # (in, out)
ROWS = 4 * 128


def timed(fn, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def pair(name: str, first, second, repeats: int, labels: tuple[str, str]) -> None:
    """Time two functions alternately; print both medians and their ratio."""
    a, b = [], []
    for _ in range(repeats):
        a += timed(first, 1)
        b += timed(second, 1)
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"| {name} | {labels[0]} {ma:.3f} ms | {labels[1]} {mb:.3f} ms | {ma / mb:.2f}x |")


def bench_gemm(repeats: int) -> None:
    from peftkit.methods.lora_kernels import linear

    gen = torch.Generator().manual_seed(0)
    for name, (inp, out) in SHAPES.items():
        x, w, g = (torch.randn(ROWS, inp, generator=gen), torch.randn(out, inp, generator=gen),
                   torch.randn(ROWS, out, generator=gen))
        pair(f"{name} forward x W^T", lambda: x @ w.t(), lambda: linear(x, w), repeats, ("torch", "oneDNN"))
        pair(f"{name} input grad g W", lambda: g @ w, lambda: linear(g, w.t()), repeats, ("torch", "oneDNN"))


def bench_mask(repeats: int) -> None:
    from peftkit.layers import _lane_mask, drop_positions

    for inp in (576, 1536):
        x = torch.empty(ROWS, inp)
        pair(f"mask {ROWS}x{inp}, p=0.05", lambda: _lane_mask(x, 0.05), lambda: drop_positions(x, 0.05), repeats,
             ("16-bit lanes", "drawn positions"))


def bench_dropout(repeats: int) -> None:
    from peftkit.layers import _scaled_without, drop_positions

    p, scale = 0.05, 1 / 0.95
    for inp in (576, 1536):
        x, g = torch.randn(ROWS, inp), torch.randn(ROWS, inp)

        def by_mask():  # the same draw made into a uint8 keep-mask
            mask = torch.ones(x.numel(), dtype=torch.uint8).index_fill_(0, drop_positions(x, p), 0).view(x.shape)
            return x.mul(mask).mul_(scale), g.mul(mask).mul_(scale)

        def by_positions():
            positions = drop_positions(x, p)
            return _scaled_without(x, scale, positions), _scaled_without(g, scale, positions)

        pair(f"dropout fwd+bwd {ROWS}x{inp}, p=0.05", by_mask, by_positions, repeats, ("uint8 mask", "positions"))


def bench_rank16(repeats: int) -> None:
    from peftkit.methods.lora_kernels import linear

    gen = torch.Generator().manual_seed(0)
    for name, (inp, out) in SHAPES.items():
        x, g, y, gx = (torch.randn(ROWS, inp, generator=gen), torch.randn(ROWS, out, generator=gen),
                       torch.randn(ROWS, out, generator=gen), torch.randn(ROWS, inp, generator=gen))
        a, b, h, gh = (torch.randn(16, inp, generator=gen), torch.randn(out, 16, generator=gen),
                       torch.randn(ROWS, 16, generator=gen), torch.randn(ROWS, 16, generator=gen))
        products = {"x A^T": lambda: linear(x, a), "y += s h B^T": lambda: y.addmm_(h, b.t(), alpha=2.0),
                    "g B": lambda: linear(g, b.t()), "g_x += g_h A": lambda: gx.addmm_(gh, a),
                    "A's gradient": lambda: linear(gh.t(), x.t()), "B's gradient": lambda: linear(h.t(), g.t())}
        times = {k: statistics.median(timed(f, repeats)) for k, f in products.items()}
        print(f"| {name} rank-16 products: " + ", ".join(f"{k} {v:.3f}" for k, v in times.items())
              + f" | sum {sum(times.values()):.3f} ms | | |")


def bench_grouped(repeats: int) -> None:
    from peftkit.methods.lora_kernels import linear

    gen = torch.Generator().manual_seed(0)
    inp, r = SHAPES["q/o"][0], 16
    x, gx = torch.randn(ROWS, inp, generator=gen), torch.randn(ROWS, inp, generator=gen)
    for name, k in (("q/k/v", 3), ("gate/up", 2)):
        a = [torch.randn(r, inp, generator=gen) for _ in range(k)]
        gh = [torch.randn(ROWS, r, generator=gen) for _ in range(k)]
        a_all, gh_all = torch.cat(a), torch.cat(gh, 1)

        def accumulate_each():
            for g, f in zip(gh, a):
                gx.addmm_(g, f)

        pair(f"{name} x A^T", lambda: [linear(x, f) for f in a], lambda: linear(x, a_all), repeats,
             ("each", "grouped"))
        pair(f"{name} A's gradients g_h^T x", lambda: [linear(g.t(), x.t()) for g in gh],
             lambda: linear(gh_all.t(), x.t()), repeats, ("each", "grouped"))
        pair(f"{name} g_x += g_h A", accumulate_each, lambda: gx.addmm_(gh_all, a_all), repeats, ("each", "grouped"))


def bench_selective(repeats: int) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    from peftkit import SelectiveConfig, get_peft_model
    from peftkit.methods.selective import SelectiveLayer

    config = BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12,
                        num_labels=2)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(1, config.vocab_size, (32, 48)), "labels": torch.randint(0, 2, (32,))}
    # element: 1.5% over all linear weights; row + bias: bench/selective.py's best variant (LoRA r=8's count)
    for name, settings in (("element", {"budget": 0.015}),
                           ("row + bias", {"budget": 0.03, "granularity": "row", "ranking": "per_module", "bias": "all"})):
        torch.manual_seed(0)
        model = get_peft_model(BertForSequenceClassification(config), SelectiveConfig(task_type="SEQ_CLS", **settings),
                               calibration_batches=[batch]).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        layers = [m for m in model.modules() if isinstance(m, SelectiveLayer)]
        hooks = []

        def step(plain: bool):
            def run():
                if plain and not hooks:  # a hook on the base layer sends the layer down its plain path
                    hooks.extend(m.base_layer.register_forward_hook(lambda *a: None) for m in layers)
                if not plain:
                    while hooks:
                        hooks.pop().remove()
                model(**batch).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return run

        pair(f"selective {name} training step", step(plain=True), step(plain=False), repeats, ("plain", "fused"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=("gemm", "mask", "dropout", "rank16", "grouped", "selective"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc thresholds at their defaults")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not args.default_malloc:
        from peftkit.cli import keep_freed_memory

        keep_freed_memory()
    print("| what | first | second | first / second |\n|---|---|---|---|")
    for name, fn in (("gemm", bench_gemm), ("mask", bench_mask), ("dropout", bench_dropout),
                     ("rank16", bench_rank16), ("grouped", bench_grouped), ("selective", bench_selective)):
        if args.only in (None, name):
            fn(args.repeats if name != "selective" else max(3, args.repeats // 5))


if __name__ == "__main__":
    main()

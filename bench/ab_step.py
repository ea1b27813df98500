"""A/B of one implementation choice inside a training step: both sides alternate step by step in one process.

Separate-process runs (bench/train_step.py) drift by ~5% between rounds on a shared 2-core machine, which is
as large as most kernel choices. Here one model trains, and the choice is flipped before every step (the
order alternating: A B, B A, ...), so both sides see the same machine state, heap and caches; medians and
minima of --steps steps per side are printed. Memory is not compared (one process holds both).

Choices (--toggle):

    onednn    the LoRA / DoRA kernels' float32 CPU GEMMs on oneDNN (A) or on torch's matmul (B)
    fused     LoRA's fused training kernel (A) or the plain autograd path of the same layer (B)
    dropout   LoRA dropout at p <= 0.2 on the CPU: saved dropped positions (A) or a bool keep-mask (B)
    outdtype  (GPU) bf16 GEMMs that return float32 adapter gradients through mm(out_dtype) (A) or as a bf16 GEMM
              and a cast (B)
    adapter   the adapter's whole cost: the --variant training step (A) against the limit-onednn step of
              train_step.py on the same model (B): every LoRA layer runs its frozen base through the same
              oneDNN GEMM, forward + backward to the input embeddings, no weight gradients, no optimizer.
              B / A is the inverse of the ratio train_step.py reports as peftkit / limit-onednn, without
              the drift between separate processes.

Run (from the repository root), on the train_step model (SmolLM2-135M shape, batch 4 x 128, r=16 on all seven
projections):

    python bench/ab_step.py --toggle onednn
    python bench/ab_step.py --toggle dropout --variant peftkit-lora-drop --steps 16
    python bench/ab_step.py --toggle adapter --steps 16
    python bench/ab_step.py --toggle adapter --batch 1 --seq 1     # what is left at one token: the fixed cost
    python bench/ab_step.py --toggle fused --layers 2 --steps 2     # a quick check that it runs
    python bench/ab_step.py --gpu-preset --toggle fused --variant peftkit-dora --steps 8   # on a GPU
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402  (the same model, batch and step as the step benchmark)

TOGGLES = ("onednn", "fused", "dropout", "adapter", "outdtype")


def _switch(toggle: str):
    """(owner, attribute, side B's value) of one choice; side A is whatever the attribute holds."""
    from peftkit import layers
    from peftkit.methods import lora, lora_kernels

    return {"onednn": (lora_kernels, "_ONEDNN", None),  # linear() falls back to torch's matmul
            "fused": (lora.LoraLinear, "_fusable", lambda self, x: None),  # every call takes the plain path
            "dropout": (layers, "_SCATTER_MAX_P", 0.0),  # no p is small enough for drawn positions
            "adapter": (lora.LoraLinear, "forward", _frozen_forward),  # the frozen base only
            "outdtype": (lora_kernels, "_has_out_dtype_mm", lambda *args: False)}[toggle]  # GEMM, then a cast


def _frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A LoRA layer as limit-onednn runs its projection: the frozen base through oneDNN, nothing else."""
    return train_step.FrozenLinear.apply(x, self.base_layer.weight, self.base_layer.bias)


@contextlib.contextmanager
def side(toggle: str, first: bool):
    """Within the block, the implementation choice is side A (``first``) or side B."""
    owner, attribute, b_value = _switch(toggle)
    saved = getattr(owner, attribute)
    if not first:
        setattr(owner, attribute, b_value)
    try:
        yield
    finally:
        setattr(owner, attribute, saved)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--toggle", choices=TOGGLES, required=True)
    p.add_argument("--variant", default="peftkit-lora", choices=[v for v in train_step.VARIANTS if "peftkit" in v])
    p.add_argument("--steps", type=int, default=16, help="timed steps per side")
    p.add_argument("--layers", type=int, help="override the number of decoder layers (quick checks)")
    p.add_argument("--batch", type=int, help="sequences per batch (default: train_step's, 4)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: train_step's, 128; 1 leaves the fixed cost)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gpu-preset", action="store_true", help="train_step's GPU run: TinyLlama-1.1B shape, bf16, 8 x 1024")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc thresholds at their defaults")
    args = p.parse_args()
    if not args.default_malloc:
        from peftkit.cli import keep_freed_memory

        keep_freed_memory()  # as train_step's children and the training commands run
    torch.set_num_threads(args.threads)
    overrides = [f"--{k}={v}" for k, v in (("layers", args.layers), ("batch", args.batch), ("seq", args.seq)) if v]
    settings = train_step.parse_args(["--variants", args.variant] + overrides + ["--gpu-preset"] * args.gpu_preset)
    sync = torch.cuda.synchronize if settings.device == "cuda" else (lambda: None)
    model = train_step.apply_variant(train_step.build_model(settings), args.variant)
    ids = train_step.make_batch(settings)
    step = train_step.make_step(model, args.variant, ids)[0]
    # side B of "adapter": the limit's step (no optimizer) on the same model, whose LoRA layers side() bypasses
    steps = {True: step, False: train_step.make_step(model, "limit-onednn", ids)[0] if args.toggle == "adapter" else step}
    for first in (True, False):  # warm both sides up
        with side(args.toggle, first):
            steps[first]()
            steps[first]()
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(args.steps):
        for first in ((True, False) if i % 2 == 0 else (False, True)):
            with side(args.toggle, first):
                sync()
                start = time.perf_counter()
                steps[first]()
                sync()
                times[first].append(time.perf_counter() - start)
    a, b = statistics.median(times[True]), statistics.median(times[False])
    print(f"{args.variant}, --toggle {args.toggle}, {args.steps} steps per side, alternating in one process")
    print(f"A: median {a:.3f} s, min {min(times[True]):.3f} s")
    print(f"B: median {b:.3f} s, min {min(times[False]):.3f} s")
    print(f"B / A = {b / a:.3f}")
    if args.toggle == "adapter":
        print(f"A / B = {a / b:.3f} (the training step against the limit-onednn step)")


if __name__ == "__main__":
    main()

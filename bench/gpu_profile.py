"""Where a peftkit LoRA training step spends GPU time (TinyLlama-1.1B shape, bf16, 8 x 1024): a torch.profiler
table of the top CUDA kernels and the CPU-side total, to tell launch-bound from kernel-bound steps.

Run (repository root, GPU machine):  python bench/gpu_profile.py [--variant peftkit-lora]
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--variant", default="peftkit-lora")
cli = p.parse_args()
args = train_step.parse_args(["--gpu-preset", "--variant", cli.variant])
model = train_step.apply_variant(train_step.build_model(args), cli.variant)
step, _ = train_step.make_step(model, cli.variant, train_step.make_batch(args))
for _ in range(3):
    step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(2):
        step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))

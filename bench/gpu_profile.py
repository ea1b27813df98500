"""Where a training step spends its time on a GPU (TinyLlama-1.1B shape, bf16, 8 x 1024): for each variant, the
step's wall time (median of 5, no profiler), then under torch.profiler the CPU-side and CUDA-side totals per step
and a table of the top CUDA kernels. A step whose CPU total exceeds its CUDA total is launch-bound: the GPU waits
on Python and kernel launches.

Run (repository root, GPU machine):  python bench/gpu_profile.py [--variants limit,peftkit-lora] [--rows 12]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--variants", default="limit,peftkit-lora")
p.add_argument("--rows", type=int, default=12)
p.add_argument("--sort", choices=["device", "cpu"], default="device", help="order the table by self CUDA or self CPU time")
cli = p.parse_args()
for variant in cli.variants.split(","):
    args = train_step.parse_args(["--gpu-preset", "--variant", variant])
    model = train_step.apply_variant(train_step.build_model(args), variant)
    step, _ = train_step.make_step(model, variant, train_step.make_batch(args))
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    walls = []
    for _ in range(5):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    cpu = sum(e.self_cpu_time_total for e in events) / 2 / 1e3
    cuda = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events) / 2 / 1e3
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")) / 2
    print(f"== {variant}: wall {statistics.median(walls) * 1e3:.1f} ms/step; under the profiler CPU {cpu:.1f} ms, "
          f"CUDA {cuda:.1f} ms, {launches:.0f} kernel launches per step", flush=True)
    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    key = "self_cpu_time_total" if cli.sort == "cpu" else key
    print(events.table(sort_by=key, row_limit=cli.rows, max_name_column_width=60), flush=True)
    del model, step
    torch.cuda.empty_cache()

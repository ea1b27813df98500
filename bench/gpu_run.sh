#!/usr/bin/env bash
# Everything this project checks on a lent GPU, in one go (device time is scarce): CUDA correctness,
# the mixed-adapter forward benchmark and the training-step benchmark, in that order of importance.
# Usage (repository root, on the GPU machine): OUT=/some/dir bash bench/gpu_run.sh
# LIBRARIES=peftkit and VARIANTS=limit,peftkit-lora,... narrow the benchmarks (a re-run after a change).
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
timeout 150 python bench/cuda_check.py > "$OUT/cuda_check.txt" 2>&1; echo "cuda_check rc=$?"
grep -E "FAIL|ERROR|checks passed" "$OUT/cuda_check.txt" | head -20
cp bench/results/cuda_check.json "$OUT/" 2>/dev/null
timeout 200 python bench/mixed_batch.py --gpu-preset --repeats 10 --threads 8 --libraries "${LIBRARIES:-peftkit,peft}" --out "$OUT/mixed_batch.json" > "$OUT/mixed_batch.txt" 2>&1
echo "mixed_batch rc=$?"; tail -12 "$OUT/mixed_batch.txt"
timeout ${TRAIN_STEP_TIMEOUT:-240} python bench/train_step.py --gpu-preset --repeats 1 --steps 15 --threads 8 \
    --variants "${VARIANTS:-limit,peftkit-lora,peft-lora,peftkit-lora-drop,peft-lora-drop,peftkit-dora,peft-dora,full}" \
    --out "$OUT/train_step.json" > "$OUT/train_step.txt" 2>&1
echo "train_step rc=$?"; tail -14 "$OUT/train_step.txt"
if [ -n "${PROFILE:-}" ]; then
  timeout 90 python bench/gpu_profile.py --variant peftkit-lora > "$OUT/profile_lora.txt" 2>&1; echo "profile rc=$?"
  tail -25 "$OUT/profile_lora.txt"
fi

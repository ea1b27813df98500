#!/usr/bin/env bash
# Everything this project checks on a lent GPU, in one go (device time is scarce), in order of importance:
# CUDA correctness, the training-step benchmark (every variant side by side in one run), a profile of the
# limit's and the LoRA steps, and (MIXED=1) the mixed-adapter forward benchmark.
# Usage (repository root, on the GPU machine): OUT=/some/dir bash bench/gpu_run.sh
# LIBRARIES=peftkit and VARIANTS=limit,peftkit-lora,... narrow the benchmarks (a re-run after a change);
# PROFILE=0 skips the profile.
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
timeout ${CHECK_TIMEOUT:-150} python bench/cuda_check.py > "$OUT/cuda_check.txt" 2>&1; echo "cuda_check rc=$?"
grep -E "FAIL|ERROR|checks passed|^info" "$OUT/cuda_check.txt" | head -20
cp bench/results/cuda_check.json "$OUT/" 2>/dev/null
timeout ${TRAIN_STEP_TIMEOUT:-300} python bench/train_step.py --gpu-preset --repeats 1 --steps 15 --threads 8 \
    --variants "${VARIANTS:-limit,peftkit-lora,peft-lora,peftkit-lora-drop,peft-lora-drop,peftkit-dora,peft-dora,full}" \
    --out "$OUT/train_step.json" > "$OUT/train_step.txt" 2>&1
echo "train_step rc=$?"; tail -14 "$OUT/train_step.txt"
if [ "${PROFILE:-1}" != 0 ]; then
  timeout ${PROFILE_TIMEOUT:-120} python bench/gpu_profile.py --variants "${PROFILE_VARIANTS:-limit,peftkit-lora,peft-lora}" \
      > "$OUT/profile.txt" 2>&1; echo "profile rc=$?"
  grep "^==" "$OUT/profile.txt"
fi
if [ "${MIXED:-0}" != 0 ]; then
  timeout 200 python bench/mixed_batch.py --gpu-preset --repeats 10 --threads 8 --libraries "${LIBRARIES:-peftkit,peft}" \
      --out "$OUT/mixed_batch.json" > "$OUT/mixed_batch.txt" 2>&1
  echo "mixed_batch rc=$?"; tail -12 "$OUT/mixed_batch.txt"
fi

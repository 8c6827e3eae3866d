#!/usr/bin/env bash
# CUDA benchmark on any GPU with ~40 GB free: LLaVA-1.5-7B shapes, bfloat16, CUDA events and synchronisation.
set -euo pipefail
crop bench --shape llava-1.5-7b --budgets 192 128 64 --repeats 10 --warmup 2 --new-tokens 32 \
  --device cuda --dtype bfloat16 --out results/bench_cuda_llava7b.json "$@"

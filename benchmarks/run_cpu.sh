#!/usr/bin/env bash
# Full CPU benchmark: LLaVA-1.5-7B shapes (LLM reduced to 8 layers), every default method at three budgets,
# 3 repeats after 1 warm-up (70 minutes on 2 cores), 32 new tokens.
set -euo pipefail
crop bench --shape llava-1.5-7b --budgets 192 128 64 --repeats 3 --warmup 1 --new-tokens 32 \
  --device cpu --dtype float32 --out results/bench_cpu_llava7b.json "$@"

#!/usr/bin/env bash
# Full-depth CPU benchmark: LLaVA-1.5-7B shapes with all 32 LLM layers in bfloat16 (about 14 GB of weights),
# the standard comparison rows at 192 and 64 tokens, 3 repeats after 1 warm-up, 4 new tokens (decode is
# memory-bound here: each token reads every weight).
set -euo pipefail
crop bench --shape llava-1.5-7b --llm-layers 32 --dtype bfloat16 --budgets 192 64 --repeats 3 --warmup 1 \
  --new-tokens 4 --methods crop-ilp crop-fused crop-attn-2pass fastv visionzip pool divprune \
  --out results/bench_cpu_llava7b_full_bf16.json "$@"

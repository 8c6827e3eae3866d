#!/usr/bin/env bash
# CUDA benchmark on any GPU with ~40 GB free: LLaVA-1.5-7B shapes with all 32 LLM layers, bfloat16, CUDA events
# and synchronisation, 10 repeats after 2 warm-ups, the paper's grid localizer included.
set -euo pipefail
crop bench --shape llava-1.5-7b --llm-layers 32 --budgets 192 128 64 --repeats 10 --warmup 2 --new-tokens 32 \
  --device cuda --dtype bfloat16 --out results/bench_cuda_llava7b.json \
  --methods crop-ilp crop-attn-2pass crop-fused crop-grid-loc fastv pyramiddrop sparsevlm visionzip random pool "$@"

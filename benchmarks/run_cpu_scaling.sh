#!/usr/bin/env bash
# Scaling on CPU: cost against the image's visual tokens, each method at 1/9 of them, bfloat16.
# Qwen2.5-VL-7B shapes at 1024, 4096 and 16384 visual tokens (LLM cut to 4 of 28 layers, vision tower to 2 of 32
# window-attention layers: at 16k tokens one 7B-shaped layer's attention takes 15-35 s on 2 cores), 2 repeats after
# 1 warm-up; then LLaVA-NeXT-7B shapes at 1176, 1752 and 2928 (LLM 8 of 32 layers, the full CLIP-L tower), 2 repeats.
# Decode (4 new tokens; each decode prefills again) is measured for full, CROP-ILP, fused CROP, DivPrune and the
# ideal only. Each size's report is written to the JSON as soon as it is measured.
set -euo pipefail
DECODE=(--decode-methods full crop-ilp crop-fused divprune ideal)
crop bench --shape qwen2.5-vl-7b --scaling --llm-layers 4 --dtype bfloat16 --repeats 2 --warmup 1 --new-tokens 4 \
  "${DECODE[@]}" --out results/bench_cpu_scaling_qwen2.5vl7b.json "$@"
crop bench --shape llava-next-7b --scaling --llm-layers 8 --dtype bfloat16 --repeats 2 --warmup 1 --new-tokens 4 \
  "${DECODE[@]}" --out results/bench_cpu_scaling_llavanext7b.json "$@"

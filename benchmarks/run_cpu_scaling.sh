#!/usr/bin/env bash
# Scaling on CPU: cost against the image's visual tokens, each method at 1/9 of them, bfloat16.
# LLaVA-NeXT-7B shapes at 1176, 1752 and 2928 visual tokens (LLM 8 of 32 layers, the full CLIP-L tower), 2 repeats
# after 1 warm-up; then Qwen2.5-VL-7B shapes at 1024 and 4096 (2 repeats after 1 warm-up) and 16384 visual tokens
# (2 repeats, no warm-up: one call takes minutes there), the LLM cut to 4 of 28 layers and the vision tower to 2 of
# 32 window-attention layers (at 16k tokens one 7B-shaped layer's attention takes 15-35 s on 2 cores).
# Decode (4 new tokens; each decode prefills again) is measured for full, CROP-ILP, fused CROP, DivPrune and the
# ideal only. Each size is written to its JSON as soon as it is measured, and --resume skips the sizes already
# there, so the script can be stopped and started again.
set -euo pipefail
COMMON=(--scaling --dtype bfloat16 --repeats 2 --new-tokens 4 --resume
        --decode-methods full crop-ilp crop-fused divprune ideal)
crop bench --shape llava-next-7b --llm-layers 8 --warmup 1 "${COMMON[@]}" \
  --out results/bench_cpu_scaling_llavanext7b.json "$@"
QWEN=(--shape qwen2.5-vl-7b --llm-layers 4 --out results/bench_cpu_scaling_qwen2.5vl7b.json)
crop bench "${QWEN[@]}" --visual-tokens 1024 4096 --warmup 1 "${COMMON[@]:1}" "$@"
crop bench "${QWEN[@]}" --visual-tokens 1024 4096 16384 --warmup 0 "${COMMON[@]:1}" "$@"

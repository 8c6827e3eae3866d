"""Speed and memory of pruning methods: prefill, decode, peak memory, KV-cache bytes and analytic FLOPs.

Models have real layer shapes and random weights (speed does not depend on weight values), built from configs.
Every method runs against the same model in one process, in interleaved order, after warm-up; times are medians
over repeats with min/max, and ratios (to full tokens and to the *ideal*: the model fed only the kept visual
tokens from the start, with no selection work) are computed within the run.
"""

from crop.bench.cases import Case, cases, grid_localizer
from crop.bench.families import IMAGE_TOKEN, TEXT_TOKENS, bench_inputs, build_bench_model
from crop.bench.measure import PeakMemory, StepClock, measured_cache_bytes, timed
from crop.bench.report import plot, table
from crop.bench.runner import run
from crop.bench.shapes import (
    SCALING,
    SHAPES,
    Shape,
    bench_shape,
    check_device,
    kv_cache_bytes,
    prefill_flops,
    vision_flops,
)

__all__ = [
    "IMAGE_TOKEN",
    "SCALING",
    "SHAPES",
    "TEXT_TOKENS",
    "Case",
    "PeakMemory",
    "Shape",
    "StepClock",
    "bench_inputs",
    "bench_shape",
    "build_bench_model",
    "cases",
    "check_device",
    "grid_localizer",
    "kv_cache_bytes",
    "measured_cache_bytes",
    "plot",
    "prefill_flops",
    "run",
    "table",
    "timed",
    "vision_flops",
]

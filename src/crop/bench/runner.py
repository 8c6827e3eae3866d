"""Running the benchmark: build the model, measure every case in interleaved rounds after warm-up, and write the
report."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessorList

import crop
from crop.adapter import adapter_for
from crop.bench.cases import Case, cases
from crop.bench.families import QUESTION, bench_inputs, build_bench_model
from crop.bench.ideal import kept_generate, profile_prefill
from crop.bench.measure import PeakMemory, StepClock, measured_cache_bytes, timed
from crop.bench.report import build_report
from crop.bench.shapes import Shape, bench_shape, check_device, kv_cache_bytes, prefill_flops, vision_flops
from crop.errors import ConfigError, UnsupportedModelError
from crop.region import Region, Viewport
from crop.strategies.registry import build_method


def run(
    shape_name: str = "small",
    budgets: tuple[int, ...] = (192, 128, 64),
    repeats: int = 5,
    warmup: int = 1,
    new_tokens: int = 32,
    device: str = "cpu",
    dtype: str = "float32",
    out: Path | None = Path("results") / "bench.json",
    threads: int | None = None,
    progress: Callable[[str], None] = print,
    methods: list[str] | None = None,
    llm_layers: int | None = None,
    smoke: bool = False,
    visual_tokens: int | None = None,
    model: Any = None,
    region_rows: bool = True,
    decode_methods: list[str] | None = None,
) -> dict[str, Any]:
    """Measure every case (or, with `methods`, those and full and the ideal); repeats are interleaved (case order
    rotates each round). `llm_layers` overrides the shape's LLM depth (up to the real model's), `visual_tokens`
    its image size; `smoke` marks a quick run whose report prints no timing ratio. A method that does not fit the
    family is left out with its reason; a method whose depth profile no named ideal has gets the ideal at its
    profile, measured in the same rounds. `model`: one already built for this shape (a scaling run reuses it);
    `region_rows=False`: no region-sized rows; `decode_methods`: decode only these rows (all by default), the others
    measure prefill alone (each decode prefills again: at 16k tokens that doubles a round)."""
    if threads:
        torch.set_num_threads(threads)
    shape = bench_shape(shape_name, llm_layers, visual_tokens)
    check_device(device)
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    if model is None:
        model = build_bench_model(shape, torch_dtype, device)
    inputs = bench_inputs(shape, device=device, dtype=torch_dtype)
    region = Region.from_grid([2, 2, 5, 5])
    all_cases = cases(shape, list(budgets), region, region_rows, (torch_dtype, device))
    if methods:
        known = {case.name for case in all_cases}
        unknown = sorted(set(methods) - known)
        if unknown:
            raise ConfigError(f"unknown benchmark rows {unknown}; available: {sorted(known)}")
        all_cases = [case for case in all_cases if case.name in {*methods, "full", "ideal", "ideal-k2"}]
    else:  # a 2B-parameter localizer: only when asked for by name
        all_cases = [case for case in all_cases if case.name != "crop-grid-loc"]
    unknown_decode = sorted(set(decode_methods or ()) - {case.name for case in all_cases})
    if unknown_decode:
        raise ConfigError(
            f"--decode-methods names rows this run does not have: {unknown_decode}; its rows: "
            f"{sorted({case.name for case in all_cases})}"
        )
    skipped: dict[str, str] = {}

    def steps(case: Case) -> int:
        return new_tokens if decode_methods is None or case.name in decode_methods else 0

    for round_index in range(warmup + repeats):
        order = all_cases[round_index % len(all_cases) :] + all_cases[: round_index % len(all_cases)]
        for case in order:
            try:
                measurement = _measure(model, inputs, case, shape, steps(case), device)
            except (UnsupportedModelError, ConfigError) as refusal:
                if case.profile is not None:
                    raise
                skipped[case.name] = str(refusal)
                all_cases.remove(case)
                continue
            _record(case, measurement, round_index >= warmup)
        if round_index == 0:
            extra = _profile_ideals(all_cases)
            for case in extra:  # their own warm-up, unrecorded
                _record(case, _measure(model, inputs, case, shape, steps(case), device), False)
            all_cases += extra
        progress(f"round {round_index + 1}/{warmup + repeats} done")
    for case in all_cases:  # ideals added after the first round, when that round was measured
        while len(case.results.get("prefill_s", [])) < repeats:
            _record(case, _measure(model, inputs, case, shape, steps(case), device), True)
    report = build_report(shape, all_cases, device, dtype, repeats, new_tokens, smoke)
    report["warmup"] = warmup
    report["skipped"] = skipped
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    return report


def _record(case: Case, measurement: dict[str, float], kept: bool) -> None:
    case.profile = case.profile or tuple(measurement.pop("per_layer"))
    measurement.pop("per_layer", None)
    if kept:
        for key, value in measurement.items():
            case.results.setdefault(key, []).append(value)


def _profile_ideals(measured: list[Case]) -> list[Case]:
    """The ideal at each measured method's depth profile that no named ideal covers (several-stage methods)."""
    covered = {case.profile for case in measured if case.is_ideal or case.name == "full"}
    extra: list[Case] = []
    for case in measured:
        if not case.is_ideal and case.name != "full" and case.profile not in covered:
            covered.add(case.profile)
            extra.append(Case("ideal-profile", case.budget, None, ideal_profile=case.profile, profile_of=case.name))
    return extra


def _measure(model: Any, inputs: dict, case: Case, shape: Shape, new_tokens: int, device: str) -> dict[str, Any]:
    localize_seconds: list[float] = []
    visual = int((inputs["input_ids"][0] == adapter_for(model).image_token_id).sum())
    text = inputs["input_ids"].shape[1] - visual
    if case.is_ideal:
        per_layer = list(case.ideal_profile or ())
        if not per_layer:
            assert case.ideal_tokens is not None
            per_layer = [visual] * case.ideal_layer + [case.ideal_tokens] * (shape.llm_layers - case.ideal_layer)
        prefill_call = profile_prefill(model, inputs, per_layer)
        uniform = len(set(per_layer)) == 1
        generate_call = kept_generate(model, inputs, per_layer[0]) if uniform else None
    else:
        method = case.method() if case.method is not None else build_method("full")
        pruned = crop.apply(model, None, method=method)
        localizer = case.localizer(model, inputs) if case.localizer is not None else None

        def regions() -> list[Region] | None:
            if localizer is not None:
                seconds, region = timed(localizer, device)
                localize_seconds.append(seconds)
                return [region]
            return [case.region or Region.full()] if method.needs_region else None

        frame, questions = [Viewport()], [QUESTION]  # regions are boxes on the bench's square grid
        prefill_call = lambda: pruned(  # noqa: E731
            **inputs, regions=regions(), viewports=frame, questions=questions, use_cache=True, logits_to_keep=1
        )
        generate_call = lambda steps, clock: pruned.generate(  # noqa: E731
            **inputs, regions=regions(), viewports=frame, questions=questions, max_new_tokens=steps,
            min_new_tokens=steps, do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
        )  # fmt: skip
    clock = StepClock(device)
    try:
        with torch.inference_mode(), PeakMemory(device) as memory:
            prefill, output = timed(prefill_call, device)
        localize = localize_seconds[0] if localize_seconds else None
        if generate_call is not None and new_tokens:
            generate_call(new_tokens + 1, clock)
    finally:
        if not case.is_ideal:
            pruned.remove()
    if not case.is_ideal:
        output, stats = output
        per_layer = stats.rows[0].per_layer
    cache = output.get("cache") or output.get("past_key_values")
    tokens = [n + text for n in per_layer]
    return {
        "prefill_s": prefill,
        "localize_s": localize,
        "decode_tokens_per_s": clock.tokens_per_second() if generate_call and new_tokens else None,
        "peak_memory_bytes": memory.peak,
        "kv_cache_bytes": measured_cache_bytes(cache),
        "kv_cache_bytes_analytic": kv_cache_bytes(shape, tokens, cache.layers[0].keys.dtype),
        "flops_prefill": prefill_flops(shape, tokens),
        "flops_vision": vision_flops(shape),
        "kept_tokens": per_layer[-1],
        "average_tokens": sum(per_layer) / len(per_layer),
        "per_layer": per_layer,
    }

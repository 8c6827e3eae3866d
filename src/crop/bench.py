"""Speed and memory of pruning methods: prefill, decode, peak memory, KV-cache bytes and analytic FLOPs.

Models have real layer shapes and random weights (speed does not depend on weight values), built from configs.
Every method runs against the same model in one process, in interleaved order, after warm-up; times are medians
over repeats with min/max, and ratios (to full tokens and to the *ideal*: the model fed only the kept visual
tokens from the start, with no selection work) are computed within the run.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LogitsProcessor,
    LogitsProcessorList,
)

import crop
from crop.errors import ConfigError
from crop.localize.attention import AttentionLocalizer
from crop.region import Region, Viewport
from crop.strategies.base import Method
from crop.strategies.crop_fused import FusedCROP
from crop.strategies.crop_method import CROP
from crop.strategies.ilp import ILP
from crop.strategies.registry import build_method, table_methods

IMAGE_TOKEN = 32000
TEXT_TOKENS = 40
"""Prompt text around the image: LLaVA-1.5's system prompt and a short question are about this long."""


@dataclass(frozen=True)
class Shape:
    """Layer shapes of a LLaVA-style model; `llm_layers` may be reduced from the real model's to fit memory."""

    name: str
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    llm_layers: int
    real_llm_layers: int
    vocab: int = 32064

    @property
    def grid_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


SHAPES = {
    "llava-1.5-7b": Shape("llava-1.5-7b", 1024, 4096, 24, 16, 336, 14, 4096, 11008, 32, 32, 8, 32),
    "small": Shape("small", 256, 1024, 4, 4, 336, 14, 512, 1376, 8, 8, 8, 8),
    "tiny": Shape("tiny", 32, 64, 2, 2, 112, 14, 64, 128, 4, 2, 4, 4),
}


def bench_shape(name: str, llm_layers: int | None = None) -> Shape:
    """A shape by name, its LLM cut to (or restored to) `llm_layers` if given."""
    if name not in SHAPES:
        raise ConfigError(f"unknown benchmark shape {name!r}; available: {', '.join(SHAPES)}")
    shape = SHAPES[name]
    if llm_layers is None:
        return shape
    if not 3 <= llm_layers <= shape.real_llm_layers:
        raise ConfigError(
            f"--llm-layers {llm_layers} is outside 3..{shape.real_llm_layers} for {name}: the in-LLM methods prune "
            f"at layer 2, and {shape.real_llm_layers} is the real model's depth"
        )
    return replace(shape, llm_layers=llm_layers)


def check_device(device: str) -> None:
    """Refuses a device this torch build cannot use, before minutes of model building."""
    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise ConfigError(f"--device {device!r} is not supported; use cpu or cuda (cuda:N)")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device} but CUDA is not available to torch {torch.__version__} here")


def build_bench_model(shape: Shape, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """A random-weight LLaVA with `shape`'s layer sizes, SDPA attention."""
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_intermediate,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
    )
    text = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.llm_layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
        pad_token_id=0,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2)
    with torch.device(device):  # built in place, in `dtype`: 7B shapes in float32 would need twice the memory
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def bench_inputs(shape: Shape, batch: int = 1, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """A prompt of text, the image's visual tokens, then text; random pixels."""
    before = torch.randint(1, 31000, (batch, TEXT_TOKENS // 2))
    after = torch.randint(1, 31000, (batch, TEXT_TOKENS - TEXT_TOKENS // 2))
    image = torch.full((batch, shape.grid_tokens), IMAGE_TOKEN)
    input_ids = torch.cat([before, image, after], dim=1)
    pixels = torch.randn(batch, 3, shape.image_size, shape.image_size, dtype=dtype)
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "pixel_values": pixels.to(device)}  # fmt: skip


def prefill_flops(shape: Shape, tokens_per_layer: list[int]) -> float:
    """Analytic multiply-add FLOPs (x2) of the LLM prefill: projections, attention scores and values, MLP."""
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    total = 0.0
    for n in tokens_per_layer:
        projections = 2 * n * shape.hidden * (2 * shape.hidden + 2 * kv)
        attention = 2 * 2 * n * n * shape.hidden  # QK^T and AV over the full (unmasked) square
        mlp = 2 * 3 * n * shape.hidden * shape.intermediate
        total += projections + attention + mlp
    return total


def vision_flops(shape: Shape) -> float:
    """Analytic FLOPs of encoding one image: patch embedding, every vision layer on the patches and CLS (transformers
    runs them all to return hidden states), and the two-layer projector on the grid tokens. The same for every
    method (two-pass localization encodes the image a second time, which this count leaves out)."""
    tokens, h = shape.grid_tokens + 1, shape.vision_hidden
    embedding = 2 * shape.grid_tokens * 3 * shape.patch_size**2 * h
    per_layer = 2 * tokens * h * 4 * h + 2 * 2 * tokens * tokens * h + 2 * 2 * tokens * h * shape.vision_intermediate
    projector = 2 * shape.grid_tokens * (h * shape.hidden + shape.hidden * shape.hidden)
    return embedding + shape.vision_layers * per_layer + projector


def kv_cache_bytes(shape: Shape, tokens_per_layer: list[int], dtype: torch.dtype, batch: int = 1) -> int:
    """Keys and values of every layer after prefill."""
    head_dim = shape.hidden // shape.heads
    element = torch.tensor([], dtype=dtype).element_size()
    return sum(2 * batch * n * shape.kv_heads * head_dim * element for n in tokens_per_layer)


def measured_cache_bytes(cache: Any) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


class PeakMemory:
    """Peak growth of the process's resident memory (CPU) or of allocated CUDA memory during a block."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss() - self._base)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss() - self._base)


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """Wall time of `fn()` (CUDA: between synchronised events)."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        result = fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000, result
    begin = time.perf_counter()
    result = fn()
    return time.perf_counter() - begin, result


class StepClock(LogitsProcessor):
    """Records the time each generated token's logits are ready (CUDA: after synchronising), so that decode speed
    is read from one `generate` call: the span from the first token (end of prefill) to the last."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores

    def tokens_per_second(self) -> float:
        """Decode steps after the first token, per second of their span."""
        steps = len(self.times) - 1
        if steps < 1:
            raise ValueError("decode speed needs at least two generated tokens")
        return steps / max(self.times[-1] - self.times[0], 1e-9)


@dataclass
class Case:
    """One measured configuration: a method (None: the ideal or full) at a budget."""

    name: str
    budget: str
    method: Callable[[], Method] | None
    region: Region | None = None
    ideal_tokens: int | None = None
    ideal_layer: int = 0
    """For the ideal: layers before this one see every token (the depth profile of an in-LLM method at K)."""
    localizer: Callable[[Any, dict], Callable[[], Region]] | None = None
    """Given the target model and the inputs, a localization call that is timed as part of the prefill (the
    region then comes from it)."""
    results: dict[str, list[float]] = field(default_factory=dict)


def cases(shape: Shape, budgets: list[int], region: Region) -> list[Case]:
    """Full tokens; CROP region-sized and at each budget (region given; from the attention localizer in a second
    pass, timed; fused into the prefill); the baselines at each budget; the ideal per budget."""
    grid = shape.grid_tokens
    region_tokens = int(region.token_mask(int(grid**0.5), int(grid**0.5)).sum())

    def two_pass(model: Any, inputs: dict) -> Callable[[], Region]:
        localizer = AttentionLocalizer(model, None, layer=1)
        return lambda: localizer.localize_inputs(inputs)

    rows = [
        Case("full", "all", None),
        Case("crop-ilp", "region", lambda: CROP(ILP(2)), region),
        Case("crop-attn-2pass", "region", lambda: CROP(ILP(2)), localizer=two_pass),
        Case("crop-fused", "region", lambda: FusedCROP(2)),
        Case("crop-grid-loc", "region", lambda: CROP(ILP(2)), localizer=grid_localizer),
        Case("ideal", "region", None, ideal_tokens=region_tokens),
    ]
    for n in budgets:
        rows += [
            Case("crop-ilp", str(n), lambda n=n: CROP(ILP(2), budget=n), region),
            Case("crop-attn-2pass", str(n), lambda n=n: CROP(ILP(2), budget=n), localizer=two_pass),
            Case("crop-fused", str(n), lambda n=n: FusedCROP(2, budget=n)),
            Case("crop-grid-loc", str(n), lambda n=n: CROP(ILP(2), budget=n), localizer=grid_localizer),
            *[Case(name, str(n), lambda n=n, name=name: build_method(name, budget=n)) for name in table_methods()],
            Case("ideal", str(n), None, ideal_tokens=n),
            Case("ideal-k2", str(n), None, ideal_tokens=n, ideal_layer=2),
        ]
    return rows


def grid_localizer(model: Any, inputs: dict) -> Callable[[], Region]:
    """The paper's localizer (built once per process), timed: a Qwen2-VL-2B-shaped VLM (random weights; vision
    32 x 1280, LLM 28 x 1536, MLP 8960, GQA 12:2) asked for the grid box of a 336 px image, answering 12 tokens (a
    box like `[2, 3, 5, 6]`). Its answer is unparsable noise, so the region falls back to the whole image: only the
    time means something. Run it by name (`--methods crop-grid-loc`): it is not in the default set."""
    return _grid_localizer_call(str(model.device), model.dtype)


@functools.cache
def _grid_localizer_call(device: str, dtype: torch.dtype) -> Callable[[], Region]:
    from PIL import Image

    from crop.localize import GridVLMLocalizer
    from crop.testing.qwen2_vl import build_qwen_model, build_qwen_processor

    side = 336
    processor = build_qwen_processor(min_pixels=side * side, max_pixels=side * side)
    localizer_model = build_qwen_model(
        text_layers=28, text_hidden=1536, text_heads=12, text_kv_heads=2, text_intermediate=8960,
        vision_hidden=1280, vision_layers=32, vision_heads=16, vision_mlp_ratio=4, mrope_section=(16, 24, 24),
        vocab_size=151936, initializer_range=0.02,
    )  # fmt: skip
    localizer_model = localizer_model.to(device=device, dtype=dtype)
    localizer_model.generation_config.eos_token_id = None  # always the 12 tokens of a box answer
    localizer = GridVLMLocalizer(localizer_model, processor, max_new_tokens=12)
    image = Image.fromarray(torch.randint(0, 255, (side, side, 3), dtype=torch.uint8).numpy())
    return lambda: localizer.localize(image, "what is written on the sign ?")


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
) -> dict[str, Any]:
    """Measure every case (or, with `methods`, those and full and the ideal); repeats are interleaved (case order
    rotates each round). `llm_layers` overrides the shape's LLM depth (up to the real model's)."""
    if threads:
        torch.set_num_threads(threads)
    shape = bench_shape(shape_name, llm_layers)
    check_device(device)
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    model = build_bench_model(shape, torch_dtype, device)
    inputs = bench_inputs(shape, device=device, dtype=torch_dtype)
    region = Region.from_grid([2, 2, 5, 5])
    all_cases = cases(shape, list(budgets), region)
    if methods:
        known = {case.name for case in all_cases}
        unknown = sorted(set(methods) - known)
        if unknown:
            raise ConfigError(f"unknown benchmark rows {unknown}; available: {sorted(known)}")
        all_cases = [case for case in all_cases if case.name in {*methods, "full", "ideal", "ideal-k2"}]
    else:  # a 2B-parameter localizer: only when asked for by name
        all_cases = [case for case in all_cases if case.name != "crop-grid-loc"]
    for round_index in range(warmup + repeats):
        order = all_cases[round_index % len(all_cases) :] + all_cases[: round_index % len(all_cases)]
        for case in order:
            measurement = _measure(model, inputs, case, shape, new_tokens, device)
            if round_index >= warmup:
                for key, value in measurement.items():
                    case.results.setdefault(key, []).append(value)
        progress(f"round {round_index + 1}/{warmup + repeats} done")
    report = _report(shape, all_cases, budgets, device, dtype, repeats, new_tokens)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    return report


def _measure(model: Any, inputs: dict, case: Case, shape: Shape, new_tokens: int, device: str) -> dict[str, float]:
    localize_seconds: list[float] = []
    if case.ideal_tokens is not None and case.ideal_layer:
        prefill_call, generate_call = _profile_ideal_prefill(model, inputs, case.ideal_tokens, case.ideal_layer), None
        per_layer = [shape.grid_tokens] * case.ideal_layer + [case.ideal_tokens] * (shape.llm_layers - case.ideal_layer)
    elif case.ideal_tokens is not None:
        prefill_call, generate_call = _ideal_calls(model, inputs, case.ideal_tokens)
        per_layer = [case.ideal_tokens] * shape.llm_layers
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

        frame = [Viewport()]  # regions are boxes on the bench's square grid
        prefill_call = lambda: pruned(**inputs, regions=regions(), viewports=frame, use_cache=True)  # noqa: E731
        generate_call = lambda steps, clock: pruned.generate(  # noqa: E731
            **inputs, regions=regions(), viewports=frame, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
        )  # fmt: skip
    clock = StepClock(device)
    try:
        with torch.inference_mode(), PeakMemory(device) as memory:
            prefill, output = timed(prefill_call, device)
        localize = localize_seconds[0] if localize_seconds else None
        if generate_call is not None:
            generate_call(new_tokens + 1, clock)
    finally:
        if case.ideal_tokens is None:
            pruned.remove()
    if case.ideal_tokens is None:
        output, stats = output
        per_layer = stats.rows[0].per_layer
    cache = output.get("cache") or output.get("past_key_values")
    tokens = [n + TEXT_TOKENS for n in per_layer]
    return {
        "prefill_s": prefill,
        "localize_s": localize,
        "decode_tokens_per_s": clock.tokens_per_second() if generate_call else None,
        "peak_memory_bytes": memory.peak,
        "kv_cache_bytes": measured_cache_bytes(cache),
        "kv_cache_bytes_analytic": kv_cache_bytes(shape, tokens, cache.layers[0].keys.dtype),
        "flops_prefill": prefill_flops(shape, tokens),
        "flops_vision": vision_flops(shape),
        "kept_tokens": per_layer[-1],
        "average_tokens": sum(per_layer) / len(per_layer),
    }


def _profile_ideal_prefill(model: Any, inputs: dict, kept: int, layer: int) -> Callable[[], Any]:
    """The ideal at the depth profile of an in-LLM method at `layer`: plain calls of the language model, layers
    `< layer` on every token, then layers `>= layer` on the text and the first `kept` visual tokens at their
    original positions; no selection work and no hooks. (The layer list is swapped on this instance for the call
    and put back.) Returns the prefill; the two caches are joined into one."""
    config = model.config
    language_model = model.model.language_model
    ids = inputs["input_ids"][0]
    visual = (ids == config.image_token_id).nonzero().squeeze(1)
    keep = torch.ones(ids.numel(), dtype=torch.bool, device=ids.device)
    keep[visual[kept:]] = False
    positions = keep.nonzero().squeeze(1)[None]
    layers, norm = language_model.layers, language_model.norm

    def run(chosen: nn.ModuleList, **kwargs: Any) -> Any:
        language_model.layers = chosen
        try:
            return language_model(use_cache=True, **kwargs)
        finally:
            language_model.layers, language_model.norm = layers, norm

    def prefill() -> Any:
        with torch.inference_mode():
            features = model.model.get_image_features(
                pixel_values=inputs["pixel_values"],
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            ).pooler_output[0]
            embedded = model.get_input_embeddings()(inputs["input_ids"])
            embedded = embedded.masked_scatter((inputs["input_ids"] == config.image_token_id)[..., None], features)
            language_model.norm = nn.Identity()
            head = run(nn.ModuleList(layers[:layer]), inputs_embeds=embedded, attention_mask=inputs["attention_mask"])
            hidden = head.last_hidden_state[:, positions[0]]
            mask = torch.ones(1, hidden.shape[1], dtype=torch.long, device=hidden.device)
            tail = run(nn.ModuleList(layers[layer:]), inputs_embeds=hidden, attention_mask=mask, position_ids=positions)
            model.lm_head(tail.last_hidden_state[:, -1:])
            cache = tail.cache
            for index in range(layer):
                cache.layers[index] = head.cache.layers[index]
            return {"cache": cache}

    return prefill


def _ideal_calls(model: Any, inputs: dict, kept: int) -> tuple[Callable[[], Any], Callable[[int, StepClock], Any]]:
    """The ideal at `kept` tokens: the image is encoded as usual, then the LLM gets only `kept` visual tokens
    (the first ones, taken without any selection work)."""
    config = model.config
    ids = inputs["input_ids"][0]
    visual = (ids == config.image_token_id).nonzero().squeeze(1)
    start, end = int(visual[0]), int(visual[-1]) + 1
    short = torch.cat([ids[:start], ids[start : start + kept], ids[end:]])[None]
    mask = torch.ones_like(short)

    def embeds() -> torch.Tensor:
        features = model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        ).pooler_output[0][:kept]
        embedded = model.get_input_embeddings()(short)
        return embedded.masked_scatter((short == config.image_token_id)[..., None], features.to(embedded.dtype))

    def prefill() -> Any:
        with torch.inference_mode():
            return model(inputs_embeds=embeds(), attention_mask=mask, use_cache=True)

    def generate(steps: int, clock: StepClock) -> Any:
        with torch.inference_mode():
            return model.generate(input_ids=short, inputs_embeds=embeds(), attention_mask=mask,
                                  max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                  logits_processor=LogitsProcessorList([clock]))  # fmt: skip

    return prefill, generate


def _report(shape: Shape, all_cases: list[Case], budgets, device: str, dtype: str, repeats: int, new_tokens: int):
    full = next(c for c in all_cases if c.name == "full")
    full_prefill = statistics.median(full.results["prefill_s"])
    full_flops = full.results["flops_prefill"][0]
    vision = full.results["flops_vision"][0]
    ideal = {c.budget: statistics.median(c.results["prefill_s"]) for c in all_cases if c.name == "ideal"}
    profile = {c.budget: statistics.median(c.results["prefill_s"]) for c in all_cases if c.name == "ideal-k2"}
    rows = []
    for case in all_cases:
        measured, analytic = case.results["kv_cache_bytes"][0], case.results["kv_cache_bytes_analytic"][0]
        prefill = case.results["prefill_s"]
        median = statistics.median(prefill)
        rows.append({
            "method": case.name,
            "budget": case.budget,
            "kept_tokens": case.results["kept_tokens"][0],
            "average_tokens_over_layers": case.results["average_tokens"][0],
            "prefill_s": {"median": median, "min": min(prefill), "max": max(prefill)},
            "prefill_ratio_to_full": median / full_prefill,
            "prefill_ratio_to_ideal": median / ideal[case.budget] if case.budget in ideal else None,
            "prefill_ratio_to_ideal_k2": median / profile[case.budget] if case.budget in profile else None,
            "flops_ratio_to_full": (case.results["flops_prefill"][0] + vision) / (full_flops + vision),
            "llm_flops_ratio_to_full": case.results["flops_prefill"][0] / full_flops,
            "localize_s": _median_or_none(case.results["localize_s"]),
            "decode_tokens_per_s": _median_or_none(case.results["decode_tokens_per_s"]),
            "peak_memory_mb": statistics.median(case.results["peak_memory_bytes"]) / 2**20,
            "kv_cache_mb": measured / 2**20,
            "kv_cache_matches_analytic": measured == analytic,
        })  # fmt: skip
    return {
        "shape": asdict(shape),
        "note": (
            f"LLM layers reduced from {shape.real_llm_layers} to {shape.llm_layers} to fit memory"
            if shape.llm_layers < shape.real_llm_layers else "real layer count"
        ),
        "device": device,
        "dtype": dtype,
        "repeats": repeats,
        "new_tokens": new_tokens,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": _cpu_name(),
                    "threads": torch.get_num_threads()},
        "rows": rows,
    }  # fmt: skip


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else statistics.median(values)


def _milliseconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(report: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    lines = [
        "| method | budget | kept | avg over layers | prefill ms (min-max) | of which localize ms | x full | x ideal | "
        "x ideal K=2 | FLOPs x full | decode tok/s | peak MB | KV MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        prefill = row["prefill_s"]
        ideal = "-" if row["prefill_ratio_to_ideal"] is None else f"{row['prefill_ratio_to_ideal']:.2f}"
        ratio_k2 = row.get("prefill_ratio_to_ideal_k2")
        profile = "-" if ratio_k2 is None else f"{ratio_k2:.2f}"
        lines.append(
            f"| {row['method']} | {row['budget']} | {row['kept_tokens']} | {row['average_tokens_over_layers']:.1f} | "
            f"{1000 * prefill['median']:.1f} ({1000 * prefill['min']:.1f}-{1000 * prefill['max']:.1f}) | "
            f"{_milliseconds(row.get('localize_s'))} | {row['prefill_ratio_to_full']:.2f} | {ideal} | {profile} | "
            f"{row['flops_ratio_to_full']:.2f} | "
            f"{_number(row['decode_tokens_per_s'])} | {row['peak_memory_mb']:.0f} | {row['kv_cache_mb']:.2f} |"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Prefill time and peak memory versus kept visual tokens, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = sorted({row["method"] for row in report["rows"]})
    for method in methods:
        rows = sorted((r for r in report["rows"] if r["method"] == method), key=lambda r: r["kept_tokens"])
        kept = [r["kept_tokens"] for r in rows]
        left.plot(kept, [1000 * r["prefill_s"]["median"] for r in rows], marker="o", label=method)
        right.plot(kept, [r["peak_memory_mb"] for r in rows], marker="o", label=method)
    left.set(xlabel="visual tokens kept", ylabel="prefill (ms, median)", title="Time to first token")
    right.set(xlabel="visual tokens kept", ylabel="peak memory growth (MB)", title="Peak memory")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    left.legend(fontsize=7)
    figure.suptitle(f"{report['shape']['name']} ({report['note']}), {report['device']}, {report['dtype']}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)

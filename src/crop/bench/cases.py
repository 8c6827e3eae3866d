"""What is measured: one case per method and budget, with the full-token and ideal rows, and the timed localizers
of the two-pass cases."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from crop.bench.families import bench_clip
from crop.bench.shapes import Shape
from crop.localize.attention import AttentionLocalizer
from crop.region import Region
from crop.strategies.base import Method
from crop.strategies.cdpruner import CDPruner
from crop.strategies.crop_fused import FusedCROP
from crop.strategies.crop_method import CROP
from crop.strategies.ilp import ILP
from crop.strategies.registry import build_method, table_methods


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
    ideal_profile: tuple[int, ...] | None = None
    """For the ideal at a method's own depth profile (visual tokens per layer): `profile_of` names the method."""
    profile_of: str | None = None
    localizer: Callable[[Any, dict], Callable[[], Region]] | None = None
    """Given the target model and the inputs, a localization call that is timed as part of the prefill (the
    region then comes from it)."""
    results: dict[str, list[float]] = field(default_factory=dict)
    profile: tuple[int, ...] | None = None
    """Visual tokens per LLM layer, as the first measurement counted them."""

    @property
    def is_ideal(self) -> bool:
        return self.ideal_tokens is not None or self.ideal_profile is not None


def cases(
    shape: Shape,
    budgets: list[int],
    region: Region,
    region_rows: bool = True,
    clip_on: tuple[torch.dtype, str] = (torch.float32, "cpu"),
) -> list[Case]:
    """Full tokens; CROP region-sized (single-grid shapes) and at each budget (region given; from the attention
    localizer in a second pass, timed; fused into the prefill); the baselines at each budget; the ideal per budget.
    `region_rows=False` leaves out the region-sized rows. CDPruner gets a random CLIP text tower in the dtype and
    on the device of `clip_on`."""
    grid = shape.grid_tokens

    def two_pass(model: Any, inputs: dict) -> Callable[[], Region]:
        localizer = AttentionLocalizer(model, None, layer=1)
        return lambda: localizer.localize_inputs(inputs)

    rows = [Case("full", "all", None)]
    if region_rows and shape.family != "llava_next":  # one square grid: the region's tokens are its share of it
        region_tokens = int(region.token_mask(int(grid**0.5), int(grid**0.5)).sum())
        rows += [
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
            Case("cdpruner", str(n), lambda n=n: CDPruner(n, clip=bench_clip(shape, *clip_on))),
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

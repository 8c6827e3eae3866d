"""What every vLLM family of the plugin shares: the settings read from the model config, the request's region
(given, or found by the plugin's localizer in vLLM's processor) carried from the processor to the model as one
`(8,)` row per image: the region's box in image fractions (NaN: no region), then the viewport that places the
image on the token grid."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from crop.adapter import VisualLayout
from crop.errors import ConfigError
from crop.localize.grid_vlm import GridVLMLocalizer
from crop.region import Region, Viewport
from crop.serving.pruning import (
    BOX_KWARG,
    QUESTION_KWARG,
    REGION_KWARG,
    SETTINGS_KEY,
    FeaturePruner,
    PruningSettings,
    request_region,
)

BOX_FIELD = "crop_region_box"
"""The processor output that carries each image's region to the model."""
QUESTION_FIELD = "crop_question_utf8"
"""The processor output that carries each image's question (UTF-8 bytes) to the model, for methods that read it."""
DUMMY_QUESTION = "what is in the image ?"
"""The question of vLLM's profiling inputs."""


def pruner_for(config: Any, vision_internals: bool = False) -> FeaturePruner:
    """The pruner the model config's `crop` entry describes (set with vLLM's `hf_overrides`); `vision_internals`:
    the family's plugin gives the vision tower's internals (VisionZip, HoloV, CDPruner)."""
    entry = getattr(config, SETTINGS_KEY, None)
    if entry is None:
        raise ConfigError(
            f"the crop vLLM architectures need pruning settings in the model config: pass hf_overrides="
            f'{{"architectures": [...], "{SETTINGS_KEY}": {{"method": "divprune", "budget": 64}}}}'
        )
    settings = PruningSettings.from_config(entry, vision_internals)
    return FeaturePruner(settings, config.get_text_config().num_hidden_layers)


def box_tensor(placed: Sequence[tuple[Region | None, Viewport]]) -> torch.Tensor:
    """`(images, 8)`: per image of a request, its region's box (NaN where there is none) and its viewport."""
    rows = []
    for region, viewport in placed:
        box = [math.nan] * 4 if region is None else [region.x0, region.y0, region.x1, region.y1]
        rows.append(box + [viewport.left, viewport.top, viewport.right, viewport.bottom])
    return torch.tensor(rows, dtype=torch.float64)


def region_of_box(box: torch.Tensor) -> tuple[Region | None, Viewport]:
    """The region and viewport a `box_tensor` row holds."""
    values = [float(v) for v in box.reshape(-1)]
    region = None if any(math.isnan(v) for v in values[:4]) else Region(*values[:4])
    return region, Viewport(*values[4:])


def question_tensor(question: str, images: int) -> torch.Tensor:
    """`(images, bytes)`: the question's UTF-8 bytes, once per image of a request."""
    return torch.tensor([list(question.encode("utf-8"))] * images, dtype=torch.uint8)


def question_of(row: torch.Tensor) -> str:
    """The question a `question_tensor` row holds."""
    return bytes(row.tolist()).decode("utf-8")


@functools.lru_cache(maxsize=2)
def grid_localizer(path: str) -> GridVLMLocalizer:
    """The settings' localizer VLM, loaded once per process on the first request that needs it (vLLM's
    processor runs in its front-end process, on CPU)."""
    return GridVLMLocalizer.from_pretrained(path)


class RegionProcessorMixin:
    """Put before a family's vLLM processor: the request's region kwargs are kept from the HF processor, checked
    against each image's grid and passed to the model as a per-image field; vLLM's profiling inputs get the whole
    image as region. The family says what each image's grid is (`image_layouts`)."""

    info: Any

    def image_layouts(self, processed: BatchFeature) -> list[VisualLayout]:
        """The token grid of each image in the HF processor's output."""
        raise NotImplementedError

    def item_layout(self, item: Any) -> VisualLayout:
        """The token grid of one processed image item (its fields as the model gets them)."""
        raise NotImplementedError

    def image_token_id(self) -> int:
        raise NotImplementedError

    def image_viewport(self, image: Any) -> Viewport:
        """Where a whole image lands on the token grid after the family's processor (for localizer regions)."""
        return Viewport()

    def _get_prompt_updates(
        self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs: Any
    ) -> Sequence[PromptUpdate]:
        """One placeholder per token the method keeps (vLLM reserves them before the encoder runs)."""
        token = self.image_token_id()

        def replacement(item_idx: int) -> list[int]:
            item = out_mm_kwargs["image"][item_idx]
            region, viewport = region_of_box(item[BOX_FIELD].data)
            return [token] * self.info.pruner.count(self.item_layout(item), region, viewport)

        return [PromptReplacement(modality="image", target=[token], replacement=replacement)]

    def get_dummy_inputs(self, seq_len, mm_counts, mm_options):
        inputs = super().get_dummy_inputs(seq_len, mm_counts, mm_options)
        kwargs = {BOX_KWARG: [0.0, 0.0, 1.0, 1.0], QUESTION_KWARG: DUMMY_QUESTION}
        return dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs)

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        own = {key: hf_kwargs[key] for key in (REGION_KWARG, BOX_KWARG, QUESTION_KWARG) if key in hf_kwargs}
        rest = {key: value for key, value in hf_kwargs.items() if key not in own}
        processed = super()._call_hf_processor(hf_data, rest)
        layouts = self.image_layouts(processed)
        if layouts:
            placed = self._placed_regions(own, list(hf_data.get("images") or []), len(layouts))
            for layout, (region, _) in zip(layouts, placed, strict=True):
                self.info.pruner.check(layout, region)
            processed[BOX_FIELD] = box_tensor(placed)
            if self.info.pruner.settings.reads_question:
                processed[QUESTION_FIELD] = question_tensor(request_question(own, "this method"), len(layouts))
        return processed

    def _placed_regions(
        self, own: Mapping[str, object], images: list[Any], count: int
    ) -> list[tuple[Region | None, Viewport]]:
        """Each image's region and viewport: the request's region on the image as the model sees it, or, for a
        method that needs one and settings that name a localizer, the localizer's on each whole image."""
        region = request_region(own)
        settings = self.info.pruner.settings
        if region is not None or settings.localizer is None or not self.info.pruner.needs_region:
            return [(region, Viewport())] * count
        question = request_question(own, "this engine's localizer")
        localizer = grid_localizer(settings.localizer)
        return [(localizer.localize(image, question), self.image_viewport(image)) for image in images]

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = {**super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
                  BOX_FIELD: MultiModalFieldConfig.batched("image")}  # fmt: skip
        if QUESTION_FIELD in hf_inputs:
            fields[QUESTION_FIELD] = MultiModalFieldConfig.batched("image")
        return fields


def request_question(own: Mapping[str, object], who: str) -> str:
    """The request's question (`crop_question`), which `who` reads: vLLM's processor does not see the prompt."""
    question = own.get(QUESTION_KWARG)
    if not isinstance(question, str) or not question.strip():
        raise ConfigError(
            f"{who} needs each request's question: pass mm_processor_kwargs {{{QUESTION_KWARG!r}: '...'}} (vLLM's "
            "processor does not see the prompt)"
        )
    return question

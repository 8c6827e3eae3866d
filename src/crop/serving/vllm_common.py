"""What every vLLM family of the plugin shares: the settings read from the model config, and the request's region
carried from the processor to the model as one `(4,)` box per image (image fractions; NaN: no region)."""

from __future__ import annotations

import dataclasses
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
from crop.region import Region
from crop.serving.pruning import BOX_KWARG, REGION_KWARG, SETTINGS_KEY, FeaturePruner, PruningSettings, request_region

BOX_FIELD = "crop_region_box"
"""The processor output that carries each image's region to the model."""


def pruner_for(config: Any, vision_internals: bool = False) -> FeaturePruner:
    """The pruner the model config's `crop` entry describes (set with vLLM's `hf_overrides`); `vision_internals`:
    the family's plugin gives the vision tower's internals (VisionZip, HoloV)."""
    entry = getattr(config, SETTINGS_KEY, None)
    if entry is None:
        raise ConfigError(
            f"the crop vLLM architectures need pruning settings in the model config: pass hf_overrides="
            f'{{"architectures": [...], "{SETTINGS_KEY}": {{"method": "divprune", "budget": 64}}}}'
        )
    settings = PruningSettings.from_config(entry, vision_internals)
    return FeaturePruner(settings, config.get_text_config().num_hidden_layers)


def box_tensor(region: Region | None, images: int) -> torch.Tensor:
    """`(images, 4)`: the region's box for each image of a request, NaN where there is none."""
    box = [math.nan] * 4 if region is None else [region.x0, region.y0, region.x1, region.y1]
    return torch.tensor([box] * images, dtype=torch.float64)


def region_of_box(box: torch.Tensor) -> Region | None:
    """The region a `box_tensor` row holds."""
    values = [float(v) for v in box.reshape(-1)]
    return None if any(math.isnan(v) for v in values) else Region(*values)


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

    def _get_prompt_updates(
        self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs: Any
    ) -> Sequence[PromptUpdate]:
        """One placeholder per token the method keeps (vLLM reserves them before the encoder runs)."""
        token = self.image_token_id()

        def replacement(item_idx: int) -> list[int]:
            item = out_mm_kwargs["image"][item_idx]
            return [token] * self.info.pruner.count(self.item_layout(item), region_of_box(item[BOX_FIELD].data))

        return [PromptReplacement(modality="image", target=[token], replacement=replacement)]

    def get_dummy_inputs(self, seq_len, mm_counts, mm_options):
        inputs = super().get_dummy_inputs(seq_len, mm_counts, mm_options)
        return dataclasses.replace(inputs, hf_processor_mm_kwargs={BOX_KWARG: [0.0, 0.0, 1.0, 1.0]})

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        own = {key: hf_kwargs[key] for key in (REGION_KWARG, BOX_KWARG) if key in hf_kwargs}
        rest = {key: value for key, value in hf_kwargs.items() if key not in own}
        processed = super()._call_hf_processor(hf_data, rest)
        layouts = self.image_layouts(processed)
        if layouts:
            region = request_region(own)
            for layout in layouts:
                self.info.pruner.check(layout, region)
            processed[BOX_FIELD] = box_tensor(region, len(layouts))
        return processed

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {**super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
                BOX_FIELD: MultiModalFieldConfig.batched("image")}  # fmt: skip

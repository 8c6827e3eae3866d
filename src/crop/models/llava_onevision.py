"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's layout with anyres-max.

An image's placeholders are LLaVA-NeXT's (`crop.models.llava_next`): the base grid, then the unpadded high-res grid
with a newline after each row, but the SigLIP tower has no CLS token (every patch is a token), and when the
unpadded grid is larger than `anyres_max_N` tiles (N = 9: by more than 10%) the model downsamples it bilinearly.
The downsampled grid covers the same part of the image, so a region keeps the cells whose centres it holds, as
on any grid; its cells no longer map one to one onto vision patches, which only VisionZip would need (it also
needs a CLS token, so it is refused). A prompt with several images (one newline after each single-crop grid) is
refused, as in every family: one image per prompt.
"""

from __future__ import annotations

from typing import Any

from transformers import LlavaOnevisionProcessor

from crop.adapter import VisionCrops, register, register_processor
from crop.errors import UnsupportedModelError
from crop.models.llava_next import LlavaNextAdapter, NextTokenLayout, token_layout


@register("LlavaOnevisionForConditionalGeneration")
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-NeXT's grids with SigLIP's patches (no CLS) and the high-res grid downsampled above anyres-max."""

    family = "llava-onevision"

    @property
    def max_tiles(self) -> int:
        """N of the model's `anyres_max_N`."""
        ratio = self.model.config.vision_aspect_ratio
        if not ratio.startswith("anyres_max_"):
            raise UnsupportedModelError(f"llava-onevision: vision_aspect_ratio {ratio!r} is not anyres_max_N")
        return int(ratio.removeprefix("anyres_max_"))

    def token_layout(self, image_size: tuple[int, int]) -> NextTokenLayout:
        return token_layout(self.model.config, None, image_size, strategy="full", max_tiles=self.max_tiles)

    def feature_options(self) -> dict[str, Any]:
        """The model packs the placeholders with its anyres-max downsampling."""
        return {"vision_aspect_ratio": self.model.config.vision_aspect_ratio}

    def vision_crops(self, inputs: dict[str, Any]) -> list[VisionCrops]:
        raise UnsupportedModelError(
            f"VisionZip is not supported for {self.family}: it ranks patches by the vision tower's CLS attention and "
            "SigLIP has no CLS token; use divprune, pool, random or an in-LLM method"
        )


@register_processor
class LlavaOnevisionImageTextProcessor(LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor` without the video processor slot (which needs torchvision): images and text."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, **kwargs):  # fmt: skip
        super().__init__(
            image_processor, tokenizer, num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template, **kwargs,
        )  # fmt: skip

"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

Each image becomes a grid whose size depends on the image: the processor resizes it (keeping its aspect ratio, to
multiples of patch x merge pixels), the vision tower merges 2x2 patches, and the LLM gets `(h/2) x (w/2)` tokens in
raster order (`image_grid_thw` holds `(1, h, w)` in patches per image). Positions are 3-D (M-RoPE: temporal,
height, width); the text model turns them into rotary `(cos, sin)` of shape `(batch, length, head_dim)` and passes
the text positions to the layers, so ILP gathers both exactly as for LLaVA: kept tokens keep the positions they had,
and decoding continues from them (`rope_deltas` is computed by the model from the unpruned prompt).
Methods that replace the grid before the LLM (PLC, pooling, ILP at K = 0) splice the new tokens into the prompt and
pass 3-D positions explicitly: each new token takes the 3-D position of the prompt token it stands for (a pooled
window: its first cell; a learned query: the first cell of its part), the text after the image keeps its own, and
the text row of the positions numbers the new prompt consecutively. `generate` then continues every row by +1 a
step, which is where the unpruned prompt's decoding continues too. VisionZip needs a CLS token, which this vision
tower does not have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

from crop.adapter import ModelAdapter, VisionCrops, VisualLayout, register, register_processor
from crop.errors import ConfigError, UnsupportedModelError
from crop.region import Viewport


@register("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
class Qwen2VLAdapter(ModelAdapter):
    """Visual tokens: one `(h/merge) x (w/merge)` raster grid per image, sized by `image_grid_thw`."""

    family = "qwen2-vl"

    def visual_layout(self) -> VisualLayout | None:
        return None

    def visual_layouts(self, inputs: dict[str, Any]) -> list[VisualLayout]:
        grids = inputs.get("image_grid_thw")
        batch = inputs["input_ids"].shape[0]
        if grids is None:
            raise ConfigError("Qwen2-VL inputs need image_grid_thw (pass the processor's whole output)")
        if grids.shape[0] != batch:
            raise ConfigError(
                f"{grids.shape[0]} images for {batch} prompts: crop supports exactly one image per prompt"
            )
        merge = self.model.config.vision_config.spatial_merge_size
        layouts = []
        for frames, height, width in grids.tolist():
            if frames != 1:
                raise UnsupportedModelError("video inputs are not supported: one still image per prompt")
            layouts.append(VisualLayout(rows=height // merge, cols=width // merge))
        return layouts

    def viewport(self, processor: Any, image_size: tuple[int, int]) -> Viewport:
        """The resize keeps the aspect ratio (up to rounding to whole patches) and crops nothing: the grid shows
        the whole image."""
        return Viewport()

    def image_features(self, inputs: dict[str, Any]) -> list[torch.Tensor]:
        grids = inputs.get("image_grid_thw")
        if grids is None:
            raise ConfigError("Qwen2-VL inputs need image_grid_thw (pass the processor's whole output)")
        vision = self.model.model.visual
        output = self.model.model.get_image_features(inputs["pixel_values"].to(vision.dtype), grids, return_dict=True)
        return list(output.pooler_output)

    def vision_crops(self, inputs: dict[str, Any]) -> list[VisionCrops]:
        raise UnsupportedModelError(
            f"VisionZip is not supported for {self.family}: it ranks patches by the vision tower's CLS attention "
            "and this tower has no CLS token (its patches are merged 2x2 after the last block); use pool, random, "
            "fastv, pyramiddrop, sparsevlm or crop"
        )

    def renumbering_rotary(self) -> Any:
        raise UnsupportedModelError(
            f"{self.family}: renumbered positions inside the LLM (the authors' PyramidDrop and SparseVLM, written "
            "for LLaVA's 1-D positions) have no defined meaning for 3-D M-RoPE positions; use the method's default "
            "positions='original'"
        )

    def spliced_inputs(
        self,
        original: dict[str, Any],
        spliced: dict[str, Any],
        source: torch.Tensor,
        position: str,
        side: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """3-D positions gathered from the unpruned prompt's (whatever `position` says: they carry the image
        geometry); the image's grid sizes and token types describe the new prompt, so the model does not
        recompute positions from them."""
        if original.get("mm_token_type_ids") is None:
            raise ConfigError("Qwen2-VL inputs need mm_token_type_ids (pass the processor's whole output)")
        mask = original["attention_mask"].bool()
        rope, _ = self.model.model.get_rope_index(
            original["input_ids"],
            image_grid_thw=original["image_grid_thw"],
            attention_mask=original["attention_mask"],
            mm_token_type_ids=original["mm_token_type_ids"],
        )
        new_mask = spliced["attention_mask"]
        positions = torch.zeros((4, *new_mask.shape), dtype=torch.long, device=new_mask.device)
        positions[0] = (new_mask.long().cumsum(-1) - 1).clamp(min=0)
        for row in range(new_mask.shape[0]):
            real = new_mask[row].bool()
            unpadded = rope[:, row, mask[row]]
            positions[1:, row, real] = unpadded[:, source[row, real]].to(positions.device)
        spliced["position_ids"] = positions
        spliced.pop("image_grid_thw", None)
        token_types = original["mm_token_type_ids"]
        spliced["mm_token_type_ids"] = (spliced["input_ids"] == self.image_token_id).to(token_types.dtype)
        return spliced


@register_processor
class Qwen2VLImageTextProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without the video processor slot (which needs torchvision): images and text only. A
    checkpoint saved with it loads through `crop.loading.load_model` (crop's tiny test models are)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


@register_processor
class Qwen2_5_VLImageTextProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without the video processor slot (which needs torchvision): images and text only."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

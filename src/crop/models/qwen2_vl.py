"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

Each image becomes a grid whose size depends on the image: the processor resizes it (keeping its aspect ratio, to
multiples of patch x merge pixels), the vision tower merges 2x2 patches, and the LLM gets `(h/2) x (w/2)` tokens in
raster order (`image_grid_thw` holds `(1, h, w)` in patches per image). Positions are 3-D (M-RoPE: temporal,
height, width); the text model turns them into rotary `(cos, sin)` of shape `(batch, length, head_dim)` and passes
the text positions to the layers, so ILP gathers both exactly as for LLaVA: kept tokens keep the positions they had,
and decoding continues from them (`rope_deltas` is computed by the model from the unpruned prompt).
Methods that replace the grid before the LLM (PLC, pooling, VisionZip, K=0) would need new 3-D positions for the
spliced tokens: not supported yet.
"""

from __future__ import annotations

from typing import Any

from crop.errors import ConfigError, UnsupportedModelError
from crop.models.base import ModelAdapter, VisualLayout
from crop.region import Viewport


class Qwen2VLAdapter(ModelAdapter):
    """Visual tokens: one `(h/merge) x (w/merge)` raster grid per image, sized by `image_grid_thw`."""

    family = "qwen2-vl"
    supports_pre_llm = False

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

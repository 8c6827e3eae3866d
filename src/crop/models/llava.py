"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one square grid of CLIP patches per image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from crop.adapter import ModelAdapter, VisionCrops, VisionInternals, VisualLayout, register
from crop.errors import UnsupportedModelError
from crop.region import Viewport


@register("LlavaForConditionalGeneration")
class LlavaAdapter(ModelAdapter):
    """Visual tokens: `(image_size / patch_size)^2` patches in raster order (plus CLS with strategy `full`)."""

    family = "llava"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if not isinstance(self.model.config.vision_config.image_size, int):
            raise UnsupportedModelError("LLaVA adapter expects a square vision tower (integer image_size)")

    def visual_layout(self) -> VisualLayout:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        leading = 1 if self.model.config.vision_feature_select_strategy == "full" else 0
        return VisualLayout(rows=side, cols=side, leading=leading)

    def viewport(self, processor: Any, image_size: tuple[int, int]) -> Viewport:
        return llava_viewport(processor, image_size)

    def viewport_varies(self, processor: Any) -> bool:
        """The processor center-crops or pads each image by its size (unknown without one: assume it does)."""
        image_processor = getattr(processor, "image_processor", processor)
        return processor is None or any(getattr(image_processor, flag, False) for flag in ("do_pad", "do_center_crop"))

    def image_features(self, inputs: dict[str, Any]) -> list[torch.Tensor]:
        config = self.model.config
        output = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"].to(self.model.dtype),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
        )
        return list(output.pooler_output)

    def features_from_vision(self, crops: Sequence[VisionCrops]) -> list[torch.Tensor]:
        """The feature layer's patch states (CLS dropped, as the 'default' strategy `clip_internals` requires)
        through the projector: what `image_features` computes, without running the tower again."""
        return [self.project(crop.internals.hidden[0, 1:]) for crop in crops]

    def vision_crops(self, inputs: dict[str, Any]) -> list[VisionCrops]:
        internals = clip_internals(self.model, inputs["pixel_values"])
        patches = internals.cls_attention.shape[1]
        cells = torch.arange(patches)[None]
        return [VisionCrops(internals.crops(b, b + 1), cells, cells) for b in range(internals.hidden.shape[0])]

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(hidden)

    def vision_head(self, hidden: torch.Tensor) -> torch.Tensor:
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower).post_layernorm(hidden)


def llava_viewport(processor: Any, image_size: tuple[int, int]) -> Viewport:
    """Where an image of `(width, height)` lands on LLaVA's grid: its processor pads it to a square or
    center-crops it (resize shortest edge, then crop), or fills the grid."""
    width, height = image_size
    image_processor = getattr(processor, "image_processor", processor)
    if getattr(image_processor, "do_pad", False):
        return Viewport.pad_to_square(width, height)
    if getattr(image_processor, "do_center_crop", False):
        return Viewport.center_crop(width, height)
    return Viewport()


def clip_internals(model: nn.Module, pixel_values: torch.Tensor) -> VisionInternals:
    """A LLaVA-family CLIP tower's feature layer on `pixel_values` `(crops, C, H, W)`: its output states, the CLS
    query's attention to the patches (summed over heads) and the keys (averaged over heads), from that layer's
    own projections (the tower keeps its attention backend)."""
    config = model.config
    if not isinstance(config.vision_feature_layer, int) or config.vision_feature_select_strategy != "default":
        raise UnsupportedModelError(
            "VisionZip needs one vision feature layer and the 'default' feature strategy (CLS not in the grid)"
        )
    tower = model.model.vision_tower
    encoder = getattr(tower, "vision_model", tower).encoder  # transformers 5 flattened CLIPVisionModel
    layers = encoder.layers
    feature_layer = config.vision_feature_layer
    index = len(layers) + feature_layer if feature_layer < 0 else feature_layer - 1
    captured: dict[str, torch.Tensor] = {}

    def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured["input"] = args[0] if args else kwargs["hidden_states"]

    handle = layers[index].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        output = tower(pixel_values.to(model.dtype), output_hidden_states=True)
    finally:
        handle.remove()
    attention = layers[index].self_attn
    normed = layers[index].layer_norm1(captured["input"])
    batch, length, _ = normed.shape
    query = attention.q_proj(normed[:, :1]).view(batch, 1, attention.num_heads, -1).transpose(1, 2)
    keys = attention.k_proj(normed).view(batch, length, attention.num_heads, -1).transpose(1, 2)
    probabilities = ((query @ keys.transpose(-1, -2)) * attention.scale).float().softmax(-1)
    return VisionInternals(
        hidden=output.hidden_states[feature_layer],
        cls_attention=probabilities[:, :, 0, 1:].sum(1),
        keys=keys.mean(1),
        heads=attention.num_heads,
    )

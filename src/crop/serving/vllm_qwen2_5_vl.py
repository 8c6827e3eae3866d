"""Qwen2.5-VL in vLLM with crop's pre-LLM pruning: `CropQwen2_5_VLForConditionalGeneration`, vLLM's own model with
three changes. The processor reserves as many placeholders per image as the method will keep; `embed_multimodal`
returns those tokens, chosen from the merged visual tokens; and the M-RoPE positions are crop's: each kept token
takes the 3-D position of the cell it stands for (a pooled window: its first cell), the text keeps the positions it
has in the unpruned prompt, and decoding continues from there.

vLLM fixes a prompt's M-RoPE positions before the encoder runs (its video-pruning path alone recomputes them
after), so the plugin computes them from the geometry: the methods whose kept cells follow from the grid, the
region, the budget and the seed (`pool`, `random`, `crop`) run here; DivPrune, whose cells depend on the features,
is refused on this family. Images only: a video input is refused.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec

from crop.adapter import VisualLayout
from crop.errors import ConfigError, UnsupportedModelError
from crop.serving.pruning import FeaturePruner
from crop.serving.vllm_common import BOX_FIELD, RegionProcessorMixin, pruner_for, region_of_box

ARCHITECTURE = "CropQwen2_5_VLForConditionalGeneration"
FEATURE_DEPENDENT = ("divprune",)
"""Methods whose kept cells depend on the features: their positions are not known before the encoder runs."""


def qwen_pruner(config) -> FeaturePruner:
    """The config's pruner, refusing methods whose positions vLLM could not place."""
    pruner = pruner_for(config)
    if pruner.settings.method in FEATURE_DEPENDENT:
        raise ConfigError(
            f"{pruner.settings.method} on Qwen2.5-VL in vLLM: its kept cells depend on the features, and vLLM fixes "
            "the M-RoPE positions of a prompt before the encoder runs; use pool, random or crop"
        )
    return pruner


def grid_layout(grid_thw: torch.Tensor, merge: int) -> VisualLayout:
    """One image's merged token grid from its `image_grid_thw` (1, h, w) in patches."""
    t, h, w = (int(v) for v in grid_thw.reshape(-1))
    if t != 1:
        raise UnsupportedModelError(f"crop's vLLM plugin prunes images, not videos (got {t} frames)")
    return VisualLayout(rows=h // merge, cols=w // merge)


class CropQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    @cached_property
    def pruner(self) -> FeaturePruner:
        return qwen_pruner(self.get_hf_config())

    @property
    def merge(self) -> int:
        return self.get_hf_config().vision_config.spatial_merge_size

    def get_max_image_tokens(self) -> int:
        """vLLM's count (the largest unpruned grid), asked when the engine starts: bad settings, and a budget above
        any image's tokens, fail there."""
        tokens = super().get_max_image_tokens()
        self.pruner.check_tokens(tokens)
        return tokens


class CropQwen2_5_VLMultiModalProcessor(RegionProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's processor, with the request's region passed to the model and the pruned count of placeholders."""

    def image_layouts(self, processed: BatchFeature) -> list[VisualLayout]:
        if "pixel_values_videos" in processed:
            raise UnsupportedModelError("crop's vLLM plugin prunes images, not videos: send images only")
        grids = processed.get("image_grid_thw")
        return [] if grids is None else [grid_layout(grid, self.info.merge) for grid in grids]

    def item_layout(self, item) -> VisualLayout:
        return grid_layout(item["image_grid_thw"].data, self.info.merge)

    def image_token_id(self) -> int:
        return self.info.get_tokenizer().get_vocab()[self.info.get_hf_processor().image_token]


@MULTIMODAL_REGISTRY.register_processor(
    CropQwen2_5_VLMultiModalProcessor, info=CropQwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class CropQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL whose image embeddings are the tokens crop's method keeps, at crop's positions."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.is_multimodal_pruning_enabled:
            raise ConfigError("crop's Qwen2.5-VL architecture prunes images itself: leave video_pruning_rate unset")
        self.pruner = qwen_pruner(vllm_config.model_config.hf_config)
        self.merge = self.config.vision_config.spatial_merge_size

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        if kwargs.get("pixel_values_videos") is not None or kwargs.get("video_embeds") is not None:
            raise UnsupportedModelError("crop's vLLM plugin prunes images, not videos")
        boxes = kwargs.pop(BOX_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        embeddings = self._process_image_input(image_input)
        grids = image_input["image_grid_thw"]
        return tuple(
            self.pruner.reduce(image, grid_layout(grid, self.merge), region_of_box(box))
            for image, grid, box in zip(embeddings, grids, boxes, strict=True)
        )

    def kept_cells(self, feature: MultiModalFeatureSpec) -> torch.Tensor:
        """The raster cells (first cells of pooled windows) of the tokens one image keeps, in prompt order."""
        layout = grid_layout(feature.data["image_grid_thw"].data, self.merge)
        return self.pruner.cells(layout, region_of_box(feature.data[BOX_FIELD].data))

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        """The unpruned prompt's positions, gathered at the tokens the pruned prompt holds (crop's rule): the text
        after an image continues from the unpruned image's last position, whichever cells were kept."""
        parts: list[np.ndarray] = []
        start, next_position = 0, 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality != "image":
                raise UnsupportedModelError("crop's vLLM plugin prunes images, not videos")
            text = feature.mm_position.offset - start
            parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
            layout = grid_layout(feature.data["image_grid_thw"].data, self.merge)
            grid = np.indices((1, layout.rows, layout.cols)).reshape(3, -1) + next_position + text
            cells = self.kept_cells(feature).numpy()
            parts.append(grid[:, cells])
            next_position = int(grid.max()) + 1
            start = feature.mm_position.offset + len(cells)
        text = len(input_tokens) - start
        parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
        positions = np.concatenate(parts, axis=1)
        return torch.from_numpy(positions), int(positions.max() + 1 - len(input_tokens))

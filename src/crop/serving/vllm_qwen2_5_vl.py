"""Qwen2.5-VL in vLLM with crop's pre-LLM pruning: `CropQwen2_5_VLForConditionalGeneration`, vLLM's own model with
three changes. The processor reserves as many placeholders per image as the method will keep; `embed_multimodal`
returns those tokens, chosen from the merged visual tokens; and the M-RoPE positions are crop's: each kept token
takes the 3-D position of the cell it stands for (a pooled window: its first cell), the text keeps the positions it
has in the unpruned prompt, and decoding continues from there.

vLLM fixes a prompt's M-RoPE positions before the encoder runs, so by default the plugin computes them from the
geometry: the methods whose kept cells follow from the grid, the region, the budget and the seed (`pool`, `random`,
`crop`). DivPrune's cells depend on the features: it runs through vLLM's multimodal-pruning contract, which vLLM
switches on with its video-pruning setting (`video_pruning_rate`): `embed_multimodal` then appends each kept
token's cell to its embedding, and `recompute_mrope_positions` places the token there after the encoder ran (as
EVS does for video). Images only: a video input is refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cached_property

import numpy as np
import torch
from transformers import BatchFeature
from vllm.config import MultiModalConfig, VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec
from vllm.platforms import current_platform

from crop.adapter import VisualLayout
from crop.errors import ConfigError, UnsupportedModelError
from crop.serving.pruning import FeaturePruner
from crop.serving.vllm_common import BOX_FIELD, RegionProcessorMixin, pruner_for, region_of_box

ARCHITECTURE = "CropQwen2_5_VLForConditionalGeneration"
FEATURE_DEPENDENT = ("divprune",)
"""Methods whose kept cells depend on the features: their positions are known only after the encoder ran."""
CELL_DIGIT = 128
"""Each kept token's cell rides in 4 extra embedding channels (row and column, two base-128 digits each): integers
below 256 are exact in bfloat16, so grids up to 16384 on a side survive any dtype."""


RUNNER_PLACES_POSITIONS = "CROP_VLLM_CPU_RUNNER_PLACES_POSITIONS"
"""Set to 1 where a CPU runner does call `recompute_mrope_positions` (vLLM's own does not; the tests make it)."""


def positions_after_encoder(mm_config: MultiModalConfig) -> bool:
    """Whether vLLM's runner will place positions after the encoder (`recompute_mrope_positions`): with its
    multimodal pruning on, on runners that call it (vLLM 0.32's CPU runner never does: its `load_model` leaves
    at False the flag that the GPU runner's sets)."""
    calls_it = not current_platform.is_cpu() or os.environ.get(RUNNER_PLACES_POSITIONS) == "1"
    return mm_config.is_multimodal_pruning_enabled() and calls_it


def qwen_pruner(config, after_encoder: bool) -> FeaturePruner:
    """The config's pruner, refusing methods whose positions vLLM could not place: those that depend on the
    features need positions placed after the encoder (`after_encoder`)."""
    pruner = pruner_for(config)
    if pruner.settings.method in FEATURE_DEPENDENT and not after_encoder:
        where = (
            "vLLM's CPU runner (0.32) never calls recompute_mrope_positions, so on CPU it cannot run: use a GPU"
            if current_platform.is_cpu()
            else "start the engine with video_pruning_rate set (LLM(..., video_pruning_rate=0.5) or "
            "--video-pruning-rate 0.5; crop refuses videos, so the rate prunes nothing)"
        )
        raise ConfigError(
            f"{pruner.settings.method} on Qwen2.5-VL in vLLM: its kept cells depend on the features, and vLLM "
            f"places M-RoPE positions after the encoder only with its multimodal pruning on; {where}. Or use pool, "
            "random or crop, whose positions follow from the geometry"
        )
    return pruner


def encode_cells(cells: torch.Tensor, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """`(kept, 4)`: each cell's row and column as two base-`CELL_DIGIT` digits, in `dtype`."""
    rows, columns = cells // cols, cells % cols
    digits = [rows // CELL_DIGIT, rows % CELL_DIGIT, columns // CELL_DIGIT, columns % CELL_DIGIT]
    return torch.stack(digits, dim=1).to(dtype)


def decode_cells(channels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode_cells`'s rows and columns back from its `(kept, 4)` channels."""
    digits = channels.round().long()
    return digits[:, 0] * CELL_DIGIT + digits[:, 1], digits[:, 2] * CELL_DIGIT + digits[:, 3]


def grid_layout(grid_thw: torch.Tensor, merge: int) -> VisualLayout:
    """One image's merged token grid from its `image_grid_thw` (1, h, w) in patches."""
    t, h, w = (int(v) for v in grid_thw.reshape(-1))
    if t != 1:
        raise UnsupportedModelError(f"crop's vLLM plugin prunes images, not videos (got {t} frames)")
    return VisualLayout(rows=h // merge, cols=w // merge)


class CropQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    @cached_property
    def pruner(self) -> FeaturePruner:
        return qwen_pruner(self.get_hf_config(), positions_after_encoder(self.ctx.get_mm_config()))

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
        self.positions_after_encoder = positions_after_encoder(self.multimodal_config)
        self.pruner = qwen_pruner(vllm_config.model_config.hf_config, self.positions_after_encoder)
        self.merge = self.config.vision_config.spatial_merge_size

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """The kept tokens of each image; with positions placed after the encoder, each followed by its cell's 4
        channels, which `recompute_mrope_positions` reads and strips."""
        if kwargs.get("pixel_values_videos") is not None or kwargs.get("video_embeds") is not None:
            raise UnsupportedModelError("crop's vLLM plugin prunes images, not videos")
        boxes = kwargs.pop(BOX_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        embeddings = self._process_image_input(image_input)
        grids = image_input["image_grid_thw"]
        kept = []
        for image, grid, box in zip(embeddings, grids, boxes, strict=True):
            layout = grid_layout(grid, self.merge)
            region, viewport = region_of_box(box)
            tokens, cells = self.pruner.reduce_with_cells(image, layout, region, viewport=viewport)
            if self.positions_after_encoder:
                tokens = torch.cat([tokens, encode_cells(cells.to(tokens.device), layout.cols, tokens.dtype)], dim=1)
            kept.append(tokens)
        return tuple(kept)

    def kept_cells(self, feature: MultiModalFeatureSpec) -> torch.Tensor:
        """The raster cells (first cells of pooled windows) of the tokens one image keeps, in prompt order; with
        positions placed after the encoder, the image's first cell for each (`place_after_encoder` moves them)."""
        layout = grid_layout(feature.data["image_grid_thw"].data, self.merge)
        region, viewport = region_of_box(feature.data[BOX_FIELD].data)
        if self.positions_after_encoder:
            return torch.zeros(self.pruner.count(layout, region, viewport), dtype=torch.long)
        return self.pruner.cells(layout, region, viewport)

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        images = []
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality != "image":
                raise UnsupportedModelError("crop's vLLM plugin prunes images, not videos")
            layout = grid_layout(feature.data["image_grid_thw"].data, self.merge)
            images.append((feature.mm_position.offset, layout, self.kept_cells(feature)))
        return prompt_positions(len(input_tokens), images)

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.Tensor,
        num_computed_tokens: int,
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=mrope_positions.device)
        return place_after_encoder(
            ids, multimodal_embeddings, mrope_positions, num_computed_tokens, self.config.image_token_id
        )


def prompt_positions(length: int, images: list[tuple[int, VisualLayout, torch.Tensor]]) -> tuple[torch.Tensor, int]:
    """`(3, length)` M-RoPE positions of a pruned prompt and their delta, by crop's rule: the unpruned prompt's
    positions gathered at the tokens it holds. `images`: per image in prompt order, its first placeholder's
    offset, its grid and the cell of each kept token; the text after an image continues from the unpruned
    image's last position, whichever cells were kept."""
    parts: list[np.ndarray] = []
    start, next_position = 0, 0
    for offset, layout, cells in images:
        text = offset - start
        parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
        grid = np.indices((1, layout.rows, layout.cols)).reshape(3, -1) + next_position + text
        parts.append(grid[:, cells.numpy()])
        next_position = int(grid.max()) + 1
        start = offset + len(cells)
    text = length - start
    parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
    positions = np.concatenate(parts, axis=1)
    return torch.from_numpy(positions), int(positions.max() + 1 - length)


def place_after_encoder(
    ids: torch.Tensor,
    embeddings: Sequence[torch.Tensor],
    positions: torch.Tensor,
    computed: int,
    image_token_id: int,
) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """vLLM's `recompute_mrope_positions` for crop's tokens: the image tokens these embeddings fill (the first
    image tokens from `computed` on: a prefill chunk may hold part of an image) go to their image's first cell
    position (their temporal one, which pruning leaves alone) plus their cell's row and column, read from the
    embeddings' 4 cell channels; returns the embeddings without them, the positions and the (unchanged) delta."""
    stripped = [embedding[:, :-4] for embedding in embeddings]
    positions = positions.clone()
    if embeddings:
        index = torch.arange(ids.numel(), device=ids.device)
        channels = torch.cat([embedding[:, -4:] for embedding in embeddings])
        targets = index[(ids == image_token_id) & (index >= computed)][: len(channels)]
        rows, cols = decode_cells(channels.to(positions.device))
        base = positions[0, targets]
        positions[:, targets] = torch.stack([base, base + rows, base + cols])
    return stripped, positions, int(positions.max() + 1 - ids.numel())

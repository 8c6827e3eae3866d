"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): any-resolution tiles, a base grid and a high-res grid.

An image's placeholders hold, in order: the base grid (the whole image resized, not padded, to the vision tower's
square input; no newlines), then the high-resolution grid (the tiles of the best-fitting pinpoint resolution,
stitched and unpadded by the model) in raster order, with one `image_newline` embedding after each of its rows.
`input_ids` cannot tell the newlines from patch tokens: only this layout can. The adapter hands the core both grids
with their viewports; a region keeps the base-grid and high-res tokens whose cell centres it holds, and a newline
stays when its row keeps a token. Methods that need one 2-D grid run on each grid (`crop.strategies.grids`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from crop.adapter import SEPARATOR, ModelAdapter, VisionCrops, VisualLayout, register
from crop.errors import ConfigError, UnsupportedModelError
from crop.models.llava import clip_internals
from crop.region import Viewport

BASE, HIGH, NEWLINE = 0, 1, SEPARATOR
"""Grid ids in `NextTokenLayout.cells`."""


@dataclass(frozen=True, eq=False)
class NextTokenLayout:
    """One image's placeholder tokens: a base grid, then the unpadded high-res grid with a newline after each row.

    `cells[i] = (grid, row, col)` for placeholder i (0-based, in input order): `grid` is `BASE` or `HIGH` with the
    cell's row and column in that grid, or `NEWLINE` with the high-res row it ends and col -1. `tiles` is the tile
    grid (rows, cols) of the chosen pinpoint resolution and `high_offset` the (row, col) of the unpadded grid's
    first cell in the stitched tiles' feature grid (`tiles * base_grid` cells). The viewports say where the image's
    unit square lands in each grid's unit square (see `crop.region.Viewport`).
    """

    base_grid: tuple[int, int]
    high_grid: tuple[int, int]
    tiles: tuple[int, int]
    high_offset: tuple[int, int]
    base_viewport: Viewport
    high_viewport: Viewport
    cells: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """How many placeholder tokens the image takes (what the processor inserts)."""
        return int(self.cells.shape[0])

    @property
    def newline_positions(self) -> torch.Tensor:
        """Placeholder positions holding `image_newline` (one per high-res row, after its last cell)."""
        return self.grid_positions(NEWLINE)

    def grid_positions(self, grid: int) -> torch.Tensor:
        """Placeholder positions of grid `grid` (`BASE`, `HIGH` or `NEWLINE`), in raster order."""
        return torch.nonzero(self.cells[:, 0] == grid).flatten()


def token_layout(
    config: Any,
    processor_or_image_processor: Any,
    image_size: tuple[int, int],
    strategy: str = "default",
    max_tiles: int | None = None,
) -> NextTokenLayout:
    """The placeholder layout of an image of `(width, height)` pixels, for a LLaVA-NeXT config and its processor
    (None: assume the processor agrees with the config, as checked by `check_processor`). `strategy` is the vision
    feature strategy the family's tower needs (`default` drops CLIP's CLS token); with `max_tiles` (LLaVA-OneVision's
    anyres-max), an unpadded high-res grid larger than that many tiles (by more than 10%) is downsampled, as the
    model interpolates it: its cells then cover the same part of the image, each mixing several patches."""
    width, height = image_size
    if config.vision_feature_select_strategy != strategy:
        raise UnsupportedModelError(
            f"this layout supports vision_feature_select_strategy {strategy!r} only, got "
            f"{config.vision_feature_select_strategy!r}"
        )
    vision = config.vision_config
    tile, patch = vision.image_size, vision.patch_size
    if not isinstance(tile, int) or tile % patch:
        raise UnsupportedModelError(f"LLaVA-NeXT layout needs a square tower input divisible by patch {patch}")
    if processor_or_image_processor is not None:
        check_processor(config, processor_or_image_processor)
    side = tile // patch

    # The model's own geometry: tiles of the best pinpoint resolution, then unpadding of the stitched feature grid.
    tile_rows, tile_cols = get_anyres_image_grid_shape((height, width), config.image_grid_pinpoints, tile)
    stitched = torch.arange(tile_rows * side * tile_cols * side).view(1, tile_rows * side, tile_cols * side)
    kept = unpad_image(stitched, (height, width))[0]
    rows, cols = kept.shape
    top, left = divmod(int(kept[0, 0]), tile_cols * side)
    unpadded_rows, unpadded_cols = rows, cols
    if max_tiles is not None:
        ratio = math.sqrt(rows * cols / (max_tiles * side**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)

    # The processor's: the image resized to fit the pinpoint resolution, then centred on it (LLaVA-NeXT pads).
    canvas_h, canvas_w = tile_rows * tile, tile_cols * tile
    fit_h, fit_w = _fit_size(height, width, canvas_h, canvas_w)
    paste_y, paste_x = (canvas_h - fit_h) // 2, (canvas_w - fit_w) // 2
    x0, y0, span_w, span_h = left * patch, top * patch, unpadded_cols * patch, unpadded_rows * patch
    high_viewport = Viewport(
        left=(paste_x - x0) / span_w,
        top=(paste_y - y0) / span_h,
        right=(paste_x + fit_w - x0) / span_w,
        bottom=(paste_y + fit_h - y0) / span_h,
    )

    base_rows, base_cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    base = torch.stack([torch.full_like(base_rows, BASE), base_rows, base_cols], dim=-1).view(-1, 3)
    high_rows, high_cols = torch.meshgrid(torch.arange(rows), torch.arange(cols + 1), indexing="ij")
    is_cell = high_cols < cols
    grid_ids = torch.where(is_cell, HIGH, NEWLINE)
    high = torch.stack([grid_ids, high_rows, torch.where(is_cell, high_cols, -1)], dim=-1).view(-1, 3)
    return NextTokenLayout(
        base_grid=(side, side),
        high_grid=(rows, cols),
        tiles=(tile_rows, tile_cols),
        high_offset=(top, left),
        base_viewport=Viewport(),
        high_viewport=high_viewport,
        cells=torch.cat([base, high]),
    )


def check_processor(config: Any, processor: Any) -> None:
    """Raise unless the processor squashes the base image to the tower's square and cuts tiles of that size."""
    image_processor = getattr(processor, "image_processor", processor)
    tile = config.vision_config.image_size
    size, crop = image_processor.size, image_processor.crop_size
    base = (size.height, size.width) if size.height and size.width else (size.shortest_edge, size.shortest_edge)
    tile_pixels = crop.height if crop and crop.height else base[0]
    cropped = (crop.height, crop.width) if getattr(image_processor, "do_center_crop", False) else base
    if base != (tile, tile) or tile_pixels != tile or cropped != (tile, tile):
        raise UnsupportedModelError(
            f"LLaVA-NeXT layout expects the processor to resize and crop to the tower's {tile}x{tile} input, got "
            f"size {base} and crop {cropped}"
        )
    processor_pinpoints = [list(map(int, p)) for p in image_processor.image_grid_pinpoints]
    model_pinpoints = [list(map(int, p)) for p in config.image_grid_pinpoints]
    if processor_pinpoints != model_pinpoints or any(side % tile for p in model_pinpoints for side in p):
        raise UnsupportedModelError(
            f"LLaVA-NeXT layout needs the processor's and the model's pinpoints to agree and to be multiples of "
            f"{tile}: processor {processor_pinpoints}, model {model_pinpoints}"
        )


def _fit_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """The processor's resize before padding (transformers' `get_patch_output_size`): fit, keep aspect ratio."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


@register("LlavaNextForConditionalGeneration")
class LlavaNextAdapter(ModelAdapter):
    """Visual tokens per image: a base grid then the unpadded high-res grid with a newline after each row."""

    family = "llava-next"

    def visual_layout(self) -> VisualLayout | None:
        return None

    def visual_layouts(self, inputs: dict[str, Any]) -> list[VisualLayout]:
        sizes = inputs.get("image_sizes")
        batch = inputs["input_ids"].shape[0]
        if sizes is None:
            raise ConfigError("LLaVA-NeXT inputs need image_sizes (pass the processor's whole output)")
        if sizes.shape[0] != batch:
            raise ConfigError(f"{sizes.shape[0]} images for {batch} prompts: crop supports one image per prompt")
        layouts = []
        for height, width in sizes.tolist():
            layout = self.token_layout((int(width), int(height)))
            layouts.append(
                VisualLayout(
                    rows=1,
                    cols=layout.num_tokens,
                    cells=layout.cells,
                    grids=(layout.base_grid, layout.high_grid),
                    grid_viewports=(layout.base_viewport, layout.high_viewport),
                )
            )
        return layouts

    def token_layout(self, image_size: tuple[int, int]) -> NextTokenLayout:
        """The placeholder layout of an image of `(width, height)` pixels."""
        return token_layout(self.model.config, None, image_size)

    def viewport(self, processor: Any, image_size: tuple[int, int]) -> Viewport:
        """Unused: each of the image's grids carries its own viewport (`VisualLayout.grid_viewports`)."""
        if processor is not None:
            check_processor(self.model.config, processor)
        return Viewport()

    def image_features(self, inputs: dict[str, Any]) -> list[torch.Tensor]:
        """Each image's placeholder features as the model packs them: base grid, high-res grid and newlines."""
        config = self.model.config
        output = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"].to(self.model.dtype),
            image_sizes=inputs["image_sizes"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
            **self.feature_options(),
        )
        return list(output.pooler_output)

    def feature_options(self) -> dict[str, Any]:
        """Extra arguments of the model's `get_image_features` a family sharing this layout needs (none here)."""
        return {}

    def vision_crops(self, inputs: dict[str, Any]) -> list[VisionCrops]:
        """The base image and the tiles of each image, as the tower saw them (the processor pads the batch's
        tile lists to one length; only the real ones are run)."""
        config = self.model.config
        pixel_values, sizes = inputs["pixel_values"], inputs["image_sizes"].tolist()
        counts = [
            image_size_to_num_patches(
                image_size=(height, width),
                grid_pinpoints=config.image_grid_pinpoints,
                patch_size=config.vision_config.image_size,
            )
            for height, width in sizes
        ]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pixel_values[b, :count] for b, count in enumerate(counts)])
        internals = clip_internals(self.model, pixel_values)
        crops, start = [], 0
        for (height, width), count in zip(sizes, counts, strict=True):
            layout = self.token_layout((int(width), int(height)))
            cell, order = _crop_cells(layout, count)
            crops.append(VisionCrops(internals.crops(start, start + count), cell, order))
            start += count
        return crops

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(hidden)


def _crop_cells(layout: NextTokenLayout, crops: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per crop and patch: the placeholder it stands for (-1 for tile patches unpadding removed) and its raster
    rank in the stitched tiles. Crop 0 is the base image (its grid comes first in the placeholders)."""
    side = layout.base_grid[0]
    tile_rows, tile_cols = layout.tiles
    if crops != 1 + tile_rows * tile_cols:
        raise ConfigError(f"LLaVA-NeXT image with {crops} crops, expected 1 + {tile_rows}x{tile_cols} tiles")
    rows, cols = layout.high_grid
    top, left = layout.high_offset
    patch, tile = torch.arange(side * side), torch.arange(crops - 1)
    patch_row, patch_col = patch // side, patch % side
    tile_row, tile_col = tile // tile_cols, tile % tile_cols
    stitched_row = (tile_row[:, None] * side + patch_row[None]) - top
    stitched_col = (tile_col[:, None] * side + patch_col[None]) - left
    order = (stitched_row + top) * (tile_cols * side) + stitched_col + left
    kept = (stitched_row >= 0) & (stitched_row < rows) & (stitched_col >= 0) & (stitched_col < cols)
    high_cell = side * side + stitched_row * (cols + 1) + stitched_col  # each high-res row ends with a newline
    cell = torch.cat([torch.arange(side * side)[None], torch.where(kept, high_cell, -1)])
    return cell, torch.cat([torch.arange(side * side)[None], order])

"""InternVL 3 / 3.5 (`InternVLForConditionalGeneration`): dynamic tiles, a thumbnail, and pixel shuffle.

The processor squashes the image (no aspect-preserving resize, no padding) onto the tile canvas of the best-fitting
`cols x rows` arrangement of `tile x tile` crops, cuts the tiles in raster order, and adds the whole image squashed
to one tile (the thumbnail) when there is more than one tile. The tower sees each crop alone; pixel shuffle then
folds each 2x2 block of patches into one token, so a crop yields a `side x side` raster grid (`side = tile / patch
/ 2`). An image's placeholders are the tiles' grids one after another, then the thumbnail's. crop hands the core
two grids: the thumbnail (`side x side`) and the tiles stitched into one `rows*side x cols*side` grid whose cells sit
in the placeholders tile by tile; both show the whole image, so a region keeps the cells whose centres it holds on
each. `<img>` and `</img>` around the placeholders are text tokens.

The arrangement depends on the image's size and the processor's tile limits, which the stock processor's output
does not record: crop's `InternVLImageTextProcessor` (also without the video slot, which needs torchvision) adds
`image_tiles`, `(rows, cols)` per image, which crop leaves out of the model's call (the model's `forward` ignores
it, its `generate` refuses it: pop it to call the plain model's `generate` on these inputs).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import InternVLProcessor
from transformers.image_utils import get_image_size, to_numpy_array
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from crop.adapter import ModelAdapter, VisionCrops, VisualLayout, register, register_processor
from crop.errors import ConfigError, UnsupportedModelError
from crop.region import Viewport

THUMBNAIL, TILES = 0, 1
"""Grid ids in an image's `VisualLayout.cells` (the tiles' grid is last: drawn over the image, budgeted first)."""


def tile_cells(tiles: tuple[int, int], side: int) -> torch.Tensor:
    """`(tokens, 3)` rows `(grid, row, col)` per placeholder of an image cut into `tiles = (rows, cols)` tiles of
    `side x side` tokens: the tiles in raster order, each in raster order, as cells of the stitched grid; then the
    thumbnail's cells (none for a single tile, which has no thumbnail)."""
    rows, cols = tiles
    tile, row, col = torch.meshgrid(torch.arange(rows * cols), torch.arange(side), torch.arange(side), indexing="ij")
    stitched_row = (tile // cols) * side + row
    stitched_col = (tile % cols) * side + col
    cells = torch.stack([torch.full_like(tile, TILES), stitched_row, stitched_col], dim=-1).view(-1, 3)
    if rows * cols == 1:
        return cells
    row, col = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    thumbnail = torch.stack([torch.full_like(row, THUMBNAIL), row, col], dim=-1).view(-1, 3)
    return torch.cat([cells, thumbnail])


@register("InternVLForConditionalGeneration")
class InternVLAdapter(ModelAdapter):
    """Visual tokens per image: its tiles' grids, stitched into one, then the thumbnail's grid."""

    family = "internvl"
    crop_only_inputs = ("image_tiles",)

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        config = model.config
        if config.vision_feature_select_strategy != "default" or config.vision_feature_layer != -1:
            raise UnsupportedModelError(
                "internvl: crop supports the released feature settings only (vision_feature_layer -1, strategy "
                f"'default'), got {config.vision_feature_layer} and {config.vision_feature_select_strategy!r}"
            )
        (tile_h, tile_w), (patch_h, patch_w) = config.vision_config.image_size, config.vision_config.patch_size
        patches = tile_h // patch_h
        if tile_h != tile_w or patch_h != patch_w or tile_h % patch_h or (patches * config.downsample_ratio) % 1:
            raise UnsupportedModelError(
                f"internvl: crop needs square tiles that fold into whole tokens, got tile {tile_h}x{tile_w}, patch "
                f"{patch_h}x{patch_w} and downsample ratio {config.downsample_ratio}"
            )
        self.side = int(patches * config.downsample_ratio)

    def visual_layout(self) -> VisualLayout | None:
        return None

    def visual_layouts(self, inputs: dict[str, Any]) -> list[VisualLayout]:
        return [self._layout(tiles) for tiles in self._tiles(inputs)]

    def _tiles(self, inputs: dict[str, Any]) -> list[tuple[int, int]]:
        tiles = inputs.get("image_tiles")
        batch = inputs["input_ids"].shape[0]
        if tiles is None:
            raise ConfigError(
                "InternVL inputs need image_tiles, each image's (rows, cols) of tiles, which the stock "
                "InternVLProcessor does not record: use crop's InternVLImageTextProcessor (crop.loading.load_model "
                "returns it for InternVL checkpoints) and pass its whole output"
            )
        if len(tiles) != batch:
            raise ConfigError(f"{len(tiles)} images for {batch} prompts: crop supports one image per prompt")
        return [(int(rows), int(cols)) for rows, cols in torch.as_tensor(tiles).tolist()]

    def _layout(self, tiles: tuple[int, int]) -> VisualLayout:
        side, (rows, cols) = self.side, tiles
        if rows * cols == 1:
            return VisualLayout(rows=side, cols=side)
        cells = tile_cells(tiles, side)
        return VisualLayout(
            rows=1,
            cols=cells.shape[0],
            cells=cells,
            grids=((side, side), (rows * side, cols * side)),
            grid_viewports=(Viewport(), Viewport()),
        )

    def viewport(self, processor: Any, image_size: tuple[int, int]) -> Viewport:
        """The processor squashes the image onto the tile canvas and the thumbnail: every grid shows all of it."""
        return Viewport()

    def image_features(self, inputs: dict[str, Any]) -> list[torch.Tensor]:
        """Each image's placeholder features: its crops' pixel-shuffled, projected tokens, crop after crop."""
        config = self.model.config
        features = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"].to(self.model.dtype),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output
        counts = [rows * cols + (rows * cols > 1) for rows, cols in self._tiles(inputs)]
        if sum(counts) != features.shape[0]:
            raise ConfigError(f"image_tiles name {sum(counts)} crops, pixel_values hold {features.shape[0]}")
        return [crops.flatten(0, 1) for crops in features.split(counts)]

    def vision_crops(self, inputs: dict[str, Any]) -> list[VisionCrops]:
        raise UnsupportedModelError(
            f"VisionZip is not supported for {self.family}: its authors rank single patches by a CLIP tower's CLS "
            "attention, and InternVL's tokens are pixel-shuffled 2x2 blocks of patches; use divprune, pool, "
            "random or an in-LLM method"
        )


@register_processor
class InternVLImageTextProcessor(InternVLProcessor):
    """`InternVLProcessor` without the video slot (which needs torchvision), whose output also records each
    image's tile arrangement as `image_tiles` `(images, 2)`: `(rows, cols)`, from the image processor's own rule.
    `crop.loading` loads InternVL checkpoints saved with the stock processor with this one."""

    checkpoint_names = ("InternVLProcessor",)

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                 **kwargs):  # fmt: skip
        super().__init__(image_processor, tokenizer, image_seq_length=image_seq_length, chat_template=chat_template,
                         **kwargs)  # fmt: skip

    def __call__(self, images: Any = None, text: Any = None, videos: Any = None, **kwargs: Any) -> Any:
        if videos is not None:
            raise ConfigError("InternVLImageTextProcessor takes images and text only")
        output = super().__call__(images=images, text=text, **kwargs)
        if images is not None:
            image_list = images if isinstance(images, list | tuple) else [images]
            output["image_tiles"] = torch.tensor([self.tile_grid(image, kwargs) for image in image_list])
        return output

    def tile_grid(self, image: Any, kwargs: dict[str, Any]) -> tuple[int, int]:
        """`(rows, cols)` of tiles the image processor cuts `image` into, by its own arrangement rule."""
        processor = self.image_processor
        options = {**self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)["images_kwargs"]}
        crop_to_patches = options.get("crop_to_patches", processor.crop_to_patches)
        min_patches = options.get("min_patches", processor.min_patches)
        max_patches = options.get("max_patches", processor.max_patches)
        if not crop_to_patches or max_patches <= 1:
            return (1, 1)
        height, width = get_image_size(to_numpy_array(image))
        size = processor.size
        cols, rows = get_optimal_tiled_canvas((height, width), (size.height, size.width), min_patches, max_patches)
        return (rows, cols)

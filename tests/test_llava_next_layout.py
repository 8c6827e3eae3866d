"""LLaVA-NeXT token layout, checked against the model's own feature packing and the processor's pixels.

The projector of one tiny model instance is hooked to emit features that name their (tile, patch), and a forward
pre-hook on its LLM captures the embeddings that fill each placeholder: the layout must say, for each placeholder,
exactly which base cell, high-res cell or newline the model put there.
"""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTIONS, make_image
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

from crop.errors import UnsupportedModelError
from crop.models.llava_next import BASE, HIGH, NEWLINE, token_layout
from crop.testing.llava import CLIP_MEAN, CLIP_STD
from crop.testing.llava_next import build_next_model, build_next_processor, next_inputs

SIZES = {  # (width, height)
    "wide": (120, 60),
    "tall": (40, 130),
    "tall_inset": (50, 130),
    "square": (70, 70),
    "very_wide": (500, 80),
}
NAMES = list(SIZES)


@pytest.fixture(scope="module")
def packed():
    """One batch forward over all sizes: inputs, the placeholder embeddings per image, and the model."""
    model, processor = build_next_model(), build_next_processor()
    images = [make_image(*SIZES[name], seed=i) for i, name in enumerate(NAMES)]
    inputs = next_inputs(processor, images, [QUESTIONS[i % len(QUESTIONS)] for i in range(len(NAMES))])
    captured = {}

    def name_patches(module, args, output):
        tiles, patches, _ = output.shape
        code = torch.zeros_like(output)
        code[..., 0] = torch.arange(tiles, dtype=output.dtype)[:, None]
        code[..., 1] = torch.arange(patches, dtype=output.dtype)[None, :]
        code[..., 2] = 1.0
        return code

    def capture(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handles = [
        model.model.multi_modal_projector.register_forward_hook(name_patches),
        model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    placeholders = inputs["input_ids"] == model.config.image_token_id
    tokens = [captured["embeds"][b, placeholders[b]] for b in range(len(NAMES))]
    return model, processor, inputs, tokens


def model_cells(model, image_size_hw, tokens: torch.Tensor) -> list[tuple]:
    """What the model put at each placeholder: ("newline",), ("base", row, col) or ("high", canvas row, col), where
    canvas coordinates index the stitched tiles' feature grid before unpadding."""
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    _, tile_cols = get_anyres_image_grid_shape(
        image_size_hw, model.config.image_grid_pinpoints, model.config.vision_config.image_size
    )
    patch_tokens = tokens[:, 2] == 1.0
    first_tile = int(tokens[patch_tokens, 0].min())
    cells = []
    for token, is_patch in zip(tokens, patch_tokens, strict=True):
        if not is_patch:
            assert torch.equal(token, model.model.image_newline.detach())
            cells.append(("newline",))
            continue
        tile, patch = int(token[0]) - first_tile, int(token[1])
        row, col = divmod(patch, side)
        if tile == 0:
            cells.append(("base", row, col))
        else:
            tile_row, tile_col = divmod(tile - 1, tile_cols)
            cells.append(("high", tile_row * side + row, tile_col * side + col))
    return cells


def image_footprint(pixel_values: torch.Tensor, tiles: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Canvas pixel columns and rows (of the stitched high-res tiles) that show the image, not the zero padding."""
    tile_rows, tile_cols = tiles
    crops = pixel_values[1 : 1 + tile_rows * tile_cols]
    _, channels, size, _ = crops.shape
    canvas = crops.view(tile_rows, tile_cols, channels, size, size).permute(2, 0, 3, 1, 4)
    canvas = canvas.reshape(channels, tile_rows * size, tile_cols * size)
    pad = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)])[:, None, None]
    shows_image = ((canvas - pad).abs() > 1e-3).any(0)
    return shows_image.any(0).nonzero().flatten(), shows_image.any(1).nonzero().flatten()


@pytest.mark.parametrize("name", NAMES)
def test_layout_matches_model_packing(packed, name):
    model, processor, inputs, tokens = packed
    b = NAMES.index(name)
    width, height = SIZES[name]
    assert inputs["image_sizes"][b].tolist() == [height, width]
    layout = token_layout(model.config, processor, (width, height))
    assert layout.num_tokens == tokens[b].shape[0]  # what the processor inserted, and the model filled
    cells = model_cells(model, (height, width), tokens[b])

    high = [cell for cell in cells if cell[0] == "high"]
    top, left = min(cell[1] for cell in high), min(cell[2] for cell in high)
    assert layout.high_offset == (top, left)
    for position, (grid, row, col) in enumerate(layout.cells.tolist()):
        if grid == NEWLINE:
            assert cells[position] == ("newline",)
            assert cells[position - 1] == ("high", top + row, left + layout.high_grid[1] - 1)
        elif grid == BASE:
            assert cells[position] == ("base", row, col)
        else:
            assert grid == HIGH and cells[position] == ("high", top + row, left + col)

    rows, cols = layout.high_grid
    assert len(high) == rows * cols and len({cell[1:] for cell in high}) == rows * cols
    assert layout.newline_positions.numel() == rows
    assert layout.grid_positions(BASE).tolist() == list(range(layout.base_grid[0] * layout.base_grid[1]))


@pytest.mark.parametrize("name", NAMES)
def test_viewports_match_processor_pixels(packed, name):
    model, processor, inputs, tokens = packed
    b = NAMES.index(name)
    width, height = SIZES[name]
    layout = token_layout(model.config, processor, (width, height))
    pixel_values = inputs["pixel_values"][b]
    pad = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)])[:, None, None]
    assert ((pixel_values[0] - pad).abs() > 1e-3).any(0).all()  # the base image fills its square: resized, no pad
    assert layout.base_viewport.left == 0.0 and layout.base_viewport.right == 1.0
    assert layout.base_viewport.top == 0.0 and layout.base_viewport.bottom == 1.0

    xs, ys = image_footprint(pixel_values, layout.tiles)
    x0, x1, y0, y1 = int(xs[0]), int(xs[-1]) + 1, int(ys[0]), int(ys[-1]) + 1
    assert xs.numel() == x1 - x0 and ys.numel() == y1 - y0
    patch = model.config.vision_config.patch_size
    vp = layout.high_viewport
    rows, cols = layout.high_grid
    for cell in (c for c in model_cells(model, (height, width), tokens[b]) if c[0] == "high"):
        canvas_row, canvas_col = cell[1:]
        row, col = canvas_row - layout.high_offset[0], canvas_col - layout.high_offset[1]
        u = ((canvas_col + 0.5) * patch - x0) / (x1 - x0)  # the patch centre in image coordinates, from pixels
        v = ((canvas_row + 0.5) * patch - y0) / (y1 - y0)
        assert u == pytest.approx(((col + 0.5) / cols - vp.left) / (vp.right - vp.left), abs=1e-9)
        assert v == pytest.approx(((row + 0.5) / rows - vp.top) / (vp.bottom - vp.top), abs=1e-9)


def test_wide_left_half_is_left_columns(packed):
    model, processor, inputs, tokens = packed
    b = NAMES.index("wide")
    width, height = SIZES["wide"]
    assert width == 2 * height
    layout = token_layout(model.config, processor, (width, height))
    xs, _ = image_footprint(inputs["pixel_values"][b], layout.tiles)
    middle = (int(xs[0]) + int(xs[-1]) + 1) / 2
    patch = model.config.vision_config.patch_size
    high_positions = layout.grid_positions(HIGH).tolist()
    cells = model_cells(model, (height, width), tokens[b])
    left_by_pixels = {p for p in high_positions if (cells[p][2] + 0.5) * patch < middle}
    cols = layout.high_grid[1]
    left_by_layout = {p for p in high_positions if layout.cells[p, 2] < cols / 2}
    assert left_by_pixels == left_by_layout and 0 < len(left_by_layout) < len(high_positions)


def test_layout_rejects_mismatched_processor(packed):
    model, _, _, _ = packed
    with pytest.raises(UnsupportedModelError, match="pinpoints"):
        token_layout(model.config, build_next_processor(pinpoints=[[56, 56], [112, 112]]), (120, 60))
    with pytest.raises(UnsupportedModelError, match="56x56"):
        token_layout(model.config, build_next_processor(image_size=84), (120, 60))


def test_tiny_next_generates_batch_1_and_2():
    model, processor = build_next_model(), build_next_processor()
    images = [make_image(120, 60, seed=0), make_image(40, 130, seed=1)]
    for count in (1, 2):
        inputs = next_inputs(processor, images[:count], QUESTIONS[:count])
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert output.shape == (count, inputs["input_ids"].shape[1] + 3)
    assert (inputs["attention_mask"][:, 0] == 0).any()  # real left padding in the batch of 2

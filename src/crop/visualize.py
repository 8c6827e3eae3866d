"""Drawing what a pruned call kept: the region and the token cells over the image."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from crop.stats import DROPPED, POOLED, RowStats

SHADE = {POOLED: 110, DROPPED: 190}
"""Darkening (0-255) of cells merged by PLC and of cells ILP dropped; fine cells stay as they are."""


def draw_overlay(image: Image.Image, row: RowStats, cells: torch.Tensor | None = None) -> Image.Image:
    """A copy of `image` with dropped cells darkened, pooled cells half-darkened and the region outlined in red.

    `cells` draws other cell states on the row's grid (one stage of a staged method) instead of the final ones.
    """
    cells = row.cells if cells is None else cells
    base = image.convert("RGBA")
    width, height = base.size
    shade = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    rows, cols = cells.shape
    vp = row.viewport
    span_x, span_y = vp.right - vp.left, vp.bottom - vp.top
    for r in range(rows):
        for c in range(cols):
            alpha = SHADE.get(int(cells[r, c]))
            if alpha is None:
                continue
            x0 = (c / cols - vp.left) / span_x * width
            x1 = ((c + 1) / cols - vp.left) / span_x * width
            y0 = (r / rows - vp.top) / span_y * height
            y1 = ((r + 1) / rows - vp.top) / span_y * height
            draw.rectangle([x0, y0, x1, y1], fill=(0, 0, 0, alpha))
    out = Image.alpha_composite(base, shade)
    region = row.region
    if region is not None:
        box = [region.x0 * width, region.y0 * height, region.x1 * width - 1, region.y1 * height - 1]
        ImageDraw.Draw(out).rectangle(box, outline=(255, 40, 40, 255), width=max(2, width // 150))
    return out.convert("RGB")

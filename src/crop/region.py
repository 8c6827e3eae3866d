"""The contextual region: a box on the image, its 8x8 grid form, and its footprint on a token grid."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from crop.errors import RegionError

GRID_SIZE = 8
"""The paper's localization grid: the image is cut into GRID_SIZE x GRID_SIZE blocks."""


@dataclass(frozen=True)
class Viewport:
    """Where the image's unit square lands in the token grid's unit square.

    Image processors resize, crop or pad: a center crop shows only the middle of a wide image (the image
    spans more than [0, 1] of the grid), padding to a square letterboxes it (it spans less).
    """

    left: float = 0.0
    top: float = 0.0
    right: float = 1.0
    bottom: float = 1.0

    @classmethod
    def center_crop(cls, width: int, height: int) -> Viewport:
        """The grid shows the central square of a `width x height` image (resize shortest edge, then crop)."""
        if width >= height:
            span = width / height
            return cls(left=(1 - span) / 2, top=0.0, right=(1 + span) / 2, bottom=1.0)
        span = height / width
        return cls(left=0.0, top=(1 - span) / 2, right=1.0, bottom=(1 + span) / 2)

    @classmethod
    def pad_to_square(cls, width: int, height: int) -> Viewport:
        """The image is centred on a square canvas of its longer side (LLaVA's `expand2square`)."""
        if width >= height:
            span = height / width
            return cls(left=0.0, top=(1 - span) / 2, right=1.0, bottom=(1 + span) / 2)
        span = width / height
        return cls(left=(1 - span) / 2, top=0.0, right=(1 + span) / 2, bottom=1.0)

    def to_image(self, x0: float, y0: float, x1: float, y1: float) -> Region:
        """The region of the image that a box in grid coordinates shows (clipped to the image; the whole image,
        marked as a fallback, if the box shows none of it)."""
        width, height = self.right - self.left, self.bottom - self.top
        box = (
            min(max((x0 - self.left) / width, 0.0), 1.0),
            min(max((y0 - self.top) / height, 0.0), 1.0),
            min(max((x1 - self.left) / width, 0.0), 1.0),
            min(max((y1 - self.top) / height, 0.0), 1.0),
        )
        if box[0] >= box[2] or box[1] >= box[3]:
            return Region.full(fallback_reason="the box lies outside the image (in the padding)")
        return Region(*box)


@dataclass(frozen=True)
class Region:
    """A box in normalized image coordinates: `0 <= x0 < x1 <= 1`, `0 <= y0 < y1 <= 1`.

    `fallback_reason` is set when a localizer could not produce a region and returned the whole image instead.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    fallback_reason: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        values = (self.x0, self.y0, self.x1, self.y1)
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            raise RegionError(f"region coordinates must be finite numbers, got {values}")
        if not all(0.0 <= v <= 1.0 for v in values):
            raise RegionError(f"region coordinates must lie in [0, 1] (normalized to the image), got {values}")
        if self.x0 >= self.x1 or self.y0 >= self.y1:
            raise RegionError(f"region is empty or inverted: need x0 < x1 and y0 < y1, got {values}")

    @classmethod
    def full(cls, fallback_reason: str | None = None) -> Region:
        """The whole image."""
        return cls(0.0, 0.0, 1.0, 1.0, fallback_reason=fallback_reason)

    @classmethod
    def from_grid(cls, box: Sequence[int], grid_size: int = GRID_SIZE) -> Region:
        """From `[xmin, ymin, xmax, ymax]`, 0-indexed inclusive blocks of a `grid_size x grid_size` grid."""
        if len(box) != 4:
            raise RegionError(f"a grid box has 4 numbers [xmin, ymin, xmax, ymax], got {list(box)}")
        if not all(isinstance(v, int) or (isinstance(v, float) and v.is_integer()) for v in box):
            raise RegionError(f"grid box entries must be integers, got {list(box)}")
        xmin, ymin, xmax, ymax = (int(v) for v in box)
        last = grid_size - 1
        if not all(0 <= v <= last for v in (xmin, ymin, xmax, ymax)):
            raise RegionError(
                f"grid box {list(box)} is off the {grid_size}x{grid_size} grid: entries must be in 0..{last}"
            )
        if xmin > xmax or ymin > ymax:
            raise RegionError(f"grid box {list(box)} is inverted: need xmin <= xmax and ymin <= ymax")
        return cls(xmin / grid_size, ymin / grid_size, (xmax + 1) / grid_size, (ymax + 1) / grid_size)

    def to_grid(self, grid_size: int = GRID_SIZE) -> tuple[int, int, int, int]:
        """The smallest block box `[xmin, ymin, xmax, ymax]` that covers this region."""
        eps = 1e-9
        xmin = min(int(math.floor(self.x0 * grid_size + eps)), grid_size - 1)
        ymin = min(int(math.floor(self.y0 * grid_size + eps)), grid_size - 1)
        xmax = max(int(math.ceil(self.x1 * grid_size - eps)) - 1, xmin)
        ymax = max(int(math.ceil(self.y1 * grid_size - eps)) - 1, ymin)
        return xmin, ymin, xmax, ymax

    @property
    def area(self) -> float:
        return (self.x1 - self.x0) * (self.y1 - self.y0)

    @property
    def is_full(self) -> bool:
        return (self.x0, self.y0, self.x1, self.y1) == (0.0, 0.0, 1.0, 1.0)

    def token_mask(self, rows: int, cols: int, viewport: Viewport | None = None) -> torch.Tensor:
        """Boolean `(rows, cols)` mask of the token cells whose centre lies inside the region.

        `viewport` says where the image sits in the token grid (see `Viewport`); by default it fills it.
        A region that covers no cell centre keeps the cells it overlaps (clipped to the visible grid, or the
        nearest edge cells if it lies wholly outside), so that a small or cropped-away region never empties it.
        """
        if rows < 1 or cols < 1:
            raise RegionError(f"token grid must be at least 1x1, got {rows}x{cols}")
        vp = viewport or Viewport()
        gx0 = vp.left + self.x0 * (vp.right - vp.left)
        gx1 = vp.left + self.x1 * (vp.right - vp.left)
        gy0 = vp.top + self.y0 * (vp.bottom - vp.top)
        gy1 = vp.top + self.y1 * (vp.bottom - vp.top)
        cx = (torch.arange(cols, dtype=torch.float64) + 0.5) / cols
        cy = (torch.arange(rows, dtype=torch.float64) + 0.5) / rows
        inside_x = (cx >= gx0) & (cx <= gx1)
        inside_y = (cy >= gy0) & (cy <= gy1)
        mask = inside_y[:, None] & inside_x[None, :]
        if not mask.any():
            mask = _overlapping(gy0, gy1, rows)[:, None] & _overlapping(gx0, gx1, cols)[None, :]
        return mask

    def __str__(self) -> str:
        grid = list(self.to_grid())
        note = f" (fallback: {self.fallback_reason})" if self.fallback_reason else ""
        return f"Region(grid={grid}, box=[{self.x0:.3f}, {self.y0:.3f}, {self.x1:.3f}, {self.y1:.3f}]){note}"


def _overlapping(start: float, end: float, cells: int) -> torch.Tensor:
    """Cells of a 1-D grid of `cells` over [0, 1] that overlap [start, end], clipped to the grid."""
    start, end = min(max(start, 0.0), 1.0), min(max(end, 0.0), 1.0)
    edges = torch.arange(cells + 1, dtype=torch.float64) / cells
    hit = (edges[1:] > start) & (edges[:-1] < end)
    if not hit.any():
        hit[min(int(start * cells), cells - 1)] = True
    return hit


def grid_iou(a: Region, b: Region) -> float:
    """IoU of two regions in their 8x8 grid forms (block counts)."""
    ax0, ay0, ax1, ay1 = a.to_grid()
    bx0, by0, bx1, by1 = b.to_grid()
    ix = max(0, min(ax1, bx1) - max(ax0, bx0) + 1)
    iy = max(0, min(ay1, by1) - max(ay0, by0) + 1)
    inter = ix * iy
    union = (ax1 - ax0 + 1) * (ay1 - ay0 + 1) + (bx1 - bx0 + 1) * (by1 - by0 + 1) - inter
    return inter / union

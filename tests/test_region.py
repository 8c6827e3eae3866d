"""Region: grid round trips, validation, and the footprint on token grids of any shape."""

from __future__ import annotations

import math

import pytest
import torch

from crop.errors import RegionError
from crop.region import Region, Viewport


@pytest.mark.parametrize("box", [[0, 0, 7, 7], [2, 3, 5, 6], [4, 4, 4, 4], [0, 7, 7, 7]])
def test_grid_round_trip(box):
    assert list(Region.from_grid(box).to_grid()) == box


def test_to_grid_covers_a_free_box():
    assert Region(0.1, 0.26, 0.3, 0.9).to_grid() == (0, 2, 2, 7)


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ([0, 0, 8, 3], "off the 8x8 grid"),
        ([-1, 0, 3, 3], "off the 8x8 grid"),
        ([5, 0, 3, 3], "inverted"),
        ([0, 0, 3], "4 numbers"),
        ([0, 0, 2.5, 3], "integers"),
    ],
)
def test_bad_grid_boxes_are_refused(box, message):
    with pytest.raises(RegionError, match=message):
        Region.from_grid(box)


@pytest.mark.parametrize(
    "coords",
    [(0.5, 0.0, 0.5, 1.0), (0.6, 0.0, 0.2, 1.0), (math.nan, 0, 1, 1), (0, 0, 1.2, 1), (-0.1, 0, 1, 1)],
)
def test_bad_boxes_are_refused(coords):
    with pytest.raises(RegionError):
        Region(*coords)


def test_quarter_on_square_grid():
    mask = Region.from_grid([0, 0, 3, 3]).token_mask(24, 24)
    assert mask.sum() == 144 and mask[:12, :12].all()


def test_non_square_grid():
    mask = Region(0.0, 0.0, 0.5, 1.0).token_mask(rows=3, cols=8)
    expected = torch.zeros(3, 8, dtype=torch.bool)
    expected[:, :4] = True
    assert torch.equal(mask, expected)


def test_tiny_region_keeps_the_nearest_cell():
    mask = Region(0.50, 0.50, 0.51, 0.51).token_mask(4, 4)
    assert mask.sum() == 1 and mask[2, 2]


def test_center_crop_viewport_shifts_region():
    # a 2:1 image center-cropped to a square shows only its middle half: its left half maps to grid x < 0.5
    viewport = Viewport.center_crop(200, 100)
    left_half = Region(0.0, 0.0, 0.5, 1.0).token_mask(4, 4, viewport)
    assert left_half[:, :2].all() and not left_half[:, 2:].any()
    far_left = Region(0.0, 0.0, 0.2, 1.0).token_mask(4, 4, viewport)
    assert far_left.sum() == 4 and far_left[:, 0].all()  # off the visible grid: nearest column kept


def test_pad_viewport_letterboxes_region():
    # a 2:1 image padded to a square fills rows 1..2 of a 4-row grid
    viewport = Viewport.pad_to_square(200, 100)
    whole = Region.full().token_mask(4, 4, viewport)
    assert whole[1:3].all() and not whole[0].any() and not whole[3].any()

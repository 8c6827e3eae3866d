"""Localizers: given an image and a question, name the contextual region that holds the answer."""

from crop.localize.attention import AttentionLocalizer
from crop.localize.base import Localizer
from crop.localize.fixed import FixedLocalizer
from crop.localize.grid_vlm import GridVLMLocalizer, parse_grid_box

__all__ = ["AttentionLocalizer", "FixedLocalizer", "GridVLMLocalizer", "Localizer", "parse_grid_box"]

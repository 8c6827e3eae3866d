"""crop: contextual region-oriented visual token pruning for vision-language models."""

from crop import models  # noqa: F401  (registers the model families)
from crop.errors import (
    ConfigError,
    CropError,
    ImageError,
    LocalizerError,
    RegionError,
    UnsupportedModelError,
)
from crop.localize import AttentionLocalizer, FixedLocalizer, GridVLMLocalizer, Localizer
from crop.pipeline import Answer, CropModel, apply, remove
from crop.region import Region, Viewport
from crop.request import Request
from crop.stats import PruneStats, RowStats
from crop.strategies.ilp import ILP
from crop.strategies.learned_plc import LearnedPLC, LearnedPLCConfig
from crop.strategies.plc import PLC

__version__ = "0.1.0"

__all__ = [
    "ILP",
    "AttentionLocalizer",
    "PLC",
    "Answer",
    "LearnedPLC",
    "LearnedPLCConfig",
    "ConfigError",
    "CropError",
    "CropModel",
    "FixedLocalizer",
    "GridVLMLocalizer",
    "ImageError",
    "Localizer",
    "LocalizerError",
    "PruneStats",
    "Region",
    "RegionError",
    "Request",
    "RowStats",
    "UnsupportedModelError",
    "Viewport",
    "apply",
    "remove",
]

"""crop: contextual region-oriented visual token pruning for vision-language models.

The names below are imported on first use, so that `crop --help` and `import crop.errors` stay light (no torch).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from crop.errors import (
    ConfigError,
    CropError,
    ImageError,
    LocalizerError,
    RegionError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

_LAZY = {
    "AttentionLocalizer": "crop.localize",
    "FixedLocalizer": "crop.localize",
    "GridVLMLocalizer": "crop.localize",
    "Localizer": "crop.localize",
    "Answer": "crop.pipeline",
    "CropModel": "crop.pipeline",
    "apply": "crop.pipeline",
    "remove": "crop.pipeline",
    "Region": "crop.region",
    "Viewport": "crop.region",
    "Request": "crop.request",
    "PruneStats": "crop.stats",
    "RowStats": "crop.stats",
    "ILP": "crop.strategies.ilp",
    "LearnedPLC": "crop.strategies.learned_plc",
    "LearnedPLCConfig": "crop.strategies.learned_plc",
    "PLC": "crop.strategies.plc",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'crop' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ConfigError",
    "CropError",
    "ImageError",
    "LocalizerError",
    "RegionError",
    "UnsupportedModelError",
    *_LAZY,
]

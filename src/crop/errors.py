"""Errors that `crop` raises for bad input; each message names what was wrong and what is accepted."""


class CropError(ValueError):
    """Base class for every error `crop` raises on bad input or unsupported use."""


class RegionError(CropError):
    """A region or grid box that is off the grid, inverted, empty or not a number."""


class ImageError(CropError):
    """An image that cannot be read."""


class UnsupportedModelError(CropError):
    """A model family, attention backend or generation mode that `crop` does not support."""


class ConfigError(CropError):
    """A pruning configuration that does not fit the model (layer out of range, bad ratio, ...)."""


class LocalizerError(CropError):
    """A localizer answer that cannot be turned into a region (when fallback is disabled)."""

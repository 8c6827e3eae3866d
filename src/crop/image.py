"""Loading images with errors that say what went wrong, and a size policy that keeps huge images from filling
memory: above `max_pixels` an image is refused; above `MAX_SIDE` on its longer side it is reduced (every supported
processor resizes far below that anyway) while it is decoded where the format allows (JPEG draft mode)."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from crop.errors import ConfigError, ImageError

MAX_PIXELS = 150_000_000
"""Largest image accepted, in pixels (width x height; 150 MP, about 12000 x 12000); `CROP_MAX_PIXELS` in the
environment lowers it (Pillow refuses images above about 179 MP itself, as decompression bombs)."""
MAX_SIDE = 4096
"""Images with a longer side are reduced to it (aspect kept) before any processor sees them."""


def max_pixels() -> int:
    """The pixel limit in force: `CROP_MAX_PIXELS` if set (a positive integer), else `MAX_PIXELS`."""
    value = os.environ.get("CROP_MAX_PIXELS")
    if value is None:
        return MAX_PIXELS
    if not value.strip().isdigit() or int(value) < 1:
        raise ConfigError(f"CROP_MAX_PIXELS must be a positive whole number of pixels, got {value!r}")
    return int(value)


def load_image(source: str | Path | bytes | Image.Image, limit: int | None = None) -> Image.Image:
    """Open a path, raw bytes or a PIL image as an RGB image, or raise `ImageError` saying why not. Images above
    `limit` pixels (default `max_pixels()`) are refused; longer sides above `MAX_SIDE` are reduced."""
    limit = max_pixels() if limit is None else limit
    if isinstance(source, Image.Image):
        _check_size(source.size, limit, "the image")
        return _reduced(source).convert("RGB")
    if isinstance(source, bytes):
        stream, name = io.BytesIO(source), "<bytes>"
    else:
        text = str(source)
        if text.startswith(("http://", "https://", "ftp://", "data:")):
            raise ImageError(f"{text} is a URL; crop reads local image files: download it and pass the file's path")
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"image not found: {path} (expected a readable image file: PNG, JPEG, ...)")
        stream, name = path, str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                _check_size(image.size, limit, name)
                if max(image.size) > MAX_SIDE:
                    image.draft("RGB", _fitted(image.size))
                image.load()
                return _reduced(image).convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image {name} is too large: {exc} (limit {limit:,} pixels)") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot read image {name}: {exc} (expected a valid PNG, JPEG, ... file)") from exc


def _check_size(size: tuple[int, int], limit: int, name: str) -> None:
    width, height = size
    if width * height > limit:
        raise ImageError(
            f"{name} is too large: {width}x{height} = {width * height:,} pixels, above the limit of {limit:,} "
            "(set CROP_MAX_PIXELS to allow more, or reduce the image)"
        )
    if width < 1 or height < 1:
        raise ImageError(f"{name} is empty ({width}x{height} pixels)")


def _fitted(size: tuple[int, int]) -> tuple[int, int]:
    """`size` scaled so that its longer side is `MAX_SIDE`."""
    width, height = size
    scale = MAX_SIDE / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _reduced(image: Image.Image) -> Image.Image:
    """The image with its longer side at most `MAX_SIDE` (a copy when reduced)."""
    if max(image.size) <= MAX_SIDE:
        return image
    return image.resize(_fitted(image.size), Image.Resampling.LANCZOS)

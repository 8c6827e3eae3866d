"""Loading images with errors that say what went wrong."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from crop.errors import ImageError


def load_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """Open a path, raw bytes or a PIL image as an RGB image, or raise `ImageError` saying why not."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, bytes):
        stream, name = io.BytesIO(source), "<bytes>"
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"image not found: {path} (expected a readable image file: PNG, JPEG, ...)")
        stream, name = path, str(path)
    try:
        with Image.open(stream) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageError(f"cannot read image {name}: {exc} (expected a valid PNG, JPEG, ... file)") from exc

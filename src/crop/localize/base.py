"""The localizer protocol shared by every way of finding the contextual region."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from PIL import Image

from crop.region import Region


@runtime_checkable
class Localizer(Protocol):
    """Anything with `localize(image, question) -> Region`."""

    def localize(self, image: Image.Image, question: str) -> Region: ...

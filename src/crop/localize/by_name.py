"""The one way every command builds a localizer from its name, with one set of defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crop.errors import ConfigError
from crop.localize.attention import AttentionLocalizer
from crop.localize.base import Localizer
from crop.localize.grid_vlm import LOCALIZER_SETTINGS, GridVLMLocalizer

NAMES = ("default", "attention", "none")


def localizer_by_name(
    name: str | None, model: Any, processor: Any, layer: int = 2, model_path: str | Path | None = None
) -> Localizer | None:
    """The localizer `name` names for `model` (whose method prunes at layer K = `layer`):

    - "default" (or None): the model itself when it was trained to localize (a `crop_localizer.json` beside
      `model_path`, as the shipped synthetic model has), else "attention";
    - "attention": the model's own attention at layer K-1 (`AttentionLocalizer`), a second pass, no training;
    - "none": no localizer (regions must be given);
    - anything else: the directory of a grid-box localizer VLM (`GridVLMLocalizer`), put on the model's device.
    """
    name = "default" if name is None else str(name)
    if name.lower() == "none":
        return None
    if name.lower() == "default":
        if model_path is not None and (Path(model_path) / LOCALIZER_SETTINGS).is_file():
            return GridVLMLocalizer.from_model(model, processor, model_path)
        name = "attention"
    if name.lower() == "attention":
        return AttentionLocalizer(model, processor, layer=max(0, layer - 1))
    if not Path(name).exists() and "/" not in name:
        raise ConfigError(f"unknown localizer {name!r}: use one of {', '.join(NAMES)} or a localizer VLM's directory")
    localizer = GridVLMLocalizer.from_pretrained(name)
    localizer.model.to(model.device)
    return localizer

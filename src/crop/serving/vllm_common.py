"""What every vLLM family of the plugin shares: the settings read from the model config, and the request's region
carried from the processor to the model as one `(4,)` box per image (image fractions; NaN: no region)."""

from __future__ import annotations

import math
from typing import Any

import torch

from crop.errors import ConfigError
from crop.region import Region
from crop.serving.pruning import SETTINGS_KEY, FeaturePruner, PruningSettings

BOX_FIELD = "crop_region_box"
"""The processor output that carries each image's region to the model."""


def pruner_for(config: Any) -> FeaturePruner:
    """The pruner the model config's `crop` entry describes (set with vLLM's `hf_overrides`)."""
    entry = getattr(config, SETTINGS_KEY, None)
    if entry is None:
        raise ConfigError(
            f"the crop vLLM architectures need pruning settings in the model config: pass hf_overrides="
            f'{{"architectures": [...], "{SETTINGS_KEY}": {{"method": "divprune", "budget": 64}}}}'
        )
    return FeaturePruner(PruningSettings.from_config(entry), config.get_text_config().num_hidden_layers)


def box_tensor(region: Region | None, images: int) -> torch.Tensor:
    """`(images, 4)`: the region's box for each image of a request, NaN where there is none."""
    box = [math.nan] * 4 if region is None else [region.x0, region.y0, region.x1, region.y1]
    return torch.tensor([box] * images, dtype=torch.float64)


def region_of_box(box: torch.Tensor) -> Region | None:
    """The region a `box_tensor` row holds."""
    values = [float(v) for v in box.reshape(-1)]
    return None if any(math.isnan(v) for v in values) else Region(*values)

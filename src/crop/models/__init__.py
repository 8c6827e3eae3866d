"""Model adapters: everything family-specific lives in one file per family, found here by class name."""

from __future__ import annotations

import importlib
from typing import Any

from crop.errors import UnsupportedModelError
from crop.models.base import ModelAdapter, VisualLayout, grid_cell_index

ADAPTERS: dict[str, str] = {
    "LlavaForConditionalGeneration": "crop.models.llava:LlavaAdapter",
    "LlavaNextForConditionalGeneration": "crop.models.llava_next:LlavaNextAdapter",
    "Qwen2VLForConditionalGeneration": "crop.models.qwen2_vl:Qwen2VLAdapter",
    "Qwen2_5_VLForConditionalGeneration": "crop.models.qwen2_vl:Qwen2VLAdapter",
}
"""Model class name -> `module:AdapterClass`; adding a family is adding a file and a line here."""


def adapter_for(model: Any) -> ModelAdapter:
    """The adapter for `model`'s family, or `UnsupportedModelError` naming the families supported."""
    name = type(model).__name__
    if name not in ADAPTERS:
        supported = ", ".join(sorted(ADAPTERS))
        raise UnsupportedModelError(f"model class {name} is not supported; supported classes: {supported}")
    module_name, class_name = ADAPTERS[name].split(":")
    adapter_class = getattr(importlib.import_module(module_name), class_name)
    return adapter_class(model)


__all__ = ["ADAPTERS", "ModelAdapter", "VisualLayout", "adapter_for", "grid_cell_index"]

"""Loading a VLM and its processor from a local directory or hub id, with errors that say what to do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crop.errors import UnsupportedModelError


def load_model(path: str | Path, attn_implementation: str = "sdpa", dtype: str = "float32") -> tuple[Any, Any]:
    """`(model, processor)` from `from_pretrained(path)`: any image-text-to-text model transformers knows."""
    import torch
    from transformers import AutoModelForImageTextToText

    text = str(path)
    if not Path(path).exists() and (text.count("/") != 1 or text.startswith((".", "/", "~"))):
        raise UnsupportedModelError(
            f"cannot load a vision-language model from {path}: it is not a folder here, nor a hub id of the form "
            "owner/name (e.g. llava-hf/llava-1.5-7b-hf)"
        )
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, attn_implementation=attn_implementation, dtype=getattr(torch, dtype)
        )
        processor = _processor_class(path).from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise UnsupportedModelError(
            f"cannot load a vision-language model from {path}: {_short(exc)}. Expected a directory (or hub id) "
            "holding a Hugging Face image-text-to-text model and its processor, e.g. llava-hf/llava-1.5-7b-hf"
        ) from exc
    if getattr(processor, "image_processor", None) is None:
        raise UnsupportedModelError(
            f"the processor saved in {path} ({_saved_processor_class(path)}) came back as a "
            f"{type(processor).__name__} without an image processor: transformers falls back to the bare tokenizer "
            "when it cannot build the processor class named there (Qwen2-VL's, for one, needs torchvision for its "
            "video processor)"
        )
    return model.eval(), processor


def _processor_class(path: str | Path) -> Any:
    """`AutoProcessor`, or the processor class a model family registered under the name saved in `path` (Qwen2-VL's
    without the video slot, for one)."""
    from transformers import AutoProcessor

    from crop.adapter import processor_class

    return processor_class(_saved_processor_class(path)) or AutoProcessor


def _saved_processor_class(path: str | Path) -> str | None:
    """The processor class named in a local directory's processor_config.json, if any."""
    config = Path(path) / "processor_config.json"
    return json.loads(config.read_text()).get("processor_class") if config.is_file() else None


def _short(exc: Exception, limit: int = 300) -> str:
    """The gist of a transformers loading error: its first part, without the list of every known model type."""
    text = str(exc).split("Model type should be one of")[0].strip().rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."

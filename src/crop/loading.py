"""Loading a VLM and its processor from a local directory or hub id, with errors that say what to do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crop.errors import UnsupportedModelError


def load_model(path: str | Path, attn_implementation: str = "sdpa", dtype: str = "float32") -> tuple[Any, Any]:
    """`(model, processor)` from `from_pretrained(path)`: any image-text-to-text model transformers knows."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, attn_implementation=attn_implementation, dtype=getattr(torch, dtype)
        )
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise UnsupportedModelError(
            f"cannot load a vision-language model from {path}: {exc}. Expected a directory (or hub id) holding a "
            "Hugging Face image-text-to-text model and its processor, e.g. llava-hf/llava-1.5-7b-hf"
        ) from exc
    return model.eval(), processor

"""The benchmarked model: LLaVA-style layer shapes, the random-weight model and prompt built from them, and the
analytic FLOPs and KV-cache bytes of a prefill."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, CLIPVisionConfig, LlamaConfig, LlavaConfig

from crop.errors import ConfigError

IMAGE_TOKEN = 32000
TEXT_TOKENS = 40
"""Prompt text around the image: LLaVA-1.5's system prompt and a short question are about this long."""


@dataclass(frozen=True)
class Shape:
    """Layer shapes of a LLaVA-style model; `llm_layers` may be reduced from the real model's to fit memory."""

    name: str
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    llm_layers: int
    real_llm_layers: int
    vocab: int = 32064

    @property
    def grid_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


SHAPES = {
    "llava-1.5-7b": Shape("llava-1.5-7b", 1024, 4096, 24, 16, 336, 14, 4096, 11008, 32, 32, 8, 32),
    "small": Shape("small", 256, 1024, 4, 4, 336, 14, 512, 1376, 8, 8, 8, 8),
    "tiny": Shape("tiny", 32, 64, 2, 2, 112, 14, 64, 128, 4, 2, 4, 4),
}


def bench_shape(name: str, llm_layers: int | None = None) -> Shape:
    """A shape by name, its LLM cut to (or restored to) `llm_layers` if given."""
    if name not in SHAPES:
        raise ConfigError(f"unknown benchmark shape {name!r}; available: {', '.join(SHAPES)}")
    shape = SHAPES[name]
    if llm_layers is None:
        return shape
    if not 3 <= llm_layers <= shape.real_llm_layers:
        raise ConfigError(
            f"--llm-layers {llm_layers} is outside 3..{shape.real_llm_layers} for {name}: the in-LLM methods prune "
            f"at layer 2, and {shape.real_llm_layers} is the real model's depth"
        )
    return replace(shape, llm_layers=llm_layers)


def check_device(device: str) -> None:
    """Refuses a device this torch build cannot use, before minutes of model building."""
    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise ConfigError(f"--device {device!r} is not supported; use cpu or cuda (cuda:N)")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device} but CUDA is not available to torch {torch.__version__} here")


def build_bench_model(shape: Shape, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """A random-weight LLaVA with `shape`'s layer sizes, SDPA attention."""
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_intermediate,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
    )
    text = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.llm_layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
        pad_token_id=0,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2)
    with torch.device(device):  # built in place, in `dtype`: 7B shapes in float32 would need twice the memory
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def bench_inputs(shape: Shape, batch: int = 1, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """A prompt of text, the image's visual tokens, then text; random pixels."""
    before = torch.randint(1, 31000, (batch, TEXT_TOKENS // 2))
    after = torch.randint(1, 31000, (batch, TEXT_TOKENS - TEXT_TOKENS // 2))
    image = torch.full((batch, shape.grid_tokens), IMAGE_TOKEN)
    input_ids = torch.cat([before, image, after], dim=1)
    pixels = torch.randn(batch, 3, shape.image_size, shape.image_size, dtype=dtype)
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "pixel_values": pixels.to(device)}  # fmt: skip


def prefill_flops(shape: Shape, tokens_per_layer: list[int]) -> float:
    """Analytic multiply-add FLOPs (x2) of the LLM prefill: projections, attention scores and values, MLP."""
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    total = 0.0
    for n in tokens_per_layer:
        projections = 2 * n * shape.hidden * (2 * shape.hidden + 2 * kv)
        attention = 2 * 2 * n * n * shape.hidden  # QK^T and AV over the full (unmasked) square
        mlp = 2 * 3 * n * shape.hidden * shape.intermediate
        total += projections + attention + mlp
    return total


def vision_flops(shape: Shape) -> float:
    """Analytic FLOPs of encoding one image: patch embedding, every vision layer on the patches and CLS (transformers
    runs them all to return hidden states), and the two-layer projector on the grid tokens. The same for every
    method (two-pass localization encodes the image a second time, which this count leaves out)."""
    tokens, h = shape.grid_tokens + 1, shape.vision_hidden
    embedding = 2 * shape.grid_tokens * 3 * shape.patch_size**2 * h
    per_layer = 2 * tokens * h * 4 * h + 2 * 2 * tokens * tokens * h + 2 * 2 * tokens * h * shape.vision_intermediate
    projector = 2 * shape.grid_tokens * (h * shape.hidden + shape.hidden * shape.hidden)
    return embedding + shape.vision_layers * per_layer + projector


def kv_cache_bytes(shape: Shape, tokens_per_layer: list[int], dtype: torch.dtype, batch: int = 1) -> int:
    """Keys and values of every layer after prefill."""
    head_dim = shape.hidden // shape.heads
    element = torch.tensor([], dtype=dtype).element_size()
    return sum(2 * batch * n * shape.kv_heads * head_dim * element for n in tokens_per_layer)

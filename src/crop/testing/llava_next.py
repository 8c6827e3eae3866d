"""Tiny LLaVA-NeXT models built from configs with random weights: for tests, no downloads.

They have the real classes and processor of LLaVA-NeXT (any-resolution tiles, unpadding, `image_newline`), only
small: a `side x side` base grid (`side = image_size / patch_size`) and a few tiles of the same size per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)
from transformers.models.llava_next import LlavaNextImageProcessorPil

from crop.testing.llava import CHAT_TEMPLATE, CLIP_MEAN, CLIP_STD, build_tokenizer, instantiate, tower_configs


def default_pinpoints(image_size: int) -> list[list[int]]:
    """Tile layouts `(height, width)` of 1x2, 2x1 and 2x2 tiles of `image_size` pixels."""
    return [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]


def build_next_processor(
    image_size: int = 56,
    patch_size: int = 14,
    pinpoints: list[list[int]] | None = None,
    words: list[str] | None = None,
) -> LlavaNextProcessor:
    """A LLaVA-NeXT processor (PIL backend): base image resized to a square, tiles of `image_size` pixels."""
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints or default_pinpoints(image_size),
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(words),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_next_model(
    image_size: int = 56,
    patch_size: int = 14,
    pinpoints: list[list[int]] | None = None,
    text_layers: int = 4,
    text_hidden: int = 64,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    initializer_range: float = 0.1,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    words: list[str] | None = None,
) -> LlavaNextForConditionalGeneration:
    """A random-weight float32 LLaVA-NeXT in eval mode: a small CLIP tower and a small Llama (GQA 4:2)."""
    tokenizer = build_tokenizer(words)
    vision, text = tower_configs(
        tokenizer, image_size, patch_size, vision_hidden, vision_layers, text_hidden, text_layers, initializer_range
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints or default_pinpoints(image_size),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        initializer_range=initializer_range,
    )
    return instantiate(LlavaNextForConditionalGeneration, config, tokenizer, attn_implementation, seed)


def next_inputs(
    processor: LlavaNextProcessor, images: Sequence[Image.Image], questions: Sequence[str]
) -> dict[str, Any]:
    """Left-padded batch inputs (`input_ids`, `attention_mask`, `pixel_values`, `image_sizes`), one image each."""
    prompts = [f"USER: <image>\n{question} ASSISTANT:" for question in questions]
    batch = processor(images=list(images), text=prompts, return_tensors="pt", padding=True, padding_side="left")
    return dict(batch)

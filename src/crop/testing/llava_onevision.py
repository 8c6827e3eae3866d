"""Tiny LLaVA-OneVision models built from configs with random weights: for tests, no downloads.

The real classes (SigLIP tower, Qwen2 LLM, any-resolution tiles, unpadding, anyres-max downsampling, newlines),
only small: a `side x side` base grid (`side = image_size / patch_size`) and up to 4x4 tiles of `image_size`
pixels, so that a large enough image exceeds `anyres_max_9` and its high-res grid is downsampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from crop.models.llava_onevision import LlavaOnevisionImageTextProcessor
from crop.testing.llava import CHAT_TEMPLATE, CLIP_MEAN, CLIP_STD, build_tokenizer


def onevision_pinpoints(image_size: int) -> list[list[int]]:
    """Every tile layout from 1x1 to 4x4 tiles of `image_size` pixels (the real model lists 1x1 to 6x6)."""
    return [[image_size * rows, image_size * cols] for rows in range(1, 5) for cols in range(1, 5)]


def build_onevision_processor(image_size: int = 32, patch_size: int = 8) -> LlavaOnevisionImageTextProcessor:
    """A LLaVA-OneVision processor (PIL image processor, no video): base image squashed to `image_size`, tiles
    of that size; `(image_size / patch_size)**2` tokens per crop (SigLIP: no CLS)."""
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=onevision_pinpoints(image_size),
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )  # fmt: skip
    return LlavaOnevisionImageTextProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(),
        num_image_tokens=(image_size // patch_size) ** 2, vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    )  # fmt: skip


def build_onevision_model(
    image_size: int = 32,
    patch_size: int = 8,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    text_layers: int = 4,
    text_hidden: int = 64,
    initializer_range: float = 0.1,
) -> LlavaOnevisionForConditionalGeneration:
    """A random-weight float32 LLaVA-OneVision in eval mode: a 2-layer SigLIP tower and a Qwen2 LLM (GQA 4:2)."""
    tokenizer = build_tokenizer()
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
        patch_size=patch_size, vision_use_head=False,
    )  # fmt: skip
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        initializer_range=initializer_range,
    )  # fmt: skip
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=onevision_pinpoints(image_size), vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
    )  # fmt: skip
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.float().eval()


def onevision_inputs(
    processor: LlavaOnevisionImageTextProcessor, images: Sequence[Image.Image], questions: Sequence[str]
) -> dict[str, Any]:
    """Left-padded batch inputs (`input_ids`, `attention_mask`, `pixel_values`, `image_sizes`), one image each."""
    prompts = [f"USER: <image>\n{question} ASSISTANT:" for question in questions]
    batch = processor(images=list(images), text=prompts, return_tensors="pt", padding=True, padding_side="left")
    return dict(batch)

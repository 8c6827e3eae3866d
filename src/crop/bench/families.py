"""The benchmarked model and prompt of a shape, per family, built from configs offline with random weights (speed
does not depend on weight values). LLaVA-1.5 prompts are written as token ids; LLaVA-NeXT and Qwen2.5-VL prompts
come from the family's real processor (with the tiny word-level tokenizer of `crop.testing`), so the image's tokens,
tiles and grid sizes are what the model expects."""

from __future__ import annotations

import functools
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    Qwen2_5_VLConfig,
)
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig

from crop.bench.shapes import NEXT_PINPOINTS, Shape

IMAGE_TOKEN = 32000
TEXT_TOKENS = 40
"""Prompt text around the image: LLaVA-1.5's system prompt and a short question are about this long."""
QUESTION = " ".join(["what", "is", "written", "on", "the", "sign"] * 6)
"""The processor-built prompts' question: about `TEXT_TOKENS` tokens of text with the chat template."""


def build_bench_model(shape: Shape, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """A random-weight model of `shape`'s family and layer sizes, SDPA attention, built in place in `dtype`
    (7B shapes in float32 would need twice the memory)."""
    if shape.family == "qwen2_5_vl":
        config = _qwen_config(shape)
    else:
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
            max_position_embeddings=8192,
            pad_token_id=0,
        )
        if shape.family == "llava_next":
            config = LlavaNextConfig(
                vision_config=vision, text_config=text, image_grid_pinpoints=NEXT_PINPOINTS[shape.image_size],
                image_token_index=_next_processor(shape).tokenizer.convert_tokens_to_ids("<image>"),
                vision_feature_layer=-2, vision_feature_select_strategy="default",
            )  # fmt: skip
        else:
            config = LlavaConfig(
                vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2
            )
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def bench_inputs(shape: Shape, batch: int = 1, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """One prompt per row: text, the image's visual tokens, then text; random pixels."""
    if shape.family == "llava":
        before = torch.randint(1, 31000, (batch, TEXT_TOKENS // 2))
        after = torch.randint(1, 31000, (batch, TEXT_TOKENS - TEXT_TOKENS // 2))
        image = torch.full((batch, shape.grid_tokens), IMAGE_TOKEN)
        input_ids = torch.cat([before, image, after], dim=1)
        pixels = torch.randn(batch, 3, shape.image_size, shape.image_size, dtype=dtype)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels}
    else:
        width, height = shape.image or (shape.image_size, shape.image_size)
        seeded = torch.Generator().manual_seed(0)
        pixels = torch.randint(0, 255, (height, width, 3), dtype=torch.uint8, generator=seeded)
        images = [Image.fromarray(pixels.numpy())] * batch
        if shape.family == "qwen2_5_vl":
            from crop.testing.qwen2_vl import qwen_inputs

            inputs = qwen_inputs(_qwen_processor(shape), images, [QUESTION] * batch)
        else:
            from crop.testing.llava_next import next_inputs

            inputs = next_inputs(_next_processor(shape), images, [QUESTION] * batch)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return {key: value.to(device) for key, value in inputs.items()}


@functools.cache
def bench_clip(shape: Shape, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """CDPruner's CLIP text tower and image projection for `shape`'s vision tower, random weights: CLIP ViT-L's
    text shapes (12 layers of 768, 77 positions, projections to 768) for the 7B shapes, small ones otherwise; the
    word-level tokenizer of `crop.testing` (tokenizing is not what is measured)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from crop.strategies.cdpruner import ClipText
    from crop.testing.llava import build_tokenizer

    tokenizer = build_tokenizer(QUESTION.split())
    large = shape.vision_hidden >= 1024
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768 if large else 32, intermediate_size=3072 if large else 64,
        num_hidden_layers=12 if large else 2, num_attention_heads=12 if large else 2, max_position_embeddings=77,
        projection_dim=768 if large else 16, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    with torch.device(device):
        text_model = CLIPTextModelWithProjection(config).to(dtype).eval()
        projection = torch.nn.Linear(shape.vision_hidden, config.projection_dim, bias=False).to(dtype)
    return ClipText(text_model, projection, tokenizer)


def _qwen_processor(shape: Shape) -> Any:
    from crop.testing.qwen2_vl import build_qwen_processor

    width, height = shape.image or (shape.image_size, shape.image_size)
    return build_qwen_processor(min_pixels=width * height, max_pixels=width * height, family="qwen2_5_vl")


def _next_processor(shape: Shape) -> Any:
    from crop.testing.llava_next import build_next_processor

    return build_next_processor(shape.image_size, shape.patch_size, NEXT_PINPOINTS[shape.image_size])


def _qwen_config(shape: Shape) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL with `shape`'s sizes; its vision tower has 8x8-patch window attention in every layer (the real
    tower's four full-attention layers are left out with the depth it is cut to)."""
    tokenizer = _qwen_processor(shape).tokenizer
    head_dim = shape.hidden // shape.heads
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # 7B's (16, 24, 24) for head_dim 128
    section[0] += head_dim // 2 - sum(section)
    text = Qwen2_5_VLTextConfig(
        vocab_size=shape.vocab or len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.llm_layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=32768, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section},
    )  # fmt: skip
    vision = Qwen2_5_VLVisionConfig(
        depth=shape.vision_layers, hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
        num_heads=shape.vision_heads, out_hidden_size=shape.hidden, patch_size=shape.patch_size, window_size=112,
        fullatt_block_indexes=[],
    )  # fmt: skip
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )

"""A tiny Qwen3-VL built from config with random weights: for tests, no downloads.

It has the real model class, DeepStack (features of `deepstack_layers` vision blocks added to the first LLM layers'
hidden states at the visual positions), per-head q/k norms and interleaved M-RoPE, only small. The processor is
`Qwen3VLImageTextProcessor` (in `crop.models.qwen3_vl`: `Qwen3VLProcessor` without the video slot, which needs
torchvision) with the PIL image processor; images resize to multiples of 32 pixels (16-pixel patches, 2x2 merge).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig, Qwen3VLVisionConfig

from crop.models.qwen3_vl import Qwen3VLImageTextProcessor
from crop.testing.llava import CLIP_MEAN, CLIP_STD
from crop.testing.qwen2_vl import QWEN_CHAT_TEMPLATE, build_qwen_tokenizer

PATCH = 16
MIN_PIXELS = 64 * 64
MAX_PIXELS = 32 * 32 * 64


def build_qwen3_processor(min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> Qwen3VLImageTextProcessor:
    """A Qwen3-VL-style processor (PIL image processor, no video): images resize to multiples of 32 pixels within
    the limits, one `<|image_pad|>` per merged 2x2 block of 16-pixel patches (224x112 -> 7x4 = 28 tokens)."""
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=PATCH, merge_size=2, temporal_patch_size=2,
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )  # fmt: skip
    return Qwen3VLImageTextProcessor(
        image_processor=image_processor, tokenizer=build_qwen_tokenizer(), chat_template=QWEN_CHAT_TEMPLATE
    )


def build_qwen3_model(
    attn_implementation: str = "sdpa",
    seed: int = 0,
    text_layers: int = 4,
    text_hidden: int = 64,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    deepstack_layers: tuple[int, ...] = (0, 1),
    initializer_range: float = 0.1,
) -> Qwen3VLForConditionalGeneration:
    """A random-weight Qwen3-VL (float32, eval): a `vision_layers`-block ViT whose blocks `deepstack_layers` feed
    DeepStack (so the LLM's first `len(deepstack_layers)` layers get visual features added), a Qwen3 LLM with GQA
    4:2 and head dim 16 (M-RoPE sections 2, 3, 3)."""
    tokenizer = build_qwen_tokenizer()
    head_dim = text_hidden // text_heads
    text: dict[str, Any] = {
        "vocab_size": len(tokenizer), "hidden_size": text_hidden, "intermediate_size": 2 * text_hidden,
        "num_hidden_layers": text_layers, "num_attention_heads": text_heads, "num_key_value_heads": text_kv_heads,
        "head_dim": head_dim, "max_position_embeddings": 4096, "initializer_range": initializer_range,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 3, 3],
                            "mrope_interleaved": True},
        "bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }  # fmt: skip
    vision = Qwen3VLVisionConfig(
        depth=vision_layers, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
        patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text_hidden,
        num_position_embeddings=64, deepstack_visual_indexes=list(deepstack_layers),
        initializer_range=initializer_range,
    )  # fmt: skip
    config = Qwen3VLConfig(
        text_config=Qwen3VLTextConfig(**text),
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.pad_token_id
    return model.float().eval()

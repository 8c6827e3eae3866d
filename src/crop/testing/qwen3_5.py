"""A tiny Qwen3.5 built from config with random weights: for tests, no downloads.

It has the real model class and its hybrid LLM: Gated DeltaNet layers (linear attention: a causal convolution and a
recurrent state per layer, no KV cache) between full-attention layers (gated queries, per-head q/k norms, partial
rotary over interleaved M-RoPE), only small. The vision side and the processor are Qwen3-VL's without DeepStack
(`Qwen3VLImageTextProcessor`, PIL images resized to multiples of 32 pixels).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig, Qwen3_5VisionConfig

from crop.testing.qwen2_vl import build_qwen_tokenizer
from crop.testing.qwen3_vl import PATCH, build_qwen3_processor

LAYER_TYPES = ("linear_attention", "full_attention", "linear_attention", "full_attention", "linear_attention")
"""Both kinds alternate, so that methods reading layer K-1 find full attention at K = 2 and 4."""
RELEASED_PATTERN = ("linear_attention",) * 3 + ("full_attention",)
"""The released models' pattern: every fourth layer full attention."""
build_qwen3_5_processor = build_qwen3_processor


def build_qwen3_5_model(
    attn_implementation: str = "sdpa",
    seed: int = 0,
    layer_types: Sequence[str] = LAYER_TYPES,
    text_hidden: int = 64,
    initializer_range: float = 0.1,
) -> Qwen3_5ForConditionalGeneration:
    """A random-weight Qwen3.5 (float32, eval): a 2-block ViT and an LLM whose layers are `layer_types` (Gated
    DeltaNet for "linear_attention": 2 key and 4 value heads of 16, kernel 4; "full_attention": 4 query heads on 2
    KV heads of 16, a quarter of each head rotated, M-RoPE sections 1, 1, 0)."""
    tokenizer = build_qwen_tokenizer()
    text = Qwen3_5TextConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
        num_hidden_layers=len(layer_types), layer_types=list(layer_types), num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, max_position_embeddings=4096,
        initializer_range=initializer_range, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "mrope_section": [1, 1, 0],
                         "mrope_interleaved": True, "partial_rotary_factor": 0.25},
    )  # fmt: skip
    vision = Qwen3_5VisionConfig(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=text_hidden, num_position_embeddings=64,
        initializer_range=initializer_range,
    )  # fmt: skip
    config = Qwen3_5Config(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3_5ForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.pad_token_id
    return model.float().eval()

"""A tiny random-weight CLIP (text and vision towers with their projections) with crop's word-level tokenizer: what
CDPruner reads beside a tiny LLaVA, for tests; no downloads."""

from __future__ import annotations

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from crop.testing.llava import build_tokenizer

CONTEXT = 8
"""The tiny text tower's context length: short questions' token ids span one or two segments."""


def tiny_clip(vision_hidden: int = 32, seed: int = 0) -> tuple[CLIPModel, object]:
    """A random-weight CLIP (text tower of `CONTEXT` positions, projections to 16; a vision tower of width
    `vision_hidden`, the VLM's, whose `visual_projection` CDPruner applies) and a word-level tokenizer."""
    tokenizer = build_tokenizer()
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=CONTEXT, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          projection_dim=16)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=28, patch_size=14, projection_dim=16)  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    return model.eval(), tokenizer

"""Tiny InternVL models built from configs with random weights: for tests, no downloads.

The real classes (InternViT with its CLS token, pixel shuffle, the MLP projector, a Qwen2 or Qwen3 LLM) and the
real tiling (`GotOcr2ImageProcessorPil` with `crop_to_patches`: up to `max_tiles` tiles plus a thumbnail), only
small: 64-pixel tiles of 8-pixel patches, so each crop yields a 4x4 grid of tokens after pixel shuffle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

from crop.models.internvl import InternVLImageTextProcessor
from crop.testing.llava import CHAT_TEMPLATE, CLIP_MEAN, CLIP_STD, SPECIAL_TOKENS, WORDS

TILE = 64
PATCH = 8
IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
INTERNVL_TEMPLATE = CHAT_TEMPLATE.replace("<image>", "<IMG_CONTEXT>")


def build_internvl_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `WORDS` with InternVL's image tokens (`<img>`, `</img>`, `<IMG_CONTEXT>`)."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + list(dict.fromkeys(WORDS)))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens=IMAGE_TOKENS, padding_side="left",
    )  # fmt: skip


def build_internvl_processor(max_tiles: int = 6) -> InternVLImageTextProcessor:
    """An InternVL processor (PIL image processor, no video): up to `max_tiles` 64-pixel tiles plus a thumbnail,
    16 `<IMG_CONTEXT>` tokens per crop."""
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1, max_patches=max_tiles,
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )  # fmt: skip
    return InternVLImageTextProcessor(
        image_processor=image_processor, tokenizer=build_internvl_tokenizer(),
        image_seq_length=(TILE // PATCH // 2) ** 2, chat_template=INTERNVL_TEMPLATE,
    )  # fmt: skip


def build_internvl_model(
    attn_implementation: str = "sdpa",
    seed: int = 0,
    text_model: str = "qwen2",
    text_layers: int = 4,
    text_hidden: int = 64,
    initializer_range: float = 0.1,
) -> InternVLForConditionalGeneration:
    """A random-weight float32 InternVL in eval mode: a 2-layer InternViT and a Qwen2 LLM (InternVL3) or a Qwen3
    LLM with per-head q/k norms (InternVL3.5), GQA 4:2."""
    tokenizer = build_internvl_tokenizer()
    vision = InternVLVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=TILE,
        patch_size=PATCH, initializer_range=initializer_range,
    )  # fmt: skip
    text_options: dict[str, Any] = {
        "vocab_size": len(tokenizer), "hidden_size": text_hidden, "intermediate_size": 2 * text_hidden,
        "num_hidden_layers": text_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 2048, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "initializer_range": initializer_range,
    }  # fmt: skip
    configs = {"qwen2": Qwen2Config, "qwen3": Qwen3Config}
    if text_model not in configs:
        raise ValueError(f"text_model must be one of {sorted(configs)}, got {text_model!r}")
    if text_model == "qwen3":
        text_options["head_dim"] = text_hidden // 4
    config = InternVLConfig(
        vision_config=vision, text_config=configs[text_model](**text_options),
        image_token_id=tokenizer.context_image_token_id, image_seq_length=(TILE // PATCH // 2) ** 2,
        downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
    )  # fmt: skip
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.float().eval()


def internvl_inputs(
    processor: InternVLImageTextProcessor, images: Sequence[Image.Image], questions: Sequence[str]
) -> dict[str, Any]:
    """Left-padded batch inputs (`input_ids`, `attention_mask`, `pixel_values`, `image_tiles`), one image each."""
    prompts = [f"USER: <IMG_CONTEXT>\n{question} ASSISTANT:" for question in questions]
    batch = processor(images=list(images), text=prompts, return_tensors="pt", padding=True, padding_side="left")
    return dict(batch)

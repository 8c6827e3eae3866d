"""Tiny Qwen2-VL and Qwen2.5-VL models built from configs with random weights: for tests, no downloads.

They have the real model classes, M-RoPE positions (`get_rope_index`, `mm_token_type_ids`) and dynamic-resolution
image processing of Qwen2-VL / Qwen2.5-VL, only small. Their answers are meaningless: random weights.

The processors use the PIL image processor (`Qwen2VLImageProcessorPil`) and no video processor: transformers 5.x
cannot construct `Qwen2VLProcessor` without torchvision (its video processor needs it), so `build_qwen_processor`
returns the Qwen family's `Qwen2VLImageTextProcessor` / `Qwen2_5_VLImageTextProcessor` (in `crop.models.qwen2_vl`),
subclasses without the video slot. They save with `save_pretrained` and load back with their own `from_pretrained`.
`Qwen2VLProcessor.from_pretrained` fails on them (no video processor) and `AutoProcessor.from_pretrained` silently
returns the bare tokenizer (transformers 5.24); `crop.loading.load_model` finds them (the family registers them).
Models load with `from_pretrained` / `AutoModelForImageTextToText` (pass `attn_implementation`: it is not saved).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from crop.models.qwen2_vl import Qwen2_5_VLImageTextProcessor, Qwen2VLImageTextProcessor
from crop.testing.llava import CLIP_MEAN, CLIP_STD, WORDS

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
]
NEWLINE = "\n"
QWEN_WORDS = ["user", "assistant", "system"]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or item['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 64


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def build_qwen_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with the Qwen special tokens, `\\n`, `user`/`assistant`/`system` and `WORDS`."""
    vocabulary = QWEN_SPECIAL_TOKENS + [NEWLINE] + list(dict.fromkeys(QWEN_WORDS + list(words or WORDS)))
    tokenizer = Tokenizer(models.WordLevel(vocab={token: i for i, token in enumerate(vocabulary)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.add_special_tokens(QWEN_SPECIAL_TOKENS)
    # "\n" is matched before the whitespace split drops it, and kept by `skip_special_tokens` decoding.
    tokenizer.add_tokens([AddedToken(NEWLINE, normalized=False, special=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        padding_side="left",
    )


def build_qwen_processor(
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    family: str = "qwen2_vl",
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    words: list[str] | None = None,
) -> Qwen2VLProcessor | Qwen2_5_VLProcessor:
    """A Qwen-style processor (PIL image processor, no video); images resize to multiples of 28 within the limits.

    With the defaults (28 * 28 * 4 <= pixels <= 28 * 28 * 64), `image_grid_thw` (t, h, w in 14-pixel patches) and
    the merged token grid (h/2 x w/2, one `<|image_pad|>` each) are, for PIL sizes width x height:
    224x112 -> (1, 8, 16), 4x8 = 32 tokens; 112x168 -> (1, 12, 8), 6x4 = 24 tokens; 200x160 -> (1, 12, 14),
    6x7 = 42 tokens; 448x448 -> (1, 16, 16), 8x8 = 64 tokens (scaled down); 28x28 -> (1, 4, 4), 2x2 = 4 (scaled up).
    """
    _check_family(family)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor_class = Qwen2VLImageTextProcessor if family == "qwen2_vl" else Qwen2_5_VLImageTextProcessor
    return processor_class(
        image_processor=image_processor, tokenizer=build_qwen_tokenizer(words), chat_template=QWEN_CHAT_TEMPLATE
    )


def build_qwen_model(
    family: str = "qwen2_vl",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    text_layers: int = 4,
    text_hidden: int = 64,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    mrope_section: Sequence[int] = (2, 3, 3),
    initializer_range: float = 0.1,
    vocab_size: int | None = None,
    words: list[str] | None = None,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_intermediate: int | None = None,
    vision_heads: int = 2,
    vision_mlp_ratio: int = 2,
) -> Qwen2VLForConditionalGeneration | Qwen2_5_VLForConditionalGeneration:
    """A random-weight Qwen2-VL / Qwen2.5-VL (float32, eval) with a small ViT and a small Qwen2 LLM (GQA 4:2).

    `mrope_section` must sum to half the text head dim (`text_hidden / text_heads / 2`). The head counts and
    widths can be raised to real shapes (the benchmark builds a Qwen2-VL-2B-shaped localizer this way).
    Qwen2.5-VL's vision tower uses window attention (112-pixel windows: 4x4 merged tokens) in every block but the
    last, which attends globally.
    """
    _check_family(family)
    tokenizer = build_qwen_tokenizer(words)
    head_dim = text_hidden // text_heads
    if sum(mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {list(mrope_section)} must sum to head_dim / 2 = {head_dim // 2}")
    text_kwargs: dict[str, Any] = {
        "vocab_size": vocab_size or len(tokenizer),
        "hidden_size": text_hidden,
        "intermediate_size": text_intermediate or 2 * text_hidden,
        "num_hidden_layers": text_layers,
        "num_attention_heads": text_heads,
        "num_key_value_heads": text_kv_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(mrope_section)},
        "bos_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "initializer_range": initializer_range,
    }
    vision_kwargs: dict[str, Any] = {
        "depth": vision_layers,
        "num_heads": vision_heads,
        "patch_size": patch_size,
        "spatial_merge_size": merge_size,
        "temporal_patch_size": temporal_patch_size,
        "initializer_range": initializer_range,
    }
    if family == "qwen2_vl":
        vision = Qwen2VLVisionConfig(
            embed_dim=vision_hidden, hidden_size=text_hidden, mlp_ratio=vision_mlp_ratio, **vision_kwargs
        )
        config_class, text_config_class, model_class = (
            Qwen2VLConfig,
            Qwen2VLTextConfig,
            Qwen2VLForConditionalGeneration,
        )
    else:
        vision = Qwen2_5_VLVisionConfig(
            hidden_size=vision_hidden,
            intermediate_size=vision_mlp_ratio * vision_hidden,
            out_hidden_size=text_hidden,
            window_size=112,
            fullatt_block_indexes=[vision_layers - 1],
            **vision_kwargs,
        )
        config_class, text_config_class, model_class = (
            Qwen2_5_VLConfig,
            Qwen2_5_VLTextConfig,
            Qwen2_5_VLForConditionalGeneration,
        )
    config = config_class(
        text_config=text_config_class(**text_kwargs),
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        initializer_range=initializer_range,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.pad_token_id
    return model.float().eval()


def qwen_prompt(processor: Qwen2VLProcessor | Qwen2_5_VLProcessor, question: str) -> str:
    """The chat-template prompt for one image followed by `question`, ending with the assistant turn."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def qwen_inputs(
    processor: Qwen2VLProcessor | Qwen2_5_VLProcessor,
    images: Sequence[Image.Image],
    questions: Sequence[str],
) -> dict:
    """Left-padded processor output for (image, question) pairs: input_ids, attention_mask, pixel_values,
    image_grid_thw and mm_token_type_ids (pass all of them to `forward` and `generate`)."""
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images for {len(questions)} questions")
    prompts = [qwen_prompt(processor, question) for question in questions]
    batch = processor(images=list(images), text=prompts, padding=True, padding_side="left", return_tensors="pt")
    return dict(batch)

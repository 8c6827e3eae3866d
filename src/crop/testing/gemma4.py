"""A tiny Gemma 4 built from config with random weights: for tests, no downloads.

It has the real model class and what Gemma 4 brings: sliding-window layers (window 8 here, so that it bites on
short prompts) between full-attention layers, image tokens attending to each other both ways in the sliding
layers, per-layer embeddings (PLE) fed to every layer, q/k/v norms, proportional rotary on the full layers; and the
real vision side: aspect-preserving resize to whole pooling windows, 3x3 pooling of 8-pixel patches into soft
tokens, only small. No audio, no KV sharing, no experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import Gemma4Config, Gemma4ForConditionalGeneration, PreTrainedTokenizerFast
from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig, Gemma4VisionConfig
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

from crop.models.gemma4 import Gemma4ImageTextProcessor
from crop.testing.llava import WORDS

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<image_soft_token>", "<start_of_image>", "<end_of_image>",
                  "<audio_soft_token>", "<start_of_audio>", "<end_of_audio>", "<|video|>"]  # fmt: skip
LAYER_TYPES = ("sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention")
PATCH = 8
POOLING = 3
WINDOW = 8
TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image_soft_token>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %} "
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_gemma4_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `WORDS` with Gemma 4's image tokens."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + list(dict.fromkeys(WORDS)))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                              "eoi_token": "<end_of_image>", "audio_token": "<audio_soft_token>",
                              "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>"},
        padding_side="left",
    )  # fmt: skip


def build_gemma4_processor(max_soft_tokens: int = 70) -> Gemma4ImageTextProcessor:
    """A Gemma 4 processor (PIL image processor, no video or audio): images resized, keeping their aspect ratio,
    to at most `max_soft_tokens` 3x3 windows of 8-pixel patches, one soft token per window."""
    image_processor = Gemma4ImageProcessorPil(patch_size=PATCH, pooling_kernel_size=POOLING,
                                              max_soft_tokens=max_soft_tokens)  # fmt: skip
    return Gemma4ImageTextProcessor(
        image_processor=image_processor, tokenizer=build_gemma4_tokenizer(), image_seq_length=max_soft_tokens,
        chat_template=TEMPLATE,
    )  # fmt: skip


def build_gemma4_model(
    attn_implementation: str = "sdpa",
    seed: int = 0,
    layer_types: Sequence[str] = LAYER_TYPES,
    text_hidden: int = 64,
    per_layer_input: int = 8,
    initializer_range: float = 0.1,
) -> Gemma4ForConditionalGeneration:
    """A random-weight Gemma 4 (float32, eval): a 2-layer vision tower and an LLM whose layers are `layer_types`
    (sliding window 8, image tokens bidirectional there), 4 query heads on 2 KV heads of 16 (32 on the full
    layers), per-layer embeddings of `per_layer_input` (0: none)."""
    tokenizer = build_gemma4_tokenizer()
    text = Gemma4TextConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
        num_hidden_layers=len(layer_types), layer_types=list(layer_types), num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=WINDOW,
        use_bidirectional_attention="vision", vocab_size_per_layer_input=len(tokenizer),
        hidden_size_per_layer_input=per_layer_input, max_position_embeddings=4096,
        initializer_range=initializer_range, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    vision = Gemma4VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, pooling_kernel_size=POOLING, patch_size=PATCH, position_embedding_size=64,
        initializer_range=initializer_range,
    )  # fmt: skip
    config = Gemma4Config(
        text_config=text, vision_config=vision, audio_config=None,
        image_token_id=tokenizer.image_token_id, boi_token_id=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_id=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        audio_token_id=tokenizer.convert_tokens_to_ids("<audio_soft_token>"),
        boa_token_id=tokenizer.convert_tokens_to_ids("<start_of_audio>"),
        eoa_token_index=tokenizer.convert_tokens_to_ids("<end_of_audio>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video|>"),
    )  # fmt: skip
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma4ForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.float().eval()


def gemma4_inputs(
    processor: Gemma4ImageTextProcessor, images: Sequence[Image.Image], questions: Sequence[str]
) -> dict[str, Any]:
    """Left-padded batch inputs (`input_ids`, `attention_mask`, `mm_token_type_ids`, `pixel_values`,
    `image_position_ids`), one image each."""
    prompts = [f"USER: <image_soft_token>\n{question} ASSISTANT:" for question in questions]
    batch = processor(images=list(images), text=prompts, return_tensors="pt", padding=True, padding_side="left")
    return dict(batch)

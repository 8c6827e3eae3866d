"""Tiny LLaVA models built from configs with random weights: for tests and the offline demo, no downloads.

They have the real classes, processor and loading path of LLaVA-1.5 (`save_pretrained` / `from_pretrained`),
only small. Their answers are meaningless: random weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.llava import LlavaImageProcessorPil

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
WORDS = [
    "USER",
    "ASSISTANT",
    ":",
    "?",
    ".",
    ",",
    "'",
    "the",
    "a",
    "an",
    "is",
    "are",
    "of",
    "on",
    "in",
    "what",
    "which",
    "where",
    "how",
    "many",
    "colour",
    "color",
    "shape",
    "digit",
    "letter",
    "word",
    "number",
    "object",
    "objects",
    "left",
    "right",
    "top",
    "bottom",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "black",
    "white",
    "circle",
    "square",
    "triangle",
    "there",
    "written",
    "sign",
    "image",
    "picture",
    "it",
    "this",
    "that",
    "yes",
    "no",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "zero",
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    "xmin",
    "ymin",
    "xmax",
    "ymax",
    "[",
    "]",
    "blocks",
    "grid",
    "region",
    "question",
    "answer",
    "with",
    "contain",
    "contains",
    "needed",
    "to",
    "and",
    "from",
    "numbered",
    "divided",
    "into",
    "x",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %} "
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a small fixed vocabulary (`WORDS` by default), built offline."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + list(dict.fromkeys(words or WORDS)))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def build_processor(
    image_size: int = 168,
    patch_size: int = 14,
    select_strategy: str = "default",
    words: list[str] | None = None,
) -> LlavaProcessor:
    """A LLaVA-1.5-style processor: resize shortest edge, center crop, CLIP normalisation, chat template."""
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_pad=False,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(words),
        patch_size=patch_size,
        vision_feature_select_strategy=select_strategy,
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(
    image_size: int = 168,
    patch_size: int = 14,
    text_layers: int = 4,
    text_hidden: int = 64,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    vocab_size: int | None = None,
    initializer_range: float = 0.1,
    select_strategy: str = "default",
    vision_hidden: int = 32,
    vision_layers: int = 2,
    words: list[str] | None = None,
) -> LlavaForConditionalGeneration:
    """A random-weight LLaVA with a `(image_size/patch_size)^2` token grid and a small Llama (GQA 4:2)."""
    tokenizer = build_tokenizer(words)
    vision, text = tower_configs(
        tokenizer, image_size, patch_size, vision_hidden, vision_layers, text_hidden, text_layers, initializer_range
    )
    if vocab_size is not None:
        text.vocab_size = vocab_size
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy=select_strategy,
        initializer_range=initializer_range,
    )
    return instantiate(LlavaForConditionalGeneration, config, tokenizer, attn_implementation, seed)


def tower_configs(
    tokenizer: PreTrainedTokenizerFast,
    image_size: int,
    patch_size: int,
    vision_hidden: int,
    vision_layers: int,
    text_hidden: int,
    text_layers: int,
    initializer_range: float,
) -> tuple[CLIPVisionConfig, LlamaConfig]:
    """The small CLIP tower and Llama (GQA 4:2) configs the tiny LLaVA-family models share."""
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=2 if vision_hidden < 64 else 4,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=initializer_range,
    )
    return vision, text


def instantiate(model_class: type, config: Any, tokenizer: PreTrainedTokenizerFast, attn: str, seed: int) -> Any:
    """A seeded random-weight float32 model of `model_class` in eval mode, generating with the tokenizer's pad/eos."""
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def save_tiny(directory: str | Path, **model_kwargs: Any) -> Path:
    """Build a tiny model and its processor and save both to `directory` (HF format)."""
    directory = Path(directory)
    processor_kwargs = {
        k: model_kwargs[k] for k in ("image_size", "patch_size", "select_strategy") if k in model_kwargs
    }
    build_model(**model_kwargs).save_pretrained(directory)
    build_processor(**processor_kwargs).save_pretrained(directory)
    return directory

"""Shared fixtures: tiny random-weight LLaVA models (no downloads) and inputs with real left padding."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image, ImageDraw

from crop.region import Viewport
from crop.testing.llava import build_model, build_processor

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything

QUESTIONS = [
    "what digit is on the red square ?",
    "what colour is it ?",
    "how many objects are there in the image ?",
]


def make_image(width: int = 200, height: int = 160, seed: int = 0) -> Image.Image:
    """A small picture with a few coloured shapes, different per seed."""
    generator = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", (width, height), (240, 240, 240))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = (torch.rand(2, generator=generator) * torch.tensor([width - 40, height - 40])).int().tolist()
        colour = tuple(torch.randint(0, 255, (3,), generator=generator).tolist())
        draw.rectangle([x, y, x + 36, y + 36], fill=colour)
    return image


@pytest.fixture(scope="session")
def processor():
    return build_processor()


@pytest.fixture(scope="session", params=["sdpa", "eager"])
def model(request):
    torch.manual_seed(0)
    return build_model(attn_implementation=request.param)


@pytest.fixture(scope="session")
def sdpa_model():
    return build_model(attn_implementation="sdpa")


def on_grid(regions: list) -> dict:
    """`regions` given as boxes on the processed image (the token grid's frame), with the viewports that say so:
    LLaVA's processor crops each image by its size, so regions without viewports are refused."""
    return {"regions": regions, "viewports": [Viewport()] * len(regions)}


def batch_inputs(processor, size: int, padded: bool = True) -> dict:
    """Processor output for `size` (image, question) pairs; with `padded` questions differ in length, so rows
    are left-padded, otherwise all rows ask the same question."""
    images = [make_image(200 + 20 * i, 160, seed=i) for i in range(size)]
    questions = [QUESTIONS[i % len(QUESTIONS)] if padded else QUESTIONS[0] for i in range(size)]
    prompts = [f"USER: <image>\n{question} ASSISTANT:" for question in questions]
    return dict(processor(images=images, text=prompts, return_tensors="pt", padding=True, padding_side="left"))


QWEN_SIZES = [(224, 112), (112, 168), (200, 160)]  # Qwen2-VL grids 4x8, 6x4, 6x7 tokens after the 2x2 merge


def qwen_batch(processor, count: int) -> dict:
    """A left-padded Qwen2-VL batch of `count` images of different sizes and questions."""
    from crop.testing.qwen2_vl import qwen_inputs

    images = [make_image(*QWEN_SIZES[i], seed=i) for i in range(count)]
    return qwen_inputs(processor, images, [QUESTIONS[i % len(QUESTIONS)] for i in range(count)])


def qwen_row(inputs: dict, row: int) -> dict:
    """Row `row` of a Qwen2-VL batch alone, without its left padding."""
    real = inputs["attention_mask"][row].bool()
    sizes = inputs["image_grid_thw"].prod(-1).tolist()
    start = sum(sizes[:row])
    return {
        "input_ids": inputs["input_ids"][row][real][None],
        "attention_mask": torch.ones(1, int(real.sum()), dtype=torch.long),
        "mm_token_type_ids": inputs["mm_token_type_ids"][row][real][None],
        "pixel_values": inputs["pixel_values"][start : start + sizes[row]],
        "image_grid_thw": inputs["image_grid_thw"][row : row + 1],
    }

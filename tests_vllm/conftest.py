"""Shared by the vLLM tests: the shipped synthetic LLaVA saved in the layout vLLM loads, test-split samples with a
region each, and crop's own answers to compare with."""

from __future__ import annotations

import pytest
from vllm import LLM

import crop
from crop.loading import load_model
from crop.prompting import build_prompt
from crop.region import Region, Viewport
from crop.serving.pruning import PruningSettings
from crop.serving.vllm_llava import ARCHITECTURE, save_for_vllm
from crop.strategies.registry import build_method
from crop.synth.assets import SHIPPED_MODEL, model_task
from crop.synth.scene import make_sample
from crop.testing.clip import tiny_clip

NEW_TOKENS = 4
REGIONS = [[2, 2, 5, 5], [0, 0, 3, 7], [4, 1, 7, 6], [6, 6, 7, 7]]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return save_for_vllm(SHIPPED_MODEL, tmp_path_factory.mktemp("synth-vllm"))


@pytest.fixture(scope="session")
def clip_checkpoint(tmp_path_factory):
    """A tiny random CLIP beside the shipped model (its vision width), for CDPruner's `clip` setting."""
    folder = tmp_path_factory.mktemp("clip")
    width = load_model(SHIPPED_MODEL)[0].config.vision_config.hidden_size
    model, tokenizer = tiny_clip(width)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def hf_model():
    return load_model(SHIPPED_MODEL)


@pytest.fixture(scope="session")
def samples():
    return [make_sample("test", index, model_task(SHIPPED_MODEL)) for index in range(len(REGIONS))]


def engine(checkpoint, settings: dict | None) -> LLM:
    overrides = None if settings is None else {"architectures": [ARCHITECTURE], "crop": settings}
    return LLM(
        model=str(checkpoint), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
        limit_mm_per_prompt={"image": 1}, hf_overrides=overrides,
    )  # fmt: skip


def crop_answers(hf_model, samples, settings: dict | None) -> list[tuple[list[int], int]]:
    """(greedy new tokens, prompt tokens the LLM got) per sample, from crop's pruned generate, one request each
    (both stop at the end-of-sequence token, which both return)."""
    model, processor = hf_model
    if settings is None:
        method = build_method("full")
    else:
        method = PruningSettings.from_config(settings, vision_internals=True).method_object()
    pruned = crop.apply(model, processor, method=method)
    answers = []
    try:
        for sample, box in zip(samples, REGIONS, strict=True):
            prompt = build_prompt(processor, sample.question)
            inputs = dict(processor(images=[sample.image], text=[prompt], return_tensors="pt"))
            regions = [Region.from_grid(box)] if method.needs_region else None
            sequences, stats = pruned.generate(
                **inputs, regions=regions, viewports=[Viewport()], max_new_tokens=NEW_TOKENS, do_sample=False
            )
            new = sequences[0, inputs["input_ids"].shape[1] :].tolist()
            text = inputs["input_ids"].shape[1] - stats.rows[0].image_tokens
            answers.append((new, text + stats.rows[0].llm_input_tokens))
    finally:
        pruned.remove()
    return answers

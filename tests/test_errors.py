"""Bad input gets a clear error naming what was wrong and what is accepted."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_inputs, make_image
from transformers import LlamaConfig, LlamaForCausalLM

import crop
from crop.errors import ConfigError, ImageError, RegionError, UnsupportedModelError
from crop.image import load_image
from crop.testing.llava import build_model


def test_missing_image_file(tmp_path):
    with pytest.raises(ImageError, match="image not found"):
        load_image(tmp_path / "nope.png")


def test_corrupt_image_bytes(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageError, match="cannot read image"):
        load_image(path)
    with pytest.raises(ImageError, match="cannot read image"):
        load_image(b"not an image at all")


def test_ilp_layer_out_of_range(sdpa_model, processor):
    for layer in (4, 99, -1):
        with pytest.raises(ConfigError, match="4 decoder layers"):
            crop.apply(sdpa_model, processor, ilp=layer)


def test_unsupported_model_family():
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM is not supported.*LlavaForConditionalGeneration"):
        crop.apply(llm)


def test_unsupported_attention_backend():
    model = build_model()
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="'flash_attention_2' is not supported"):
        crop.apply(model)


def test_region_off_grid_in_a_call(sdpa_model, processor):
    pruned = crop.apply(sdpa_model, processor)
    try:
        with pytest.raises(RegionError, match="off the 8x8 grid"):
            pruned.generate(**batch_inputs(processor, 1), regions=[[0, 0, 8, 8]], max_new_tokens=1)
    finally:
        pruned.remove()


def test_missing_or_miscounted_regions(sdpa_model, processor):
    pruned = crop.apply(sdpa_model, processor)
    inputs = batch_inputs(processor, 2)
    try:
        with pytest.raises(ConfigError, match="no region"):
            pruned(**inputs)
        with pytest.raises(ConfigError, match="3 regions for a batch of 2"):
            pruned(**inputs, regions=[[0, 0, 1, 1]] * 3)
        with pytest.raises(ConfigError, match="no region"):
            pruned.prepare(make_image(), "what ?")
    finally:
        pruned.remove()


def test_prompt_without_image(sdpa_model, processor):
    pruned = crop.apply(sdpa_model, processor, localizer=crop.FixedLocalizer([0, 0, 1, 1]))
    text_only = processor.tokenizer(["what colour ?"], return_tensors="pt")
    try:
        with pytest.raises(ConfigError, match="exactly one image per prompt"):
            pruned(**dict(text_only))
    finally:
        pruned.remove()


def test_static_cache_is_refused(sdpa_model, processor):
    pruned = crop.apply(sdpa_model, processor, localizer=crop.FixedLocalizer([0, 0, 1, 1]))
    try:
        with pytest.raises(UnsupportedModelError, match="dynamic KV cache"):
            pruned.generate(**batch_inputs(processor, 1), cache_implementation="static", max_new_tokens=1)
    finally:
        pruned.remove()


def test_mismatched_images_and_questions(sdpa_model, processor):
    pruned = crop.apply(sdpa_model, processor, localizer=crop.FixedLocalizer([0, 0, 1, 1]))
    try:
        with pytest.raises(ConfigError, match="2 images and 1 questions"):
            pruned.prepare([make_image(), make_image()], ["what ?"])
        with pytest.raises(ValueError, match="non-empty string"):
            pruned.prepare(make_image(), "  ")
    finally:
        pruned.remove()


def test_hooks_are_inert_outside_crop_calls(sdpa_model, processor):
    inputs = batch_inputs(processor, 1)
    with torch.no_grad():
        before = sdpa_model(**inputs).logits
    pruned = crop.apply(sdpa_model, processor, localizer=crop.FixedLocalizer([0, 0, 1, 1]))
    try:
        with torch.no_grad():
            assert torch.equal(sdpa_model(**inputs).logits, before)
    finally:
        pruned.remove()

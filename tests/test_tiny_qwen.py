"""Tiny Qwen2-VL / Qwen2.5-VL models and processors (crop.testing.qwen2_vl): offline, real classes, small grids."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image
from transformers import AutoModelForImageTextToText

from crop.testing.qwen2_vl import (
    FAMILIES,
    QWEN_SPECIAL_TOKENS,
    build_qwen_model,
    build_qwen_processor,
    build_qwen_tokenizer,
    qwen_inputs,
    qwen_prompt,
)

QUESTIONS = ["what colour is the circle ?", "how many objects are there in the image ?"]
SIZES = [(224, 112), (112, 168)]  # PIL (width, height): grids (1, 8, 16) and (1, 12, 8) in 14-pixel patches


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def processor(family):
    return build_qwen_processor(family=family)


@pytest.fixture(scope="module")
def qwen_model(family):
    return build_qwen_model(family)


def batch(processor, size: int) -> dict:
    """`size` (image, question) pairs with different image sizes and question lengths (real left padding)."""
    images = [make_image(*SIZES[i % len(SIZES)], seed=i) for i in range(size)]
    return qwen_inputs(processor, images, QUESTIONS[:size])


def test_tokenizer_vocabulary_and_round_trip():
    tokenizer = build_qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS + ["\n", "user", "assistant", "system", "colour"])
    assert len(set(ids)) == len(ids) and tokenizer.unk_token_id not in ids[-5:]
    assert tokenizer.image_token == "<|image_pad|>" and tokenizer.image_token_id == ids[5]
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.padding_side) == ("<|endoftext|>", "<|im_end|>", "left")
    prompt = qwen_prompt(build_qwen_processor(), "what colour is the circle ?")
    encoded = tokenizer(prompt).input_ids
    assert tokenizer.unk_token_id not in encoded
    assert tokenizer.convert_ids_to_tokens(encoded[:4]) == ["<|im_start|>", "user", "\n", "<|vision_start|>"]
    assert tokenizer(tokenizer.decode(encoded)).input_ids == encoded


def test_chat_template_puts_the_image_before_the_question(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what ?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert (
        text == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what ?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    ("size", "grid"),
    [((224, 112), [1, 8, 16]), ((112, 168), [1, 12, 8]), ((448, 448), [1, 16, 16]), ((28, 28), [1, 4, 4])],
)
def test_grid_sizes(size, grid):
    inputs = qwen_inputs(build_qwen_processor(), [make_image(*size)], ["what ?"])
    assert inputs["image_grid_thw"].tolist() == [grid]
    assert inputs["pixel_values"].shape == (grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14)


def test_processor_batch_with_different_image_sizes(processor):
    inputs = batch(processor, 2)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"}
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 16], [1, 12, 8]]
    image_tokens = inputs["input_ids"] == processor.image_token_id
    expected = inputs["image_grid_thw"].prod(-1) // 4
    assert image_tokens.sum(-1).tolist() == expected.tolist() == [32, 24]
    assert torch.equal(inputs["mm_token_type_ids"], image_tokens.long())
    mask = inputs["attention_mask"]
    assert mask[:, -1].all() and not mask[1, 0]  # left padding: the shorter row starts with pads
    assert (inputs["input_ids"][mask == 0] == processor.tokenizer.pad_token_id).all()
    assert inputs["pixel_values"].shape[0] == inputs["image_grid_thw"].prod(-1).sum()


def test_model_config_matches_processor(family, processor, qwen_model):
    config = qwen_model.config
    assert config.model_type == family
    assert config.image_token_id == processor.image_token_id
    assert config.video_token_id == processor.video_token_id
    assert config.vision_start_token_id == processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.text_config.vocab_size == len(processor.tokenizer)
    assert config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    assert config.text_config._attn_implementation == "sdpa"
    assert qwen_model.dtype == torch.float32 and not qwen_model.training
    if family == "qwen2_5_vl":
        assert list(config.vision_config.fullatt_block_indexes) == [1]


@pytest.mark.parametrize("size", [1, 2])
def test_forward_and_generate(processor, qwen_model, size):
    inputs = batch(processor, size)
    with torch.no_grad():
        logits = qwen_model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, len(processor.tokenizer))
    out = qwen_model.generate(
        **inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    length = inputs["input_ids"].shape[1]
    assert out.sequences.shape[0] == size and length < out.sequences.shape[1] <= length + 3
    assert torch.equal(out.sequences[:, :length], inputs["input_ids"])
    # generate computes the same M-RoPE positions as a plain forward (it needs mm_token_type_ids for that)
    torch.testing.assert_close(out.logits[0], logits[:, -1], atol=1e-5, rtol=0)


def test_same_seed_same_weights(family):
    first, second, other = (build_qwen_model(family, seed=seed, text_layers=1) for seed in (3, 3, 4))
    weights, same = first.state_dict(), second.state_dict()
    assert weights.keys() == same.keys() and all(torch.equal(weights[k], same[k]) for k in weights)
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


def test_sdpa_matches_eager(family, processor, qwen_model):
    eager = build_qwen_model(family, attn_implementation="eager")
    assert eager.config.text_config._attn_implementation == "eager"
    inputs = batch(processor, 2)
    with torch.no_grad():
        sdpa_logits, eager_logits = qwen_model(**inputs).logits, eager(**inputs).logits
    real = inputs["attention_mask"].bool()  # pad rows are fully masked: their outputs are arbitrary
    torch.testing.assert_close(sdpa_logits[real], eager_logits[real], atol=1e-5, rtol=0)


def test_save_and_load_round_trip(family, processor, qwen_model, tmp_path):
    qwen_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded_processor = type(processor).from_pretrained(tmp_path)  # not AutoProcessor: see crop.testing.qwen2_vl
    assert loaded_processor.chat_template == processor.chat_template
    assert loaded_processor.image_token_id == processor.image_token_id
    inputs, loaded_inputs = batch(processor, 2), batch(loaded_processor, 2)
    assert inputs.keys() == loaded_inputs.keys()
    assert all(torch.equal(inputs[key], loaded_inputs[key]) for key in inputs)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert type(loaded) is type(qwen_model) and loaded.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, qwen_model(**inputs).logits, atol=0, rtol=0)

"""The attention localizer: relevance against explicit softmax(QK^T), box choice, fused == two-pass."""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTIONS, make_image

import crop
from crop.errors import ConfigError, LocalizerError
from crop.localize.attention import AttentionLocalizer, best_box, grid_mass, region_from_relevance
from crop.prompting import build_prompt
from crop.region import Region, Viewport
from crop.strategies.crop_fused import FusedCROP
from crop.strategies.crop_method import CROP
from crop.strategies.ilp import ILP
from crop.testing.llava import build_model

SIDE = 12


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_relevance_equals_explicit_attention_of_the_question_rows(sdpa_model, processor, layer):
    image, question = make_image(seed=1), QUESTIONS[0]
    localizer = AttentionLocalizer(sdpa_model, processor, layer=layer, rows="question")
    relevance, _ = localizer.relevance(image, question)
    eager = build_model(attn_implementation="eager")
    inputs = processor(images=image, text=build_prompt(processor, question), return_tensors="pt")
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    ids = inputs["input_ids"][0]
    visual = (ids == sdpa_model.config.image_token_id).nonzero().squeeze(1)
    rows = torch.arange(int(visual[-1]) + 1, ids.numel())
    expected = attentions[layer][0][:, rows][:, :, visual].mean(1).mean(0)
    torch.testing.assert_close(relevance.reshape(-1), expected, atol=1e-6, rtol=1e-5)
    assert sdpa_model.config.text_config._attn_implementation == "sdpa"


def test_best_box_prefers_concentrated_mass_and_flat_gives_everything():
    mass = torch.full((8, 8), 0.01)
    mass[2:4, 5:7] = 1.0
    assert best_box(mass / mass.sum(), penalty=0.9) == (5, 2, 6, 3)
    assert best_box(mass / mass.sum(), penalty=0.0) == (0, 0, 7, 7)
    assert best_box(torch.full((8, 8), 1 / 64), penalty=0.5) == (0, 0, 7, 7)
    relevance = torch.zeros(24, 24)
    relevance[3:6, 15:21] = 1.0  # blocks x 5..6, y 1
    assert grid_mass(relevance)[1, 5:7].sum() == pytest.approx(1.0)
    assert region_from_relevance(relevance, None, 0.9).to_grid() == (5, 1, 6, 1)


def test_flat_or_broken_relevance_falls_back_to_the_whole_image():
    for relevance in (torch.ones(SIDE, SIDE), torch.full((SIDE, SIDE), float("nan"))):
        region = region_from_relevance(relevance, None, 0.9)
        assert region.is_full and "no contrast" in region.fallback_reason


def test_box_in_the_letterbox_maps_back_to_the_image():
    viewport = Viewport.pad_to_square(200, 100)  # the image fills rows 0.25..0.75 of the grid
    relevance = torch.zeros(16, 16)
    relevance[0:2, 0:4] = 1.0  # only padding
    assert region_from_relevance(relevance, viewport, 0.9).fallback_reason
    relevance = torch.zeros(16, 16)
    relevance[4:8, 0:4] = 1.0  # grid rows 0.25..0.5: the image's top half
    region = region_from_relevance(relevance, viewport, 0.9)
    assert (region.x0, region.y0, region.x1, region.y1) == pytest.approx((0.0, 0.0, 0.25, 0.5))


def test_bad_settings_and_prompts_are_refused(sdpa_model, processor):
    with pytest.raises(ConfigError, match="layer 4 is out of range"):
        AttentionLocalizer(sdpa_model, processor, layer=4)
    with pytest.raises(ConfigError, match="penalty"):
        AttentionLocalizer(sdpa_model, processor, penalty=1.5)
    with pytest.raises(ConfigError, match="rows"):
        FusedCROP(rows="all").validate(4, 144)
    with pytest.raises(ConfigError, match="out of range"):
        crop.apply(sdpa_model, processor, method=FusedCROP(layer=0))
    image_last = AttentionLocalizer(sdpa_model, processor, prompt_template="USER: {question} <image>")
    with pytest.raises(LocalizerError, match="no text tokens after the image"):
        image_last.localize(make_image(), QUESTIONS[0])


def _count_calls(layer):
    calls = []
    handle = layer.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


@pytest.mark.parametrize(("seed", "rows"), [(0, "question"), (1, "question"), (2, "last"), (3, "last")])
def test_fused_equals_two_pass_without_an_extra_forward(model, processor, seed, rows):
    image, question = make_image(seed=seed), QUESTIONS[seed % len(QUESTIONS)]
    layer_zero = model.model.language_model.layers[0]
    localizer = AttentionLocalizer(model, processor, layer=1, rows=rows)
    two_pass = crop.apply(model, processor, localizer=localizer, ilp=ILP(2))
    calls, handle = _count_calls(layer_zero)
    try:
        expected = two_pass.ask(image, question, max_new_tokens=4)
    finally:
        handle.remove()
        two_pass.remove()
    two_pass_calls = len(calls)
    fused = crop.apply(model, processor, method=FusedCROP(layer=2, rows=rows))
    calls, handle = _count_calls(layer_zero)
    try:
        got = fused.ask(image, question, max_new_tokens=4)
    finally:
        handle.remove()
        fused.remove()
    assert got.stats.rows[0].region == expected.stats.rows[0].region
    assert got.text == expected.text
    assert got.stats.rows[0].kept_tokens == expected.stats.rows[0].kept_tokens
    assert len(calls) == two_pass_calls - 1  # the two-pass localizer's own forward is the only difference


def test_fused_budget_mode_keeps_exactly_n(sdpa_model, processor):
    fused = crop.apply(sdpa_model, processor, method="crop-fused", budget=16)
    try:
        answer = fused.ask(make_image(seed=4), QUESTIONS[1], max_new_tokens=2)
    finally:
        fused.remove()
    row = answer.stats.rows[0]
    assert row.kept_tokens == 16 and isinstance(row.region, Region)
    reference = CROP(ILP(2), budget=16)
    assert reference.describe() != fused.method.describe()


def test_last_row_relevance_equals_explicit_attention(sdpa_model, processor):
    image, question = make_image(seed=2), QUESTIONS[2]
    relevance, _ = AttentionLocalizer(sdpa_model, processor, layer=1, rows="last").relevance(image, question)
    inputs = processor(images=image, text=build_prompt(processor, question), return_tensors="pt")
    with torch.no_grad():
        attentions = build_model(attn_implementation="eager")(**inputs, output_attentions=True).attentions
    visual = (inputs["input_ids"][0] == sdpa_model.config.image_token_id).nonzero().squeeze(1)
    expected = attentions[1][0][:, -1, visual].mean(0)
    torch.testing.assert_close(relevance.reshape(-1), expected, atol=1e-6, rtol=1e-5)


def test_two_pass_on_dynamic_grids_and_on_the_high_res_grid_of_several():
    from crop.models.llava_next import HIGH, token_layout
    from crop.testing.llava_next import build_next_model, build_next_processor
    from crop.testing.qwen2_vl import build_qwen_model, build_qwen_processor

    qwen = AttentionLocalizer(build_qwen_model(), build_qwen_processor(), layer=1)
    relevance, _ = qwen.relevance(make_image(224, 112), QUESTIONS[0])
    assert relevance.shape == (4, 8)
    assert isinstance(qwen.localize(make_image(224, 112), QUESTIONS[0]), Region)

    next_processor, image = build_next_processor(), make_image(120, 60)
    next_model = build_next_model(attn_implementation="eager")
    relevance, viewport = AttentionLocalizer(next_model, next_processor, layer=1, rows="last").relevance(
        image, QUESTIONS[0]
    )
    layout = token_layout(next_model.config, next_processor, image.size)
    assert relevance.shape == layout.high_grid and viewport == layout.high_viewport
    inputs = next_processor(images=image, text=build_prompt(next_processor, QUESTIONS[0]), return_tensors="pt")
    with torch.no_grad():
        attentions = next_model(**inputs, output_attentions=True).attentions
    placeholders = (inputs["input_ids"][0] == next_model.config.image_token_id).nonzero().squeeze(1)
    expected = attentions[1][0][:, -1, placeholders[layout.grid_positions(HIGH)]].mean(0)
    torch.testing.assert_close(relevance.reshape(-1), expected, atol=1e-6, rtol=1e-5)

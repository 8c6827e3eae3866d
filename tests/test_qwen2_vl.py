"""Qwen2-VL and Qwen2.5-VL: dynamic grids and 3-D positions under ILP and the in-LLM baselines."""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTIONS, make_image, qwen_batch, qwen_row
from reference import full_region_logits_match, layer_zero_inputs, reference_logits

import crop
from crop.region import Region
from crop.testing.qwen2_vl import build_qwen_model, build_qwen_processor

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(scope="module")
def processor():
    return build_qwen_processor()


@pytest.fixture(scope="module", params=[(family, attn) for family in FAMILIES for attn in ("sdpa", "eager")])
def model(request):
    family, attn = request.param
    return build_qwen_model(family=family, attn_implementation=attn)


def test_nothing_pruned_equals_the_model(model, processor):
    assert full_region_logits_match(model, processor, qwen_batch(processor, 3)) == [32, 24, 42]


@pytest.mark.parametrize("layer", [1, 2])
def test_ilp_equals_reference_row_by_row_and_batch_equals_rows(model, processor, layer):
    inputs = qwen_batch(processor, 3)
    regions = [Region(0.0, 0.0, 0.5, 1.0), Region(0.25, 0.5, 1.0, 1.0), Region(0.4, 0.1, 0.9, 0.6)]
    pruned = crop.apply(model, processor, ilp=layer)
    try:
        output, stats = pruned(**inputs, regions=regions)
        for row in range(3):
            alone = qwen_row(inputs, row)
            single, _ = pruned(**alone, regions=[regions[row]])
            ids = alone["input_ids"][0]
            visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
            rows, cols = stats.rows[row].cells.shape
            inside = regions[row].token_mask(rows, cols).reshape(-1)
            keep = torch.ones(ids.numel(), dtype=torch.bool)
            keep[visual[~inside]] = False
            expected = reference_logits(model, alone, keep, layer)
            got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(single.logits[0], expected, atol=1e-5, rtol=0)
            assert stats.rows[row].kept_tokens == int(inside.sum())
    finally:
        pruned.remove()


def test_kept_tokens_keep_their_3d_positions(model, processor):
    """At layers >= K the kept tokens see exactly the rotary embeddings and text positions they had unpruned."""
    inputs = qwen_row(qwen_batch(processor, 1), 0)
    _, full_cos, full_sin, full_positions = layer_zero_inputs(model, inputs)
    region = Region(0.5, 0.0, 1.0, 0.5)
    pruned = crop.apply(model, processor, ilp=2)
    seen = {}

    def capture(module, args, kwargs):
        seen.setdefault("cos", kwargs["position_embeddings"][0])
        seen.setdefault("positions", kwargs["position_ids"])

    handle = model.model.language_model.layers[3].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        pruned(**inputs, regions=[region])
    finally:
        handle.remove()
        pruned.remove()
    ids = inputs["input_ids"][0]
    visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
    inside = region.token_mask(4, 8).reshape(-1)
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[visual[~inside]] = False
    assert seen["cos"].shape[1] == int(keep.sum()) < ids.numel()
    torch.testing.assert_close(seen["cos"], full_cos[:, keep], atol=0, rtol=0)
    if full_positions is not None:
        assert torch.equal(seen["positions"], full_positions[:, keep])
    # the 3-D positions really differ from 1-D ones: the image's height/width rows differ from the text row
    assert not torch.equal(
        full_cos, model.model.language_model.rotary_emb(full_cos, torch.arange(ids.numel())[None])[0]
    )


def test_left_half_of_a_wide_image_keeps_exactly_its_tokens(model, processor):
    inputs = qwen_row(qwen_batch(processor, 1), 0)  # 224 x 112: a 2:1 image, grid 4 x 8 after the 2x2 merge
    pruned = crop.apply(model, processor, ilp=1)
    try:
        _, stats = pruned(**inputs, regions=[Region(0.0, 0.0, 0.5, 1.0)])
    finally:
        pruned.remove()
    _, height, width = inputs["image_grid_thw"][0].tolist()
    merged_cols = width // 2
    patch_centres = (torch.arange(merged_cols) + 0.5) / merged_cols  # each merged token spans 2 patches
    expected = torch.zeros(height // 2, merged_cols, dtype=torch.long)
    expected[:, patch_centres < 0.5] = 1
    assert torch.equal((stats.rows[0].cells == 2).long(), expected)
    assert stats.rows[0].kept_tokens == 16


def test_generation_with_cache_equals_recompute(model, processor):
    inputs = qwen_batch(processor, 2)
    regions = [Region(0.0, 0.0, 0.5, 1.0), Region(0.25, 0.25, 1.0, 1.0)]
    pruned = crop.apply(model, processor, ilp=2)
    try:
        sequences, _ = pruned.generate(**inputs, regions=regions, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        for row in range(2):
            alone = qwen_row(inputs, row)
            ids = alone["input_ids"][0]
            visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
            _, height, width = alone["image_grid_thw"][0].tolist()
            inside = regions[row].token_mask(height // 2, width // 2).reshape(-1)
            step = dict(alone)
            for _ in range(3):
                keep = torch.ones(step["input_ids"].shape[1], dtype=torch.bool)
                keep[visual[~inside]] = False
                logits = reference_logits(model, step, keep, 2)
                token = logits[-1].argmax().view(1, 1)
                step["input_ids"] = torch.cat([step["input_ids"], token], dim=1)
                step["attention_mask"] = torch.ones_like(step["input_ids"])
                step["mm_token_type_ids"] = torch.cat([step["mm_token_type_ids"], torch.zeros_like(token)], dim=1)
            assert torch.equal(sequences[row, -3:], step["input_ids"][0, -3:])
    finally:
        pruned.remove()


@pytest.mark.parametrize("method", ["fastv", "pyramiddrop", "sparsevlm", "crop-fused"])
def test_in_llm_baselines_run_on_dynamic_grids(model, processor, method):
    inputs = qwen_batch(processor, 3)
    pruned = crop.apply(model, processor, method=method, budget=12)
    try:
        output, stats = pruned(**inputs)
        sequences, _ = pruned.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        for row in range(3):
            single, _ = pruned(**qwen_row(inputs, row))
            torch.testing.assert_close(output.logits[row, -1], single.logits[0, -1], atol=1e-5, rtol=0)
    finally:
        pruned.remove()
    assert [row.kept_tokens for row in stats.rows] == [12, 12, 12]
    assert sequences.shape[1] == inputs["input_ids"].shape[1] + 2


def test_a_budget_above_the_grid_is_refused(model, processor):
    pruned = crop.apply(model, processor, method="fastv", budget=30)
    try:
        with pytest.raises(crop.ConfigError, match="budget 30 must be an integer in 1..24"):
            pruned(**qwen_row(qwen_batch(processor, 2), 1))
    finally:
        pruned.remove()


def test_ask_through_the_processor_and_chat_template(model, processor):
    pruned = crop.apply(model, processor, localizer=crop.FixedLocalizer([0, 0, 3, 7]), ilp=2)
    try:
        answer = pruned.ask(make_image(224, 112), QUESTIONS[0], max_new_tokens=3)
    finally:
        pruned.remove()
    row = answer.stats.rows[0]
    assert row.image_tokens == 32 and row.kept_tokens == 16
    assert isinstance(answer.text, str)

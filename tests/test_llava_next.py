"""LLaVA-NeXT: a base grid plus an unpadded high-res grid with newlines, under ILP and the in-LLM baselines."""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTIONS, make_image
from reference import full_region_logits_match, reference_logits

import crop
from crop.models.llava_next import BASE, HIGH, NEWLINE, token_layout
from crop.region import Region
from crop.testing.llava_next import build_next_model, build_next_processor, next_inputs

SIZES = [(120, 60), (50, 130), (70, 70)]  # wide 2:1, tall (padding strips kept), square


@pytest.fixture(scope="module")
def processor():
    return build_next_processor()


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return build_next_model(attn_implementation=request.param)


def batch(processor, count: int) -> dict:
    images = [make_image(*SIZES[i], seed=i) for i in range(count)]
    return next_inputs(processor, images, [QUESTIONS[i % len(QUESTIONS)] for i in range(count)])


def row_inputs(inputs: dict, row: int) -> dict:
    real = inputs["attention_mask"][row].bool()
    return {
        "input_ids": inputs["input_ids"][row][real][None],
        "attention_mask": torch.ones(1, int(real.sum()), dtype=torch.long),
        "pixel_values": inputs["pixel_values"][row : row + 1],
        "image_sizes": inputs["image_sizes"][row : row + 1],
    }


def layout_for(model, processor, size: tuple[int, int]):
    """The placeholder layout from the family's geometry (LLaVA-OneVision: SigLIP patches and anyres-max)."""
    config = model.config
    if config.vision_feature_select_strategy == "full":
        max_tiles = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
        return token_layout(config, processor, size, strategy="full", max_tiles=max_tiles)
    return token_layout(config, processor, size)


def kept_placeholders(model, processor, size: tuple[int, int], region: Region) -> torch.Tensor:
    """By hand, token by token: a grid cell stays when its centre, mapped into the image through its grid's
    viewport, lies in the region; a newline stays when a high-res cell of its row stays."""
    layout = layout_for(model, processor, size)
    grids = {BASE: (layout.base_grid, layout.base_viewport), HIGH: (layout.high_grid, layout.high_viewport)}
    keep = []
    for grid, row, col in layout.cells.tolist():
        if grid == NEWLINE:
            keep.append(None)
            continue
        (rows, cols), vp = grids[grid]
        x = ((col + 0.5) / cols - vp.left) / (vp.right - vp.left)
        y = ((row + 0.5) / rows - vp.top) / (vp.bottom - vp.top)
        keep.append(region.x0 <= x <= region.x1 and region.y0 <= y <= region.y1)
    for index, (grid, row, _) in enumerate(layout.cells.tolist()):
        if grid == NEWLINE:
            keep[index] = any(keep[i] for i, (g, r, _) in enumerate(layout.cells.tolist()) if g == HIGH and r == row)
    return torch.tensor(keep)


def prompt_keep(model, processor, inputs: dict, region: Region) -> torch.Tensor:
    ids = inputs["input_ids"][0]
    height, width = inputs["image_sizes"][0].tolist()
    placeholders = (ids == model.config.image_token_id).nonzero().squeeze(1)
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[placeholders] = kept_placeholders(model, processor, (width, height), region)
    return keep


def test_nothing_pruned_equals_the_model(model, processor):
    assert full_region_logits_match(model, processor, batch(processor, 3)) == [52, 56, 88]


@pytest.mark.parametrize("layer", [1, 3])
def test_ilp_equals_reference_and_batch_equals_rows(model, processor, layer):
    inputs = batch(processor, 3)
    regions = [Region(0.0, 0.0, 0.5, 1.0), Region(0.2, 0.5, 1.0, 1.0), Region(0.3, 0.1, 0.8, 0.6)]
    pruned = crop.apply(model, processor, ilp=layer)
    try:
        output, stats = pruned(**inputs, regions=regions)
        for row in range(3):
            alone = row_inputs(inputs, row)
            single, _ = pruned(**alone, regions=[regions[row]])
            keep = prompt_keep(model, processor, alone, regions[row])
            expected = reference_logits(model, alone, keep, layer)
            got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(single.logits[0], expected, atol=1e-5, rtol=0)
            placeholders = int((alone["input_ids"][0] == model.config.image_token_id).sum())
            assert stats.rows[row].kept_tokens == placeholders - int((~keep).sum())
    finally:
        pruned.remove()


def test_left_half_of_a_wide_image_keeps_exactly_its_tokens(model, processor):
    inputs = row_inputs(batch(processor, 1), 0)  # 120 x 60: high-res grid 4 x 8, base grid 4 x 4
    pruned = crop.apply(model, processor, ilp=1)
    try:
        _, stats = pruned(**inputs, regions=[Region(0.0, 0.0, 0.5, 1.0)])
    finally:
        pruned.remove()
    high = torch.zeros(4, 8, dtype=torch.long)
    high[:, :4] = 2  # patches whose centre lies left of 60 px: columns 0..3 of 8 (7.5 px per column)
    assert torch.equal(stats.rows[0].cells, high)
    assert stats.rows[0].kept_tokens == 8 + 16 + 4  # base 4x2, high 4x4, the 4 newlines of kept rows


def test_generation_with_cache_equals_recompute(model, processor):
    inputs = batch(processor, 2)
    regions = [Region(0.0, 0.0, 0.5, 1.0), Region(0.25, 0.25, 1.0, 1.0)]
    pruned = crop.apply(model, processor, ilp=2)
    try:
        sequences, _ = pruned.generate(**inputs, regions=regions, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        pruned.remove()
    for row in range(2):
        step = row_inputs(inputs, row)
        keep = prompt_keep(model, processor, step, regions[row])
        for _ in range(3):
            logits = reference_logits(model, step, keep, 2)
            token = logits[-1].argmax().view(1, 1)
            step["input_ids"] = torch.cat([step["input_ids"], token], dim=1)
            step["attention_mask"] = torch.ones_like(step["input_ids"])
            keep = torch.cat([keep, torch.ones(1, dtype=torch.bool)])
        assert torch.equal(sequences[row, -3:], step["input_ids"][0, -3:])


@pytest.mark.parametrize("method", ["fastv", "pyramiddrop", "pyramiddrop-authors", "sparsevlm"])
def test_in_llm_baselines_run_on_both_grids(model, processor, method):
    inputs = batch(processor, 3)
    pruned = crop.apply(model, processor, method=method, budget=20)
    try:
        output, stats = pruned(**inputs)
        for row in range(3):
            single, _ = pruned(**row_inputs(inputs, row))
            torch.testing.assert_close(output.logits[row, -1], single.logits[0, -1], atol=1e-5, rtol=0)
    finally:
        pruned.remove()
    assert [row.kept_tokens for row in stats.rows] == [20, 20, 20]


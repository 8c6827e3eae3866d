"""Learned PLC inside CROP: the identity path, logits against a by-hand splice, cached generation."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_inputs, on_grid
from reference import greedy_by_recompute, merged_embeddings, run_layers, unpadded_row

import crop
from crop.region import Region
from crop.stats import POOLED
from crop.strategies.crop_method import CROP
from crop.strategies.ilp import ILP
from crop.strategies.learned_plc import LearnedPLC, LearnedPLCConfig

SIDE = 12


def compressor(model, seed: int = 0, **settings) -> LearnedPLC:
    """A compressor for the tiny model's grid with every parameter perturbed, so that outputs depend on all of it."""
    config = LearnedPLCConfig(hidden_size=model.config.text_config.hidden_size, rows=SIDE, cols=SIDE, **settings)
    module = LearnedPLC(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return module


@pytest.mark.parametrize("batch", [1, 3])
def test_whole_image_with_the_region_passed_through_equals_unmodified_model(model, processor, batch):
    inputs = batch_inputs(processor, batch)
    with torch.no_grad():
        expected = model(**inputs).logits
    pruned = crop.apply(model, processor, method=CROP(None, compressor(model, region_ratio=1)))
    output, _ = pruned(**inputs, **on_grid([Region.full()] * batch))
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(output.logits[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("ilp", "budget"), [(None, None), (2, None), (None, 20)])
def test_learned_plc_logits_match_reference(model, processor, ilp, budget):
    inputs = batch_inputs(processor, 2)
    regions = [Region.from_grid([0, 0, 3, 3]), Region.from_grid([2, 3, 6, 5])]
    plc = compressor(model, region_ratio=2, outside_ratio=8, n_anchor=3)
    pruned = crop.apply(model, processor, method=CROP(None if ilp is None else ILP(ilp), plc, budget=budget))
    try:
        output, stats = pruned(**inputs, **on_grid(regions))
    finally:
        pruned.remove()
    image_token = model.config.image_token_id
    for row, region in enumerate(regions):
        input_ids, pixel_values = unpadded_row(inputs, row)
        embeds = merged_embeddings(model, input_ids, pixel_values)
        visual = (input_ids[0] == image_token).nonzero().squeeze(1)
        start, end = int(visual[0]), int(visual[-1]) + 1
        with torch.no_grad():
            compressed = plc.compress(embeds[0, start:end], region.token_mask(SIDE, SIDE), budget)
        tokens = compressed.features
        new_embeds = torch.cat([embeds[0, :start], tokens, embeds[0, end:]])[None]
        positions = torch.arange(new_embeds.shape[1])  # learned PLC numbers its prompt consecutively
        keep = None
        if ilp is not None:
            text_after = input_ids.shape[1] - end
            keep = torch.cat([torch.ones(start, dtype=torch.bool), compressed.inside, torch.ones(text_after).bool()])
        expected = run_layers(model, new_embeds, positions, keep, ilp or 0)[0]
        got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert stats.rows[row].llm_input_tokens == plc.output_count(region.token_mask(SIDE, SIDE), budget)
        if budget is not None:
            assert stats.rows[row].llm_input_tokens == budget
        assert (stats.rows[row].cells == POOLED).any()
    assert "PLC(learned, region 1/2, outside 1/8, 3 anchors)" in stats.method


def test_learned_plc_generation_with_cache_equals_recomputing(sdpa_model, processor):
    inputs = batch_inputs(processor, 2)
    regions = [Region.from_grid([0, 0, 3, 3]), Region.from_grid([4, 0, 7, 7])]
    pruned = crop.apply(sdpa_model, processor, method=CROP(ILP(2), compressor(sdpa_model)))
    try:
        sequences, _ = pruned.generate(
            **inputs, **on_grid(regions), max_new_tokens=4, min_new_tokens=4, do_sample=False
        )
        ids = greedy_by_recompute(pruned, inputs, regions, 4)
    finally:
        pruned.remove()
    assert torch.equal(sequences, ids)

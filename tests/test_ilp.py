"""ILP against the unmodified model and against the hand-run reference (DESIGN 1.4), SDPA and eager."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_inputs, on_grid
from reference import greedy_by_recompute, merged_embeddings, run_layers, unpadded_row

import crop
from crop.region import Region

QUARTER = Region.from_grid([0, 0, 3, 3])
K = 2


def keep_for_region(input_ids: torch.Tensor, image_token_id: int, region: Region, side: int = 12) -> torch.Tensor:
    """Independently: keep text, keep an image token iff its patch (row, col) lies in the region's box."""
    keep = torch.ones(input_ids.shape[1], dtype=torch.bool)
    positions = (input_ids[0] == image_token_id).nonzero().squeeze(1)
    for n, position in enumerate(positions.tolist()):
        row, col = divmod(n, side)
        x, y = (col + 0.5) / side, (row + 0.5) / side
        keep[position] = region.x0 <= x <= region.x1 and region.y0 <= y <= region.y1
    return keep


@pytest.mark.parametrize("batch", [1, 3])
def test_whole_image_region_equals_unmodified_model(model, processor, batch):
    inputs = batch_inputs(processor, batch)
    with torch.no_grad():
        expected = model(**inputs).logits
    pruned = crop.apply(model, processor, ilp=K)
    try:
        output, stats = pruned(**inputs, **on_grid([Region.full()] * batch))
    finally:
        pruned.remove()
    real = inputs["attention_mask"].bool()
    assert output.logits.shape == expected.shape
    torch.testing.assert_close(output.logits[real], expected[real], atol=1e-5, rtol=0)
    assert all(row.kept_tokens == 144 for row in stats.rows)


@pytest.mark.parametrize(("batch", "padded"), [(1, False), (3, True), (3, False)])
def test_ilp_equals_hand_run_reference_and_batch_equals_rows(model, processor, batch, padded):
    inputs = batch_inputs(processor, batch, padded)
    regions = [Region.from_grid(box) for box in ([0, 0, 3, 3], [2, 1, 7, 7], [5, 5, 5, 6])][:batch]
    pruned = crop.apply(model, processor, ilp=K)
    try:
        output, stats = pruned(**inputs, **on_grid(regions))
    finally:
        pruned.remove()
    image_token = model.config.image_token_id
    for row, region in enumerate(regions):
        input_ids, pixel_values = unpadded_row(inputs, row)
        keep = keep_for_region(input_ids, image_token, region)
        embeds = merged_embeddings(model, input_ids, pixel_values)
        expected = run_layers(model, embeds, torch.arange(input_ids.shape[1]), keep, K)[0]
        got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert stats.rows[row].kept_tokens == int((keep & (input_ids[0] == image_token)).sum())


def test_pruning_changes_logits(sdpa_model, processor):
    """Guard against a vacuous reference: with a small region the last logits differ from the full model's."""
    inputs = batch_inputs(processor, 1)
    with torch.no_grad():
        full = sdpa_model(**inputs).logits[0, -1]
    pruned = crop.apply(sdpa_model, processor, ilp=K)
    try:
        output, _ = pruned(**inputs, **on_grid([QUARTER]))
    finally:
        pruned.remove()
    assert (output.logits[0, -1] - full).abs().max() > 1e-3


@pytest.mark.parametrize("batch", [1, 3])
def test_generation_with_cache_equals_recomputing_prefix(model, processor, batch):
    inputs = batch_inputs(processor, batch)
    regions = [QUARTER, Region.from_grid([4, 4, 7, 7]), Region.from_grid([0, 6, 7, 7])][:batch]
    pruned = crop.apply(model, processor, ilp=K)
    steps = 6
    try:
        sequences, _ = pruned.generate(
            **inputs, **on_grid(regions), max_new_tokens=steps, do_sample=False, min_new_tokens=steps
        )
        ids = greedy_by_recompute(pruned, inputs, regions, steps)
    finally:
        pruned.remove()
    assert torch.equal(sequences, ids)


def test_quarter_region_keeps_exactly_its_tokens_in_the_cache(model, processor):
    inputs = batch_inputs(processor, 1)
    pruned = crop.apply(model, processor, ilp=K)
    try:
        output, stats = pruned(**inputs, **on_grid([QUARTER]), use_cache=True)
    finally:
        pruned.remove()
    input_ids, pixel_values = unpadded_row(inputs, 0)
    keep = keep_for_region(input_ids, model.config.image_token_id, QUARTER)
    assert int(keep.sum()) == input_ids.shape[1] - 144 + 36
    assert stats.rows[0].kept_tokens == 36
    cache = output.get("cache") or output.get("past_key_values")
    layers = model.model.language_model.layers
    for index in range(len(layers)):
        expected_length = input_ids.shape[1] if index < K else int(keep.sum())
        assert cache.layers[index].keys.shape[2] == expected_length
    # content: keys of layer K equal the keys the reference computes from the kept hidden states
    text_model = model.model.language_model
    embeds = merged_embeddings(model, input_ids, pixel_values)
    positions = torch.arange(input_ids.shape[1])[None]
    hidden = embeds
    cos, sin = text_model.rotary_emb(hidden, position_ids=positions)
    from reference import causal_mask

    with torch.no_grad():
        for layer in layers[:K]:
            hidden = layer(
                hidden,
                attention_mask=causal_mask(hidden.shape[1], hidden.dtype),
                position_embeddings=(cos, sin),
                position_ids=positions,
            )
        kept = keep.nonzero().squeeze(1)
        attention = layers[K].self_attn
        normed = layers[K].input_layernorm(hidden[:, kept])
        keys = attention.k_proj(normed).view(1, kept.numel(), -1, attention.head_dim).transpose(1, 2)
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        _, keys = apply_rotary_pos_emb(keys, keys, cos[:, kept], sin[:, kept])
    torch.testing.assert_close(cache.layers[K].keys, keys, atol=1e-5, rtol=0)


def test_sampling_and_beam_search_run(sdpa_model, processor):
    inputs = {**batch_inputs(processor, 2), "viewports": [crop.Viewport()] * 2}
    pruned = crop.apply(sdpa_model, processor, localizer=crop.FixedLocalizer([1, 1, 4, 4]), ilp=K)
    try:
        torch.manual_seed(0)
        first, _ = pruned.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=5)
        torch.manual_seed(0)
        second, _ = pruned.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=5)
        beams, _ = pruned.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False)
    finally:
        pruned.remove()
    assert torch.equal(first, second)
    assert first.shape[1] == inputs["input_ids"].shape[1] + 4
    assert beams.shape[0] == 2


def test_remove_restores_the_original_model(sdpa_model, processor):
    inputs = batch_inputs(processor, 1)
    with torch.no_grad():
        before = sdpa_model(**inputs).logits
    pruned = crop.apply(sdpa_model, processor, ilp=K)
    layers = sdpa_model.model.language_model.layers
    assert any(layer._forward_pre_hooks for layer in layers)
    with torch.no_grad():
        untouched = sdpa_model(**inputs).logits
    crop.remove(pruned)
    assert not any(layer._forward_pre_hooks for layer in layers)
    with torch.no_grad():
        after = sdpa_model(**inputs).logits
    assert torch.equal(before, after) and torch.equal(before, untouched)


@pytest.mark.parametrize("plc", [None, 4])
def test_layer_zero_drops_tokens_before_the_llm(model, processor, plc):
    inputs = batch_inputs(processor, 2)
    regions = [QUARTER, Region.from_grid([3, 3, 6, 7])]
    pruned = crop.apply(model, processor, ilp=0, plc=plc)
    output, stats = pruned(**inputs, **on_grid(regions))
    image_token = model.config.image_token_id
    for row, region in enumerate(regions):
        input_ids, pixel_values = unpadded_row(inputs, row)
        keep = keep_for_region(input_ids, image_token, region)
        embeds = merged_embeddings(model, input_ids, pixel_values)
        expected = run_layers(model, embeds, torch.arange(input_ids.shape[1]), keep, 0)[0]
        got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        kept = int((keep & (input_ids[0] == image_token)).sum())
        assert stats.rows[row].per_layer == [kept] * 4


def test_llava15_grid_and_cls_token():
    """LLaVA-1.5's 24x24 grid (336 px / 14), and the `full` strategy whose CLS token is always kept."""
    from crop.testing.llava import build_model, build_processor

    for strategy, leading in (("default", 0), ("full", 1)):
        model = build_model(image_size=336, select_strategy=strategy)
        processor = build_processor(image_size=336, select_strategy=strategy)
        inputs = batch_inputs(processor, 1)
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576 + leading
        pruned = crop.apply(model, processor, ilp=K)
        output, stats = pruned(**inputs, **on_grid([QUARTER]))
        assert stats.rows[0].kept_tokens == 144 + leading
        input_ids, pixel_values = unpadded_row(inputs, 0)
        keep = torch.ones(input_ids.shape[1], dtype=torch.bool)
        visual = (input_ids[0] == model.config.image_token_id).nonzero().squeeze(1)
        grid = visual[leading:].view(24, 24)
        keep[grid[12:].flatten()] = False
        keep[grid[:12, 12:].flatten()] = False
        embeds = model.get_input_embeddings()(input_ids).clone()
        features = model.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=-1, vision_feature_select_strategy=strategy
        ).pooler_output[0]
        embeds[0, visual] = features
        expected = run_layers(model, embeds, torch.arange(input_ids.shape[1]), keep, K)[0]
        torch.testing.assert_close(output.logits[0], expected, atol=1e-5, rtol=0)


def test_bfloat16_model(processor):
    """Masks and gathers follow the model's dtype: bf16 with the whole image equals the unmodified bf16 model."""
    from crop.testing.llava import build_model

    model = build_model().to(torch.bfloat16)
    inputs = batch_inputs(processor, 3)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        expected = model(**inputs).logits
    pruned = crop.apply(model, processor, ilp=K)
    try:
        output, _ = pruned(**inputs, **on_grid([Region.full()] * 3))
        sequences, stats = pruned.generate(**inputs, **on_grid([QUARTER] * 3), max_new_tokens=3)
    finally:
        pruned.remove()
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(output.logits[real], expected[real], atol=0, rtol=0)
    assert sequences.shape[1] <= inputs["input_ids"].shape[1] + 3 and stats.rows[0].kept_tokens == 36

"""Qwen2-VL and Qwen2.5-VL with methods that replace the grid before the LLM (PLC, ILP at K = 0, pooling): the
spliced tokens carry the 3-D positions of the cells they stand for, checked against positions written out from
the grid's geometry and layers run by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import qwen_batch, qwen_row
from reference import causal_mask

import crop
from crop.errors import ConfigError, UnsupportedModelError
from crop.region import Region
from crop.strategies.crop_method import CROP
from crop.strategies.ilp import ILP
from crop.strategies.plc import PLC
from crop.testing.qwen2_vl import build_qwen_model, build_qwen_processor

REGIONS = [Region(0.0, 0.0, 0.5, 1.0), Region(0.25, 0.5, 1.0, 1.0), Region(0.4, 0.1, 0.9, 0.6)]
METHODS = {"plc": lambda: CROP(None, PLC(ratio=2)), "k0": lambda: CROP(ILP(0)), "plc+ilp": lambda: CROP(ILP(2), PLC())}


@pytest.fixture(scope="module")
def processor():
    return build_qwen_processor()


@pytest.fixture(
    scope="module", params=[(family, attn) for family in ("qwen2_vl", "qwen2_5_vl") for attn in ("sdpa", "eager")]
)
def model(request):
    family, attn = request.param
    return build_qwen_model(family=family, attn_implementation=attn)


def spliced_by_hand(model, alone: dict, region: Region, method: CROP) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One unpadded row's new embeddings and 3-D positions, written out: text before the image at (i, i, i); a new
    token standing for grid cell (r, c) at (s, s + r, s + c), s being the image's first index; the text after the
    image continuing from s + max(rows, cols). Also returns how many new visual tokens there are."""
    ids = alone["input_ids"][0]
    _, height, width = alone["image_grid_thw"][0].tolist()
    rows, cols = height // 2, width // 2
    visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
    s, n = int(visual[0]), visual.numel()
    with torch.no_grad():
        features = model.model.get_image_features(
            alone["pixel_values"], alone["image_grid_thw"], return_dict=True
        ).pooler_output[0]
        inside = region.token_mask(rows, cols)
        if method.plc is not None:
            compressed = method.plc.compress(features, inside)
            tokens, cells = compressed.features, compressed.first_cell
        else:  # K = 0: the region's cells in raster order
            cells = inside.reshape(-1).nonzero().squeeze(1)
            tokens = features[cells]
        embeds = model.get_input_embeddings()(ids[None])[0]
    new_embeds = torch.cat([embeds[:s], tokens, embeds[s + n :]])[None]
    before = torch.arange(s)[None].expand(3, -1)
    image = torch.stack([torch.full_like(cells, s), s + cells // cols, s + cells % cols])
    after = (s + max(rows, cols) + torch.arange(ids.numel() - s - n))[None].expand(3, -1)
    return new_embeds, torch.cat([before, image, after], dim=1), tokens.shape[0]


def run_by_hand(model, embeds: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor | None, layer: int):
    """Logits of one row, every decoder layer called by hand with rotary embeddings from `positions` (3, L);
    layers >= `layer` see only the `keep` subset."""
    text_model = model.model.language_model
    hidden = embeds
    with torch.no_grad():
        cos, sin = text_model.rotary_emb(hidden, position_ids=positions[:, None])
        for index, decoder_layer in enumerate(text_model.layers):
            if keep is not None and index == layer:
                hidden, cos, sin = hidden[:, keep], cos[:, keep], sin[:, keep]
            mask = causal_mask(hidden.shape[1], hidden.dtype)
            hidden = decoder_layer(hidden, attention_mask=mask, position_embeddings=(cos, sin))
        return model.lm_head(text_model.norm(hidden))[0]


def reference(model, alone: dict, region: Region, method: CROP) -> torch.Tensor:
    """The row's logits by hand; with PLC + ILP, layers >= K see the text and the region's compressed tokens."""
    embeds, positions, count = spliced_by_hand(model, alone, region, method)
    if method.ilp is None or method.ilp.layer == 0:
        return run_by_hand(model, embeds, positions, None, 0)
    ids = alone["input_ids"][0]
    start = int((ids == model.config.image_token_id).nonzero()[0])
    _, height, width = alone["image_grid_thw"][0].tolist()
    mask = region.token_mask(height // 2, width // 2)
    keep = torch.ones(embeds.shape[1], dtype=torch.bool)
    keep[start : start + count] = method.plc.compress(torch.zeros(mask.numel(), 1), mask).inside
    return run_by_hand(model, embeds, positions, keep, method.ilp.layer)


@pytest.mark.parametrize("name", METHODS)
def test_pre_llm_methods_equal_the_hand_reference_and_batch_equals_rows(model, processor, name):
    inputs = qwen_batch(processor, 3)
    method = METHODS[name]()
    pruned = crop.apply(model, processor, method=method)
    try:
        output, stats = pruned(**inputs, regions=REGIONS)
        for row in range(3):
            alone = qwen_row(inputs, row)
            expected = reference(model, alone, REGIONS[row], method)
            got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            single, _ = pruned(**alone, regions=[REGIONS[row]])
            torch.testing.assert_close(single.logits[0], expected, atol=1e-5, rtol=0)
    finally:
        pruned.remove()
    assert all(row.llm_input_tokens < row.image_tokens for row in stats.rows)


def test_whole_image_through_plc_equals_the_model(model, processor):
    inputs = qwen_batch(processor, 3)
    with torch.no_grad():
        expected = model(**inputs).logits
    pruned = crop.apply(model, processor, method=CROP(None, PLC(ratio=4)))
    try:
        output, stats = pruned(**inputs, regions=[Region.full()] * 3)
    finally:
        pruned.remove()
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(output.logits[real], expected[real], atol=1e-5, rtol=0)
    assert [row.llm_input_tokens for row in stats.rows] == [32, 24, 42]


def test_cached_generation_equals_recomputing_by_hand(model, processor):
    """Greedy decoding with the cache equals running the hand-spliced prompt plus the tokens so far at every step,
    each new token one position after the last on all three rows (where the unpruned prompt's decoding goes)."""
    inputs = qwen_batch(processor, 2)
    method = CROP(None, PLC(ratio=2))
    steps = 3
    pruned = crop.apply(model, processor, method=method)
    try:
        sequences, _ = pruned.generate(
            **inputs, regions=REGIONS[:2], max_new_tokens=steps, min_new_tokens=steps, do_sample=False
        )
    finally:
        pruned.remove()
    for row in range(2):
        alone = qwen_row(inputs, row)
        embeds, positions, _ = spliced_by_hand(model, alone, REGIONS[row], method)
        tokens = []
        for _ in range(steps):
            token = int(run_by_hand(model, embeds, positions, None, 0)[-1].argmax())
            tokens.append(token)
            with torch.no_grad():
                embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        assert sequences[row, -steps:].tolist() == tokens


def test_pooling_baseline_and_refusals(model, processor):
    inputs = qwen_batch(processor, 3)
    pruned = crop.apply(model, processor, method="pool", budget=8)
    try:
        _, stats = pruned(**inputs)
    finally:
        pruned.remove()
    assert all(row.llm_input_tokens <= 8 for row in stats.rows)
    with pytest.raises(UnsupportedModelError, match="no CLS token"):
        pruned = crop.apply(model, processor, method="visionzip", budget=8)
        try:
            pruned(**inputs)
        finally:
            pruned.remove()
    alone = qwen_row(inputs, 0)
    del alone["mm_token_type_ids"]
    pruned = crop.apply(model, processor, method=CROP(ILP(0)))
    try:
        with pytest.raises(ConfigError, match="mm_token_type_ids"):
            pruned(**alone, regions=[Region.full()])
    finally:
        pruned.remove()

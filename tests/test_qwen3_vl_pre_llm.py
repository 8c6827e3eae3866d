"""Qwen3-VL with methods that replace the grid before the LLM (PLC, ILP at K = 0, CROP's budget mode, pooling,
random, DivPrune): the DeepStack features are compressed with the tokens (a kept cell keeps its own, a pooled
token gets its window's mean), checked against prompts spliced by hand, 3-D positions written out from the grid's
geometry and layers run by hand with the DeepStack features added; cached generation equals recomputation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import qwen_batch, qwen_row
from reference import causal_mask
from test_divprune import authors_divprune

import crop
from crop.errors import UnsupportedModelError
from crop.region import Region
from crop.stats import FINE, POOLED
from crop.strategies.base import PreLLMMethod, Selection
from crop.strategies.crop_method import CROP
from crop.strategies.divprune import DivPrune
from crop.strategies.ilp import ILP
from crop.strategies.plc import PLC, Compressed
from crop.strategies.pooling import UniformPooling, pooled_shape
from crop.strategies.random_select import RandomSelection
from crop.testing.qwen3_vl import build_qwen3_model, build_qwen3_processor

REGIONS = [Region(0.0, 0.0, 0.5, 1.0), Region(0.25, 0.5, 1.0, 1.0), Region(0.4, 0.1, 0.9, 0.6)]
METHODS = {
    "plc": lambda: CROP(None, PLC(ratio=2)),
    "plc+ilp1": lambda: CROP(ILP(1), PLC(ratio=2)),  # K inside the DeepStack layers (0 and 1)
    "plc+ilp2": lambda: CROP(ILP(2), PLC(ratio=3)),
    "k0": lambda: CROP(ILP(0)),
    "budget-k0": lambda: CROP(ILP(0), budget=10),
    "pool": lambda: UniformPooling(9),
    "random": lambda: RandomSelection(7),
    "divprune": lambda: DivPrune(8),
}


@pytest.fixture(scope="module")
def processor():
    return build_qwen3_processor()


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return build_qwen3_model(attn_implementation=request.param)


def image_and_deepstack(model, alone: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.no_grad():
        image = model.model.get_image_features(alone["pixel_values"], alone["image_grid_thw"], return_dict=True)
    return image.pooler_output[0], [features[0] for features in image.deepstack_features]


def compressed_by_hand(model, alone: dict, region: Region, method, kept_cells: torch.Tensor):
    """One row's new tokens written out: `(features, DeepStack features per layer, first cells, inside)`. PLC
    pools tokens and DeepStack features alike; uniform pooling average-pools both grids; the selections keep
    cells (K = 0: the region's; DivPrune: the authors' choice; budget mode and random: the cells the run
    reports, `kept_cells`)."""
    features, deepstack = image_and_deepstack(model, alone)
    _, height, width = alone["image_grid_thw"][0].tolist()
    rows, cols = height // 2, width // 2
    inside = region.token_mask(rows, cols)
    if isinstance(method, CROP) and method.plc is not None:
        compressed = method.plc.compress(features, inside)
        stacked = [method.plc.compress(layer, inside).features for layer in deepstack]
        return compressed.features, stacked, compressed.first_cell, compressed.inside
    if isinstance(method, UniformPooling):
        h, w = pooled_shape(rows, cols, method.budget)

        def pool(grid: torch.Tensor) -> torch.Tensor:
            return F.adaptive_avg_pool2d(grid.T.reshape(1, -1, rows, cols), (h, w))[0].flatten(1).T

        first = (torch.arange(h)[:, None] * rows // h * cols + torch.arange(w)[None, :] * cols // w).reshape(-1)
        return pool(features), [pool(layer) for layer in deepstack], first, torch.ones(h * w, dtype=torch.bool)
    if isinstance(method, DivPrune):
        cells = authors_divprune(features, method.budget)
        assert torch.equal(cells, kept_cells)
    elif isinstance(method, CROP) and method.budget is None:
        cells = inside.reshape(-1).nonzero().squeeze(1)
        assert torch.equal(cells, kept_cells)
    else:
        cells = kept_cells
    return features[cells], [layer[cells] for layer in deepstack], cells, torch.ones(cells.numel(), dtype=torch.bool)


def reference(
    model, alone: dict, region: Region, method, kept_cells: torch.Tensor, deepstack: bool = True
) -> tuple[torch.Tensor, int]:
    """One row's logits by hand and its LLM visual token count: the new tokens spliced in at 3-D positions
    (s, s + r, s + c) of their first cell (s: the image's first index), the text after continuing from
    s + max(rows, cols); after each DeepStack layer its compressed features added to the new tokens still there;
    with ILP at K, layers >= K see the text and the region's tokens. `deepstack=False`: without them (a mutation)."""
    tokens, stacked, first, inside = compressed_by_hand(model, alone, region, method, kept_cells)
    ids = alone["input_ids"][0]
    _, _, width = alone["image_grid_thw"][0].tolist()
    rows, cols = alone["image_grid_thw"][0, 1].item() // 2, width // 2
    visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
    s, n, count = int(visual[0]), visual.numel(), tokens.shape[0]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids[None])[0]
    hidden = torch.cat([embeds[:s], tokens, embeds[s + n :]])[None]
    before = torch.arange(s)[None].expand(3, -1)
    image = torch.stack([torch.full_like(first, s), s + first // cols, s + first % cols])
    after = (s + max(rows, cols) + torch.arange(ids.numel() - s - n))[None].expand(3, -1)
    positions = torch.cat([before, image, after], dim=1)
    is_new = torch.zeros(hidden.shape[1], dtype=torch.bool)
    is_new[s : s + count] = True
    keep = torch.ones(hidden.shape[1], dtype=torch.bool)
    keep[s : s + count] = inside
    layer = method.ilp.layer if isinstance(method, CROP) and method.ilp is not None else 0
    text_model = model.model.language_model
    kept = torch.arange(hidden.shape[1])
    with torch.no_grad():
        cos, sin = text_model.rotary_emb(hidden, position_ids=positions[:, None])
        for index, decoder_layer in enumerate(text_model.layers):
            if layer and index == layer:
                kept = keep.nonzero().squeeze(1)
                hidden, cos, sin = hidden[:, kept], cos[:, kept], sin[:, kept]
            hidden = decoder_layer(hidden, attention_mask=causal_mask(hidden.shape[1], hidden.dtype),
                                   position_embeddings=(cos, sin))  # fmt: skip
            if deepstack and index < len(stacked):
                here = is_new[kept]
                hidden = hidden.clone()
                hidden[0, here] += stacked[index][kept[here] - s]
        return model.lm_head(text_model.norm(hidden))[0], count


@pytest.mark.parametrize("name", METHODS)
def test_pre_llm_methods_carry_deepstack_and_equal_the_hand_reference(model, processor, name):
    inputs = qwen_batch(processor, 3)
    method = METHODS[name]()
    pruned = crop.apply(model, processor, method=method)
    try:
        output, stats = pruned(**inputs, regions=REGIONS)
        for row in range(3):
            alone = qwen_row(inputs, row)
            kept_cells = (stats.rows[row].cells.reshape(-1) == FINE).nonzero().squeeze(1)
            expected, count = reference(model, alone, REGIONS[row], method, kept_cells)
            got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            assert stats.rows[row].llm_input_tokens == count
    finally:
        pruned.remove()


def test_leaving_the_deepstack_features_out_is_caught(model, processor):
    """A mutation: the hand reference without DeepStack's features differs from what runs, so the tests above
    can fail on them."""
    inputs = qwen_batch(processor, 1)
    method = CROP(None, PLC(ratio=2))
    pruned = crop.apply(model, processor, method=method)
    try:
        output, _ = pruned(**inputs, regions=REGIONS[:1])
    finally:
        pruned.remove()
    none = torch.empty(0, dtype=torch.long)
    expected, _ = reference(model, qwen_row(inputs, 0), REGIONS[0], method, none, deepstack=False)
    assert (output.logits[0, -1] - expected[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["plc+ilp1", "divprune"])
def test_cached_generation_equals_recomputation(model, processor, name):
    inputs = qwen_batch(processor, 2)
    method = METHODS[name]()
    steps = 3
    pruned = crop.apply(model, processor, method=method)
    try:
        sequences, _ = pruned.generate(**inputs, regions=REGIONS[:2], max_new_tokens=steps, min_new_tokens=steps,
                                       do_sample=False)  # fmt: skip
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(steps):  # the whole pruned prompt plus the tokens so far, no cache
            new = torch.zeros_like(ids[:, inputs["input_ids"].shape[1] :])
            types = torch.cat([inputs["mm_token_type_ids"], new.to(inputs["mm_token_type_ids"].dtype)], dim=1)
            step = dict(inputs, input_ids=ids, attention_mask=mask, mm_token_type_ids=types)
            output, _ = pruned(**step, regions=REGIONS[:2], use_cache=False)
            logits = output.logits[:, -1].clone()
            logits[:, model.generation_config.eos_token_id] = float("-inf")  # as min_new_tokens does
            token = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], dim=1), torch.cat([mask, torch.ones_like(token)], dim=1)
    finally:
        pruned.remove()
    assert torch.equal(sequences, ids)


class MeanToken(PreLLMMethod):
    """A pre-LLM method whose one token does not say how it mixes the cells (no `mixing`)."""

    name = "mean-token"

    def validate(self, num_layers: int, grid_tokens: int | None) -> None:
        pass

    def reduce(self, image) -> Selection:
        features = image.features
        one = torch.ones(1, dtype=torch.bool)
        compressed = Compressed(features.mean(0, keepdim=True), one, torch.zeros(1, dtype=torch.long))
        return Selection(compressed, one, torch.full(image.shape, POOLED))

    def describe(self) -> str:
        return self.name


def test_a_method_without_a_mix_is_refused_with_the_reason(model, processor):
    pruned = crop.apply(model, processor, method=MeanToken())
    try:
        with pytest.raises(UnsupportedModelError, match="not a fixed mix of the grid's cells"):
            pruned(**qwen_batch(processor, 1))
    finally:
        pruned.remove()

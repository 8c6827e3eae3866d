"""PLC (pooling form): identity on the whole image, token counts, and logits against a by-hand pooling."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_inputs, on_grid
from reference import greedy_by_recompute, merged_embeddings, run_layers, unpadded_row

import crop
from crop.errors import ConfigError
from crop.region import Region
from crop.strategies.plc import PLC, compress

SIDE = 12


def pool_by_hand(features: torch.Tensor, region: Region, ratio: int, start: int):
    """Walk the grid in raster order; a region cell is its own token, an outside cell opens its ratio x ratio
    block's token (the mean of the block's outside cells) the first time the block is met."""
    inside = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    for r in range(SIDE):
        for c in range(SIDE):
            x, y = (c + 0.5) / SIDE, (r + 0.5) / SIDE
            inside[r, c] = region.x0 <= x <= region.x1 and region.y0 <= y <= region.y1
    tokens, positions, is_inside, seen = [], [], [], set()
    for r in range(SIDE):
        for c in range(SIDE):
            if inside[r, c]:
                tokens.append(features[r * SIDE + c])
                is_inside.append(True)
            elif (r // ratio, c // ratio) not in seen:
                block = (r // ratio, c // ratio)
                seen.add(block)
                members = [
                    features[rr * SIDE + cc]
                    for rr in range(block[0] * ratio, min((block[0] + 1) * ratio, SIDE))
                    for cc in range(block[1] * ratio, min((block[1] + 1) * ratio, SIDE))
                    if not inside[rr, cc]
                ]
                tokens.append(torch.stack(members).mean(0))
                is_inside.append(False)
            else:
                continue
            positions.append(start + r * SIDE + c)
    return torch.stack(tokens), torch.tensor(positions), torch.tensor(is_inside)


def test_whole_region_is_identity():
    features = torch.randn(SIDE * SIDE, 8)
    out = compress(features, Region.full().token_mask(SIDE, SIDE), PLC(ratio=4))
    assert torch.equal(out.features, features)
    assert out.inside.all() and torch.equal(out.first_cell, torch.arange(SIDE * SIDE))


@pytest.mark.parametrize(("box", "ratio"), [([0, 0, 3, 3], 4), ([3, 2, 5, 6], 3), ([7, 7, 7, 7], 2), ([0, 0, 7, 7], 4)])
def test_token_count_and_values_match_pooling_by_hand(box, ratio):
    features = torch.randn(SIDE * SIDE, 8)
    region = Region.from_grid(box)
    out = compress(features, region.token_mask(SIDE, SIDE), PLC(ratio=ratio))
    tokens, positions, inside = pool_by_hand(features, region, ratio, start=0)
    assert out.features.shape[0] == tokens.shape[0]
    torch.testing.assert_close(out.features, tokens)
    assert torch.equal(out.first_cell, positions) and torch.equal(out.inside, inside)


def test_quarter_region_count():
    out = compress(torch.randn(SIDE * SIDE, 4), Region.from_grid([0, 0, 3, 3]).token_mask(SIDE, SIDE), PLC(ratio=4))
    # 6x6 = 36 region cells; of the 3x3 = 9 blocks of 4x4 only block (0, 0) lies wholly inside
    assert out.features.shape[0] == 36 + 8


def test_rings_pool_the_margin_finer():
    region = Region.from_grid([3, 3, 4, 4])  # 12x12 cells: rows/cols 4..7 (centres inside 0.375..0.625)
    inside = region.token_mask(SIDE, SIDE)
    assert int(inside.sum()) == 16
    out = compress(torch.randn(SIDE * SIDE, 4), inside, PLC(ratio=6, rings=((1, 2),)))
    # ring: cells at chessboard distance 1 (rows/cols 3..8 minus the 4x4 core: 20 cells) pooled by 2x2 blocks
    ring_blocks = {(r // 2, c // 2) for r in range(3, 9) for c in range(3, 9) if not (4 <= r <= 7 and 4 <= c <= 7)}
    background_blocks = {
        (r // 6, c // 6) for r in range(SIDE) for c in range(SIDE) if not (3 <= r <= 8 and 3 <= c <= 8)
    }
    assert out.features.shape[0] == 16 + len(ring_blocks) + len(background_blocks)


@pytest.mark.parametrize("batch", [1, 3])
def test_plc_whole_image_equals_unmodified_model(model, processor, batch):
    inputs = batch_inputs(processor, batch)
    with torch.no_grad():
        expected = model(**inputs).logits
    pruned = crop.apply(model, processor, ilp=None, plc=4)
    output, _ = pruned(**inputs, **on_grid([Region.full()] * batch))
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(output.logits[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("position", "ilp"), [("original", None), ("compact", None), ("original", 2)])
def test_plc_logits_match_reference(model, processor, position, ilp):
    inputs = batch_inputs(processor, 2)
    regions = [Region.from_grid([0, 0, 3, 3]), Region.from_grid([2, 3, 6, 5])]
    ratio = 3
    pruned = crop.apply(model, processor, ilp=ilp, plc=PLC(ratio=ratio, position=position))
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
        tokens, image_positions, inside = pool_by_hand(embeds[0, start:end], region, ratio, start)
        new_embeds = torch.cat([embeds[0, :start], tokens, embeds[0, end:]])[None]
        length = new_embeds.shape[1]
        original = torch.cat([torch.arange(start), image_positions, torch.arange(end, input_ids.shape[1])])
        positions = original if position == "original" else torch.arange(length)
        keep = None
        if ilp is not None:
            keep = torch.cat(
                [
                    torch.ones(start, dtype=torch.bool),
                    inside,
                    torch.ones(input_ids.shape[1] - end, dtype=torch.bool),
                ]
            )
        expected = run_layers(model, new_embeds, positions, keep, ilp or 0)[0]
        got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert stats.rows[row].llm_input_tokens == tokens.shape[0]
        assert stats.rows[row].kept_tokens == (int(inside.sum()) if ilp else tokens.shape[0])


def test_plc_generation_with_cache_equals_recomputing(sdpa_model, processor):
    inputs = batch_inputs(processor, 2)
    regions = [Region.from_grid([0, 0, 3, 3]), Region.from_grid([4, 0, 7, 7])]
    pruned = crop.apply(sdpa_model, processor, ilp=2, plc=4)
    try:
        sequences, _ = pruned.generate(
            **inputs, **on_grid(regions), max_new_tokens=4, min_new_tokens=4, do_sample=False
        )
        ids = greedy_by_recompute(pruned, inputs, regions, 4)
    finally:
        pruned.remove()
    assert torch.equal(sequences, ids)


@pytest.mark.parametrize("kwargs", [{"ratio": 0}, {"ratio": 2.5}, {"rings": ((0, 2),)}, {"position": "middle"}])
def test_bad_plc_settings_are_refused(kwargs):
    with pytest.raises(ConfigError):
        PLC(**kwargs)


def test_chebyshev_distance_equals_the_brute_force_minimum_and_leaves_its_input():
    """The dilation count equals min over region cells of max(|dr|, |dc|), on random masks of random shapes."""
    from crop.strategies.plc import chebyshev_distance

    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        rows, cols = torch.randint(1, 25, (2,), generator=generator).tolist()
        inside = torch.rand(rows, cols, generator=generator) < 0.3 * torch.rand(1, generator=generator).item()
        inside[rows // 2, cols // 3] = True
        before = inside.clone()
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        cells = torch.stack([r, c], -1).view(-1, 2)
        region = cells[inside.view(-1)]
        expected = (cells[:, None] - region[None]).abs().amax(-1).amin(-1).view(rows, cols)
        assert torch.equal(chebyshev_distance(inside), expected)
        assert torch.equal(inside, before)

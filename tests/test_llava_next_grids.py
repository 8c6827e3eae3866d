"""LLaVA-NeXT with the methods that need one 2-D grid, run grid by grid (base, then high-res with its newlines):
PLC, ILP at K = 0, uniform pooling, CROP's budget mode and crop-fused. References are written out from the
placeholder layout: each grid pooled on its own, newlines after their row's tokens, layers run by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import QUESTIONS, make_image
from reference import causal_mask, reference_logits, run_layers
from test_llava_next import batch, kept_placeholders, layout_for, row_inputs

import crop
from crop.errors import ConfigError, UnsupportedModelError
from crop.localize import AttentionLocalizer
from crop.models.llava_next import BASE, HIGH
from crop.region import Region
from crop.strategies.crop_fused import FusedCROP
from crop.strategies.crop_method import CROP
from crop.strategies.ilp import ILP
from crop.strategies.learned_plc import LearnedPLC, LearnedPLCConfig
from crop.strategies.plc import PLC
from crop.strategies.pooling import UniformPooling
from crop.strategies.random_select import RandomSelection
from crop.strategies.visionzip import VisionZip
from crop.testing.llava_next import build_next_model, build_next_processor

REGIONS = [Region(0.0, 0.0, 0.5, 1.0), Region(0.2, 0.5, 1.0, 1.0), Region(0.3, 0.1, 0.8, 0.6)]


@pytest.fixture(scope="module")
def processor():
    return build_next_processor()


@pytest.fixture(scope="module")
def model():
    return build_next_model()


def image_features(model, alone: dict) -> torch.Tensor:
    config = model.config
    with torch.no_grad():
        return model.model.get_image_features(
            pixel_values=alone["pixel_values"],
            image_sizes=alone["image_sizes"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
            **({"vision_aspect_ratio": config.vision_aspect_ratio} if hasattr(config, "vision_aspect_ratio") else {}),
        ).pooler_output[0]


def plc_by_hand(model, processor, alone: dict, region: Region, plc: PLC):
    """The image's PLC tokens written out: each grid compressed alone, in placeholder order, a newline after the
    high-res rows that yield a token. Returns (features, placeholder index, inside) per new token."""
    height, width = alone["image_sizes"][0].tolist()
    layout = layout_for(model, processor, (width, height))
    features = image_features(model, alone)
    keep = kept_placeholders(model, processor, (width, height), region)
    tokens, where, inside = [], [], []
    for grid, shape in ((BASE, layout.base_grid), (HIGH, layout.high_grid)):
        positions = layout.grid_positions(grid)
        compressed = plc.compress(features[positions], keep[positions].view(shape))
        for feature, first, fine in zip(compressed.features, compressed.first_cell, compressed.inside, strict=True):
            tokens.append(feature)
            where.append(int(positions[first]))
            inside.append(bool(fine))
        if grid == HIGH:
            rows = {int(first) // shape[1] for first in compressed.first_cell}
            pairs = zip(compressed.first_cell, compressed.inside, strict=True)
            row_inside = {int(first) // shape[1] for first, fine in pairs if fine}
            for newline in layout.newline_positions.tolist():
                row = int(layout.cells[newline, 1])
                if row in rows:
                    tokens.append(features[newline])
                    where.append(newline)
                    inside.append(row in row_inside)
    order = sorted(range(len(where)), key=where.__getitem__)
    return torch.stack([tokens[i] for i in order]), [where[i] for i in order], [inside[i] for i in order]


def run_by_hand(model, embeds: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor | None, layer: int):
    text_model = model.model.language_model
    hidden = embeds
    with torch.no_grad():
        cos, sin = text_model.rotary_emb(hidden, position_ids=positions[None])
        for index, decoder_layer in enumerate(text_model.layers):
            if keep is not None and index == layer:
                hidden, cos, sin = hidden[:, keep], cos[:, keep], sin[:, keep]
            hidden = decoder_layer(
                hidden, attention_mask=causal_mask(hidden.shape[1], hidden.dtype), position_embeddings=(cos, sin)
            )
        return model.lm_head(text_model.norm(hidden))[0]


def plc_reference(model, processor, alone: dict, region: Region, method: CROP) -> tuple[torch.Tensor, int]:
    """One row's logits with its PLC tokens at their first cell's original position (or numbered on, "compact");
    with ILP, layers >= K see the text and the region's tokens (and the newlines of rows holding one). Also the
    LLM's visual token count."""
    ids = alone["input_ids"][0]
    placeholders = (ids == model.config.image_token_id).nonzero().squeeze(1)
    start, count = int(placeholders[0]), placeholders.numel()
    tokens, where, inside = plc_by_hand(model, processor, alone, region, method.plc)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids[None])[0]
    new_embeds = torch.cat([embeds[:start], tokens, embeds[start + count :]])[None]
    positions = torch.cat(
        [torch.arange(start), start + torch.tensor(where), torch.arange(start + count, ids.numel())]
    )
    if method.plc.position == "compact":
        positions = torch.arange(new_embeds.shape[1])
    keep = None
    if method.ilp is not None:
        text = torch.ones(ids.numel() - count, dtype=torch.bool)
        keep = torch.cat([text[:start], torch.tensor(inside), text[start:]])
    layer = method.ilp.layer if method.ilp is not None else 0
    return run_by_hand(model, new_embeds, positions, keep, layer), tokens.shape[0]


@pytest.mark.parametrize(
    "method", [CROP(None, PLC(ratio=2)), CROP(ILP(2), PLC(ratio=2)), CROP(None, PLC(ratio=2, position="compact"))]
)
def test_plc_pools_each_grid_and_equals_the_reference(model, processor, method):
    inputs = batch(processor, 3)
    pruned = crop.apply(model, processor, method=method)
    try:
        output, stats = pruned(**inputs, regions=REGIONS)
    finally:
        pruned.remove()
    for row in range(3):
        expected, tokens = plc_reference(model, processor, row_inputs(inputs, row), REGIONS[row], method)
        got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert stats.rows[row].llm_input_tokens == tokens


def test_ilp_at_layer_zero_drops_before_the_llm(model, processor):
    inputs = batch(processor, 3)
    pruned = crop.apply(model, processor, method=CROP(ILP(0)))
    try:
        output, stats = pruned(**inputs, regions=REGIONS)
    finally:
        pruned.remove()
    for row in range(3):
        alone = row_inputs(inputs, row)
        height, width = alone["image_sizes"][0].tolist()
        kept = kept_placeholders(model, processor, (width, height), REGIONS[row])
        ids = alone["input_ids"][0]
        keep = torch.ones(ids.numel(), dtype=torch.bool)
        keep[(ids == model.config.image_token_id).nonzero().squeeze(1)] = kept
        expected = reference_logits(model, alone, keep, 0)
        torch.testing.assert_close(output.logits[row, -expected.shape[0] :], expected, atol=1e-5, rtol=0)
        assert stats.rows[row].llm_input_tokens == int(kept.sum())


def test_random_selection_before_the_llm_keeps_its_budget(model, processor):
    inputs = batch(processor, 3)
    pruned = crop.apply(model, processor, method=RandomSelection(10))
    try:
        output, stats = pruned(**inputs)
        single, _ = pruned(**row_inputs(inputs, 0))  # row r draws with seed + r: row 0 alone draws the same
    finally:
        pruned.remove()
    torch.testing.assert_close(output.logits[0, -1], single.logits[0, -1], atol=1e-5, rtol=0)
    assert [row.llm_input_tokens for row in stats.rows] == [10, 10, 10]


@pytest.mark.parametrize("budget", [9, 20, 40])
def test_uniform_pooling_shares_the_budget_between_grids(model, processor, budget):
    inputs = batch(processor, 3)
    pruned = crop.apply(model, processor, method=UniformPooling(budget))
    try:
        output, stats = pruned(**inputs)
        for row in range(3):
            single, single_stats = pruned(**row_inputs(inputs, row))
            torch.testing.assert_close(output.logits[row, -1], single.logits[0, -1], atol=1e-5, rtol=0)
            assert stats.rows[row].llm_input_tokens == single_stats.rows[0].llm_input_tokens
    finally:
        pruned.remove()
    for row in stats.rows:
        assert budget - 4 <= row.llm_input_tokens <= budget  # pooled grids h x w fit, newlines included


def test_budget_mode_keeps_exactly_n_and_equals_the_reference(model, processor):
    inputs = batch(processor, 3)
    pruned = crop.apply(model, processor, method=CROP(ILP(2), budget=24))
    try:
        output, stats = pruned(**inputs, regions=REGIONS)
    finally:
        pruned.remove()
    for row in range(3):
        assert stats.rows[row].kept_tokens == 24
        alone = row_inputs(inputs, row)
        keep = budget_keep_by_hand(model, processor, alone, REGIONS[row], 24)
        expected = reference_logits(model, alone, keep, 2)
        torch.testing.assert_close(output.logits[row, -expected.shape[0] :], expected, atol=1e-5, rtol=0)


def budget_keep_by_hand(model, processor, alone: dict, region: Region, budget: int) -> torch.Tensor:
    """Prompt-wide keep flags of the budget rule grid by grid: the high-res grid's share is its cells' share of
    the budget, lowered until its cells plus the newlines of their rows fit; the base grid takes the rest. In each
    grid the region's cells nearest its centre go first, then outside cells by distance to the region."""
    height, width = alone["image_sizes"][0].tolist()
    layout = layout_for(model, processor, (width, height))
    region_keep = kept_placeholders(model, processor, (width, height), region)
    base, high = layout.grid_positions(BASE), layout.grid_positions(HIGH)
    rows, cols = layout.high_grid

    def ranked(positions: torch.Tensor, shape: tuple[int, int]) -> list[int]:
        inside = region_keep[positions].view(shape)
        r, c = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
        cr, cc = r[inside].float().mean(), c[inside].float().mean()
        scores = []
        for i in range(shape[0]):
            for j in range(shape[1]):
                to_region = min(
                    max(abs(i - a), abs(j - b)) for a in range(shape[0]) for b in range(shape[1]) if inside[a, b]
                )
                to_centre = float(((i - cr) ** 2 + (j - cc) ** 2).sqrt())
                scores.append((to_region, to_centre, i * shape[1] + j))
        return [index for *_, index in sorted(scores)]

    high_order = ranked(high, (rows, cols))
    target = max(round(budget * high.numel() / (high.numel() + base.numel())), budget - base.numel())
    share = min(target, high.numel())
    while True:
        chosen = high_order[:share]
        used = share + len({index // cols for index in chosen})
        if used <= target:
            break
        share -= used - target
    keep_ph = torch.zeros(layout.num_tokens, dtype=torch.bool)
    keep_ph[high[chosen]] = True
    for newline in layout.newline_positions.tolist():
        keep_ph[newline] = int(layout.cells[newline, 1]) in {index // cols for index in chosen}
    keep_ph[base[ranked(base, layout.base_grid)[: budget - used]]] = True
    ids = alone["input_ids"][0]
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[(ids == model.config.image_token_id).nonzero().squeeze(1)] = keep_ph
    return keep


def test_fused_equals_two_pass_on_the_high_res_grid(model, processor):
    image, question = make_image(120, 60, seed=5), QUESTIONS[0]
    localizer = AttentionLocalizer(model, processor, layer=1)
    two_pass = crop.apply(model, processor, localizer=localizer, ilp=ILP(2))
    try:
        expected = two_pass.ask(image, question, max_new_tokens=3)
    finally:
        two_pass.remove()
    fused = crop.apply(model, processor, method=FusedCROP(layer=2))
    try:
        got = fused.ask(image, question, max_new_tokens=3)
    finally:
        fused.remove()
    assert got.stats.rows[0].region == expected.stats.rows[0].region
    assert got.text == expected.text
    assert got.stats.rows[0].kept_tokens == expected.stats.rows[0].kept_tokens


def test_plc_generation_with_cache_equals_recomputing(model, processor):
    inputs = batch(processor, 2)
    pruned = crop.apply(model, processor, ilp=2, plc=2)
    try:
        sequences, _ = pruned.generate(**inputs, regions=REGIONS[:2], max_new_tokens=3, min_new_tokens=3)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(3):
            step = dict(inputs, input_ids=ids, attention_mask=mask)
            output, _ = pruned(**step, regions=REGIONS[:2], use_cache=False)
            ids = torch.cat([ids, output.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    finally:
        pruned.remove()
    assert torch.equal(sequences[:, -3:], ids[:, -3:])


def test_learned_plc_is_refused_with_a_reason(model, processor):
    inputs = batch(processor, 1)
    hidden = model.config.text_config.hidden_size
    learned = LearnedPLC(LearnedPLCConfig(hidden_size=hidden, rows=4, cols=4))
    pruned = crop.apply(model, processor, method=CROP(None, learned))
    try:
        with pytest.raises(UnsupportedModelError, match="learned PLC is trained for one token grid"):
            pruned(**inputs, regions=[Region.full()])
    finally:
        pruned.remove()



def visionzip_by_hand(eager, alone: dict, layout, budget: int, contextual: int) -> torch.Tensor:
    """The authors' LLaVA-NeXT VisionZip written out: each crop keeps an equal share (CLS, dominant patches by the
    CLS attention of an eager tower, contextual tokens merged by explicit loops over key similarities); then the
    base crop's tokens, the tiles' dominant patches in stitched raster order, the tiles' CLS, their contextual."""
    crops = 1 + layout.tiles[0] * layout.tiles[1]
    side, tile_cols = layout.base_grid[0], layout.tiles[1]
    tower = eager.model.vision_tower
    layer = tower.encoder.layers[-1]
    heads = eager.config.vision_config.num_attention_heads
    with torch.no_grad():
        vision = tower(alone["pixel_values"][0, :crops], output_hidden_states=True, output_attentions=True)
        shares = [budget // crops + (c < budget % crops) for c in range(crops)]
        kept = []
        for c, share in enumerate(shares):
            hidden = vision.hidden_states[-1][c]
            merged_count = min(share - 1, round(contextual * share / budget))
            attention = vision.attentions[-1][c, :, 0, 1:].sum(0)
            dominant = (attention.topk(share - 1 - merged_count).indices.sort().values + 1).tolist()
            keys = layer.self_attn.k_proj(layer.layer_norm1(vision.hidden_states[-2][c]))
            keys = keys.view(keys.shape[0], heads, -1).mean(1)
            rest = [i for i in range(1, hidden.shape[0]) if i not in dominant]
            context = []
            if merged_count:
                step = max(1, len(rest) // merged_count)
                targets = list(range(0, len(rest), step))[:merged_count]
                members = {t: [] for t in targets}
                for j in range(len(rest)):
                    if j not in members:
                        sims = [F.cosine_similarity(keys[rest[j]], keys[rest[t]], dim=0) for t in targets]
                        members[targets[int(torch.stack(sims).argmax())]].append(hidden[rest[j]])
                context = [hidden[rest[t]] + (torch.stack(m).mean(0) if m else 0) for t, m in members.items()]
            kept.append((hidden, dominant, context))
        hidden, dominant, context = kept[0]
        tokens = [hidden[0], *hidden[dominant], *context]
        tiles = []
        for c in range(1, crops):
            tile_row, tile_col = divmod(c - 1, tile_cols)
            for d in kept[c][1]:
                row, col = divmod(d - 1, side)
                tiles.append(((tile_row * side + row, tile_col * side + col), kept[c][0][d]))
        tokens += [state for _, state in sorted(tiles, key=lambda pair: pair[0])]
        tokens += [kept[c][0][0] for c in range(1, crops)]
        tokens += [state for c in range(1, crops) for state in kept[c][2]]
        return eager.model.multi_modal_projector(torch.stack(tokens))


@pytest.mark.parametrize("budget", [24, 13])
def test_visionzip_per_crop_equals_the_authors_order(model, processor, budget):
    inputs = batch(processor, 2)
    method = VisionZip(budget)
    pruned = crop.apply(model, processor, method=method)
    try:
        output, stats = pruned(**inputs)
    finally:
        pruned.remove()
    eager = build_next_model(attn_implementation="eager")
    for row in range(2):
        alone = row_inputs(inputs, row)
        height, width = alone["image_sizes"][0].tolist()
        layout = layout_for(model, processor, (width, height))
        tokens = visionzip_by_hand(eager, alone, layout, budget, method.contextual)
        ids = alone["input_ids"][0]
        placeholders = (ids == model.config.image_token_id).nonzero().squeeze(1)
        start, end = int(placeholders[0]), int(placeholders[-1]) + 1
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids)
        new = torch.cat([embeds[:start], tokens, embeds[end:]])[None]
        with torch.no_grad():
            expected = run_layers(model, new, torch.arange(new.shape[1]), None, 0)[0]
        torch.testing.assert_close(output.logits[row, -expected.shape[0] :], expected, atol=1e-4, rtol=0)
        assert stats.rows[row].llm_input_tokens == budget
    with pytest.raises(ConfigError, match="one crop per image"):
        crop.apply(model, processor, method=VisionZip(budget, position="original"))(**inputs)


def test_visionzip_budget_below_one_token_per_crop_is_refused(model, processor):
    inputs = batch(processor, 1)  # 120 x 60: the base image and 2 tiles
    pruned = crop.apply(model, processor, method=VisionZip(2))
    try:
        with pytest.raises(ConfigError, match="below one token per crop"):
            pruned(**inputs)
    finally:
        pruned.remove()

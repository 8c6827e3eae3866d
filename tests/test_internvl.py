"""InternVL 3 (Qwen2 LLM) and 3.5 (Qwen3 LLM): tiles plus a thumbnail, pixel-shuffled. ILP against layers run by
hand with the kept set from the tile geometry alone, methods before the LLM against hand-built prompts (each grid
compressed on its own, the tiles' grid stitched), cached generation, batches equal to their rows, the real
loading path and the refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image
from reference import causal_mask, full_region_logits_match, reference_logits

import crop
from crop.errors import ConfigError, UnsupportedModelError
from crop.loading import load_model
from crop.models.internvl import InternVLImageTextProcessor
from crop.region import Region
from crop.strategies.crop_method import CROP
from crop.strategies.divprune import DivPrune
from crop.strategies.ilp import ILP
from crop.strategies.plc import PLC
from crop.strategies.pooling import UniformPooling, pooled_shape
from crop.strategies.random_select import RandomSelection
from crop.testing.internvl import build_internvl_model, build_internvl_processor, internvl_inputs

SIZES = [(192, 128), (64, 192), (64, 64)]  # 2x3 tiles + thumbnail, 3x1 tiles + thumbnail, one tile
TILES = [(2, 3), (3, 1), (1, 1)]
SIDE = 4  # tokens per crop side: 64-pixel tiles, 8-pixel patches, pixel shuffle 2x2
REGIONS = [Region(0.5, 0.0, 1.0, 0.5), Region(0.0, 0.3, 0.6, 1.0), Region(0.2, 0.2, 0.7, 0.9)]


@pytest.fixture(scope="module")
def processor():
    return build_internvl_processor()


@pytest.fixture(
    scope="module", params=[(text, attn) for text in ("qwen2", "qwen3") for attn in ("sdpa", "eager")],
    ids=lambda p: "-".join(p),
)  # fmt: skip
def model(request):
    text, attn = request.param
    return build_internvl_model(attn_implementation=attn, text_model=text)


def batch(processor, count: int = 3) -> dict:
    images = [make_image(*SIZES[i], seed=i) for i in range(count)]
    questions = ["what colour is it ?", "how many objects are there ?", "what ?"]
    return internvl_inputs(processor, images, questions[:count])


def row_inputs(inputs: dict, row: int) -> dict:
    real = inputs["attention_mask"][row].bool()
    crops = [rows * cols + (rows * cols > 1) for rows, cols in inputs["image_tiles"].tolist()]
    start = sum(crops[:row])
    return {"input_ids": inputs["input_ids"][row][real][None], "attention_mask": torch.ones(1, int(real.sum()),
            dtype=torch.long), "pixel_values": inputs["pixel_values"][start : start + crops[row]],
            "image_tiles": inputs["image_tiles"][row : row + 1]}  # fmt: skip


def placeholder_cells(tiles: tuple[int, int]) -> list[tuple[str, int, int, tuple[int, int]]]:
    """Per placeholder, from the tiling alone: which grid ("tiles" stitched, or "thumbnail"), its cell's row and
    column there, and the grid's shape. Tile t of a rows x cols cut sits at (t // cols, t % cols)."""
    rows, cols = tiles
    cells = []
    for tile in range(rows * cols):
        for index in range(SIDE * SIDE):
            row, col = (tile // cols) * SIDE + index // SIDE, (tile % cols) * SIDE + index % SIDE
            cells.append(("tiles", row, col, (rows * SIDE, cols * SIDE)))
    if rows * cols > 1:
        cells += [("thumbnail", i // SIDE, i % SIDE, (SIDE, SIDE)) for i in range(SIDE * SIDE)]
    return cells


def kept_placeholders(tiles: tuple[int, int], region: Region) -> torch.Tensor:
    """A placeholder stays when its cell's centre lies in the region: every grid shows the whole image."""
    return torch.tensor(
        [
            region.x0 <= (col + 0.5) / shape[1] <= region.x1 and region.y0 <= (row + 0.5) / shape[0] <= region.y1
            for _, row, col, shape in placeholder_cells(tiles)
        ]
    )


def prompt_keep(ids: torch.Tensor, image_token: int, placeholders: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[(ids == image_token).nonzero().squeeze(1)] = placeholders
    return keep


def image_features(model, alone: dict) -> torch.Tensor:
    with torch.no_grad():
        crops = model.model.get_image_features(
            pixel_values=alone["pixel_values"], vision_feature_layer=-1, vision_feature_select_strategy="default",
            return_dict=True,
        ).pooler_output  # fmt: skip
    return crops.flatten(0, 1)


def grid_positions(tiles: tuple[int, int]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """Each grid's placeholders in its own raster order, with its shape."""
    cells = placeholder_cells(tiles)
    grids = []
    for name in ("thumbnail", "tiles"):
        mine = [(row * shape[1] + col, i, shape) for i, (grid, row, col, shape) in enumerate(cells) if grid == name]
        if mine:
            grids.append((torch.tensor([index for _, index, _ in sorted(mine)]), mine[0][2]))
    return grids


def logits_by_hand(model, embeds: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor | None, layer: int):
    text_model = model.model.language_model
    hidden = embeds
    with torch.no_grad():
        cos, sin = text_model.rotary_emb(hidden, position_ids=positions[None])
        for index, decoder_layer in enumerate(text_model.layers):
            if keep is not None and index == layer:
                hidden, cos, sin = hidden[:, keep], cos[:, keep], sin[:, keep]
            mask = causal_mask(hidden.shape[1], hidden.dtype)
            hidden = decoder_layer(hidden, attention_mask=mask, position_embeddings=(cos, sin))
        return model.lm_head(text_model.norm(hidden))[0]


def plc_reference(model, alone: dict, region: Region, method: CROP) -> tuple[torch.Tensor, int]:
    """One row's logits with each grid compressed on its own (the tiles' grid stitched), the new tokens in
    placeholder order at their first cell's original position; with ILP, layers >= K see the text and the
    region's tokens. Also the LLM's visual token count."""
    ids = alone["input_ids"][0]
    placeholders = (ids == model.config.image_token_id).nonzero().squeeze(1)
    start, count = int(placeholders[0]), placeholders.numel()
    tiles = tuple(alone["image_tiles"][0].tolist())
    features, inside = image_features(model, alone), kept_placeholders(tiles, region)
    tokens, where, fine = [], [], []
    for positions, shape in grid_positions(tiles):
        compressed = method.plc.compress(features[positions], inside[positions].view(shape))
        tokens += list(compressed.features)
        where += positions[compressed.first_cell].tolist()
        fine += compressed.inside.tolist()
    order = sorted(range(len(where)), key=where.__getitem__)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids[None])[0]
    new_tokens = torch.stack([tokens[i] for i in order])
    new_embeds = torch.cat([embeds[:start], new_tokens, embeds[start + count :]])[None]
    text_positions = torch.arange(ids.numel())
    positions = torch.cat([text_positions[:start], start + torch.tensor(where)[order], text_positions[start + count :]])
    keep = None
    if method.ilp is not None:
        keep = torch.ones(new_embeds.shape[1], dtype=torch.bool)
        keep[start : start + len(order)] = torch.tensor([fine[i] for i in order])
    layer = method.ilp.layer if method.ilp is not None else 0
    return logits_by_hand(model, new_embeds, positions, keep, layer), len(order)


def test_layouts_match_the_processor_and_nothing_pruned_equals_the_model(model, processor):
    inputs = batch(processor)
    assert inputs["image_tiles"].tolist() == [list(tiles) for tiles in TILES]
    counts = full_region_logits_match(model, processor, inputs)
    assert counts == [len(placeholder_cells(tiles)) for tiles in TILES]
    layouts = crop.adapter.adapter_for(model).visual_layouts(inputs)
    assert [layout.grids for layout in layouts] == [((4, 4), (8, 12)), ((4, 4), (12, 4)), ()]


@pytest.mark.parametrize("layer", [1, 2])
def test_ilp_keeps_the_region_on_both_grids_and_equals_layers_by_hand(model, processor, layer):
    inputs = batch(processor)
    pruned = crop.apply(model, processor, ilp=layer)
    try:
        output, stats = pruned(**inputs, regions=REGIONS)
        for row in range(3):
            alone = row_inputs(inputs, row)
            kept = kept_placeholders(TILES[row], REGIONS[row])
            keep = prompt_keep(alone["input_ids"][0], model.config.image_token_id, kept)
            expected = reference_logits(model, alone, keep, layer)
            got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            assert stats.rows[row].kept_tokens == int(kept.sum())
        sequences, _ = pruned.generate(**inputs, regions=REGIONS, max_new_tokens=3, min_new_tokens=3,
                                       do_sample=False)  # fmt: skip
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(3):  # the whole pruned prompt plus the tokens so far, no cache
            step, _ = pruned(**dict(inputs, input_ids=ids, attention_mask=mask), regions=REGIONS, use_cache=False)
            logits = step.logits[:, -1].clone()
            logits[:, model.generation_config.eos_token_id] = float("-inf")  # as min_new_tokens does
            token = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], dim=1), torch.cat([mask, torch.ones_like(token)], dim=1)
    finally:
        pruned.remove()
    assert torch.equal(sequences, ids)


@pytest.mark.parametrize(
    "method", [CROP(None, PLC(ratio=2)), CROP(ILP(2), PLC(ratio=2)), CROP(None, PLC(ratio=4))],
    ids=["plc2", "ilp2+plc2", "plc4"],
)
def test_plc_compresses_each_grid_and_equals_the_reference(model, processor, method):
    inputs = batch(processor)
    pruned = crop.apply(model, processor, method=method)
    try:
        output, stats = pruned(**inputs, regions=REGIONS)
    finally:
        pruned.remove()
    for row in range(3):
        expected, tokens = plc_reference(model, row_inputs(inputs, row), REGIONS[row], method)
        got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert stats.rows[row].llm_input_tokens == tokens


def test_ilp_at_layer_zero_drops_before_the_llm(model, processor):
    inputs = batch(processor)
    pruned = crop.apply(model, processor, method=CROP(ILP(0)))
    try:
        output, stats = pruned(**inputs, regions=REGIONS)
    finally:
        pruned.remove()
    for row in range(3):
        alone = row_inputs(inputs, row)
        kept = kept_placeholders(TILES[row], REGIONS[row])
        expected = reference_logits(model, alone, prompt_keep(alone["input_ids"][0], model.config.image_token_id,
                                                              kept), 0)  # fmt: skip
        torch.testing.assert_close(output.logits[row, -expected.shape[0] :], expected, atol=1e-5, rtol=0)
        assert stats.rows[row].llm_input_tokens == int(kept.sum())


def budget_keep_by_hand(tiles: tuple[int, int], region: Region, budget: int) -> torch.Tensor:
    """Placeholder keep flags of the budget rule grid by grid: the tiles' grid takes its cells' share of the
    budget, the thumbnail the rest; in each grid the region's cells nearest its centre go first, then the
    outside cells by distance to the region, ties by raster order."""
    inside = kept_placeholders(tiles, region)
    keep = torch.zeros(inside.numel(), dtype=torch.bool)
    grids = grid_positions(tiles)
    shares = [budget]
    if len(grids) == 2:
        thumbnail, tiled = (positions.numel() for positions, _ in grids)
        tiles_share = max(round(budget * tiled / (thumbnail + tiled)), budget - thumbnail)
        shares = [budget - tiles_share, tiles_share]
    for (positions, (rows, cols)), share in zip(grids, shares, strict=True):
        mask = inside[positions].view(rows, cols)
        centre = mask.nonzero().float().mean(0)
        scores = []
        for i in range(rows):
            for j in range(cols):
                to_region = min(max(abs(i - a), abs(j - b)) for a, b in mask.nonzero().tolist())
                to_centre = float(((torch.tensor([i, j]) - centre) ** 2).sum().sqrt())
                scores.append((to_region, to_centre, i * cols + j))
        keep[positions[[index for *_, index in sorted(scores)[:share]]]] = True
    return keep


def test_budget_mode_keeps_exactly_n_and_equals_the_reference(model, processor):
    inputs = batch(processor)
    pruned = crop.apply(model, processor, method=CROP(ILP(2), budget=12))
    try:
        output, stats = pruned(**inputs, regions=REGIONS)
    finally:
        pruned.remove()
    for row in range(3):
        assert stats.rows[row].kept_tokens == 12
        alone = row_inputs(inputs, row)
        kept = budget_keep_by_hand(TILES[row], REGIONS[row], 12)
        keep = prompt_keep(alone["input_ids"][0], model.config.image_token_id, kept)
        expected = reference_logits(model, alone, keep, 2)
        torch.testing.assert_close(output.logits[row, -expected.shape[0] :], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("budget", [6, 14])
def test_divprune_before_the_llm_equals_a_hand_built_prompt(model, processor, budget):
    from test_divprune import hand_logits, unpadded

    inputs = batch(processor)
    pruned = crop.apply(model, processor, method=DivPrune(budget))
    try:
        output, stats = pruned(**inputs)
    finally:
        pruned.remove()
    for row in range(3):
        features = image_features(model, row_inputs(inputs, row))
        expected = hand_logits(model, unpadded(inputs, row), features, budget)
        torch.testing.assert_close(output.logits[row, -1], expected, atol=1e-5, rtol=0)
        assert stats.rows[row].llm_input_tokens == budget


@pytest.mark.parametrize("method", ["fastv", "pyramiddrop", "sparsevlm", "dart", "crop-fused", "pool", "random"])
def test_methods_batch_equals_rows(model, processor, method):
    inputs = batch(processor)
    if method == "dart":  # its key norms depend on absolute positions: count them from each row's first token
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    pruned = crop.apply(model, processor, method=method, budget=12)
    try:
        output, stats = pruned(**inputs)
        for row in [0] if method == "random" else range(3):  # row r draws with seed + r: row 0 alone draws alike
            single, _ = pruned(**row_inputs(inputs, row))
            torch.testing.assert_close(output.logits[row, -1], single.logits[0, -1], atol=1e-5, rtol=0)
    finally:
        pruned.remove()
    assert all(row.kept_tokens <= 12 for row in stats.rows)


def test_refusals_and_a_saved_checkpoint_answers(processor, tmp_path, capsys):
    from crop.cli import main

    model = build_internvl_model()
    inputs = batch(processor, 1)
    pruned = crop.apply(model, processor, method="visionzip", budget=6)
    try:
        with pytest.raises(UnsupportedModelError, match="pixel-shuffled"):
            pruned(**inputs)
    finally:
        pruned.remove()
    pruned = crop.apply(model, processor, ilp=2)
    try:
        without = {key: value for key, value in inputs.items() if key != "image_tiles"}
        with pytest.raises(ConfigError, match="InternVLImageTextProcessor"):
            pruned(**without, regions=REGIONS[:1])
    finally:
        pruned.remove()
    model.save_pretrained(tmp_path / "ivl")
    processor.save_pretrained(tmp_path / "ivl")
    make_image(192, 64).save(tmp_path / "wide.png")
    ask = ["ask", "--model", str(tmp_path / "ivl"), "--image", str(tmp_path / "wide.png"), "--question", "what ?",
           "--max-new-tokens", "2"]  # fmt: skip
    for options in (["--region", "0", "0", "3", "7"], ["--method", "divprune", "--budget", "8"]):
        assert main([*ask, *options]) == 0
        assert "pruned answer" in capsys.readouterr().out
    config = tmp_path / "ivl" / "processor_config.json"
    config.write_text(config.read_text().replace("InternVLImageTextProcessor", "InternVLProcessor"))
    _, loaded = load_model(tmp_path / "ivl")  # a checkpoint saved with the stock processor
    assert isinstance(loaded, InternVLImageTextProcessor)
    assert loaded(images=[make_image(192, 64)], text=["<IMG_CONTEXT> what ?"])["image_tiles"].tolist() == [[1, 3]]


@pytest.mark.parametrize("method", [RandomSelection(9), CROP(ILP(0), budget=12)], ids=["random", "budget-k0"])
def test_selections_before_the_llm_equal_the_prompt_of_the_kept_placeholders(model, processor, method):
    """The kept placeholders at their original positions, every other placeholder dropped before the LLM: the
    budget rule's written out by hand (`budget_keep_by_hand`); random's draw is row r's permutation of the
    placeholders with seed + r."""
    inputs = batch(processor)
    pruned = crop.apply(model, processor, method=method)
    try:
        output, stats = pruned(**inputs, regions=REGIONS)
    finally:
        pruned.remove()
    for row in range(3):
        count = len(placeholder_cells(TILES[row]))
        if isinstance(method, CROP):
            kept = budget_keep_by_hand(TILES[row], REGIONS[row], 12)
        else:
            kept = torch.zeros(count, dtype=torch.bool)
            kept[torch.randperm(count, generator=torch.Generator().manual_seed(row))[:9]] = True
        assert int(kept.sum()) == stats.rows[row].llm_input_tokens
        alone = row_inputs(inputs, row)
        keep = prompt_keep(alone["input_ids"][0], model.config.image_token_id, kept)
        expected = reference_logits(model, alone, keep, 0)
        torch.testing.assert_close(output.logits[row, -expected.shape[0] :], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("budget", [6, 14])
def test_uniform_pooling_pools_each_grid_to_its_share(model, processor, budget):
    """By hand: the tiles' stitched grid takes its cells' share of the budget (at least the budget less the
    thumbnail's 16 cells), pooled to the largest h x w within it (adaptive average pooling over the stitched grid);
    the thumbnail pools to what remains; the tokens in placeholder order of their windows' first cells, at those
    cells' positions."""
    inputs = batch(processor)
    pruned = crop.apply(model, processor, method=UniformPooling(budget))
    try:
        output, stats = pruned(**inputs)
    finally:
        pruned.remove()
    for row in range(3):
        alone = row_inputs(inputs, row)
        features = image_features(model, alone)
        grids = grid_positions(TILES[row])
        shares = [budget]
        if len(grids) == 2:
            (thumbnail, _), (tiles, shape) = grids
            small, large = thumbnail.numel(), tiles.numel()
            target = max(round(budget * large / (small + large)), budget - small)
            h, w = pooled_shape(*shape, min(target, large))
            shares = [min(budget - h * w, small), target]
        tokens, where = [], []
        for (positions, (rows, cols)), share in zip(grids, shares, strict=True):
            if share < 1:
                continue
            h, w = pooled_shape(rows, cols, min(share, rows * cols))
            grid = features[positions].T.reshape(1, -1, rows, cols)
            tokens += list(torch.nn.functional.adaptive_avg_pool2d(grid, (h, w))[0].flatten(1).T)
            first = (torch.arange(h)[:, None] * rows // h * cols + torch.arange(w)[None, :] * cols // w).reshape(-1)
            where += positions[first].tolist()
        order = sorted(range(len(where)), key=where.__getitem__)
        ids = alone["input_ids"][0]
        placeholders = (ids == model.config.image_token_id).nonzero().squeeze(1)
        start, count = int(placeholders[0]), placeholders.numel()
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids[None])[0]
        new_embeds = torch.cat([embeds[:start], torch.stack([tokens[i] for i in order]), embeds[start + count :]])
        text = torch.arange(ids.numel())
        positions = torch.cat([text[:start], start + torch.tensor([where[i] for i in order]), text[start + count :]])
        expected = logits_by_hand(model, new_embeds[None], positions, None, 0)
        torch.testing.assert_close(output.logits[row, -expected.shape[0] :], expected, atol=1e-5, rtol=0)
        assert stats.rows[row].llm_input_tokens == len(order) <= budget

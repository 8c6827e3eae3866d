"""Baselines behind the same interface: random selection and uniform pooling, against by-hand references."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_inputs, on_grid
from reference import merged_embeddings, run_layers, unpadded_row

import crop
from crop.errors import ConfigError
from crop.strategies.pooling import UniformPooling, pooled_shape
from crop.strategies.random_select import RandomSelection

SIDE = 12


@pytest.mark.parametrize("layer", [None, 2])
def test_random_selection_keeps_budget_and_matches_reference(model, processor, layer):
    inputs = batch_inputs(processor, 3)
    budget = 20
    method = RandomSelection(budget, seed=3, layer=layer)
    pruned = crop.apply(model, processor, method=method)
    try:
        output, stats = pruned(**inputs)
    finally:
        pruned.remove()
    image_token = model.config.image_token_id
    for row in range(3):
        chosen = torch.randperm(SIDE * SIDE, generator=torch.Generator().manual_seed(3 + row))[:budget]
        input_ids, pixel_values = unpadded_row(inputs, row)
        visual = (input_ids[0] == image_token).nonzero().squeeze(1)
        keep = torch.ones(input_ids.shape[1], dtype=torch.bool)
        keep[visual] = False
        keep[visual[chosen]] = True
        embeds = merged_embeddings(model, input_ids, pixel_values)
        expected = run_layers(model, embeds, torch.arange(input_ids.shape[1]), keep, layer or 0)[0]
        got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert stats.rows[row].kept_tokens == budget
        assert stats.rows[row].region is None


@pytest.mark.parametrize(("budget", "shape"), [(16, (4, 4)), (36, (6, 6)), (20, (4, 5)), (144, (12, 12))])
def test_uniform_pooling_matches_pooling_by_hand(model, processor, budget, shape):
    assert pooled_shape(SIDE, SIDE, budget) == shape
    inputs = batch_inputs(processor, 2)
    pruned = crop.apply(model, processor, method=UniformPooling(budget))
    output, stats = pruned(**inputs)
    h, w = shape
    image_token = model.config.image_token_id
    for row in range(2):
        input_ids, pixel_values = unpadded_row(inputs, row)
        embeds = merged_embeddings(model, input_ids, pixel_values)
        visual = (input_ids[0] == image_token).nonzero().squeeze(1)
        start, end = int(visual[0]), int(visual[-1]) + 1
        grid = embeds[0, start:end].view(SIDE, SIDE, -1)
        tokens, positions = [], []
        for i in range(h):
            r0, r1 = (i * SIDE) // h, -(-((i + 1) * SIDE) // h)
            for j in range(w):
                c0, c1 = (j * SIDE) // w, -(-((j + 1) * SIDE) // w)
                tokens.append(grid[r0:r1, c0:c1].reshape(-1, grid.shape[-1]).mean(0))
                positions.append(start + r0 * SIDE + c0)
        new = torch.cat([embeds[0, :start], torch.stack(tokens), embeds[0, end:]])[None]
        pos = torch.cat([torch.arange(start), torch.tensor(positions), torch.arange(end, input_ids.shape[1])])
        expected = run_layers(model, new, pos, None, 0)[0]
        got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert stats.rows[row].llm_input_tokens == h * w


def test_budget_outside_the_grid_is_refused(sdpa_model, processor):
    for method in (RandomSelection(145), UniformPooling(0), RandomSelection(10, layer=9)):
        with pytest.raises(ConfigError, match="budget|layer"):
            crop.apply(sdpa_model, processor, method=method)


def test_crop_budget_mode_keeps_exactly_n_region_first(model, processor):
    from crop.region import Region
    from crop.strategies.crop_method import CROP, budget_cells
    from crop.strategies.ilp import ILP

    quarter = Region.from_grid([0, 0, 3, 3]).token_mask(SIDE, SIDE)  # 36 cells
    small = budget_cells(quarter, 16)
    assert set(small.tolist()) <= set(quarter.reshape(-1).nonzero().squeeze(1).tolist())
    rows, cols = small // SIDE, small % SIDE
    assert ((rows - 2.5) ** 2 + (cols - 2.5) ** 2).max() <= 2.5**2 + 1.5**2 + 1e-6  # the central 4x4 block
    large = budget_cells(quarter, 49)  # 36 region cells + the 13 cells of the ring at distance 1
    assert set(quarter.reshape(-1).nonzero().squeeze(1).tolist()) <= set(large.tolist())
    extra = [int(i) for i in large if not quarter.reshape(-1)[i]]
    assert all(i // SIDE <= 6 and i % SIDE <= 6 for i in extra)  # the ring right around the region
    inputs = batch_inputs(processor, 2)
    pruned = crop.apply(model, processor, method=CROP(ILP(2), budget=50))
    try:
        _, stats = pruned(**inputs, **on_grid([Region.from_grid([0, 0, 3, 3])] * 2))
    finally:
        pruned.remove()
    assert [row.kept_tokens for row in stats.rows] == [50, 50]
    for refused in ({"ilp": ILP(2), "plc": crop.PLC()}, {"plc": crop.PLC()}, {}):
        with pytest.raises(ConfigError, match="budget applies to ILP alone"):
            CROP(budget=10, **refused)


@pytest.mark.parametrize("batch", [1, 3])
def test_fastv_matches_explicit_attention_reference(model, processor, batch):
    """FastV's choice equals top-k of softmax(QK^T) of the last row at layer K-1, computed by an eager twin."""
    from crop.strategies.fastv import FastV
    from crop.testing.llava import build_model

    layer, budget = 2, 30
    inputs = batch_inputs(processor, batch)
    pruned = crop.apply(model, processor, method=FastV(budget=budget, layer=layer))
    try:
        output, stats = pruned(**inputs)
        sequences, _ = pruned.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        pruned.remove()
    eager = build_model(attn_implementation="eager")
    image_token = model.config.image_token_id
    for row in range(batch):
        input_ids, pixel_values = unpadded_row(inputs, row)
        with torch.no_grad():
            attentions = eager(input_ids=input_ids, pixel_values=pixel_values, output_attentions=True).attentions
        visual = (input_ids[0] == image_token).nonzero().squeeze(1)
        scores = attentions[layer - 1][0, :, -1, visual].mean(0)
        top = set(scores.topk(budget).indices.tolist())
        kept_cells = set((stats.rows[row].cells.view(-1) == 2).nonzero().squeeze(1).tolist())
        assert kept_cells == top
        keep = torch.ones(input_ids.shape[1], dtype=torch.bool)
        keep[visual] = False
        keep[visual[sorted(top)]] = True
        embeds = merged_embeddings(model, input_ids, pixel_values)
        expected = run_layers(model, embeds, torch.arange(input_ids.shape[1]), keep, layer)[0]
        got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert stats.rows[row].kept_tokens == budget
        assert_generation_matches(eager, sequences[row], inputs, row, (layer,), (budget,))


def test_fastv_keeps_sdpa(sdpa_model, processor):
    from crop.strategies.fastv import FastV

    pruned = crop.apply(sdpa_model, processor, method=FastV(keep_ratio=0.25))
    try:
        _, stats = pruned(**batch_inputs(processor, 2))
    finally:
        pruned.remove()
    assert sdpa_model.config.text_config._attn_implementation == "sdpa"
    assert [row.kept_tokens for row in stats.rows] == [36, 36]
    with pytest.raises(ConfigError, match="exactly one"):
        FastV()


def staged_reference(eager, input_ids, pixel_values, layers, counts, query=-1):
    """Attention-ranked staged dropping (FastV: one stage; PyramidDrop: several) by hand on one unpadded row with
    an eager twin: full attention matrices from the layers themselves, top-k of row `query` (the last prompt
    token) before each stage, later layers run on the kept subset. Returns logits and kept grid cells."""
    from reference import causal_mask

    text_model = eager.model.language_model
    image_token = eager.config.image_token_id
    hidden = merged_embeddings(eager, input_ids, pixel_values)
    positions = torch.arange(input_ids.shape[1])[None]
    cos, sin = text_model.rotary_emb(hidden, position_ids=positions)
    kept = torch.arange(input_ids.shape[1])
    query = query % input_ids.shape[1]
    stage, attention = 0, None
    with torch.no_grad():
        for index, layer in enumerate(text_model.layers):
            if stage < len(layers) and index == layers[stage]:
                visual = (input_ids[0, kept] == image_token).nonzero().squeeze(1)
                scores = attention[0, :, int((kept == query).nonzero()), visual].mean(0)
                chosen = visual[scores.topk(counts[stage]).indices]
                keep = torch.ones(kept.numel(), dtype=torch.bool)
                keep[visual] = False
                keep[chosen] = True
                hidden, kept = hidden[:, keep], kept[keep]
                stage += 1
            mask = causal_mask(kept.numel(), hidden.dtype)
            c, s = cos[:, kept], sin[:, kept]
            _, attention = layer.self_attn(
                layer.input_layernorm(hidden), position_embeddings=(c, s), attention_mask=mask
            )
            hidden = layer(hidden, attention_mask=mask, position_embeddings=(c, s), position_ids=positions[:, kept])
        logits = eager.lm_head(text_model.norm(hidden))[0]
    cells = (input_ids[0] == image_token).nonzero().squeeze(1)
    kept_cells = {int((cells == k).nonzero()) for k in kept if input_ids[0, k] == image_token}
    return logits, kept_cells


@pytest.mark.parametrize("batch", [1, 3])
def test_pyramiddrop_matches_staged_reference(model, processor, batch):
    from crop.strategies.pyramid_drop import PyramidDrop
    from crop.testing.llava import build_model

    inputs = batch_inputs(processor, batch)
    method = PyramidDrop(layers=(1, 2, 3), ratio=0.5)
    pruned = crop.apply(model, processor, method=method)
    try:
        output, stats = pruned(**inputs)
        sequences, _ = pruned.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        pruned.remove()
    eager = build_model(attn_implementation="eager")
    stages, counts = (1, 2, 3), (72, 36, 18)
    for row in range(batch):
        input_ids, pixel_values = unpadded_row(inputs, row)
        expected, kept_cells = staged_reference(eager, input_ids, pixel_values, stages, counts)
        got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert stats.rows[row].per_layer == [144, 72, 36, 18]
        assert set((stats.rows[row].cells.view(-1) == 2).nonzero().squeeze(1).tolist()) == kept_cells
        assert_generation_matches(eager, sequences[row], inputs, row, stages, counts)


def assert_generation_matches(eager, sequence, inputs, row, stages, counts, steps=3):
    """Cached generation equals greedy decoding that recomputes everything by hand with the selection made
    from the last prompt token (which is what a KV cache freezes at prefill)."""
    input_ids, pixel_values = unpadded_row(inputs, row)
    prompt_length = input_ids.shape[1]
    ids = input_ids
    for _ in range(steps):
        logits, _ = staged_reference(eager, ids, pixel_values, stages, counts, query=prompt_length - 1)
        ids = torch.cat([ids, logits[-1].argmax().view(1, 1)], dim=1)
    assert torch.equal(sequence[-steps:], ids[0, -steps:])


def test_pyramiddrop_budget_and_defaults(sdpa_model, processor):
    from crop.strategies.pyramid_drop import PyramidDrop

    pruned = crop.apply(sdpa_model, processor, method=PyramidDrop(budget=16))
    try:
        _, stats = pruned(**batch_inputs(processor, 2))
    finally:
        pruned.remove()
    assert pruned.method.layers == (1, 2, 3)  # quarters of a 4-layer LLM
    assert [row.kept_tokens for row in stats.rows] == [16, 16]
    assert stats.rows[0].per_layer[0] == 144 and stats.rows[0].per_layer[1] > stats.rows[0].per_layer[2] > 16
    with pytest.raises(ConfigError, match="increasing layer"):
        crop.apply(sdpa_model, processor, method=PyramidDrop(layers=(2, 1)))


@pytest.mark.parametrize("budget", [20, 12])
def test_visionzip_matches_reference(model, processor, budget):
    """Dominant tokens from the vision layer's CLS attention (eager twin, output_attentions), contextual tokens
    merged by explicit loops over cosine similarities of the layer's keys; logits of the result by hand."""
    from crop.strategies.visionzip import VisionZip
    from crop.testing.llava import build_model

    inputs = batch_inputs(processor, 2)
    method = VisionZip(budget)
    contextual = method.contextual
    pruned = crop.apply(model, processor, method=method)
    output, stats = pruned(**inputs)
    eager = build_model(attn_implementation="eager")
    tower = eager.model.vision_tower
    layer = tower.encoder.layers[-1]
    image_token = model.config.image_token_id
    for row in range(2):
        input_ids, pixel_values = unpadded_row(inputs, row)
        with torch.no_grad():
            vision = tower(pixel_values, output_hidden_states=True, output_attentions=True)
            hidden = vision.hidden_states[-1][0]
            dominant = vision.attentions[-1][0, :, 0, 1:].sum(0).topk(budget - 1 - contextual).indices.sort().values + 1
            keys = layer.self_attn.k_proj(layer.layer_norm1(vision.hidden_states[-2][0]))
            keys = keys.view(keys.shape[0], 2, -1).mean(1)
            rest = [i for i in range(1, hidden.shape[0]) if i not in set(dominant.tolist())]
            step = max(1, len(rest) // contextual)
            targets = list(range(0, len(rest), step))[:contextual]
            merged = {t: [] for t in targets}
            for j in range(len(rest)):
                if j in merged:
                    continue
                sims = [torch.nn.functional.cosine_similarity(keys[rest[j]], keys[rest[t]], dim=0) for t in targets]
                merged[targets[int(torch.stack(sims).argmax())]].append(hidden[rest[j]])
            context = [hidden[rest[t]] + (torch.stack(m).mean(0) if m else 0) for t, m in merged.items()]
            tokens = eager.model.multi_modal_projector(torch.stack([hidden[0], *hidden[dominant], *context]))
            embeds = eager.get_input_embeddings()(input_ids)[0]
        visual = (input_ids[0] == image_token).nonzero().squeeze(1)
        start, end = int(visual[0]), int(visual[-1]) + 1
        new = torch.cat([embeds[:start], tokens, embeds[end:]])[None]
        expected = run_layers(model, new, torch.arange(new.shape[1]), None, 0)[0]
        got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert stats.rows[row].kept_tokens == budget
        assert int((stats.rows[row].cells == 2).sum()) == budget - 1 - contextual


def test_methods_by_name(sdpa_model, processor):
    inputs = batch_inputs(processor, 1)
    for name in ("fastv", "pyramiddrop", "visionzip", "random", "pool"):
        pruned = crop.apply(sdpa_model, processor, method=name, budget=16)
        try:
            _, stats = pruned(**inputs)
        finally:
            pruned.remove()
        assert stats.rows[0].kept_tokens == 16, name
    with pytest.raises(ConfigError, match="unknown method 'fast'"):
        crop.apply(sdpa_model, processor, method="fast", budget=16)


def test_visionzip_original_positions(sdpa_model, processor):
    from crop.strategies.visionzip import VisionZip

    inputs = batch_inputs(processor, 1)
    pruned = crop.apply(sdpa_model, processor, method=VisionZip(20, position="original"))
    compact = crop.apply(sdpa_model, processor, method=VisionZip(20))
    original_out, _ = pruned(**inputs)
    compact_out, _ = compact(**inputs)
    assert original_out.logits.shape == compact_out.logits.shape
    assert not torch.allclose(original_out.logits[0, -1], compact_out.logits[0, -1])
    with pytest.raises(ConfigError, match="position"):
        VisionZip(20, position="middle")

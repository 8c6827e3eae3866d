"""Gemma 4: sliding windows and image tokens attending both ways, counted in the kept tokens after pruning; per-layer
embeddings following the kept tokens. ILP from a full and from sliding layers equals layers run by hand on the kept
tokens with masks written out from the definition, the kept set comes from the grid's geometry, cached generation
(the sliding cache holds the last window - 1 kept tokens) equals recomputation, batches equal their rows, methods
before the LLM equal the model fed the compressed prompt, and the refusals name their reasons."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image
from reference import full_region_logits_match

import crop
from crop.errors import UnsupportedModelError
from crop.region import Region
from crop.stats import FINE
from crop.strategies.crop_fused import FusedCROP
from crop.strategies.crop_method import CROP
from crop.strategies.dart import DART
from crop.strategies.divprune import DivPrune
from crop.strategies.fastv import FastV
from crop.strategies.ilp import ILP
from crop.strategies.plc import PLC
from crop.strategies.pooling import UniformPooling
from crop.strategies.pyramid_drop import PyramidDrop
from crop.strategies.random_select import RandomSelection
from crop.strategies.sparsevlm import SparseVLM
from crop.testing.gemma4 import WINDOW, build_gemma4_model, build_gemma4_processor, gemma4_inputs

SIZES = [(96, 48), (40, 100), (72, 72)]
GRIDS = [(5, 11), (13, 5), (8, 8)]  # soft tokens after the aspect-preserving resize to whole 3x3 windows
REGIONS = [Region(0.0, 0.0, 0.5, 1.0), Region(0.25, 0.5, 1.0, 1.0), Region(0.4, 0.1, 0.9, 0.6)]


@pytest.fixture(scope="module")
def processor():
    return build_gemma4_processor()


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return build_gemma4_model(attn_implementation=request.param)


def batch(processor, count: int = 3) -> dict:
    images = [make_image(*SIZES[i], seed=i) for i in range(count)]
    questions = ["what colour is it ?", "how many objects are there ?", "what ?"]
    return gemma4_inputs(processor, images, questions[:count])


def row_inputs(inputs: dict, row: int) -> dict:
    real = inputs["attention_mask"][row].bool()
    return {"input_ids": inputs["input_ids"][row][real][None], "attention_mask": torch.ones(1, int(real.sum()),
            dtype=torch.long), "mm_token_type_ids": inputs["mm_token_type_ids"][row][real][None],
            "pixel_values": inputs["pixel_values"][row : row + 1],
            "image_position_ids": inputs["image_position_ids"][row : row + 1]}  # fmt: skip


def region_keep(ids: torch.Tensor, image_token: int, grid: tuple[int, int], region: Region) -> torch.Tensor:
    """Prompt positions ILP keeps: text, and the soft tokens whose cell centre lies in the region."""
    rows, cols = grid
    cx, cy = (torch.arange(cols) + 0.5) / cols, (torch.arange(rows) + 0.5) / rows
    inside = ((cy >= region.y0) & (cy <= region.y1))[:, None] & ((cx >= region.x0) & (cx <= region.x1))[None, :]
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[(ids == image_token).nonzero().squeeze(1)] = inside.reshape(-1)
    return keep


def hand_mask(
    image: torch.Tensor, sliding: bool, window_in_kept: bool, positions: torch.Tensor, blocks: bool = True
) -> torch.Tensor:
    """Additive mask of one unpadded row, from the definition: causal; in a sliding layer also image tokens seeing
    the image's later tokens (unless `blocks` is False: a mutation), all within the window, counted in the tokens
    the layer sees (`window_in_kept`) or in original prompt positions (a mutation)."""
    length = image.numel()
    index = torch.arange(length) if window_in_kept else positions
    allowed = index[None, :] <= index[:, None]
    if sliding:
        both_ways = image[:, None] & image[None, :] if blocks else torch.zeros_like(allowed)
        allowed = (allowed | both_ways) & (index[:, None] - index[None, :] < WINDOW)
    return torch.zeros(1, 1, length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)


@torch.no_grad()
def reference(
    model, inputs: dict, keep: torch.Tensor, layer: int, window_in_kept: bool = True, blocks: bool = True
) -> torch.Tensor:
    """One unpadded row by hand: the unmodified model's first-layer input, per-layer embedding inputs and rotary
    embeddings (captured), layers >= `layer` on the `keep` subset with masks from `hand_mask`."""
    captured: list[tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]] = []
    layers = model.model.language_model.layers
    handles = [
        decoder.register_forward_pre_hook(
            lambda module, args, kwargs: captured.append((args[0], args[1], kwargs["position_embeddings"])),
            with_kwargs=True,
        )
        for decoder in layers
    ]
    try:
        model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    image = inputs["input_ids"][0] == model.config.image_token_id
    positions = torch.arange(image.numel())
    hidden, kept = captured[0][0], torch.arange(image.numel())
    for index, decoder in enumerate(layers):
        if index == layer:
            kept = keep.nonzero().squeeze(1)
            hidden = hidden[:, kept]
        _, per_layer, (cos, sin) = captured[index]
        sliding = model.config.text_config.layer_types[index] == "sliding_attention"
        mask = hand_mask(image[kept], sliding, window_in_kept, positions[kept], blocks)
        hidden = decoder(hidden, per_layer[:, kept], position_embeddings=(cos[:, kept], sin[:, kept]),
                         attention_mask=mask, shared_kv_states={})  # fmt: skip
    return model.lm_head(model.model.language_model.norm(hidden))[0]


def test_layouts_and_nothing_pruned_equals_the_model(model, processor):
    inputs = batch(processor)
    assert full_region_logits_match(model, processor, inputs) == [rows * cols for rows, cols in GRIDS]
    layouts = crop.adapter.adapter_for(model).visual_layouts(inputs)
    assert [(layout.rows, layout.cols) for layout in layouts] == GRIDS


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_ilp_from_full_and_sliding_layers_equals_layers_by_hand(model, processor, layer):
    """K = 1 starts at a full-attention layer, K = 2 and 3 at sliding ones; the window and the image blocks count
    kept tokens, and each kept token keeps its per-layer embedding input."""
    inputs = batch(processor)
    pruned = crop.apply(model, processor, ilp=layer)
    try:
        output, stats = pruned(**inputs, regions=REGIONS)
        for row in range(3):
            alone = row_inputs(inputs, row)
            ids = alone["input_ids"][0]
            keep = region_keep(ids, model.config.image_token_id, GRIDS[row], REGIONS[row])
            expected = reference(model, alone, keep, layer)
            got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            visual = ids == model.config.image_token_id
            assert stats.rows[row].kept_tokens == int((keep & visual).sum()) < int(visual.sum())
    finally:
        pruned.remove()


def test_the_window_counts_kept_tokens_and_that_is_checked(model, processor):
    """Mutations of the reference: the window counted in original positions, and image tokens not seeing each
    other both ways, each give other logits than what runs, so the test above can fail on either."""
    inputs = batch(processor, 1)
    pruned = crop.apply(model, processor, ilp=2)
    try:
        output, _ = pruned(**inputs, regions=REGIONS[:1])
    finally:
        pruned.remove()
    alone = row_inputs(inputs, 0)
    keep = region_keep(alone["input_ids"][0], model.config.image_token_id, GRIDS[0], REGIONS[0])
    original = reference(model, alone, keep, 2, window_in_kept=False)
    one_way = reference(model, alone, keep, 2, blocks=False)
    assert (output.logits[0, -1] - original[-1]).abs().max() > 1e-3
    assert (output.logits[0, -1] - one_way[-1]).abs().max() > 1e-3


def test_generation_with_the_sliding_cache_equals_recompute(model, processor):
    inputs = batch(processor, 2)
    steps = WINDOW + 2  # past the window, so the sliding cache drops kept tokens
    image_token = model.config.image_token_id  # random weights may pick it: it would read as a new image
    pruned = crop.apply(model, processor, ilp=2)
    try:
        sequences, _ = pruned.generate(**inputs, regions=REGIONS[:2], max_new_tokens=steps, min_new_tokens=steps,
                                       do_sample=False, suppress_tokens=[image_token])  # fmt: skip
    finally:
        pruned.remove()
    eos = model.generation_config.eos_token_id
    for row in range(2):
        step = row_inputs(inputs, row)
        keep = region_keep(step["input_ids"][0], model.config.image_token_id, GRIDS[row], REGIONS[row])
        for _ in range(steps):
            logits = reference(model, step, keep, 2)[-1].clone()
            logits[[eos, image_token]] = float("-inf")  # as min_new_tokens and suppress_tokens do
            token = logits.argmax().view(1, 1)
            step["input_ids"] = torch.cat([step["input_ids"], token], dim=1)
            step["attention_mask"] = torch.ones_like(step["input_ids"])
            step["mm_token_type_ids"] = torch.cat([step["mm_token_type_ids"], torch.zeros_like(token)], dim=1)
            keep = torch.cat([keep, torch.ones(1, dtype=torch.bool)])
        assert torch.equal(sequences[row, -steps:], step["input_ids"][0, -steps:])


METHODS = {
    "fastv": lambda: FastV(budget=12, layer=2),
    "pyramiddrop": lambda: PyramidDrop(layers=(2, 3), budget=12),
    "sparsevlm": lambda: SparseVLM(12, layers=(2, 3)),
    "dart": lambda: DART(12, layer=2),
    "crop-fused": lambda: FusedCROP(layer=2, budget=12),
}


@pytest.mark.parametrize("name", METHODS)
def test_in_llm_methods_batch_equals_rows_and_generate(model, processor, name):
    inputs = batch(processor)
    if name == "dart":  # its key norms depend on absolute positions: count them from each row's first token
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    pruned = crop.apply(model, processor, method=METHODS[name]())
    try:
        output, stats = pruned(**inputs)
        sequences, _ = pruned.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        for row in range(3):
            single, _ = pruned(**row_inputs(inputs, row))
            torch.testing.assert_close(output.logits[row, -1], single.logits[0, -1], atol=1e-5, rtol=0)
    finally:
        pruned.remove()
    assert [row.kept_tokens for row in stats.rows] == [12, 12, 12]
    assert sequences.shape[1] == inputs["input_ids"].shape[1] + 2


PRE_LLM = {
    "plc": lambda: CROP(None, PLC(ratio=2)),
    "k0": lambda: CROP(ILP(0)),
    "plc+ilp2": lambda: CROP(ILP(2), PLC(ratio=2)),
    "budget-k0": lambda: CROP(ILP(0), budget=10),
    "pool": lambda: UniformPooling(10),
    "random": lambda: RandomSelection(7),
    "divprune": lambda: DivPrune(9),
}


@torch.no_grad()
def spliced_reference(model, alone: dict, region: Region, method, grid: tuple[int, int], kept_cells: torch.Tensor):
    """The unmodified model fed the compressed prompt: the image's placeholders replaced by the new tokens
    (PLC's by hand; the pooled grid by hand; selections: the cells the run kept), at their first cell's original
    position, the text keeping its own; with ILP at K, layers >= K see the text and the region's tokens."""
    ids = alone["input_ids"][0]
    image = (ids == model.config.image_token_id).nonzero().squeeze(1)
    start, count = int(image[0]), image.numel()
    features = model.model.get_image_features(alone["pixel_values"], alone["image_position_ids"]).pooler_output[0]
    rows, cols = grid
    inside = region.token_mask(rows, cols)
    fine = None
    if isinstance(method, UniformPooling):
        from crop.strategies.pooling import pooled_shape

        h, w = pooled_shape(rows, cols, method.budget)
        tokens = torch.nn.functional.adaptive_avg_pool2d(features.T.reshape(1, -1, rows, cols), (h, w))[0]
        tokens = tokens.flatten(1).T
        first = (torch.arange(h)[:, None] * rows // h * cols + torch.arange(w)[None, :] * cols // w).reshape(-1)
    elif isinstance(method, CROP) and method.plc is not None:
        compressed = method.plc.compress(features, inside)
        tokens, first, fine = compressed.features, compressed.first_cell, compressed.inside
    else:
        tokens, first = features[kept_cells], kept_cells
    placeholders = torch.full((tokens.shape[0],), model.config.image_token_id)
    new_ids = torch.cat([ids[:start], placeholders, ids[start + count :]])
    positions = torch.cat([torch.arange(start), start + first, torch.arange(start + count, ids.numel())])
    if method.parts()[0].position == "compact":  # DivPrune, as its authors: the new prompt numbered on
        positions = torch.arange(new_ids.numel())
    spliced = {"input_ids": new_ids[None], "attention_mask": torch.ones(1, new_ids.numel(), dtype=torch.long),
               "mm_token_type_ids": (new_ids == model.config.image_token_id).long()[None],
               "position_ids": positions[None]}  # fmt: skip
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    spliced["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=[tokens])}
    if fine is None or method.ilp is None:
        return model(**spliced).logits[0]
    keep = torch.ones(new_ids.numel(), dtype=torch.bool)
    keep[start : start + tokens.shape[0]] = fine
    pruned = crop.apply(model, None, method=CROP(ILP(method.ilp.layer)))  # the kept tokens: the region's
    try:
        from crop.strategies.ilp import KeepPlan

        with pruned._hooks.active(KeepPlan.from_keep(keep[None]), crop.adapter.adapter_for(model).attention_blocks(
                spliced)):  # fmt: skip
            return model(**spliced).logits[0]
    finally:
        pruned.remove()


@pytest.mark.parametrize("name", PRE_LLM)
def test_pre_llm_methods_equal_the_model_fed_the_compressed_prompt(model, processor, name):
    inputs = batch(processor)
    method = PRE_LLM[name]()
    pruned = crop.apply(model, processor, method=method)
    try:
        output, stats = pruned(**inputs, regions=REGIONS)
    finally:
        pruned.remove()
    for row in range(3):
        kept_cells = (stats.rows[row].cells.reshape(-1) == FINE).nonzero().squeeze(1)
        expected = spliced_reference(model, row_inputs(inputs, row), REGIONS[row], method, GRIDS[row], kept_cells)
        got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
        torch.testing.assert_close(got, expected, atol=3e-5, rtol=0)  # padded batch vs a row: up to 1.2e-5 seen


def test_refusals_and_a_saved_checkpoint_answers(processor, tmp_path, capsys):
    from crop.cli import main

    model = build_gemma4_model()
    pruned = crop.apply(model, processor, method="visionzip", budget=6)
    try:
        with pytest.raises(UnsupportedModelError, match="no CLS token"):
            pruned(**batch(processor, 1))
    finally:
        pruned.remove()
    model.save_pretrained(tmp_path / "gemma4")
    processor.save_pretrained(tmp_path / "gemma4")
    make_image(96, 48).save(tmp_path / "wide.png")
    ask = ["ask", "--model", str(tmp_path / "gemma4"), "--image", str(tmp_path / "wide.png"), "--question", "what ?",
           "--max-new-tokens", "2"]  # fmt: skip
    for options in (["--region", "0", "0", "3", "7", "--ilp-layer", "2"], ["--method", "divprune", "--budget", "8"]):
        assert main([*ask, *options]) == 0
        assert "pruned answer" in capsys.readouterr().out
    shared = build_gemma4_model()
    shared.config.text_config.num_kv_shared_layers = 2
    with pytest.raises(UnsupportedModelError, match="shares KV between its last 2 layers"):
        crop.apply(shared, processor, ilp=2)

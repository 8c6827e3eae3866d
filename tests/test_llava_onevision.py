"""LLaVA-OneVision: LLaVA-NeXT's grids with SigLIP's patches, anyres-max downsampling (a 4x4-tile image's 16x16
high-res grid becomes 12x12), ILP against layers run by hand, methods before the LLM against a hand-built prompt,
cached generation, batches equal to their rows, the real loading path, and VisionZip refused."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image
from reference import full_region_logits_match, reference_logits

import crop
from crop.errors import UnsupportedModelError
from crop.region import Region
from crop.strategies.crop_method import CROP
from crop.strategies.divprune import DivPrune
from crop.strategies.ilp import ILP
from crop.strategies.plc import PLC
from crop.strategies.random_select import RandomSelection
from crop.testing.llava_onevision import build_onevision_model, build_onevision_processor, onevision_inputs

SIZES = [(64, 32), (32, 96), (128, 128)]  # fit 1x2, 3x1 and 4x4 tiles exactly; the last exceeds anyres_max_9
GRIDS = [(4, 8), (12, 4), (12, 12)]  # high-res grids as the model packs them (16x16 downsampled to 12x12)
SIDE = 4  # base grid side: 32-pixel tower input, 8-pixel patches
REGIONS = [Region(0.0, 0.0, 0.5, 1.0), Region(0.2, 0.5, 1.0, 1.0), Region(0.3, 0.1, 0.8, 0.6)]


@pytest.fixture(scope="module")
def processor():
    return build_onevision_processor()


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return build_onevision_model(attn_implementation=request.param)


def batch(processor, count: int = 3) -> dict:
    images = [make_image(*SIZES[i], seed=i) for i in range(count)]
    questions = ["what colour is it ?", "how many objects are there ?", "what ?"]
    return onevision_inputs(processor, images, questions[:count])


def row_inputs(inputs: dict, row: int) -> dict:
    real = inputs["attention_mask"][row].bool()
    return {"input_ids": inputs["input_ids"][row][real][None], "attention_mask": torch.ones(1, int(real.sum()),
            dtype=torch.long), "pixel_values": inputs["pixel_values"][row : row + 1],
            "image_sizes": inputs["image_sizes"][row : row + 1]}  # fmt: skip


def left_half_keep(ids: torch.Tensor, image_token: int, grid: tuple[int, int]) -> torch.Tensor:
    """Prompt positions ILP keeps for the left half of the image, from the geometry alone: base-grid and high-res
    cells whose centre is left of the middle (both grids show the whole image), and each high-res row's newline."""
    base = (torch.arange(SIDE)[None, :].expand(SIDE, SIDE) < SIDE / 2).reshape(-1)
    rows, cols = grid
    high = ((torch.arange(cols) + 0.5) / cols <= 0.5)[None, :].expand(rows, cols)
    high = torch.cat([high, torch.ones(rows, 1, dtype=torch.bool)], dim=1).reshape(-1)  # newline: its row keeps
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[(ids == image_token).nonzero().squeeze(1)] = torch.cat([base, high])
    return keep


def test_layouts_match_the_processor_and_nothing_pruned_equals_the_model(model, processor):
    inputs = batch(processor)
    counts = full_region_logits_match(model, processor, inputs)
    assert counts == [SIDE * SIDE + rows * (cols + 1) for rows, cols in GRIDS]
    layouts = crop.adapter.adapter_for(model).visual_layouts(inputs)
    assert [layout.grids for layout in layouts] == [((SIDE, SIDE), grid) for grid in GRIDS]


@pytest.mark.parametrize("layer", [1, 2])
def test_ilp_keeps_the_region_on_both_grids_and_equals_layers_by_hand(model, processor, layer):
    inputs = batch(processor)
    regions = [Region(0.0, 0.0, 0.5, 1.0)] * 3
    pruned = crop.apply(model, processor, ilp=layer)
    try:
        output, stats = pruned(**inputs, regions=regions)
        for row in range(3):
            alone = row_inputs(inputs, row)
            keep = left_half_keep(alone["input_ids"][0], model.config.image_token_id, GRIDS[row])
            expected = reference_logits(model, alone, keep, layer)
            got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            visual = alone["input_ids"][0] == model.config.image_token_id
            assert stats.rows[row].kept_tokens == int((keep & visual).sum())
        sequences, _ = pruned.generate(**inputs, regions=regions, max_new_tokens=3, min_new_tokens=3,
                                       do_sample=False)  # fmt: skip
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(3):  # the whole pruned prompt plus the tokens so far, no cache
            step, _ = pruned(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                             image_sizes=inputs["image_sizes"], regions=regions, use_cache=False)  # fmt: skip
            logits = step.logits[:, -1].clone()
            logits[:, model.generation_config.eos_token_id] = float("-inf")  # as min_new_tokens does
            token = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], dim=1), torch.cat([mask, torch.ones_like(token)], dim=1)
    finally:
        pruned.remove()
    assert torch.equal(sequences, ids)


@pytest.mark.parametrize("budget", [6, 30])
def test_divprune_before_the_llm_equals_a_hand_built_prompt(model, processor, budget):
    from test_divprune import hand_logits, unpadded

    inputs = batch(processor)
    pruned = crop.apply(model, processor, method=DivPrune(budget))
    try:
        output, stats = pruned(**inputs)
    finally:
        pruned.remove()
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], vision_feature_layer=-1,
            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", return_dict=True,
        ).pooler_output  # fmt: skip
    for row in range(3):
        expected = hand_logits(model, unpadded(inputs, row), features[row], budget)
        torch.testing.assert_close(output.logits[row, -1], expected, atol=1e-5, rtol=0)
        assert stats.rows[row].llm_input_tokens == budget


@pytest.mark.parametrize("method", ["fastv", "pyramiddrop", "sparsevlm", "dart", "crop-fused", "pool"])
def test_methods_batch_equals_rows(model, processor, method):
    inputs = batch(processor)
    if method == "dart":  # its key norms depend on absolute positions: count them from each row's first token
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    pruned = crop.apply(model, processor, method=method, budget=20)
    try:
        output, stats = pruned(**inputs)
        for row in range(3):
            single, _ = pruned(**row_inputs(inputs, row))
            torch.testing.assert_close(output.logits[row, -1], single.logits[0, -1], atol=1e-5, rtol=0)
    finally:
        pruned.remove()
    assert all(row.kept_tokens <= 20 for row in stats.rows)


def test_visionzip_is_refused_and_a_saved_checkpoint_answers(processor, tmp_path, capsys):
    from crop.cli import main

    model = build_onevision_model()
    pruned = crop.apply(model, processor, method="visionzip", budget=6)
    try:
        with pytest.raises(UnsupportedModelError, match="SigLIP has no CLS token"):
            pruned(**batch(processor, 1))
    finally:
        pruned.remove()
    model.save_pretrained(tmp_path / "ov")
    processor.save_pretrained(tmp_path / "ov")
    make_image(64, 32).save(tmp_path / "wide.png")
    ask = ["ask", "--model", str(tmp_path / "ov"), "--image", str(tmp_path / "wide.png"), "--question", "what ?",
           "--max-new-tokens", "2"]  # fmt: skip
    for options in (["--region", "0", "0", "3", "7"], ["--method", "divprune", "--budget", "8"]):
        assert main([*ask, *options]) == 0
        assert "pruned answer" in capsys.readouterr().out



@pytest.mark.parametrize(
    "method", [CROP(None, PLC(ratio=2)), CROP(ILP(2), PLC(ratio=2)), CROP(ILP(0))], ids=["plc", "plc+ilp2", "k0"]
)
def test_plc_and_layer_zero_equal_the_reference_on_the_downsampled_grid(model, processor, method):
    """LLaVA-NeXT's references (each grid compressed on its own, newlines after their rows) on OneVision's layout,
    the 4x4-tile image's high-res grid downsampled to 12x12 included."""
    from test_llava_next import prompt_keep
    from test_llava_next_grids import plc_reference

    inputs = batch(processor)
    pruned = crop.apply(model, processor, method=method)
    try:
        output, stats = pruned(**inputs, regions=REGIONS)
    finally:
        pruned.remove()
    for row in range(3):
        alone = row_inputs(inputs, row)
        if method.plc is None:
            expected = reference_logits(model, alone, prompt_keep(model, processor, alone, REGIONS[row]), 0)
        else:
            expected, tokens = plc_reference(model, processor, alone, REGIONS[row], method)
            assert stats.rows[row].llm_input_tokens == tokens
        got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_budget_mode_and_random_before_the_llm_equal_the_kept_prompt(model, processor):
    """CROP's budget rule at K = 0 written out grid by grid (LLaVA-NeXT's hand rule), and random's draw (row r's
    permutation of the placeholders with seed r), each as the prompt of the kept placeholders."""
    from test_llava_next_grids import budget_keep_by_hand

    inputs = batch(processor)
    for method in (CROP(ILP(0), budget=24), RandomSelection(10)):
        pruned = crop.apply(model, processor, method=method)
        try:
            output, _ = pruned(**inputs, regions=REGIONS)
        finally:
            pruned.remove()
        for row in range(3):
            alone = row_inputs(inputs, row)
            if isinstance(method, CROP):
                keep = budget_keep_by_hand(model, processor, alone, REGIONS[row], 24)
            else:
                ids = alone["input_ids"][0]
                placeholders = (ids == model.config.image_token_id).nonzero().squeeze(1)
                drawn = torch.randperm(placeholders.numel(), generator=torch.Generator().manual_seed(row))[:10]
                keep = torch.ones(ids.numel(), dtype=torch.bool)
                keep[placeholders] = False
                keep[placeholders[drawn]] = True
            expected = reference_logits(model, alone, keep, 0)
            torch.testing.assert_close(output.logits[row, -expected.shape[0] :], expected, atol=1e-5, rtol=0)

"""The engine-independent half of the vLLM plugin (`crop.serving.pruning`): the tokens it hands an engine for an
image, fed to the unmodified LLaVA as a consecutively numbered prompt (what vLLM computes), equal crop's own pruned
call with compact positions; its counts equal what it returns; bad settings and regions are refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import QUESTIONS, batch_inputs, on_grid

import crop
from crop.adapter import VisualLayout, adapter_for
from crop.errors import ConfigError, RegionError
from crop.region import Region, Viewport
from crop.serving.pruning import FeaturePruner, PruningSettings, TowerOutputs, request_region
from crop.testing.clip import tiny_clip

SETTINGS = [
    {"method": "pool", "budget": 16},
    {"method": "random", "budget": 20, "seed": 3},
    {"method": "divprune", "budget": 24},
    {"method": "crop", "budget": 20},
    {"method": "crop"},
    {"method": "crop", "layer": -1, "plc_ratio": 2},
    {"method": "visionzip", "budget": 20},
    {"method": "holov", "budget": 18},
    {"method": "cdpruner", "budget": 12},
]
REGIONS = [Region.from_grid([2, 2, 5, 5]), Region.from_grid([0, 0, 3, 7]), Region.from_grid([6, 6, 7, 7])]


def engine_logits(model, ids: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The last position's logits for `ids` whose image placeholders are replaced by `kept`, numbered 0..n-1."""
    placeholders = (ids == model.config.image_token_id).nonzero().squeeze(1)
    start, end = int(placeholders[0]), int(placeholders[-1]) + 1
    embed = model.get_input_embeddings()
    embeds = torch.cat([embed(ids[:start]), kept, embed(ids[end:])])[None]
    positions = torch.arange(embeds.shape[1])[None]
    with torch.no_grad():
        return model(inputs_embeds=embeds, position_ids=positions, attention_mask=torch.ones_like(positions)).logits[
            0, -1
        ]


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory, sdpa_model) -> str:
    """A tiny CLIP beside the tiny LLaVA (its vision width), saved for CDPruner's `clip` setting."""
    folder = tmp_path_factory.mktemp("clip")
    model, tokenizer = tiny_clip(sdpa_model.config.vision_config.hidden_size)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("entry", SETTINGS, ids=lambda e: "-".join(str(v) for v in e.values()))
def test_the_engine_prompt_equals_crops_compact_call(sdpa_model, processor, entry, clip_path):
    if entry["method"] == "cdpruner":
        entry = {**entry, "clip": clip_path}
    settings = PruningSettings.from_config(entry, vision_internals=True)
    pruner = FeaturePruner(settings, sdpa_model.config.text_config.num_hidden_layers)
    adapter = adapter_for(sdpa_model)
    inputs = batch_inputs(processor, 3)
    pruned = crop.apply(sdpa_model, processor, method=settings.method_object())
    try:
        output, stats = pruned(**inputs, **on_grid(REGIONS), questions=QUESTIONS[:3])
    finally:
        pruned.remove()
    side = sdpa_model.config.vision_config.image_size // sdpa_model.config.vision_config.patch_size
    layout = VisualLayout(rows=side, cols=side)
    for row in range(3):
        with torch.no_grad():
            image = sdpa_model.model.get_image_features(pixel_values=inputs["pixel_values"][row : row + 1])
        features = image.pooler_output[0] if hasattr(image, "pooler_output") else image[0]
        if settings.method == "random":  # crop's batch call draws row r with seed + r, an engine every image with seed
            pruner = FeaturePruner(dataclasses.replace(settings, seed=settings.seed + row), pruner.num_layers)
        vision = adapter.vision_crops({"pixel_values": inputs["pixel_values"][row : row + 1]})[0]
        tower = TowerOutputs(vision, adapter.project, adapter.vision_head)
        kept = pruner.reduce(features, layout, REGIONS[row], tower=tower, question=QUESTIONS[row])
        assert kept.shape[0] == pruner.count(layout, REGIONS[row]) == stats.rows[row].llm_input_tokens
        ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
        torch.testing.assert_close(output.logits[row, -1], engine_logits(sdpa_model, ids, kept), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"method": "fastv", "budget": 8}, "prunes inside the LLM"),
        ({"method": "sparsevlm", "budget": 8}, "prunes inside the LLM"),
        ({"method": "crop", "layer": 2}, "layer K = 2 prunes inside the LLM"),
        ({"method": "visionzip", "budget": 8}, "which this family lacks"),
        ({"method": "cdpruner", "budget": 8}, "reads a CLIP vision tower's feature layer"),
        ({"method": "full"}, "prunes nothing"),
        ({"method": "nope", "budget": 8}, "unknown method 'nope'"),
        ({"method": "pool", "budget": 8, "ratio": 2}, "unknown crop settings ['ratio']"),
        ({"budget": 8}, "need a method"),
        ("divprune", "must be a mapping"),
        ({"method": "crop", "layer": -1}, "needs plc_ratio"),
        ({"method": "pool"}, "needs a budget"),
    ],
)
def test_settings_that_cannot_run_before_the_llm_are_refused(entry, says):
    with pytest.raises(ConfigError) as error:
        PruningSettings.from_config(entry)
    assert says in str(error.value)


def test_a_budget_above_the_tokens_and_a_missing_region_are_refused():
    layout = VisualLayout(rows=6, cols=6)
    with pytest.raises(ConfigError, match="budget"):
        FeaturePruner(PruningSettings("pool", budget=40), 4).count(layout, None)
    with pytest.raises(ConfigError, match="needs the contextual region: pass mm_processor_kwargs"):
        FeaturePruner(PruningSettings("crop", budget=10), 4).count(layout, None)
    with pytest.raises(ConfigError, match="expected 36 visual tokens"):
        FeaturePruner(PruningSettings("pool", budget=9), 4).reduce(torch.zeros(30, 8), layout, None)
    with pytest.raises(ConfigError, match="needs the vision tower's internals"):
        FeaturePruner(PruningSettings("visionzip", budget=9, vision_internals=True), 4).reduce(
            torch.zeros(36, 8), layout, None
        )


def test_request_regions():
    assert request_region({}) is None
    assert request_region({"crop_region": [2, 2, 5, 5]}) == Region.from_grid([2, 2, 5, 5])
    assert request_region({"crop_box": [0.1, 0.2, 0.5, 0.9]}) == Region(0.1, 0.2, 0.5, 0.9)
    with pytest.raises(RegionError):
        request_region({"crop_region": [2, 2, 9, 5]})
    with pytest.raises(ConfigError, match="not both"):
        request_region({"crop_region": [2, 2, 5, 5], "crop_box": [0, 0, 1, 1]})
    with pytest.raises(ConfigError, match="four numbers"):
        request_region({"crop_box": [0, 0, 1]})


def test_localizer_settings(tmp_path):
    """Only a grid-box localizer VLM's directory runs in the engine, and only for a method that needs a region."""
    assert PruningSettings.from_config({"method": "crop", "budget": 9, "localizer": str(tmp_path)}).localizer
    with pytest.raises(ConfigError, match="computes only after the image's tokens are fixed"):
        PruningSettings.from_config({"method": "crop", "localizer": "attention"})
    with pytest.raises(ConfigError, match="is not a directory"):
        PruningSettings.from_config({"method": "crop", "localizer": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="needs no region: leave the localizer out"):
        PruningSettings.from_config({"method": "pool", "budget": 9, "localizer": str(tmp_path)})


def test_a_region_on_the_whole_image_is_placed_by_its_viewport():
    """A localizer's region is on the whole image; a center-cropped wide image shows its middle only: the
    region's cells are those its viewport puts on the grid."""
    pruner = FeaturePruner(PruningSettings("crop"), 4)
    layout = VisualLayout(rows=8, cols=8)
    middle = Region(0.25, 0.0, 0.75, 1.0)
    cropped = Viewport.center_crop(200, 100)  # the grid shows the image's middle half, x in [0.25, 0.75]
    assert torch.equal(torch.unique(pruner.cells(layout, middle) % 8), torch.arange(2, 6))
    assert torch.equal(torch.unique(pruner.cells(layout, middle, cropped) % 8), torch.arange(8))
    assert pruner.count(layout, middle) == 32 and pruner.count(layout, middle, cropped) == 64


def test_cdpruner_needs_its_clip_and_a_question(clip_path):
    with pytest.raises(ConfigError, match='add "clip"'):
        PruningSettings.from_config({"method": "cdpruner", "budget": 8}, vision_internals=True)
    settings = PruningSettings.from_config({"method": "cdpruner", "budget": 8, "clip": clip_path}, True)
    assert settings.reads_question and FeaturePruner(settings, 4).count(VisualLayout(rows=6, cols=6), None) == 8

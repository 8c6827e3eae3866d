"""Every pre-LLM method whose tokens are a fixed mix of the grid's cells says so exactly: `mix @ grid features`
equals its compressed features, on one grid (LLaVA), grids with newlines (LLaVA-NeXT) and tiles out of raster
order (InternVL). The mix is what per-token inputs inside the LLM (Qwen3-VL's DeepStack) are compressed with."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_inputs, make_image

import crop
from crop.region import Region, Viewport
from crop.request import Request
from crop.strategies.crop_method import CROP
from crop.strategies.divprune import DivPrune
from crop.strategies.engine import before_llm
from crop.strategies.ilp import ILP
from crop.strategies.plc import PLC
from crop.strategies.pooling import UniformPooling
from crop.strategies.random_select import RandomSelection
from crop.strategies.visionzip import VisionZip

METHODS = {
    "plc": lambda: CROP(None, PLC(ratio=2, rings=((1, 1),))),
    "plc3": lambda: CROP(None, PLC(ratio=3)),
    "k0": lambda: CROP(ILP(0)),
    "budget-k0": lambda: CROP(ILP(0), budget=9),
    "pool": lambda: UniformPooling(7),
    "random": lambda: RandomSelection(8),
    "divprune": lambda: DivPrune(10),
}
REGIONS = [Region(0.0, 0.0, 0.5, 1.0), Region(0.3, 0.2, 0.9, 0.7)]


def family_inputs(family: str):
    if family == "llava":
        from crop.testing.llava import build_model, build_processor

        processor = build_processor()
        return build_model(), processor, batch_inputs(processor, 2)
    images = [make_image(120, 60, seed=0), make_image(64, 192, seed=1)]
    if family == "llava-next":
        from crop.testing.llava_next import build_next_model, build_next_processor, next_inputs

        processor = build_next_processor()
        return build_next_model(), processor, next_inputs(processor, images, ["what ?", "what is it ?"])
    from crop.testing.internvl import build_internvl_model, build_internvl_processor, internvl_inputs

    processor = build_internvl_processor()
    return build_internvl_model(), processor, internvl_inputs(processor, images, ["what ?", "what is it ?"])


@pytest.fixture(scope="module", params=["llava", "llava-next", "internvl"])
def family(request):
    return family_inputs(request.param)


def selections(model, processor, inputs: dict, method):
    pruned = crop.apply(model, processor, method=method)
    try:
        request = Request(inputs, REGIONS, [Viewport()] * 2)
        call = pruned._call_context(request)
        with torch.no_grad():
            return call, before_llm(call, pruned.before)[1]
    finally:
        pruned.remove()


@pytest.mark.parametrize("name", METHODS)
def test_mix_times_the_grid_equals_the_compressed_features(family, name):
    model, processor, inputs = family
    call, chosen = selections(model, processor, inputs, METHODS[name]())
    for row, selection in enumerate(chosen):
        compressed = selection.compressed
        grid = call.features(row)[call.layouts[row].leading :].float()
        mix = compressed.mix()
        assert mix.shape == (compressed.features.shape[0], grid.shape[0])
        torch.testing.assert_close(mix.to_dense() @ grid, compressed.features.float(), atol=1e-5, rtol=0)


def test_merged_tokens_have_no_mix():
    model, processor, inputs = family_inputs("llava")
    _, chosen = selections(model, processor, inputs, VisionZip(12, contextual=3))
    assert all(selection.compressed.mix() is None for selection in chosen)

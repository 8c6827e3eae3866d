"""The open core: a method written here, in the test, and registered runs everywhere crop's own methods run.

Two methods no file under `src/` knows: one before the LLM (keep the N grid tokens whose projected features have
the largest norm) and one inside it (at layer K keep the N grid tokens whose hidden states entering layer K have
the largest norm: no attention). Both go through `crop.apply`, `crop ask` and `crop eval` on LLaVA-1.5, LLaVA-NeXT
and Qwen2-VL, in left-padded batches of 3 equal to their rows alone, with cached generation equal to
recomputation; their kept tokens are checked against the same rule computed on the unmodified model.
"""

from __future__ import annotations

import json

import pytest
import torch
from benchdata import write_benchmark
from conftest import make_image

import crop
from crop.cli import main
from crop.region import Region, Viewport
from crop.stats import FINE
from crop.strategies.base import Decision, InLLMMethod, PreLLMMethod, Selection, check_budget, keep_cells, top_tokens
from crop.strategies.context import ImageContext, StageRow
from crop.strategies.pyramid_drop import PyramidDrop
from crop.strategies.registry import MethodInfo, register_method, unregister_method
from crop.testing.llava import build_model, build_processor
from crop.testing.llava_next import build_next_model, build_next_processor
from crop.testing.qwen2_vl import build_qwen_model, build_qwen_processor

BUDGET = 5
LAYER = 2


class LargestFeatureNorm(PreLLMMethod):
    """Before the LLM: the `budget` grid tokens with the largest projected-feature norm."""

    name = "largest-norm"

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def validate(self, num_layers: int, grid_tokens: int | None) -> None:
        check_budget(self.name, self.budget, grid_tokens)

    def reduce(self, image: ImageContext) -> Selection:
        features = image.features
        cells = features.float().norm(dim=-1).topk(self.budget).indices.cpu()
        return keep_cells(features, cells, image.shape, drop_before_llm=True)


class HiddenNorm(InLLMMethod):
    """Inside the LLM: from layer `layer` on, the `budget` grid tokens whose hidden states entering that layer
    have the largest norm."""

    name = "hidden-norm"

    def __init__(self, budget: int, layer: int = LAYER) -> None:
        self.budget = budget
        self.layer = layer

    @property
    def stage_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def validate(self, num_layers: int, grid_tokens: int | None) -> None:
        self.check_layer(self.layer, num_layers)
        check_budget(self.name, self.budget, grid_tokens)

    def decide(self, stage: StageRow) -> Decision:
        return Decision(top_tokens(stage.hidden.float().norm(dim=-1), self.budget))


FAMILIES = {
    "llava": (build_model, build_processor),
    "llava-next": (build_next_model, build_next_processor),
    "qwen2-vl": (build_qwen_model, build_qwen_processor),
}
IMAGES = [make_image(120, 60, seed=0), make_image(90, 110, seed=1), make_image(140, 80, seed=2)]
QUESTIONS = ["what colour is it ?", "how many objects are there in the image ?", "what digit ?"]


@pytest.fixture(scope="module", autouse=True)
def registered():
    infos = [
        MethodInfo("largest-norm", "largest feature norms (a test's method)", "before the LLM", True,
                   lambda settings: LargestFeatureNorm(settings.budget)),
        MethodInfo("hidden-norm", "largest hidden-state norms at K (a test's method)", "inside the LLM at K", True,
                   lambda settings: HiddenNorm(settings.budget, settings.layer)),
    ]  # fmt: skip
    for info in infos:
        register_method(info)
    yield
    for info in infos:
        unregister_method(info.name)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    build, build_proc = FAMILIES[request.param]
    return request.param, build(), build_proc()


def greedy_by_recompute(pruned, inputs: dict, steps: int) -> torch.Tensor:
    """Greedy decoding that prunes and runs the whole prompt plus the tokens so far at every step, no cache."""
    inputs = dict(inputs)
    for _ in range(steps):
        output, _ = pruned(**inputs, use_cache=False)
        token = output.logits[:, -1].argmax(-1, keepdim=True)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], token], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(token)], dim=1)
    return inputs["input_ids"]


def expected_cells(name: str, model, request, row: int) -> set[int]:
    """The cells the method's rule keeps, computed on the unmodified model (single-grid families)."""
    real = request["attention_mask"][row].bool()
    ids = request["input_ids"][row][real][None]
    grid = (ids[0] == model.config.image_token_id).nonzero().squeeze(1)
    alone = dict(request.inputs)
    alone.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    if "mm_token_type_ids" in alone:
        alone["mm_token_type_ids"] = request["mm_token_type_ids"][row][real][None]
    if "image_grid_thw" in alone:
        sizes = request["image_grid_thw"].prod(-1).tolist()
        start = sum(sizes[:row])
        alone["pixel_values"] = request["pixel_values"][start : start + sizes[row]]
        alone["image_grid_thw"] = request["image_grid_thw"][row : row + 1]
    else:
        alone["pixel_values"] = request["pixel_values"][row : row + 1]
    captured = {}

    def capture(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]

    handle = model.model.language_model.layers[LAYER].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**alone)
            if "image_grid_thw" in alone:
                image = model.model.get_image_features(alone["pixel_values"], alone["image_grid_thw"], return_dict=True)
            else:
                image = model.model.get_image_features(pixel_values=alone["pixel_values"], return_dict=True)
    finally:
        handle.remove()
    if name == "hidden-norm":
        scores = captured["hidden"][0, grid].float().norm(dim=-1)
    else:
        scores = torch.cat(list(image.pooler_output)).reshape(grid.numel(), -1).float().norm(dim=-1)
    return set(scores.topk(BUDGET).indices.tolist())


@pytest.mark.parametrize("name", ["largest-norm", "hidden-norm"])
def test_a_method_defined_here_runs_batched_and_generates(family, name):
    label, model, processor = family
    pruned = crop.apply(model, processor, method=name, budget=BUDGET)
    try:
        request = pruned.prepare(IMAGES, QUESTIONS)
        assert not bool(request["attention_mask"][:, 0].all()), "the batch must be left-padded"
        output, stats = pruned(request)
        rows = []
        for row in range(3):
            alone = pruned.prepare(IMAGES[row], QUESTIONS[row])
            rows.append(pruned(alone))
        sequences, _ = pruned.generate(request, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        recomputed = greedy_by_recompute(pruned, request.inputs, 3)
    finally:
        pruned.remove()
    for row, (single, single_stats) in enumerate(rows):
        torch.testing.assert_close(output.logits[row, -1], single.logits[0, -1], atol=1e-5, rtol=0)
        assert stats.rows[row].per_layer == single_stats.rows[0].per_layer
    counts = [r.llm_input_tokens if name == "largest-norm" else r.kept_tokens for r in stats.rows]
    assert counts == [BUDGET] * 3
    assert torch.equal(sequences, recomputed)
    if label != "llava-next":  # one grid: the stats' cells are the method's
        for row in range(3):
            kept = set((stats.rows[row].cells.reshape(-1) == FINE).nonzero().squeeze(1).tolist())
            assert kept == expected_cells(name, model, request, row)


@pytest.fixture(scope="module")
def checkpoint(family, tmp_path_factory):
    label, model, processor = family
    directory = tmp_path_factory.mktemp(label)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("name", ["largest-norm", "hidden-norm"])
def test_a_method_defined_here_runs_in_ask_and_eval(checkpoint, tmp_path, capsys, name):
    image = tmp_path / "wide.png"
    IMAGES[0].save(image)
    ask = ["ask", "--model", str(checkpoint), "--image", str(image), "--question", "what ?", "--method", name,
           "--budget", str(BUDGET), "--max-new-tokens", "2"]  # fmt: skip
    assert main(ask) == 0
    out = capsys.readouterr().out
    assert "pruned answer" in out and f"{BUDGET} kept after layer K" in out
    expected = write_benchmark("textvqa", tmp_path / "data", "official", count=2, image_size=(112, 84))
    run = tmp_path / "run"
    evaluate = ["eval", "--model", str(checkpoint), "--bench", "textvqa", "--data", str(tmp_path / "data"),
                "--out", str(run), "--max-new-tokens", "2", "--batch-size", "2", "--method", name,
                "--budget", str(BUDGET)]  # fmt: skip
    assert main(evaluate) == 0
    records = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [e["id"] for e in expected]
    assert [r["visual_tokens"] for r in records] == [BUDGET, BUDGET]


def test_one_method_object_serves_models_of_different_depths(processor):
    from conftest import batch_inputs

    inputs = batch_inputs(processor, 2)
    shallow, deep = build_model(text_layers=4), build_model(text_layers=8)
    shared = PyramidDrop(budget=10)
    results = []
    for model in (shallow, deep, shallow, deep):
        for method in (shared, PyramidDrop(budget=10)):
            pruned = crop.apply(model, processor, method=method)
            try:
                output, stats = pruned(**inputs)
            finally:
                pruned.remove()
            results.append((pruned.method.layers, output.logits, [r.per_layer for r in stats.rows]))
    assert shared.layers is None  # the object given is never written
    for index in range(0, len(results), 2):
        reused, fresh = results[index], results[index + 1]
        assert reused[0] == fresh[0] and reused[2] == fresh[2]
        torch.testing.assert_close(reused[1], fresh[1], atol=0, rtol=0)
    assert results[0][0] == (1, 2, 3) and results[2][0] == (2, 4, 6)


def test_regions_without_viewports_on_a_cropping_processor(sdpa_model, processor):
    wide = make_image(480, 120, seed=3)
    region = Region(0.0, 0.0, 0.25, 1.0)
    viewport = Viewport.center_crop(*wide.size)
    expected = int(region.token_mask(12, 12, viewport).sum())
    pruned = crop.apply(sdpa_model, processor, ilp=2)
    try:
        mapped = pruned.ask(wide, "what colour is it ?", region=region, max_new_tokens=1).stats.rows[0].kept_tokens
        inputs = dict(processor(images=[wide], text=["USER: <image>\nwhat ? ASSISTANT:"], return_tensors="pt"))
        with pytest.raises(crop.ConfigError, match="without viewports.*crops or pads"):
            pruned(**inputs, regions=[region])
        _, given = pruned(**inputs, regions=[region], viewports=[pruned.viewport(wide)])
    finally:
        pruned.remove()
    assert mapped == given.rows[0].kept_tokens == expected

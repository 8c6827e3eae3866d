"""crop's vLLM plugin on Qwen2.5-VL against crop's own pruned `generate`, on a tiny random-weight Qwen2.5-VL saved to
disk (float32): several requests with images of different grid sizes and regions in one `generate` call give crop's
greedy tokens and prompt token counts, which checks the kept tokens and their 3-D positions (the text keeps its
unpruned positions); without the plugin vLLM equals the unpruned model. DivPrune, whose cells depend on the
features, needs positions placed after the encoder (vLLM's multimodal pruning path, which its CPU runner never
calls): that path is checked against crop's positions without an engine, and DivPrune is refused on CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor
from vllm import LLM, SamplingParams

import crop
from crop.adapter import adapter_for
from crop.errors import ConfigError
from crop.loading import load_model
from crop.region import Region, Viewport
from crop.serving.pruning import FeaturePruner, PruningSettings
from crop.serving.vllm_qwen2_5_vl import (
    ARCHITECTURE,
    RUNNER_PLACES_POSITIONS,
    encode_cells,
    place_after_encoder,
    prompt_positions,
    qwen_pruner,
)
from crop.strategies.context import CallContext
from crop.strategies.engine import before_llm
from crop.strategies.registry import build_method
from crop.synth.scene import make_sample
from crop.testing.qwen2_vl import build_qwen_model, build_qwen_processor, qwen_prompt

NEW_TOKENS = 5
SIZES = [(224, 112), (112, 168), (200, 160), (224, 224)]  # merged grids 4x8, 6x4, 6x7, 8x8
REGIONS = [[2, 2, 5, 5], [0, 0, 3, 7], [4, 1, 7, 6], [6, 6, 7, 7]]
QUESTIONS = ["what digit is on the red square ?", "what colour is it ?", "how many objects are there ?", "what ?"]
SETTINGS = [
    {"method": "pool", "budget": 12},
    {"method": "random", "budget": 10, "seed": 1},
    {"method": "crop", "budget": 9},
    {"method": "crop"},
    {"method": "crop", "layer": -1, "plc_ratio": 2},
]
AFTER_ENCODER = {"video_pruning_rate": 0.5}
"""vLLM's switch for its post-encoder position path (the rate prunes videos, which the plugin refuses)."""


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen-vllm")
    build_qwen_model(  # head_dim 32: vLLM's CPU attention has no kernel for 16
        family="qwen2_5_vl", text_hidden=128, mrope_section=(4, 6, 6), initializer_range=0.2
    ).save_pretrained(folder)
    images_only = build_qwen_processor(family="qwen2_5_vl")
    stock = Qwen2_5_VLProcessor(  # vLLM's processor loads the stock one, video slot included
        image_processor=images_only.image_processor, tokenizer=images_only.tokenizer,
        video_processor=Qwen2VLVideoProcessor(), chat_template=images_only.chat_template,
    )  # fmt: skip
    stock.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen_requests():
    return [
        (make_sample("test", index).image.resize(size), question)
        for index, (size, question) in enumerate(zip(SIZES, QUESTIONS, strict=True))
    ]


def crop_answers(checkpoint, requests, settings: dict | None) -> list[tuple[list[int], int]]:
    model, processor = load_model(checkpoint)
    method = build_method("full") if settings is None else PruningSettings.from_config(settings).method_object()
    pruned = crop.apply(model, processor, method=method)
    answers = []
    try:
        for (image, question), box in zip(requests, REGIONS, strict=True):
            inputs = dict(processor(images=[image], text=[qwen_prompt(processor, question)], return_tensors="pt"))
            regions = [Region.from_grid(box)] if method.needs_region else None
            sequences, stats = pruned.generate(
                **inputs, regions=regions, viewports=[Viewport()], max_new_tokens=NEW_TOKENS, do_sample=False
            )
            text = inputs["input_ids"].shape[1] - stats.rows[0].image_tokens
            answers.append(
                (sequences[0, inputs["input_ids"].shape[1] :].tolist(), text + stats.rows[0].llm_input_tokens)
            )
    finally:
        pruned.remove()
    return answers


def vllm_answers(
    checkpoint, requests, settings: dict | None, rpc=None, **engine: object
) -> list[tuple[list[int], int]]:
    """vLLM's answers; `rpc`, if given, is run on the engine's workers before the requests."""
    _, processor = load_model(checkpoint)
    overrides = None if settings is None else {"architectures": [ARCHITECTURE], "crop": settings}
    llm = LLM(
        model=str(checkpoint), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
        limit_mm_per_prompt={"image": 1, "video": 0}, hf_overrides=overrides, **engine,
    )  # fmt: skip
    prompts = [
        {"prompt": qwen_prompt(processor, question), "multi_modal_data": {"image": image},
         "mm_processor_kwargs": {"crop_region": box}}
        for (image, question), box in zip(requests, REGIONS, strict=True)
    ]  # fmt: skip
    try:
        if rpc is not None:
            llm.collective_rpc(rpc)
        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
    finally:
        del llm
    return [(list(output.outputs[0].token_ids), len(output.prompt_token_ids)) for output in outputs]


@pytest.mark.parametrize(
    "settings", [None, *SETTINGS], ids=lambda e: "full" if e is None else "-".join(map(str, e.values()))
)
def test_vllm_qwen_answers_as_crop_does(qwen_checkpoint, qwen_requests, settings):
    got = vllm_answers(qwen_checkpoint, qwen_requests, settings)
    assert got == crop_answers(qwen_checkpoint, qwen_requests, settings)


def test_geometric_methods_with_vllms_pruning_switch(qwen_checkpoint, qwen_requests):
    """With vLLM's multimodal pruning on (on CPU its runner places no positions after the encoder, so the plugin
    keeps placing them from the geometry), the answers are crop's."""
    settings = {"method": "crop", "budget": 9}
    got = vllm_answers(qwen_checkpoint, qwen_requests, settings, **AFTER_ENCODER)
    assert got == crop_answers(qwen_checkpoint, qwen_requests, settings)


def runner_places_positions(worker) -> None:
    """What vLLM's GPU runner sets in `load_model` and its CPU runner leaves out: call the model's
    `recompute_mrope_positions` after the encoder (multimodal pruning on)."""
    worker.model_runner.is_multimodal_pruning_enabled = True


@pytest.mark.parametrize(
    "settings",
    [{"method": "divprune", "budget": 8}, {"method": "divprune", "budget": 20}, {"method": "pool", "budget": 12}],
    ids=lambda e: "-".join(map(str, e.values())),
)
def test_positions_after_the_encoder_in_the_engine(qwen_checkpoint, qwen_requests, settings, monkeypatch):
    """Through vLLM's own post-encoder path (its runner's `_gather_mm_embeddings` calling the model's
    `recompute_mrope_positions`), switched on in the CPU runner as the GPU runner does: crop's answers."""
    monkeypatch.setenv(RUNNER_PLACES_POSITIONS, "1")
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # the RPC below sends a function
    got = vllm_answers(qwen_checkpoint, qwen_requests, settings, rpc=runner_places_positions, **AFTER_ENCODER)
    assert got == crop_answers(qwen_checkpoint, qwen_requests, settings)


@pytest.mark.parametrize("settings", [{"method": "divprune", "budget": 8}, {"method": "crop", "budget": 9}],
                         ids=lambda e: "-".join(map(str, e.values())))  # fmt: skip
@pytest.mark.parametrize("chunk", [None, 5], ids=["whole", "chunked"])
def test_positions_placed_after_the_encoder_are_crops(qwen_checkpoint, qwen_requests, settings, chunk):
    """The post-encoder path (GPU runners; vLLM's CPU runner never calls it): the prompt's positions as
    `get_mrope_input_positions` gives them, then `recompute_mrope_positions` on the encoder's output, equal
    crop's positions for the pruned prompt, and the stripped embeddings crop's kept tokens; also when a prefill
    chunk ends inside the image (`chunk` image tokens in the first)."""
    model, processor = load_model(qwen_checkpoint)
    adapter = adapter_for(model)
    method = PruningSettings.from_config(settings).method_object()
    pruner = FeaturePruner(PruningSettings.from_config(settings), model.config.get_text_config().num_hidden_layers)
    for (image, question), box in zip(qwen_requests, REGIONS, strict=True):
        inputs = dict(processor(images=[image], text=[qwen_prompt(processor, question)], return_tensors="pt"))
        region = Region.from_grid(box) if method.needs_region else None
        layouts = adapter.visual_layouts(inputs)
        call = CallContext(adapter, inputs, layouts, [Viewport()], [region])
        with torch.no_grad():
            spliced, selections = before_llm(call, method)
            features = call.features(0)
        ids = spliced["input_ids"][0]
        expected = spliced["position_ids"][1:, 0]

        tokens, cells = pruner.reduce_with_cells(features, layouts[0], region)
        encoded = torch.cat([tokens, encode_cells(cells, layouts[0].cols, tokens.dtype)], dim=1)
        offset = int((ids == adapter.image_token_id).nonzero()[0])
        placeholders = torch.zeros(len(tokens), dtype=torch.long)
        positions, delta = prompt_positions(len(ids), [(offset, layouts[0], placeholders)])
        pieces = [encoded] if chunk is None else [encoded[:chunk], encoded[chunk:]]
        computed, stripped = 0, []
        for piece in pieces:
            out, positions, got_delta = place_after_encoder(ids, [piece], positions, computed, adapter.image_token_id)
            stripped += out
            computed = offset + len(piece) if computed == 0 else computed + len(piece)
        assert torch.equal(positions, expected)
        assert got_delta == delta == int(expected.max()) + 1 - len(ids)
        assert torch.equal(torch.cat(stripped), selections[0].compressed.features.to(tokens.dtype))


def test_divprune_needs_positions_after_the_encoder(qwen_checkpoint):
    model, _ = load_model(qwen_checkpoint)
    model.config.crop = {"method": "divprune", "budget": 8}
    with pytest.raises(ConfigError, match="CPU runner"):
        qwen_pruner(model.config, after_encoder=False)
    assert qwen_pruner(model.config, after_encoder=True).settings.method == "divprune"

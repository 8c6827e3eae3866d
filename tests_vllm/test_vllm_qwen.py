"""crop's vLLM plugin on Qwen2.5-VL against crop's own pruned `generate`, on a tiny random-weight Qwen2.5-VL saved to
disk (float32): several requests with images of different grid sizes and regions in one `generate` call give crop's
greedy tokens and prompt token counts, which checks the kept tokens and their 3-D positions (the text keeps its
unpruned positions); without the plugin vLLM equals the unpruned model; DivPrune is refused on this family."""

from __future__ import annotations

import pytest
from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor
from vllm import LLM, SamplingParams

import crop
from crop.errors import ConfigError
from crop.loading import load_model
from crop.region import Region, Viewport
from crop.serving.pruning import PruningSettings
from crop.serving.vllm_qwen2_5_vl import ARCHITECTURE, qwen_pruner
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


def vllm_answers(checkpoint, requests, settings: dict | None) -> list[tuple[list[int], int]]:
    _, processor = load_model(checkpoint)
    overrides = None if settings is None else {"architectures": [ARCHITECTURE], "crop": settings}
    llm = LLM(
        model=str(checkpoint), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
        limit_mm_per_prompt={"image": 1, "video": 0}, hf_overrides=overrides,
    )  # fmt: skip
    prompts = [
        {"prompt": qwen_prompt(processor, question), "multi_modal_data": {"image": image},
         "mm_processor_kwargs": {"crop_region": box}}
        for (image, question), box in zip(requests, REGIONS, strict=True)
    ]  # fmt: skip
    try:
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


def test_divprune_is_refused_on_qwen(qwen_checkpoint):
    model, _ = load_model(qwen_checkpoint)
    model.config.crop = {"method": "divprune", "budget": 8}
    with pytest.raises(ConfigError, match="depend on the features"):
        qwen_pruner(model.config)

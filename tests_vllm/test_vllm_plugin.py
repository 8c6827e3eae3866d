"""crop's vLLM plugin against crop's own pruned `generate`, on the shipped synthetic LLaVA (float32, CPU).

Run in the vLLM venv (`scripts/install_vllm_cpu.sh`): `python -m pytest tests_vllm`. For each method, one engine
answers several requests with different images and regions in one `generate` call; its greedy tokens must equal
crop's, and its prompt tokens crop's kept visual tokens plus the text. With the plugin off (no crop architecture),
vLLM's answers equal the unpruned model's.
"""

from __future__ import annotations

import copy

import pytest
from conftest import NEW_TOKENS, REGIONS, crop_answers, engine
from vllm import LLM, SamplingParams

import crop
from crop.errors import ConfigError
from crop.localize.grid_vlm import GridVLMLocalizer
from crop.prompting import build_prompt
from crop.serving.pruning import PruningSettings
from crop.serving.vllm_llava import llava_pruner
from crop.synth.assets import SHIPPED_MODEL

SETTINGS = [
    {"method": "pool", "budget": 16},
    {"method": "random", "budget": 40},
    {"method": "divprune", "budget": 32},
    {"method": "crop", "budget": 30},
    {"method": "crop"},
    {"method": "crop", "layer": -1, "plc_ratio": 2},
    {"method": "visionzip", "budget": 32},
    {"method": "holov", "budget": 24},
]


def vllm_answers(llm: LLM, hf_model, samples, with_regions: bool) -> list[tuple[list[int], int]]:
    _, processor = hf_model
    requests = []
    for sample, box in zip(samples, REGIONS, strict=True):
        request = {"prompt": build_prompt(processor, sample.question), "multi_modal_data": {"image": sample.image}}
        if with_regions:
            request["mm_processor_kwargs"] = {"crop_region": box}
        requests.append(request)
    outputs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
    return [(list(output.outputs[0].token_ids), len(output.prompt_token_ids)) for output in outputs]


def setting_id(entry: dict | None) -> str:
    return "plugin-off" if entry is None else "-".join(str(v) for v in entry.values())


@pytest.mark.parametrize("settings", [None, *SETTINGS], ids=setting_id)
def test_vllm_answers_as_crop_does(checkpoint, hf_model, samples, settings):
    """With the plugin (a crop architecture), vLLM answers as crop's pruned generate; without it, as the model."""
    llm = engine(checkpoint, settings)
    try:
        got = vllm_answers(llm, hf_model, samples, with_regions=settings is not None)
    finally:
        del llm
    assert got == crop_answers(hf_model, samples, settings)
    pruned = [tokens < 256 for _, tokens in got]
    assert all(pruned) if settings is not None else not any(pruned), "pruned: fewer than the image's 256 tokens"


def answers_to_questions(llm: LLM, processor, samples) -> list[tuple[list[int], int]]:
    """vLLM's answers to requests that send their question (`crop_question`); a request without it is refused,
    naming the kwarg."""
    requests = [
        {"prompt": build_prompt(processor, sample.question), "multi_modal_data": {"image": sample.image},
         "mm_processor_kwargs": {"crop_question": sample.question}}
        for sample in samples
    ]  # fmt: skip
    try:
        outputs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
        with pytest.raises(Exception, match="crop_question"):
            llm.generate({**requests[0], "mm_processor_kwargs": {}}, SamplingParams(max_tokens=1))
    finally:
        del llm
    return [(list(output.outputs[0].token_ids), len(output.prompt_token_ids)) for output in outputs]


def prepared_answers(pruned, samples) -> list[tuple[list[int], int, int]]:
    """crop's answers through `prepare` (which runs the localizer and records the question): (greedy new tokens,
    prompt tokens the LLM got, visual tokens it got) per sample."""
    answers = []
    try:
        for sample in samples:
            request = pruned.prepare(sample.image, sample.question)
            sequences, stats = pruned.generate(request, max_new_tokens=NEW_TOKENS, do_sample=False)
            prompt, row = request["input_ids"].shape[1], stats.rows[0]
            answers.append((sequences[0, prompt:].tolist(), prompt - row.image_tokens + row.llm_input_tokens,
                            row.llm_input_tokens))  # fmt: skip
    finally:
        pruned.remove()
    return answers


@pytest.mark.parametrize("settings", [{"method": "crop", "budget": 30}, {"method": "crop"}], ids=setting_id)
def test_the_plugins_localizer_answers_as_crops(checkpoint, hf_model, samples, settings):
    """Settings that name a localizer run it in vLLM's processor on each request's image and question
    (`crop_question`): vLLM's answers and prompt tokens equal crop's with the same localizer (`prepare` runs it);
    a request without its question is refused, naming the kwarg."""
    model, processor = hf_model
    got = answers_to_questions(engine(checkpoint, {**settings, "localizer": str(SHIPPED_MODEL)}), processor, samples)
    method = PruningSettings.from_config(settings).method_object()
    localizer = GridVLMLocalizer.from_model(model, processor, SHIPPED_MODEL)
    expected = prepared_answers(crop.apply(model, processor, method=method, localizer=localizer), samples)
    assert got == [(tokens, prompt) for tokens, prompt, _ in expected]
    assert all(tokens < 256 for _, tokens in got), "the localizer's regions leave out part of every image"


def test_cdpruner_answers_as_crops(checkpoint, hf_model, samples, clip_checkpoint):
    """CDPruner reads each request's question (`crop_question`) with CLIP's text tower in the engine: vLLM's
    answers and prompt tokens equal crop's on the same questions; a request without its question is refused."""
    model, processor = hf_model
    settings = {"method": "cdpruner", "budget": 24, "clip": clip_checkpoint}
    got = answers_to_questions(engine(checkpoint, settings), processor, samples)
    method = PruningSettings.from_config(settings, vision_internals=True).method_object()
    expected = prepared_answers(crop.apply(model, processor, method=method), samples)
    assert got == [(tokens, prompt) for tokens, prompt, _ in expected]
    assert all(visual == 24 for _, _, visual in expected)


def test_a_cdpruner_budget_above_the_feature_width_is_refused(hf_model, clip_checkpoint):
    """The DPP keeps at most its kernel's rank (the projected width, 192 here) distinct tokens: a budget above it
    could leave fewer tokens than vLLM's placeholders, so it is refused when the engine starts."""
    config = copy.deepcopy(hf_model[0].config)
    config.crop = {"method": "cdpruner", "budget": 200, "clip": clip_checkpoint}
    with pytest.raises(ConfigError, match="the projected features' width 192"):
        llava_pruner(config)
    config.crop = {**config.crop, "budget": 192}
    assert llava_pruner(config).settings.budget == 192

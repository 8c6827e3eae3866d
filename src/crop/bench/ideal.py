"""The ideal each method is compared with: the model fed only the kept visual tokens from the start, with no
selection work and no hooks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessorList

from crop.adapter import adapter_for
from crop.bench.measure import StepClock


def _profile_ideal_prefill(model: Any, inputs: dict, kept: int, layer: int) -> Callable[[], Any]:
    """The ideal at the depth profile of an in-LLM method at `layer`: plain calls of the language model, layers
    `< layer` on every token, then layers `>= layer` on the text and the first `kept` visual tokens at their
    original positions; no selection work and no hooks. (The layer list is swapped on this instance for the call
    and put back.) Returns the prefill; the two caches are joined into one."""
    adapter = adapter_for(model)
    language_model = _language_model(model)
    ids = inputs["input_ids"][0]
    visual = (ids == adapter.image_token_id).nonzero().squeeze(1)
    keep = torch.ones(ids.numel(), dtype=torch.bool, device=ids.device)
    keep[visual[kept:]] = False
    positions = keep.nonzero().squeeze(1)[None]
    layers, norm = adapter.decoder_layers(), language_model.norm

    def run(chosen: nn.ModuleList, **kwargs: Any) -> Any:
        language_model.layers = chosen
        try:
            return language_model(use_cache=True, **kwargs)
        finally:
            language_model.layers, language_model.norm = layers, norm

    def prefill() -> Any:
        with torch.inference_mode():
            features = adapter.image_features(inputs)[0]
            embedded = adapter.embed(inputs["input_ids"], [features])
            language_model.norm = nn.Identity()
            head = run(nn.ModuleList(layers[:layer]), inputs_embeds=embedded, attention_mask=inputs["attention_mask"])
            hidden = head.last_hidden_state[:, positions[0]]
            mask = torch.ones(1, hidden.shape[1], dtype=torch.long, device=hidden.device)
            tail = run(nn.ModuleList(layers[layer:]), inputs_embeds=hidden, attention_mask=mask, position_ids=positions)
            model.get_output_embeddings()(tail.last_hidden_state[:, -1:])
            cache = tail.cache
            for index in range(layer):
                cache.layers[index] = head.cache.layers[index]
            return {"cache": cache}

    return prefill


def _language_model(model: Any) -> nn.Module:
    """LLaVA-shaped: the text model itself (`model.model.language_model` in transformers 5), a Llama-style module
    with `layers` and a final `norm`, called with 1-D `position_ids`. The adapter gives its layers but not the module,
    which the depth-profile ideal calls directly with its layer list swapped."""
    return model.model.language_model


def _ideal_calls(model: Any, inputs: dict, kept: int) -> tuple[Callable[[], Any], Callable[[int, StepClock], Any]]:
    """The ideal at `kept` tokens: the image is encoded as usual, then the LLM gets only `kept` visual tokens
    (the first ones, taken without any selection work)."""
    adapter = adapter_for(model)
    ids = inputs["input_ids"][0]
    visual = (ids == adapter.image_token_id).nonzero().squeeze(1)
    start, end = int(visual[0]), int(visual[-1]) + 1
    short = torch.cat([ids[:start], ids[start : start + kept], ids[end:]])[None]
    mask = torch.ones_like(short)

    def embeds() -> torch.Tensor:
        return adapter.embed(short, [adapter.image_features(inputs)[0][:kept]])

    def prefill() -> Any:
        with torch.inference_mode():
            return model(inputs_embeds=embeds(), attention_mask=mask, use_cache=True)

    def generate(steps: int, clock: StepClock) -> Any:
        with torch.inference_mode():
            return model.generate(input_ids=short, inputs_embeds=embeds(), attention_mask=mask,
                                  max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                  logits_processor=LogitsProcessorList([clock]))  # fmt: skip

    return prefill, generate

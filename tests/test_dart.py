"""DART against a port of its authors' selection lines (`get_retained_image_token` in
`llava/model/language_model/modeling_llama_self.py` and `Qwen2_5-VL/Qwen2_5VL_DART/modeling_qwen2_5_vl_self.py`, read
from xqy1111111/DART, a fork of ZichenWen1/DART), fed by the unmodified model's own layer K-1 keys (its KV cache) and
output; end to end against layers run by hand; SDPA and eager; cached generation equal to recomputation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch_inputs, qwen_batch, qwen_row
from reference import reference_logits, unpadded_row

import crop
from crop.errors import ConfigError
from crop.stats import FINE
from crop.strategies.dart import DART
from crop.testing.qwen2_vl import build_qwen_model, build_qwen_processor

K = 2


def authors_get_retained_image_token(
    DART_config: dict, last_layer_state, any_states, takes=None, mutate_order: bool = False
) -> torch.Tensor:
    """The authors' `get_retained_image_token` (LLaVA). Changes: the config is a dict argument; the LLaVA-NeXT
    branch (`config.text_length`) is left out; `takes`, when given, replaces the per-pivot `TOKEN_TOPK` by crop's
    budget counts (one count per loop step), the only change to the loop. `mutate_order` (tests only) visits the
    pivots in sorted order instead of the set's."""
    image_token_start_index = DART_config["image_token_start_index"]
    image_token_length = DART_config["image_token_length"]
    MAX_NUM_TRUNCTION = DART_config["max_num_trunction"]
    pivot_image_token = DART_config["pivot_image_token"]
    pivot_text_token = DART_config["pivot_text_token"]
    reduction_ratio = DART_config["reduction_ratio"]
    TOKEN_TOPK = math.ceil(
        (MAX_NUM_TRUNCTION if MAX_NUM_TRUNCTION is not None else (image_token_length * (1 - reduction_ratio)))
        // (pivot_image_token + pivot_text_token)
    )
    device = last_layer_state.device

    any_states = any_states.permute(0, 2, 1, 3).reshape(any_states.shape[0], any_states.shape[2], -1)

    k_states_image_token = any_states[0][image_token_start_index : image_token_start_index + image_token_length, :]
    k_states_query_token = any_states[0][image_token_start_index + image_token_length :, :]

    k_states_image_token_L1_norm = torch.norm(k_states_image_token, p=1, dim=-1)
    k_states_query_token_L1_norm = torch.norm(k_states_query_token, p=1, dim=-1)

    image_indices = (k_states_image_token_L1_norm.topk(pivot_image_token).indices + image_token_start_index).tolist()
    query_indices = (
        k_states_query_token_L1_norm.topk(pivot_text_token).indices + image_token_start_index + image_token_length
    ).tolist()
    indices_set = set(image_indices + query_indices)

    valid_indices = set(range(image_token_start_index, image_token_start_index + image_token_length)) - set(
        image_indices
    )

    valid_indices_list = list(valid_indices)
    for step, item in enumerate(sorted(indices_set) if mutate_order else list(indices_set)):
        valid_vectors = last_layer_state[0][valid_indices_list, :]
        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[0][item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(TOKEN_TOPK if takes is None else takes[step]).indices

        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices]
        indices_set.update(top_k_real_indices)

        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = list(valid_indices)

    indices_set.difference_update(query_indices)

    retained_image_tokens_index = torch.tensor(list(indices_set), device=device)

    return retained_image_tokens_index


@torch.no_grad()
def model_states(model, alone: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """What the authors' forward hands their function before layer K, from the unmodified model: layer K-1's output
    through the final norm and its keys as the KV cache holds them (rotary applied), repeated over each query-head
    group (`repeat_kv`) where the authors' LLaVA attention does (Qwen's returns them unrepeated)."""
    output = model(**alone, output_hidden_states=True, use_cache=True)
    state = model.model.language_model.norm(output.hidden_states[K])
    keys = output.past_key_values.layers[K - 1].keys
    if not isinstance(model, type(build_qwen_model())):
        keys = keys.repeat_interleave(model.config.text_config.num_attention_heads // keys.shape[1], dim=1)
    return state, keys


def authors_keep(model, alone: dict, budget: int, counts: str, mutate_order: bool = False) -> set[int]:
    """The grid cells the authors' function keeps for one unpadded row."""
    ids = alone["input_ids"][0]
    visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
    config = {"image_token_start_index": int(visual[0]), "image_token_length": visual.numel(),
              "max_num_trunction": budget, "pivot_image_token": 4, "pivot_text_token": 4,
              "reduction_ratio": None}  # fmt: skip
    state, keys = model_states(model, alone)
    takes = None if counts == "authors" else DART(budget, counts="budget")._takes()
    kept = authors_get_retained_image_token(config, state, keys, takes, mutate_order)
    return set((kept - int(visual[0])).tolist())


def kept_cells(stats, row: int) -> set[int]:
    return set((stats.rows[row].cells.reshape(-1) == FINE).nonzero().squeeze(1).tolist())


@pytest.mark.parametrize(("budget", "counts"), [(12, "authors"), (36, "authors"), (100, "authors"), (16, "budget"),
                                                (37, "budget"), (90, "budget")])  # fmt: skip
def test_llava_keeps_the_authors_set_and_matches_layers_run_by_hand(model, processor, budget, counts):
    """Batch 3, left-padded, SDPA and eager; the authors' code is batch 1, so it runs on each row alone. DART's key
    norms depend on absolute positions (rotary), so the batch numbers each row from its first real token, as
    `generate` does (a plain forward numbers the pads too, and a padded row would pick other pivots)."""
    inputs = batch_inputs(processor, 3)
    inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    method = DART(budget, counts=counts)
    pruned = crop.apply(model, processor, method=method)
    try:
        output, stats = pruned(**inputs)
    finally:
        pruned.remove()
    for row in range(3):
        ids, pixels = unpadded_row(inputs, row)
        alone = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
        expected = authors_keep(model, alone, budget, counts)
        assert kept_cells(stats, row) == expected
        assert stats.rows[row].kept_tokens == len(expected) == method.kept()
        visual = ids[0] == model.config.image_token_id
        keep = ~visual
        keep[visual.nonzero().squeeze(1)[sorted(expected)]] = True
        logits = reference_logits(model, alone, keep, K)
        torch.testing.assert_close(output.logits[row, -1], logits[-1], atol=1e-5, rtol=0)
    assert method.kept() == (budget if counts == "budget" else 4 + 8 * (budget // 8))


def test_qwen_keeps_the_authors_set():
    model, processor = build_qwen_model(), build_qwen_processor()
    inputs = qwen_batch(processor, 3)
    pruned = crop.apply(model, processor, method=DART(12, counts="authors"))
    try:
        _, stats = pruned(**inputs)
    finally:
        pruned.remove()
    for row in range(3):
        assert kept_cells(stats, row) == authors_keep(model, qwen_row(inputs, row), 12, "authors")


def test_a_changed_selection_detail_is_caught(sdpa_model, processor):
    """The order in which pivots take their tokens matters (each removes its picks from the pool): visiting them
    sorted rather than in the set's order keeps another set."""
    inputs = batch_inputs(processor, 1)
    pruned = crop.apply(sdpa_model, processor, method=DART(36, counts="authors"))
    try:
        _, stats = pruned(**inputs)
    finally:
        pruned.remove()
    ids, pixels = unpadded_row(inputs, 0)
    alone = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
    assert kept_cells(stats, 0) == authors_keep(sdpa_model, alone, 36, "authors")
    assert kept_cells(stats, 0) != authors_keep(sdpa_model, alone, 36, "authors", mutate_order=True)


def test_generation_with_cache_equals_recomputation(sdpa_model, processor):
    inputs = batch_inputs(processor, 2)
    pruned = crop.apply(sdpa_model, processor, method=DART(20))
    try:
        sequences, _ = pruned.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(3):
            step, _ = pruned(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], use_cache=False)
            token = step.logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], dim=1), torch.cat([mask, torch.ones_like(token)], dim=1)
    finally:
        pruned.remove()
    assert torch.equal(sequences, ids)


def test_bad_settings_are_refused(sdpa_model, processor):
    with pytest.raises(ConfigError, match="counts must be 'budget'"):
        DART(16, counts="paper")
    with pytest.raises(ConfigError, match="at least one pivot"):
        DART(16, image_pivots=0, text_pivots=0)
    refused = [(DART(3), "keeps its 4 image pivots"), (DART(16, layer=4), "layer 4 is out of range"),
               (DART(150, counts="authors"), "keep 148 visual tokens .* more than the image's 144")]  # fmt: skip
    for method, message in refused:
        with pytest.raises(ConfigError, match=message):
            crop.apply(sdpa_model, processor, method=method)(**batch_inputs(processor, 1))

"""DivPrune against a port of its authors' selection lines (vbdi/divprune, `LLaVA/llava/model/llava_arch.py`,
`DivPrune`), run on the same projected tokens; end to end against a hand-built prompt on LLaVA-1.5 and LLaVA-NeXT
(the authors' families), kept sets on Qwen2-VL; cached generation equal to recomputation."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_inputs, make_image, qwen_batch, qwen_row

import crop
from crop.stats import FINE
from crop.strategies.divprune import DivPrune, max_min_diverse
from crop.testing.llava_next import build_next_model, build_next_processor, next_inputs
from crop.testing.qwen2_vl import build_qwen_model, build_qwen_processor


def authors_divprune(visual_feature_vectors: torch.Tensor, threshold_terms: int) -> torch.Tensor:
    """The authors' `DivPrune` (their `pairwise_cosine_similarity` inlined). Changes: the count is given instead of
    `int(round(threshold_ratio * image_feature_length))`; the cosine matrix is always computed here; the chosen
    indices come back sorted, as their caller sorts `keep_indexs`."""
    norm_matrix = visual_feature_vectors / visual_feature_vectors.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - torch.mm(norm_matrix, norm_matrix.t())
    s = torch.empty(threshold_terms, dtype=torch.long, device=visual_feature_vectors.device)
    for i in range(threshold_terms):
        if i == 0:
            m2 = cosine_matrix
        else:
            m2 = torch.index_select(cosine_matrix, 0, torch.index_select(s, 0, torch.arange(0, i)))
        if i == 0:  # noqa: SIM108  (kept as the authors wrote it)
            scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(m2, dim=0).values
        s[i] = torch.argmax(scores)
    return s.sort().values


@pytest.mark.parametrize("count", [1, 9, 40])
def test_selection_equals_the_authors_on_random_tokens(count):
    features = torch.randn(144, 32, generator=torch.Generator().manual_seed(count))
    assert torch.equal(max_min_diverse(features, count).sort().values, authors_divprune(features, count))


def test_a_changed_selection_detail_is_caught():
    """The first pick by the nearest neighbour's distance matters: taking the token's distance to itself (the
    smallest, 0) instead picks token 0 first, and the kept set differs."""
    features = torch.randn(144, 32, generator=torch.Generator().manual_seed(3))
    mutated = 1.0 - torch.nn.functional.normalize(features) @ torch.nn.functional.normalize(features).T
    first = mutated.topk(2, dim=0, largest=False).values[0].argmax()
    assert int(first) != int(max_min_diverse(features, 1)[0])


def hand_logits(model, ids: torch.Tensor, features: torch.Tensor, budget: int) -> torch.Tensor:
    """The last prompt position's logits with the image's placeholders replaced by the authors' choice of
    `features`, in image order, positions numbered consecutively (the authors pass none)."""
    kept = authors_divprune(features, budget)
    placeholders = (ids == model.config.image_token_id).nonzero().squeeze(1)
    start, end = int(placeholders[0]), int(placeholders[-1]) + 1
    embed = model.get_input_embeddings()
    embeds = torch.cat([embed(ids[:start]), features[kept], embed(ids[end:])])[None]
    mask = torch.ones(1, embeds.shape[1], dtype=torch.long)
    with torch.no_grad():
        return model(inputs_embeds=embeds, attention_mask=mask).logits[0, -1]


def unpadded(inputs: dict, row: int) -> torch.Tensor:
    return inputs["input_ids"][row][inputs["attention_mask"][row].bool()]


@pytest.mark.parametrize("budget", [5, 24, 60])
def test_llava_matches_a_hand_built_prompt(sdpa_model, processor, budget):
    inputs = batch_inputs(processor, 3)
    pruned = crop.apply(sdpa_model, processor, method=DivPrune(budget))
    try:
        output, stats = pruned(**inputs)
        sequences, _ = pruned.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(3):  # recomputation: the whole pruned prompt plus the tokens so far, no cache
            step, _ = pruned(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], use_cache=False)
            token = step.logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], dim=1), torch.cat([mask, torch.ones_like(token)], dim=1)
    finally:
        pruned.remove()
    for row in range(3):
        with torch.no_grad():
            image = sdpa_model.model.get_image_features(pixel_values=inputs["pixel_values"][row : row + 1])
        features = image.pooler_output[0] if hasattr(image, "pooler_output") else image[0]
        expected = hand_logits(sdpa_model, unpadded(inputs, row), features, budget)
        torch.testing.assert_close(output.logits[row, -1], expected, atol=1e-5, rtol=0)
        kept = set((stats.rows[row].cells.reshape(-1) == FINE).nonzero().squeeze(1).tolist())
        assert kept == set(authors_divprune(features, budget).tolist())
        assert stats.rows[row].llm_input_tokens == stats.rows[row].kept_tokens == budget
    assert torch.equal(sequences, ids)


@pytest.mark.parametrize("budget", [6, 30])
def test_llava_next_matches_a_hand_built_prompt_over_every_placeholder(budget):
    model, processor = build_next_model(), build_next_processor()
    images = [make_image(120, 60, seed=0), make_image(60, 110, seed=1), make_image(90, 90, seed=2)]
    inputs = next_inputs(processor, images, ["what colour is it ?", "how many objects are there ?", "what ?"])
    pruned = crop.apply(model, processor, method=DivPrune(budget))
    try:
        output, stats = pruned(**inputs)
    finally:
        pruned.remove()
    features = pruned.adapter.image_features(inputs)
    for row in range(3):
        expected = hand_logits(model, unpadded(inputs, row), features[row], budget)
        torch.testing.assert_close(output.logits[row, -1], expected, atol=1e-5, rtol=0)
        assert stats.rows[row].llm_input_tokens == budget


def test_qwen2_vl_keeps_the_authors_set():
    model, processor = build_qwen_model(), build_qwen_processor()
    inputs = qwen_batch(processor, 3)
    pruned = crop.apply(model, processor, method=DivPrune(7))
    try:
        _, stats = pruned(**inputs)
    finally:
        pruned.remove()
    for row in range(3):
        alone = qwen_row(inputs, row)
        with torch.no_grad():
            features = model.model.get_image_features(alone["pixel_values"], alone["image_grid_thw"], return_dict=True)
        kept = set((stats.rows[row].cells.reshape(-1) == FINE).nonzero().squeeze(1).tolist())
        assert kept == set(authors_divprune(features.pooler_output[0], 7).tolist())

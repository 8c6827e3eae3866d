"""HoloV against a port of its authors' selection (`HoloV` in `llava/model/utils.py`, obananas/HoloV), fed by the
unmodified vision tower's own CLS attention (`output_attentions`) and projected tokens; end to end against a
hand-built prompt, batches with padding, cached generation against recomputation; refusals on the other families."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_inputs, make_image, qwen_batch

import crop
from crop.errors import ConfigError, UnsupportedModelError
from crop.stats import FINE
from crop.strategies.holov import HoloV, crop_count, holistic_selection
from crop.testing.llava import build_model
from crop.testing.llava_next import build_next_model, build_next_processor, next_inputs
from crop.testing.qwen2_vl import build_qwen_model, build_qwen_processor


def authors_holov(image_tokens, attention, num_patches, new_image_token_num, esp=1e-6):
    """The authors' `HoloV` for one image (their loop over the batch has one step). Changes: the zero padding of
    a short result is left out (crop keeps only real tokens; the tests check it is not reached) and the kept
    indices are returned beside the tokens."""
    N, D = image_tokens.shape
    device = image_tokens.device
    alpha = 0.09
    image_token, image_attention = image_tokens, attention
    patch_size = N // num_patches
    remainder = N % num_patches
    image_tokens_patches, attention_patches, starts = [], [], []
    start_idx = 0
    for p in range(num_patches):
        current_patch_size = patch_size + (1 if p < remainder else 0)
        end_idx = start_idx + current_patch_size
        if current_patch_size > 0:
            image_tokens_patches.append(image_token[start_idx:end_idx])
            attention_patches.append(image_attention[start_idx:end_idx])
            starts.append(start_idx)
        start_idx = end_idx
    patch_scores, all_patches = [], []
    for p in range(len(image_tokens_patches)):
        patch_tokens = image_tokens_patches[p]
        patch_attn = attention_patches[p]
        current_patch_size = len(patch_tokens)
        if current_patch_size <= 1:
            patch_scores.append(patch_attn.mean() if len(patch_attn) > 0 else torch.tensor(0.0, device=device))
            all_patches.append(patch_tokens)
            continue
        F_normalized = patch_tokens / (patch_tokens.norm(dim=1, keepdim=True) + esp)
        S = torch.mm(F_normalized, F_normalized.transpose(0, 1))
        eye_mask = 1 - torch.eye(current_patch_size, device=device)
        S_masked = S * eye_mask
        valid_entries = current_patch_size - 1
        mean_sim = S_masked.sum(dim=1) / valid_entries
        var_sim = ((S_masked - mean_sim.unsqueeze(1)) ** 2).sum(dim=1) / valid_entries
        patch_attn_scaled = patch_attn * 1e3
        var_scaling = torch.mean(torch.abs(patch_attn_scaled)) / (torch.mean(torch.abs(var_sim)) + esp)
        var_sim_scaled = var_sim * var_scaling
        token_scores = patch_attn_scaled + alpha * var_sim_scaled
        patch_scores.append(token_scores.mean())
        all_patches.append(patch_tokens)
    patch_scores = torch.stack(patch_scores)
    weights = patch_scores / (patch_scores.sum() + esp)
    allocated = (weights * new_image_token_num).floor().long()
    remaining = new_image_token_num - allocated.sum()
    if remaining > 0 and len(weights) > 0:
        _, indices = torch.topk(weights, k=min(remaining.item(), len(weights)))
        for idx in indices[:remaining]:
            allocated[idx] += 1
    new_patches, kept = [], []
    for i, (patch, alloc) in enumerate(zip(all_patches, allocated, strict=True)):
        patch_size = len(patch)
        if alloc <= 0:
            continue
        elif alloc >= patch_size:
            new_patches.append(patch)
            kept.append(torch.arange(patch_size) + starts[i])
        else:
            patch_attn = attention_patches[i]
            _, top_indices = torch.topk(patch_attn, k=min(alloc.item(), patch_size))
            new_patches.append(patch[top_indices])
            kept.append(top_indices + starts[i])
    new_image_tokens = torch.cat(new_patches, dim=0)
    assert new_image_tokens.size(0) == new_image_token_num, "the authors would pad with zero tokens here"
    return new_image_tokens, torch.cat(kept)


def authors_inputs(model, pixel_values):
    """Their `encode_images`: the feature layer's CLS attention to the patches (mean over heads, from the tower's
    own `output_attentions`) and the projected patch tokens."""
    eager = build_model(attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = eager.model.vision_tower(pixel_values, output_attentions=True, output_hidden_states=True)
        layer = eager.config.vision_feature_layer
        attention = out.attentions[layer][:, :, 0, 1:].mean(dim=1).float()[0]
        features = eager.model.multi_modal_projector(out.hidden_states[layer][:, 1:])[0]
    return features, attention


def hand_logits(model, ids, tokens):
    """The last prompt position's logits with the placeholders replaced by `tokens`, positions consecutive."""
    placeholders = (ids == model.config.image_token_id).nonzero().squeeze(1)
    start, end = int(placeholders[0]), int(placeholders[-1]) + 1
    embed = model.get_input_embeddings()
    embeds = torch.cat([embed(ids[:start]), tokens, embed(ids[end:])])[None]
    mask = torch.ones(1, embeds.shape[1], dtype=torch.long)
    with torch.no_grad():
        return model(inputs_embeds=embeds, attention_mask=mask).logits[0, -1]


@pytest.mark.parametrize(("budget", "batch"), [(9, 1), (9, 3), (16, 3), (48, 1), (48, 3)])
def test_llava_matches_the_authors_selection_and_a_hand_built_prompt(model, processor, budget, batch):
    inputs = batch_inputs(processor, batch)
    pruned = crop.apply(model, processor, method=HoloV(budget))
    try:
        output, stats = pruned(**inputs)
        sequences, _ = pruned.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        eos = model.generation_config.eos_token_id
        for _ in range(3):  # recomputation: the whole pruned prompt plus the tokens so far, no cache
            step, _ = pruned(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], use_cache=False)
            logits = step.logits[:, -1].clone()
            logits[:, eos] = float("-inf")  # as min_new_tokens does
            token = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], dim=1), torch.cat([mask, torch.ones_like(token)], dim=1)
    finally:
        pruned.remove()
    assert torch.equal(sequences, ids)
    for row in range(batch):
        features, attention = authors_inputs(model, inputs["pixel_values"][row : row + 1])
        tokens, kept = authors_holov(features, attention, crop_count(144, budget), budget)
        real = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
        torch.testing.assert_close(output.logits[row, -1], hand_logits(model, real, tokens), atol=1e-5, rtol=0)
        cells = set((stats.rows[row].cells.reshape(-1) == FINE).nonzero().squeeze(1).tolist())
        assert cells == set(kept.tolist()) and stats.rows[row].llm_input_tokens == budget


def test_the_crop_rule_and_the_allocation_matter(sdpa_model, processor):
    """16 crops at 64 of 576 (the authors' LLaVA call); the allocation over crops keeps other tokens than the
    most-attended ones overall (what HoloV argues against), and one crop is a plain top-k by attention."""
    assert crop_count(576, 64) == 16 and crop_count(576, 192) == 5
    inputs = batch_inputs(processor, 1, padded=False)
    features, attention = authors_inputs(sdpa_model, inputs["pixel_values"])
    _, kept = authors_holov(features, attention, 9, 16)
    assert torch.equal(holistic_selection(features, attention, 9, 16), kept)
    assert set(kept.tolist()) != set(attention.topk(16).indices.tolist())
    assert torch.equal(holistic_selection(features, attention, 1, 16), attention.topk(16).indices)


def test_other_families_and_bad_settings_are_refused(processor):
    model, qwen_processor = build_qwen_model(), build_qwen_processor()
    pruned = crop.apply(model, qwen_processor, method=HoloV(6))
    try:
        with pytest.raises(UnsupportedModelError, match="HoloV reads the vision tower's CLS attention"):
            pruned(**qwen_batch(qwen_processor, 1))
    finally:
        pruned.remove()
    next_model, next_processor = build_next_model(), build_next_processor()
    pruned = crop.apply(next_model, next_processor, method=HoloV(6))
    try:
        with pytest.raises(UnsupportedModelError, match="one grid per image"):
            pruned(**next_inputs(next_processor, [make_image(120, 60)], ["what ?"]))
    finally:
        pruned.remove()
    with pytest.raises(ConfigError, match="crops must be a positive integer"):
        HoloV(8, crops=0)

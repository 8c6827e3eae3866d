"""PyramidDrop's authors' variant (`PyramidDrop.authors`: rank with each stage's first layer, renumber positions)
against a port of the authors' `pdrop_forward` / `pdrop_rank_drop` (`llava/model/modeling_llama_pdrop.py`,
Cooperx521/PyramidDrop) run on the unmodified model's own layers; batches with padding, SDPA and eager, cached
generation against the authors' recomputation; the variants really differ; Qwen refuses renumbering."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch_inputs
from reference import causal_mask, merged_embeddings, unpadded_row

import crop
from crop.errors import ConfigError, UnsupportedModelError
from crop.strategies.pyramid_drop import PyramidDrop
from crop.testing.qwen2_vl import build_qwen_model, build_qwen_processor

LAYER_LIST = [1, 2, 3]
RATIO_LIST = [1.0, 0.5, 0.25, 0.125]  # the authors' `image_token_ratio_list` with their inserted 1.0
IMAGE_TOKENS = 144


def authors_rank_drop(model, cur_num, rank_layer, features, position_ids, image_index, prompt_len, counts,
                      mutate=False):  # fmt: skip
    """The authors' `pdrop_rank_drop` for one unpadded row at inference. Changes: batch of one, so their
    per-row lists and the re-padding collapse; rotary through transformers 5's `rotary_emb`; their 4-D eager mask
    is `causal_mask`; the visual counts per stage come from `counts` (`int(576 * ratio)` in theirs, so crop's
    budget schedules can be checked too). `mutate` (tests only) ranks with the layer before, crop's default."""
    image_tokens = counts[cur_num]
    keep_length = counts[cur_num + 1]
    layer = model.model.language_model.layers[rank_layer - 1 if mutate else rank_layer]
    self_attn = layer.self_attn
    hidden_states = layer.input_layernorm(features.clone().detach())
    bsz, q_len, _ = hidden_states.size()
    head_dim = self_attn.head_dim
    query_states = self_attn.q_proj(hidden_states).view(bsz, q_len, -1, head_dim).transpose(1, 2)
    key_states = self_attn.k_proj(hidden_states).view(bsz, q_len, -1, head_dim).transpose(1, 2)
    cos, sin = model.model.language_model.rotary_emb(hidden_states, position_ids=position_ids)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    query_states = query_states * cos + _rotate_half(query_states) * sin
    key_states = key_states * cos + _rotate_half(key_states) * sin
    key_states = key_states.repeat_interleave(self_attn.num_key_value_groups, dim=1)
    eager_attention_mask = causal_mask(q_len, hidden_states.dtype)

    prompt_total_len = prompt_len + image_tokens
    text_query_states = query_states[0][:, prompt_total_len - 1, :].unsqueeze(1)
    text_eager_attention_mask = eager_attention_mask[0][:, prompt_total_len - 1, :].unsqueeze(1)
    attn_weights = torch.matmul(text_query_states, key_states[0].transpose(1, 2)) / math.sqrt(head_dim)
    attn_weights = attn_weights + text_eager_attention_mask
    attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)
    attention_avg_head = torch.mean(attn_weights, dim=0)
    attention_avg_head = attention_avg_head[:, image_index : image_index + image_tokens]
    attention_avg_text = torch.mean(attention_avg_head, dim=0)
    top_rank_index = attention_avg_text.topk(keep_length).indices
    top_rank_index = top_rank_index + image_index
    top_rank_index = top_rank_index.sort().values
    start_index = image_index + image_tokens
    features = features[0]
    new_input_embeds = torch.cat([features[:image_index, :], features[top_rank_index, :], features[start_index:, :]])
    position_ids = torch.arange(0, new_input_embeds.shape[0], dtype=position_ids.dtype)[None]
    return position_ids, new_input_embeds[None], top_rank_index - image_index


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


@torch.no_grad()
def authors_forward(model, input_ids, pixel_values, prompt_length, counts=None, mutate=False):
    """The authors' `pdrop_forward` loop (prefill, no cache) on one unpadded row: after layer `i`, if `i + 1` is in
    `layer_list`, rank and drop. `prompt_length` is the prompt's length (their `prompt_len` counts it without the
    image placeholder): tokens after it are generated ones, as when the authors' code recomputes. Returns the
    logits and the kept grid cells after the last stage. `counts`: visual tokens before each stage and after the
    last (their ratio list's by default)."""
    counts = counts or [int(IMAGE_TOKENS * ratio) for ratio in RATIO_LIST]
    text_model = model.model.language_model
    image_token = model.config.image_token_id
    hidden_states = merged_embeddings(model, input_ids, pixel_values)
    image_index = int((input_ids[0] == image_token).nonzero()[0])
    prompt_len = prompt_length - IMAGE_TOKENS
    position_ids = torch.arange(input_ids.shape[1])[None]
    cells = torch.arange(IMAGE_TOKENS)
    for layer_idx, decoder_layer in enumerate(text_model.layers):
        cos, sin = text_model.rotary_emb(hidden_states, position_ids=position_ids)
        hidden_states = decoder_layer(
            hidden_states, attention_mask=causal_mask(hidden_states.shape[1], hidden_states.dtype),
            position_embeddings=(cos, sin), position_ids=position_ids,
        )  # fmt: skip
        rank_layer = layer_idx + 1
        if rank_layer in LAYER_LIST:
            stage = LAYER_LIST.index(rank_layer)
            position_ids, hidden_states, kept = authors_rank_drop(
                model, stage, rank_layer, hidden_states, position_ids, image_index, prompt_len, counts, mutate
            )
            cells = cells[kept]
    return model.lm_head(text_model.norm(hidden_states))[0], set(cells.tolist())


@pytest.mark.parametrize(("budget", "batch"), [(None, 1), (None, 3), (16, 3), (40, 1), (40, 3)])
def test_authors_variant_matches_a_port_of_the_authors_code(model, processor, budget, batch):
    """Their ratio list (72, 36, 18 of 144) and crop's budget schedules at 16 and 40."""
    inputs = batch_inputs(processor, batch)
    method = PyramidDrop.authors(layers=tuple(LAYER_LIST), ratio=0.5, budget=budget)
    counts = [IMAGE_TOKENS] + [method.kept_after(stage, IMAGE_TOKENS) for stage in range(3)]
    pruned = crop.apply(model, processor, method=method)
    try:
        output, stats = pruned(**inputs)
        sequences, _ = pruned.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        pruned.remove()
    assert "ranked at the stage layer, compact positions" in stats.method
    for row in range(batch):
        input_ids, pixel_values = unpadded_row(inputs, row)
        expected, kept_cells = authors_forward(model, input_ids, pixel_values, input_ids.shape[1], counts)
        got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert stats.rows[row].per_layer == counts
        assert set((stats.rows[row].cells.view(-1) == 2).nonzero().squeeze(1).tolist()) == kept_cells
        ids = input_ids
        for _ in range(3):  # the authors' recomputation: the last prompt token still ranks, positions renumbered
            logits, _ = authors_forward(model, ids, pixel_values, input_ids.shape[1], counts)
            ids = torch.cat([ids, logits[-1].argmax().view(1, 1)], dim=1)
        assert torch.equal(sequences[row][-3:], ids[0, -3:])


def test_the_port_tells_the_ranking_layers_apart(sdpa_model, processor):
    """The mutated port (ranking with the layer before) keeps other tokens than the authors' on this model, and
    crop's default (layer before, original positions) equals neither the authors' logits: the test can fail."""
    inputs = batch_inputs(processor, 1, padded=False)
    input_ids, pixel_values = unpadded_row(inputs, 0)
    _, authors_cells = authors_forward(sdpa_model, input_ids, pixel_values, input_ids.shape[1])
    _, mutated_cells = authors_forward(sdpa_model, input_ids, pixel_values, input_ids.shape[1], mutate=True)
    assert authors_cells != mutated_cells
    results = {}
    for name, method in (("authors", PyramidDrop.authors(layers=(1, 2, 3))), ("crop", PyramidDrop(layers=(1, 2, 3))),
                         ("compact only", PyramidDrop(layers=(1, 2, 3), positions="compact"))):  # fmt: skip
        pruned = crop.apply(sdpa_model, processor, method=method)
        try:
            results[name] = pruned(**inputs)[0].logits[0, -1]
        finally:
            pruned.remove()
    assert not torch.allclose(results["authors"], results["crop"], atol=1e-4)
    assert not torch.allclose(results["compact only"], results["crop"], atol=1e-4)


def test_renumbered_positions_are_refused_on_qwen_and_bad_options_named():
    model = build_qwen_model()
    with pytest.raises(UnsupportedModelError, match="3-D M-RoPE"):
        crop.apply(model, build_qwen_processor(), method=PyramidDrop.authors(budget=4))
    with pytest.raises(ConfigError, match=r"rank_layer must be one of \('before', 'stage'\)"):
        PyramidDrop(rank_layer="first")
    with pytest.raises(ConfigError, match="positions must be one of"):
        PyramidDrop(positions="renumbered")

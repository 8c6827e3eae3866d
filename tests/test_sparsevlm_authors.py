"""SparseVLM's authors' variant (`SparseVLM.authors`: their count tables, renumbered positions, merged tokens after
the kept ones) against a port of the authors' v1.5 code (`LlamaDynamicvitModel.forward` in
`llava/model/language_model/modelling_sparse_llama.py`, `attn_postprocess_topk` in `score.py`, `cluster_and_merge`
in `utils.py`; Gumpest/SparseVLMs, branch v1.5) run on the unmodified model's own layers; padded batches, SDPA and
eager, cached generation against the authors' recomputation; budgets they do not tabulate are refused."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch_inputs
from reference import causal_mask, merged_embeddings, unpadded_row

import crop
from crop.errors import ConfigError
from crop.strategies.sparsevlm import SparseVLM

PRUNING_LOC = [0, 1, 2]  # the authors' [2, 6, 15] of 32 layers, scaled to the tiny model's 4 (stages at 1, 2, 3)
IMAGE_SHAPE = 144
SCALED = {16: [17, 8, 4], 24: [60, 12, 7], 32: [76, 28, 9]}  # `score.py`'s 64/96/128 tables scaled to 144 tokens


def cluster_and_merge(x, cluster_num):
    """The authors' `cluster_and_merge` (DPC-KNN from TCFormer). Changes: einops rearranges written as indexing;
    `index_points` inlined; their `torch.rand(...) * 1e-6` added to the density, there "to ensure no tokens have the
    same density", is replaced by breaking exact ties towards the lower index (crop's rule): ties are common (a
    pair of mutual nearest neighbours always ties when k = 2), and the authors break them at random."""
    B, N, C = x.shape
    x1 = x[:, :, None, :]
    x2 = x[:, None, :, :]
    distance = (x1 - x2).norm(dim=-1, p=2)
    dist_matrix = distance / (C**0.5)
    dist_nearest, index_nearest = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    lower = torch.arange(N)[None, :] < torch.arange(N)[:, None]
    mask = (density[:, None, :] > density[:, :, None]) | ((density[:, None, :] == density[:, :, None]) & lower)
    mask = mask.type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, index_parent = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    dist_matrix = dist_matrix[torch.arange(B)[:, None], index_down]
    idx_cluster = dist_matrix.argmin(dim=1)
    idx_batch = torch.arange(B, device=x.device)[:, None].expand(B, cluster_num)
    idx_tmp = torch.arange(cluster_num, device=x.device)[None, :].expand(B, cluster_num)
    idx_cluster[idx_batch.reshape(-1), index_down.reshape(-1)] = idx_tmp.reshape(-1)
    token_weight = x.new_ones(B, N, 1)
    idx_batch = torch.arange(B, device=x.device)[:, None]
    idx = idx_cluster + idx_batch * cluster_num
    all_weight = token_weight.new_zeros(B * cluster_num, 1)
    all_weight.index_add_(dim=0, index=idx.reshape(B * N), source=token_weight.reshape(B * N, 1))
    all_weight = all_weight + 1e-6
    norm_weight = token_weight / all_weight[idx]
    x_merged = x.new_zeros(B * cluster_num, C)
    source = x * norm_weight
    x_merged.index_add_(dim=0, index=idx.reshape(B * N), source=source.reshape(B * N, C).type(x.dtype))
    return x_merged.reshape(B, cluster_num, C)


def layer_attention(layer, hidden_states, cos, sin):
    """The pruning layer's own attention probabilities (their `return_logits` path): its q/k on its input after
    rotary, scaled, causal, softmax over every key."""
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden_states)
    bsz, q_len, _ = normed.shape
    query_states = attn.q_proj(normed).view(bsz, q_len, -1, attn.head_dim).transpose(1, 2)
    key_states = attn.k_proj(normed).view(bsz, q_len, -1, attn.head_dim).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    query_states = query_states * cos + _rotate_half(query_states) * sin
    key_states = (key_states * cos + _rotate_half(key_states) * sin).repeat_interleave(attn.num_key_value_groups, 1)
    L, S = query_states.size(-2), key_states.size(-2)
    scale_factor = 1 / math.sqrt(query_states.size(-1))
    attn_bias = torch.zeros(L, S, dtype=query_states.dtype)
    temp_mask = torch.ones(L, S, dtype=torch.bool).tril(diagonal=0)
    attn_bias.masked_fill_(temp_mask.logical_not(), float("-inf"))
    attn_logits = query_states @ key_states.transpose(2, 3) * scale_factor
    attn_logits += attn_bias
    return torch.softmax(attn_logits, dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), dim=-1)


@torch.no_grad()
def authors_forward(model, input_ids, pixel_values, prompt_length, sparse_token_list):
    """The authors' v1.5 prefill on one unpadded row (their batch of one): raters from the input embeddings,
    ranking by each pruning layer's own attention, `min(count, v_token_num - 1)` kept, the best 30% + 1 of the
    dropped merged into `int(n / 10) + 1` clusters placed after the kept visual tokens, positions cut to a prefix of
    `arange`. Tokens after `prompt_length` are generated ones (raters read the prompt only, as at their prefill).
    Returns the logits and the per-layer visual counts."""
    text_model = model.model.language_model
    hidden_states = merged_embeddings(model, input_ids, pixel_values)
    v_token_start = int((input_ids[0] == model.config.image_token_id).nonzero()[0])
    text_token_start = v_token_start + IMAGE_SHAPE
    v_token_num = IMAGE_SHAPE
    v_t = hidden_states[:, v_token_start:text_token_start, :]
    t_t = hidden_states[:, text_token_start:prompt_length, :]
    m_v_t = v_t @ t_t.transpose(1, 2)
    m_v_t = m_v_t.softmax(2).mean(1)
    t_token_idx = torch.where(m_v_t > m_v_t.mean())
    position_ids = torch.arange(input_ids.shape[1])[None]
    counts = []
    for layer_idx, decoder_layer in enumerate(text_model.layers):
        cos, sin = text_model.rotary_emb(hidden_states, position_ids=position_ids)
        mask = causal_mask(hidden_states.shape[1], hidden_states.dtype)
        output = decoder_layer(hidden_states, attention_mask=mask, position_embeddings=(cos, sin),
                               position_ids=position_ids)  # fmt: skip
        if layer_idx in PRUNING_LOC:
            self_attn_weights = layer_attention(decoder_layer, hidden_states, cos, sin).mean(1)
            rows = t_token_idx[1] + text_token_start
            relation_vis_text = self_attn_weights[:, rows, v_token_start : v_token_start + v_token_num].mean(1)
            keep = min(sparse_token_list[PRUNING_LOC.index(layer_idx)], v_token_num - 1)
            pred_score_vis = torch.zeros_like(relation_vis_text, dtype=bool)
            _, indices = torch.topk(relation_vis_text, keep, dim=1)
            pred_score_vis[0][indices] = 1
            policy = torch.ones(1, output.shape[1])
            policy[:, v_token_start:text_token_start] = pred_score_vis.float()
            total_sparse_token_idx = torch.where(policy == 0)[1].unsqueeze(0)
            total_sparse_token = output[:, total_sparse_token_idx[0]]
            merge_token_idx_stage1 = torch.where(pred_score_vis == 0)[1]
            merge_token_stage1 = relation_vis_text[0][merge_token_idx_stage1]
            merge_token_num_stage1 = int(merge_token_idx_stage1.shape[0] * 0.3) + 1
            merge_token_stage2_idx = merge_token_stage1.topk(merge_token_num_stage1)[1]
            merge_token_stage2 = total_sparse_token[:, merge_token_stage2_idx, :]
            cluster_num = int(merge_token_stage2.shape[1] / 10) + 1
            merge_sparse_token = cluster_and_merge(merge_token_stage2, cluster_num)
            select_token_idx = torch.where(policy == 1)[1].unsqueeze(0)
            select_token = output[:, select_token_idx[0]]
            select_vis_token_num = int(pred_score_vis.sum())
            output = torch.cat((select_token[:, : v_token_start + select_vis_token_num, :], merge_sparse_token,
                                select_token[:, v_token_start + select_vis_token_num :, :]), dim=1)  # fmt: skip
            position_ids = position_ids[:, : len(select_token_idx[0]) + cluster_num]
            v_token_num = select_vis_token_num + cluster_num
            text_token_start = v_token_start + v_token_num
        hidden_states = output
        counts.append(v_token_num)
    return model.lm_head(text_model.norm(hidden_states))[0], counts


@pytest.mark.parametrize(("budget", "batch"), [(16, 1), (16, 3), (24, 3), (32, 1), (32, 3)])
def test_authors_variant_matches_a_port_of_the_authors_code(model, processor, budget, batch):
    inputs = batch_inputs(processor, batch)
    pruned = crop.apply(model, processor, method=SparseVLM.authors(budget))
    try:
        output, stats = pruned(**inputs)
        sequences, _ = pruned.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        pruned.remove()
    assert pruned.method.authors_counts(IMAGE_SHAPE) == tuple(SCALED[budget])
    assert "authors' count tables" in stats.method and "merged tokens after" in stats.method
    for row in range(batch):
        input_ids, pixel_values = unpadded_row(inputs, row)
        expected, counts = authors_forward(model, input_ids, pixel_values, input_ids.shape[1], SCALED[budget])
        got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert stats.rows[row].per_layer == [IMAGE_SHAPE, *counts[:-1]]
        ids = input_ids
        for _ in range(3):
            logits, _ = authors_forward(model, ids, pixel_values, input_ids.shape[1], SCALED[budget])
            ids = torch.cat([ids, logits[-1].argmax().view(1, 1)], dim=1)
        assert torch.equal(sequences[row][-3:], ids[0, -3:])


def test_each_authors_choice_changes_the_result(sdpa_model, processor):
    """Positions and merged-token placement each change the logits (the port above can tell them apart), and the
    authors' 64 sees more tokens on average than crop's 64, which ends there."""
    inputs = batch_inputs(processor, 1, padded=False)
    logits = {}
    for name, method in (("authors", SparseVLM.authors(16)),
                         ("centre", SparseVLM(16, counts="authors", positions="compact")),
                         ("original", SparseVLM(16, counts="authors", merged="after"))):  # fmt: skip
        pruned = crop.apply(sdpa_model, processor, method=method)
        try:
            output, stats = pruned(**inputs)
        finally:
            pruned.remove()
        logits[name] = output.logits[0, -1]
    assert not torch.allclose(logits["authors"], logits["centre"], atol=1e-4)
    assert not torch.allclose(logits["authors"], logits["original"], atol=1e-4)
    pruned = crop.apply(sdpa_model, processor, method=SparseVLM(16))
    try:
        _, crops = pruned(**inputs)
    finally:
        pruned.remove()
    assert crops.rows[0].kept_tokens == 16 and stats.rows[0].kept_tokens < 16
    assert stats.rows[0].average_tokens > 16


def test_untabulated_budgets_and_bad_options_are_refused(sdpa_model, processor):
    with pytest.raises(ConfigError, match=r"budget they tabulate, \[64, 96, 128, 192\] .* one of \[16, 24, 32, 48\]"):
        crop.apply(sdpa_model, processor, method=SparseVLM.authors(20))
    with pytest.raises(ConfigError, match=r"merged must be one of \('centre', 'after'\)"):
        SparseVLM(16, merged="end")
    with pytest.raises(ConfigError, match="for 3 stages"):
        crop.apply(sdpa_model, processor, method=SparseVLM(16, layers=(1, 2), counts="authors"))

"""SparseVLM against a by-hand reference: raters, staged ranking, recycling by density-peaks clustering."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch_inputs
from reference import causal_mask, merged_embeddings, unpadded_row

import crop
from crop.errors import ConfigError
from crop.strategies.sparsevlm import SparseVLM, density_peak_clusters

STAGES, COUNTS = (1, 2, 3), (72, 36, 18)


def clusters_by_hand(points: torch.Tensor, k: int) -> list[list[int]]:
    """DPC-KNN written out with loops: density from the k nearest squared distances, separation from denser
    points (ties: lower index is denser), centres by density x separation, members to the nearest centre."""
    n, dim = points.shape
    dist = [[float((points[i] - points[j]).norm()) / math.sqrt(dim) for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(d * d for d in sorted(dist[i])[: min(k, n)]) / min(k, n)) for i in range(n)]

    def denser(j: int, i: int) -> bool:
        return density[j] > density[i] or (density[j] == density[i] and j < i)

    far = max(max(row) for row in dist)
    separation = [min([dist[i][j] for j in range(n) if denser(j, i)], default=far) for i in range(n)]
    score = [separation[i] * density[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: (-score[i], i))[:k]
    groups = {c: [c] for c in centres}
    for i in range(n):
        if i not in groups:
            groups[min(centres, key=lambda c: (dist[i][c], centres.index(c)))].append(i)
    return [groups[c] for c in centres]


def clusters_of(dropped: int) -> int:
    recycled = min(dropped, int(dropped * 0.3) + 1) if dropped else 0
    return recycled // 10 + 1 if recycled else 0


def sparsevlm_reference(eager, input_ids, pixel_values, prompt_length):
    """One unpadded row by hand with an eager twin: full attention matrices from the layers themselves."""
    text_model = eager.model.language_model
    image_token = eager.config.image_token_id
    hidden = merged_embeddings(eager, input_ids, pixel_values)
    visual_positions = (input_ids[0] == image_token).nonzero().squeeze(1)
    text_positions = torch.arange(int(visual_positions[-1]) + 1, prompt_length)
    relation = (hidden[0, visual_positions] @ hidden[0, text_positions].T).softmax(-1).mean(0)
    raters = text_positions[relation > relation.mean()]
    positions = torch.arange(input_ids.shape[1])[None]
    cos, sin = text_model.rotary_emb(hidden, position_ids=positions)
    kept = torch.arange(input_ids.shape[1])
    stage, attention = 0, None
    with torch.no_grad():
        for index, layer in enumerate(text_model.layers):
            if stage < len(STAGES) and index == STAGES[stage]:
                visual = (input_ids[0, kept] == image_token).nonzero().squeeze(1)
                rows = [int((kept == r).nonzero()) for r in raters]
                scores = attention[0][:, rows][:, :, visual].mean(0).mean(0)
                target = COUNTS[stage]
                selected = target
                while selected + clusters_of(visual.numel() - selected) > target:
                    selected -= 1
                order = scores.topk(selected).indices
                dropped = [i for i in range(visual.numel()) if i not in set(order.tolist())]
                dropped = torch.tensor(dropped, dtype=torch.long)
                keep = torch.ones(kept.numel(), dtype=torch.bool)
                keep[visual] = False
                keep[visual[order]] = True
                new_hidden = hidden.clone()
                recycled = min(dropped.numel(), int(dropped.numel() * 0.3) + 1)
                best = dropped[scores[dropped].topk(recycled).indices]
                for group in clusters_by_hand(hidden[0, visual[best]], clusters_of(dropped.numel())):
                    members = visual[best[group]]
                    keep[members[0]] = True
                    new_hidden[0, members[0]] = hidden[0, members].mean(0)
                hidden, kept = new_hidden[:, keep], kept[keep]
                stage += 1
            mask = causal_mask(kept.numel(), hidden.dtype)
            c, s = cos[:, kept], sin[:, kept]
            _, attention = layer.self_attn(
                layer.input_layernorm(hidden), position_embeddings=(c, s), attention_mask=mask
            )
            hidden = layer(hidden, attention_mask=mask, position_embeddings=(c, s), position_ids=positions[:, kept])
        logits = eager.lm_head(text_model.norm(hidden))[0]
    cells = {int((visual_positions == k).nonzero()) for k in kept if input_ids[0, k] == image_token}
    return logits, cells


def test_density_peak_clusters_match_the_loops():
    points = torch.randn(23, 8, generator=torch.Generator().manual_seed(0))
    for k in (1, 3, 5):
        got = [group.tolist() for group in density_peak_clusters(points, k)]
        expected = clusters_by_hand(points, k)
        assert [g[0] for g in got] == [g[0] for g in expected]
        assert [sorted(g) for g in got] == [sorted(g) for g in expected]


@pytest.mark.parametrize("batch", [1, 3])
def test_sparsevlm_matches_reference(model, processor, batch):
    from crop.testing.llava import build_model

    inputs = batch_inputs(processor, batch)
    pruned = crop.apply(model, processor, method=SparseVLM(budget=18))
    try:
        output, stats = pruned(**inputs)
        sequences, _ = pruned.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        pruned.remove()
    assert pruned.method.layers == STAGES  # (2, 6, 15) of 32 scaled to 4 layers, plus one
    eager = build_model(attn_implementation="eager")
    for row in range(batch):
        input_ids, pixel_values = unpadded_row(inputs, row)
        prompt_length = input_ids.shape[1]
        expected, cells = sparsevlm_reference(eager, input_ids, pixel_values, prompt_length)
        got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert stats.rows[row].per_layer == [144, *COUNTS]
        assert set((stats.rows[row].cells.view(-1) == 2).nonzero().squeeze(1).tolist()) == cells
        ids = input_ids
        for _ in range(3):
            logits, _ = sparsevlm_reference(eager, ids, pixel_values, prompt_length)
            ids = torch.cat([ids, logits[-1].argmax().view(1, 1)], dim=1)
        assert torch.equal(sequences[row, -3:], ids[0, -3:])


def test_sparsevlm_keeps_sdpa_and_checks_settings(sdpa_model, processor):
    pruned = crop.apply(sdpa_model, processor, method="sparsevlm", budget=30)
    try:
        _, stats = pruned(**batch_inputs(processor, 2, padded=True))
    finally:
        pruned.remove()
    assert sdpa_model.config.text_config._attn_implementation == "sdpa"
    assert [row.kept_tokens for row in stats.rows] == [30, 30]
    for bad in (SparseVLM(budget=145), SparseVLM(budget=10, layers=(3, 2))):
        with pytest.raises(ConfigError, match="budget|layers"):
            crop.apply(sdpa_model, processor, method=bad)
    with pytest.raises(ConfigError, match="recycle_share"):
        SparseVLM(budget=10, recycle_share=2.0)


def test_sparsevlm_beam_search_batch_equals_rows(sdpa_model, processor):
    inputs = batch_inputs(processor, 2, padded=True)
    pruned = crop.apply(sdpa_model, processor, method=SparseVLM(budget=20))
    settings = dict(max_new_tokens=3, min_new_tokens=3, num_beams=2, do_sample=False)
    try:
        together, _ = pruned.generate(**inputs, **settings)
        for row in range(2):
            input_ids, pixel_values = unpadded_row(inputs, row)
            alone, _ = pruned.generate(input_ids=input_ids, pixel_values=pixel_values, **settings)
            assert torch.equal(together[row, -3:], alone[0, -3:])
    finally:
        pruned.remove()

"""Qwen3-VL: DeepStack features stay aligned with the tokens ILP keeps, attention rows follow the per-head q/k
norms, cached generation equals recomputation, batches equal their rows (methods acting before the LLM:
test_qwen3_vl_pre_llm.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import qwen_batch, qwen_row
from reference import causal_mask, full_region_logits_match, layer_zero_inputs

import crop
from crop.region import Region
from crop.testing.qwen3_vl import build_qwen3_model, build_qwen3_processor

REGIONS = [Region(0.0, 0.0, 0.5, 1.0), Region(0.25, 0.5, 1.0, 1.0), Region(0.4, 0.1, 0.9, 0.6)]


@pytest.fixture(scope="module")
def processor():
    return build_qwen3_processor()


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return build_qwen3_model(attn_implementation=request.param)


@torch.no_grad()
def deepstack_reference(model, inputs: dict, keep: torch.Tensor, layer: int) -> torch.Tensor:
    """One unpadded row by hand: layers < `layer` on every token, layers >= `layer` on the `keep` subset; after
    each of the first DeepStack layers, the model's own DeepStack features added to the visual tokens still
    there (the unmodified model's rotary embeddings and positions, gathered)."""
    text_model = model.model.language_model
    hidden, cos, sin, positions = layer_zero_inputs(model, inputs)
    image = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    deepstack = [features[0] for features in image.deepstack_features]
    visual = inputs["input_ids"][0] == model.config.image_token_id
    rank = visual.long().cumsum(0) - 1
    kept = torch.arange(visual.numel())
    for index, decoder_layer in enumerate(text_model.layers):
        if index == layer:
            kept = keep.nonzero().squeeze(1)
            hidden, cos, sin = hidden[:, kept], cos[:, kept], sin[:, kept]
            positions = positions[:, kept] if positions is not None else None
        mask = causal_mask(hidden.shape[1], hidden.dtype)
        hidden = decoder_layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions)
        if index < len(deepstack):
            here = visual[kept]
            hidden = hidden.clone()
            hidden[0, here] += deepstack[index][rank[kept][here]]
    return model.lm_head(text_model.norm(hidden))[0]


def region_keep(inputs: dict, region: Region, image_token: int) -> torch.Tensor:
    """The prompt positions ILP keeps: text, and the visual tokens whose cell centre lies in `region`."""
    ids = inputs["input_ids"][0]
    visual = (ids == image_token).nonzero().squeeze(1)
    _, height, width = inputs["image_grid_thw"][0].tolist()
    rows, cols = height // 2, width // 2
    cx, cy = (torch.arange(cols) + 0.5) / cols, (torch.arange(rows) + 0.5) / rows
    inside = ((cy >= region.y0) & (cy <= region.y1))[:, None] & ((cx >= region.x0) & (cx <= region.x1))[None, :]
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[visual[~inside.reshape(-1)]] = False
    return keep


def test_nothing_pruned_equals_the_model_and_deepstack_matters(model, processor):
    inputs = qwen_batch(processor, 3)
    assert len(full_region_logits_match(model, processor, inputs)) == 3
    pruned = crop.apply(model, processor, ilp=1)
    try:
        output, _ = pruned(**inputs, regions=[Region.full()] * 3)
    finally:
        pruned.remove()
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = model(**inputs).logits
        handle = model.model.language_model.register_forward_pre_hook(
            lambda module, args, kwargs: (args, {**kwargs, "deepstack_visual_embeds": None}), with_kwargs=True
        )
        try:
            without = model(**inputs).logits
        finally:
            handle.remove()
    torch.testing.assert_close(output.logits[real], expected[real], atol=1e-5, rtol=0)
    assert (without[real] - expected[real]).abs().max() > 1e-3  # the check above would see DeepStack dropped


@pytest.mark.parametrize("layer", [1, 2])
def test_ilp_inside_and_after_the_deepstack_range_equals_a_hand_reference(model, processor, layer):
    """K = 1 prunes inside DeepStack's range (layer 1's output gets features at the kept visual tokens only),
    K = 2 after it."""
    inputs = qwen_batch(processor, 3)
    pruned = crop.apply(model, processor, ilp=layer)
    try:
        output, stats = pruned(**inputs, regions=REGIONS)
        for row in range(3):
            alone = qwen_row(inputs, row)
            single, _ = pruned(**alone, regions=[REGIONS[row]])
            keep = region_keep(alone, REGIONS[row], model.config.image_token_id)
            expected = deepstack_reference(model, alone, keep, layer)
            got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(single.logits[0], expected, atol=1e-5, rtol=0)
            visual = alone["input_ids"][0] == model.config.image_token_id
            assert stats.rows[row].kept_tokens == int((keep & visual).sum()) < int(visual.sum())
    finally:
        pruned.remove()


def test_generation_with_cache_equals_recompute(model, processor):
    inputs = qwen_batch(processor, 2)
    pruned = crop.apply(model, processor, ilp=1)
    try:
        sequences, _ = pruned.generate(**inputs, regions=REGIONS[:2], max_new_tokens=3, min_new_tokens=3,
                                       do_sample=False)  # fmt: skip
    finally:
        pruned.remove()
    eos = model.generation_config.eos_token_id
    for row in range(2):
        step = qwen_row(inputs, row)
        prompt_keep = region_keep(step, REGIONS[row], model.config.image_token_id)
        keep = prompt_keep
        for _ in range(3):
            logits = deepstack_reference(model, step, keep, 1)[-1].clone()
            logits[eos] = float("-inf")  # as min_new_tokens does
            token = logits.argmax().view(1, 1)
            step["input_ids"] = torch.cat([step["input_ids"], token], dim=1)
            step["attention_mask"] = torch.ones_like(step["input_ids"])
            step["mm_token_type_ids"] = torch.cat([step["mm_token_type_ids"], torch.zeros_like(token)], dim=1)
            keep = torch.cat([keep, torch.ones(1, dtype=torch.bool)])
        assert torch.equal(sequences[row, -3:], step["input_ids"][0, -3:])


def test_fastv_ranks_with_the_attention_the_model_computes(processor):
    """FastV's kept set equals the top of the eager model's own attention row (per-head q/k norms applied, here
    with random norm weights so that they matter); the same row computed without the norms keeps other tokens, so
    the check can fail."""
    model = build_qwen3_model(attn_implementation="eager")
    attention = model.model.language_model.layers[1].self_attn
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for norm in (attention.q_norm, attention.k_norm):
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) * 2)
    inputs = qwen_row(qwen_batch(processor, 1), 0)
    pruned = crop.apply(model, processor, method="fastv", budget=6)
    try:
        _, stats = pruned(**inputs)
    finally:
        pruned.remove()
    captured = {}
    handle = model.model.language_model.layers[1].register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(kwargs, hidden=args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
    finally:
        handle.remove()
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    expected = attentions[1][0, :, -1, visual].mean(0).topk(6).indices
    kept = (stats.rows[0].cells.reshape(-1) == 2).nonzero().squeeze(1)
    assert set(kept.tolist()) == set(expected.tolist())
    with torch.no_grad():
        normed = model.model.language_model.layers[1].input_layernorm(captured["hidden"])
        cos, sin = (t.unsqueeze(1) for t in captured["position_embeddings"])
        query = attention.q_proj(normed).view(1, normed.shape[1], -1, attention.head_dim).transpose(1, 2)
        key = attention.k_proj(normed).view(1, normed.shape[1], -1, attention.head_dim).transpose(1, 2)
        half = attention.head_dim // 2
        query = query * cos + torch.cat((-query[..., half:], query[..., :half]), -1) * sin
        key = key * cos + torch.cat((-key[..., half:], key[..., :half]), -1) * sin
        key = key.repeat_interleave(attention.num_key_value_groups, 1)
        row = (query[:, :, -1:] @ key.transpose(-1, -2) * attention.scaling).softmax(-1)[0, :, 0]
    assert set(row[:, visual].mean(0).topk(6).indices.tolist()) != set(expected.tolist())


@pytest.mark.parametrize("method", ["fastv", "pyramiddrop", "sparsevlm", "dart", "crop-fused"])
def test_in_llm_methods_batch_equals_rows_and_generate(model, processor, method):
    inputs = qwen_batch(processor, 3)
    pruned = crop.apply(model, processor, method=method, budget=8)
    try:
        output, stats = pruned(**inputs)
        sequences, _ = pruned.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        for row in range(3):
            single, _ = pruned(**qwen_row(inputs, row))
            torch.testing.assert_close(output.logits[row, -1], single.logits[0, -1], atol=1e-5, rtol=0)
    finally:
        pruned.remove()
    assert [row.kept_tokens for row in stats.rows] == [8, 8, 8]
    assert sequences.shape[1] == inputs["input_ids"].shape[1] + 2


def test_a_saved_checkpoint_runs_through_ask_and_eval(tmp_path, capsys):
    """The real loading path (`save_pretrained`, then `crop ask` / `crop eval --model DIR`), with methods inside and
    before the LLM."""
    import json

    from benchdata import write_benchmark
    from conftest import make_image

    from crop.cli import main

    directory = tmp_path / "qwen3-vl"
    build_qwen3_model().save_pretrained(directory)
    build_qwen3_processor().save_pretrained(directory)
    image = tmp_path / "wide.png"
    make_image(128, 64).save(image)
    ask = ["ask", "--model", str(directory), "--image", str(image), "--question", "what ?", "--max-new-tokens", "2"]
    for options in (["--region", "0", "0", "3", "7", "--ilp-layer", "1"], ["--method", "fastv", "--budget", "4"],
                    ["--localizer", "attention"], ["--method", "pool", "--budget", "4"]):  # fmt: skip
        assert main([*ask, *options]) == 0
        assert "pruned answer" in capsys.readouterr().out
    expected = write_benchmark("textvqa", tmp_path / "data", "official", count=2)
    out = tmp_path / "run"
    command = ["eval", "--model", str(directory), "--bench", "textvqa", "--data", str(tmp_path / "data"),
               "--out", str(out), "--max-new-tokens", "2", "--batch-size", "2", "--method", "fastv", "--budget", "2"]
    assert main(command) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [e["id"] for e in expected]

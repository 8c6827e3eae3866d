"""Qwen3.5: hybrid Gated DeltaNet / full-attention layers. ILP starting at a linear and at a full-attention layer
equals layers run by hand on the kept tokens (the linear layers' convolution and state see only them), cached
generation with the hybrid cache equals recomputation, batches equal their rows, attention rows follow the gated,
partly rotated queries, pre-LLM methods equal hand-spliced prompts, and reading a linear layer is refused.

The unmodified model's own logits for a row differ by up to about 3e-5 between the row alone and the row in a
left-padded batch (the chunked delta rule sums the pads' decays): batch checks use 1e-4, single rows 1e-5."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import qwen_batch, qwen_row
from reference import causal_mask, full_region_logits_match, layer_zero_inputs
from test_divprune import authors_divprune
from test_qwen2_vl_pre_llm import spliced_by_hand
from test_qwen3_vl import region_keep

import crop
from crop.errors import UnsupportedModelError
from crop.region import Region
from crop.stats import FINE
from crop.strategies.crop_fused import FusedCROP
from crop.strategies.crop_method import CROP
from crop.strategies.dart import DART
from crop.strategies.divprune import DivPrune
from crop.strategies.fastv import FastV
from crop.strategies.ilp import ILP
from crop.strategies.plc import PLC
from crop.strategies.pooling import UniformPooling, pooled_shape
from crop.strategies.pyramid_drop import PyramidDrop
from crop.strategies.random_select import RandomSelection
from crop.strategies.sparsevlm import SparseVLM
from crop.testing.qwen3_5 import RELEASED_PATTERN, build_qwen3_5_model, build_qwen3_5_processor

REGIONS = [Region(0.0, 0.0, 0.5, 1.0), Region(0.25, 0.5, 1.0, 1.0), Region(0.4, 0.1, 0.9, 0.6)]
BATCH_ATOL = 1e-4


@pytest.fixture(scope="module")
def processor():
    return build_qwen3_5_processor()


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return build_qwen3_5_model(attn_implementation=request.param)


def layer_mask(decoder_layer, hidden: torch.Tensor) -> torch.Tensor | None:
    """What one unpadded row's layer takes: a causal mask for full attention, none for a linear layer."""
    return None if decoder_layer.block_type == "linear_attention" else causal_mask(hidden.shape[1], hidden.dtype)


@torch.no_grad()
def reference(model, inputs: dict, keep: torch.Tensor, layer: int) -> torch.Tensor:
    """One unpadded row by hand: layers < `layer` on every token, layers >= `layer` (both kinds) on the `keep`
    subset, with the unmodified model's rotary embeddings and positions gathered; no cache."""
    text_model = model.model.language_model
    hidden, cos, sin, positions = layer_zero_inputs(model, inputs)
    for index, decoder_layer in enumerate(text_model.layers):
        if index == layer:
            kept = keep.nonzero().squeeze(1)
            hidden, cos, sin = hidden[:, kept], cos[:, kept], sin[:, kept]
            positions = positions[:, kept] if positions is not None else None
        hidden = decoder_layer(hidden, attention_mask=layer_mask(decoder_layer, hidden),
                               position_embeddings=(cos, sin), position_ids=positions)  # fmt: skip
    return model.lm_head(text_model.norm(hidden))[0]


def test_nothing_pruned_equals_the_model(model, processor):
    assert full_region_logits_match(model, processor, qwen_batch(processor, 3)) == [28, 20, 30]


@pytest.mark.parametrize("layer", [1, 2])
def test_ilp_from_a_full_and_from_a_linear_layer_equals_layers_by_hand(model, processor, layer):
    """K = 1 starts at a full-attention layer, K = 2 at a Gated DeltaNet layer; both kinds follow."""
    inputs = qwen_batch(processor, 3)
    pruned = crop.apply(model, processor, ilp=layer)
    try:
        output, stats = pruned(**inputs, regions=REGIONS)
        for row in range(3):
            alone = qwen_row(inputs, row)
            single, _ = pruned(**alone, regions=[REGIONS[row]])
            keep = region_keep(alone, REGIONS[row], model.config.image_token_id)
            expected = reference(model, alone, keep, layer)
            got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
            torch.testing.assert_close(single.logits[0], expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(got, expected, atol=BATCH_ATOL, rtol=0)
            visual = alone["input_ids"][0] == model.config.image_token_id
            assert stats.rows[row].kept_tokens == int((keep & visual).sum()) < int(visual.sum())
    finally:
        pruned.remove()


def test_the_linear_layers_state_sees_only_the_kept_tokens(model, processor):
    """A mutation: running the linear layers after K on every token (only full attention pruned) gives other
    logits, so the reference above can tell."""
    alone = qwen_row(qwen_batch(processor, 1), 0)
    keep = region_keep(alone, REGIONS[0], model.config.image_token_id)
    expected = reference(model, alone, keep, 2)
    text_model = model.model.language_model
    with torch.no_grad():
        hidden, cos, sin, positions = layer_zero_inputs(model, alone)
        kept = keep.nonzero().squeeze(1)
        hidden = text_model.layers[0](hidden, position_embeddings=(cos, sin), position_ids=positions)
        hidden = text_model.layers[1](hidden, attention_mask=causal_mask(hidden.shape[1], hidden.dtype),
                                      position_embeddings=(cos, sin), position_ids=positions)  # fmt: skip
        hidden = text_model.layers[2](hidden, position_embeddings=(cos, sin), position_ids=positions)[:, kept]
        cos, sin = cos[:, kept], sin[:, kept]
        for decoder_layer in text_model.layers[3:]:
            hidden = decoder_layer(hidden, attention_mask=layer_mask(decoder_layer, hidden),
                                   position_embeddings=(cos, sin))  # fmt: skip
        mutated = model.lm_head(text_model.norm(hidden))[0]
    assert (mutated[-1] - expected[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("layer", [1, 2])
def test_generation_with_the_hybrid_cache_equals_recompute(model, processor, layer):
    inputs = qwen_batch(processor, 2)
    pruned = crop.apply(model, processor, ilp=layer)
    try:
        sequences, _ = pruned.generate(**inputs, regions=REGIONS[:2], max_new_tokens=3, min_new_tokens=3,
                                       do_sample=False)  # fmt: skip
    finally:
        pruned.remove()
    eos = model.generation_config.eos_token_id
    for row in range(2):
        step = qwen_row(inputs, row)
        keep = region_keep(step, REGIONS[row], model.config.image_token_id)
        for _ in range(3):
            logits = reference(model, step, keep, layer)[-1].clone()
            logits[eos] = float("-inf")  # as min_new_tokens does
            token = logits.argmax().view(1, 1)
            step["input_ids"] = torch.cat([step["input_ids"], token], dim=1)
            step["attention_mask"] = torch.ones_like(step["input_ids"])
            step["mm_token_type_ids"] = torch.cat([step["mm_token_type_ids"], torch.zeros_like(token)], dim=1)
            keep = torch.cat([keep, torch.ones(1, dtype=torch.bool)])
        assert torch.equal(sequences[row, -3:], step["input_ids"][0, -3:])


def test_fastv_ranks_with_the_gated_partly_rotated_attention(processor):
    """FastV's kept set equals the top of the eager model's own attention weights in layer 1 (queries split
    from their gates, q/k norms with random weights, a quarter of each head rotated)."""
    model = build_qwen3_5_model(attn_implementation="eager")
    attention = model.model.language_model.layers[1].self_attn
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for norm in (attention.q_norm, attention.k_norm):
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) * 2)
    inputs = qwen_row(qwen_batch(processor, 1), 0)
    pruned = crop.apply(model, processor, method=FastV(budget=6, layer=2))
    try:
        _, stats = pruned(**inputs)
    finally:
        pruned.remove()
    captured = {}
    handle = attention.register_forward_hook(lambda module, args, output: captured.update(weights=output[1]))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    expected = captured["weights"][0, :, -1, visual].mean(0).topk(6).indices
    kept = (stats.rows[0].cells.reshape(-1) == 2).nonzero().squeeze(1)
    assert set(kept.tolist()) == set(expected.tolist())


METHODS = {
    "fastv": lambda: FastV(budget=8, layer=2),
    "pyramiddrop": lambda: PyramidDrop(layers=(2, 4), budget=8),
    "sparsevlm": lambda: SparseVLM(8, layers=(2, 4)),
    "dart": lambda: DART(8, layer=4),
    "crop-fused": lambda: FusedCROP(layer=4, budget=8),
}


@pytest.mark.parametrize("name", METHODS)
def test_in_llm_methods_batch_equals_rows_and_generate(model, processor, name):
    inputs = qwen_batch(processor, 3)
    pruned = crop.apply(model, processor, method=METHODS[name]())
    try:
        output, stats = pruned(**inputs)
        sequences, _ = pruned.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        for row in range(3):
            single, _ = pruned(**qwen_row(inputs, row))
            torch.testing.assert_close(output.logits[row, -1], single.logits[0, -1], atol=BATCH_ATOL, rtol=0)
    finally:
        pruned.remove()
    assert [row.kept_tokens for row in stats.rows] == [8, 8, 8]
    assert sequences.shape[1] == inputs["input_ids"].shape[1] + 2


def run_by_hand(model, embeds: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor | None, layer: int):
    """Logits of one spliced row, every layer by hand (full attention causal, linear layers unmasked) with rotary
    embeddings from 3-D `positions`; layers >= `layer` see only `keep`."""
    text_model = model.model.language_model
    hidden = embeds
    with torch.no_grad():
        cos, sin = text_model.rotary_emb(hidden, position_ids=positions[:, None])
        for index, decoder_layer in enumerate(text_model.layers):
            if keep is not None and index == layer:
                hidden, cos, sin = hidden[:, keep], cos[:, keep], sin[:, keep]
            hidden = decoder_layer(hidden, attention_mask=layer_mask(decoder_layer, hidden),
                                   position_embeddings=(cos, sin))  # fmt: skip
        return model.lm_head(text_model.norm(hidden))[0]


@pytest.mark.parametrize("method", [CROP(None, PLC(ratio=2)), CROP(ILP(0)), CROP(ILP(2), PLC(ratio=2))],
                         ids=["plc", "k0", "plc+ilp2"])  # fmt: skip
def test_pre_llm_methods_equal_the_hand_spliced_prompt(model, processor, method):
    inputs = qwen_batch(processor, 3)
    pruned = crop.apply(model, processor, method=method)
    try:
        output, _ = pruned(**inputs, regions=REGIONS)
    finally:
        pruned.remove()
    for row in range(3):
        alone = qwen_row(inputs, row)
        embeds, positions, count = spliced_by_hand(model, alone, REGIONS[row], method)
        keep = None
        if method.ilp is not None and method.ilp.layer:
            ids = alone["input_ids"][0]
            start = int((ids == model.config.image_token_id).nonzero()[0])
            _, height, width = alone["image_grid_thw"][0].tolist()
            keep = torch.ones(embeds.shape[1], dtype=torch.bool)
            mask = REGIONS[row].token_mask(height // 2, width // 2)
            keep[start : start + count] = method.plc.compress(torch.zeros(mask.numel(), 1), mask).inside
        expected = run_by_hand(model, embeds, positions, keep, method.ilp.layer if keep is not None else 0)
        got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
        torch.testing.assert_close(got, expected, atol=BATCH_ATOL, rtol=0)


def test_reading_a_linear_layer_is_refused_with_the_layers_that_work(processor):
    model = build_qwen3_5_model(layer_types=RELEASED_PATTERN)
    pruned = crop.apply(model, processor, method="fastv", budget=6)
    try:
        with pytest.raises(UnsupportedModelError, match=r"Gated DeltaNet .* layers \[3\], so K in \[4\]"):
            pruned(**qwen_batch(processor, 1))
    finally:
        pruned.remove()


def test_a_saved_checkpoint_answers_through_ask(tmp_path, capsys):
    from conftest import make_image

    from crop.cli import main

    directory = tmp_path / "qwen3.5"
    build_qwen3_5_model().save_pretrained(directory)
    build_qwen3_5_processor().save_pretrained(directory)
    make_image(128, 64).save(tmp_path / "wide.png")
    ask = ["ask", "--model", str(directory), "--image", str(tmp_path / "wide.png"), "--question", "what ?",
           "--max-new-tokens", "2"]  # fmt: skip
    for options in (["--region", "0", "0", "3", "7", "--ilp-layer", "2"], ["--method", "fastv", "--budget", "4"],
                    ["--method", "pool", "--budget", "4"]):  # fmt: skip
        assert main([*ask, *options]) == 0
        assert "pruned answer" in capsys.readouterr().out


SELECTIONS = {
    "budget-k0": lambda: CROP(ILP(0), budget=10),
    "pool": lambda: UniformPooling(9),
    "random": lambda: RandomSelection(7),
    "divprune": lambda: DivPrune(8),
}


@pytest.mark.parametrize("name", SELECTIONS)
def test_pooling_and_selections_before_the_llm_equal_the_hand_spliced_prompt(model, processor, name):
    """The new tokens at the 3-D positions (s, s + r, s + c) of their first cell, the text after the image from
    s + max(rows, cols): pooling by hand, the selections with the cells the run kept (DivPrune's checked against
    the authors' choice; on Qwen every method keeps the 3-D positions, which carry the image's geometry)."""
    inputs = qwen_batch(processor, 3)
    method = SELECTIONS[name]()
    pruned = crop.apply(model, processor, method=method)
    try:
        output, stats = pruned(**inputs, regions=REGIONS)
    finally:
        pruned.remove()
    for row in range(3):
        alone = qwen_row(inputs, row)
        ids = alone["input_ids"][0]
        _, height, width = alone["image_grid_thw"][0].tolist()
        rows, cols = height // 2, width // 2
        with torch.no_grad():
            features = model.model.get_image_features(alone["pixel_values"], alone["image_grid_thw"],
                                                      return_dict=True).pooler_output[0]  # fmt: skip
            embeds = model.get_input_embeddings()(ids[None])[0]
        kept = (stats.rows[row].cells.reshape(-1) == FINE).nonzero().squeeze(1)
        if name == "pool":
            h, w = pooled_shape(rows, cols, method.budget)
            tokens = F.adaptive_avg_pool2d(features.T.reshape(1, -1, rows, cols), (h, w))[0].flatten(1).T
            first = (torch.arange(h)[:, None] * rows // h * cols + torch.arange(w)[None, :] * cols // w).reshape(-1)
        else:
            if name == "divprune":
                assert torch.equal(kept, authors_divprune(features, method.budget))
            tokens, first = features[kept], kept
        visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
        s, n = int(visual[0]), visual.numel()
        hidden = torch.cat([embeds[:s], tokens, embeds[s + n :]])[None]
        image = torch.stack([torch.full_like(first, s), s + first // cols, s + first % cols])
        after = (s + max(rows, cols) + torch.arange(ids.numel() - s - n))[None].expand(3, -1)
        positions = torch.cat([torch.arange(s)[None].expand(3, -1), image, after], dim=1)
        expected = run_by_hand(model, hidden, positions, None, 0)
        got = output.logits[row, output.logits.shape[1] - expected.shape[0] :]
        torch.testing.assert_close(got, expected, atol=BATCH_ATOL, rtol=0)

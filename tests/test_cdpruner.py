"""CDPruner against a port of its authors' selection lines (Theia-4869/CDPruner: `encode_images` in
`llava/model/llava_arch.py`, the text embedding in `CLIPVisionTower.forward` of
`llava/model/multimodal_encoder/clip_encoder.py`), run on the same model, image and question; end to end against a
hand-built prompt on LLaVA-1.5; refusals where its inputs are missing."""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTIONS, batch_inputs, qwen_batch
from transformers import CLIPTextModelWithProjection

import crop
from crop.errors import ConfigError, UnsupportedModelError
from crop.stats import FINE
from crop.strategies.cdpruner import CDPruner, ClipText, conditional_dpp, relevance_scores
from crop.strategies.registry import build_method
from crop.testing.clip import tiny_clip
from crop.testing.qwen2_vl import build_qwen_model, build_qwen_processor


@pytest.fixture(scope="module")
def clip() -> ClipText:
    model, tokenizer = tiny_clip()
    text = CLIPTextModelWithProjection(model.config.text_config).eval()
    text.text_model.load_state_dict(model.text_model.state_dict())
    text.text_projection.load_state_dict(model.text_projection.state_dict())
    return ClipText(text, model.visual_projection, tokenizer)


def authors_text_embeds(clip: ClipText, texts: str) -> torch.Tensor:
    """`CLIPVisionTower.forward`'s text branch. Changes: no CUDA streams; the tower's context length is read from
    its config (the authors keep it as `self.max_position_embeddings`)."""
    max_position_embeddings = clip.text_model.config.max_position_embeddings
    text_inputs = clip.tokenizer(text=texts, return_tensors="pt")
    text_segment = (text_inputs.input_ids.shape[1] - 1) // max_position_embeddings + 1
    text_padding = max_position_embeddings * text_segment - text_inputs.input_ids.shape[1]
    text_inputs = {
        k: torch.cat([v, v.new_zeros((v.shape[0], text_padding))], dim=1).reshape(-1, max_position_embeddings)
        for k, v in text_inputs.items()
        if k in ("input_ids", "attention_mask")  # change: the word-level tokenizer also returns token_type_ids
    }
    with torch.no_grad():
        return clip.text_model(**text_inputs).text_embeds


def authors_encode_images(model, clip: ClipText, images: torch.Tensor, texts: str, visual_token_num: int):
    """`LlavaMetaForCausalLM.encode_images` with `CLIPVisionTower.forward`'s image branch. Changes: transformers
    5.x names (`model.model.vision_tower`, `multi_modal_projector`, `vision_feature_layer`); the feature layer's patch
    states are taken as `feature_select` does ('patch': CLS dropped)."""
    with torch.no_grad():
        tower = model.model.vision_tower
        image_forward_outs = tower(images, output_hidden_states=True)
        image_outputs = image_forward_outs.hidden_states[model.config.vision_feature_layer][:, 1:]
        image_features = image_outputs
        image_embeds = getattr(tower, "vision_model", tower).post_layernorm(image_outputs)
        image_embeds = clip.visual_projection(image_embeds.float())
        text_embeds = authors_text_embeds(clip, texts)

        B, N, C = image_features.shape
        device = image_features.device
        image_features = model.model.multi_modal_projector(image_features)

        image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)  # (B, N, D)
        image_normalized = image_normalized.float()  # (B, N, D)
        similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))  # (B, N, N)

        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)  # (B, N, C)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)  # (M, C)
        relevance = torch.matmul(image_embeds, text_embeds.t())  # (B, N, M)
        relevance = (-relevance).mean(dim=-1)  # (B, N)
        relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())  # (B, N)

        kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)  # (B, N, N)

        cis = torch.zeros((visual_token_num, B, N), device=device)  # (T, B, N)
        di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # (B, N)
        select_idx = torch.empty((visual_token_num, B), dtype=torch.long, device=device)  # (T, B)
        for i in range(visual_token_num):
            j = torch.argmax(di2s, dim=-1)
            select_idx[i] = j

            eis = (
                kernel[torch.arange(B), j] - torch.einsum("tb,tbn->bn", cis[:i, torch.arange(B), j], cis[:i])
            ) / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
            cis[i, :, :] = eis
            di2s -= torch.square(eis)
            di2s[torch.arange(B), j] = -float("inf")

        select_idx = torch.sort(select_idx.t()).values  # (B, T)
        index_masks = torch.zeros(B, N, dtype=torch.bool, device=device)
        index_masks.scatter_(1, select_idx, True)
        return image_features, index_masks


def kept_cells(stats, row: int) -> set[int]:
    return set((stats.rows[row].cells.reshape(-1) == FINE).nonzero().squeeze(1).tolist())


def unpadded(inputs: dict, row: int) -> torch.Tensor:
    return inputs["input_ids"][row][inputs["attention_mask"][row].bool()]


def test_text_segments_are_the_authors(clip):
    long = " ".join(QUESTIONS)
    for text in (QUESTIONS[1], long):
        torch.testing.assert_close(clip.text_embeds(text), authors_text_embeds(clip, text), atol=0, rtol=0)
    assert clip.text_embeds(long).shape[0] > 1  # several 8-token segments: the mean over them is exercised


@pytest.mark.parametrize("budget", [4, 21, 80])  # 80: past the kernel's rank (the LLM's width 64)
def test_llava_keeps_the_authors_set_and_matches_a_hand_built_prompt(sdpa_model, processor, clip, budget):
    """Batch 3 with left padding and a question per row; the authors' code runs each row alone (batch 1, as their
    evaluation does: its min-max normalisation spans the whole batch)."""
    inputs = batch_inputs(processor, 3)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(3)]
    pruned = crop.apply(sdpa_model, processor, method=CDPruner(budget, clip=clip))
    try:
        output, stats = pruned(**inputs, questions=questions)
    finally:
        pruned.remove()
    embed = sdpa_model.get_input_embeddings()
    for row in range(3):
        features, mask = authors_encode_images(sdpa_model, clip, inputs["pixel_values"][row : row + 1], questions[row],
                                               budget)  # fmt: skip
        assert kept_cells(stats, row) == set(mask[0].nonzero().squeeze(1).tolist())
        assert stats.rows[row].llm_input_tokens == stats.rows[row].kept_tokens == int(mask.sum()) <= budget
        assert (int(mask.sum()) < budget) == (budget > 64)
        ids = unpadded(inputs, row)
        placeholders = (ids == sdpa_model.config.image_token_id).nonzero().squeeze(1)
        start, end = int(placeholders[0]), int(placeholders[-1]) + 1
        embeds = torch.cat([embed(ids[:start]), features[0][mask[0]], embed(ids[end:])])[None]
        with torch.no_grad():  # the authors' LLaVA passes no position ids: consecutive numbering
            expected = sdpa_model(inputs_embeds=embeds, attention_mask=torch.ones(1, embeds.shape[1])).logits[0, -1]
        torch.testing.assert_close(output.logits[row, -1], expected, atol=1e-5, rtol=0)


def test_a_changed_selection_detail_is_caught(sdpa_model, processor, clip):
    """The relevance's sign matters: with `sign=+1` (the reading users asked about) the kept set differs."""
    inputs = batch_inputs(processor, 1)
    kept = {}
    for sign in (-1, 1):
        pruned = crop.apply(sdpa_model, processor, method=CDPruner(12, clip=clip, sign=sign))
        try:
            _, stats = pruned(**inputs, questions=[QUESTIONS[0]])
        finally:
            pruned.remove()
        kept[sign] = kept_cells(stats, 0)
    _, mask = authors_encode_images(sdpa_model, clip, inputs["pixel_values"], QUESTIONS[0], 12)
    assert kept[-1] == set(mask[0].nonzero().squeeze(1).tolist()) != kept[1]


def test_greedy_map_equals_the_exhaustive_best_first_steps():
    """Greedy MAP adds, at each step, the token that maximises the kernel submatrix's determinant."""
    features = torch.randn(12, 6, generator=torch.Generator().manual_seed(0))
    relevance = relevance_scores(torch.randn(12, 5), torch.randn(3, 5))
    normalized = torch.nn.functional.normalize(features)
    kernel = relevance[:, None] * (normalized @ normalized.T) * relevance[None, :]
    chosen: list[int] = []
    for _ in range(4):
        rest = [j for j in range(12) if j not in chosen]
        chosen.append(max(rest, key=lambda j: float(torch.linalg.det(kernel[chosen + [j]][:, chosen + [j]]))))
    assert conditional_dpp(features, relevance, 4).tolist() == sorted(chosen)


def test_generation_with_cache_equals_recomputation(sdpa_model, processor, clip):
    inputs = batch_inputs(processor, 2)
    questions = QUESTIONS[:2]
    pruned = crop.apply(sdpa_model, processor, method=CDPruner(9, clip=clip))
    try:
        sequences, _ = pruned.generate(**inputs, questions=questions, max_new_tokens=3, min_new_tokens=3,
                                       do_sample=False)  # fmt: skip
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(3):
            step, _ = pruned(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                             questions=questions, use_cache=False)  # fmt: skip
            token = step.logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], dim=1), torch.cat([mask, torch.ones_like(token)], dim=1)
    finally:
        pruned.remove()
    assert torch.equal(sequences, ids)


def test_loads_from_a_clip_checkpoint_and_by_name(tmp_path, clip):
    model, tokenizer = tiny_clip()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = ClipText.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.text_embeds(QUESTIONS[2]), clip.text_embeds(QUESTIONS[2]), atol=0, rtol=0)
    torch.testing.assert_close(loaded.visual_projection.weight, clip.visual_projection.weight, atol=0, rtol=0)
    method = build_method("cdpruner", budget=8, clip=str(tmp_path))
    assert method.describe() == "CDPruner(8)"


def test_prepare_records_the_questions(sdpa_model, processor, clip):
    from conftest import make_image

    pruned = crop.apply(sdpa_model, processor, method=CDPruner(10, clip=clip))
    try:
        request = pruned.prepare([make_image(seed=1)], [QUESTIONS[2]])
        _, stats = pruned(request)
        inputs = {key: value for key, value in request.inputs.items()}
        _, by_keywords = pruned(**inputs, questions=QUESTIONS[2])
    finally:
        pruned.remove()
    assert request.questions == [QUESTIONS[2]]
    assert kept_cells(stats, 0) == kept_cells(by_keywords, 0)


def test_refusals_name_what_is_missing(sdpa_model, processor, clip):
    with pytest.raises(ConfigError, match="needs CLIP's text tower"):
        build_method("cdpruner", budget=8)
    with pytest.raises(ConfigError, match="applies to method cdpruner only"):
        build_method("divprune", budget=8, clip="somewhere")
    with pytest.raises(ConfigError, match="sign must be -1"):
        CDPruner(8, clip=clip, sign=0)
    inputs = batch_inputs(processor, 2)
    pruned = crop.apply(sdpa_model, processor, method=CDPruner(8, clip=clip))
    try:
        with pytest.raises(ConfigError, match="reads each row's question text: pass questions"):
            pruned(**inputs)
        with pytest.raises(ConfigError, match="got 1 questions for a batch of 2"):
            pruned(**inputs, questions=["one"])
    finally:
        pruned.remove()
    qwen = crop.apply(build_qwen_model(), build_qwen_processor(), method=CDPruner(4, clip=clip))
    try:
        with pytest.raises(UnsupportedModelError, match="CDPruner needs a CLIP vision tower.*divprune"):
            qwen(**qwen_batch(qwen.processor, 1), questions=[QUESTIONS[0]])
    finally:
        qwen.remove()

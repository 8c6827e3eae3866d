"""The slow, obvious computation that pruned runs are checked against: layers called one by one by hand."""

from __future__ import annotations

import torch
from conftest import on_grid


def causal_mask(length: int, dtype: torch.dtype) -> torch.Tensor:
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    return torch.zeros(1, 1, length, length, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def merged_embeddings(model, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """One unpadded row's input embeddings with the projected image features written over the placeholders."""
    embeds = model.get_input_embeddings()(input_ids).clone()
    features = model.model.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        return_dict=True,
    ).pooler_output[0]
    embeds[0, input_ids[0] == model.config.image_token_id] = features
    return embeds


@torch.no_grad()
def run_layers(model, embeds: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor | None, layer: int):
    """Logits of one unpadded row: layers < `layer` on every token, layers >= `layer` on the `keep` subset.

    `keep=None` runs every layer on every token. Returns the logits at the positions the last layer saw.
    """
    text_model = model.model.language_model
    hidden = embeds
    position_ids = positions[None]
    cos, sin = text_model.rotary_emb(hidden, position_ids=position_ids)
    for index, decoder_layer in enumerate(text_model.layers):
        if keep is not None and index == layer:
            kept = keep.nonzero().squeeze(1)
            hidden, cos, sin, position_ids = (
                hidden[:, kept],
                cos[:, kept],
                sin[:, kept],
                position_ids[:, kept],
            )
        hidden = decoder_layer(
            hidden,
            attention_mask=causal_mask(hidden.shape[1], hidden.dtype),
            position_embeddings=(cos, sin),
            position_ids=position_ids,
        )
    return model.lm_head(text_model.norm(hidden))


def unpadded_row(inputs: dict, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row `row`'s input ids without its left padding, and its pixel values."""
    real = inputs["attention_mask"][row].bool()
    return inputs["input_ids"][row][real][None], inputs["pixel_values"][row : row + 1]


def greedy_by_recompute(pruned, inputs: dict, regions, steps: int) -> torch.Tensor:
    """Greedy decoding that runs the whole pruned prompt plus the tokens so far again at every step, no cache."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(steps):
        output, _ = pruned(
            input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], **on_grid(regions), use_cache=False
        )
        next_token = output.logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
    return ids


@torch.no_grad()
def layer_zero_inputs(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the unmodified model feeds its first decoder layer: embeddings, rotary cos/sin, text positions."""
    captured = {}

    def capture(module, args, kwargs):
        captured.update(kwargs, hidden=args[0] if args else kwargs["hidden_states"])

    handle = model.model.language_model.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    cos, sin = captured["position_embeddings"]
    return captured["hidden"], cos, sin, captured["position_ids"]


@torch.no_grad()
def reference_logits(model, inputs: dict, keep: torch.Tensor, layer: int) -> torch.Tensor:
    """One unpadded row by hand: layers < `layer` on every token, layers >= `layer` on the `keep` subset, with
    the rotary embeddings and positions the unmodified model computed for the whole prompt."""
    text_model = model.model.language_model
    hidden, cos, sin, positions = layer_zero_inputs(model, inputs)
    for index, decoder_layer in enumerate(text_model.layers):
        if index == layer:
            kept = keep.nonzero().squeeze(1)
            hidden, cos, sin = hidden[:, kept], cos[:, kept], sin[:, kept]
            positions = positions[:, kept] if positions is not None else None
        mask = causal_mask(hidden.shape[1], hidden.dtype)
        hidden = decoder_layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions)
    return model.lm_head(text_model.norm(hidden))[0]


def full_region_logits_match(model, processor, inputs: dict) -> list[int]:
    """CROP-ILP with the whole image as region must give the unmodified model's logits on every real position;
    returns each row's image-token count."""
    import crop
    from crop.region import Region

    batch = inputs["input_ids"].shape[0]
    with torch.no_grad():
        expected = model(**inputs).logits
    pruned = crop.apply(model, processor, ilp=2)
    try:
        output, stats = pruned(**inputs, **on_grid([Region.full()] * batch))
    finally:
        pruned.remove()
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(output.logits[real], expected[real], atol=1e-5, rtol=0)
    return [row.image_tokens for row in stats.rows]

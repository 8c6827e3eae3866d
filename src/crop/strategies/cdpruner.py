"""CDPruner (Zhang et al., NeurIPS 2025, arXiv 2506.10967): keep the visual tokens a conditional determinantal point
process picks, before the LLM: diverse (by the similarity of their projected features) and relevant to the
instruction (by CLIP's image-text similarity).

As the authors' code selects (`encode_images` in `llava/model/llava_arch.py` and the text tower in
`llava/model/multimodal_encoder/clip_encoder.py` of Theia-4869/CDPruner):
- similarity: cosine similarity of the projected visual tokens (the LLM's input embeddings), in float32;
- relevance: the feature layer's patch states through the tower's `post_layernorm` and CLIP's `visual_projection`,
  against CLIP's text embedding of the question (split into 77-token segments padded with zeros, one embedding
  each), cosine; the *negated* mean over segments, min-max normalised over the image's tokens (+1e-6);
- kernel `relevance_i * similarity_ij * relevance_j`, greedy MAP inference (the fast Cholesky-style update of
  Chen et al. 2018): the token with the largest remaining gain, `budget` times (ties: the first index); the kept
  tokens in image order, renumbered (`compact`: the authors' LLaVA passes no position ids after pruning). Where the
  kernel's rank (at most the feature width) runs out before `budget` steps, the authors' index mask keeps the
  distinct tokens picked, fewer than the budget; so does crop (it happens on tiny test models, not at 4096 wide).

The sign: the authors' relevance is the negated similarity. Users asked whether that is a bug (CDPruner #14, #19);
the authors answered that it is deliberate, a property they observed with CLIP's features (#14, pointing to #9).
crop computes the released code's sign by default and offers `sign=+1` (relevance = the similarity itself) to try
the other reading. The authors released code for LLaVA only; models without a CLIP vision tower and its text tower
(Qwen2-VL, CDPruner #20) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crop.errors import ConfigError, UnsupportedModelError
from crop.strategies.base import PreLLMMethod, Selection, check_budget, keep_cells
from crop.strategies.context import ImageContext


@dataclass
class ClipText:
    """CLIP's text tower with its projection, the tokenizer, and CLIP's image projection: what CDPruner adds to a
    LLaVA model (whose vision tower is CLIP's, without the projection)."""

    text_model: nn.Module
    visual_projection: nn.Module
    tokenizer: Any

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> ClipText:
        """From a CLIP checkpoint (the one the VLM's vision tower came from, e.g. clip-vit-large-patch14-336)."""
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

        text_model = CLIPTextModelWithProjection.from_pretrained(path, **kwargs).eval()
        vision = CLIPVisionModelWithProjection.from_pretrained(path, **kwargs)
        return cls(text_model, vision.visual_projection.eval(), AutoTokenizer.from_pretrained(path))

    def text_embeds(self, text: str) -> torch.Tensor:
        """`(segments, dim)`: the text's token ids cut into rows of the tower's context length, the last padded
        with zeros (ids and attention mask), each row's projected embedding."""
        inputs = self.tokenizer(text=[text], return_tensors="pt")
        length = self.text_model.config.max_position_embeddings
        segments = (inputs["input_ids"].shape[1] - 1) // length + 1
        padding = length * segments - inputs["input_ids"].shape[1]
        device = next(self.text_model.parameters()).device
        rows = {
            key: torch.cat([value, value.new_zeros((value.shape[0], padding))], dim=1).reshape(-1, length).to(device)
            for key, value in inputs.items()
            if key in ("input_ids", "attention_mask")
        }
        with torch.inference_mode():
            return self.text_model(**rows).text_embeds


def relevance_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor, sign: int = -1) -> torch.Tensor:
    """Per visual token, `sign` times its mean cosine similarity to the text segments, min-max normalised."""
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = (sign * (image_embeds @ text_embeds.T)).mean(dim=-1)
    return (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())


def conditional_dpp(features: torch.Tensor, relevance: torch.Tensor, count: int) -> torch.Tensor:
    """The indices greedy MAP inference picks in `count` steps for the kernel `relevance_i * cos(f_i, f_j) *
    relevance_j`, sorted. As in the authors' code, once the kernel's rank is spent (it is at most the feature width)
    the gains turn NaN and later steps repeat a token, so fewer than `count` distinct tokens come back."""
    normalized = (features / features.norm(dim=-1, keepdim=True)).float()
    kernel = relevance[:, None] * (normalized @ normalized.T) * relevance[None, :]
    tokens = kernel.shape[0]
    directions = torch.zeros((count, tokens), device=kernel.device)
    gains = torch.diagonal(kernel).clone()
    chosen = torch.empty(count, dtype=torch.long, device=kernel.device)
    for i in range(count):
        j = int(torch.argmax(gains))
        chosen[i] = j
        update = (kernel[j] - directions[:i, j] @ directions[:i]) / torch.sqrt(gains[j])
        directions[i] = update
        gains -= update.square()
        gains[j] = -float("inf")
    return chosen.unique()


class CDPruner(PreLLMMethod):
    """Keep the `budget` visual tokens a conditional DPP picks (relevance to the question, diversity) before the
    LLM; `clip` is CLIP's text tower (a `ClipText` or the path of the CLIP checkpoint)."""

    name = "cdpruner"
    position = "compact"

    def __init__(self, budget: int, clip: ClipText | str | Path | None = None, sign: int = -1) -> None:
        if clip is None:
            raise ConfigError(
                "CDPruner needs CLIP's text tower: pass clip= the CLIP checkpoint the VLM's vision tower came from "
                "(on the command line --clip PATH, e.g. a local copy of openai/clip-vit-large-patch14-336)"
            )
        if sign not in (-1, 1):
            raise ConfigError(f"CDPruner sign must be -1 (the authors' released code) or +1, got {sign!r}")
        self.budget = budget
        self.sign = sign
        self._clip = clip

    @property
    def clip(self) -> ClipText:
        """CLIP's towers, loaded from the checkpoint on first use (a process that only counts tokens, such as a
        serving engine's front end, never loads them)."""
        if not isinstance(self._clip, ClipText):
            self._clip = ClipText.from_pretrained(self._clip)
        return self._clip

    def validate(self, num_layers: int, grid_tokens: int | None) -> None:
        check_budget(self.name, self.budget, grid_tokens)

    def reduce(self, image: ImageContext) -> Selection:
        try:
            vision = image.vision
        except UnsupportedModelError as missing:
            raise UnsupportedModelError(
                f"CDPruner needs a CLIP vision tower (its CLS-and-patches feature layer and post_layernorm, matched by "
                f"CLIP's text tower); {image.call.adapter.family} has none, and the authors released no code for it "
                "(CDPruner #20); use divprune, pool or random"
            ) from missing
        if image.layout.is_multi_grid or vision.cell.shape[0] > 1:
            raise ConfigError(
                "CDPruner is ported for one grid per image (LLaVA-1.5): the authors' LLaVA-NeXT form selects per "
                "crop and is not ported; use divprune or visionzip on LLaVA-NeXT"
            )
        features = image.features
        patches = vision.internals.hidden[0, 1:]
        projection = self.clip.visual_projection
        image_embeds = projection(image.vision_head(patches).to(projection.weight.dtype)).float()
        text_embeds = self.clip.text_embeds(image.question(self.name)).to(image_embeds.device)
        relevance = relevance_scores(image_embeds, text_embeds.float(), self.sign)
        chosen = conditional_dpp(features, relevance, self.budget).cpu()
        return keep_cells(features, chosen, image.shape, drop_before_llm=True)

    def describe(self) -> str:
        return f"CDPruner({self.budget}{'' if self.sign == -1 else ', relevance sign +1'})"

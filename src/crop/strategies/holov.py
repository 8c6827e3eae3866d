"""HoloV (Zou et al., NeurIPS 2025, arXiv 2510.02912): spread the budget over crops of the image, before the LLM.

As the authors' code selects (`HoloV` in `llava/model/utils.py` and its call in `prepare_inputs_labels_for_multimodal`,
`llava/model/llava_arch.py`, obananas/HoloV): the image's projected tokens, in raster order, are cut into `crops`
contiguous slices (bands of rows, the first `N % crops` one token longer). Each token scores its CLS attention
(the vision feature layer's CLS query, mean over heads) times 1000 plus `alpha` (0.09) times the variance of its
cosine similarities to the other tokens of its crop, that variance rescaled to the attention's mean magnitude; a
crop's score is its tokens' mean. The budget is shared in proportion to the crops' scores (floors, then one more
each to the highest-weighted crops until it is spent), and each crop keeps its most-attended tokens, in the order of
their attention (a crop allotted all its tokens keeps them in image order). The tokens enter the LLM in that order,
renumbered (`compact`): the authors pass no position ids. Their LLaVA call fixes 16 crops for 64 tokens; crop uses
the rule of their Qwen2.5-VL code, `int(1024 / 576 * N / budget)` crops, which gives 16 there.
"""

from __future__ import annotations

from functools import partial

import torch

from crop.errors import ConfigError, UnsupportedModelError
from crop.stats import DROPPED, FINE
from crop.strategies.base import PreLLMMethod, Selection, check_budget
from crop.strategies.context import ImageContext
from crop.strategies.plc import Compressed, selection_mix

ALPHA = 0.09
EPS = 1e-6


def crop_count(tokens: int, budget: int) -> int:
    """The number of crops for `budget` of `tokens` (16 at 64 of 576), as the authors' Qwen2.5-VL code sets it."""
    return max(1, int((1024 / 576) * tokens / budget))


def holistic_selection(features: torch.Tensor, attention: torch.Tensor, crops: int, budget: int) -> torch.Tensor:
    """Indices of the tokens HoloV keeps from `features` `(N, dim)` given their CLS `attention` `(N,)`, in the order
    they enter the LLM (see the module). Fewer than `budget` when a crop is allotted more tokens than it has (the
    authors pad with zero tokens there; crop keeps the real ones)."""
    count = features.shape[0]
    size, remainder = divmod(count, crops)
    bounds, start = [], 0
    for crop in range(crops):
        length = size + (1 if crop < remainder else 0)
        if length > 0:
            bounds.append((start, start + length))
        start += length
    scores = torch.stack([_crop_score(features[a:b].float(), attention[a:b].float()) for a, b in bounds])
    weights = scores / (scores.sum() + EPS)
    allotted = (weights * budget).floor().long()
    remaining = budget - int(allotted.sum())
    if remaining > 0:
        allotted[torch.topk(weights, k=min(remaining, len(weights))).indices[:remaining]] += 1
    kept = []
    for (a, b), share in zip(bounds, allotted.tolist(), strict=True):
        if share >= b - a:
            kept.append(torch.arange(a, b))
        elif share > 0:
            kept.append(a + torch.topk(attention[a:b], k=share).indices.cpu())
    return torch.cat(kept)


def _crop_score(tokens: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """A crop's score: the mean over its tokens of scaled attention plus alpha times rescaled similarity variance."""
    length = tokens.shape[0]
    if length <= 1:
        return attention.mean()
    normalized = tokens / (tokens.norm(dim=1, keepdim=True) + EPS)
    similarity = (normalized @ normalized.T) * (1 - torch.eye(length, device=tokens.device))
    mean = similarity.sum(dim=1) / (length - 1)
    variance = ((similarity - mean[:, None]) ** 2).sum(dim=1) / (length - 1)
    scaled = attention * 1e3
    variance = variance * (scaled.abs().mean() / (variance.abs().mean() + EPS))
    return (scaled + ALPHA * variance).mean()


class HoloV(PreLLMMethod):
    """Keep `budget` tokens shared over `crops` slices of the image by their attention and diversity (see the
    module); `crops=None` takes the authors' rule."""

    name = "holov"
    position = "compact"

    def __init__(self, budget: int, crops: int | None = None) -> None:
        if crops is not None and (not isinstance(crops, int) or crops < 1):
            raise ConfigError(f"HoloV crops must be a positive integer, got {crops!r}")
        self.budget = budget
        self.crops = crops

    def validate(self, num_layers: int, grid_tokens: int | None) -> None:
        check_budget(self.name, self.budget, grid_tokens)

    def reduce(self, image: ImageContext) -> Selection:
        try:
            vision = image.vision
        except UnsupportedModelError as missing:
            raise UnsupportedModelError(
                f"HoloV reads the vision tower's CLS attention, which this model lacks ({missing}); the authors' "
                "Qwen2.5-VL form reads a modified vision tower's attention and is not ported: use divprune or pool"
            ) from None
        if image.layout.is_multi_grid or vision.cell.shape[0] > 1:
            raise UnsupportedModelError(
                "HoloV is ported for one grid per image (LLaVA-1.5): the authors' LLaVA-NeXT form joins the crops "
                "without their newline tokens and is not ported; use divprune or visionzip on LLaVA-NeXT"
            )
        internals = vision.internals
        attention = internals.cls_attention[0] / internals.heads
        features = image.features
        crops = self.crops if self.crops is not None else crop_count(features.shape[0], self.budget)
        chosen = holistic_selection(features, attention.to(features.device), crops, self.budget)
        cells = torch.full((image.grid_tokens,), DROPPED, dtype=torch.long)
        cells[chosen] = FINE
        compressed = Compressed(features[chosen.to(features.device)], torch.ones(chosen.numel(), dtype=torch.bool),
                                chosen, partial(selection_mix, chosen, image.grid_tokens))  # fmt: skip
        return Selection(compressed, torch.ones(chosen.numel(), dtype=torch.bool), cells.view(image.shape))

    def describe(self) -> str:
        return f"HoloV({self.budget}{'' if self.crops is None else f', {self.crops} crops'})"

"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): dominant tokens plus merged contextual tokens, before
the LLM.

In the vision layer whose output feeds the projector, the CLS token's attention (summed over heads) picks the
*dominant* patches; the CLS state counts as one of them, as in the authors' code. The remaining patches are
merged into *contextual* tokens: targets evenly spaced among them, every other patch assigned to its most similar
target by the layer's keys (averaged over heads, cosine), each contextual token = target + mean of its assigned
states. Selection and merging act on vision states, which then go through the projector. Token order: CLS,
dominant patches in raster order, contextual tokens; positions are renumbered (`compact`), as the authors do.

With several crops per image (LLaVA-NeXT: the base image and its tiles) each crop keeps an equal share of the
budget, and the tokens follow the authors' LLaVA-NeXT code: the base crop's, then the tiles' dominant patches in
raster order of the stitched tiles, their CLS tokens and their contextual tokens (no unpadding, no newlines).
"""

from __future__ import annotations

import torch

from crop.errors import ConfigError
from crop.stats import DROPPED, FINE, POOLED
from crop.strategies.base import PreLLMMethod, Selection, check_budget
from crop.strategies.context import ImageContext
from crop.strategies.plc import Compressed

CONTEXTUAL_SHARE = 10 / 64
"""The authors' split: 54 dominant + 10 contextual for 64 tokens (108 + 20 for 128, 162 + 30 for 192)."""


class VisionZip(PreLLMMethod):
    """Keep `budget` tokens: `budget - contextual` dominant (CLS included) and `contextual` merged ones.

    `position="original"` gives each token the position id of its patch (a contextual token: its target's)
    instead of renumbering them.
    """

    name = "visionzip"
    position = "compact"

    def __init__(self, budget: int, contextual: int | None = None, position: str = "compact") -> None:
        if position not in ("compact", "original"):
            raise ConfigError(f"VisionZip position must be 'compact' (the authors') or 'original', got {position!r}")
        self.position = position
        self.budget = budget
        self.contextual = round(budget * CONTEXTUAL_SHARE) if contextual is None else contextual
        if not 0 <= self.contextual < budget:
            raise ConfigError(f"VisionZip contextual tokens must be in 0..{budget - 1}, got {self.contextual}")

    def validate(self, num_layers: int, grid_tokens: int | None) -> None:
        check_budget(self.name, self.budget, grid_tokens)

    def reduce(self, image: ImageContext) -> Selection:
        """Each crop keeps its share of the budget (CLS, dominant, contextual). The first crop's tokens come
        first; further crops (tiles) follow as the authors order them: their dominant patches in raster order of
        the stitched tiles, then their CLS tokens, then their contextual tokens."""
        if image.layout.leading:
            raise ConfigError("VisionZip adds the CLS token itself: use the 'default' feature strategy")
        vision = image.vision
        if self.position == "original" and vision.cell.shape[0] > 1:
            raise ConfigError(
                "VisionZip position='original' needs one crop per image: tile tokens follow the authors' order "
                "(stitched tiles, then the tiles' CLS and contextual tokens), not their positions; use 'compact'"
            )
        internals, cell, shape = vision.internals, vision.cell, image.shape
        crops = cell.shape[0]
        if self.budget < crops:
            raise ConfigError(f"VisionZip budget {self.budget} is below one token per crop ({crops} crops)")
        shares = [self.budget // crops + (c < self.budget % crops) for c in range(crops)]
        zipped = [
            zip_crop(
                internals.hidden[c],
                internals.cls_attention[c],
                internals.keys[c],
                share,
                min(share - 1, round(self.contextual * share / self.budget)),
            )
            for c, share in enumerate(shares)
        ]
        hidden = internals.hidden
        dominant0, context0, targets0 = zipped[0]
        tokens = [hidden[0, :1], hidden[0, dominant0], context0]
        first = [cell[0, :1], cell[0, dominant0 - 1], cell[0, targets0 - 1]]
        if crops > 1:
            tiles = [(c, d) for c in range(1, crops) for d in zipped[c][0].tolist()]
            tiles.sort(key=lambda pair: int(vision.order[pair[0], pair[1] - 1]))
            tokens += [hidden[c, d][None] for c, d in tiles] + [hidden[1:, 0]] + [zipped[c][1] for c in range(1, crops)]
            first += [cell[c, d - 1][None] for c, d in tiles] + [cell[1:, 0]]
            first += [cell[c, zipped[c][2] - 1] for c in range(1, crops)]
        features = image.project(torch.cat(tokens))
        count = shape[0] * shape[1]
        covered = torch.zeros(count, dtype=torch.bool)
        covered[cell[cell >= 0]] = True
        cells = torch.where(covered, POOLED, DROPPED)
        dominant_cells = torch.cat([cell[c, zipped[c][0].cpu() - 1] for c in range(crops)])
        cells[dominant_cells[dominant_cells >= 0]] = FINE
        kept = torch.ones(features.shape[0], dtype=torch.bool)
        compressed = Compressed(features, kept, torch.cat(first).clamp(min=0))
        return Selection(compressed, kept.clone(), cells.view(shape))

    def describe(self) -> str:
        return f"VisionZip({self.budget - self.contextual} dominant + {self.contextual} contextual)"


def zip_crop(
    hidden: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, budget: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One crop's VisionZip: `(dominant patches' indices into hidden (CLS is 0), contextual states, their target
    patches' indices)` for `budget` tokens of which `contextual` merged ones (the CLS state counts as dominant)."""
    dominant = cls_attention.topk(budget - 1 - contextual).indices.sort().values + 1
    rest = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    rest[0] = False
    rest[dominant] = False
    rest_index = rest.nonzero().squeeze(1)
    if not contextual:
        return dominant, hidden[:0], rest_index[:0]
    metric = keys[rest_index]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    step = max(1, rest_index.numel() // contextual)
    targets = torch.arange(0, rest_index.numel(), step, device=hidden.device)[:contextual]
    others = torch.ones(rest_index.numel(), dtype=torch.bool, device=hidden.device)
    others[targets] = False
    assign = (metric[others] @ metric[targets].T).argmax(-1)
    states = hidden[rest_index]
    sums = torch.zeros(targets.numel(), hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
    sums.index_add_(0, assign, states[others])
    counts = torch.bincount(assign, minlength=targets.numel()).clamp(min=1).to(hidden.dtype)
    return dominant, states[targets] + sums / counts[:, None], rest_index[targets]

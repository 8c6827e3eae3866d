"""DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): keep the most diverse visual tokens, before the LLM.

As the authors' code selects (`DivPrune` and its call in `prepare_inputs_labels_for_multimodal`,
`LLaVA/llava/model/llava_arch.py` of vbdi/divprune): over the image's projected visual tokens (the LLM's input
embeddings; with LLaVA-NeXT every placeholder, newlines included, as one set), the distance of two tokens is
1 - their cosine similarity; the first token chosen is the one farthest from its nearest neighbour, each next one
the token whose distance to the chosen set (its nearest chosen token) is largest (ties: the first index). The
chosen tokens keep their order in the image and are renumbered (`compact`), since the authors' LLaVA passes no
position ids after pruning. The running minimum over the chosen set gives the same choice as the authors'
re-evaluation of it at every step, in time linear in the tokens per step.
"""

from __future__ import annotations

import torch

from crop.errors import ConfigError
from crop.strategies.base import PreLLMMethod, Selection, check_budget, keep_cells
from crop.strategies.context import ImageContext


def max_min_diverse(features: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of `count` rows of `features` chosen greedily by max-min cosine distance (see the module)."""
    normed = features / features.norm(dim=1, keepdim=True)
    distance = 1.0 - normed @ normed.T
    chosen = torch.empty(count, dtype=torch.long, device=features.device)
    if features.shape[0] < 2:
        return chosen.fill_(0)
    chosen[0] = distance.topk(2, dim=0, largest=False).values[1].argmax()
    nearest = distance[chosen[0]]
    for i in range(1, count):
        chosen[i] = nearest.argmax()
        nearest = torch.minimum(nearest, distance[chosen[i]])
    return chosen


class DivPrune(PreLLMMethod):
    """Keep the `budget` most diverse visual tokens (max-min cosine distance) before the LLM."""

    name = "divprune"

    def __init__(self, budget: int, position: str = "compact") -> None:
        if position not in ("compact", "original"):
            raise ConfigError(f"DivPrune position must be 'compact' (the authors') or 'original', got {position!r}")
        self.budget = budget
        self.position = position

    def validate(self, num_layers: int, grid_tokens: int | None) -> None:
        check_budget(self.name, self.budget, grid_tokens)

    def reduce(self, image: ImageContext) -> Selection:
        features = image.features
        chosen = max_min_diverse(features, self.budget).cpu()
        return keep_cells(features, chosen, image.shape, drop_before_llm=True)

    def describe(self) -> str:
        return f"DivPrune({self.budget}{'' if self.position == 'compact' else ', original positions'})"

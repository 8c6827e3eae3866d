"""SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417): text-guided, progressive sparsification with recycling.

*Raters*: the text tokens after the image whose embeddings relate most to the visual tokens (softmax over the text
of the visual-text similarity, averaged over visual tokens, above its mean) rate the visual tokens.
*Stages*: at each stage layer K the visual tokens are ranked by the attention the raters pay them in layer K-1
(averaged over heads and raters) and the top ones stay; the authors prune after layers 2, 6 and 15 of 32, so
the stages start at layers 3, 7 and 16 (scaled to the model's depth by default).
*Recycling*: of the dropped tokens, the best-rated share (30%, plus one) is clustered (density-peaks clustering
with k-nearest-neighbour density, one cluster per 10 recycled tokens, plus one) and each cluster's mean hidden state
replaces its centre token, which stays at the centre's position.
Budget: after the last stage exactly `budget` visual tokens remain (kept plus merged); before it the count falls
geometrically from the full grid. The attention rows come from the layer's queries and keys, so SDPA stays.
"""

from __future__ import annotations

import copy

import torch

from crop.errors import ConfigError
from crop.strategies.base import Decision, InLLMMethod, check_budget, top_tokens
from crop.strategies.context import StageRow

PAPER_LAYERS = (2, 6, 15)
PAPER_DEPTH = 32


class SparseVLM(InLLMMethod):
    """Text-rated staged pruning that keeps `budget` visual tokens after the last stage, recycling dropped ones."""

    name = "sparsevlm"

    def __init__(
        self,
        budget: int,
        layers: tuple[int, ...] | None = None,
        recycle_share: float = 0.3,
        cluster_size: int = 10,
    ) -> None:
        if not 0 <= recycle_share <= 1:
            raise ConfigError(f"SparseVLM recycle_share must be in [0, 1], got {recycle_share!r}")
        if not isinstance(cluster_size, int) or cluster_size < 1:
            raise ConfigError(f"SparseVLM cluster_size must be a positive integer, got {cluster_size!r}")
        self.budget = budget
        self.layers = tuple(layers) if layers is not None else None
        self.recycle_share = recycle_share
        self.cluster_size = cluster_size

    @property
    def stage_layers(self) -> tuple[int, ...]:
        if self.layers is None:
            raise ConfigError("SparseVLM's default stages depend on the model: attach it with crop.apply first")
        return self.layers

    def bind(self, num_layers: int) -> SparseVLM:
        """A copy whose stages, if not given, are the paper's (after layers 2, 6, 15 of 32) scaled to the model."""
        bound = copy.copy(self)
        if bound.layers is None:
            scaled = {min(num_layers - 1, round(x * num_layers / PAPER_DEPTH) + 1) for x in PAPER_LAYERS}
            bound.layers = tuple(sorted(scaled))
        return bound

    def validate(self, num_layers: int, grid_tokens: int | None) -> None:
        if self.layers is not None and (
            list(self.layers) != sorted(set(self.layers)) or not all(1 <= x < num_layers for x in self.layers)
        ):
            raise ConfigError(f"SparseVLM layers {self.layers} must be increasing layer indices in 1..{num_layers - 1}")
        check_budget(self.name, self.budget, grid_tokens)

    def kept_after(self, stage: int, grid_tokens: int) -> int:
        """Visual tokens (kept plus merged) after stage `stage`: geometric from the grid down to the budget."""
        stages = len(self.layers)
        if stage == stages - 1:
            return self.budget
        return max(self.budget, round(grid_tokens * (self.budget / grid_tokens) ** ((stage + 1) / stages)))

    def raters(self, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        relevance = (visual.float() @ text.float().T).softmax(-1).mean(0)
        chosen = relevance > relevance.mean()
        return chosen if bool(chosen.any()) else torch.ones_like(chosen)

    def recycled(self, dropped: int) -> tuple[int, int]:
        """`(tokens recycled, clusters)` when `dropped` tokens are dropped at a stage."""
        if dropped == 0 or self.recycle_share == 0:
            return 0, 0
        recycled = min(dropped, int(dropped * self.recycle_share) + 1)
        return recycled, recycled // self.cluster_size + 1

    def selected(self, remaining: int, target: int) -> int:
        """How many tokens to select so that selected plus clusters equals `target` (it always can: each token
        fewer selected adds at most one cluster)."""
        if target >= remaining:
            return remaining
        count = target
        while count > 0 and count + self.recycled(remaining - count)[1] > target:
            count -= 1
        return count

    def decide(self, stage: StageRow) -> Decision:
        """Rank by the raters' attention in the layer before the stage, keep the top, recycle the best-rated of the
        dropped into merged tokens (clustered by their hidden states entering the stage)."""
        attention = stage.attention(self.raters)
        scores = attention.float().mean(0)
        target = min(scores.numel(), self.kept_after(stage.stage, stage.grid_tokens))
        keep = top_tokens(scores, self.selected(scores.numel(), target))
        return Decision(keep, self.recycle(attention, keep, stage.hidden))

    def recycle(self, attention: torch.Tensor, keep: torch.Tensor, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Groups of indices (centre first) of the dropped tokens to merge, each into its centre."""
        dropped = (~keep).nonzero().squeeze(1)
        recycled, clusters = self.recycled(dropped.numel())
        if not recycled:
            return []
        scores = attention.float().mean(0)[dropped.to(attention.device)].cpu()
        best = dropped[scores.topk(recycled).indices]
        return [best[group] for group in density_peak_clusters(hidden[best.to(hidden.device)].float(), clusters)]

    def describe(self) -> str:
        return f"SparseVLM(layers {list(self.layers or [])}, budget {self.budget})"


def density_peak_clusters(points: torch.Tensor, clusters: int) -> list[torch.Tensor]:
    """Density-peaks clustering with k-nearest-neighbour density (DPC-KNN, k = `clusters`): index groups, each
    starting with its centre. Ties in density go to the lower index, so the result is deterministic."""
    count = points.shape[0]
    distance = torch.cdist(points, points) / points.shape[1] ** 0.5
    nearest = distance.topk(min(clusters, count), dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp()
    order = torch.argsort(-density, stable=True)
    rank = torch.empty(count, dtype=torch.long)
    rank[order] = torch.arange(count)
    higher = rank[None, :] < rank[:, None]  # [i, j]: j is denser than i
    far = distance.max()
    separation = torch.where(higher, distance, far).min(-1).values
    centres = torch.argsort(-(separation * density), stable=True)[:clusters]
    assignment = distance[:, centres].argmin(-1)
    assignment[centres] = torch.arange(centres.numel())
    groups = []
    for index, centre in enumerate(centres.tolist()):
        members = (assignment == index).nonzero().squeeze(1)
        groups.append(torch.cat([torch.tensor([centre]), members[members != centre]]))
    return groups

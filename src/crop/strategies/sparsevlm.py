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

The authors' code (v1.5, the ICML paper's: `attn_postprocess_topk` in `score.py` and `LlamaDynamicvitModel.forward`
in `llava/model/language_model/modelling_sparse_llama.py`, Gumpest/SparseVLMs) differs in three ways, all offered:
per-stage counts from fixed tables whose budget is a layer average (`counts="authors"`), positions renumbered after
each drop (`positions="compact"`) and merged tokens placed right after the kept visual tokens (`merged="after"`).
`SparseVLM.authors(budget)` sets all three.
"""

from __future__ import annotations

import copy
import math

import torch

from crop.errors import ConfigError
from crop.strategies.base import Decision, InLLMMethod, check_budget, top_tokens
from crop.strategies.context import StageRow

PAPER_LAYERS = (2, 6, 15)
PAPER_DEPTH = 32
PAPER_GRID = 576
AUTHORS_COUNTS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
"""Top-ranked tokens each stage keeps on LLaVA-1.5 (576 tokens), by the budget the authors name (a layer average):
`sparse_token_dict` in `score.py` (branch v1.5; 96 from `main`, whose `USE_VERSION=1_0` path is v1.5's)."""
COUNTS = ("budget", "authors")
POSITIONS = ("original", "compact")
MERGED = ("centre", "after")


class SparseVLM(InLLMMethod):
    """Text-rated staged pruning that keeps `budget` visual tokens after the last stage, recycling dropped ones."""

    name = "sparsevlm"

    def __init__(
        self,
        budget: int,
        layers: tuple[int, ...] | None = None,
        recycle_share: float = 0.3,
        cluster_size: int = 10,
        counts: str = "budget",
        positions: str = "original",
        merged: str = "centre",
    ) -> None:
        for option, value, accepted in (("counts", counts, COUNTS), ("positions", positions, POSITIONS),
                                        ("merged", merged, MERGED)):  # fmt: skip
            if value not in accepted:
                raise ConfigError(f"SparseVLM {option} must be one of {accepted}, got {value!r}")
        if not 0 <= recycle_share <= 1:
            raise ConfigError(f"SparseVLM recycle_share must be in [0, 1], got {recycle_share!r}")
        if not isinstance(cluster_size, int) or cluster_size < 1:
            raise ConfigError(f"SparseVLM cluster_size must be a positive integer, got {cluster_size!r}")
        self.budget = budget
        self.layers = tuple(layers) if layers is not None else None
        self.recycle_share = recycle_share
        self.cluster_size = cluster_size
        self.counts = counts
        self.positions = positions
        self.merged = merged

    @classmethod
    def authors(cls, budget: int, layers: tuple[int, ...] | None = None) -> SparseVLM:
        """The authors' counts, positions and merged-token placement (see the module docstring)."""
        return cls(budget, layers, counts="authors", positions="compact", merged="after")

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
        if self.counts == "authors":
            if self.layers is not None and len(self.layers) != len(PAPER_LAYERS):
                raise ConfigError(f"SparseVLM's authors' counts are for {len(PAPER_LAYERS)} stages, not {self.layers}")
            if grid_tokens is not None:
                self.authors_counts(grid_tokens)
        else:
            check_budget(self.name, self.budget, grid_tokens)

    def authors_counts(self, grid_tokens: int) -> tuple[int, ...]:
        """The authors' per-stage counts for this budget, their table for 576 tokens scaled to `grid_tokens`: the
        budget must be one they tabulate, scaled the same way (64 of 576 is 16 of 144)."""
        tables = {scaled_count(budget, grid_tokens): counts for budget, counts in AUTHORS_COUNTS.items()}
        if self.budget not in tables:
            raise ConfigError(
                f"SparseVLM with the authors' counts takes a budget they tabulate, {sorted(AUTHORS_COUNTS)} of "
                f"{PAPER_GRID} tokens, scaled to this image's {grid_tokens}: one of {sorted(tables)}, not "
                f"{self.budget!r}"
            )
        return tuple(max(1, scaled_count(count, grid_tokens)) for count in tables[self.budget])

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
        if self.counts == "authors":  # `min(sparse_token_list[stage], v_token_num - 1)`, merged tokens added after
            selected = min(self.authors_counts(stage.grid_tokens)[stage.stage], scores.numel() - 1)
        else:
            target = min(scores.numel(), self.kept_after(stage.stage, stage.grid_tokens))
            selected = self.selected(scores.numel(), target)
        keep = top_tokens(scores, selected)
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
        variant = ""
        if self.counts == "authors":
            variant += ", the authors' count tables (the budget a layer average)"
        if self.positions != POSITIONS[0]:
            variant += f", {self.positions} positions"
        if self.merged != MERGED[0]:
            variant += f", merged tokens {self.merged} the kept ones"
        return f"SparseVLM(layers {list(self.layers or [])}, budget {self.budget}{variant})"


def scaled_count(count: int, grid_tokens: int) -> int:
    """A count of the authors' 576-token grid scaled to `grid_tokens`, halves rounded up."""
    return math.floor(count * grid_tokens / PAPER_GRID + 0.5)


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

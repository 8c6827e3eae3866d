"""CROP with the region found inside its own prefill: the attention localizer fused into ILP.

At layer K the region is chosen from layer K-1's attention of the question's rows (exactly what
`AttentionLocalizer(layer=K-1)` computes in a separate pass) and the tokens outside it are dropped at once: no
second model and no second forward. With `budget=N` the N tokens nearest the region's centre stay (CROP's budget
rule). The per-call stats record the region chosen.
"""

from __future__ import annotations

import torch

from crop.adapter import VisualLayout
from crop.localize.attention import DEFAULT_PENALTY, DEFAULT_ROWS, check_settings, region_from_relevance
from crop.region import Region, Viewport
from crop.stats import FINE
from crop.strategies.base import Method, Selection, check_budget
from crop.strategies.crop_method import CROP
from crop.strategies.grids import select_for_layout
from crop.strategies.ilp import ILP


class FusedCROP(Method):
    """ILP at layer `layer` (K >= 1) with the region from layer K-1's question attention, found in the same
    prefill; `penalty` and `rows` as in `AttentionLocalizer`."""

    name = "crop-fused"
    dynamic = True
    queries = "question"
    locates = True

    def __init__(
        self, layer: int = 2, penalty: float = DEFAULT_PENALTY, budget: int | None = None, rows: str = DEFAULT_ROWS
    ) -> None:
        self.layer = layer
        self.penalty = penalty
        self.budget = budget
        self.queries = rows

    def validate(self, num_layers: int, grid_tokens: int | None) -> None:
        super().validate(num_layers, grid_tokens)
        check_settings(
            self.layer - 1, self.penalty, self.queries, num_layers, "crop-fused (its localization layer is K-1)"
        )
        if self.budget is not None:
            check_budget(self.name, self.budget, grid_tokens)

    def select(
        self, features: torch.Tensor | None, shape: tuple[int, int], inside: torch.Tensor | None, row: int
    ) -> Selection:
        """Nothing is known before the forward: every cell is provisionally kept."""
        count = shape[0] * shape[1]
        return Selection(None, torch.ones(count, dtype=torch.bool), torch.full(shape, FINE, dtype=torch.long))

    def locate(
        self, attention: torch.Tensor, cells: torch.Tensor, layout: VisualLayout, viewport: Viewport
    ) -> tuple[Region, torch.Tensor]:
        """The region from the question rows' `(heads, tokens)` attention to the tokens at `cells` of `layout`
        (with several grids, the last, highest-resolution one's), and which of those tokens stay."""
        relevance = torch.zeros(layout.rows * layout.cols)
        relevance[cells.cpu()] = attention.float().mean(0).cpu()
        grid_relevance, grid_viewport = layout.drawn_grid(relevance.view(layout.rows, layout.cols), viewport)
        region = region_from_relevance(grid_relevance, grid_viewport, self.penalty)
        inside = layout.region_mask(region, viewport)
        if self.budget is None:
            keep = inside.reshape(-1)
        else:
            keep = select_for_layout(CROP(ILP(self.layer), budget=self.budget), None, layout, inside, 0).keep
        return region, keep[cells.cpu()]

    def describe(self) -> str:
        amount = f", budget {self.budget}" if self.budget is not None else ""
        return f"CROP-fused(ILP K={self.layer}, attention region at layer {self.layer - 1}{amount})"

"""CROP with the region found inside its own prefill: the attention localizer fused into ILP.

At layer K the region is chosen from layer K-1's attention of the question's rows (exactly what
`AttentionLocalizer(layer=K-1)` computes in a separate pass) and the tokens outside it are dropped at once: no
second model and no second forward. With `budget=N` the N tokens nearest the region's centre stay (CROP's budget
rule). The per-call stats record the region chosen.
"""

from __future__ import annotations

import torch

from crop.localize.attention import DEFAULT_PENALTY, DEFAULT_ROWS, check_settings, region_from_relevance
from crop.region import Region
from crop.strategies.base import Decision, InLLMMethod, check_budget
from crop.strategies.context import ImageContext, StageRow
from crop.strategies.crop_method import region_budget_keep


class FusedCROP(InLLMMethod):
    """ILP at layer `layer` (K >= 1) with the region from layer K-1's question attention, found in the same
    prefill; `penalty` and `rows` as in `AttentionLocalizer`."""

    name = "crop-fused"

    def __init__(
        self, layer: int = 2, penalty: float = DEFAULT_PENALTY, budget: int | None = None, rows: str = DEFAULT_ROWS
    ) -> None:
        self.layer = layer
        self.penalty = penalty
        self.budget = budget
        self.queries = rows

    @property
    def stage_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def validate(self, num_layers: int, grid_tokens: int | None) -> None:
        self.check_layer(self.layer, num_layers)
        check_settings(
            self.layer - 1, self.penalty, self.queries, num_layers, "crop-fused (its localization layer is K-1)"
        )
        if self.budget is not None:
            check_budget(self.name, self.budget, grid_tokens)

    def decide(self, stage: StageRow) -> Decision:
        stage.check_question()  # refuses prompts with no text after the image, as two-pass does
        region, keep = self.locate(stage.attention(self.queries), stage.cells, stage.image)
        return Decision(keep, region=region)

    def locate(self, attention: torch.Tensor, cells: torch.Tensor, image: ImageContext) -> tuple[Region, torch.Tensor]:
        """The region from the question rows' `(heads, tokens)` attention to the tokens at `cells` of the image
        (with several grids, the last, highest-resolution one's), and which of those tokens stay."""
        layout, viewport = image.layout, image.viewport
        relevance = torch.zeros(layout.rows * layout.cols)
        relevance[cells.cpu()] = attention.float().mean(0).cpu()
        grid_relevance, grid_viewport = layout.drawn_grid(relevance.view(layout.rows, layout.cols), viewport)
        region = region_from_relevance(grid_relevance, grid_viewport, self.penalty)
        inside = layout.region_mask(region, viewport)
        keep = inside.reshape(-1) if self.budget is None else region_budget_keep(image, self.budget, inside)
        return region, keep[cells.cpu()]

    def describe(self) -> str:
        amount = f", budget {self.budget}" if self.budget is not None else ""
        return f"CROP-fused(ILP K={self.layer}, attention region at layer {self.layer - 1}{amount})"

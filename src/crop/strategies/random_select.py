"""Random selection: keep a seeded random subset of N visual tokens (a floor every method must beat)."""

from __future__ import annotations

import torch

from crop.strategies.base import (
    Decision,
    InLLMMethod,
    PreLLMMethod,
    Selection,
    check_budget,
    keep_cells,
)
from crop.strategies.context import ImageContext, StageRow


class RandomSelection(PreLLMMethod, InLLMMethod):
    """Keep `budget` grid tokens drawn uniformly at random, before the LLM (`layer=None`) or from layer K on.

    Row r of a call draws from a generator seeded with `seed + r`: the same batch gives the same choice.
    """

    name = "random"

    def __init__(self, budget: int, seed: int = 0, layer: int | None = None) -> None:
        self.budget = budget
        self.seed = seed
        self.layer = layer

    def parts(self) -> tuple[PreLLMMethod | None, InLLMMethod | None]:
        return (self, None) if self.layer is None else (None, self)

    @property
    def stage_layers(self) -> tuple[int, ...]:
        return () if self.layer is None else (self.layer,)

    def validate(self, num_layers: int, grid_tokens: int | None) -> None:
        self.check_layer(self.layer, num_layers)
        check_budget(self.name, self.budget, grid_tokens)

    def cells(self, row: int, grid_tokens: int) -> torch.Tensor:
        """The raster cells row `row` keeps."""
        generator = torch.Generator().manual_seed(self.seed + row)
        return torch.randperm(grid_tokens, generator=generator)[: self.budget]

    def reduce(self, image: ImageContext) -> Selection:
        return keep_cells(image.features, self.cells(image.row, image.grid_tokens), image.shape, drop_before_llm=True)

    def decide(self, stage: StageRow) -> Decision:
        keep = torch.zeros(stage.grid_tokens, dtype=torch.bool)
        keep[self.cells(stage.row, stage.grid_tokens)] = True
        return Decision(keep[stage.cells])

    def describe(self) -> str:
        where = "before the LLM" if self.layer is None else f"from layer {self.layer}"
        return f"random({self.budget}, {where})"

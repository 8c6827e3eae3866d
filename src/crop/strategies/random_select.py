"""Random selection: keep a seeded random subset of N visual tokens (a floor every method must beat)."""

from __future__ import annotations

import torch

from crop.strategies.base import Method, Selection, check_budget, keep_cells


class RandomSelection(Method):
    """Keep `budget` grid tokens drawn uniformly at random, before the LLM (`layer=None`) or from layer K on.

    Row r of a call draws from a generator seeded with `seed + r`: the same batch gives the same choice.
    """

    name = "random"

    def __init__(self, budget: int, seed: int = 0, layer: int | None = None) -> None:
        self.budget = budget
        self.seed = seed
        self.layer = layer

    @property
    def acts_before_llm(self) -> bool:
        return self.layer is None

    def validate(self, num_layers: int, grid_tokens: int | None) -> None:
        super().validate(num_layers, grid_tokens)
        check_budget(self.name, self.budget, grid_tokens)

    def select(
        self, features: torch.Tensor | None, shape: tuple[int, int], inside: torch.Tensor | None, row: int
    ) -> Selection:
        generator = torch.Generator().manual_seed(self.seed + row)
        cells = torch.randperm(shape[0] * shape[1], generator=generator)[: self.budget]
        return keep_cells(features, cells, shape, drop_before_llm=self.layer is None)

    def describe(self) -> str:
        where = "before the LLM" if self.layer is None else f"from layer {self.layer}"
        return f"random({self.budget}, {where})"

"""Uniform pooling: average-pool the whole grid down to the budget (the image-downsampling baseline)."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from crop.stats import POOLED
from crop.strategies.base import PreLLMMethod, Selection, check_budget
from crop.strategies.context import ImageContext
from crop.strategies.plc import Compressed, mix_of


def pooled_shape(rows: int, cols: int, budget: int) -> tuple[int, int]:
    """The largest `h x w <= budget` grid with about the aspect ratio of `rows x cols` (h <= rows, w <= cols)."""
    h = max(1, min(rows, math.floor(math.sqrt(budget * rows / cols))))
    w = max(1, min(cols, budget // h))
    return h, w


class UniformPooling(PreLLMMethod):
    """Adaptive average pooling of the `rows x cols` grid to `h x w <= budget` tokens before the LLM.

    Each pooled token takes the position id of its window's top-left cell.
    """

    name = "pool"

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def validate(self, num_layers: int, grid_tokens: int | None) -> None:
        check_budget(self.name, self.budget, grid_tokens)

    def reduce(self, image: ImageContext) -> Selection:
        """Each of the image's grids pooled to its share of the budget."""
        return image.per_grid(self.pool, self.budget, name=self.describe())

    def pool(
        self, features: torch.Tensor | None, shape: tuple[int, int], inside: torch.Tensor | None, budget: int | None
    ) -> Selection:
        """One `rows x cols` grid average-pooled to `h x w <= budget` tokens."""
        rows, cols = shape
        h, w = pooled_shape(rows, cols, budget)
        grid = features.view(rows, cols, -1).permute(2, 0, 1).float()
        pooled = F.adaptive_avg_pool2d(grid[None], (h, w))[0].permute(1, 2, 0).reshape(h * w, -1)
        starts_r = torch.tensor([(i * rows) // h for i in range(h)])
        starts_c = torch.tensor([(j * cols) // w for j in range(w)])
        first = (starts_r[:, None] * cols + starts_c[None, :]).reshape(-1)
        compressed = Compressed(pooled.to(features.dtype), torch.ones(h * w, dtype=torch.bool), first,
                                partial(window_mix, rows, cols, h, w))  # fmt: skip
        cells = torch.full(shape, POOLED, dtype=torch.long)
        return Selection(compressed, torch.ones(h * w, dtype=torch.bool), cells)

    def describe(self) -> str:
        return f"pool({self.budget})"


def window_mix(rows: int, cols: int, h: int, w: int) -> torch.Tensor:
    """The mix of `adaptive_avg_pool2d` from `rows x cols` to `h x w`: output (i, j) averages rows
    `floor(i * rows / h) .. ceil((i + 1) * rows / h) - 1` and the columns alike (windows may overlap)."""
    tokens, cells, weights = [], [], []
    for i in range(h):
        r0, r1 = (i * rows) // h, -(-((i + 1) * rows) // h)
        for j in range(w):
            c0, c1 = (j * cols) // w, -(-((j + 1) * cols) // w)
            window = (torch.arange(r0, r1)[:, None] * cols + torch.arange(c0, c1)[None, :]).reshape(-1)
            tokens.append(torch.full_like(window, i * w + j))
            cells.append(window)
            weights.append(torch.full((window.numel(),), 1 / window.numel()))
    return mix_of(torch.cat(tokens), torch.cat(cells), torch.cat(weights), (h * w, rows * cols))

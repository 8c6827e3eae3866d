"""FastV (Chen et al., ECCV 2024, arXiv 2403.06764): drop the visual tokens the last token attends to least.

After layer K-1, the attention that the last prompt token pays to each visual token in layer K-1 (averaged
over heads) ranks them; from layer K on only the top ones stay. The attention row is computed from layer K-1's
queries and keys for that one row, so the model keeps its SDPA (or any) attention backend.
"""

from __future__ import annotations

from crop.errors import ConfigError
from crop.strategies.base import LastTokenRanking, check_budget


class FastV(LastTokenRanking):
    """Keep `budget` visual tokens (or `keep_ratio` of them) from layer K (default 2) on, ranked at layer K-1."""

    name = "fastv"

    def __init__(self, budget: int | None = None, keep_ratio: float | None = None, layer: int = 2) -> None:
        if (budget is None) == (keep_ratio is None):
            raise ConfigError("FastV needs exactly one of budget (tokens kept) or keep_ratio (share kept)")
        if keep_ratio is not None and not 0 < keep_ratio <= 1:
            raise ConfigError(f"FastV keep_ratio must be in (0, 1], got {keep_ratio!r}")
        self.budget = budget
        self.keep_ratio = keep_ratio
        self.layer = layer

    @property
    def stage_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def validate(self, num_layers: int, grid_tokens: int | None) -> None:
        self.check_layer(self.layer, num_layers)
        if self.budget is not None or grid_tokens is not None:
            check_budget(self.name, self.kept_after(0, grid_tokens), grid_tokens)

    def kept_after(self, stage: int, grid_tokens: int | None) -> int:
        return self.budget if self.budget is not None else max(1, round(grid_tokens * self.keep_ratio))

    def describe(self) -> str:
        amount = self.budget if self.budget is not None else f"{self.keep_ratio:.0%}"
        return f"FastV(K={self.layer}, keep {amount})"

"""PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247): drop visual tokens in stages, a pyramid over depth.

The LLM is cut into stages at `layers` (LLaVA-1.5-7B in the paper: 8, 16, 24). At the start of each stage the
remaining visual tokens are ranked by the attention the last prompt token pays them in the layer before, averaged
over heads, and a share `ratio` of them stays (the paper's lambda = 0.5). In budget mode the ratio is chosen so
that exactly `budget` tokens remain after the last stage. The attention row is computed from that layer's queries
and keys, so the model keeps SDPA.

The authors' code (`pdrop_rank_drop` in `llava/model/modeling_llama_pdrop.py`, Cooperx521/PyramidDrop) differs in
two ways, both offered here: it ranks with the stage's *first* layer (`rank_layer="stage"`: that layer's queries
and keys applied to its own input) and renumbers the positions after each drop (`positions="compact"`).
`PyramidDrop.authors(...)` sets both.
"""

from __future__ import annotations

import copy

from crop.errors import ConfigError
from crop.strategies.base import Decision, LastTokenRanking, check_budget, top_tokens
from crop.strategies.context import StageRow

RANK_LAYERS = ("before", "stage")
POSITIONS = ("original", "compact")


class PyramidDrop(LastTokenRanking):
    """Staged dropping at `layers` keeping `ratio` of the remaining visual tokens each time (or a final `budget`).

    `rank_layer`: rank with the layer before each stage (`before`, crop's default) or the stage's first layer
    (`stage`, the authors'); `positions`: kept tokens keep their positions (`original`) or are renumbered
    (`compact`, the authors')."""

    name = "pyramiddrop"

    def __init__(
        self,
        layers: tuple[int, ...] | None = None,
        ratio: float | None = 0.5,
        budget: int | None = None,
        rank_layer: str = "before",
        positions: str = "original",
    ) -> None:
        if budget is not None:
            ratio = None
        if ratio is not None and not 0 < ratio <= 1:
            raise ConfigError(f"PyramidDrop ratio must be in (0, 1], got {ratio!r}")
        if rank_layer not in RANK_LAYERS:
            raise ConfigError(f"PyramidDrop rank_layer must be one of {RANK_LAYERS}, got {rank_layer!r}")
        if positions not in POSITIONS:
            raise ConfigError(f"PyramidDrop positions must be one of {POSITIONS}, got {positions!r}")
        self.layers = tuple(layers) if layers is not None else None
        self.ratio = ratio
        self.budget = budget
        self.rank_layer = rank_layer
        self.positions = positions

    @classmethod
    def authors(
        cls, layers: tuple[int, ...] | None = None, ratio: float | None = 0.5, budget: int | None = None
    ) -> PyramidDrop:
        """The authors' ranking layer and positions (see the module docstring), crop's counts."""
        return cls(layers, ratio, budget, rank_layer="stage", positions="compact")

    @property
    def stage_layers(self) -> tuple[int, ...]:
        if self.layers is None:
            raise ConfigError("PyramidDrop's default stages depend on the model: attach it with crop.apply first")
        return self.layers

    def bind(self, num_layers: int) -> PyramidDrop:
        """A copy whose stages, if not given, are the model's quarters (the paper's 8, 16, 24 of 32 layers)."""
        bound = copy.copy(self)
        if bound.layers is None:
            bound.layers = tuple(sorted({max(1, num_layers * q // 4) for q in (1, 2, 3)}))
        return bound

    def validate(self, num_layers: int, grid_tokens: int | None) -> None:
        if self.layers is not None and (
            list(self.layers) != sorted(set(self.layers)) or not all(1 <= x < num_layers for x in self.layers)
        ):
            raise ConfigError(
                f"PyramidDrop layers {self.layers} must be increasing layer indices in 1..{num_layers - 1}"
            )
        if self.budget is not None:
            check_budget(self.name, self.budget, grid_tokens)

    def kept_after(self, stage: int, grid_tokens: int) -> int:
        """Visual tokens that remain after stage `stage` (0-based)."""
        stages = len(self.layers)
        if self.budget is not None:
            share = (self.budget / grid_tokens) ** ((stage + 1) / stages)
            return self.budget if stage == stages - 1 else max(self.budget, round(grid_tokens * share))
        return max(1, round(grid_tokens * self.ratio ** (stage + 1)))

    def decide(self, stage: StageRow) -> Decision:
        scores = stage.attention("last", layer=self.rank_layer).float().mean(0)
        return Decision(top_tokens(scores, self.kept_after(stage.stage, stage.grid_tokens)))

    def describe(self) -> str:
        amount = f"budget {self.budget}" if self.budget is not None else f"ratio {self.ratio}"
        variant = ""
        if (self.rank_layer, self.positions) != (RANK_LAYERS[0], POSITIONS[0]):
            variant = f", ranked at the {self.rank_layer} layer, {self.positions} positions"
        return f"PyramidDrop(layers {list(self.layers or [])}, {amount}{variant})"

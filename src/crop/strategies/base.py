"""The two contracts a pruning method implements: one for methods that act before the LLM (they return the
tokens the LLM gets), one for methods that act inside it (their stage layers and a decision per stage).

A method holds settings only. Whatever depends on the model it is attached to (default stage layers) is resolved
by `bind`, which returns a new object; what a method needs to decide (features, the region, attention, hidden
states) it asks of the per-call context it is handed (`crop.strategies.context`).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch

from crop.errors import ConfigError
from crop.region import Region
from crop.stats import DROPPED, FINE
from crop.strategies.plc import Compressed, selection_mix

if TYPE_CHECKING:
    from crop.strategies.context import ImageContext, StageRow


@dataclass
class Selection:
    """One image's decision on its grid tokens.

    `compressed`: the tokens that replace the image's before the LLM (None: the LLM gets the full grid).
    `keep`: per grid token (or, with `compressed`, per compressed token), whether it survives an in-LLM stage.
    `cells`: per grid cell, FINE / POOLED / DROPPED at the end (for stats and overlays).
    """

    compressed: Compressed | None
    keep: torch.Tensor
    cells: torch.Tensor


@dataclass
class Decision:
    """One row's decision at one in-LLM stage, over the grid tokens that reached it (`StageRow.tokens`).

    `keep`: which of them stay. `merges`: index groups (into the same tokens, centre first) whose mean hidden state
    replaces the centre's, which must be kept. `region`: the region the method found, for methods that find one.
    """

    keep: torch.Tensor
    merges: list[torch.Tensor] = field(default_factory=list)
    region: Region | None = None


class Method(ABC):
    """A visual-token pruning method; `parts()` says what acts before the LLM and what inside it.

    `needs_region`: the method reads the contextual region, so a localizer (or given regions) must supply one.
    """

    name: str = ""
    needs_region: bool = False

    @abstractmethod
    def parts(self) -> tuple[PreLLMMethod | None, InLLMMethod | None]:
        """`(the step before the LLM, the step inside it)`; either may be None."""

    def bind(self, num_layers: int) -> Method:
        """This method for a model with `num_layers` decoder layers, model-dependent defaults resolved in a copy
        (the method itself never changes, so one object can serve several models)."""
        return self

    def validate(self, num_layers: int, grid_tokens: int | None) -> None:
        """Refuse settings that do not fit the model (a layer out of range, a budget above the grid); `grid_tokens`
        is None when the grid depends on the image (checked again per call). Nothing to check by default."""
        return None

    def describe(self) -> str:
        return self.name

    def with_position(self, position: str) -> Method:
        """A copy whose pre-LLM step numbers its new tokens `position` ('original' or 'compact'); the method itself
        when nothing acts before the LLM. Serving engines that number every prompt consecutively (vLLM on 1-D
        positions) run the 'compact' form."""
        return self


class PreLLMMethod(Method):
    """Acts before the LLM: replaces each image's grid tokens by the ones `reduce` returns.

    `position`: position ids of the new tokens, `original` (each takes its first grid cell's) or `compact`
    (the new prompt is numbered consecutively).
    """

    position: str = "original"

    def parts(self) -> tuple[PreLLMMethod | None, InLLMMethod | None]:
        return self, None

    def with_position(self, position: str) -> PreLLMMethod:
        if position not in ("original", "compact"):
            raise ConfigError(f"position must be 'original' or 'compact', got {position!r}")
        renumbered = copy.copy(self)
        renumbered.position = position
        return renumbered

    @abstractmethod
    def reduce(self, image: ImageContext) -> Selection:
        """One image's tokens for the LLM (`Selection.compressed`) and what became of each grid cell."""


class InLLMMethod(Method):
    """Acts inside the LLM: at each of `stage_layers` it keeps some of the grid tokens that reached it.

    `stage_layers` must be resolved (by `bind`) before the method runs. `positions`: `original` (kept tokens keep
    their position ids) or `compact` (each stage's tokens are renumbered consecutively, 1-D positions only).
    `merged`: where a merged token sits, at its centre's place (`centre`) or right after the kept visual tokens
    (`after`).
    """

    positions: str = "original"
    merged: str = "centre"

    def parts(self) -> tuple[PreLLMMethod | None, InLLMMethod | None]:
        return None, self

    @property
    @abstractmethod
    def stage_layers(self) -> tuple[int, ...]:
        """The decoder layers at which the method drops tokens (one stage per layer, increasing, >= 1)."""

    @abstractmethod
    def decide(self, stage: StageRow) -> Decision:
        """Which of one row's grid tokens stage `stage.stage` keeps (and merges)."""

    def check_layer(self, layer: int | None, num_layers: int) -> None:
        """Refuse a stage layer outside `1..num_layers - 1`."""
        if layer is not None and not (isinstance(layer, int) and 1 <= layer < num_layers):
            raise ConfigError(
                f"{self.name}: layer {layer!r} is out of range: this model has {num_layers} decoder layers, "
                f"so it must be an integer in 1..{num_layers - 1}"
            )


def check_budget(name: str, budget: int, grid_tokens: int | None) -> None:
    """A budget is a positive integer no larger than the image's grid (checked per call when grids vary)."""
    if not isinstance(budget, int) or budget < 1 or (grid_tokens is not None and budget > grid_tokens):
        limit = f"1..{grid_tokens} (the image's grid tokens)" if grid_tokens is not None else "at least 1"
        raise ConfigError(f"{name}: budget {budget!r} must be an integer in {limit}")


def keep_cells(
    features: torch.Tensor | None, cells: torch.Tensor, shape: tuple[int, int], drop_before_llm: bool
) -> Selection:
    """Keep the grid cells with raster indices `cells` (sorted): before the LLM, or flagged for an in-LLM layer."""
    cells = cells.sort().values
    state = torch.full((shape[0] * shape[1],), DROPPED, dtype=torch.long)
    state[cells] = FINE
    if drop_before_llm:
        count = shape[0] * shape[1]
        compressed = Compressed(features[cells.to(features.device)], torch.ones_like(cells, dtype=torch.bool), cells,
                                partial(selection_mix, cells, count))  # fmt: skip
        return Selection(compressed, torch.ones(cells.numel(), dtype=torch.bool), state.view(shape))
    keep = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    keep[cells] = True
    return Selection(None, keep, state.view(shape))


def top_tokens(scores: torch.Tensor, count: int) -> torch.Tensor:
    """A boolean mask over `scores` marking its `count` largest entries."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[scores.topk(min(count, scores.numel())).indices.cpu()] = True
    return keep


class LastTokenRanking(InLLMMethod):
    """Methods that keep, at each stage, the tokens the last prompt token attends to most (mean over heads) in
    the layer before the stage; subclasses say how many remain after each stage (`kept_after`)."""

    def kept_after(self, stage: int, grid_tokens: int) -> int:
        raise NotImplementedError

    def decide(self, stage: StageRow) -> Decision:
        scores = stage.attention("last").float().mean(0)
        return Decision(top_tokens(scores, self.kept_after(stage.stage, stage.grid_tokens)))

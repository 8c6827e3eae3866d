"""The interface every pruning method implements: what it keeps before the LLM and from which layer on."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from crop.errors import ConfigError
from crop.stats import DROPPED, FINE
from crop.strategies.plc import Compressed


@dataclass
class Selection:
    """One row's decision.

    `compressed`: the grid tokens that replace the image's before the LLM (None: the LLM gets the full grid).
    `keep`: per LLM-input grid token, whether it survives from layer `Method.layer` on.
    `cells`: per grid cell, FINE / POOLED / DROPPED at the end (for stats and overlays).
    """

    compressed: Compressed | None
    keep: torch.Tensor
    cells: torch.Tensor


class Method(ABC):
    """A visual-token pruning method.

    `layer`: the decoder layer from which tokens not in `Selection.keep` are dropped (None: no in-LLM dropping).
    `needs_region`: whether `select` uses the contextual region. `position`: position ids of compressed tokens,
    `original` (of their first grid cell) or `compact` (renumbered).
    """

    name: str = ""
    needs_region: bool = False
    layer: int | None = None
    position: str = "original"
    dynamic: bool = False
    """True for methods that choose during prefill (`rank`) from the attention of the layer before each stage."""
    queries: str = "last"
    """Dynamic methods: whose attention ranks the visual tokens, the last prompt token's ("last"), that of every
    token after the image ("question") or that of the text tokens `raters` picks ("raters"), averaged over rows."""
    locates: bool = False
    """Dynamic methods that choose the region themselves during prefill (`locate` instead of `rank`)."""
    needs_grid: bool = False
    """Methods that use the 2-D geometry of one image grid (distances, boxes, pooling windows)."""

    @property
    def stage_layers(self) -> tuple[int, ...]:
        """The decoder layers at which the method drops tokens (one stage per layer)."""
        return () if self.layer is None else (self.layer,)

    def rank(self, stage: int, attention: torch.Tensor, cells: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """Dynamic methods: which of one row's remaining grid tokens (raster `cells`) stage `stage` keeps, given
        the last token's `(heads, tokens)` attention to them in the layer before the stage."""
        raise NotImplementedError(f"{self.name} is not a dynamic method")

    def locate(
        self, attention: torch.Tensor, cells: torch.Tensor, layout: Any, viewport: Any
    ) -> tuple[Any, torch.Tensor]:
        """Methods with `locates`: `(region, which of the ranked tokens stay)` from the rows' attention to the
        tokens at `cells` of the image's `VisualLayout`."""
        raise NotImplementedError(f"{self.name} does not locate a region")

    def recycle(
        self, stage: int, attention: torch.Tensor, keep: torch.Tensor, hidden: torch.Tensor
    ) -> list[torch.Tensor]:
        """Dynamic methods that merge dropped tokens: groups of indices (into the ranked tokens, centre first)
        whose mean hidden state (`hidden`: the stage's input) replaces the centre's. None by default."""
        return []

    def raters(self, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Methods with `queries == "raters"`: which text tokens (`text`: their prompt embeddings) rate the
        visual tokens (`visual`: the grid's embeddings)."""
        raise NotImplementedError(f"{self.name} does not rank with text raters")

    @property
    def acts_before_llm(self) -> bool:
        """Whether `select` returns compressed tokens (it then needs the image features)."""
        return False

    def encode(self, adapter: Any, inputs: dict[str, Any], leading: int) -> tuple[torch.Tensor, list[Any]]:
        """For methods acting before the LLM: `(leading token features (B, leading, dim), per-row inputs of
        select)` from the processor's `inputs`. By default the projected grid features `(rows*cols, dim)` of each
        row."""
        features = adapter.image_features(inputs)
        return torch.stack([f[:leading] for f in features]), [f[leading:] for f in features]

    def validate(self, num_layers: int, grid_tokens: int | None) -> None:
        """Refuse settings that do not fit the model (a layer out of range, a budget above the grid); `grid_tokens`
        is None when the grid depends on the image (checked again per call)."""
        if self.layer is not None and not (isinstance(self.layer, int) and 1 <= self.layer < num_layers):
            raise ConfigError(
                f"{self.name}: layer {self.layer!r} is out of range: this model has {num_layers} decoder layers, "
                f"so it must be an integer in 1..{num_layers - 1}"
            )

    @abstractmethod
    def select(
        self, features: torch.Tensor | None, shape: tuple[int, int], inside: torch.Tensor | None, row: int
    ) -> Selection:
        """Decide for row `row` given its `(rows*cols, dim)` grid features, the grid `shape` and the region's
        `(rows, cols)` cells (None for methods that do not use a region)."""

    def with_budget(self, budget: int) -> Method:
        """This method with another budget (each grid's share, for images with several grids)."""
        if getattr(self, "budget", None) is None:
            raise ConfigError(f"{self.name} has no budget to share")
        clone = copy.copy(self)
        clone.budget = budget
        return clone

    def describe(self) -> str:
        return self.name


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
        compressed = Compressed(features[cells.to(features.device)], torch.ones_like(cells, dtype=torch.bool), cells)
        return Selection(compressed, torch.ones(cells.numel(), dtype=torch.bool), state.view(shape))
    keep = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    keep[cells] = True
    return Selection(None, keep, state.view(shape))


class LastTokenRanking(Method):
    """Dynamic methods that keep, at each stage, the tokens the last prompt token attends to most (mean over
    heads) in the layer before the stage; subclasses say how many remain after each stage (`kept_after`)."""

    dynamic = True

    def kept_after(self, stage: int, grid_tokens: int) -> int:
        raise NotImplementedError

    def select(
        self, features: torch.Tensor | None, shape: tuple[int, int], inside: torch.Tensor | None, row: int
    ) -> Selection:
        """Nothing is known before the forward: every cell is provisionally kept."""
        count = shape[0] * shape[1]
        return Selection(None, torch.ones(count, dtype=torch.bool), torch.full(shape, FINE, dtype=torch.long))

    def rank(self, stage: int, attention: torch.Tensor, cells: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        scores = attention.float().mean(0)
        count = min(scores.numel(), self.kept_after(stage, shape[0] * shape[1]))
        keep = torch.zeros(scores.numel(), dtype=torch.bool)
        keep[scores.topk(count).indices.cpu()] = True
        return keep

"""CROP as a method: the composition of PLC before the LLM and ILP inside it, both guided by the region."""

from __future__ import annotations

import copy

import torch

from crop.errors import ConfigError, UnsupportedModelError
from crop.stats import DROPPED, POOLED
from crop.strategies.base import Decision, InLLMMethod, Method, PreLLMMethod, Selection, check_budget, keep_cells
from crop.strategies.context import ImageContext, StageRow
from crop.strategies.grids import select_for_layout
from crop.strategies.ilp import ILP
from crop.strategies.learned_plc import LearnedPLC
from crop.strategies.plc import PLC, chebyshev_distance


class CROP(Method):
    """Contextual region-oriented pruning: `plc` compresses outside the region (pooled `PLC` or a trained
    `LearnedPLC`), `ilp` drops it from layer K on.

    ILP at K = 0 drops the outside tokens before the LLM. With neither, nothing is pruned.
    `budget` with ILP alone keeps exactly N visual tokens: the region's cells closest to its centre, then, if the
    region has fewer than N, the outside cells nearest to it (DESIGN 1.3's budget mode). With a learned PLC alone
    it caps the compressor's output at N tokens (`LearnedPLC.part_counts`).
    """

    name = "crop"
    needs_region = True

    def __init__(self, ilp: ILP | None = None, plc: PLC | LearnedPLC | None = None, budget: int | None = None) -> None:
        ilp_alone = ilp is not None and plc is None
        learned_alone = ilp is None and isinstance(plc, LearnedPLC)
        if budget is not None and not (ilp_alone or learned_alone):
            raise ConfigError(
                "CROP's budget applies to ILP alone (ilp=..., no plc) or to a learned PLC alone "
                "(plc=LearnedPLC..., no ilp); pooling PLC has no budget"
            )
        self.ilp = ilp
        self.plc = plc
        self.budget = budget
        self.layer = ilp.layer if ilp is not None and ilp.layer > 0 else None
        if ilp is not None and ilp.layer == 0:  # dropping before the LLM leaves nothing outside to compress
            self.before: PreLLMMethod | None = RegionKeep(budget)
        elif plc is not None:
            self.before = RegionCompression(plc, budget, dropped_later=self.layer is not None)
        else:
            self.before = None
        self.inside = RegionPruning(self.layer, budget) if self.layer is not None else None

    def parts(self) -> tuple[PreLLMMethod | None, InLLMMethod | None]:
        return self.before, self.inside

    def with_position(self, position: str) -> CROP:
        renumbered = copy.copy(self)
        if self.before is not None:
            renumbered.before = self.before.with_position(position)
        return renumbered

    def validate(self, num_layers: int, grid_tokens: int | None) -> None:
        if self.ilp is not None:
            self.ilp.validate(num_layers)
        if self.budget is not None:
            check_budget(self.name, self.budget, grid_tokens)

    def describe(self) -> str:
        if self.budget is not None and self.ilp is not None:
            return f"ILP(K={self.ilp.layer}, budget {self.budget})"
        if self.budget is not None:
            return f"{self.plc.describe()}, at most {self.budget} tokens"
        parts = []
        if self.plc is not None:
            parts.append(self.plc.describe())
        if self.ilp is not None:
            parts.append(f"ILP(K={self.ilp.layer})")
        return " + ".join(parts) or "none"


class RegionCompression(PreLLMMethod):
    """CROP's pre-LLM step: PLC keeps the region fine (or compresses it with learned queries) and compresses
    the rest; `dropped_later` (ILP follows) draws the outside as dropped, since ILP removes it at K."""

    name = "crop"
    needs_region = True

    def __init__(self, plc: PLC | LearnedPLC, budget: int | None, dropped_later: bool) -> None:
        self.plc = plc
        self.budget = budget
        self.dropped_later = dropped_later
        self.position = getattr(plc, "position", "compact")
        """Learned PLC's query tokens have no cell of their own: their prompt is numbered consecutively."""

    def reduce(self, image: ImageContext) -> Selection:
        if image.layout.is_multi_grid and isinstance(self.plc, LearnedPLC):
            raise UnsupportedModelError(
                "learned PLC is trained for one token grid of a fixed size; this model's images have several grids "
                "of varying sizes (use pooling PLC or ILP)"
            )
        return image.per_grid(self._select, self.budget, name=self.plc.describe())

    def _select(
        self, features: torch.Tensor | None, shape: tuple[int, int], inside: torch.Tensor | None, budget: int | None
    ) -> Selection:
        outside = DROPPED if self.dropped_later else POOLED
        cells = torch.where(inside, self.plc.region_state, outside)
        if budget is None:
            compressed = self.plc.compress(features, inside)
        else:  # only a learned PLC takes a budget (checked by CROP)
            compressed = self.plc.compress(features, inside, budget)
        keep = compressed.inside.cpu() if self.dropped_later else torch.ones(len(compressed.inside), dtype=torch.bool)
        return Selection(compressed, keep, cells)


class RegionKeep(PreLLMMethod):
    """CROP's ILP at K = 0: the region's tokens (or the `budget` nearest its centre) go into the LLM alone."""

    name = "crop"
    needs_region = True

    def __init__(self, budget: int | None) -> None:
        self.budget = budget

    def reduce(self, image: ImageContext) -> Selection:
        if self.budget is None:
            cells = image.inside.reshape(-1).nonzero().squeeze(1)
            return keep_cells(image.features, cells, image.shape, drop_before_llm=True)
        return image.per_grid(self._select, self.budget, name="ILP(K=0)")

    def _select(
        self, features: torch.Tensor | None, shape: tuple[int, int], inside: torch.Tensor | None, budget: int | None
    ) -> Selection:
        return keep_cells(features, budget_cells(inside, budget), shape, drop_before_llm=True)


class RegionPruning(InLLMMethod):
    """CROP's ILP at K >= 1: from layer K on only the region's tokens stay (or the `budget` nearest its centre)."""

    name = "crop"
    needs_region = True

    def __init__(self, layer: int, budget: int | None) -> None:
        self.layer = layer
        self.budget = budget

    @property
    def stage_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def decide(self, stage: StageRow) -> Decision:
        if self.budget is None:
            return Decision(stage.inside)
        return Decision(region_budget_keep(stage.image, self.budget)[stage.cells])


def region_budget_keep(image: ImageContext, budget: int, inside: torch.Tensor | None = None) -> torch.Tensor:
    """Per grid token of `image`, whether CROP's budget rule keeps it (the region's mask `inside`, by default the
    image's), grid by grid on images with several grids."""
    layout = image.layout
    mask = image.inside if inside is None else inside

    def select(features: torch.Tensor | None, shape: tuple[int, int], grid_inside: torch.Tensor, n: int) -> Selection:
        return keep_cells(features, budget_cells(grid_inside, n), shape, drop_before_llm=False)

    return select_for_layout(select, layout, None, mask, budget, before_llm=False, name="ILP budget").keep


def budget_cells(inside: torch.Tensor, budget: int) -> torch.Tensor:
    """Raster indices of `budget` cells: region cells by distance to the region's centre, then outside cells by
    distance to the region (ties by distance to the centre, then raster order)."""
    rows, cols = inside.shape
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    centre_r, centre_c = r[inside].float().mean(), c[inside].float().mean()
    to_centre = ((r - centre_r) ** 2 + (c - centre_c) ** 2).sqrt()
    order = chebyshev_distance(inside).double() * (rows * cols) ** 2 + to_centre.double()
    return torch.argsort(order.reshape(-1), stable=True)[:budget]

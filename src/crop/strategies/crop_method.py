"""CROP as a method: the region guides PLC before the LLM and/or ILP inside it."""

from __future__ import annotations

import torch

from crop.errors import ConfigError
from crop.stats import DROPPED, FINE, POOLED
from crop.strategies.base import Method, Selection, check_budget, keep_cells
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
        self.position = "original" if plc is None else getattr(plc, "position", "compact")
        """Learned PLC's query tokens have no cell of their own: their prompt is numbered consecutively."""

    @property
    def acts_before_llm(self) -> bool:
        return self.plc is not None or (self.ilp is not None and self.ilp.layer == 0)

    @property
    def needs_grid(self) -> bool:
        """Budget mode ranks cells by distance to the region and PLC pools windows: both need one 2-D grid."""
        return self.budget is not None or self.plc is not None

    def validate(self, num_layers: int, grid_tokens: int | None) -> None:
        if self.ilp is not None:
            self.ilp.validate(num_layers)
        if self.budget is not None:
            check_budget(self.name, self.budget, grid_tokens)

    def select(
        self, features: torch.Tensor | None, shape: tuple[int, int], inside: torch.Tensor | None, row: int
    ) -> Selection:
        if inside is None:
            raise ConfigError("CROP needs a region")
        if self.budget is not None and self.ilp is not None:
            return keep_cells(features, budget_cells(inside, self.budget), shape, drop_before_llm=self.layer is None)
        if self.ilp is not None and self.ilp.layer == 0:
            return keep_cells(features, inside.reshape(-1).nonzero().squeeze(1), shape, True)
        outside = DROPPED if self.ilp is not None else (POOLED if self.plc is not None else FINE)
        cells = torch.where(inside, FINE if self.plc is None else self.plc.region_state, outside)
        if self.plc is not None:
            if self.budget is None:
                compressed = self.plc.compress(features, inside)
            else:  # only a learned PLC takes a budget (checked in __init__)
                compressed = self.plc.compress(features, inside, self.budget)
            keep = (
                compressed.inside.cpu()
                if self.ilp is not None
                else torch.ones(len(compressed.inside), dtype=torch.bool)
            )
            return Selection(compressed, keep, cells)
        keep = inside.reshape(-1) if self.ilp is not None else torch.ones(inside.numel(), dtype=torch.bool)
        return Selection(None, keep, cells)

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


def budget_cells(inside: torch.Tensor, budget: int) -> torch.Tensor:
    """Raster indices of `budget` cells: region cells by distance to the region's centre, then outside cells by
    distance to the region (ties by distance to the centre, then raster order)."""
    rows, cols = inside.shape
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    centre_r, centre_c = r[inside].float().mean(), c[inside].float().mean()
    to_centre = ((r - centre_r) ** 2 + (c - centre_c) ** 2).sqrt()
    order = chebyshev_distance(inside).double() * (rows * cols) ** 2 + to_centre.double()
    return torch.argsort(order.reshape(-1), stable=True)[:budget]

"""CROP as a method: the region guides PLC before the LLM and/or ILP inside it."""

from __future__ import annotations

import torch

from crop.errors import ConfigError
from crop.stats import DROPPED, FINE, POOLED
from crop.strategies.base import Method, Selection, keep_cells
from crop.strategies.ilp import ILP
from crop.strategies.plc import PLC, compress


class CROP(Method):
    """Contextual region-oriented pruning: `plc` pools outside the region, `ilp` drops it from layer K on.

    ILP at K = 0 drops the outside tokens before the LLM. With neither, nothing is pruned.
    """

    name = "crop"
    needs_region = True

    def __init__(self, ilp: ILP | None = None, plc: PLC | None = None) -> None:
        self.ilp = ilp
        self.plc = plc
        self.layer = ilp.layer if ilp is not None and ilp.layer > 0 else None
        self.position = plc.position if plc is not None else "original"

    @property
    def acts_before_llm(self) -> bool:
        return self.plc is not None or (self.ilp is not None and self.ilp.layer == 0)

    def validate(self, num_layers: int, grid_tokens: int) -> None:
        if self.ilp is not None:
            self.ilp.validate(num_layers)

    def select(
        self, features: torch.Tensor | None, shape: tuple[int, int], inside: torch.Tensor | None, row: int
    ) -> Selection:
        if inside is None:
            raise ConfigError("CROP needs a region")
        if self.ilp is not None and self.ilp.layer == 0:
            return keep_cells(features, inside.reshape(-1).nonzero().squeeze(1), shape, True)
        outside = DROPPED if self.ilp is not None else (POOLED if self.plc is not None else FINE)
        cells = torch.where(inside, FINE, outside)
        if self.plc is not None:
            compressed = compress(features, inside, self.plc)
            keep = (
                compressed.inside.cpu()
                if self.ilp is not None
                else torch.ones(len(compressed.inside), dtype=torch.bool)
            )
            return Selection(compressed, keep, cells)
        keep = inside.reshape(-1) if self.ilp is not None else torch.ones(inside.numel(), dtype=torch.bool)
        return Selection(None, keep, cells)

    def describe(self) -> str:
        parts = []
        if self.plc is not None:
            rings = f", rings {list(self.plc.rings)}" if self.plc.rings else ""
            parts.append(f"PLC({self.plc.form}, ratio {self.plc.ratio}{rings})")
        if self.ilp is not None:
            parts.append(f"ILP(K={self.ilp.layer})")
        return " + ".join(parts) or "none"

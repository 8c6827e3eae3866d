"""What one pruned call did: the region per row and the visual tokens each layer saw."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from crop.region import Region, Viewport

FINE, POOLED, DROPPED = 2, 1, 0
"""Cell states in `RowStats.cells`: kept at full resolution, merged into a pooled token, dropped."""


@dataclass
class RowStats:
    """One sample of the batch.

    `image_tokens`: visual tokens of the unpruned image; `llm_input_tokens`: after PLC;
    `per_layer`: visual tokens each decoder layer sees (ILP shortens layers >= K).
    `cells`: per token-grid cell, FINE / POOLED / DROPPED after the last reduction; `viewport` places the grid
    on the image (families with several grids per image report their highest-resolution grid).
    """

    region: Region | None
    image_tokens: int
    llm_input_tokens: int
    per_layer: list[int]
    cells: torch.Tensor
    viewport: Viewport
    stages: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    """Methods that prune in more than one stage: `(first layer of the stage, cells it keeps)` per stage, in order."""

    @property
    def kept_tokens(self) -> int:
        """Visual tokens after the last reduction (what the last layers and the KV cache keep)."""
        return self.per_layer[-1]

    @property
    def average_tokens(self) -> float:
        """Visual tokens averaged over decoder layers (the count that compares methods acting at any depth)."""
        return sum(self.per_layer) / len(self.per_layer)


@dataclass
class PruneStats:
    """Returned with every pruned call, never stored on the model."""

    rows: list[RowStats]
    method: str
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"method: {self.method}"]
        for index, row in enumerate(self.rows):
            where = row.region or "no region"
            lines.append(
                f"[{index}] {where}: visual tokens {row.image_tokens} -> LLM input {row.llm_input_tokens}"
                f" -> kept {row.kept_tokens} (average over layers {row.average_tokens:.1f})"
            )
        if self.seconds:
            lines.append("time: " + ", ".join(f"{k} {v:.3f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)

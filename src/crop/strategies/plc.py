"""PLC, pre-LLM compression (training-free `pool` form): fine inside the region, pooled outside.

Cells of the visual token grid inside the region pass through unchanged. Cells outside are average-pooled over
aligned `ratio x ratio` windows; optional rings around the region get their own (finer) ratios. Output tokens
come in raster order of each group's first member, and each takes that member's original position id
(`position="original"`) or consecutive positions (`position="compact"`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from crop.errors import ConfigError
from crop.stats import FINE


@dataclass(frozen=True)
class PLC:
    """Pooling PLC settings.

    `ratio`: window side for the background outside the region (1 keeps it fine).
    `rings`: `(width, ratio)` pairs from the region outward, e.g. `((2, 2),)` pools a 2-cell margin 2x2.
    `position`: `original` keeps each token's position id from the uncompressed grid, `compact` renumbers.
    """

    ratio: int = 4
    rings: tuple[tuple[int, int], ...] = ()
    position: Literal["original", "compact"] = "original"
    form: Literal["pool"] = "pool"

    def __post_init__(self) -> None:
        ratios = [self.ratio] + [r for _, r in self.rings]
        if not all(isinstance(r, int) and r >= 1 for r in ratios):
            raise ConfigError(f"PLC ratios must be integers >= 1 (1 = keep fine), got {ratios}")
        if not all(isinstance(w, int) and w >= 1 for w, _ in self.rings):
            raise ConfigError(f"PLC ring widths must be integers >= 1 (in token cells), got {self.rings}")
        if self.position not in ("original", "compact"):
            raise ConfigError(f"PLC position must be 'original' or 'compact', got {self.position!r}")

    region_state = FINE
    """How the region's cells are drawn: pooling keeps them fine."""

    def compress(self, features: torch.Tensor, inside: torch.Tensor) -> Compressed:
        """The interface both PLC forms share: see `compress` below."""
        return compress(features, inside, self)

    def describe(self) -> str:
        rings = f", rings {list(self.rings)}" if self.rings else ""
        return f"PLC(pool, ratio {self.ratio}{rings})"


@dataclass
class Compressed:
    """One image's compressed tokens: features, which came from inside the region, and first-member cells.

    `mixing`, where the tokens are a fixed mix of the grid's cells (pooling, selection), builds on demand the
    sparse `(tokens, cells)` matrix with `features = mix @ grid features` (see `mix`); None where they are not (a
    learned compressor, VisionZip's merged tokens).
    """

    features: torch.Tensor
    inside: torch.Tensor
    first_cell: torch.Tensor
    mixing: Callable[[], torch.Tensor] | None = None

    def mix(self) -> torch.Tensor | None:
        """The tokens' mix of the grid's cells, or None: how per-token inputs that a family adds inside the LLM
        (Qwen3-VL's DeepStack features) are compressed the same way as the tokens."""
        return self.mixing() if self.mixing is not None else None


def mix_of(tokens: torch.Tensor, cells: torch.Tensor, weights: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A sparse `(tokens, cells)` float32 mix on the CPU: token `tokens[i]` takes `weights[i]` of cell `cells[i]`."""
    indices = torch.stack([tokens.cpu().long(), cells.cpu().long()])
    return torch.sparse_coo_tensor(indices, weights.cpu().float(), shape, check_invariants=True).coalesce()


def selection_mix(cells: torch.Tensor, count: int) -> torch.Tensor:
    """The mix of tokens that are the cells `cells` of a `count`-cell grid, unchanged, in that order."""
    return mix_of(torch.arange(cells.numel()), cells, torch.ones(cells.numel()), (cells.numel(), count))


def group_cells(inside: torch.Tensor, plc: PLC) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assign each cell of a `(rows, cols)` grid to an output token.

    Returns `group` (rows*cols,) output index per cell, `first_cell` (n,) raster index of each output's first
    member, and `group_inside` (n,) whether each output is a region cell.
    """
    rows, cols = inside.shape
    distance = chebyshev_distance(inside)
    zone_ratio = torch.full((rows, cols), plc.ratio, dtype=torch.long)
    zone_id = torch.full((rows, cols), len(plc.rings) + 1, dtype=torch.long)
    outer = 0
    for ring, (width, ratio) in enumerate(plc.rings, start=1):
        in_ring = (distance > outer) & (distance <= outer + width)
        zone_ratio[in_ring] = ratio
        zone_id[in_ring] = ring
        outer += width
    zone_id[inside] = 0
    zone_ratio[inside] = 1
    r = torch.arange(rows)[:, None].expand(rows, cols)
    c = torch.arange(cols)[None, :].expand(rows, cols)
    keys = torch.stack([zone_id, r // zone_ratio, c // zone_ratio], dim=-1).view(-1, 3)
    _, group = torch.unique(keys, dim=0, return_inverse=True)
    raster = torch.arange(rows * cols)
    first = torch.full((int(group.max()) + 1,), rows * cols, dtype=torch.long).scatter_reduce(
        0, group, raster, reduce="amin"
    )
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    group = rank[group]
    first_cell = first[order]
    return group, first_cell, inside.view(-1)[first_cell]


def compress(features: torch.Tensor, inside: torch.Tensor, plc: PLC) -> Compressed:
    """Compress `(rows*cols, dim)` grid features given the region's `(rows, cols)` boolean cell mask."""
    rows, cols = inside.shape
    if features.shape[0] != rows * cols:
        raise ConfigError(f"PLC got {features.shape[0]} visual tokens for a {rows}x{cols} grid")
    group, first_cell, group_inside = group_cells(inside.cpu(), plc)
    group = group.to(features.device)
    count = first_cell.numel()
    sums = torch.zeros(count, features.shape[1], dtype=torch.float32, device=features.device)
    sums.index_add_(0, group, features.float())
    sizes = torch.bincount(group, minlength=count).to(sums.dtype)
    pooled = (sums / sizes[:, None]).to(features.dtype)
    group, sizes = group.cpu(), sizes.cpu()

    def mixing() -> torch.Tensor:
        return mix_of(group, torch.arange(rows * cols), 1 / sizes[group], (count, rows * cols))

    return Compressed(pooled, group_inside.to(features.device), first_cell.to(features.device), mixing)


def chebyshev_distance(inside: torch.Tensor) -> torch.Tensor:
    """Per cell, the chessboard distance in cells to the nearest region cell (0 inside): the number of 3x3
    dilations of the region that reach it (a chessboard ball is a square), linear in the cells per dilation
    rather than in cells x region cells."""
    rows, cols = inside.shape
    if not bool(inside.any()):
        return torch.full((rows, cols), rows + cols, dtype=torch.long)
    covered = inside.cpu().bool().clone()
    distance = torch.zeros(rows, cols, dtype=torch.long)
    reached = covered.float()[None, None]
    step = 0
    while not bool(covered.all()):
        step += 1
        reached = F.max_pool2d(reached, kernel_size=3, stride=1, padding=1)
        new = reached[0, 0].bool() & ~covered
        distance[new] = step
        covered |= new
    return distance


def splice_visual_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    pad_token_id: int,
    new_counts: Sequence[int],
    first_cells: Sequence[torch.Tensor],
    leading: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rebuild a left-padded batch whose single image per row now has `new_counts[b]` visual tokens.

    `first_cells[b]` gives, per new grid token, the original grid cell whose position id it takes;
    `leading` non-grid visual tokens (a CLS token) come first and keep theirs. Returns
    `(input_ids, attention_mask, position_ids)`, the latter numbered as in the uncompressed prompt.
    """
    rows_ids, rows_pos = [], []
    for row in range(input_ids.shape[0]):
        ids = input_ids[row][attention_mask[row].bool()]
        visual = (ids == image_token_id).nonzero().squeeze(1)
        start = int(visual[0])
        end = int(visual[-1]) + 1
        if end - start != visual.numel():
            raise ConfigError(f"row {row}: PLC needs the image's visual tokens in one contiguous run")
        original = torch.arange(ids.numel(), device=ids.device)
        image_pos = torch.cat([original[start : start + leading], start + leading + first_cells[row].to(ids.device)])
        new_ids = torch.cat([ids[:start], ids.new_full((new_counts[row] + leading,), image_token_id), ids[end:]])
        rows_ids.append(new_ids)
        rows_pos.append(torch.cat([original[:start], image_pos, original[end:]]))
    width = max(ids.numel() for ids in rows_ids)
    batch = len(rows_ids)
    out_ids = input_ids.new_full((batch, width), pad_token_id)
    out_mask = attention_mask.new_zeros((batch, width))
    out_pos = torch.zeros((batch, width), dtype=torch.long, device=input_ids.device)
    for row, (ids, pos) in enumerate(zip(rows_ids, rows_pos, strict=True)):
        out_ids[row, width - ids.numel() :] = ids
        out_mask[row, width - ids.numel() :] = 1
        out_pos[row, width - ids.numel() :] = pos
    return out_ids, out_mask, out_pos

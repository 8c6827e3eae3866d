"""Grid methods on images whose tokens form several grids (LLaVA-NeXT: a base grid, then a high-resolution one).

A method that needs one 2-D grid (pooling windows, distances to the region) runs on each grid of the image on its
own, with the grid's share of the region. A budget is shared between the grids in proportion to their cells, and
the separators (one after each row of the last grid) count against it: a separator stays when its row keeps or
yields a token, so the LLM still sees where each kept row ends.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from crop.adapter import SEPARATOR, VisualLayout
from crop.errors import ConfigError
from crop.stats import DROPPED, FINE
from crop.strategies.base import Selection
from crop.strategies.plc import Compressed, mix_of, selection_mix

GridSelect = Callable[[torch.Tensor | None, tuple[int, int], torch.Tensor | None, int | None], Selection]
"""`(features (rows*cols, dim) or None, (rows, cols), region mask (rows, cols) or None, budget or None) ->
Selection` on one 2-D grid."""


def select_for_layout(
    select: GridSelect,
    layout: VisualLayout,
    features: torch.Tensor | None,
    inside: torch.Tensor | None,
    budget: int | None,
    before_llm: bool,
    name: str = "",
) -> Selection:
    """`select` on one image: directly on a single grid, grid by grid (with each grid's share of `budget`) when
    the image has several. `before_llm`: `select` returns compressed tokens, assembled in placeholder order."""
    if not layout.is_multi_grid:
        return select(features, (layout.rows, layout.cols), inside, budget)
    return _PerGrid(select, features, layout, inside, budget, before_llm, name).select()


class _PerGrid:
    """One image's selection assembled from the method run on each of its grids."""

    def __init__(
        self,
        method: GridSelect,
        features: torch.Tensor | None,
        layout: VisualLayout,
        inside: torch.Tensor | None,
        budget: int | None,
        before_llm: bool,
        name: str,
    ) -> None:
        self.method, self.features, self.layout = method, features, layout
        self.budget, self.before_llm, self.name = budget, before_llm, name
        self.inside = None if inside is None else inside.reshape(-1)
        grid, self.cell_row, cell_col = layout.cells.unbind(-1)
        raster = self.cell_row * max(cols for _, cols in layout.grids) + cell_col
        self.positions = [_in_raster_order((grid == g).nonzero().squeeze(1), raster) for g in range(len(layout.grids))]
        self.separators = (grid == SEPARATOR).nonzero().squeeze(1)

    def select(self) -> Selection:
        if self.budget is None:
            parts = [self._run(g, None) for g in range(len(self.layout.grids))]
        else:
            parts = self._within_budget(self.budget)
        return self._assemble(parts)

    def _run(self, grid: int, budget: int | None) -> Selection | None:
        """The method on grid `grid` alone with `budget` (a budget below 1: the grid keeps nothing)."""
        if budget is not None and budget < 1:
            return None
        shape = self.layout.grids[grid]
        positions = self.positions[grid]
        inside = None if self.inside is None else self.inside[positions].view(shape)
        features = None if self.features is None else self.features[positions.to(self.features.device)]
        return self.method(features, shape, inside, budget)

    def _within_budget(self, budget: int) -> list[Selection | None]:
        """Per grid, the method with its share of `budget`: the last grid (with the separators) first, fitted so
        that its tokens and separators stay within its share; the others share the rest by their cells."""
        counts = [rows * cols for rows, cols in self.layout.grids]
        last = len(counts) - 1
        others = sum(counts[:last])
        target = max(round(budget * counts[last] / sum(counts)), budget - others)
        last_part, used = self._fit_last(min(target, counts[last] + self.separators.numel()))
        remaining = budget - used
        shares = [remaining * count // others for count in counts[:last]] if others else []
        for g in range(remaining - sum(shares) if others else 0):
            shares[g % last] += 1
        parts = [self._run(g, min(share, counts[g])) for g, share in enumerate(shares)]
        return [*parts, last_part]

    def _fit_last(self, target: int) -> tuple[Selection | None, int]:
        """The last grid's selection with the largest sub-budget whose tokens plus separators fit in `target`."""
        last = len(self.layout.grids) - 1
        sub_budget = min(target, self.positions[last].numel())
        while sub_budget >= 1:
            part = self._run(last, sub_budget)
            used = _output_count(part) + int(self._rows_used(last, part).sum())
            if used <= target:
                return part, used
            sub_budget -= used - target
        return None, 0

    def _rows_used(self, grid: int, part: Selection | None) -> torch.Tensor:
        """Per separator, whether its row of `grid` yields a token (compressed) or keeps one (in-LLM)."""
        if part is None or grid != len(self.layout.grids) - 1:
            return torch.zeros(self.separators.numel(), dtype=torch.bool)
        cols = self.layout.grids[grid][1]
        if part.compressed is not None:
            rows = part.compressed.first_cell.cpu() // cols
        else:
            rows = part.keep.nonzero().squeeze(1) // cols
        return torch.isin(self.cell_row[self.separators], rows)

    def _assemble(self, parts: list[Selection | None]) -> Selection:
        """The image's selection over its placeholders: the grids' parts at their positions, separators with
        their rows."""
        count = self.layout.num_tokens - self.layout.leading
        cells = torch.full((count,), DROPPED, dtype=torch.long)
        for positions, part in zip(self.positions, parts, strict=True):
            if part is not None:
                cells[positions] = part.cells.reshape(-1)
        last = len(parts) - 1
        used = self._rows_used(last, parts[last])
        if self.before_llm:
            return self._assemble_compressed(parts, used, cells)
        keep = torch.zeros(count, dtype=torch.bool)
        for positions, part in zip(self.positions, parts, strict=True):
            if part is not None:
                keep[positions] = part.keep
        keep[self.separators] = used
        cells[self.separators] = torch.where(used, FINE, DROPPED)
        return Selection(None, keep, cells.view(self.layout.rows, self.layout.cols))

    def _assemble_compressed(self, parts: list[Selection | None], used: torch.Tensor, cells: torch.Tensor) -> Selection:
        """Compressed tokens of every grid in placeholder order, each separator after its row's tokens; a
        separator counts as inside (and survives a later ILP) when its row has a token that does."""
        if self.features is None:
            raise ConfigError(f"{self.name} acts before the LLM and needs the image features")
        features, inside, keep, first, mixes = [], [], [], [], []
        last = len(parts) - 1
        cols = self.layout.grids[last][1]
        for positions, part in zip(self.positions, parts, strict=True):
            if part is None:
                continue
            features.append(part.compressed.features)
            inside.append(part.compressed.inside.cpu())
            keep.append(part.keep.cpu())
            first.append(positions[part.compressed.first_cell.cpu()])
            mixes.append((part.compressed.mixing, positions))
        separators = self.separators[used]
        if parts[last] is not None and separators.numel():
            rows = parts[last].compressed.first_cell.cpu() // cols
            separator_rows = self.cell_row[separators]
            separator_keep = _any_in_row(separator_rows, rows, parts[last].keep.cpu())
            features.append(self.features[separators.to(self.features.device)])
            inside.append(_any_in_row(separator_rows, rows, parts[last].compressed.inside.cpu()))
            keep.append(separator_keep)
            first.append(separators)
            mixes.append((partial(selection_mix, torch.arange(separators.numel()), separators.numel()), separators))
            cells[separators] = torch.where(separator_keep, FINE, DROPPED)
        if not features:
            raise ConfigError(f"{self.name} left no visual token for this image")
        order = torch.cat(first).argsort()
        compressed = Compressed(
            torch.cat(features)[order.to(self.features.device)], torch.cat(inside)[order], torch.cat(first)[order],
            None if any(mixing is None for mixing, _ in mixes) else partial(
                _joined_mix, mixes, order, self.layout.num_tokens - self.layout.leading
            ),
        )
        return Selection(compressed, torch.cat(keep)[order], cells.view(self.layout.rows, self.layout.cols))


def _joined_mix(
    mixes: list[tuple[Callable[[], torch.Tensor], torch.Tensor]], order: torch.Tensor, placeholders: int
) -> torch.Tensor:
    """The mix over the image's placeholders of the grids' tokens, concatenated then put in `order`: each part's
    `(builder of its mix over its grid's cells, the placeholder of each cell)`."""
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    tokens, cells, weights, offset = [], [], [], 0
    for mixing, positions in mixes:
        mix = mixing()
        token, cell = mix.indices()
        tokens.append(rank[token + offset])
        cells.append(positions[cell])
        weights.append(mix.values())
        offset += mix.shape[0]
    return mix_of(torch.cat(tokens), torch.cat(cells), torch.cat(weights), (order.numel(), placeholders))


def _in_raster_order(positions: torch.Tensor, raster: torch.Tensor) -> torch.Tensor:
    """A grid's placeholder `positions` sorted by their cells' raster index (placeholders may hold a grid in
    another order: InternVL's tiles, each in raster order)."""
    return positions[raster[positions].argsort(stable=True)]


def _output_count(part: Selection | None) -> int:
    if part is None:
        return 0
    return part.compressed.features.shape[0] if part.compressed is not None else int(part.keep.sum())


def _any_in_row(separator_rows: torch.Tensor, token_rows: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Per separator row, whether a token of that row has its flag set."""
    return torch.isin(separator_rows, token_rows[flags.bool()])


"""How a method's two parts act on one call: the pre-LLM step replaces each image's grid tokens, each in-LLM
stage turns the method's per-row decisions into a `KeepPlan` at prefill, and the stats record what happened."""

from __future__ import annotations

from typing import Any

import torch

from crop.adapter import grid_cell_index
from crop.errors import UnsupportedModelError
from crop.region import Region
from crop.stats import DROPPED, FINE, PruneStats, RowStats
from crop.strategies.base import InLLMMethod, PreLLMMethod, Selection
from crop.strategies.context import CallContext, StageContext, StageRow
from crop.strategies.ilp import KeepPlan, Layout, PlanBuilder
from crop.strategies.plc import Compressed, splice_visual_tokens


def before_llm(call: CallContext, method: PreLLMMethod) -> tuple[dict[str, Any], list[Selection]]:
    """The model's inputs with each row's grid tokens replaced by what `method.reduce` returns, and the
    selections. Leading tokens (a CLS token in the grid's place) stay first."""
    selections = [method.reduce(call.image(row)) for row in range(call.batch)]
    adapter, inputs = call.adapter, call.inputs
    leading = call.layouts[0].leading
    compressed = [selection.compressed for selection in selections]
    input_ids, attention_mask, position_ids = splice_visual_tokens(
        inputs["input_ids"],
        inputs["attention_mask"],
        adapter.image_token_id,
        adapter.pad_token_id,
        [c.features.shape[0] for c in compressed],
        [c.first_cell for c in compressed],
        leading,
    )
    features = [
        torch.cat([call.features(row)[:leading], c.features]) if leading else c.features
        for row, c in enumerate(compressed)
    ]
    original = {key: value for key, value in inputs.items() if key != "pixel_values"}
    spliced = {**original, "input_ids": input_ids, "attention_mask": attention_mask,
               "inputs_embeds": adapter.embed(input_ids, features)}  # fmt: skip
    side = compressed_side_features(call, method, compressed)
    return adapter.spliced_inputs(original, spliced, position_ids, method.position, side), selections


def compressed_side_features(
    call: CallContext, method: PreLLMMethod, compressed: list[Compressed]
) -> list[torch.Tensor] | None:
    """Each row's side features (see `ModelAdapter.encode_images`) mixed as its tokens were, leading tokens'
    first; None for families without them. A method whose tokens are no fixed mix of the cells is refused."""
    if call.side_features(0) is None:
        return None
    leading = call.layouts[0].leading
    mixed = []
    for row, tokens in enumerate(compressed):
        mix = tokens.mix()
        if mix is None:
            raise UnsupportedModelError(
                f"{method.describe()} on {call.adapter.family}: its tokens are not a fixed mix of the grid's cells, "
                "so the per-token features this family adds inside the LLM cannot be compressed with them; use "
                "pooling, PLC, random, divprune or an in-LLM method"
            )
        side = call.side_features(row)
        grid = side[leading:]
        new = (mix.to(grid.device) @ grid.flatten(1).float()).view(-1, *grid.shape[1:]).to(grid.dtype)
        mixed.append(torch.cat([side[:leading], new]) if leading else new)
    return mixed


def stage_builders(
    call: CallContext,
    method: InLLMMethod,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    selections: list[Selection] | None,
    found: dict[int, Region],
) -> list[PlanBuilder]:
    """One plan builder per stage of `method`: at prefill, each row's grid tokens that reached the stage are
    handed to `method.decide`; text, leading tokens and pads are never its to drop. Regions the method finds are
    recorded in `found` (by row)."""
    leading = [layout.leading for layout in call.layouts]
    cell_of = grid_cell_index(input_ids, attention_mask, call.adapter.image_token_id, leading)

    def builder(stage: int, layer: int) -> PlanBuilder:
        def build(
            hidden: torch.Tensor,
            kwargs: dict[str, Any],
            current: Layout,
            stage_hidden: torch.Tensor,
            embeddings: torch.Tensor | None,
        ) -> KeepPlan:
            context = StageContext(
                call, stage, layer, (hidden, kwargs), stage_hidden, current.index, cell_of, attention_mask,
                selections, lambda: embeddings,
            )  # fmt: skip
            repeat = context.repeat
            real = attention_mask.bool().repeat_interleave(repeat, 0).gather(1, current.index)
            keep = current.valid & real
            tokens = cell_of.repeat_interleave(repeat, 0).gather(1, current.index).masked_fill(~keep, -1)
            merges, centres = [], []
            for row in range(call.batch):
                first = row * repeat
                positions = (tokens[first] >= 0).nonzero().squeeze(1)
                decision = method.decide(StageRow(context, row, positions, tokens[first, positions]))
                if decision.region is not None:
                    found[row] = decision.region
                chosen = decision.keep.to(positions.device)
                keep[first : first + repeat, positions[~chosen]] = False
                centres.append([int(positions[group[0]]) for group in decision.merges])
                for group, centre in zip(decision.merges, centres[-1], strict=True):
                    members = positions[group.to(positions.device)]
                    keep[first : first + repeat, centre] = True
                    merges += [(first + r, centre, members) for r in range(repeat)]
            if method.merged == "after":
                order = [_merged_after(keep[row], centres[row // repeat], tokens[row]) for row in range(keep.shape[0])]
                return KeepPlan.from_keep(keep, merges, order)
            return KeepPlan.from_keep(keep, merges)

        return build

    return [builder(stage, layer) for stage, layer in enumerate(method.stage_layers)]


def _merged_after(keep: torch.Tensor, centres: list[int], tokens: torch.Tensor) -> torch.Tensor:
    """One row's kept positions with its merged tokens (at `centres`, in that order) moved to right after the row's
    last visual token, as SparseVLM's authors place them; `tokens` is -1 at positions that are not visual."""
    kept = keep.nonzero().squeeze(1)
    merged = torch.tensor(centres, dtype=torch.long, device=kept.device)
    rest = kept[~torch.isin(kept, merged)]
    visual = (tokens >= 0).nonzero().squeeze(1)
    end = int(visual.max()) if visual.numel() else -1
    return torch.cat([rest[rest <= end], merged, rest[rest > end]])


def call_stats(
    call: CallContext,
    description: str,
    num_layers: int,
    stage_layers: tuple[int, ...],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    selections: list[Selection] | None,
    layouts: list[Layout],
    found: dict[int, Region],
) -> PruneStats:
    """Per row: visual tokens into the LLM and at every layer (from the stages' layouts), and the final cell
    states: the pre-LLM step's when there is one (it draws what a later in-LLM part of the same method drops),
    else those the last stage kept; methods with several stages also get each stage's cells."""
    adapter = call.adapter
    is_visual = (input_ids == adapter.image_token_id) & attention_mask.bool()
    cell_of = grid_cell_index(input_ids, attention_mask, adapter.image_token_id, [v.leading for v in call.layouts])
    repeat = layouts[0].index.shape[0] // is_visual.shape[0] if layouts else 1
    rows = []
    for b, layout in enumerate(call.layouts):
        counts = [int(is_visual[b].sum())]
        for stage_layout in layouts[1:]:
            counts.append(int((is_visual[b][stage_layout.index[b * repeat]] & stage_layout.valid[b * repeat]).sum()))
        per_layer = [counts[sum(start <= i for start in stage_layers[: len(counts) - 1])] for i in range(num_layers)]
        shape = (layout.rows, layout.cols)
        stages = []
        for start, stage_layout in zip(stage_layers, layouts[1:] if selections is None else [], strict=False):
            kept = cell_of[b][stage_layout.index[b * repeat][stage_layout.valid[b * repeat]]]
            stage_cells = torch.full((shape[0] * shape[1],), DROPPED, dtype=torch.long)
            stage_cells[kept[kept >= 0].cpu()] = FINE
            stages.append((start, stage_cells.view(shape)))
        if selections is not None:
            cells = selections[b].cells
        elif stages:
            cells = stages[-1][1]
        else:
            cells = torch.full(shape, FINE, dtype=torch.long)
        viewport = call.viewports[b]
        drawn_stages = [(start, layout.drawn_grid(states, viewport)[0]) for start, states in stages]
        cells, drawn_viewport = layout.drawn_grid(cells, viewport)
        region = found.get(b, call.regions[b])
        rows.append(
            RowStats(
                region, layout.num_tokens, counts[0], per_layer, cells, drawn_viewport,
                drawn_stages if len(stages) > 1 else [],
            )
        )  # fmt: skip
    return PruneStats(rows=rows, method=description)

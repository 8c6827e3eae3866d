"""`crop.apply`: one call that makes a Hugging Face VLM answer with a fraction of its visual tokens."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from crop.adapter import VisualLayout, adapter_for, grid_cell_index, pool_rows, question_weights
from crop.errors import ConfigError, UnsupportedModelError
from crop.image import load_image
from crop.localize import FixedLocalizer, Localizer
from crop.prompting import build_prompt
from crop.region import Region, Viewport
from crop.stats import DROPPED, FINE, PruneStats, RowStats
from crop.strategies.base import Method, Selection
from crop.strategies.crop_method import CROP
from crop.strategies.grids import select_for_layout
from crop.strategies.ilp import ILP, ILPHooks, KeepPlan, Layout, PlanBuilder
from crop.strategies.plc import PLC, splice_visual_tokens

RegionLike = Region | Sequence[int]


@dataclass
class Answer:
    """A decoded answer with the stats of the call that produced it."""

    text: str
    stats: PruneStats


class CropModel:
    """A VLM with a pruning method attached: `generate` and `__call__` prune; the model itself is left as it was.

    Hooks are registered on this model instance only and act only during calls made through this object;
    `remove()` takes them off.
    """

    def __init__(
        self,
        model: Any,
        processor: Any = None,
        localizer: Localizer | None = None,
        method: Method | None = None,
        prompt_template: str | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.localizer = localizer
        self.method = method if method is not None else CROP(ILP())
        self.prompt_template = prompt_template
        self.adapter = adapter_for(model)
        layers = self.adapter.decoder_layers()
        layout = self.adapter.visual_layout()
        self.method.validate(len(layers), None if layout is None else layout.rows * layout.cols)
        self._hooks = None
        if self.method.stage_layers:
            self._hooks = ILPHooks(layers, self.method.stage_layers, observe=self.method.dynamic)

    def remove(self) -> None:
        """Take the hooks off the model; it behaves exactly as before `apply`."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    def prepare(
        self,
        images: Image.Image | str | Path | Sequence[Image.Image | str | Path],
        questions: str | Sequence[str],
        regions: RegionLike | Sequence[RegionLike] | None = None,
    ) -> dict[str, Any]:
        """Processor inputs for (image, question) pairs, plus the regions (run through the localizer if not given).

        The result goes straight into `generate(**inputs)` or `self(**inputs)`.
        """
        if self.processor is None:
            raise ConfigError("prepare() needs the processor: crop.apply(model, processor, ...)")
        image_list = [images] if isinstance(images, Image.Image | str | Path) else list(images)
        question_list = [questions] if isinstance(questions, str) else list(questions)
        if len(image_list) != len(question_list):
            raise ConfigError(f"got {len(image_list)} images and {len(question_list)} questions; pass one per image")
        loaded = [load_image(image) for image in image_list]
        start = time.perf_counter()
        if regions is not None:
            region_list = _region_list(regions, len(loaded))
        elif self.localizer is not None:
            region_list = [self.localizer.localize(img, q) for img, q in zip(loaded, question_list, strict=True)]
        elif self.method.needs_region:
            raise ConfigError("no region: pass regions=... or give crop.apply a localizer")
        else:
            region_list = None
        localize_seconds = time.perf_counter() - start
        prompts = [build_prompt(self.processor, q, self.prompt_template) for q in question_list]
        inputs = dict(
            self.processor(images=loaded, text=prompts, return_tensors="pt", padding=True, padding_side="left")
        )
        inputs["regions"] = region_list
        inputs["viewports"] = [self.adapter.viewport(self.processor, img.size) for img in loaded]
        inputs["localize_seconds"] = localize_seconds
        return inputs

    def ask(
        self,
        image: Image.Image | str | Path,
        question: str,
        region: RegionLike | None = None,
        max_new_tokens: int = 32,
    ) -> Answer:
        """Answer one question about one image, greedily; the region comes from the localizer unless given."""
        inputs = self.prepare(image, question, None if region is None else [region])
        prompt_length = inputs["input_ids"].shape[1]
        sequences, stats = self.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        text = self.processor.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)[0]
        return Answer(text.strip(), stats)

    def generate(self, **inputs: Any) -> tuple[torch.Tensor, PruneStats]:
        """`model.generate` with pruning; returns `(sequences, stats)`, sequences starting with the given prompt.

        Accepts the processor's tensors plus `regions` (one per row, or from a `FixedLocalizer`) and optional
        `viewports`, and any generation argument. Greedy decoding, sampling and beam search are supported with
        the dynamic KV cache.
        """
        if inputs.get("cache_implementation") not in (None, "dynamic"):
            raise UnsupportedModelError("ILP needs the dynamic KV cache (its pruned layers hold fewer tokens)")
        prompt_ids = inputs["input_ids"]
        start = time.perf_counter()
        output, stats, model_prompt_length = self._run(self.model.generate, inputs, generating=True)
        stats.seconds["generate"] = time.perf_counter() - start
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        return torch.cat([prompt_ids, sequences[:, model_prompt_length:]], dim=1), stats

    def __call__(self, **inputs: Any) -> tuple[Any, PruneStats]:
        """A forward pass with pruning: `(model output, stats)`.

        With ILP the output covers only the positions layers >= K kept (left-padded per row): logits of the
        last position are those of the last prompt token.
        """
        start = time.perf_counter()
        output, stats, _ = self._run(self.model, inputs, generating=False)
        stats.seconds["forward"] = time.perf_counter() - start
        return output, stats

    @torch.inference_mode()
    def _run(self, call: Callable[..., Any], inputs: dict[str, Any], generating: bool) -> tuple[Any, PruneStats, int]:
        inputs, regions, viewports, visual = self._checked(inputs)
        localize_seconds = inputs.pop("localize_seconds", None)
        leading = [v.leading for v in visual]
        inputs, selections = self._before_llm(inputs, regions, viewports, visual)
        model_input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        if "inputs_embeds" in inputs and not generating:
            del inputs["input_ids"]  # a forward takes ids or embeddings; generate takes both (ids for the output)
        layouts: list[Layout] = []
        found: dict[int, Region] = {}
        cell_of = grid_cell_index(model_input_ids, attention_mask, self.adapter.image_token_id, leading)
        if self._hooks is None:
            output = call(**inputs)
        else:
            if self.method.dynamic:
                plans = [
                    self._plan_builder(stage, model_input_ids, attention_mask, cell_of, visual, viewports, found)
                    for stage in range(len(self.method.stage_layers))
                ]
            else:
                plans = [self._plan(model_input_ids, attention_mask, _keep_visual(selections, leading))]
            with self._hooks.active(plans) as hooks:
                output = call(**inputs)
                layouts = hooks.layouts
        regions = [found.get(b, region) for b, region in enumerate(regions)]
        is_visual = (model_input_ids == self.adapter.image_token_id) & attention_mask.bool()
        stats = self._stats(regions, viewports, selections, is_visual, cell_of, layouts, visual)
        if localize_seconds is not None:
            stats.seconds["localize"] = localize_seconds
        return output, stats, model_input_ids.shape[1]

    def _plan_builder(
        self,
        stage: int,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cell_of: torch.Tensor,
        visual: list[VisualLayout],
        viewports: list[Viewport],
        found: dict[int, Region],
    ) -> PlanBuilder:
        """For dynamic methods: at prefill, rank each row's remaining grid tokens by the attention its query rows
        (the last token, or the method's text raters) pay them in the layer before the stage, keep what the
        method chooses and merge what it recycles (text and other tokens stay). Methods that locate the region
        themselves record it in `found` (by row)."""
        layer = self.adapter.decoder_layers()[self.method.stage_layers[stage] - 1]

        def build(
            hidden: torch.Tensor, kwargs: dict[str, Any], current: Layout, stage_hidden: torch.Tensor
        ) -> KeepPlan:
            repeat = hidden.shape[0] // input_ids.shape[0]
            if self.method.queries in ("raters", "question"):
                weights = self._rater_weights(cell_of) if self.method.queries == "raters" else question_weights(cell_of)
                weights = weights.repeat_interleave(repeat, 0)
                attention = pool_rows(self.adapter.query_attention(layer, hidden, kwargs, weights.shape[1]), weights)
            else:
                if self.method.locates:
                    question_weights(cell_of)  # refuses prompts with no text after the image, as two-pass does
                attention = self.adapter.query_attention(layer, hidden, kwargs)[:, :, 0]
            real = attention_mask.bool().repeat_interleave(repeat, 0).gather(1, current.index)
            keep = current.valid & real
            cells = cell_of.repeat_interleave(repeat, 0).gather(1, current.index).masked_fill(~keep, -1)
            merges = []
            for row in range(0, attention.shape[0], repeat):
                grid = (cells[row] >= 0).nonzero().squeeze(1)
                layout = visual[row // repeat]
                if self.method.locates:
                    region, chosen = self.method.locate(
                        attention[row][:, grid], cells[row, grid], layout, viewports[row // repeat]
                    )
                    found[row // repeat] = region
                else:
                    shape = (layout.rows, layout.cols)
                    chosen = self.method.rank(stage, attention[row][:, grid], cells[row, grid], shape)
                chosen = chosen.to(grid.device)
                groups = self.method.recycle(stage, attention[row][:, grid], chosen, stage_hidden[row, grid])
                keep[row : row + repeat, grid[~chosen]] = False
                for group in groups:
                    centre, members = int(grid[group[0]]), grid[group.to(grid.device)]
                    keep[row : row + repeat, centre] = True
                    merges += [(row + r, centre, members) for r in range(repeat)]
            return KeepPlan.from_keep(keep, merges)

        return build

    def _rater_weights(self, cell_of: torch.Tensor) -> torch.Tensor:
        """`question_weights` restricted to the text raters the method picks from each row's prompt embeddings
        (grid tokens against the text after the image)."""
        weights = question_weights(cell_of)
        embeddings = self._hooks.embeddings
        repeat = embeddings.shape[0] // cell_of.shape[0]
        for row in range(cell_of.shape[0]):
            text = int(weights[row].sum())
            grid = (cell_of[row] >= 0).nonzero().squeeze(1)
            chosen = self.method.raters(embeddings[row * repeat, grid], embeddings[row * repeat, -text:])
            weights[row, -text:] = chosen.to(weights.dtype)
        return weights.to(embeddings.device)

    def _stats(
        self,
        regions: list[Region | None],
        viewports: list[Viewport],
        selections: list[Selection],
        is_visual: torch.Tensor,
        cell_of: torch.Tensor,
        layouts: list[Layout],
        visual: list[VisualLayout],
    ) -> PruneStats:
        """Per row: visual tokens into the LLM and at every layer (from the stages' layouts), final cell states."""
        num_layers = len(self.adapter.decoder_layers())
        starts = list(self.method.stage_layers)
        repeat = layouts[0].index.shape[0] // is_visual.shape[0] if layouts else 1
        rows = []
        for b, (region, viewport, selection) in enumerate(zip(regions, viewports, selections, strict=True)):
            counts = [int(is_visual[b].sum())]
            for layout in layouts[1:]:
                row = b * repeat
                counts.append(int((is_visual[b][layout.index[row]] & layout.valid[row]).sum()))
            per_layer = [counts[sum(start <= i for start in starts[: len(counts) - 1])] for i in range(num_layers)]
            cells, stages = selection.cells, []
            shape = (visual[b].rows, visual[b].cols)
            if self.method.dynamic and layouts:
                for start, layout in zip(starts, layouts[1:], strict=False):
                    kept = cell_of[b][layout.index[b * repeat][layout.valid[b * repeat]]]
                    stage_cells = torch.full((shape[0] * shape[1],), DROPPED, dtype=torch.long)
                    stage_cells[kept[kept >= 0]] = FINE
                    stages.append((start, stage_cells.view(shape)))
                cells = stages[-1][1]
            drawn_stages = [(start, visual[b].drawn_grid(states, viewport)[0]) for start, states in stages]
            cells, drawn_viewport = visual[b].drawn_grid(cells, viewport)
            rows.append(
                RowStats(region, visual[b].num_tokens, counts[0], per_layer, cells, drawn_viewport, drawn_stages)
            )
        return PruneStats(rows=rows, method=self.method.describe())

    def _resolve_regions(self, regions: Any, batch: int) -> list[Region | None]:
        if regions is not None:
            return _region_list(regions, batch)
        if isinstance(self.localizer, FixedLocalizer):
            return [self.localizer.region] * batch
        if not self.method.needs_region:
            return [None] * batch
        raise ConfigError(
            "no region for this call: pass regions=[...] (one per row), use prepare()/ask() so that the "
            "localizer sees the image and question, or apply a FixedLocalizer"
        )

    def _check_visual_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, expected: list[int]) -> None:
        counts = ((input_ids == self.adapter.image_token_id) & attention_mask.bool()).sum(dim=1).tolist()
        for row, (count, wanted) in enumerate(zip(counts, expected, strict=True)):
            if count != wanted:
                raise ConfigError(
                    f"row {row} has {count} image tokens; crop supports exactly one image per prompt "
                    f"({wanted} visual tokens for this row's image)"
                )

    def compressed_inputs(self, **inputs: Any) -> dict[str, Any]:
        """The model's inputs after the method's pre-LLM step (PLC, or drops at K = 0), with gradients: to train a
        compressor or fine-tune the VLM on compressed inputs (`crop train plc`). `inputs` as for `__call__`,
        regions given; the result goes into `model(**result)` and keeps the spliced `input_ids` (left-padded: the
        prompt's last tokens stay last). Methods that act inside the LLM have nothing to return here."""
        if self.method.stage_layers or not self.method.acts_before_llm:
            raise ConfigError(f"{self.method.describe()} does not act (only) before the LLM; nothing to compress")
        inputs, regions, viewports, visual = self._checked(inputs)
        inputs.pop("localize_seconds", None)
        inputs, _ = self._before_llm(inputs, regions, viewports, visual)
        return inputs

    def _checked(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], list[Region | None], list[Viewport], list]:
        """`(model inputs, regions, viewports, visual layouts)` of a call, after checking that every row holds one
        image and that the method fits the model and its grids."""
        inputs = dict(inputs)
        regions_given = inputs.pop("regions", None)
        viewports = inputs.pop("viewports", None)
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise ConfigError("crop needs input_ids (the processor's output), not inputs_embeds")
        batch = input_ids.shape[0]
        if inputs.get("attention_mask") is None:
            inputs["attention_mask"] = torch.ones_like(input_ids)
        regions = self._resolve_regions(regions_given, batch)
        viewports = list(viewports) if viewports is not None else [Viewport()] * batch
        visual = self.adapter.visual_layouts(inputs)
        self._check_visual_tokens(input_ids, inputs["attention_mask"], [v.num_tokens for v in visual])
        num_layers = len(self.adapter.decoder_layers())
        for grid_tokens in sorted({v.rows * v.cols for v in visual}):
            self.method.validate(num_layers, grid_tokens)
        return inputs, regions, viewports, visual

    def _before_llm(
        self, inputs: dict[str, Any], regions: list[Region | None], viewports: list[Viewport], visual: list[Any]
    ) -> tuple[dict[str, Any], list[Selection]]:
        """Each row's selection (from its region's cells) and, for methods acting before the LLM, the inputs with
        the grid tokens replaced by the selected or compressed ones."""
        cell_masks = [
            None if region is None else layout.region_mask(region, viewport)
            for region, viewport, layout in zip(regions, viewports, visual, strict=True)
        ]
        encoded: list[Any] = [None] * len(cell_masks)
        leading = visual[0].leading
        if self.method.acts_before_llm:
            if inputs.get("pixel_values") is None:
                raise ConfigError(f"{self.method.describe()} acts before the LLM and needs pixel_values")
            leading_features, encoded = self.method.encode(self.adapter, inputs, leading)
            del inputs["pixel_values"]
        selections = [
            select_for_layout(self.method, encoded[b], visual[b], mask, b) for b, mask in enumerate(cell_masks)
        ]
        if self.method.acts_before_llm:
            inputs = self._splice(inputs, leading_features, selections, leading)
        return inputs, selections

    def _splice(
        self, inputs: dict[str, Any], leading_features: torch.Tensor, selections: list[Selection], leading: int
    ) -> dict[str, Any]:
        """Replace each row's grid tokens by its selection's compressed tokens before the LLM."""
        compressed = [selection.compressed for selection in selections]
        input_ids, attention_mask, position_ids = splice_visual_tokens(
            inputs["input_ids"],
            inputs["attention_mask"],
            self.adapter.image_token_id,
            self.adapter.pad_token_id,
            [c.features.shape[0] for c in compressed],
            [c.first_cell for c in compressed],
            leading,
        )
        row_features = [torch.cat([leading_features[b], c.features]) for b, c in enumerate(compressed)]
        spliced = dict(inputs)
        spliced.update(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=self.adapter.embed(input_ids, row_features),
        )
        return self.adapter.spliced_inputs(inputs, spliced, position_ids, self.method.position)

    def _plan(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_visual: list[torch.Tensor]) -> KeepPlan:
        keep = attention_mask.bool().clone()
        visual = (input_ids == self.adapter.image_token_id) & keep
        for row, flags in enumerate(keep_visual):
            positions = visual[row].nonzero().squeeze(1)
            keep[row, positions[~flags.to(positions.device)]] = False
        return KeepPlan.from_keep(keep)


def apply(
    model: Any,
    processor: Any = None,
    localizer: Localizer | None = None,
    ilp: ILP | int | None = 2,
    plc: PLC | int | None = None,
    method: Method | str | None = None,
    budget: int | None = None,
    prompt_template: str | None = None,
) -> CropModel:
    """Attach a pruning method to `model` (one instance, reversibly) and return the pruning wrapper.

    By default the method is CROP: `ilp` is an `ILP` or its layer K (default 2; None disables it), `plc` a `PLC`
    or its pooling ratio (None, the default, disables it). `method` replaces CROP by any other `Method`, or names
    one (`crop methods`: "fastv", "pyramiddrop", "sparsevlm", "visionzip", "random", "pool", "crop") kept at
    `budget` tokens.
    `localizer` finds the region for `prepare`/`ask`; regions can also be passed per call.
    """
    if isinstance(method, str):
        from crop.strategies.registry import build_method

        layer = ilp.layer if isinstance(ilp, ILP) else (2 if ilp is None else ilp)
        method = build_method(method, budget=budget, layer=layer)
    if method is None:
        ilp_config = ILP(layer=ilp) if isinstance(ilp, int) and not isinstance(ilp, bool) else ilp
        plc_config = PLC(ratio=plc) if isinstance(plc, int) and not isinstance(plc, bool) else plc
        method = CROP(ilp_config, plc_config)
    return CropModel(model, processor, localizer, method, prompt_template)


def remove(crop_model: CropModel) -> Any:
    """Undo `apply`: take the hooks off and return the original model."""
    crop_model.remove()
    return crop_model.model


def _keep_visual(selections: list[Selection], leading: list[int]) -> list[torch.Tensor]:
    """Per row, whether each visual token of the LLM input survives the in-LLM layer (leading tokens always)."""
    return [
        torch.cat([torch.ones(count, dtype=torch.bool), selection.keep])
        for selection, count in zip(selections, leading, strict=True)
    ]


def _region_list(regions: Any, batch: int) -> list[Region]:
    if isinstance(regions, Region) or (
        isinstance(regions, Sequence) and len(regions) == 4 and all(isinstance(v, int) for v in regions)
    ):
        regions = [regions] * batch
    region_list = [r if isinstance(r, Region) else Region.from_grid(r) for r in regions]
    if len(region_list) != batch:
        raise ConfigError(f"got {len(region_list)} regions for a batch of {batch}; pass one per row")
    return region_list

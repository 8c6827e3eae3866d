"""`crop.apply`: one call that makes a Hugging Face VLM answer with a fraction of its visual tokens."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from crop.adapter import adapter_for
from crop.errors import ConfigError, UnsupportedModelError
from crop.image import load_image
from crop.localize import FixedLocalizer, Localizer
from crop.prompting import build_prompt
from crop.region import Region, Viewport
from crop.request import RegionLike, Request, normalized_regions
from crop.stats import PruneStats
from crop.strategies.base import Method
from crop.strategies.context import CallContext
from crop.strategies.crop_method import CROP
from crop.strategies.engine import before_llm, call_stats, stage_builders
from crop.strategies.ilp import ILP, ILPHooks
from crop.strategies.plc import PLC


@dataclass
class Answer:
    """A decoded answer with the stats of the call that produced it."""

    text: str
    stats: PruneStats


class CropModel:
    """A VLM with a pruning method attached: `generate` and `__call__` prune; the model itself is left as it was.

    Hooks are registered on this model instance only and act only during calls made through this object;
    `remove()` takes them off. `method` is the attached method, bound to this model (its model-dependent defaults
    resolved; the object given to `apply` is not changed).
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
        self.prompt_template = prompt_template
        self.adapter = adapter_for(model)
        layers = self.adapter.decoder_layers()
        self.method = (method if method is not None else CROP(ILP())).bind(len(layers))
        layout = self.adapter.visual_layout()
        self.method.validate(len(layers), None if layout is None else layout.rows * layout.cols)
        self.before, self.inside = self.method.parts()
        self._hooks = None
        self._family_hooks: list[Any] = []
        if self.inside is not None:
            rotary = self.adapter.renumbering_rotary() if self.inside.positions == "compact" else None
            self._hooks = ILPHooks(layers, self.inside.stage_layers, rotary, self.adapter.layer_attention())
            self._family_hooks = self.adapter.pruning_hooks(self._hooks)

    def remove(self) -> None:
        """Take the hooks off the model; it behaves exactly as before `apply`."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        for handle in self._family_hooks:
            handle.remove()
        self._family_hooks = []

    def viewport(self, image: Image.Image) -> Viewport:
        """Where `image` lands on the token grid after this model's processor (pass one per row with regions
        given to `generate`/`__call__` for processors that crop or pad)."""
        return self.adapter.viewport(self.processor, image.size)

    def prepare(
        self,
        images: Image.Image | str | Path | Sequence[Image.Image | str | Path],
        questions: str | Sequence[str],
        regions: RegionLike | Sequence[RegionLike] | None = None,
    ) -> Request:
        """The request for (image, question) pairs: processor inputs, each image's viewport and region (run
        through the localizer if not given). It goes straight into `generate(request)` or `self(request)`."""
        if self.processor is None:
            raise ConfigError("prepare() needs the processor: crop.apply(model, processor, ...)")
        image_list = [images] if isinstance(images, Image.Image | str | Path) else list(images)
        question_list = [questions] if isinstance(questions, str) else list(questions)
        if len(image_list) != len(question_list):
            raise ConfigError(f"got {len(image_list)} images and {len(question_list)} questions; pass one per image")
        loaded = [load_image(image) for image in image_list]
        start = time.perf_counter()
        if regions is not None:
            region_list = normalized_regions(regions, len(loaded))
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
        viewports = [self.viewport(img) for img in loaded]
        return Request(inputs, region_list, viewports, localize_seconds, question_list)

    def ask(
        self,
        image: Image.Image | str | Path,
        question: str,
        region: RegionLike | None = None,
        max_new_tokens: int = 32,
    ) -> Answer:
        """Answer one question about one image, greedily; the region comes from the localizer unless given."""
        request = self.prepare(image, question, None if region is None else [region])
        prompt_length = request["input_ids"].shape[1]
        sequences, stats = self.generate(request, max_new_tokens=max_new_tokens, do_sample=False)
        text = self.processor.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)[0]
        return Answer(text.strip(), stats)

    def generate(self, request: Request | None = None, /, **inputs: Any) -> tuple[torch.Tensor, PruneStats]:
        """`model.generate` with pruning; returns `(sequences, stats)`, sequences starting with the given prompt.

        Takes a `Request` from `prepare()` plus generation arguments, or the processor's tensors as keywords
        with `regions` (one per row, or from a `FixedLocalizer`) and `viewports` (one per row; needed with
        regions when the processor crops or pads). Greedy decoding, sampling and beam search are supported with
        the dynamic KV cache.
        """
        request = Request.of(request, inputs)
        if request.inputs.get("cache_implementation") not in (None, "dynamic"):
            raise UnsupportedModelError("ILP needs the dynamic KV cache (its pruned layers hold fewer tokens)")
        prompt_ids = request.inputs["input_ids"]
        start = time.perf_counter()
        output, stats, model_prompt_length = self._run(self.model.generate, request, generating=True)
        stats.seconds["generate"] = time.perf_counter() - start
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        return torch.cat([prompt_ids, sequences[:, model_prompt_length:]], dim=1), stats

    def __call__(self, request: Request | None = None, /, **inputs: Any) -> tuple[Any, PruneStats]:
        """A forward pass with pruning: `(model output, stats)`; arguments as for `generate`.

        With ILP the output covers only the positions layers >= K kept (left-padded per row): logits of the
        last position are those of the last prompt token.
        """
        start = time.perf_counter()
        output, stats, _ = self._run(self.model, Request.of(request, inputs), generating=False)
        stats.seconds["forward"] = time.perf_counter() - start
        return output, stats

    def compressed_inputs(self, request: Request | None = None, /, **inputs: Any) -> dict[str, Any]:
        """The model's inputs after the method's pre-LLM step (PLC, or drops at K = 0), with gradients: to train a
        compressor or fine-tune the VLM on compressed inputs (`crop train plc`). Arguments as for `__call__`,
        regions given; the result goes into `model(**result)` and keeps the spliced `input_ids` (left-padded: the
        prompt's last tokens stay last). Methods that act inside the LLM have nothing to return here."""
        if self.inside is not None or self.before is None:
            raise ConfigError(f"{self.method.describe()} does not act (only) before the LLM; nothing to compress")
        call = self._call_context(Request.of(request, inputs))
        return before_llm(call, self.before)[0]

    @torch.inference_mode()
    def _run(self, run: Callable[..., Any], request: Request, generating: bool) -> tuple[Any, PruneStats, int]:
        call = self._call_context(request)
        inputs, selections = call.inputs, None
        if self.before is not None:
            inputs, selections = before_llm(call, self.before)
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        left_out = set(self.adapter.crop_only_inputs)
        if "inputs_embeds" in inputs and not generating:
            left_out.add("input_ids")  # ids or embeddings
        inputs = {key: value for key, value in inputs.items() if key not in left_out}
        found: dict[int, Region] = {}
        layouts = []
        if self._hooks is None:
            output = run(**inputs)
        else:
            plans = stage_builders(call, self.inside, input_ids, attention_mask, selections, found)
            with self._hooks.active(plans, self.adapter.attention_blocks(inputs)) as pruned_call:
                output = run(**inputs)
                layouts = pruned_call.layouts
        stage_layers = self.inside.stage_layers if self.inside is not None else ()
        num_layers = len(self.adapter.decoder_layers())
        stats = call_stats(
            call, self.method.describe(), num_layers, stage_layers, input_ids, attention_mask, selections, layouts,
            found,
        )  # fmt: skip
        if request.localize_seconds is not None:
            stats.seconds["localize"] = request.localize_seconds
        return output, stats, input_ids.shape[1]

    def _call_context(self, request: Request) -> CallContext:
        """The call's context after checking that every row holds one image, that the method fits the model and
        its grids, and that regions come with the viewports their mapping needs."""
        inputs = dict(request.inputs)
        input_ids = inputs["input_ids"]
        batch = input_ids.shape[0]
        if inputs.get("attention_mask") is None:
            inputs["attention_mask"] = torch.ones_like(input_ids)
        layouts = self.adapter.visual_layouts(inputs)
        self._check_visual_tokens(input_ids, inputs["attention_mask"], [v.num_tokens for v in layouts])
        regions = self._regions(request, batch)
        viewports = request.viewports
        if viewports is None:
            if any(region is not None for region in regions) and self.adapter.viewport_varies(self.processor):
                raise ConfigError(
                    "regions were given without viewports, and this model's processor crops or pads each image "
                    "by its size, so a region cannot be placed on the token grid; use prepare() (it records them), "
                    "pass viewports=[pruned.viewport(image) for image in images], or viewports=[crop.Viewport()] "
                    "* batch when the regions are boxes on the processed image"
                )
            viewports = [Viewport()] * batch
        num_layers = len(self.adapter.decoder_layers())
        for grid_tokens in sorted({v.rows * v.cols for v in layouts}):
            self.method.validate(num_layers, grid_tokens)
        return CallContext(self.adapter, inputs, layouts, viewports, regions, request.questions)

    def _regions(self, request: Request, batch: int) -> list[Region | None]:
        if request.regions is not None:
            return request.regions
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
    one (`crop methods`: "full", "crop", "crop-fused", "fastv", "pyramiddrop", "sparsevlm", "dart", "visionzip",
    "divprune", "random", "pool"; "cdpruner" needs its CLIP text tower, so build `CDPruner` itself) kept at
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

"""What a serving engine needs to prune images before the LLM with crop's methods, independent of the engine: the
settings (which method, its budget), the region a request names, how many tokens an image will get (the engine
reserves its placeholders before the encoder runs) and the tokens themselves, from the encoder's output.

Only methods acting wholly before the LLM fit an engine that gives every sequence one KV length across layers;
those that prune inside the LLM are refused with the reason. Methods that read the vision tower's internals
(VisionZip, HoloV) run where the family's plugin gives them (LLaVA); CDPruner, which reads a CLIP text tower the
VLM does not hold, is refused.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crop.adapter import VisionCrops, VisionInternals, VisualLayout
from crop.errors import ConfigError
from crop.region import Region, Viewport
from crop.strategies.base import PreLLMMethod
from crop.strategies.context import CallContext
from crop.strategies.plc import Compressed
from crop.strategies.registry import METHODS, build_method

SETTINGS_KEY = "crop"
"""The model config key (`hf_overrides`) that holds the plugin's settings."""
REGION_KWARG = "crop_region"
"""A request's region as a box on the 8x8 grid, `[xmin, ymin, xmax, ymax]` (blocks, inclusive)."""
BOX_KWARG = "crop_box"
"""A request's region as a box in image fractions, `[x0, y0, x1, y1]` in [0, 1]."""
QUESTION_KWARG = "crop_question"
"""A request's question, for the plugin's localizer (vLLM's processor sees the images, not the prompt)."""
FEATURES_ONLY = ("pool", "random", "divprune", "crop")
"""Methods that need nothing beyond the projected visual tokens, the region and the budget."""
VISION_READERS = ("visionzip", "holov", "cdpruner")
"""Methods that also read the vision tower's feature layer (its states, CLS attention and keys; CDPruner: the
patch states through the tower's final norm, with CLIP's text tower on the question)."""
QUESTION_READERS = ("cdpruner",)
"""Methods that read each request's question."""
BUDGET_COUNTED = ("cdpruner",)
"""Methods whose stand-in run would need what only a real request has (a question, CLIP's towers): they keep
exactly `budget` tokens, numbered consecutively, so they serve families with consecutive positions only."""
ACCEPTED_KEYS = ("method", "budget", "layer", "plc_ratio", "seed", "localizer", "clip")


@dataclass(frozen=True)
class TowerOutputs:
    """What an engine's vision tower gives for one image beyond its projected tokens, for methods that read it:
    the feature layer's internals, the projector from vision states to the LLM and the tower's final norm."""

    vision: VisionCrops
    project: Callable[[torch.Tensor], torch.Tensor]
    vision_head: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class PruningSettings:
    """The plugin's settings, read from the model config's `crop` entry; `localizer`: the directory of a grid-box
    localizer VLM the plugin runs on requests that bring their question but no region; `clip`: CDPruner's CLIP
    checkpoint; `vision_internals` says whether the family's plugin gives the vision tower's internals (then
    VisionZip, HoloV and CDPruner run too)."""

    method: str
    budget: int | None = None
    layer: int = 0
    plc_ratio: int | None = None
    seed: int = 0
    localizer: str | None = None
    clip: str | None = None
    vision_internals: bool = False

    @classmethod
    def from_config(cls, entry: Any, vision_internals: bool = False) -> PruningSettings:
        """Settings from the config's `crop` entry (a mapping), refusing what cannot run before the LLM."""
        if not isinstance(entry, Mapping):
            raise ConfigError(
                f"the model config's {SETTINGS_KEY!r} entry must be a mapping like "
                f'{{"method": "divprune", "budget": 64}}, got {entry!r}'
            )
        unknown = sorted(set(entry) - set(ACCEPTED_KEYS))
        if unknown:
            raise ConfigError(f"unknown crop settings {unknown}; accepted: {list(ACCEPTED_KEYS)}")
        settings = cls(**{"method": None, **entry}, vision_internals=vision_internals)
        if settings.method is None:
            raise ConfigError(f"crop settings need a method, one of {list(settings.supported)}")
        settings.method_object()
        settings.check_localizer()
        return settings

    def check_localizer(self) -> None:
        """Refuse a localizer the plugin cannot run: only a grid-box localizer VLM's directory runs (in vLLM's
        processor, before the engine fixes the image's tokens)."""
        if self.localizer is None:
            return
        if str(self.localizer).lower() in ("attention", "default"):
            raise ConfigError(
                "the attention localizer reads the LLM's own attention on the whole image, which vLLM computes only "
                "after the image's tokens are fixed and exposes to no model code: give a grid-box localizer VLM's "
                "directory, or send each request's region"
            )
        if not Path(self.localizer).is_dir():
            raise ConfigError(f"localizer {self.localizer!r} is not a directory (a grid-box localizer VLM's)")
        if not self.method_object().needs_region:
            raise ConfigError(f"{self.method_object().describe()} needs no region: leave the localizer out")

    @property
    def supported(self) -> tuple[str, ...]:
        """The methods these settings may name."""
        return FEATURES_ONLY + (VISION_READERS if self.vision_internals else ())

    @property
    def reads_vision(self) -> bool:
        return self.method in VISION_READERS

    @property
    def reads_question(self) -> bool:
        return self.method in QUESTION_READERS

    def method_object(self) -> PreLLMMethod:
        """The crop method these settings name, numbered consecutively (the engine numbers its prompts so)."""
        return self._method

    @functools.cached_property
    def _method(self) -> PreLLMMethod:
        name = self.method
        if name == "full":
            raise ConfigError("method 'full' prunes nothing: leave the crop architecture out to serve vLLM's own model")
        supported = list(self.supported)
        if name not in supported:
            if name in METHODS and METHODS[name].acts.startswith("inside"):
                raise ConfigError(
                    f"method {name!r} prunes inside the LLM, which vLLM cannot run: its paged KV cache holds one "
                    f"length per sequence for every layer, and in-LLM pruning shortens later layers only. Methods "
                    f"that act before the LLM: {supported}"
                )
            if name in VISION_READERS:
                raise ConfigError(
                    f"method {name!r} reads a CLIP vision tower's feature layer (its CLS attention, or its states "
                    f"matched by CLIP's text tower), which this family lacks (LLaVA-1.5 has one); supported here: "
                    f"{supported}"
                )
            raise ConfigError(f"unknown method {name!r}; supported in vLLM: {supported}")
        if name == "crop" and self.layer > 0:
            raise ConfigError(
                f"crop with ILP at layer K = {self.layer} prunes inside the LLM, which vLLM cannot run (one KV "
                "length per sequence for every layer); use layer 0 (the region's tokens, or a budget of them, "
                "before the LLM) or layer -1 with plc_ratio (pooling PLC)"
            )
        if name == "crop" and self.layer < 0 and not self.plc_ratio:
            raise ConfigError("crop without ILP (layer < 0) needs plc_ratio: otherwise nothing is pruned")
        if name == "cdpruner" and self.clip is None:
            raise ConfigError(
                "cdpruner needs CLIP's text tower: add \"clip\": the directory of the CLIP checkpoint the VLM's "
                "vision tower came from (e.g. a local copy of openai/clip-vit-large-patch14-336)"
            )
        method = build_method(
            name, budget=self.budget, layer=self.layer, plc_ratio=self.plc_ratio, seed=self.seed, clip=self.clip
        )
        before, inside = method.parts()
        if before is None or inside is not None:
            raise ConfigError(f"{method.describe()} does not act wholly before the LLM")
        return method.with_position("compact").parts()[0]


def request_region(kwargs: Mapping[str, Any]) -> Region | None:
    """The region a request names in its processor kwargs (`crop_region` or `crop_box`), or None."""
    grid, box = kwargs.get(REGION_KWARG), kwargs.get(BOX_KWARG)
    if grid is not None and box is not None:
        raise ConfigError(f"give either {REGION_KWARG} (a grid box) or {BOX_KWARG} (image fractions), not both")
    if grid is not None:
        return Region.from_grid(_four_numbers(REGION_KWARG, grid))
    if box is not None:
        return Region(*_four_numbers(BOX_KWARG, box))
    return None


def _four_numbers(name: str, value: Any) -> list:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ConfigError(f"{name} must be a list of four numbers [x0, y0, x1, y1], got {value!r}")
    return list(value)


class FeaturePruner:
    """One method applied to images whose projected tokens an engine's encoder computed."""

    def __init__(self, settings: PruningSettings, num_layers: int) -> None:
        self.settings = settings
        self.method = settings.method_object().bind(num_layers)
        self.num_layers = num_layers
        self._grid_cells = functools.lru_cache(maxsize=4096)(self._single_grid_cells)
        """Per (grid, region): the engine asks for the same geometry for every request and every image."""

    @property
    def needs_region(self) -> bool:
        return self.method.needs_region

    def check_layout(self, layout: VisualLayout) -> None:
        """Refuse a budget larger than the image's tokens (at start-up, for families with one grid size)."""
        self.check_tokens(layout.rows * layout.cols)

    def check_tokens(self, grid_tokens: int) -> None:
        """Refuse a budget larger than `grid_tokens` (at start-up: the largest grid a family's images can have)."""
        self.method.validate(self.num_layers, grid_tokens)

    def check(self, layout: VisualLayout, region: Region | None) -> None:
        """Refuse a budget larger than the image's tokens, or a missing region for a method that needs one."""
        self.check_layout(layout)
        if self.needs_region and region is None:
            raise ConfigError(
                f"{self.method.describe()} needs the contextual region: pass mm_processor_kwargs "
                f"{{{REGION_KWARG!r}: [xmin, ymin, xmax, ymax]}} (8x8 grid blocks) or {{{BOX_KWARG!r}: [x0, y0, x1, "
                f"y1]}} (image fractions) with the request, or {{{QUESTION_KWARG!r}: ...}} to an engine whose crop "
                "settings name a localizer"
            )

    def count(self, layout: VisualLayout, region: Region | None, viewport: Viewport | None = None) -> int:
        """How many tokens an image with this layout and region gets (leading tokens included)."""
        return layout.leading + self.cells(layout, region, viewport).numel()

    def cells(self, layout: VisualLayout, region: Region | None, viewport: Viewport | None = None) -> torch.Tensor:
        """The grid cell each kept token stands for (a pooled window: its first cell), in prompt order: the method
        run on stand-in features, since every supported method's count depends on the geometry and budget only
        (and, for `pool`, `random` and `crop`, its cells too: DivPrune's depend on the features). `viewport`:
        where the image lies on the grid, for a region given on the whole image (a localizer's). Methods in
        `BUDGET_COUNTED` get `budget` placeholder cells 0, 1, ...."""
        self.check(layout, region)
        if self.settings.method in BUDGET_COUNTED:
            return torch.arange(self.settings.budget)
        viewport = viewport or Viewport()
        if layout.cells is not None:
            return self._stand_in_cells(layout, region, viewport)
        return self._grid_cells(layout.rows, layout.cols, layout.leading, region, viewport).clone()

    def _single_grid_cells(
        self, rows: int, cols: int, leading: int, region: Region | None, viewport: Viewport
    ) -> torch.Tensor:
        return self._stand_in_cells(VisualLayout(rows, cols, leading), region, viewport)

    def _stand_in_cells(self, layout: VisualLayout, region: Region | None, viewport: Viewport) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        stand_in = torch.randn(layout.num_tokens, 4, generator=generator)
        tower = None
        if self.settings.reads_vision:
            grid = layout.num_tokens - layout.leading
            states = torch.randn(1, 1 + grid, 4, generator=generator)
            internals = VisionInternals(states, torch.rand(1, grid, generator=generator), states)
            cells = torch.arange(grid)[None]
            tower = TowerOutputs(VisionCrops(internals, cells, cells), _identity)
        return self._compressed(stand_in, layout, region, viewport, tower, None).first_cell.cpu()

    def reduce(
        self,
        features: torch.Tensor,
        layout: VisualLayout,
        region: Region | None,
        viewport: Viewport | None = None,
        tower: TowerOutputs | None = None,
        question: str | None = None,
    ) -> torch.Tensor:
        """The tokens the LLM gets for one image `(kept, dim)` from its projected tokens `(tokens, dim)` (and, for
        methods that read them, the vision tower's outputs on the image and the request's question)."""
        return self.reduce_with_cells(features, layout, region, viewport, tower, question)[0]

    def reduce_with_cells(
        self,
        features: torch.Tensor,
        layout: VisualLayout,
        region: Region | None,
        viewport: Viewport | None = None,
        tower: TowerOutputs | None = None,
        question: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`reduce`'s tokens and, for the grid tokens among them, the cell each stands for (a pooled window: its
        first cell), computed from these features: what an engine places after its encoder ran."""
        compressed = self._compressed(features, layout, region, viewport or Viewport(), tower, question)
        kept = compressed.features.to(features.dtype)
        if self.settings.method in BUDGET_COUNTED and kept.shape[0] != self.settings.budget:
            raise ConfigError(
                f"{self.method.describe()} kept {kept.shape[0]} distinct tokens, not its budget of "
                f"{self.settings.budget} (its kernel's rank ran out), and the engine reserved {self.settings.budget}"
            )
        tokens = torch.cat([features[: layout.leading], kept]) if layout.leading else kept
        return tokens, compressed.first_cell

    def _compressed(
        self,
        features: torch.Tensor,
        layout: VisualLayout,
        region: Region | None,
        viewport: Viewport,
        tower: TowerOutputs | None,
        question: str | None,
    ) -> Compressed:
        self.check(layout, region)
        if features.shape[0] != layout.num_tokens:
            raise ConfigError(f"expected {layout.num_tokens} visual tokens for this image, got {features.shape[0]}")
        if self.settings.reads_vision and tower is None:
            raise ConfigError(f"{self.method.describe()} needs the vision tower's internals on the image")
        if self.settings.reads_question and question is None:
            raise ConfigError(f"{self.method.describe()} needs the request's question")
        call = CallContext.of_features(
            [features], [layout], [region], None if question is None else [question],
            vision=None if tower is None else [tower.vision], project=None if tower is None else tower.project,
            viewports=[viewport], vision_head=None if tower is None else tower.vision_head,
        )  # fmt: skip
        compressed = self.method.reduce(call.image(0)).compressed
        assert compressed is not None, "a pre-LLM method returns the tokens that replace the grid"
        return compressed


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden

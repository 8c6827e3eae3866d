"""The contextual region from the target model's own early-layer attention: no second model, no training.

At decoder layer `layer`, the relevance of each visual token is the attention that the question's rows pay it,
averaged over those rows and over heads. "The question's rows" (`rows="question"`) are every prompt token after
the image: with LLaVA's template (`USER: <image>\\n{question} ASSISTANT:`) the question and the assistant prefix;
`rows="last"` (the default, see `DEFAULT_ROWS`) uses the last prompt token alone, the row that generates the answer.
The attention is computed from the layer's queries (those rows only, rotary applied as the layer applies it) and
keys, so the model keeps its attention backend. Relevance is summed onto the 8x8 localization grid (each token
into the block holding its centre) and normalized; the region is the block box that maximizes
`mass - penalty * area share`. Flat relevance gives the whole image (any box scores `(1 - penalty) * area share`),
which is also the documented fallback for relevance without contrast.

Two ways to run it: `AttentionLocalizer` (two-pass: the target model's first layers run once more on the prompt,
like any localizer) and `FusedCROP` in `crop.strategies.crop_fused` (the same relevance at layer K-1 during the
pruned call's own prefill; no extra forward).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from crop.adapter import adapter_for, grid_cell_index, pool_rows, question_weights
from crop.errors import ConfigError
from crop.image import load_image
from crop.prompting import build_prompt
from crop.region import GRID_SIZE, Region, Viewport

DEFAULT_LAYER = 1
DEFAULT_PENALTY = 0.5
DEFAULT_ROWS = "last"
ROWS = ("question", "last")
"""Defaults chosen by mean IoU with the ground-truth box on the synthetic task's validation split (300 questions,
`crop synth tune-attention`, `results/synth_attention_tuning_shapes4.json`, the previous 4-layer shipped
model): layer 1 (of 4), the last row, penalty 0.5.
Other models will want their own: run the same sweep on validation data."""


def grid_mass(relevance: torch.Tensor, grid_size: int = GRID_SIZE) -> torch.Tensor:
    """Relevance `(rows, cols)` of the token grid summed onto a `grid_size` square grid (token centres), sum 1."""
    rows, cols = relevance.shape
    block_of_row = ((torch.arange(rows) + 0.5) * grid_size / rows).long()
    block_of_col = ((torch.arange(cols) + 0.5) * grid_size / cols).long()
    mass = torch.zeros(grid_size, grid_size, dtype=torch.float64)
    index = (block_of_row[:, None] * grid_size + block_of_col[None, :]).reshape(-1)
    mass.view(-1).index_add_(0, index, relevance.double().reshape(-1).cpu())
    return mass / mass.sum()


def best_box(mass: torch.Tensor, penalty: float) -> tuple[int, int, int, int]:
    """The block box `(xmin, ymin, xmax, ymax)` maximizing `mass inside - penalty * area / grid area`; ties go to
    the smaller box, then to the first in raster order."""
    size = mass.shape[0]
    table = torch.zeros(size + 1, size + 1, dtype=torch.float64)
    table[1:, 1:] = mass.cumsum(0).cumsum(1)
    table = table.tolist()
    best, best_key = None, None
    for y0 in range(size):
        for y1 in range(y0, size):
            for x0 in range(size):
                for x1 in range(x0, size):
                    inside = table[y1 + 1][x1 + 1] - table[y0][x1 + 1] - table[y1 + 1][x0] + table[y0][x0]
                    area = (x1 - x0 + 1) * (y1 - y0 + 1)
                    key = (round(inside - penalty * area / size**2, 12), -area)
                    if best_key is None or key > best_key:
                        best, best_key = (x0, y0, x1, y1), key
    return best


def region_from_relevance(relevance: torch.Tensor, viewport: Viewport | None, penalty: float) -> Region:
    """The region for token-grid relevance `(rows, cols)` seen through `viewport` (see the module docstring)."""
    relevance = relevance.double()
    if not bool(torch.isfinite(relevance).all()) or float(relevance.max() - relevance.min()) <= 1e-12 * max(
        1.0, float(relevance.abs().max())
    ):
        return Region.full(fallback_reason="relevance has no contrast (all visual tokens equal)")
    x0, y0, x1, y1 = best_box(grid_mass(relevance), penalty)
    box = (x0 / GRID_SIZE, y0 / GRID_SIZE, (x1 + 1) / GRID_SIZE, (y1 + 1) / GRID_SIZE)
    return (viewport or Viewport()).to_image(*box)


def check_settings(layer: int, penalty: float, rows: str, num_layers: int, name: str) -> None:
    if not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise ConfigError(
            f"{name}: layer {layer!r} is out of range: this model has {num_layers} decoder layers, "
            f"so it must be an integer in 0..{num_layers - 1}"
        )
    if not 0 <= penalty <= 1:
        raise ConfigError(f"{name}: penalty {penalty!r} must be in [0, 1] (0 picks the whole image)")
    if rows not in ROWS:
        raise ConfigError(f"{name}: rows {rows!r} is not one of {ROWS}")


class _Stop(Exception):
    """Raised by the capture hook to end the forward once the localization layer's input is known."""


class AttentionLocalizer:
    """Two-pass attention localizer: runs the target model's layers `0..layer-1` on (image, question) and
    returns the box of highest relevance at `layer` (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        layer: int = DEFAULT_LAYER,
        penalty: float = DEFAULT_PENALTY,
        rows: str = DEFAULT_ROWS,
        prompt_template: str | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.adapter = adapter_for(model)
        check_settings(layer, penalty, rows, len(self.adapter.decoder_layers()), "AttentionLocalizer")
        self.layer = layer
        self.penalty = penalty
        self.rows = rows
        self.prompt_template = prompt_template
        self.fallback_count = 0

    def relevance(self, image: Image.Image | str, question: str) -> tuple[torch.Tensor, Viewport]:
        """Per-token relevance `(rows, cols)` of the image's grid to the question, and where the image lands on
        that grid (with several grids per image, the last, highest-resolution one)."""
        image = load_image(image)
        prompt = build_prompt(self.processor, question, self.prompt_template)
        inputs = self.processor(images=image, text=prompt, return_tensors="pt")
        return self.relevance_of(inputs, self.adapter.viewport(self.processor, image.size))

    @torch.inference_mode()
    def relevance_of(
        self, inputs: dict[str, Any], viewport: Viewport | None = None
    ) -> tuple[torch.Tensor, Viewport | None]:
        """`relevance` for one prompt already through the processor (`input_ids`, `pixel_values`...), given the
        image's `viewport` on a single grid."""
        layer = self.adapter.decoder_layers()[self.layer]
        captured: dict[str, Any] = {}

        def capture(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured["hidden"], captured["kwargs"] = (args[0] if args else kwargs["hidden_states"]), dict(kwargs)
            raise _Stop

        handle = layer.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self.model(**inputs, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        layout = self.adapter.visual_layouts(inputs)[0]
        cell_of = grid_cell_index(
            inputs["input_ids"], inputs["attention_mask"], self.adapter.image_token_id, [layout.leading]
        )
        weights = question_weights(cell_of)  # also refuses prompts with no text after the image
        if self.rows == "last":
            weights = torch.ones(1, 1)
        attention = self.adapter.query_attention(layer, captured["hidden"], captured["kwargs"], weights.shape[1])
        pooled = pool_rows(attention, weights)[0]
        grid = (cell_of[0] >= 0).nonzero().squeeze(1)
        relevance = pooled[:, grid].float().mean(0).view(layout.rows, layout.cols)
        return layout.drawn_grid(relevance, viewport)

    def localize(self, image: Image.Image | str, question: str) -> Region:
        return self._region(*self.relevance(image, question))

    def localize_inputs(self, inputs: dict[str, Any], viewport: Viewport | None = None) -> Region:
        """The region for one prompt already through the processor (for benchmarks and batch pipelines)."""
        return self._region(*self.relevance_of(inputs, viewport))

    def _region(self, relevance: torch.Tensor, viewport: Viewport | None) -> Region:
        region = region_from_relevance(relevance, viewport, self.penalty)
        if region.fallback_reason:
            self.fallback_count += 1
        return region

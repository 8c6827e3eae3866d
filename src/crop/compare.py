"""One question answered twice, with all visual tokens and with a pruning method: what the demos show."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

import crop
from crop.errors import ConfigError, ImageError
from crop.image import load_image
from crop.localize import Localizer
from crop.region import Region
from crop.stats import RowStats
from crop.strategies.registry import build_method
from crop.timing import Timing, alternating_timings
from crop.visualize import draw_overlay

MAX_PIXELS = 40_000_000
"""Images larger than this (about 6300 x 6300) are refused: processors would only shrink them, slowly."""


@dataclass
class Side:
    """One of the two answers: its text, its prefill time (see `crop.timing`) and what it did with the visual
    tokens."""

    answer: str
    prefill: Timing
    stats: RowStats

    @property
    def prefill_seconds(self) -> float:
        return self.prefill.median


@dataclass
class Comparison:
    """The full-token and the pruned answer to one question, with overlays of what the pruned call kept."""

    question: str
    method: str
    full: Side
    pruned: Side
    localize: Timing | None
    overlay: Image.Image
    stage_overlays: list[tuple[str, Image.Image]] = field(default_factory=list)

    @property
    def region(self) -> Region | None:
        return self.pruned.stats.region


def checked_image(image: Image.Image | str | Path | None) -> Image.Image:
    """The image as RGB, or `ImageError` for none at all or one too large to be worth processing."""
    if image is None:
        raise ImageError("no image: upload one or pick an example")
    return load_image(image, limit=MAX_PIXELS)


def compare(
    model: Any,
    processor: Any,
    image: Image.Image | str | Path | None,
    question: str,
    method: str = "crop",
    budget: int | None = None,
    localizer: Localizer | None = None,
    layer: int = 2,
    max_new_tokens: int = 16,
) -> Comparison:
    """Answer `question` with all visual tokens and with `method` (at `budget` tokens, or region-sized CROP)."""
    picture = checked_image(image)
    if not question or not question.strip():
        raise ConfigError("empty question: type a question about the image")
    pruning = build_method(method, budget=budget, layer=layer)
    full_model = crop.apply(model, processor, method="full")
    pruned_model = crop.apply(model, processor, localizer=localizer if pruning.needs_region else None, method=pruning)
    try:
        full_request = full_model.prepare(picture, question)
        pruned_request = pruned_model.prepare(picture, question)
        calls = {"full": lambda: full_model(full_request), "pruned": lambda: pruned_model(pruned_request)}
        if pruning.needs_region and localizer is not None:
            calls["localize"] = lambda: localizer.localize(picture, question)
        timings = alternating_timings(calls)
        full = _answer(full_model, full_request, timings["full"], max_new_tokens)
        pruned = _answer(pruned_model, pruned_request, timings["pruned"], max_new_tokens)
    finally:
        pruned_model.remove()
    row = pruned.stats
    stages = [(f"layers {start}+: {int((cells > 0).sum())} cells kept", cells) for start, cells in row.stages]
    return Comparison(
        question=question,
        method=pruned_model.method.describe(),
        full=full,
        pruned=pruned,
        localize=timings.get("localize"),
        overlay=draw_overlay(picture, row),
        stage_overlays=[(label, draw_overlay(picture, row, cells)) for label, cells in stages],
    )


def warm_up(model: Any, processor: Any) -> None:
    """One unpruned forward pass, so that the first timed prefill does not pay for lazy initialisation."""
    full_model = crop.apply(model, processor, method="full")
    full_model(full_model.prepare(Image.new("RGB", (224, 224), (128, 128, 128)), "warm up"))


def _answer(crop_model: crop.CropModel, request: crop.Request, prefill: Timing, max_new_tokens: int) -> Side:
    """The greedy answer to `request`, with the prefill's timing and the call's stats."""
    sequences, stats = crop_model.generate(request, max_new_tokens=max_new_tokens, do_sample=False)
    length = request["input_ids"].shape[1]
    text = crop_model.processor.batch_decode(sequences[:, length:], skip_special_tokens=True)[0]
    return Side(text.strip(), prefill, stats.rows[0])

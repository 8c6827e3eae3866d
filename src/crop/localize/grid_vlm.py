"""The paper's localizer: a (fine-tuned) VLM asked for the 8x8 grid box that holds the answer."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from crop.errors import LocalizerError, RegionError
from crop.prompting import build_prompt
from crop.region import GRID_SIZE, Region

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = (
    "The image is divided into an {n}x{n} grid of blocks, numbered 0 to {last} from left to right and from top "
    "to bottom. Which blocks contain the region needed to answer the question? "
    "Question: {question} Answer with [xmin, ymin, xmax, ymax]."
)
"""The instruction the localizer is asked (and trained) with; the paper does not publish its prompt."""

LOCALIZER_SETTINGS = "crop_localizer.json"
"""File beside a localizer checkpoint holding GridVLMLocalizer keyword arguments (e.g. its instruction)."""

_NAMED = re.compile(r"\b([xy])[\s_-]?(min|max)\b\s*[=:]?\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_grid_box(text: str, grid_size: int = GRID_SIZE) -> Region:
    """Parse a localizer's answer such as `[2, 3, 5, 6]`, `(2,3,5,6)` or `x_min=2, y_min=3, x_max=5, y_max=6`.

    Named coordinates win over bare numbers; otherwise the first four numbers are read as
    `xmin, ymin, xmax, ymax`. Raises `RegionError` when no valid box on the grid can be read.
    """
    named = {f"{axis.lower()}{end.lower()}": float(value) for axis, end, value in _NAMED.findall(text)}
    if len(named) == 4:
        numbers = [named["xmin"], named["ymin"], named["xmax"], named["ymax"]]
    else:
        numbers = [float(n) for n in _NUMBER.findall(text)[:4]]
    if len(numbers) < 4:
        raise RegionError(f"no grid box [xmin, ymin, xmax, ymax] in localizer answer {text!r}")
    return Region.from_grid(numbers, grid_size=grid_size)


class GridVLMLocalizer:
    """Prompts a Hugging Face VLM for the grid box of the contextual region and parses its answer.

    An answer that cannot be parsed or lies off the grid falls back to the whole image: the returned region
    carries `fallback_reason`, the event is logged and counted in `fallback_count` (unless `fallback=False`,
    which raises `LocalizerError` instead).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        instruction: str = DEFAULT_INSTRUCTION,
        prompt_template: str | None = None,
        grid_size: int = GRID_SIZE,
        max_new_tokens: int = 24,
        fallback: bool = True,
    ) -> None:
        self.model = model
        self.processor = processor
        self.instruction = instruction
        self.prompt_template = prompt_template
        self.grid_size = grid_size
        self.max_new_tokens = max_new_tokens
        self.fallback = fallback
        self.call_count = 0
        self.fallback_count = 0

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> GridVLMLocalizer:
        """Load a localizer VLM and its processor from a local directory or hub id.

        A `crop_localizer.json` beside the weights may set the instruction the model was trained with.
        """
        from crop.loading import load_model

        model, processor = load_model(path)
        return cls.from_model(model, processor, path, **kwargs)

    @classmethod
    def from_model(cls, model: Any, processor: Any, path: str | Path, **kwargs: Any) -> GridVLMLocalizer:
        """A localizer on an already loaded model, with the settings saved in `path` (if any)."""
        settings = Path(path) / LOCALIZER_SETTINGS
        if settings.is_file():
            kwargs = {**json.loads(settings.read_text()), **kwargs}
        return cls(model, processor, **kwargs)

    def ask(self, image: Image.Image, question: str) -> str:
        """The localizer model's raw answer text for (image, question)."""
        last = self.grid_size - 1
        text = self.instruction.format(n=self.grid_size, last=last, question=question)
        prompt = build_prompt(self.processor, text, self.prompt_template)
        inputs = self.processor(images=image, text=prompt, return_tensors="pt").to(self.model.device)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0]

    def localize(self, image: Image.Image, question: str) -> Region:
        self.call_count += 1
        answer = self.ask(image, question)
        try:
            return parse_grid_box(answer, self.grid_size)
        except RegionError as exc:
            if not self.fallback:
                raise LocalizerError(str(exc)) from exc
            self.fallback_count += 1
            logger.warning("localizer answer unusable, falling back to the whole image: %s", exc)
            return Region.full(fallback_reason=str(exc))

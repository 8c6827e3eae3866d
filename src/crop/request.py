"""One pruned call's data, normalised once: what `CropModel.prepare` returns and `generate`/`__call__` take."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from crop.errors import ConfigError
from crop.region import Region, Viewport

RegionLike = Region | Sequence[int]
EXTRAS = ("regions", "viewports", "localize_seconds", "questions")


@dataclass
class Request(Mapping[str, Any]):
    """The model's `inputs` (the processor's tensors, and any generation argument), one region per row (None:
    the method needs none, or a `FixedLocalizer` supplies it), one viewport per row (None: not known), the
    seconds the localizer took, and each row's question text (for methods that read the instruction with a text
    encoder of their own, as CDPruner does; None: not known).

    A `Request` is also a read-only mapping of its inputs plus `regions`, `viewports`, `localize_seconds` and
    `questions`, so
    `pruned.generate(**request)` works as `pruned.generate(request)` does.
    """

    inputs: dict[str, Any]
    regions: list[Region] | None = None
    viewports: list[Viewport] | None = None
    localize_seconds: float | None = None
    questions: list[str] | None = None

    @classmethod
    def of(cls, request: Request | None, kwargs: dict[str, Any]) -> Request:
        """The request of a call made as `f(request, **options)` or `f(**inputs)` (inputs may hold `regions`,
        `viewports`, `localize_seconds` and `questions` beside the tensors)."""
        if request is not None:
            if not isinstance(request, Request):
                kind = type(request).__name__
                raise ConfigError(f"expected a Request (from prepare()) or keyword inputs, got a {kind}")
            clash = sorted(set(kwargs) & (set(request.inputs) | set(EXTRAS)))
            if clash:
                raise ConfigError(f"{', '.join(clash)} given both in the request and as keywords")
            return cls(
                {**request.inputs, **kwargs}, request.regions, request.viewports, request.localize_seconds,
                request.questions,
            )  # fmt: skip
        inputs = dict(kwargs)
        regions, viewports = inputs.pop("regions", None), inputs.pop("viewports", None)
        seconds, questions = inputs.pop("localize_seconds", None), inputs.pop("questions", None)
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise ConfigError("crop needs input_ids (the processor's output), not inputs_embeds")
        batch = input_ids.shape[0]
        region_list = None if regions is None else normalized_regions(regions, batch)
        viewport_list = None if viewports is None else list(viewports)
        if viewport_list is not None and len(viewport_list) != batch:
            raise ConfigError(f"got {len(viewport_list)} viewports for a batch of {batch}; pass one per row")
        question_list = None if questions is None else [questions] if isinstance(questions, str) else list(questions)
        if question_list is not None and len(question_list) != batch:
            raise ConfigError(f"got {len(question_list)} questions for a batch of {batch}; pass one per row")
        return cls(inputs, region_list, viewport_list, seconds, question_list)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Request:
        """The request with its tensors on `device` (floating ones in `dtype`, if given)."""

        def move(value: Any) -> Any:
            if not isinstance(value, torch.Tensor):
                return value
            return value.to(device, dtype=dtype if value.is_floating_point() else None)

        moved = {key: move(value) for key, value in self.inputs.items()}
        return Request(moved, self.regions, self.viewports, self.localize_seconds, self.questions)

    def __getitem__(self, key: str) -> Any:
        if key in EXTRAS:
            value = getattr(self, key)
            if value is None:
                raise KeyError(key)
            return value
        return self.inputs[key]

    def __iter__(self) -> Iterator[str]:
        yield from self.inputs
        yield from (key for key in EXTRAS if getattr(self, key) is not None)

    def __len__(self) -> int:
        return len(self.inputs) + sum(getattr(self, key) is not None for key in EXTRAS)


def normalized_regions(regions: RegionLike | Sequence[RegionLike], batch: int) -> list[Region]:
    """One `Region` per row from a region, a grid box, or one of those per row."""
    if isinstance(regions, Region) or (
        isinstance(regions, Sequence) and len(regions) == 4 and all(isinstance(v, int) for v in regions)
    ):
        regions = [regions] * batch
    region_list = [r if isinstance(r, Region) else Region.from_grid(r) for r in regions]
    if len(region_list) != batch:
        raise ConfigError(f"got {len(region_list)} regions for a batch of {batch}; pass one per row")
    return region_list

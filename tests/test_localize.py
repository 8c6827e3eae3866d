"""Localizers: parsing answers, fallback behaviour, and a real (tiny, random) VLM behind GridVLMLocalizer."""

from __future__ import annotations

import logging

import pytest
from conftest import make_image

from crop.errors import LocalizerError, RegionError
from crop.localize import FixedLocalizer, GridVLMLocalizer, Localizer, parse_grid_box
from crop.region import Region


@pytest.mark.parametrize(
    "answer",
    [
        "[2, 3, 5, 6]",
        "(2,3,5,6)",
        "x_min=2, y_min=3, x_max=5, y_max=6",
        "The region is xmin: 2 ymin: 3 xmax: 5 ymax: 6.",
        "ymin=3 xmax=5 xmin=2 ymax=6",
        "answer: 2 3 5 6",
        "[2.0, 3.0, 5.0, 6.0]",
    ],
)
def test_parse_grid_box(answer):
    assert parse_grid_box(answer) == Region.from_grid([2, 3, 5, 6])


@pytest.mark.parametrize("answer", ["", "the red square", "[1, 2, 3]", "[0, 0, 9, 9]", "[5, 5, 2, 2]"])
def test_unparsable_answers_raise(answer):
    with pytest.raises(RegionError):
        parse_grid_box(answer)


def test_fixed_localizer():
    localizer = FixedLocalizer([1, 1, 2, 2])
    assert isinstance(localizer, Localizer)
    assert localizer.localize(make_image(), "q") == Region.from_grid([1, 1, 2, 2])


class Scripted(GridVLMLocalizer):
    """A GridVLMLocalizer whose model answers are given, to test the parsing and fallback around `ask`."""

    def __init__(self, answer, **kwargs):
        super().__init__(model=None, processor=None, **kwargs)
        self.answer = answer

    def ask(self, image, question):
        return self.answer


def test_parsable_answer_gives_region():
    assert Scripted("[0, 4, 3, 7]").localize(make_image(), "q") == Region.from_grid([0, 4, 3, 7])


def test_unparsable_answer_falls_back_and_is_recorded(caplog):
    localizer = Scripted("I cannot tell")
    with caplog.at_level(logging.WARNING):
        region = localizer.localize(make_image(), "q")
    assert region.is_full and "no grid box" in region.fallback_reason
    assert localizer.fallback_count == 1 and localizer.call_count == 1
    assert "falling back" in caplog.text


def test_fallback_can_be_disabled():
    with pytest.raises(LocalizerError, match="no grid box"):
        Scripted("nothing", fallback=False).localize(make_image(), "q")


def test_grid_vlm_localizer_runs_a_real_vlm(sdpa_model, processor):
    """The tiny model has random weights, so its answer is noise: it must either parse or fall back."""
    localizer = GridVLMLocalizer(sdpa_model, processor, max_new_tokens=8)
    answer = localizer.ask(make_image(), "what digit is on the red square ?")
    assert isinstance(answer, str)
    region = localizer.localize(make_image(), "what digit is on the red square ?")
    assert isinstance(region, Region)
    assert localizer.call_count == 1
    assert (region.fallback_reason is not None) == (localizer.fallback_count == 1)

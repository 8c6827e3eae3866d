"""The shipped model trained with a learned PLC compressor, loaded offline with its compressor: on 20 test
questions it answers with all tokens, with 28 learned-PLC tokens around its own predicted region, and with the
ground-truth region; the anchors carry the detail (what it measured is asserted, see README)."""

from __future__ import annotations

import pytest
from test_synth_shipped import correct_answers

from crop.loading import load_model
from crop.localize import GridVLMLocalizer
from crop.region import Region
from crop.strategies.crop_method import CROP
from crop.strategies.learned_plc import LearnedPLC
from crop.synth.assets import SHIPPED_PLC_MODEL, model_task
from crop.synth.evaluate import without_anchors
from crop.synth.scene import make_sample

SAMPLES = [make_sample("test", i, model_task(SHIPPED_PLC_MODEL)) for i in range(20)]  # task `shapes`
BUDGET = round(256 / 9)
# measured on these 20 questions: 20 right with all tokens, 14 with learned PLC at 28 tokens around the
# predicted region, 20 with the ground-truth region, 11 with the same compressor run without its anchors
FULL_MIN, LEARNED_MIN, ORACLE_MIN = 20, 14, 20


@pytest.fixture(scope="module")
def shipped():
    model, processor = load_model(SHIPPED_PLC_MODEL)
    localizer = GridVLMLocalizer.from_model(model, processor, SHIPPED_PLC_MODEL)
    predicted = [localizer.localize(s.image, s.question) for s in SAMPLES]
    return model, processor, LearnedPLC.from_pretrained(SHIPPED_PLC_MODEL), predicted


def test_full_tokens(shipped):
    model, processor, _, _ = shipped
    assert correct_answers(model, processor, CROP(None, None), [Region.full()] * len(SAMPLES), SAMPLES) >= FULL_MIN


def test_learned_plc_at_one_ninth_with_predicted_regions(shipped):
    model, processor, compressor, predicted = shipped
    assert correct_answers(model, processor, CROP(None, compressor, budget=BUDGET), predicted, SAMPLES) >= LEARNED_MIN


def test_learned_plc_with_the_ground_truth_region(shipped):
    model, processor, compressor, _ = shipped
    oracle = [s.region for s in SAMPLES]
    assert correct_answers(model, processor, CROP(None, compressor), oracle, SAMPLES) >= ORACLE_MIN


def test_the_same_compressor_without_anchors_answers_fewer(shipped):
    model, processor, compressor, predicted = shipped
    with_anchors = correct_answers(model, processor, CROP(None, compressor, budget=BUDGET), predicted, SAMPLES)
    ablated_method = CROP(None, without_anchors(compressor), budget=BUDGET)
    ablated = correct_answers(model, processor, ablated_method, predicted, SAMPLES)
    assert ablated < with_anchors

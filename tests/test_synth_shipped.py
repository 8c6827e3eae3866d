"""The shipped synthetic-task checkpoint (answering VLM and localizer in one), loaded offline: it answers, it
localizes, and CROP at 1/9 of the visual tokens keeps most of its accuracy (issue: honest accuracy)."""

from __future__ import annotations

import pytest

import crop
from crop.loading import load_model
from crop.localize import GridVLMLocalizer
from crop.region import Region
from crop.strategies.crop_method import CROP
from crop.strategies.ilp import ILP
from crop.synth.assets import SHIPPED_MODEL, model_task
from crop.synth.scene import make_sample

SAMPLES = [make_sample("test", i, model_task(SHIPPED_MODEL)) for i in range(20)]
BUDGET = round(256 / 9)  # 1/9 of the 16x16 grid, as 64 of LLaVA-1.5's 576
# Just under what the shipped checkpoint (8 layers, task `documents`) measured on these 20 questions (6 detail,
# 4 object, 4 wide, 6 document): 18 right with all tokens, 15 localizer boxes holding the answer region (it misses
# most document cells) and 14 right with CROP at 1/9 (78% of full; 79.8% on the 1000 test questions of
# results/synth_eval.md). The previous 4-layer `shapes` model kept 111% here: its task had no documents.
FULL_MIN = 17
LOCALIZED_MIN = 14
RETENTION_MIN = 0.7


@pytest.fixture(scope="module")
def shipped():
    model, processor = load_model(SHIPPED_MODEL)
    return model, processor, GridVLMLocalizer.from_model(model, processor, SHIPPED_MODEL)


def correct_answers(model, processor, method, regions, samples=SAMPLES) -> int:
    pruned = crop.apply(model, processor, method=method)
    try:
        inputs = pruned.prepare([s.image for s in samples], [s.question for s in samples], regions)
        length = inputs["input_ids"].shape[1]
        sequences, _ = pruned.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        pruned.remove()
    answers = processor.batch_decode(sequences[:, length:], skip_special_tokens=True)
    return sum(answer.split()[:1] == [sample.answer] for answer, sample in zip(answers, samples, strict=True))


def contains(outer: Region, inner: Region) -> bool:
    ox0, oy0, ox1, oy1 = outer.to_grid()
    ix0, iy0, ix1, iy1 = inner.to_grid()
    return ox0 <= ix0 and oy0 <= iy0 and ox1 >= ix1 and oy1 >= iy1


def test_full_tokens_answer_most_questions(shipped):
    model, processor, _ = shipped
    assert correct_answers(model, processor, CROP(None, None), [Region.full()] * len(SAMPLES)) >= FULL_MIN


def test_localizer_box_holds_the_answer_region(shipped):
    _, _, localizer = shipped
    predicted = [localizer.localize(s.image, s.question) for s in SAMPLES]
    assert sum(contains(p, s.region) for p, s in zip(predicted, SAMPLES, strict=True)) >= LOCALIZED_MIN


def test_crop_at_one_ninth_keeps_most_accuracy(shipped):
    model, processor, localizer = shipped
    predicted = [localizer.localize(s.image, s.question) for s in SAMPLES]
    full = correct_answers(model, processor, CROP(None, None), [Region.full()] * len(SAMPLES))
    pruned = correct_answers(model, processor, CROP(ILP(2), budget=BUDGET), predicted)
    assert pruned >= RETENTION_MIN * full

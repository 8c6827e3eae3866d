"""Benchmark adapters read tiny copies written by `benchdata` (official layouts, `datasets` copies), prompt, score."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from benchdata import BENCHMARKS, FORMS, SUPPORTED, TEXT, Table, write_benchmark, write_json, write_table

from crop.errors import ConfigError
from crop.evaluation.tasks import TASKS, EvalSample, Task, get_task
from crop.image import load_image


def records(task: Task, samples: list[EvalSample], predictions: list[str]) -> list[dict]:
    return [
        {"id": s.id, "prediction": p, "answers": s.answers, "score": task.score(p, s), "extra": s.extra}
        for s, p in zip(samples, predictions, strict=True)
    ]


def ids(samples) -> list[str]:
    return [sample.id for sample in samples]


def sizes(samples: list[EvalSample]) -> list[tuple[int, int]]:
    return [load_image(sample.image).size for sample in samples]


# --- every benchmark, every form --------------------------------------------------------------------------------


def test_registry_names_every_benchmark():
    names = ["textvqa", "docvqa", "infovqa", "chartqa", "gqa", "vqav2", "pope", "scienceqa", "ocrbench", "mme",
             "seedbench", "mmbench", "mmmu"]  # fmt: skip
    assert sorted(TASKS) == sorted(names) == sorted(BENCHMARKS)
    assert all(get_task(name).name == name for name in names)
    with pytest.raises(ConfigError, match="unknown task 'mmmu_pro'.*textvqa.*ocrbench"):
        get_task("mmmu_pro")


@pytest.mark.parametrize(("name", "form"), SUPPORTED)
def test_reads_what_benchdata_wrote(tmp_path, name, form):
    expected = write_benchmark(name, tmp_path, form)
    task = get_task(name)
    samples = list(task.samples(tmp_path))
    assert ids(samples) == [e["id"] for e in expected]
    assert [s.question for s in samples] == [e["question"] for e in expected]
    assert [s.answers for s in samples] == [e["answers"] for e in expected]
    assert sizes(samples) == [e["size"] for e in expected]
    assert [task.prompt(s) for s in samples] == [e["prompt"] for e in expected]
    # the reference answer scores 1 on what the reader built (ScienceQA: the answer index, OCRBench: the category)
    assert [task.score(e["answers"][0], s) for s, e in zip(samples, expected, strict=True)] == [1.0] * len(expected)
    if form == "official" and name not in ("mmbench", "mmmu"):  # images inside the TSV, the parquet files
        assert all(Path(s.image).is_relative_to(tmp_path) for s in samples)


def test_benchdata_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'mmmu_pro'"):
        write_benchmark("mmmu_pro", tmp_path)
    with pytest.raises(ValueError, match="unknown form 'csv'; known: official, disk, parquet"):
        write_benchmark("gqa", tmp_path, "csv")
    with pytest.raises(ValueError, match="save_to_disk copy needs a sample"):
        write_benchmark("gqa", tmp_path, "disk", count=0)


# --- scores and summaries (no files: they use only the answers and extra) ---------------------------------------

COLA = ["coca cola"] * 7 + ["coke"] * 3
HME = "Handwritten Mathematical Expression Recognition"


@pytest.mark.parametrize(
    ("name", "answers", "extra", "prediction", "score"),
    [
        ("textvqa", ["stop"] * 10, {}, "Stop.", 1.0),
        ("textvqa", COLA, {}, "coke", 0.9),
        ("textvqa", COLA, {}, "pepsi", 0.0),
        ("docvqa", ["May 3"], {}, "may 3", 1.0),
        ("docvqa", ["J. Smith", "Smith"], {}, "smith", 1.0),
        ("docvqa", ["May 3"], {}, "June 9", 0.0),
        ("infovqa", ["Italy"], {}, "italy", 1.0),
        ("infovqa", ["Italy"], {}, "France", 0.0),
        ("chartqa", ["12"], {"type": "human"}, "12.5", 1.0),  # within 5%
        ("chartqa", ["12"], {"type": "human"}, "13", 0.0),
        ("gqa", ["red"], {}, "Red.", 1.0),
        ("gqa", ["red"], {}, "blue", 0.0),
        ("vqav2", ["2"] * 9 + ["3"], {}, "two", 1.0),
        ("vqav2", ["2"] * 9 + ["3"], {}, "3", 0.3),
        ("pope", ["yes"], {"category": "random"}, "Yes, there is a dog.", 1.0),
        ("pope", ["yes"], {"category": "random"}, "No, there is not.", 0.0),
        ("scienceqa", ["B"], {"choices": ["red", "blue"], "hint": "", "answer_index": 1}, "B", 1.0),
        ("scienceqa", ["B"], {"choices": ["red", "blue"], "hint": "", "answer_index": 1}, "A. red", 0.0),
        ("ocrbench", ["CENTRE"], {"category": "Regular Text Recognition"}, "The text is centre.", 1.0),
        ("ocrbench", ["CENTRE"], {"category": "Regular Text Recognition"}, "CENTER", 0.0),
        ("ocrbench", ["x ^ { 2 }"], {"category": HME}, "x^{2}", 1.0),
    ],
)
def test_scores(name, answers, extra, prediction, score):
    sample = EvalSample("1", None, "q", answers, extra)
    assert get_task(name).score(prediction, sample) == pytest.approx(score)


def test_anls_for_both_document_benchmarks():
    assert get_task("docvqa").metric == get_task("infovqa").metric == "anls"


def test_textvqa_prompt_and_summary():
    task = get_task("textvqa")
    samples = [
        EvalSample("1", None, "what does the sign say?", ["stop"] * 10),
        EvalSample("2", None, "Which BRAND?", COLA),
    ]
    # lmms-eval capitalises the question with str.capitalize, which lower-cases the rest
    short = "\nAnswer the question using a single word or phrase."
    assert [task.prompt(s) for s in samples] == ["What does the sign say?" + short, "Which brand?" + short]
    assert task.aggregate(records(task, samples, ["stop", "pepsi"])) == {"score": 0.5, "count": 2}


def test_pope_aggregate_by_hand():
    task = get_task("pope")
    samples = [
        EvalSample("random_1", None, "q", ["yes"], {"category": "random"}),
        EvalSample("random_2", None, "q", ["yes"], {"category": "random"}),
        EvalSample("adversarial_1", None, "q", ["yes"], {"category": "adversarial"}),
        EvalSample("adversarial_2", None, "q", ["no"], {"category": "adversarial"}),
    ]
    # parsed: yes, yes, no, yes -> TP 2, FN 1, FP 1, TN 0
    summary = task.aggregate(records(task, samples, ["Yes", "yes, there is", "No.", "Yes"]))
    assert summary == pytest.approx(
        {
            "score": 2 / 3,
            "count": 4,
            "accuracy": 0.5,
            "precision": 2 / 3,
            "recall": 2 / 3,
            "f1": 2 / 3,
            "yes_ratio": 0.75,
            "random_f1": 1.0,
            "random_accuracy": 1.0,
            "adversarial_f1": 0.0,
            "adversarial_accuracy": 0.0,
        }
    )


def test_empty_run_has_no_mean():
    assert math.isnan(get_task("gqa").aggregate([])["score"])


# --- what only some benchmarks do: splits, parts, joins, ids -----------------------------------------------------


@pytest.mark.parametrize("form", ["disk", "parquet"])
def test_textvqa_hub_copy_splits_and_single_file(tmp_path, form):
    expected = write_benchmark("textvqa", tmp_path, form)
    task = get_task("textvqa")
    with pytest.raises(ConfigError, match="no split 'train'.*available: validation"):
        task.samples(tmp_path, split="train")
    if form == "parquet":  # a single parquet file is a copy too
        file = tmp_path / "data" / "validation-00000-of-00001.parquet"
        assert ids(task.samples(file)) == [e["id"] for e in expected]


def test_hub_copy_without_the_columns(tmp_path):
    table = Table(None, "validation", {"question": TEXT, "answer": TEXT}, [{"question": "q", "answer": "a"}])
    path = write_table(tmp_path / "copy", "disk", table)
    with pytest.raises(ConfigError, match="lacks the columns question_id, image, answers.*lmms-lab/textvqa"):
        get_task("textvqa").samples(path)


@pytest.mark.parametrize("form", FORMS)
def test_chartqa_parts(tmp_path, form):
    expected = write_benchmark("chartqa", tmp_path, form, count=4)
    task = get_task("chartqa")
    samples = list(task.samples(tmp_path))
    assert ids(samples) == ["human_0", "human_1", "augmented_0", "augmented_1"]
    augmented = list(task.samples(tmp_path, split="augmented"))
    assert ids(augmented) == ["augmented_0", "augmented_1"]
    assert sizes(augmented) == [e["size"] for e in expected[2:]]
    predictions = [e["answers"][0] for e in expected[:3]] + ["no"]
    summary = task.aggregate(records(task, samples, predictions))
    assert summary == {"score": 0.75, "count": 4, "human": 1.0, "augmented": 0.5}
    with pytest.raises(ConfigError, match="no split 'val'; available: augmented, human"):
        task.samples(tmp_path, split="val")


def test_gqa_official_names_its_question_files(tmp_path):
    write_benchmark("gqa", tmp_path)
    with pytest.raises(ConfigError, match="no split 'val_balanced'; available: testdev_balanced"):
        get_task("gqa").samples(tmp_path, split="val_balanced")


def test_vqav2_official_image_names(tmp_path):
    write_benchmark("vqav2", tmp_path, count=1)
    (sample,) = get_task("vqav2").samples(tmp_path)
    assert (sample.id, Path(sample.image).name) == ("262148000", "COCO_val2014_000000262148.jpg")


@pytest.mark.parametrize("form", FORMS)
def test_pope_categories(tmp_path, form):
    write_benchmark("pope", tmp_path, form, count=6)
    task = get_task("pope")
    samples = list(task.samples(tmp_path))  # question ids repeat across categories
    assert ids(samples) == ["random_1", "random_2", "popular_1", "popular_2", "adversarial_1", "adversarial_2"]
    assert samples[4].extra == {"category": "adversarial"}
    assert ids(task.samples(tmp_path, split="popular")) == ["popular_1", "popular_2"]
    with pytest.raises(ConfigError, match="no split 'hard'; available: adversarial, popular, random"):
        task.samples(tmp_path, split="hard")


def test_scienceqa_official_keeps_problems_with_an_image(tmp_path):
    write_benchmark("scienceqa", tmp_path, count=2)  # besides: test problem 3 has no image, 1 is in val
    task = get_task("scienceqa")
    samples = list(task.samples(tmp_path))
    assert ids(samples) == ["4", "8"]
    assert samples[1].extra == {"choices": ["trout", "koala"], "hint": "", "answer_index": 1}
    assert ids(task.samples(tmp_path, split="val")) == ["1"]
    with pytest.raises(ConfigError, match="no split 'dev'; available: test, train, val"):
        task.samples(tmp_path, split="dev")


@pytest.mark.parametrize("form", FORMS)
def test_ocrbench_summary_by_category(tmp_path, form):
    expected = write_benchmark("ocrbench", tmp_path, form, count=2)  # a word, then a formula
    task = get_task("ocrbench")
    samples = list(task.samples(tmp_path))
    summary = task.aggregate(records(task, samples, [expected[0]["answers"][0], "y"]))
    assert summary == {"score": 0.5, "count": 2, "Regular Text Recognition": 1.0, HME: 0.0}


# --- errors -----------------------------------------------------------------------------------------------------


def test_missing_files_name_what_is_expected(tmp_path):
    with pytest.raises(ConfigError, match=r"TextVQA_0\.5\.1_val\.json not found.*official layout.*save_to_disk"):
        get_task("textvqa").samples(tmp_path)
    with pytest.raises(ConfigError, match="does-not-exist not found"):
        get_task("docvqa").samples(tmp_path / "does-not-exist")
    write_json(tmp_path / "TextVQA_0.5.1_val.json", {"data": []})
    with pytest.raises(ConfigError, match="train_images not found"):
        get_task("textvqa").samples(tmp_path)
    with pytest.raises(ConfigError, match=r"coco_pope_random\.json not found"):
        get_task("pope").samples(tmp_path)


def test_unknown_split_lists_the_available_ones(tmp_path):
    with pytest.raises(ConfigError, match="no split 'test'; available: val"):
        get_task("textvqa").samples(tmp_path, split="test")
    with pytest.raises(ConfigError, match="no split 'train'; available: test"):
        get_task("ocrbench").samples(tmp_path, split="train")

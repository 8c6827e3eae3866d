"""Benchmark adapters read tiny copies written here (official layouts and `datasets` copies), prompt and score."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import datasets
import pytest
from PIL import Image

from crop.errors import ConfigError
from crop.evaluation.tasks import TASKS, EvalSample, Task, get_task
from crop.image import load_image

SHORT = "\nAnswer the question using a single word or phrase."


def write_image(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)


def png_bytes(size: tuple[int, int]) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", size, (30, 30, 200)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def write_json(path: Path, content: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content), encoding="utf-8")


def hub_copy(path: Path, form: str, split: str, columns: dict, features: dict) -> Path:
    """A `datasets` copy of one split at `path`: a save_to_disk folder or a Hub-like folder of parquet files."""
    dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    if form == "disk":
        datasets.DatasetDict({split: dataset}).save_to_disk(str(path))
    else:
        (path / "data").mkdir(parents=True)
        dataset.to_parquet(str(path / "data" / f"{split}-00000-of-00001.parquet"))
    return path


def records(task: Task, samples: list[EvalSample], predictions: list[str]) -> list[dict]:
    return [
        {"id": s.id, "prediction": p, "answers": s.answers, "score": task.score(p, s), "extra": s.extra}
        for s, p in zip(samples, predictions, strict=True)
    ]


def sizes(samples: list[EvalSample]) -> list[tuple[int, int]]:
    return [load_image(sample.image).size for sample in samples]


TEXT = datasets.Value("string")


# --- registry ---------------------------------------------------------------------------------------------------


def test_registry_names_every_benchmark():
    names = ["textvqa", "docvqa", "infovqa", "chartqa", "gqa", "vqav2", "pope", "scienceqa", "ocrbench"]
    assert sorted(TASKS) == sorted(names)
    assert all(get_task(name).name == name for name in names)
    with pytest.raises(ConfigError, match="unknown task 'mmmu'.*textvqa.*ocrbench"):
        get_task("mmmu")


# --- TextVQA ----------------------------------------------------------------------------------------------------

TEXTVQA_ANSWERS = [["stop"] * 10, ["coca cola"] * 7 + ["coke"] * 3]


def test_textvqa_official(tmp_path):
    questions = [
        {"question_id": 34602, "question": "what does the sign say?", "image_id": "a1", "answers": TEXTVQA_ANSWERS[0]},
        {"question_id": 34603, "question": "Which BRAND is it?", "image_id": "b2", "answers": TEXTVQA_ANSWERS[1]},
    ]
    write_json(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "data": questions})
    write_image(tmp_path / "train_images" / "a1.jpg", (40, 30))
    write_image(tmp_path / "train_images" / "b2.jpg", (20, 50))
    task = get_task("textvqa")
    samples = list(task.samples(tmp_path))
    assert [s.id for s in samples] == ["34602", "34603"]
    assert [s.answers for s in samples] == TEXTVQA_ANSWERS
    assert sizes(samples) == [(40, 30), (20, 50)]
    # lmms-eval capitalises the question with str.capitalize, which lower-cases the rest
    assert task.prompt(samples[0]) == "What does the sign say?" + SHORT
    assert task.prompt(samples[1]) == "Which brand is it?" + SHORT
    assert task.score("Stop.", samples[0]) == 1.0
    assert task.score("coke", samples[1]) == pytest.approx(0.9)
    assert task.score("pepsi", samples[1]) == 0.0
    summary = task.aggregate(records(task, samples, ["stop", "pepsi"]))
    assert summary == {"score": 0.5, "count": 2}


@pytest.mark.parametrize("form", ["disk", "parquet"])
def test_textvqa_hub_copy(tmp_path, form):
    columns = {
        "question_id": [34602, 34603],
        "question": ["what does the sign say?", "which brand is it?"],
        "image": [png_bytes((40, 30)), png_bytes((20, 50))],
        "answers": TEXTVQA_ANSWERS,
        "image_id": ["a1", "b2"],
    }
    features = {
        "question_id": datasets.Value("int32"),
        "question": TEXT,
        "image": datasets.Image(),
        "answers": datasets.List(TEXT),
        "image_id": TEXT,
    }
    task = get_task("textvqa")
    path = hub_copy(tmp_path / form, form, "validation", columns, features)
    samples = list(task.samples(path))
    assert [s.id for s in samples] == ["34602", "34603"]
    assert [s.question for s in samples] == columns["question"]
    assert [s.answers for s in samples] == TEXTVQA_ANSWERS
    assert sizes(samples) == [(40, 30), (20, 50)]
    assert task.prompt(samples[1]) == "Which brand is it?" + SHORT
    with pytest.raises(ConfigError, match="no split 'train'.*available: validation"):
        task.samples(path, split="train")
    if form == "parquet":  # a single parquet file is a copy too
        file = path / "data" / "validation-00000-of-00001.parquet"
        assert [s.id for s in task.samples(file)] == ["34602", "34603"]


def test_hub_copy_without_the_columns(tmp_path):
    columns, features = {"question": ["q"], "answer": ["a"]}, {"question": TEXT, "answer": TEXT}
    path = hub_copy(tmp_path / "copy", "disk", "validation", columns, features)
    with pytest.raises(ConfigError, match="lacks the columns question_id, image, answers.*lmms-lab/textvqa"):
        get_task("textvqa").samples(path)


# --- DocVQA / InfographicVQA ------------------------------------------------------------------------------------


def test_docvqa_official(tmp_path):
    questions = [
        {"questionId": 49153, "question": "What is the date?", "image": "documents/p1.png", "answers": ["May 3"]},
        {"questionId": 24581, "question": "Who signed?", "image": "documents/p2.png", "answers": ["J. Smith", "Smith"]},
    ]
    write_json(tmp_path / "val" / "val_v1.0.json", {"dataset_split": "val", "data": questions})
    write_image(tmp_path / "val" / "documents" / "p1.png", (60, 80))
    write_image(tmp_path / "val" / "documents" / "p2.png", (80, 60))
    task = get_task("docvqa")
    samples = list(task.samples(tmp_path / "val"))
    assert [s.id for s in samples] == ["49153", "24581"]
    assert [s.answers for s in samples] == [["May 3"], ["J. Smith", "Smith"]]
    assert sizes(samples) == [(60, 80), (80, 60)]
    assert task.prompt(samples[0]) == "What is the date?" + SHORT
    assert task.score("may 3", samples[0]) == 1.0
    assert task.score("smith", samples[1]) == 1.0
    assert task.score("June 9", samples[0]) == 0.0


@pytest.mark.parametrize("form", ["disk", "parquet"])
def test_docvqa_hub_copy(tmp_path, form):
    columns = {
        "questionId": ["49153", "24581"],
        "question": ["What is the date?", "Who signed?"],
        "question_types": [["form"], ["handwritten"]],
        "image": [png_bytes((60, 80)), png_bytes((80, 60))],
        "answers": [["May 3"], ["J. Smith", "Smith"]],
    }
    features = {
        "questionId": TEXT,
        "question": TEXT,
        "question_types": datasets.List(TEXT),
        "image": datasets.Image(),
        "answers": datasets.List(TEXT),
    }
    # a clone of lmms-lab/DocVQA holds the benchmark in its DocVQA folder
    hub_copy(tmp_path / "DocVQA", form, "validation", columns, features)
    samples = list(get_task("docvqa").samples(tmp_path))
    assert [s.id for s in samples] == ["49153", "24581"]
    assert [s.question for s in samples] == columns["question"]
    assert [s.answers for s in samples] == columns["answers"]
    assert sizes(samples) == [(60, 80), (80, 60)]


def test_infovqa_official(tmp_path):
    questions = [
        {"questionId": 65718, "question": "How many cases?", "image_local_name": "i1.jpeg", "answers": ["1,200"]},
        {"questionId": 65719, "question": "Which country?", "image_local_name": "i2.jpeg", "answers": ["Italy"]},
    ]
    write_json(tmp_path / "infographicsVQA_val_v1.0_withQT.json", {"data": questions})
    write_image(tmp_path / "infographicsvqa_images" / "i1.jpeg", (30, 90))
    write_image(tmp_path / "infographicsvqa_images" / "i2.jpeg", (90, 30))
    task = get_task("infovqa")
    samples = list(task.samples(tmp_path))
    assert [s.id for s in samples] == ["65718", "65719"]
    assert [s.answers for s in samples] == [["1,200"], ["Italy"]]
    assert sizes(samples) == [(30, 90), (90, 30)]
    assert task.prompt(samples[1]) == "Which country?" + SHORT
    assert task.metric == "anls"
    assert task.score("italy", samples[1]) == 1.0
    assert task.score("France", samples[1]) == 0.0


# --- ChartQA ----------------------------------------------------------------------------------------------------


def chartqa_official(root: Path) -> None:
    write_json(root / "test" / "test_human.json", [{"imgname": "c1.png", "query": "Max value?", "label": "12"}])
    write_json(
        root / "test" / "test_augmented.json",
        [
            {"imgname": "c2.png", "query": "Which year?", "label": "2019"},
            {"imgname": "c1.png", "query": "Is it red?", "label": "Yes"},
        ],
    )
    write_image(root / "test" / "png" / "c1.png", (50, 40))
    write_image(root / "test" / "png" / "c2.png", (40, 50))


def test_chartqa_official(tmp_path):
    chartqa_official(tmp_path)
    task = get_task("chartqa")
    samples = list(task.samples(tmp_path))
    assert [s.id for s in samples] == ["human_0", "augmented_0", "augmented_1"]
    assert [s.question for s in samples] == ["Max value?", "Which year?", "Is it red?"]
    assert [s.answers for s in samples] == [["12"], ["2019"], ["Yes"]]
    assert sizes(samples) == [(50, 40), (40, 50), (50, 40)]
    assert task.prompt(samples[0]) == "Max value?\nAnswer the question with a single word."
    assert task.score("12.5", samples[0]) == 1.0  # within 5%
    assert task.score("13", samples[0]) == 0.0
    assert [s.id for s in task.samples(tmp_path, split="augmented")] == ["augmented_0", "augmented_1"]
    summary = task.aggregate(records(task, samples, ["12", "2019", "no"]))
    assert summary == {"score": pytest.approx(2 / 3), "count": 3, "human": 1.0, "augmented": 0.5}
    with pytest.raises(ConfigError, match="no split 'val'; available: augmented, human"):
        task.samples(tmp_path, split="val")


def test_chartqa_hub_copy_selects_a_part(tmp_path):
    columns = {
        "type": ["human_test", "augmented_test", "augmented_test"],
        "question": ["Max value?", "Which year?", "Is it red?"],
        "answer": ["12", "2019", "Yes"],
        "image": [png_bytes((50, 40)), png_bytes((40, 50)), png_bytes((50, 40))],
    }
    features = {"type": TEXT, "question": TEXT, "answer": TEXT, "image": datasets.Image()}
    path = hub_copy(tmp_path / "copy", "parquet", "test", columns, features)
    samples = list(get_task("chartqa").samples(path, split="augmented"))
    assert [s.id for s in samples] == ["augmented_0", "augmented_1"]
    assert [s.answers for s in samples] == [["2019"], ["Yes"]]
    assert sizes(samples) == [(40, 50), (50, 40)]


# --- GQA --------------------------------------------------------------------------------------------------------


def test_gqa_official(tmp_path):
    questions = {
        "20968379": {"imageId": "n288870", "question": "Is the cat on the left?", "answer": "yes", "fullAnswer": "."},
        "201307251": {"imageId": "n166008", "question": "What color is the car?", "answer": "red"},
    }
    write_json(tmp_path / "testdev_balanced_questions.json", questions)
    write_image(tmp_path / "images" / "n288870.jpg", (64, 48))
    write_image(tmp_path / "images" / "n166008.jpg", (48, 64))
    task = get_task("gqa")
    samples = list(task.samples(tmp_path))
    assert [s.id for s in samples] == ["20968379", "201307251"]
    assert [s.answers for s in samples] == [["yes"], ["red"]]
    assert sizes(samples) == [(64, 48), (48, 64)]
    assert task.prompt(samples[1]) == "What color is the car?" + SHORT
    assert task.score("Red.", samples[1]) == 1.0
    assert task.score("blue", samples[1]) == 0.0
    with pytest.raises(ConfigError, match="no split 'val_balanced'; available: testdev_balanced"):
        task.samples(tmp_path, split="val_balanced")


def test_gqa_hub_copy_joins_the_images_config(tmp_path):
    questions = {
        "id": ["20968379", "201307251"],
        "imageId": ["n288870", "n166008"],
        "question": ["Is the cat on the left?", "What color is the car?"],
        "answer": ["yes", "red"],
    }
    images = {"id": ["n166008", "n288870"], "image": [png_bytes((48, 64)), png_bytes((64, 48))]}
    question_features = {name: TEXT for name in questions}
    hub_copy(tmp_path / "testdev_balanced_instructions", "disk", "testdev", questions, question_features)
    hub_copy(tmp_path / "testdev_balanced_images", "disk", "testdev", images, {"id": TEXT, "image": datasets.Image()})
    samples = list(get_task("gqa").samples(tmp_path))
    assert [s.id for s in samples] == ["20968379", "201307251"]
    assert [s.answers for s in samples] == [["yes"], ["red"]]
    assert sizes(samples) == [(64, 48), (48, 64)]


# --- VQAv2 ------------------------------------------------------------------------------------------------------


def test_vqav2_official(tmp_path):
    write_json(
        tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json",
        {"questions": [{"image_id": 42, "question": "How many dogs?", "question_id": 42000}]},
    )
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(["2"] * 9 + ["3"])]
    write_json(
        tmp_path / "v2_mscoco_val2014_annotations.json",
        {"annotations": [{"question_id": 42000, "image_id": 42, "answer_type": "number", "answers": answers}]},
    )
    write_image(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg", (32, 24))
    task = get_task("vqav2")
    (sample,) = task.samples(tmp_path)
    assert (sample.id, sample.question, sample.answers) == ("42000", "How many dogs?", ["2"] * 9 + ["3"])
    assert Path(sample.image).name == "COCO_val2014_000000000042.jpg"
    assert sizes([sample]) == [(32, 24)]
    assert task.prompt(sample) == "How many dogs?" + SHORT
    assert task.score("two", sample) == 1.0
    assert task.score("3", sample) == pytest.approx(0.3)


# --- POPE -------------------------------------------------------------------------------------------------------


def pope_lines(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def test_pope_official(tmp_path):
    image = "COCO_val2014_000000310196.jpg"
    write_image(tmp_path / "val2014" / image, (70, 50))
    for category in ("random", "popular", "adversarial"):
        rows = [
            {"question_id": 1, "image": image, "text": f"Is there a {category} dog in the image?", "label": "yes"},
            {"question_id": 2, "image": image, "text": " Is there a cat in the image? ", "label": "no"},
        ]
        pope_lines(tmp_path / f"coco_pope_{category}.json", rows)
    task = get_task("pope")
    samples = list(task.samples(tmp_path))
    assert [s.id for s in samples][:3] == ["random_1", "random_2", "popular_1"]
    assert len(samples) == 6
    assert [s.answers for s in samples[:2]] == [["yes"], ["no"]]
    assert samples[4].extra == {"category": "adversarial"}
    assert sizes(samples[:1]) == [(70, 50)]
    assert task.prompt(samples[1]) == "Is there a cat in the image?" + SHORT
    assert task.score("Yes, there is a dog.", samples[0]) == 1.0
    assert task.score("No, there is not.", samples[0]) == 0.0
    assert [s.id for s in task.samples(tmp_path, split="popular")] == ["popular_1", "popular_2"]
    with pytest.raises(ConfigError, match="no split 'hard'; available: adversarial, popular, random"):
        task.samples(tmp_path, split="hard")


@pytest.mark.parametrize("form", ["disk", "parquet"])
def test_pope_hub_copy(tmp_path, form):
    columns = {
        "id": ["0", "1", "2"],
        "question_id": ["1", "2", "1"],
        "question": ["Is there a dog in the image?", "Is there a cat in the image?", "Is there a car in the image?"],
        "answer": ["yes", "no", "no"],
        "image_source": ["a", "a", "b"],
        "image": [png_bytes((70, 50)), png_bytes((70, 50)), png_bytes((50, 70))],
        "category": ["adversarial", "adversarial", "random"],
    }
    features = {name: TEXT for name in columns} | {"image": datasets.Image()}
    path = hub_copy(tmp_path / "copy", form, "test", columns, features)
    task = get_task("pope")
    samples = list(task.samples(path))
    assert [s.id for s in samples] == ["adversarial_1", "adversarial_2", "random_1"]
    assert [s.answers for s in samples] == [["yes"], ["no"], ["no"]]
    assert sizes(samples) == [(70, 50), (70, 50), (50, 70)]
    assert [s.id for s in task.samples(path, split="random")] == ["random_1"]


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


# --- ScienceQA --------------------------------------------------------------------------------------------------


def test_scienceqa_official_keeps_problems_with_an_image(tmp_path):
    problems = {
        "7": {
            "question": "What colour is the sky?",
            "choices": ["red", "blue"],
            "answer": 1,
            "hint": "Look up.",
            "image": "image.png",
            "split": "test",
        },
        "8": {
            "question": "Which is a mammal?",
            "choices": ["cat", "trout", "crow"],
            "answer": 0,
            "hint": "",
            "image": "image.png",
            "split": "test",
        },
        "9": {
            "question": "No picture?",
            "choices": ["a", "b"],
            "answer": 0,
            "hint": "",
            "image": None,
            "split": "test",
        },
        "10": {
            "question": "Other",
            "choices": ["a", "b"],
            "answer": 0,
            "hint": "",
            "image": "image.png",
            "split": "val",
        },
    }
    write_json(tmp_path / "problems.json", problems)
    write_json(tmp_path / "pid_splits.json", {"train": [], "val": ["10"], "test": ["7", "8", "9"]})
    write_image(tmp_path / "images" / "test" / "7" / "image.png", (36, 28))
    write_image(tmp_path / "images" / "test" / "8" / "image.png", (28, 36))
    task = get_task("scienceqa")
    samples = list(task.samples(tmp_path))
    assert [s.id for s in samples] == ["7", "8"]
    assert [s.answers for s in samples] == [["B"], ["A"]]
    assert samples[0].extra == {"choices": ["red", "blue"], "hint": "Look up.", "answer_index": 1}
    assert sizes(samples) == [(36, 28), (28, 36)]
    post = "\nAnswer with the option's letter from the given choices directly."
    assert task.prompt(samples[0]) == "Context: Look up.\nWhat colour is the sky?\nA. red\nB. blue" + post
    assert task.prompt(samples[1]) == "Which is a mammal?\nA. cat\nB. trout\nC. crow" + post
    assert task.score("B", samples[0]) == 1.0
    assert task.score("A. red", samples[0]) == 0.0
    with pytest.raises(ConfigError, match="no split 'dev'; available: test, train, val"):
        task.samples(tmp_path, split="dev")


def test_scienceqa_hub_copy(tmp_path):
    columns = {
        "image": [png_bytes((36, 28)), png_bytes((28, 36))],
        "question": ["What colour is the sky?", "Which is a mammal?"],
        "choices": [["red", "blue"], ["cat", "trout", "crow"]],
        "answer": [1, 0],
        "hint": ["Look up.", ""],
    }
    features = {
        "image": datasets.Image(),
        "question": TEXT,
        "choices": datasets.List(TEXT),
        "answer": datasets.Value("int8"),
        "hint": TEXT,
    }
    hub_copy(tmp_path / "ScienceQA-IMG", "disk", "test", columns, features)
    task = get_task("scienceqa")
    samples = list(task.samples(tmp_path))
    assert [s.id for s in samples] == ["0", "1"]
    assert [s.answers for s in samples] == [["B"], ["A"]]
    assert sizes(samples) == [(36, 28), (28, 36)]
    assert task.prompt(samples[1]).startswith("Which is a mammal?\nA. cat\n")


# --- OCRBench ---------------------------------------------------------------------------------------------------


def test_ocrbench_official(tmp_path):
    items = [
        {
            "dataset_name": "IIIT5K",
            "id": 211,
            "image_path": "IIIT5K/test/1.png",
            "question": "what is written in the image? ",
            "answers": "CENTRE",
            "type": "Regular Text Recognition",
        },
        {
            "dataset_name": "HME100k",
            "id": 211,
            "image_path": "HME100k/2.jpg",
            "question": "Please write out the expression of the formula in the image using LaTeX format.",
            "answers": ["x ^ { 2 }"],
            "type": "Handwritten Mathematical Expression Recognition",
        },
    ]
    write_json(tmp_path / "OCRBench" / "OCRBench.json", items)
    write_image(tmp_path / "OCRBench_Images" / "IIIT5K" / "test" / "1.png", (44, 22))
    write_image(tmp_path / "OCRBench_Images" / "HME100k" / "2.jpg", (22, 44))
    task = get_task("ocrbench")
    samples = list(task.samples(tmp_path))
    assert [s.id for s in samples] == ["0", "1"]
    assert [s.answers for s in samples] == [["CENTRE"], ["x ^ { 2 }"]]
    assert sizes(samples) == [(44, 22), (22, 44)]
    assert task.prompt(samples[0]) == "what is written in the image?"
    assert task.score("The text is centre.", samples[0]) == 1.0
    assert task.score("x^{2}", samples[1]) == 1.0
    assert task.score("CENTER", samples[0]) == 0.0
    summary = task.aggregate(records(task, samples, ["centre", "y"]))
    assert summary == {
        "score": 0.5,
        "count": 2,
        "Regular Text Recognition": 1.0,
        "Handwritten Mathematical Expression Recognition": 0.0,
    }


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


def test_empty_run_has_no_mean():
    assert math.isnan(get_task("gqa").aggregate([])["score"])

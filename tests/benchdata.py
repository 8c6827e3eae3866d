"""Tiny copies of the benchmarks for tests, in their official layouts or as Hugging Face `datasets` copies.

`write_benchmark(name, root, form)` writes a few samples of one benchmark under `root` and returns what a reader of
`root` must yield. The expected prompts are lmms-eval's templates written out here by hand, never computed with a
task's `prompt`, so that a test comparing against them can fail.

Forms: "official" is the layout the benchmark's authors publish; "disk" is a `save_to_disk` folder and "parquet" a
folder of parquet files, both with the columns of the copy lmms-eval evaluates and laid out like a clone of that Hub
dataset: in the config's folder where the benchmark is one config of a larger dataset (lmms-lab/DocVQA,
lmms-lab/GQA, lmms-lab/ScienceQA), else at `root` (disk) or in `root`/data (parquet). Every benchmark has all three.

Each sample n (from 1) has its own question, answers and image, whose width grows by 8 pixels per sample, so that a
test can tell which image was read.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import datasets
from PIL import Image

FORMS = ("official", "disk", "parquet")

SHORT = "\nAnswer the question using a single word or phrase."  # textvqa, docvqa, infovqa, gqa, vqav2, pope
CHART = "\nAnswer the question with a single word."  # chartqa
CHOICE = "\nAnswer with the option's letter from the given choices directly."  # scienceqa_img

TEXT = datasets.Value("string")
TEXTS = datasets.List(TEXT)
IMAGE = datasets.Image()
INT = datasets.Value("int64")


@dataclass
class Sample:
    """One question: what a reader must yield, and the benchmark's own fields that the files need besides."""

    id: str
    question: str
    answers: list[str]
    size: tuple[int, int]
    prompt: str
    fields: dict = field(default_factory=dict)
    hub_id: str | None = None
    """The id a reader gives the sample in a `datasets` copy, where it differs from the official one."""

    def expected(self, form: str) -> dict:
        hub = form != "official" and self.hub_id is not None
        return {
            "id": self.hub_id if hub else self.id,
            "question": self.question,
            "answers": list(self.answers),
            "size": self.size,
            "prompt": self.prompt,
        }


class Table(NamedTuple):
    """One split of a `datasets` copy: its folder in a clone of the Hub dataset (None: the top), split and rows."""

    folder: str | None
    split: str
    features: dict[str, Any]
    rows: list[dict]


@dataclass(frozen=True)
class Benchmark:
    samples: Callable[[list[tuple[int, int]]], list[Sample]]
    official: Callable[[Path, list[Sample]], None]
    hub: Callable[[list[Sample]], list[Table]]


def write_benchmark(
    name: str, root: Path, form: str = "official", count: int = 3, image_size: tuple[int, int] = (64, 48)
) -> list[dict]:
    """Writes `count` samples of benchmark `name` under `root` in `form`; returns what a reader must yield, one dict per
    sample in reading order: {"id": str, "question": str, "answers": list[str], "size": (w, h), "prompt": str}."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; known: {', '.join(FORMS)}")
    if form == "disk" and count < 1:
        raise ValueError("a save_to_disk copy needs a sample: `datasets` cannot load one of no rows")
    benchmark, root = BENCHMARKS[name], Path(root)
    width, height = image_size
    samples = benchmark.samples([(width + 8 * i, height) for i in range(count)])
    root.mkdir(parents=True, exist_ok=True)
    if form == "official":
        benchmark.official(root, samples)
    else:
        for table in benchmark.hub(samples):
            write_table(root / (table.folder or ("" if form == "disk" else "data")), form, table)
    return [sample.expected(form) for sample in samples]


# --- files ------------------------------------------------------------------------------------------------------


def write_image(path: Path, size: tuple[int, int]) -> None:
    """A plain image of `size`, in the format the file name's extension says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)


def png(size: tuple[int, int]) -> dict:
    """A PNG image of `size` as a `datasets.Image` value."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (30, 30, 200)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def write_json(path: Path, content: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content), encoding="utf-8")


def write_json_lines(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def folder(path: Path) -> Path:
    """`path`, created: image folders exist even when no sample has an image in them."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_table(path: Path, form: str, table: Table) -> Path:
    """One split at `path`: a save_to_disk folder ("disk") or a folder of one parquet file named as on the Hub."""
    columns = {name: [row[name] for row in table.rows] for name in table.features}  # from_list refuses no rows
    dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(table.features))
    if form == "disk":
        datasets.DatasetDict({table.split: dataset}).save_to_disk(str(path))
    else:
        path.mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(path / f"{table.split}-00000-of-00001.parquet"))
    return path


def blocks(count: int, names: tuple[str, ...]) -> list[str]:
    """`count` samples split into consecutive runs, one per name in order (fewer names when count is smaller)."""
    return [names[i * len(names) // count] for i in range(count)]


# --- TextVQA: TextVQA_0.5.1_val.json + train_images/; lmms-lab/textvqa -----------------------------------------


def textvqa_samples(sizes: list[tuple[int, int]]) -> list[Sample]:
    # lmms-eval capitalises the question with str.capitalize, which also lower-cases the rest
    return [
        Sample(
            id=str(34601 + n),
            question=f"what NUMBER is on the jersey of player {n}?",
            answers=[str(20 + n)] * (10 - n % 4) + [f"number {20 + n}"] * (n % 4),
            size=size,
            prompt=f"What number is on the jersey of player {n}?{SHORT}",
            fields={"image_id": f"{n:04x}c91397f2fe05"},
        )
        for n, size in enumerate(sizes, 1)
    ]


def textvqa_official(root: Path, samples: list[Sample]) -> None:
    images = folder(root / "train_images")  # the validation images ship in train_images/
    data = []
    for s in samples:
        image_id = s.fields["image_id"]
        data.append({"question_id": int(s.id), "question": s.question, "image_id": image_id, "answers": s.answers})
        write_image(images / f"{image_id}.jpg", s.size)
    write_json(root / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_version": "0.5.1", "data": data})


def textvqa_hub(samples: list[Sample]) -> list[Table]:
    features = {"image_id": TEXT, "question_id": datasets.Value("int32"), "question": TEXT, "image": IMAGE}
    features |= {"answers": TEXTS, "set_name": TEXT}
    rows = [
        {"image_id": s.fields["image_id"], "question_id": int(s.id), "question": s.question, "image": png(s.size)}
        | {"answers": s.answers, "set_name": "val"}
        for s in samples
    ]
    return [Table(None, "validation", features, rows)]


# --- DocVQA: val_v1.0.json + documents/; lmms-lab/DocVQA, config DocVQA ----------------------------------------


def docvqa_samples(sizes: list[tuple[int, int]]) -> list[Sample]:
    return [
        Sample(
            id=str(49152 + n),
            question=f"What is the date of letter {n}?",
            answers=[f"May {n}, 1985", f"{n} May 1985"],
            size=size,
            prompt=f"What is the date of letter {n}?{SHORT}",
            fields={"document": f"xnbl{n:04d}_2", "question_types": ["form"] if n % 2 else ["handwritten"]},
        )
        for n, size in enumerate(sizes, 1)
    ]


def docvqa_official(root: Path, samples: list[Sample]) -> None:
    folder(root / "documents")
    data = []
    for s in samples:
        image = f"documents/{s.fields['document']}.png"  # relative to the json's folder
        data.append({"questionId": int(s.id), "question": s.question, "image": image, "answers": s.answers})
        write_image(root / image, s.size)
    write_json(root / "val_v1.0.json", {"dataset_name": "docvqa", "dataset_split": "val", "data": data})


def docvqa_hub(samples: list[Sample]) -> list[Table]:
    features = {"questionId": TEXT, "question": TEXT, "question_types": TEXTS, "image": IMAGE, "docId": INT}
    features |= {"answers": TEXTS, "data_split": TEXT}
    rows = [
        {"questionId": s.id, "question": s.question, "question_types": s.fields["question_types"], "image": png(s.size)}
        | {"docId": 14465 + i, "answers": s.answers, "data_split": "val"}
        for i, s in enumerate(samples)
    ]
    return [Table("DocVQA", "validation", features, rows)]


# --- InfographicVQA: infographicsVQA_val_v1.0_withQT.json + infographicsvqa_images/; config InfographicVQA ----


def infovqa_samples(sizes: list[tuple[int, int]]) -> list[Sample]:
    return [
        Sample(
            id=str(65717 + n),
            question=f"How many cases were reported in week {n}?",
            answers=[f"{150 * n + 1000:,}", str(150 * n + 1000)],
            size=size,
            prompt=f"How many cases were reported in week {n}?{SHORT}",
            fields={"image": f"{37312 + n}.jpeg"},
        )
        for n, size in enumerate(sizes, 1)
    ]


def infovqa_official(root: Path, samples: list[Sample]) -> None:
    images = folder(root / "infographicsvqa_images")
    data = []
    for s in samples:
        name = s.fields["image"]
        data.append(
            {"questionId": int(s.id), "question": s.question, "image_local_name": name, "answers": s.answers}
            | {"answer_type": ["single span"], "data_split": "val"}
        )
        write_image(images / name, s.size)
    write_json(root / "infographicsVQA_val_v1.0_withQT.json", {"dataset_split": "val", "data": data})


def infovqa_hub(samples: list[Sample]) -> list[Table]:
    features = {"questionId": TEXT, "question": TEXT, "answers": TEXTS, "answer_type": TEXTS, "image": IMAGE}
    features |= {"image_url": TEXT, "ocr": TEXT, "data_split": TEXT}
    rows = [
        {"questionId": s.id, "question": s.question, "answers": s.answers, "answer_type": ["single span"]}
        | {"image": png(s.size), "image_url": f"https://example.org/{s.fields['image']}", "ocr": "{}"}
        | {"data_split": "val"}
        for s in samples
    ]
    return [Table("InfographicVQA", "validation", features, rows)]


# --- ChartQA: test/test_human.json, test/test_augmented.json + test/png/; lmms-lab/ChartQA ----------------------

CHARTQA_PARTS = ("human", "augmented")


def chartqa_samples(sizes: list[tuple[int, int]]) -> list[Sample]:
    """The first half are human-written questions, the rest generated ones (the readers' order)."""
    parts, seen, samples = blocks(len(sizes), CHARTQA_PARTS), {part: 0 for part in CHARTQA_PARTS}, []
    for n, (part, size) in enumerate(zip(parts, sizes, strict=True), 1):
        samples.append(
            Sample(
                id=f"{part}_{seen[part]}",
                question=f"What was the value in {2010 + n}?",
                answers=[str(7 * n + 5)],
                size=size,
                prompt=f"What was the value in {2010 + n}?{CHART}",
                fields={"part": part, "image": f"{41699051005346 + n}.png"},
            )
        )
        seen[part] += 1
    return samples


def chartqa_official(root: Path, samples: list[Sample]) -> None:
    images = folder(root / "test" / "png")
    for part in CHARTQA_PARTS:
        chosen = [s for s in samples if s.fields["part"] == part]
        items = [{"imgname": s.fields["image"], "query": s.question, "label": s.answers[0]} for s in chosen]
        write_json(root / "test" / f"test_{part}.json", items)
    for s in samples:
        write_image(images / s.fields["image"], s.size)


def chartqa_hub(samples: list[Sample]) -> list[Table]:
    features = {"type": TEXT, "question": TEXT, "answer": TEXT, "image": IMAGE}
    rows = [
        {"type": f"{s.fields['part']}_test", "question": s.question, "answer": s.answers[0], "image": png(s.size)}
        for s in samples
    ]
    return [Table(None, "test", features, rows)]


# --- GQA: testdev_balanced_questions.json + images/; lmms-lab/GQA, two configs joined on imageId -----------------


def gqa_samples(sizes: list[tuple[int, int]]) -> list[Sample]:
    colours = ("red", "black", "white", "brown", "blue")
    return [
        Sample(
            id=str(201307250 + n),
            question=f"What color is the car in front of house {n}?",
            answers=[colours[n % len(colours)]],
            size=size,
            prompt=f"What color is the car in front of house {n}?{SHORT}",
            fields={"image_id": f"n{288869 + n}"},
        )
        for n, size in enumerate(sizes, 1)
    ]


def gqa_official(root: Path, samples: list[Sample]) -> None:
    images = folder(root / "images")
    questions = {}
    for s in samples:
        questions[s.id] = {"imageId": s.fields["image_id"], "question": s.question, "answer": s.answers[0]}
        questions[s.id] |= {"fullAnswer": f"The car is {s.answers[0]}.", "isBalanced": True}
        write_image(images / f"{s.fields['image_id']}.jpg", s.size)
    write_json(root / "testdev_balanced_questions.json", questions)


def gqa_hub(samples: list[Sample]) -> list[Table]:
    features = {"id": TEXT, "imageId": TEXT, "question": TEXT, "answer": TEXT, "fullAnswer": TEXT}
    rows = [
        {"id": s.id, "imageId": s.fields["image_id"], "question": s.question, "answer": s.answers[0]}
        | {"fullAnswer": f"The car is {s.answers[0]}."}
        for s in samples
    ]
    # the images config, in another order than the questions: the reader joins them on imageId = id
    images = [{"id": s.fields["image_id"], "image": png(s.size)} for s in reversed(samples)]
    return [
        Table("testdev_balanced_instructions", "testdev", features, rows),
        Table("testdev_balanced_images", "testdev", {"id": TEXT, "image": IMAGE}, images),
    ]


# --- VQAv2: questions and annotations json + val2014/COCO_val2014_<12 digits>.jpg; lmms-lab/VQAv2 ---------------

VQAV2_ANSWER = {"answer": TEXT, "answer_confidence": TEXT, "answer_id": INT}


def vqav2_samples(sizes: list[tuple[int, int]]) -> list[Sample]:
    return [
        Sample(
            id=str((262147 + n) * 1000),  # question ids are image id * 1000 + k
            question=f"How many people are on bench {n}?",
            answers=[str(n)] * 9 + [str(n + 1)],
            size=size,
            prompt=f"How many people are on bench {n}?{SHORT}",
            fields={"image_id": 262147 + n},
        )
        for n, size in enumerate(sizes, 1)
    ]


def vqav2_records(answers: list[str]) -> list[dict]:
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i} for i, a in enumerate(answers, 1)]


def vqav2_official(root: Path, samples: list[Sample]) -> None:
    images = folder(root / "val2014")
    questions, annotations = [], []
    for s in samples:
        image_id = s.fields["image_id"]
        questions.append({"image_id": image_id, "question": s.question, "question_id": int(s.id)})
        annotations.append(
            {"question_id": int(s.id), "image_id": image_id, "question_type": "how many", "answer_type": "number"}
            | {"multiple_choice_answer": s.answers[0], "answers": vqav2_records(s.answers)}
        )
        write_image(images / f"COCO_val2014_{image_id:012d}.jpg", s.size)
    write_json(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"data_subtype": "val2014", "questions": questions})
    # annotations in another order than the questions: the reader joins them on question_id
    annotations.reverse()
    write_json(root / "v2_mscoco_val2014_annotations.json", {"data_subtype": "val2014", "annotations": annotations})


def vqav2_hub(samples: list[Sample]) -> list[Table]:
    features = {"question_type": TEXT, "multiple_choice_answer": TEXT, "answers": datasets.List(VQAV2_ANSWER)}
    features |= {"image_id": INT, "answer_type": TEXT, "question_id": INT, "question": TEXT, "image": IMAGE}
    rows = [
        {"question_type": "how many", "multiple_choice_answer": s.answers[0], "answers": vqav2_records(s.answers)}
        | {"image_id": s.fields["image_id"], "answer_type": "number", "question_id": int(s.id)}
        | {"question": s.question, "image": png(s.size)}
        for s in samples
    ]
    return [Table(None, "validation", features, rows)]


# --- POPE: coco_pope_<category>.json (JSON lines) + val2014/; lmms-lab/POPE ------------------------------------

POPE_CATEGORIES = ("random", "popular", "adversarial")
POPE_OBJECTS = ("dog", "cat", "car", "person", "bottle", "chair", "umbrella", "book")


def pope_samples(sizes: list[tuple[int, int]]) -> list[Sample]:
    """Consecutive runs of the three categories in the readers' order; answers alternate yes and no.

    Question ids restart at 1 in each category, as in the official files; every second question has stray spaces,
    which lmms-eval strips."""
    categories, seen, samples = blocks(len(sizes), POPE_CATEGORIES), dict.fromkeys(POPE_CATEGORIES, 0), []
    for n, (category, size) in enumerate(zip(categories, sizes, strict=True), 1):
        seen[category] += 1
        thing = f"{POPE_OBJECTS[(n - 1) % len(POPE_OBJECTS)]} {n}"
        question = f"Is there a {thing} in the image?"
        samples.append(
            Sample(
                id=f"{category}_{seen[category]}",
                question=f" {question} " if n % 2 == 0 else question,
                answers=["yes" if n % 2 else "no"],
                size=size,
                prompt=f"Is there a {thing} in the image?{SHORT}",
                fields={"category": category, "question_id": seen[category], "image_id": 310195 + n},
            )
        )
    return samples


def pope_official(root: Path, samples: list[Sample]) -> None:
    images = folder(root / "val2014")
    for category in POPE_CATEGORIES:
        rows = [
            {"question_id": s.fields["question_id"], "image": f"COCO_val2014_{s.fields['image_id']:012d}.jpg"}
            | {"text": s.question, "label": s.answers[0]}
            for s in samples
            if s.fields["category"] == category
        ]
        write_json_lines(root / f"coco_pope_{category}.json", rows)
    for s in samples:
        write_image(images / f"COCO_val2014_{s.fields['image_id']:012d}.jpg", s.size)


def pope_hub(samples: list[Sample]) -> list[Table]:
    columns = ("id", "question_id", "question", "answer", "image_source", "image", "category")
    features = dict.fromkeys(columns, TEXT) | {"image": IMAGE}
    rows = [
        {"id": str(i), "question_id": str(s.fields["question_id"]), "question": s.question, "answer": s.answers[0]}
        | {"image_source": f"COCO_val2014_{s.fields['image_id']:012d}", "image": png(s.size)}
        | {"category": s.fields["category"]}
        for i, s in enumerate(samples)
    ]
    return [Table(None, "test", features, rows)]


# --- ScienceQA-IMG: problems.json, pid_splits.json + images/<split>/<pid>/image.png; lmms-lab/ScienceQA ----------


def scienceqa_samples(sizes: list[tuple[int, int]]) -> list[Sample]:
    """Odd samples have a hint and three choices, even ones no hint and two; ids are problem ids in the official
    layout and row positions in a `datasets` copy."""
    samples = []
    for n, size in enumerate(sizes, 1):
        if n % 2:
            hint = f"The diagram is a model of two solutions in beaker {n}. Each ball is one particle of solute."
            question = f"Which solution in beaker {n} has a higher concentration of particles?"
            choices = ["Solution A", "Solution B", "neither; their concentrations are the same"]
            answer = n % 3
            prompt = (
                f"Context: {hint}\n{question}\n"
                f"A. Solution A\nB. Solution B\nC. neither; their concentrations are the same{CHOICE}"
            )
        else:
            hint, question, choices, answer = "", f"Which animal in picture {n} is a mammal?", ["trout", "koala"], 1
            prompt = f"{question}\nA. trout\nB. koala{CHOICE}"
        fields = {"hint": hint, "choices": choices, "answer": answer}
        samples.append(Sample(str(4 * n), question, ["ABC"[answer]], size, prompt, fields, hub_id=str(n - 1)))
    return samples


def scienceqa_problem(s: Sample) -> dict:
    problem = {"question": s.question, "choices": s.fields["choices"], "answer": s.fields["answer"]}
    return problem | {"hint": s.fields["hint"], "image": "image.png", "task": "closed choice", "split": "test"}


def scienceqa_official(root: Path, samples: list[Sample]) -> None:
    """Besides the samples: a test problem without an image and a val problem, which a reader of test skips."""
    problems, test_ids = {}, []
    for s in samples:
        problems[s.id] = scienceqa_problem(s)
        test_ids.append(s.id)
        write_image(root / "images" / "test" / s.id / "image.png", s.size)
    other = {"question": "Which word is a noun?", "choices": ["dog", "run"], "answer": 0, "hint": ""}
    problems["3"] = other | {"image": None, "task": "closed choice", "split": "test"}
    test_ids.insert(1, "3")
    problems["1"] = other | {"image": "image.png", "task": "closed choice", "split": "val"}
    write_image(root / "images" / "val" / "1" / "image.png", (8, 8))
    folder(root / "images" / "test")
    write_json(root / "problems.json", problems)
    write_json(root / "pid_splits.json", {"train": [], "val": ["1"], "test": test_ids})


def scienceqa_hub(samples: list[Sample]) -> list[Table]:
    features = {"image": IMAGE, "question": TEXT, "choices": TEXTS, "answer": datasets.Value("int8"), "hint": TEXT}
    features |= {"task": TEXT, "subject": TEXT}
    rows = [
        {"image": png(s.size), "question": s.question, "choices": s.fields["choices"], "answer": s.fields["answer"]}
        | {"hint": s.fields["hint"], "task": "closed choice", "subject": "natural science"}
        for s in samples
    ]
    return [Table("ScienceQA-IMG", "test", features, rows)]


# --- OCRBench: OCRBench/OCRBench.json + OCRBench_Images/; echo840/OCRBench --------------------------------------

# (category, source dataset, image path, question, answers) of the questions, taken in turn; {n}: the sample's number
OCRBENCH = (
    ("Regular Text Recognition", "IIIT5K", "IIIT5K/test/{n}.png", "what is written in image {n}? ", ["CENTRE{n}"]),
    (
        "Handwritten Mathematical Expression Recognition",
        "HME100k",
        "HME100k/{n}.jpg",
        "Please write out the expression of formula {n} in the image using LaTeX format.",
        ["x ^ { {n} }", "x^{{n}}"],
    ),
    ("Scene Text-centric VQA", "textVQA", "textVQA/{n}.jpg", "what is the number on bus {n}?", ["{n}42"]),
)


def ocrbench_samples(sizes: list[tuple[int, int]]) -> list[Sample]:
    """Ids are positions in OCRBench.json; the categories are taken in turn, starting with text recognition."""
    samples = []
    for i, size in enumerate(sizes):
        category, source, path, question, answers = OCRBENCH[i % len(OCRBENCH)]
        n = str(i + 1)  # str.replace, not format: the LaTeX answers hold braces
        question, answers = question.replace("{n}", n), [a.replace("{n}", n) for a in answers]
        fields = {"category": category, "dataset": source, "image": path.replace("{n}", n)}
        samples.append(Sample(str(i), question, answers, size, question.strip(), fields))
    return samples


def ocrbench_official(root: Path, samples: list[Sample]) -> None:
    """OCRBench.json stores a single answer as a bare string, and repeats ids across source datasets."""
    items = [
        {"dataset_name": s.fields["dataset"], "id": 211, "image_path": s.fields["image"], "question": s.question}
        | {"answers": s.answers[0] if len(s.answers) == 1 else s.answers, "type": s.fields["category"]}
        for s in samples
    ]
    write_json(root / "OCRBench" / "OCRBench.json", items)
    images = folder(root / "OCRBench_Images")
    for s in samples:
        write_image(images / s.fields["image"], s.size)


def ocrbench_hub(samples: list[Sample]) -> list[Table]:
    features = {"dataset": TEXT, "question": TEXT, "question_type": TEXT, "answer": TEXTS, "image": IMAGE}
    rows = [
        {"dataset": s.fields["dataset"], "question": s.question, "question_type": s.fields["category"]}
        | {"answer": s.answers, "image": png(s.size)}
        for s in samples
    ]
    return [Table(None, "test", features, rows)]


# --- MME: MME_Benchmark_release_version/<subtask>/ (images and <name>.txt, or images/, questions_answers_YN/)


MME_SUBTASKS = (("existence", ".png", False), ("artwork", ".jpg", True), ("code_reasoning", ".png", False))
"""(subtask, image suffix, whether it keeps images/ and questions_answers_YN/ apart), in MME's reading order."""


def mme_samples(sizes: list[tuple[int, int]]) -> list[Sample]:
    """Two questions per image (the last image may have one), images dealt to the subtasks in turn; in reading
    order: subtask, then image name, then line. Ids: "<subtask>/<image>#<line>" (a `datasets` copy: #<row>)."""
    samples = []
    for i in range(len(sizes)):
        image, line = i // 2, i % 2
        size = sizes[2 * image]  # both questions of an image see it at one size
        subtask, suffix, _ = MME_SUBTASKS[image % len(MME_SUBTASKS)]
        name = f"{image:04d}{suffix}"
        question = f"Is there a {'red' if line == 0 else 'blue'} thing in picture {image}? Please answer yes or no."
        prompt = f"Is there a {'red' if line == 0 else 'blue'} thing in picture {image}?{SHORT}"
        fields = {"subtask": subtask, "name": name, "line": line}
        answer = ["Yes" if line == 0 else "No"]
        samples.append(Sample(f"{subtask}/{name}#{line}", question, answer, size, prompt, fields))
    order = [name for name, _, _ in MME_SUBTASKS]
    samples.sort(key=lambda s: (order.index(s.fields["subtask"]), s.fields["name"], s.fields["line"]))
    for row, s in enumerate(samples):
        s.hub_id = f"{s.fields['subtask']}/{s.fields['name']}#{row}"
    return samples


def mme_official(root: Path, samples: list[Sample]) -> None:
    release = root / "MME_Benchmark_release_version"
    lines: dict[tuple[str, str], list[str]] = {}
    for s in samples:
        subtask, name = s.fields["subtask"], s.fields["name"]
        apart = dict((n, a) for n, _, a in MME_SUBTASKS)[subtask]
        write_image(release / subtask / ("images" if apart else "") / name, s.size)
        lines.setdefault((subtask, name), []).append(f"{s.question}\t{s.answers[0]}")
    for (subtask, name), texts in lines.items():
        apart = dict((n, a) for n, _, a in MME_SUBTASKS)[subtask]
        folder = release / subtask / ("questions_answers_YN" if apart else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / (Path(name).stem + ".txt")).write_text("\n".join(texts) + "\n", encoding="utf-8")


def mme_hub(samples: list[Sample]) -> list[Table]:
    features = {"question_id": TEXT, "image": IMAGE, "question": TEXT, "answer": TEXT, "category": TEXT}
    rows = [
        {"question_id": f"{s.fields['subtask']}/{s.fields['name']}", "image": png(s.size), "question": s.question,
         "answer": s.answers[0], "category": s.fields["subtask"]}
        for s in samples
    ]  # fmt: skip
    return [Table(None, "test", features, rows)]


# --- SEED-Bench (image): SEED-Bench.json + SEED-Bench-image/; lmms-lab/SEED-Bench --------------------------------

SEED_DIMENSIONS = {"Scene Understanding": 1, "Instance Identity": 2, "Instance Attributes": 3}


def seedbench_samples(sizes: list[tuple[int, int]]) -> list[Sample]:
    """Dimensions taken in turn; ids are question ids; a video question (not a sample) sits among them in files."""
    samples = []
    for i, size in enumerate(sizes):
        choices = [f"a cat {i}", f"a dog {i}", f"a bird {i}", f"a fish {i}"]
        question = f"What animal is in photo {i}?"
        prompt = f"{question}\nA. {choices[0]}\nB. {choices[1]}\nC. {choices[2]}\nD. {choices[3]}{CHOICE}"
        dimension = list(SEED_DIMENSIONS)[i % len(SEED_DIMENSIONS)]
        fields = {"choices": choices, "dimension": dimension, "data_id": f"{i}.jpg"}
        samples.append(Sample(str(100 + i), question, ["ABCD"[i % 4]], size, prompt, fields))
    return samples


def seedbench_question(s: Sample) -> dict:
    choices = {f"choice_{letter}": choice for letter, choice in zip("abcd", s.fields["choices"], strict=True)}
    return {"question_id": s.id, "question": s.question, **choices, "answer": s.answers[0], "data_type": "image",
            "question_type_id": SEED_DIMENSIONS[s.fields["dimension"]], "data_id": s.fields["data_id"]}  # fmt: skip


VIDEO_QUESTION = {"question_id": "9", "question": "What happens next?", "choice_a": "a", "choice_b": "b",
                  "choice_c": "c", "choice_d": "d", "answer": "A", "data_type": "video", "question_type_id": 10,
                  "data_id": "v.mp4"}  # fmt: skip


def seedbench_official(root: Path, samples: list[Sample]) -> None:
    questions = [seedbench_question(s) for s in samples]
    questions.insert(min(1, len(questions)), VIDEO_QUESTION)
    write_json(root / "SEED-Bench.json", {"questions": questions, "question_type": SEED_DIMENSIONS | {"Action": 10}})
    images = folder(root / "SEED-Bench-image")
    for s in samples:
        write_image(images / s.fields["data_id"], s.size)


def seedbench_hub(samples: list[Sample]) -> list[Table]:
    features = {"question_id": TEXT, "question": TEXT, **{f"choice_{c}": TEXT for c in "abcd"}, "answer": TEXT,
                "data_type": TEXT, "question_type_id": INT, "image": datasets.List(IMAGE)}  # fmt: skip
    rows = []
    for s in samples:
        question = seedbench_question(s)
        del question["data_id"]
        rows.append(question | {"image": [png(s.size)]})
    video = {k: v for k, v in VIDEO_QUESTION.items() if k != "data_id"} | {"image": [png((8, 8)), png((8, 8))]}
    rows.insert(min(1, len(rows)), video)
    return [Table(None, "test", features, rows)]


# --- MMBench dev (English): a TSV with base64 images; lmms-lab/MMBench (config en, split dev) with rotated copies


def mmbench_samples(sizes: list[tuple[int, int]]) -> list[Sample]:
    """Two-option questions, each followed by its rotated copy (index + 1e6, options swapped, answer moved); odd
    questions have a hint. A count rounds up to whole questions."""
    samples = []
    for q in range((len(sizes) + 1) // 2):
        size, hint = sizes[min(2 * q, len(sizes) - 1)], (f"Look at the animal {q}." if q % 2 else "")
        question, choices, answer = f"Which animal is in picture {q}?", [f"cat {q}", f"dog {q}"], q % 2
        for k in range(2):
            shown = choices[k:] + choices[:k]
            letter = "AB"[(answer - k) % 2]
            options = f"A. {shown[0]}\nB. {shown[1]}"
            prompt = f"{hint + ' ' if hint else ''}{question} There are several options:\n{options}{CHOICE}"
            fields = {"hint": hint, "choices": shown, "category": ["image_scene", "attribute_recognition"][q % 2]}
            samples.append(Sample(str(q + 7 + k * 1_000_000), question, [letter], size, prompt, fields))
    return samples


def mmbench_row(s: Sample) -> dict:
    row = {"index": int(s.id), "question": s.question, "hint": s.fields["hint"] or "nan", "A": s.fields["choices"][0]}
    return row | {"B": s.fields["choices"][1], "C": "nan", "D": "nan", "answer": s.answers[0],
                  "category": s.fields["category"], "source": "fixture", "split": "dev"}  # fmt: skip


def mmbench_official(root: Path, samples: list[Sample]) -> None:
    """Only the original rows, as the official TSV holds them: the reader makes the rotated copies."""
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "split"]
    lines = ["\t".join(columns)]
    for s in samples:
        if int(s.id) >= 1_000_000:
            continue
        buffer = io.BytesIO()
        Image.new("RGB", s.size, (10, 160, 40)).save(buffer, format="PNG")
        row = mmbench_row(s) | {"image": base64.b64encode(buffer.getvalue()).decode()}
        lines.append("\t".join(str(row[c]) for c in columns))
    root.mkdir(parents=True, exist_ok=True)
    (root / "MMBench_DEV_EN.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def mmbench_hub(samples: list[Sample]) -> list[Table]:
    features = {"index": INT, "question": TEXT, "hint": TEXT, "A": TEXT, "B": TEXT, "C": TEXT, "D": TEXT,
                "answer": TEXT, "category": TEXT, "source": TEXT, "split": TEXT, "image": IMAGE}  # fmt: skip
    rows = [mmbench_row(s) | {"image": png(s.size)} for s in samples]
    return [Table("en", "dev", features, rows)]


# --- MMMU validation: a clone of MMMU/MMMU (one parquet folder per subject); lmms-lab/MMMU ----------------------

MMMU_OPEN = "What is the ratio in diagram {n} <image 1>?"


def mmmu_samples(sizes: list[tuple[int, int]]) -> list[Sample]:
    """Subjects in blocks (Art, then Math: the order of a clone's folders); even samples multiple choice, odd open."""
    samples = []
    for i, (size, subject) in enumerate(zip(sizes, blocks(len(sizes), ("Art", "Math")), strict=True)):
        qid = f"validation_{subject}_{i + 1}"
        if i % 2 == 0:
            question, options = f"<image 1> Which colour fills shape {i}?", ["red", "green", "blue"]
            answer, kind = "ABC"[i % 3], "multiple-choice"
            prompt = f"{question}\nA. red\nB. green\nC. blue\n\nAnswer with the option's letter from the given " \
                     "choices directly."
        else:
            question, options, answer, kind = MMMU_OPEN.format(n=i), [], f"{i}.5", "open"
            prompt = f"{question}\n\nAnswer the question using a single word or phrase."
        fields = {"subject": subject, "options": options, "type": kind}
        samples.append(Sample(qid, question, [answer], size, prompt, fields))
    return samples


MMMU_FEATURES = {"id": TEXT, "question": TEXT, "options": TEXT, "explanation": TEXT, "answer": TEXT,
                 "question_type": TEXT, "subfield": TEXT, "img_type": TEXT, "topic_difficulty": TEXT,
                 **{f"image_{k}": IMAGE for k in range(1, 8)}}  # fmt: skip


def mmmu_row(s: Sample) -> dict:
    images = {f"image_{k}": None for k in range(1, 8)} | {"image_1": png(s.size)}
    return {"id": s.id, "question": s.question, "options": str(s.fields["options"]), "explanation": "",
            "answer": s.answers[0], "question_type": s.fields["type"], "subfield": "fixture", "img_type": "['Other']",
            "topic_difficulty": "Easy", **images}  # fmt: skip


def mmmu_two_images(subject: str) -> dict:
    """A question with two images, which crop leaves out (one image per prompt)."""
    row = {"id": f"validation_{subject}_99", "question": "<image 1> or <image 2>?", "options": "['x', 'y']",
           "explanation": "", "answer": "A", "question_type": "multiple-choice", "subfield": "fixture",
           "img_type": "['Other']", "topic_difficulty": "Easy"}  # fmt: skip
    return row | {f"image_{k}": None for k in range(1, 8)} | {"image_1": png((8, 8)), "image_2": png((8, 8))}


def mmmu_official(root: Path, samples: list[Sample]) -> None:
    """The authors' Hub dataset cloned: one folder per subject, each a parquet split (a two-image question in Art)."""
    for subject in ("Art", "Math"):
        rows = [mmmu_row(s) for s in samples if s.fields["subject"] == subject]
        if subject == "Art":
            rows.insert(min(1, len(rows)), mmmu_two_images(subject))
        write_table(root / subject, "parquet", Table(None, "validation", MMMU_FEATURES, rows))


def mmmu_hub(samples: list[Sample]) -> list[Table]:
    rows = [mmmu_row(s) for s in samples]
    rows.insert(min(1, len(rows)), mmmu_two_images("Art"))
    return [Table(None, "validation", MMMU_FEATURES, rows)]


BENCHMARKS: dict[str, Benchmark] = {
    "textvqa": Benchmark(textvqa_samples, textvqa_official, textvqa_hub),
    "docvqa": Benchmark(docvqa_samples, docvqa_official, docvqa_hub),
    "infovqa": Benchmark(infovqa_samples, infovqa_official, infovqa_hub),
    "chartqa": Benchmark(chartqa_samples, chartqa_official, chartqa_hub),
    "gqa": Benchmark(gqa_samples, gqa_official, gqa_hub),
    "vqav2": Benchmark(vqav2_samples, vqav2_official, vqav2_hub),
    "pope": Benchmark(pope_samples, pope_official, pope_hub),
    "scienceqa": Benchmark(scienceqa_samples, scienceqa_official, scienceqa_hub),
    "ocrbench": Benchmark(ocrbench_samples, ocrbench_official, ocrbench_hub),
    "mme": Benchmark(mme_samples, mme_official, mme_hub),
    "seedbench": Benchmark(seedbench_samples, seedbench_official, seedbench_hub),
    "mmbench": Benchmark(mmbench_samples, mmbench_official, mmbench_hub),
    "mmmu": Benchmark(mmmu_samples, mmmu_official, mmmu_hub),
}
SUPPORTED: tuple[tuple[str, str], ...] = tuple((name, form) for name in BENCHMARKS for form in FORMS)
"""Every (benchmark, form) pair `write_benchmark` writes."""

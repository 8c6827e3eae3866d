"""`crop data build-regions`: localizer training data from datasets whose answers come with boxes.

For every question of a local dataset copy the boxes that support the answer are found, their union is grown by a
margin (a share of the image's width and height on each side), clipped to the image and turned into the smallest
8x8 grid box that overlaps it (`Region.to_grid`). The rows go to a JSONL file that `crop train localizer` reads
(`image`, `question`, `answer`, `grid`, `source`, `id`), the counts to `<out>.stats.json`. A question whose boxes
cannot be found is dropped and counted under its reason.

Sources and the files each expects under `data` (`<split>` is the `split` argument, "train" by default):

- `textvqa`: the official TextVQA 0.5.1 files: `TextVQA_0.5.1_<split>.json` (questions with their 10 human answers),
  `TextVQA_Rosetta_OCR_v0.2_<split>.json` (OCR words with normalized boxes, rotation ignored) and the images
  `train_images/<image_id>.jpg` (the validation images ship in that folder too, as in the evaluation task). The
  answer is the most common human answer after `normalize_vqa_answer`.
- `docvqa` (DocVQA, or InfographicVQA converted to this form): the official DocVQA release folder:
  `<split>_v1.0.json` or `<split>_v1.0_withQT.json` (questions; `image` is a path relative to `data`, e.g.
  "documents/<name>.png") and the Microsoft Read OCR of each document at `ocr_results/<name>.json` (`<name>`: the
  image's file name without its extension; word boxes are pixel quads on the page `width` x `height`). The answers
  are tried in order; the first one found in the OCR is kept, as written.
- `gqa`: `<split>_balanced_questions.json` (or `<split>_questions.json`), the scene graphs `<part>_sceneGraphs.json`
  (`<part>`: `split` up to its first "_", so "train" or "val") and the images `images/<imageId>.jpg`. The supporting
  boxes are the scene-graph objects that the question's `annotations` (question, answer and full answer) name.
- `jsonl`: `data` is a JSONL file, or a folder holding `<split>.jsonl`, with one question per line: `image` (relative
  to the file's folder, or absolute), `question`, `answer`, `boxes` (`[x0, y0, x1, y1]` each, in pixels, or
  normalized to [0, 1] when the row has `"normalized": true`) and optionally `id` (by default the line number).
  Pixel boxes are divided by the image's size, read from the image file.

Answers are matched to OCR words after `normalize_vqa_answer` (lmms-eval's VQA answer processing: lower case,
punctuation, articles, number words), applied to the answer and to every OCR word on its own; words that normalise
to nothing (an article, a lone punctuation mark) are skipped. The supporting words are every shortest run of
consecutive words that spells the answer; when there is none, every word equal to one of the answer's words, if each
answer word is found so.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Any

from PIL import Image

from crop.errors import ConfigError
from crop.evaluation.metrics import normalize_vqa_answer
from crop.evaluation.tasks.base import load_json
from crop.region import GRID_SIZE, Region

Box = tuple[float, float, float, float]
"""A box `(x0, y0, x1, y1)` normalized to the image: 0 is the left or top edge, 1 the right or bottom one."""

DEFAULT_MARGIN = 0.02
MAX_MARGIN = 0.5
"""A margin of half the image grows any box to the whole image."""

NO_ANSWER = "no answer"
NO_OCR = "no OCR"
NOT_IN_OCR = "answer not in OCR"
NO_SCENE_GRAPH = "no scene graph"
NO_OBJECTS = "no referenced objects"
NO_BOXES = "no boxes"
IMAGE_MISSING = "image missing"
IMAGE_UNREADABLE = "image unreadable"
EMPTY_BOX = "empty box or outside the image"

OCR_RUN = "OCR run"
OCR_WORDS = "OCR words"
OBJECTS = "scene-graph objects"
BOXES = "given boxes"

AREA_BINS = {"1": (1, 1), "2-4": (2, 4), "5-16": (5, 16), "17-36": (17, 36), "37-64": (37, GRID_SIZE * GRID_SIZE)}
"""Histogram bins of region sizes, in blocks of the 8x8 grid (inclusive bounds)."""

LAYOUTS = {
    "textvqa": "TextVQA_0.5.1_<split>.json, TextVQA_Rosetta_OCR_v0.2_<split>.json and train_images/<image_id>.jpg",
    "docvqa": "<split>_v1.0.json (or <split>_v1.0_withQT.json), its images (e.g. documents/<name>.png) and "
    "ocr_results/<name>.json",
    "gqa": "<split>_balanced_questions.json (or <split>_questions.json), <part>_sceneGraphs.json and "
    "images/<imageId>.jpg",
    "jsonl": "a JSONL file (or a folder with <split>.jsonl) of rows with image, question, answer, boxes",
}
"""The files each source reads, as error messages name them."""


@dataclass
class Sample:
    """One question of a source with the normalized boxes that support its answer, or the reason it has none."""

    id: str
    image: Path
    question: str
    answer: str
    boxes: list[Box] = field(default_factory=list)
    match: str = ""
    """How the boxes were found (OCR_RUN, OCR_WORDS, OBJECTS, BOXES)."""
    dropped: str | None = None


@dataclass
class OcrWord:
    """An OCR word as normalised words (possibly none, or several) and its normalized box."""

    words: tuple[str, ...]
    box: Box

    @classmethod
    def of(cls, text: str, box: Box) -> OcrWord:
        """The word `text` at `box`, normalised as answers are."""
        return cls(tuple(normalize_vqa_answer(text).split()), box)


@dataclass
class RegionStats:
    """Counts of a build: samples seen, kept (by how their boxes were found), dropped (by reason), region sizes."""

    seen: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    matches: Counter[str] = field(default_factory=Counter)
    blocks: Counter[int] = field(default_factory=Counter)
    """Kept regions by their number of 8x8 blocks."""

    def keep(self, grid: tuple[int, int, int, int], match: str) -> None:
        """Count a kept sample with its grid box."""
        x0, y0, x1, y1 = grid
        self.blocks[(x1 - x0 + 1) * (y1 - y0 + 1)] += 1
        self.matches[match] += 1

    def to_dict(self) -> dict[str, Any]:
        """The counts as JSON: `area_histogram` bins kept regions by blocks, `mean_area` is their mean image share."""
        kept = self.blocks.total()
        histogram = {
            name: sum(n for size, n in self.blocks.items() if low <= size <= high)
            for name, (low, high) in AREA_BINS.items()
        }
        total_blocks = sum(size * n for size, n in self.blocks.items())
        return {
            "seen": self.seen,
            "kept": kept,
            "dropped": dict(sorted(self.dropped.items())),
            "kept_by_match": dict(sorted(self.matches.items())),
            "area_histogram": histogram,
            "mean_blocks": total_blocks / kept if kept else 0.0,
            "mean_area": total_blocks / (kept * GRID_SIZE * GRID_SIZE) if kept else 0.0,
        }


# --- matching -----------------------------------------------------------------------------------------------------


def match_ocr(answer: str, ocr: list[OcrWord]) -> tuple[list[Box], str] | None:
    """The boxes of the OCR words that spell `answer` and how they were found (OCR_RUN or OCR_WORDS), or None."""
    target = tuple(normalize_vqa_answer(answer).split())
    if not target:
        return None
    words = [word for word in ocr if word.words]
    runs = []
    for start in range(len(words)):
        spelled: tuple[str, ...] = ()
        end = start
        while end < len(words) and len(spelled) < len(target):
            spelled += words[end].words
            end += 1
        if spelled == target:
            runs.append(words[start:end])
    if runs:
        shortest = min(len(run) for run in runs)
        return [word.box for run in runs if len(run) == shortest for word in run], OCR_RUN
    found = {part: [word.box for word in words if word.words == (part,)] for part in target}
    if all(found.values()):
        return [box for boxes in found.values() for box in boxes], OCR_WORDS
    return None


def grid_box(boxes: Iterable[Box], margin: float = DEFAULT_MARGIN) -> tuple[int, int, int, int] | None:
    """The 8x8 grid box of the union of `boxes` (one or more) grown by `margin` and clipped to the image, or None
    when nothing of it is left."""
    x0s, y0s, x1s, y1s = zip(*boxes, strict=True)
    x0, y0 = max(min(x0s) - margin, 0.0), max(min(y0s) - margin, 0.0)
    x1, y1 = min(max(x1s) + margin, 1.0), min(max(y1s) + margin, 1.0)
    if x0 >= x1 or y0 >= y1:
        return None
    return Region(x0, y0, x1, y1).to_grid()


def _pixels(box: Iterable[float], width: float, height: float) -> Box:
    """A pixel box `(x0, y0, x1, y1)` normalized by the image size."""
    x0, y0, x1, y1 = box
    return x0 / width, y0 / height, x1 / width, y1 / height


# --- sources ------------------------------------------------------------------------------------------------------


def _missing(source: str, path: Path) -> ConfigError:
    return ConfigError(f"{source}: {path} not found; expected {LAYOUTS[source]}")


def _find(source: str, root: Path, *names: str) -> Path:
    """The first of `names` that is a file under `root`."""
    for name in names:
        if (root / name).is_file():
            return root / name
    raise _missing(source, root / names[0])


def _folder(source: str, path: Path) -> Path:
    if not path.is_dir():
        raise _missing(source, path)
    return path


def read_textvqa(data: Path, split: str) -> Iterator[Sample]:
    """TextVQA questions with the Rosetta OCR words that spell their most common answer."""
    questions = load_json(_find("textvqa", data, f"TextVQA_0.5.1_{split}.json"))["data"]
    ocr_entries = load_json(_find("textvqa", data, f"TextVQA_Rosetta_OCR_v0.2_{split}.json"))["data"]
    images = _folder("textvqa", data / "train_images")
    ocr = {entry["image_id"]: [_rosetta_word(info) for info in entry.get("ocr_info", [])] for entry in ocr_entries}
    return (_textvqa_sample(q, images, ocr.get(q["image_id"])) for q in questions)


def _textvqa_sample(question: dict, images: Path, ocr: list[OcrWord] | None) -> Sample:
    image = images / f"{question['image_id']}.jpg"
    answers = _most_common(question.get("answers", []))
    return _ocr_sample(str(question["question_id"]), image, question["question"], answers, ocr)


def _rosetta_word(info: dict) -> OcrWord:
    box = info["bounding_box"]
    x, y = box["top_left_x"], box["top_left_y"]
    return OcrWord.of(info["word"], (x, y, x + box["width"], y + box["height"]))


def _most_common(answers: list[str]) -> list[str]:
    """The most common normalised answer (the first given on a tie), as a list of none or one."""
    counts = Counter(normalize_vqa_answer(answer) for answer in answers)
    return [counts.most_common(1)[0][0]] if counts else []


def _ocr_sample(qid: str, image: Path, question: str, answers: list[str], ocr: list[OcrWord] | None) -> Sample:
    """The sample of a question whose supporting boxes are the OCR words of the first answer found among `answers`."""
    sample = Sample(qid, image, question, answers[0] if answers else "")
    if not any(normalize_vqa_answer(answer) for answer in answers):
        sample.dropped = NO_ANSWER
    elif not ocr:
        sample.dropped = NO_OCR
    else:
        found = next(((answer, match) for answer in answers if (match := match_ocr(answer, ocr))), None)
        if found is None:
            sample.dropped = NOT_IN_OCR
        else:
            sample.answer, (sample.boxes, sample.match) = found
    return sample


def read_docvqa(data: Path, split: str) -> Iterator[Sample]:
    """DocVQA questions with the Microsoft Read OCR words of their document that spell one of their answers."""
    questions = load_json(_find("docvqa", data, f"{split}_v1.0.json", f"{split}_v1.0_withQT.json"))["data"]
    ocr_folder = _folder("docvqa", data / "ocr_results")

    @lru_cache(maxsize=64)  # the questions of a document follow each other
    def document_words(name: str) -> list[OcrWord] | None:
        path = ocr_folder / f"{name}.json"
        return _read_words(load_json(path)) if path.is_file() else None

    return (_docvqa_sample(q, data, document_words(Path(q["image"]).stem)) for q in questions)


def _docvqa_sample(question: dict, data: Path, ocr: list[OcrWord] | None) -> Sample:
    answers = list(question.get("answers", []))
    return _ocr_sample(str(question["questionId"]), data / question["image"], question["question"], answers, ocr)


def _read_words(ocr: dict) -> list[OcrWord]:
    """The words of a Microsoft Read OCR result, each box the bounding rectangle of its quad."""
    words = []
    for page in ocr.get("recognitionResults", []):
        width, height = page["width"], page["height"]
        for line in page.get("lines", []):
            for word in line.get("words", []):
                xs, ys = word["boundingBox"][0::2], word["boundingBox"][1::2]
                words.append(OcrWord.of(word["text"], _pixels((min(xs), min(ys), max(xs), max(ys)), width, height)))
    return words


def read_gqa(data: Path, split: str) -> Iterator[Sample]:
    """GQA questions with the scene-graph objects that their question and answer annotations name."""
    questions = load_json(_find("gqa", data, f"{split}_balanced_questions.json", f"{split}_questions.json"))
    graphs = load_json(_find("gqa", data, f"{split.split('_')[0]}_sceneGraphs.json"))
    images = _folder("gqa", data / "images")
    return (_gqa_sample(qid, q, images, graphs.get(q["imageId"])) for qid, q in questions.items())


def _gqa_sample(qid: str, question: dict, images: Path, graph: dict | None) -> Sample:
    sample = Sample(qid, images / f"{question['imageId']}.jpg", question["question"], question["answer"])
    if graph is None:
        sample.dropped = NO_SCENE_GRAPH
        return sample
    annotations = question.get("annotations", {})
    names = {name for part in ("question", "answer", "fullAnswer") for name in annotations.get(part, {}).values()}
    objects = [graph["objects"][name] for name in sorted(names) if name in graph["objects"]]
    if not objects:
        sample.dropped = NO_OBJECTS
        return sample
    sample.boxes = [
        _pixels((o["x"], o["y"], o["x"] + o["w"], o["y"] + o["h"]), graph["width"], graph["height"]) for o in objects
    ]
    sample.match = OBJECTS
    return sample


def read_jsonl(data: Path, split: str) -> Iterator[Sample]:
    """Questions of a JSONL file with their answer-bearing boxes given in pixels or normalized."""
    path = data if data.is_file() else _find("jsonl", data, f"{split}.jsonl")
    with path.open(encoding="utf-8") as handle:
        rows = [(number, _jsonl_row(path, number, line)) for number, line in enumerate(handle, start=1) if line.strip()]
    return (_jsonl_sample(path, number, row) for number, row in rows)


def _jsonl_row(path: Path, number: int, line: str) -> dict:
    """The row of one line, checked for its keys and boxes."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} line {number} is not JSON: {exc}") from exc
    missing = [key for key in ("image", "question", "answer", "boxes") if key not in row]
    if missing:
        raise ConfigError(f"{path} line {number} lacks {', '.join(missing)} (needs image, question, answer, boxes)")
    for box in row["boxes"]:
        if not _is_box(box):
            raise ConfigError(f"{path} line {number}: box {box} is not [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1")
    return row


def _is_box(box: Any) -> bool:
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box)):
        return False
    return all(math.isfinite(v) for v in box) and box[0] <= box[2] and box[1] <= box[3]


def _jsonl_sample(path: Path, number: int, row: dict) -> Sample:
    sample = Sample(str(row.get("id", number)), path.parent / row["image"], row["question"], str(row["answer"]))
    if not row["boxes"]:
        sample.dropped = NO_BOXES
    elif row.get("normalized"):
        sample.boxes, sample.match = [tuple(box) for box in row["boxes"]], BOXES
    elif not sample.image.is_file():
        sample.dropped = IMAGE_MISSING
    else:
        try:
            with Image.open(sample.image) as image:
                width, height = image.size
        except OSError:
            sample.dropped = IMAGE_UNREADABLE
        else:
            sample.boxes, sample.match = [_pixels(box, width, height) for box in row["boxes"]], BOXES
    return sample


SOURCES: dict[str, Callable[[Path, str], Iterator[Sample]]] = {
    "textvqa": read_textvqa,
    "docvqa": read_docvqa,
    "gqa": read_gqa,
    "jsonl": read_jsonl,
}
"""Readers by source name: each checks its files, then yields the samples of `data`'s `split` as it is iterated."""


# --- building -----------------------------------------------------------------------------------------------------


def stats_path(out: str | Path) -> Path:
    """Where the statistics of the regions written to `out` go: `<out>.stats.json`."""
    out = Path(out)
    return out.with_name(f"{out.name}.stats.json")


def write_regions(rows: Iterable[dict[str, Any]], out: str | Path) -> int:
    """Write rows as JSONL to `out`, image paths relative to its folder when they lie under it; return the count.

    `crop train localizer` resolves image paths against the JSONL's folder; an image outside it keeps its absolute
    path, so the file stays valid wherever it is copied.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = out.parent.resolve()
    count = 0
    with out.open("w", encoding="utf-8") as handle:
        for row in rows:
            image = Path(row["image"]).resolve()
            relative = image.relative_to(folder).as_posix() if image.is_relative_to(folder) else str(image)
            handle.write(json.dumps({**row, "image": relative}, ensure_ascii=False) + "\n")
            count += 1
    return count


def region_rows(samples: Iterable[Sample], source: str, margin: float, stats: RegionStats) -> Iterator[dict]:
    """The output row of every sample whose image exists and whose boxes give a region; `stats` counts them all."""
    for sample in samples:
        stats.seen += 1
        reason = IMAGE_MISSING if not sample.image.is_file() else sample.dropped
        grid = None if reason else grid_box(sample.boxes, margin)
        if grid is None:
            stats.dropped[reason or EMPTY_BOX] += 1
            continue
        stats.keep(grid, sample.match)
        yield {
            "image": sample.image,
            "question": sample.question,
            "answer": sample.answer,
            "grid": list(grid),
            "source": source,
            "id": sample.id,
        }


def build_regions(
    source: str,
    data: str | Path,
    out: str | Path,
    split: str = "train",
    margin: float = DEFAULT_MARGIN,
    limit: int | None = None,
) -> dict[str, Any]:
    """Write the grid-box JSONL of `source`'s copy at `data` to `out` and its stats beside it; return the stats.

    `margin` is the share of the image's width and height added on each side of the boxes' union; `limit` caps the
    number of questions read (not kept).
    """
    if source not in SOURCES:
        raise ConfigError(f"unknown region source {source!r}; accepted: {', '.join(SOURCES)}")
    if not (isinstance(margin, int | float) and 0.0 <= margin <= MAX_MARGIN):
        raise ConfigError(f"margin must be a share of the image size in [0, {MAX_MARGIN}]; got {margin!r}")
    if limit is not None and not (isinstance(limit, int) and limit >= 1):
        raise ConfigError(f"limit must be a number of questions >= 1 (or None for all); got {limit!r}")
    data = Path(data)
    if not data.exists():
        raise _missing(source, data)
    samples = SOURCES[source](data, split)
    stats = RegionStats()
    write_regions(region_rows(islice(samples, limit), source, margin, stats), out)
    summary = {"source": source, "data": str(data), "split": split, "margin": margin, **stats.to_dict()}
    stats_path(out).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary

"""Synthetic grounded VQA: seeded scenes of labelled shapes (and tables), questions whose answer region is known.

A 224 px image holds 3-5 objects in a 4x4 layout of 56 px cells (each cell is 4x4 patches of 14 px and 2x2 blocks
of the 8x8 localization grid). Every object has a unique colour, a shape, and a small tag: a 14 px white square
with a digit, aligned to one patch, so that pooling 2x2 or 3x3 patches blurs it (the *detail* kind).
Kinds of questions, in fixed shares of every split:
- detail: "what digit is on the red object ?" (the digit on one object's tag);
- object: "what shape is the red object ?" (a large attribute of one object);
- wide:   "is there a red object ?" (needs the whole image; half of them are about absent colours);
- document (task `documents` only): "what is in row C column S ?" about a table page (`crop.synth.document`).
Two tasks fix the kinds and their shares: `shapes` (the first shipped model's) and `documents` (the current one).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from crop.region import Region
from crop.synth.document import Document, document_labels, document_question, draw_document, make_document

IMAGE_SIZE = 224
PATCH = 14
LAYOUT = 4
CELL = IMAGE_SIZE // LAYOUT
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (225, 195, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
TASKS = {
    "shapes": ("detail",) * 4 + ("object",) * 3 + ("wide",) * 3,
    "documents": ("detail",) * 3 + ("object",) * 2 + ("wide",) * 2 + ("document",) * 3,
}
"""Each task's kinds over a block of 10 samples: split sample `i` has kind `TASKS[task][i % 10]`, so every split
holds the shares exactly."""
DEFAULT_TASK = "documents"
SPLIT_SEEDS = {"train": 0, "val": 1_000_000_007, "test": 2_000_000_011}
"""Each split draws sample i from seed `SPLIT_SEEDS[split] + i`: fixed, disjoint, reproducible."""


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    digit: str
    cell: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Pixel box of the object's layout cell (the object is drawn inside it)."""
        x0, y0 = (self.cell % LAYOUT) * CELL, (self.cell // LAYOUT) * CELL
        return x0, y0, x0 + CELL, y0 + CELL

    @property
    def tag_box(self) -> tuple[int, int, int, int]:
        """Pixel box of the digit tag: one patch, the second patch row and column of the cell."""
        x0, y0, _, _ = self.box
        return x0 + 2 * PATCH, y0 + 2 * PATCH, x0 + 3 * PATCH, y0 + 3 * PATCH


@dataclass
class Sample:
    """One question about one image, with its answer, kind and ground-truth region."""

    image: Image.Image
    objects: list[SceneObject]
    question: str
    answer: str
    kind: str
    region: Region
    index: int
    document: Document | None = None


def draw_scene(objects: list[SceneObject]) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (235, 235, 230))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    margin = 3
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        x0, y0, x1, y1 = x0 + margin, y0 + margin, x1 - margin, y1 - margin
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([x0 + 4, y0 + 4, x1 - 4, y1 - 4], fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        tx0, ty0, tx1, ty1 = obj.tag_box
        draw.rectangle([tx0, ty0, tx1 - 1, ty1 - 1], fill=(255, 255, 255))
        draw.text(((tx0 + tx1) / 2, (ty0 + ty1) / 2), obj.digit, fill=(0, 0, 0), font=font, anchor="mm")
    return image


def make_objects(rng: random.Random) -> list[SceneObject]:
    """3-5 objects with unique colours in distinct layout cells."""
    count = rng.randint(3, 5)
    colours = rng.sample(list(COLOURS), k=count)
    cells = rng.sample(range(LAYOUT * LAYOUT), k=count)
    return [
        SceneObject(colour, rng.choice(SHAPES), str(rng.randrange(10)), cell)
        for colour, cell in zip(colours, cells, strict=True)
    ]


def make_question(objects: list[SceneObject], kind: str, rng: random.Random) -> tuple[str, str, Region, int | None]:
    """`(question, answer, ground-truth region, index of the object the answer rests on, or None)` of one kind."""
    target_index = rng.randrange(len(objects))
    target = objects[target_index]
    if kind == "detail":
        return f"what digit is on the {target.colour} object ?", target.digit, _cell_region(target), target_index
    if kind == "object":
        return f"what shape is the {target.colour} object ?", target.shape, _cell_region(target), target_index
    if kind != "wide":
        raise ValueError(f"unknown kind {kind!r}; use one of {kinds_of('shapes')}")
    present = rng.random() < 0.5
    used = {obj.colour for obj in objects}
    if present:
        return f"is there a {target.colour} object ?", "yes", Region.full(), target_index
    colour = rng.choice([c for c in COLOURS if c not in used])
    return f"is there a {colour} object ?", "no", Region.full(), None


def make_sample(split: str, index: int, task: str = DEFAULT_TASK) -> Sample:
    """Sample `index` of `split` in `task`, identical on every machine and run."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(SPLIT_SEEDS)}")
    kind = task_kinds(task)[index % 10]
    rng = random.Random(SPLIT_SEEDS[split] + index)
    if kind == "document":
        document = make_document(rng)
        question, answer, region, _ = document_question(document, rng)
        return Sample(draw_document(document), [], question, answer, kind, region, index, document)
    objects = make_objects(rng)
    question, answer, region, _ = make_question(objects, kind, rng)
    return Sample(draw_scene(objects), objects, question, answer, kind, region, index)


def task_kinds(task: str) -> tuple[str, ...]:
    """The kinds of `task` over a block of 10 samples."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; use one of {sorted(TASKS)}")
    return TASKS[task]


def kinds_of(task: str) -> tuple[str, ...]:
    """The distinct kinds of `task`, in table order."""
    return tuple(dict.fromkeys(task_kinds(task)))


def _cell_region(obj: SceneObject) -> Region:
    x0, y0, x1, y1 = obj.box
    return Region(x0 / IMAGE_SIZE, y0 / IMAGE_SIZE, x1 / IMAGE_SIZE, y1 / IMAGE_SIZE)


def patch_labels(objects: list[SceneObject], document: Document | None = None) -> dict[str, np.ndarray]:
    """Per-patch targets (16x16) for the vision pre-training heads: colour, shape, digit, table row and column
    label, block x and y (a document's when `document` is given, else the scene's)."""
    side = IMAGE_SIZE // PATCH
    block = np.arange(side) * 8 // side
    blocks = {
        "block_x": np.broadcast_to(block[None, :], (side, side)).copy(),
        "block_y": np.broadcast_to(block[:, None], (side, side)).copy(),
    }
    if document is not None:
        empty = np.zeros((side, side), dtype=np.int64)
        return {"colour": empty, "shape": empty.copy(), **document_labels(document, side), **blocks}
    colour = np.zeros((side, side), dtype=np.int64)
    shape = np.zeros((side, side), dtype=np.int64)
    digit = np.zeros((side, side), dtype=np.int64)
    for obj in objects:
        x0, y0, x1, y1 = (v // PATCH for v in obj.box)
        colour[y0:y1, x0:x1] = list(COLOURS).index(obj.colour) + 1
        shape[y0:y1, x0:x1] = SHAPES.index(obj.shape) + 1
        tx0, ty0, _, _ = (v // PATCH for v in obj.tag_box)
        digit[ty0, tx0] = int(obj.digit) + 1
    none = np.zeros((side, side), dtype=np.int64)
    return {"colour": colour, "shape": shape, "digit": digit, "row": none, "column": none.copy(), **blocks}

"""The synthetic task's *document* kind: a page holding a table of one-patch digits under row and column labels.

The page is the 8x8 localization grid itself: every table cell is one 28 px block (2x2 patches). Block row 0
holds the column labels, block column 0 the row labels, and the body of 4-7 rows by 4-7 columns holds one digit
per cell, drawn in the cell's top-left patch. Labels are drawn from separate alphabets (rows `A`-`H`, columns
`P`-`W`) in a random order, so finding a cell means reading both labels, not counting. The question names a row
and a column; the answer is the digit in that cell, and its ground-truth region is that cell's block. Pooling two
patches or more into one token blurs a digit with its blank neighbours, so coarse pre-LLM compression loses here;
a region around the cell does not.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from crop.region import Region

PAGE_SIZE = 224
BLOCK = PAGE_SIZE // 8
GLYPH = BLOCK // 2
ROW_LABELS = tuple("ABCDEFGH")
COLUMN_LABELS = tuple("PQRSTUVW")
SIZES = range(4, 8)
"""Body rows and columns per table (each at most 7: block row and column 0 hold the labels)."""


@dataclass(frozen=True)
class Document:
    """A table: its row labels (top to bottom), column labels (left to right) and body digits `digits[row][col]`."""

    rows: tuple[str, ...]
    columns: tuple[str, ...]
    digits: tuple[tuple[str, ...], ...]

    def block_of(self, row: int, column: int) -> tuple[int, int]:
        """`(block x, block y)` of body cell `(row, column)` on the 8x8 grid."""
        return column + 1, row + 1

    def asked_cell(self, question: str) -> tuple[int, int]:
        """`(row, column)` of the body cell that `question` (as `document_question` words it) asks about."""
        words = question.split()
        try:
            return self.rows.index(words[words.index("row") + 1]), self.columns.index(words[words.index("column") + 1])
        except (ValueError, IndexError) as exc:
            raise ValueError(f"not a question about this table's cells: {question!r}") from exc

    def region_of(self, row: int, column: int) -> Region:
        x, y = self.block_of(row, column)
        return Region.from_grid([x, y, x, y])


def make_document(rng: random.Random) -> Document:
    """A random table: 4-7 body rows and columns, shuffled labels, a digit in every body cell."""
    n_rows, n_columns = rng.choice(SIZES), rng.choice(SIZES)
    rows = tuple(rng.sample(ROW_LABELS, k=n_rows))
    columns = tuple(rng.sample(COLUMN_LABELS, k=n_columns))
    digits = tuple(tuple(str(rng.randrange(10)) for _ in range(n_columns)) for _ in range(n_rows))
    return Document(rows, columns, digits)


def document_question(document: Document, rng: random.Random) -> tuple[str, str, Region, tuple[int, int]]:
    """`(question, answer, ground-truth region, (row, column))` about one random body cell."""
    row, column = rng.randrange(len(document.rows)), rng.randrange(len(document.columns))
    question = f"what is in row {document.rows[row]} column {document.columns[column]} ?"
    return question, document.digits[row][column], document.region_of(row, column), (row, column)


def draw_document(document: Document) -> Image.Image:
    """White page, shaded label cells, thin grid lines; every glyph fills one patch at its block's top-left."""
    image = Image.new("RGB", (PAGE_SIZE, PAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    n_rows, n_columns = len(document.rows), len(document.columns)
    right, bottom = (n_columns + 1) * BLOCK, (n_rows + 1) * BLOCK
    draw.rectangle([BLOCK, 0, right - 1, BLOCK - 1], fill=(205, 220, 240))
    draw.rectangle([0, BLOCK, BLOCK - 1, bottom - 1], fill=(205, 220, 240))
    for line in range(1, n_columns + 2):
        draw.line([(line * BLOCK - 1, 0), (line * BLOCK - 1, bottom - 1)], fill=(150, 150, 150))
    for line in range(1, n_rows + 2):
        draw.line([(0, line * BLOCK - 1), (right - 1, line * BLOCK - 1)], fill=(150, 150, 150))
    glyphs = [((c + 1, 0), label) for c, label in enumerate(document.columns)]
    glyphs += [((0, r + 1), label) for r, label in enumerate(document.rows)]
    glyphs += [
        (document.block_of(r, c), digit) for r, line in enumerate(document.digits) for c, digit in enumerate(line)
    ]
    for (bx, by), text in glyphs:
        x, y = bx * BLOCK + GLYPH / 2, by * BLOCK + GLYPH / 2
        draw.text((x, y), text, fill=(0, 0, 0), font=font, anchor="mm")
    return image


def document_labels(document: Document, side: int) -> dict[str, np.ndarray]:
    """Per-patch targets (`side` x `side` patches): the digit under each body glyph, and for every patch of a
    body or label cell the index (from 1) of its row label and of its column label; 0 elsewhere."""
    per_block = side // 8
    digit = np.zeros((side, side), dtype=np.int64)
    row = np.zeros((side, side), dtype=np.int64)
    column = np.zeros((side, side), dtype=np.int64)

    def cell(bx: int, by: int) -> tuple[slice, slice]:
        return slice(by * per_block, (by + 1) * per_block), slice(bx * per_block, (bx + 1) * per_block)

    for r, label in enumerate(document.rows):
        row[cell(0, r + 1)] = ROW_LABELS.index(label) + 1
    for c, label in enumerate(document.columns):
        column[cell(c + 1, 0)] = COLUMN_LABELS.index(label) + 1
    for r, line in enumerate(document.digits):
        for c, value in enumerate(line):
            bx, by = document.block_of(r, c)
            row[cell(bx, by)] = ROW_LABELS.index(document.rows[r]) + 1
            column[cell(bx, by)] = COLUMN_LABELS.index(document.columns[c]) + 1
            digit[by * per_block, bx * per_block] = int(value) + 1
    return {"digit": digit, "row": row, "column": column}

"""MMBench (Liu et al., ECCV 2024), the English dev split: single-choice questions under circular evaluation.

Read and scored as lmms-eval's `mmbench_en_dev_static` task (its `en_utils.py` and `mmbench_evals.py`, with the
rule-based extraction of `_task_utils/mcq_extract.py` where the GPT matcher of `mmbench_en_dev` would be asked):

- Prompt: `[hint ]question There are several options:\nA. ...\nB. ...` then "\nAnswer with the option's letter from
  the given choices directly." (the hint only when present).
- Circular evaluation: a question counts only if every copy of it with its options rotated is answered right.
  lmms-lab's copy holds the rotated copies itself (index + k * 1e6); a copy holding only the original rows (as the
  official TSV may) gets them made here: copy k puts the option of letter (j + k) mod n under letter j.
- An answer's letter: a lone option letter among its words (or one with the same punctuation around it), else the
  one option whose text it contains, else the ranked rule-based extraction (parentheses, "A.", "A:", "the answer
  is", a leading or trailing letter...).
- Accuracy over questions, overall and per category.
"""

from __future__ import annotations

import base64
import csv
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from crop.evaluation.tasks.base import EvalSample, HubCopy, Task, mean

ROTATION = 1_000_000
"""Index offset of a rotated copy: copy k of question i has index i + k * ROTATION."""
LETTERS = "ABCDE"
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
AROUND = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""), (":", ","),
          (":", "."), (":", ")"), (":", ")."))  # fmt: skip
"""Punctuation around a lone letter that still marks it as the answer (tried in this order)."""
PHRASES = ("the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
           "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
           "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
           "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选",
           "答えは")  # fmt: skip
RANK = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3, "space": 2,
        "fallback": 0}  # fmt: skip


def lone_letter(answer: str) -> str | None:
    """The option letter that stands alone among the answer's words (bare, or with the same punctuation around)."""
    words = [word.strip() for word in answer.split()]

    def present(before: str, after: str) -> list[str]:
        return [letter for letter in LETTERS if f"{before}{letter}{after}" in words]

    bare = present("", "")
    if len(bare) == 1 and not ("A" in words and len(words) > 3):  # "A" in a sentence may be the article
        return bare[0]
    for before, after in AROUND:
        found = present(before, after)
        if len(found) == 1:
            return found[0]
    return None


def option_named(answer: str, choices: dict[str, str]) -> str | None:
    """The one option (of A-D) whose text the answer contains, if exactly one does."""
    text = answer.lower()
    found = [letter for letter, choice in choices.items() if letter in "ABCD" and str(choice).lower() in text]
    return found[0] if len(found) == 1 else None


def extracted_letter(response: str, letters: list[str]) -> str | None:
    """The rule-based extraction: every place a letter appears in a known answer form, the best-ranked form
    winning and, within a form, the last place."""
    text = response.strip()
    if not text:
        return None
    for mark in ",.!?;:'\"":
        text = text.strip(mark)
    text = f" {text} "
    found: list[tuple[int, int, str]] = []
    for kind, pattern in (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"),
                          ("space", "{} ")):  # fmt: skip
        found += [(RANK[kind], text.rfind(pattern.format(c)), c) for c in letters if pattern.format(c) in text]
    lower = text.lower()
    for phrase in PHRASES:
        start = lower.find(phrase)
        if start != -1:
            after = start + len(phrase)
            found += [(RANK["phrase"], text.find(c, after), c) for c in letters if text.find(c, after) != -1]
    bare = text.strip()
    alone = len(bare) == 1
    found += [(RANK["start"], 0, c) for c in letters if bare.startswith(c) and (alone or not bare[1].isalpha())]
    end = len(text) - 1
    found += [(RANK["end"], end, c) for c in letters if bare.endswith(c) and (alone or not bare[-2].isalpha())]
    if not found:
        found = [(RANK["fallback"], text.rfind(c), c) for c in letters if c in text]
    return max(found, key=lambda item: (item[0], item[1]))[2] if found else None


def answer_letter(answer: str, choices: dict[str, str]) -> str | None:
    """The letter an answer gives: a lone letter, else the option it names, else the rule-based extraction."""
    return lone_letter(answer) or option_named(answer, choices) or extracted_letter(answer, sorted(choices))


class MMBench(Task):
    """MMBench-EN dev (1,164 questions, each asked once per rotation of its options); the score is circular
    accuracy."""

    name = "mmbench"
    metric = "mmbench_circular_accuracy"
    layout = "a TSV of MMBench dev (index, question, hint, A-D, answer, category, base64 image): MMBench_DEV_EN.tsv"
    hub = "lmms-lab/MMBench (config en)"
    hub_config = "en"
    hub_split = "dev"
    hub_columns = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image")
    post_prompt = POST_PROMPT

    def official_samples(self, root: Path, split: str | None) -> Iterator[EvalSample]:
        tables = sorted(root.glob("*.tsv"))
        if not tables:
            raise self.missing(root / "MMBench_DEV_EN.tsv")
        csv.field_size_limit(sys.maxsize)  # images are base64 in a cell
        with tables[0].open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        return circular([question_sample(row, base64.b64decode(row["image"])) for row in rows])

    def hub_samples(self, copy: HubCopy, split: str | None) -> Iterator[EvalSample]:
        rows = copy.rows(split, self.hub_split, self)
        return circular([question_sample(row, row["image"]) for row in rows])

    def prompt(self, sample: EvalSample) -> str:
        options = "\n".join(f"{letter}. {text}" for letter, text in sample.extra["choices"].items())
        hint = sample.extra["hint"]
        body = f"{sample.question} There are several options:\n{options}"
        return f"{hint} {body}{self.post_prompt}" if hint else f"{body}{self.post_prompt}"

    def score(self, prediction: str, sample: EvalSample) -> float:
        return float(answer_letter(prediction, dict(sample.extra["choices"])) == sample.answers[0])

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        """A question is right when all its rotated copies are; accuracy over questions, and per category."""
        groups: dict[int, list[dict]] = defaultdict(list)
        for record in records:
            groups[record["extra"]["question"]].append(record)
        hits = {question: all(r["score"] == 1 for r in group) for question, group in groups.items()}
        categories: dict[str, list[float]] = defaultdict(list)
        for question, group in groups.items():
            categories[group[0]["extra"]["category"]].append(float(hits[question]))
        return {"score": mean(float(hit) for hit in hits.values()), "count": len(records), "questions": len(hits),
                "categories": {name: mean(values) for name, values in sorted(categories.items())}}  # fmt: skip


def present(value: object) -> bool:
    """Whether a cell holds an option or a hint (empty cells read as "", None or "nan")."""
    return value is not None and str(value).strip() not in ("", "nan", "None")


def question_sample(row: dict, image: object) -> EvalSample:
    index = int(float(row["index"]))
    choices = {letter: str(row[letter]) for letter in LETTERS if letter in row and present(row[letter])}
    hint = str(row["hint"]) if present(row.get("hint")) else ""
    extra = {"choices": choices, "hint": hint, "category": str(row["category"]), "question": index % ROTATION}
    return EvalSample(str(index), image, str(row["question"]), [str(row["answer"]).strip()], extra)


def circular(samples: list[EvalSample]) -> Iterator[EvalSample]:
    """The samples with their rotated copies: the copy's own when it has them, else made here (see the module)."""
    if any(int(s.id) >= ROTATION for s in samples):
        return iter(samples)
    out = []
    for sample in samples:
        out.append(sample)
        letters = list(sample.extra["choices"])
        texts = [sample.extra["choices"][letter] for letter in letters]
        answer = letters.index(sample.answers[0]) if sample.answers[0] in letters else None
        for k in range(1, len(letters)):
            rotated = {letter: texts[(j + k) % len(letters)] for j, letter in enumerate(letters)}
            moved = letters[(answer - k) % len(letters)] if answer is not None else sample.answers[0]
            extra = {**sample.extra, "choices": rotated}
            out.append(EvalSample(str(int(sample.id) + k * ROTATION), sample.image, sample.question, [moved], extra))
    return iter(out)

"""MMMU (Yue et al., CVPR 2024), the validation split: college-level multiple-choice and open questions in 30
subjects of six disciplines.

Prompted and scored as lmms-eval's `mmmu_val` (its `utils.py` and `_task_utils/mmmu_mcq_utils.py`, which follow
the authors' `eval_utils.py`): multiple-choice answers are parsed to an option letter (a letter in parentheses,
else followed by a space or a period, else, in answers of more than five words, an option's text; the last one
wins when several appear), open answers to candidate strings and numbers (the tail after "is", "so", "answer"...
of each sentence, the numbers in it, lower-cased, numbers rounded to two decimals), right when the reference is
among them. Accuracy overall, per subject and per discipline.

Where the authors pick a random option (nothing in the answer names one), crop seeds the choice with the question
id, so that a run repeats. A reference is compared as the string it is, as lmms-eval compares it (the authors'
script reads an open answer written as a list, "['a', 'b']", as a list). crop answers with one image per prompt:
questions with several images are left out and the reader says how many (the `<image n>` markers stay in the
text, as lmms-eval's non-interleaved prompt keeps them).
"""

from __future__ import annotations

import ast
import logging
import random
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from crop.evaluation.tasks.base import EvalSample, HubCopy, Task, mean

logger = logging.getLogger(__name__)

DISCIPLINES = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}  # fmt: skip
CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
OPEN_PROMPT = "Answer the question using a single word or phrase."
KEY_MARKERS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
TRIVIAL = (":", ",", ".", "!", "?", ";", "'")
NUMBER_WITH_COMMAS = r"-?\b\d{1,3}(?:,\d{3})+\b"
NUMBER_SCIENTIFIC = r"-?\d+(?:\.\d+)?[eE][+-]?\d+"
NUMBER_PLAIN = r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"


def subject_of(question_id: str) -> str:
    """"validation_Art_Theory_12" -> "Art_Theory"."""
    match = re.match(r"^[^_]+_(.+?)_\d+$", question_id)
    return match.group(1) if match else question_id


def choice_letter(answer: str, options: list[str], seed: str) -> str:
    """The option letter a multiple-choice answer gives (see the module docstring)."""
    letters = [chr(ord("A") + i) for i in range(len(options))]
    for mark in ",.!?;:'":
        answer = answer.strip(mark)
    text = f" {answer} "
    found = [c for c in letters if f"({c})" in text]
    where = [text.rfind(f"({c})") for c in found]
    if not found:
        found = [c for c in letters if f"{c} " in text] or [c for c in letters if f"{c}." in text]
        where = [text.rfind(f" {c} ") for c in found]
    if not found and len(text.split()) > 5:
        found = [c for c, option in zip(letters, options, strict=True) if option.lower() in text.lower()]
        where = [text.lower().rfind(options[letters.index(c)].lower()) for c in found]
    if not found:
        return random.Random(seed).choice(letters)
    return found[max(range(len(found)), key=lambda i: (where[i], -i))]  # the last place wins, ties the first


def normalized(value: str) -> list[str | float]:
    """A number as a float rounded to 2 decimals; a string lower-cased (one character padded, to match only whole)."""
    value = value.strip()
    try:
        return [round(float(value.replace(",", "")), 2)]
    except ValueError:
        value = value.lower()
        return [" " + value, value + " "] if len(value) == 1 else [value]


def key_parts(answer: str) -> list[str]:
    """The tails of the answer's sentences that follow a marker such as "is" or "so" (the shortest per sentence;
    the last sentence may also end in "= x"), or the whole answer when none does."""
    answer = answer.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", answer)
    parts = []
    for index, sentence in enumerate(sentences):
        markers = (*KEY_MARKERS, "=") if index == len(sentences) - 1 else KEY_MARKERS
        tails = [sentence.split(marker)[-1].strip() for marker in markers if marker in sentence]
        shortest = min(tails, key=len) if tails else None
        if shortest and shortest.strip() not in TRIVIAL:
            parts.append(shortest)
    return parts or [answer]


def open_candidates(answer: str) -> list[str | float]:
    """Every candidate an open answer gives: its key parts and the numbers in them, normalized."""
    parts = key_parts(answer)
    pieces = list(parts)
    for part in parts:
        pieces += re.findall(NUMBER_WITH_COMMAS, part) + re.findall(NUMBER_SCIENTIFIC, part)
        pieces += re.findall(NUMBER_PLAIN, part)
    return list(dict.fromkeys(value for piece in pieces for value in normalized(piece)))


def open_correct(reference: str, candidates: list[str | float]) -> bool:
    """Whether the normalized reference is among the candidates (a string inside a string candidate, a number
    equal)."""
    references = normalized(reference)
    for candidate in candidates:
        if isinstance(candidate, str):
            if any(isinstance(r, str) and r in candidate for r in references):
                return True
        elif candidate in references:
            return True
    return False


class MMMU(Task):
    """MMMU validation (900 questions; those with one image are answered)."""

    name = "mmmu"
    metric = "mmmu_accuracy"
    layout = "a clone of MMMU/MMMU: one folder per subject holding validation-*.parquet"
    hub = "lmms-lab/MMMU"
    hub_split = "validation"
    hub_columns = ("id", "question", "options", "answer", "question_type", "image_1")

    def official_samples(self, root: Path, split: str | None) -> Iterator[EvalSample]:
        """MMMU is published as parquet files only (read as a `datasets` copy): a folder without them is refused."""
        raise self.missing(root / "Art" / "validation-00000-of-00001.parquet")

    def hub_samples(self, copy: HubCopy, split: str | None) -> Iterator[EvalSample]:
        rows = list(copy.rows(split, self.hub_split, self))
        single = [row for row in rows if sum(row.get(f"image_{i}") is not None for i in range(1, 8)) == 1]
        if len(single) < len(rows):
            logger.warning(
                "mmmu: %d of %d questions have several images; crop answers with one image per prompt and leaves "
                "them out (the score is over the other %d)", len(rows) - len(single), len(rows), len(single)
            )
        return (question_sample(row) for row in single)

    def prompt(self, sample: EvalSample) -> str:
        options = sample.extra["options"]
        if sample.extra["question_type"] == "multiple-choice":
            listed = "\n".join(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options))
            return f"{sample.question}\n{listed}\n\n{CHOICE_PROMPT}"
        return f"{sample.question}\n\n{OPEN_PROMPT}"

    def score(self, prediction: str, sample: EvalSample) -> float:
        reference = sample.answers[0]
        if sample.extra["question_type"] == "multiple-choice":
            return float(choice_letter(prediction, sample.extra["options"], sample.id) == reference)
        return float(open_correct(reference, open_candidates(prediction)))

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        subjects: dict[str, list[float]] = defaultdict(list)
        for record in records:
            subjects[record["extra"]["subject"]].append(record["score"])
        disciplines = {name: mean(s for subject in members for s in subjects.get(subject, []))
                       for name, members in DISCIPLINES.items() if any(subject in subjects for subject in members)}
        return {"score": mean(r["score"] for r in records), "count": len(records), "disciplines": disciplines,
                "subjects": {name: mean(scores) for name, scores in sorted(subjects.items())}}  # fmt: skip


def question_sample(row: dict) -> EvalSample:
    options = ast.literal_eval(row["options"]) if isinstance(row["options"], str) else list(row["options"])
    image = next(row[f"image_{i}"] for i in range(1, 8) if row.get(f"image_{i}") is not None)
    extra = {"options": [str(o) for o in options], "question_type": row["question_type"],
             "subject": subject_of(row["id"])}  # fmt: skip
    return EvalSample(row["id"], image, row["question"], [str(row["answer"])], extra)

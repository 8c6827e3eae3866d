"""SEED-Bench (Li et al., CVPR 2024), its image questions: four options, nine evaluation dimensions.

Prompted and scored as lmms-eval's `seedbench` task (`utils.py`): the question, the options "A. ..." to "D. ...",
then "Answer with the option's letter from the given choices directly."; the answer's first character (after
stripping) must equal the answer letter. Only questions of data type "image" are read (lmms-eval's `seed_image`);
accuracy is also given per dimension (`question_type_id`, named where the official file names it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from crop.evaluation.tasks.base import EvalSample, Task, mean, means_by

LETTERS = "ABCD"
SEED_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."


class SEEDBench(Task):
    """SEED-Bench's 14,233 image questions (of 19,242); the score is accuracy."""

    name = "seedbench"
    metric = "seed_image_accuracy"
    layout = (
        'SEED-Bench.json ({"questions": [{question_id, question, choice_a..choice_d, answer, data_type, '
        'question_type_id, data_id}], "question_type": {name: id}}) and SEED-Bench-image/<data_id>'
    )
    hub = "lmms-lab/SEED-Bench"
    hub_columns = ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer", "data_type",
                   "question_type_id", "image")  # fmt: skip
    post_prompt = SEED_POST_PROMPT

    def official_samples(self, root: Path, split: str | None) -> Iterator[EvalSample]:
        content = self.read_json(root, "SEED-Bench.json")
        names = {str(v): k for k, v in content.get("question_type", {}).items()}
        images = self.folder(root / "SEED-Bench-image")
        return (
            question_sample(q, images / q["data_id"], names.get(str(q["question_type_id"])))
            for q in content["questions"]
            if q["data_type"] == "image"
        )

    def hub_samples(self, copy, split: str | None) -> Iterator[EvalSample]:
        rows = copy.rows(split, self.hub_split, self)
        return (question_sample(row, first(row["image"]), None) for row in rows if row["data_type"] == "image")

    def prompt(self, sample: EvalSample) -> str:
        choices = zip(LETTERS, sample.extra["choices"], strict=True)
        options = "\n".join(f"{letter}. {choice}" for letter, choice in choices)
        return f"{sample.question}\n{options}{self.post_prompt}"

    def score(self, prediction: str, sample: EvalSample) -> float:
        answer = prediction.strip()
        answer = answer[0] if len(answer) > 1 else answer
        return float(answer.lower().strip() == sample.answers[0].lower().strip())

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        return {"score": mean(r["score"] for r in records), "count": len(records),
                "dimensions": means_by(records, "dimension")}  # fmt: skip


def first(image: object) -> object:
    """The image of a row whose image column is a list (lmms-lab's copy keeps video frames in the same column)."""
    return image[0] if isinstance(image, list | tuple) else image


def question_sample(question: dict, image: object, dimension: str | None) -> EvalSample:
    choices = [question[f"choice_{letter.lower()}"] for letter in LETTERS]
    extra = {"choices": choices, "dimension": dimension or str(question["question_type_id"])}
    return EvalSample(str(question["question_id"]), image, question["question"], [question["answer"]], extra)

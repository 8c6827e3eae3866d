"""DocVQA (Mathew et al., WACV 2021): questions about scanned documents, scored with ANLS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from crop.evaluation.metrics import anls
from crop.evaluation.tasks.base import EvalSample, Task, load_json


class DocVQA(Task):
    """DocVQA (single page) validation: 5,349 questions.

    Prompt: lmms-eval docvqa_doc_to_text, the question + the default post_prompt of _default_template_docvqa_yaml.
    """

    name = "docvqa"
    metric = "anls"
    layout = 'val_v1.0.json ({"data": [{"questionId", "question", "image": "documents/<name>.png", "answers"}]})'
    hub = "lmms-lab/DocVQA (config DocVQA)"
    hub_config = "DocVQA"
    hub_split = "validation"
    hub_columns = ("questionId", "question", "image", "answers")

    def official_samples(self, root: Path, split: str | None) -> Iterator[EvalSample]:
        self.choose(split, ["val"], "val")
        path = self.find(root, "val_v1.0.json", "val_v1.0_withQT.json")
        questions = load_json(path)["data"]
        # image paths ("documents/<name>.png") are relative to the json's folder
        return (
            EvalSample(str(q["questionId"]), str(path.parent / q["image"]), q["question"], q["answers"], {})
            for q in questions
        )

    def hub_sample(self, row: dict, index: int) -> EvalSample:
        return EvalSample(str(row["questionId"]), row["image"], row["question"], list(row["answers"]), {})

    def score(self, prediction: str, sample: EvalSample) -> float:
        return anls(prediction, sample.answers)

"""TextVQA (Singh et al., CVPR 2019): questions about the text in photos, scored with VQA accuracy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from crop.evaluation.metrics import vqa_accuracy
from crop.evaluation.tasks.base import EvalSample, Task


class TextVQA(Task):
    """TextVQA 0.5.1 validation: 5,000 questions with 10 human answers each."""

    name = "textvqa"
    metric = "vqa_accuracy"
    layout = "TextVQA_0.5.1_val.json and its images train_images/<image_id>.jpg"
    hub = "lmms-lab/textvqa"
    hub_split = "validation"
    hub_columns = ("question_id", "question", "image", "answers")

    def official_samples(self, root: Path, split: str | None) -> Iterator[EvalSample]:
        self.choose(split, ["val"], "val")
        questions = self.read_json(root, "TextVQA_0.5.1_val.json")["data"]
        images = self.folder(root / "train_images")  # the validation images ship in the train_images folder
        return (
            EvalSample(str(q["question_id"]), str(images / f"{q['image_id']}.jpg"), q["question"], q["answers"], {})
            for q in questions
        )

    def hub_sample(self, row: dict, index: int) -> EvalSample:
        return EvalSample(str(row["question_id"]), row["image"], row["question"], list(row["answers"]), {})

    def prompt(self, sample: EvalSample) -> str:
        # lmms-eval textvqa_doc_to_text: question.capitalize() (which also lower-cases the rest) + default post_prompt
        return f"{sample.question.capitalize()}{self.post_prompt}"

    def score(self, prediction: str, sample: EvalSample) -> float:
        return vqa_accuracy(prediction, sample.answers)

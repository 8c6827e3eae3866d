"""VQAv2 (Goyal et al., CVPR 2017): open-ended questions about COCO images, scored with VQA accuracy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from crop.errors import ConfigError
from crop.evaluation.metrics import vqa_accuracy
from crop.evaluation.tasks.base import EvalSample, Task

QUESTIONS = "v2_OpenEnded_mscoco_val2014_questions.json"
ANNOTATIONS = "v2_mscoco_val2014_annotations.json"


class VQAv2(Task):
    """VQAv2 val2014: 214,354 questions with 10 human answers each.

    Prompt: lmms-eval vqav2_doc_to_text, the question + the default post_prompt of vqav2_val.yaml.
    """

    name = "vqav2"
    metric = "vqa_accuracy"
    layout = f"{QUESTIONS}, {ANNOTATIONS} and images val2014/COCO_val2014_<12-digit image_id>.jpg"
    hub = "lmms-lab/VQAv2"
    hub_split = "validation"
    hub_columns = ("question_id", "question", "image", "answers")

    def official_samples(self, root: Path, split: str | None) -> Iterator[EvalSample]:
        self.choose(split, ["val"], "val")
        questions = self.read_json(root, QUESTIONS)["questions"]
        answers = {a["question_id"]: texts(a["answers"]) for a in self.read_json(root, ANNOTATIONS)["annotations"]}
        images = self.folder(root / "val2014")
        unanswered = [q["question_id"] for q in questions if q["question_id"] not in answers]
        if unanswered:
            raise ConfigError(
                f"vqav2: {len(unanswered)} questions of {QUESTIONS} have no annotation in {ANNOTATIONS} (first: "
                f"{unanswered[0]}); the two files must be the same split's"
            )
        return (
            EvalSample(
                str(q["question_id"]),
                str(images / f"COCO_val2014_{q['image_id']:012d}.jpg"),
                q["question"],
                answers[q["question_id"]],
                {},
            )
            for q in questions
        )

    def hub_sample(self, row: dict, index: int) -> EvalSample:
        return EvalSample(str(row["question_id"]), row["image"], row["question"], texts(row["answers"]), {})

    def score(self, prediction: str, sample: EvalSample) -> float:
        return vqa_accuracy(prediction, sample.answers)


def texts(answers: list[dict]) -> list[str]:
    """The answer strings of VQA answer records ({"answer", "answer_confidence", "answer_id"})."""
    return [answer["answer"] for answer in answers]

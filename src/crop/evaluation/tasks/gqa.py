"""GQA (Hudson & Manning, CVPR 2019): compositional questions about scenes, scored by exact match."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from crop.errors import ConfigError
from crop.evaluation.metrics import exact_match
from crop.evaluation.tasks.base import EvalSample, HubCopy, Task, iter_rows, load_json

IMAGES_CONFIG = "testdev_balanced_images"


class GQA(Task):
    """GQA test-dev balanced: 12,578 questions with one answer each.

    The lmms-lab/GQA copy keeps questions and images in two configs, joined on imageId = id: `data` may be a clone
    of the whole repository, the testdev_balanced_instructions folder next to testdev_balanced_images, or a copy
    whose rows already have an image column. Prompt: lmms-eval gqa_doc_to_text, the question + the default
    post_prompt of gqa.yaml.
    """

    name = "gqa"
    metric = "exact_match"
    layout = (
        'testdev_balanced_questions.json ({question_id: {"imageId", "question", "answer", ...}}) '
        "and images/<imageId>.jpg"
    )
    hub = "lmms-lab/GQA (configs testdev_balanced_instructions and testdev_balanced_images)"
    hub_config = "testdev_balanced_instructions"
    hub_split = "testdev"
    hub_columns = ("id", "imageId", "question", "answer")

    def official_samples(self, root: Path, split: str | None) -> Iterator[EvalSample]:
        """`split` names the questions file <split>_questions.json; the default is testdev_balanced."""
        available = [path.name.removesuffix("_questions.json") for path in root.glob("*_questions.json")]
        if split is not None and available:
            self.choose(split, available, split)
        path = self.find(root, f"{split or 'testdev_balanced'}_questions.json")
        questions = load_json(path)
        images = self.folder(root / "images")
        return (
            EvalSample(qid, str(images / f"{q['imageId']}.jpg"), q["question"], [q["answer"]], {})
            for qid, q in questions.items()
        )

    def hub_samples(self, copy: HubCopy, split: str | None) -> Iterator[EvalSample]:
        questions = copy.load(split, self.hub_split, self)
        if "image" in questions.column_names:
            return (self._hub_sample(row, row["image"]) for row in iter_rows(questions))
        images_copy = HubCopy.open(copy.path.parent / IMAGES_CONFIG)
        if images_copy is None:
            raise ConfigError(
                f"gqa: the questions at {copy.path} have no image column and {copy.path.parent / IMAGES_CONFIG} "
                f"holds no `datasets` copy of the images. {self.formats()}"
            )
        image_rows = iter_rows(images_copy.load(split, self.hub_split, self, ("id", "image")))
        images = {row["id"]: row["image"] for row in image_rows}
        return (self._hub_sample(row, images[row["imageId"]]) for row in iter_rows(questions))

    @staticmethod
    def _hub_sample(row: dict, image: object) -> EvalSample:
        return EvalSample(str(row["id"]), image, row["question"], [row["answer"]], {})

    def score(self, prediction: str, sample: EvalSample) -> float:
        return exact_match(prediction, sample.answers)

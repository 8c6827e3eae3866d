"""OCRBench (Liu et al., 2024): 1,000 OCR questions in 10 categories, right when an answer appears in the reply."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from crop.evaluation.metrics import ocrbench_match
from crop.evaluation.tasks.base import EvalSample, Task, as_list, means_by


class OCRBench(Task):
    """OCRBench; sample ids are positions in OCRBench.json (its "id" repeats across source datasets).

    The `datasets` copy is echo840/OCRBench, which lmms-eval reads; its rows are in OCRBench.json's order.
    """

    name = "ocrbench"
    metric = "ocrbench_match"
    layout = (
        'OCRBench.json or OCRBench/OCRBench.json (a list of {"dataset_name", "id", "image_path", "question", '
        '"answers", "type"}) and images OCRBench_Images/<image_path>'
    )
    hub = "echo840/OCRBench"
    hub_columns = ("question", "answer", "image", "question_type", "dataset")
    post_prompt = ""  # lmms-eval ocrbench.yaml: empty pre_prompt and post_prompt

    def official_samples(self, root: Path, split: str | None) -> Iterator[EvalSample]:
        self.choose(split, ["test"], "test")
        items = self.read_json(root, "OCRBench.json", "OCRBench/OCRBench.json")
        images = self.folder(root / "OCRBench_Images")
        return (
            EvalSample(
                str(i),
                str(images / q["image_path"]),
                q["question"],
                as_list(q["answers"]),
                {"category": q["type"], "dataset": q["dataset_name"]},
            )
            for i, q in enumerate(items)
        )

    def hub_sample(self, row: dict, index: int) -> EvalSample:
        extra = {"category": row["question_type"], "dataset": row["dataset"]}
        return EvalSample(str(index), row["image"], row["question"], as_list(row["answer"]), extra)

    def prompt(self, sample: EvalSample) -> str:
        # lmms-eval ocrbench_doc_to_text: the stripped question alone
        return sample.question.strip()

    def score(self, prediction: str, sample: EvalSample) -> float:
        return ocrbench_match(prediction, sample.answers, sample.extra["category"])

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        """The mean over all questions (lmms-eval's final score / 1000) and per category."""
        return super().aggregate(records) | means_by(records, "category")

"""POPE (Li et al., EMNLP 2023): yes/no questions probing object hallucination, summarised by F1 of "yes"."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from crop.evaluation.metrics import parse_yes_no, pope_metrics
from crop.evaluation.tasks.base import EvalSample, HubCopy, Task

CATEGORIES = ("random", "popular", "adversarial")


class POPE(Task):
    """POPE on COCO: 3,000 questions for each way of sampling absent objects; `split` is a category or None for all.

    Question ids repeat across categories, so sample ids are "<category>_<question_id>".
    """

    name = "pope"
    metric = "pope_f1"
    layout = (
        "coco_pope_random.json, coco_pope_popular.json and coco_pope_adversarial.json "
        '(JSON lines of {"question_id", "image", "text", "label"}) and COCO images in val2014/'
    )
    hub = "lmms-lab/POPE"
    hub_columns = ("question_id", "question", "answer", "image", "category")

    def official_samples(self, root: Path, split: str | None) -> Iterator[EvalSample]:
        loaded = [(c, self.read_json_lines(root, f"coco_pope_{c}.json")) for c in self.parts(split, CATEGORIES)]
        images = self.folder(root / "val2014")
        return (
            EvalSample(
                f"{category}_{q['question_id']}",
                str(images / q["image"]),
                q["text"],
                [q["label"]],
                {"category": category},
            )
            for category, items in loaded
            for q in items
        )

    def hub_samples(self, copy: HubCopy, split: str | None) -> Iterator[EvalSample]:
        categories = self.parts(split, CATEGORIES)
        return (
            EvalSample(
                f"{row['category']}_{row['question_id']}",
                row["image"],
                row["question"],
                [row["answer"].strip().lower()],
                {"category": row["category"]},
            )
            for row in copy.rows(None, self.hub_split, self)
            if row["category"] in categories
        )

    def prompt(self, sample: EvalSample) -> str:
        # lmms-eval pope_doc_to_text: the stripped question + the default post_prompt (pope.yaml)
        return f"{sample.question.strip()}{self.post_prompt}"

    def score(self, prediction: str, sample: EvalSample) -> float:
        return float(parse_yes_no(prediction) == sample.answers[0])

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        """`pope_metrics` over all records (headline: F1, as papers report), then F1 and accuracy per category."""
        summary = self._metrics(records)
        for category in CATEGORIES:
            chosen = [record for record in records if record["extra"]["category"] == category]
            if chosen:
                metrics = self._metrics(chosen)
                summary |= {f"{category}_f1": metrics["f1"], f"{category}_accuracy": metrics["accuracy"]}
        return summary

    @staticmethod
    def _metrics(records: list[dict]) -> dict[str, float]:
        predictions = [record["prediction"] for record in records]
        metrics = pope_metrics(predictions, [record["answers"][0] for record in records])
        return {"score": metrics["f1"], "count": len(records)} | metrics

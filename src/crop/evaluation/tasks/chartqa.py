"""ChartQA (Masry et al., Findings of ACL 2022): questions about charts, scored with relaxed accuracy."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from crop.evaluation.metrics import relaxed_accuracy
from crop.evaluation.tasks.base import EvalSample, HubCopy, Task, means_by

PARTS = ("human", "augmented")


class ChartQA(Task):
    """ChartQA test: 1,250 human-written and 1,250 generated questions; `split` is "human", "augmented" or both.

    Sample ids are "<part>_<position in that part>", the same in both forms of the data.
    """

    name = "chartqa"
    metric = "relaxed_accuracy"
    layout = (
        'test/test_human.json and test/test_augmented.json (lists of {"imgname", "query", "label"}) '
        "and images test/png/"
    )
    hub = "lmms-lab/ChartQA"
    hub_columns = ("question", "answer", "image", "type")
    post_prompt = "\nAnswer the question with a single word."  # lmms-eval chartqa.yaml, default post_prompt

    def official_samples(self, root: Path, split: str | None) -> Iterator[EvalSample]:
        images = self.folder(root / "test" / "png")
        loaded = []
        for part in self.parts(split, PARTS):
            items = self.read_json(root, f"test/test_{part}.json")
            # a list, or {"data": [...]} as lmms-eval's upload_chartqa.py reads it
            loaded.append((part, items["data"] if isinstance(items, dict) else items))
        return (
            EvalSample(f"{part}_{i}", str(images / q["imgname"]), q["query"], [str(q["label"])], {"type": part})
            for part, items in loaded
            for i, q in enumerate(items)
        )

    def hub_samples(self, copy: HubCopy, split: str | None) -> Iterator[EvalSample]:
        return self._hub_parts(copy.rows(None, self.hub_split, self), self.parts(split, PARTS))

    @staticmethod
    def _hub_parts(rows: Iterable[dict], parts: tuple[str, ...]) -> Iterator[EvalSample]:
        """The rows whose type ("human_test" or "augmented_test") is in `parts`, numbered within their part."""
        seen: Counter[str] = Counter()
        for row in rows:
            part = row["type"].removesuffix("_test")
            if part in parts:
                yield EvalSample(f"{part}_{seen[part]}", row["image"], row["question"], [row["answer"]], {"type": part})
            seen[part] += 1

    def score(self, prediction: str, sample: EvalSample) -> float:
        return relaxed_accuracy(prediction, sample.answers[0])

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        """The mean over all questions (lmms-eval's relaxed_overall) and over each part."""
        return super().aggregate(records) | means_by(records, "type")

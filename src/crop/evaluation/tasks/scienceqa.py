"""ScienceQA-IMG (Lu et al., NeurIPS 2022): multiple-choice science questions that come with an image."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from crop.evaluation.metrics import multiple_choice_accuracy
from crop.evaluation.tasks.base import EvalSample, HubCopy, Task


class ScienceQA(Task):
    """ScienceQA problems with an image (2,017 in the test split); answers are option letters."""

    name = "scienceqa"
    metric = "multiple_choice_accuracy"
    layout = (
        'problems.json ({id: {"question", "choices", "answer", "hint", "image", "split"}}), optional pid_splits.json, '
        "images <split>/<id>/image.png or images/<split>/<id>/image.png"
    )
    hub = "lmms-lab/ScienceQA (config ScienceQA-IMG)"
    hub_config = "ScienceQA-IMG"
    hub_columns = ("question", "choices", "answer", "hint", "image")
    post_prompt = "\nAnswer with the option's letter from the given choices directly."  # lmms-eval scienceqa_img.yaml

    def official_samples(self, root: Path, split: str | None) -> Iterator[EvalSample]:
        """`split` is a key of pid_splits.json, or a "split" value of the problems when that file is absent."""
        problems = self.read_json(root, "problems.json")
        if (root / "pid_splits.json").is_file():
            ids = self.read_json(root, "pid_splits.json")
        else:
            ids = defaultdict(list)
            for pid, problem in problems.items():
                ids[problem["split"]].append(pid)
        chosen = self.choose(split, ids, "test")
        images = self.folder((root / "images" if (root / "images").is_dir() else root) / chosen)
        return (
            problem_sample(pid, str(images / pid / problems[pid]["image"]), problems[pid])
            for pid in ids[chosen]
            if problems[pid].get("image")
        )

    def hub_samples(self, copy: HubCopy, split: str | None) -> Iterator[EvalSample]:
        rows = copy.rows(split, self.hub_split, self)
        return (
            problem_sample(str(index), row["image"], row) for index, row in enumerate(rows) if row["image"] is not None
        )

    def prompt(self, sample: EvalSample) -> str:
        # lmms-eval sqa_doc_to_text, "default" format: [Context: hint\n] question \n A. choice ... + post_prompt
        hint, choices = sample.extra["hint"], sample.extra["choices"]
        context = f"Context: {hint}\n" if hint else ""
        options = "\n".join(f"{chr(ord('A') + i)}. {choice}" for i, choice in enumerate(choices))
        return f"{context}{sample.question}\n{options}{self.post_prompt}"

    def score(self, prediction: str, sample: EvalSample) -> float:
        return multiple_choice_accuracy(prediction, sample.extra["answer_index"], len(sample.extra["choices"]))


def problem_sample(pid: str, image: object, problem: dict) -> EvalSample:
    """The sample of one problem (official record or `datasets` row: same field names)."""
    choices, answer = list(problem["choices"]), int(problem["answer"])
    return EvalSample(
        pid,
        image,
        problem["question"],
        [chr(ord("A") + answer)],
        {"choices": choices, "hint": problem["hint"] or "", "answer_index": answer},
    )

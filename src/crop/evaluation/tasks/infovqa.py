"""InfographicVQA (Mathew et al., WACV 2022): questions about infographics, scored with ANLS like DocVQA."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from crop.evaluation.tasks.base import EvalSample
from crop.evaluation.tasks.docvqa import DocVQA

QUESTIONS = "infographicsVQA_val_v1.0_withQT.json"


class InfoVQA(DocVQA):
    """InfographicVQA validation: 2,801 questions; same columns, prompt and score as DocVQA.

    Prompt: lmms-eval infovqa_doc_to_text, the question + the default post_prompt of _default_template_infovqa_yaml.
    """

    name = "infovqa"
    layout = (
        f'{QUESTIONS} ({{"data": [{{"questionId", "question", "image_local_name", "answers"}}]}}) '
        "and images infographicsvqa_images/"
    )
    hub = "lmms-lab/DocVQA (config InfographicVQA)"
    hub_config = "InfographicVQA"

    def official_samples(self, root: Path, split: str | None) -> Iterator[EvalSample]:
        self.choose(split, ["val"], "val")
        questions = self.read_json(root, QUESTIONS)["data"]
        images = self.folder(root / "infographicsvqa_images")
        return (
            EvalSample(str(q["questionId"]), str(images / q["image_local_name"]), q["question"], q["answers"], {})
            for q in questions
        )

"""MME (Fu et al., 2023): yes/no questions in pairs about one image, 10 perception and 4 cognition subtasks.

Scored as lmms-eval's `mme` task scores it (its `utils.py`, which follows the authors' calculation script): each
answer is read as yes, no or other (the Otter parsing rule), a subtask's score is the mean over its images of
accuracy + accuracy+ (in percent; accuracy+ counts an image only when both of its answers are right), and the
perception and cognition scores are the sums of their subtasks' (at most 2000 and 800). The question's own
" Please answer yes or no." is replaced by lmms-eval's default post-prompt, as its `mme_doc_to_text` does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from crop.evaluation.tasks.base import SHORT_ANSWER, EvalSample, Task, mean

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
YES_OR_NO = " Please answer yes or no."
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


def mme_answer(text: str) -> str:
    """An answer read as "yes", "no" or "other" (the rule lmms-eval's `parse_pred_ans` brings from Otter)."""
    text = text.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    start = text[:4]
    return "yes" if "yes" in start else "no" if "no" in start else "other"


class MME(Task):
    """MME's 2,374 questions (two per image); the headline score is perception, cognition is reported beside it."""

    name = "mme"
    metric = "mme_perception_score"
    layout = (
        "MME_Benchmark_release_version/<subtask>/: each image with a <image name>.txt of 'question<TAB>answer' "
        "lines, side by side or in images/ and questions_answers_YN/"
    )
    hub = "lmms-lab/MME"
    hub_columns = ("question_id", "image", "question", "answer", "category")
    post_prompt = SHORT_ANSWER

    def official_samples(self, root: Path, split: str | None) -> Iterator[EvalSample]:
        if (root / "MME_Benchmark_release_version").is_dir():
            root = root / "MME_Benchmark_release_version"
        subtasks = [name for name in (*PERCEPTION, *COGNITION) if (root / name).is_dir()]
        if not subtasks:
            raise self.missing(root / PERCEPTION[0])
        samples = []
        for category in subtasks:
            folder = root / category
            texts = folder / "questions_answers_YN" if (folder / "questions_answers_YN").is_dir() else folder
            images = folder / "images" if (folder / "images").is_dir() else folder
            for text in sorted(texts.glob("*.txt")):
                image = next((images / (text.stem + s) for s in IMAGE_SUFFIXES if (images / (text.stem + s)).is_file()),
                             None)  # fmt: skip
                if image is None:
                    raise self.missing(images / (text.stem + IMAGE_SUFFIXES[0]))
                for number, line in enumerate(text.read_text(encoding="utf-8").splitlines()):
                    if line.strip():
                        question, answer = line.split("\t")[:2]
                        image_id = f"{category}/{image.name}"
                        samples.append(pair_sample(image_id, number, image, question, answer, category))
        return iter(samples)

    def hub_sample(self, row: dict, index: int) -> EvalSample:
        return pair_sample(row["question_id"], index, row["image"], row["question"], row["answer"], row["category"])

    def prompt(self, sample: EvalSample) -> str:
        return f"{sample.question.strip().replace(YES_OR_NO, '')}{self.post_prompt}"

    def score(self, prediction: str, sample: EvalSample) -> float:
        return float(mme_answer(prediction) == sample.answers[0].lower().strip().replace(".", ""))

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        """Per subtask the mean over images of accuracy + accuracy+; perception and cognition as their sums."""
        by_image: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for record in records:
            by_image[record["extra"]["category"]][record["extra"]["image_id"]].append(record["score"])
        subtasks = {
            category: mean(100 * mean(scores) + 100 * float(all(scores)) for scores in images.values())
            for category, images in by_image.items()
        }
        perception = sum(v for k, v in subtasks.items() if k in PERCEPTION)
        cognition = sum(v for k, v in subtasks.items() if k in COGNITION)
        return {"score": perception, "perception": perception, "cognition": cognition, "count": len(records),
                "subtasks": subtasks}  # fmt: skip

    def shown(self, score: float) -> str:
        return f"{score:.1f}"


def pair_sample(image_id: str, number: int, image: object, question: str, answer: str, category: str) -> EvalSample:
    """One of the two questions about an image; `image_id` pairs them."""
    extra = {"category": category, "image_id": image_id}
    return EvalSample(f"{image_id}#{number}", image, question, [answer.strip()], extra)

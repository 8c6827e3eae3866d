"""The lmms-eval bridge: `--model crop` answers lmms-eval requests exactly as `crop.apply(...).generate` does."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from conftest import make_image
from PIL import Image

import crop
from crop.errors import ConfigError
from crop.evaluation import lmms_eval_model
from crop.evaluation.lmms_eval_model import CropLMM
from crop.loading import load_model
from crop.strategies.registry import build_method
from crop.testing.llava import build_model, build_processor

HAS_LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None
REASON = "lmms-eval is not installed here (pip install lmms-eval); the bridge's tests need its model interface"
QUESTIONS = ["what colour is the square ?", "how many objects are there in the image ?"]
MAX_NEW_TOKENS = 8
STOP = "bottom"
TASK, SPLIT = "tiny_vqa", "test"


@pytest.mark.skipif(HAS_LMMS_EVAL, reason="lmms-eval is installed: the bridge itself is tested instead")
def test_without_lmms_eval_construction_says_how_to_install() -> None:
    with pytest.raises(ImportError, match="pip install lmms-eval"):
        CropLMM(pretrained="unused")


@pytest.fixture(scope="module")
def lmms_eval() -> Any:
    return pytest.importorskip("lmms_eval", reason=REASON)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llava")
    build_model(seed=0).save_pretrained(path)
    build_processor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [make_image(seed=1), make_image(240, 180, seed=2)]


def requests(lm: CropLMM, visuals: list[list[Image.Image]], questions: list[str]) -> list[Any]:
    """lmms-eval `generate_until` instances over a hand-made task whose docs hold the visuals."""
    from lmms_eval.api.instance import Instance

    lm.task_dict = {TASK: {SPLIT: [{"visuals": doc_visuals} for doc_visuals in visuals]}}
    return [
        Instance(
            request_type="generate_until",
            arguments=(
                question,
                {"until": [STOP], "max_new_tokens": MAX_NEW_TOKENS},
                lambda doc: doc["visuals"],
                doc_id,
                TASK,
                SPLIT,
            ),
            idx=0,
            metadata={"task": TASK, "doc_id": doc_id, "repeats": 1},
        )
        for doc_id, question in enumerate(questions)
    ]


def direct_answers(model_dir: Path, method: str, batches: list[list[int]], images: list[Image.Image]) -> list[str]:
    """Answers from crop's own API (not cut at the stop string), the requests batched as given, in request order."""
    model, processor = load_model(model_dir)
    pruning = build_method(method, budget=8, layer=2)
    localizer = crop.AttentionLocalizer(model, processor, layer=1) if pruning.needs_region else None
    pruned = crop.apply(model, processor, localizer=localizer, method=pruning)
    answers = [""] * len(images)
    for batch in batches:
        inputs = pruned.prepare([images[i] for i in batch], [QUESTIONS[i] for i in batch])
        sequences, _ = pruned.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        texts = processor.batch_decode(sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, text in zip(batch, texts, strict=True):
            answers[i] = text
    return answers


@pytest.mark.parametrize(
    ("method", "batch_size", "batches"),
    [("fastv", 1, [[1], [0]]), ("fastv", 2, [[1, 0]]), ("crop", 2, [[1, 0]])],
    ids=["fastv-batch1", "fastv-batch2", "crop-attention-batch2"],
)
def test_generate_until_matches_crop_apply(
    lmms_eval: Any, model_dir: Path, images: list[Image.Image], method: str, batch_size: int, batches: list[list[int]]
) -> None:
    """Same answers as crop's API for the same batches (longest prompt first), returned in request order."""
    if batch_size == 1:
        lm = CropLMM(pretrained=str(model_dir), method=method, budget=8)
    else:  # as lmms-eval builds it: --model_args string, --batch_size and --device as extra config
        args = f"pretrained={model_dir},method={method},budget=8"
        lm = CropLMM.create_from_arg_string(args, {"batch_size": str(batch_size), "device": "cpu"})
    answers = lm.generate_until(requests(lm, [[image] for image in images], QUESTIONS))
    direct = direct_answers(model_dir, method, batches, images)
    assert any(STOP in text for text in direct), "the stop string should cut at least one answer"
    assert answers == [text.split(STOP, 1)[0] for text in direct]
    assert lm.kept_tokens == [8, 8]


def test_full_is_a_method_of_the_bridge(lmms_eval: Any, model_dir: Path, images: list[Image.Image]) -> None:
    """`method=full` answers with every visual token, as the unpruned model does."""
    lm = CropLMM(pretrained=str(model_dir), method="full")
    answers = lm.generate_until(requests(lm, [[image] for image in images], QUESTIONS))
    model, processor = load_model(model_dir)
    reference = crop.apply(model, processor, method="full")
    request = reference.prepare(images, QUESTIONS)
    sequences, stats = reference.generate(request, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    texts = processor.batch_decode(sequences[:, request["input_ids"].shape[1] :], skip_special_tokens=True)
    assert sorted(answers) == sorted(text.split(STOP, 1)[0] for text in texts)
    assert lm.kept_tokens == [row.image_tokens for row in stats.rows]


def test_unsupported_requests_are_refused_clearly(lmms_eval: Any, model_dir: Path, images: list[Image.Image]) -> None:
    lm = CropLMM(pretrained=str(model_dir), method="fastv", budget=8)
    with pytest.raises(NotImplementedError, match="exactly one image per request"):
        lm.generate_until(requests(lm, [images], QUESTIONS[:1]))
    with pytest.raises(NotImplementedError, match="exactly one image per request"):
        lm.generate_until(requests(lm, [[]], QUESTIONS[:1]))
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        lm.loglikelihood([])
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round([])


def test_region_method_without_localizer_is_refused(lmms_eval: Any, model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="needs a contextual region"):
        CropLMM(pretrained=str(model_dir), method="crop", budget=8, localizer="none")


def test_lmms_eval_resolves_crop_to_the_bridge(lmms_eval: Any) -> None:
    """`--model crop` resolves through lmms-eval's model registry once registered (entry point or `register()`)."""
    from lmms_eval.api.registry import get_model as get_decorated_model
    from lmms_eval.models import get_model
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    registry.register_manifest(lmms_eval_model.manifest())
    assert registry.get_model_class("crop") is CropLMM
    lmms_eval_model.register()
    assert get_model("crop") is CropLMM
    assert get_decorated_model("crop") is CropLMM

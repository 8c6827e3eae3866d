"""lmms-eval bridge: `--model crop` answers any lmms-eval generation task with a crop-pruned Hugging Face VLM.

lmms-eval 0.7 resolves `--model` names through `lmms_eval.models.MODEL_REGISTRY_V2`, filled from its built-in list
and from the `lmms_eval.models` entry-point group: `manifest()` is that entry point's payload, and `main()`
(`python -m crop.evaluation.lmms_eval_model --model crop ...`) registers it and runs lmms-eval's command line.
See docs/lmms_eval.md. Importing this module never needs lmms-eval; constructing `CropLMM` does.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

import crop
from crop.errors import ConfigError
from crop.loading import load_model
from crop.localize.by_name import localizer_by_name
from crop.prompting import build_prompt
from crop.region import Region
from crop.strategies.registry import build_method

try:
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model
    from lmms_eval.utils import Collator
    from loguru import logger

    _LMMS_EVAL_MISSING: ImportError | None = None
except ImportError as exc:  # lmms-eval is optional: only `CropLMM(...)` needs it
    lmms = object
    _LMMS_EVAL_MISSING = exc

MODEL_NAME = "crop"
CLASS_PATH = "crop.evaluation.lmms_eval_model.CropLMM"


class CropLMM(lmms):
    """An lmms-eval model: one image and a question per request, answered through `crop.apply(...).generate`.

    `--model_args` (comma-separated `key=value`): `pretrained` (model directory or hub id), `method` (see
    `crop methods`), `budget` (visual tokens kept), `layer` (K), `localizer` ("attention", "none" or the directory
    of a grid-box localizer VLM), `clip` (the CLIP checkpoint of method cdpruner), `max_new_tokens` (when the task
    sets none), `attn_implementation`, `dtype`, `device`; `--batch_size` sets the batch size.
    """

    def __init__(
        self,
        pretrained: str,
        method: str = "crop",
        budget: int | str | None = None,
        layer: int = 2,
        localizer: str = "attention",
        batch_size: int | str = 1,
        max_new_tokens: int = 1024,
        attn_implementation: str = "sdpa",
        dtype: str = "float32",
        device: str | None = None,
        clip: str | None = None,
    ) -> None:
        if _LMMS_EVAL_MISSING is not None:
            raise ImportError("CropLMM is an lmms-eval model and needs lmms-eval: pip install lmms-eval") from (
                _LMMS_EVAL_MISSING
            )
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ConfigError(f"batch_size must be a whole number >= 1 ('auto' is not supported), got {batch_size!r}")
        super().__init__()
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, self.processor = load_model(str(pretrained), attn_implementation=attn_implementation, dtype=dtype)
        self.model = model.to(self._device)
        budget = None if budget is None or str(budget).lower() in ("", "none") else int(budget)
        self.method = build_method(str(method), budget=budget, layer=int(layer), clip=clip or None)
        self.localizer = self._localizer(str(localizer), int(layer)) if self.method.needs_region else None
        self.pruned = crop.apply(self.model, self.processor, method=self.method)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.kept_tokens: list[int] = []
        """Visual tokens kept (after the last reduction) for every request answered so far, in answer order."""

    @property
    def device(self) -> torch.device:
        return self._device

    def _localizer(self, name: str, layer: int) -> crop.Localizer:
        """The region finder a region-based method needs: the model's own attention at K-1, or a grid-box VLM."""
        localizer = localizer_by_name(name, self.model, self.processor, layer=layer)
        if localizer is None:
            raise ConfigError(
                f"{self.method.describe()} needs a contextual region: use localizer=attention or localizer=<directory "
                "of a grid-box localizer VLM>, or a method that needs none (e.g. method=crop-fused or fastv)"
            )
        return localizer

    def generate_until(self, requests: list[Any]) -> list[str]:
        """Answers to `(context, gen_kwargs, doc_to_visual, doc_id, task, split)` requests, in request order.

        As lmms-eval's own wrappers do, requests are grouped by `gen_kwargs` and batched longest prompt first.
        """
        collator = Collator([request.args for request in requests], self._length_key, grouping=True)
        answers: list[str] = []
        kept_before = len(self.kept_tokens)
        for chunk in collator.get_batched(n=self.batch_size):
            answers += self._answer(chunk)
        kept = self.kept_tokens[kept_before:]
        if kept:
            logger.info(
                f"crop ({self.pruned.method.describe()}): {sum(kept) / len(kept):.1f} visual tokens kept on average "
                f"over {len(kept)} requests"
            )
        return collator.get_original(answers)

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "crop's lmms-eval bridge answers generation tasks only (output_type: generate_until); loglikelihood "
            "requests (multiple-choice tasks scored by likelihood) are not supported"
        )

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError(
            "crop's lmms-eval bridge answers single-turn generation tasks only (output_type: generate_until); "
            "multi-round generation is not supported"
        )

    def _length_key(self, args: tuple[Any, ...]) -> tuple[int, str]:
        """Longest context first (what lmms-eval's wrappers do: out-of-memory errors show up at once)."""
        return -len(self.processor.tokenizer.encode(args[0], add_special_tokens=False)), args[0]

    def _answer(self, chunk: list[tuple[Any, ...]]) -> list[str]:
        """One batch (equal `gen_kwargs`): pruned generation, decoded and cut at the first `until` string."""
        contexts, all_gen_kwargs, doc_to_visuals, doc_ids, tasks, splits = zip(*chunk, strict=True)
        images = [self._image(*request) for request in zip(doc_to_visuals, doc_ids, tasks, splits, strict=True)]
        questions = [self._question(context) for context in contexts]
        gen_kwargs = all_gen_kwargs[0]
        request = self.pruned.prepare(images, questions, regions=self._regions(images, questions))
        request = request.to(self._device, self.model.dtype)
        prompt_length = request["input_ids"].shape[1]
        sequences, stats = self.pruned.generate(request, **self._generation_options(gen_kwargs))
        self.kept_tokens += [row.kept_tokens for row in stats.rows]
        texts = self.processor.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)
        until = gen_kwargs.get("until") or []
        stops = [until] if isinstance(until, str) else list(until)
        return [_cut(text, stops) for text in texts]

    def _generation_options(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        """`generate` arguments from the task's `gen_kwargs`, read as lmms-eval's llava_hf reads them."""
        options: dict[str, Any] = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
            "do_sample": float(gen_kwargs.get("temperature") or 0) > 0,
        }
        if options["do_sample"]:
            options["temperature"] = float(gen_kwargs["temperature"])
            if gen_kwargs.get("top_p") is not None:
                options["top_p"] = float(gen_kwargs["top_p"])
        return options

    def _image(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> Image.Image:
        """The request's one image; anything else is refused (crop prunes the tokens of exactly one image)."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if not isinstance(visuals, list | tuple):
            visuals = [] if visuals is None else [visuals]
        if len(visuals) != 1 or not isinstance(visuals[0], Image.Image):
            found = ", ".join(type(visual).__name__ for visual in visuals) or "none"
            raise NotImplementedError(
                f"task {task}, doc {doc_id}: crop's lmms-eval bridge supports exactly one image per request "
                f"(got {len(visuals)} visuals: {found}); text-only, multi-image and video tasks are not supported"
            )
        return visuals[0]

    def _question(self, context: str) -> str:
        """The task's context as the question; an image placeholder in it is dropped (the prompt places the image)."""
        image_token = getattr(self.processor, "image_token", None)
        return context.replace(image_token, "").strip() if image_token else context

    def _regions(self, images: list[Image.Image], questions: list[str]) -> list[Region] | None:
        """Per request the contextual region (None for methods that need none), computed on the model's device."""
        if self.localizer is None:
            return None
        if not isinstance(self.localizer, crop.AttentionLocalizer):
            return [self.localizer.localize(image, question) for image, question in zip(images, questions, strict=True)]
        regions = []
        for image, question in zip(images, questions, strict=True):
            prompt = build_prompt(self.processor, question)
            inputs = self.processor(images=image.convert("RGB"), text=prompt, return_tensors="pt")
            inputs = {key: self._to_device(value) for key, value in inputs.items()}
            viewport = self.pruned.adapter.viewport(self.processor, image.size)
            regions.append(self.localizer.localize_inputs(inputs, viewport))
        return regions

    def _to_device(self, value: Any) -> Any:
        """Tensors onto the model's device (floating ones in its dtype); other values as they are."""
        if not isinstance(value, torch.Tensor):
            return value
        return value.to(self._device, dtype=self.model.dtype if value.is_floating_point() else None)


if _LMMS_EVAL_MISSING is None:
    register_model(MODEL_NAME)(CropLMM)  # lmms-eval's decorator registry (`lmms_eval.api.registry.get_model`)


def _cut(text: str, stops: list[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def manifest() -> Any:
    """The `lmms_eval.models` entry-point payload: `--model crop` is `CropLMM` (a "simple" lmms-eval model)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register() -> None:
    """Make `--model crop` resolvable in this process (what the entry point does when declared in packaging)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)


def main() -> None:
    """lmms-eval's command line (same arguments as `python -m lmms_eval`) with `--model crop` registered."""
    register()
    from lmms_eval.cli.dispatch import main as lmms_eval_main

    lmms_eval_main()


if __name__ == "__main__":
    main()

"""LLaVA-1.5 in vLLM with crop's pre-LLM pruning: `CropLlavaForConditionalGeneration`, vLLM's own model with
two changes. The processor reserves as many placeholders per image as the method will keep (its geometry and
budget decide, before the encoder runs), and `embed_multimodal` returns those tokens, chosen from the projected
visual tokens. vLLM numbers the prompt consecutively, so the kept tokens are numbered as crop's `compact`
positions. Everything else (tower, projector, LLM, cache) is vLLM's, unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path

from safetensors.torch import load_file, save_file
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from crop.adapter import VisualLayout
from crop.serving.pruning import BOX_KWARG, REGION_KWARG, FeaturePruner, request_region
from crop.serving.vllm_common import BOX_FIELD, box_tensor, pruner_for, region_of_box

ARCHITECTURE = "CropLlavaForConditionalGeneration"


def llava_layout(config) -> VisualLayout:
    """The LLaVA-1.5 token grid: one square grid of patches, after the CLS token when the config keeps it."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    return VisualLayout(rows=side, cols=side, leading=1 if config.vision_feature_select_strategy == "full" else 0)


class CropLlavaProcessingInfo(LlavaProcessingInfo):
    @cached_property
    def pruner(self) -> FeaturePruner:
        return pruner_for(self.get_hf_config())

    @cached_property
    def layout(self) -> VisualLayout:
        return llava_layout(self.get_hf_config())

    def get_max_image_tokens(self) -> int:
        """vLLM's count (the whole grid, an upper bound), asked when the engine starts: bad settings fail there."""
        self.pruner.check_layout(self.layout)
        return super().get_max_image_tokens()


class CropLlavaMultiModalProcessor(LlavaMultiModalProcessor):
    """LLaVA's processor, with the request's region passed to the model and the pruned count of placeholders."""

    def get_dummy_inputs(self, seq_len, mm_counts, mm_options):
        """vLLM's profiling inputs, with the whole image as region for the methods that need one."""
        inputs = super().get_dummy_inputs(seq_len, mm_counts, mm_options)
        return dataclasses.replace(inputs, hf_processor_mm_kwargs={BOX_KWARG: [0.0, 0.0, 1.0, 1.0]})

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        own = {key: hf_kwargs[key] for key in (REGION_KWARG, BOX_KWARG) if key in hf_kwargs}
        rest = {key: value for key, value in hf_kwargs.items() if key not in own}
        processed = super()._call_hf_processor(hf_data, rest)
        images = processed["pixel_values"].shape[0] if "pixel_values" in processed else 0
        if images:
            region = request_region(own)
            self.info.pruner.check(self.info.layout, region)
            processed[BOX_FIELD] = box_tensor(region, images)
        return processed

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {**super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
                BOX_FIELD: MultiModalFieldConfig.batched("image")}  # fmt: skip

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_index

        def replacement(item_idx: int) -> list[int]:
            box = out_mm_kwargs["image"][item_idx][BOX_FIELD].data
            count = self.info.pruner.count(self.info.layout, region_of_box(box))
            return [image_token_id] * count

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


@MULTIMODAL_REGISTRY.register_processor(
    CropLlavaMultiModalProcessor, info=CropLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class CropLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA whose image embeddings are the tokens crop's method keeps (settings: the config's `crop`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        self.pruner = pruner_for(config)
        self.layout = llava_layout(config)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        boxes = kwargs.pop(BOX_FIELD, None)
        embeddings = super().embed_multimodal(**kwargs)
        if len(embeddings) == 0:
            return embeddings
        return [
            self.pruner.reduce(image, self.layout, region_of_box(box))
            for image, box in zip(embeddings, boxes, strict=True)
        ]


def save_for_vllm(checkpoint: str | Path, out: str | Path) -> Path:
    """A copy of a saved LLaVA checkpoint in the layout vLLM loads: transformers 5 saves the CLIP tower flat
    (`vision_tower.embeddings.*`), vLLM reads the hub's (`vision_tower.vision_model.*`). Other files are copied."""
    source, target = Path(checkpoint), Path(out)
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy2(path, target / path.name)
    for path in source.glob("*.safetensors"):
        weights = load_file(path)
        renamed = {_hub_name(name): tensor for name, tensor in weights.items()}
        save_file(renamed, target / path.name, metadata={"format": "pt"})
    index = target / "model.safetensors.index.json"
    if index.exists():
        content = json.loads(index.read_text())
        content["weight_map"] = {_hub_name(name): file for name, file in content["weight_map"].items()}
        index.write_text(json.dumps(content, indent=2))
    return target


def _hub_name(name: str) -> str:
    for prefix in ("vision_tower.", "model.vision_tower."):
        if name.startswith(prefix) and not name.startswith(prefix + "vision_model."):
            return prefix + "vision_model." + name[len(prefix) :]
    return name

"""LLaVA-1.5 in vLLM with crop's pre-LLM pruning: `CropLlavaForConditionalGeneration`, vLLM's own model with
two changes. The processor reserves as many placeholders per image as the method will keep (its geometry and
budget decide, before the encoder runs), and `embed_multimodal` returns those tokens, chosen from the projected
visual tokens. vLLM numbers the prompt consecutively, so the kept tokens are numbered as crop's `compact`
positions. Everything else (tower, projector, LLM, cache) is vLLM's, unchanged.
"""

from __future__ import annotations

import json
import shutil
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

from crop.adapter import VisualLayout
from crop.serving.pruning import FeaturePruner
from crop.serving.vllm_common import BOX_FIELD, RegionProcessorMixin, pruner_for, region_of_box

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


class CropLlavaMultiModalProcessor(RegionProcessorMixin, LlavaMultiModalProcessor):
    """LLaVA's processor, with the request's region passed to the model and the pruned count of placeholders."""

    def image_layouts(self, processed: BatchFeature) -> list[VisualLayout]:
        images = processed["pixel_values"].shape[0] if "pixel_values" in processed else 0
        return [self.info.layout] * images

    def item_layout(self, item) -> VisualLayout:
        return self.info.layout

    def image_token_id(self) -> int:
        return self.info.get_hf_config().image_token_index


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

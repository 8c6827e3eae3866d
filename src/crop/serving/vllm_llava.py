"""LLaVA-1.5 in vLLM with crop's pre-LLM pruning: `CropLlavaForConditionalGeneration`, vLLM's own model with
two changes. The processor reserves as many placeholders per image as the method will keep (its geometry and
budget decide, before the encoder runs), and `embed_multimodal` returns those tokens, chosen from the projected
visual tokens. vLLM numbers the prompt consecutively, so the kept tokens are numbered as crop's `compact`
positions. Everything else (tower, projector, LLM, cache) is vLLM's, unchanged.

VisionZip, HoloV and CDPruner read the tower's feature layer: its output states (CLS first), the CLS query's
attention to the patches and the keys. vLLM builds the tower up to that layer and returns its output; the plugin
takes the layer's input with a forward pre-hook held for that call, and computes the attention from the layer's own
`qkv_proj` (vLLM's attention kernel returns no probabilities), as crop does on the Hugging Face tower. CDPruner
also reads the tower's `post_layernorm` (vLLM does not load it; the plugin keeps it aside while loading), CLIP's
text tower (the `clip` setting, loaded in the engine on first use) and each request's question (`crop_question`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
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

from crop.adapter import VisionCrops, VisionInternals, VisualLayout
from crop.errors import ConfigError, UnsupportedModelError
from crop.models.llava import llava_viewport
from crop.region import Viewport
from crop.serving.pruning import FeaturePruner, TowerOutputs
from crop.serving.vllm_common import (
    BOX_FIELD,
    QUESTION_FIELD,
    RegionProcessorMixin,
    pruner_for,
    question_of,
    region_of_box,
)

ARCHITECTURE = "CropLlavaForConditionalGeneration"
POST_LAYERNORM = "vision_tower.vision_model.post_layernorm."


def llava_layout(config) -> VisualLayout:
    """The LLaVA-1.5 token grid: one square grid of patches, after the CLS token when the config keeps it."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    return VisualLayout(rows=side, cols=side, leading=1 if config.vision_feature_select_strategy == "full" else 0)


def llava_pruner(config) -> FeaturePruner:
    """The config's pruner; VisionZip, HoloV and CDPruner run too (the plugin reads the tower's feature layer),
    given one feature layer and the 'default' strategy (CLS not in the grid), as their authors' LLaVA has."""
    pruner = pruner_for(config, vision_internals=True)
    settings = pruner.settings
    if settings.reads_vision and (
        not isinstance(config.vision_feature_layer, int) or config.vision_feature_select_strategy != "default"
    ):
        raise UnsupportedModelError(
            f"{settings.method} reads one vision feature layer with the 'default' strategy (CLS not in the "
            f"grid); this model has layer {config.vision_feature_layer!r}, strategy "
            f"{config.vision_feature_select_strategy!r}"
        )
    width = config.text_config.hidden_size
    if settings.method == "cdpruner" and settings.budget > width:
        raise ConfigError(
            f"cdpruner keeps at most as many tokens as its kernel's rank, the projected features' width {width}: "
            f"budget {settings.budget} could leave fewer than the placeholders vLLM reserves"
        )
    return pruner


class CropLlavaProcessingInfo(LlavaProcessingInfo):
    @cached_property
    def pruner(self) -> FeaturePruner:
        return llava_pruner(self.get_hf_config())

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

    def image_viewport(self, image) -> Viewport:
        return llava_viewport(self.info.get_hf_processor(), image.size)


@MULTIMODAL_REGISTRY.register_processor(
    CropLlavaMultiModalProcessor, info=CropLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class CropLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA whose image embeddings are the tokens crop's method keeps (settings: the config's `crop`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        self.pruner = llava_pruner(config)
        self.layout = llava_layout(config)
        self.post_layernorm: dict[str, torch.Tensor] = {}
        """The tower's final norm, which vLLM does not load when the feature layer is not the last (CDPruner)."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM's loading, with the tower's `post_layernorm` kept aside (vLLM drops it)."""

        def keep_head(items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in items:
                if name.removeprefix("model.").startswith(POST_LAYERNORM):
                    self.post_layernorm[name.rsplit(".", 1)[1]] = tensor.clone()
                yield name, tensor

        return super().load_weights(keep_head(weights))

    def vision_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Feature-layer states through the tower's `post_layernorm` (CLIP's image-text projection expects them)."""
        if set(self.post_layernorm) != {"weight", "bias"}:
            raise ConfigError(f"this checkpoint has no {POST_LAYERNORM}weight and bias, which cdpruner reads")
        weight, bias = (self.post_layernorm[key].to(hidden.device, hidden.dtype) for key in ("weight", "bias"))
        return F.layer_norm(hidden, weight.shape, weight, bias, self.config.vision_config.layer_norm_eps)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        boxes = kwargs.pop(BOX_FIELD, None)
        questions = kwargs.pop(QUESTION_FIELD, None)
        if self.pruner.settings.reads_vision:
            return self._embed_with_internals(boxes, questions, **kwargs)
        embeddings = super().embed_multimodal(**kwargs)
        if len(embeddings) == 0:
            return embeddings
        kept = []
        for image, box in zip(embeddings, boxes, strict=True):
            region, viewport = region_of_box(box)
            kept.append(self.pruner.reduce(image, self.layout, region, viewport=viewport))
        return kept

    def _embed_with_internals(self, boxes, questions, **kwargs: object) -> MultiModalEmbeddings:
        """The tower run once with its feature layer's internals taken, then the method on each image (with its
        request's question, for a method that reads it)."""
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise ConfigError(f"{self.pruner.method.describe()} reads the vision tower: send images, not embeddings")
        internals = tower_internals(self.vision_tower, image_input["pixel_values"])
        features = self.multi_modal_projector(internals.hidden[:, 1:])
        self._clip_on(features.device)
        cells = torch.arange(features.shape[1])[None]
        kept = []
        for b, box in enumerate(boxes):
            region, viewport = region_of_box(box)
            tower = TowerOutputs(VisionCrops(internals.crops(b, b + 1), cells, cells), self.multi_modal_projector,
                                 self.vision_head)  # fmt: skip
            question = None if questions is None else question_of(questions[b])
            kept.append(self.pruner.reduce(features[b], self.layout, region, viewport, tower, question))
        return kept

    def _clip_on(self, device: torch.device) -> None:
        """CDPruner's CLIP towers (loaded on first use) on the engine's device."""
        if self.pruner.settings.method == "cdpruner":
            clip = self.pruner.method.clip
            clip.text_model.to(device)
            clip.visual_projection.to(device)


def tower_internals(tower: nn.Module, pixel_values: torch.Tensor) -> VisionInternals:
    """vLLM's CLIP tower (built up to the feature layer) on `pixel_values` `(images, C, H, W)`: the feature
    layer's output states (CLS first), the CLS query's attention to the patches summed over heads, and the keys
    averaged over heads, from that layer's input (a pre-hook held for this call) and its own `qkv_proj`."""
    layers = tower.vision_model.encoder.layers
    layer = layers[-1]
    attention = layer.self_attn
    if attention.num_heads_per_partition != attention.num_heads:
        raise UnsupportedModelError(
            "VisionZip and HoloV sum the CLS attention over all heads; with tensor parallelism each rank holds "
            f"{attention.num_heads_per_partition} of {attention.num_heads}: serve them with tensor_parallel_size=1"
        )
    captured: dict[str, torch.Tensor] = {}

    def capture(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured["input"] = args[0]

    handle = layer.register_forward_pre_hook(capture)
    try:
        hidden = tower(pixel_values, feature_select_strategy="full")
    finally:
        handle.remove()
    qkv, _ = attention.qkv_proj(layer.layer_norm1(captured["input"]))
    query, keys, _ = qkv.chunk(3, dim=-1)
    images, length, _ = keys.shape
    query = query[:, :1].view(images, 1, attention.num_heads, -1).transpose(1, 2)
    keys = keys.view(images, length, attention.num_heads, -1).transpose(1, 2)
    probabilities = ((query @ keys.transpose(-1, -2)) * attention.scale).float().softmax(-1)
    return VisionInternals(
        hidden=hidden, cls_attention=probabilities[:, :, 0, 1:].sum(1), keys=keys.mean(1), heads=attention.num_heads
    )


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

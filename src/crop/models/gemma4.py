"""Gemma 4 (`Gemma4ForConditionalGeneration`): aspect-preserving soft-token grids, sliding windows, image tokens
attending both ways, per-layer embeddings.

The processor resizes each image, keeping its aspect ratio, to whole `k x k` windows of patches (`k` the pooling
kernel) within a soft-token budget; the tower pools each window into one soft token, in raster order, so an image
is one `rows x cols` grid (`image_position_ids` holds each patch's `(x, y)`: cols = (max x + 1) / k). The resize
rounds each side down to whole windows and crops nothing, so the grid shows the whole image, as on Qwen.

Inside the LLM, most layers attend within a sliding window, and there an image's tokens also see the image's later
tokens (`mm_token_type_ids` marks them). After pruning, both are counted in the kept tokens: a pruned layer masks
as the model would on a prompt of only the kept tokens (the window spans `window` kept tokens; kept image tokens
see each other both ways), and its sliding cache holds the last `window - 1` kept tokens. Each layer's per-layer
embedding (PLE) input is gathered with the hidden states, so every kept token keeps its own. Methods acting before
the LLM splice a new prompt that goes in as ids with the new tokens as `mm_encoder_outputs`, so that the model
builds the per-layer inputs and the masks of that prompt itself. In-LLM pruning of checkpoints that share KV
between their last layers (`num_kv_shared_layers`) is refused: those layers read keys of unpruned layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import Gemma4Processor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.gemma4.modeling_gemma4 import get_block_sequence_ids_for_mask
from transformers.processing_utils import ProcessorMixin

from crop.adapter import ModelAdapter, VisionCrops, VisualLayout, register, register_processor
from crop.errors import ConfigError, UnsupportedModelError
from crop.region import Viewport
from crop.strategies.ilp import ILPHooks, LayerAttention


@register("Gemma4ForConditionalGeneration")
class Gemma4Adapter(ModelAdapter):
    """One soft-token grid per image; sliding windows and image blocks for the in-LLM masks; PLE follows."""

    family = "gemma4"

    def visual_layout(self) -> VisualLayout | None:
        return None

    def visual_layouts(self, inputs: dict[str, Any]) -> list[VisualLayout]:
        positions = inputs.get("image_position_ids")
        batch = inputs["input_ids"].shape[0]
        if positions is None:
            raise ConfigError("Gemma 4 inputs need image_position_ids (pass the processor's whole output)")
        if positions.shape[0] != batch:
            raise ConfigError(f"{positions.shape[0]} images for {batch} prompts: crop supports one image per prompt")
        kernel = self.model.config.vision_config.pooling_kernel_size
        layouts = []
        for patches in positions:
            real = patches[(patches >= 0).all(-1)]
            cols, rows = (real.max(0).values + 1).tolist()
            layouts.append(VisualLayout(rows=rows // kernel, cols=cols // kernel))
        return layouts

    def viewport(self, processor: Any, image_size: tuple[int, int]) -> Viewport:
        """The resize keeps the aspect ratio (each side rounded down to whole pooling windows) and crops nothing."""
        return Viewport()

    def image_features(self, inputs: dict[str, Any]) -> list[torch.Tensor]:
        vision = self.model.model.vision_tower
        output = self.model.model.get_image_features(
            inputs["pixel_values"].to(vision.dtype), inputs["image_position_ids"], return_dict=True
        )
        return list(output.pooler_output)

    def spliced_inputs(
        self,
        original: dict[str, Any],
        spliced: dict[str, Any],
        source: torch.Tensor,
        position: str,
        side: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """The new prompt as ids, its image tokens marked in `mm_token_type_ids`, and the new tokens as
        `mm_encoder_outputs`: the model embeds the text and builds the per-layer inputs and masks itself."""
        spliced = super().spliced_inputs(original, spliced, source, position)
        tokens = self.spliced_image_tokens(spliced)
        spliced["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=tokens)}
        image = (spliced["input_ids"] == self.image_token_id) & spliced["attention_mask"].bool()
        spliced["mm_token_type_ids"] = image.long()
        spliced.pop("image_position_ids", None)
        return spliced

    def layer_attention(self) -> list[LayerAttention]:
        """Sliding layers: the window, and image blocks when the model attends within images both ways."""
        text = self.text_config
        blocks = text.use_bidirectional_attention == "vision"
        if text.use_bidirectional_attention == "all":
            raise UnsupportedModelError("gemma4: checkpoints attending both ways over all tokens are not supported")
        sliding = LayerAttention(window=text.sliding_window, blocks=blocks)
        return [sliding if kind == "sliding_attention" else LayerAttention() for kind in text.layer_types]

    def attention_blocks(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """Each image's tokens form a block (`mm_token_type_ids`), as the model's own masks build them."""
        types = inputs.get("mm_token_type_ids")
        if types is None:
            raise ConfigError("Gemma 4 inputs need mm_token_type_ids (pass the processor's whole output)")
        return get_block_sequence_ids_for_mask(types, device=inputs["input_ids"].device)

    def pruning_hooks(self, hooks: ILPHooks) -> list[RemovableHandle]:
        """Pre-hooks, after the pruning hooks, that gather each pruned layer's per-layer input (its second
        argument) to the tokens the layer sees, at prefill."""
        if self.text_config.num_kv_shared_layers:
            raise UnsupportedModelError(
                f"gemma4: this checkpoint shares KV between its last {self.text_config.num_kv_shared_layers} layers, "
                "which read the keys of earlier, unpruned layers: in-LLM pruning is not supported on it yet; use a "
                "method acting before the LLM (pool, divprune, random, crop with ILP at K = 0 or PLC)"
            )

        def gather_for(index: int) -> Callable[..., Any]:
            def gather(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                call = hooks.active_call
                if call is None or not call.prefill or len(args) < 2 or args[1] is None:
                    return None
                layout = hooks.layout_after(index)
                per_layer = args[1]
                rows = layout.index.shape[0] // per_layer.shape[0]
                per_layer = per_layer.repeat_interleave(rows, 0)
                gathered = per_layer.gather(1, layout.index[..., None].expand(-1, -1, per_layer.shape[-1]))
                return (args[0], gathered, *args[2:]), kwargs

            return gather

        layers = self.decoder_layers()
        return [
            layers[index].register_forward_pre_hook(gather_for(index), with_kwargs=True)
            for index in range(hooks.first_pruned, len(layers))
        ]

    def vision_crops(self, inputs: dict[str, Any]) -> list[VisionCrops]:
        raise UnsupportedModelError(
            f"VisionZip is not supported for {self.family}: it ranks patches by the vision tower's CLS attention; "
            "this tower has no CLS token and pools 3x3 patches into each soft token; use divprune, pool, random or an "
            "in-LLM method"
        )

    def renumbering_rotary(self) -> Any:
        raise UnsupportedModelError(
            f"{self.family}: renumbered positions (the authors' PyramidDrop and SparseVLM) are not supported: Gemma 4 "
            "computes rotary embeddings per layer type; use the method's default positions='original'"
        )


@register_processor
class Gemma4ImageTextProcessor(Gemma4Processor):
    """`Gemma4Processor` without the video and audio slots (the video processor needs torchvision): images and
    text only. It sets what `Gemma4Processor.__init__` sets, then initialises with its two slots; it also takes one
    image per prompt as a flat list, as crop gives every processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_seq_length: int = 280,
                 **kwargs):  # fmt: skip
        self.image_seq_length = image_seq_length
        self.image_token_id, self.image_token = tokenizer.image_token_id, tokenizer.image_token
        self.boi_token, self.eoi_token = tokenizer.boi_token, tokenizer.eoi_token
        self.video_token = self.video_token_id = None
        self.audio_seq_length, self.audio_ms_per_token = 750, 40
        self.audio_token_id = getattr(tokenizer, "audio_token_id", None)
        self.audio_token = getattr(tokenizer, "audio_token", None)
        self.boa_token = getattr(tokenizer, "boa_token", None)
        self.eoa_token = getattr(tokenizer, "eoa_token", None)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> Any:
        flat = isinstance(images, list | tuple) and not any(isinstance(image, list | tuple) for image in images)
        if flat and isinstance(text, list | tuple) and len(images) == len(text) > 1:
            images = [[image] for image in images]
        return super().__call__(images=images, text=text, **kwargs)

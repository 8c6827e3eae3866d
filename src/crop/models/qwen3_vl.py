"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): Qwen2.5-VL's dynamic grids and 3-D M-RoPE, plus DeepStack.

The token grid, viewports and positions are Qwen2-VL's (`crop.models.qwen2_vl`); the attention applies per-head
RMS norms to queries and keys before rotary, which the core's attention rows follow. DeepStack: the vision
tower's features from a few of its blocks (`deepstack_visual_indexes`) are added to the hidden states after the
first LLM layers, at the visual positions (`visual_pos_masks`, `deepstack_visual_embeds`). While a pruned call
runs, crop takes those two inputs away from the text model and adds the features itself after each of those
layers, to the visual tokens that layer's output still holds (a merged token gets its members' mean), so ILP at
a layer K inside the DeepStack range keeps the injected features aligned with the tokens that remain.
Methods acting before the LLM compress the DeepStack features with the tokens (`ModelAdapter.encode_images`): a
kept cell keeps its own, a pooled token gets its window's mean, as its embedding does; the spliced prompt then
goes in as `input_ids` with `mm_encoder_outputs` (the compressed tokens and their DeepStack features), so the model
places both at the new placeholders itself. Methods whose tokens are no fixed mix of the cells are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import Qwen3VLProcessor
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from crop.adapter import register, register_processor
from crop.errors import ConfigError
from crop.models.qwen2_vl import Qwen2VLAdapter
from crop.strategies.ilp import ILPHooks


@register("Qwen3VLForConditionalGeneration")
class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen2-VL's grids and positions; DeepStack features follow the tokens each layer keeps."""

    family = "qwen3-vl"

    def image_features(self, inputs: dict[str, Any]) -> list[torch.Tensor]:
        return self.encode_images(inputs)[0]

    def encode_images(self, inputs: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each image's tokens and its DeepStack features `(tokens, DeepStack layers, dim)`, from one tower pass."""
        grids = inputs.get("image_grid_thw")
        if grids is None:
            raise ConfigError("Qwen3-VL inputs need image_grid_thw (pass the processor's whole output)")
        vision = self.model.model.visual
        output = self.model.model.get_image_features(inputs["pixel_values"].to(vision.dtype), grids, return_dict=True)
        side = [torch.stack(layers, dim=1) for layers in zip(*output.deepstack_features, strict=True)]
        return list(output.pooler_output), side

    def spliced_inputs(
        self,
        original: dict[str, Any],
        spliced: dict[str, Any],
        source: torch.Tensor,
        position: str,
        side: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """Qwen2-VL's positions for the new prompt, which goes in as ids with the new tokens and their DeepStack
        features as `mm_encoder_outputs`."""
        spliced = super().spliced_inputs(original, spliced, source, position)
        tokens = self.spliced_image_tokens(spliced)
        deepstack = [[features[:, layer] for features in side] for layer in range(side[0].shape[1])]
        image = BaseModelOutputWithDeepstackFeatures(pooler_output=tokens, deepstack_features=deepstack)
        spliced["mm_encoder_outputs"] = {"image": image}
        return spliced

    def pruning_hooks(self, hooks: ILPHooks) -> list[RemovableHandle]:
        """A pre-hook on the text model that takes DeepStack's inputs during pruned calls, and post-hooks on the
        DeepStack layers that add the features to the visual tokens their outputs hold."""
        text_model = self.model.model.language_model
        taken: dict[str, Any] = {}

        def take(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if hooks.active_call is None:
                return None
            taken["masks"] = kwargs.pop("visual_pos_masks", None)
            taken["embeds"] = kwargs.pop("deepstack_visual_embeds", None)
            return args, kwargs

        def add_after(index: int) -> Callable[..., Any]:
            def add(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
                embeds = taken.get("embeds")
                if hooks.active_call is None or embeds is None or index >= len(embeds):
                    return None
                return _add_deepstack(output, taken["masks"], embeds[index], hooks, index)

            return add

        handles = [text_model.register_forward_pre_hook(take, with_kwargs=True)]
        for index, layer in enumerate(self.decoder_layers()):
            handles.append(layer.register_forward_hook(add_after(index), with_kwargs=True))
        return handles


def _add_deepstack(
    hidden: torch.Tensor, masks: torch.Tensor, embeds: torch.Tensor, hooks: ILPHooks, index: int
) -> torch.Tensor:
    """`hidden` (layer `index`'s output, in the layout that layer saw) plus each visual token's DeepStack feature:
    `embeds` holds one row per True of `masks` `(batch, prompt length)`, in row-major order."""
    masks = masks.to(hidden.device)
    rank = (masks.flatten().long().cumsum(0) - 1).view(masks.shape)
    layout = hooks.layout_after(index)
    if layout is None:
        index_map = torch.arange(masks.shape[1], device=hidden.device).expand(masks.shape[0], -1)
        valid, merges = torch.ones_like(masks), ()
    else:
        index_map, valid, merges = layout.index, layout.valid, layout.merged
    repeat = index_map.shape[0] // masks.shape[0]
    masks, rank = masks.repeat_interleave(repeat, 0), rank.repeat_interleave(repeat, 0)
    visual = masks.gather(1, index_map) & valid
    rows = rank.gather(1, index_map)
    features = embeds.to(hidden.device, hidden.dtype)
    added = torch.zeros_like(hidden)
    added[visual] = features[rows[visual]]
    for row, slot, members in merges:
        members = members[masks[row, members]]
        added[row, slot] = features[rank[row, members]].mean(0) if members.numel() else 0
    return hidden + added


@register_processor
class Qwen3VLImageTextProcessor(Qwen3VLProcessor):
    """`Qwen3VLProcessor` without the video processor slot (which needs torchvision): images and text only."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

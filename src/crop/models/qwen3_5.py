"""Qwen3.5 (`Qwen3_5ForConditionalGeneration`): Qwen2.5-VL's dynamic grids and 3-D M-RoPE with a hybrid LLM.

The token grid, viewports and positions are Qwen2-VL's (`crop.models.qwen2_vl`), and the processor Qwen3-VL's
(`Qwen3VLImageTextProcessor`; no DeepStack here). Most decoder layers are Gated DeltaNet (linear attention: a causal
convolution and a recurrent state, no KV cache), every few layers full attention. Dropping tokens at K shortens the
sequence for both kinds: the linear layers from K on convolve and recur over the kept tokens only (a 2-D padding
mask marks the kept layout's pads), so their state is the one the model would reach on the kept tokens, and the KV
cache shrinks in the full-attention layers. Full attention gates its queries (`q_proj` yields a query and a gate
per head) and rotates a part of each head: the core's attention rows follow that. Methods reading attention or keys
at layer K-1 need it to be a full-attention layer: a linear layer has neither.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.qwen3_5.modeling_qwen3_5 import rotate_half

from crop.adapter import register
from crop.errors import UnsupportedModelError
from crop.models.qwen2_vl import Qwen2VLAdapter
from crop.strategies.ilp import LayerAttention

LINEAR = "linear_attention"


@register("Qwen3_5ForConditionalGeneration")
class Qwen3_5Adapter(Qwen2VLAdapter):
    """Qwen2-VL's grids and positions; the linear-attention layers are recurrent for the in-LLM hooks."""

    family = "qwen3.5"

    @property
    def layer_types(self) -> list[str]:
        return list(self.text_config.layer_types)

    def layer_attention(self) -> list[LayerAttention]:
        return [LayerAttention(recurrent=kind == LINEAR) for kind in self.layer_types]

    def layer_queries(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], count: int) -> torch.Tensor:
        """The gated attention's queries (the first half of each head's `q_proj` output), normed and partly
        rotated as the layer does it."""
        attention = self._attention(layer)
        batch = hidden.shape[0]
        projected = attention.q_proj(layer.input_layernorm(hidden[:, -count:]))
        query, _ = projected.view(batch, count, -1, 2 * attention.head_dim).chunk(2, dim=-1)
        cos, sin = kwargs["position_embeddings"]
        return _partial_rotary(attention.q_norm(query).transpose(1, 2), cos[:, -count:], sin[:, -count:])

    def layer_keys(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        attention = self._attention(layer)
        batch, length, _ = hidden.shape
        key = attention.k_proj(layer.input_layernorm(hidden)).view(batch, length, -1, attention.head_dim)
        cos, sin = kwargs["position_embeddings"]
        return _partial_rotary(attention.k_norm(key).transpose(1, 2), cos, sin)

    def _attention(self, layer: nn.Module) -> nn.Module:
        """The layer's full attention, or a refusal naming the layers that have one."""
        if layer.block_type == LINEAR:
            full = [index for index, kind in enumerate(self.layer_types) if kind != LINEAR]
            raise UnsupportedModelError(
                f"{self.family}: layer {layer.linear_attn.layer_idx} is a Gated DeltaNet (linear attention) layer, "
                "without attention weights or keys to read; methods that read layer K-1 (fastv, pyramiddrop, "
                f"sparsevlm, dart, crop-fused, the attention localizer) need a full-attention layer there: layers "
                f"{full}, so K in {[index + 1 for index in full]}"
            )
        return layer.self_attn


def _partial_rotary(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on the first `cos.shape[-1]` dims of each head (heads in dim 1), the rest passed, as the model does."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotated, passed = states[..., : cos.shape[-1]], states[..., cos.shape[-1] :]
    return torch.cat([rotated * cos + rotate_half(rotated) * sin, passed], dim=-1)

"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): dominant tokens plus merged contextual tokens, before
the LLM.

In the vision layer whose output feeds the projector, the CLS token's attention (summed over heads) picks the
*dominant* patches; the CLS state counts as one of them, as in the authors' code. The remaining patches are
merged into *contextual* tokens: targets evenly spaced among them, every other patch assigned to its most similar
target by the layer's keys (averaged over heads, cosine), each contextual token = target + mean of its assigned
states. Selection and merging act on vision states, which then go through the projector. Token order: CLS,
dominant patches in raster order, contextual tokens; positions are renumbered (`compact`), as the authors do.
"""

from __future__ import annotations

from typing import Any

import torch

from crop.errors import ConfigError
from crop.stats import FINE, POOLED
from crop.strategies.base import Method, Selection, check_budget
from crop.strategies.plc import Compressed

CONTEXTUAL_SHARE = 10 / 64
"""The authors' split: 54 dominant + 10 contextual for 64 tokens (108 + 20 for 128, 162 + 30 for 192)."""


class VisionZip(Method):
    """Keep `budget` tokens: `budget - contextual` dominant (CLS included) and `contextual` merged ones.

    `position="original"` gives each token the position id of its patch (a contextual token: its target's)
    instead of renumbering them.
    """

    name = "visionzip"
    position = "compact"

    def __init__(self, budget: int, contextual: int | None = None, position: str = "compact") -> None:
        if position not in ("compact", "original"):
            raise ConfigError(f"VisionZip position must be 'compact' (the authors') or 'original', got {position!r}")
        self.position = position
        self.budget = budget
        self.contextual = round(budget * CONTEXTUAL_SHARE) if contextual is None else contextual
        if not 0 <= self.contextual < budget:
            raise ConfigError(f"VisionZip contextual tokens must be in 0..{budget - 1}, got {self.contextual}")

    @property
    def acts_before_llm(self) -> bool:
        return True

    def validate(self, num_layers: int, grid_tokens: int | None) -> None:
        check_budget(self.name, self.budget, grid_tokens)

    def encode(self, adapter: Any, inputs: dict[str, Any], leading: int) -> tuple[torch.Tensor, list[Any]]:
        if leading:
            raise ConfigError("VisionZip adds the CLS token itself: use the 'default' feature strategy")
        pixel_values = inputs["pixel_values"]
        internals = adapter.vision_internals(pixel_values)
        rows = [
            (internals.hidden[b], internals.cls_attention[b], internals.keys[b], adapter.project)
            for b in range(pixel_values.shape[0])
        ]
        empty = internals.hidden.new_zeros(pixel_values.shape[0], 0, adapter.model.config.text_config.hidden_size)
        return empty, rows

    def select(self, encoded: Any, shape: tuple[int, int], inside: torch.Tensor | None, row: int) -> Selection:
        hidden, cls_attention, keys, project = encoded
        dominant = cls_attention.topk(self.budget - 1 - self.contextual).indices.sort().values + 1  # skip CLS
        rest = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        rest[0] = False
        rest[dominant] = False
        rest_index = rest.nonzero().squeeze(1)
        tokens = [hidden[:1], hidden[dominant]]
        first = [torch.zeros(1, dtype=torch.long), (dominant - 1).cpu()]
        cells = torch.full((shape[0] * shape[1],), POOLED, dtype=torch.long)
        cells[(dominant - 1).cpu()] = FINE
        if self.contextual:
            metric = keys[rest_index]
            metric = metric / metric.norm(dim=-1, keepdim=True)
            step = max(1, rest_index.numel() // self.contextual)
            targets = torch.arange(0, rest_index.numel(), step, device=hidden.device)[: self.contextual]
            others = torch.ones(rest_index.numel(), dtype=torch.bool, device=hidden.device)
            others[targets] = False
            assign = (metric[others] @ metric[targets].T).argmax(-1)
            states = hidden[rest_index]
            sums = torch.zeros(targets.numel(), hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
            sums.index_add_(0, assign, states[others])
            counts = torch.bincount(assign, minlength=targets.numel()).clamp(min=1).to(hidden.dtype)
            tokens.append(states[targets] + sums / counts[:, None])
            first.append((rest_index[targets] - 1).cpu())
        features = project(torch.cat(tokens))
        compressed = Compressed(features, torch.ones(features.shape[0], dtype=torch.bool), torch.cat(first))
        return Selection(compressed, torch.ones(features.shape[0], dtype=torch.bool), cells.view(shape))

    def describe(self) -> str:
        return f"VisionZip({self.budget - self.contextual} dominant + {self.contextual} contextual)"

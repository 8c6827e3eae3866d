"""DART (Wen et al., EMNLP 2025, arXiv 2502.11494): keep the visual tokens that duplicate a few pivot tokens least,
at layer K, without attention weights.

As the authors' code selects (`get_retained_image_token` and its call in `LlamaModel.forward`,
`llava/model/language_model/modeling_llama_self.py`; the same function for Qwen2.5-VL in
`Qwen2_5-VL/Qwen2_5VL_DART/modeling_qwen2_5_vl_self.py`; read from xqy1111111/DART, a fork of ZichenWen1/DART,
which could not be fetched here):
- before layer K, from layer K-1: its keys (rotary applied) and its output through the model's final norm;
- pivots: the 4 visual tokens and the 4 text tokens after the image with the largest L1 norm of their keys (the
  norm over all heads);
- for each pivot in turn, in the order Python iterates the set of their prompt positions (the authors' loop), the
  visual tokens not yet taken whose normed states are least cosine-similar to the pivot's join the kept set;
- kept: the visual pivots and every token a pivot took; from layer K on only they stay, at their original
  positions (the authors pass `keep_indexs` as position ids), in the hidden states and the KV cache.

Counts: the authors take `budget // 8` tokens per pivot (`max_num_trunction`, e.g. 128 -> 16), so the LLM keeps
the budget plus the 4 visual pivots (132 for "128"). crop's default (`counts="budget"`) keeps exactly the budget: the
`budget - 4` tokens the pivots take are split evenly, the first pivots in loop order taking one more;
`counts="authors"` is the released count. Key norms are taken over the KV heads: the authors' LLaVA code repeats the
keys over each group of query heads first (LLaVA-1.5 has none; Qwen's code does not), a constant factor that
leaves the ranking unchanged up to float rounding.
"""

from __future__ import annotations

import torch

from crop.errors import ConfigError
from crop.strategies.base import Decision, InLLMMethod
from crop.strategies.context import StageRow

IMAGE_PIVOTS = 4
TEXT_PIVOTS = 4


class DART(InLLMMethod):
    """Keep `budget` visual tokens from layer K (default 2) on: the pivots and the tokens least like them."""

    name = "dart"

    def __init__(
        self,
        budget: int,
        layer: int = 2,
        counts: str = "budget",
        image_pivots: int = IMAGE_PIVOTS,
        text_pivots: int = TEXT_PIVOTS,
    ) -> None:
        if counts not in ("budget", "authors"):
            raise ConfigError(f"DART counts must be 'budget' (exactly the budget) or 'authors', got {counts!r}")
        if image_pivots < 0 or text_pivots < 0 or image_pivots + text_pivots == 0:
            raise ConfigError("DART needs at least one pivot (image_pivots + text_pivots >= 1)")
        self.budget = budget
        self.layer = layer
        self.counts = counts
        self.image_pivots = image_pivots
        self.text_pivots = text_pivots

    @property
    def stage_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def validate(self, num_layers: int, grid_tokens: int | None) -> None:
        self.check_layer(self.layer, num_layers)
        kept = self.kept()
        if self.budget < self.image_pivots:
            raise ConfigError(f"DART keeps its {self.image_pivots} image pivots: the budget must be at least that")
        if grid_tokens is not None and kept > grid_tokens:
            raise ConfigError(
                f"DART would keep {kept} visual tokens ({self.counts} counts), more than the image's {grid_tokens}"
            )

    def kept(self) -> int:
        """Visual tokens kept after the stage."""
        if self.counts == "budget":
            return self.budget
        return self.image_pivots + (self.image_pivots + self.text_pivots) * (self.budget // self._pivots)

    @property
    def _pivots(self) -> int:
        return self.image_pivots + self.text_pivots

    def _takes(self) -> list[int]:
        """Tokens each pivot takes, in loop order."""
        if self.counts == "authors":
            return [self.budget // self._pivots] * self._pivots
        share, extra = divmod(self.budget - self.image_pivots, self._pivots)
        return [share + (i < extra) for i in range(self._pivots)]

    def decide(self, stage: StageRow) -> Decision:
        visual = stage.positions
        text = stage.text_after_image()
        if text.numel() < self.text_pivots:
            raise ConfigError(f"DART needs at least {self.text_pivots} prompt tokens after the image")
        keys = stage.keys()
        states = stage.normed_states()
        image_pivots = visual[keys[visual].norm(p=1, dim=-1).topk(self.image_pivots).indices]
        text_pivots = text[keys[text].norm(p=1, dim=-1).topk(self.text_pivots).indices]
        # the authors' loop runs over Python sets of prompt positions: the same ints give the same order
        position_of = dict(zip(stage.prompt_index(visual).tolist(), visual.tolist(), strict=True))
        position_of.update(zip(stage.prompt_index(text).tolist(), text.tolist(), strict=True))
        image_indices = stage.prompt_index(image_pivots).tolist()
        query_indices = stage.prompt_index(text_pivots).tolist()
        chosen = set(image_indices + query_indices)
        valid = set(stage.prompt_index(visual).tolist()) - set(image_indices)
        for take, item in zip(self._takes(), list(chosen), strict=True):
            candidates = list(valid)
            if not candidates or take == 0:
                continue
            vectors = states[[position_of[i] for i in candidates]]
            dissimilar = -torch.nn.functional.cosine_similarity(states[position_of[item]], vectors, dim=-1)
            taken = [candidates[i] for i in dissimilar.topk(min(take, len(candidates))).indices.tolist()]
            chosen.update(taken)
            valid.difference_update(taken)
        chosen.difference_update(query_indices)
        kept = torch.tensor([position_of[i] for i in chosen], dtype=torch.long, device=visual.device)
        return Decision(torch.isin(visual, kept))

    def describe(self) -> str:
        return f"DART(K={self.layer}, keep {self.kept()}{', authors counts' if self.counts == 'authors' else ''})"

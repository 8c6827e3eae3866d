"""ILP, inner-LLM pruning: at decoder layer K, drop the visual tokens outside the region for good.

Layers `0..K-1` see the whole prompt. Forward pre-hooks on layers `>= K` shorten the hidden states (at K),
gather the rotary position embeddings and position ids of the kept tokens and replace the attention mask with
one over the kept tokens, so those layers' KV caches hold only kept tokens. Rows of a batch that keep different
numbers of tokens are re-padded on the left and the pads masked. Decoding continues at the original positions
because the rotary embeddings are computed by the model for the full sequence and only gathered here.
No attention weights are needed, so SDPA works unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from crop.errors import ConfigError


@dataclass(frozen=True)
class ILP:
    """Inner-LLM pruning settings: `layer` is K, the first decoder layer that sees only the kept tokens.

    K = 0 drops the tokens from the input embeddings before the LLM (positions stay the original ones).
    """

    layer: int = 2

    def validate(self, num_layers: int) -> None:
        if not isinstance(self.layer, int) or not 0 <= self.layer < num_layers:
            raise ConfigError(
                f"ILP layer K={self.layer!r} is out of range: this model has {num_layers} decoder layers, "
                f"so K must be an integer in 0..{num_layers - 1}"
            )


@dataclass
class KeepPlan:
    """Which prompt positions each row keeps from layer K on, laid out left-padded.

    `gather_index[b, j]` is the prompt position of row b's j-th kept token (0 for pads), `valid[b, j]` is False
    for pads. `full_length` is the prompt length the first layers see.
    """

    gather_index: torch.Tensor
    valid: torch.Tensor
    full_length: int
    _masks: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_keep(cls, keep: torch.Tensor) -> KeepPlan:
        """From a boolean `(batch, length)` tensor marking the prompt positions each row keeps."""
        counts = keep.sum(dim=1)
        width = int(counts.max())
        batch, length = keep.shape
        gather_index = torch.zeros(batch, width, dtype=torch.long, device=keep.device)
        valid = torch.zeros(batch, width, dtype=torch.bool, device=keep.device)
        for row in range(batch):
            kept = keep[row].nonzero().squeeze(1)
            gather_index[row, width - kept.numel() :] = kept
            valid[row, width - kept.numel() :] = True
        return cls(gather_index, valid, length)

    @property
    def has_pads(self) -> bool:
        return not bool(self.valid.all())

    def expand(self, batch: int) -> KeepPlan:
        """The plan for a batch whose rows were repeated (beam search, several samples per prompt)."""
        rows = self.gather_index.shape[0]
        if batch == rows:
            return self
        if batch % rows:
            raise ConfigError(f"batch of {batch} rows does not match a pruning plan made for {rows} rows")
        repeat = batch // rows
        return KeepPlan(
            self.gather_index.repeat_interleave(repeat, 0),
            self.valid.repeat_interleave(repeat, 0),
            self.full_length,
        )

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Take the kept positions of a `(batch or 1, full_length, ...)` tensor along dim 1."""
        batch = self.gather_index.shape[0]
        tensor = tensor.expand(batch, *tensor.shape[1:])
        index = self.gather_index.view(batch, -1, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:])
        return tensor.gather(1, index)

    def prefill_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive `(batch, 1, kept, kept)` causal mask over the kept tokens; pad rows attend to themselves."""
        key = ("prefill", dtype)
        if key not in self._masks:
            width = self.valid.shape[1]
            causal = torch.ones(width, width, dtype=torch.bool, device=self.valid.device).tril()
            allowed = causal[None] & self.valid[:, None, :]
            allowed |= torch.eye(width, dtype=torch.bool, device=self.valid.device)[None]
            self._masks[key] = _additive(allowed[:, None], dtype)
        return self._masks[key]

    def decode_mask(self, past_length: int, query_length: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive `(batch, 1, query, past + query)` mask for a decode step on a pruned layer's cache."""
        key = ("decode", past_length, query_length, dtype)
        if key not in self._masks:
            batch, width = self.valid.shape
            appended = past_length - width
            if appended < 0:
                raise RuntimeError(f"pruned cache holds {past_length} tokens, fewer than the {width} kept")
            device = self.valid.device
            new = torch.ones(batch, appended + query_length, dtype=torch.bool, device=device)
            columns = torch.cat([self.valid, new], dim=1)
            total = past_length + query_length
            causal = torch.arange(total, device=device)[None, :] <= (
                torch.arange(query_length, device=device)[:, None] + past_length
            )
            allowed = columns[:, None, :] & causal[None]
            self._masks[key] = _additive(allowed[:, None], dtype)
        return self._masks[key]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


PlanBuilder = Callable[[torch.Tensor, dict[str, Any]], KeepPlan]
"""Builds the plan during prefill from the input `(hidden_states, kwargs)` of the observed layer (K-1)."""


class ILPHooks:
    """Forward pre-hooks on decoder layers `K..L-1` of one model instance; `remove()` takes them off.

    The hooks act only while a plan is active (`with hooks.active(plan): ...`); otherwise the model runs as
    if they were not there. The plan is fixed before the call, or built during prefill by a `PlanBuilder` from
    the inputs of layer `observe` (methods that rank tokens by attention, like FastV, observe layer K-1).
    """

    def __init__(self, layers: Sequence[nn.Module], first_pruned: int, observe: int | None = None) -> None:
        self.first_pruned = first_pruned
        self.plan: KeepPlan | None = None
        self._active = False
        self._builder: PlanBuilder | None = None
        self._observed: tuple[torch.Tensor, dict[str, Any]] | None = None
        self._handles = [
            layer.register_forward_pre_hook(self._make_hook(index), with_kwargs=True)
            for index, layer in enumerate(layers)
            if index >= first_pruned
        ]
        if observe is not None:
            self._observe_index = observe
            self._handles.append(layers[observe].register_forward_pre_hook(self._observe, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def active(self, plan: KeepPlan | PlanBuilder) -> Iterator[ILPHooks]:
        """Prune during the block with a fixed plan or one built at prefill; the hooks are inert after it."""
        if self._active:
            raise RuntimeError("a pruned call is already running on this model (calls are not re-entrant)")
        self._active = True
        self.plan, self._builder = (plan, None) if isinstance(plan, KeepPlan) else (None, plan)
        try:
            yield self
        finally:
            self._active, self._builder, self._observed = False, None, None

    def _observe(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._active and self._builder is not None and _past_length(kwargs, self._observe_index) == 0:
            self._observed = (args[0] if args else kwargs["hidden_states"], dict(kwargs))

    def _make_hook(self, index: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not self._active:
                return None
            return self._prune_call(index, args, kwargs)

        return hook

    def _prune_call(self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        past = _past_length(kwargs, index)
        if past == 0 and index == self.first_pruned and self._builder is not None:
            if self._observed is None:
                raise RuntimeError("the plan builder's observed layer did not run before the pruned layer")
            self.plan = self._builder(*self._observed)
        plan = self.plan.expand(hidden.shape[0])
        incoming_mask = kwargs.get("attention_mask")
        if past == 0:
            if index == self.first_pruned:
                if hidden.shape[1] != plan.full_length:
                    raise RuntimeError(
                        f"ILP plan made for a {plan.full_length}-token prompt, layer {index} got {hidden.shape[1]}"
                    )
                hidden = plan.gather(hidden)
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (plan.gather(cos), plan.gather(sin))
            if isinstance(kwargs.get("position_ids"), torch.Tensor):
                kwargs["position_ids"] = plan.gather(kwargs["position_ids"])
            if incoming_mask is not None or plan.has_pads:
                kwargs["attention_mask"] = plan.prefill_mask(hidden.dtype)
        elif incoming_mask is not None or plan.has_pads or hidden.shape[1] > 1:
            kwargs["attention_mask"] = plan.decode_mask(past, hidden.shape[1], hidden.dtype)
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs


def _past_length(kwargs: dict[str, Any], index: int) -> int:
    """Tokens already in the cache of layer `index` (0 at prefill)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return 0 if cache is None else cache.get_seq_length(index)

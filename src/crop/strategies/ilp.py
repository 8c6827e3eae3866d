"""ILP, inner-LLM pruning: at decoder layer K, drop the visual tokens outside the region for good.

Layers `0..K-1` see the whole prompt. Forward pre-hooks on layers `>= K` shorten the hidden states (at K),
gather the rotary position embeddings and position ids of the kept tokens and replace the attention mask with
one over the kept tokens, so those layers' KV caches hold only kept tokens. Rows of a batch that keep different
numbers of tokens are re-padded on the left and the pads masked. Decoding continues at the original positions
because the rotary embeddings are computed by the model for the full sequence and only gathered here (or, for
methods that renumber the kept tokens, computed here for their new positions and each stage's decode steps).
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


@dataclass(frozen=True)
class LayerAttention:
    """How one decoder layer's tokens see each other, which the hooks' masks over the kept tokens follow.

    `recurrent`: the token mixer is recurrent (linear attention: a convolution and a state, no KV cache, as
    Qwen3.5's Gated DeltaNet): a 2-D padding mask at prefill, no positions. `window`: a sliding window, counted in
    the tokens the layer sees (the kept ones: what the model would do on a prompt of only them), with a cache of
    the last `window - 1` tokens. `blocks`: tokens of one block (an image, by `ILPHooks.active`'s `blocks`) also
    see each other's later tokens, within the window (Gemma 4's sliding layers).
    """

    recurrent: bool = False
    window: int | None = None
    blocks: bool = False


CAUSAL = LayerAttention()


@dataclass
class KeepPlan:
    """Which prompt positions each row keeps from layer K on, laid out left-padded.

    `gather_index[b, j]` is the prompt position of row b's j-th kept token (0 for pads), `valid[b, j]` is False
    for pads. `full_length` is the prompt length the first layers see. `merges` holds `(row, position, members)`:
    the kept token at `position` carries the mean hidden state of the `members` positions (methods that recycle
    dropped tokens into merged ones; the merged token keeps `position`'s rotary position).
    """

    gather_index: torch.Tensor
    valid: torch.Tensor
    full_length: int
    merges: tuple[tuple[int, int, torch.Tensor], ...] = ()
    _masks: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_keep(
        cls,
        keep: torch.Tensor,
        merges: Sequence[tuple[int, int, torch.Tensor]] = (),
        order: Sequence[torch.Tensor] | None = None,
    ) -> KeepPlan:
        """From a boolean `(batch, length)` tensor marking the prompt positions each row keeps (and `merges`,
        whose positions must be kept), in prompt order or, with `order`, in each row's given order of them."""
        for row, position, _ in merges:
            if not keep[row, position]:
                raise ValueError(f"merged token at position {position} of row {row} is not kept")
        rows = [keep[row].nonzero().squeeze(1) for row in range(keep.shape[0])]
        if order is not None:
            for row, (kept, ordered) in enumerate(zip(rows, order, strict=True)):
                if not torch.equal(kept, ordered.to(kept.device).sort().values):
                    raise ValueError(f"row {row}: the given order is not an order of the kept positions")
            rows = [ordered.to(keep.device) for ordered in order]
        width = max(kept.numel() for kept in rows)
        batch, length = keep.shape
        gather_index = torch.zeros(batch, width, dtype=torch.long, device=keep.device)
        valid = torch.zeros(batch, width, dtype=torch.bool, device=keep.device)
        for row, kept in enumerate(rows):
            gather_index[row, width - kept.numel() :] = kept
            valid[row, width - kept.numel() :] = True
        return cls(gather_index, valid, length, tuple(merges))

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
        merges = tuple((row * repeat + r, p, m) for row, p, m in self.merges for r in range(repeat))
        return KeepPlan(
            self.gather_index.repeat_interleave(repeat, 0),
            self.valid.repeat_interleave(repeat, 0),
            self.full_length,
            merges,
        )

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Take the kept positions of a `(batch or 1, full_length, ...)` tensor along dim 1."""
        return _take(tensor, self.gather_index)

    def reduce(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states of the kept tokens, merged tokens replaced by the mean of their members."""
        reduced = self.gather(hidden)
        for row, position, members in self.merges:
            slot = int((self.gather_index[row] == position).nonzero()[-1])
            reduced[row, slot] = hidden[row, members.to(hidden.device)].mean(0)
        return reduced

    def prefill_mask(
        self, dtype: torch.dtype, attention: LayerAttention = CAUSAL, blocks: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Additive `(batch, 1, kept, kept)` mask over the kept tokens: causal (and, per `attention`, tokens of one
        of `blocks` `(batch, kept)` (-1: none) seeing each other, within a sliding window); pad rows attend to
        themselves."""
        key = ("prefill", dtype, attention)
        if key not in self._masks:
            width = self.valid.shape[1]
            device = self.valid.device
            query, column = torch.arange(width, device=device)[:, None], torch.arange(width, device=device)[None, :]
            allowed = (column <= query)[None].expand(self.valid.shape[0], -1, -1)
            if attention.blocks and blocks is not None:
                allowed = allowed | ((blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0))
            if attention.window is not None:
                allowed = allowed & (query - column < attention.window)[None]
            allowed = allowed & self.valid[:, None, :]
            allowed = allowed | torch.eye(width, dtype=torch.bool, device=device)[None]
            self._masks[key] = _additive(allowed[:, None], dtype)
        return self._masks[key]

    def decode_mask(
        self, past_length: int, query_length: int, dtype: torch.dtype, attention: LayerAttention = CAUSAL
    ) -> torch.Tensor:
        """Additive `(batch, 1, query, keys)` mask for a decode step on a pruned layer's cache: `keys` is past +
        query, or with a sliding window the last `window - 1` cached tokens plus the query."""
        key = ("decode", past_length, query_length, dtype, attention)
        if key not in self._masks:
            batch, width = self.valid.shape
            appended = past_length - width
            if appended < 0:
                raise RuntimeError(f"pruned cache holds {past_length} tokens, fewer than the {width} kept")
            device = self.valid.device
            new = torch.ones(batch, appended + query_length, dtype=torch.bool, device=device)
            columns = torch.cat([self.valid, new], dim=1)
            total = past_length + query_length
            query = torch.arange(query_length, device=device)[:, None] + past_length
            column = torch.arange(total, device=device)[None, :]
            allowed = columns[:, None, :] & (column <= query)[None]
            if attention.window is not None:
                cached = min(past_length, attention.window - 1) + query_length  # the sliding cache's last tokens
                allowed = (allowed & (query - column < attention.window)[None])[:, :, -cached:]
            self._masks[key] = _additive(allowed[:, None], dtype)
        return self._masks[key]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


@dataclass
class Layout:
    """A stage's token layout: `index[b, j]` is the prompt position of row b's j-th token, `valid` marks non-pads.

    With renumbered positions, `positions[b, j]` is the position id the token gets and `shift[b]` how far the
    row's decode positions move back (the tokens dropped so far); both None when tokens keep their positions.
    """

    index: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    merged: tuple[tuple[int, int, torch.Tensor], ...] = ()
    """`(row, slot, prompt positions)` of each merged token the layout holds: the tokens it stands for."""

    @classmethod
    def full(cls, batch: int, length: int, device: torch.device) -> Layout:
        index = torch.arange(length, device=device).expand(batch, length)
        return cls(index, torch.ones(batch, length, dtype=torch.bool, device=device))

    def then(self, plan: KeepPlan) -> Layout:
        """The layout after keeping `plan`'s positions (given relative to this layout)."""
        members = {(row, slot): positions for row, slot, positions in self.merged}
        merged = []
        for row, position, slots in plan.merges:
            prompt = [members.get((row, int(slot)), self.index[row, slot].view(1)) for slot in slots.tolist()]
            members[(row, position)] = torch.cat(prompt)
        for (row, slot), positions in members.items():
            new_slot = (plan.gather_index[row] == slot).nonzero()
            if new_slot.numel():
                merged.append((row, int(new_slot[-1]), positions))
        return Layout(self.index.gather(1, plan.gather_index), plan.valid, merged=tuple(merged))

    def renumbered(self, position_ids: torch.Tensor) -> Layout:
        """This layout with its tokens numbered consecutively from each row's first token, given the full prompt's
        `position_ids` `(batch or 1, length)`: what the model would number a prompt of only these tokens."""
        original = _take(position_ids, self.index)
        first = self.valid.long().argmax(1)
        start = original.gather(1, first[:, None])
        rank = (self.valid.long().cumsum(1) - 1).clamp(min=0)
        positions = start + rank
        return Layout(self.index, self.valid, positions, original[:, -1] - positions[:, -1], self.merged)


RotaryEmbedding = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""`(hidden states, position ids) -> (cos, sin)`: a model's rotary embedding at given positions."""

PlanBuilder = Callable[[torch.Tensor, dict[str, Any], Layout, torch.Tensor, torch.Tensor | None], KeepPlan]
"""Builds a stage's plan at prefill from the observed layer's input `(hidden_states, kwargs)` (the layer just
before the stage), the stage's layout, the hidden states entering the stage and the prompt embeddings; the plan
indexes that layout."""


@dataclass
class PrunedCall:
    """The state of one pruned call, alive only inside `ILPHooks.active`: each stage's plan (or builder), the
    plans and layouts resolved so far, the observed layers' inputs, and the prompt embeddings."""

    plans: list[KeepPlan | PlanBuilder]
    resolved: list[KeepPlan] = field(default_factory=list)
    layouts: list[Layout] = field(default_factory=list)
    observed: dict[int, tuple[torch.Tensor, dict[str, Any]]] = field(default_factory=dict)
    embeddings: torch.Tensor | None = None
    """The first decoder layer's input at prefill (the prompt embeddings)."""
    rotary: dict[int, tuple[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    """With renumbered positions: per stage, the cache length of the current step and its rotary embeddings."""
    prefill: bool = True
    """Whether the model's current forward is the prefill (set by the first decoder layer's hook)."""
    blocks: torch.Tensor | None = None
    """Each prompt token's block (-1: none), for layers whose tokens of one block see each other."""
    stage_blocks: dict[int, torch.Tensor] = field(default_factory=dict)
    """`blocks` in each stage's layout."""


class ILPHooks:
    """Forward pre-hooks on the decoder layers of one model instance that drop tokens in stages; `remove()`
    takes them off.

    Stage s starts at layer `stage_layers[s]`: there the hidden states are gathered to the stage's kept tokens;
    every later layer gets the rotary embeddings and position ids of its stage's tokens (gathered from the
    full-length ones the model computes) and the stage's attention mask. The hooks act only while a call is
    active (`with hooks.active(plans) as call: ...`); each plan is fixed before the call or built during prefill
    by a `PlanBuilder` from the input of the layer just before its stage.

    With `rotary` (`(hidden, position_ids) -> (cos, sin)`, the model's rotary embedding), each stage's tokens are
    renumbered consecutively instead (as PyramidDrop's and SparseVLM's authors do) and decoding continues each
    stage's numbering: a stage's layers see position ids as if the prompt had held only its tokens.

    `attention` says per layer how its tokens see each other (`LayerAttention`; plain causal by default): the
    masks over the kept tokens follow it, a recurrent layer gets a 2-D padding mask of the kept tokens (its state
    then holds only them).
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        stage_layers: Sequence[int],
        rotary: RotaryEmbedding | None = None,
        attention: Sequence[LayerAttention] | None = None,
    ) -> None:
        self.stage_layers = list(stage_layers)
        self.rotary = rotary
        self.attention = list(attention) if attention is not None else [CAUSAL] * len(layers)
        if len(self.attention) != len(layers):
            raise ConfigError(f"{len(self.attention)} layer attention kinds for {len(layers)} decoder layers")
        if self.stage_layers != sorted(set(self.stage_layers)) or self.stage_layers[0] < 1:
            raise ConfigError(f"pruning stages must start at increasing layers >= 1, got {self.stage_layers}")
        self._call: PrunedCall | None = None
        first = self.stage_layers[0]
        self._handles = [
            layer.register_forward_pre_hook(self._make_hook(index), with_kwargs=True)
            for index, layer in enumerate(layers)
            if index >= first
        ]
        self._handles.append(layers[0].register_forward_pre_hook(self._observe_embeddings, with_kwargs=True))
        for stage, start in enumerate(self.stage_layers):
            hook = self._make_observer(stage, start - 1)
            self._handles.append(layers[start - 1].register_forward_pre_hook(hook, with_kwargs=True))

    @property
    def first_pruned(self) -> int:
        return self.stage_layers[0]

    @property
    def active_call(self) -> PrunedCall | None:
        """The pruned call now running on the model, if any (families that add their own hooks check it)."""
        return self._call

    def layout_after(self, index: int) -> Layout | None:
        """During a pruned prefill, the token layout of decoder layer `index`'s output (None: every prompt token,
        unpruned)."""
        if self._call is None or index < self.stage_layers[0]:
            return None
        return self._call.layouts[self._stage_of(index) + 1]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def active(
        self, plans: KeepPlan | PlanBuilder | Sequence[KeepPlan | PlanBuilder], blocks: torch.Tensor | None = None
    ) -> Iterator[PrunedCall]:
        """Prune during the block, one plan (or builder) per stage; yields the call's state; the hooks are inert
        after it. `blocks` `(batch, prompt length)`: each prompt token's block (-1: none) for the layers whose
        `LayerAttention.blocks` is set."""
        if self._call is not None:
            raise RuntimeError("a pruned call is already running on this model (calls are not re-entrant)")
        plans = [plans] if isinstance(plans, KeepPlan) or callable(plans) else list(plans)
        if len(plans) != len(self.stage_layers):
            raise ConfigError(f"{len(plans)} plans for {len(self.stage_layers)} pruning stages")
        self._call = PrunedCall(plans, blocks=blocks)
        try:
            yield self._call
        finally:
            self._call = None

    def _observe_embeddings(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._call is None:
            return
        self._call.prefill = _past_length(kwargs, 0) == 0
        if self._call.prefill:
            self._call.embeddings = args[0] if args else kwargs["hidden_states"]

    def _make_observer(self, stage: int, index: int) -> Callable[..., None]:
        def observe(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            call = self._call
            if call is not None and call.prefill and not isinstance(call.plans[stage], KeepPlan):
                call.observed[stage] = (args[0] if args else kwargs["hidden_states"], dict(kwargs))

        return observe

    def _make_hook(self, index: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if self._call is None:
                return None
            return self._prune_call(self._call, index, args, kwargs)

        return hook

    def _stage_of(self, index: int) -> int:
        return max(s for s, start in enumerate(self.stage_layers) if start <= index)

    def _resolve(self, call: PrunedCall, stage: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        """At prefill, fix stage `stage`'s plan (building it if needed) and the layout it leads to."""
        if stage == 0:
            call.layouts = [Layout.full(hidden.shape[0], hidden.shape[1], hidden.device)]
        previous = call.layouts[stage]
        plan = call.plans[stage]
        if not isinstance(plan, KeepPlan):
            if stage not in call.observed:
                raise RuntimeError(f"pruning stage {stage}: its observed layer did not run before it")
            observed_hidden, observed_kwargs = call.observed.pop(stage)
            plan = plan(observed_hidden, observed_kwargs, previous, hidden, call.embeddings)
        plan = plan.expand(hidden.shape[0])
        if hidden.shape[1] != plan.full_length:
            raise RuntimeError(f"pruning plan made for {plan.full_length} tokens, stage {stage} got {hidden.shape[1]}")
        call.resolved.append(plan)
        layout = previous.then(plan)
        call.layouts.append(layout if self.rotary is None else layout.renumbered(_position_ids(kwargs)))

    def _prune_call(self, call: PrunedCall, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        stage = self._stage_of(index)
        incoming_mask = kwargs.get("attention_mask")
        attention = self.attention[index]
        recurrent = attention.recurrent
        if call.prefill:
            if index == self.stage_layers[stage]:
                self._resolve(call, stage, hidden, kwargs)
                hidden = call.resolved[stage].reduce(hidden)
            plan, layout = call.resolved[stage], call.layouts[stage + 1]
            if recurrent:
                if incoming_mask is not None or plan.has_pads:
                    kwargs["attention_mask"] = plan.valid
            elif layout.positions is not None:
                kwargs["position_ids"] = layout.positions
                kwargs["position_embeddings"] = self._renumbered_rotary(call, stage, 0, hidden, layout.positions)
            else:
                cos, sin = kwargs["position_embeddings"]
                kwargs["position_embeddings"] = (_take(cos, layout.index), _take(sin, layout.index))
                if isinstance(kwargs.get("position_ids"), torch.Tensor):
                    kwargs["position_ids"] = _take(kwargs["position_ids"], layout.index)
            if not recurrent and (incoming_mask is not None or plan.has_pads or attention != CAUSAL):
                kwargs["attention_mask"] = plan.prefill_mask(hidden.dtype, attention, self._blocks(call, stage, hidden))
        elif not recurrent:  # a recurrent layer's decode step needs nothing: its new tokens are never pads
            past = _past_length(kwargs, index)
            plan, layout = call.resolved[stage], call.layouts[stage + 1]
            if layout.shift is not None:
                shift = layout.shift.repeat_interleave(hidden.shape[0] // layout.shift.shape[0], 0)
                positions = _position_ids(kwargs).expand(hidden.shape[0], -1) - shift[:, None]
                kwargs["position_ids"] = positions
                kwargs["position_embeddings"] = self._renumbered_rotary(call, stage, past, hidden, positions)
            if incoming_mask is not None or plan.has_pads or hidden.shape[1] > 1 or attention.window is not None:
                kwargs["attention_mask"] = plan.decode_mask(past, hidden.shape[1], hidden.dtype, attention)
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs


    def _blocks(self, call: PrunedCall, stage: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """The call's blocks in stage `stage`'s layout (rows repeated as the batch is), computed once."""
        if call.blocks is None:
            return None
        if stage not in call.stage_blocks:
            blocks = call.blocks.to(hidden.device)
            index = call.layouts[stage + 1].index
            blocks = blocks.repeat_interleave(index.shape[0] // blocks.shape[0], 0)
            call.stage_blocks[stage] = blocks.gather(1, index)
        return call.stage_blocks[stage]

    def _renumbered_rotary(
        self, call: PrunedCall, stage: int, past: int, hidden: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary embeddings of a stage's renumbered `positions`, computed once per stage and step."""
        cached = call.rotary.get(stage)
        if cached is None or cached[0] != past:
            cached = call.rotary[stage] = (past, self.rotary(hidden, positions))
        return cached[1]


def _position_ids(kwargs: dict[str, Any]) -> torch.Tensor:
    """The 1-D position ids the model passed to a decoder layer (renumbering needs them)."""
    position_ids = kwargs.get("position_ids")
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2:
        raise ConfigError(
            "renumbered positions need the 1-D position ids `(batch, length)` the model passes to its decoder "
            f"layers; this model passed {type(position_ids).__name__}: use positions='original'"
        )
    return position_ids


def _take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`tensor[b, index[b, j], ...]` for a `(batch or 1, length, ...)` tensor."""
    tensor = tensor.expand(index.shape[0], *tensor.shape[1:])
    gather = index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:])
    return tensor.gather(1, gather)


def _past_length(kwargs: dict[str, Any], index: int) -> int:
    """Tokens already in the cache of layer `index` (0 at prefill)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return 0 if cache is None else cache.get_seq_length(index)

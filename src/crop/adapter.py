"""What the core needs to know about a VLM family, and nothing more: the adapter protocol, the token layout of
an image, the family registry, and the attention primitives that read a decoder layer's queries and keys.

Each family lives in one file under `crop/models/`, which subclasses `ModelAdapter` and registers it with
`@register("SomeForConditionalGeneration")`; `adapter_for(model)` walks the model class's MRO, so a subclass of a
supported class is supported too. The core imports no family: the families are found through the `crop.families`
entry points (crop's own point at `crop.models`, which imports every family file once; another package can add
its own), loaded on the first lookup.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from crop.errors import LocalizerError, UnsupportedModelError
from crop.region import Viewport

if TYPE_CHECKING:
    from crop.strategies.ilp import LayerAttention

SUPPORTED_ATTENTION = ("sdpa", "eager")

SEPARATOR = -1
"""Grid id of a separator token in `VisualLayout.cells` (it ends a row of the last grid)."""


@dataclass(frozen=True, eq=False)
class VisualLayout:
    """How one image's visual tokens sit in the prompt: `leading` non-grid tokens, then a raster grid.

    Families whose image tokens form several grids (LLaVA-NeXT: a base grid, then a high-resolution grid with a
    separator after each row) set `cells`: `(tokens, 3)` rows `(grid, row, col)` per placeholder, in order, with
    grid -1 for a separator that ends row `row` of the last grid; `grids` and `grid_viewports` give each grid's
    shape and where the image lands on it. Methods then see the placeholders as one `1 x tokens` row.
    """

    rows: int
    cols: int
    leading: int = 0
    cells: torch.Tensor | None = None
    grids: tuple[tuple[int, int], ...] = ()
    grid_viewports: tuple[Viewport, ...] = ()

    @property
    def num_tokens(self) -> int:
        return self.leading + self.rows * self.cols

    @property
    def is_multi_grid(self) -> bool:
        return self.cells is not None

    def region_mask(self, region: Any, viewport: Viewport | None) -> torch.Tensor:
        """`(rows, cols)` mask of the grid tokens whose cell centre lies in `region` (see `Region.token_mask`);
        with several grids, each is mapped through its own viewport and a separator follows its row."""
        if self.cells is None:
            return region.token_mask(self.rows, self.cols, viewport)
        grid, row, col = self.cells.unbind(-1)
        keep = torch.zeros(self.cells.shape[0], dtype=torch.bool)
        for index, (shape, grid_viewport) in enumerate(zip(self.grids, self.grid_viewports, strict=True)):
            mask = region.token_mask(*shape, grid_viewport)
            here = grid == index
            keep[here] = mask[row[here], col[here]]
        last = len(self.grids) - 1
        kept_rows = set(row[(grid == last) & keep].tolist())
        separators = (grid == SEPARATOR).nonzero().squeeze(1)
        keep[separators] = torch.tensor([int(row[i]) in kept_rows for i in separators], dtype=torch.bool)
        return keep.view(self.rows, self.cols)

    def drawn_grid(self, states: torch.Tensor, viewport: Viewport) -> tuple[torch.Tensor, Viewport]:
        """Per-token `states` as the 2-D grid to draw over the image, with its viewport: the grid itself, or
        for several grids the last (highest-resolution) one."""
        if self.cells is None:
            return states, viewport
        last = len(self.grids) - 1
        grid, row, col = self.cells.unbind(-1)
        here = grid == last
        drawn = torch.empty(self.grids[last], dtype=states.dtype)
        drawn[row[here], col[here]] = states.reshape(-1)[here]
        return drawn, self.grid_viewports[last]


class ModelAdapter(ABC):
    """One VLM family: where its visual tokens sit, their grid, its decoder layers, how to feed features."""

    family: str = ""
    crop_only_inputs: tuple[str, ...] = ()
    """Processor outputs that crop reads and the model does not take (`generate` would refuse them): left out of
    the model's call."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        attention = self.attention_implementation
        if attention not in SUPPORTED_ATTENTION:
            raise UnsupportedModelError(
                f"attention implementation {attention!r} is not supported yet; load the model with "
                f"attn_implementation in {SUPPORTED_ATTENTION}"
            )

    @property
    def attention_implementation(self) -> str:
        return self.text_config._attn_implementation

    @property
    def text_config(self) -> Any:
        return self.model.config.text_config

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def pad_token_id(self) -> int:
        pad = self.text_config.pad_token_id
        return int(pad if pad is not None else 0)

    def decoder_layers(self) -> Sequence[nn.Module]:
        """The LLM's decoder layers, in order (where transformers 5 puts them for LLaVA and Qwen families)."""
        return self.model.model.language_model.layers

    @abstractmethod
    def visual_layout(self) -> VisualLayout | None:
        """The token layout every image has, or None for families whose grid depends on the image's size."""

    def visual_layouts(self, inputs: dict[str, Any]) -> list[VisualLayout]:
        """The token layout of each row's image, from the processor's output `inputs`."""
        return [self.visual_layout()] * inputs["input_ids"].shape[0]

    @abstractmethod
    def viewport(self, processor: Any, image_size: tuple[int, int]) -> Viewport:
        """Where an image of `(width, height)` lands on the token grid after the processor."""

    def viewport_varies(self, processor: Any) -> bool:
        """Whether where an image lands on the grid depends on its size in a way the processor's outputs do not
        record (a center crop, padding to a square): regions then need viewports from `viewport`."""
        return False

    def image_features(self, inputs: dict[str, Any]) -> list[torch.Tensor]:
        """Each image's projected visual tokens `(tokens, dim)`, as the LLM would receive them, from the
        processor's `inputs` (pre-LLM methods)."""
        raise UnsupportedModelError(f"{self.family}: methods acting before the LLM are not supported yet")

    def encode_images(self, inputs: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Each image's projected visual tokens (as `image_features`) and, for a family that adds per-token inputs
        inside the LLM, each image's `(tokens, k, dim)` side features, which pre-LLM methods compress with the
        tokens (Qwen3-VL: its DeepStack features); None by default."""
        return self.image_features(inputs), None

    def features_from_vision(self, crops: Sequence[VisionCrops]) -> list[torch.Tensor] | None:
        """Each image's projected visual tokens computed from vision internals already at hand (`vision_crops`), so
        that a method reading both runs the tower once; None where the family cannot (the default)."""
        return None

    def embed(self, input_ids: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Input embeddings with `features[b]` written over row b's image placeholders (pre-LLM methods)."""
        embeds = self.model.get_input_embeddings()(input_ids)
        placeholders = (input_ids == self.image_token_id).unsqueeze(-1)
        flat = torch.cat(list(features)).to(embeds.dtype)
        return embeds.masked_scatter(placeholders, flat)

    def spliced_inputs(
        self,
        original: dict[str, Any],
        spliced: dict[str, Any],
        source: torch.Tensor,
        position: str,
        side: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """The model inputs after a pre-LLM method replaced the grid: `spliced` holds the new ids, mask and
        embeddings; `source[b, i]` is the index, in row b's unpadded original prompt, whose position new token i
        takes; `side[b]` the new tokens' side features, compressed as they were (see `encode_images`). With 1-D
        positions, `position="original"` passes those indices as position ids and "compact" lets the model number
        the new prompt consecutively."""
        if position == "original":
            spliced["position_ids"] = source
        return spliced

    def spliced_image_tokens(self, spliced: dict[str, Any]) -> list[torch.Tensor]:
        """Each row's new image tokens taken out of `spliced`'s embeddings, which it drops (for families whose
        spliced prompt goes in as ids with the tokens as `mm_encoder_outputs`: Qwen3-VL, Gemma 4)."""
        ids, embeds = spliced["input_ids"], spliced.pop("inputs_embeds")
        image = (ids == self.image_token_id) & spliced["attention_mask"].bool()
        return [embeds[row][image[row]] for row in range(ids.shape[0])]

    def query_attention(
        self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], count: int = 1
    ) -> torch.Tensor:
        """Attention probabilities `(batch, heads, count, length)` of the last `count` positions' queries in
        decoder `layer`, given the layer's inputs, computed from its queries and keys for those rows only (the
        model keeps its attention backend).

        This default fits Llama-style layers (`input_layernorm`, `self_attn.q_proj/k_proj`, per-head
        `q_norm/k_norm` where the layer has them (Qwen3), rotary `(cos, sin)` of shape `(batch, length,
        head_dim)` in `position_embeddings`), as LLaVA and the Qwen-VL families have."""
        length = hidden.shape[1]
        query = self.layer_queries(layer, hidden, kwargs, count)
        key = self.layer_keys(layer, hidden, kwargs)
        attention = layer.self_attn
        key = key.repeat_interleave(attention.num_key_value_groups, dim=1)
        scores = (query @ key.transpose(-1, -2)).float() * attention.scaling
        mask = kwargs.get("attention_mask")
        if mask is not None:
            rows = mask[:, :, -count:, :length]
            scores = scores + (torch.where(rows, 0.0, float("-inf")) if rows.dtype == torch.bool else rows.float())
        else:
            causal = (
                torch.arange(length, device=hidden.device)[None, :]
                <= torch.arange(length - count, length, device=hidden.device)[:, None]
            )
            scores = scores.masked_fill(~causal, float("-inf"))
        return scores.softmax(-1)

    def layer_queries(
        self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], count: int
    ) -> torch.Tensor:
        """Queries `(batch, heads, count, head_dim)` of the last `count` positions in decoder `layer`, rotary
        applied, as the layer computes them (the default fits the Llama-style layers of `query_attention`)."""
        attention = layer.self_attn
        batch = hidden.shape[0]
        normed = layer.input_layernorm(hidden[:, -count:])
        query = attention.q_proj(normed).view(batch, count, -1, attention.head_dim)
        query = (attention.q_norm(query) if hasattr(attention, "q_norm") else query).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        return _rotate(query, cos[:, -count:], sin[:, -count:])

    def layer_keys(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """Keys `(batch, kv heads, length, head_dim)` of decoder `layer` given its inputs, rotary applied, as the
        layer computes them (the default fits the Llama-style layers of `query_attention`)."""
        attention = layer.self_attn
        batch, length, _ = hidden.shape
        key = attention.k_proj(layer.input_layernorm(hidden)).view(batch, length, -1, attention.head_dim)
        key = attention.k_norm(key) if hasattr(attention, "k_norm") else key
        cos, sin = kwargs["position_embeddings"]
        return _rotate(key.transpose(1, 2), cos, sin)

    def layer_attention(self) -> list[LayerAttention] | None:
        """Per decoder layer, how its tokens see each other (`LayerAttention`: recurrent layers, sliding windows,
        bidirectional blocks), which the in-LLM hooks' masks follow; None: every layer plain causal (the default)."""
        return None

    def attention_blocks(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """`(batch, prompt length)`: each prompt token's block (-1: none) for layers whose tokens of one block see
        each other both ways (Gemma 4: each image's tokens); None by default."""
        return None

    def pruning_hooks(self, hooks: Any) -> list[Any]:
        """Extra hooks a family installs beside the in-LLM pruning hooks `hooks` (an `ILPHooks`), for model inputs
        that address token positions inside the LLM (Qwen3-VL's DeepStack); removed with them. None by default."""
        return []

    def renumbering_rotary(self) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """The language model's rotary embedding `(hidden, position_ids) -> (cos, sin)`, for in-LLM methods that
        renumber the kept tokens' positions (the default fits 1-D rotary positions: LLaVA's Llama)."""
        return self.model.model.language_model.rotary_emb

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states through the language model's final norm (the default: `model.model.language_model.norm`,
        as transformers 5 lays out LLaVA and Qwen2-VL)."""
        return self.model.model.language_model.norm(hidden)

    def vision_crops(self, inputs: dict[str, Any]) -> list[VisionCrops]:
        """Per image, the vision tower's feature layer on each crop it saw, with where each patch lands (VisionZip)."""
        raise UnsupportedModelError(f"VisionZip is not supported for {self.family}: no CLS attention is exposed")

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vision hidden states `(..., vision dim)` through the projector into the LLM's embedding space."""
        raise UnsupportedModelError(f"{self.family}: projecting selected vision states is not supported")


_REGISTRY: dict[str, type[ModelAdapter]] = {}
"""Model class name -> its family's adapter, filled by `register` as the family files are imported."""


def register(*class_names: str) -> Callable[[type[ModelAdapter]], type[ModelAdapter]]:
    """Class decorator: `adapter_class` handles the models whose class (or a base class) has one of these names."""

    def decorate(adapter_class: type[ModelAdapter]) -> type[ModelAdapter]:
        for name in class_names:
            _REGISTRY[name] = adapter_class
        return adapter_class

    return decorate


_PROCESSORS: dict[str, type] = {}
"""Processor classes a family ships (saved checkpoints name them; transformers does not know them)."""


def register_processor(processor_class: type) -> type:
    """Class decorator: a processor class `crop.loading` finds by the name a saved checkpoint gives it: its own, and
    those in its `checkpoint_names` (stock processors it stands in for, when crop needs what they leave out)."""
    for name in (processor_class.__name__, *vars(processor_class).get("checkpoint_names", ())):
        _PROCESSORS[name] = processor_class
    return processor_class


@cache
def load_families() -> None:
    """Import every family that a `crop.families` entry point names (once), so that each registers itself."""
    for point in entry_points(group="crop.families"):
        point.load()


def processor_class(name: str | None) -> type | None:
    """The registered processor class called `name`, if any."""
    load_families()
    return _PROCESSORS.get(name) if name else None


def supported_classes() -> list[str]:
    """The model class names some registered family handles."""
    load_families()
    return sorted(_REGISTRY)


def adapter_for(model: Any) -> ModelAdapter:
    """The adapter for `model`'s family (found along its class's MRO), or `UnsupportedModelError` naming the
    classes supported."""
    load_families()
    for klass in type(model).__mro__:
        if klass.__name__ in _REGISTRY:
            return _REGISTRY[klass.__name__](model)
    if not _REGISTRY:
        raise UnsupportedModelError(
            "no model family is registered: crop finds its families through package metadata; install crop "
            "(pip install -e .) rather than running it from a source folder"
        )
    raise UnsupportedModelError(
        f"model class {type(model).__name__} is not supported; supported classes (and their subclasses): "
        f"{', '.join(supported_classes())}"
    )


def grid_cell_index(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int, leading: list[int]
) -> torch.Tensor:
    """Per prompt position, the raster grid cell of that visual token (-1 for text, pads and leading tokens)."""
    cells = torch.full_like(input_ids, -1)
    visual = (input_ids == image_token_id) & attention_mask.bool()
    for row in range(input_ids.shape[0]):
        grid = visual[row].nonzero().squeeze(1)[leading[row] :]
        cells[row, grid] = torch.arange(grid.numel(), device=input_ids.device)
    return cells


def question_weights(cell_of: torch.Tensor) -> torch.Tensor:
    """`(batch, count)` weights over each row's last `count` prompt positions: 1 on the tokens after the row's
    image (the question's rows), 0 elsewhere. `cell_of` marks grid tokens with their cell (-1 for others)."""
    batch, length = cell_of.shape
    last_visual = []
    for row in range(batch):
        grid = (cell_of[row] >= 0).nonzero()
        if grid.numel() == 0 or int(grid.max()) == length - 1:
            raise LocalizerError(
                f"row {row}: no text tokens after the image, so there is no question to rate the visual tokens; "
                "put the image before the question in the prompt"
            )
        last_visual.append(int(grid.max()))
    count = length - 1 - min(last_visual)
    weights = torch.zeros(batch, count, device=cell_of.device)
    for row in range(batch):
        weights[row, count - (length - 1 - last_visual[row]) :] = 1.0
    return weights


def pool_rows(attention: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`(batch, heads, length)`: attention `(batch, heads, count, length)` averaged over rows with `weights`."""
    weights = weights.to(attention.device, attention.dtype)
    return (attention * weights[:, None, :, None]).sum(2) / weights.sum(1)[:, None, None]


def _rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as Llama-style layers apply it: `x * cos + rotate_half(x) * sin`, heads in dim 1."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = states.shape[-1] // 2
    rotated = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
    return states * cos + rotated * sin


@dataclass
class VisionInternals:
    """At the vision layer whose output feeds the projector, per crop: its output states `(crops, 1 + N, dim)` (CLS
    first), the CLS query's attention to the N patches summed over its `heads` heads `(crops, N)`, and keys
    averaged over heads `(crops, 1 + N, head_dim)`."""

    hidden: torch.Tensor
    cls_attention: torch.Tensor
    keys: torch.Tensor
    heads: int = 1

    def crops(self, start: int, end: int) -> VisionInternals:
        """Crops `start..end-1` only."""
        return VisionInternals(
            self.hidden[start:end], self.cls_attention[start:end], self.keys[start:end], self.heads
        )


@dataclass
class VisionCrops:
    """One image's crops as the vision tower saw them (LLaVA: one; LLaVA-NeXT: the base image, then the tiles).

    `cell[c, p]`: the placeholder index (after leading tokens) patch p of crop c stands for, -1 where none does
    (LLaVA-NeXT's padding); `order[c, p]`: its rank in raster order of the stitched tiles (crops after the first).
    """

    internals: VisionInternals
    cell: torch.Tensor
    order: torch.Tensor

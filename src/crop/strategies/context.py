"""What a method may ask for during one pruned call, each item computed the first time someone asks.

`CallContext` holds the call (the model's inputs, each row's layout, viewport and region) and caches what the
adapter computes for the whole batch (grid features, vision-tower internals, region masks). A pre-LLM method gets
one `ImageContext` per image; an in-LLM method gets one `StageRow` per row and stage, backed by a `StageContext`
that caches the batch's attention rows at the layer before the stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from crop.adapter import ModelAdapter, VisionCrops, VisualLayout, pool_rows, question_weights
from crop.errors import ConfigError, UnsupportedModelError
from crop.region import Region, Viewport
from crop.strategies.base import Selection
from crop.strategies.grids import GridSelect, select_for_layout

Raters = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""`(visual token embeddings, text embeddings) -> which text tokens rate the visual tokens` (boolean)."""


class CallContext:
    """One pruned call: the model's `inputs` (before any pre-LLM step), per row its layout, viewport, region and
    question text (when the caller gave it)."""

    def __init__(
        self,
        adapter: ModelAdapter | None,
        inputs: dict[str, Any],
        layouts: list[VisualLayout],
        viewports: list[Viewport],
        regions: list[Region | None],
        questions: list[str] | None = None,
    ) -> None:
        self.adapter = adapter
        self.inputs = inputs
        self.layouts = layouts
        self.viewports = viewports
        self.regions = regions
        self.questions = questions
        self._features: list[torch.Tensor] | None = None
        self._side: list[torch.Tensor] | None = None
        self._vision: list[VisionCrops] | None = None
        self._masks: dict[int, torch.Tensor] = {}
        self._project: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._vision_head: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def of_features(
        cls,
        features: list[torch.Tensor],
        layouts: list[VisualLayout],
        regions: list[Region | None],
        questions: list[str] | None = None,
        vision: list[VisionCrops] | None = None,
        project: Callable[[torch.Tensor], torch.Tensor] | None = None,
        viewports: list[Viewport] | None = None,
        vision_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> CallContext:
        """A call whose images' projected tokens were computed elsewhere (a serving engine's encoder): methods that
        read the features, the region and the question run on it; those that read the vision tower's internals
        run when the engine gives them too (`vision`, with the `project`or that maps vision states to the LLM, and
        the tower's `vision_head` where a method reads it). `viewports`: where each image lies on its grid (for
        regions given on the whole image)."""
        if (vision is None) != (project is None):
            raise ValueError("give the vision tower's internals together with the projector that maps them")
        call = cls(None, {}, layouts, viewports or [Viewport()] * len(layouts), regions, questions)
        call._features = list(features)
        call._vision = None if vision is None else list(vision)
        call._project = project
        call._vision_head = vision_head
        return call

    @property
    def batch(self) -> int:
        return len(self.layouts)

    def features(self, row: int) -> torch.Tensor:
        """Row `row`'s projected visual tokens `(tokens, dim)` as the LLM would get them, leading tokens first."""
        if self._features is None:
            if self.inputs.get("pixel_values") is None:
                raise ConfigError("methods acting before the LLM need pixel_values (pass the processor's output)")
            derived = self.adapter.features_from_vision(self._vision) if self._vision is not None else None
            if derived is not None:
                self._features = derived
            else:
                self._features, self._side = self.adapter.encode_images(self.inputs)
        return self._features[row]

    def side_features(self, row: int) -> torch.Tensor | None:
        """Row `row`'s per-token side features `(tokens, k, dim)` (see `ModelAdapter.encode_images`), or None."""
        self.features(row)
        return None if self._side is None else self._side[row]

    def vision(self, row: int) -> VisionCrops:
        """Row `row`'s crops as the vision tower saw them (its feature layer's states, CLS attention, keys)."""
        if self.adapter is None and self._vision is None:
            raise UnsupportedModelError(
                "this method reads the vision tower's internals (its CLS attention or feature-layer states), which a "
                "call on precomputed features does not have; use pool, random, divprune or crop"
            )
        if self._vision is None:
            self._vision = self.adapter.vision_crops(self.inputs)
        return self._vision[row]

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vision states through the model's projector into the LLM's embedding space."""
        return self._project(hidden) if self._project is not None else self.adapter.project(hidden)

    def vision_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Feature-layer vision states through the tower's final layer norm (see `ImageContext.vision_head`)."""
        if self._vision_head is not None:
            return self._vision_head(hidden)
        if self.adapter is None:
            raise UnsupportedModelError("this call on precomputed features has no vision tower head")
        return self.adapter.vision_head(hidden)

    def region_mask(self, row: int) -> torch.Tensor:
        """`(rows, cols)` mask of row `row`'s grid tokens inside its region."""
        if self.regions[row] is None:
            raise ConfigError("this method needs a contextual region: pass regions=... or give crop.apply a localizer")
        if row not in self._masks:
            self._masks[row] = self.layouts[row].region_mask(self.regions[row], self.viewports[row])
        return self._masks[row]

    def image(self, row: int) -> ImageContext:
        return ImageContext(self, row)


class ImageContext:
    """One image of the call, as a pre-LLM method (or an in-LLM one reasoning about the whole grid) sees it."""

    def __init__(self, call: CallContext, row: int) -> None:
        self.call = call
        self.row = row
        self.layout = call.layouts[row]
        self.viewport = call.viewports[row]
        self.region = call.regions[row]

    @property
    def shape(self) -> tuple[int, int]:
        """The token grid `(rows, cols)`; images with several grids (LLaVA-NeXT) are one `1 x tokens` row."""
        return self.layout.rows, self.layout.cols

    @property
    def grid_tokens(self) -> int:
        return self.layout.rows * self.layout.cols

    @property
    def features(self) -> torch.Tensor:
        """The grid tokens' projected features `(rows*cols, dim)`, in raster order (leading tokens excluded)."""
        return self.call.features(self.row)[self.layout.leading :]

    @property
    def vision(self) -> VisionCrops:
        """The vision tower's internals on this image's crops (methods that select vision states)."""
        return self.call.vision(self.row)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vision states through the model's projector into the LLM's embedding space."""
        return self.call.project(hidden)

    def vision_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Feature-layer vision states through the tower's final layer norm (CLIP's `post_layernorm`): the space
        CLIP's image-text projection expects."""
        return self.call.vision_head(hidden)

    def question(self, method: str) -> str:
        """This row's question text, which `method` reads with its own text encoder (ConfigError if not given)."""
        questions = self.call.questions
        if questions is None:
            raise ConfigError(
                f"{method} reads each row's question text: pass questions=[...] (one per row) with the inputs, or "
                "use prepare()/ask(), which record them"
            )
        return questions[self.row]

    @property
    def inside(self) -> torch.Tensor:
        """`(rows, cols)` mask of the grid tokens inside the region (ConfigError without a region)."""
        return self.call.region_mask(self.row)

    def per_grid(self, select: GridSelect, budget: int | None, before_llm: bool = True, name: str = "") -> Selection:
        """`select` on each 2-D grid of the image (one call for a single grid), the region's share and the
        budget's share per grid; `before_llm` says whether `select` returns compressed tokens."""
        features = self.features if before_llm else None
        inside = self.inside if self.region is not None else None
        return select_for_layout(select, self.layout, features, inside, budget, before_llm, name)


class StageContext:
    """One in-LLM stage of the call at prefill: the observed layer's input (the layer before the stage), the
    stage's own input, the current token layout, and the attention rows computed from them on demand."""

    def __init__(
        self,
        call: CallContext,
        stage: int,
        layer: int,
        observed: tuple[torch.Tensor, dict[str, Any]],
        stage_hidden: torch.Tensor,
        index: torch.Tensor,
        cell_of: torch.Tensor,
        attention_mask: torch.Tensor,
        selections: list[Selection] | None,
        embeddings: Callable[[], torch.Tensor],
    ) -> None:
        self.call = call
        self.stage = stage
        self.layer = layer
        self.hidden, self.kwargs = observed
        self.stage_hidden = stage_hidden
        self.attention_mask = attention_mask
        self.repeat = self.hidden.shape[0] // attention_mask.shape[0]
        self.index = index
        self.cell_of = cell_of
        self.selections = selections
        self._embeddings = embeddings
        self._attention: dict[Any, torch.Tensor] = {}
        self._keys: torch.Tensor | None = None
        self._normed: torch.Tensor | None = None

    def keys(self) -> torch.Tensor:
        """`(batch*repeat, kv heads, length, head_dim)`: the keys of the layer before the stage, rotary applied."""
        if self._keys is None:
            layer = self.call.adapter.decoder_layers()[self.layer - 1]
            self._keys = self.call.adapter.layer_keys(layer, self.hidden, self.kwargs)
        return self._keys

    def normed_stage_hidden(self) -> torch.Tensor:
        """The hidden states entering the stage through the language model's final norm."""
        if self._normed is None:
            self._normed = self.call.adapter.final_norm(self.stage_hidden)
        return self._normed

    def attention(self, queries: str | Raters, layer: str = "before") -> torch.Tensor:
        """`(batch*repeat, heads, length)` attention of the query rows to the stage's current tokens: the last
        prompt token's (`"last"`), the mean over every token after the image (`"question"`), or the mean over the
        text tokens a `Raters` function picks; in the layer before the stage on its input (`layer="before"`) or in
        the stage's first layer on the stage's input (`"stage"`, before anything is dropped there)."""
        if isinstance(queries, str) and queries not in ("last", "question"):
            raise ConfigError(f"attention queries must be 'last', 'question' or a raters function, got {queries!r}")
        if layer not in ("before", "stage"):
            raise ConfigError(f"attention layer must be 'before' or 'stage', got {layer!r}")
        key = (queries, layer)
        if key not in self._attention:
            adapter = self.call.adapter
            hidden = self.hidden if layer == "before" else self.stage_hidden
            decoder = adapter.decoder_layers()[self.layer - 1 if layer == "before" else self.layer]
            if queries == "last":
                attention = adapter.query_attention(decoder, hidden, self.kwargs)[:, :, 0]
            else:
                weights = question_weights(self.cell_of) if queries == "question" else self._rater_weights(queries)
                weights = weights.repeat_interleave(self.repeat, 0)
                rows = adapter.query_attention(decoder, hidden, self.kwargs, weights.shape[1])
                attention = pool_rows(rows, weights)
            self._attention[key] = attention
        return self._attention[key]

    def check_question(self) -> None:
        """Refuse prompts with no text after the image (methods that rate the image by the question)."""
        question_weights(self.cell_of)

    def embeddings(self) -> torch.Tensor:
        """The prompt embeddings `(batch*repeat, length, dim)` (the first decoder layer's input at prefill)."""
        return self._embeddings()

    def _rater_weights(self, raters: Raters) -> torch.Tensor:
        """`question_weights` restricted to the text tokens `raters` picks from each row's prompt embeddings."""
        weights = question_weights(self.cell_of)
        embeddings = self.embeddings()
        for row in range(self.cell_of.shape[0]):
            text = int(weights[row].sum())
            grid = (self.cell_of[row] >= 0).nonzero().squeeze(1)
            chosen = raters(embeddings[row * self.repeat, grid], embeddings[row * self.repeat, -text:])
            weights[row, -text:] = chosen.to(weights.dtype)
        return weights.to(embeddings.device)


class StageRow:
    """One row at one stage: its grid tokens that reached the stage and what a method may ask about them.

    `positions`: their positions in the stage's current layout; `tokens`: their index among the LLM input's grid
    tokens (after any pre-LLM step); `cells`: the grid cell each stands for.
    """

    def __init__(self, context: StageContext, row: int, positions: torch.Tensor, tokens: torch.Tensor) -> None:
        self.context = context
        self.row = row
        self.positions = positions
        self.tokens = tokens
        self.image = context.call.image(row)
        self._expanded = row * context.repeat

    @property
    def stage(self) -> int:
        return self.context.stage

    @property
    def layer(self) -> int:
        return self.context.layer

    @property
    def grid_tokens(self) -> int:
        return self.image.grid_tokens

    @property
    def selection(self) -> Selection | None:
        """The pre-LLM step's selection of this row (None when the LLM got the full grid)."""
        return None if self.context.selections is None else self.context.selections[self.row]

    @property
    def cells(self) -> torch.Tensor:
        """The raster grid cell of each token (a compressed token: its first cell)."""
        selection = self.selection
        if selection is None or selection.compressed is None:
            return self.tokens.cpu()
        return selection.compressed.first_cell.cpu()[self.tokens.cpu()]

    @property
    def inside(self) -> torch.Tensor:
        """Whether each token lies in the region (a compressed token: whether it came from inside)."""
        selection = self.selection
        if selection is not None and selection.compressed is not None:
            return selection.compressed.inside.cpu()[self.tokens.cpu()]
        return self.image.inside.reshape(-1)[self.tokens.cpu()]

    def attention(self, queries: str | Raters = "last", layer: str = "before") -> torch.Tensor:
        """`(heads, tokens)`: the attention the query rows pay these tokens in the layer before the stage or the
        stage's first layer (see `StageContext.attention`)."""
        return self.context.attention(queries, layer)[self._expanded][:, self.positions]

    @property
    def hidden(self) -> torch.Tensor:
        """`(tokens, dim)`: the hidden states of these tokens entering the stage's layer."""
        return self.context.stage_hidden[self._expanded, self.positions]

    def embeddings(self) -> torch.Tensor:
        """`(tokens, dim)`: the prompt embeddings of these tokens."""
        index = self.context.index[self._expanded, self.positions]
        return self.context.embeddings()[self._expanded, index]

    def text_after_image(self) -> torch.Tensor:
        """Positions, in the stage's layout, of the prompt tokens after the image (the question and what follows;
        rows are left-padded, so every one is real)."""
        return torch.arange(int(self.positions.max()) + 1, self.context.index.shape[1], device=self.positions.device)

    def keys(self) -> torch.Tensor:
        """`(length, kv heads * head_dim)`: every position's key in the layer before the stage, rotary applied."""
        keys = self.context.keys()[self._expanded]
        return keys.transpose(0, 1).reshape(keys.shape[1], -1)

    def normed_states(self) -> torch.Tensor:
        """`(length, dim)`: every position's hidden state entering the stage, through the final norm."""
        return self.context.normed_stage_hidden()[self._expanded]

    def prompt_index(self, positions: torch.Tensor) -> torch.Tensor:
        """The index in the row's unpadded prompt of each of `positions` (in the stage's layout)."""
        pads = int((self.context.attention_mask[self.row] == 0).sum())
        return self.context.index[self._expanded, positions.to(self.context.index.device)] - pads

    def check_question(self) -> None:
        self.context.check_question()

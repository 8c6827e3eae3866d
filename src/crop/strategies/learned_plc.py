"""PLC, pre-LLM compression (`learned` form): the paper's learnable-query compressor (DESIGN 1.2).

Given one image's projected visual tokens on a `(rows, cols)` grid and the region's cell mask, with R region
cells and O outside cells:

- Region part: with `region_ratio == 1` all R region tokens pass through unchanged. Otherwise
  `ceil(R / region_ratio)` learned region queries summarise the region, and `k = min(n_anchor, R)` *anchor*
  tokens pass through unchanged: anchor `i` (0-based) is the region cell at position `((2i + 1) * R) // (2k)`
  of the region's cells in raster order, i.e. the middle cell of the i-th of k equal runs. The runs are at
  least one cell long, so anchors never repeat.
- Outside part: nothing when O == 0; with `outside_ratio == 1` all O outside tokens pass through unchanged;
  otherwise `ceil(O / outside_ratio)` learned outside queries summarise it.

Architecture: each part has a bank of learnable queries of width `hidden_size`, sized for the most that grid
can need (`ceil(rows * cols / ratio)`); a part with n queries uses the bank's first n rows. One multi-head
cross-attention layer, shared by both parts, maps queries to output tokens, and a part's queries attend only to
that part's tokens (gathering them is the same as masking the others out):

    keys   = key(LayerNorm(x) + row_embed[r] + col_embed[c])     (the position term only when `positional`)
    values = value(x)
    out    = output(concat_heads(softmax(q k^T / sqrt(d_head)) v))

The queries are used as they are (no query projection: a free parameter needs none). Initialisation: zero
queries (so every logit is 0 and attention is uniform), identity `value` and `output` with zero bias, no
residual; each query's output is then the mean of its part's tokens, so a VLM that never saw the compressor
starts from "mean pooling of the part" rather than from noise. The key side (`key`, the LayerNorm, the position
embeddings) gets zero gradient while every query is zero and starts learning after the first step.

Output order: outside query tokens, region query tokens, then the passed-through tokens (anchors, or the
whole region / outside at ratio 1) in raster order of their cells. `Compressed.inside` is True for region
queries and region pass-through tokens; `Compressed.first_cell` is a pass-through token's own cell and, for a
query, the first (smallest raster index) cell of its part. A whole-image region at `region_ratio == 1` returns
the input exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from crop.errors import ConfigError
from crop.stats import FINE, POOLED
from crop.strategies.plc import Compressed

WEIGHTS_NAME = "learned_plc.safetensors"
CONFIG_NAME = "learned_plc.json"


@dataclass(frozen=True)
class LearnedPLCConfig:
    """Learned PLC settings.

    `hidden_size`: width of the projected visual tokens (the LLM's hidden size). `rows`, `cols`: the token grid.
    `region_ratio`, `outside_ratio`: tokens per learned query in each part (1 passes the part through).
    `n_anchor`: region tokens kept unchanged besides the region queries. `heads`: attention heads.
    `positional`: add a learned 2-D position embedding (row + column) to the keys.
    """

    hidden_size: int
    rows: int
    cols: int
    region_ratio: int = 2
    outside_ratio: int = 8
    n_anchor: int = 4
    heads: int = 4
    positional: bool = True

    def __post_init__(self) -> None:
        sizes = {"hidden_size": self.hidden_size, "rows": self.rows, "cols": self.cols, "heads": self.heads}
        ratios = {"region_ratio": self.region_ratio, "outside_ratio": self.outside_ratio}
        for name, value in {**sizes, **ratios}.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"learned PLC {name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.n_anchor, int) or isinstance(self.n_anchor, bool) or self.n_anchor < 0:
            raise ConfigError(f"learned PLC n_anchor must be an integer >= 0, got {self.n_anchor!r}")
        if self.hidden_size % self.heads:
            raise ConfigError(f"learned PLC hidden_size {self.hidden_size} is not divisible by heads {self.heads}")


class LearnedPLC(nn.Module):
    """Learnable-query cross-attention compressor: region and outside tokens to fewer tokens, anchors kept."""

    form = "learned"

    def __init__(self, config: LearnedPLCConfig) -> None:
        super().__init__()
        self.config = config
        hidden, cells = config.hidden_size, config.rows * config.cols
        self.region_queries = self._bank(cells, config.region_ratio)
        self.outside_queries = self._bank(cells, config.outside_ratio)
        self.key_norm = nn.LayerNorm(hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.output = nn.Linear(hidden, hidden)
        for identity in (self.value, self.output):
            nn.init.eye_(identity.weight)
            nn.init.zeros_(identity.bias)
        if config.positional:
            self.row_embed = nn.Parameter(torch.randn(config.rows, hidden) * 0.02)
            self.col_embed = nn.Parameter(torch.randn(config.cols, hidden) * 0.02)

    @property
    def region_state(self) -> int:
        """How the region's cells are drawn: fine when they pass through, pooled when queries compress them."""
        return FINE if self.config.region_ratio == 1 else POOLED

    def describe(self) -> str:
        c = self.config
        return f"PLC(learned, region 1/{c.region_ratio}, outside 1/{c.outside_ratio}, {c.n_anchor} anchors)"

    def _bank(self, cells: int, ratio: int) -> nn.Parameter | None:
        """Zero queries, as many as a part covering the whole grid needs; none for a pass-through part."""
        return nn.Parameter(torch.zeros(math.ceil(cells / ratio), self.config.hidden_size)) if ratio > 1 else None

    def output_count(self, inside: torch.Tensor, budget: int | None = None) -> int:
        """Number of output tokens for a `(rows, cols)` boolean region mask (at most `budget` when given)."""
        region = int(inside.sum())
        region_queries, outside_queries, anchors = self.part_counts(region, inside.numel() - region, budget)
        region_count = region if self.config.region_ratio == 1 else region_queries + anchors
        outside_count = inside.numel() - region if self.config.outside_ratio == 1 else outside_queries
        return region_count + outside_count

    def part_counts(self, region: int, outside: int, budget: int | None = None) -> tuple[int, int, int]:
        """`(region queries, outside queries, anchors)` for parts of `region` and `outside` cells.

        Without a budget: `ceil(part / ratio)` queries and `min(n_anchor, region)` anchors. With one, when that
        is more than `budget` tokens: anchors first (up to what leaves a token for each part), then the queries
        shrunk in proportion to their natural counts (each non-empty part keeps at least one); never more than
        the trained banks hold. A budget needs queries in both parts (both ratios above 1)."""
        c = self.config
        region_queries = math.ceil(region / c.region_ratio) if c.region_ratio > 1 else 0
        outside_queries = math.ceil(outside / c.outside_ratio) if c.outside_ratio > 1 else 0
        anchors = min(c.n_anchor, region) if c.region_ratio > 1 else 0
        if budget is None or region_queries + outside_queries + anchors <= budget:
            return region_queries, outside_queries, anchors
        if c.region_ratio == 1 or c.outside_ratio == 1:
            raise ConfigError(
                f"a budget needs learned queries in both parts; this compressor passes a part through "
                f"(region ratio {c.region_ratio}, outside ratio {c.outside_ratio})"
            )
        parts = int(region > 0) + int(outside > 0)
        if budget < parts:
            raise ConfigError(f"learned PLC budget {budget} is below one token per part ({parts} parts)")
        anchors = min(anchors, budget - parts)
        left = budget - anchors
        shrunk_region = max(int(region > 0), math.floor(left * region_queries / (region_queries + outside_queries)))
        shrunk_region = min(shrunk_region, left - int(outside > 0))
        return shrunk_region, left - shrunk_region, anchors

    def compress(self, features: torch.Tensor, inside: torch.Tensor, budget: int | None = None) -> Compressed:
        """Compress one image's `(rows*cols, hidden_size)` features given its `(rows, cols)` region mask, into at
        most `budget` tokens when given (`part_counts` says how the budget is shared)."""
        c = self.config
        if tuple(inside.shape) != (c.rows, c.cols) or tuple(features.shape) != (c.rows * c.cols, c.hidden_size):
            raise ConfigError(
                f"learned PLC built for a {c.rows}x{c.cols} grid of width {c.hidden_size} got features "
                f"{tuple(features.shape)} and a region mask {tuple(inside.shape)}"
            )
        flat = inside.reshape(-1).to("cpu", torch.bool)
        region, outside = flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)
        region_queries, outside_queries, anchors = self.part_counts(region.numel(), outside.numel(), budget)
        tokens, first_cells, insides = [], [], []
        for cells, bank, count, is_inside in (
            (outside, self.outside_queries, outside_queries, False),
            (region, self.region_queries, region_queries, True),
        ):
            if count:
                tokens.append(self.attend(bank[:count], features, cells).to(features.dtype))
                first_cells.append(cells[:1].expand(count))
                insides.append(torch.full((count,), is_inside))
        passed = self.passed_through(region, outside, anchors)
        tokens.append(features[passed.to(features.device)])
        first_cells.append(passed)
        insides.append(flat[passed])
        device = features.device
        return Compressed(torch.cat(tokens), torch.cat(insides).to(device), torch.cat(first_cells).to(device))

    def passed_through(self, region: torch.Tensor, outside: torch.Tensor, anchors: int) -> torch.Tensor:
        """Raster-sorted cells kept unchanged: `anchors` anchors (or the whole region) and, at outside ratio 1,
        the outside."""
        c = self.config
        if c.region_ratio == 1:
            kept = region
        else:
            k = anchors
            kept = region[((2 * torch.arange(k) + 1) * region.numel()) // (2 * k)] if k else region[:0]
        if c.outside_ratio == 1:
            kept = torch.cat([kept, outside])
        return kept.sort().values

    def attend(self, queries: torch.Tensor, features: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Multi-head cross-attention of `queries` to the tokens at `cells` (raster indices) only."""
        c = self.config
        index = cells.to(features.device)
        x = features[index].to(queries.dtype)
        keys = self.key_norm(x)
        if c.positional:
            keys = keys + self.row_embed[index // c.cols] + self.col_embed[index % c.cols]
        split = self.split_heads
        mixed = F.scaled_dot_product_attention(split(queries), split(self.key(keys)), split(self.value(x)))
        return self.output(mixed.transpose(0, 1).reshape(queries.shape[0], c.hidden_size))

    def split_heads(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(n, hidden_size)` to `(heads, n, head_dim)`."""
        return tokens.view(tokens.shape[0], self.config.heads, -1).transpose(0, 1)

    def save_pretrained(self, path: str | Path) -> None:
        """Write `learned_plc.safetensors` (weights) and `learned_plc.json` (config) into directory `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, path / WEIGHTS_NAME)
        (path / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls, path: str | Path, hidden_size: int | None = None, rows: int | None = None, cols: int | None = None
    ) -> LearnedPLC:
        """Load a saved compressor (on CPU, float32); `hidden_size`, `rows`, `cols` if given must match it."""
        path = Path(path)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise ConfigError(f"no learned PLC compressor in {path}: expected {CONFIG_NAME} and {WEIGHTS_NAME}")
        try:
            config = LearnedPLCConfig(**json.loads((path / CONFIG_NAME).read_text()))
        except (TypeError, json.JSONDecodeError) as error:
            raise ConfigError(f"unreadable learned PLC config {path / CONFIG_NAME}: {error}") from error
        trained = (config.hidden_size, config.rows, config.cols)
        asked = tuple(t if a is None else a for a, t in zip((hidden_size, rows, cols), trained, strict=True))
        if asked != trained:
            raise ConfigError(
                f"learned PLC compressor in {path} was trained for hidden size {trained[0]} on a "
                f"{trained[1]}x{trained[2]} token grid; asked for hidden size {asked[0]} on a "
                f"{asked[1]}x{asked[2]} grid"
            )
        model = cls(config)
        model.load_state_dict(load_file(path / WEIGHTS_NAME))
        return model

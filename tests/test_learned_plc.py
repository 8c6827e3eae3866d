"""Learned PLC compressor: token counts, anchors and pass-through, identity, mean-pooling init, save/load, training."""

from __future__ import annotations

import pytest
import torch

from crop.errors import ConfigError
from crop.strategies.learned_plc import LearnedPLC, LearnedPLCConfig
from crop.testing.llava import build_model

ROWS, COLS, HIDDEN = 12, 12, 64


def mask(*boxes: tuple[int, int, int, int]) -> torch.Tensor:
    """Region mask that is the union of inclusive `(row0, col0, row1, col1)` boxes."""
    inside = torch.zeros(ROWS, COLS, dtype=torch.bool)
    for r0, c0, r1, c1 in boxes:
        inside[r0 : r1 + 1, c0 : c1 + 1] = True
    return inside


SMALL = mask((2, 3, 4, 6))  # 3x4 = 12 cells, raster 27-30, 39-42, 51-54
REGIONS = {
    "small": SMALL,
    "whole": mask((0, 0, ROWS - 1, COLS - 1)),
    "empty": mask(),
    "strip": mask((5, 0, 5, COLS - 1)),
    "L": mask((1, 1, 6, 1), (6, 1, 6, 6)),
    "cell": mask((11, 11, 11, 11)),
}
RATIOS = [(2, 8, 4), (1, 8, 4), (2, 1, 4), (3, 5, 0), (1, 1, 4), (4, 4, 50)]


def compressor(region_ratio: int = 2, outside_ratio: int = 8, n_anchor: int = 4, **kwargs) -> LearnedPLC:
    torch.manual_seed(0)
    config = LearnedPLCConfig(HIDDEN, ROWS, COLS, region_ratio, outside_ratio, n_anchor, **kwargs)
    return LearnedPLC(config)


def features(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(ROWS * COLS, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(dtype)


def perturb(plc: LearnedPLC) -> None:
    with torch.no_grad():
        for parameter in plc.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)


@pytest.mark.parametrize("ratios", RATIOS, ids=str)
@pytest.mark.parametrize("name", REGIONS)
def test_output_count(name: str, ratios: tuple[int, int, int]) -> None:
    region_ratio, outside_ratio, n_anchor = ratios
    inside = REGIONS[name]
    r = int(inside.sum())
    o = ROWS * COLS - r
    # written out: the region passes through or gives ceil(R / ratio) queries plus up to n_anchor anchors;
    # the outside passes through or gives ceil(O / ratio) queries
    region_tokens = r if region_ratio == 1 else (r + region_ratio - 1) // region_ratio + min(n_anchor, r)
    outside_tokens = o if outside_ratio == 1 else (o + outside_ratio - 1) // outside_ratio
    plc = compressor(*ratios)
    out = plc.compress(features(), inside)
    assert plc.output_count(inside) == region_tokens + outside_tokens == out.features.shape[0]
    assert out.inside.shape == out.first_cell.shape == (out.features.shape[0],)
    assert int(out.inside.sum()) == region_tokens


def test_output_count_literal() -> None:
    """Small region (12 cells, 132 outside) at the defaults: 17 outside queries, 6 region queries, 4 anchors."""
    assert compressor().output_count(SMALL) == 17 + 6 + 4
    assert compressor(1, 1).output_count(SMALL) == ROWS * COLS


@pytest.mark.parametrize("budget", [27, 28, 20, 9, 3, 2])
def test_budget_caps_the_output(budget: int) -> None:
    """SMALL at the defaults gives 17 outside + 6 region queries + 4 anchors = 27 tokens; a budget of at least
    27 changes nothing, a smaller one keeps the anchors while a token per part is left, then shrinks both query
    parts in proportion (6 : 17), each keeping at least one; the output is exactly the budget."""
    expected = {  # (region queries, outside queries, anchors), worked out by hand
        27: (6, 17, 4), 28: (6, 17, 4), 20: (4, 12, 4), 9: (1, 4, 4), 3: (1, 1, 1), 2: (1, 1, 0),
    }[budget]  # fmt: skip
    # 20: left 16, region floor(16 * 6 / 23) = 4; 9: left 5, floor(5 * 6 / 23) = 1; 3: 1 anchor, left 2
    plc, x = compressor(), features()
    assert plc.part_counts(12, 132, budget) == expected
    out = plc.compress(x, SMALL, budget)
    assert out.features.shape[0] == plc.output_count(SMALL, budget) == min(budget, 27)
    region_queries, outside_queries, anchors = expected
    assert torch.equal(out.inside, torch.tensor([False] * outside_queries + [True] * (region_queries + anchors)))
    if budget >= 27:
        assert torch.equal(out.features, plc.compress(x, SMALL).features)


def test_budget_with_a_part_passed_through_or_too_small_is_refused() -> None:
    with pytest.raises(ConfigError, match="both parts"):
        compressor(1, 8).compress(features(), SMALL, 10)
    with pytest.raises(ConfigError, match="below one token per part"):
        compressor().compress(features(), SMALL, 1)
    assert compressor().output_count(REGIONS["whole"], 5) == 5  # one part: all of it goes to the region


def test_layout_and_anchors() -> None:
    plc, x = compressor(), features()
    out = plc.compress(x, SMALL)
    # anchor i is region cell ((2i + 1) * 12) // 8 = 1, 4, 7, 10 of the raster-ordered region cells
    anchors = torch.tensor([28, 39, 42, 53])
    assert torch.equal(out.first_cell, torch.tensor([0] * 17 + [27] * 6 + anchors.tolist()))
    assert torch.equal(out.inside, torch.tensor([False] * 17 + [True] * 10))
    assert torch.equal(out.features[23:], x[anchors])


def test_anchors_never_repeat() -> None:
    """With at least as many anchors as region cells every region cell is kept once."""
    plc, x = compressor(2, 8, 50), features()
    out = plc.compress(x, SMALL)
    region_cells = SMALL.reshape(-1).nonzero().squeeze(1)
    assert torch.equal(out.first_cell[-12:], region_cells)
    assert torch.equal(out.features[-12:], x[region_cells])


def test_pass_through_parts() -> None:
    x = features()
    region_cells = SMALL.reshape(-1).nonzero().squeeze(1)
    out = compressor(2, 1, 4).compress(x, SMALL)  # outside passes through, merged with the anchors
    kept = torch.cat([(~SMALL).reshape(-1).nonzero().squeeze(1), torch.tensor([28, 39, 42, 53])]).sort().values
    assert torch.equal(out.first_cell[6:], kept)
    assert torch.equal(out.features[6:], x[kept])
    assert torch.equal(out.inside[6:], SMALL.reshape(-1)[kept])
    out = compressor(1, 8, 4).compress(x, SMALL)  # region passes through whole, no anchors on top
    assert torch.equal(out.first_cell[17:], region_cells)
    assert torch.equal(out.features[17:], x[region_cells])


@pytest.mark.parametrize("outside_ratio", [1, 8])
def test_whole_image_identity(outside_ratio: int) -> None:
    x = features()
    out = compressor(1, outside_ratio).compress(x, REGIONS["whole"])
    assert torch.equal(out.features, x)
    assert torch.equal(out.first_cell, torch.arange(ROWS * COLS))
    assert bool(out.inside.all())


@pytest.mark.parametrize("name", ["small", "L", "empty", "whole", "cell"])
@pytest.mark.parametrize("positional", [True, False])
def test_init_is_mean_of_part(name: str, positional: bool) -> None:
    inside, x = REGIONS[name], features(1) * 3 + 1
    plc = compressor(3, 5, 2, positional=positional)
    out = plc.compress(x, inside)
    flat = inside.reshape(-1)
    n_outside = -(-int((~flat).sum()) // 5)
    n_region = -(-int(flat.sum()) // 3)
    queries = out.features[: n_outside + n_region]
    expected = [x[~flat].mean(0)] * n_outside + [x[flat].mean(0)] * n_region
    assert torch.allclose(queries, torch.stack(expected), atol=1e-5)


def test_dtype_and_device_follow_features() -> None:
    x, inside = features(dtype=torch.bfloat16), SMALL
    out = compressor().compress(x, inside)  # float32 weights, bfloat16 features
    assert out.features.dtype == torch.bfloat16 and out.features.device == x.device
    out = compressor().to(torch.float64).compress(x.double(), inside)
    assert out.features.dtype == torch.float64 and out.inside.dtype == torch.bool


def test_save_load_round_trip(tmp_path) -> None:
    plc = compressor(3, 5, 2)
    perturb(plc)
    plc.save_pretrained(tmp_path / "plc")
    assert {p.name for p in (tmp_path / "plc").iterdir()} == {"learned_plc.safetensors", "learned_plc.json"}
    loaded = LearnedPLC.from_pretrained(tmp_path / "plc", hidden_size=HIDDEN, rows=ROWS, cols=COLS)
    assert loaded.config == plc.config
    x = features(2)
    for inside in (SMALL, REGIONS["L"]):
        assert torch.equal(loaded.compress(x, inside).features, plc.compress(x, inside).features)
    assert not torch.equal(plc.compress(x, SMALL).features, compressor(3, 5, 2).compress(x, SMALL).features)


def test_load_mismatch_and_missing(tmp_path) -> None:
    compressor().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="trained for hidden size 64 on a 12x12 token grid; asked for hidden size 32"):
        LearnedPLC.from_pretrained(tmp_path, hidden_size=32)
    with pytest.raises(ConfigError, match="asked for hidden size 64 on a 24x12 grid"):
        LearnedPLC.from_pretrained(tmp_path, rows=24)
    with pytest.raises(ConfigError, match="expected learned_plc.json and learned_plc.safetensors"):
        LearnedPLC.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "learned_plc.safetensors").unlink()
    with pytest.raises(ConfigError, match="learned_plc.safetensors"):
        LearnedPLC.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "bad",
    [{"region_ratio": 0}, {"outside_ratio": -1}, {"n_anchor": -1}, {"heads": 5}, {"rows": 0}, {"region_ratio": 1.5}],
    ids=str,
)
def test_bad_config(bad: dict) -> None:
    with pytest.raises(ConfigError, match="learned PLC"):
        LearnedPLCConfig(**{"hidden_size": HIDDEN, "rows": ROWS, "cols": COLS, **bad})


def test_wrong_shapes_rejected() -> None:
    with pytest.raises(ConfigError, match="12x12 grid of width 64"):
        compressor().compress(features()[:100], SMALL)


@pytest.fixture(scope="module")
def frozen_features() -> torch.Tensor:
    """Projected visual tokens of a tiny frozen LLaVA (12x12 grid, hidden size 64), with the graph kept."""
    model = build_model(seed=0).requires_grad_(False)
    pixels = torch.randn(1, 3, 168, 168, generator=torch.Generator().manual_seed(0))
    output = model.model.get_image_features(
        pixel_values=pixels, vision_feature_layer=-1, vision_feature_select_strategy="default", return_dict=True
    )
    return model, output.pooler_output[0]


def test_gradients_reach_compressor_only(frozen_features) -> None:
    model, x = frozen_features
    assert x.shape == (ROWS * COLS, HIDDEN) and not x.requires_grad
    plc = compressor()
    plc.compress(x, SMALL).features.pow(2).mean().backward()
    assert all(p.grad is None for p in model.parameters())
    for name in ("region_queries", "outside_queries", "value.weight", "value.bias", "output.weight", "output.bias"):
        assert plc.get_parameter(name).grad.abs().sum() > 0, name
    # while every query is zero, the key side sees no gradient (documented); one step later it does
    assert plc.key.weight.grad.abs().sum() == 0 and plc.row_embed.grad.abs().sum() == 0
    torch.optim.Adam(plc.parameters(), lr=1e-2).step()
    plc.zero_grad()
    plc.compress(x, SMALL).features.pow(2).mean().backward()
    for name, parameter in plc.named_parameters():
        assert parameter.grad.abs().sum() > 0, name


def test_training_lowers_loss(frozen_features) -> None:
    _, x = frozen_features
    plc = compressor()
    target = torch.randn(plc.output_count(SMALL), HIDDEN, generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.Adam(plc.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (plc.compress(x, SMALL).features - target)[:23].pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]

"""The accuracy-versus-budget evaluation: runs end to end on an untrained synthetic model; metric helpers."""

from __future__ import annotations

import json

import pytest

from crop.region import Region, grid_iou
from crop.strategies.learned_plc import LearnedPLC, LearnedPLCConfig
from crop.synth.evaluate import evaluate, markdown_table, wilson
from crop.synth.model import build_synth_model, build_synth_processor


def test_wilson_interval():
    low, high = wilson(85, 100)
    assert low == pytest.approx(0.767, abs=1e-3) and high == pytest.approx(0.907, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


def test_grid_iou():
    a = Region.from_grid([0, 0, 1, 1])
    assert grid_iou(a, a) == 1.0
    assert grid_iou(a, Region.from_grid([2, 2, 3, 3])) == 0.0
    assert grid_iou(a, Region.from_grid([0, 0, 3, 1])) == pytest.approx(0.5)


@pytest.mark.slow
def test_evaluation_runs_and_counts_tokens(tmp_path):
    model_dir = tmp_path / "model"
    build_synth_model(attn_implementation="sdpa").save_pretrained(model_dir)
    build_synth_processor().save_pretrained(model_dir)
    LearnedPLC(LearnedPLCConfig(hidden_size=192, rows=16, cols=16)).save_pretrained(model_dir)
    out = tmp_path / "eval.json"
    results = evaluate(model_dir, count=10, batch_size=10, out=out, plot=tmp_path / "plot.png", cost_samples=1)
    assert json.loads(out.read_text())["samples"] == 10
    assert (tmp_path / "plot.png").stat().st_size > 0
    kept = {(row["name"], row["budget"]): row["kept_tokens"] for row in results["variants"]}
    assert kept[("full", "all")] == 256
    assert [kept[("random", b)] for b in ("1/3", "2/9", "1/9")] == [85, 57, 28]
    assert [kept[("crop-ilp-budget", b)] for b in ("1/3", "2/9", "1/9")] == [85, 57, 28]
    assert [kept[("pool", b)] for b in ("1/3", "2/9", "1/9")] == [81, 56, 25]
    for name in ("fastv", "pyramiddrop", "visionzip"):
        assert [kept[(name, b)] for b in ("1/3", "2/9", "1/9")] == [85, 57, 28]
    assert kept[("oracle-ilp", "region")] == 16 * 0.7 + 256 * 0.3  # 4x4-patch object cells; wide = whole image
    for name in ("crop-plc-learned-budget", "crop-plc-learned-no-anchors"):
        assert [kept[(name, b)] for b in ("1/3", "2/9", "1/9")] == [85, 57, 28]
    # learned PLC with the oracle region: an object cell (16 cells) gives 8 region queries + 4 anchors + 30
    # outside queries; the whole image (wide questions) 128 region queries + 4 anchors
    oracle = [r for r in results["variants"] if r["name"] == "crop-plc-learned" and r["region"] == "oracle"]
    assert oracle[0]["kept_tokens"] == pytest.approx(0.7 * (8 + 4 + 30) + 0.3 * (128 + 4))
    assert results["learned_plc"]["n_anchor"] == 4
    assert "| full | full | all | 256.0 |" in markdown_table(results)

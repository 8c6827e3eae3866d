"""The accuracy-versus-budget evaluation: runs end to end on an untrained synthetic model; metric helpers."""

from __future__ import annotations

import json

import pytest

from crop.region import Region, grid_iou
from crop.strategies.learned_plc import LearnedPLC, LearnedPLCConfig
from crop.strategies.registry import table_methods
from crop.synth.analysis import document_errors, matched_budget, paired_bootstrap
from crop.synth.evaluate import BUDGET_METHODS, evaluate, markdown_table, table_differences, wilson
from crop.synth.model import build_synth_model, build_synth_processor
from crop.synth.scene import make_sample


def test_wilson_interval():
    low, high = wilson(85, 100)
    assert low == pytest.approx(0.767, abs=1e-3) and high == pytest.approx(0.907, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


def test_matched_budget_bisects_to_the_closest_average():
    measured = []

    def measure(budget: int) -> float:
        measured.append(budget)
        return 64 + 0.75 * budget  # an in-LLM method at K = 2 of 8 layers over 256 tokens

    every = range(1, 257)
    assert matched_budget(measure, 85.0, every) == (28, 85.0)
    assert len(measured) == len(set(measured)) <= 10
    assert matched_budget(lambda b: 64 + 0.75 * b, 30.0, every) == (1, 64.75)  # below what the method can reach
    assert matched_budget(lambda b: int(b**0.5) ** 2, 128.0, every)[1] == 121  # pooling: 121 < 128 < 144
    assert matched_budget(lambda b: 64 + 0.75 * b, 100.0, [28, 43, 57, 85]) == (43, 96.25)  # tabulated budgets


def test_paired_bootstrap_interval():
    first = [1] * 60 + [0] * 40
    same = paired_bootstrap(first, first)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0}
    better = paired_bootstrap(first, [1] * 40 + [0] * 60)
    assert better["difference"] == pytest.approx(0.2) and 0.1 < better["low"] < 0.2 < better["high"] < 0.3
    assert paired_bootstrap(first, first[::-1], seed=1)["low"] < 0 < paired_bootstrap(first, first[::-1])["high"]
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_bootstrap([1, 0], [1])


def test_document_errors_say_where_wrong_answers_come_from():
    samples = [s for s in (make_sample("test", i, "documents") for i in range(40)) if s.kind == "document"]
    first = samples[0]
    row, column = first.document.asked_cell(first.question)
    assert first.document.digits[row][column] == first.answer
    in_row, in_column = set(first.document.digits[row]), {line[column] for line in first.document.digits}
    only_row = sorted(in_row - in_column - {first.answer})
    only_column = sorted(in_column - in_row - {first.answer})
    nowhere = sorted(set("0123456789") - in_row - in_column)
    cases = [(first.answer, "right"), *((d, "row_only") for d in only_row[:1]),
             *((d, "column_only") for d in only_column[:1]), *((d, "elsewhere") for d in nowhere[:1])]  # fmt: skip
    for answer, outcome in cases:
        report = document_errors([first, make_sample("test", 0, "documents")], [answer, "red"])
        assert report["questions"] == 1 and report[outcome] == 1  # the detail question (index 0) is left out
        assert sum(report[k] for k in ("right", "row_only", "column_only", "row_and_column", "elsewhere")) == 1
    assert len(cases) >= 3
    wrong = [str(d) for d in range(10) if str(d) != first.answer]
    chance = document_errors([first], [first.answer])["chance_in_row_or_column"]
    assert chance == pytest.approx(sum(d in in_row | in_column for d in wrong) / 9)
    report = document_errors(samples, [s.answer for s in samples])
    assert report["right"] == report["questions"] == len(samples) > 0
    with pytest.raises(ValueError, match="not a question about this table"):
        first.document.asked_cell("what is in row Z column Q ?")


def test_grid_iou():
    a = Region.from_grid([0, 0, 1, 1])
    assert grid_iou(a, a) == 1.0
    assert grid_iou(a, Region.from_grid([2, 2, 3, 3])) == 0.0
    assert grid_iou(a, Region.from_grid([0, 0, 3, 1])) == pytest.approx(0.5)


@pytest.mark.slow
def test_evaluation_runs_and_counts_tokens(tmp_path):
    model_dir = tmp_path / "model"
    build_synth_model(attn_implementation="sdpa", text_layers=4).save_pretrained(model_dir)
    build_synth_processor().save_pretrained(model_dir)
    LearnedPLC(LearnedPLCConfig(hidden_size=192, rows=16, cols=16)).save_pretrained(model_dir)
    out = tmp_path / "eval.json"
    plot = tmp_path / "plot.png"
    results = evaluate(model_dir, count=10, batch_size=10, out=out, plot=plot, cost_samples=1, probe_samples=2)
    assert json.loads(out.read_text())["samples"] == 10
    assert (tmp_path / "plot.png").stat().st_size > 0
    kept = {(r["name"], r["budget"]): r["kept_tokens"] for r in results["variants"] if r["table"] == "final"}
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
    table = markdown_table(results)
    assert "| full | full | all | 256.0 |" in table and "### Equal average tokens" in table
    differences = {(d["budget"], d["name"]): d for d in table_differences(results)}
    assert len(differences) == 3 * len({*BUDGET_METHODS, *table_methods()})
    random_row = differences[("1/9", "random")]  # before the LLM: matched by keeping more tokens
    assert (random_row["final_kept"], random_row["matched_kept"]) == (28, 142)
    assert random_row["difference"] == pytest.approx(random_row["matched_accuracy"] - random_row["final_accuracy"])
    assert "| 1/9 | random | 28 / 28.0 |" in table
    # the equal-average table: every budget method, its average over layers at crop-ilp-budget's
    matched = [r for r in results["variants"] if r["table"] == "matched"]
    assert {r["name"] for r in matched} == {*BUDGET_METHODS, *table_methods()}
    targets = {r["budget"]: r["average_tokens_over_layers"] for r in results["variants"]
               if (r["table"], r["name"], r["region"]) == ("final", "crop-ilp-budget", "predicted")}  # fmt: skip
    assert targets["1/3"] == pytest.approx((2 * 256 + 2 * 85) / 4)  # K = 2 of 4 layers
    for row in matched:
        if row["name"] in ("random", "crop-k0-budget", "fastv"):
            assert row["average_tokens_over_layers"] == pytest.approx(targets[row["budget"]], abs=1)
    assert {r["budget"]: r["tokens"] for r in matched if r["name"] == "random"} == {"1/3": 170, "2/9": 156, "1/9": 142}
    pairs = {(p["table"], p["budget"], p["crop"], p["baseline"]) for p in results["paired"]}
    assert ("matched", "1/9", "crop-k0-budget", "pool") in pairs and len(pairs) == 2 * 3 * 2 * len(table_methods())
    attention = results["answer_region_attention"]
    assert attention["layer"] == 1 and 0 <= attention["all"]["mass_on_region"] <= 1
    assert attention["all"]["questions"] == 7  # the 3 wide questions of 10 ask about the whole image

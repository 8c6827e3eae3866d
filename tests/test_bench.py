"""The benchmark is never run by the suite for its numbers; this smoke test runs it on the tiniest shape once
and checks what must hold whatever the timings: every method's KV cache equals the analytic byte count."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import on_grid
from transformers import LogitsProcessorList

from crop.bench import SHAPES, StepClock, kv_cache_bytes, prefill_flops
from crop.cli import main
from crop.errors import ConfigError
from crop.strategies.sparsevlm import scaled_count


def test_bench_smoke_and_kv_cache_bytes(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--shape", "tiny", "--budgets", "32", "--repeats", "1", "--warmup", "0", "--new-tokens", "2",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    methods = {row["method"] for row in report["rows"]}
    expected = {"full", "crop-ilp", "crop-attn-2pass", "crop-fused", "fastv", "pyramiddrop", "sparsevlm", "ideal-k2"}
    assert expected | {"visionzip", "random", "pool", "ideal"} <= methods
    assert all(row["kv_cache_matches_analytic"] for row in report["rows"])
    for row in report["rows"]:
        staircase = row["method"].startswith("ideal") and len(set(row["tokens_per_layer"])) > 1
        has_decode = not staircase  # an ideal pruning inside the LLM measures prefill only
        assert (row["decode_tokens_per_s"] is not None and row["decode_tokens_per_s"] > 0) == has_decode, row
        localized = row["method"] == "crop-attn-2pass"
        assert (row["localize_s"] is not None and 0 < row["localize_s"] < row["prefill_s"]["median"]) == localized, row
    assert "| full | all | 64 |" in capsys.readouterr().out
    assert out.with_suffix(".png").is_file()


def test_analytic_counts():
    shape = SHAPES["tiny"]
    head_dim = shape.hidden // shape.heads
    assert kv_cache_bytes(shape, [10, 10, 4, 4], torch.float32) == 2 * 28 * shape.kv_heads * head_dim * 4
    one_layer = prefill_flops(shape, [10])
    expected = 2 * 10 * 64 * (2 * 64 + 2 * 32) + 4 * 100 * 64 + 6 * 10 * 64 * 128
    assert one_layer == expected


@pytest.mark.parametrize("shape_name", ["tiny", "tiny-qwen", "tiny-next"])
def test_depth_profile_ideal_computes_what_ilp_computes(shape_name):
    """The K=2 ideal (plain calls, no hooks) fills the KV cache exactly as CROP-ILP at K=2 keeping the same tokens,
    on every benchmarked family (Qwen: at the kept tokens' original 3-D positions)."""
    import crop
    from crop.bench import bench_inputs, build_bench_model
    from crop.bench.ideal import profile_prefill
    from crop.region import Region

    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    model = build_bench_model(shape)
    inputs = bench_inputs(shape)
    visual = shape.grid_tokens
    pruned = crop.apply(model, None, ilp=2)
    try:
        # LLaVA-NeXT: the base grid comes first, and the top of the image is its first rows in both grids
        region = Region(0.0, 0.0, 1.0, 0.5) if shape.family != "llava_next" else Region.full()
        output, stats = pruned(**inputs, **on_grid([region]), use_cache=True)
    finally:
        pruned.remove()
    kept = stats.rows[0].kept_tokens
    assert kept == (visual if shape.family == "llava_next" else visual // 2)
    ideal_cache = profile_prefill(model, inputs, [visual] * 2 + [kept] * (shape.llm_layers - 2))()["cache"]
    for ideal_layer, pruned_layer in zip(ideal_cache.layers, output.cache.layers, strict=True):
        torch.testing.assert_close(ideal_layer.keys, pruned_layer.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(ideal_layer.values, pruned_layer.values, atol=1e-5, rtol=0)


def test_staircase_ideal_equals_running_each_stage_on_its_tokens():
    """A several-stage profile: each run of layers sees the first tokens of the run before it, so the cache of a
    staircase ideal's first stages equals that of a shorter staircase, and its last layer holds the fewest tokens."""
    from crop.bench import bench_inputs, build_bench_model
    from crop.bench.ideal import profile_prefill

    shape = SHAPES["tiny-qwen"]
    torch.manual_seed(0)
    model, inputs = build_bench_model(shape), bench_inputs(shape)
    text = inputs["input_ids"].shape[1] - shape.grid_tokens
    staircase = profile_prefill(model, inputs, [64, 40, 40, 10])()["cache"]
    two_step = profile_prefill(model, inputs, [64, 40, 40, 40])()["cache"]
    assert [layer.keys.shape[2] - text for layer in staircase.layers] == [64, 40, 40, 10]
    for index in range(3):
        torch.testing.assert_close(staircase.layers[index].keys, two_step.layers[index].keys, atol=1e-6, rtol=0)


def test_step_clock_reads_decode_speed_from_one_generate_call():
    from crop.testing.llava import build_model

    model = build_model()
    clock = StepClock("cpu")
    ids = torch.tensor([[1, 5, 6, 7]])
    model.generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                   logits_processor=LogitsProcessorList([clock]))  # fmt: skip
    assert len(clock.times) == 5
    assert clock.tokens_per_second() == pytest.approx(4 / (clock.times[-1] - clock.times[0]))
    with pytest.raises(ValueError, match="two generated tokens"):
        StepClock("cpu").tokens_per_second()


def test_llm_depth_can_be_set_within_the_real_depth(tmp_path):
    from crop.bench import bench_shape, run

    assert bench_shape("llava-1.5-7b", 32).llm_layers == 32
    assert bench_shape("llava-1.5-7b").llm_layers == 8
    for bad in (2, 33):
        with pytest.raises(ConfigError, match=f"--llm-layers {bad} is outside 3..32"):
            bench_shape("llava-1.5-7b", bad)
    report = run("tiny", (32,), repeats=1, warmup=0, new_tokens=2, out=None, methods=["crop-ilp"], llm_layers=3,
                 progress=lambda _: None)  # fmt: skip
    assert report["shape"]["llm_layers"] == 3
    assert report["note"] == "LLM layers reduced from 4 to 3 to fit memory"
    assert all(row["kv_cache_matches_analytic"] for row in report["rows"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_unusable_device_is_refused_before_building():
    from crop.bench import check_device

    with pytest.raises(ConfigError, match="CUDA is not available"):
        check_device("cuda")
    with pytest.raises(ConfigError, match="use cpu or cuda"):
        check_device("mps")


def test_noisy_rows_are_flagged_and_a_smoke_run_prints_no_ratio():
    from crop.bench import table

    def row(method: str, times: list[float]) -> dict:
        median = sorted(times)[len(times) // 2]
        return {"method": method, "budget": "64", "kept_tokens": 64, "average_tokens_over_layers": 64.0,
                "prefill_s": {"median": median, "min": min(times), "max": max(times)},
                "prefill_spread": (max(times) - min(times)) / median, "noisy": (max(times) - min(times)) / median > 0.2,
                "prefill_ratio_to_full": 0.5, "prefill_ratio_to_ideal": 1.01, "prefill_ratio_to_ideal_k2": None,
                "flops_ratio_to_full": 0.48, "localize_s": None, "decode_tokens_per_s": 3.0, "peak_memory_mb": 10.0,
                "kv_cache_mb": 1.0}  # fmt: skip

    report = {"rows": [row("steady", [1.0, 1.05, 1.1]), row("noisy", [1.0, 1.3, 1.2])], "smoke": False}
    text = table(report)
    assert "| steady | 64 |" in text and "| noisy * | 64 |" in text and "| 0.50 | 1.01 |" in text
    assert "spread by more than 20% of its median" in text
    smoke = table({**report, "smoke": True})
    assert smoke.startswith("Smoke test (`crop bench --quick`)")
    assert "0.50" not in smoke and "1.01" not in smoke and "*" not in smoke.split("\n", 2)[2]
    assert "| 0.48 |" in smoke  # FLOPs are counted, not timed


@pytest.mark.parametrize("shape_name", ["tiny", "tiny-qwen", "tiny-next"])
def test_every_benchmarked_call_keeps_what_crop_apply_keeps(shape_name):
    """The benchmark measures what users run: per method, the tokens each layer sees in the benchmarked call equal
    those of the same method through `crop.apply` on the same inputs (regions given as the benchmark gives them)."""
    import crop
    from crop.bench.cases import cases
    from crop.bench.families import QUESTION, bench_inputs, build_bench_model
    from crop.bench.runner import _measure
    from crop.region import Region

    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    model, inputs = build_bench_model(shape), bench_inputs(shape)
    region = Region.from_grid([2, 2, 5, 5])
    checked = set()
    budgets = [scaled_count(192, shape.grid_tokens), scaled_count(64, shape.grid_tokens)]  # the authors' SparseVLM's
    refused = {
        "qwen2_5_vl": {"visionzip", "cdpruner", "holov", "pyramiddrop-authors", "sparsevlm-authors"},
        "llava_next": {"cdpruner", "holov"},
    }.get(shape.family, set())
    for case in cases(shape, budgets, region):
        if case.name in refused:  # no CLS token, 3-D positions, ported for one grid (refusals are tested elsewhere)
            continue
        if case.method is None or case.localizer is not None:  # ideals and localized rows: no method of their own
            continue
        measured = _measure(model, inputs, case, shape, 1, "cpu")
        method = case.method()
        pruned = crop.apply(model, None, method=method)
        try:
            given = [case.region or Region.full()] if method.needs_region else None
            _, stats = pruned(**inputs, regions=given, viewports=[crop.Viewport()], questions=[QUESTION])
        finally:
            pruned.remove()
        per_layer = stats.rows[0].per_layer
        assert measured["kept_tokens"] == per_layer[-1], case.name
        assert measured["average_tokens"] == sum(per_layer) / len(per_layer), case.name
        checked.add(case.name)
    expected = {"crop-ilp", "crop-fused", "fastv", "pyramiddrop", "sparsevlm", "dart", "divprune", "random", "pool",
                "visionzip", "cdpruner", "holov", "pyramiddrop-authors", "sparsevlm-authors"}  # fmt: skip
    assert expected - refused <= checked


def test_scaling_run_reports_every_size_with_selection_time(tmp_path):
    """`crop bench --scaling` on the tiny Qwen shape: one table row per method and size, the selection time of every
    method against the ideal at its own depth profile, the refused VisionZip named with its reason, and the plot."""
    out = tmp_path / "scaling.json"
    argv = ["bench", "--shape", "tiny-qwen", "--scaling", "--keep", "1/4", "--repeats", "1", "--warmup", "0",
            "--new-tokens", "2", "--decode-methods", "full", "crop-ilp", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    scaling = json.loads(out.read_text())
    assert [run["visual_tokens"] for run in scaling["runs"]] == [16, 64]
    for run, budget in zip(scaling["runs"], ["4", "16"], strict=True):
        assert "no CLS token" in run["skipped"]["visionzip"]
        rows = {(row["method"], row["profile_of"]): row for row in run["rows"]}
        assert all(row["budget"] in ("all", budget) for row in run["rows"])
        for row in run["rows"]:  # only the rows asked for decode
            assert (row["decode_tokens_per_s"] is not None) == (row["method"] in ("full", "crop-ilp")), row["method"]
        staircase = rows[("ideal-profile", "pyramiddrop")]
        assert staircase["tokens_per_layer"] == rows[("pyramiddrop", None)]["tokens_per_layer"]
        for (method, _), row in rows.items():
            if method.startswith("ideal") or method == "full":
                assert row["selection_s"] is None
                continue
            ideal = next(r for r in run["rows"] if r["tokens_per_layer"] == row["tokens_per_layer"]
                         and (r["method"].startswith("ideal") or r["method"] == "full"))  # fmt: skip
            assert row["selection_s"] == pytest.approx(row["prefill_s"]["median"] - ideal["prefill_s"]["median"])
    table = out.with_suffix(".md").read_text()
    assert "| 16 | divprune | 4 |" in table and "| 64 | divprune | 16 |" in table
    assert out.with_suffix(".png").is_file()


def test_a_resumed_scaling_run_measures_only_the_missing_sizes(tmp_path, capsys):
    """`--resume` keeps the sizes already in --out and measures the rest; other settings are refused, naming them."""
    out = tmp_path / "scaling.json"
    argv = ["bench", "--shape", "tiny-qwen", "--keep", "1/4", "--repeats", "1", "--warmup", "0", "--new-tokens", "2",
            "--methods", "crop-ilp", "--decode-methods", "full", "--out", str(out), "--resume"]  # fmt: skip
    assert main([*argv, "--visual-tokens", "16", "36"]) == 0
    first = json.loads(out.read_text())["runs"]
    capsys.readouterr()
    assert main([*argv, "--visual-tokens", "16", "64", "36"]) == 0
    assert "resuming" in capsys.readouterr().out
    runs = json.loads(out.read_text())["runs"]
    assert [run["visual_tokens"] for run in runs] == [16, 36, 64]
    assert runs[:2] == first
    assert main([*argv[:6], "2", *argv[7:], "--visual-tokens", "16", "100"]) != 0
    assert re.search(r"cannot resume .*measured with repeats 1, this run asks for .*repeats 2", capsys.readouterr().err)


def test_bench_sizes_are_checked_and_the_cli_lists_every_shape():
    from crop.bench import SHAPES, bench_shape
    from crop.cli import BENCH_SHAPES

    assert list(SHAPES) == BENCH_SHAPES
    assert bench_shape("qwen2.5-vl-7b", visual_tokens=4096).image == (1792, 1792)
    assert bench_shape("llava-next-7b", visual_tokens=1752).grid_tokens == 1752
    with pytest.raises(ConfigError, match="1000 visual tokens is not a square number"):
        bench_shape("qwen2.5-vl-7b", visual_tokens=1000)
    with pytest.raises(ConfigError, match=r"benchmarks \[1176, 1752, 2928\] visual tokens .* not 2880"):
        bench_shape("llava-next-7b", visual_tokens=2880)
    with pytest.raises(ConfigError, match="fixed grid of 576 visual tokens, not 1024"):
        bench_shape("llava-1.5-7b", visual_tokens=1024)


def test_bad_bench_flags_are_refused_with_what_is_accepted(capsys):
    for argv, message in (
        (["--keep", "2"], "expected a share strictly between 0 and 1, got 2"),
        (["--keep", "a/b"], "expected a share like 1/9 or 0.25"),
    ):
        with pytest.raises(SystemExit):
            main(["bench", "--shape", "tiny", *argv])
        assert message in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"--decode-methods names rows this run does not have: \['fulll'\]"):
        from crop.bench import run

        run("tiny", (32,), repeats=1, warmup=0, new_tokens=2, out=None, methods=["fastv"], decode_methods=["fulll"],
            progress=lambda _: None)  # fmt: skip

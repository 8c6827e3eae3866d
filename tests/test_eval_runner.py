"""`crop eval` and `crop report` end to end on fixture benchmarks with a tiny model: records, resume, sharding."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from benchdata import SUPPORTED, write_benchmark

from crop.cli import main
from crop.errors import ConfigError
from crop.evaluation.runner import RunConfig, run
from crop.evaluation.tasks import get_task
from crop.loading import load_model
from crop.testing.llava import save_tiny

FAST = {"max_new_tokens": 2, "batch_size": 2}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(checkpoint)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def eval_args(checkpoint: Path, data: Path, out: Path, *options: str) -> list[str]:
    return [
        "eval", "--model", str(checkpoint), "--bench", "textvqa", "--data", str(data), "--out", str(out),
        "--method", "fastv", "--budget", "8", "--max-new-tokens", "2", "--batch-size", "1", *options,
    ]  # fmt: skip


@pytest.mark.parametrize(("bench", "form"), SUPPORTED)
def test_every_benchmark_runs_end_to_end(tmp_path, loaded, checkpoint, bench, form):
    expected = write_benchmark(bench, tmp_path / "data", form, count=2)
    config = RunConfig(
        model=str(checkpoint), bench=bench, data=str(tmp_path / "data"), method="fastv", budget=8, **FAST
    )
    summary = run(config, tmp_path / "run", *loaded)
    records = read_jsonl(tmp_path / "run" / "predictions.jsonl")
    assert [r["id"] for r in records] == [e["id"] for e in expected]
    assert [r["answers"] for r in records] == [e["answers"] for e in expected]
    task = get_task(bench)
    samples = {s.id: s for s in task.samples(tmp_path / "data")}
    assert [r["score"] for r in records] == [task.score(r["prediction"], samples[r["id"]]) for r in records]
    assert summary["metrics"] == json.loads(json.dumps(task.aggregate(records)))
    assert summary["complete"] and summary["answered"] == 2
    assert all(r["visual_tokens"] == 8 for r in records)
    assert (tmp_path / "run" / "summary.md").read_text().count(f"| {bench} | fastv | 8 |") == 1


def test_learned_plc_runs_and_is_named(tmp_path, loaded, checkpoint):
    from crop.strategies.learned_plc import LearnedPLC, LearnedPLCConfig

    model, _ = loaded
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    compressor = tmp_path / "compressor"
    LearnedPLC(LearnedPLCConfig(model.config.text_config.hidden_size, side, side)).save_pretrained(compressor)
    write_benchmark("textvqa", tmp_path / "data", "official", count=2)
    config = RunConfig(model=str(checkpoint), bench="textvqa", data=str(tmp_path / "data"), method="crop", layer=-1,
                       budget=10, learned_plc=str(compressor), **FAST)  # fmt: skip
    summary = run(config, tmp_path / "run", *loaded)
    assert config.label == "crop+learned-plc@10" and summary["complete"]
    assert all(r["visual_tokens"] == 10 for r in read_jsonl(tmp_path / "run" / "predictions.jsonl"))


def test_region_methods_record_the_localized_region(tmp_path, loaded, checkpoint):
    write_benchmark("pope", tmp_path / "data", "official", count=2)
    config = RunConfig(model=str(checkpoint), bench="pope", data=str(tmp_path / "data"), method="crop", **FAST)
    summary = run(config, tmp_path / "run", *loaded)
    records = read_jsonl(tmp_path / "run" / "predictions.jsonl")
    assert all(len(r["region"]) == 4 for r in records)
    assert set(summary["metrics"]) >= {"score", "accuracy", "precision", "recall", "f1", "yes_ratio"}


def test_a_partial_run_resumes_to_the_uninterrupted_result(tmp_path, loaded, checkpoint):
    write_benchmark("textvqa", tmp_path / "data", "official", count=5)
    config = RunConfig(model=str(checkpoint), bench="textvqa", data=str(tmp_path / "data"), method="fastv", budget=8)
    whole = run(config, tmp_path / "whole", *loaded)

    partial = RunConfig(**{**config.__dict__, "limit": 2})
    assert run(partial, tmp_path / "resumed", *loaded)["answered"] == 2
    with open(tmp_path / "resumed" / "shard-0.jsonl", "a") as shard:
        shard.write('{"index": 2, "id": "cut sho')  # a crash in the middle of a line
    assert run(config, tmp_path / "resumed", *loaded) == whole
    assert read_jsonl(tmp_path / "resumed" / "predictions.jsonl") == read_jsonl(
        tmp_path / "whole" / "predictions.jsonl"
    )


@pytest.mark.slow
def test_a_killed_run_restarts_where_it_stopped(tmp_path, checkpoint):
    write_benchmark("textvqa", tmp_path / "data", "official", count=20)
    assert main(eval_args(checkpoint, tmp_path / "data", tmp_path / "whole")) == 0
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "crop.cli", *eval_args(checkpoint, tmp_path / "data", killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    shard = killed / "shard-0.jsonl"
    deadline = time.monotonic() + 120
    while not (shard.is_file() and shard.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written = shard.read_text().count("\n")
    assert 2 <= written < 20, "the run should have been killed part-way"
    assert not (killed / "summary.json").exists()
    assert main(eval_args(checkpoint, tmp_path / "data", killed)) == 0
    assert (killed / "summary.json").read_text() == (tmp_path / "whole" / "summary.json").read_text()
    assert (killed / "predictions.jsonl").read_text() == (tmp_path / "whole" / "predictions.jsonl").read_text()


def test_a_run_folder_refuses_other_settings(tmp_path, loaded, checkpoint):
    write_benchmark("gqa", tmp_path / "data", "official", count=1)
    config = RunConfig(model=str(checkpoint), bench="gqa", data=str(tmp_path / "data"), method="fastv", budget=8)
    run(config, tmp_path / "run", *loaded)
    other = RunConfig(**{**config.__dict__, "budget": 4})
    with pytest.raises(ConfigError, match="budget differ"):
        run(other, tmp_path / "run", *loaded)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun is not installed beside this Python")  # fmt: skip
def test_two_processes_give_the_single_process_results(tmp_path, checkpoint):
    write_benchmark("textvqa", tmp_path / "data", "official", count=5)
    assert main(eval_args(checkpoint, tmp_path / "data", tmp_path / "one")) == 0
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "-m", "crop.cli"]
    result = subprocess.run(
        [*command, *eval_args(checkpoint, tmp_path / "data", tmp_path / "two")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    shards = sorted(p.name for p in (tmp_path / "two").glob("shard-*.jsonl"))
    assert shards == ["shard-0.jsonl", "shard-1.jsonl"]
    assert [len(read_jsonl(tmp_path / "two" / name)) for name in shards] == [3, 2]
    assert (tmp_path / "two" / "predictions.jsonl").read_text() == (tmp_path / "one" / "predictions.jsonl").read_text()
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two")]
    assert summaries[0] == summaries[1]


def test_report_compares_runs(tmp_path, loaded, checkpoint, capsys):
    write_benchmark("textvqa", tmp_path / "data", "official", count=2)
    runs = []
    for method, budget in (("full", None), ("fastv", 8), ("fastv", 16)):
        config = RunConfig(model=str(checkpoint), bench="textvqa", data=str(tmp_path / "data"), method=method,
                           budget=budget, **FAST)  # fmt: skip
        run(config, tmp_path / f"{method}-{budget}", *loaded)
        runs.append(str(tmp_path / f"{method}-{budget}"))
    out = tmp_path / "report.md"
    assert main(["report", *runs, "--out", str(out)]) == 0
    table = out.read_text().splitlines()
    assert [line.split("|")[2:4] for line in table[2:]] == [[" full ", " - "], [" fastv ", " 16 "], [" fastv ", " 8 "]]
    assert out.with_suffix(".png").stat().st_size > 0
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no summary.json" in capsys.readouterr().err


def test_bad_settings_are_clear_errors(tmp_path, checkpoint, capsys):
    write_benchmark("textvqa", tmp_path / "data", "official", count=1)
    assert main(eval_args(checkpoint, tmp_path / "data", tmp_path / "r", "--bench", "nonsense")) == 2
    assert "unknown task 'nonsense'" in capsys.readouterr().err
    assert main(eval_args(checkpoint, tmp_path / "missing", tmp_path / "r2")) == 2
    assert "not found" in capsys.readouterr().err
    assert (
        main(eval_args(checkpoint, tmp_path / "data", tmp_path / "r3", "--method", "crop", "--localizer", "none")) == 2
    )
    assert "needs a region" in capsys.readouterr().err

"""`crop synth compare`: two eval runs scored on the questions they share, with paired intervals."""

from __future__ import annotations

import json

import pytest

from crop.cli import main
from crop.synth.control import compare_evaluations, markdown_comparison


def run(model: str, samples: int, rows: dict[tuple[str, str], list[int]], mass: float, task: str = "documents"):
    variants = [
        {"table": table, "name": name, "region": None, "budget": "1/9", "kept_tokens": 28.0,
         "average_tokens_over_layers": 70.0, "outcomes": outcomes}
        for (table, name), outcomes in rows.items()
    ]  # fmt: skip
    return {"model": model, "task": task, "samples": samples, "variants": variants,
            "answer_region_attention": {"all": {"mass_on_region": mass}}}  # fmt: skip


def test_rows_are_scored_on_the_shared_questions_second_minus_first():
    first = run("a", 6, {("final", "fastv"): [1, 1, 0, 0, 1, 1], ("final", "pool"): [0] * 6}, 0.2)
    second = run("b", 4, {("final", "fastv"): [1, 1, 1, 1], ("matched", "pool"): [1] * 4}, 0.6)
    comparison = compare_evaluations(first, second)
    assert comparison["samples"] == 4
    assert comparison["attention_mass"] == [0.2, 0.6]
    [row] = comparison["rows"]  # pool is in different tables in the two runs: not compared
    assert (row["table"], row["name"]) == ("final", "fastv")
    assert row["accuracy"] == [0.5, 1.0]  # the first run's last two questions are not counted
    assert row["difference"] == pytest.approx(0.5)
    assert row["low"] <= 0.5 <= row["high"]
    table = markdown_comparison(comparison)
    assert "| final | 1/9 | fastv | - | 28.0 / 28.0 | 70.0 / 70.0 | 50.0 / 100.0 | +50.0 (" in table
    assert "20.0% and 60.0%" in table


def test_runs_on_different_tasks_are_refused():
    with pytest.raises(ValueError, match="different tasks: 'documents' and 'shapes'"):
        compare_evaluations(run("a", 1, {}, 0.1), run("b", 1, {}, 0.1, task="shapes"))


def test_cli_writes_the_comparison_and_names_a_bad_file(tmp_path, capsys):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(run("a", 2, {("final", "fastv"): [0, 1]}, 0.3)))
    second.write_text(json.dumps(run("b", 2, {("final", "fastv"): [1, 1]}, 0.3)))
    assert main(["synth", "compare", str(first), str(second), "--out", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["rows"][0]["accuracy"] == [0.5, 1.0]
    assert "+50.0" in (tmp_path / "c.md").read_text()
    (tmp_path / "bad.json").write_text("[]")
    assert main(["synth", "compare", str(first), str(tmp_path / "bad.json")]) == 2
    assert "is not a `crop synth eval` results JSON" in capsys.readouterr().err

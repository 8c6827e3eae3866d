"""The standard table's benchmarks: MME's and SEED-Bench's scoring on hand-checked cases, and `crop eval --suite
standard` / `crop report --standard` on fixture copies, checked against the per-benchmark summaries."""

from __future__ import annotations

import json

import pytest
from benchdata import write_benchmark

from crop.cli import main
from crop.evaluation.report import standard_table
from crop.evaluation.tasks import get_task
from crop.evaluation.tasks.base import EvalSample
from crop.evaluation.tasks.mme import mme_answer
from crop.testing.llava import save_tiny


@pytest.mark.parametrize(
    ("answer", "read"),
    [("Yes", "yes"), ("no.", "no"), ("Y", "yes"), ("n", "no"), ("x", "other"), ("Yes, there is", "yes"),
     ("No, it is not", "no"), ("nope", "no"), ("I think yes", "other"), ("", "other"), ("Not sure", "no")],
)  # fmt: skip
def test_mme_reads_answers_as_yes_no_or_other(answer, read):
    assert mme_answer(answer) == read


def record(category: str, image: str, score: float) -> dict:
    return {"score": score, "extra": {"category": category, "image_id": f"{category}/{image}"}}


def test_mme_pair_rule_by_hand():
    """existence: image a both right (100 + 100), image b one right (50 + 0): (200 + 50) / 2 = 125;
    count: both wrong: 0; code_reasoning: both right: 200. Perception 125, cognition 200."""
    records = [
        record("existence", "a", 1), record("existence", "a", 1), record("existence", "b", 1),
        record("existence", "b", 0), record("count", "c", 0), record("count", "c", 0),
        record("code_reasoning", "d", 1), record("code_reasoning", "d", 1),
    ]  # fmt: skip
    summary = get_task("mme").aggregate(records)
    assert summary["subtasks"] == {"existence": 125.0, "count": 0.0, "code_reasoning": 200.0}
    assert summary["perception"] == summary["score"] == 125.0
    assert summary["cognition"] == 200.0
    assert get_task("mme").shown(summary["score"]) == "125.0"


def test_mme_prompt_drops_the_yes_or_no_request():
    sample = EvalSample("x", None, "Is it red? Please answer yes or no.", ["Yes"], {})
    assert get_task("mme").prompt(sample) == "Is it red?\nAnswer the question using a single word or phrase."
    assert get_task("mme").score("yes, it is", sample) == 1.0
    assert get_task("mme").score("No", sample) == 0.0


@pytest.mark.parametrize(("prediction", "score"), [("B", 1), (" b ", 1), ("B. a dog", 1), ("(B)", 0), ("A", 0)])
def test_seedbench_takes_the_first_character(prediction, score):
    sample = EvalSample("1", None, "q", ["B"], {"choices": list("wxyz"), "dimension": "1"})
    assert get_task("seedbench").score(prediction, sample) == score


def test_seedbench_by_dimension():
    records = [{"score": s, "extra": {"dimension": d}} for s, d in [(1, "a"), (0, "a"), (1, "b")]]
    summary = get_task("seedbench").aggregate(records)
    assert summary["dimensions"] == {"a": 0.5, "b": 1.0}
    assert summary["score"] == pytest.approx(2 / 3)


def summary(bench: str, method: str, score: float, model: str = "m", budget: int | None = None) -> dict:
    label = method if method == "full" else f"{method}@{budget}"
    config = {"model": model, "bench": bench, "method": method, "budget": budget}
    return {"config": config, "label": label, "metrics": {"score": score}, "complete": True}


def test_standard_table_by_hand():
    summaries = [
        summary("mme", "full", 1500.0), summary("mme", "fastv", 1200.0, budget=64),
        summary("scienceqa", "full", 0.70), summary("scienceqa", "fastv", 0.63, budget=64),
        summary("textvqa", "fastv", 0.40, budget=64),
    ]  # fmt: skip
    table = standard_table(summaries).splitlines()
    assert table[0] == "| model | method | mme | scienceqa | textvqa | mean retention |"
    assert table[2] == "| m | full | 1500.0 (100.0%) | 70.00 (100.0%) | - | 100.0% |"
    assert table[3] == "| m | fastv@64 | 1200.0 (80.0%) | 63.00 (90.0%) | 40.00 | 85.0% |"
    assert "scienceqa: answerable largely without the image" in table[-1]


@pytest.mark.slow
def test_suite_and_report_on_fixtures(tmp_path, capsys):
    model = save_tiny(tmp_path / "model")
    for bench in ("mme", "seedbench", "gqa", "mmbench", "mmmu"):
        write_benchmark(bench, tmp_path / "data" / bench, "official", count=4)
    runs = tmp_path / "runs"
    base = ["eval", "--suite", "standard", "--data", str(tmp_path / "data"), "--model", str(model), "--out", str(runs),
            "--max-new-tokens", "2", "--batch-size", "2"]  # fmt: skip
    assert main([*base, "--method", "full"]) == 0
    assert main([*base, "--method", "pool", "--budget", "9"]) == 0
    out = capsys.readouterr().out
    assert "standard suite: gqa, mmbench, mme, seedbench, mmmu" in out
    folders = sorted(runs.iterdir())
    assert [f.name for f in folders] == ["gqa-full", "gqa-pool-9", "mmbench-full", "mmbench-pool-9", "mme-full",
                                         "mme-pool-9", "mmmu-full", "mmmu-pool-9", "seedbench-full",
                                         "seedbench-pool-9"]  # fmt: skip
    assert main(["report", "--standard", *map(str, folders), "--out", str(tmp_path / "report.md")]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| model")]
    rows = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| model ")]
    assert table and rows
    scores = {f.name: json.loads((f / "summary.json").read_text())["metrics"]["score"] for f in folders}
    pool_row = next(line for line in (tmp_path / "report.md").read_text().splitlines() if "| pool@9 |" in line)
    cells = [cell.strip() for cell in pool_row.strip("|").split("|")]
    assert cells[2] == f"{100 * scores['gqa-pool-9']:.2f}" + retention(scores["gqa-pool-9"], scores["gqa-full"])
    assert cells[3] == f"{100 * scores['mmbench-pool-9']:.2f}" + retention(
        scores["mmbench-pool-9"], scores["mmbench-full"]
    )
    assert cells[4] == f"{scores['mme-pool-9']:.1f}" + retention(scores["mme-pool-9"], scores["mme-full"])
    assert cells[5] == f"{100 * scores['seedbench-pool-9']:.2f}" + retention(
        scores["seedbench-pool-9"], scores["seedbench-full"]
    )
    assert cells[6] == f"{100 * scores['mmmu-pool-9']:.2f}" + retention(scores["mmmu-pool-9"], scores["mmmu-full"])
    assert "mmmu: answerable largely without the image" in (tmp_path / "report.md").read_text()


def retention(score: float, full: float) -> str:
    return f" ({100 * score / full:.1f}%)" if full else ""


@pytest.mark.parametrize(
    ("answer", "letter"),
    [("B", "B"), ("The answer is B", "B"), ("A cat", "A"), ("(C)", "C"), ("B.", "B"), ("C: a dog", "C"),
     ("it is a dog", "B"), ("I think the correct answer is (C) because", "C"), ("A man is riding a horse", "A"),
     ("nothing here", None), ("cat or dog", None), ("Option D) is right", "D")],
)  # fmt: skip
def test_mmbench_reads_the_letter_an_answer_gives(answer, letter):
    """Hand-checked against the rules: a lone letter, else the one option named, else the ranked extraction
    ("A man is riding a horse": A is taken as an article, no option is named, the leading A wins)."""
    from crop.evaluation.tasks.mmbench import answer_letter

    assert answer_letter(answer, {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}) == letter


def test_mmbench_circular_rule_and_rotations():
    from crop.evaluation.tasks.mmbench import circular

    sample = EvalSample("5", None, "Which?", ["B"], {"choices": {"A": "x", "B": "y", "C": "z"}, "hint": "",
                                                      "category": "c", "question": 5})  # fmt: skip
    rotated = list(circular([sample]))
    assert [s.id for s in rotated] == ["5", "1000005", "2000005"]
    assert [s.extra["choices"] for s in rotated][1:] == [{"A": "y", "B": "z", "C": "x"}, {"A": "z", "B": "x", "C": "y"}]
    assert [s.answers[0] for s in rotated] == ["B", "A", "C"]  # "y" wherever it moved
    task = get_task("mmbench")
    assert task.prompt(rotated[1]) == (
        "Which? There are several options:\nA. y\nB. z\nC. x\nAnswer with the option's letter from the given "
        "choices directly."
    )
    records = [{"score": s, "extra": {"question": q, "category": c}}
               for s, q, c in [(1, 1, "a"), (1, 1, "a"), (1, 2, "a"), (0, 2, "a"), (1, 3, "b")]]  # fmt: skip
    summary = task.aggregate(records)
    assert summary["score"] == pytest.approx(2 / 3) and summary["questions"] == 3
    assert summary["categories"] == {"a": 0.5, "b": 1.0}


OPTIONS = ["red", "green", "blue"]


@pytest.mark.parametrize(
    ("answer", "letter"),
    [("(B) green", "B"), ("B", "B"), ("A. red", "A"), ("The answer is green because the leaves are green", "B"),
     ("I think A or C", "C"), ("(A) or maybe (C)", "C")],
)  # fmt: skip
def test_mmmu_reads_the_option_a_choice_answer_gives(answer, letter):
    from crop.evaluation.tasks.mmmu import choice_letter

    assert choice_letter(answer, OPTIONS, "validation_Art_1") == letter


def test_mmmu_picks_a_seeded_option_when_none_is_named():
    from crop.evaluation.tasks.mmmu import choice_letter

    picks = {choice_letter("Blue.", OPTIONS, "validation_Art_1") for _ in range(5)}
    assert len(picks) == 1 and picks <= {"A", "B", "C"}


@pytest.mark.parametrize(
    ("answer", "reference", "right"),
    [("The ratio is 3.5.", "3.5", True), ("The ratio is 3.5.", "3.50", True), ("The ratio is 3.5.", "4", False),
     ("Paris", "paris", True), ("so the answer is 1,200 dollars", "1200", True), ("x = 12", "12", True),
     ("It is twelve", "12", False)],
)  # fmt: skip
def test_mmmu_open_answers(answer, reference, right):
    from crop.evaluation.tasks.mmmu import open_candidates, open_correct

    assert open_correct(reference, open_candidates(answer)) is right


def test_mmmu_summary_by_subject_and_discipline():
    records = [{"score": s, "extra": {"subject": subject}} for s, subject in [(1, "Art"), (0, "Art"), (1, "Math")]]
    summary = get_task("mmmu").aggregate(records)
    assert summary["subjects"] == {"Art": 0.5, "Math": 1.0}
    assert summary["disciplines"] == {"Art and Design": 0.5, "Science": 1.0}
    assert summary["score"] == pytest.approx(2 / 3)


def test_mmmu_leaves_out_questions_with_several_images(tmp_path, caplog):
    expected = write_benchmark("mmmu", tmp_path, "parquet", count=3)
    samples = list(get_task("mmmu").samples(tmp_path))
    assert [s.id for s in samples] == [e["id"] for e in expected]
    assert "1 of 4 questions have several images" in caplog.text

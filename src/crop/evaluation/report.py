"""`crop report`: runs side by side (a Markdown table) and accuracy versus visual tokens (a plot)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crop.errors import ConfigError


def load_summaries(run_dirs: list[str | Path]) -> list[dict[str, Any]]:
    """The `summary.json` of each run folder, or a `ConfigError` naming the folders that have none."""
    missing = [str(d) for d in run_dirs if not (Path(d) / "summary.json").is_file()]
    if missing:
        raise ConfigError(f"no summary.json in {', '.join(missing)}: expected folders written by `crop eval --out`")
    summaries = []
    for folder in run_dirs:
        path = Path(folder) / "summary.json"
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}; expected the summary `crop eval` writes") from exc
        if not isinstance(summary, dict) or not {"config", "metrics", "answered", "samples"} <= set(summary):
            raise ConfigError(f"{path} is not a summary written by `crop eval` (config, metrics, answered, samples)")
        summaries.append(summary)
    return summaries


def markdown_table(summaries: list[dict[str, Any]]) -> str:
    """One row per run: benchmark, method and budget, headline score, visual tokens, samples answered."""
    lines = [
        "| benchmark | method | budget | score | metric | visual tokens kept | average over layers | answered |",
        "|---|---|---|---|---|---|---|---|",
    ]
    from crop.evaluation.tasks import get_task

    for s in sorted(summaries, key=_order):
        config = s["config"]
        budget = "-" if config["method"] == "full" else config["budget"] or "region"
        answered = f"{s['answered']}/{s['samples']}" + ("" if s["complete"] else " (incomplete)")
        score = get_task(config["bench"]).shown(s["metrics"]["score"])
        lines.append(
            f"| {config['bench']} | {config['method']} | {budget} | {score} | {s['metric']} "
            f"| {s['visual_tokens']:.1f} | {s['average_visual_tokens']:.1f} | {answered} |"
        )
    return "\n".join(lines)


def plot(summaries: list[dict[str, Any]], path: str | Path) -> None:
    """Score versus mean visual tokens kept, one line per (benchmark, method); the full run as a dashed level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = sorted({s["config"]["bench"] for s in summaries})
    figure, axes = plt.subplots(1, len(benches), figsize=(5 * len(benches), 4), squeeze=False)
    for axis, bench in zip(axes[0], benches, strict=True):
        runs = [s for s in summaries if s["config"]["bench"] == bench]
        for method in sorted({s["config"]["method"] for s in runs}):
            points = sorted(
                (s["visual_tokens"], 100 * s["metrics"]["score"]) for s in runs if s["config"]["method"] == method
            )
            if method == "full":
                axis.axhline(points[0][1], linestyle="--", color="grey", label="full")
            else:
                axis.plot(*zip(*points, strict=True), marker="o", label=method)
        axis.set(title=bench, xlabel="visual tokens kept", ylabel=f"score ({runs[0]['metric']})")
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _order(summary: dict[str, Any]) -> tuple:
    config = summary["config"]
    return (config["bench"], config["method"] != "full", config["method"], -(config["budget"] or 10**9))


STANDARD = ("gqa", "mmbench", "mme", "pope", "scienceqa", "vqav2", "textvqa", "seedbench", "mmmu")
"""The pruning literature's standard table, in its usual column order."""
IMAGE_LIGHT = ("scienceqa", "mmmu")
"""Benchmarks answerable largely without the image."""


def standard_table(summaries: list[dict[str, Any]]) -> str:
    """The standard table: one row per (model, method and budget), one column per benchmark of `STANDARD` that
    some run covers: the score and its retention (score / the `full` run's on the same model and benchmark), and
    the mean retention over the row's benchmarks that have a `full` run."""
    from crop.evaluation.tasks import get_task

    benches = [bench for bench in STANDARD if any(s["config"]["bench"] == bench for s in summaries)]
    if not benches:
        raise ConfigError(f"no run of a standard-table benchmark ({', '.join(STANDARD)}) among the runs given")
    full = {(s["config"]["model"], s["config"]["bench"]): s["metrics"]["score"] for s in summaries
            if s["config"]["method"] == "full"}  # fmt: skip
    rows: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for s in sorted(summaries, key=_order):
        rows.setdefault((s["config"]["model"], s["label"]), {})[s["config"]["bench"]] = s
    lines = [
        "| model | method | " + " | ".join(benches) + " | mean retention |",
        "|---|---|" + "---|" * (len(benches) + 1),
    ]
    for (model, label), runs in rows.items():
        cells, retentions = [], []
        for bench in benches:
            run = runs.get(bench)
            if run is None:
                cells.append("-")
                continue
            score, reference = run["metrics"]["score"], full.get((model, bench))
            shown = get_task(bench).shown(score) + ("" if run["complete"] else " (incomplete)")
            if reference:
                retentions.append(score / reference)
                shown += f" ({100 * score / reference:.1f}%)"
            cells.append(shown)
        mean_retention = f"{100 * sum(retentions) / len(retentions):.1f}%" if retentions else "-"
        lines.append(f"| {Path(model).name} | {label} | " + " | ".join(cells) + f" | {mean_retention} |")
    light = [bench for bench in benches if bench in IMAGE_LIGHT]
    if light:
        lines.append("")
        lines.append(
            f"{', '.join(light)}: answerable largely without the image (LLaVA-1.5 given no visual tokens at all is "
            "reported to keep about 91-92% of its score there), so their retention says little about pruning."
        )
    return "\n".join(lines)

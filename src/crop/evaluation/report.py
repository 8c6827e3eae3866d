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
    for s in sorted(summaries, key=_order):
        config = s["config"]
        budget = "-" if config["method"] == "full" else config["budget"] or "region"
        answered = f"{s['answered']}/{s['samples']}" + ("" if s["complete"] else " (incomplete)")
        lines.append(
            f"| {config['bench']} | {config['method']} | {budget} | {100 * s['metrics']['score']:.2f} | {s['metric']} "
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

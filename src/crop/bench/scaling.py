"""How cost grows with the image: the benchmark at several visual-token counts of one shape (one model, built once),
each budget a fixed share of the image's tokens (no region-sized rows), as a table per size and a plot of cost
against visual tokens."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from crop.bench.families import build_bench_model
from crop.bench.runner import run
from crop.bench.shapes import bench_shape
from crop.errors import ConfigError

SELECTION_LIMIT = 0.05
"""A method's selection time (its prefill over the ideal at its depth profile) should stay under this share of its
prefill at every size; rows above it are named in the table."""


def run_scaling(
    shape_name: str,
    counts: Sequence[int],
    keep: Sequence[Fraction],
    progress: Callable[[str], None] = print,
    out: Path | None = None,
    resume: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """The benchmark of `shape_name` at each visual-token count in `counts`, with budgets `keep` of each count;
    `options` as for `run` (repeats, warmup, new_tokens, device, dtype, methods, llm_layers, threads, smoke,
    decode_methods). With `out`, the sizes measured so far are written there after each one; with `resume` too,
    the sizes already in `out` (measured with the same settings) are kept and not measured again."""
    import torch

    dtype = getattr(torch, options.get("dtype", "float32"))
    largest = bench_shape(shape_name, options.get("llm_layers"), max(counts))
    runs = _measured(out, shape_name, keep, largest.llm_layers, options) if resume and out is not None else []
    done = {report["visual_tokens"] for report in runs}
    if done:
        progress(f"resuming {out}: {sorted(done)} visual tokens already measured")
    scaling = {"shape": shape_name, "keep": [str(share) for share in keep], "runs": runs}
    todo = [count for count in counts if count not in done]
    model = build_bench_model(largest, dtype, options.get("device", "cpu")) if todo else None
    for count in todo:
        budgets = tuple(max(1, round(count * share)) for share in keep)
        progress(f"{count} visual tokens, budgets {budgets}")
        report = run(shape_name, budgets, out=None, progress=progress, visual_tokens=count, model=model,
                     region_rows=False, **options)  # fmt: skip
        report["visual_tokens"] = count
        runs.append(report)
        runs.sort(key=lambda measured: measured["visual_tokens"])
        if out is not None:
            out.write_text(json.dumps(scaling, indent=2))
    return scaling


RESUMED_SETTINGS = ("device", "dtype", "repeats", "new_tokens", "smoke")
"""Report fields that must equal the new run's for a resumed scaling run to add its sizes to the old ones."""


def _measured(
    out: Path, shape_name: str, keep: Sequence[Fraction], llm_layers: int, options: dict[str, Any]
) -> list[dict[str, Any]]:
    """The sizes an earlier scaling run wrote to `out`, after checking that it ran with the same settings; none if
    `out` does not exist yet."""
    if not out.exists():
        return []
    earlier = json.loads(out.read_text())
    wanted = {"device": options.get("device", "cpu"), "dtype": options.get("dtype", "float32"),
              "repeats": options.get("repeats", 5), "new_tokens": options.get("new_tokens", 32),
              "smoke": options.get("smoke", False)}  # fmt: skip
    differences = []
    if earlier.get("shape") != shape_name or earlier.get("keep") != [str(share) for share in keep]:
        differences.append(f"shape/keep {earlier.get('shape')} {earlier.get('keep')}")
    for report in earlier.get("runs", []):
        if report["shape"]["llm_layers"] != llm_layers:
            differences.append(f"llm_layers {report['shape']['llm_layers']}")
        differences += [f"{key} {report[key]}" for key in RESUMED_SETTINGS if report[key] != wanted[key]]
    if differences:
        raise ConfigError(
            f"cannot resume {out}: it was measured with {', '.join(sorted(set(differences)))}, this run asks for "
            f"shape {shape_name}, keep {[str(share) for share in keep]}, llm_layers {llm_layers}, "
            f"{', '.join(f'{key} {value}' for key, value in wanted.items())}; drop --resume or use another --out"
        )
    return earlier["runs"]


def scaling_table(scaling: dict[str, Any]) -> str:
    """One Markdown table: per size and method (ideals left out), the prefill, its ratio to full, the selection
    time and its share of the prefill, peak memory, KV cache and decode speed."""
    smoke = scaling["runs"][0].get("smoke", False)
    lines = [
        "| visual tokens | method | budget | prefill s (min-max) | x full | selection ms (share) | peak MB | KV MB | "
        "decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    over = []
    for report in scaling["runs"]:
        for row in report["rows"]:
            if row["method"].startswith("ideal"):
                continue
            prefill, share = row["prefill_s"], row.get("selection_share")
            selection = "-" if smoke or share is None else f"{1000 * row['selection_s']:.0f} ({share:.1%})"
            ratio = "-" if smoke else f"{row['prefill_ratio_to_full']:.2f}"
            decode = "-" if row["decode_tokens_per_s"] is None else f"{row['decode_tokens_per_s']:.2f}"
            lines.append(
                f"| {report['visual_tokens']} | {row['method']}{' *' if row['noisy'] and not smoke else ''} | "
                f"{row['budget']} | {prefill['median']:.2f} ({prefill['min']:.2f}-{prefill['max']:.2f}) | {ratio} | "
                f"{selection} | {row['peak_memory_mb']:.0f} | {row['kv_cache_mb']:.1f} | {decode} |"
            )
            if not smoke and share is not None and share > SELECTION_LIMIT:
                over.append(f"{row['method']} at {report['visual_tokens']} tokens ({share:.1%})")
    if not smoke:
        lines.append(f"\nSelection over {SELECTION_LIMIT:.0%} of the prefill: {', '.join(over) or 'none'}.")
    return "\n".join(lines)


def plot_scaling(scaling: dict[str, Any], path: Path) -> None:
    """Prefill, selection share and peak memory against the image's visual tokens, one line per method and
    budget share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    series: dict[tuple[str, int], list[tuple[int, dict]]] = {}
    for report in scaling["runs"]:
        budgets = sorted({row["budget"] for row in report["rows"] if row["budget"].isdigit()}, key=int)
        for row in report["rows"]:
            if row["method"].startswith("ideal") and row["method"] != "ideal" or row["budget"] == "region":
                continue
            share = budgets.index(row["budget"]) if row["budget"] in budgets else -1
            series.setdefault((row["method"], share), []).append((report["visual_tokens"], row))
    for (method, share), points in sorted(series.items()):
        label = method if share < 0 else f"{method} @{scaling['keep'][share]}"
        counts = [count for count, _ in points]
        axes[0].plot(counts, [row["prefill_s"]["median"] for _, row in points], marker="o", label=label)
        if points[0][1].get("selection_share") is not None:
            axes[1].plot(counts, [100 * row["selection_share"] for _, row in points], marker="o", label=label)
        axes[2].plot(counts, [row["peak_memory_mb"] for _, row in points], marker="o", label=label)
    axes[0].set(xscale="log", yscale="log", xlabel="visual tokens of the image", ylabel="prefill (s, median)",
                title="Prefill")  # fmt: skip
    axes[1].axhline(100 * SELECTION_LIMIT, color="grey", linestyle="--", linewidth=1)
    axes[1].set(xscale="log", xlabel="visual tokens of the image", ylabel="% of the method's prefill",
                title="Selection time (prefill over its ideal)")  # fmt: skip
    axes[2].set(xscale="log", xlabel="visual tokens of the image", ylabel="peak memory growth (MB)", title="Memory")
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    first = scaling["runs"][0]
    figure.suptitle(f"{scaling['shape']} ({first['note']}), {first['device']}, {first['dtype']}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)

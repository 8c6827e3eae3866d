"""The benchmark's report: medians and ratios of the measured cases with the machine they ran on, and the report
as a Markdown table and a plot."""

from __future__ import annotations

import platform
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from crop.bench.cases import Case
from crop.bench.shapes import Shape

NOISY = 0.20
"""A row whose prefill range (max - min) exceeds this share of its median is flagged as noisy."""


def build_report(
    shape: Shape, all_cases: list[Case], device: str, dtype: str, repeats: int, new_tokens: int, smoke: bool = False
) -> dict[str, Any]:
    """Per case, the median prefill (with min and max, its spread flagged above `NOISY`) and its ratios to full
    tokens and to the ideals (the one at the method's own depth profile gives its selection time: the prefill over
    that ideal's, and its share of the prefill), the FLOPs ratios, decode speed, peak memory and KV cache; with the
    shape and the machine. `smoke`: a quick run that checks the benchmark works, whose timings support no ratio."""
    full = next(c for c in all_cases if c.name == "full")
    full_prefill = statistics.median(full.results["prefill_s"])
    full_flops = full.results["flops_prefill"][0]
    vision = full.results["flops_vision"][0]
    ideal = {c.budget: statistics.median(c.results["prefill_s"]) for c in all_cases if c.name == "ideal"}
    profile = {c.budget: statistics.median(c.results["prefill_s"]) for c in all_cases if c.name == "ideal-k2"}
    own = {c.profile: statistics.median(c.results["prefill_s"]) for c in all_cases if c.is_ideal or c.name == "full"}
    rows = []
    for case in all_cases:
        measured, analytic = case.results["kv_cache_bytes"][0], case.results["kv_cache_bytes_analytic"][0]
        prefill = case.results["prefill_s"]
        median = statistics.median(prefill)
        selection = None if case.is_ideal or case.name == "full" else median - own[case.profile]
        rows.append({
            "method": case.name,
            "budget": case.budget,
            "profile_of": case.profile_of,
            "tokens_per_layer": list(case.profile or ()),
            "kept_tokens": case.results["kept_tokens"][0],
            "average_tokens_over_layers": case.results["average_tokens"][0],
            "prefill_s": {"median": median, "min": min(prefill), "max": max(prefill)},
            "prefill_spread": (max(prefill) - min(prefill)) / median,
            "noisy": (max(prefill) - min(prefill)) / median > NOISY,
            "prefill_ratio_to_full": median / full_prefill,
            "prefill_ratio_to_ideal": median / ideal[case.budget] if case.budget in ideal else None,
            "prefill_ratio_to_ideal_k2": median / profile[case.budget] if case.budget in profile else None,
            "prefill_ratio_to_profile_ideal": None if selection is None else median / own[case.profile],
            "selection_s": selection,
            "selection_share": None if selection is None else selection / median,
            "flops_ratio_to_full": (case.results["flops_prefill"][0] + vision) / (full_flops + vision),
            "llm_flops_ratio_to_full": case.results["flops_prefill"][0] / full_flops,
            "localize_s": _median_or_none(case.results["localize_s"]),
            "decode_tokens_per_s": _median_or_none(case.results["decode_tokens_per_s"]),
            "peak_memory_mb": statistics.median(case.results["peak_memory_bytes"]) / 2**20,
            "kv_cache_mb": measured / 2**20,
            "kv_cache_matches_analytic": measured == analytic,
        })  # fmt: skip
    return {
        "shape": asdict(shape),
        "note": _depth_note(shape),
        "device": device,
        "dtype": dtype,
        "repeats": repeats,
        "new_tokens": new_tokens,
        "smoke": smoke,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": _cpu_name(),
                    "threads": torch.get_num_threads()},
        "rows": rows,
    }  # fmt: skip


def _depth_note(shape: Shape) -> str:
    """What the benchmarked depths are, against the real model's."""
    note = (
        f"LLM layers reduced from {shape.real_llm_layers} to {shape.llm_layers} to fit memory"
        if shape.llm_layers < shape.real_llm_layers else "real layer count"
    )  # fmt: skip
    if shape.real_vision_layers and shape.vision_layers < shape.real_vision_layers:
        note += f"; vision layers reduced from {shape.real_vision_layers} to {shape.vision_layers}"
    return note


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else statistics.median(values)


def _milliseconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(report: dict[str, Any]) -> str:
    """The report as a Markdown table; rows whose repeats spread more than `NOISY` of their median are marked `*`.
    A smoke run's table prints no timing ratio (its timings support none)."""
    smoke = report.get("smoke", False)
    lines = [
        "| method | budget | kept | avg over layers | prefill ms (min-max) | of which localize ms | x full | x ideal | "
        "x ideal K=2 | x own ideal | selection ms (share) | FLOPs x full | decode tok/s | peak MB | KV MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        prefill = row["prefill_s"]
        ratios = [row["prefill_ratio_to_full"], row["prefill_ratio_to_ideal"], row.get("prefill_ratio_to_ideal_k2"),
                  row.get("prefill_ratio_to_profile_ideal")]  # fmt: skip
        full, ideal, profile, own = ("-" if smoke or r is None else f"{r:.2f}" for r in ratios)
        selection = row.get("selection_s")
        selected = "-" if smoke or selection is None else f"{1000 * selection:.1f} ({row['selection_share']:.1%})"
        mark = " *" if row.get("noisy") and not smoke else ""
        name = f"ideal ({row['profile_of']} profile)" if row.get("profile_of") else row["method"]
        lines.append(
            f"| {name}{mark} | {row['budget']} | {row['kept_tokens']} | "
            f"{row['average_tokens_over_layers']:.1f} | "
            f"{1000 * prefill['median']:.1f} ({1000 * prefill['min']:.1f}-{1000 * prefill['max']:.1f}) | "
            f"{_milliseconds(row.get('localize_s'))} | {full} | {ideal} | {profile} | {own} | {selected} | "
            f"{row['flops_ratio_to_full']:.2f} | {_number(row['decode_tokens_per_s'])} | {row['peak_memory_mb']:.0f} | "
            f"{row['kv_cache_mb']:.2f} |"
        )
    if smoke:
        lines.insert(0, "Smoke test (`crop bench --quick`): it checks that every case runs and counts its tokens, "
                        "KV cache and FLOPs; its few short repeats support no timing ratio, so none is printed.\n")
    elif any(row.get("noisy") for row in report["rows"]):
        lines.append(f"\n\\* the repeats of this row spread by more than {NOISY:.0%} of its median: read its "
                     "ratios with care.")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Prefill time and peak memory versus kept visual tokens, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = sorted({row["method"] for row in report["rows"]})
    for method in methods:
        rows = sorted((r for r in report["rows"] if r["method"] == method), key=lambda r: r["kept_tokens"])
        kept = [r["kept_tokens"] for r in rows]
        left.plot(kept, [1000 * r["prefill_s"]["median"] for r in rows], marker="o", label=method)
        right.plot(kept, [r["peak_memory_mb"] for r in rows], marker="o", label=method)
    left.set(xlabel="visual tokens kept", ylabel="prefill (ms, median)", title="Time to first token")
    right.set(xlabel="visual tokens kept", ylabel="peak memory growth (MB)", title="Peak memory")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    left.legend(fontsize=7)
    figure.suptitle(f"{report['shape']['name']} ({report['note']}), {report['device']}, {report['dtype']}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)

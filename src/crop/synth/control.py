"""Two `crop synth eval` runs side by side on the questions they share: what a change to the model (a control
run, e.g. grounding moved to the layer a method reads) does to each method's score, with paired intervals."""

from __future__ import annotations

from typing import Any

from crop.synth.analysis import paired_bootstrap


def compare_evaluations(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Each row present in both runs (same table, method, region and budget label), scored on the first
    `min(samples)` test questions of each (the test split is the same sequence in every run): accuracy in both,
    and `second` minus `first` with a paired bootstrap 95% interval, beside both runs' layer-K-1 attention mass."""
    if first.get("task") != second.get("task"):
        raise ValueError(f"the two runs are on different tasks: {first.get('task')!r} and {second.get('task')!r}")
    count = min(first["samples"], second["samples"])
    others = {_key(row): row for row in second["variants"]}
    rows = []
    for row in first["variants"]:
        other = others.get(_key(row))
        if other is None:
            continue
        a, b = row["outcomes"][:count], other["outcomes"][:count]
        interval = paired_bootstrap(b, a)
        rows.append({
            "table": row.get("table", "final"), "name": row["name"], "region": row["region"], "budget": row["budget"],
            "tokens": [row["kept_tokens"], other["kept_tokens"]],
            "average_tokens_over_layers": [row["average_tokens_over_layers"], other["average_tokens_over_layers"]],
            "accuracy": [sum(a) / count, sum(b) / count], **interval,
        })  # fmt: skip
    mass = [run.get("answer_region_attention", {}).get("all", {}).get("mass_on_region") for run in (first, second)]
    return {"models": [first["model"], second["model"]], "samples": count, "attention_mass": mass, "rows": rows}


def markdown_comparison(comparison: dict[str, Any]) -> str:
    """The comparison as a markdown table, one row per method and budget (points of accuracy)."""
    first, second = comparison["models"]
    mass = " and ".join("-" if m is None else f"{100 * m:.1f}%" for m in comparison["attention_mass"])
    lines = [
        f"### `{second}` minus `{first}` on the first {comparison['samples']} test questions",
        "",
        f"Layer K-1's last-token attention mass on the answer region: {mass}.",
        "",
        "| table | budget | method | region | tokens kept | avg over layers | accuracy | difference (95% interval) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in comparison["rows"]:
        kept = " / ".join(f"{t:.1f}" for t in row["tokens"])
        average = " / ".join(f"{t:.1f}" for t in row["average_tokens_over_layers"])
        accuracy = " / ".join(f"{100 * a:.1f}" for a in row["accuracy"])
        interval = f"{100 * row['difference']:+.1f} ({100 * row['low']:+.1f} to {100 * row['high']:+.1f})"
        lines.append(f"| {row['table']} | {row['budget']} | {row['name']} | {row['region'] or '-'} | {kept} | "
                     f"{average} | {accuracy} | {interval} |")  # fmt: skip
    return "\n".join(lines)


def _key(row: dict[str, Any]) -> tuple:
    return row.get("table", "final"), row["name"], row["region"], row["budget"]

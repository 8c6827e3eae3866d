"""Accuracy versus visual-token budget on the synthetic test split, per method and per kind of question."""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import crop
from crop.errors import ConfigError
from crop.loading import load_model
from crop.localize import AttentionLocalizer, GridVLMLocalizer
from crop.localize.attention import DEFAULT_PENALTY, DEFAULT_ROWS, ROWS, region_from_relevance
from crop.region import Region, grid_iou
from crop.strategies.base import Method
from crop.strategies.crop_fused import FusedCROP
from crop.strategies.crop_method import CROP
from crop.strategies.ilp import ILP
from crop.strategies.learned_plc import CONFIG_NAME, LearnedPLC
from crop.strategies.plc import PLC
from crop.strategies.registry import build_method, table_methods
from crop.synth.analysis import (
    answer_region_attention,
    average_tokens,
    document_errors,
    matched_budget,
    paired_bootstrap,
)
from crop.synth.assets import model_task
from crop.synth.model import LOCATE_INSTRUCTION
from crop.synth.scene import PATCH, Sample, kinds_of, make_sample

BUDGET_FRACTIONS = {"1/3": 1 / 3, "2/9": 2 / 9, "1/9": 1 / 9}
"""LLaVA-1.5's 192 / 128 / 64 of 576, as fractions of any grid."""


TABLES = {
    "final": "equal final budget: every method keeps the same number of visual tokens after its last reduction",
    "matched": "equal average tokens over LLM layers (equal LLM FLOPs): each method's budget chosen so that its "
    "average equals crop-ilp-budget's at that label",
}


@dataclass
class Variant:
    """One row of a table: a method, where its region comes from, the budget label it was asked for, which
    table it belongs to (`TABLES`), and the number of tokens asked (budget rows)."""

    name: str
    method: Callable[[], Method]
    region: str | None
    budget: str
    table: str = "final"
    tokens: int | None = None


def variants(
    grid_tokens: int,
    layer: int = 2,
    penalty: float = DEFAULT_PENALTY,
    attention_rows: str = DEFAULT_ROWS,
    compressor: LearnedPLC | None = None,
) -> list[Variant]:
    """Full tokens, CROP's forms with predicted and oracle regions, and the baselines at the three budgets; with
    a trained `compressor`, learned PLC region-sized, with ILP, and capped at each budget with and without its
    anchors (the same weights run with `n_anchor = 0`)."""
    rows = [
        Variant("full", lambda: build_method("full"), "full", "all"),
        Variant("crop-ilp", lambda: CROP(ILP(layer)), "predicted", "region"),
        Variant("crop-plc", lambda: CROP(None, PLC(ratio=4)), "predicted", "region"),
        Variant("crop-ilp+plc", lambda: CROP(ILP(layer), PLC(ratio=4)), "predicted", "region"),
        Variant("crop-ilp-k0", lambda: CROP(ILP(0)), "predicted", "region"),
        Variant("oracle-ilp", lambda: CROP(ILP(layer)), "oracle", "region"),
        Variant("crop-ilp", lambda: CROP(ILP(layer)), "attention", "region"),
        Variant("crop-fused", lambda: FusedCROP(layer, penalty, rows=attention_rows), None, "region"),
    ]
    if compressor is not None:
        rows += [
            Variant("crop-plc-learned", lambda: CROP(None, compressor), "predicted", "region"),
            Variant("crop-plc-learned", lambda: CROP(None, compressor), "oracle", "region"),
            Variant("crop-ilp+plc-learned", lambda: CROP(ILP(layer), compressor), "predicted", "region"),
        ]
    smallest = round(grid_tokens * min(BUDGET_FRACTIONS.values()))
    rows += [
        Variant("oracle-ilp-budget", lambda: CROP(ILP(layer), budget=smallest), "oracle", "1/9"),
        Variant("crop-ilp-budget", lambda: CROP(ILP(layer), budget=smallest), "attention", "1/9"),
    ]
    for label, fraction in BUDGET_FRACTIONS.items():
        n = round(grid_tokens * fraction)
        rows += [
            budget_variant(name, n, label, layer=layer, penalty=penalty, attention_rows=attention_rows)
            for name in BUDGET_METHODS + tuple(table_methods())
        ]
        if compressor is not None:
            rows += [
                Variant("crop-plc-learned-budget", lambda n=n: CROP(None, compressor, n), "predicted", label),
                Variant("crop-plc-learned-no-anchors", lambda n=n: CROP(None, without_anchors(compressor), n),
                        "predicted", label),
            ]  # fmt: skip
    return rows


BUDGET_METHODS = ("crop-ilp-budget", "crop-k0-budget", "crop-fused-budget")
"""CROP's forms with a budget, run at each budget beside the registry's table methods: ILP at K with the trained
localizer's region, the same before the LLM (K = 0), and fused (its region from layer K-1's attention)."""


def budget_variant(name: str, n: int, label: str, table: str = "final", **settings: Any) -> Variant:
    """The row of method `name` (a `BUDGET_METHODS` form or a registry name) keeping `n` visual tokens;
    `settings`: `layer` (K), and the fused form's `penalty` and `attention_rows`."""
    layer = settings.get("layer", 2)
    if name == "crop-ilp-budget":
        return Variant(name, lambda: CROP(ILP(layer), budget=n), "predicted", label, table, n)
    if name == "crop-k0-budget":
        return Variant(name, lambda: CROP(ILP(0), budget=n), "predicted", label, table, n)
    if name == "crop-fused-budget":
        penalty, rows = settings.get("penalty", DEFAULT_PENALTY), settings.get("attention_rows", DEFAULT_ROWS)
        return Variant(name, lambda: FusedCROP(layer, penalty, n, rows), None, label, table, n)
    return Variant(name, lambda: build_method(name, budget=n, layer=layer), None, label, table, n)


def matched_variants(
    model: Any, processor: Any, probe: list[Sample], targets: dict[str, float], grid_tokens: int, **settings: Any
) -> list[Variant]:
    """For each budget label, every budget method at the budget (of those it accepts) whose average tokens over
    layers (measured on the `probe` questions) is closest to `targets[label]`."""
    layers = len(model.model.language_model.layers)
    rows = []
    for label, target in targets.items():
        for name in BUDGET_METHODS + tuple(table_methods()):

            def measure(n: int, name: str = name, label: str = label) -> float:
                method = budget_variant(name, n, label, **settings).method()
                return average_tokens(model, processor, method, probe)

            accepted = [n for n in range(1, grid_tokens + 1) if _accepts(budget_variant(name, n, label).method(),
                                                                         layers, grid_tokens)]  # fmt: skip
            n, _ = matched_budget(measure, target, accepted)
            rows.append(budget_variant(name, n, label, "matched", **settings))
    return rows


def _accepts(method: Method, layers: int, grid_tokens: int) -> bool:
    """Whether `method` takes its budget on this model (SparseVLM with the authors' counts takes four)."""
    try:
        method.validate(layers, grid_tokens)
    except ConfigError:
        return False
    return True


def without_anchors(compressor: LearnedPLC) -> LearnedPLC:
    """The same trained compressor run with no anchor tokens (the anchors ablation, at inference only)."""
    ablated = LearnedPLC(replace(compressor.config, n_anchor=0))
    ablated.load_state_dict(compressor.state_dict())
    return ablated


def tune_attention_localizer(
    model_dir: str | Path,
    count: int = 300,
    penalties: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98),
    threads: int = 2,
) -> dict[str, Any]:
    """Localization quality of `AttentionLocalizer` per layer and penalty on the *validation* split (the test
    split stays unseen): mean IoU with the ground-truth grid box, answer-region recall, region area."""
    torch.set_num_threads(threads)
    model, processor = load_model(model_dir)
    task = model_task(model_dir)
    samples = [make_sample("val", i, task) for i in range(count)]
    side = model.config.vision_config.image_size // PATCH
    rows = []
    settings = [(rows, layer) for rows in ROWS for layer in range(len(model.model.language_model.layers) - 1)]
    for rows_kind, layer in settings:
        localizer = AttentionLocalizer(model, processor, layer=layer, rows=rows_kind)
        relevance = [localizer.relevance(s.image, s.question) for s in tqdm(samples, desc=f"{rows_kind} {layer}")]
        for penalty in penalties:
            regions = [region_from_relevance(r, viewport, penalty) for r, viewport in relevance]
            row: dict[str, Any] = {"rows": rows_kind, "layer": layer, "penalty": penalty}
            for kind in (*kinds_of(task), "all"):
                chosen = [(s, g) for s, g in zip(samples, regions, strict=True) if kind in (s.kind, "all")]
                row[kind] = {
                    "mean_iou": statistics.mean(grid_iou(s.region, g) for s, g in chosen),
                    "answer_region_recall": statistics.mean(object_recall(s, g, side) for s, g in chosen),
                    "mean_region_area": statistics.mean(g.area for _, g in chosen),
                }
            rows.append(row)
    best = max(rows, key=lambda r: r["all"]["mean_iou"])
    chosen = {key: best[key] for key in ("rows", "layer", "penalty")}
    return {"split": "val", "samples": count, "criterion": "mean IoU, all kinds", "grid": rows, "best": chosen}


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if total == 0:
        return 0.0, 0.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def object_recall(sample: Sample, predicted: Region, side: int) -> float:
    """Share of the ground-truth region's token cells that lie inside the predicted region."""
    truth = sample.region.token_mask(side, side)
    return float((truth & predicted.token_mask(side, side)).sum() / truth.sum())


def evaluate(
    model_dir: str | Path,
    count: int = 1000,
    batch_size: int = 50,
    out: Path = Path("results") / "synth_eval.json",
    plot: Path | None = Path("results") / "synth_budget.png",
    threads: int = 2,
    cost_samples: int = 20,
    probe_samples: int = 10,
    layer: int = 2,
    attention_penalty: float = DEFAULT_PENALTY,
    attention_rows: str = DEFAULT_ROWS,
) -> dict[str, Any]:
    """Run every variant on the first `count` test samples; write the JSON (and plot) and return the results.

    `layer` is ILP's K for every CROP variant; the attention localizer reads layer K-1 (two-pass and fused) with
    `attention_penalty` and `attention_rows` (choose them on the validation split: `tune_attention_localizer`).
    The equal-average table's budgets are matched on the first `probe_samples` questions."""
    torch.set_num_threads(threads)
    model, processor = load_model(model_dir)
    compressor = LearnedPLC.from_pretrained(model_dir) if (Path(model_dir) / CONFIG_NAME).is_file() else None
    task = model_task(model_dir)
    kinds = kinds_of(task)
    samples = [make_sample("test", i, task) for i in range(count)]
    layout_side = model.config.vision_config.image_size // PATCH
    grid_tokens = layout_side * layout_side
    localizer = GridVLMLocalizer(model, processor, instruction=LOCATE_INSTRUCTION, max_new_tokens=8)
    start = time.perf_counter()
    predicted = [localizer.localize(s.image, s.question) for s in tqdm(samples, desc="localize")]
    localize_seconds = (time.perf_counter() - start) / count
    attention = AttentionLocalizer(model, processor, layer - 1, attention_penalty, attention_rows)
    start = time.perf_counter()
    attended = [attention.localize(s.image, s.question) for s in tqdm(samples, desc="attention localize")]
    attention_seconds = (time.perf_counter() - start) / count
    results: dict[str, Any] = {
        "model": str(model_dir),
        "task": task,
        "kinds": list(kinds),
        "llm_layers": len(model.model.language_model.layers),
        "ilp_layer": layer,
        "tables": TABLES,
        "samples": count,
        "grid_tokens": grid_tokens,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()},
        "localization": _localization_report(samples, predicted, layout_side, localizer, localize_seconds),
        "localizer_cost": _localizer_cost(model, processor, samples[:cost_samples]),
        "attention_localization": _localization_report(samples, attended, layout_side, attention, attention_seconds),
        "attention_localizer": {"layer": attention.layer, "penalty": attention.penalty, "rows": attention.rows},
        "learned_plc": None if compressor is None else asdict(compressor.config),
        "variants": [],
    }
    regions = {"predicted": predicted, "attention": attended, "oracle": [s.region for s in samples]}
    rows = results["variants"]
    for variant in variants(grid_tokens, layer, attention_penalty, attention_rows, compressor):
        rows.append(_run_variant(model, processor, variant, samples, regions, batch_size, kinds))
    targets = {row["budget"]: row["average_tokens_over_layers"] for row in rows
               if (row["name"], row["region"]) == ("crop-ilp-budget", "predicted")}  # fmt: skip
    settings = {"layer": layer, "penalty": attention_penalty, "attention_rows": attention_rows}
    for variant in matched_variants(model, processor, samples[:probe_samples], targets, grid_tokens, **settings):
        same = [r for r in rows if (r["table"], r["name"], r["region"], r["tokens"])
                == ("final", variant.name, variant.region, variant.tokens)]  # fmt: skip
        if same:  # the same method, region and budget already ran (under another label): reuse its answers
            rows.append({**same[0], "table": "matched", "budget": variant.budget})
        else:
            rows.append(_run_variant(model, processor, variant, samples, regions, batch_size, kinds))
    results["paired"] = paired_intervals(rows)
    eager, _ = load_model(model_dir, attn_implementation="eager")
    results["answer_region_attention"] = answer_region_attention(eager, processor, samples, layer - 1)
    full = results["variants"][0]
    for row in results["variants"]:
        row["retention"] = {k: (row["accuracy"][k] / full["accuracy"][k] if full["accuracy"][k] else None)
                            for k in row["accuracy"]}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    if plot is not None:
        plot_results(results, plot)
    return results


PAIRED_REFERENCES = ("crop-ilp-budget", "crop-k0-budget")
"""The CROP rows each baseline is compared with, per table and budget."""


def paired_intervals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each table and budget label: each `PAIRED_REFERENCES` row minus each registry method's row, with a
    paired bootstrap 95% interval over the questions (positive: CROP answered more)."""
    baselines = table_methods()
    out = []
    for table in TABLES:
        for label in BUDGET_FRACTIONS:
            at = {r["name"]: r for r in rows if r["table"] == table and r["budget"] == label
                  and r["region"] in (None, "predicted")}  # fmt: skip
            for reference in PAIRED_REFERENCES:
                for name in baselines:
                    if reference in at and name in at:
                        interval = paired_bootstrap(at[reference]["outcomes"], at[name]["outcomes"])
                        out.append({"table": table, "budget": label, "crop": reference, "baseline": name, **interval})
    return out


def _run_variant(model, processor, variant: Variant, samples, regions, batch_size: int, kinds) -> dict[str, Any]:
    pruned = crop.apply(model, processor, method=variant.method())
    correct = {kind: 0 for kind in kinds}
    totals = {kind: 0 for kind in kinds}
    kept, average, outcomes, every_answer = [], [], [], []
    try:
        for start in tqdm(range(0, len(samples), batch_size), desc=variant.name, leave=False):
            chunk = samples[start : start + batch_size]
            given = None
            if variant.region == "full":
                given = [Region.full()] * len(chunk)
            elif variant.region is not None:
                given = regions[variant.region][start : start + batch_size]
            inputs = pruned.prepare([s.image for s in chunk], [s.question for s in chunk], given)
            length = inputs["input_ids"].shape[1]
            sequences, stats = pruned.generate(**inputs, max_new_tokens=2, do_sample=False)
            answers = processor.batch_decode(sequences[:, length:], skip_special_tokens=True)
            every_answer += answers
            for sample, answer, row in zip(chunk, answers, stats.rows, strict=True):
                words = answer.split()
                outcomes.append(int(bool(words) and words[0] == sample.answer))
                correct[sample.kind] += outcomes[-1]
                totals[sample.kind] += 1
                kept.append(row.kept_tokens)
                average.append(row.average_tokens)
    finally:
        pruned.remove()
    right, total = sum(correct.values()), sum(totals.values())
    accuracy = {kind: correct[kind] / totals[kind] if totals[kind] else None for kind in kinds} | {"all": right / total}
    interval = {kind: wilson(correct[kind], totals[kind]) for kind in kinds} | {"all": wilson(right, total)}
    result = {
        "name": variant.name,
        "method": pruned.method.describe(),
        "region": variant.region,
        "budget": variant.budget,
        "table": variant.table,
        "tokens": variant.tokens,
        "kept_tokens": statistics.mean(kept),
        "average_tokens_over_layers": statistics.mean(average),
        "accuracy": accuracy,
        "ci95": interval,
        "counts": {kind: [correct[kind], totals[kind]] for kind in kinds},
        "outcomes": outcomes,
    }
    if "document" in kinds:
        result["document_errors"] = document_errors(samples, every_answer)
    return result


def _localization_report(samples, predicted, side: int, localizer: Any, seconds: float) -> dict:
    report: dict[str, Any] = {"fallbacks": localizer.fallback_count, "seconds_per_sample": seconds}
    for kind in (*dict.fromkeys(s.kind for s in samples), "all"):
        chosen = [(s, p) for s, p in zip(samples, predicted, strict=True) if kind in (s.kind, "all")]
        if not chosen:  # a small --n may hold no question of this kind
            report[kind] = None
            continue
        ious = [grid_iou(s.region, p) for s, p in chosen]
        report[kind] = {
            "mean_iou": statistics.mean(ious),
            "iou_at_least_0.5": sum(i >= 0.5 for i in ious) / len(ious),
            "answer_region_recall": statistics.mean(object_recall(s, p, side) for s, p in chosen),
            "mean_region_area": statistics.mean(p.area for _, p in chosen),
        }
    return report


def _localizer_cost(model, processor, samples: list[Sample], repeats: int = 5) -> dict[str, Any]:
    """Prefill time of the localization prompt relative to the answering prompt (same model), medians."""
    from crop.prompting import build_prompt

    def prefill(question: str, sample: Sample) -> float:
        inputs = processor(images=sample.image, text=build_prompt(processor, question), return_tensors="pt")
        with torch.inference_mode():
            start = time.perf_counter()
            model(**inputs)
            return time.perf_counter() - start

    ratios = []
    for sample in samples:
        for _ in range(repeats):
            locate = prefill(LOCATE_INSTRUCTION.format(question=sample.question), sample)
            answer = prefill(sample.question, sample)
            ratios.append(locate / answer)
    return {
        "localizer": "the answering model itself, asked with the localization prompt",
        "parameters": sum(p.numel() for p in model.parameters()),
        "prefill_ratio_to_full_answer_prefill_median": statistics.median(ratios),
    }


def plot_results(results: dict[str, Any], path: Path) -> None:
    """Two panels: accuracy versus visual tokens kept (the equal-final-budget rows, one line per budget method, a
    labelled point for every other row) and versus average tokens over layers (the equal-average rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    rows = results["variants"]
    names = [*BUDGET_METHODS, *dict.fromkeys(r["name"] for r in rows if r.get("tokens") and r["region"] is None)]
    markers = "o^v<>PDxsX*hH+d"
    panels = (("final", "kept_tokens", "visual tokens kept (after the last reduction)"),
              ("matched", "average_tokens_over_layers", "average visual tokens over LLM layers"))  # fmt: skip
    for axis, (table, x, label) in zip(axes, panels, strict=True):
        on_lines = set()
        for index, name in enumerate(names):
            chosen = [r for r in rows if r.get("table", "final") == table and r["name"] == name
                      and r.get("tokens") and r["region"] in (None, "predicted")]  # fmt: skip
            on_lines.update(id(r) for r in chosen)
            if chosen:
                line = sorted((r[x], r["accuracy"]["all"]) for r in chosen)
                axis.plot(*zip(*line, strict=True), marker=markers[index % len(markers)], label=name)
        if table == "final":
            for row in rows:
                if row.get("table", "final") == "final" and id(row) not in on_lines:
                    place = (row[x], row["accuracy"]["all"])
                    axis.scatter(*place, marker="*", s=70, zorder=3, color="black")
                    text = row["name"] + (f" ({row['region']})" if row["region"] else "")
                    axis.annotate(text, place, fontsize=5, xytext=(3, 3), textcoords="offset points")
        axis.set_xlabel(label)
        axis.set_title(TABLES[table].split(":")[0], fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"exact-match accuracy ({results['samples']} synthetic test questions)")
    axes[1].legend(loc="lower right", fontsize=7, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown_table(results: dict[str, Any]) -> str:
    """The results as Markdown: a table per comparison (`TABLES`) with accuracy (95% CI) and retention per kind
    and tokens kept, then the paired intervals and the answer-region attention mass."""
    kinds = (*results.get("kinds", kinds_of("shapes")), "all")
    header = "| method | region | budget | tokens kept | avg over layers | " + " | ".join(kinds) + " | retention |"
    parts = []
    for table, description in results.get("tables", {"final": TABLES["final"]}).items():
        lines = [f"### {description[0].upper()}{description[1:]}", "", header, "|" + "---|" * (6 + len(kinds))]
        for row in results["variants"]:
            if row.get("table", "final") == table:
                lines.append(_markdown_row(row, kinds))
        parts.append("\n".join(lines))
    if results.get("paired"):
        lines = [
            "### CROP minus each baseline, same questions (points of accuracy, paired bootstrap 95% interval)", "",
            "| table | budget | CROP form | baseline | difference | 95% interval |", "|---|---|---|---|---|---|",
        ]  # fmt: skip
        for pair in results["paired"]:
            lines.append(
                f"| {pair['table']} | {pair['budget']} | {pair['crop']} | {pair['baseline']} | "
                f"{100 * pair['difference']:+.1f} | {100 * pair['low']:+.1f} to {100 * pair['high']:+.1f} |"
            )
        parts.append("\n".join(lines))
    differences = table_differences(results)
    if differences:
        lines = [
            "### Each method at equal final budget against equal average tokens over layers", "",
            "| budget | method | final: kept / avg over layers | final accuracy | matched: kept / avg over layers "
            "| matched accuracy | matched minus final |", "|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for d in differences:
            lines.append(
                f"| {d['budget']} | {d['name']} | {d['final_kept']:.0f} / {d['final_average']:.1f} | "
                f"{100 * d['final_accuracy']:.1f} | {d['matched_kept']:.0f} / {d['matched_average']:.1f} | "
                f"{100 * d['matched_accuracy']:.1f} | {100 * d['difference']:+.1f} |"
            )
        parts.append("\n".join(lines))
    errors = [row for row in results["variants"]  # rows of runs with document questions (a small run may have none)
              if row.get("document_errors", {}).get("questions") and row.get("table") == "final"]  # fmt: skip
    if errors:
        lines = [
            "### Where wrong document answers come from (equal final budget; a digit of the asked row, column, "
            "both or neither)", "",
            "| method | region | budget | right | row only | column only | row and column | elsewhere |",
            "|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for row in errors:
            e = row["document_errors"]
            lines.append(
                f"| {row['name']} | {row['region'] or '-'} | {row['budget']} | {e['right']}/{e['questions']} | "
                f"{e['row_only']} | {e['column_only']} | {e['row_and_column']} | {e['elsewhere']} |"
            )
        chance = errors[0]["document_errors"]["chance_in_row_or_column"]
        lines += ["", f"A random wrong digit lies in the asked row or column {100 * chance:.0f}% of the time."]
        parts.append("\n".join(lines))
    mass = results.get("answer_region_attention")
    if mass:
        lines = [
            f"### Layer {mass['layer']}'s last-token attention on the answer region (share of its visual attention)",
            "", "| kind | questions | on the region | region's share of the tokens |", "|---|---|---|---|",
        ]  # fmt: skip
        for kind, entry in mass.items():
            if kind != "layer":
                lines.append(f"| {kind} | {entry['questions']} | {100 * entry['mass_on_region']:.1f}% | "
                             f"{100 * entry['region_share_of_tokens']:.1f}% |")  # fmt: skip
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def table_differences(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per budget label and method, its row at equal final budget beside its row at equal average tokens over
    layers: the accuracy the method gains (or loses) when charged by LLM FLOPs instead of final tokens."""
    def key(row: dict[str, Any]) -> tuple:
        return row["budget"], row["name"], row["region"]

    final = {key(r): r for r in results["variants"] if r.get("table") == "final" and r["budget"] in BUDGET_FRACTIONS}
    out = []
    for row in results["variants"]:
        if row.get("table") == "matched" and key(row) in final:
            before = final[key(row)]
            out.append({
                "budget": row["budget"], "name": row["name"],
                "final_kept": before["kept_tokens"], "final_average": before["average_tokens_over_layers"],
                "final_accuracy": before["accuracy"]["all"],
                "matched_kept": row["kept_tokens"], "matched_average": row["average_tokens_over_layers"],
                "matched_accuracy": row["accuracy"]["all"],
                "difference": row["accuracy"]["all"] - before["accuracy"]["all"],
            })  # fmt: skip
    return out


def _markdown_row(row: dict[str, Any], kinds: tuple[str, ...]) -> str:
    cells = []
    for kind in kinds:
        low, high = row["ci95"][kind]
        if row["accuracy"][kind] is None:  # no question of this kind among the ones asked
            cells.append("-")
            continue
        cells.append(f"{100 * row['accuracy'][kind]:.1f} ({100 * low:.0f}-{100 * high:.0f})")
    retention = "-" if row["retention"]["all"] is None else f"{100 * row['retention']['all']:.1f}%"
    return (
        f"| {row['name']} | {row['region'] or '-'} | {row['budget']} | {row['kept_tokens']:.1f} | "
        f"{row['average_tokens_over_layers']:.1f} | " + " | ".join(cells) + f" | {retention} |"
    )

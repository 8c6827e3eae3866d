"""What the synthetic tables need beyond accuracy: budgets matched on average tokens over layers (equal LLM
FLOPs), paired bootstrap intervals between two methods on the same questions, how much of an LLM layer's
attention falls on the answer's region (the structure attention-reading methods get from the model), and where
wrong answers to document questions come from."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

import crop
from crop.prompting import build_prompt
from crop.strategies.base import Method
from crop.synth.scene import Sample


def matched_budget(measure: Callable[[int], float], target: float, budgets: Sequence[int]) -> tuple[int, float]:
    """The budget among `budgets` (increasing) whose average tokens over layers (`measure`, non-decreasing in the
    budget) is closest to `target`, with that average: a bisection, each budget measured once."""
    seen: dict[int, float] = {}

    def at(index: int) -> float:
        if index not in seen:
            seen[index] = measure(budgets[index])
        return seen[index]

    low, high = 0, len(budgets) - 1
    while low < high:
        middle = (low + high) // 2
        if at(middle) < target:
            low = middle + 1
        else:
            high = middle
    candidates = [i for i in (low - 1, low) if i >= 0]
    best = min(candidates, key=lambda i: (abs(at(i) - target), i))
    return budgets[best], at(best)


def average_tokens(model: Any, processor: Any, method: Method, samples: Sequence[Sample]) -> float:
    """Mean over `samples` of the visual tokens per LLM layer that `method` leaves (one greedy token each)."""
    pruned = crop.apply(model, processor, method=method)
    try:
        regions = [s.region for s in samples] if method.needs_region else None
        inputs = pruned.prepare([s.image for s in samples], [s.question for s in samples], regions)
        _, stats = pruned.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        pruned.remove()
    return statistics.mean(row.average_tokens for row in stats.rows)


def paired_bootstrap(
    first: Sequence[int], second: Sequence[int], resamples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Accuracy of `first` minus `second` on the same questions (1 = right), with its 95% percentile interval
    over `resamples` bootstrap resamples of the questions (the pairs are resampled together)."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired outcomes must be two equal, non-empty lists; got {a.shape} and {b.shape}")
    picks = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    differences = (a - b)[picks].mean(axis=1)
    low, high = np.percentile(differences, [2.5, 97.5])
    return {"difference": float((a - b).mean()), "low": float(low), "high": float(high)}


@torch.no_grad()
def answer_region_attention(model: Any, processor: Any, samples: Sequence[Sample], layer: int) -> dict[str, Any]:
    """Share of the last prompt token's attention on visual tokens (mean over heads, at LLM `layer`) that falls
    on the answer's region, beside the region's share of the visual tokens (what attention spread evenly gives).
    Questions whose region is the whole image are left out. Needs a model loaded with eager attention."""
    image_token = model.config.image_token_id
    side = int(model.config.vision_config.image_size // model.config.vision_config.patch_size)
    per_kind: dict[str, list[tuple[float, float]]] = {}
    for sample in samples:
        if sample.region.is_full:
            continue
        inputs = processor(images=sample.image, text=build_prompt(processor, sample.question), return_tensors="pt")
        output = model(**inputs, output_attentions=True)
        attention = output.attentions[layer][0].float().mean(0)[-1]  # last prompt token's row
        visual = attention[inputs["input_ids"][0] == image_token]
        inside = sample.region.token_mask(side, side).flatten()
        mass = float(visual[inside].sum() / visual.sum())
        per_kind.setdefault(sample.kind, []).append((mass, float(inside.float().mean())))
    report: dict[str, Any] = {"layer": layer}
    pairs_all = [pair for pairs in per_kind.values() for pair in pairs]
    for kind, pairs in {**per_kind, "all": pairs_all}.items():
        report[kind] = {
            "questions": len(pairs),
            "mass_on_region": statistics.mean(mass for mass, _ in pairs),
            "region_share_of_tokens": statistics.mean(share for _, share in pairs),
        }
    return report


def document_errors(samples: Sequence[Sample], answers: Sequence[str]) -> dict[str, Any]:
    """For the document questions among `samples` (with the model's `answers`): how many are right, and of the
    wrong ones how many name a digit of the asked row only, of the asked column only, of both, or of neither.
    `chance_in_row_or_column` is the share of wrong digits a uniformly random wrong answer would find in the
    asked row or column: the level to compare "wrong but from the right row or column" with."""
    counts = {"questions": 0, "right": 0, "row_only": 0, "column_only": 0, "row_and_column": 0, "elsewhere": 0}
    chance = []
    for sample, answer in zip(samples, answers, strict=True):
        if sample.document is None:
            continue
        row, column = sample.document.asked_cell(sample.question)
        in_row = set(sample.document.digits[row])
        in_column = {line[column] for line in sample.document.digits}
        wrong = [str(d) for d in range(10) if str(d) != sample.answer]
        chance.append(sum(d in in_row | in_column for d in wrong) / len(wrong))
        counts["questions"] += 1
        word = (answer.split() or [""])[0]
        if word == sample.answer:
            counts["right"] += 1
        elif word in in_row and word in in_column:
            counts["row_and_column"] += 1
        else:
            counts["row_only" if word in in_row else "column_only" if word in in_column else "elsewhere"] += 1
    return {**counts, "chance_in_row_or_column": statistics.mean(chance) if chance else None}

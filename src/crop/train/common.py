"""What both training recipes share: settings files with command-line overrides, region data rows, held-out
splits, and batches of prompt + answer whose loss covers the answer only."""

from __future__ import annotations

import json
import random
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import torch

from crop.errors import ConfigError
from crop.region import Region

Config = TypeVar("Config")


def config_from_file(cls: type[Config], path: str | Path | None, **overrides: Any) -> Config:
    """`cls` from a JSON settings file (or none), then `overrides` (None values leave the file's)."""
    values = json.loads(Path(path).read_text()) if path else {}
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise ConfigError(f"unknown training settings in {path}: {', '.join(unknown)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def read_rows(path: str | Path, keys: tuple[str, ...] = ("image", "question", "grid")) -> list[dict[str, Any]]:
    """The rows of a regions JSONL (what `crop data build-regions` writes), each checked for `keys` and, where it
    has one, a grid box on the 8x8 grid."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no region data at {path}: expected the JSONL written by `crop data build-regions`")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for number, row in enumerate(rows, start=1):
        missing = [key for key in keys if key not in row]
        if missing:
            raise ConfigError(f"{path} line {number} lacks {', '.join(missing)} (needs {', '.join(keys)})")
        if "grid" in row:
            Region.from_grid(row["grid"])
    if not rows:
        raise ConfigError(f"{path} holds no rows")
    return rows


def split_rows(
    rows: list[dict[str, Any]], held_out: list[dict[str, Any]] | None, share: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`(train, held out)`: the given held-out rows, or a seeded `share` of `rows` (none when there is one row)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    if held_out is not None:
        return rows, held_out
    if not 0 <= share < 1:
        raise ConfigError(f"eval_share must be in [0, 1), got {share}")
    count = max(1, round(len(rows) * share)) if len(rows) > 1 and share > 0 else 0
    return rows[count:], rows[:count]


def answer_batch(processor: Any, images: list[Any], prompts: list[str], answers: list[str]) -> dict[str, Any]:
    """Processor inputs for prompt + answer + end-of-sequence texts, right-padded, with `labels` on the answer
    tokens only and `answer_lengths` (tokens of answer + end of sequence per row)."""
    eos = processor.tokenizer.eos_token
    texts = [prompt + answer + eos for prompt, answer in zip(prompts, answers, strict=True)]
    batch = dict(processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side="right"))
    lengths = batch["attention_mask"].sum(dim=1)
    labels = torch.full_like(batch["input_ids"], -100)
    answer_lengths = []
    for row, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        prompt_length = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
        end = int(lengths[row])
        labels[row, prompt_length:end] = batch["input_ids"][row, prompt_length:end]
        answer_lengths.append(end - prompt_length)
    batch["labels"] = labels
    batch["answer_lengths"] = torch.tensor(answer_lengths)
    return batch

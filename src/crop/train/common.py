"""What both training recipes share: settings files with command-line overrides, region data rows, held-out
splits, and batches of prompt + answer whose loss covers the answer only."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import torch

from crop.errors import ConfigError
from crop.region import Region

Config = TypeVar("Config")


@dataclass
class TrainingSettings:
    """What every training recipe is told: data, model, output folder, held-out split, LoRA and optimisation.
    `from_file` reads the settings from JSON and applies command-line overrides."""

    data: str = ""
    model: str = ""
    out: str = ""
    eval_data: str | None = None
    eval_share: float = 0.05
    """Held-out share of `data` when no `eval_data` is given."""
    eval_limit: int = 200
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    epochs: float = 1.0
    max_steps: int = -1
    """Optimizer steps; -1 runs `epochs` over the data."""
    lr: float = 1e-4
    batch_size: int = 4
    grad_accum: int = 4
    warmup_steps: int = 20
    bf16: bool = False
    seed: int = 0
    log_every: int = 10
    save_every: int = 200

    @classmethod
    def from_file(cls: type[Config], path: str | Path | None, **overrides: Any) -> Config:
        return config_from_file(cls, path, **overrides)


def config_from_file(cls: type[Config], path: str | Path | None, **overrides: Any) -> Config:
    """`cls` from a JSON settings file (or none), then `overrides` (None values leave the file's)."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8")) if path else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the settings file {path}: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"the settings file {path} must hold a JSON object of settings")
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
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} line {number} is not JSON ({exc}); expected one object per line") from exc
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ConfigError(f"{path} row {number} is not a JSON object (needs {', '.join(keys)})")
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


def with_lora(model: Any, settings: TrainingSettings, without: str) -> Any:
    """The PEFT wrapper of `model` with LoRA adapters on the language model's projections named in
    `lora_targets` (the adapters sit inside `model` itself); `without` says how to train without PEFT."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ConfigError(f"LoRA needs PEFT: pip install 'crop[train]' (or train with {without})") from exc
    targets = rf".*language_model.*\.({'|'.join(settings.lora_targets)})$"
    lora = LoraConfig(
        r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=targets,
    )  # fmt: skip
    return get_peft_model(model, lora)

"""`crop train localizer`: fine-tune a VLM to answer the 8x8 grid box of the region that holds the answer.

Data: the JSONL that `crop data build-regions` writes (`image`, `question`, `grid` per line). Each example is the
prompt `GridVLMLocalizer` sends at inference (its instruction in the model's chat template, with the image) followed
by the box as `answer_format` writes it and the end-of-sequence token; the loss covers the answer only. LoRA (PEFT)
on the language model's attention projections by default, or full fine-tuning; the transformers `Trainer` runs it
on one device or, under `accelerate launch` / `torchrun`, on many. Checkpoints are resumable; at the end the
adapters are merged and `final/` holds a model that `GridVLMLocalizer.from_pretrained` loads as it is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from crop.image import load_image
from crop.localize.grid_vlm import DEFAULT_INSTRUCTION, LOCALIZER_SETTINGS, GridVLMLocalizer
from crop.prompting import build_prompt
from crop.region import GRID_SIZE, Region, grid_iou
from crop.train.common import TrainingSettings, answer_batch, read_rows, split_rows, with_lora

DEFAULT_MODEL = "Qwen/Qwen2-VL-2B-Instruct"
"""The paper's localizer backbone."""


@dataclass
class LocalizerTrainConfig(TrainingSettings):
    """A localizer fine-tuning run (the shared settings, plus the prompt, the answer's form and LoRA or not)."""

    model: str = DEFAULT_MODEL
    out: str = "runs/localizer"
    instruction: str = DEFAULT_INSTRUCTION
    answer_format: str = "[{x0}, {y0}, {x1}, {y1}]"
    lora: bool = True
    """LoRA adapters (PEFT) on the language model, merged at the end; false: full fine-tuning."""


class LocalizerCollator:
    """Batches prompt + answer texts with their images; labels are -100 everywhere but on the answer tokens."""

    def __init__(self, processor: Any, config: LocalizerTrainConfig, root: Path) -> None:
        self.processor = processor
        self.config = config
        self.root = root

    def prompt(self, question: str) -> str:
        text = self.config.instruction.format(n=GRID_SIZE, last=GRID_SIZE - 1, question=question)
        return build_prompt(self.processor, text)

    def answer(self, grid: list[int]) -> str:
        x0, y0, x1, y1 = grid
        return self.config.answer_format.format(x0=x0, y0=y0, x1=x1, y1=y1)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [load_image(self.root / row["image"]) for row in rows]
        prompts = [self.prompt(row["question"]) for row in rows]
        batch = answer_batch(self.processor, images, prompts, [self.answer(row["grid"]) for row in rows])
        del batch["answer_lengths"]
        return batch


def train_localizer(config: LocalizerTrainConfig, model: Any = None, processor: Any = None) -> dict[str, Any]:
    """Fine-tune (or resume), merge, save `out/final`, and report held-out localization; returns the report.
    `model` and `processor`, when given, are trained instead of loading `config.model`."""
    from transformers import Trainer, TrainingArguments

    from crop.loading import load_model

    rows, held_out = split_rows(
        read_rows(config.data),
        read_rows(config.eval_data) if config.eval_data else None,
        config.eval_share,
        config.seed,
    )
    root = Path(config.data).parent
    if model is None or processor is None:
        model, processor = load_model(config.model, attn_implementation="sdpa", dtype="float32")
    if config.lora:
        model = with_lora(model, config, "lora=false")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    arguments = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, learning_rate=config.lr, num_train_epochs=config.epochs,
        max_steps=config.max_steps, warmup_steps=config.warmup_steps, bf16=config.bf16, seed=config.seed,
        logging_steps=config.log_every, save_steps=config.save_every, report_to=[],
        remove_unused_columns=False, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=arguments, train_dataset=rows, data_collator=LocalizerCollator(processor, config, root)
    )
    resume = any(out.glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=True if resume else None)
    final = out / "final"
    report = {"losses": [e["loss"] for e in trainer.state.log_history if "loss" in e], "final": str(final)}
    if trainer.is_world_process_zero():
        merged = model.merge_and_unload() if config.lora else model
        merged.save_pretrained(final)
        processor.save_pretrained(final)
        settings = {"instruction": config.instruction}
        (final / LOCALIZER_SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
        if held_out:
            localizer = GridVLMLocalizer.from_model(merged.eval(), processor, final)
            root = Path(config.eval_data or config.data).parent
            report["eval"] = evaluate_localizer(localizer, held_out[: config.eval_limit], root)
            (out / "eval.json").write_text(json.dumps(report["eval"], indent=2) + "\n")
    return report


def evaluate_localizer(localizer: GridVLMLocalizer, rows: list[dict[str, Any]], root: Path) -> dict[str, float]:
    """Mean grid IoU, share with IoU >= 0.5, and unparsable answers of `localizer` on `rows` (images under
    `root`)."""
    ious = []
    for row in rows:
        predicted = localizer.localize(load_image(root / row["image"]), row["question"])
        ious.append(grid_iou(Region.from_grid(row["grid"]), predicted))
    return {
        "samples": len(rows),
        "mean_iou": sum(ious) / len(ious),
        "iou_at_least_0.5": sum(iou >= 0.5 for iou in ious) / len(ious),
        "unparsable": localizer.fallback_count / len(rows),
    }

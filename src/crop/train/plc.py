"""`crop train plc`: fine-tune a LLaVA-family VLM on inputs compressed by PLC, and train a learned compressor.

Data: the JSONL that `crop data build-regions` writes (`image`, `question`, `answer`, `grid` per line; image
paths relative to the file's folder). Each example is the model's chat prompt with the image, its visual tokens
compressed by PLC around the row's grid region (pooled outside: `form="pool"`, or the learnable-query compressor
with anchors: `form="learned"`), followed by the answer and the end-of-sequence token; the loss covers the answer.

What trains: the learned compressor (form `learned`), LoRA adapters on the language model's projections
(`llm="lora"`, through PEFT) or nothing in the LLM (`llm="frozen"`), and optionally the multimodal projector.
The loop runs on `accelerate`: one device, or many under `accelerate launch` / `torchrun` (data parallel). It
saves `checkpoint-last/` every `save_every` optimizer steps and resumes from it; `final/` holds the merged
model, its processor and the compressor (`learned_plc.*`), loadable by `load_model` and
`LearnedPLC.from_pretrained`. Exact-match accuracy on held-out rows is measured with PLC before and after.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from crop.adapter import adapter_for
from crop.errors import ConfigError, UnsupportedModelError
from crop.evaluation.metrics import normalize_vqa_answer
from crop.image import load_image
from crop.pipeline import CropModel
from crop.prompting import build_prompt
from crop.region import Region, Viewport
from crop.strategies.crop_method import CROP
from crop.strategies.learned_plc import LearnedPLC, LearnedPLCConfig
from crop.strategies.plc import PLC
from crop.train.common import TrainingSettings, answer_batch, read_rows, split_rows, with_lora

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
KEYS = ("image", "question", "answer", "grid")


@dataclass
class PLCTrainConfig(TrainingSettings):
    """A PLC fine-tuning run: the shared settings, plus the PLC form and what trains in the VLM."""

    model: str = DEFAULT_MODEL
    out: str = "runs/plc"
    form: Literal["pool", "learned"] = "learned"
    pool_ratio: int = 4
    region_ratio: int = 2
    outside_ratio: int = 8
    n_anchor: int = 4
    compressor_from: str | None = None
    """A saved learned compressor to start from (default: a new one, which starts as mean pooling per part)."""
    compressor_lr: float = 1e-3
    llm: Literal["lora", "frozen"] = "lora"
    train_projector: bool = False
    max_new_tokens: int = 16
    """Answer length when measuring held-out accuracy."""

    def check(self) -> None:
        """Refuse settings that cannot train anything or name unknown choices."""
        if self.form not in ("pool", "learned"):
            raise ConfigError(f"form must be 'pool' or 'learned', got {self.form!r}")
        if self.llm not in ("lora", "frozen"):
            raise ConfigError(f"llm must be 'lora' or 'frozen', got {self.llm!r}")
        if self.form == "pool" and self.llm == "frozen" and not self.train_projector:
            raise ConfigError(
                "nothing to train: pooling PLC has no weights; use llm='lora', train_projector or form='learned'"
            )
        if not self.data:
            raise ConfigError("no training data: set data to the JSONL written by `crop data build-regions`")


class CompressedVLM(nn.Module):
    """The VLM behind PLC as one module, so that data parallelism sees every trained weight in one forward:
    `forward(batch)` compresses the visual tokens around each row's region and returns the answer loss."""

    def __init__(self, model: nn.Module, processor: Any, method: CROP) -> None:
        super().__init__()
        self.model = model
        self.compressor = method.plc if isinstance(method.plc, nn.Module) else None
        self.crop = CropModel(model, processor, method=method)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        batch = dict(batch)
        answer_lengths = batch.pop("answer_lengths")
        batch.pop("labels")
        inputs = self.crop.compressed_inputs(**batch)
        input_ids, mask = inputs.pop("input_ids"), inputs["attention_mask"]
        if "position_ids" not in inputs:  # compact positions: the real tokens of each row numbered from 0
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        labels = torch.full_like(input_ids, -100)
        for row, length in enumerate(answer_lengths.tolist()):  # left-padded: the answer is each row's tail
            labels[row, -length:] = input_ids[row, -length:]
        return self.model(**inputs, labels=labels).loss


class RegionCollator:
    """Batches rows into processor inputs with labels on the answer, plus each row's region and the viewport that
    places it on the token grid (`viewport(image)`, the model's)."""

    def __init__(self, processor: Any, root: Path, viewport: Callable[[Image.Image], Viewport]) -> None:
        self.processor = processor
        self.root = root
        self.viewport = viewport

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        images = [load_image(self.root / row["image"]) for row in rows]
        prompts = [build_prompt(self.processor, row["question"]) for row in rows]
        batch = answer_batch(self.processor, images, prompts, [str(row["answer"]) for row in rows])
        batch["regions"] = [Region.from_grid(row["grid"]) for row in rows]
        batch["viewports"] = [self.viewport(image) for image in images]
        return batch


def build_compressor(config: PLCTrainConfig, model: Any) -> PLC | LearnedPLC:
    """The PLC the run trains through: pooling, or a learned compressor (new, or loaded from `compressor_from`).
    Training needs one fixed token grid per image (the LLaVA-1.5 family); other families are refused."""
    layout = adapter_for(model).visual_layout()
    if layout is None or layout.is_multi_grid:
        raise UnsupportedModelError(
            f"crop train plc needs one fixed visual token grid per image (LLaVA-1.5 family); {type(model).__name__} "
            "has grids that depend on the image"
        )
    if config.form == "pool":
        return PLC(ratio=config.pool_ratio)
    hidden = model.config.text_config.hidden_size
    if config.compressor_from:
        grid = {"rows": layout.rows, "cols": layout.cols}
        return LearnedPLC.from_pretrained(config.compressor_from, hidden_size=hidden, **grid)
    settings = LearnedPLCConfig(
        hidden_size=hidden, rows=layout.rows, cols=layout.cols, region_ratio=config.region_ratio,
        outside_ratio=config.outside_ratio, n_anchor=config.n_anchor,
    )  # fmt: skip
    return LearnedPLC(settings)


def train_plc(config: PLCTrainConfig) -> dict[str, Any]:
    """Train (or resume), save `out/final`, and report held-out accuracy with PLC before and after."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    from crop.loading import load_model

    config.check()
    accelerator = Accelerator(
        gradient_accumulation_steps=config.grad_accum, mixed_precision="bf16" if config.bf16 else "no"
    )
    set_seed(config.seed)
    rows = read_rows(config.data, KEYS)
    held_out_rows = read_rows(config.eval_data, KEYS) if config.eval_data else None
    train_rows, held_out = split_rows(rows, held_out_rows, config.eval_share, config.seed)
    data_root = Path(config.data).parent
    eval_root = Path(config.eval_data).parent if config.eval_data else data_root
    model, processor = load_model(config.model, attn_implementation="sdpa", dtype="float32")
    plc = build_compressor(config, model)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    report: dict[str, Any] = {"form": config.form, "llm": config.llm}
    if held_out and accelerator.is_main_process and not (out / "checkpoint-last").exists():
        report["before"] = evaluate_plc(model, processor, plc, held_out[: config.eval_limit], eval_root, config)
    peft_model = _trainable(model, config)
    module = CompressedVLM(model, processor, CROP(None, plc))
    module.train()
    groups = [{"params": [p for p in module.model.parameters() if p.requires_grad], "lr": config.lr}]
    if module.compressor is not None:
        groups.append({"params": list(module.compressor.parameters()), "lr": config.compressor_lr})
    groups = [group for group in groups if group["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    collate = RegionCollator(processor, data_root, module.crop.viewport)
    loader = torch.utils.data.DataLoader(
        train_rows, batch_size=config.batch_size, shuffle=True, collate_fn=collate,
        generator=torch.Generator().manual_seed(config.seed),
    )  # fmt: skip
    steps_per_epoch = math.ceil(len(loader) / config.grad_accum)
    total = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.epochs * steps_per_epoch))
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, total)
    module, optimizer, loader, scheduler = accelerator.prepare(module, optimizer, loader, scheduler)
    step = _resume(accelerator, out)
    losses = _loop(accelerator, module, optimizer, loader, scheduler, step, total, config, out)
    report["losses"] = losses
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = out / "final"
        merged = peft_model.merge_and_unload() if peft_model is not None else model
        merged.save_pretrained(final)
        processor.save_pretrained(final)
        if isinstance(plc, LearnedPLC):
            plc.save_pretrained(final)
        report["final"] = str(final)
        if held_out:
            merged.eval()
            report["after"] = evaluate_plc(merged, processor, plc, held_out[: config.eval_limit], eval_root, config)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _loop(accelerator, module, optimizer, loader, scheduler, step: int, total: int, config, out: Path) -> list[float]:
    """Optimizer steps `step..total-1` (each `grad_accum` batches), logging the loss and saving checkpoints. A
    resumed run skips the batches its epoch had already used (later epochs reshuffle from the seed)."""
    losses: list[float] = []
    per_epoch = math.ceil(len(loader) / config.grad_accum)
    seen = (step % per_epoch) * config.grad_accum
    batches = accelerator.skip_first_batches(loader, seen) if seen else loader
    bar = tqdm(total=total, initial=step, desc="train plc", disable=not accelerator.is_main_process)
    log = out / "log.jsonl"
    window: list[float] = []
    while step < total:
        for batch in batches:
            with accelerator.accumulate(module):
                loss = module(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(module.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            window.append(loss.item())
            if not accelerator.sync_gradients:
                continue
            step += 1
            losses.append(sum(window) / len(window))
            window = []
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if accelerator.is_main_process and (step % config.log_every == 0 or step == total):
                with open(log, "a") as handle:
                    handle.write(
                        json.dumps({"step": step, "loss": losses[-1], "lr": scheduler.get_last_lr()[0]}) + "\n"
                    )
            if step % config.save_every == 0 or step == total:
                _save_checkpoint(accelerator, out, step)
            if step >= total:
                break
        batches = loader
    bar.close()
    return losses


def _save_checkpoint(accelerator: Any, out: Path, step: int) -> None:
    accelerator.save_state(str(out / "checkpoint-last"))
    if accelerator.is_main_process:
        (out / "checkpoint-last" / "step.json").write_text(json.dumps({"step": step}))


def _resume(accelerator: Any, out: Path) -> int:
    """Load `checkpoint-last` if there is one; the optimizer step it was saved at (0 for a new run)."""
    checkpoint = out / "checkpoint-last"
    if not (checkpoint / "step.json").is_file():
        return 0
    accelerator.load_state(str(checkpoint))
    return json.loads((checkpoint / "step.json").read_text())["step"]


def _trainable(model: Any, config: PLCTrainConfig) -> Any:
    """Freeze the VLM, then open what the run trains: LoRA adapters (returns the PEFT wrapper, whose adapters sit
    inside `model`) and the projector. Returns None without LoRA."""
    model.requires_grad_(False)
    peft_model = with_lora(model, config, "llm='frozen'") if config.llm == "lora" else None
    if config.train_projector:
        model.model.multi_modal_projector.requires_grad_(True)
    return peft_model


@torch.no_grad()
def evaluate_plc(
    model: Any, processor: Any, plc: PLC | LearnedPLC, rows: list[dict[str, Any]], root: Path, config: PLCTrainConfig
) -> dict[str, float]:
    """Exact-match accuracy (VQA-normalised answers) of greedy answers with PLC around each row's region."""
    if isinstance(plc, nn.Module):
        plc.eval()
    pruned = CropModel(model, processor, method=CROP(None, plc))
    right = 0
    for row in rows:
        answer = pruned.ask(root / row["image"], row["question"], Region.from_grid(row["grid"]), config.max_new_tokens)
        right += int(normalize_vqa_answer(answer.text) == normalize_vqa_answer(str(row["answer"])))
    if isinstance(plc, nn.Module):
        plc.train()
    return {"samples": len(rows), "exact_match": right / len(rows)}

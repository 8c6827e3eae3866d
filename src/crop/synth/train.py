"""Training the synthetic-task VLM from scratch on CPU: resumable, logged, reproducible by seed.

Stage 1 trains the vision tower and projector alone on per-patch heads (colour, shape, tag digit, block x/y):
reading is learned cheaply before any question. Stage 2 trains everything on questions and on localization
prompts (`locate : <question>` -> `x0 y0 x1 y1`), keeps the per-patch heads as an auxiliary loss, and adds an
attention-grounding loss: at one LLM layer, the last prompt token's attention (mean over heads) should fall on
the patches the answer rests on (the tag patch for a digit, the object's cell otherwise). That loss teaches
binding ("the red object" -> its patches) directly, which SYNTH-NOTES.md found to be the slow part of learning
this task from the answer alone. Stage 2 starts with the colour, shape and digit words' embeddings taken from the
per-patch heads (`ground_vocabulary`): without it the same schedule ends at 62% validation accuracy, with it 91%.

With `plc_share > 0` a learned PLC compressor (`LearnedPLC`) is trained with the VLM, as the paper trains its PLC:
that share of the question prompts carries the compressed tokens of the answer's region (jittered by up to
`plc_jitter` blocks of the 8x8 grid) instead of the 256 visual tokens. `init_from` starts from a trained model
(stage 1 is then usually skipped with `vision_steps=0`).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from crop.prompting import build_prompt
from crop.region import Region
from crop.strategies.learned_plc import LearnedPLC, LearnedPLCConfig
from crop.synth.assets import TASK_FILE
from crop.synth.document import COLUMN_LABELS, ROW_LABELS, document_question, draw_document, make_document
from crop.synth.model import ARCHITECTURE, LOCATE_INSTRUCTION, build_synth_model, build_synth_processor
from crop.synth.scene import (
    COLOURS,
    DEFAULT_TASK,
    IMAGE_SIZE,
    PATCH,
    SHAPES,
    SPLIT_SEEDS,
    SceneObject,
    draw_scene,
    make_objects,
    make_question,
    make_sample,
    patch_labels,
    task_kinds,
)
from crop.testing.llava import CLIP_MEAN, CLIP_STD

HEAD_CLASSES = {
    "colour": len(COLOURS) + 1, "shape": len(SHAPES) + 1, "digit": 11, "row": len(ROW_LABELS) + 1,
    "column": len(COLUMN_LABELS) + 1, "block_x": 8, "block_y": 8,
}  # fmt: skip
SIDE = IMAGE_SIZE // PATCH


@dataclass
class TrainConfig:
    """Everything that determines a training run; saved beside its checkpoints."""

    seed: int = 0
    task: str = DEFAULT_TASK
    text_layers: int = ARCHITECTURE["text_layers"]
    vision_steps: int = 2500
    steps: int = 3500
    images_per_step: int = 16
    questions_per_image: int = 4
    """Prompts per image; they share the image's prefix run (`_shared_prefix_forward`), so more are cheap."""
    lr: float = 1e-3
    min_lr: float = 5e-5
    warmup: int = 150
    decay_from: float = 0.35
    refine_steps: int = 0
    """Stage 3 (off by default): the stage-2 mix again after a warm restart at `refine_lr`, cosine to `min_lr`.
    Tried once from the shipped run's end (2500 steps at 3e-4): validation accuracy fell from 61.7% to 56-58% and
    had not come back after 1500 steps, so the shipped model does not use it."""
    refine_lr: float = 3e-4
    locate_share: float = 0.25
    aux_weight: float = 0.3
    grounding_weight: float = 0.0
    """Weight of the attention-grounding loss (off: the first shipped model used 0.5 at `grounding_layer` 1,
    which favoured the methods that read that layer's attention)."""
    grounding_layer: int = 1
    targeted_grounding_from: int = 1100
    """Stage-2 step from which digit questions ground on the tag patch and "is there" questions on their object;
    before it, digit questions ground on the object's whole cell and "is there" questions not at all."""
    plc_share: float = 0.0
    """Share of the question prompts (not localization ones) whose image goes through the learned compressor."""
    plc_region_ratio: int = 2
    plc_outside_ratio: int = 8
    plc_anchors: int = 4
    plc_jitter: int = 1
    init_from: str | None = None
    """A saved model directory to start from instead of random weights."""
    ground_vocabulary: bool = True
    """At the start of stage 2, set the input and output embeddings of the colour, shape and digit words from the
    per-patch heads' rows for them (scaled to the embeddings' mean norm): the words start where the visual tokens
    that show them point, instead of at random. Without it the same schedule reached 61.7% validation accuracy;
    with it, 90.7% (README). Skipped with `init_from`, whose words are already trained."""
    checkpoint_every: int = 200
    eval_every: int = 500
    eval_samples: int = 300
    threads: int = 2
    precision: str = "auto"
    """Autocast dtype: `bfloat16` (every shipped model was trained so), `float32`, or `auto`: bfloat16 where the
    CPU computes it natively (AVX512-BF16 or AMX), float32 elsewhere, where bfloat16 matmuls are emulated (0.27
    GFLOPS against 117 in float32, seen on an AVX2 EPYC: a step took 36 s instead of about 1.5 s)."""
    extra: dict = field(default_factory=dict)


PRECISIONS = ("auto", "bfloat16", "float32")


def autocast_dtype(precision: str) -> torch.dtype:
    """The dtype `TrainConfig.precision` names on this CPU (`auto`: bfloat16 only where it is native)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
    if precision == "auto":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.bfloat16 if native else torch.float32
    return getattr(torch, precision)


def pixel_values(images: list) -> torch.Tensor:
    """CLIP-normalised pixels of 224 px images, as the model's processor computes them."""
    array = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


class PatchHeads(nn.Module):
    """Linear per-patch classifiers on the projected visual tokens (training only)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(dim, n) for name, n in HEAD_CLASSES.items()})

    def loss(self, features: torch.Tensor, labels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        total, parts = 0.0, {}
        for name, head in self.heads.items():
            logits = head(features).float()
            target = labels[name].view(logits.shape[0], -1)
            weight = None
            if name == "digit":  # the tag is one patch in ~50: weight it up
                weight = torch.ones(HEAD_CLASSES["digit"])
                weight[1:] = 10.0
            loss = F.cross_entropy(logits.transpose(1, 2), target, weight=weight)
            total = total + loss
            if name in ("digit", "row", "column"):
                labelled = target > 0
                if labelled.any():
                    accuracy = (logits.argmax(-1)[labelled] == target[labelled]).float().mean()
                    parts["tag_acc" if name == "digit" else f"{name}_acc"] = float(accuracy)
        return total, parts


@dataclass
class Batch:
    pixel_values: torch.Tensor
    labels: dict[str, torch.Tensor]
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    image_index: torch.Tensor | None = None
    grounding: list[list[int]] | None = None
    query_position: torch.Tensor | None = None
    kinds: list[str] | None = None
    regions: list[torch.Tensor | None] | None = None
    """Per prompt: the region's token mask when its image goes through the learned compressor, else None."""


@dataclass
class Item:
    """One prompt of a batch: its image, text, answer, grounding patches, kind, and PLC region mask (or None)."""

    image_index: int
    question: str
    answer: str
    cells: list[int]
    kind: str
    inside: torch.Tensor | None = None


class Trainer:
    """Runs (or resumes) a training run in `out`: `state.pt` and `model/` checkpoints, `log.jsonl`."""

    def __init__(self, out: Path, config: TrainConfig) -> None:
        self.out = Path(out)
        self.config = config
        torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.dtype = autocast_dtype(config.precision)
        attention = "eager" if config.grounding_weight > 0 else "sdpa"  # eager returns the grounded attention
        self.model = build_synth_model(config.seed, attention, config.text_layers)
        if config.init_from:
            trained = type(self.model).from_pretrained(config.init_from, attn_implementation=attention)
            self.model.load_state_dict(trained.state_dict())
        self.processor = build_synth_processor()
        self.tokenizer = self.processor.tokenizer
        self.image_token = self.model.config.image_token_id
        dim = self.model.config.text_config.hidden_size
        self.heads = PatchHeads(dim)
        self.compressor = None
        if config.plc_share > 0:
            settings = LearnedPLCConfig(
                hidden_size=dim, rows=SIDE, cols=SIDE, region_ratio=config.plc_region_ratio,
                outside_ratio=config.plc_outside_ratio, n_anchor=config.plc_anchors,
            )  # fmt: skip
            self.compressor = LearnedPLC(settings)
        self.step = 0
        self.vision_optimizer = torch.optim.AdamW(self._vision_parameters(), lr=config.lr, weight_decay=0.01)
        trained = list(self.model.parameters()) + list(self.heads.parameters())
        if self.compressor is not None:
            trained += list(self.compressor.parameters())
        self.optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=0.01)
        self.elapsed = 0.0
        if (self.out / "state.pt").is_file():
            self._load()

    def _vision_parameters(self) -> list[nn.Parameter]:
        return (
            list(self.model.model.vision_tower.parameters())
            + list(self.model.model.multi_modal_projector.parameters())
            + list(self.heads.parameters())
        )

    @property
    def total_steps(self) -> int:
        return self.config.vision_steps + self.config.steps + self.config.refine_steps

    def lr_at(self, step: int) -> float:
        """Stages 1-2: warm-up, constant until `decay_from` of the stage, then cosine to `min_lr`.
        Stage 3: warm-up to `refine_lr`, then cosine to `min_lr`."""
        c = self.config
        refine_start = c.vision_steps + c.steps
        if step >= refine_start:
            stage_step = step - refine_start
            if stage_step < c.warmup:
                return c.refine_lr * (stage_step + 1) / c.warmup
            progress = (stage_step - c.warmup) / max(1, c.refine_steps - c.warmup)
            return c.min_lr + 0.5 * (c.refine_lr - c.min_lr) * (1 + math.cos(math.pi * progress))
        stage_step, stage_len = (step, c.vision_steps) if step < c.vision_steps else (step - c.vision_steps, c.steps)
        if stage_step < c.warmup:
            return c.lr * (stage_step + 1) / c.warmup
        start = int(c.decay_from * stage_len)
        if stage_step < start:
            return c.lr
        progress = (stage_step - start) / max(1, stage_len - start)
        return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * progress))

    def run(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        resolved = {"autocast_dtype": str(self.dtype).removeprefix("torch.")}
        (self.out / "config.json").write_text(json.dumps(asdict(self.config) | resolved, indent=2))
        bar = tqdm(total=self.total_steps, initial=self.step, desc="synth train", dynamic_ncols=True)
        while self.step < self.total_steps:
            if self.step == self.config.vision_steps and self.config.ground_vocabulary and not self.config.init_from:
                self.ground_vocabulary()
            start = time.perf_counter()
            vision_only = self.step < self.config.vision_steps
            record = self._train_step(vision_only)
            self.elapsed += time.perf_counter() - start
            self.step += 1
            bar.update(1)
            shown = ("loss", "answer_acc", "tag_acc", "row_acc")
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in shown})
            if self.step % 25 == 0:
                self._log({"step": self.step, "stage": 1 if vision_only else 2, **record})
            if self.step % self.config.eval_every == 0 and not vision_only or self.step == self.total_steps:
                self._log({"step": self.step, "eval": evaluate_teacher_forced(self, self.config.eval_samples)})
            if self.step % self.config.checkpoint_every == 0 or self.step == self.total_steps:
                self._save()
        bar.close()

    @torch.no_grad()
    def ground_vocabulary(self) -> None:
        """Colour, shape and digit words' input and output embeddings from the per-patch heads' rows for them."""
        words = {
            "colour": list(COLOURS), "shape": list(SHAPES), "digit": [str(d) for d in range(10)],
            "row": list(ROW_LABELS), "column": list(COLUMN_LABELS),
        }  # fmt: skip
        for table in (self.model.get_input_embeddings().weight, self.model.get_output_embeddings().weight):
            scale = table.norm(dim=-1).mean()
            for head, names in words.items():
                rows = self.heads.heads[head].weight[1:]  # class 0 is "none"
                ids = self.tokenizer.convert_tokens_to_ids(names)
                table[ids] = rows / rows.norm(dim=-1, keepdim=True) * scale

    def autocast(self) -> torch.autocast:
        """The mixed-precision context of this run's forward passes (none in float32)."""
        return torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _train_step(self, vision_only: bool) -> dict[str, float]:
        batch = self._batch(self.step, with_questions=not vision_only)
        return self.train_on(batch, vision_only, self.lr_at(self.step))

    def train_on(self, batch: Batch, vision_only: bool, lr: float) -> dict[str, float]:
        """One optimiser step on `batch` (stage 1: vision heads only); returns the losses and accuracies seen."""
        optimizer = self.vision_optimizer if vision_only else self.optimizer
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        with self.autocast():
            features = self._features(batch.pixel_values)
            aux, parts = self.heads.loss(features, batch.labels)
            record = {"lr": lr, "aux": aux.item(), **parts}
            loss = aux
            if not vision_only:
                answer_loss, grounding_loss, accuracy = self._question_losses(batch, features)
                loss = answer_loss + self.config.aux_weight * aux + self.config.grounding_weight * grounding_loss
                record.update(answer=answer_loss.item(), grounding=grounding_loss.item(), answer_acc=accuracy)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        optimizer.step()
        record["loss"] = loss.item()
        return record

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        output = self.model.model.get_image_features(
            pixel_values=pixels, vision_feature_layer=-1, vision_feature_select_strategy="default"
        )
        return torch.stack(list(output.pooler_output))

    def _question_losses(self, batch: Batch, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Answer loss, grounding loss and first-answer-token accuracy of the batch's prompts."""
        prefix = shared_prefix_length(batch.input_ids, self.image_token)
        if prefix and all(inside is None for inside in batch.regions):
            logits, attentions = self._shared_prefix_forward(batch, features, prefix)
        else:
            prefix, (logits, attentions) = 0, self._full_forward(batch, features)
        logits = logits[:, :-1].float()
        targets = batch.targets[:, prefix + 1 :]
        answer_loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100)
        first = batch.query_position - prefix
        rows = torch.arange(logits.shape[0])
        accuracy = float((logits[rows, first].argmax(-1) == targets[rows, first]).float().mean())
        grounding = torch.zeros(())
        if self.config.grounding_weight > 0:
            attention = attentions[self.config.grounding_layer].float().mean(1)  # (B, queries, keys)
            losses = []
            for row, positions in enumerate(batch.grounding):
                if positions:
                    mass = attention[row, first[row], positions].sum()
                    losses.append(-torch.log(mass + 1e-4))
            if losses:
                grounding = torch.stack(losses).mean()
        return answer_loss, grounding, accuracy

    def _full_forward(self, batch: Batch, features: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        """Every prompt run whole: logits over all positions (and attentions when grounding)."""
        embeds = self.model.get_input_embeddings()(batch.input_ids)
        visual = batch.input_ids == self.image_token
        embeds = embeds.masked_scatter(visual[..., None], self._visual_tokens(batch, features).to(embeds.dtype))
        grounding = self.config.grounding_weight > 0
        output = self.model(inputs_embeds=embeds, attention_mask=batch.attention_mask, output_attentions=grounding)
        return output.logits, output.attentions

    def _shared_prefix_forward(
        self, batch: Batch, features: torch.Tensor, prefix: int
    ) -> tuple[torch.Tensor, tuple | None]:
        """The same computation with each image's prompt prefix (the text before it and its visual tokens) run
        once per image and its KV cache shared by that image's prompts: logits (and attentions) of the positions
        after the prefix. With several questions per image this halves the LLM's work or better."""
        images = features.shape[0]
        first_row = [batch.image_index.tolist().index(image) for image in range(images)]
        embeds = self.model.get_input_embeddings()(batch.input_ids[first_row, :prefix])
        visual = batch.input_ids[first_row, :prefix] == self.image_token
        embeds = embeds.masked_scatter(visual[..., None], features.reshape(-1, features.shape[-1]).to(embeds.dtype))
        cache = self.model(inputs_embeds=embeds, use_cache=True).cache
        for layer in cache.layers:
            layer.reorder_cache(batch.image_index)
        output = self.model(
            input_ids=batch.input_ids[:, prefix:],
            attention_mask=batch.attention_mask,
            cache=cache,
            use_cache=False,
            output_attentions=self.config.grounding_weight > 0,
        )
        return output.logits, output.attentions

    def _visual_tokens(self, batch: Batch, features: torch.Tensor) -> torch.Tensor:
        """Each prompt's visual tokens in batch order: its image's 256 features, or their learned compression."""
        tokens = [
            features[image] if inside is None else self.compressor.compress(features[image], inside).features
            for image, inside in zip(batch.image_index.tolist(), batch.regions, strict=True)
        ]
        return torch.cat(tokens)

    def _batch(self, step: int, with_questions: bool, split: str = "train") -> Batch:
        c = self.config
        rng = random.Random(SPLIT_SEEDS[split] + 7919 * step + c.seed)
        kinds = task_kinds(c.task)
        scene_kinds = [kind for kind in dict.fromkeys(kinds) if kind != "document"]
        scene_weights = [kinds.count(kind) for kind in scene_kinds]
        documents = [
            make_document(rng) if rng.random() < kinds.count("document") / len(kinds) else None
            for _ in range(c.images_per_step)
        ]
        scenes = [[] if document else make_objects(rng) for document in documents]
        images = [
            draw_document(document) if document else draw_scene(objects)
            for objects, document in zip(scenes, documents, strict=True)
        ]
        labels = {
            name: torch.from_numpy(np.stack([patch_labels(o, d)[name] for o, d in zip(scenes, documents, strict=True)]))
            for name in HEAD_CLASSES
        }
        batch = Batch(pixel_values(images), labels)
        if not with_questions:
            return batch
        targeted = step - c.vision_steps >= c.targeted_grounding_from
        items = []
        for image_index, (objects, document) in enumerate(zip(scenes, documents, strict=True)):
            for _ in range(c.questions_per_image):
                if document:
                    kind = "document"
                    question, answer, region, _ = document_question(document, rng)
                    cells = _region_patches(region)
                else:
                    kind = rng.choices(scene_kinds, weights=scene_weights)[0]
                    question, answer, region, target = make_question(objects, kind, rng)
                locate = rng.random() < c.locate_share
                if locate:
                    answer = " ".join(str(v) for v in region.to_grid())
                    question = LOCATE_INSTRUCTION.format(question=question)
                if not document:
                    cells = [] if target is None else _grounding_patches(objects[target], kind, locate, targeted)
                inside = None
                if not locate and rng.random() < c.plc_share:
                    inside = jittered(region, c.plc_jitter, rng).token_mask(SIDE, SIDE)
                    cells = []  # the compressed tokens have no patch to ground on
                items.append(Item(image_index, question, answer, cells, kind, inside))
        return self._encode(batch, items)

    def _encode(self, batch: Batch, items: list[Item]) -> Batch:
        sequences, targets, queries, grounding = [], [], [], []
        for item in items:
            count = SIDE * SIDE if item.inside is None else self.compressor.output_count(item.inside)
            prompt = build_prompt(self.processor, item.question).replace("<image>", "<image>" * count)
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = self.tokenizer(item.answer, add_special_tokens=False)["input_ids"]
            answer_ids.append(self.tokenizer.eos_token_id)
            sequences.append(prompt_ids + answer_ids)
            targets.append([-100] * len(prompt_ids) + answer_ids)
            queries.append(len(prompt_ids) - 1)
            image_start = prompt_ids.index(self.image_token)
            grounding.append([image_start + cell for cell in item.cells])
        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id
        batch.input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
        batch.attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
        batch.targets = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
        batch.query_position = torch.tensor(queries)
        batch.image_index = torch.tensor([item.image_index for item in items])
        batch.grounding = grounding
        batch.kinds = [item.kind for item in items]
        batch.regions = [item.inside for item in items]
        return batch

    def _save(self) -> None:
        self.model.save_pretrained(self.out / "model")
        self.processor.save_pretrained(self.out / "model")
        (self.out / "model" / "crop_localizer.json").write_text(json.dumps({"instruction": LOCATE_INSTRUCTION}))
        (self.out / "model" / TASK_FILE).write_text(json.dumps({"task": self.config.task}))
        if self.compressor is not None:
            self.compressor.save_pretrained(self.out / "model")
        state = {
            "step": self.step,
            "elapsed": self.elapsed,
            "heads": self.heads.state_dict(),
            "vision_optimizer": self.vision_optimizer.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "model": self.model.state_dict(),
            "compressor": None if self.compressor is None else self.compressor.state_dict(),
        }
        torch.save(state, self.out / "state.tmp")
        (self.out / "state.tmp").replace(self.out / "state.pt")

    def _load(self) -> None:
        state = torch.load(self.out / "state.pt", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.heads.load_state_dict(state["heads"])
        self.vision_optimizer.load_state_dict(state["vision_optimizer"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.compressor is not None:
            self.compressor.load_state_dict(state["compressor"])
        self.step, self.elapsed = state["step"], state["elapsed"]

    def _log(self, record: dict) -> None:
        record = {"elapsed_s": round(self.elapsed, 1), **record}
        with open(self.out / "log.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")


def shared_prefix_length(input_ids: torch.Tensor, image_token: int) -> int:
    """Length of the prompt prefix up to the last visual token when every row shares it, else 0."""
    visual = (input_ids == image_token).int()
    ends = visual.shape[1] - visual.flip(1).argmax(1)
    if visual.sum(1).min() == 0 or (ends != ends[0]).any():
        return 0
    prefix = int(ends[0])
    return prefix if bool((input_ids[:, :prefix] == input_ids[:1, :prefix]).all()) else 0


def jittered(region: Region, blocks: int, rng: random.Random) -> Region:
    """`region` with each side of its 8x8-grid box moved by up to `blocks` blocks (kept on the grid, non-empty)."""
    x0, y0, x1, y1 = region.to_grid()
    x0, y0 = (min(max(0, v + rng.randint(-blocks, blocks)), 7) for v in (x0, y0))
    x1, y1 = (min(max(lo, v + rng.randint(-blocks, blocks)), 7) for lo, v in ((x0, x1), (y0, y1)))
    return Region.from_grid([x0, y0, x1, y1])


def _region_patches(region: Region) -> list[int]:
    """The patches of `region`'s 8x8-grid box on the 16x16 patch grid, in raster order."""
    mask = region.token_mask(SIDE, SIDE)
    return torch.nonzero(mask.flatten()).flatten().tolist()


def _grounding_patches(obj: SceneObject, kind: str, locate: bool, targeted: bool) -> list[int]:
    """Where the last prompt token should look: the tag patch to read a digit, the object's cell otherwise
    (before `targeted`: the cell for digits too, nothing for "is there" questions)."""
    if not targeted and kind == "wide":
        return []
    box = obj.tag_box if kind == "detail" and not locate and targeted else obj.box
    x0, y0, x1, y1 = (v // PATCH for v in box)
    return [row * SIDE + col for row in range(y0, y1) for col in range(x0, x1)]


@torch.no_grad()
def evaluate_teacher_forced(trainer: Trainer, count: int, split: str = "val") -> dict[str, float]:
    """Fast accuracy on `count` samples of a split: first answer token (questions) and all 4 box tokens (locate)."""
    model = trainer.model.eval()
    result: dict[str, list[float]] = {}
    for start in range(0, count, 32):
        samples = [make_sample(split, i, trainer.config.task) for i in range(start, min(count, start + 32))]
        batch = Batch(pixel_values([s.image for s in samples]), {})
        items = [Item(i, s.question, s.answer, [], s.kind) for i, s in enumerate(samples)]
        items += [
            Item(
                i, LOCATE_INSTRUCTION.format(question=s.question), " ".join(map(str, s.region.to_grid())), [], "locate"
            )
            for i, s in enumerate(samples)
        ]
        batch = trainer._encode(batch, items)
        with trainer.autocast():
            features = trainer._features(batch.pixel_values)
            embeds = model.get_input_embeddings()(batch.input_ids)
            visual = batch.input_ids == trainer.image_token
            embeds = embeds.masked_scatter(visual[..., None], trainer._visual_tokens(batch, features).to(embeds.dtype))
            logits = model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits.float()
        predicted = logits[:, :-1].argmax(-1)
        targets = batch.targets[:, 1:]
        for row, kind in enumerate(batch.kinds):
            answer = targets[row] != -100
            answer[targets[row] == trainer.tokenizer.eos_token_id] = False
            correct = bool((predicted[row][answer] == targets[row][answer]).all())
            result.setdefault(kind, []).append(float(correct))
    summary = {kind: sum(v) / len(v) for kind, v in result.items()}
    answers = [x for kind, v in result.items() if kind != "locate" for x in v]
    summary["answer_all"] = sum(answers) / len(answers)
    model.train()
    return summary

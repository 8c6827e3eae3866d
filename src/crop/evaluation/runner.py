"""`crop eval`: one model, method and budget on one benchmark; batched, resumable, sharded over processes.

A run lives in one folder: `config.json` (what is being run), `shard-<rank>.jsonl` (each process appends its
records as batches finish, so a crashed run loses at most the batch in flight and a rerun skips what is done),
then `predictions.jsonl` (all records in benchmark order), `summary.json` and `summary.md`, written by rank 0.
Under `torchrun` or `accelerate launch` each process takes every world-size-th sample; the merged results do not
depend on the number of processes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from crop.errors import ConfigError, CropError
from crop.evaluation.tasks import EvalSample, Task, get_task
from crop.image import load_image

logger = logging.getLogger(__name__)

FULL = "full"
"""The method name of the unpruned reference run."""


@dataclass
class RunConfig:
    """Everything that determines a run's results (`batch_size` and `limit` only change how it gets there)."""

    model: str
    bench: str
    data: str
    split: str | None = None
    method: str = "crop"
    budget: int | None = None
    layer: int = 2
    plc_ratio: int | None = None
    learned_plc: str | None = None
    """Folder of a learned PLC compressor for method crop (e.g. `crop train plc`'s final/)."""
    clip: str | None = None
    """CLIP checkpoint whose text tower CDPruner reads the question with."""
    localizer: str = "attention"
    """"attention" (the model's own early-layer attention), a grid-box localizer VLM's path, or "none"."""
    max_new_tokens: int = 16
    attn: str = "sdpa"
    dtype: str = "float32"
    batch_size: int = 8
    limit: int | None = None

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the records already written; local paths compare resolved
        (a trailing slash or a relative path names the same folder)."""
        identity = {k: v for k, v in asdict(self).items() if k not in ("batch_size", "limit")}
        if identity["clip"] is None:  # runs written before the setting existed resume
            del identity["clip"]
        for key in ("model", "data", "learned_plc", "localizer", "clip"):
            if key not in identity:
                continue
            value = identity[key]
            if isinstance(value, str) and value and Path(value).exists():
                identity[key] = str(Path(value).resolve())
        return identity

    @property
    def label(self) -> str:
        budget = "region" if self.budget is None else str(self.budget)
        plc = f"+plc{self.plc_ratio}" if self.plc_ratio else ("+learned-plc" if self.learned_plc else "")
        return self.method if self.method == FULL else f"{self.method}{plc}@{budget}"


def run(config: RunConfig, out: str | Path, model: Any = None, processor: Any = None) -> dict[str, Any] | None:
    """Run (or resume) `config` into the folder `out`; returns the summary on rank 0, None on other ranks.

    `model` and `processor` may be given already loaded; otherwise `config.model` is loaded.
    """
    from accelerate import PartialState

    from crop.strategies.registry import build_method

    state = PartialState(cpu=not torch.cuda.is_available())  # CPU-only processes join with gloo
    out = Path(out)
    task = get_task(config.bench)
    # the settings are checked before any sample or model is read
    build_method(config.method, budget=config.budget, layer=config.layer, plc_ratio=config.plc_ratio,
                 learned_plc=config.learned_plc, clip=config.clip)  # fmt: skip
    samples = _samples(task, config)
    if state.is_main_process:
        _claim(out, config)
    state.wait_for_everyone()
    done = set(read_records(out))
    mine = [(i, s) for i, s in enumerate(samples) if i % state.num_processes == state.process_index]
    todo = [(i, s) for i, s in mine if s.id not in done]
    if todo:
        if model is None:
            from crop.loading import load_model

            model, processor = load_model(config.model, attn_implementation=config.attn, dtype=config.dtype)
            model.to(state.device)
        _answer_all(task, config, model, processor, todo, out / f"shard-{state.process_index}.jsonl", state)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return _summarise(task, config, samples, out)


MALFORMED = (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError, AttributeError, ValueError)
"""What reading a copy whose files are not of the benchmark's structure raises (a file cut short, a list where a
table was expected, a missing column...): turned into one `ConfigError` naming the copy and the accepted forms."""


def _samples(task: Task, config: RunConfig) -> list[EvalSample]:
    samples = []
    try:
        for sample in task.samples(config.data, config.split):
            if config.limit is not None and len(samples) >= config.limit:
                break
            samples.append(sample)
    except CropError:
        raise
    except OSError as exc:
        raise ConfigError(f"{task.name}: cannot read {config.data}: {exc}") from exc
    except MALFORMED as exc:
        raise ConfigError(
            f"{task.name}: {config.data} is not a readable copy of the benchmark ({type(exc).__name__}: {exc}). "
            f"{task.formats()}"
        ) from exc
    if not samples:
        raise ConfigError(f"{task.name}: no samples in {config.data} (split {config.split or 'default'})")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{task.name}: sample ids repeat in {config.data}; a run needs unique ids to resume")
    return samples


def _claim(out: Path, config: RunConfig) -> None:
    """Create the run folder, or check that the one there holds the same run (refusing to mix results) and that
    a `limit` would not overwrite the summary of a larger run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the run folder {out}: {exc.strerror or exc}") from exc
    path = out / "config.json"
    previous = _read_config(path) if path.is_file() else None
    if previous is None and path.is_file() and any(out.glob("shard-*.jsonl")):
        raise ConfigError(f"{path} is unreadable but the folder holds answers; give another --out folder")
    if previous is not None:
        if previous.identity() != config.identity():
            changed = sorted(k for k, v in config.identity().items() if previous.identity().get(k) != v)
            raise ConfigError(
                f"{out} holds a run with other settings ({', '.join(changed)} differ); resume it with the same "
                "settings or give another --out folder"
            )
        summary = _read_json(out / "summary.json")
        if config.limit is not None and summary and summary.get("answered", 0) > config.limit:
            raise ConfigError(
                f"{out} holds a summary of {summary['answered']} answers; a run with --limit {config.limit} would "
                "replace it with a smaller one: give another --out folder"
            )
        if asdict(previous) == asdict(config):
            return
    write_atomic(path, json.dumps(asdict(config), indent=2) + "\n")


def _read_config(path: Path) -> RunConfig | None:
    """The run's saved settings, or None if the file is not a complete settings file."""
    saved = _read_json(path)
    try:
        return RunConfig(**{f.name: saved[f.name] for f in fields(RunConfig)}) if saved else None
    except (KeyError, TypeError):
        return None


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file renamed over it: a reader (or a kill) sees the old file or
    the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_records(out: Path) -> dict[str, dict]:
    """The records the run's shards hold, by sample id; a line cut short by a crash is ignored."""
    records = {}
    for shard in sorted(out.glob("shard-*.jsonl")):
        for line in shard.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("ignoring an incomplete line in %s (a crash while writing it)", shard)
                continue
            records[record["id"]] = record
    return records


def _pruned_model(config: RunConfig, model: Any, processor: Any) -> Any:
    """The model with the run's method attached (nothing pruned for `full`) and the run's localizer."""
    import crop
    from crop.localize.by_name import localizer_by_name
    from crop.strategies.registry import build_method

    method = build_method(
        config.method, budget=config.budget, layer=config.layer, plc_ratio=config.plc_ratio,
        learned_plc=config.learned_plc, clip=config.clip,
    )  # fmt: skip
    localizer = None
    if method.needs_region:
        localizer = localizer_by_name(config.localizer, model, processor, layer=config.layer)
        if localizer is None:
            raise ConfigError(f"{method.describe()} needs a region: use --localizer attention or a localizer path")
    return crop.apply(model, processor, localizer=localizer, method=method)


def _answer_all(
    task: Task,
    config: RunConfig,
    model: Any,
    processor: Any,
    todo: list[tuple[int, EvalSample]],
    shard: Path,
    state: Any,
) -> None:
    """Answer `todo` in batches, appending one record per sample to `shard` as each batch finishes."""
    pruned = _pruned_model(config, model, processor)
    bar = tqdm(total=len(todo), desc=f"{task.name} {config.label}", disable=not state.is_local_main_process)
    try:
        with shard.open("a", encoding="utf-8") as handle:
            if handle.tell() and not shard.read_bytes().endswith(b"\n"):
                handle.write("\n")  # end the line a crash cut short, so that it stays alone (and ignored)
            for start in range(0, len(todo), config.batch_size):
                batch = todo[start : start + config.batch_size]
                for record in _answer_batch(task, config, pruned, batch):
                    handle.write(json.dumps(record) + "\n")
                handle.flush()
                bar.update(len(batch))
    finally:
        pruned.remove()
        bar.close()


def _answer_batch(task: Task, config: RunConfig, pruned: Any, batch: list[tuple[int, EvalSample]]) -> list[dict]:
    samples = [sample for _, sample in batch]
    images = [load_image(sample.image) for sample in samples]
    request = pruned.prepare(images, [task.prompt(sample) for sample in samples]).to(pruned.model.device)
    length = request["input_ids"].shape[1]
    sequences, stats = pruned.generate(request, max_new_tokens=config.max_new_tokens, do_sample=False)
    texts = pruned.processor.batch_decode(sequences[:, length:], skip_special_tokens=True)
    records = []
    for (index, sample), text, row in zip(batch, texts, stats.rows, strict=True):
        prediction = text.strip()
        records.append(
            {
                "index": index,
                "id": sample.id,
                "prediction": prediction,
                "answers": sample.answers,
                "score": task.score(prediction, sample),
                "extra": sample.extra,
                "visual_tokens": row.kept_tokens,
                "average_visual_tokens": row.average_tokens,
                "region": None if row.region is None else list(row.region.to_grid()),
            }
        )
    return records


def _summarise(task: Task, config: RunConfig, samples: list[EvalSample], out: Path) -> dict[str, Any]:
    """Merge the shards in benchmark order and write predictions.jsonl, summary.json and summary.md."""
    by_id = read_records(out)
    records = [by_id[s.id] for s in samples if s.id in by_id]
    write_atomic(out / "predictions.jsonl", "".join(json.dumps(record) + "\n" for record in records))
    count = len(records)
    summary = {
        "config": asdict(config),
        "label": config.label,
        "metrics": task.aggregate(records),
        "metric": task.metric,
        "samples": len(samples),
        "answered": count,
        "complete": count == len(samples),
        "visual_tokens": sum(r["visual_tokens"] for r in records) / max(1, count),
        "average_visual_tokens": sum(r["average_visual_tokens"] for r in records) / max(1, count),
    }
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    from crop.evaluation.report import markdown_table

    write_atomic(out / "summary.md", markdown_table([summary]) + "\n")
    return summary

"""What every benchmark adapter shares: the sample record, reading local copies and the default prompt and summary.

A benchmark is read from a local copy only, in one of two forms: the benchmark's official published layout, or a
Hugging Face `datasets` copy with the column names of the copy lmms-eval evaluates (a `save_to_disk` folder, or a
folder or file of parquet files). Nothing is ever downloaded.
"""

from __future__ import annotations

import io
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from crop.errors import ConfigError

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
"""lmms-eval's default post_prompt of the short-answer tasks (textvqa, vqav2, docvqa, infovqa, gqa, pope yaml files)."""


@dataclass
class EvalSample:
    """One benchmark question: its image, the reference answers and whatever prompting or scoring needs besides."""

    id: str
    image: Any
    question: str
    answers: list[str]
    extra: dict = field(default_factory=dict)


def import_datasets() -> Any:
    """The `datasets` package (imported only for copies in its forms: it is slow to import), or a clear error
    where the evaluation extra is not installed."""
    try:
        import datasets
    except ImportError as exc:
        raise ConfigError(
            "reading a Hugging Face `datasets` copy (save_to_disk or parquet) needs the evaluation extra: "
            "pip install 'crop[eval]'"
        ) from exc
    return datasets


class Task:
    """One benchmark: reads a local copy, builds the question text for the model, scores answers and sums up a run.

    Subclasses set the class attributes and implement `official_samples` and `hub_sample` (or `hub_samples`).
    """

    name: str = ""
    metric: str = ""
    layout: str = ""
    """The official files, as error messages name them."""
    hub: str = ""
    """The Hugging Face dataset whose column names the `datasets` copy must have."""
    hub_config: str | None = None
    """Sub-folder of a clone of `hub` that holds this benchmark; used when `data` contains it."""
    hub_split: str = "test"
    """Split of a `datasets` copy read by default (lmms-eval's test_split)."""
    hub_columns: tuple[str, ...] = ()
    post_prompt: str = SHORT_ANSWER

    def samples(self, data: str | Path, split: str | None = None) -> Iterator[EvalSample]:
        """The benchmark's samples from the local copy at `data`, read as they are iterated.

        `split` is named as the copy names it ("val" in TextVQA's official files, "validation" in lmms-lab/textvqa);
        None reads the task's default. Files and splits are checked before the iterator is returned.
        """
        root = Path(data)
        if not root.exists():
            raise self.missing(root)
        if self.hub_config and (root / self.hub_config).is_dir():
            root = root / self.hub_config
        copy = HubCopy.open(root)
        if copy is not None:
            return self.hub_samples(copy, split)
        if not root.is_dir():
            raise ConfigError(f"{self.name}: {root} is neither a folder nor a parquet file. {self.formats()}")
        return self.official_samples(root, split)

    def official_samples(self, root: Path, split: str | None) -> Iterator[EvalSample]:
        """Samples from the official layout under `root`; files are opened before the iterator is returned."""
        raise NotImplementedError

    def hub_samples(self, copy: HubCopy, split: str | None) -> Iterator[EvalSample]:
        """Samples from a `datasets` copy, one per row of the chosen split."""
        rows = copy.rows(split, self.hub_split, self)
        return (self.hub_sample(row, index) for index, row in enumerate(rows))

    def hub_sample(self, row: dict, index: int) -> EvalSample:
        """The sample of one row of a `datasets` copy (`index`: the row's position in its split)."""
        raise NotImplementedError

    def prompt(self, sample: EvalSample) -> str:
        """The question text given to the model: no image token and no chat template."""
        return f"{sample.question}{self.post_prompt}"

    def score(self, prediction: str, sample: EvalSample) -> float:
        """The score in [0, 1] of one answer."""
        raise NotImplementedError

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        """The run's summary; records hold id, prediction, answers, score and extra; the headline is under "score"."""
        return {"score": mean(record["score"] for record in records), "count": len(records)}

    def shown(self, score: float) -> str:
        """The headline score as tables print it (a percentage by default)."""
        return f"{100 * score:.2f}"

    def formats(self) -> str:
        """The accepted forms of a local copy, for error messages."""
        return (
            f"Expected the official layout ({self.layout}) or a Hugging Face `datasets` copy of {self.hub} "
            "(a save_to_disk folder, or a folder or file of parquet files)."
        )

    def missing(self, path: Path) -> ConfigError:
        """The error for a missing file or folder."""
        return ConfigError(f"{self.name}: {path} not found. {self.formats()}")

    def find(self, root: Path, *names: str) -> Path:
        """The first of `names` (paths relative to `root`) that is a file."""
        for name in names:
            if (root / name).is_file():
                return root / name
        raise self.missing(root / names[0])

    def read_json(self, root: Path, *names: str) -> Any:
        """The content of the first of `names` that exists under `root`."""
        return load_json(self.find(root, *names))

    def read_json_lines(self, root: Path, name: str) -> list[dict]:
        """The records of a JSON-lines file under `root`."""
        path = self.find(root, name)
        with path.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def folder(self, path: Path) -> Path:
        """`path`, which must be a folder (of images)."""
        if not path.is_dir():
            raise self.missing(path)
        return path

    def choose(self, split: str | None, available: Iterable[str], default: str) -> str:
        """`split` (or `default`), which must be one of `available`."""
        chosen, names = split or default, sorted(available)
        if chosen not in names:
            raise ConfigError(f"{self.name}: no split {chosen!r}; available: {', '.join(names)}")
        return chosen

    def parts(self, split: str | None, names: tuple[str, ...]) -> tuple[str, ...]:
        """The named parts `split` selects: one of `names`, or all of them when `split` is None."""
        if split is None:
            return names
        return (self.choose(split, names, split),)


class HubCopy:
    """A local Hugging Face `datasets` copy: split name -> a `datasets.Dataset` (save_to_disk) or parquet files."""

    def __init__(self, path: Path, splits: dict[str, Any]):
        self.path = path
        self.splits = splits

    @classmethod
    def open(cls, path: Path) -> HubCopy | None:
        """The copy at `path`, or None when `path` is not a save_to_disk folder and holds no parquet file.

        Parquet files are looked for in `path` and its sub-folders (a Hub clone keeps them in data/ or a config's
        folder) and grouped into splits by the name before the first "-", as on the Hub
        ("validation-00000-of-00004.parquet" is in split "validation").
        """
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            datasets = import_datasets()
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                return cls(path, dict(loaded))
            return cls(path, {str(loaded.split or "default"): loaded})
        if path.is_dir():
            files = sorted([*path.glob("*.parquet"), *path.glob("*/*.parquet")])
        else:
            files = [path] if path.suffix == ".parquet" else []
        if not files:
            return None
        splits: dict[str, Any] = defaultdict(list)
        for file in files:
            splits[file.stem.split("-")[0]].append(str(file))
        return cls(path, dict(splits))

    def load(self, split: str | None, default: str, task: Task, columns: tuple[str, ...] | None = None) -> Any:
        """The dataset of `split` (or `default`; a copy with one split needs none), checked for the task's columns."""
        datasets = import_datasets()

        name = split or default
        if name not in self.splits:
            if split is not None or len(self.splits) != 1:
                raise ConfigError(f"{task.name}: no split {name!r} in {self.path}; available: {', '.join(self.splits)}")
            name = next(iter(self.splits))
        dataset = self.splits[name]
        if isinstance(dataset, list):
            dataset = datasets.load_dataset("parquet", data_files={name: dataset}, split=name, streaming=True)
        needed = task.hub_columns if columns is None else columns
        absent = [column for column in needed if column not in (dataset.column_names or [])]
        if absent:
            raise ConfigError(
                f"{task.name}: split {name!r} of {self.path} lacks the columns {', '.join(absent)} "
                f"(has {', '.join(dataset.column_names or [])}); "
                f"expected the columns of {task.hub}: {', '.join(needed)}"
            )
        if isinstance((dataset.features or {}).get("image"), datasets.Image):
            dataset = dataset.cast_column("image", datasets.Image(decode=False))
        return dataset

    def rows(self, split: str | None, default: str, task: Task) -> Iterator[dict]:
        """The rows of a split (see `load`), each image as a lazily decoded PIL image (or its path, or None)."""
        return iter_rows(self.load(split, default, task))


def load_json(path: Path) -> Any:
    """The content of a JSON file."""
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def iter_rows(dataset: Iterable[dict]) -> Iterator[dict]:
    """The rows of a dataset loaded by `HubCopy.load`, with undecoded images turned into lazily decoded ones."""
    for row in dataset:
        image = row.get("image")
        if isinstance(image, dict):
            row["image"] = Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else image.get("path")
        yield row


def mean(values: Iterable[float]) -> float:
    """The mean, or NaN for no values."""
    values = list(values)
    return statistics.fmean(values) if values else math.nan


def means_by(records: list[dict], key: str) -> dict[str, float]:
    """The mean score of the records grouped by `record["extra"][key]`."""
    groups: dict[str, list[float]] = defaultdict(list)
    for record in records:
        groups[str(record["extra"][key])].append(record["score"])
    return {group: mean(scores) for group, scores in groups.items()}


def as_list(answers: str | list[str]) -> list[str]:
    """Reference answers as a list (some files store a single answer as a bare string)."""
    return [answers] if isinstance(answers, str) else [str(answer) for answer in answers]

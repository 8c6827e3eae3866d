"""Benchmark adapters of the evaluation harness, by name: read a local copy, prompt, score, sum up."""

from __future__ import annotations

from crop.errors import ConfigError
from crop.evaluation.tasks.base import EvalSample, Task
from crop.evaluation.tasks.chartqa import ChartQA
from crop.evaluation.tasks.docvqa import DocVQA
from crop.evaluation.tasks.gqa import GQA
from crop.evaluation.tasks.infovqa import InfoVQA
from crop.evaluation.tasks.mmbench import MMBench
from crop.evaluation.tasks.mme import MME
from crop.evaluation.tasks.mmmu import MMMU
from crop.evaluation.tasks.ocrbench import OCRBench
from crop.evaluation.tasks.pope import POPE
from crop.evaluation.tasks.scienceqa import ScienceQA
from crop.evaluation.tasks.seedbench import SEEDBench
from crop.evaluation.tasks.textvqa import TextVQA
from crop.evaluation.tasks.vqav2 import VQAv2

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        TextVQA(), DocVQA(), InfoVQA(), ChartQA(), GQA(), VQAv2(), POPE(), ScienceQA(), OCRBench(), MME(), SEEDBench(),
        MMBench(), MMMU(),
    )
}


def get_task(name: str) -> Task:
    """The task called `name`, or a `ConfigError` listing the known ones."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "EvalSample", "Task", "get_task"]

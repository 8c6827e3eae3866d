"""Methods by name, so that a comparison is a loop over names: `crop methods` lists them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from crop.errors import ConfigError
from crop.strategies.base import Method
from crop.strategies.crop_fused import FusedCROP
from crop.strategies.crop_method import CROP
from crop.strategies.fastv import FastV
from crop.strategies.ilp import ILP
from crop.strategies.learned_plc import LearnedPLC
from crop.strategies.plc import PLC
from crop.strategies.pooling import UniformPooling
from crop.strategies.pyramid_drop import PyramidDrop
from crop.strategies.random_select import RandomSelection
from crop.strategies.sparsevlm import SparseVLM
from crop.strategies.visionzip import VisionZip


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str
    acts: str
    needs_budget: bool
    build: Callable[..., Method]


def _crop(budget: int | None, layer: int, plc: PLC | LearnedPLC | None, seed: int) -> Method:
    ilp = None if layer < 0 else ILP(layer)
    if budget is not None and plc is None:
        return CROP(ilp, budget=budget)
    return CROP(ilp, plc, budget=budget)


METHODS: dict[str, MethodInfo] = {
    info.name: info
    for info in (
        MethodInfo("crop", "contextual region: ILP drops outside tokens at layer K, PLC pools them before the LLM",
                   "inside the LLM at K and/or before it", False, _crop),
        MethodInfo("crop-fused", "CROP whose region comes from layer K-1's question attention in the same prefill",
                   "inside the LLM at K", False,
                   lambda budget, layer, plc, seed: FusedCROP(layer=layer, budget=budget)),
        MethodInfo("fastv", "top-N by the last token's attention at layer K-1, dropped from layer K",
                   "inside the LLM at K", True,
                   lambda budget, layer, plc, seed: FastV(budget=budget, layer=layer)),
        MethodInfo("pyramiddrop", "staged: at several layers keep the top share by last-token attention",
                   "inside the LLM at several layers", True,
                   lambda budget, layer, plc, seed: PyramidDrop(budget=budget)),
        MethodInfo("sparsevlm", "staged: text raters' attention ranks tokens, dropped ones recycled into merged tokens",
                   "inside the LLM at several layers", True,
                   lambda budget, layer, plc, seed: SparseVLM(budget)),
        MethodInfo("visionzip", "dominant tokens by the vision CLS attention plus merged contextual tokens",
                   "before the LLM", True, lambda budget, layer, plc, seed: VisionZip(budget)),
        MethodInfo("random", "N tokens drawn at random (seeded)", "before the LLM", True,
                   lambda budget, layer, plc, seed: RandomSelection(budget, seed=seed)),
        MethodInfo("pool", "the grid average-pooled down to N tokens (image downsampling)", "before the LLM", True,
                   lambda budget, layer, plc, seed: UniformPooling(budget)),
    )
}  # fmt: skip


def build_method(
    name: str,
    budget: int | None = None,
    layer: int = 2,
    plc_ratio: int | None = None,
    seed: int = 0,
    learned_plc: str | Path | None = None,
) -> Method:
    """The method `name` with its settings; `budget` is the number of visual tokens kept (all but `crop` need it).

    For `crop`, a negative `layer` disables ILP, `plc_ratio` adds pooling PLC and `learned_plc` (a folder holding
    `learned_plc.json` and its weights, as `crop train plc` and `crop synth train` save them) the learned PLC; with
    a budget and no ILP, the learned compressor's output is capped at the budget.
    """
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    info = METHODS[name]
    if info.needs_budget and budget is None:
        raise ConfigError(f"method {name!r} needs a budget: the number of visual tokens to keep")
    if name != "crop" and (plc_ratio or learned_plc):
        raise ConfigError(f"PLC settings (plc ratio, learned PLC) apply to method crop only, not {name!r}")
    if plc_ratio and learned_plc:
        raise ConfigError("give either a PLC pooling ratio or a learned PLC compressor, not both")
    plc = PLC(ratio=plc_ratio) if plc_ratio else (LearnedPLC.from_pretrained(learned_plc) if learned_plc else None)
    return info.build(budget=budget, layer=layer, plc=plc, seed=seed)

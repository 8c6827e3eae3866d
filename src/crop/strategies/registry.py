"""Methods by name, the one list of them: `crop methods`, `crop ask/demo/eval`, `crop bench`, `crop synth eval`,
the lmms-eval bridge and the web demo all read it, so a method registered here appears in each of them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from crop.errors import ConfigError
from crop.strategies.base import Method
from crop.strategies.cdpruner import CDPruner
from crop.strategies.crop_fused import FusedCROP
from crop.strategies.crop_method import CROP
from crop.strategies.dart import DART
from crop.strategies.divprune import DivPrune
from crop.strategies.fastv import FastV
from crop.strategies.full import Full
from crop.strategies.holov import HoloV
from crop.strategies.ilp import ILP
from crop.strategies.learned_plc import LearnedPLC
from crop.strategies.plc import PLC
from crop.strategies.pooling import UniformPooling
from crop.strategies.pyramid_drop import PyramidDrop
from crop.strategies.random_select import RandomSelection
from crop.strategies.sparsevlm import SparseVLM
from crop.strategies.visionzip import VisionZip


@dataclass(frozen=True)
class MethodSettings:
    """What a command line can say about a method: its budget, layer K (negative: no ILP, for crop), a PLC for
    crop, and a seed."""

    budget: int | None = None
    layer: int = 2
    plc: PLC | LearnedPLC | None = None
    seed: int = 0
    clip: str | Path | None = None
    """CDPruner: the CLIP checkpoint whose text tower reads the question."""


@dataclass(frozen=True)
class MethodInfo:
    """A named method: what it does and where it acts (for listings), whether it needs a budget (`budget_help`
    says more where the budget is optional), how to build it from `MethodSettings`, and `tables`: "budget" for a
    row per budget in the comparison tables (`crop bench`, `crop synth eval`), "own" where those tables write its
    rows themselves, "none" to leave it out."""

    name: str
    summary: str
    acts: str
    needs_budget: bool
    build: Callable[[MethodSettings], Method]
    tables: str = "budget"
    budget_help: str = ""

    @property
    def budget_note(self) -> str:
        return self.budget_help or ("needs --budget" if self.needs_budget else "takes no budget")


METHODS: dict[str, MethodInfo] = {}


def register_method(info: MethodInfo) -> MethodInfo:
    """Add a method under `info.name` (a name already taken is refused)."""
    if info.name in METHODS:
        raise ConfigError(f"a method named {info.name!r} is already registered")
    if info.tables not in ("budget", "own", "none"):
        raise ConfigError(f"method {info.name!r}: tables must be 'budget', 'own' or 'none', got {info.tables!r}")
    METHODS[info.name] = info
    return info


def unregister_method(name: str) -> None:
    """Remove the method `name` (for tests and plugins that registered one for a while)."""
    METHODS.pop(name, None)


def table_methods() -> list[str]:
    """The methods the comparison tables run at each budget, by name."""
    return [info.name for info in METHODS.values() if info.tables == "budget"]


def _crop(settings: MethodSettings) -> Method:
    ilp = None if settings.layer < 0 else ILP(settings.layer)
    if settings.budget is not None and settings.plc is None:
        return CROP(ilp, budget=settings.budget)
    return CROP(ilp, settings.plc, budget=settings.budget)


for _info in (
    MethodInfo("full", "no pruning: every visual token at every layer (the reference)", "nowhere", False,
               lambda s: Full(), tables="own"),
    MethodInfo("crop", "contextual region: ILP drops outside tokens at layer K, PLC pools them before the LLM",
               "inside the LLM at K and/or before it", False, _crop, tables="own",
               budget_help="region-sized (or --budget)"),
    MethodInfo("crop-fused", "CROP whose region comes from layer K-1's question attention in the same prefill",
               "inside the LLM at K", False, lambda s: FusedCROP(layer=s.layer, budget=s.budget), tables="own",
               budget_help="region-sized (or --budget)"),
    MethodInfo("fastv", "top-N by the last token's attention at layer K-1, dropped from layer K",
               "inside the LLM at K", True, lambda s: FastV(budget=s.budget, layer=s.layer)),
    MethodInfo("pyramiddrop", "staged: at several layers keep the top share by last-token attention",
               "inside the LLM at several layers", True, lambda s: PyramidDrop(budget=s.budget)),
    MethodInfo("pyramiddrop-authors", "PyramidDrop as its authors' code ranks: with each stage's first layer, "
               "positions renumbered after each drop (LLaVA families)", "inside the LLM at several layers", True,
               lambda s: PyramidDrop.authors(budget=s.budget)),
    MethodInfo("sparsevlm", "staged: text raters' attention ranks tokens, dropped ones recycled into merged tokens",
               "inside the LLM at several layers", True, lambda s: SparseVLM(s.budget)),
    MethodInfo("sparsevlm-authors", "SparseVLM as its authors' code runs: their count tables (the budget a layer "
               "average), positions renumbered, merged tokens after the kept ones (LLaVA families; budgets 192, "
               "128, 96, 64 of 576, scaled)", "inside the LLM at several layers", True,
               lambda s: SparseVLM.authors(s.budget)),
    MethodInfo("visionzip", "dominant tokens by the vision CLS attention plus merged contextual tokens",
               "before the LLM", True, lambda s: VisionZip(s.budget)),
    MethodInfo("divprune", "the N most diverse projected tokens (greedy max-min cosine distance)", "before the LLM",
               True, lambda s: DivPrune(s.budget)),
    MethodInfo("dart", "at layer K, 8 pivot tokens and the visual tokens least similar to them (no attention "
               "weights)", "inside the LLM at K", True, lambda s: DART(s.budget, layer=s.layer)),
    MethodInfo("cdpruner", "the N tokens a conditional DPP picks: diverse and relevant to the question (CLIP text "
               "tower; --clip)", "before the LLM", True, lambda s: CDPruner(s.budget, clip=s.clip), tables="none"),
    MethodInfo("holov", "the budget shared over bands of the image by CLS attention and similarity variance, "
               "the most-attended tokens of each band (LLaVA-1.5)", "before the LLM", True, lambda s: HoloV(s.budget)),
    MethodInfo("random", "N tokens drawn at random (seeded)", "before the LLM", True,
               lambda s: RandomSelection(s.budget, seed=s.seed)),
    MethodInfo("pool", "the grid average-pooled down to N tokens (image downsampling)", "before the LLM", True,
               lambda s: UniformPooling(s.budget)),
):  # fmt: skip
    register_method(_info)


def build_method(
    name: str,
    budget: int | None = None,
    layer: int = 2,
    plc_ratio: int | None = None,
    seed: int = 0,
    learned_plc: str | Path | None = None,
    clip: str | Path | None = None,
) -> Method:
    """The method `name` with its settings; `budget` is the number of visual tokens kept (methods that need one).

    For `crop`, a negative `layer` disables ILP, `plc_ratio` adds pooling PLC and `learned_plc` (a folder holding
    `learned_plc.json` and its weights, as `crop train plc` and `crop synth train` save them) the learned PLC; with
    a budget and no ILP, the learned compressor's output is capped at the budget. `clip` is the CLIP checkpoint
    of `cdpruner`.
    """
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    info = METHODS[name]
    if info.needs_budget and budget is None:
        raise ConfigError(f"method {name!r} needs a budget: the number of visual tokens to keep")
    if name != "crop" and (plc_ratio or learned_plc):
        raise ConfigError(f"PLC settings (plc ratio, learned PLC) apply to method crop only, not {name!r}")
    if clip is not None and name != "cdpruner":
        raise ConfigError(f"a CLIP checkpoint (--clip) applies to method cdpruner only, not {name!r}")
    if plc_ratio and learned_plc:
        raise ConfigError("give either a PLC pooling ratio or a learned PLC compressor, not both")
    plc = PLC(ratio=plc_ratio) if plc_ratio else (LearnedPLC.from_pretrained(learned_plc) if learned_plc else None)
    return info.build(MethodSettings(budget=budget, layer=layer, plc=plc, seed=seed, clip=clip))

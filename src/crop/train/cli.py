"""The `crop data` and `crop train` commands: every training setting is a flag, read over an optional JSON file."""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

COMMANDS = {"data": "build training data", "train": "training recipes for real models"}


def add_stubs(commands: Any) -> None:
    """`crop data` and `crop train` as names with their help only: their flags come from the training settings,
    whose modules import torch, so they are built (`add_commands`) only when one of them is asked for."""
    for name, text in COMMANDS.items():
        commands.add_parser(name, help=text)


def add_commands(commands: Any) -> None:
    """Add `crop data build-regions`, `crop train localizer` and `crop train plc` to the `crop` subcommands."""
    from crop.train.localizer import LocalizerTrainConfig
    from crop.train.plc import PLCTrainConfig
    from crop.train.regions import DEFAULT_MARGIN, SOURCES

    data = commands.add_parser("data", help=COMMANDS["data"]).add_subparsers(required=True, metavar="DATA_COMMAND")
    build = data.add_parser(
        "build-regions", help="answer regions on the 8x8 grid from datasets with OCR or object boxes (JSONL + stats)"
    )
    build.add_argument("--source", required=True, choices=sorted(SOURCES))
    build.add_argument("--data", required=True, type=Path, help="the dataset's local folder (or JSONL file)")
    build.add_argument("--out", required=True, type=Path, help="JSONL to write; statistics go to OUT.stats.json")
    build.add_argument("--split", default="train")
    build.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="share of the image added on each side")
    build.add_argument("--limit", type=int, help="read at most this many questions")
    build.set_defaults(run=_run_build_regions)

    train = commands.add_parser("train", help=COMMANDS["train"]).add_subparsers(
        required=True, metavar="TRAIN_COMMAND"
    )
    for name, config_class, text in (
        ("localizer", LocalizerTrainConfig, "fine-tune a VLM to answer the grid box of the answer's region"),
        ("plc", PLCTrainConfig, "fine-tune a LLaVA-family VLM on PLC-compressed inputs (and a learned compressor)"),
    ):
        parser = train.add_parser(name, help=text)
        parser.add_argument("--config", type=Path, help="JSON file of settings; flags override it")
        for setting in fields(config_class):
            _add_setting(parser, setting)
        parser.set_defaults(run=_run_train, config_class=config_class, command=name)


def _add_setting(parser: argparse.ArgumentParser, setting: Any) -> None:
    """A flag for one dataclass field, typed by its default value (None leaves the file's or the default)."""
    default = setting.default_factory() if setting.default is MISSING else setting.default
    flag = "--" + setting.name.replace("_", "-")
    shown = f"default: {default!r}"
    if isinstance(default, bool):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=shown)
    elif isinstance(default, list):
        parser.add_argument(flag, nargs="+", default=None, help=shown)
    else:
        kind = str if default is None else type(default)
        parser.add_argument(flag, type=kind, default=None, help=shown)


def _run_build_regions(args: argparse.Namespace) -> int:
    from crop.train.regions import build_regions

    stats = build_regions(args.source, args.data, args.out, split=args.split, margin=args.margin, limit=args.limit)
    print(json.dumps(stats, indent=2))
    return 0


def _run_train(args: argparse.Namespace) -> int:
    overrides = {s.name: getattr(args, s.name) for s in fields(args.config_class)}
    config = args.config_class.from_file(args.config, **overrides)
    if args.command == "localizer":
        from crop.train.localizer import train_localizer

        report = train_localizer(config)
    else:
        from crop.train.plc import train_plc

        report = train_plc(config)
    summary = {key: value for key, value in report.items() if key != "losses"}
    losses = report.get("losses") or []
    if losses:
        summary["loss"] = {"first": losses[0], "last": losses[-1], "steps": len(losses)}
    print(json.dumps(summary, indent=2))
    return 0

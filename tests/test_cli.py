"""The `crop` command: `crop ask` on a saved checkpoint (real loading path) and `crop demo` offline."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import make_image
from PIL import Image

from crop.cli import main
from crop.testing.llava import save_tiny


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "scene.png"
    make_image().save(path)
    return path


def ask(model, image, *options: str) -> list[str]:
    """`crop ask` arguments for one question about `image` with `model`, plus `options`."""
    return ["ask", "--model", str(model), "--image", str(image), "--question", "what ?", *options]


def test_ask_writes_overlay(checkpoint, tmp_path, capsys):
    image_path = tmp_path / "scene.png"
    make_image(240, 180).save(image_path)
    overlay = tmp_path / "out" / "overlay.png"
    code = main(
        [
            "ask",
            "--model",
            str(checkpoint),
            "--image",
            str(image_path),
            "--question",
            "what colour ?",
            "--region",
            "0",
            "0",
            "3",
            "3",
            "--overlay",
            str(overlay),
            "--max-new-tokens",
            "3",
            "--compare",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "pruned answer" in out and "full answer" in out
    assert "144 in the image" in out and "36 kept after layer K" in out
    with Image.open(overlay) as drawn:
        assert drawn.size == (240, 180)


def test_ask_with_plc(checkpoint, image_path, capsys):
    code = main(
        ask(checkpoint, image_path, "--region", "0", "0", "3", "3", "--plc-ratio", "4", "--max-new-tokens", "2")
    )
    assert code == 0
    assert "44 into the LLM, 36 kept" in capsys.readouterr().out


def test_ask_with_a_learned_plc(image_path, capsys):
    """The shipped learned compressor, capped at 28 tokens (no ILP), and refused with ILP plus a budget."""
    from crop.synth.assets import SHIPPED_PLC_MODEL

    options = ["--region", "2", "2", "3", "3", "--learned-plc", str(SHIPPED_PLC_MODEL), "--max-new-tokens", "1"]
    assert main(ask(SHIPPED_PLC_MODEL, image_path, *options, "--no-ilp", "--budget", "28")) == 0
    assert "256 in the image, 28 into the LLM" in capsys.readouterr().out
    assert main(ask(SHIPPED_PLC_MODEL, image_path, *options, "--budget", "28")) == 2
    assert "budget applies to ILP alone" in capsys.readouterr().err
    assert main(ask(SHIPPED_PLC_MODEL, image_path, *options, "--method", "fastv", "--budget", "28")) == 2
    assert "apply to method crop only" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--image", "missing.png", "--region", "0", "0", "1", "1"], "image not found"),
        (["--image", "IMAGE", "--region", "0", "0", "9", "9"], "off the 8x8 grid"),
        (
            ["--image", "IMAGE", "--region", "0", "0", "1", "1", "--ilp-layer", "7"],
            "K must be an integer in 0..3",
        ),
    ],
)
def test_ask_bad_input_is_a_clear_error(checkpoint, image_path, capsys, argv, message):
    argv = [str(image_path) if a == "IMAGE" else a for a in argv]
    code = main(["ask", "--model", str(checkpoint), "--question", "what ?", *argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_ask_unloadable_model(tmp_path, image_path, capsys):
    code = main(ask(tmp_path / "no-model", image_path, "--region", "0", "0", "1", "1"))
    assert code == 2
    assert "cannot load a vision-language model" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_offline_as_a_command(tmp_path):
    """`crop demo` with the shipped synthetic-task model: a generated image, its localized region, the answers."""
    result = subprocess.run(
        [sys.executable, "-m", "crop.cli", "demo", "--overlay", str(tmp_path / "demo.png")],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert "pruned answer:" in result.stdout and "full answer:" in result.stdout
    assert "localized region: Region(grid=" in result.stdout
    assert "256 in the image" in result.stdout
    assert (tmp_path / "demo.png").is_file()


def test_ask_with_a_localizer_checkpoint(checkpoint, image_path, capsys):
    """`--localizer` loads a VLM with GridVLMLocalizer.from_pretrained; random weights make it fall back."""
    code = main(ask(checkpoint, image_path, "--localizer", str(checkpoint), "--max-new-tokens", "2"))
    out = capsys.readouterr().out
    assert code == 0
    assert "region: Region(" in out
    if "fallback" in out:
        assert "144 kept after layer K" in out


def test_methods_are_listed_and_selectable(checkpoint, image_path, capsys):
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    for name in ("crop", "fastv", "random", "pool"):
        assert name in listing
    base = ask(checkpoint, image_path, "--max-new-tokens", "2")
    assert main([*base, "--method", "fastv", "--budget", "20"]) == 0
    assert "20 kept after layer K" in capsys.readouterr().out
    assert main([*base, "--method", "pool", "--budget", "16"]) == 0
    assert "16 into the LLM" in capsys.readouterr().out
    assert main([*base, "--method", "random"]) == 2
    assert "needs a budget" in capsys.readouterr().err
    assert main([*base, "--method", "crop"]) == 0  # no region given: the default localizer finds one
    assert "localized region: Region(" in capsys.readouterr().out
    assert main([*base, "--method", "magic", "--budget", "3"]) == 2
    assert "unknown method 'magic'" in capsys.readouterr().err


@pytest.mark.parametrize("localizer", ["attention", "attention-fused"])
def test_ask_with_the_attention_localizer(checkpoint, image_path, capsys, localizer):
    """Both forms print the region they chose; the fused one names its method."""
    code = main(ask(checkpoint, image_path, "--localizer", localizer, "--max-new-tokens", "2"))
    out = capsys.readouterr().out
    assert code == 0
    assert "region: Region(" in out
    if localizer == "attention-fused":
        assert "CROP-fused" in out


def test_synth_train_defaults_are_the_training_config_defaults():
    """`crop synth train` keeps its defaults as literals (so `--help` needs no torch); they must match TrainConfig."""
    from dataclasses import fields

    from crop.cli import _parser
    from crop.synth.train import TrainConfig

    args = vars(_parser().parse_args(["synth", "train"]))
    shared = {f.name: f.default for f in fields(TrainConfig) if f.name in args}
    assert len(shared) >= 15
    assert {name: args[name] for name in shared} == shared

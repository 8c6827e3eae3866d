"""`crop ask` and `crop eval` on saved LLaVA-NeXT and Qwen2-VL checkpoints (the real loading path), every method
family by family, and a clear error where the processor cannot be loaded."""

from __future__ import annotations

import json

import pytest
from benchdata import write_benchmark
from conftest import make_image

from crop.cli import main
from crop.errors import UnsupportedModelError
from crop.loading import load_model
from crop.testing.llava_next import build_next_model, build_next_processor
from crop.testing.qwen2_vl import build_qwen_model, build_qwen_processor

BUILDERS = {
    "llava-next": (build_next_model, build_next_processor),
    "qwen2-vl": (build_qwen_model, build_qwen_processor),
}
OPTIONS = {
    "crop ILP": ["--region", "0", "0", "3", "7"],
    "crop budget": ["--region", "0", "0", "3", "7", "--budget", "6"],
    "crop K=0": ["--region", "0", "0", "3", "7", "--ilp-layer", "0"],
    "crop PLC": ["--region", "0", "0", "3", "7", "--plc-ratio", "2", "--no-ilp"],
    "attention localizer": ["--localizer", "attention"],
    "crop-fused": ["--method", "crop-fused", "--budget", "6"],
    "pool": ["--method", "pool", "--budget", "4"],
    "random": ["--method", "random", "--budget", "4"],
    "fastv": ["--method", "fastv", "--budget", "4"],
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def checkpoint(request, tmp_path_factory):
    build_model, build_processor = BUILDERS[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    build_model().save_pretrained(directory)
    build_processor().save_pretrained(directory)
    return directory


@pytest.mark.parametrize("name", list(OPTIONS))
def test_ask_runs_every_method(checkpoint, tmp_path, capsys, name):
    image = tmp_path / "wide.png"
    make_image(120, 60).save(image)
    command = ["ask", "--model", str(checkpoint), "--image", str(image), "--question", "what ?",
               "--max-new-tokens", "2"]  # fmt: skip
    assert main([*command, *OPTIONS[name], "--overlay", str(tmp_path / "overlay.png")]) == 0
    out = capsys.readouterr().out
    assert "pruned answer" in out and "visual tokens" in out
    assert (tmp_path / "overlay.png").is_file()


def test_visionzip_on_both_families(checkpoint, tmp_path, capsys):
    image = tmp_path / "wide.png"
    make_image(120, 60).save(image)
    command = ["ask", "--model", str(checkpoint), "--image", str(image), "--question", "what ?",
               "--method", "visionzip", "--budget", "6", "--max-new-tokens", "2"]  # fmt: skip
    code = main(command)
    captured = capsys.readouterr()
    if "qwen" in checkpoint.name:
        assert code == 2 and "no CLS token" in captured.err
    else:
        assert code == 0 and "6 into the LLM" in captured.out


@pytest.mark.parametrize("method", [["--method", "fastv", "--budget", "2"], ["--localizer", "attention"]])
def test_eval_runs_end_to_end(checkpoint, tmp_path, method):
    expected = write_benchmark("textvqa", tmp_path / "data", "official", count=2)
    out = tmp_path / "run"
    command = ["eval", "--model", str(checkpoint), "--bench", "textvqa", "--data", str(tmp_path / "data"),
               "--out", str(out), "--max-new-tokens", "2", "--batch-size", "2", *method]  # fmt: skip
    assert main(command) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [e["id"] for e in expected]


def test_a_processor_without_images_is_a_clear_error(tmp_path):
    """A processor class transformers cannot build comes back from AutoProcessor as the bare tokenizer: that is
    refused, saying why."""
    directory = tmp_path / "qwen"
    build_qwen_model().save_pretrained(directory)
    build_qwen_processor().save_pretrained(directory)
    for name in ("processor_config.json", "tokenizer_config.json"):
        config = json.loads((directory / name).read_text())
        config["processor_class"] = "UnknownProcessor"
        (directory / name).write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="UnknownProcessor.*without an image processor"):
        load_model(directory)

"""`crop train localizer` and `crop train plc` on tiny models: loss falls on a fixed batch, checkpoints reload,
runs resume, and the reloaded localizer answers in the grid format `GridVLMLocalizer` parses."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from crop.cli import main
from crop.errors import ConfigError, UnsupportedModelError
from crop.localize import GridVLMLocalizer
from crop.localize.grid_vlm import parse_grid_box
from crop.region import Region
from crop.strategies.learned_plc import LearnedPLC
from crop.testing.llava import save_tiny
from crop.train.localizer import LocalizerTrainConfig, train_localizer
from crop.train.plc import PLCTrainConfig, train_plc

ROWS = [
    ("what colour is the square ?", "red", [0, 0, 3, 3]),
    ("what digit is on the sign ?", "7", [4, 4, 7, 7]),
    ("what shape is on the left ?", "circle", [0, 2, 3, 5]),
    ("is there a triangle ?", "no", [2, 0, 7, 3]),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=3)


@pytest.fixture
def data(tmp_path):
    """Four images with a question, an answer and a grid box each, in the layout `crop data build-regions` writes."""
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    lines = []
    for index, (question, answer, grid) in enumerate(ROWS):
        colour = (60 * index, 200 - 40 * index, 90)
        Image.new("RGB", (200, 160), colour).save(folder / "images" / f"{index}.png")
        row = {"image": f"images/{index}.png", "question": question, "answer": answer, "grid": grid}
        lines.append(json.dumps(row))
    (folder / "regions.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "regions.jsonl"


@pytest.mark.slow
def test_localizer_learns_to_answer_grid_boxes_and_reloads(tiny_dir, data, tmp_path):
    config = LocalizerTrainConfig(
        data=str(data), eval_data=str(data), model=str(tiny_dir), out=str(tmp_path / "run"), lora=False,
        max_steps=40, lr=3e-3, batch_size=4, grad_accum=1, warmup_steps=0, log_every=1, save_every=20,
        answer_format="[{x0}, {y0}, {x1}, {y1}]",
    )  # fmt: skip
    report = train_localizer(config)
    losses = report["losses"]
    assert len(losses) == 40 and losses[-1] < 0.5 * losses[0]
    localizer = GridVLMLocalizer.from_pretrained(tmp_path / "run" / "final")
    image = Image.open(data.parent / "images" / "1.png")
    answer = localizer.ask(image, ROWS[1][0])
    assert parse_grid_box(answer) == Region.from_grid(ROWS[1][2]), answer  # memorised, in the grid format
    assert localizer.localize(image, ROWS[1][0]).fallback_reason is None
    assert report["eval"]["samples"] == 4 and report["eval"]["unparsable"] == 0.0
    assert (tmp_path / "run" / "final" / "crop_localizer.json").is_file()


@pytest.mark.slow
def test_localizer_with_lora_lowers_the_loss(tiny_dir, data, tmp_path):
    config = LocalizerTrainConfig(
        data=str(data), model=str(tiny_dir), out=str(tmp_path / "run"), lora=True, lora_rank=8,
        max_steps=12, lr=1e-2, batch_size=4, grad_accum=1, warmup_steps=0, log_every=1, eval_share=0.0,
    )  # fmt: skip
    losses = train_localizer(config)["losses"]
    assert losses[-1] < losses[0]
    reloaded = GridVLMLocalizer.from_pretrained(tmp_path / "run" / "final")
    assert not any("lora" in name for name, _ in reloaded.model.named_parameters())  # merged


@pytest.mark.slow
def test_localizer_on_qwen2_vl_in_memory(data, tmp_path):
    """The paper's localizer family: the Qwen2-VL processor's prompts and labels train (a saved tiny Qwen2-VL does
    not load back through AutoProcessor in transformers 5.24, so the loaded objects are passed in)."""
    from crop.testing.qwen2_vl import build_qwen_model, build_qwen_processor

    model, processor = build_qwen_model(), build_qwen_processor()
    config = LocalizerTrainConfig(
        data=str(data), eval_data=str(data), out=str(tmp_path / "run"), lora=True, lora_rank=8, max_steps=10,
        lr=1e-2, batch_size=4, grad_accum=1, warmup_steps=0, log_every=1,
    )  # fmt: skip
    report = train_localizer(config, model, processor)
    assert report["losses"][-1] < report["losses"][0]
    assert report["eval"]["samples"] == 4
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def plc_config(tiny_dir, data, out, **overrides) -> PLCTrainConfig:
    settings = dict(
        data=str(data), eval_data=str(data), model=str(tiny_dir), out=str(out), batch_size=4, grad_accum=1,
        warmup_steps=0, lr=1e-2, compressor_lr=1e-2, log_every=1, save_every=3, max_new_tokens=4,
    )  # fmt: skip
    return PLCTrainConfig(**{**settings, **overrides})


def test_plc_learned_with_lora_lowers_the_loss_reloads_and_resumes(tiny_dir, data, tmp_path):
    out = tmp_path / "run"
    report = train_plc(plc_config(tiny_dir, data, out, max_steps=6))
    losses = report["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert report["before"]["samples"] == report["after"]["samples"] == 4
    final = out / "final"
    compressor = LearnedPLC.from_pretrained(final)
    trained = json.loads((out / "train_config.json").read_text())
    assert (compressor.config.region_ratio, compressor.config.n_anchor) == (trained["region_ratio"], 4)
    assert torch.any(compressor.region_queries != 0)  # it trained
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_plc_run_resumes_mid_epoch(tiny_dir, data, tmp_path):
    """Two batches an epoch: stopped after step 5 (one batch into the third epoch), the rerun skips that batch
    and makes steps 6 to 8 only."""
    out = tmp_path / "run"
    first = train_plc(plc_config(tiny_dir, data, out, max_steps=5, batch_size=2))
    resumed = train_plc(plc_config(tiny_dir, data, out, max_steps=8, batch_size=2))
    assert len(resumed["losses"]) == 3
    assert "before" in first and "before" not in resumed  # measured once, before any training
    log = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6, 7, 8]


def test_plc_pool_form_trains_the_projector(tiny_dir, data, tmp_path):
    report = train_plc(plc_config(tiny_dir, data, tmp_path / "run", form="pool", llm="frozen", train_projector=True,
                                  max_steps=5, eval_data=None, eval_share=0.0))  # fmt: skip
    assert report["losses"][-1] < report["losses"][0]
    assert not (tmp_path / "run" / "final" / "learned_plc.json").exists()


def test_bad_training_settings_are_clear_errors(tiny_dir, data, tmp_path, capsys):
    with pytest.raises(ConfigError, match="nothing to train"):
        train_plc(plc_config(tiny_dir, data, tmp_path, form="pool", llm="frozen"))
    with pytest.raises(ConfigError, match="no region data"):
        train_plc(plc_config(tiny_dir, tmp_path / "missing.jsonl", tmp_path))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "x.png", "question": "q", "grid": [0, 0, 1, 1]}) + "\n")
    with pytest.raises(ConfigError, match="lacks answer"):
        train_plc(plc_config(tiny_dir, tmp_path / "bad.jsonl", tmp_path))
    from crop.testing.qwen2_vl import build_qwen_model
    from crop.train.plc import build_compressor

    with pytest.raises(UnsupportedModelError, match="one fixed visual token grid"):
        build_compressor(plc_config(tiny_dir, data, tmp_path), build_qwen_model())
    (tmp_path / "settings.json").write_text(json.dumps({"learning_rate": 1}))
    assert main(["train", "plc", "--config", str(tmp_path / "settings.json")]) == 2
    assert "unknown training settings" in capsys.readouterr().err


def test_command_line_reads_the_file_then_the_flags(tiny_dir, data, tmp_path, capsys):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"data": str(data), "model": str(tiny_dir), "max_steps": 99, "lr": 1e-2}))
    out = tmp_path / "run"
    argv = ["train", "plc", "--config", str(settings), "--out", str(out), "--max-steps", "2", "--batch-size", "4",
            "--grad-accum", "1", "--eval-share", "0", "--no-bf16", "--lora-targets", "q_proj", "v_proj"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["loss"]["steps"] == 2
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["max_steps"], saved["lr"], saved["lora_targets"]) == (2, 1e-2, ["q_proj", "v_proj"])


def test_build_regions_command(tmp_path, capsys):
    Image.new("RGB", (80, 80)).save(tmp_path / "page.png")
    row = {"image": "page.png", "question": "what is written ?", "answer": "stop", "boxes": [[0, 0, 20, 20]]}
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n")
    out = tmp_path / "regions.jsonl"
    argv = ["data", "build-regions", "--source", "jsonl", "--data", str(tmp_path / "train.jsonl"), "--out", str(out),
            "--margin", "0"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["kept"] == 1
    assert json.loads(out.read_text())["grid"] == [0, 0, 1, 1]  # 20 px of 80 = a quarter: blocks 0-1
    with pytest.raises(SystemExit):  # argparse names the accepted sources
        main(["data", "build-regions", "--source", "coco", "--data", ".", "--out", str(out)])
    assert "invalid choice: 'coco'" in capsys.readouterr().err

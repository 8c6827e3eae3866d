"""The synthetic task: reproducible splits, fixed kind shares, labels that match the drawing, resumable training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crop.strategies.learned_plc import LearnedPLC
from crop.synth.document import COLUMN_LABELS, ROW_LABELS
from crop.synth.model import build_synth_processor
from crop.synth.scene import COLOURS, IMAGE_SIZE, PATCH, make_sample, patch_labels
from crop.synth.train import TrainConfig, Trainer, autocast_dtype, pixel_values, shared_prefix_length


def test_samples_are_reproducible_and_splits_differ():
    a, b = make_sample("test", 5), make_sample("test", 5)
    assert (a.question, a.answer, a.objects) == (b.question, b.answer, b.objects)
    assert a.image.tobytes() == b.image.tobytes()
    assert make_sample("train", 5).objects != a.objects


def test_kind_shares_are_exact_per_task():
    shapes = [make_sample("val", i, "shapes").kind for i in range(100)]
    assert (shapes.count("detail"), shapes.count("object"), shapes.count("wide")) == (40, 30, 30)
    documents = [make_sample("val", i, "documents").kind for i in range(100)]
    assert [documents.count(kind) for kind in ("detail", "object", "wide", "document")] == [30, 20, 20, 30]
    with pytest.raises(ValueError, match="unknown synthetic task 'tables'.*documents"):
        make_sample("val", 0, "tables")


def test_document_answers_regions_and_labels_match_the_table():
    samples = [make_sample("test", i, "documents") for i in range(100)]
    documents = [s for s in samples if s.kind == "document"]
    assert len(documents) == 30 and len({s.question for s in documents}) > 20
    for sample in documents:
        table = sample.document
        words = sample.question.split()  # what is in row R column C ?
        row, column = table.rows.index(words[4]), table.columns.index(words[6])
        assert sample.answer == table.digits[row][column]
        assert sample.region.to_grid() == (column + 1, row + 1, column + 1, row + 1)
        labels = patch_labels([], table)
        glyph_row, glyph_col = 2 * (row + 1), 2 * (column + 1)  # the digit fills the block's top-left patch
        assert labels["digit"][glyph_row, glyph_col] == int(sample.answer) + 1
        assert labels["digit"][glyph_row + 1, glyph_col + 1] == 0
        assert labels["row"][glyph_row + 1, glyph_col + 1] == ROW_LABELS.index(words[4]) + 1
        assert labels["column"][glyph_row, glyph_col] == COLUMN_LABELS.index(words[6]) + 1
        assert labels["row"][0, 0] == labels["column"][0, 0] == labels["colour"].max() == 0
        pixels = np.asarray(sample.image.convert("L"))
        block = pixels[28 * (row + 1) : 28 * (row + 2), 28 * (column + 1) : 28 * (column + 2)]
        assert block[:14, :14].min() < 100 and block[14:27, 14:27].min() > 200  # ink only in the glyph patch


def test_answers_and_regions_match_the_scene():
    for index in range(60):
        sample = make_sample("test", index, "shapes")
        colours = {obj.colour: obj for obj in sample.objects}
        words = sample.question.split()
        if sample.kind == "wide":
            assert sample.region.is_full
            assert sample.answer == ("yes" if words[3] in colours else "no")
            continue
        target = colours[words[-3]]
        assert sample.answer == (target.digit if sample.kind == "detail" else target.shape)
        x0, y0, x1, y1 = target.box
        assert (sample.region.x0, sample.region.y1) == (x0 / IMAGE_SIZE, y1 / IMAGE_SIZE)
        labels = patch_labels(sample.objects)
        tag_col, tag_row = target.tag_box[0] // PATCH, target.tag_box[1] // PATCH
        if sample.kind == "detail":
            assert labels["digit"][tag_row, tag_col] == int(sample.answer) + 1


@pytest.mark.parametrize("grounding", [0.0, 0.5])
def test_shared_prefix_training_equals_running_every_prompt_whole(tmp_path, grounding):
    config = TrainConfig(grounding_weight=grounding, text_layers=2, images_per_step=3, questions_per_image=3)
    trainer = Trainer(tmp_path, config)
    batch = trainer._batch(5, with_questions=True)
    assert len(set(batch.kinds)) > 1
    trainer.model.eval()
    with torch.no_grad():
        features = trainer._features(batch.pixel_values)
        prefix = shared_prefix_length(batch.input_ids, trainer.image_token)
        assert prefix == 2 + 256  # USER : and the visual tokens
        whole_logits, whole_attentions = trainer._full_forward(batch, features)
        logits, attentions = trainer._shared_prefix_forward(batch, features, prefix)
    torch.testing.assert_close(logits, whole_logits[:, prefix:], atol=1e-5, rtol=1e-4)
    if grounding:
        torch.testing.assert_close(attentions[1], whole_attentions[1][:, :, prefix:], atol=1e-6, rtol=1e-4)
    different = batch.input_ids.clone()
    different[0, 0] = trainer.tokenizer.pad_token_id
    assert shared_prefix_length(different, trainer.image_token) == 0


def test_training_pixels_equal_the_processor():
    images = [make_sample("train", i).image for i in range(2)]
    expected = build_synth_processor().image_processor(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixel_values(images), expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_training_runs_and_resumes(tmp_path):
    config = dict(vision_steps=1, images_per_step=2, checkpoint_every=2, eval_every=2, eval_samples=4, steps=1)
    trainer = Trainer(tmp_path, TrainConfig(refine_steps=0, **config))
    trainer.run()
    assert (tmp_path / "model" / "config.json").is_file()
    resumed = Trainer(tmp_path, TrainConfig(refine_steps=1, **config))
    assert resumed.step == 2
    resumed.run()
    assert resumed.step == 3
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any("eval" in record for record in log)


def test_learning_rate_restarts_lower_for_the_refine_stage(tmp_path):
    config = TrainConfig(vision_steps=10, steps=100, refine_steps=100, warmup=5, lr=1e-3, refine_lr=3e-4, min_lr=1e-5)
    trainer = Trainer(tmp_path, config)
    end_of_stage_2 = trainer.lr_at(109)
    refine = [trainer.lr_at(step) for step in range(110, 210)]
    assert end_of_stage_2 < 2e-5
    assert max(refine) == pytest.approx(3e-4)
    assert refine[4] == pytest.approx(3e-4) and refine[-1] < 2e-5
    assert all(a >= b for a, b in zip(refine[4:-1], refine[5:], strict=True))


@pytest.mark.slow
def test_joint_plc_training_lowers_the_loss_and_saves_the_compressor(tmp_path):
    config = TrainConfig(vision_steps=0, steps=2, images_per_step=2, plc_share=1.0, locate_share=0.0,
                         grounding_weight=0.0, checkpoint_every=2, eval_every=100, eval_samples=2)  # fmt: skip
    trainer = Trainer(tmp_path, config)
    batch = trainer._batch(0, with_questions=True)
    assert all(inside is not None for inside in batch.regions)
    counts = (batch.input_ids == trainer.image_token).sum(1).tolist()
    assert counts == [trainer.compressor.output_count(inside) for inside in batch.regions]
    before = {name: p.detach().clone() for name, p in trainer.compressor.named_parameters()}
    losses = [trainer.train_on(batch, vision_only=False, lr=3e-4)["answer"] for _ in range(8)]
    assert losses[-1] < 0.6 * losses[0]
    moved = [name for name, p in trainer.compressor.named_parameters() if not torch.equal(p, before[name])]
    assert "region_queries" in moved and "outside_queries" in moved
    trainer.run()
    reloaded = LearnedPLC.from_pretrained(tmp_path / "model")
    inside = batch.regions[0]
    features = torch.randn(inside.numel(), trainer.compressor.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.compress(features, inside).features, trainer.compressor.compress(features, inside).features
        )


def test_grounded_vocabulary_takes_the_heads_rows(tmp_path):
    trainer = Trainer(tmp_path, TrainConfig(vision_steps=1, steps=1, images_per_step=2, ground_vocabulary=True,
                                            eval_every=100, eval_samples=2))  # fmt: skip
    inputs = trainer.model.get_input_embeddings().weight
    scale = inputs.norm(dim=-1).mean().item()
    untouched = inputs[trainer.tokenizer.convert_tokens_to_ids("what")].clone()
    trainer.ground_vocabulary()
    red = trainer.tokenizer.convert_tokens_to_ids("red")
    row = trainer.heads.heads["colour"].weight[1 + list(COLOURS).index("red")]
    torch.testing.assert_close(inputs[red], row / row.norm() * scale)
    seven = trainer.tokenizer.convert_tokens_to_ids("7")
    digit_row = trainer.heads.heads["digit"].weight[8]
    output = trainer.model.get_output_embeddings().weight
    assert torch.nn.functional.cosine_similarity(output[seven], digit_row, dim=0) > 0.999
    assert torch.equal(inputs[trainer.tokenizer.convert_tokens_to_ids("what")], untouched)


def test_precision_auto_takes_bfloat16_only_where_the_cpu_computes_it_natively(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert autocast_dtype("auto") is torch.float32
    assert autocast_dtype("bfloat16") is torch.bfloat16  # asked for, it is what runs (the shipped recipe)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert autocast_dtype("auto") is torch.bfloat16
    assert autocast_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="unknown precision 'fp16'; expected one of"):
        autocast_dtype("fp16")

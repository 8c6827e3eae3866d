"""`crop data build-regions` on tiny copies of each source's layout: hand-checked grid boxes, drops, stats, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from crop.errors import ConfigError
from crop.train.localizer import read_rows
from crop.train.regions import OcrWord, build_regions, grid_box, match_ocr, stats_path, write_regions


def write_json(path: Path, content: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def write_image(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (200, 200, 200)).save(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rosetta(word: str, x: float, y: float, width: float, height: float) -> dict:
    box = {"top_left_x": x, "top_left_y": y, "width": width, "height": height, "rotation": 0}
    return {"word": word, "bounding_box": box}


def textvqa_question(qid: int, image_id: str, answers: list[str]) -> dict:
    return {"question_id": qid, "image_id": image_id, "question": f"question {qid}?", "answers": answers,
            "image_width": 400, "image_height": 300}  # fmt: skip


@pytest.fixture
def textvqa(tmp_path: Path) -> Path:
    """TextVQA layout: img1 (400x300) reads "new" low on the right, then "Welcome to New York," higher up."""
    root = tmp_path / "textvqa"
    write_image(root / "train_images" / "img1.jpg", 400, 300)
    write_image(root / "train_images" / "img2.jpg", 400, 300)  # no OCR entry; img3.jpg does not exist
    questions = [
        textvqa_question(1, "img1", ["New York"] * 6 + ["new york city"] * 3 + ["NY"]),
        textvqa_question(2, "img1", ["pizza"] * 10),
        textvqa_question(3, "img2", ["stop"] * 10),
        textvqa_question(4, "img3", ["new york"] * 10),
        textvqa_question(5, "img1", ["york new"] * 10),
    ]
    write_json(root / "TextVQA_0.5.1_train.json", {"dataset_name": "textvqa", "data": questions})
    img1 = [
        rosetta("new", 0.80, 0.85, 0.10, 0.05),  # pixels x 320..360, y 255..270
        rosetta("Welcome", 0.05, 0.10, 0.20, 0.05),
        rosetta("to", 0.27, 0.10, 0.05, 0.05),
        rosetta("New", 0.30, 0.40, 0.10, 0.05),  # pixels x 120..160, y 120..135
        rosetta("York,", 0.42, 0.40, 0.12, 0.05),  # pixels x 168..216, y 120..135
    ]
    ocr = [{"image_id": "img1", "ocr_info": img1}, {"image_id": "img3", "ocr_info": img1}]
    write_json(root / "TextVQA_Rosetta_OCR_v0.2_train.json", {"data": ocr})
    return root


def test_textvqa_answer_in_two_consecutive_ocr_words(textvqa: Path):
    out = textvqa / "regions.jsonl"
    build_regions("textvqa", textvqa, out)
    rows = {row["id"]: row for row in read_jsonl(out)}
    # "New" + "York," on 400x300: x 120..216 px, y 120..135 px; margin 0.02 = 8 px, 6 px -> x 112..224, y 114..141;
    # blocks are 50 x 37.5 px: x 112/50 = 2.24 -> 2, 224/50 = 4.48 -> 4; y 114/37.5 = 3.04 -> 3, 141/37.5 = 3.76 -> 3
    assert rows["1"] == {
        "image": "train_images/img1.jpg", "question": "question 1?", "answer": "new york", "grid": [2, 3, 4, 3],
        "source": "textvqa", "id": "1",
    }  # fmt: skip
    # the trainer reads the file and finds the image relative to its folder
    assert [row["grid"] for row in read_rows(out)] == [[2, 3, 4, 3], [2, 3, 7, 7]]
    assert (out.parent / read_rows(out)[0]["image"]).is_file()


def test_textvqa_answer_words_found_apart(textvqa: Path):
    """The answer "york new" is no run of words: each word's tokens count, both "new"s included."""
    out = textvqa / "regions.jsonl"
    build_regions("textvqa", textvqa, out)
    row = {row["id"]: row for row in read_jsonl(out)}["5"]
    # "New" x 120..160, "York," 168..216, "new" 320..360 / y 255..270 -> x 120..360, y 120..270 px;
    # margin -> x 112..368 (2.24 -> 2, 7.36 -> 7), y 114..276 (3.04 -> 3, 7.36 -> 7)
    assert row["grid"] == [2, 3, 7, 7]
    assert row["answer"] == "york new"


def test_textvqa_drops_and_stats_file(textvqa: Path):
    out = textvqa / "regions.jsonl"
    stats = build_regions("textvqa", textvqa, out)
    assert json.loads(stats_path(out).read_text()) == stats
    assert stats_path(out).name == "regions.jsonl.stats.json"
    assert stats["seen"] == 5 and stats["kept"] == 2
    assert stats["dropped"] == {"answer not in OCR": 1, "image missing": 1, "no OCR": 1}
    assert stats["kept_by_match"] == {"OCR run": 1, "OCR words": 1}
    # [2, 3, 4, 3] is 3 blocks, [2, 3, 7, 7] is 6 x 5 = 30 blocks
    assert stats["area_histogram"] == {"1": 0, "2-4": 1, "5-16": 0, "17-36": 1, "37-64": 0}
    assert stats["mean_blocks"] == pytest.approx(16.5)
    assert stats["mean_area"] == pytest.approx(33 / 128)
    assert (stats["source"], stats["split"], stats["margin"]) == ("textvqa", "train", 0.02)


def test_limit_caps_questions_read(textvqa: Path):
    stats = build_regions("textvqa", textvqa, textvqa / "regions.jsonl", limit=2)
    assert (stats["seen"], stats["kept"], stats["dropped"]) == (2, 1, {"answer not in OCR": 1})


@pytest.fixture
def docvqa(tmp_path: Path) -> Path:
    """DocVQA layout: doc_a (800x1000 px) with its OCR; doc_b without."""
    root = tmp_path / "docvqa"
    write_image(root / "documents" / "doc_a.png", 800, 1000)
    write_image(root / "documents" / "doc_b.png", 800, 1000)
    questions = [
        {"questionId": 11, "question": "Which year?", "image": "documents/doc_a.png", "answers": ["1993", "in 1993"],
         "ucsf_document_id": "doc", "ucsf_document_page_no": "1"},
        {"questionId": 12, "question": "How much?", "image": "documents/doc_a.png", "answers": ["$ 4.50"]},
        {"questionId": 13, "question": "Who?", "image": "documents/doc_b.png", "answers": ["Ann"]},
    ]  # fmt: skip
    write_json(root / "train_v1.0.json", {"dataset_name": "docvqa", "dataset_split": "train", "data": questions})
    lines = [
        {"boundingBox": [80, 100, 300, 100, 300, 130, 80, 130], "text": "Invoice",
         "words": [{"boundingBox": [80, 100, 300, 100, 300, 130, 80, 130], "text": "Invoice"}]},
        {"boundingBox": [300, 200, 480, 200, 480, 220, 300, 220], "text": "Year: 1993.",
         "words": [{"boundingBox": [300, 200, 380, 200, 380, 220, 300, 220], "text": "Year:"},
                   {"boundingBox": [400, 200, 480, 202, 480, 220, 400, 218], "text": "1993."}]},
    ]  # fmt: skip
    ocr = {"status": "Succeeded", "recognitionResults": [{"page": 1, "width": 800, "height": 1000, "lines": lines}]}
    write_json(root / "ocr_results" / "doc_a.json", ocr)
    return root


def test_docvqa_answer_in_one_ocr_word(docvqa: Path, tmp_path: Path):
    out = tmp_path / "out" / "regions.jsonl"
    stats = build_regions("docvqa", docvqa, out)
    (row,) = read_jsonl(out)
    # "1993." (normalised "1993"): quad x 400..480, y 200..220 px on 800x1000; margin 0.02 = 16 px, 20 px ->
    # x 384..496, y 180..240; blocks are 100 x 125 px: x 3.84 -> 3, 4.96 -> 4; y 1.44 -> 1, 1.92 -> 1
    assert row["grid"] == [3, 1, 4, 1]
    assert (row["id"], row["answer"], row["source"]) == ("11", "1993", "docvqa")
    # the output folder does not hold the images: the path stays absolute
    assert row["image"] == str((docvqa / "documents" / "doc_a.png").resolve())
    assert stats["dropped"] == {"answer not in OCR": 1, "no OCR": 1}


def test_box_at_the_right_and_bottom_border(tmp_path: Path):
    write_image(tmp_path / "a.png", 400, 300)
    rows = [
        {"image": "a.png", "question": "q", "answer": "a", "boxes": [[300, 200, 400, 300]]},
        {"image": "a.png", "question": "q", "answer": "a", "boxes": [[390, 290, 420, 330]]},  # past the edge
    ]
    out = tmp_path / "regions.jsonl"
    build_regions("jsonl", write_jsonl(tmp_path / "rows.jsonl", rows), out)
    # x 300..400 px -> 0.75..1.0, margin -> 0.73..1.02, clipped to 1.0: blocks 5.84 -> 5 .. 7;
    # y 200..300 px -> 0.667..1.0, margin -> 0.647..1.0: blocks 5.17 -> 5 .. 7
    # second: x 0.975 - 0.02 = 0.955 -> 7.64 -> 7, y 0.967 - 0.02 = 0.947 -> 7.57 -> 7, both ends clipped to 1.0
    assert [row["grid"] for row in read_jsonl(out)] == [[5, 5, 7, 7], [7, 7, 7, 7]]


def test_margin_grows_a_box_across_block_boundaries(tmp_path: Path):
    write_image(tmp_path / "a.png", 64, 64)
    rows = [{"image": "a.png", "question": "q", "answer": "a", "boxes": [[0.26, 0.26, 0.36, 0.36]], "normalized": True}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    # 0.26..0.36 lies in block 2 (0.25..0.375); grown by 0.02 it is 0.24..0.38: 1.92 -> 1, 3.04 -> 3
    build_regions("jsonl", data, tmp_path / "tight.jsonl", margin=0.0)
    build_regions("jsonl", data, tmp_path / "grown.jsonl", margin=0.02)
    assert read_jsonl(tmp_path / "tight.jsonl")[0]["grid"] == [2, 2, 2, 2]
    assert read_jsonl(tmp_path / "grown.jsonl")[0]["grid"] == [1, 1, 3, 3]


@pytest.fixture
def gqa(tmp_path: Path) -> Path:
    root = tmp_path / "gqa"
    write_image(root / "images" / "1.jpg", 64, 48)
    write_image(root / "images" / "2.jpg", 64, 48)
    annotations = {"question": {"3": "o1"}, "answer": {"0": "o2"}, "fullAnswer": {"1": "o2", "5": "o1"}}
    questions = {
        "q1": {"imageId": "1", "question": "What is left of the table?", "answer": "cup", "annotations": annotations},
        "q2": {"imageId": "1", "question": "Is it red?", "answer": "no", "annotations": {"question": {"2": "o9"}}},
        "q3": {"imageId": "2", "question": "What is it?", "answer": "dog", "annotations": annotations},
    }
    write_json(root / "train_balanced_questions.json", questions)
    objects = {
        "o1": {"name": "cup", "x": 64, "y": 48, "w": 96, "h": 96},
        "o2": {"name": "table", "x": 320, "y": 240, "w": 160, "h": 120},
        "o3": {"name": "wall", "x": 600, "y": 400, "w": 40, "h": 80},
    }
    write_json(root / "train_sceneGraphs.json", {"1": {"width": 640, "height": 480, "objects": objects}})
    return root


def test_gqa_referenced_objects(gqa: Path):
    out = gqa / "regions.jsonl"
    stats = build_regions("gqa", gqa, out)
    (row,) = read_jsonl(out)
    # o1 64..160 x 48..144 and o2 320..480 x 240..360 on 640x480 (o3 is not referenced): x 64..480, y 48..360 px;
    # margin 12.8 px, 9.6 px -> x 51.2..492.8 over 80 px blocks: 0.64 -> 0, 6.16 -> 6; y 38.4..369.6 over 60 px: 0 .. 6
    assert row == {
        "image": "images/1.jpg", "question": "What is left of the table?", "answer": "cup", "grid": [0, 0, 6, 6],
        "source": "gqa", "id": "q1",
    }  # fmt: skip
    assert stats["dropped"] == {"no referenced objects": 1, "no scene graph": 1}
    assert stats["kept_by_match"] == {"scene-graph objects": 1}


def test_jsonl_pixel_boxes_sized_from_the_image(tmp_path: Path):
    write_image(tmp_path / "images" / "a.png", 200, 100)
    rows = [
        {"image": "images/a.png", "question": "q", "answer": "x", "boxes": [[20, 10, 60, 30], [100, 50, 120, 70]]},
        {"id": "b", "image": "images/missing.png", "question": "q", "answer": "x", "boxes": [[0, 0, 5, 5]]},
        {"id": "c", "image": "images/broken.png", "question": "q", "answer": "x", "boxes": [[0, 0, 5, 5]]},
    ]
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "regions.jsonl"
    stats = build_regions("jsonl", write_jsonl(tmp_path / "rows.jsonl", rows), out)
    (row,) = read_jsonl(out)
    # union x 20..120, y 10..70 px on 200x100; margin 4 px, 2 px -> x 16..124 over 25 px blocks: 0.64 -> 0,
    # 4.96 -> 4; y 8..72 over 12.5 px blocks: 0.64 -> 0, 5.76 -> 5
    assert row == {"image": "images/a.png", "question": "q", "answer": "x", "grid": [0, 0, 4, 5], "source": "jsonl",
                   "id": "1"}  # fmt: skip
    assert stats["dropped"] == {"image missing": 1, "image unreadable": 1}


def test_jsonl_folder_split_and_histogram(tmp_path: Path):
    write_image(tmp_path / "a.png", 64, 64)

    def row(boxes: list) -> dict:
        return {"image": "a.png", "question": "q", "answer": "a", "boxes": boxes, "normalized": True}

    rows = [
        row([[0.01, 0.01, 0.1, 0.1]]),  # block 0 only: 1 block
        row([[0.3, 0.3, 0.45, 0.45]]),  # 2.4 -> 2 .. 3.6 -> 3: 2 x 2 = 4 blocks
        row([[0.0, 0.0, 1.0, 1.0]]),  # 64 blocks
        row([]),  # no boxes
        row([[0.5, 0.5, 0.5, 0.5]]),  # no area at margin 0
        row([[1.2, 0.1, 1.3, 0.2]]),  # right of the image
        {**row([[0.1, 0.1, 0.2, 0.2]]), "image": "gone.png"},
    ]
    write_jsonl(tmp_path / "val.jsonl", rows)
    stats = build_regions("jsonl", tmp_path, tmp_path / "out.jsonl", split="val", margin=0.0)
    assert [r["grid"] for r in read_jsonl(tmp_path / "out.jsonl")] == [[0, 0, 0, 0], [2, 2, 3, 3], [0, 0, 7, 7]]
    assert stats["seen"] == 7 and stats["kept"] == 3
    assert stats["dropped"] == {"empty box or outside the image": 2, "image missing": 1, "no boxes": 1}
    assert stats["area_histogram"] == {"1": 1, "2-4": 1, "5-16": 0, "17-36": 0, "37-64": 1}
    assert stats["mean_blocks"] == pytest.approx(23.0)
    assert stats["mean_area"] == pytest.approx(69 / 192)


def test_match_ocr_normalises_and_skips_empty_words():
    def word(text: str, x: float) -> OcrWord:
        return OcrWord.of(text, (x, 0.0, x + 0.1, 0.1))

    ocr = [word("THE", 0.0), word("New", 0.1), word("-", 0.2), word("York", 0.3), word("1,000", 0.5)]
    assert match_ocr("the new york", ocr) == ([(0.1, 0.0, 0.2, 0.1), (0.3, 0.0, 0.4, 0.1)], "OCR run")
    assert match_ocr("1000", ocr) == ([(0.5, 0.0, 0.6, 0.1)], "OCR run")
    assert match_ocr("new jersey", ocr) is None  # "jersey" is nowhere
    assert match_ocr("the", ocr) is None  # nothing left of the answer after normalisation


def test_grid_box_of_a_box_touching_both_edges():
    assert grid_box([(0.0, 0.0, 1.0, 1.0)]) == (0, 0, 7, 7)
    assert grid_box([(0.875, 0.875, 1.0, 1.0)], margin=0.0) == (7, 7, 7, 7)


def test_write_regions_makes_paths_relative_under_the_output_folder(tmp_path: Path):
    rows = [{"image": tmp_path / "data" / "x.jpg", "question": "q", "grid": [0, 0, 1, 1]},
            {"image": tmp_path / "elsewhere" / "y.jpg", "question": "q", "grid": [0, 0, 1, 1]}]  # fmt: skip
    assert write_regions(rows, tmp_path / "data" / "regions.jsonl") == 2
    images = [row["image"] for row in read_jsonl(tmp_path / "data" / "regions.jsonl")]
    assert images == ["x.jpg", str((tmp_path / "elsewhere" / "y.jpg").resolve())]


@pytest.mark.parametrize(
    ("source", "kwargs", "message"),
    [
        ("coco", {}, r"unknown region source 'coco'; accepted: textvqa, docvqa, gqa, jsonl"),
        ("textvqa", {"margin": -0.1}, r"margin must be a share of the image size in \[0, 0.5\]; got -0.1"),
        ("textvqa", {"margin": 0.6}, r"margin must be .* got 0.6"),
        ("textvqa", {"margin": float("nan")}, r"margin must be .* got nan"),
        ("textvqa", {"limit": 0}, r"limit must be a number of questions >= 1 \(or None for all\); got 0"),
    ],
)
def test_bad_settings(tmp_path: Path, source: str, kwargs: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        build_regions(source, tmp_path, tmp_path / "out.jsonl", **kwargs)
    assert not (tmp_path / "out.jsonl").exists()


def test_missing_files_name_what_is_expected(tmp_path: Path, textvqa: Path, docvqa: Path, gqa: Path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(ConfigError, match=r"textvqa: .*nowhere not found; expected TextVQA_0\.5\.1_<split>\.json"):
        build_regions("textvqa", tmp_path / "nowhere", out)
    (textvqa / "TextVQA_Rosetta_OCR_v0.2_train.json").unlink()
    with pytest.raises(ConfigError, match=r"textvqa: .*TextVQA_Rosetta_OCR_v0\.2_train\.json not found"):
        build_regions("textvqa", textvqa, out)
    with pytest.raises(ConfigError, match=r"docvqa: .*val_v1\.0\.json not found; expected <split>_v1\.0\.json"):
        build_regions("docvqa", docvqa, out, split="val")
    (docvqa / "ocr_results" / "doc_a.json").unlink()
    (docvqa / "ocr_results").rmdir()
    with pytest.raises(ConfigError, match=r"docvqa: .*ocr_results not found"):
        build_regions("docvqa", docvqa, out)
    (gqa / "train_sceneGraphs.json").unlink()
    with pytest.raises(ConfigError, match=r"gqa: .*train_sceneGraphs\.json not found"):
        build_regions("gqa", gqa, out)
    with pytest.raises(ConfigError, match=r"jsonl: .*train\.jsonl not found; expected a JSONL file"):
        build_regions("jsonl", tmp_path, out)
    assert not out.exists()


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"image": "a.png", "question": "q", "answer": "a"}, r"line 1 lacks boxes \(needs image, question, answer"),
        ({"image": "a.png", "question": "q", "answer": "a", "boxes": [[1, 2, 3]]}, r"line 1: box \[1, 2, 3\] is not"),
        ({"image": "a.png", "question": "q", "answer": "a", "boxes": [[5, 0, 1, 2]]}, r"with x0 <= x1 and y0 <= y1"),
    ],
)
def test_bad_jsonl_rows(tmp_path: Path, row: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        build_regions("jsonl", write_jsonl(tmp_path / "rows.jsonl", [row]), tmp_path / "out.jsonl")

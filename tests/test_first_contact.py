"""A new user's first ten minutes: every kind of bad input ends in one `error:` line and exit status 2, never a
traceback; the natural first commands work; a killed `crop eval` resumes to the same bytes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from benchdata import write_benchmark
from conftest import make_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

from crop.cli import main
from crop.synth.assets import SHIPPED_MODEL
from crop.testing.llava import save_tiny


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Images good and bad, a model that is not a VLM, and a file standing where a folder should be."""
    root = tmp_path_factory.mktemp("inputs")
    make_image(120, 90).save(root / "good.png")
    (root / "garbage.png").write_bytes(b"this is not a picture")
    (root / "empty.png").write_bytes(b"")
    Image.new("RGB", (300, 300)).save(root / "big.png")
    text_only = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, vocab_size=40))  # fmt: skip
    text_only.save_pretrained(root / "llama")
    (root / "a-file").write_text("not a folder")
    return root


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """`crop` in this process: exit status, stdout, stderr (argparse's own errors exit through SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code: int, err: str, words: str) -> None:
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert code == 2, err
    assert "Traceback" not in err
    assert lines and words in lines[-1], err


def ask(model, image, *options: str) -> list[str]:
    return ["ask", "--model", str(model), "--image", str(image), "--question", "what colour ?",
            "--max-new-tokens", "1", *options]  # fmt: skip


ASK_CASES = {
    "empty question": (["--question", ""], "the question is empty"),
    "blank question": (["--question", "   "], "the question is empty"),
    "image URL": (["--image", "https://example.com/cat.png"], "https://example.com/cat.png is a URL"),
    "missing image": (["--image", "nowhere.png"], "image not found"),
    "unreadable image": (["--image", "{root}/garbage.png"], "cannot read image"),
    "empty image file": (["--image", "{root}/empty.png"], "cannot read image"),
    "ILP layer -1": (["--ilp-layer", "-1"], "whole number >= 0"),
    "ILP layer past the model": (["--ilp-layer", "9"], "out of range"),
    "zero budget": (["--method", "fastv", "--budget", "0"], "whole number >= 1"),
    "negative budget": (["--method", "fastv", "--budget", "-3"], "whole number >= 1"),
    "budget above the tokens": (["--method", "fastv", "--budget", "100000"], "must be an integer in 1..144"),
    "zero new tokens": (["--max-new-tokens", "0"], "whole number >= 1"),
    "not a number": (["--budget", "many"], "whole number >= 1"),
    "unknown method": (["--method", "magic", "--budget", "3"], "unknown method 'magic'"),
    "method without its budget": (["--method", "random"], "needs a budget"),
    "region off the grid": (["--region", "0", "0", "8", "8"], "off the 8x8 grid"),
    "inverted region": (["--region", "5", "0", "2", "3"], "xmin"),
    "model that is no VLM": (["--model", "{root}/llama"], "LlamaConfig"),
    "missing model": (["--model", "{root}/no-model"], "not a folder here"),
    "unwritable overlay": (["--overlay", "{root}/a-file/overlay.png"], "cannot write"),
    "overlay on a folder": (["--overlay", "{root}"], "it is a folder"),
}


@pytest.mark.parametrize("case", list(ASK_CASES))
def test_bad_input_to_ask_is_one_clear_line(checkpoint, files, capsys, case):
    options, words = ASK_CASES[case]  # a flag given again overrides the base command's
    code, _, err = run(ask(checkpoint, files / "good.png", *[o.format(root=files) for o in options]), capsys)
    assert_refused(code, err, words)


def test_a_model_that_is_no_vlm_is_refused_in_one_short_line(files, capsys):
    code, _, err = run(ask(files / "llama", files / "good.png"), capsys)
    assert_refused(code, err, "LlamaConfig")
    assert len(err) < 400


def test_an_image_above_the_pixel_limit_is_refused(checkpoint, files, capsys, monkeypatch):
    monkeypatch.setenv("CROP_MAX_PIXELS", "50000")
    code, _, err = run(ask(checkpoint, files / "big.png"), capsys)
    assert_refused(code, err, "too large: 300x300 = 90,000 pixels")
    monkeypatch.setenv("CROP_MAX_PIXELS", "lots")
    code, _, err = run(ask(checkpoint, files / "big.png"), capsys)
    assert_refused(code, err, "CROP_MAX_PIXELS must be a positive whole number")


def test_a_huge_image_is_reduced_while_decoding(tmp_path):
    from crop.image import MAX_SIDE, load_image

    path = tmp_path / "huge.jpg"
    Image.new("RGB", (9000, 3000), (20, 120, 40)).save(path, quality=70)
    loaded = load_image(path)
    assert loaded.size == (MAX_SIDE, round(3000 * MAX_SIDE / 9000))


def test_ask_on_the_shipped_model_needs_only_an_image_and_a_question(files, capsys):
    code, out, err = run(["ask", "--model", str(SHIPPED_MODEL), "--image", str(files / "good.png"),
                          "--question", "what digit is on the red object ?"], capsys)  # fmt: skip
    assert code == 0, err
    assert "localized region: Region(" in out and "pruned answer" in out
    assert "median of 5 runs after a warm-up" in out


@pytest.mark.parametrize("command", ["ask", "demo"])
def test_full_is_a_method(checkpoint, files, tmp_path, capsys, command):
    if command == "ask":
        argv = ask(checkpoint, files / "good.png", "--method", "full")
    else:
        argv = ["demo", "--method", "full", "--max-new-tokens", "1", "--overlay", str(tmp_path / "o.png")]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "full (no pruning)" in out


def eval_args(model, data, out, *options: str) -> list[str]:
    return ["eval", "--model", str(model), "--bench", "textvqa", "--data", str(data), "--out", str(out),
            "--max-new-tokens", "2", "--batch-size", "2", "--method", "fastv", "--budget", "8", *options]  # fmt: skip


def test_bad_input_to_eval_is_one_clear_line(checkpoint, files, tmp_path, capsys):
    data = tmp_path / "data"
    write_benchmark("textvqa", data, "official", count=3)
    questions = next(data.rglob("*.json"))
    good = questions.read_text()
    cases = [
        (eval_args(checkpoint, data, tmp_path / "o1", "--batch-size", "0"), "whole number >= 1"),
        (eval_args(checkpoint, data, tmp_path / "o2", "--limit", "-1"), "whole number >= 1"),
        (eval_args(checkpoint, tmp_path / "nowhere", tmp_path / "o3"), "not found"),
        (eval_args(checkpoint, data, files / "a-file" / "run"), "cannot create the run folder"),
    ]
    for argv, words in cases:
        code, _, err = run(argv, capsys)
        assert_refused(code, err, words)
    for broken, words in (("{not json", "not a readable copy"), ('{"data": 3}', "not a readable copy"),
                          ("[1, 2]", "not a readable copy"), ("", "not a readable copy")):  # fmt: skip
        questions.write_text(broken)
        code, _, err = run(eval_args(checkpoint, data, tmp_path / f"broken-{len(broken)}"), capsys)
        assert_refused(code, err, words)
    questions.write_text(good)


def test_eval_resumes_paths_written_differently_and_keeps_a_full_summary(checkpoint, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    write_benchmark("textvqa", data, "official", count=3)
    out = tmp_path / "run"
    assert run(eval_args(checkpoint, data, out), capsys)[0] == 0
    monkeypatch.chdir(tmp_path)
    again = eval_args(Path(os.path.relpath(checkpoint, tmp_path)), "data/", "run")
    assert run(again, capsys)[0] == 0  # the same folders written another way: the same run
    summary = (out / "summary.json").read_bytes()
    code, _, err = run(eval_args(checkpoint, data, out, "--limit", "1"), capsys)
    assert_refused(code, err, "holds a summary of 3 answers")
    assert (out / "summary.json").read_bytes() == summary
    (out / "config.json").write_text("")  # what a kill during the old, non-atomic write left
    code, _, err = run(eval_args(checkpoint, data, out), capsys)
    assert_refused(code, err, "config.json is unreadable but the folder holds answers")


def test_other_commands_refuse_bad_counts_and_files(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{cut short")
    (tmp_path / "settings.json").write_text("[1]")
    cases = [
        (["bench", "--repeats", "0"], "whole number >= 1"),
        (["bench", "--out", str(tmp_path / "settings.json" / "bench.json")], "cannot write"),
        (["synth", "eval", "--out", str(tmp_path)], "it is a folder"),
        (["bench", "--budgets", "64", "0"], "whole number >= 1"),
        (["synth", "eval", "--n", "0"], "whole number >= 1"),
        (["report", str(tmp_path / "run")], "cannot read"),
        (["report", str(tmp_path)], "no summary.json"),
        (["train", "plc", "--config", str(tmp_path / "settings.json")], "must hold a JSON object"),
    ]
    for argv, words in cases:
        code, _, err = run(argv, capsys)
        assert_refused(code, err, words)


def test_version_and_python_dash_m(capsys):
    from crop import __version__

    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"crop {__version__}"
    result = subprocess.run([sys.executable, "-m", "crop", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"crop {__version__}"


def test_help_imports_no_torch():
    probe = "import sys; from crop.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
    probe += "print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().endswith("False"), result.stdout + result.stderr


@pytest.mark.slow
def test_synth_eval_runs_small_and_writes_a_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["synth", "eval", "--n", "5"], capsys)
    assert code == 0, err
    assert (tmp_path / "runs" / "synth-eval" / "synth_eval.json").is_file()
    assert not (tmp_path / "results").exists()


MALFORMED = [b"", b"{", b"[]", b"{}", b'{"data": [{"image_id": 3}]}', b"\xff\xfe\x00", b"null", b'"text"']


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    budget=st.one_of(st.none(), st.integers(-5, 10**6)),
    layer=st.integers(-3, 9),
    tokens=st.integers(-2, 3),
    question=st.text(max_size=12),
    region=st.one_of(st.none(), st.lists(st.integers(-2, 9), min_size=4, max_size=4)),
    method=st.sampled_from(["crop", "crop-fused", "fastv", "pool", "random", "full", "visionzip", "magic"]),
    image=st.sampled_from(["good.png", "garbage.png", "empty.png", "missing.png", "https://x.org/a.png"]),
)
def test_no_argument_values_make_ask_show_a_traceback(checkpoint, files, capsys, budget, layer, tokens, question,
                                                      region, method, image):  # fmt: skip
    path = image if image.startswith("https") else str(files / image)
    argv = ["ask", "--model", str(checkpoint), "--image", path, f"--question={question}", "--method", method,
            "--ilp-layer", str(layer), "--max-new-tokens", str(tokens)]  # fmt: skip
    if budget is not None:
        argv += ["--budget", str(budget)]
    if region is not None:
        argv += ["--region", *map(str, region)]
    code, _, err = run(argv, capsys)
    assert code in (0, 2), err
    assert "Traceback" not in err


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    bench=st.sampled_from(["textvqa", "gqa", "pope", "scienceqa", "ocrbench", "chartqa", "docvqa"]),
    content=st.one_of(st.sampled_from(MALFORMED), st.binary(max_size=40)),
    which=st.integers(0, 10),
    batch=st.integers(-1, 3),
    limit=st.one_of(st.none(), st.integers(-1, 3)),
)
def test_no_malformed_file_makes_eval_show_a_traceback(checkpoint, tmp_path_factory, capsys, bench, content, which,
                                                       batch, limit):  # fmt: skip
    root = tmp_path_factory.mktemp("malformed")
    write_benchmark(bench, root / "data", "official", count=2)
    targets = sorted(p for p in (root / "data").rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".csv"))
    targets[which % len(targets)].write_bytes(content)
    argv = ["eval", "--model", str(checkpoint), "--bench", bench, "--data", str(root / "data"), "--out",
            str(root / "run"), "--max-new-tokens", "1", "--batch-size", str(batch), "--method", "pool",
            "--budget", "4"]  # fmt: skip
    if limit is not None:
        argv += ["--limit", str(limit)]
    code, _, err = run(argv, capsys)
    assert code in (0, 2), err
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_run_killed_anywhere_resumes_to_the_same_bytes(checkpoint, tmp_path):
    data = tmp_path / "data"
    write_benchmark("textvqa", data, "official", count=8)
    assert main(eval_args(checkpoint, data, tmp_path / "whole")) == 0
    killed = tmp_path / "killed"
    delays = sorted(random.Random(0).uniform(0.2, 6.0) for _ in range(4))
    for delay in delays:  # kills while starting, loading, writing config.json, answering
        process = subprocess.Popen([sys.executable, "-m", "crop", *eval_args(checkpoint, data, killed)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(delay)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    (killed / ".config.json.tmp").write_text('{"model": "cut sh')  # a kill in the middle of writing config.json
    assert main(eval_args(checkpoint, data, killed)) == 0
    for name in ("summary.json", "summary.md", "predictions.jsonl"):
        assert (killed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert json.loads((killed / "config.json").read_text())["budget"] == 8

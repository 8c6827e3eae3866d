"""The `crop` command: `crop ask` on any LLaVA checkpoint, `crop demo` offline on a built-in tiny model, and the
evaluation, benchmark, synthetic-task and training commands."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

from crop import __version__
from crop.errors import ConfigError, CropError
from crop.synth.assets import SHIPPED_MODEL
from crop.train.cli import COMMANDS as TRAINING_COMMANDS
from crop.train.cli import add_commands as add_training_commands
from crop.train.cli import add_stubs as add_training_stubs

BENCH_SHAPES = ["llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b", "small", "tiny", "tiny-next", "tiny-qwen"]
"""`crop.bench.SHAPES`' names, listed here so that `--help` imports no torch (a test checks they agree)."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(training=bool(argv) and argv[0] in TRAINING_COMMANDS)
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except CropError as exc:
        print(f"crop: error: {exc}", file=sys.stderr)
        return 2


def _parser(training: bool = True) -> argparse.ArgumentParser:
    """The `crop` parser; without `training`, `crop data` and `crop train` are only named (see `add_stubs`)."""
    parser = argparse.ArgumentParser(prog="crop", description="Contextual region-oriented visual token pruning.")
    parser.add_argument("--version", action="version", version=f"crop {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    ask = commands.add_parser("ask", help="answer a question about an image with pruned visual tokens")
    ask.add_argument("--model", required=True, help="local directory or hub id of a supported VLM (`crop methods`; "
                     "LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL)")  # fmt: skip
    ask.add_argument("--image", required=True, help="image file")
    ask.add_argument("--question", required=True, type=_question, help="the question about the image")
    where = ask.add_mutually_exclusive_group()
    where.add_argument(
        "--region",
        nargs=4,
        type=int,
        metavar=("X0", "Y0", "X1", "Y1"),
        help="contextual region as an 8x8 grid box [xmin ymin xmax ymax], blocks 0..7",
    )
    where.add_argument(
        "--localizer",
        help="directory of a grid-box localizer VLM (GridVLMLocalizer); 'attention': the model's own attention at "
        "layer K-1 in a second pass (AttentionLocalizer); 'attention-fused': the same inside the pruned prefill; "
        "'default': the model itself if trained to localize (crop_localizer.json beside it), else 'attention'",
    )
    _add_pruning_args(ask)
    ask.add_argument("--overlay", type=Path, help="write the image with the region and kept tokens drawn (PNG)")
    ask.add_argument("--compare", action="store_true", help="also answer with all visual tokens")
    ask.set_defaults(run=_run_ask)

    demo = commands.add_parser("demo", help="run the whole pipeline offline on a built-in tiny model")
    demo.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="default: the shipped synthetic-task model")
    demo.add_argument("--seed", type=_at_least(0), default=0, help="index of the test-split question to ask")
    demo.add_argument("--overlay", type=Path, default=Path("results") / "demo_overlay.png")
    _add_pruning_args(demo)
    demo.set_defaults(run=_run_demo)

    web = commands.add_parser("serve-demo", help="a local web page: full and pruned answers side by side")
    web.add_argument("--model", default=str(SHIPPED_MODEL), help="default: the shipped synthetic-task model")
    web.add_argument("--localizer", help="grid localizer VLM (default: the model itself if trained to localize, "
                     "else the attention localizer)")  # fmt: skip
    web.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                     "0.0.0.0 exposes the page to the network)")  # fmt: skip
    web.add_argument("--port", type=_at_least(1), default=7860)
    web.set_defaults(run=_run_serve_demo)

    bench = commands.add_parser("bench", help="measure prefill, decode, memory, KV cache and FLOPs per method")
    bench.add_argument("--shape", default="llava-1.5-7b", choices=BENCH_SHAPES)
    bench.add_argument("--quick", action="store_true", help="a smoke test: small shape, 2 repeats, 8 new tokens "
                       "(minutes on CPU); its table prints no timing ratio")  # fmt: skip
    bench.add_argument("--budgets", type=_at_least(1), nargs="+", default=[192, 128, 64])
    bench.add_argument("--repeats", type=_at_least(1), default=5)
    bench.add_argument("--warmup", type=_at_least(0), default=1)
    bench.add_argument("--new-tokens", type=_at_least(1), default=32)
    bench.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    bench.add_argument("--threads", type=_at_least(1), help="CPU threads (default: torch's)")
    bench.add_argument(
        "--llm-layers", type=int, help="LLM depth (default: the shape's; llava-1.5-7b is cut to 8 of 32 for 24 GiB)"
    )
    bench.add_argument("--out", type=Path, default=Path("results") / "bench.json")
    bench.add_argument("--visual-tokens", type=_at_least(1), nargs="+", help="the image's visual tokens (qwen2.5-vl-7b:"
                       " any square count; llava-next-7b: 1176, 1752 or 2928); several make a scaling run")  # fmt: skip
    bench.add_argument("--scaling", action="store_true", help="a scaling run at the shape's standard sizes "
                       "(qwen2.5-vl-7b: 1024, 4096, 16384 visual tokens; llava-next-7b: 1176, 1752, 2928)")  # fmt: skip
    bench.add_argument("--decode-methods", nargs="+", help="decode only these rows (e.g. full crop-ilp ideal); the "
                       "others measure prefill alone (default: every row decodes)")  # fmt: skip
    bench.add_argument("--resume", action="store_true", help="a scaling run adds only the sizes that --out does not "
                       "hold yet (it must have been measured with the same settings)")  # fmt: skip
    bench.add_argument("--keep", type=_share, nargs="+", default=[Fraction(1, 9)], help="a scaling run's budgets as "
                       "shares of each size's visual tokens (default 1/9: 64 of LLaVA-1.5's 576)")  # fmt: skip
    bench.add_argument(
        "--methods", nargs="+", help="only these rows (e.g. crop-ilp fastv crop-fused); full and ideal always run"
    )
    bench.set_defaults(run=_run_bench)

    evaluate = commands.add_parser("eval", help="accuracy on a real benchmark from a local copy (resumable)")
    evaluate.add_argument("--model", required=True, help="local directory or hub id of the VLM")
    which = evaluate.add_mutually_exclusive_group(required=True)
    which.add_argument("--bench", help="textvqa, docvqa, infovqa, chartqa, gqa, vqav2, pope, scienceqa, ocrbench, "
                       "mme, seedbench, mmbench or mmmu")  # fmt: skip
    which.add_argument("--suite", choices=["standard"], help="standard: every benchmark of the pruning literature's "
                       "table found under --data (one folder per benchmark, named as --bench names it)")  # fmt: skip
    evaluate.add_argument("--data", required=True, help="local copy: the official layout or a `datasets` copy "
                          "(with --suite: the folder holding one copy per benchmark)")  # fmt: skip
    evaluate.add_argument("--split", help="split (or POPE category, ChartQA part) as the copy names it")
    evaluate.add_argument("--localizer", default="attention", help="attention (default), a localizer VLM path, none")
    evaluate.add_argument("--batch-size", type=_at_least(1), default=8)
    evaluate.add_argument("--limit", type=_at_least(1), help="only the first N samples")
    evaluate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    evaluate.add_argument("--out", type=Path, help="run folder (default results/eval/BENCH-METHOD-BUDGET; with "
                          "--suite, the folder of one run folder per benchmark, default results/eval)")  # fmt: skip
    _add_pruning_args(evaluate)
    evaluate.set_defaults(run=_run_eval)

    report = commands.add_parser("report", help="compare `crop eval` runs: a table and accuracy versus tokens")
    report.add_argument("runs", nargs="+", type=Path, help="run folders written by crop eval")
    report.add_argument("--out", type=Path, default=Path("results") / "eval_report.md")
    report.add_argument("--standard", action="store_true", help="also the standard table: scores and retention per "
                        "benchmark against each model's full run, and their mean")  # fmt: skip
    report.set_defaults(run=_run_report)

    methods = commands.add_parser("methods", help="list the pruning methods")
    methods.set_defaults(run=_run_methods)

    synth = commands.add_parser("synth", help="the synthetic grounded-VQA task").add_subparsers(
        required=True, metavar="SYNTH_COMMAND"
    )
    train = synth.add_parser("train", help="train the synthetic-task VLM from scratch (resumes from --out)")
    train.add_argument("--out", type=Path, default=Path("runs") / "synth", help="run directory (checkpoints, log)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--task", default="documents", choices=["documents", "shapes"], help="kinds of questions")
    train.add_argument("--text-layers", type=_at_least(1), default=8, help="LLM depth")
    train.add_argument("--questions-per-image", type=_at_least(1), default=4)
    train.add_argument(
        "--vision-steps", type=_at_least(0), default=2500,
        help="stage 1: vision tower on per-patch heads",
    )  # fmt: skip
    train.add_argument(
        "--steps", type=_at_least(0), default=3500, help="stage 2: questions and localization"
    )
    train.add_argument(
        "--refine-steps", type=int, default=0, help="stage 3 (default off): a warm restart at a lower lr"
    )
    train.add_argument(
        "--grounding-weight", type=float, default=0.0,
        help="attention-grounding loss at --grounding-layer (default off: it shapes what methods read)",
    )  # fmt: skip
    train.add_argument("--grounding-layer", type=_at_least(0), default=1)
    train.add_argument(
        "--targeted-grounding-from",
        type=int,
        default=1100,
        help="stage-2 step from which digit questions ground on the tag patch",
    )
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    train.add_argument(
        "--plc-share",
        type=float,
        default=0.0,
        help="share of question prompts through a learned PLC compressor trained jointly (0: none)",
    )
    train.add_argument("--plc-region-ratio", type=int, default=2, help="region tokens per learned query")
    train.add_argument("--plc-outside-ratio", type=int, default=8, help="outside tokens per learned query")
    train.add_argument("--plc-anchors", type=int, default=4, help="region tokens kept unchanged")
    train.add_argument("--init-from", help="start from this saved model (e.g. the shipped one) instead of scratch")
    train.add_argument(
        "--ground-vocabulary", action=argparse.BooleanOptionalAction, default=True,
        help="start stage 2 with colour/shape/digit word embeddings from the per-patch heads",
    )  # fmt: skip
    train.add_argument("--threads", type=_at_least(1), default=2)
    train.add_argument("--precision", choices=["auto", "bfloat16", "float32"], default="auto",
                       help="autocast dtype (auto: bfloat16 only where the CPU computes it natively)")  # fmt: skip
    train.set_defaults(run=_run_synth_train)
    evaluate = synth.add_parser("eval", help="accuracy versus visual-token budget on the synthetic test split")
    evaluate.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="default: the shipped model")
    evaluate.add_argument("--n", type=_at_least(1), default=1000, help="number of test questions")
    evaluate.add_argument("--out", type=Path, default=Path("runs") / "synth-eval" / "synth_eval.json",
                          help="results JSON (and .md beside it); results/ holds the committed ones")  # fmt: skip
    evaluate.add_argument("--plot", type=Path, default=Path("runs") / "synth-eval" / "synth_budget.png")
    evaluate.add_argument("--threads", type=_at_least(1), default=2)
    evaluate.add_argument("--attention-penalty", type=float, default=0.5, help="attention localizer's box penalty")
    evaluate.add_argument("--attention-rows", default="last", choices=["question", "last"])
    evaluate.set_defaults(run=_run_synth_eval)
    tune = synth.add_parser(
        "tune-attention", help="attention localizer's layer and penalty by localization IoU on the validation split"
    )
    tune.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="default: the shipped model")
    tune.add_argument("--n", type=_at_least(1), default=300, help="number of validation questions")
    tune.add_argument("--out", type=Path, default=Path("runs") / "synth-eval" / "synth_attention_tuning.json")
    tune.add_argument("--threads", type=_at_least(1), default=2)
    tune.set_defaults(run=_run_synth_tune)
    compare = synth.add_parser("compare", help="two synth eval runs on the questions they share, paired intervals")
    compare.add_argument("first", type=Path, help="a `crop synth eval` results JSON (the reference)")
    compare.add_argument("second", type=Path, help="another one, on the same task (e.g. a control run)")
    compare.add_argument("--out", type=Path, help="write the comparison here as JSON (and .md beside it)")
    compare.set_defaults(run=_run_synth_compare)
    if training:
        add_training_commands(commands)
    else:
        add_training_stubs(commands)
    return parser


def _add_pruning_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="crop", help="pruning method (see `crop methods`; default crop; "
                        "full: no pruning)")  # fmt: skip
    parser.add_argument("--budget", type=_at_least(1), help="visual tokens to keep (needed by all methods but crop)")
    parser.add_argument(
        "--ilp-layer", type=_at_least(0), default=2, help="layer K of ILP / FastV (default 2; 0 = before the LLM; "
        "--no-ilp disables ILP)"
    )
    parser.add_argument("--no-ilp", action="store_true", help="disable ILP")
    parser.add_argument(
        "--plc-ratio", type=_at_least(0), default=0, help="PLC pooling ratio outside the region; 0 disables"
    )
    parser.add_argument(
        "--learned-plc", help="folder of a learned PLC compressor (learned_plc.json + weights) for method crop"
    )
    parser.add_argument("--clip", help="CLIP checkpoint (path) whose text tower method cdpruner reads the question "
                        "with: the one the VLM's vision tower came from")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=_at_least(1), default=16, help="answer length limit")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {value}")
        return value

    parse.__name__ = f"whole number >= {low}"
    return parse


def _question(text: str) -> str:
    """An argparse type: a question with some text in it."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the question is empty; ask something about the image")
    return text


def _share(text: str) -> Fraction:
    """An argparse type: a share of the visual tokens, 0 < share < 1, as a fraction (1/9) or a decimal (0.25)."""
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a share like 1/9 or 0.25, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a share strictly between 0 and 1, got {text}")
    return value


def _writable(path: Path | None) -> None:
    """Refuse, before any work, an output path that cannot be written."""
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"cannot write {path}: it is a folder; give a file name")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: cannot create {folder} ({exc.strerror or exc})") from exc
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"cannot write {path}: {folder} is not writable")


def _method(args: argparse.Namespace):
    """The pruning method the arguments name, built (and so checked) before any model is loaded."""
    from crop.strategies.registry import build_method

    layer = -1 if args.no_ilp else args.ilp_layer
    return build_method(
        args.method, budget=args.budget, layer=layer, plc_ratio=args.plc_ratio or None, learned_plc=args.learned_plc,
        clip=args.clip,
    )


def _report(label: str, answer) -> None:
    row = answer.stats.rows[0]
    print(f"{label}: {answer.text!r}")
    print(
        f"  visual tokens: {row.image_tokens} in the image, {row.llm_input_tokens} into the LLM, {row.kept_tokens} "
        f"kept after layer K (average over layers {row.average_tokens:.1f}); {answer.stats.method}"
    )


def _answer_both(model, processor, method, localizer, image, question: str, max_new_tokens: int, full: bool):
    """Answer with `method` (and, with `full`, with all tokens first), then time the prefills: a warm-up, then
    the median of alternating runs (`crop.timing`)."""
    import crop
    from crop.localize import FixedLocalizer
    from crop.timing import alternating_timings, describe_method

    pruned = crop.apply(model, processor, localizer=localizer if method.needs_region else None, method=method)
    try:
        calls = {}
        if full:
            reference = crop.apply(model, processor, method="full")
            full_request = reference.prepare(image, question)
            _report("full answer", reference.ask(image, question, max_new_tokens=max_new_tokens))
            calls["full"] = lambda: reference(full_request)
        request = pruned.prepare(image, question)
        region = request.regions[0] if request.regions else None  # localized once, answered and timed with it
        answer = pruned.ask(image, question, region=region, max_new_tokens=max_new_tokens)
        found = answer.stats.rows[0].region  # the localizer's, or the one a method like crop-fused chose
        if found is not None:
            print(f"{'region' if isinstance(localizer, FixedLocalizer) else 'localized region'}: {found}")
        _report("pruned answer", answer)
        calls["pruned"] = lambda: pruned(request)
        if localizer is not None and method.needs_region:
            calls["localize"] = lambda: localizer.localize(image, question)
        timings = alternating_timings(calls)
    finally:
        pruned.remove()
    shown = ", ".join(f"{name} {timing}" for name, timing in timings.items())
    print(f"prefill time: {shown} ({describe_method()}; localization is not part of the prefill)")
    return answer


def _run_bench(args: argparse.Namespace) -> int:
    from crop import bench

    _writable(args.out)
    if args.quick:
        args.shape, args.repeats, args.new_tokens = "small", 2, 8
    counts = args.visual_tokens or []
    if args.scaling or len(counts) > 1:
        return _run_scaling(args, counts or list(bench.SCALING.get(args.shape, ())))
    report = bench.run(
        args.shape, tuple(args.budgets), repeats=args.repeats, warmup=args.warmup, new_tokens=args.new_tokens,
        device=args.device, dtype=args.dtype, out=args.out, threads=args.threads, methods=args.methods,
        llm_layers=args.llm_layers, smoke=args.quick, visual_tokens=counts[0] if counts else None,
        decode_methods=args.decode_methods,
    )  # fmt: skip
    print(f"{report['shape']['name']}: {report['note']}; {report['device']} {report['dtype']}; {report['machine']}")
    text = bench.table(report)
    print(text)
    args.out.with_suffix(".md").write_text(text + "\n")
    bench.plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out}, {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")
    return 0



def _run_scaling(args: argparse.Namespace, counts: list[int]) -> int:
    from crop.bench.scaling import plot_scaling, run_scaling, scaling_table

    if len(counts) < 2:
        raise ConfigError(f"a scaling run needs several sizes: give --visual-tokens for shape {args.shape}")
    scaling = run_scaling(
        args.shape, counts, args.keep, repeats=args.repeats, warmup=args.warmup, new_tokens=args.new_tokens,
        device=args.device, dtype=args.dtype, threads=args.threads, methods=args.methods, llm_layers=args.llm_layers,
        smoke=args.quick, decode_methods=args.decode_methods, out=args.out, resume=args.resume,
    )  # fmt: skip
    text = scaling_table(scaling)
    print(text)
    args.out.with_suffix(".md").write_text(text + "\n")
    plot_scaling(scaling, args.out.with_suffix(".png"))
    print(f"wrote {args.out}, {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")
    return 0

def _run_eval(args: argparse.Namespace) -> int:
    from crop.evaluation.report import STANDARD, standard_table
    from crop.evaluation.runner import RunConfig, run
    from crop.evaluation.tasks import TASKS

    if args.suite:
        benches = [bench for bench in STANDARD if bench in TASKS and (Path(args.data) / bench).exists()]
        absent = [bench for bench in STANDARD if bench not in benches]
        if not benches:
            raise ConfigError(f"no benchmark folder under {args.data}: expected folders named {', '.join(STANDARD)}")
        print(f"standard suite: {', '.join(benches)}; not run: {', '.join(absent) or 'none'} (no folder, or not "
              "supported yet)")  # fmt: skip
    else:
        benches = [args.bench]
    summaries = []
    for bench in benches:
        data = Path(args.data) / bench if args.suite else Path(args.data)
        config = RunConfig(
            model=args.model, bench=bench, data=str(data), split=args.split, method=args.method,
            budget=args.budget, layer=-1 if args.no_ilp else args.ilp_layer, plc_ratio=args.plc_ratio or None,
            learned_plc=args.learned_plc, clip=args.clip, localizer=args.localizer, max_new_tokens=args.max_new_tokens,
            attn=args.attn,
            dtype=args.dtype, batch_size=args.batch_size, limit=args.limit,
        )  # fmt: skip
        name = f"{bench}-{config.label.replace('@', '-')}"
        folder = args.out or Path("results") / "eval"
        out = folder / name if args.suite else args.out or folder / name
        summary = run(config, out)
        if summary is not None:
            summaries.append(summary)
            print((out / "summary.md").read_text(), end="")
            print(f"wrote {out / 'predictions.jsonl'}, {out / 'summary.json'} and {out / 'summary.md'}")
    if args.suite and summaries:
        print(standard_table(summaries))
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from crop.evaluation.report import load_summaries, markdown_table, plot, standard_table

    _writable(args.out)
    summaries = load_summaries(args.runs)
    table = markdown_table(summaries)
    if args.standard:
        table += "\n\n" + standard_table(summaries)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    plot(summaries, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def _run_methods(args: argparse.Namespace) -> int:
    from crop.strategies.registry import METHODS

    width = max(len(name) for name in METHODS)
    for info in METHODS.values():
        print(f"{info.name:{width}s}  {info.summary}; acts {info.acts}; {info.budget_note}")
    return 0


def _run_ask(args: argparse.Namespace) -> int:
    from crop.image import load_image
    from crop.loading import load_model
    from crop.localize import FixedLocalizer
    from crop.localize.by_name import localizer_by_name
    from crop.region import Region
    from crop.visualize import draw_overlay

    if args.localizer == "attention-fused":
        args.method = "crop-fused"
    method = _method(args)
    region = Region.from_grid(args.region) if args.region else None
    _writable(args.overlay)
    image = load_image(args.image)
    model, processor = load_model(args.model, attn_implementation=args.attn)
    localizer = None
    if region is not None:
        localizer = FixedLocalizer(region)
    elif method.needs_region:  # the model's own grid localizer if it has one, else its attention at K-1
        localizer = localizer_by_name(args.localizer, model, processor, layer=args.ilp_layer, model_path=args.model)
    answer = _answer_both(model, processor, method, localizer, image, args.question, args.max_new_tokens, args.compare)
    if args.overlay:
        draw_overlay(image, answer.stats.rows[0]).save(args.overlay)
        print(f"overlay: {args.overlay}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from crop.loading import load_model
    from crop.localize.by_name import localizer_by_name
    from crop.synth.assets import model_task
    from crop.synth.scene import make_sample
    from crop.visualize import draw_overlay

    method = _method(args)
    _writable(args.overlay)
    model, processor = load_model(args.model, attn_implementation=args.attn)
    localizer = localizer_by_name("default", model, processor, layer=args.ilp_layer, model_path=args.model)
    sample = make_sample("test", args.seed, model_task(args.model))
    print(f"model: {args.model}")
    print(f"question: {sample.question}  (true answer: {sample.answer}, answer region {list(sample.region.to_grid())})")
    answer = _answer_both(model, processor, method, localizer, sample.image, sample.question, args.max_new_tokens, True)
    draw_overlay(sample.image, answer.stats.rows[0]).save(args.overlay)
    print(f"overlay: {args.overlay}")
    return 0


def _run_serve_demo(args: argparse.Namespace) -> int:
    try:
        from crop.web_demo import serve
    except ImportError as exc:
        raise SystemExit(f"the web demo needs Gradio: pip install 'crop[demo]' ({exc})") from exc
    print(f"serving the demo on http://{args.host}:{args.port} (Ctrl-C stops it)")
    serve(args.model, args.localizer, host=args.host, port=args.port)
    return 0


def _run_synth_train(args: argparse.Namespace) -> int:
    from crop.synth.train import TrainConfig, Trainer

    config = TrainConfig(
        seed=args.seed,
        task=args.task,
        text_layers=args.text_layers,
        questions_per_image=args.questions_per_image,
        grounding_layer=args.grounding_layer,
        vision_steps=args.vision_steps,
        steps=args.steps,
        refine_steps=args.refine_steps,
        grounding_weight=args.grounding_weight,
        targeted_grounding_from=args.targeted_grounding_from,
        lr=args.lr,
        plc_share=args.plc_share,
        plc_region_ratio=args.plc_region_ratio,
        plc_outside_ratio=args.plc_outside_ratio,
        plc_anchors=args.plc_anchors,
        init_from=args.init_from,
        ground_vocabulary=args.ground_vocabulary,
        threads=args.threads,
        precision=args.precision,
    )
    trainer = Trainer(args.out, config)
    if trainer.step:
        print(f"resuming {args.out} at step {trainer.step} of {trainer.total_steps}")
    trainer.run()
    print(f"done: {args.out / 'model'} ({trainer.elapsed / 60:.1f} min of training)")
    return 0


def _run_synth_tune(args: argparse.Namespace) -> int:
    from crop.synth.evaluate import tune_attention_localizer

    _writable(args.out)
    results = tune_attention_localizer(args.model, count=args.n, threads=args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print("rows     layer penalty | mean IoU (detail object wide all) | answer-region recall (all) | mean area (all)")
    for row in results["grid"]:
        ious = " ".join(f"{row[k]['mean_iou']:.3f}" for k in ("detail", "object", "wide", "all"))
        recall, area = row["all"]["answer_region_recall"], row["all"]["mean_region_area"]
        print(f"{row['rows']:8s} {row['layer']:5d} {row['penalty']:7.2f} | {ious} | {recall:.3f} | {area:.3f}")
    print(f"best by mean IoU: {results['best']} -> {args.out}")
    return 0


def _run_synth_compare(args: argparse.Namespace) -> int:
    from crop.synth.control import compare_evaluations, markdown_comparison

    _writable(args.out)
    runs = []
    for path in (args.first, args.second):
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot read {path} as a `crop synth eval` results JSON: {error}") from error
        if not isinstance(runs[-1], dict) or "variants" not in runs[-1]:
            raise ConfigError(f"{path} is not a `crop synth eval` results JSON (it has no 'variants')")
    try:
        comparison = compare_evaluations(*runs)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    table = markdown_comparison(comparison)
    if args.out is not None:
        args.out.write_text(json.dumps(comparison, indent=2))
        args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


def _run_synth_eval(args: argparse.Namespace) -> int:
    from crop.synth.evaluate import evaluate, markdown_table

    _writable(args.out)
    _writable(args.plot)
    results = evaluate(
        args.model, count=args.n, out=args.out, plot=args.plot, threads=args.threads,
        attention_penalty=args.attention_penalty, attention_rows=args.attention_rows,
    )  # fmt: skip
    table = markdown_table(results)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(json.dumps({"localization": results["localization"]["all"], "cost": results["localizer_cost"]}, indent=1))
    print(f"wrote {args.out}, {args.out.with_suffix('.md')} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

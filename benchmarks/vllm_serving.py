"""Serving speed with crop's vLLM plugin: requests per second and time to first token, full against pruned, in one
run (one engine at a time, each warmed up on the timed batch once, then timed rounds; medians over rounds).

Run in the vLLM venv (`scripts/install_vllm_cpu.sh`):
    python benchmarks/vllm_serving.py --model synth --out results/bench_vllm_synth
    python benchmarks/vllm_serving.py --model llava-1.5-7b --llm-layers 8 --dtype bfloat16 \
        --out results/bench_vllm_llava7b

`synth` is the shipped synthetic LLaVA (256 visual tokens); `llava-1.5-7b` writes a random-weight checkpoint of
LLaVA-1.5-7B's shape (CLIP-L/336, 576 visual tokens, Llama-7B layers; `--llm-layers` cuts the LLM) to a
temporary folder with crop's tiny word-level tokenizer: speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from vllm import LLM, SamplingParams

from crop.serving.vllm_llava import ARCHITECTURE, save_for_vllm
from crop.synth.assets import SHIPPED_MODEL, model_task
from crop.synth.scene import make_sample

CONFIGS = {
    "full": None,
    "crop-64": {"method": "crop", "budget": 64},
    "divprune-64": {"method": "divprune", "budget": 64},
    "pool-64": {"method": "pool", "budget": 64},
    "visionzip-64": {"method": "visionzip", "budget": 64},
}
REGION = [2, 2, 5, 5]


def seven_b_checkpoint(folder: Path, llm_layers: int, dtype: str) -> Path:
    """LLaVA-1.5-7B's shape with random weights and crop's tiny tokenizer, saved for vLLM."""
    import torch

    from crop.bench.families import build_bench_model
    from crop.bench.shapes import bench_shape
    from crop.testing.llava import build_processor

    processor = build_processor(image_size=336, patch_size=14)
    shape = bench_shape("llava-1.5-7b", llm_layers, None)
    model = build_bench_model(shape, getattr(torch, dtype))
    model.config.image_token_index = processor.tokenizer.convert_tokens_to_ids("<image>")
    model.save_pretrained(folder / "hf")
    processor.save_pretrained(folder / "hf")
    del model
    gc.collect()
    return save_for_vllm(folder / "hf", folder / "vllm")


def requests(count: int, question_prompt: str | None) -> list[dict]:
    """`count` requests with different images from the synthetic test split, each with the same region."""
    out = []
    for index in range(count):
        sample = make_sample("test", index, model_task(SHIPPED_MODEL))
        prompt = question_prompt or f"USER: <image>\n{sample.question} ASSISTANT:"
        out.append({"prompt": prompt, "multi_modal_data": {"image": sample.image},
                    "mm_processor_kwargs": {"crop_region": REGION}})  # fmt: skip
    return out


def measure(checkpoint: Path, settings: dict | None, batch: list[dict], args) -> dict:
    overrides = None if settings is None else {"architectures": [ARCHITECTURE], "crop": settings}
    llm = LLM(
        model=str(checkpoint), dtype=args.dtype, enforce_eager=True, max_model_len=2048, seed=0,
        limit_mm_per_prompt={"image": 1}, hf_overrides=overrides, disable_log_stats=False,
    )  # fmt: skip
    sampling = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    llm.generate(batch, sampling, use_tqdm=False)  # warm-up: the timed batch's shapes once
    rounds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        outputs = llm.generate(batch, sampling, use_tqdm=False)
        wall = time.perf_counter() - start
        first = [o.metrics.first_token_latency for o in outputs if o.metrics is not None]
        single_start = time.perf_counter()
        llm.generate(batch[:1], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
        alone = time.perf_counter() - single_start
        in_batch = statistics.median(first) if first else None
        rounds.append({"requests_per_s": len(batch) / wall, "ttft_in_batch_s": in_batch, "ttft_alone_s": alone})
    prompt_tokens = statistics.median(len(o.prompt_token_ids) for o in outputs)
    del llm
    gc.collect()
    summary = {key: statistics.median(r[key] for r in rounds if r[key] is not None) for key in rounds[0]}
    spread = {key: (max(r[key] for r in rounds) - min(r[key] for r in rounds)) / summary[key] for key in summary}
    return {"settings": settings, "prompt_tokens": prompt_tokens, **summary, "spread": spread, "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["synth", "llava-1.5-7b"], default="synth")
    parser.add_argument("--llm-layers", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", type=Path, required=True, help="path without suffix: writes .json and .md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        if args.model == "synth":
            checkpoint = save_for_vllm(SHIPPED_MODEL, Path(folder) / "vllm")
            batch = requests(args.requests, None)
        else:
            checkpoint = seven_b_checkpoint(Path(folder), args.llm_layers, args.dtype)
            batch = requests(args.requests, "USER: <image>\nwhat is the shape ? ASSISTANT:")
        rows = {}
        for name in args.configs:
            rows[name] = measure(checkpoint, CONFIGS[name], batch, args)
            print(name, {k: v for k, v in rows[name].items() if k != "rounds"}, flush=True)
    command = "python benchmarks/vllm_serving.py " + " ".join(sys.argv[1:])
    report = {"command": command, "model": args.model, "llm_layers": args.llm_layers if args.model != "synth" else None,
              "dtype": args.dtype, "requests": args.requests, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "region": REGION, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    full = report["rows"].get("full")
    depth = f", LLM {report['llm_layers']} of 32 layers" if report.get("llm_layers") else ""
    lines = [
        f"# vLLM serving, {report['model']} ({report['dtype']}{depth}, {report['requests']} requests of "
        f"{report['new_tokens']} new tokens, medians of {report['repeats']} rounds)",
        "",
        f"Command (in the vLLM venv): `{report.get('command', '')}`. Each config is one engine (crop's plugin, region "
        f"{report['region']} on the 8x8 grid), warmed up on the batch once; requests/s: the batch submitted at once; "
        "TTFT in batch: the median request's time to first token within it; TTFT alone: one request, one token.",
        "",
        "| config | prompt tokens | requests/s | x full | TTFT in batch (s) | TTFT alone (s) | x full | spread > 20% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["rows"].items():
        rps = f"{row['requests_per_s'] / full['requests_per_s']:.2f}" if full else ""
        ttft = f"{row['ttft_alone_s'] / full['ttft_alone_s']:.2f}" if full else ""
        noisy = ", ".join(key for key, value in row["spread"].items() if value > 0.2) or "no"
        lines.append(
            f"| {name} | {row['prompt_tokens']:.0f} | {row['requests_per_s']:.2f} | {rps} | "
            f"{row['ttft_in_batch_s']:.3f} | {row['ttft_alone_s']:.3f} | {ttft} | {noisy} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

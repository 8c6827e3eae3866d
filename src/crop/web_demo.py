"""`crop serve-demo`: a local Gradio page that answers with all and with pruned visual tokens, side by side.

The page shows both answers, the localizer's region and the kept tokens drawn over the image (one picture per stage
for methods that prune in stages), token counts and prefill times. Bad input shows a message on the page; the
server keeps serving.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crop.compare import Comparison, compare, warm_up
from crop.errors import CropError
from crop.loading import load_model
from crop.localize.by_name import localizer_by_name
from crop.strategies.registry import METHODS
from crop.synth.assets import SHIPPED_MODEL, model_task
from crop.synth.scene import make_sample
from crop.timing import describe_method

logger = logging.getLogger(__name__)

EXAMPLE_INDICES = (0, 3, 5, 7, 1, 8)
"""Synthetic test questions offered as examples (of the shipped model's task): one or two of each kind."""


@dataclass
class LoadedModel:
    """The model the page answers with; replaced only when a new one loads without error."""

    path: str
    model: Any
    processor: Any
    localizer: Any

    @classmethod
    def load(cls, path: str, localizer_path: str | None = None, attn: str = "sdpa") -> LoadedModel:
        model, processor = load_model(path, attn_implementation=attn)
        warm_up(model, processor)
        localizer = localizer_by_name(localizer_path or "default", model, processor, model_path=path)
        return cls(path, model, processor, localizer)

    @property
    def visual_tokens(self) -> int | None:
        """Visual tokens of one image for fixed-grid models (the budget slider's range), else None."""
        from crop.adapter import adapter_for

        layout = adapter_for(self.model).visual_layout()
        return None if layout is None else layout.rows * layout.cols


def write_examples(folder: Path) -> list[list[str]]:
    """`[image path, question]` pairs from the synthetic test split, written as PNG files into `folder`."""
    examples = []
    for index in EXAMPLE_INDICES:
        sample = make_sample("test", index, model_task(SHIPPED_MODEL))
        path = folder / f"synth-test-{index}.png"
        sample.image.save(path)
        examples.append([str(path), sample.question])
    return examples


def describe(comparison: Comparison) -> tuple[str, str]:
    """Markdown lines under each answer: token counts and prefill time (and the region for the pruned side)."""
    full, pruned = comparison.full, comparison.pruned
    full_text = (
        f"**visual tokens:** {full.stats.image_tokens} into the LLM, {full.stats.kept_tokens} kept  \n"
        f"**prefill:** {full.prefill}"
    )
    region = "none (the method picks tokens itself)" if comparison.region is None else str(comparison.region)
    localize = "" if comparison.localize is None else f"; localization {comparison.localize}, not included"
    pruned_text = (
        f"**method:** {comparison.method}  \n"
        f"**region:** {region}  \n"
        f"**visual tokens:** {pruned.stats.image_tokens} in the image, {pruned.stats.llm_input_tokens} into the "
        f"LLM, {pruned.stats.kept_tokens} kept (average over layers {pruned.stats.average_tokens:.1f})  \n"
        f"**prefill:** {pruned.prefill}{localize}  \n"
        f"*times: {describe_method()}*"
    )
    return full_text, pruned_text


def build_app(
    loaded: LoadedModel | None, examples_dir: Path, load_error: str = "", localizer_path: str | None = None
) -> Any:
    """The Gradio Blocks of the demo around `loaded` (None when the model given at start failed to load)."""
    import gradio as gr

    state = {"model": loaded}
    examples = write_examples(examples_dir)

    def model_status() -> str:
        current = state["model"]
        return "**no model loaded**" if current is None else f"**model:** `{current.path}`"

    def load(path: str) -> tuple[str, str]:
        try:
            state["model"] = LoadedModel.load(path.strip(), localizer_path)
        except (CropError, OSError) as exc:
            return model_status(), f"**Model failed to load:** {exc}"
        return model_status(), f"Loaded `{path.strip()}`."

    def run(image: Any, question: str, method: str, budget: float, layer: float) -> tuple:
        current = state["model"]
        empty = ("", "", "", "", None, [])
        if current is None:
            return ("**No model loaded:** enter a model directory above and press *Load*.", *empty)
        try:
            result = compare(
                current.model, current.processor, image, question, method=method,
                budget=int(budget) or None, localizer=current.localizer, layer=int(layer),
            )  # fmt: skip
        except CropError as exc:
            return (f"**Cannot answer:** {exc}", *empty)
        except Exception as exc:  # the page must keep serving whatever one request does
            logger.exception("demo request failed")
            return (f"**Failed:** {type(exc).__name__}: {exc}", *empty)
        full_text, pruned_text = describe(result)
        gallery = [(picture, label) for label, picture in result.stage_overlays]
        return ("", result.full.answer, full_text, result.pruned.answer, pruned_text, result.overlay, gallery)

    tokens = loaded.visual_tokens if loaded is not None else None
    with gr.Blocks(title="crop: region-oriented visual token pruning") as app:
        gr.Markdown(
            "# crop: what did pruning keep?\nAsk a question about an image: it is answered with all visual tokens "
            "and with a pruning method. Dark cells were dropped, half-dark ones pooled; the red box is the region."
        )
        with gr.Row():
            model_path = gr.Textbox(
                value="" if loaded is None else loaded.path, label="model directory", scale=4, elem_id="model-path"
            )
            load_button = gr.Button("Load", scale=1)
        status = gr.Markdown(model_status(), elem_id="model-status")
        message = gr.Markdown(f"**Model failed to load:** {load_error}" if load_error else "", elem_id="message")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="image", elem_id="image", height=320)
                question = gr.Textbox(label="question", elem_id="question")
                with gr.Row():
                    method = gr.Dropdown(list(METHODS), value="crop", label="method", elem_id="method")
                    layer = gr.Number(2, precision=0, label="layer K", elem_id="layer")
                budget = gr.Slider(
                    0, tokens or 2880, value=0, step=1, elem_id="budget",
                    label="budget: visual tokens to keep (0: region-sized, crop only)",
                )  # fmt: skip
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                gr.Examples(examples, inputs=[image, question])
            with gr.Column():
                gr.Markdown("## All visual tokens")
                full_answer = gr.Textbox(label="answer", elem_id="full-answer")
                full_info = gr.Markdown(elem_id="full-info")
                gr.Markdown("## Pruned")
                pruned_answer = gr.Textbox(label="answer", elem_id="pruned-answer")
                pruned_info = gr.Markdown(elem_id="pruned-info")
                overlay = gr.Image(label="kept visual tokens", elem_id="overlay", height=320)
                stages = gr.Gallery(label="per stage (methods that prune in stages)", columns=4, height=200)
        load_button.click(load, inputs=model_path, outputs=[status, message])
        ask.click(
            run,
            inputs=[image, question, method, budget, layer],
            outputs=[message, full_answer, full_info, pruned_answer, pruned_info, overlay, stages],
        )
    return app


def serve(
    model_path: str,
    localizer_path: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    block: bool = True,
) -> Any:
    """Load the model (a failure is shown on the page, not raised) and start the page on `host:port`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    loaded, error = None, ""
    try:
        loaded = LoadedModel.load(model_path, localizer_path)
    except (CropError, OSError) as exc:
        error = str(exc)
        logger.error("model failed to load: %s", exc)
    examples_dir = Path(tempfile.mkdtemp(prefix="crop-demo-"))
    app = build_app(loaded, examples_dir, error, localizer_path)
    system_fonts = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the demo works offline
    theme = gr.themes.Default(font=system_fonts, font_mono=["ui-monospace", "monospace"])
    app.queue().launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, theme=theme, ssr_mode=False,
        allowed_paths=[str(examples_dir)], quiet=not block,
    )  # fmt: skip
    return app

"""The synthetic task's model: a small LLaVA (CLIP tower, Llama) with the task's own word-level tokenizer."""

from __future__ import annotations

from transformers import LlavaForConditionalGeneration, LlavaProcessor

from crop.synth.document import COLUMN_LABELS, ROW_LABELS
from crop.synth.scene import COLOURS, IMAGE_SIZE, PATCH, SHAPES
from crop.testing.llava import build_model, build_processor

WORDS = [
    "USER", "ASSISTANT", ":", "?", "what", "digit", "shape", "is", "the", "on", "object", "there", "a", "locate",
    "yes", "no", *COLOURS, *SHAPES, *[str(d) for d in range(10)], "in", "row", "column", *ROW_LABELS,
    *COLUMN_LABELS,
]  # fmt: skip
LOCATE_INSTRUCTION = "locate : {question}"
"""The localization prompt the model is trained with and `GridVLMLocalizer` sends: the answer is `x0 y0 x1 y1`."""

ARCHITECTURE = {
    "image_size": IMAGE_SIZE,
    "patch_size": PATCH,
    "vision_hidden": 160,
    "vision_layers": 3,
    "text_hidden": 192,
    "text_layers": 8,
    "initializer_range": 0.02,
}
"""The current model's shape; the first shipped model (task `shapes`) had `text_layers = 4`."""


def build_synth_model(
    seed: int = 0, attn_implementation: str = "eager", text_layers: int = ARCHITECTURE["text_layers"]
) -> LlavaForConditionalGeneration:
    """The untrained synthetic-task model (16x16 = 256 visual tokens) with a `text_layers`-layer LLM."""
    shape = ARCHITECTURE | {"text_layers": text_layers}
    return build_model(words=WORDS, seed=seed, attn_implementation=attn_implementation, **shape)


def build_synth_processor() -> LlavaProcessor:
    return build_processor(image_size=IMAGE_SIZE, patch_size=PATCH, words=WORDS)

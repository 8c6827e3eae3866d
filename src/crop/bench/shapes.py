"""The benchmarked model: LLaVA-style layer shapes, the random-weight model and prompt built from them, and the
analytic FLOPs and KV-cache bytes of a prefill."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from crop.errors import ConfigError


@dataclass(frozen=True)
class Shape:
    """Layer shapes of a benchmarked VLM; `llm_layers` (and `vision_layers`) may be reduced from the real model's
    to fit memory or time. `image` is the benchmarked image (width, height) of families with dynamic resolution."""

    name: str
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    llm_layers: int
    real_llm_layers: int
    vocab: int = 32064
    family: str = "llava"
    image: tuple[int, int] | None = None
    real_vision_layers: int | None = None

    @property
    def grid_tokens(self) -> int:
        """Visual tokens of the benchmarked image (LLaVA-NeXT: base grid, unpadded high-res grid and newlines)."""
        if self.family == "qwen2_5_vl":
            width, height = self.image or (self.image_size, self.image_size)
            return (width // (2 * self.patch_size)) * (height // (2 * self.patch_size))
        if self.family == "llava_next":
            return NEXT_TOKENS[self.image_size][self.image]
        return (self.image_size // self.patch_size) ** 2


NEXT_TOKENS = {
    336: {(336, 336): 1176, (672, 336): 1752, (672, 672): 2928},
    112: {(112, 112): 136, (224, 224): 336},
}
"""LLaVA-NeXT visual tokens per tile size and image (width, height), as its processor counts them with the pinpoints
of `NEXT_PINPOINTS`: a square base grid, the unpadded high-res grid and one newline per high-res row (a 336-pixel
image fills a 1x2 tile layout and is unpadded to one tile's grid)."""

NEXT_PINPOINTS = {
    336: [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    112: [[112, 224], [224, 112], [224, 224]],
}
"""LLaVA-NeXT-7B's tile layouts (height, width), and the tiny shape's."""

SHAPES = {
    "llava-1.5-7b": Shape("llava-1.5-7b", 1024, 4096, 24, 16, 336, 14, 4096, 11008, 32, 32, 8, 32),
    "llava-next-7b": Shape(
        "llava-next-7b", 1024, 4096, 24, 16, 336, 14, 4096, 11008, 32, 32, 8, 32, family="llava_next", image=(672, 672)
    ),
    "qwen2.5-vl-7b": Shape(
        "qwen2.5-vl-7b", 1280, 3420, 2, 16, 896, 14, 3584, 18944, 28, 4, 8, 28, vocab=152064, family="qwen2_5_vl",
        image=(896, 896), real_vision_layers=32,
    ),  # fmt: skip
    "small": Shape("small", 256, 1024, 4, 4, 336, 14, 512, 1376, 8, 8, 8, 8),
    "tiny": Shape("tiny", 32, 64, 2, 2, 112, 14, 64, 128, 4, 2, 4, 4),
    "tiny-next": Shape("tiny-next", 32, 64, 2, 2, 112, 14, 64, 128, 4, 2, 4, 4, family="llava_next", image=(224, 224)),
    "tiny-qwen": Shape(
        "tiny-qwen", 32, 64, 2, 2, 224, 14, 64, 128, 4, 2, 4, 4, vocab=0, family="qwen2_5_vl", image=(224, 224)
    ),
}
SCALING = {"qwen2.5-vl-7b": (1024, 4096, 16384), "llava-next-7b": (1176, 1752, 2928), "tiny-qwen": (16, 64)}
"""Visual-token counts of a scaling run (`crop bench --scaling`) per shape."""


def bench_shape(name: str, llm_layers: int | None = None, visual_tokens: int | None = None) -> Shape:
    """A shape by name, its LLM cut to (or restored to) `llm_layers` and its image sized to `visual_tokens` if
    given."""
    if name not in SHAPES:
        raise ConfigError(f"unknown benchmark shape {name!r}; available: {', '.join(SHAPES)}")
    shape = SHAPES[name]
    if visual_tokens is not None:
        shape = _with_visual_tokens(shape, visual_tokens)
    if llm_layers is None:
        return shape
    if not 3 <= llm_layers <= shape.real_llm_layers:
        raise ConfigError(
            f"--llm-layers {llm_layers} is outside 3..{shape.real_llm_layers} for {name}: the in-LLM methods prune "
            f"at layer 2, and {shape.real_llm_layers} is the real model's depth"
        )
    return replace(shape, llm_layers=llm_layers)


def _with_visual_tokens(shape: Shape, count: int) -> Shape:
    """`shape` with the square image (Qwen: any square count of merged tokens) or the LLaVA-NeXT image layout that
    gives `count` visual tokens."""
    if shape.family == "qwen2_5_vl":
        side = round(count**0.5)
        if side * side != count:
            raise ConfigError(f"{shape.name} benchmarks square images: {count} visual tokens is not a square number")
        pixels = side * 2 * shape.patch_size
        return replace(shape, image=(pixels, pixels))
    if shape.family == "llava_next":
        images = {tokens: image for image, tokens in NEXT_TOKENS[shape.image_size].items()}
        if count not in images:
            raise ConfigError(
                f"{shape.name} benchmarks {sorted(images)} visual tokens (one per image layout), not {count}"
            )
        return replace(shape, image=images[count])
    if count != shape.grid_tokens:
        raise ConfigError(f"{shape.name} has a fixed grid of {shape.grid_tokens} visual tokens, not {count}")
    return shape


def check_device(device: str) -> None:
    """Refuses a device this torch build cannot use, before minutes of model building."""
    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise ConfigError(f"--device {device!r} is not supported; use cpu or cuda (cuda:N)")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device} but CUDA is not available to torch {torch.__version__} here")


def prefill_flops(shape: Shape, tokens_per_layer: list[int]) -> float:
    """Analytic multiply-add FLOPs (x2) of the LLM prefill: projections, attention scores and values, MLP."""
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    total = 0.0
    for n in tokens_per_layer:
        projections = 2 * n * shape.hidden * (2 * shape.hidden + 2 * kv)
        attention = 2 * 2 * n * n * shape.hidden  # QK^T and AV over the full (unmasked) square
        mlp = 2 * 3 * n * shape.hidden * shape.intermediate
        total += projections + attention + mlp
    return total


def vision_flops(shape: Shape) -> float:
    """Analytic FLOPs of encoding the image, the same for every method (two-pass localization encodes it a second
    time, which this count leaves out). CLIP (LLaVA; LLaVA-NeXT once per tile and for the base image): patch
    embedding, every layer on the patches and CLS (transformers runs them all to return hidden states), the
    two-layer projector. Qwen2.5-VL: every layer on the patches (4 per visual token) with 8x8-patch window
    attention, SwiGLU MLPs, and the merger MLP."""
    h = shape.vision_hidden
    if shape.family == "qwen2_5_vl":
        patches = 4 * shape.grid_tokens
        per_layer = 2 * patches * h * 4 * h + 2 * 2 * patches * 64 * h + 2 * 3 * patches * h * shape.vision_intermediate
        merger = 2 * shape.grid_tokens * (4 * h * 4 * h + 4 * h * shape.hidden)
        return 2 * patches * 3 * 2 * shape.patch_size**2 * h + shape.vision_layers * per_layer + merger
    side = shape.image_size // shape.patch_size
    tokens = side * side + 1
    embedding = 2 * side * side * 3 * shape.patch_size**2 * h
    per_layer = 2 * tokens * h * 4 * h + 2 * 2 * tokens * tokens * h + 2 * 2 * tokens * h * shape.vision_intermediate
    crops = 1
    if shape.family == "llava_next":
        width, height = shape.image or (shape.image_size, shape.image_size)
        crops = 1 + max(1, (width // shape.image_size) * (height // shape.image_size))
        crops = max(crops, 3)  # a smaller image still fills the smallest (1x2) tile layout
    projector = 2 * shape.grid_tokens * (h * shape.hidden + shape.hidden * shape.hidden)
    return crops * (embedding + shape.vision_layers * per_layer) + projector


def kv_cache_bytes(shape: Shape, tokens_per_layer: list[int], dtype: torch.dtype, batch: int = 1) -> int:
    """Keys and values of every layer after prefill."""
    head_dim = shape.hidden // shape.heads
    element = torch.tensor([], dtype=dtype).element_size()
    return sum(2 * batch * n * shape.kv_heads * head_dim * element for n in tokens_per_layer)

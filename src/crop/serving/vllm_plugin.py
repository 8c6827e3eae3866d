"""crop's vLLM plugin (entry point `vllm.general_plugins`): registers crop's pruned architectures by name, lazily.

A model runs pruned only when its config names one of them (vLLM's `hf_overrides`, with the `crop` settings);
every other model, and vLLM's own classes, stay as they are.
"""

from __future__ import annotations

ARCHITECTURES = {
    "CropLlavaForConditionalGeneration": "crop.serving.vllm_llava:CropLlavaForConditionalGeneration",
    "CropQwen2_5_VLForConditionalGeneration": "crop.serving.vllm_qwen2_5_vl:CropQwen2_5_VLForConditionalGeneration",
}
"""Architecture name -> `module:class`, imported by vLLM when a model asks for it."""


def register() -> None:
    """Add crop's architectures to vLLM's model registry (called by vLLM in each of its processes)."""
    from vllm import ModelRegistry

    for name, target in ARCHITECTURES.items():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, target)

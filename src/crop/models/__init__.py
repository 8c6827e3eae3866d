"""Model families: one adapter file each, registered with `crop.adapter.register` when imported here (the core
imports this package through the `crop.families` entry point, on the first adapter lookup).

Adding a family is adding its file and its name below. A family whose classes the installed transformers lacks
(an older release) is left out, with the reason in `UNAVAILABLE`: no model of it can be loaded there anyway.
"""

from importlib import import_module

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen3_vl", "qwen3_5", "internvl", "gemma4")
UNAVAILABLE: dict[str, str] = {}

for _family in FAMILIES:
    try:
        import_module(f"crop.models.{_family}")
    except ImportError as exc:
        if not (exc.name or "").startswith("transformers"):
            raise
        UNAVAILABLE[_family] = str(exc)

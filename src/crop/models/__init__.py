"""Model families: one adapter file each, registered with `crop.adapter.register` when imported here (the core
imports this package through the `crop.families` entry point, on the first adapter lookup).

Adding a family is adding its file and one import line below.
"""

from crop.models import (  # noqa: F401  (each registers its adapter)
    gemma4,
    internvl,
    llava,
    llava_next,
    llava_onevision,
    qwen2_vl,
    qwen3_5,
    qwen3_vl,
)

"""Where the shipped synthetic-task checkpoint lives (inside the package, so installs carry it)."""

import json
from pathlib import Path

TASK_FILE = "crop_synth.json"
"""Written beside a trained model: the synthetic task it was trained on (`{"task": ...}`)."""

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "synth-vlm"
"""The synthetic-task VLM and localizer (one model, two prompts), as `crop synth train` writes it."""

SHIPPED_PLC_MODEL = Path(__file__).resolve().parent.parent / "assets" / "synth-vlm-plc"
"""The same model trained on with a learned PLC compressor (`learned_plc.*` beside it), for the learned-PLC results."""


def model_task(model_dir: str | Path) -> str:
    """The synthetic task `model_dir` was trained on; `shapes` for checkpoints written before tasks were named."""
    path = Path(model_dir) / TASK_FILE
    return json.loads(path.read_text())["task"] if path.is_file() else "shapes"

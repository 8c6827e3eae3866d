"""Where the shipped synthetic-task checkpoint lives (inside the package, so installs carry it)."""

from pathlib import Path

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "synth-vlm"
"""The synthetic-task VLM and localizer (one model, two prompts), as `crop synth train` writes it."""

SHIPPED_PLC_MODEL = Path(__file__).resolve().parent.parent / "assets" / "synth-vlm-plc"
"""The same model trained on with a learned PLC compressor (`learned_plc.*` beside it), for the learned-PLC results."""

"""The unpruned reference as a method: every visual token reaches every layer."""

from __future__ import annotations

from crop.strategies.base import InLLMMethod, Method, PreLLMMethod


class Full(Method):
    """Nothing is pruned; the model answers exactly as without crop (the reference every retention divides by)."""

    name = "full"

    def parts(self) -> tuple[PreLLMMethod | None, InLLMMethod | None]:
        return None, None

    def describe(self) -> str:
        return "full (no pruning)"

"""Turning a question into the prompt text a VLM's processor expects."""

from __future__ import annotations

from typing import Any

from crop.errors import ConfigError


def build_prompt(processor: Any, question: str, template: str | None = None) -> str:
    """The prompt for one image and one question.

    With `template` (a string holding `{question}` and the processor's image token), that is used as is;
    otherwise the processor's chat template is applied to a user turn holding the image and the question.
    """
    if not isinstance(question, str) or not question.strip():
        raise ConfigError(f"the question must be a non-empty string, got {question!r}")
    if template is not None:
        return template.format(question=question)
    if getattr(processor, "chat_template", None) is None:
        raise ConfigError(
            "the processor has no chat template: pass prompt_template='USER: <image>\\n{question} ASSISTANT:' "
            "(with your model's image token)"
        )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)

"""Pruning inside serving engines: the engine-independent part (`pruning`) and the vLLM plugin (`vllm_*`)."""

"""Tiny random-weight models of each supported family, built from configs offline: for tests, benchmarks and the
synthetic task. They have the real classes, processors and loading path, only small; their answers mean nothing.

One module per family: `llava` (LLaVA-1.5, also the word-level tokenizer and chat template the others share),
`llava_next`, `qwen2_vl` (Qwen2-VL and Qwen2.5-VL).
"""

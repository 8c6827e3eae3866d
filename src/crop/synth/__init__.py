"""Synthetic grounded VQA: a generator, a small LLaVA trained on it, and accuracy-versus-budget evaluation."""

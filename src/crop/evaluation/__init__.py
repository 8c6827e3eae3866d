"""Evaluation on real VQA benchmarks: metrics, dataset readers, a resumable runner and reports."""

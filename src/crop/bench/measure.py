"""Measuring one call: wall time, peak memory growth, decode speed within one `generate`, and the bytes of the KV
cache it left."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import LogitsProcessor


class PeakMemory:
    """Peak growth of the process's resident memory (CPU) or of allocated CUDA memory during a block."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss() - self._base)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss() - self._base)


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """Wall time of `fn()` (CUDA: between synchronised events)."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        result = fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000, result
    begin = time.perf_counter()
    result = fn()
    return time.perf_counter() - begin, result


class StepClock(LogitsProcessor):
    """Records the time each generated token's logits are ready (CUDA: after synchronising), so that decode speed
    is read from one `generate` call: the span from the first token (end of prefill) to the last."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores

    def tokens_per_second(self) -> float:
        """Decode steps after the first token, per second of their span."""
        steps = len(self.times) - 1
        if steps < 1:
            raise ValueError("decode speed needs at least two generated tokens")
        return steps / max(self.times[-1] - self.times[0], 1e-9)


def measured_cache_bytes(cache: Any) -> int:
    """Bytes of the keys and values a prefill left in `cache`, read from its tensors."""
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)

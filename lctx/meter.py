"""Measuring a unit of work: wall time and peak memory (CUDA's allocator, or the process's RSS on CPU), and
telling an out-of-memory failure from any other. Shared by the runner and the benchmarks, so both measure alike.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

import torch


def is_oom(err: BaseException) -> bool:
    """Out of memory: CUDA's or Python's error, or a RuntimeError saying so (CPU allocators)."""
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class Meter:
    """Wall time and peak memory of a block: CUDA max allocated, or peak RSS growth sampled on CPU."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device = device
        self.interval = interval
        self.seconds = 0.0
        self.peak_bytes: int | None = None
        self.process_peak_bytes: int | None = None  # CPU: the whole process's peak RSS
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_growth"

    def __enter__(self) -> Meter:
        self._stop = threading.Event()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            free_memory(self.device)
            self._start_thread()
        self._t0 = time.perf_counter()
        return self

    def _start_thread(self) -> None:
        try:
            import psutil
        except ImportError:  # coarse fallback: ru_maxrss only grows past its previous maximum
            import resource

            self._rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        else:
            process = psutil.Process()
            self._rss = lambda: process.memory_info().rss
        self._base = self._peak = self._rss()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self._peak = max(self._peak, self._rss())

        self._thread = threading.Thread(target=sample, daemon=True, name="lctx-rss")
        self._thread.start()

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._rss())
            self.peak_bytes = int(self._peak - self._base)
            self.process_peak_bytes = int(self._peak)
        self.seconds = time.perf_counter() - self._t0


def free_memory(device: torch.device | None) -> None:
    """Collect garbage and hand freed memory back (CUDA cache; glibc heap), so the next cell's peak is its own."""
    import gc

    gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()
    malloc_trim()


def malloc_trim() -> None:
    """glibc keeps freed blocks mapped, which would hide a cell's RSS growth; ask it to return them."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)

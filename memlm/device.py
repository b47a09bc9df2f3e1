"""The device layer: which device to run on, its compute precision, freeing what a run left, and
timing on it (CUDA events around a region with no host sync inside, a wall clock on CPU, medians of
repeats, and the measured matmul peak that MFU is taken against). The trainer, the CLI, the
benchmark harness and the kernel benchmarks all take these from here."""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from typing import Callable

import torch

PEAK_MATMUL = {"cuda": (8192, torch.bfloat16), "cpu": (256, torch.float32)}
"""Per device type: (n, dtype) of the n x n x n matmul whose best rate is the peak."""


def pick_device(name: str = "auto") -> torch.device:
    """`auto` -> cuda when available, else cpu; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """The autocast context of `precision` (auto: bf16 on CUDA, fp32 elsewhere; bf16; fp32).
    Weights stay float32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def release(device: torch.device) -> None:
    """Free what the last run left: Python garbage, compiled graphs, cached device memory."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of fn() on the device: CUDA events recorded around it, one sync at the end."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


def repeat_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """`seconds(fn)` measured `repeats` times."""
    return [seconds(fn, device) for _ in range(repeats)]


def cuda_ms(fn: Callable[[], object], budget_s: float = 1.0, max_reps: int = 20) -> float:
    """Mean milliseconds per call of fn on the current CUDA device: one warm-up call (it may
    compile), one timed call to size the repeats, then as many calls as fit in about budget_s
    (1 to max_reps) between two CUDA events. For kernel benchmarks and GPU tests."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - start
    reps = max(1, min(max_reps, int(budget_s / max(once, 1e-6))))
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / reps


def median(values: list[float]) -> float:
    return statistics.median(values)


def measure_peak_flops(device: torch.device, repeats: int = 3, iters: int = 10) -> dict:
    """The best FLOP/s of an n^3 matmul (bf16 8192^3 on CUDA, float32 256^3 on CPU) over repeats
    of `iters` products, after a warm-up. Returns {flops, n, dtype}."""
    n, dtype = PEAK_MATMUL["cuda" if device.type == "cuda" else "cpu"]
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)  # (n, n)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)

    def products() -> None:
        for _ in range(iters):
            torch.mm(a, b)

    products()
    best = min(repeat_seconds(products, device, repeats))
    return {"flops": 2 * n ** 3 * iters / best, "n": n, "dtype": str(dtype).removeprefix("torch.")}

"""Run records: metrics.jsonl (one JSON object a line), TensorBoard events, samples.txt.

Every record has a `kind` ("train", "eval" or "test") and the `step` it belongs to. On
resume, metrics after the checkpoint's step (written by the run that crashed) are dropped,
so the metrics read as one uninterrupted run; samples.txt keeps every sample written. `Meter`
gathers a train record's loss and time.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

METRICS, SAMPLES = "metrics.jsonl", "samples.txt"


class MetricsLog:
    """Appends records to <run>/metrics.jsonl and mirrors their numbers to TensorBoard."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where a run logs

        self.path = Path(run_dir) / METRICS
        self.samples = Path(run_dir) / SAMPLES
        if resume_step is not None:
            truncate(self.path, resume_step)
        else:  # a fresh run: no records of an earlier attempt that never reached a checkpoint
            self.path.unlink(missing_ok=True)
            self.samples.unlink(missing_ok=True)
        purge = resume_step + 1 if resume_step is not None else None  # records of steps > resume_step
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def write(self, kind: str, step: int, **values: Any) -> None:
        record = {"kind": kind, "step": step, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{kind}/{name}", value, step)

    def sample(self, step: int, text: str) -> None:
        with self.samples.open("a") as f:
            f.write(f"=== step {step} ===\n{text}\n\n")
        self.writer.add_text("sample", text, step)

    def close(self) -> None:
        self.writer.close()


def read(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (or of the run directory holding it)."""
    path = Path(path)
    path = path / METRICS if path.is_dir() else path
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a record torn by a crash or a full disk: dropped
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and "kind" in record:
            records.append(record)  # damage that still parses (a bare number, a list) is dropped too
    return records


def truncate(path: Path, step: int) -> None:
    """Drop the records of steps after `step` (and the final test record) from a metrics file."""
    if path.exists():
        kept = [r for r in read(path) if r["step"] <= step and r["kind"] != "test"]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class Meter:
    """Training loss and training time between two train records; the loss sum and the count of
    finite steps stay device tensors until read, so adding a step never waits for the device."""

    def __init__(self, device: torch.device):
        self.loss_sum, self.finite_steps = torch.zeros((), device=device), torch.zeros((), device=device)
        self.steps = 0  # steps taken, skipped ones included (they cost the same time)
        self.start, self.paused = time.perf_counter(), 0.0

    def add(self, loss: torch.Tensor, bad: torch.Tensor) -> None:
        """A step's mean loss; bad (0-d, 1.0 or 0.0): the step was not finite and its loss is left out."""
        self.loss_sum += torch.where(bad > 0, torch.zeros_like(loss), loss)
        self.finite_steps += 1 - bad
        self.steps += 1

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Time spent inside (evaluation, checkpoints) does not count as training time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - start

    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.paused


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
"""Dense bf16 tensor-core peaks (vendor figures) by device-name fragment: the MFU estimate's
fallback when measuring the peak fails."""


def peak_flops(device: torch.device, precision: str) -> tuple[float | None, str | None]:
    """(peak FLOP/s for the MFU estimate, where it comes from): on CUDA in bf16 the best rate of
    bf16 8192^3 matmuls measured now (memlm.device, well under a second), else the vendor
    figure of PEAK_BF16_FLOPS; (None, None) on CPU or in fp32 (no MFU logged)."""
    if device.type != "cuda" or precision == "fp32":
        return None, None
    from memlm.device import measure_peak_flops
    try:
        peak = measure_peak_flops(device)["flops"]
        torch.cuda.empty_cache()  # give the matrices' memory back
        return peak, f"bf16 matmul peak measured on {torch.cuda.get_device_name(device)}"
    except RuntimeError:  # e.g. out of memory on a crowded device: the vendor figure instead
        name = torch.cuda.get_device_name(device)
        peak = next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)
        return peak, f"vendor bf16 peak of {name}" if peak else None

"""Run records: metrics.jsonl (one JSON object a line), TensorBoard events, samples.txt.

Every record has a `kind` ("train", "eval" or "test") and the `step` it belongs to. On
resume, metrics after the checkpoint's step (written by the run that crashed) are dropped,
so the metrics read as one uninterrupted run; samples.txt keeps every sample written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
            records.append(json.loads(line))
        except ValueError:  # a record torn by a crash or a full disk: dropped
            continue
    return records


def truncate(path: Path, step: int) -> None:
    """Drop the records of steps after `step` (and the final test record) from a metrics file."""
    if path.exists():
        kept = [r for r in read(path) if r["step"] <= step and r["kind"] != "test"]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))

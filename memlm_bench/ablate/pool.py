"""Running an ablation's runs: one after another in this process, or several at once, each in a
child process (`python -m memlm_bench.ablate.run SPEC.json`), --concurrent of them on each of
--devices (cuda:N children see only that GPU: memlm_bench.parallel.child_device). A rich progress
bar counts the runs; a child's output goes to its run's .log beside its JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from memlm_bench.ablate.config import RunSpec
from memlm_bench.ablate.run import run_one
from memlm_bench.parallel import child_device

POLL_S = 1.0


def label(spec: RunSpec) -> str:
    point = " ".join(f"{k}={v}" for k, v in spec.point.items())
    return f"claim {spec.claim} {spec.arm} seed {spec.seed}" + (f" {point}" if point else "")


def progress_bar(console: Console | None = None) -> Progress:
    return Progress(TextColumn("[bold]ablate"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                    TimeElapsedColumn(), console=console or Console(stderr=True))


def run_here(specs: list[RunSpec], device: str, keep_checkpoints: bool, log: Callable[[str], None]) -> list[dict]:
    """Every run in this process, in order; their records."""
    records = []
    with progress_bar() as bar:
        task = bar.add_task("", total=len(specs))
        for spec in specs:
            bar.update(task, description=label(spec))
            record = run_one(spec, device, keep_checkpoints)
            records.append(record)
            missing = "; ".join(f"{k}: {v}" for k, v in record["measure_errors"].items())
            log(f"{label(spec)}: " + (f"FAILED: {record['error']}" if record["error"] else
                                      f"test bpb {record['metrics'].get('test_bpb')}"
                                      + (f"; MEASURE FAILED: {missing}" if missing else "")))
            bar.advance(task)
    return records


def run_children(specs: list[RunSpec], devices: list[str], concurrent: int, keep_checkpoints: bool,
                 log: Callable[[str], None], threads: int | None = None) -> list[int]:
    """Every run in a child process, `concurrent` at a time on each device; their exit codes."""
    slots = [device for device in devices for _ in range(concurrent)]
    waiting, running, codes = list(specs), {}, []
    threads = threads or max(1, (os.cpu_count() or 1) // len(slots))
    try:
        with progress_bar() as bar:
            task = bar.add_task("", total=len(specs))
            while waiting or running:
                while waiting and slots:
                    spec, device = waiting.pop(0), slots.pop(0)
                    path = Path(spec.path)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    spec_file = path.with_suffix(".spec.json")
                    spec_file.write_text(json.dumps(spec.to_dict()))
                    as_device, env = child_device(device, dict(os.environ))
                    env["MEMLM_ABLATE_THREADS"] = str(threads)
                    command = [sys.executable, "-m", "memlm_bench.ablate.run", str(spec_file), "--device", as_device]
                    command += ["--keep-checkpoints"] if keep_checkpoints else []
                    with open(path.with_suffix(".log"), "w") as log_file:
                        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
                    running[process] = (spec, device)
                    bar.update(task, description=f"{len(running)} running: {label(spec)} on {device}")
                time.sleep(POLL_S)
                for process in [p for p in running if p.poll() is not None]:
                    spec, device = running.pop(process)
                    slots.append(device)
                    codes.append(process.returncode)
                    log(f"{label(spec)} on {device}: " + ("done" if process.returncode == 0 else
                        f"exit code {process.returncode}, see {Path(spec.path).with_suffix('.log')}"))
                    bar.advance(task)
    finally:
        for process in running:  # interrupted: stop the children too
            process.terminate()
    return codes

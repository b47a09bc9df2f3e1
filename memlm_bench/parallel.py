"""`memlm race --devices cuda:0 cuda:1 ...`: the contenders of one race side by side, each trained in a
process of its own on a device of its own, then merged into one table.

Each contender runs as `memlm race <the same options> --only NAME` in a child process: on `cuda:N`
with CUDA_VISIBLE_DEVICES set to that GPU alone (N counts the GPUs this process sees), on `cpu` or
`cuda` as given. At most one contender runs on a device at a time; a freed device takes the next
waiting contender. A child writes its output to `<out>/<contender>.log` and its result JSON under
`<out>/results/<contender>/`; a child that ends without one (killed, out of memory) becomes a failed
row pointing at its log. Side by side on one host is how the races in BENCHMARKS.md compare
contenders at equal wall-clock: the same hardware, the same time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from memlm_bench.report import slug

POLL_S = 2.0
"""Seconds between looks at the running children."""


def check_devices(devices: list[str]) -> None:
    """Raise ValueError unless every entry is cpu, cuda or cuda:N, with N a GPU this process may see."""
    bad = [d for d in devices if not (d in ("cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit()))]
    if bad or not devices:
        raise ValueError(f"--devices takes cpu, cuda or cuda:N entries, got {' '.join(devices) or 'none'}")
    for device in devices:
        child_device(device, dict(os.environ))


def child_device(device: str, environ: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The --device a child gets and its environment: cuda:N becomes `cuda` with CUDA_VISIBLE_DEVICES
    naming only the N-th GPU this process sees (so that each child's libraries see one GPU)."""
    env = dict(environ)
    if not device.startswith("cuda:"):
        return device, env
    index = int(device.split(":", 1)[1])
    visible = [v for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible:
        if index >= len(visible):
            seen = "1 GPU is" if len(visible) == 1 else f"{len(visible)} GPUs are"
            raise ValueError(f"{device}: only {seen} visible (CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']})")
        env["CUDA_VISIBLE_DEVICES"] = visible[index].strip()
    else:
        env["CUDA_VISIBLE_DEVICES"] = str(index)
    return "cuda", env


def child_argv(argv: list[str]) -> list[str]:
    """This race's command-line options without --devices and its values: a child trains one
    contender on the one device it is given, and sees only that GPU, so the parent's GPU numbers
    would not be its own."""
    kept, skipping = [], False
    for arg in argv:
        if arg == "--devices":
            skipping = True
        elif arg.startswith("--devices="):
            skipping = False
        elif skipping and arg.startswith("-"):
            skipping = False
            kept.append(arg)
        elif not skipping:
            kept.append(arg)
    return kept


def run_children(names: list[str], argv: list[str], devices: list[str], runs: Path, log) -> dict[str, Path | int]:
    """Race `names` in child processes over `devices`, at most one per device at a time. argv: this
    race's own command-line options (the children drop --devices and add --only, --device, --out and
    --results). Returns, per contender, its result JSON, or the exit code of a child that left none."""
    check_devices(devices)
    argv = child_argv(argv)
    runs.mkdir(parents=True, exist_ok=True)
    waiting, free, running, ended = list(names), list(devices), {}, {}
    try:
        while waiting or running:
            while waiting and free:
                name, device = waiting.pop(0), free.pop(0)
                parts, log_path = runs / "results" / slug(name), runs / f"{slug(name)}.log"
                as_device, env = child_device(device, os.environ)
                command = [sys.executable, "-m", "memlm", "race", *argv, "--only", name, "--device", as_device,
                           "--out", str(runs), "--results", str(parts)]
                with open(log_path, "w") as log_file:
                    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
                running[process] = (name, device, parts, log_path)
                log(f"{name} on {device}: output in {log_path}")
            time.sleep(POLL_S)
            for process in [p for p in running if p.poll() is not None]:
                name, device, parts, log_path = running.pop(process)
                free.append(device)
                files = sorted(parts.glob("race-*.json"))
                ended[name] = files[-1] if files else process.returncode
                log(f"{name} on {device}: " + (f"done, exit code {process.returncode}" if files else
                                               f"ended with exit code {process.returncode} and no result; see {log_path}"))
    finally:
        for process in running:  # interrupted: stop the children too
            process.terminate()
    return ended

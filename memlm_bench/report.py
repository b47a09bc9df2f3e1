"""Where results go and what every result records (shared by `memlm bench` and `memlm race`), and
the bench's own markdown and files.

Results default to `$MEMLM_RESULTS`, else `~/memlm-results`: measurements are not source, so
they stay out of the checkout unless a run is given `--out`/`--results` inside it (the dated
directories of the repository's `results/` hold the runs BENCHMARKS.md quotes).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

import memlm
from memlm.tables import markdown_table

RESULTS_ENV = "MEMLM_RESULTS"

COLUMNS = ["model", "shape", "compiled", "train tok/s", "MFU", "peak mem"]
"""The first columns; then one 'gen tok/s bN' per generation batch size, ratio, 'vs no memory' and
'FLOP limit vs no memory' (only when some row has a baseline) and notes."""


def results_dir(given: str | Path | None = None) -> Path:
    """`given`, else $MEMLM_RESULTS, else ~/memlm-results."""
    if given is not None:
        return Path(given)
    return Path(os.environ.get(RESULTS_ENV) or Path.home() / "memlm-results")


def utc_stamp(date: str | None = None) -> str:
    """'2026-11-28T02:43:17+00:00' (or now) -> '20261128T024317'."""
    date = date or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return re.sub(r"[^0-9T]", "", date.split("+")[0])


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def environment(device: torch.device) -> dict:
    """Device name, versions, date (UTC) and the git commit of the code that ran."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "memlm": memlm.__version__,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def git_commit() -> str | None:
    """Short hash of HEAD of memlm's checkout (with '+dirty' for local changes), or None."""
    root = Path(memlm.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _number(value: float | None, fmt: str = "{:,.0f}") -> str:
    return "—" if value is None else fmt.format(value)


def flop_rate(flops: float) -> str:
    """54.4e9 -> '54.4 GFLOP/s', 7.9e14 -> '790.0 TFLOP/s'."""
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


def _bytes(value: int | None) -> str:
    return "—" if value is None else f"{value / 2 ** 30:.2f} GiB"


def has_baselines(rows: list[dict]) -> bool:
    """Whether the table gets a 'vs no memory' column (some row has a baseline in the run)."""
    return any(row.get("baseline") for row in rows)


def baseline_cell(row: dict) -> str:
    """'0.87x seed-small': train rate over the baseline's; '—' without one (or without both rates)."""
    if row.get("baseline_ratio") is None:
        return "—"
    return f"{row['baseline_ratio']:.2f}x {row['baseline'].removeprefix('memlm ')}"


def flop_limit_cell(row: dict) -> str:
    """'0.81x': the baseline's FLOPs per token over the row's (the 'vs no memory' the row would reach
    at its baseline's MFU); '—' without a baseline."""
    return _number(row.get("baseline_flop_ratio"), "{:.2f}x")


def row_cells(row: dict, gen_batch_sizes: list[int], baselines: bool = False) -> list[str]:
    """One table row: the fixed columns, generation columns, ratios, and notes and errors last."""
    train = row["train"] or {}
    gen = [_number(row["gen_tokens_per_s"].get(f"b{b}")) for b in gen_batch_sizes]
    remarks = row["notes"] + [error.splitlines()[0][:120] for error in row["errors"]]
    return [row["model"], row["shape"], "yes" if row["compiled"] else "no",
            _number(train.get("tokens_per_s")), _number(row["mfu"], "{:.1%}"), _bytes(train.get("peak_mem_bytes")),
            *gen, _number(row["ratio"], "{:.2f}x"), *([baseline_cell(row), flop_limit_cell(row)] if baselines else []),
            "; ".join(remarks)]


def bench_markdown(result: dict) -> str:
    """A `memlm bench` result as a markdown section: environment lines, the table, the run's notes."""
    meta, config, peak = result["meta"], result["config"], result["peak"]
    batch_sizes = config["gen_batch_sizes"]
    baselines = has_baselines(result["rows"])
    header = COLUMNS + [f"gen tok/s b{b}" for b in batch_sizes] + ["ratio"] + \
        (["vs no memory", "FLOP limit vs no memory"] if baselines else []) + ["notes"]
    commit = f", commit {meta['commit']}" if meta["commit"] else ""
    lines = [
        f"## memlm bench, {meta['date']}",
        "",
        f"- device: {meta['device']}",
        f"- torch {meta['torch']}, memlm {meta['memlm']}{commit}",
        f"- peak: {flop_rate(peak['flops'])} ({peak['dtype']} {peak['n']}^3 matmul, measured in this run)",
        f"- training: {config['steps']} steps x {config['repeats']} repeats (median), AdamW, "
        f"torch.compile mode {config.get('compile_mode', 'default')} where compiled, "
        f"{'bf16 autocast' if meta['device_type'] == 'cuda' else 'float32'}, random tokens; "
        f"generation: greedy, prompt {config['gen_prompt_len']}, {config['gen_new_tokens']} new tokens, "
        f"{config['decode']} decode; ratio = train tok/s / reference GPT's at the same shape"
        + ("; vs no memory = train tok/s / the same family's preset of that size without memory, "
           "in this run; FLOP limit vs no memory = that preset's FLOPs per token / the row's (memory "
           "and the kNN search counted), the vs no memory the row reaches at that preset's MFU" if baselines else ""),
        "",
    ]
    lines += markdown_table(header, [row_cells(row, batch_sizes, baselines) for row in result["rows"]])
    lines += [""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def write_bench_results(result: dict, out: str | Path) -> tuple[Path, Path]:
    """Write <out>/bench-<date>-<device>.json and .md; returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{utc_stamp(result['meta']['date'])}-{slug(result['meta']['device'])}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(bench_markdown(result))
    return json_path, md_path

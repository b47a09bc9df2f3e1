"""Run the benchmark: plan the rows, measure each in isolation, add the ratios, report.

For each distinct shape among the presets, the rows are the reference GPT, the presets of
that shape and the installed peers, in that order. Every row is built just before it is
measured and freed after (compile caches too), so peak memory is its own. A row that fails
to build, compile or run keeps its error and the run goes on.

A preset entry may carry its own overrides after the name, separated by spaces
("seed-small memory.persistent.vectors=16"), on top of the run's --overrides. A memlm row with memory
is also compared with its family's preset of the same size without memory ("seed-small" for
"seed-xl-small" or "seed-small memory.persistent.vectors=16") when that row is in the same run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
import traceback
from typing import Callable

import torch
import tyro

from memlm_bench.config import BenchConfig, parse_overrides, resolve
from memlm_bench.workloads import REFERENCE, Entry, Shape, Workload, memlm_entry
from memlm_bench.measure import measure_generation, measure_training
from memlm_bench.peers import PEERS, Peer
from memlm_bench.report import bench_markdown, environment, write_bench_results
from memlm.device import measure_peak_flops, pick_device, release
from memlm.config import ModelConfig, get_preset
from memlm.config import resolve as resolve_model

Group = tuple[Shape, list[Entry]]


def plan(config: BenchConfig) -> list[Group]:
    """Rows grouped by shape: the reference first, then the presets, then the installed peers."""
    groups: dict[Shape, list[Entry]] = {}
    configs: dict[Shape, dict[str, ModelConfig]] = {}
    for entry in config.presets:
        name = " ".join(entry.split())
        model_config = preset_config(name, config)
        shape = Shape.of(model_config, config.batch_size)
        configs.setdefault(shape, {})[name] = model_config
    for shape, rows in configs.items():
        groups[shape] = [REFERENCE] + [memlm_entry(name, model_config, baseline_of(name, rows))
                                       for name, model_config in rows.items()]
    if config.peers:
        for entries in groups.values():
            entries.extend(peer.entry for peer in selected_peers(config) if peer.installed())
    return list(groups.items())


def preset_config(entry: str, config: BenchConfig) -> ModelConfig:
    """The model of a preset entry ("PRESET [key=value ...]") at the run's shape: the preset, then
    --seq-len/--layers/--width (memory proportions kept, `reshape_memory`), then the run's
    --overrides, then the entry's own."""
    preset, *items = entry.split()
    shape = {name: getattr(config, name) for name in ("seq_len", "layers", "width")
             if getattr(config, name) is not None}
    base = get_preset(preset)
    overrides = {**shape, **reshape_memory(base, config.layers, config.seq_len),
                 **parse_overrides(config.overrides), **parse_overrides(items)}
    return resolve_model(base, **overrides)


def reshape_memory(config: ModelConfig, layers: int | None, seq_len: int | None) -> dict:
    """Overrides that keep a preset's memory in proportion when the bench reshapes it: memory
    lengths scale with the segment length (seed-xl keeps memory = seq_len), per-layer settings
    (memory.xl.lengths, kNN layers) are resampled over the new depth, the top layer kept on top.
    kNN capacity, memory tokens and persistent vectors keep their counts."""
    m, out = config.memory, {}
    if seq_len is not None and seq_len != config.seq_len:
        def scale(n: int) -> int:
            return max(1, round(n * seq_len / config.seq_len)) if n else 0
        for section, name in (("xl", "length"), ("xl", "min_length"), ("compressive", "length"),
                              ("adaptive_span", "max")):
            if getattr(getattr(m, section), name):
                out[f"memory.{section}.{name}"] = scale(getattr(getattr(m, section), name))
        if m.xl.lengths:
            out["memory.xl.lengths"] = [scale(n) for n in m.xl.lengths]
    if layers is not None and layers != config.layers:
        old = config.layers

        def source(j: int) -> int:  # the old layer at the new layer j's relative depth
            return round(j * (old - 1) / (layers - 1)) if layers > 1 else old - 1
        lengths = out.get("memory.xl.lengths", m.xl.lengths)
        if lengths:
            out["memory.xl.lengths"] = [lengths[source(j)] for j in range(layers)]
        if m.knn.layers:
            out["memory.knn.layers"] = sorted({round(i * (layers - 1) / (old - 1)) if old > 1 else layers - 1
                                               for i in m.knn.layers})
    return out


def baseline_of(name: str, rows: dict[str, ModelConfig]) -> str | None:
    """The row to compare a memory row with: its family's preset of the same size ("seed-small"
    for "seed-xl-small ..."), when it is among `rows` (one shape) and has different memory."""
    preset = name.split()[0]
    base = f"{preset.split('-')[0]}-{preset.split('-')[-1]}"
    if base == name or base not in rows or rows[base].memory == rows[name].memory:
        return None
    return f"memlm {base}"


def selected_peers(config: BenchConfig) -> list[Peer]:
    """The peers named in config.peer_names (all when None); an unknown name is an error."""
    if config.peer_names is None:
        return PEERS
    known = [peer.entry.name for peer in PEERS]
    unknown = [name for name in config.peer_names if name not in known]
    if unknown:
        raise ValueError(f"bench: unknown peer {', '.join(unknown)}; known: {', '.join(known)}")
    return [peer for peer in PEERS if peer.entry.name in config.peer_names]


def peer_notes(config: BenchConfig) -> list[str]:
    """A note for each peer package that is not importable (or for peers switched off)."""
    if not config.peers:
        return ["peers off (--no-peers)"]
    missing = dict.fromkeys(peer.module for peer in selected_peers(config) if not peer.installed())
    return [f"{module} not installed: its peers skipped (pip install {module.replace('_', '-')})"
            for module in missing]


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def attempt(row: dict, stage: str, fn: Callable):
    """fn(), or None with the failure recorded in the row (and its traceback on stderr)."""
    try:
        return fn()
    except Exception as error:  # a failing model is a row of the table, not the end of the run
        row["errors"].append(f"{stage} failed: {type(error).__name__}: {error}")
        log(f"{row['model']}: {stage} failed")
        traceback.print_exc(file=sys.stderr)
        return None


def empty_row(entry: Entry, shape: Shape, compiled: bool) -> dict:
    return {"model": entry.name, "kind": entry.kind, "shape": shape.label, "dims": dataclasses.asdict(shape),
            "compiled": compiled, "params": None, "flops_per_token": None, "search_flops_per_token": 0.0,
            "limit_tokens_per_s": None,
            "train": None, "mfu": None, "gen_tokens_per_s": {}, "ratio": None, "baseline": entry.baseline,
            "baseline_ratio": None, "baseline_flop_ratio": None,
            "warmup": None, "graphs_compiled": None, "notes": [], "errors": [], "wall_s": None}


def measure_row(entry: Entry, shape: Shape, config: BenchConfig, device: torch.device,
                peak_flops: float) -> dict:
    """Build one entry's workload, measure it, free it; the row records what failed on the way."""
    started = time.perf_counter()
    row = empty_row(entry, shape, compiled=config.compile and device.type == "cuda")
    torch.manual_seed(config.seed)
    workload = attempt(row, "build", lambda: entry.build(shape, device, config.decode))
    if workload is not None:
        try:
            measure_workload(row, workload, shape, config, device, peak_flops)
        finally:
            workload.close()
    del workload
    release(device)
    row["wall_s"] = time.perf_counter() - started  # build, compile and every measurement
    return row


def measure_workload(row: dict, workload: Workload, shape: Shape, config: BenchConfig,
                      device: torch.device, peak_flops: float) -> None:
    """Fill the row: its FLOP limit, training rate, MFU and peak memory, then generation at each batch size."""
    row.update(params=workload.params, flops_per_token=workload.flops_per_token, notes=workload.notes,
               search_flops_per_token=workload.search_flops_per_token)
    bound = bounding_flops(row)  # tokens/s if every FLOP ran at the measured matmul peak
    row["limit_tokens_per_s"] = peak_flops / bound if bound else None
    # compiled rows warm up until their memory is full: its shapes change (and recompile) until then
    row["warmup"] = max(config.warmup, workload.warmup) if row["compiled"] else config.warmup
    graphs = compiled_graphs()
    row["train"] = attempt(row, "train", lambda: measure_training(
        workload, shape, steps=config.steps, warmup=row["warmup"], repeats=config.repeats,
        compile=row["compiled"], device=device, seed=config.seed, profile_steps=config.profile_steps,
        compile_mode=config.compile_mode))
    if row["compiled"]:
        row["graphs_compiled"] = compiled_graphs() - graphs
    if row["train"] is not None:
        row["mfu"] = row["train"]["tokens_per_s"] * workload.flops_per_token / peak_flops
    if not config.generate or workload.decoder is None:
        return
    if config.gen_prompt_len + config.gen_new_tokens > shape.seq_len and not workload.decoder.unbounded:
        row["notes"] = row["notes"] + [f"no generation: prompt + new tokens exceed seq_len {shape.seq_len} "
                                       f"and only models with recurrent memory decode past it"]
        return
    workload.objective.eval()
    for batch_size in config.gen_batch_sizes:
        rate = attempt(row, f"generate b{batch_size}", functools.partial(
            measure_generation, workload.decoder, shape.vocab_size, batch_size=batch_size,
            prompt_len=config.gen_prompt_len, new_tokens=config.gen_new_tokens, repeats=config.repeats,
            device=device, seed=config.seed))
        if rate is not None:
            row["gen_tokens_per_s"][f"b{batch_size}"] = rate


def bounding_flops(row: dict) -> float | None:
    """What bounds a row's rate in FLOPs a token: its model's, plus its kNN search's (retrieval
    work the model's count leaves out, memlm.flops.search_flops_per_token); None without a count."""
    return row["flops_per_token"] + row["search_flops_per_token"] if row["flops_per_token"] else None


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (recompiles included)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]



def add_ratios(rows: list[dict]) -> None:
    """ratio = train tokens/s over the reference GPT's at the same shape; baseline_ratio = over the
    row's baseline's (its family without memory); baseline_flop_ratio = the baseline's FLOPs per
    token over the row's, kNN search included (`bounding_flops`: the baseline_ratio the row reaches at
    the baseline's MFU); None where either is missing."""
    reference = next(row["train"] for row in rows if row["kind"] == "reference")
    trained = {row["model"]: row["train"] for row in rows}
    flops = {row["model"]: bounding_flops(row) for row in rows}
    for row in rows:
        if row["train"] is not None and reference is not None:
            row["ratio"] = row["train"]["tokens_per_s"] / reference["tokens_per_s"]
        baseline = trained.get(row["baseline"])
        if row["train"] is not None and baseline is not None:
            row["baseline_ratio"] = row["train"]["tokens_per_s"] / baseline["tokens_per_s"]
        if flops[row["model"]] and flops.get(row["baseline"]):
            row["baseline_flop_ratio"] = flops[row["baseline"]] / flops[row["model"]]


def summary(row: dict) -> str:
    """One progress line: the row's numbers, or that it failed."""
    parts = [f"train {row['train']['tokens_per_s']:,.0f} tok/s, MFU {row['mfu']:.1%}"] if row["train"] else []
    parts += [f"gen {key} {rate:,.0f} tok/s" for key, rate in row["gen_tokens_per_s"].items()]
    parts += [f"{len(row['errors'])} failed"] if row["errors"] else []
    line = f"{row['model']}: {', '.join(parts) or 'nothing measured'} ({row['wall_s']:.0f} s)"
    profile = (row["train"] or {}).get("profile")
    if profile:  # the heaviest kernels of a step, under the row's line
        line += f"\n  profile, {profile['ms_per_step']:.2f} ms a step of {profile['timed']}:" + "".join(
            f"\n    {k['share']:6.1%} {k['ms_per_step']:8.3f} ms x{k['calls_per_step']:<5g} {k['name'][:100]}"
            for k in profile["top"][:12])
    return line


def measure_all(config: BenchConfig, groups: list[Group], device: torch.device) -> dict:
    """Measure every planned row on the device; the result object that is written as JSON."""
    log(f"measuring the matmul peak on {device}")
    peak = measure_peak_flops(device)
    rows = []
    for shape, entries in groups:
        group_rows = []
        for entry in entries:
            log(f"{entry.name} at {shape.label}")
            group_rows.append(measure_row(entry, shape, config, device, peak["flops"]))
            log(summary(group_rows[-1]))
        add_ratios(group_rows)
        rows += group_rows
    return {"meta": environment(device), "config": {**dataclasses.asdict(config), "out": str(config.out)},
            "peak": peak, "rows": rows, "notes": peer_notes(config)}


def run_bench(config: BenchConfig) -> dict:
    """Resolve the device defaults, plan and measure; the result as a JSON-ready dict."""
    device = pick_device(config.device)
    config = resolve(config, device)
    return measure_all(config, plan(config), device)


def main(argv: list[str] | None = None) -> int:
    """`memlm bench`: print the table, write JSON + markdown under --out (default: $MEMLM_RESULTS,
    else ~/memlm-results), with --json print the
    result as the last line. Exit 2 for a bad option, 1 if a memlm or reference row failed."""
    config = tyro.cli(BenchConfig, args=argv, prog="memlm bench")
    device = pick_device(config.device)
    try:
        config = resolve(config, device)
        groups = plan(config)
    except ValueError as error:  # memlm's ConfigError is a ValueError
        print(f"memlm bench: {error}", file=sys.stderr)
        return 2
    result = measure_all(config, groups, device)
    json_path, md_path = write_bench_results(result, config.out)
    print(bench_markdown(result))
    print(f"wrote {json_path} and {md_path}")
    if config.json:
        print(json.dumps(result))
    failed = [row["model"] for row in result["rows"] if row["errors"] and row["kind"] != "peer"]
    return 1 if failed else 0

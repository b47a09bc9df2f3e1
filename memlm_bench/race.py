"""`memlm race`: contenders trained for the same budget by memlm's own training loop, then scored on
test bits per byte, side by side in one table (the quality counterpart of `memlm bench`'s speeds).

    memlm race --contenders seed-small seed-xl-small x-transformers x-transformers-XL --minutes 2.33
    memlm race ... --devices cuda:0 cuda:1 cuda:2 cuda:3   # side by side: a process and a GPU each
    memlm race ... --only x-transformers-XL          # one contender (one GPU each, in parallel), its own JSON
    memlm race merge benchmarks/race-*-<stamp>*.json # one table from several such files

Every contender gets the same TrainConfig (corpus, batch, sequence length, optimizer, schedule,
seed, budget) and the same Trainer: random windows for models without memory, contiguous streams
with the memory carried (and detached) for models with memory, validation and test bpb by
`memlm.eval.evaluate`, which keeps the memory across segments and resets it where documents start.
A contender is a memlm preset name or a peer: `x-transformers` (rotary, no memory) or
`x-transformers-XL` (rotary, Transformer-XL memory of seq_len), wrapped by memlm_bench.adapters
and built at the `--peer-shape` preset's shape (or --layers/--width/--heads/--seq-len).

The clock: a contender's budget is the Trainer's wall clock, which starts at `fit()` and includes
the validation evaluations made during training (10 over a minutes budget unless --eval-every
sets a step interval; 8 batches each). Before it starts, `--compile-warmup` forward/backward
passes (no weight update; data order, memory and RNG restored afterwards) and one validation
evaluation let torch.compile compile every graph variant the run will need, so compilation is
not charged to the budget; its seconds are reported as warm-up. The final validation and test
evaluations and the checkpoints come after the budget: latest (the last step) and, with
`--test-weights best` (the default), best, the weights of the best validation, which the test
scores (`memlm eval/memorize <out>/<contender>/checkpoints/best`). Text samples are off by
default (`--sample-bytes 0`): token-by-token sampling would cost each contender a different
share of its budget.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import tyro

from memlm_bench.adapters import PeerConfig, XTransformersLM
from memlm_bench.contenders import Shape
from memlm_bench.report import environment, slug
from memlm.config import ConfigError, ModelConfig, describe, get_preset, presets, resolve
from memlm.device import pick_device, release
from memlm.train import distributed
from memlm.train.config import TrainConfig
from memlm.train.metrics import read
from memlm.train.trainer import Trainer

PEERS = {
    "x-transformers": "x-transformers, rotary, no memory",
    "x-transformers-XL": "x-transformers, rotary, XL memory = seq_len (streams, memory kept in evaluation)",
}
"""Peer contenders (benchmark-only; need `pip install x-transformers`) and what they are."""
DEFAULT_CONTENDERS = {"cuda": ["seed-small", "seed-xl-small", "x-transformers", "x-transformers-XL"],
                      "cpu": ["seed-tiny", "seed-xl-tiny"]}
RESULT_KIND = "memlm race"


@dataclass
class RaceConfig(TrainConfig):
    """Train each contender with the same training config and budget, then compare test bpb."""

    contenders: list[str] | None = None
    """Contenders: memlm preset names and the peers x-transformers, x-transformers-XL; None = seed-small
    seed-xl-small x-transformers x-transformers-XL on CUDA, seed-tiny seed-xl-tiny on CPU. A preset may
    carry overrides of its own after colons, PRESET:key=value[:key=value...] (variants of one preset
    side by side, e.g. xl4-xpos-knn-small:attention.dropout=0), applied after --overrides."""
    only: str | None = None
    """Run only this contender (e.g. one per GPU, in parallel); its JSON merges with the others' (`memlm race merge`)."""
    contender_index: int | None = None
    """Run only the contender at this index (from 0) of --contenders."""
    devices: list[str] | None = None
    """Race the contenders side by side, each in a process of its own on one of these devices (cuda:N,
    cuda or cpu; one contender per device at a time), then merge them into one table; each one's output
    goes to <out>/<contender>.log. None = one after another in this process."""
    layers: int | None = None
    """Depth of every contender; None = each preset's own (peers: --peer-shape's)."""
    width: int | None = None
    """Width of every contender; None = each preset's own (peers: --peer-shape's)."""
    heads: int | None = None
    """Attention heads of every contender; None = each preset's own (peers: --peer-shape's)."""
    seq_len: int | None = None
    """Segment length of every contender; None = each preset's own (peers: --peer-shape's). A preset's
    memory length stays its own: set it with --overrides memory.xl.length=N."""
    peer_shape: str = "seed-small"
    """memlm preset whose shape (layers, width, heads, seq_len, vocabulary) the peers take."""
    overrides: list[str] = field(default_factory=list)
    """Dotted model overrides for the memlm contenders, as key=value (e.g. attention.backend=flex)."""
    peer_dropout: float = 0.0
    """Dropout of the peers (x-transformers' emb_dropout, ff_dropout and attn_dropout); 0 = their default.
    Give the memlm contenders' dropout (--overrides dropout=P) to regularise both alike."""
    peer_train_reset: float = 0.0
    """The peers' memory.train_reset: in training each row also forgets its XL memory at a segment start
    with this probability. Give the memlm contenders' (--overrides memory.train_reset=P) to train both alike."""
    test_weights: str = "best"
    """Weights each contender is tested with: best (those of its lowest validation bpb during the budget,
    i.e. early stopping; the default, since fast models overfit a small corpus well within a budget)
    or last."""
    compile_warmup: int = 4
    """Forward/backward passes (no update) before the clock starts, so compilation is not charged to the
    budget (compiled runs only); 0 = compile inside the budget."""
    out: str | None = None
    """Directory holding one run directory per contender (<out>/<contender>); None = runs/race-<UTC time>."""
    resume: tyro.conf.Suppress[bool] = False
    sample_bytes: int = 0
    """Bytes sampled at each evaluation; 0 (default) keeps sampling out of the budget."""
    checkpoint_every: int | None = 1_000_000_000
    """Steps between checkpoints; the default writes them only after the budget (latest, and best:
    the tested weights)."""
    results: str = "benchmarks"
    """Directory of the JSON and markdown results (race-<UTC time>-<device>[-<contender>].json/.md)."""
    json: bool = False
    """Print the result object as one JSON line last."""


@dataclass
class MergeConfig:
    """Merge the JSON results of several `memlm race` runs (e.g. one contender per GPU) into one table."""

    files: tyro.conf.Positional[list[str]]
    """JSON files written by memlm race (race-*.json)."""
    results: str = "benchmarks"
    """Directory of the merged JSON and markdown."""
    json: bool = False
    """Print the merged result object as one JSON line last."""


@dataclass
class Contender:
    name: str
    kind: str
    """memlm or peer."""
    model_config: Any
    """A memlm ModelConfig, or a PeerConfig (memlm_bench.adapters)."""
    factory: Callable | None
    """Trainer model_factory; None = LanguageModel."""
    description: str


def log(message: str) -> None:
    print(f"race: {message}", file=sys.stderr, flush=True)


# ----- planning ---------------------------------------------------------------------------

def contender_names(config: RaceConfig, device: torch.device) -> list[str]:
    return list(config.contenders or DEFAULT_CONTENDERS["cuda" if device.type == "cuda" else "cpu"])


def selected_names(config: RaceConfig, device: torch.device) -> list[str]:
    """The contenders this invocation runs: --only, --contender-index, or all of --contenders."""
    names = contender_names(config, device)
    if config.only is not None and config.contender_index is not None:
        raise ValueError("give --only or --contender-index, not both")
    if config.only is not None:
        return [config.only]
    if config.contender_index is not None:
        if not 0 <= config.contender_index < len(names):
            raise ValueError(f"--contender-index {config.contender_index} is outside 0..{len(names) - 1} "
                             f"(--contenders {' '.join(names)})")
        return [names[config.contender_index]]
    return names


VARIANT_SEPARATOR = ":"
"""Between a contender's preset and its own overrides: PRESET:key=value:key=value."""


def split_contender(name: str) -> tuple[str, list[str]]:
    """'xl4-xpos-knn-small:attention.dropout=0' -> ('xl4-xpos-knn-small', ['attention.dropout=0'])."""
    base, *own = name.split(VARIANT_SEPARATOR)
    return base, own


def plan(config: RaceConfig, names: list[str]) -> list[Contender]:
    """The contenders, checked and built as configs (no model is made yet)."""
    known = presets() + list(PEERS)
    split = {name: split_contender(name) for name in names}  # name -> (preset or peer, its own overrides)
    unknown = [name for name in names if split[name][0] not in known]
    if unknown:
        raise ValueError(f"unknown contender {', '.join(unknown)}; known: memlm presets ({', '.join(presets())}) "
                         f"and peers {', '.join(PEERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a contender is named twice: {' '.join(names)}")
    for item in config.overrides + [item for _, own in split.values() for item in own]:
        if "=" not in item:
            raise ValueError(f"override {item!r} must read key=value")
    with_own = [name for name, (base, own) in split.items() if own and base in PEERS]
    if with_own:
        raise ValueError(f"{', '.join(with_own)}: a peer takes no overrides of its own (give --peer-dropout, "
                         f"--peer-train-reset, --peer-shape)")
    shape = {k: v for k, v in dict(layers=config.layers, width=config.width, seq_len=config.seq_len,
                                    **{"attention.heads": config.heads}).items() if v is not None}
    overrides = dict(item.split("=", 1) for item in config.overrides)
    contenders = []
    for name in names:
        if name in PEERS:
            base = resolve(config.peer_shape, **shape)
            peer = PeerConfig.of(Shape.of(base, 0), memory=base.seq_len if name.endswith("-XL") else 0,
                                 dropout=config.peer_dropout, train_reset=config.peer_train_reset).validate()
            text = PEERS[name] + (f"; dropout={config.peer_dropout:g}" if config.peer_dropout else "")
            if config.peer_train_reset and peer.stateful:
                text += f"; train_reset={config.peer_train_reset:g}"
            contenders.append(Contender(name, "peer", peer, XTransformersLM, text))
        else:
            preset, own = split[name]
            own_overrides = dict(item.split("=", 1) for item in own)
            model_config = resolve(preset, **{**shape, **overrides, **own_overrides}).validate()
            given = config.overrides + own
            text = describe(preset) + ("; " + ", ".join(given) if given else "")
            contenders.append(Contender(name, "memlm", model_config, None, text))
    return contenders


def train_config(config: RaceConfig, run_dir: Path) -> TrainConfig:
    """The TrainConfig every contender shares, with this contender's run directory."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{**values, "out": str(run_dir), "resume": False})


# ----- running ----------------------------------------------------------------------------

def make_trainer(contender: Contender, config: TrainConfig, info: distributed.Dist) -> Trainer:
    """The contender's Trainer: memlm presets are built by it, peers by their adapter, seeded alike."""
    model = None
    if contender.factory is not None:
        torch.manual_seed(config.seed)  # the same initial weights as the trainer gives its own models
        model = contender.factory(contender.model_config)
    return Trainer(contender.model_config, config, info, preset=contender.name, model=model)


def run_contender(contender: Contender, config: RaceConfig, runs: Path, device: torch.device) -> dict:
    """Train and score one contender; a failure is recorded in the row, never raised."""
    started = time.perf_counter()
    row: dict[str, Any] = {"contender": contender.name, "kind": contender.kind, "description": contender.description,
                           "model": contender.model_config.to_dict(), "run_dir": str(runs / slug(contender.name)),
                           "meta": environment(device), "error": None}
    trainer = None
    try:
        trainer = make_trainer(contender, train_config(config, Path(row["run_dir"])), distributed.setup(config.device))
        row.update(params=trainer.model.num_parameters(), stateful=bool(trainer.stateful),
                   seq_len=trainer.seq_len, flops_per_token=trainer.model.flops_per_token(),
                   peak_flops=trainer.peak_flops, peak_source=trainer.peak_source,
                   train_config=trainer.config.to_dict())
        log(f"{contender.name}: {row['params']:,} parameters; compile warm-up")
        row["warmup_s"] = trainer.warm_up(config.compile_warmup)
        log(f"{contender.name}: training ({row['warmup_s']:.0f} s warm-up)")
        summary = trainer.fit()
        row.update(scores(summary, read(trainer.out), trainer))
        log(f"{contender.name}: test bpb {row['test_bpb']:.4f} after {row['steps']:,} steps")
    except Exception as error:  # a failing contender is a row of the table, not the end of the race
        row["error"] = f"{type(error).__name__}: {error}"
        log(f"{contender.name} failed: {row['error']}")
        traceback.print_exc(file=sys.stderr)
    finally:
        if trainer is not None:
            trainer.close()
        del trainer
        release(device)
    row["wall_s"] = time.perf_counter() - started
    return row


def scores(summary: dict, records: list[dict], trainer: Trainer) -> dict:
    """A row's numbers from the Trainer's summary and metrics.jsonl."""
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    steady = [r["tokens_per_s"] for r in train[1:] or train]  # the first record holds the first steps
    tokens_per_s = statistics.median(steady) if steady else None
    mfu = (trainer.model.estimate_mfu(tokens_per_s, trainer.peak_flops)
           if tokens_per_s and trainer.peak_flops else None)
    return {"steps": summary["steps"], "tokens": summary["tokens"], "budget_s": summary["elapsed_s"],
            "tokens_per_s": tokens_per_s, "mean_tokens_per_s": summary["tokens"] / max(summary["elapsed_s"], 1e-9),
            "mfu": mfu, "train_loss": train[-1]["loss"] if train else None,
            "train_bpb": train[-1]["bpb"] if train else None, "val_bpb": evals[-1]["bpb"] if evals else None,
            "best_val_bpb": summary["best_val_bpb"], "test_bpb": summary["test_bpb"],
            "test_weights": summary["test_weights"], "test_step": summary["test_step"],
            "first_log": {"step": train[0]["step"], "elapsed_s": train[0]["elapsed"]} if train else None,
            "test_tokens": summary["test_tokens"], "test_by_position": summary["test_by_position"]}


def run_race(config: RaceConfig) -> dict:
    """Train and score the selected contenders one after another; the JSON-ready result."""
    device = pick_device(config.device)
    names = contender_names(config, device)
    contenders = plan(config, selected_names(config, device))
    runs = Path(config.out) if config.out else Path("runs") / f"race-{utc_stamp()}"
    rows = []
    for contender in contenders:
        log(f"{contender.name} ({contender.description}) -> {runs / slug(contender.name)}")
        rows.append(run_contender(contender, config, runs, device))
    return {**race_result(config, names, device), "rows": rows,
            "single": config.only is not None or config.contender_index is not None}


def race_result(config: RaceConfig, names: list[str], device: torch.device) -> dict:
    """A result without rows: this machine's environment and the race's settings."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "json"}
    return {"kind": RESULT_KIND, "meta": environment(device), "config": {**settings, "contenders": names},
            "single": False, "rows": [], "notes": []}


def run_side_by_side(config: RaceConfig, argv: list[str], device: torch.device) -> dict:
    """--devices: every contender in a child process on a device of its own (memlm_bench.parallel),
    their results merged; a child that left no result is a failed row pointing at its log."""
    from memlm_bench.parallel import run_children

    names = contender_names(config, device)
    runs = Path(config.out) if config.out else Path("runs") / f"race-{utc_stamp()}"
    ended = run_children(names, argv, config.devices, runs, log)
    loaded = [load(path) for path in ended.values() if isinstance(path, Path)]
    own = race_result(config, names, device)  # the settings of this race, not of its children (--only ...)
    result = {**merge(loaded), "config": own["config"]} if loaded else own
    contenders = {contender.name: contender for contender in plan(config, names)}
    for name, code in ended.items():
        if not isinstance(code, Path):
            result["rows"].append({"contender": name, "kind": contenders[name].kind,
                                   "description": contenders[name].description, "run_dir": str(runs / slug(name)),
                                   "meta": environment(device), "error": f"its process ended with exit code {code} "
                                   f"and left no result: see {runs / slug(name)}.log"})
    result["rows"].sort(key=lambda row: names.index(row["contender"]))
    return result


def utc_stamp(date: str | None = None) -> str:
    """'2026-11-28T02:43:17+00:00' (or now) -> '20261128T024317'."""
    date = date or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return re.sub(r"[^0-9T]", "", date.split("+")[0])


# ----- merging and reporting --------------------------------------------------------------

COMPARED = ("data", "fractions", "steps", "tokens", "minutes", "batch_size", "grad_accum", "lr", "min_lr_frac",
            "warmup_steps", "schedule", "decay_frac", "weight_decay", "beta1", "beta2", "grad_clip", "seed",
            "precision", "compile", "eval_every", "eval_batches", "layers", "width", "heads", "seq_len",
            "peer_shape", "overrides", "compile_warmup", "sample_bytes", "test_weights", "peer_dropout",
            "peer_train_reset")
"""Settings that must agree between merged runs (a difference is noted under the table)."""


def merge(results: list[dict]) -> dict:
    """One result from several (e.g. one contender each): rows in --contenders order, each keeping its
    own environment; settings that differ between the inputs are noted."""
    if not results:
        raise ValueError("nothing to merge")
    for result in results:
        if result.get("kind") != RESULT_KIND:
            raise ValueError("not a memlm race result (its 'kind' is not 'memlm race')")
    first = results[0]
    order = list(first["config"]["contenders"])
    rows = [row for result in results for row in result["rows"]]
    rows.sort(key=lambda row: order.index(row["contender"]) if row["contender"] in order else len(order))
    notes = [note for result in results for note in result.get("notes", [])]
    for name in COMPARED:
        values = {json.dumps(result["config"].get(name)) for result in results}
        if len(values) > 1:
            notes.append(f"the merged runs differ in {name}: {', '.join(sorted(values))}")
    seen = [row["contender"] for row in rows]
    notes += [f"{name} appears {seen.count(name)} times" for name in dict.fromkeys(seen) if seen.count(name) > 1]
    meta = dict(first["meta"])
    for key in ("device", "torch", "commit", "python"):
        values = list(dict.fromkeys(str(row["meta"].get(key)) for row in rows)) or [str(meta.get(key))]
        meta[key] = values[0] if len(values) == 1 else " / ".join(values)
    meta["date"] = min(row["meta"]["date"] for row in rows) if rows else meta["date"]
    return {"kind": RESULT_KIND, "meta": meta, "config": first["config"], "single": False, "rows": rows,
            "notes": list(dict.fromkeys(notes)), "merged_from": [result.get("file") for result in results]}


def _fmt(value: float | None, spec: str = "{:,.0f}") -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else spec.format(value)


COLUMNS = ["contender", "params", "steps", "tokens", "tokens/s", "MFU", "train loss", "val bpb", "best val bpb",
           "test bpb", "tested step",
           "budget s", "warm-up s", "wall s", "device", "notes"]


def row_cells(row: dict) -> list[str]:
    remark = row["description"] + (f"; FAILED: {row['error'].splitlines()[0][:160]}" if row["error"] else "")
    return [row["contender"], _fmt(row.get("params")), _fmt(row.get("steps")), _fmt(row.get("tokens")),
            _fmt(row.get("tokens_per_s")), _fmt(row.get("mfu"), "{:.1%}"), _fmt(row.get("train_loss"), "{:.4f}"),
            _fmt(row.get("val_bpb"), "{:.4f}"), _fmt(row.get("best_val_bpb"), "{:.4f}"),
            _fmt(row.get("test_bpb"), "{:.4f}"), _fmt(row.get("test_step")), _fmt(row.get("budget_s"), "{:.1f}"),
            _fmt(row.get("warmup_s"), "{:.1f}"), _fmt(row.get("wall_s"), "{:.1f}"), row["meta"]["device"],
            remark.replace("|", "/")]


def verdict(rows: list[dict]) -> str | None:
    """The best memlm contender against the best peer, by test bpb."""
    scored = [row for row in rows if row.get("test_bpb") is not None and not row["error"]]
    ours = min((r for r in scored if r["kind"] == "memlm"), key=lambda r: r["test_bpb"], default=None)
    peer = min((r for r in scored if r["kind"] == "peer"), key=lambda r: r["test_bpb"], default=None)
    if ours is None or peer is None:
        return None
    gain = 1 - ours["test_bpb"] / peer["test_bpb"]
    return (f"best memlm contender {ours['contender']} ({ours['test_bpb']:.4f}) vs best peer {peer['contender']} "
            f"({peer['test_bpb']:.4f}): {abs(gain):.1%} {'lower' if gain >= 0 else 'higher'} test bpb")


SLOW_START_S = 10.0
"""A contender whose first logged training step comes later than this on its clock is noted."""


def markdown(result: dict) -> str:
    """The result as a markdown section: settings, the table, the verdict and notes."""
    meta, c = result["meta"], result["config"]
    budget = (f"{c['minutes']:g} minutes" if c.get("minutes") else f"{c['steps']} steps" if c.get("steps")
              else f"{c['tokens']:,} tokens" if c.get("tokens") else "the device default")
    trained = next((row["train_config"] for row in result["rows"] if row.get("train_config")), c)
    seq_len = " / ".join(dict.fromkeys(str(row["seq_len"]) for row in result["rows"] if row.get("seq_len"))) or "seq_len"
    commit = f", commit {meta['commit']}" if meta.get("commit") else ""
    lines = [
        f"## memlm race, {meta['date']}", "",
        f"- device: {meta['device']}; torch {meta['torch']}, memlm {meta['memlm']}{commit}",
        f"- data: {c['data']} (fractions {', '.join(f'{x:g}' for x in c['fractions'])}); budget {budget} per "
        f"contender on its training clock (validation during training included; compile warm-up before it, "
        f"final validation and test after it)",
        f"- batch {trained.get('batch_size')} x {seq_len} tokens, lr {trained.get('lr')} {trained.get('schedule')} "
        f"(warmup {trained.get('warmup_steps')} steps, min {trained.get('min_lr_frac')}), weight decay "
        f"{trained.get('weight_decay')}, seed {trained.get('seed')}, precision {trained.get('precision')}, "
        f"compiled {trained.get('compile')}",
        "- tokens/s: median of the logged training rates (evaluations excluded); test bpb: the whole test split, "
        "models with memory scored as streams with the memory kept, with the weights of "
        + ("the lowest validation bpb (early stopping; their step is 'tested step')"
           if c.get("test_weights", "last") == "best" else "the last step"),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(row_cells(row)) + " |" for row in result["rows"]]
    summary = verdict(result["rows"])
    slow = [f"{row['contender']} spent {row['first_log']['elapsed_s']:.0f} s of its clock before step "
            f"{row['first_log']['step']} (the first logged): compilation the warm-up did not cover?"
            for row in result["rows"] if (row.get("first_log") or {}).get("elapsed_s", 0) > SLOW_START_S]
    lines += [""] + ([f"- {summary}"] if summary else []) + [f"- {note}" for note in result["notes"] + slow]
    return "\n".join(lines).rstrip() + "\n"


def write_results(result: dict, out: str | Path) -> tuple[Path, Path]:
    """<out>/race-<UTC time>-<device>[-<contender>].json and .md (the contender for a one-contender run)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    devices = {row["meta"]["device"] for row in result["rows"]} or {result["meta"]["device"]}
    device = slug(devices.pop()) if len(devices) == 1 else "mixed"
    name = f"race-{utc_stamp(result['meta']['date'])}-{device}"
    if result.get("single"):
        name += f"-{slug(result['rows'][0]['contender'])}"
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path


def load(path: str | Path) -> dict:
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read race result {path}: {error}") from None
    if not isinstance(result, dict):
        raise ValueError(f"{path} is not a memlm race result")
    return {**result, "file": str(path)}


# ----- the command ------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """`memlm race [options]` or `memlm race merge FILES...`: print the table, write JSON + markdown.
    Exit 2 for a bad option, 1 if a contender failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    config = tyro.cli(RaceConfig, args=argv, prog="memlm race",
                      description="Contenders (memlm presets, x-transformers peers) trained by memlm's loop for the "
                                  "same budget, then scored on test bpb. `memlm race merge FILES...` merges results.")
    side_by_side = config.devices is not None and config.only is None and config.contender_index is None
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("memlm race trains one contender per process: instead of torchrun, give "
                             "--devices cuda:0 cuda:1 ... (a process and a GPU per contender)")
        device = pick_device(config.device)
        plan(config, contender_names(config, device))  # every name checked before anything trains
        plan(config, selected_names(config, device))
        TrainConfig.validate(config)
        if config.compile_warmup < 0:
            raise ValueError(f"--compile-warmup must be >= 0, got {config.compile_warmup}")
        if side_by_side:  # a child (--only) gets one device and drops --devices (parallel.child_argv)
            from memlm_bench.parallel import check_devices
            check_devices(config.devices)
    except (ValueError, ConfigError) as error:
        print(f"memlm race: error: {error}", file=sys.stderr)
        return 2
    result = run_side_by_side(config, argv, device) if side_by_side else run_race(config)
    return report(result, config.results, config.json)


def merge_main(argv: list[str]) -> int:
    config = tyro.cli(MergeConfig, args=argv, prog="memlm race merge",
                      description="Merge memlm race JSON results (e.g. one contender per GPU) into one table.")
    try:
        result = merge([load(path) for path in config.files])
    except ValueError as error:
        print(f"memlm race merge: error: {error}", file=sys.stderr)
        return 2
    return report(result, config.results, config.json)


def report(result: dict, out: str, as_json: bool) -> int:
    json_path, md_path = write_results(result, out)
    print(markdown(result))
    print(f"wrote {json_path} and {md_path}")
    if as_json:
        print(json.dumps(result))
    return 1 if any(row["error"] for row in result["rows"]) else 0

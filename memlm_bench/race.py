"""`memlm race`: contenders trained for the same budget by memlm's own Trainer, then scored on test
bits per byte, side by side in one table (the quality counterpart of `memlm bench`'s speeds).

    memlm race --contenders seed-small seed-xl-small x-transformers x-transformers-XL --minutes 2.33
    memlm race ... --devices cuda:0 cuda:1 cuda:2 cuda:3   # side by side: a process and a GPU each
    memlm race ... --only x-transformers-XL          # one contender (one GPU each, in parallel), its own JSON
    memlm race merge $MEMLM_RESULTS/race-*-<stamp>*.json  # one table from several such files

Every contender gets the same TrainConfig (corpus, batch, sequence length, optimizer, schedule,
seed, budget) and the same Trainer: random windows for models without memory, contiguous streams
with the memory carried (and detached) for models with memory, validation and test bpb by
`memlm.eval.evaluate`, which keeps the memory across segments and resets it where documents start.
A contender is a memlm preset name or a peer: `x-transformers` (rotary, no memory) or
`x-transformers-XL` (rotary, Transformer-XL memory of seq_len), wrapped by memlm_bench.adapters,
built at the `--peer-shape` preset's shape (or --layers/--width/--heads/--seq-len) and handed to
the Trainer as `model=`.

The clock: a contender's budget is the Trainer's wall clock, which starts at `fit()` and includes
the validation evaluations made during training (10 over a minutes budget unless --eval-every
sets a step interval; 8 batches each). Before it starts, `Trainer.warm_up(--compile-warmup)`
(forward/backward passes with no weight update, then one validation evaluation; data order,
memory and RNGs restored afterwards) lets torch.compile compile every graph variant the run will
need, so compilation is not charged to the budget; its seconds are reported as warm-up. The
final validation and test evaluations and the checkpoints come after the budget: latest (the
last step) and, with `--test-weights best` (the race's default), best, the weights of the best
validation, which the test scores (`memlm eval/memorize <out>/<contender>/checkpoints/best`).
Text samples are off by default (`--sample-bytes 0`): token-by-token sampling would cost each
contender a different share of its budget. The row's numbers come from the Trainer's callbacks
(its metrics records) and its summary. Tables: memlm_bench.race_report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable

import torch
import tyro
from torch import nn

from memlm.config import ConfigError, describe, presets, resolve
from memlm.device import pick_device, release
from memlm.train import Callback, Trainer, TrainConfig, distributed
from memlm_bench.adapters import TRAINABLE_PEERS, PeerConfig, XTransformersLM
from memlm_bench.race_report import RESULT_KIND, load, merge, race_markdown, write_race_results
from memlm_bench.report import environment, results_dir, slug, utc_stamp
from memlm_bench.workloads import Shape

DEFAULT_CONTENDERS = {"cuda": ["seed-small", "seed-xl-small", "x-transformers", "x-transformers-XL"],
                      "cpu": ["seed-tiny", "seed-xl-tiny"]}


DEFAULT_DATA = {"cpu": "stdlib", "cuda": "site-packages"}
"""The corpus of a race whose --data is "auto" (the default), by device type: on a GPU the installed
Python sources (memlm.data.site_packages.SitePackages), large enough that a 10-minute race sees no token twice."""


def race_training() -> TrainConfig:
    """The training settings a race starts from: TrainConfig's, but tested with the best validation's
    weights, no text samples, checkpoints only after the budget and the corpus chosen by device."""
    return TrainConfig(data="auto", test_weights="best", sample_bytes=0, checkpoint_every=1_000_000_000)


def resolve_data(config: "RaceConfig", device: torch.device) -> None:
    """Replace --data auto by the device's default corpus (DEFAULT_DATA)."""
    if config.train.data == "auto":
        config.train.data = DEFAULT_DATA["cuda" if device.type == "cuda" else "cpu"]


@dataclass
class RaceConfig:
    """Train each contender with the same training config and budget, then compare test bpb. The
    training options are TrainConfig's, except that --out is the directory holding one run
    directory per contender (<out>/<contender>; None = runs/race-<UTC time>), a race never
    resumes, and by default it tests the best validation's weights (--test-weights best), samples
    no text (--sample-bytes 0) and checkpoints only after the budget."""

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
    compile_warmup: int = 4
    """Forward/backward passes (no update) before the clock starts, so compilation is not charged to the
    budget (compiled runs only); 0 = compile inside the budget."""
    results: str | None = None
    """Directory of the JSON and markdown results (race-<UTC time>-<device>[-<contender>].json/.md);
    None = $MEMLM_RESULTS, else ~/memlm-results."""
    json: bool = False
    """Print the result object as one JSON line last."""
    train: Annotated[TrainConfig, tyro.conf.arg(name="")] = field(default_factory=race_training)
    """The training settings every contender shares (their options appear without a prefix)."""


@dataclass
class MergeConfig:
    """Merge the JSON results of several `memlm race` runs (e.g. one contender per GPU) into one table."""

    files: tyro.conf.Positional[list[str]]
    """JSON files written by memlm race (race-*.json)."""
    results: str | None = None
    """Directory of the merged JSON and markdown; None = $MEMLM_RESULTS, else ~/memlm-results."""
    json: bool = False
    """Print the merged result object as one JSON line last."""


@dataclass
class Contender:
    """One contender of a race, planned (its model not built yet)."""

    name: str
    kind: str
    """memlm or peer."""
    model_config: Any
    """A memlm ModelConfig, or a PeerConfig (memlm_bench.adapters)."""
    description: str
    adapter: Callable[[Any], nn.Module] | None = None
    """Builds a peer's model from its config; None for memlm presets, which the Trainer builds."""


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
    known = presets() + list(TRAINABLE_PEERS)
    split = {name: split_contender(name) for name in names}  # name -> (preset or peer, its own overrides)
    unknown = [name for name in names if split[name][0] not in known]
    if unknown:
        raise ValueError(f"unknown contender {', '.join(unknown)}; known: memlm presets ({', '.join(presets())}) "
                         f"and peers {', '.join(TRAINABLE_PEERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a contender is named twice: {' '.join(names)}")
    for item in config.overrides + [item for _, own in split.values() for item in own]:
        if "=" not in item:
            raise ValueError(f"override {item!r} must read key=value")
    with_own = [name for name, (base, own) in split.items() if own and base in TRAINABLE_PEERS]
    if with_own:
        raise ValueError(f"{', '.join(with_own)}: a peer takes no overrides of its own (give --peer-dropout, "
                         f"--peer-train-reset, --peer-shape)")
    shape = {k: v for k, v in dict(layers=config.layers, width=config.width, seq_len=config.seq_len,
                                    **{"attention.heads": config.heads}).items() if v is not None}
    overrides = dict(item.split("=", 1) for item in config.overrides)
    contenders = []
    for name in names:
        if name in TRAINABLE_PEERS:
            base, trainable = resolve(config.peer_shape, **shape), TRAINABLE_PEERS[name]
            peer = PeerConfig.of(Shape.of(base, 0), memory=base.seq_len if trainable.xl_memory else 0,
                                 dropout=config.peer_dropout, train_reset=config.peer_train_reset).validate()
            text = trainable.description + (f"; dropout={config.peer_dropout:g}" if config.peer_dropout else "")
            if config.peer_train_reset and peer.stateful:
                text += f"; train_reset={config.peer_train_reset:g}"
            contenders.append(Contender(name, "peer", peer, text, adapter=XTransformersLM))
        else:
            preset, own = split[name]
            own_overrides = dict(item.split("=", 1) for item in own)
            model_config = resolve(preset, **{**shape, **overrides, **own_overrides}).validate()
            given = config.overrides + own
            text = describe(preset) + ("; " + ", ".join(given) if given else "")
            contenders.append(Contender(name, "memlm", model_config, text))
    return contenders


def train_config(config: RaceConfig, run_dir: Path) -> TrainConfig:
    """The TrainConfig every contender shares, with this contender's run directory."""
    return dataclasses.replace(config.train, out=str(run_dir), resume=False)


def runs_dir(config: RaceConfig) -> Path:
    """The directory of the contenders' run directories: --out, or runs/race-<UTC time>."""
    return Path(config.train.out) if config.train.out else Path("runs") / f"race-{utc_stamp()}"


def settings(config: RaceConfig) -> dict[str, Any]:
    """The race's settings as one flat JSON-ready dict: the training options, then the race's own."""
    own = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in ("train", "json")}
    return {**dataclasses.asdict(config.train), **own}


# ----- running ----------------------------------------------------------------------------

class Recorder(Callback):
    """What the race keeps of a Trainer's run: its metrics records and the warm-up's seconds."""

    def __init__(self):
        self.records: list[dict] = []
        self.warmup_s = 0.0

    def on_warmup_end(self, trainer, seconds: float) -> None:
        self.warmup_s = seconds

    def on_metrics(self, trainer, record: dict) -> None:
        self.records.append(record)


def make_trainer(contender: Contender, config: TrainConfig, info: distributed.Dist,
                 callbacks: list[Callback] | None = None) -> Trainer:
    """The contender's Trainer: a memlm preset is built by it, a peer by its adapter, from the same seed."""
    model = None
    if contender.adapter is not None:
        torch.manual_seed(config.seed)  # the initial weights the Trainer gives the models it builds
        model = contender.adapter(contender.model_config)
    return Trainer(contender.model_config, config, info, preset=contender.name, model=model,
                   callbacks=callbacks or [])


def run_contender(contender: Contender, config: RaceConfig, runs: Path, device: torch.device) -> dict:
    """Train and score one contender; a failure is recorded in the row, never raised."""
    started = time.perf_counter()
    row: dict[str, Any] = {"contender": contender.name, "kind": contender.kind, "description": contender.description,
                           "model": contender.model_config.to_dict(), "run_dir": str(runs / slug(contender.name)),
                           "meta": environment(device), "error": None}
    trainer = None
    try:
        recorder = Recorder()
        trainer = make_trainer(contender, train_config(config, Path(row["run_dir"])),
                               distributed.setup(config.train.device), [recorder])
        row.update(params=trainer.model.num_parameters(), stateful=bool(trainer.stateful),
                   seq_len=trainer.seq_len, flops_per_token=trainer.model.flops_per_token(),
                   peak_flops=trainer.peak_flops, peak_source=trainer.peak_source,
                   train_config=trainer.config.to_dict())
        log(f"{contender.name}: {row['params']:,} parameters; compile warm-up")
        trainer.warm_up(config.compile_warmup)
        row["warmup_s"] = recorder.warmup_s
        log(f"{contender.name}: training ({row['warmup_s']:.0f} s warm-up)")
        summary = trainer.fit()
        row.update(scores(summary, recorder.records, trainer))
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
    """A row's numbers from the Trainer's summary and metrics records."""
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
    device = pick_device(config.train.device)
    resolve_data(config, device)
    names = contender_names(config, device)
    contenders = plan(config, selected_names(config, device))
    runs = runs_dir(config)
    rows = []
    for contender in contenders:
        log(f"{contender.name} ({contender.description}) -> {runs / slug(contender.name)}")
        rows.append(run_contender(contender, config, runs, device))
    return {**race_result(config, names, device), "rows": rows,
            "single": config.only is not None or config.contender_index is not None}


def race_result(config: RaceConfig, names: list[str], device: torch.device) -> dict:
    """A result without rows: this machine's environment and the race's settings."""
    return {"kind": RESULT_KIND, "meta": environment(device), "config": {**settings(config), "contenders": names},
            "single": False, "rows": [], "notes": []}


def run_side_by_side(config: RaceConfig, argv: list[str], device: torch.device) -> dict:
    """--devices: every contender in a child process on a device of its own (memlm_bench.parallel),
    their results merged; a child that left no result is a failed row pointing at its log."""
    from memlm_bench.parallel import run_children

    names = contender_names(config, device)
    runs = runs_dir(config)
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


# ----- the command ------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """`memlm race [options]` or `memlm race merge FILES...`: print the table, write JSON + markdown.
    Exit 2 for a bad option, 1 if a contender failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    config = tyro.cli(RaceConfig, args=argv, prog="memlm race",
                      description="Contenders (memlm presets, x-transformers peers) trained by memlm's loop for the "
                                  "same budget, then scored on test bpb. The training options are memlm train's; "
                                  "--out holds one run directory per contender (default runs/race-<UTC time>) and "
                                  "a race never resumes. `memlm race merge FILES...` merges results.")
    side_by_side = config.devices is not None and config.only is None and config.contender_index is None
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("memlm race trains one contender per process: instead of torchrun, give "
                             "--devices cuda:0 cuda:1 ... (a process and a GPU per contender)")
        device = pick_device(config.train.device)
        resolve_data(config, device)
        plan(config, contender_names(config, device))  # every name checked before anything trains
        plan(config, selected_names(config, device))
        config.train.validate()
        if config.train.resume:
            raise ValueError("a race does not resume: each contender trains from the start (--out holds its runs)")
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


def report(result: dict, out: str | None, as_json: bool) -> int:
    json_path, md_path = write_race_results(result, results_dir(out))
    print(race_markdown(result))
    print(f"wrote {json_path} and {md_path}")
    if as_json:
        print(json.dumps(result))
    return 1 if any(row["error"] for row in result["rows"]) else 0

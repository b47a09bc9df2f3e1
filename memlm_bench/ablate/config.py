"""What `memlm ablate` runs: its options, each claim's budget, and the plan of runs (claim x arm x
seed x sweep point), each a `RunSpec` that says everything its run needs (JSON-ready).

Budgets (BUDGETS gives the defaults by shape):
    --steps N          every run takes N steps (equal tokens: every arm has the same batch)
    --tokens N         every run trains on N tokens (equal tokens, also for wall-clock claims)
    --minutes M        wall-clock claims train M minutes; token claims their shape's default tokens
    arms that share a device (--concurrent K > 1) slow one another down unevenly, so then every claim
    runs at equal tokens, and the results say so; with --alone-throughput a wall-clock claim stays
    one: each arm trains the tokens it trains alone in M minutes, its tokens/s measured alone first
    (memlm_bench.ablate.throughput), and the results say that.
Seeds pair the arms: seed k trains every arm with TrainConfig.seed = --seed + k (the same data
order and initial random stream).
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import tyro

from memlm.train import TrainConfig
from memlm_bench.ablate.claims import CLAIMS, SHAPES, TOKENS, WALL_CLOCK, Claim, arm_config, arm_overrides
from memlm_bench.report import slug

BUDGETS = {"tiny": {"minutes": 1.0, "tokens": 1_000_000}, "small": {"minutes": 5.0, "tokens": 100_000_000},
           "base": {"minutes": 10.0, "tokens": 300_000_000}}
"""Default budget of one run by shape: minutes for wall-clock claims, tokens for token claims."""
DEFAULT_DATA = {"cpu": "stdlib", "cuda": "site-packages"}
"""The corpus by device type when --data is not given (a claim may name its own: Claim.data)."""
AUTO = "auto"


def ablate_training() -> TrainConfig:
    """The training settings an ablation starts from: TrainConfig's, with the corpus chosen by device,
    no text samples and checkpoints only at the end (deleted after the run unless --keep-checkpoints)."""
    return TrainConfig(data=AUTO, sample_bytes=0, checkpoint_every=1_000_000_000)


@dataclass
class AblateConfig:
    """Test the reading list's claims: every arm of each claim trained with the same settings for each
    seed (paired), then per claim the paired differences, their 95% t interval and a verdict, in
    <out>/RESULTS.md with a plot per claim. A run whose JSON exists is skipped (resume by running the
    same command again). The training options are memlm train's; --seed is the first seed's."""

    claims: list[str] | None = None
    """Claim ids (1 ... 17; `--list-claims` names them); None = all."""
    seeds: int = 3
    """Seeds per arm (paired across arms); fewer than 3 gives no interval."""
    shape: str = "tiny"
    """Preset size of every arm: tiny, small, base."""
    overrides: list[str] = field(default_factory=list)
    """Dotted model overrides of every arm, as key=value, applied before each arm's own (e.g. layers=2)."""
    concurrent: int = 1
    """Runs at once on each device (processes of their own); > 1 makes every comparison one at equal tokens."""
    devices: list[str] | None = None
    """Devices to spread the runs over (cpu, cuda, cuda:N), --concurrent runs on each; None = --device,
    in this process when --concurrent is 1."""
    alone_throughput: bool = False
    """With --concurrent > 1: keep wall-clock claims at equal wall-clock, each arm training the tokens
    it trains alone in --minutes (its tokens/s measured alone first, one arm at a time on the first
    device, kept in <out>/throughput.json so that a resumed ablation plans the same runs)."""
    probe_steps: int = 20
    """Timed training steps of each arm's throughput measurement (after its compile warm-up)."""
    decode_tokens: int | None = None
    """Tokens generated when a claim times decoding; None = 256 on CUDA, 32 on CPU (both within seq_len)."""
    keep_checkpoints: bool = False
    """Keep each run's checkpoints (by default deleted once its JSON is written)."""
    report_only: bool = False
    """Write RESULTS.md and the plots from the JSONs already in --out; train nothing."""
    list_claims: bool = False
    """List the claims and exit."""
    train: Annotated[TrainConfig, tyro.conf.arg(name="")] = field(default_factory=ablate_training)
    """The training settings every run shares (options without a prefix). --out is the ablation's
    directory (default runs/ablate); --data auto = stdlib on CPU, site-packages on CUDA."""

    @property
    def out(self) -> Path:
        return Path(self.train.out or "runs/ablate")


@dataclass
class RunSpec:
    """One run: an arm of a claim at one seed (and sweep point), with its resolved configs."""

    claim: str
    arm: str
    seed: int
    point: dict[str, Any]
    """The sweep point's training fields ({} without a sweep)."""
    preset: str
    overrides: dict[str, Any]
    """The arm's own model overrides, as applied."""
    model: dict[str, Any]
    train: dict[str, Any]
    budget: dict[str, Any]
    """{"kind": wall-clock | tokens, "minutes" | "tokens" | "steps": ..., "shared": bool}."""
    measures: dict[str, Any]
    """What to score after training: eval_lengths, eval_data, decode_tokens, spans."""
    path: str
    """The run's JSON; its run directory is the same path without .json."""
    command: str = ""
    """The `memlm ablate` command that runs this run's claim with these settings."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunSpec":
        return cls(**data)


def selected(config: AblateConfig) -> list[Claim]:
    ids = config.claims or list(CLAIMS)
    unknown = [i for i in ids if i not in CLAIMS]
    if unknown:
        raise ValueError(f"unknown claim {', '.join(unknown)}; known: {', '.join(CLAIMS)}")
    return [CLAIMS[i] for i in dict.fromkeys(ids)]


def check(config: AblateConfig) -> None:
    """Raise ValueError for options that cannot run."""
    if config.shape not in SHAPES:
        raise ValueError(f"--shape must be one of {', '.join(SHAPES)}, got {config.shape!r}")
    if config.seeds < 1 or config.concurrent < 1 or config.probe_steps < 1:
        raise ValueError("--seeds, --concurrent and --probe-steps must be >= 1")
    if config.alone_throughput and not shared(config):
        raise ValueError("--alone-throughput converts wall-clock budgets of runs that share a device: "
                         "it needs --concurrent > 1 (runs alone are held to equal wall-clock already)")
    if config.alone_throughput and (config.train.steps is not None or config.train.tokens is not None):
        raise ValueError("--alone-throughput takes its budget from --minutes, not --steps or --tokens")
    if config.train.resume:
        raise ValueError("an ablation resumes by skipping finished runs: drop --resume")
    for item in config.overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must read key=value")
    selected(config)
    config.train.validate()


def shared(config: AblateConfig) -> bool:
    """Whether runs share a device (several at once on one): then budgets are tokens."""
    return config.concurrent > 1


def converted(config: AblateConfig, claim: Claim) -> bool:
    """Whether the claim's runs share a device yet are held to equal wall-clock through each arm's
    throughput measured alone (--alone-throughput)."""
    return config.alone_throughput and shared(config) and claim.budget == WALL_CLOCK


def budget(config: AblateConfig, claim: Claim, tokens_per_s: float | None = None) -> dict[str, Any]:
    """The claim's budget under these options (module docstring); tokens_per_s: the arm's
    throughput measured alone, for a converted wall-clock budget (`converted`)."""
    t, defaults, is_shared = config.train, BUDGETS[config.shape], shared(config)
    if converted(config, claim):
        if tokens_per_s is None or not tokens_per_s > 0:
            raise ValueError(f"claim {claim.id}: no throughput measured alone for one of its arms")
        minutes = t.minutes or defaults["minutes"]
        return {"kind": WALL_CLOCK, "minutes": minutes, "tokens": round(tokens_per_s * minutes * 60),
                "tokens_per_s": tokens_per_s, "shared": True}
    if t.steps is not None:
        return {"kind": TOKENS, "steps": t.steps, "shared": is_shared}
    if t.tokens is not None or is_shared or claim.budget == TOKENS:
        return {"kind": TOKENS, "tokens": t.tokens or defaults["tokens"], "shared": is_shared}
    return {"kind": claim.budget, "minutes": t.minutes or defaults["minutes"], "shared": is_shared}


def data_for(config: AblateConfig, claim: Claim, device_type: str) -> str:
    """--data when given, else the claim's own corpus, else the device's default."""
    if config.train.data != AUTO:
        return config.train.data
    return claim.data or DEFAULT_DATA["cuda" if device_type == "cuda" else "cpu"]


def point_name(point: dict[str, Any]) -> str:
    return "-".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in point.items())


def throughput_key(claim: Claim, arm_name: str) -> str:
    """An arm's key in <out>/throughput.json."""
    return f"{claim.id}/{arm_name}"


def plan(config: AblateConfig, device_type: str, throughput: dict[str, float] | None = None) -> list[RunSpec]:
    """Every run of the selected claims, seed-major (seed 0 of every arm first, so that an interrupted
    ablation leaves whole seeds). throughput: tokens/s alone by `throughput_key`, for --alone-throughput."""
    overrides = dict(item.split("=", 1) for item in config.overrides)
    runs = []
    for claim in selected(config):
        spends = {arm.name: budget(config, claim, (throughput or {}).get(throughput_key(claim, arm.name)))
                  for arm in claim.arms}
        points = [dict([item]) for item in claim.sweep] or [{}]
        measures = {"eval_lengths": list(claim.eval_lengths), "eval_data": list(claim.eval_data),
                    "decode_tokens": (config.decode_tokens or (256 if device_type == "cuda" else 32))
                    if claim.decode else 0, "spans": claim.spans}
        for k in range(config.seeds):
            for arm in claim.arms:
                spend = spends[arm.name]
                model = arm_config(arm, config.shape, overrides)
                for point in points:
                    name = f"seed{k}" + (f"-{point_name(point)}" if point else "")
                    path = config.out / "runs" / slug(f"claim-{claim.id}") / slug(arm.name) / f"{name}.json"
                    train = dataclasses.replace(
                        config.train, data=data_for(config, claim, device_type), seed=config.train.seed + k,
                        out=str(path.with_suffix("")), steps=spend.get("steps"), tokens=spend.get("tokens"),
                        minutes=None if "tokens" in spend else spend.get("minutes"), **arm.train, **point)
                    runs.append(RunSpec(claim.id, arm.name, k, point, arm.preset(config.shape),
                                        arm_overrides(arm, config.shape, overrides), model.to_dict(),
                                        train.validate().to_dict(), spend, measures, str(path),
                                        command(config, claim.id)))
    return runs


SKIPPED_TRAIN_FIELDS = ("out", "resume", "device")
"""Training options left out of the reproducing command (the output directory, the hardware)."""


def command(config: AblateConfig, claim_id: str) -> str:
    """The command that runs `claim_id` with these settings (training options that differ from the
    ablation's defaults included)."""
    parts = ["memlm", "ablate", "--claims", claim_id, "--seeds", str(config.seeds), "--shape", config.shape]
    if config.overrides:
        parts += ["--overrides", *config.overrides]
    if config.concurrent > 1:
        parts += ["--concurrent", str(config.concurrent)]
    if config.alone_throughput:
        parts += ["--alone-throughput", "--probe-steps", str(config.probe_steps)]
    defaults = ablate_training()
    for f in dataclasses.fields(config.train):
        value = getattr(config.train, f.name)
        if f.name in SKIPPED_TRAIN_FIELDS or value == getattr(defaults, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{f.name.replace('_', '-')}")
        elif isinstance(value, (tuple, list)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)

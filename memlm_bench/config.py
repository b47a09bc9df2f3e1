"""What `memlm bench` measures, and the device-dependent defaults it falls back on.

Fields left at None take the defaults of the device the run lands on (`DEVICE_DEFAULTS`):
the small presets at batch 32 x 512 tokens on CUDA, a two-layer, 64-wide shape on CPU so
the whole code path runs in CI in seconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from memlm.compile_modes import COMPILE_MODES
from memlm_bench.report import results_dir

DecodeMode = Literal["eager", "compile", "graph"]
DECODE_MODES = get_args(DecodeMode)


@dataclass
class BenchConfig:
    """Benchmark memlm presets against a dense reference GPT and the installed peer libraries, at
    the same shapes in one run: training tokens/s, MFU, peak memory and generation tokens/s."""

    presets: list[str] | None = None
    """memlm presets to measure; None = vanilla-small seed-small on CUDA, vanilla-tiny seed-tiny on CPU.
    An entry may add its own overrides after the name: "seed-small memory.persistent.vectors=16" (quoted)."""
    batch_size: int | None = None
    """Training batch size; None = 32 on CUDA, 2 on CPU."""
    seq_len: int | None = None
    """Training sequence length (every model is built for it); None = 512 on CUDA, 64 on CPU."""
    layers: int | None = None
    """Override every preset's depth; None = the preset's own on CUDA, 2 on CPU."""
    width: int | None = None
    """Override every preset's width; None = the preset's own on CUDA, 64 on CPU."""
    overrides: list[str] = field(default_factory=list)
    """Dotted model overrides applied to every preset, as key=value (e.g. attention.backend=sdpa)."""
    steps: int | None = None
    """Timed training steps per repeat; None = 20 on CUDA, 2 on CPU."""
    warmup: int | None = None
    """Untimed training steps before timing (torch.compile happens here); None = 5 on CUDA, 1 on CPU."""
    repeats: int = 3
    """Timed repeats of each measurement; the median is reported."""
    compile: bool = True
    """torch.compile every model the same way before timing; CUDA only, CPU runs stay eager."""
    compile_mode: str = "default"
    """torch.compile's mode for every row alike: default, reduce-overhead (CUDA graphs: the step is replayed, not launched kernel by kernel), max-autotune or max-autotune-no-cudagraphs (memlm.compile_modes)."""
    peers: bool = True
    """Also measure the installed peer libraries (x-transformers, compressive/memorizing transformers)."""
    peer_names: list[str] | None = None
    """Only these peers (row names, e.g. x-transformers); None = every installed one."""
    generate: bool = True
    """Measure cached greedy generation tokens/s."""
    gen_batch_sizes: list[int] = field(default_factory=lambda: [1, 16])
    """Batch sizes for generation tokens/s."""
    gen_prompt_len: int | None = None
    """Prompt length for generation (its prefill is not timed); None = 16 on CUDA, 8 on CPU."""
    gen_new_tokens: int | None = None
    """New tokens per generation call; None = 256 on CUDA, 8 on CPU. Past seq_len (prompt + new tokens), only models with recurrent memory generate (their memory rolls); the others are noted."""
    profile_steps: int = 0
    """After timing, profile this many more training steps of each row with torch.profiler: the
    row's `profile` lists the kernels (CUDA; operators on a CPU) that take the most time a step,
    with their share. 0 = no profile."""
    decode: DecodeMode = "eager"
    """Decode path of memlm and reference generation: eager, compile (torch.compile(model, dynamic=True)), or graph (memlm: static key/value cache, compiled step replayed as a CUDA graph over bf16 weights, memlm.decode.static; models it does not support and the reference decode eagerly)."""
    device: str = "auto"
    """auto (CUDA when available), cuda, cuda:N or cpu."""
    seed: int = 0
    """Seed of the random weights and token data."""
    out: Path | None = None
    """Directory for the JSON and markdown results; None = $MEMLM_RESULTS, else ~/memlm-results."""
    json: bool = False
    """Print the result as one JSON object on the last line of stdout."""


DEVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": dict(presets=["vanilla-small", "seed-small"], batch_size=32, seq_len=512, steps=20, warmup=5,
                 gen_prompt_len=16, gen_new_tokens=256),
    "cpu": dict(presets=["vanilla-tiny", "seed-tiny"], batch_size=2, seq_len=64, layers=2, width=64,
                steps=2, warmup=1, gen_prompt_len=8, gen_new_tokens=8),
}



def resolve(config: BenchConfig, device: torch.device) -> BenchConfig:
    """A copy with every None field set to the device's default (the results directory too),
    checked for consistency."""
    defaults = DEVICE_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    filled = {name: value for name, value in defaults.items() if getattr(config, name) is None}
    config = dataclasses.replace(config, **filled, out=results_dir(config.out))
    _check(config)
    return config


def _check(config: BenchConfig) -> None:
    for name in ("batch_size", "seq_len", "steps", "repeats", "gen_prompt_len", "gen_new_tokens"):
        if getattr(config, name) <= 0:
            raise ValueError(f"bench: {name} must be positive, got {getattr(config, name)}")
    if config.warmup < 1:
        raise ValueError(f"bench: warmup must be >= 1 (the first step compiles), got {config.warmup}")
    if config.gen_prompt_len < 2:
        raise ValueError(f"bench: gen_prompt_len must be >= 2 (the cache is prefilled with all but the "
                         f"last prompt token), got {config.gen_prompt_len}")
    if any(b <= 0 for b in config.gen_batch_sizes):
        raise ValueError(f"bench: gen_batch_sizes must be positive, got {config.gen_batch_sizes}")
    if config.compile_mode not in COMPILE_MODES:
        raise ValueError(f"bench: compile_mode must be one of {', '.join(COMPILE_MODES)}, got {config.compile_mode!r}")
    if config.decode not in DECODE_MODES:
        raise ValueError(f"bench: decode must be one of {', '.join(DECODE_MODES)}, got {config.decode!r}")
    for item in config.overrides:
        if "=" not in item:
            raise ValueError(f"bench: override {item!r} must read key=value")
    for entry in config.presets:
        if not entry.split() or "=" in entry.split()[0] or any("=" not in item for item in entry.split()[1:]):
            raise ValueError(f"bench: preset entry {entry!r} must read PRESET [key=value ...]")


def parse_overrides(items: list[str]) -> dict[str, str]:
    """["attention.backend=sdpa"] -> {"attention.backend": "sdpa"} (memlm coerces the strings)."""
    return dict(item.split("=", 1) for item in items)

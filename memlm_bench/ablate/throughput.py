"""Each arm's training throughput measured alone, for `memlm ablate --alone-throughput`.

Runs that share a device slow one another down unevenly, so their wall-clock is no measure of
the arms. To compare a wall-clock claim anyway, each arm first trains alone on the device for a
few steps (memlm's Trainer, its compile warm-up first, then `probe_steps` timed steps); its
tokens/s times the claim's minutes is the token budget its shared runs then train. The numbers
are kept in <out>/throughput.json and reused, so a resumed ablation plans the same runs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from memlm.device import release
from memlm.train import Trainer, distributed
from memlm_bench.ablate.claims import arm_config
from memlm_bench.ablate.config import AblateConfig, converted, data_for, selected, throughput_key

THROUGHPUT = "throughput.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def arm_tokens_per_s(config: AblateConfig, claim, arm, device: str) -> float:
    """Tokens/s of `arm` training alone on `device`: memlm's Trainer over the claim's corpus and the
    ablation's training settings, compiled as they say, timed over `probe_steps` steps after the
    compile warm-up (which fills any memory first)."""
    overrides = dict(item.split("=", 1) for item in config.overrides)
    model = arm_config(arm, config.shape, overrides)
    out = Path(tempfile.mkdtemp(prefix="ablate-throughput-"))
    train = dataclasses.replace(config.train, data=data_for(config, claim, torch.device(device).type), out=str(out),
                                device=device, steps=1_000_000, tokens=None, minutes=None, **arm.train)
    trainer = Trainer(model, train, distributed.setup(device))
    try:
        trainer.warm_up(4)
        for _ in range(2):  # the first steps of the optimizer (its state allocated) stay untimed
            trainer.train_step()
        _sync(trainer.device)
        started = time.perf_counter()
        for _ in range(config.probe_steps):
            trainer.train_step()
        _sync(trainer.device)
        return trainer.tokens_per_step * config.probe_steps / (time.perf_counter() - started)
    finally:
        trainer.close()
        where = trainer.device
        del trainer
        release(where)  # the next arm measures on a device with nothing of this one left
        shutil.rmtree(out, ignore_errors=True)


def measure(config: AblateConfig, device: str, log: Callable[[str], None],
            probe: Callable = arm_tokens_per_s) -> dict[str, float]:
    """Tokens/s alone of every arm of the selected wall-clock claims, by `throughput_key`: read from
    <out>/throughput.json where it is there, measured (one arm at a time) and added where not."""
    path = config.out / THROUGHPUT
    known: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}
    for claim in selected(config):
        if not converted(config, claim):
            continue
        for arm in claim.arms:
            key = throughput_key(claim, arm.name)
            if key in known:
                continue
            known[key] = probe(config, claim, arm, device)
            log(f"throughput alone: claim {claim.id} {arm.name}: {known[key]:,.0f} tokens/s")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(known, indent=2) + "\n")  # after each arm: an interrupted probe resumes
    return known

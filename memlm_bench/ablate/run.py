"""One run of an ablation: train an arm with memlm's Trainer (its public callbacks record the
curve), score what the claim needs, and write the run's JSON. Runs as a function in this process,
or as `python -m memlm_bench.ablate.run SPEC.json` in a child process of its own.

The JSON (written last, atomically: its existence means the run finished) holds the spec (claim,
arm, seed, sweep point, model and training configs, budget), the metrics, the validation curve
and the environment. A run that fails is recorded with its error and run again next time; a run
that diverges (non-finite steps until the Trainer stops it) is finished, with `diverged` true. A
measure that fails (e.g. a corpus to score that is not there) is recorded under `measure_errors`:
the run's other metrics count, and the run is made again next time.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from memlm.config import ModelConfig
from memlm.device import pick_device, release
from memlm.train import Callback, Trainer, TrainConfig, TrainingError, distributed
from memlm_bench.ablate.config import RunSpec
from memlm_bench.ablate.measures import decode_speed, diverged, eval_corpus, eval_lengths, span_depth_slope
from memlm_bench.report import environment


class Curve(Callback):
    """The Trainer's metrics records: validation evaluations and training records."""

    def __init__(self):
        self.evals: list[dict] = []
        self.train: list[dict] = []

    def on_metrics(self, trainer, record: dict) -> None:
        if record["kind"] == "eval":
            self.evals.append({k: record.get(k) for k in ("step", "tokens", "elapsed", "bpb")})
        elif record["kind"] == "train":
            self.train.append({k: record.get(k) for k in ("step", "tokens", "elapsed", "loss", "tokens_per_s",
                                                            "skipped_steps")})


def finished(path: str | Path) -> bool:
    """Whether the run's JSON exists and records no error, of training or of a measure (such a run
    runs again; until then its other metrics count)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return record.get("error") is None and not record.get("measure_errors")


def write_json(path: Path, data: dict) -> None:
    """Write atomically: a run's JSON exists only once whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(partial, path)


def run_one(spec: RunSpec, device: str = "auto", keep_checkpoints: bool = False) -> dict[str, Any]:
    """Train and score one run; write and return its record (failures recorded, never raised)."""
    path = Path(spec.path)
    run_dir = path.with_suffix("")
    if run_dir.exists():  # a run that did not finish: start it again
        shutil.rmtree(run_dir)
    train = TrainConfig.from_dict({**spec.train, "device": device if device != "auto" else spec.train["device"]})
    where = pick_device(train.device)
    record: dict[str, Any] = {**spec.to_dict(), "metrics": {}, "curve": [], "train_curve": [], "error": None,
                              "measure_errors": {}, "meta": environment(where)}
    started, curve, trainer = time.perf_counter(), Curve(), None
    try:
        trainer = Trainer(ModelConfig.from_dict(spec.model), train, distributed.setup(train.device),
                          preset=spec.preset, callbacks=[curve])
        record["resolved_train"] = trainer.config.to_dict()
        metrics = record["metrics"]
        metrics["params"] = trainer.model.num_parameters()
        try:
            summary = trainer.fit()
            metrics.update(steps=summary["steps"], tokens=summary["tokens"], elapsed_s=summary["elapsed_s"],
                           test_bpb=summary["test_bpb"], best_val_bpb=summary["best_val_bpb"])
            stopped = False
        except TrainingError as error:  # non-finite steps until the Trainer gave up: the run diverged
            metrics.update(steps=trainer.step, tokens=trainer.tokens, elapsed_s=trainer.elapsed,
                           stopped=str(error))
            stopped = True
        record["curve"], record["train_curve"] = curve.evals, curve.train
        rates = [r["tokens_per_s"] for r in curve.train[1:] or curve.train if r.get("tokens_per_s")]
        metrics["tokens_per_s"] = sorted(rates)[len(rates) // 2] if rates else None
        metrics["diverged"] = diverged(stopped, curve.evals, curve.train)
        if not stopped:
            measure(trainer, spec.measures, metrics, record["measure_errors"])
    except Exception as error:  # recorded; the ablation goes on with the next run
        record["error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc(file=sys.stderr)
    finally:
        if trainer is not None:
            trainer.close()
        del trainer
        release(where)
    record["wall_s"] = time.perf_counter() - started
    if not keep_checkpoints and (run_dir / "checkpoints").exists():
        shutil.rmtree(run_dir / "checkpoints")
    write_json(path, record)
    return record


def measure(trainer: Trainer, measures: dict[str, Any], metrics: dict, errors: dict) -> None:
    """The claim's derived metrics of the trained model (memlm_bench.ablate.measures); a measure that
    fails is recorded under its name."""
    for n in measures.get("eval_lengths") or ():
        try:
            metrics[f"test_bpb@{n}x"] = eval_lengths(trainer, n)
        except Exception as error:
            errors[f"test_bpb@{n}x"] = f"{type(error).__name__}: {error}"
    for spec in measures.get("eval_data") or ():
        try:
            metrics[f"ood_bpb:{spec}"] = eval_corpus(trainer, spec)
        except Exception as error:
            errors[f"ood_bpb:{spec}"] = f"{type(error).__name__}: {error}"
    if measures.get("decode_tokens"):
        metrics["decode_tokens_per_s"] = decode_speed(trainer, measures["decode_tokens"])
    if measures.get("spans"):
        spans = trainer.model.spans()
        metrics["spans"] = spans
        metrics["span_depth_slope"] = span_depth_slope(spans) if spans else None


def main(argv: list[str] | None = None) -> int:
    """`python -m memlm_bench.ablate.run SPEC.json [--device D] [--keep-checkpoints]`: one run in this process."""
    args = list(sys.argv[1:] if argv is None else argv)
    device = args[args.index("--device") + 1] if "--device" in args else "auto"
    spec = RunSpec.from_dict(json.loads(Path(args[0]).read_text()))
    torch.set_num_threads(max(1, int(os.environ.get("MEMLM_ABLATE_THREADS", torch.get_num_threads()))))
    record = run_one(spec, device, keep_checkpoints="--keep-checkpoints" in args)
    return 1 if record["error"] or record["measure_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

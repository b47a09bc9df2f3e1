"""The derived metrics of the claims: what a run scores after training (longer evaluation windows,
another corpus, decoding speed, learned spans, divergence), and what is computed across the arms of
one seed afterwards (tokens to a target bpb, the divergence rate of a sweep).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

import memlm
from memlm.data import prepare
from memlm.device import autocast, seconds
from memlm.eval import evaluate


def eval_lengths(trainer, multiple: int) -> float:
    """Test bpb of the trained model in windows of `multiple` x seq_len, without memory (xPos,
    "A Length-Extrapolatable Transformer", arXiv 2212.10554, section 4: train short, test long)."""
    with autocast(trainer.device, trainer.config.precision):
        result = evaluate(trainer.model, trainer.corpus.split("test"), trainer.config.batch_size,
                          trainer.seq_len * multiple, stateful=False)
    return result["bpb"]


def eval_corpus(trainer, spec: str) -> float:
    """Test bpb of the trained model on the test split of another corpus (a --data spec), scored as
    the run's own test split is (memory kept for models with memory)."""
    c = trainer.config
    split = prepare(spec, c.cache_dir, c.fractions, progress=False, tokenizer=trainer.tokenizer).split("test")
    with autocast(trainer.device, c.precision):
        result = evaluate(trainer.model, split, c.batch_size, trainer.seq_len, stateful=trainer.stateful,
                          reset=trainer.model_config.memory.reset_at_document)
    return result["bpb"]


PROMPT_TOKENS = 8


def decode_speed(trainer, new_tokens: int, repeats: int = 3) -> float:
    """Greedy decoding tokens/s at batch 1 (memlm.generate, its default decode path), the median of
    `repeats` after one untimed call; the prompt's prefill is inside the time (8 tokens)."""
    model = trainer.model
    limit = trainer.seq_len - PROMPT_TOKENS if not trainer.stateful else new_tokens
    new_tokens = max(1, min(new_tokens, limit))
    prompt = torch.tensor(trainer.corpus.split("test").tokens[:PROMPT_TOKENS].astype("int64"),
                          device=trainer.device)[None]  # (1, 8)
    with autocast(trainer.device, trainer.config.precision):
        memlm.generate(model, prompt, max_new_tokens=new_tokens, temperature=0.0)
        times = [seconds(lambda: memlm.generate(model, prompt, max_new_tokens=new_tokens, temperature=0.0),
                         trainer.device) for _ in range(repeats)]
    return new_tokens / statistics.median(times)


def span_depth_slope(spans: list[list[float]]) -> float:
    """Mean learned span (positions) of the upper half of the layers minus the lower half's
    (Adaptive Attention Span, arXiv 1905.07799, figure 4: spans grow with depth)."""
    means = [statistics.fmean(layer) for layer in spans]
    half = len(means) // 2
    return statistics.fmean(means[len(means) - half:]) - statistics.fmean(means[:half])


def diverged(stopped: bool, evals: list[dict], train: list[dict]) -> bool:
    """A run diverged if the Trainer stopped it for non-finite steps, skipped any such step, or
    ended with a validation bpb above the one it started from (step 0)."""
    if stopped or any((r.get("skipped_steps") or 0) > 0 for r in train):
        return True
    bpbs = [e["bpb"] for e in evals]
    return bool(bpbs) and (not math.isfinite(bpbs[-1]) or bpbs[-1] > bpbs[0])


# ----- across the arms of one seed --------------------------------------------------------

def tokens_to(curve: list[dict], target: float) -> float | None:
    """Training tokens at which a validation curve first reaches `target` bpb, linear between
    evaluations; None if it never does."""
    previous = None
    for point in curve:
        if point["bpb"] is not None and point["bpb"] <= target:
            if previous is None or previous["bpb"] == point["bpb"]:
                return float(point["tokens"])
            share = (previous["bpb"] - target) / (previous["bpb"] - point["bpb"])
            return previous["tokens"] + share * (point["tokens"] - previous["tokens"])
        previous = point
    return None


def seed_values(metric: str, runs: dict[str, list[dict[str, Any]]]) -> dict[str, float | None]:
    """One seed's value of `metric` for each arm, from its runs (arm -> the runs of its sweep points):
    tokens_to_target (the target: the worst arm's best validation bpb in this seed), divergence_rate
    (share of the sweep's runs that diverged), or the run's own metric (mean over sweep points)."""
    if metric == "tokens_to_target":
        best = {arm: min((p["bpb"] for p in rs[0]["curve"] if p["bpb"] is not None), default=None)
                for arm, rs in runs.items()}
        if any(b is None for b in best.values()):
            return {arm: None for arm in runs}
        target = max(best.values())
        return {arm: tokens_to(rs[0]["curve"], target) for arm, rs in runs.items()}
    if metric == "divergence_rate":
        return {arm: statistics.fmean(float(bool(r["metrics"].get("diverged"))) for r in rs) for arm, rs in runs.items()}
    values = {}
    for arm, rs in runs.items():
        got = [r["metrics"].get(metric) for r in rs]
        values[arm] = statistics.fmean(got) if got and all(isinstance(v, (int, float)) for v in got) else None
    return values

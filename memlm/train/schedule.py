r"""Learning-rate schedules: linear warmup, then cosine or warmup-stable-decay (WSD).

The decay is a function of `progress`, the share of the post-warmup budget already used,
so one schedule serves every budget: for a step or token budget progress counts steps,
for a wall-clock budget it counts seconds (the trainer measures the time; a minutes run
thus always ends at the end of its decay, however fast or slow its steps are).

    lr
    |   /‾‾‾‾‾‾‾‾\___                 cosine: min + (peak - min) * (1 + cos(pi * progress)) / 2
    |  /          ‾‾‾\___
    | /               ‾‾‾\___ min     wsd: peak until progress = 1 - decay_frac, then linear to min
    +---------------------------> step
      warmup   progress 0 -> 1

WSD: "MiniCPM: Unveiling the Potential of Small Language Models with Scalable Training
Strategies", Hu et al., arXiv 2404.06395 (linear decay here, not their exponential one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    peak: float
    """Learning rate at the end of warmup."""
    warmup: int
    """Warmup steps."""
    kind: str = "cosine"
    """cosine or wsd."""
    min_frac: float = 0.1
    """Final learning rate as a fraction of peak."""
    decay_frac: float = 0.2
    """wsd: share of the post-warmup budget spent decaying."""

    def __call__(self, step: int, progress: float) -> float:
        """Learning rate of optimizer step `step` (0-based); `progress` in [0, 1] is the share of
        the post-warmup budget used before this step (ignored during warmup)."""
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        progress = min(max(progress, 0.0), 1.0)
        low = self.peak * self.min_frac
        if self.kind == "cosine":
            return low + (self.peak - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "wsd":
            stable = 1.0 - self.decay_frac
            if progress <= stable:
                return self.peak
            return self.peak - (self.peak - low) * (progress - stable) / self.decay_frac
        raise ValueError(f"unknown schedule {self.kind!r}; allowed: cosine, wsd")


def step_progress(step: int, warmup: int, total_steps: int) -> float:
    """`progress` of a step budget: post-warmup steps done over post-warmup steps in all."""
    return (step - warmup) / max(1, total_steps - warmup)

"""Paired statistics of an ablation: per seed the difference between two arms, its mean and 95%
confidence interval with Student's t distribution (n - 1 degrees of freedom), and a verdict.

Seeds pair the arms: arms of one seed see the same data in the same order (and start from the same
random stream), so the difference per seed removes what the seed does to both ("Student", "The
Probable Error of a Mean", Biometrika 1908). scipy is not a dependency: the t quantile is the
numeric inverse of the t distribution function, written with the regularised incomplete beta
function (its continued fraction, as in Numerical Recipes 6.4).

    d = paired([1.0, 1.1, 0.9], [1.2, 1.3, 1.0])     # treatment - baseline per seed
    s = summarise(d, "lower")                        # Summary(n=3, mean=-0.1667, low, high, verdict)

Verdicts (chosen here; the claim's direction is that of treatment - baseline):
    confirmed      the interval excludes zero on the side the paper claims
    refuted        the interval excludes zero on the other side
    inconclusive   the interval holds zero
    too few seeds  fewer than MIN_SEEDS paired seeds (one or two): no interval is drawn; with two,
                   t(0.975, 1) = 12.7 makes any interval too wide to say anything
    not run        no seed has both arms
An interval of zero width (every seed's difference equal, e.g. parameter counts) excludes zero
unless the difference is zero.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

MIN_SEEDS = 3
"""Paired seeds needed for an interval and a verdict other than 'too few seeds'."""
LEVEL = 0.95
CONFIRMED, REFUTED, INCONCLUSIVE, TOO_FEW, NOT_RUN = "confirmed", "refuted", "inconclusive", "too few seeds", "not run"


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t with `dof` degrees of freedom."""
    tail = 0.5 * incomplete_beta(dof / 2.0, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, dof: float) -> float:
    """The t with P(T <= t) = p (e.g. t_quantile(0.975, 2) = 4.3027), by bisection of t_cdf."""
    if not 0.0 < p < 1.0 or dof <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and dof > 0, got p={p}, dof={dof}")
    if p < 0.5:
        return -t_quantile(1.0 - p, dof)
    low, high = 0.0, 1.0
    while t_cdf(high, dof) < p:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if t_cdf(middle, dof) < p:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2.0


def paired(treatment: list[float], baseline: list[float] | None) -> list[float]:
    """Per seed, treatment - baseline (or the treatment's value where there is no baseline)."""
    if baseline is None:
        return list(treatment)
    if len(treatment) != len(baseline):
        raise ValueError(f"paired values need one per seed in each arm: {len(treatment)} vs {len(baseline)}")
    return [t - b for t, b in zip(treatment, baseline)]


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float | None
    low: float | None
    """The interval's ends (None with fewer than MIN_SEEDS differences)."""
    high: float | None
    verdict: str


def interval(differences: list[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): the `level` confidence interval of the mean difference, t with n - 1 dof."""
    n = len(differences)
    if n < 2:
        raise ValueError("an interval needs at least two differences")
    mean = statistics.fmean(differences)
    half = t_quantile(0.5 + level / 2.0, n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(low: float, high: float, direction: str) -> str:
    """confirmed / refuted / inconclusive for an interval of treatment - baseline and the claimed
    direction (lower or higher)."""
    if direction not in ("lower", "higher"):
        raise ValueError(f"direction must be lower or higher, got {direction!r}")
    below, above = high < 0, low > 0
    if not (below or above):
        return INCONCLUSIVE
    return CONFIRMED if below == (direction == "lower") else REFUTED


def summarise(differences: list[float], direction: str, min_seeds: int = MIN_SEEDS) -> Summary:
    """The differences' mean, interval and verdict (module docstring)."""
    values = [d for d in differences if d is not None and math.isfinite(d)]
    if not values:
        return Summary(0, None, None, None, NOT_RUN)
    if len(values) < min_seeds:
        return Summary(len(values), statistics.fmean(values), None, None, TOO_FEW)
    mean, low, high = interval(values)
    return Summary(len(values), mean, low, high, verdict(low, high, direction))

"""memlm ablate: the claims registry builds, the paired statistics (t quantiles, intervals, the three
verdicts) on inputs with known answers, budgets, and a CPU smoke run of two cheap claims x 3 seeds
(every run's JSON, resume skipping finished runs, RESULTS.md with numbers and 'not run' rows, plots)."""

from __future__ import annotations

import json
import math

import pytest

from memlm import cli
from memlm.config import SIZES
from memlm_bench.ablate import stats
from memlm_bench.ablate.claims import CLAIMS, TOKENS, WALL_CLOCK, arm_config
from memlm_bench.ablate.config import AblateConfig, budget, plan
from memlm_bench.ablate.measures import seed_values, tokens_to
from tests.cli.test_cli import corpus  # noqa: F401  (the fixture: a small corpus of word documents)

SMOKE = ["--shape", "tiny", "--overrides", "layers=2", "width=32", "seq_len=32", "attention.heads=2",
         "--steps", "3", "--batch-size", "2", "--eval-batches", "1", "--eval-every", "1",
         "--fractions", "0.8", "0.1", "0.1", "--device", "cpu", "--seeds", "3"]
SMOKE_CLAIMS = ["--claims", "10", "15"]  # bias-free (test bpb, params) and RoPE vs learned positions


# ----- the registry ---------------------------------------------------------------------

def test_the_registry_holds_the_17_claims_and_every_arm_builds_at_every_shape():
    assert list(CLAIMS) == [str(i) for i in range(1, 18)]
    for claim in CLAIMS.values():
        names = [arm.name for arm in claim.arms]
        assert len(set(names)) == len(names) >= 2 and claim.paper and claim.arxiv and claim.budget in (WALL_CLOCK, TOKENS)
        for comparison in claim.comparisons:
            assert comparison.treatment in names and comparison.baseline in names + [None]
            assert comparison.direction in ("lower", "higher")
        for shape in SIZES:
            configs = [arm_config(arm, shape) for arm in claim.arms]  # validated ModelConfigs
            assert len({json.dumps(c.to_dict(), sort_keys=True) for c in configs}) == len(configs), claim.id
    # equal memory where the claim says so; matched parameters where it says so
    for shape in SIZES:
        uniform, *shaped = [arm_config(arm, shape) for arm in CLAIMS["3"].arms]
        assert all(sum(c.memory_lengths()) == sum(uniform.memory_lengths()) for c in shaped)
        xl, compressive = [arm_config(arm, shape) for arm in CLAIMS["5"].arms]
        assert compressive.memory.xl.length + compressive.memory.compressive.length == xl.memory.xl.length
    import memlm
    ffn, persistent = [memlm.build(arm_config(arm, "tiny")).num_parameters() for arm in CLAIMS["6"].arms]
    assert abs(persistent - ffn) / ffn < 0.01


# ----- statistics -------------------------------------------------------------------------

@pytest.mark.parametrize("p, dof, expected", [(0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 4, 2.7764),
                                              (0.975, 10, 2.2281), (0.95, 10, 1.8125), (0.975, 30, 2.0423),
                                              (0.995, 3, 5.8409), (0.975, 10_000, 1.9602)])
def test_t_quantiles_match_the_tables(p, dof, expected):
    assert stats.t_quantile(p, dof) == pytest.approx(expected, abs=1e-4)
    assert stats.t_quantile(1 - p, dof) == pytest.approx(-expected, abs=1e-4)
    assert stats.t_cdf(stats.t_quantile(p, dof), dof) == pytest.approx(p, abs=1e-10)


def test_the_interval_of_known_paired_differences():
    differences = stats.paired([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])  # per seed: 1, 2, 3 (mean 2, sd 1)
    assert differences == [1.0, 2.0, 3.0]
    mean, low, high = stats.interval(differences)
    half = 4.302653 / math.sqrt(3)
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half), abs=1e-5)
    five = stats.interval([0.1, 0.2, 0.3, 0.4, 0.5])  # sd sqrt(0.025), t(0.975, 4) = 2.776445
    assert five[2] - five[0] == pytest.approx(2.776445 * math.sqrt(0.025 / 5), abs=1e-6)


def test_the_three_verdicts_and_too_few_seeds():
    better, worse, unclear = [-0.10, -0.12, -0.08], [0.10, 0.12, 0.08], [-0.1, 0.1, 0.02]
    assert stats.summarise(better, "lower").verdict == stats.CONFIRMED
    assert stats.summarise(worse, "lower").verdict == stats.REFUTED
    assert stats.summarise(unclear, "lower").verdict == stats.INCONCLUSIVE
    assert stats.summarise(worse, "higher").verdict == stats.CONFIRMED
    assert stats.summarise(better, "higher").verdict == stats.REFUTED
    assert stats.summarise([-512.0] * 3, "lower").verdict == stats.CONFIRMED  # zero width: parameter counts
    assert stats.summarise([0.0] * 3, "lower").verdict == stats.INCONCLUSIVE
    two = stats.summarise([-0.1, -0.12], "lower")
    assert two.verdict == stats.TOO_FEW and two.n == 2 and two.low is None and two.mean == pytest.approx(-0.11)
    assert stats.summarise([], "lower").verdict == stats.NOT_RUN


def test_tokens_to_a_target_and_the_divergence_rate():
    curve = [{"tokens": 0, "bpb": 8.0}, {"tokens": 100, "bpb": 4.0}, {"tokens": 200, "bpb": 2.0}]
    assert tokens_to(curve, 3.0) == pytest.approx(150.0) and tokens_to(curve, 1.0) is None
    fast = {"curve": [{"tokens": 0, "bpb": 8.0}, {"tokens": 100, "bpb": 3.0}, {"tokens": 200, "bpb": 2.5}]}
    slow = {"curve": curve}
    # target: the worse arm's best (2.5): the fast arm reaches it at 200, the slow one at 175
    assert seed_values("tokens_to_target", {"a": [fast], "b": [slow]}) == {"a": 200.0, "b": pytest.approx(175.0)}
    runs = {"a": [{"metrics": {"diverged": d}} for d in (True, False, False, True)]}
    assert seed_values("divergence_rate", runs) == {"a": 0.5}


def test_budgets_fall_back_to_equal_tokens_when_runs_share_a_device():
    wall, tokens = CLAIMS["1"], CLAIMS["11"]
    alone = AblateConfig()
    assert budget(alone, wall) == {"kind": WALL_CLOCK, "minutes": 1.0, "shared": False}
    assert budget(alone, tokens) == {"kind": TOKENS, "tokens": 1_000_000, "shared": False}
    shared = AblateConfig(concurrent=2)
    assert budget(shared, wall) == {"kind": TOKENS, "tokens": 1_000_000, "shared": True}
    specs = plan(AblateConfig(claims=["13"], seeds=2), "cpu")
    assert len(specs) == 2 * 2 * 5  # seeds x arms x learning rates
    assert {s.train["seed"] for s in specs if s.seed == 1} == {1} and specs[0].train["data"] == "stdlib"
    assert plan(AblateConfig(claims=["7"], seeds=1), "cuda")[0].train["data"] == "stdlib-long"  # its own corpus
    assert plan(AblateConfig(claims=["1"], seeds=1), "cuda")[0].train["data"] == "site-packages"


# ----- the command, end to end on CPU -----------------------------------------------------

def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["ablate", *[str(a) for a in argv]])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_smoke_ablation_runs_resumes_and_reports(corpus, tmp_path, capsys):
    out = tmp_path / "ablate"
    args = [*SMOKE_CLAIMS, *SMOKE, "--data", corpus, "--out", out]
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    files = sorted((out / "runs").glob("*/*/*.json"))
    assert len(files) == 2 * 2 * 3  # claims x arms x seeds
    records = [json.loads(f.read_text()) for f in files]
    for record in records:
        assert record["error"] is None and record["metrics"]["steps"] == 3
        assert 0 < record["metrics"]["test_bpb"] < 9 and record["metrics"]["params"] > 0
        assert [p["step"] for p in record["curve"]] == [0, 1, 2, 3] and record["model"]["layers"] == 2
        assert record["train"]["seed"] == record["seed"]  # seed k: the same data order for every arm
    first_mtimes = [f.stat().st_mtime_ns for f in files]

    code, stdout, err = run(capsys, *args)  # resume: every run is finished, none trains again
    assert code == 0 and "12 finished (skipped), 0 to run" in err
    assert [f.stat().st_mtime_ns for f in files] == first_mtimes

    text = (out / "RESULTS.md").read_text()
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ") and line[2:4].strip().isdigit()}
    assert sorted(rows, key=int) == [str(i) for i in range(1, 18)]
    bias = [r for r in records if r["claim"] == "10"]
    params = {r["arm"]: r["metrics"]["params"] for r in bias}
    assert f"params, no-bias − bias (claimed lower): {params['no-bias'] - params['bias']:,}" in rows["10"]
    assert "params: **confirmed**" in rows["10"]  # the same difference for every seed
    assert "test_bpb: **" in rows["15"] and "(n=3)" in rows["15"] and "equal tokens (3 steps per run)" in rows["15"]
    for claim in set(CLAIMS) - {"10", "15"}:
        assert "| not run |" in rows[claim] and f"memlm ablate --claims {claim} --seeds 3" in rows[claim]
    assert (out / "claim-10.png").stat().st_size > 0 and (out / "claim-15.png").exists()
    assert not (out / "claim-1.png").exists()

    code, _, err = run(capsys, *args[:-2], "--steps", "4", "--out", out)  # other settings, same --out
    assert code == 2 and "made with other settings" in err

    (out / "RESULTS.md").unlink()  # the report alone reads the runs, whatever settings made them
    code, _, err = run(capsys, "--report-only", "--steps", "4", "--out", out)
    assert code == 0, err
    again = (out / "RESULTS.md").read_text()
    assert [line for line in again.splitlines() if line.startswith(("| 10 |", "| 15 |"))] == [rows["10"], rows["15"]]


# ----- shared devices held to equal wall-clock (--alone-throughput) -----------------------

def test_alone_throughput_turns_each_arms_minutes_into_its_own_tokens():
    from memlm_bench.ablate.config import check
    from memlm_bench.ablate.results_md import budget_text
    config = AblateConfig(claims=["1", "11"], seeds=1, concurrent=4, alone_throughput=True)
    config.train.minutes = 2.0
    throughput = {"1/t5": 1000.0, "1/learned": 1500.0}
    specs = plan(config, "cpu", throughput)
    tokens = {s.arm: s.train["tokens"] for s in specs if s.claim == "1"}
    assert tokens == {"t5": 1000 * 120, "learned": 1500 * 120}  # tokens/s alone x 2 minutes
    assert all(s.train["minutes"] is None for s in specs)
    assert {s.budget["kind"] for s in specs if s.claim == "1"} == {WALL_CLOCK}
    assert {s.budget["kind"] for s in specs if s.claim == "11"} == {TOKENS}  # a token claim stays one
    assert "throughput measured alone" in budget_text(specs[0].budget, WALL_CLOCK)
    with pytest.raises(ValueError, match="no throughput measured alone"):
        plan(config, "cpu", {"1/t5": 1000.0})
    for bad in (AblateConfig(alone_throughput=True), AblateConfig(concurrent=2, alone_throughput=True, probe_steps=0)):
        with pytest.raises(ValueError):
            check(bad)
    with_tokens = AblateConfig(concurrent=2, alone_throughput=True)
    with_tokens.train.tokens = 1000
    with pytest.raises(ValueError, match="not --steps or --tokens"):
        check(with_tokens)


def test_throughput_is_measured_once_per_arm_and_kept_for_a_resume(tmp_path):
    from memlm_bench.ablate import throughput
    config = AblateConfig(claims=["1", "11"], seeds=1, concurrent=2, alone_throughput=True)
    config.train.out = str(tmp_path)
    asked = []

    def probe(config, claim, arm, device):
        asked.append((claim.id, arm.name))
        return 100.0 * len(asked)

    first = throughput.measure(config, "cpu", lambda message: None, probe)
    assert asked == [("1", "learned"), ("1", "t5")] and first == {"1/learned": 100.0, "1/t5": 200.0}
    assert json.loads((tmp_path / throughput.THROUGHPUT).read_text()) == first
    assert throughput.measure(config, "cpu", lambda message: None, probe) == first and len(asked) == 2


def test_an_arms_throughput_alone_is_measured_by_training_it(corpus, tmp_path):
    from memlm_bench.ablate import throughput
    config = AblateConfig(claims=["10"], seeds=1, concurrent=2, alone_throughput=True, probe_steps=2,
                          overrides=["layers=2", "width=32", "seq_len=32", "attention.heads=2"])
    config.train.data, config.train.batch_size, config.train.fractions = str(corpus), 2, (0.8, 0.1, 0.1)
    claim = CLAIMS["10"]
    rate = throughput.arm_tokens_per_s(config, claim, claim.arms[0], "cpu")
    assert 0 < rate < 1e9 and math.isfinite(rate)

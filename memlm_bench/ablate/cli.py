"""`memlm ablate`: plan the runs, skip the finished ones, run the rest, then write RESULTS.md and a
plot per claim into --out.

    memlm ablate --claims 1 15 --seeds 3 --shape tiny --minutes 1          # two claims on CPU
    memlm ablate --shape small --tokens 100000000 --devices cuda:0 cuda:1 --concurrent 2
    memlm ablate --shape small --minutes 10 --concurrent 8 --alone-throughput  # shared, yet equal wall-clock
    memlm ablate --report-only --out runs/ablate                            # the report alone
    memlm ablate --list-claims
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tyro

from memlm.config import ConfigError
from memlm.device import pick_device
from memlm.tables import markdown_table
from memlm_bench.ablate.analysis import analyse, load_runs
from memlm_bench.ablate.claims import CLAIMS
from memlm_bench.ablate.config import AblateConfig, RunSpec, check, command, plan
from memlm_bench.ablate.plots import plot_claim
from memlm_bench.ablate.pool import run_children, run_here
from memlm_bench.ablate.results_md import results_markdown
from memlm_bench.ablate.run import finished
from memlm_bench.ablate.throughput import measure
from memlm_bench.parallel import check_devices

RESULTS = "RESULTS.md"


def log(message: str) -> None:
    print(f"ablate: {message}", file=sys.stderr, flush=True)


def stale(spec: RunSpec) -> str | None:
    """Why a finished run's JSON does not belong to this spec (other settings), or None."""
    record = json.loads(Path(spec.path).read_text())
    ignore = {"device", "out"}
    for key in ("model", "budget", "measures"):
        if record.get(key) != spec.to_dict()[key]:
            return key
    theirs = {k: v for k, v in record["train"].items() if k not in ignore}
    ours = {k: v for k, v in json.loads(json.dumps(spec.train)).items() if k not in ignore}
    return None if theirs == ours else "train " + ", ".join(k for k in ours if ours[k] != theirs.get(k))


def report(config: AblateConfig) -> Path:
    """RESULTS.md and the plots from the runs in --out; every claim gets a row."""
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(out)
    results = [analyse(claim, runs) for claim in CLAIMS.values()]
    commands, plots = {}, {}
    for result in results:
        commands[result.claim.id] = (result.runs[0].get("command") if result.runs else None) or \
            command(config, result.claim.id)
        if plot_claim(result, out / f"claim-{result.claim.id}.png") is not None:
            plots[result.claim.id] = f"claim-{result.claim.id}.png"
    path = out / RESULTS
    path.write_text(results_markdown(results, commands, plots))
    rows = [[r.claim.id, r.claim.paper[:48], "; ".join(f.summary.verdict for f in r.findings) if r.ran else "not run"]
            for r in results]
    print("\n".join(markdown_table(["#", "paper", "verdicts"], rows)))
    return path


def list_claims() -> None:
    rows = [[c.id, c.claim, c.budget, ", ".join(a.name for a in c.arms), "yes" if c.needs else ""]
            for c in CLAIMS.values()]
    print("\n".join(markdown_table(["#", "claim", "budget", "arms", "gap"], rows)))


def main(argv: list[str] | None = None) -> int:
    """`memlm ablate [options]`: exit 2 for bad options or stale runs in --out, 1 if a run failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config = tyro.cli(AblateConfig, args=argv, prog="memlm ablate",
                      description="Test the reading list's claims: arms x seeds (paired) trained by memlm's loop, "
                                  "paired differences with 95% t intervals and verdicts in <out>/RESULTS.md.")
    if config.list_claims:
        list_claims()
        return 0
    try:
        check(config)
        if config.devices is not None:
            check_devices(config.devices)
        device = pick_device(config.devices[0] if config.devices else config.train.device)
        if config.report_only:  # the report reads the JSONs in --out; nothing is planned or run
            specs = []
        else:
            throughput = measure(config, str(device), log) if config.alone_throughput else None
            specs = plan(config, device.type, throughput)
        done = [spec for spec in specs if finished(spec.path)]
        # only runs to be continued must match these settings (a report plans none)
        mismatched = [(spec, why) for spec in done if (why := stale(spec))]
        if mismatched:
            spec, why = mismatched[0]
            raise ValueError(f"{len(mismatched)} finished run(s) in {config.out} were made with other settings "
                             f"(e.g. {spec.path}: {why}); use another --out")
    except (ValueError, ConfigError) as error:
        print(f"memlm ablate: error: {error}", file=sys.stderr)
        return 2
    todo = [spec for spec in specs if not finished(spec.path)]
    failed = 0
    if not config.report_only:
        log(f"{len(specs)} runs, {len(specs) - len(todo)} finished (skipped), {len(todo)} to run -> {config.out}")
        if todo and config.devices is None and config.concurrent == 1:
            records = run_here(todo, config.train.device, config.keep_checkpoints, log)
            failed = sum(bool(r["error"] or r["measure_errors"]) for r in records)
        elif todo:
            codes = run_children(todo, config.devices or [config.train.device], config.concurrent,
                                 config.keep_checkpoints, log)
            failed = sum(code != 0 for code in codes)
    path = report(config)
    print(f"wrote {path}")
    return 1 if failed else 0

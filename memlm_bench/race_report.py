"""`memlm race`'s results: merging per-contender result files into one, the markdown table with
its verdict and notes, and the JSON + markdown files (race-<UTC time>-<device>[-<contender>].json/.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from memlm.tables import markdown_table
from memlm_bench.report import slug, utc_stamp

RESULT_KIND = "memlm race"
"""The `kind` of every race result object."""

COMPARED = ("data", "fractions", "steps", "tokens", "minutes", "batch_size", "grad_accum", "lr", "min_lr_frac",
            "warmup_steps", "schedule", "decay_frac", "weight_decay", "beta1", "beta2", "grad_clip", "seed",
            "precision", "compile", "eval_every", "eval_batches", "layers", "width", "heads", "seq_len",
            "peer_shape", "overrides", "compile_warmup", "sample_bytes", "test_weights", "peer_dropout",
            "peer_train_reset")
"""Settings that must agree between merged runs (a difference is noted under the table)."""


def merge(results: list[dict]) -> dict:
    """One result from several (e.g. one contender each): rows in --contenders order, each keeping its
    own environment; settings that differ between the inputs are noted."""
    if not results:
        raise ValueError("nothing to merge")
    for result in results:
        if result.get("kind") != RESULT_KIND:
            raise ValueError("not a memlm race result (its 'kind' is not 'memlm race')")
    first = results[0]
    order = list(first["config"]["contenders"])
    rows = [row for result in results for row in result["rows"]]
    rows.sort(key=lambda row: order.index(row["contender"]) if row["contender"] in order else len(order))
    notes = [note for result in results for note in result.get("notes", [])]
    for name in COMPARED:
        values = {json.dumps(result["config"].get(name)) for result in results}
        if len(values) > 1:
            notes.append(f"the merged runs differ in {name}: {', '.join(sorted(values))}")
    seen = [row["contender"] for row in rows]
    notes += [f"{name} appears {seen.count(name)} times" for name in dict.fromkeys(seen) if seen.count(name) > 1]
    meta = dict(first["meta"])
    for key in ("device", "torch", "commit", "python"):
        values = list(dict.fromkeys(str(row["meta"].get(key)) for row in rows)) or [str(meta.get(key))]
        meta[key] = values[0] if len(values) == 1 else " / ".join(values)
    meta["date"] = min(row["meta"]["date"] for row in rows) if rows else meta["date"]
    return {"kind": RESULT_KIND, "meta": meta, "config": first["config"], "single": False, "rows": rows,
            "notes": list(dict.fromkeys(notes)), "merged_from": [result.get("file") for result in results]}


def fmt(value: float | None, spec: str = "{:,.0f}") -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else spec.format(value)


COLUMNS = ["contender", "params", "steps", "tokens", "tokens/s", "MFU", "train loss", "val bpb", "best val bpb",
           "test bpb", "tested step",
           "budget s", "warm-up s", "wall s", "device", "notes"]


def row_cells(row: dict) -> list[str]:
    remark = row["description"] + (f"; FAILED: {row['error'].splitlines()[0][:160]}" if row["error"] else "")
    return [row["contender"], fmt(row.get("params")), fmt(row.get("steps")), fmt(row.get("tokens")),
            fmt(row.get("tokens_per_s")), fmt(row.get("mfu"), "{:.1%}"), fmt(row.get("train_loss"), "{:.4f}"),
            fmt(row.get("val_bpb"), "{:.4f}"), fmt(row.get("best_val_bpb"), "{:.4f}"),
            fmt(row.get("test_bpb"), "{:.4f}"), fmt(row.get("test_step")), fmt(row.get("budget_s"), "{:.1f}"),
            fmt(row.get("warmup_s"), "{:.1f}"), fmt(row.get("wall_s"), "{:.1f}"), row["meta"]["device"],
            remark.replace("|", "/")]


def verdict(rows: list[dict]) -> str | None:
    """The best memlm contender against the best peer, by test bpb."""
    scored = [row for row in rows if row.get("test_bpb") is not None and not row["error"]]
    ours = min((r for r in scored if r["kind"] == "memlm"), key=lambda r: r["test_bpb"], default=None)
    peer = min((r for r in scored if r["kind"] == "peer"), key=lambda r: r["test_bpb"], default=None)
    if ours is None or peer is None:
        return None
    gain = 1 - ours["test_bpb"] / peer["test_bpb"]
    return (f"best memlm contender {ours['contender']} ({ours['test_bpb']:.4f}) vs best peer {peer['contender']} "
            f"({peer['test_bpb']:.4f}): {abs(gain):.1%} {'lower' if gain >= 0 else 'higher'} test bpb")


SLOW_START_S = 10.0
"""A contender whose first logged training step comes later than this on its clock is noted."""


def race_markdown(result: dict) -> str:
    """A race result as a markdown section: settings, the table, the verdict and notes."""
    meta, c = result["meta"], result["config"]
    budget = (f"{c['minutes']:g} minutes" if c.get("minutes") else f"{c['steps']} steps" if c.get("steps")
              else f"{c['tokens']:,} tokens" if c.get("tokens") else "the device default")
    trained = next((row["train_config"] for row in result["rows"] if row.get("train_config")), c)
    seq_len = " / ".join(dict.fromkeys(str(row["seq_len"]) for row in result["rows"] if row.get("seq_len"))) or "seq_len"
    commit = f", commit {meta['commit']}" if meta.get("commit") else ""
    lines = [
        f"## memlm race, {meta['date']}", "",
        f"- device: {meta['device']}; torch {meta['torch']}, memlm {meta['memlm']}{commit}",
        f"- data: {c['data']} (fractions {', '.join(f'{x:g}' for x in c['fractions'])}); budget {budget} per "
        f"contender on its training clock (validation during training included; compile warm-up before it, "
        f"final validation and test after it)",
        f"- batch {trained.get('batch_size')} x {seq_len} tokens, lr {trained.get('lr')} {trained.get('schedule')} "
        f"(warmup {trained.get('warmup_steps')} steps, min {trained.get('min_lr_frac')}), weight decay "
        f"{trained.get('weight_decay')}, seed {trained.get('seed')}, precision {trained.get('precision')}, "
        f"compiled {trained.get('compile')}",
        "- tokens/s: median of the logged training rates (evaluations excluded); test bpb: the whole test split, "
        "models with memory scored as streams with the memory kept, with the weights of "
        + ("the lowest validation bpb (early stopping; their step is 'tested step')"
           if c.get("test_weights", "last") == "best" else "the last step"),
        "",
    ]
    lines += markdown_table(COLUMNS, [row_cells(row) for row in result["rows"]])
    summary = verdict(result["rows"])
    slow = [f"{row['contender']} spent {row['first_log']['elapsed_s']:.0f} s of its clock before step "
            f"{row['first_log']['step']} (the first logged): compilation the warm-up did not cover?"
            for row in result["rows"] if (row.get("first_log") or {}).get("elapsed_s", 0) > SLOW_START_S]
    lines += [""] + ([f"- {summary}"] if summary else []) + [f"- {note}" for note in result["notes"] + slow]
    return "\n".join(lines).rstrip() + "\n"


def write_race_results(result: dict, out: str | Path) -> tuple[Path, Path]:
    """<out>/race-<UTC time>-<device>[-<contender>].json and .md (the contender for a one-contender run)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    devices = {row["meta"]["device"] for row in result["rows"]} or {result["meta"]["device"]}
    device = slug(devices.pop()) if len(devices) == 1 else "mixed"
    name = f"race-{utc_stamp(result['meta']['date'])}-{device}"
    if result.get("single"):
        name += f"-{slug(result['rows'][0]['contender'])}"
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(race_markdown(result))
    return json_path, md_path


def load(path: str | Path) -> dict:
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read race result {path}: {error}") from None
    if not isinstance(result, dict):
        raise ValueError(f"{path} is not a memlm race result")
    return {**result, "file": str(path)}

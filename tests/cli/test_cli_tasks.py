"""The CLI's long-range tasks end to end: `eval --task recall`, the adaptive span report and
PNGs, and knowledge memory (`memorize`, `eval/generate --memory`)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from pathlib import Path

import pytest
import torch

import memlm
from memlm import cli
from memlm.data import prepare
from memlm.eval import evaluate
from memlm.tasks import recall_accuracy
from memlm.memory.knn.stores import StoreError, load_store
from memlm.train import load_model
from memlm.train import checkpoint

TINY = ["--preset", "seed-tiny", "--device", "cpu", "--model.layers", "2", "--model.width", "32",
        "--model.seq_len", "32", "--model.attention.heads", "2", "--sample_bytes", "8"]
PNG = b"\x89PNG\r\n\x1a\n"


def call(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def last_json(out: str):
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng, root = random.Random(0), tmp_path_factory.mktemp("corpus")
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    for i in range(40):
        (root / f"doc{i}.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(25)))
    return root


@pytest.fixture(scope="module")
def knn_run(corpus, tmp_path_factory) -> tuple[Path, dict]:
    """A tiny model with a kNN layer and adaptive span, trained for a few steps."""
    out = tmp_path_factory.mktemp("runs") / "knn"
    code, stdout, _ = call("train", *TINY, "--model.memory.knn.layers", "1", "--model.memory.knn.k", "8",
                           "--model.memory.knn.capacity", "512", "--model.memory.adaptive_span.enabled",
                           "--model.memory.adaptive_span.init", "0.5", "--data", corpus,
                           "--cache_dir", corpus.parent / "cache", "--fractions", "0.8", "0.1", "0.1", "--out", out,
                           "--steps", "4", "--batch_size", "4", "--lr", "1e-2", "--warmup_steps", "1",
                           "--eval_every", "1000", "--json")
    assert code == 0
    return out, last_json(stdout)


def save_run(path: Path, model: torch.nn.Module, corpus: Path | str = "stdlib") -> Path:
    """A run directory holding `model` as its latest checkpoint (no training)."""
    config = {"preset": None, "model": model.config.to_dict(), "data": {},
              "train": {"data": str(corpus), "batch_size": 2, "precision": "fp32",
                        "cache_dir": str(Path(corpus).parent / "cache"), "fractions": [0.8, 0.1, 0.1]}}
    checkpoint.save(path / checkpoint.CHECKPOINTS, 0, model, {}, config)
    return path


def tiny(**overrides) -> torch.nn.Module:
    base = {"layers": 2, "width": 32, "seq_len": 32, "attention.heads": 2}
    return memlm.build("seed-tiny", **{**base, **overrides})


# ----- recall -----------------------------------------------------------------------------

def test_recall_task_through_the_cli(tmp_path, knn_run):
    model = tiny(**{"memory.xl.length": 32})  # Transformer-XL memory: stateful
    with torch.no_grad():
        model.embed.weight.zero_()  # tied head: every logit 0, a uniform model over the 257 ids
    run = save_run(tmp_path / "uniform", model)
    code, stdout, _ = call("eval", run, "--task", "recall", "--distances", "8", "40", "--documents", "3", "--json")
    result = last_json(stdout)
    assert code == 0 and result["task"] == "recall" and result["stateful"] is True and result["seq_len"] == 32
    rows = result["by_distance"]
    assert [r["distance"] for r in rows] == [8, 40] and [r["documents"] for r in rows] == [3, 3]
    for row in rows:  # uniform: ln 257 nats per digit, to the last bit; ties go to id 0, never a digit
        assert row["digit_nll"] == pytest.approx(math.log(257), abs=1e-12) and row["accuracy"] == 0.0
    assert "| 40 | 3 | 0.000 | 5.549 |" in stdout  # the markdown table

    run, _ = knn_run  # a barely trained model: the CLI reports exactly what the library computes
    code, stdout, _ = call("eval", run, "--task", "recall", "--distances", "16", "64", "--documents", "4",
                           "--pairs", "2", "--seed", "3", "--json")
    result = last_json(stdout)
    loaded, _ = load_model(run)
    expected = recall_accuracy(loaded, (16, 64), 4, 16, 3, pairs=2)
    assert code == 0 and result["by_distance"] == expected["by_distance"] and result["pairs"] == 2
    for row in result["by_distance"]:
        assert 0 <= row["accuracy"] <= 1 and row["digit_nll"] > 0 and row["documents"] == 4
    code, stdout, _ = call("eval", run, "--task", "recall", "--distances", "64", "--documents", "4", "--pairs", "2",
                           "--seed", "3", "--no-memory", "--json")
    windowed = last_json(stdout)
    assert code == 0 and windowed["stateful"] is False
    assert windowed["by_distance"] == recall_accuracy(loaded, (64,), 4, 16, 3, pairs=2, stateful=False)["by_distance"]


def test_eval_with_a_longer_memory_than_trained(corpus, tmp_path):
    """--memory-multiplier scores exactly what the model with that eval_multiplier scores."""
    torch.manual_seed(0)
    run = save_run(tmp_path / "xl", tiny(**{"memory.xl.length": 16}), corpus)
    results = {}
    for times in (None, "1", "3"):
        code, stdout, _ = call("eval", run, "--max-tokens", "512", "--json",
                               *(["--memory-multiplier", times] if times else []))
        assert code == 0
        results[times] = last_json(stdout)
    assert results[None]["memory_lengths"] == results["1"]["memory_lengths"] == [16, 16]
    assert results["3"]["memory_lengths"] == [48, 48]
    assert results[None]["bpb"] == results["1"]["bpb"]
    longer = tiny(**{"memory.xl.length": 16, "memory.xl.eval_multiplier": 3.0})
    loaded, saved = load_model(run)
    longer.load_state_dict(loaded.state_dict())
    split = prepare(str(corpus), saved["train"]["cache_dir"], (0.8, 0.1, 0.1)).split("test")
    expected = evaluate(longer.eval(), split, 2, 32, 512, stateful=True)
    assert results["3"]["bpb"] == pytest.approx(expected["bpb"], abs=1e-6)
    assert results["3"]["bpb"] != pytest.approx(results["1"]["bpb"], abs=1e-4)  # the longer memory is used
    assert call("eval", run, "--memory-multiplier", "0")[0] != 0


# ----- adaptive span ----------------------------------------------------------------------

def test_spans_table_json_and_run_pngs(knn_run):
    run, summary = knn_run
    for name in ("curves.png", "spans.png", "by_position.png"):
        assert (run / name).read_bytes()[:8] == PNG
    code, stdout, _ = call("eval", run, "--max-tokens", "128", "--json")
    result = last_json(stdout)
    spans = load_model(run)[0].spans()
    assert code == 0 and len(spans) == 2 and len(spans[0]) == 2
    assert result["spans"] == spans  # exactly, through JSON
    lines = stdout.splitlines()
    table = lines[lines.index("adaptive span (positions) by layer and head") + 2:][:2]
    for layer, line in enumerate(table):
        cells = [float(c) for c in line.split()]
        assert cells[0] == layer and cells[1:3] == [round(v, 1) for v in spans[layer]]
        assert cells[3] == round(sum(spans[layer]) / 2, 1)
    assert spans != [[16.0, 16.0], [16.0, 16.0]]  # trained away from span_init * span_max = 0.5 * 32
    assert any(row["bpb"] is not None for row in summary["test_by_position"])


# ----- knowledge memory -------------------------------------------------------------------

def test_memorize_round_trip_and_eval_with_memory(knn_run, tmp_path):
    run, summary = knn_run
    mem = tmp_path / "mem"
    code, stdout, _ = call("memorize", run, "--out", mem, "--split", "test", "--json")
    manifest = last_json(stdout)
    assert code == 0 and manifest["tokens"] == summary["test_tokens"]  # every test token, once
    assert manifest["layers"] == {"1": {"dir": "layer-1", "entries": summary["test_tokens"],
                                        "capacity": summary["test_tokens"], "heads": 1, "dim": 16, "kind": "exact"}}
    assert manifest["model"]["knn_layers"] == [1] and manifest["data"]["split"] == "test"
    store = load_store(mem / "layer-1")
    assert store.shared and int(store.counts[0]) == summary["test_tokens"]
    with pytest.raises(StoreError, match="read-only"):
        store.write(torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16), torch.zeros(1))

    code, stdout, _ = call("eval", run, "--json")
    plain = last_json(stdout)
    code_m, stdout, _ = call("eval", run, "--memory", mem, "--json")
    with_memory = last_json(stdout)
    assert code == code_m == 0 and with_memory["memory"]["layers"] == {"1": summary["test_tokens"]}
    assert plain["bpb"] == pytest.approx(summary["test_bpb"], rel=1e-9)
    assert with_memory["tokens"] == plain["tokens"] and with_memory["bpb"] != plain["bpb"]  # the memory is read
    assert f"knowledge memory {mem}: layer 1 {summary['test_tokens']:,} entries" in stdout

    code, stdout, _ = call("memorize", run, "--out", mem, "--split", "test", "--max-tokens", "256",
                           "--capacity", "100", "--batch-size", "2", "--json")  # replaces the earlier memory
    small = last_json(stdout)
    assert code == 0 and small["tokens"] == 256 and small["layers"]["1"]["entries"] == 100  # 4 x 2 x 32 tokens
    small_store = load_store(mem / "layer-1")
    assert (int(small_store.counts[0]), int(small_store.written[0])) == (100, 256)  # the last 100 of 256 kept
    assert small_store.entries(0)[2].tolist() == sorted(small_store.entries(0)[2].tolist())  # split offsets, in order
    code, stdout, _ = call("generate", run, "--memory", mem, "--prompt", "alpha", "--max-new-tokens", "40",
                           "--json")
    assert code == 0 and last_json(stdout)["new_tokens"] == 40


def test_memory_user_errors_exit_2(knn_run, corpus, tmp_path):
    run, _ = knn_run
    mem = tmp_path / "mem"
    assert call("memorize", run, "--out", mem, "--split", "test", "--max-tokens", "64")[0] == 0
    plain = save_run(tmp_path / "plain", tiny(), corpus)
    wider = save_run(tmp_path / "wider", tiny(width=64, **{"memory.knn.layers": [1]}), corpus)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    cases = [
        (["memorize", "no-such-run", "--out", mem], "no such run directory"),
        (["memorize", plain, "--out", tmp_path / "m2"], "no kNN layers"),
        (["memorize", run, "--out", other], "not a knowledge memory directory"),
        (["memorize", run, "--out", tmp_path / "m3", "--capacity", "0"], "--capacity must be positive"),
        (["eval", run, "--memory", other], "not a knowledge memory directory"),
        (["eval", run, "--memory", tmp_path / "missing"], "no such memory directory"),
        (["eval", plain, "--memory", mem], "no kNN layers"),
        (["eval", wider, "--memory", mem], "memorised by another model"),
        (["generate", wider, "--memory", mem, "--prompt", "a"], "memorised by another model"),
        (["eval", run, "--task", "recall", "--documents", "0"], "--documents and --pairs must be >= 1"),
        (["eval", run, "--task", "recall", "--pairs", "20000"], "distinct keys"),
        (["eval", run, "--task", "recall", "--no-memory", "--memory", mem], "drop one of them"),
    ]
    for argv, message in cases:
        code, _, stderr = call(*argv)
        assert code == 2, argv
        assert len(stderr.strip().splitlines()) == 1 and message in stderr and "Traceback" not in stderr, stderr
    assert (other / "keep.txt").read_text() == "mine" and not (tmp_path / "m2").exists()

"""memlm race on tiny CPU contenders: one table from per-contender JSON files, contenders that do
not depend on one another, a compile warm-up that leaves the run unchanged, and the peer adapter
(x-transformers behind memlm's model protocol; skipped where x-transformers is not installed)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memlm import cli
from memlm_bench import race, race_report
from memlm_bench.adapters import PeerConfig, PeerMemory, PeerState, XTransformersLM
from memlm.config import get_preset
from memlm.data import prepare
from memlm.eval import evaluate
from memlm.train import Trainer, checkpoint, distributed
from memlm.train.config import TrainConfig
from tests.conftest import by_segments
from tests.cli.test_cli import corpus  # noqa: F401  (the fixture: a small corpus of word documents)

TINY = ["--layers", "2", "--width", "32", "--heads", "2", "--seq-len", "32", "--peer-shape", "seed-tiny",
        "--fractions", "0.8", "0.1", "0.1", "--steps", "4", "--batch-size", "4", "--eval-batches", "1",
        "--eval-every", "4", "--device", "cpu"]
CONTENDERS = ["--contenders", "seed-tiny", "seed-xl-tiny"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["race", *[str(a) for a in argv]])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_per_contender_runs_merge_into_one_table(corpus, tmp_path, capsys):
    common = [*CONTENDERS, *TINY, "--data", corpus, "--results", tmp_path / "results", "--json"]
    code, out, _ = run(capsys, *common, "--only", "seed-tiny", "--out", tmp_path / "runs-a")
    assert code == 0
    first = last_json(out)
    code, out, _ = run(capsys, *common, "--contender-index", "1", "--out", tmp_path / "runs-b")
    assert code == 0
    second = last_json(out)
    files = sorted((tmp_path / "results").glob("race-*.json"))
    assert [f.name.endswith(suffix) for f, suffix in zip(files, ["-seed-tiny.json", "-seed-xl-tiny.json"])] == [True] * 2

    code, out, _ = run(capsys, "merge", *files[::-1], "--results", tmp_path / "merged", "--json")
    assert code == 0
    merged = last_json(out)
    assert [row["contender"] for row in merged["rows"]] == ["seed-tiny", "seed-xl-tiny"]  # --contenders order
    assert merged["rows"] == first["rows"] + second["rows"] and merged["notes"] == []
    for row in merged["rows"]:
        assert row["error"] is None and row["steps"] == 4 and row["tokens"] == 4 * 4 * 32
        assert all(math.isfinite(row[k]) for k in ("test_bpb", "val_bpb", "train_loss", "tokens_per_s"))
        assert 0 < row["test_bpb"] < 9 and row["params"] > 0 and row["warmup_s"] == 0.0  # no compile on CPU
        assert Path(row["run_dir"], "metrics.jsonl").exists()
        assert row["first_log"]["step"] == 4 and 0 < row["first_log"]["elapsed_s"] < 60
        assert row["test_weights"] == "best" and row["test_step"] in (0, 4)  # the race's default: early stopping
    assert merged["rows"][0]["stateful"] is False and merged["rows"][1]["stateful"] is True
    (table,) = (tmp_path / "merged").glob("race-*.md")
    text = table.read_text()
    assert "| seed-tiny |" in text and "| seed-xl-tiny |" in text and "test bpb" in text
    assert f"{merged['rows'][1]['test_bpb']:.4f}" in text

    # the same race in one invocation: each contender trains exactly as it did alone
    code, out, _ = run(capsys, *common, "--out", tmp_path / "runs-c")
    assert code == 0
    whole = last_json(out)
    assert [row["test_bpb"] for row in whole["rows"]] == [row["test_bpb"] for row in merged["rows"]]


def test_contenders_race_side_by_side_in_processes_of_their_own(corpus, tmp_path, capsys):
    """--devices: each contender trains in a child process on a device of its own; the merged table
    has the rows in --contenders order, with the scores they get in one process (up to the float
    sums of a different thread count), each child's output in its log, and the parent's settings."""
    common = [*CONTENDERS, *TINY, "--data", corpus, "--json"]
    code, out, err = run(capsys, *common, "--devices", "cpu", "cpu", "--out", tmp_path / "side",
                         "--results", tmp_path / "side-results")
    assert code == 0, err
    side = last_json(out)
    code, out, _ = run(capsys, *common, "--out", tmp_path / "alone", "--results", tmp_path / "alone-results")
    alone = last_json(out)
    assert [row["contender"] for row in side["rows"]] == ["seed-tiny", "seed-xl-tiny"]
    for ours, theirs in zip(side["rows"], alone["rows"]):
        assert ours["error"] is None and ours["steps"] == theirs["steps"] == 4
        assert ours["test_bpb"] == pytest.approx(theirs["test_bpb"], rel=1e-4)
        assert ours["run_dir"] == str(tmp_path / "side" / ours["contender"])
        assert "test bpb" in (tmp_path / "side" / f"{ours['contender']}.log").read_text()
    assert side["config"]["devices"] == ["cpu", "cpu"] and side["config"]["only"] is None and not side["single"]
    assert len(list((tmp_path / "side-results").glob("race-*.json"))) == 1  # the merged table, as one race writes
    assert "on cpu: output in" in err

    code, _, err = run(capsys, *common, "--devices", "gpu0")
    assert code == 2 and "--devices takes cpu, cuda or cuda:N" in err

    if not torch.cuda.is_available():  # a child that dies before it writes a result is a failed row
        code, out, _ = run(capsys, *common, "--devices", "cpu", "cuda", "--out", tmp_path / "dies",
                           "--results", tmp_path / "dies-results")
        assert code == 1
        ok, dead = last_json(out)["rows"]
        assert ok["error"] is None and ok["test_bpb"] == pytest.approx(alone["rows"][0]["test_bpb"], rel=1e-4)
        assert dead["contender"] == "seed-xl-tiny" and dead.get("test_bpb") is None
        assert "left no result" in dead["error"] and str(tmp_path / "dies" / "seed-xl-tiny.log") in dead["error"]


def test_each_child_sees_only_its_own_gpu():
    """cuda:N becomes --device cuda with CUDA_VISIBLE_DEVICES naming the N-th GPU this process sees."""
    from memlm_bench.parallel import child_device

    assert child_device("cuda:3", {"PATH": "x"}) == ("cuda", {"PATH": "x", "CUDA_VISIBLE_DEVICES": "3"})
    assert child_device("cuda:1", {"CUDA_VISIBLE_DEVICES": "4, 6"})[1]["CUDA_VISIBLE_DEVICES"] == "6"
    assert child_device("cpu", {"CUDA_VISIBLE_DEVICES": "4"}) == ("cpu", {"CUDA_VISIBLE_DEVICES": "4"})
    assert child_device("cuda", {}) == ("cuda", {})
    with pytest.raises(ValueError, match="only 2 GPUs are visible"):
        child_device("cuda:2", {"CUDA_VISIBLE_DEVICES": "4,6"})


def test_children_are_not_given_the_parents_gpu_numbers():
    """A child sees one GPU: the parent's --devices (cuda:1 ...) would name GPUs it cannot see, so
    its options lose --devices and keep everything else."""
    from memlm_bench.parallel import child_argv

    argv = ["--contenders", "a", "b", "--devices", "cuda:0", "cuda:1", "--minutes", "10", "--devices=cuda:2", "-h"]
    assert child_argv(argv) == ["--contenders", "a", "b", "--minutes", "10", "-h"]
    assert child_argv(["--minutes", "1", "--devices", "cuda:0"]) == ["--minutes", "1"]


def test_merge_notes_settings_that_differ(tmp_path):
    row = {"contender": "seed-tiny", "kind": "memlm", "description": "", "error": None, "test_bpb": 1.0,
           "meta": {"device": "cpu", "torch": "2", "commit": None, "python": "3", "date": "2026-01-01T00:00:00+00:00"}}
    make = lambda minutes, name: {"kind": race.RESULT_KIND, "meta": {**row["meta"], "memlm": "0"},  # noqa: E731
                                  "config": {"contenders": ["seed-tiny", "x"], "minutes": minutes, "data": "stdlib",
                                             "fractions": [0.98, 0.01, 0.01]},
                                  "rows": [{**row, "contender": name}], "notes": []}
    merged = race_report.merge([make(2.0, "x"), make(3.0, "seed-tiny")])
    assert [r["contender"] for r in merged["rows"]] == ["seed-tiny", "x"]
    assert any("differ in minutes" in note for note in merged["notes"])
    with pytest.raises(ValueError, match="not a memlm race result"):
        race_report.merge([{"kind": "memlm bench"}])
    # a contender whose clock ran long before its first logged step is pointed out under the table
    merged["rows"][1]["first_log"] = {"step": 10, "elapsed_s": 57.5}
    merged["rows"][0]["first_log"] = {"step": 10, "elapsed_s": 0.4}
    notes = [line for line in race_report.race_markdown(merged).splitlines() if "before step" in line]
    assert notes == ["- x spent 58 s of its clock before step 10 (the first logged): compilation the warm-up did "
                     "not cover?"]


def test_bad_contender_names_are_usage_errors(corpus, capsys):
    code, _, err = run(capsys, "--contenders", "seed-tiny", "gpt-5", *TINY, "--data", corpus)
    assert code == 2 and "unknown contender gpt-5" in err
    code, _, err = run(capsys, *CONTENDERS, "--contender-index", "2", *TINY, "--data", corpus)
    assert code == 2 and "outside 0..1" in err
    code, _, err = run(capsys, *CONTENDERS, "--only", "gpt-5", *TINY, "--data", corpus)
    assert code == 2 and "unknown contender gpt-5" in err


def test_a_contender_carries_overrides_of_its_own(corpus, tmp_path, capsys):
    """PRESET:key=value[:key=value] races a variant of a preset beside it: its overrides apply after
    --overrides (and win over them), the row and its run directory are its own, and its saved
    model is the variant."""
    config = tiny_race_config(corpus, tmp_path / "runs", overrides=["dropout=0.1"])
    plain, variant, louder = race.plan(config, ["seed-xl-tiny", "seed-xl-tiny:memory.xl.length=64:attention.kv_heads=2",
                                                "seed-xl-tiny:dropout=0.3"])
    preset_memory = get_preset("seed-xl-tiny").memory.xl.length  # --seq-len leaves a preset's memory length as it is
    assert (plain.model_config.memory.xl.length, plain.model_config.kv_heads, plain.model_config.dropout) == \
        (preset_memory, 1, 0.1)
    assert (variant.model_config.memory.xl.length, variant.model_config.kv_heads, variant.model_config.dropout) == (64, 2, 0.1)
    assert variant.description.endswith("; dropout=0.1, memory.xl.length=64, attention.kv_heads=2")
    assert louder.model_config.dropout == 0.3 and louder.model_config.memory == plain.model_config.memory
    for names, message in [(["x-transformers:dropout=0.1"], "a peer takes no overrides"),
                           (["seed-xl-tiny:dropout"], "must read key=value"),
                           (["gpt-5:dropout=0.1"], "unknown contender gpt-5:dropout=0.1")]:
        with pytest.raises(ValueError, match=message):
            race.plan(config, names)

    code, out, _ = run(capsys, "--contenders", "seed-tiny", "seed-tiny:attention.kv_heads=2", *TINY, "--steps", "2",
                       "--eval-every", "2", "--data", corpus, "--out", tmp_path / "runs", "--results", tmp_path, "--json")
    assert code == 0
    rows = last_json(out)["rows"]
    assert [row["contender"] for row in rows] == ["seed-tiny", "seed-tiny:attention.kv_heads=2"]
    assert rows[0]["run_dir"] != rows[1]["run_dir"] and rows[1]["params"] > rows[0]["params"] > 0  # a second key/value head
    saved = json.loads(Path(rows[1]["run_dir"], "config.json").read_text())
    assert saved["model"]["attention"]["kv_heads"] == 2


def test_a_missing_peer_library_fails_its_row_with_the_install_command(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "x_transformers", None)  # import x_transformers now raises ImportError
    code, out, _ = run(capsys, "--contenders", "x-transformers-XL", *TINY, "--data", corpus, "--results",
                       tmp_path / "results", "--json")
    assert code == 1
    (row,) = last_json(out)["rows"]
    assert "pip install x-transformers" in row["error"] and row.get("test_bpb") is None


def test_race_modules_import_without_x_transformers():
    code = ("import sys; sys.modules['x_transformers'] = None; import memlm_bench.race, memlm_bench.adapters, "
            "memlm.cli; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def tiny_race_config(corpus: Path, out: Path, **changes) -> race.RaceConfig:
    """A RaceConfig of tiny CPU contenders; `changes` may name race and training options alike."""
    base = dict(contenders=["seed-xl-tiny"], layers=2, width=32, heads=2, seq_len=32, peer_shape="seed-tiny")
    training = dict(data=str(corpus), fractions=(0.8, 0.1, 0.1), steps=5, batch_size=4, eval_batches=1, device="cpu",
                    out=str(out))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    training.update({k: v for k, v in changes.items() if k in names})
    base.update({k: v for k, v in changes.items() if k not in names})
    return race.RaceConfig(**base, train=dataclasses.replace(race.race_training(), **training))


def race_trainer(config: race.RaceConfig, name: str, out: Path) -> Trainer:
    (contender,) = race.plan(config, [name])
    return race.make_trainer(contender, race.train_config(config, out), distributed.setup("cpu"))


def losses(trainer: Trainer, steps: int) -> list[float]:
    return [trainer.train_step()[0].item() for _ in range(steps)]


def test_compile_warm_up_leaves_the_run_unchanged(corpus, tmp_path):
    config = tiny_race_config(corpus, tmp_path / "runs")
    plain = race_trainer(config, "seed-xl-tiny", tmp_path / "plain")
    warmed = race_trainer(config, "seed-xl-tiny", tmp_path / "warmed")
    assert warmed.warm_up(4) == 0.0  # not compiled: nothing to warm up
    warmed.config = dataclasses.replace(warmed.config, compile=True)  # run the passes (uncompiled model)
    evaluated = []
    evaluate = warmed.evaluate
    warmed.evaluate = lambda split, tokens: evaluated.append((split, tokens)) or evaluate(split, tokens)
    assert warmed.warm_up(4) > 0
    assert evaluated == [("validation", 1 * 4 * 32)]  # the evaluation the clock starts with, compiled before it
    assert all(p.grad is None for p in warmed.model.parameters())
    assert losses(warmed, 4) == losses(plain, 4)


def test_warm_up_covers_the_passes_memories_take_to_fill(corpus, tmp_path):
    from memlm.train.warmup import memory_warmup
    trainer = race_trainer(tiny_race_config(corpus, tmp_path / "runs"), "seed-compressive-tiny", tmp_path / "run")
    trainer.config = dataclasses.replace(trainer.config, compile=True)  # run the passes (uncompiled model)
    calls = []
    model = trainer.train_model
    trainer.train_model = lambda *args, **kwargs: calls.append(1) or model(*args, **kwargs)
    trainer.warm_up(1)
    assert len(calls) == memory_warmup(trainer.model_config) > 4  # the filling compressed memory too


def test_trainer_measures_no_peak_on_cpu(corpus, tmp_path):
    trainer = race_trainer(tiny_race_config(corpus, tmp_path / "runs"), "seed-xl-tiny", tmp_path / "run")
    assert trainer.peak_flops is None and trainer.peak_source is None


# ----- the x-transformers adapter ---------------------------------------------------------

def xl_model(memory: int = 16, seq_len: int = 16) -> XTransformersLM:
    pytest.importorskip("x_transformers")
    torch.manual_seed(0)
    config = PeerConfig(layers=2, width=64, heads=2, seq_len=seq_len, memory=PeerMemory(length=memory))
    return XTransformersLM(config).eval()


def test_xl_adapter_carries_memory_and_reset_forgets_a_row():
    model = xl_model()
    ids = torch.randint(0, 257, (3, 32))
    first = model(ids[:, :16], targets=ids[:, :16], state=model.init_state(3))
    assert first.state.position == 16 and len(first.state.mems) == 2 and first.aux_loss.item() == 0
    assert not any(m.requires_grad for m in first.state.mems)
    carried = model(ids[:, 16:], targets=ids[:, 16:], state=first.state)
    fresh = model(ids[:, 16:], targets=ids[:, 16:], state=model.init_state(3))
    assert not torch.allclose(carried.loss, fresh.loss)

    reset = model(ids[:, 16:], state=first.state.reset(torch.tensor([True, False, False])))
    torch.testing.assert_close(reset.logits[0], fresh.logits[0], atol=1e-5, rtol=1e-5)  # row 0 forgot
    torch.testing.assert_close(reset.logits[1:], carried.logits[1:], atol=1e-5, rtol=1e-5)  # the others did not
    assert reset.state.mem_mask is None  # a whole segment later the memory is all new again


def test_xl_adapter_token_by_token_equals_one_pass():
    model = xl_model(memory=16, seq_len=16)
    ids = torch.randint(0, 257, (2, 12))
    logits, state = by_segments(model, ids, 1)
    torch.testing.assert_close(logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    reloaded = model.load_state(state.to("cpu").state_dict(), "cpu")
    assert isinstance(reloaded, PeerState) and reloaded.position == 12
    torch.testing.assert_close(model(ids[:, :3], state=reloaded).logits, model(ids[:, :3], state=state).logits)


def test_adapter_without_memory_caches_a_window_for_generation():
    model = xl_model(memory=0, seq_len=16)
    ids = torch.randint(0, 257, (2, 10))
    logits, _ = by_segments(model, ids, 1)
    torch.testing.assert_close(logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    long = model(torch.randint(0, 257, (2, 40)), state=model.init_state(2))
    assert long.logits.shape == (2, 40, 257) and long.state.tokens.shape == (2, 16)


@pytest.mark.parametrize("name", ["x-transformers-XL", "x-transformers"])
def test_trainer_trains_and_scores_a_peer(corpus, tmp_path, name):
    pytest.importorskip("x_transformers")
    config = tiny_race_config(corpus, tmp_path / "runs", layers=2, width=64, heads=2, seq_len=32, steps=25,
                              lr=3e-3, warmup_steps=2, eval_every=25, sample_bytes=8)
    trainer = race_trainer(config, name, tmp_path / "run")
    assert trainer.stateful == name.endswith("XL") and isinstance(trainer.model, XTransformersLM)
    summary = trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["bpb"] for r in records if r["kind"] == "eval"]
    assert evals[-1] < evals[0] - 1.0 and math.isfinite(summary["test_bpb"]) and summary["test_bpb"] < evals[0] - 1.0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["library"] == "x-transformers"

    saved = checkpoint.find(tmp_path / "run")  # the checkpoint's weights load into a fresh adapter
    fresh = XTransformersLM(trainer.model_config)
    checkpoint.load_weights(fresh, saved)
    corpus_split = prepare(str(corpus), None, (0.8, 0.1, 0.1), progress=False).split("test")
    score = evaluate(fresh, corpus_split, 4, 32, stateful=trainer.stateful)
    assert score["bpb"] == pytest.approx(summary["test_bpb"], rel=1e-5)


def test_train_config_is_shared_by_every_contender(corpus, tmp_path):
    config = tiny_race_config(corpus, tmp_path / "runs", lr=1e-3, seed=3)
    shared = race.train_config(config, tmp_path / "x")
    assert isinstance(shared, TrainConfig) and shared.out == str(tmp_path / "x") and not shared.resume
    assert (shared.lr, shared.seed, shared.sample_bytes, shared.steps) == (1e-3, 3, 0, 5)


def test_peer_train_reset_reaches_the_memory_peer_only(corpus, tmp_path):
    """--peer-train-reset p sets the XL peer's memory.train_reset, which the Trainer reads as it reads
    memlm's; the peer without memory has no memory to forget and keeps 0 out of its description."""
    config = tiny_race_config(corpus, tmp_path / "runs", peer_train_reset=0.3)
    xl, plain = race.plan(config, ["x-transformers-XL", "x-transformers"])
    assert xl.model_config.memory.train_reset == 0.3 and xl.description.endswith("train_reset=0.3")
    assert "train_reset" not in plain.description
    assert race.plan(tiny_race_config(corpus, tmp_path / "runs"), ["x-transformers-XL"])[0] \
        .model_config.memory.train_reset == 0.0
    with pytest.raises(ValueError, match="train_reset"):
        race.plan(tiny_race_config(corpus, tmp_path / "runs", peer_train_reset=1.0), ["x-transformers-XL"])


def test_peer_dropout_regularises_the_peers_alike(corpus, tmp_path):
    """--peer-dropout p builds x-transformers with emb_dropout, ff_dropout and attn_dropout p: two
    training passes differ, evaluation passes do not; 0 (the default) leaves it without dropout."""
    pytest.importorskip("x_transformers")
    config = tiny_race_config(corpus, tmp_path / "runs", peer_dropout=0.2)
    (contender,) = race.plan(config, ["x-transformers-XL"])
    assert contender.model_config.dropout == 0.2 and contender.description.endswith("dropout=0.2")
    torch.manual_seed(0)
    model = XTransformersLM(contender.model_config)
    rates = sorted({m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)})
    assert rates == [0.2]
    ids = torch.randint(0, 257, (2, 16))
    assert not torch.equal(model(ids).logits, model(ids).logits)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)
    (plain,) = race.plan(tiny_race_config(corpus, tmp_path / "runs"), ["x-transformers-XL"])
    assert plain.model_config.dropout == 0.0
    assert all(m.p == 0 for m in XTransformersLM(plain.model_config).modules() if isinstance(m, torch.nn.Dropout))
    with pytest.raises(ValueError, match="peer dropout"):
        race.plan(tiny_race_config(corpus, tmp_path / "runs", peer_dropout=1.5), ["x-transformers"])


def test_the_default_corpus_is_chosen_by_device():
    """--data auto (the default): the standard library on a CPU, the installed Python sources on a GPU."""
    for device, expected in [("cpu", "stdlib"), ("cuda", "site-packages")]:
        config = race.RaceConfig()
        assert config.train.data == "auto"
        race.resolve_data(config, torch.device(device))
        assert config.train.data == expected
    given = race.RaceConfig(train=dataclasses.replace(race.race_training(), data="enwik8.zip"))
    race.resolve_data(given, torch.device("cuda"))
    assert given.train.data == "enwik8.zip"

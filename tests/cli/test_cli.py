"""The `memlm` command end to end on a tiny model and a tmp_path corpus."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import memlm
from memlm import cli
from memlm.cli import train as train_command
from memlm.config import get_preset
from memlm.data import ByteTokenizer

TINY = ["--preset", "seed-tiny", "--device", "cpu", "--model.layers", "2", "--model.width", "32",
        "--model.seq_len", "32", "--model.attention.heads", "2", "--sample_bytes", "8"]


@pytest.fixture
def corpus(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    rng, root = random.Random(0), tmp_path / "corpus"
    root.mkdir()
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    for i in range(40):
        (root / f"doc{i}.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(25)))
    return root


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(out: str):
    return json.loads(out.strip().splitlines()[-1])


def test_train_eval_generate(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "train", *TINY, "--model.attention.kv_heads", "2", "--data", corpus,
                          "--fractions", "0.8", "0.1", "0.1", "--out", out, "--steps", "6", "--batch_size", "4",
                          "--eval_every", "3", "--json")
    assert code == 0
    summary = last_json(stdout)
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 4 * 32 and summary["run_dir"] == str(out)
    assert f"run directory: {out}" in stdout
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["layers"] == 2 and saved["model"]["attention"]["kv_heads"] == 2
    assert saved["model"]["attention"]["qk_norm"] is True  # untouched fields keep the preset's values

    code, stdout, _ = run(capsys, "eval", out, "--json")
    result = last_json(stdout)
    assert code == 0 and result["split"] == "test"
    assert result["bpb"] == pytest.approx(summary["test_bpb"], rel=1e-9)  # the trainer's own test evaluation
    assert result["tokens"] == summary["test_tokens"]
    code, stdout, _ = run(capsys, "eval", out / "checkpoints" / "latest", "--split", "validation",
                          "--max-tokens", "256", "--json")
    assert code == 0 and last_json(stdout)["tokens"] == 256  # 2 segments of 4 streams x 32 tokens

    args = ["generate", out, "--prompt", "alpha ", "--max-new-tokens", "20", "--seed", "3", "--json"]
    code, stdout, _ = run(capsys, *args)
    generated = last_json(stdout)
    assert code == 0 and generated["new_tokens"] == len(generated["ids"]) == 20
    assert generated["completion"] == ByteTokenizer().decode(generated["ids"])
    assert stdout.startswith("alpha " + generated["completion"])
    assert last_json(run(capsys, *args)[1]) == generated  # the same seed, the same text

    # --stream prints the same text piece by piece; --prompts-file loads the model once for several
    code, streamed, _ = run(capsys, *args[:-1], "--stream")
    assert code == 0 and streamed == "alpha " + generated["completion"] + "\n"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "alpha "}) + "\n" + json.dumps({"prompt": "beta"}) + "\n")
    code, stdout, _ = run(capsys, *args[:2], "--prompts-file", prompts, *args[4:])
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert code == 0 and [line["prompt"] for line in lines] == ["alpha ", "beta"] and lines[0] == generated
    stop = generated["completion"][5:7]
    code, stdout, _ = run(capsys, *args, "--stop", stop)
    assert last_json(stdout)["completion"] == generated["completion"][:generated["completion"].index(stop)]
    assert run(capsys, *args[:2], "--prompts-file", tmp_path / "none.txt")[0] == 2


def test_train_without_out_makes_a_timestamped_run_directory(corpus, tmp_path, capsys):
    code, stdout, _ = run(capsys, "train", *TINY, "--data", corpus, "--fractions", "0.8", "0.1", "0.1",
                          "--steps", "1", "--batch_size", "2", "--json")
    run_dir = Path(last_json(stdout)["run_dir"])
    assert code == 0 and run_dir.parent == Path("runs") and run_dir.name.startswith("seed-tiny-")
    assert (tmp_path / run_dir / "checkpoints" / "latest" / "model.safetensors").is_file()


def test_train_defaults_are_the_main_job(monkeypatch, capsys):
    calls = {}

    def fake_train(model_config, config, preset):
        calls.update(model=model_config, config=config, preset=preset)
        return {"run_dir": "runs/x", "steps": 1, "tokens": 1, "elapsed_s": 0.0, "test_bpb": 1.0, "test_tokens": 1,
                "sample": "", "test_weights": config.test_weights, "test_step": 1}

    monkeypatch.setattr(train_command, "train", fake_train)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the main job on a machine without a GPU
    code, stdout, _ = run(capsys, "train", "--test_weights", "best")
    assert code == 0 and "test bpb 1.0000 (1 tokens with the best validation's weights (step 1))" in stdout
    code, stdout, _ = run(capsys, "train")
    assert code == 0 and "test bpb 1.0000 (1 tokens) after 1 steps" in stdout
    assert calls["preset"] == "seed-tiny" and calls["model"] == get_preset("seed-tiny")
    config = calls["config"].resolve("cpu")
    assert (config.data, config.minutes, config.steps, config.batch_size, config.lr) == ("stdlib", 3.0, None, 8, 2e-3)
    cuda = calls["config"].resolve("cuda")
    assert (cuda.minutes, cuda.batch_size, cuda.lr) == (1.5, 32, 1e-3)
    assert cli.default_preset("cuda") == "seed-small"
    assert cli.default_preset("cpu") == "seed-tiny"


def test_presets_lists_names_and_parameter_counts(capsys):
    code, stdout, _ = run(capsys, "presets", "--json")
    rows = last_json(stdout)
    assert code == 0 and [r["name"] for r in rows] == memlm.presets()
    tiny = next(r for r in rows if r["name"] == "seed-tiny")
    assert tiny["parameters"] == memlm.build("seed-tiny").num_parameters()
    assert tiny["description"].startswith(memlm.config.describe("seed-tiny"))


@pytest.mark.parametrize("argv,message", [
    (["eval", "no-such-run"], "no such run directory"),
    (["generate", "no-such-run", "--prompt", "x"], "no such run directory"),
    (["eval", "no-such-run", "--task", "recall"], "no such run directory"),
    (["memorize", "no-such-run", "--out", "mem"], "no such run directory"),
    (["train", "--model.width", "33", "--steps", "1"], "attention.heads"),
    (["train", "--data", "no-such-corpus", "--steps", "1", "--device", "cpu"], "data source not found"),
    (["train", "--steps", "1", "--minutes", "1"], "only one of steps, tokens, minutes"),
    (["train", "--schedule", "linear", "--steps", "1"], "schedule"),
])
def test_user_errors_print_one_line_and_exit_2(corpus, capsys, argv, message):
    code, _, stderr = run(capsys, *argv)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and message in stderr and "Traceback" not in stderr

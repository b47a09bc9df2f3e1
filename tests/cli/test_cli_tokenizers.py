"""`memlm train --tokenizer bpe:300` end to end: train, then eval (also on --data hf:...), generate and
export load the run's tokenizer."""

from __future__ import annotations

import json

import pytest
from test_cli import TINY, corpus, last_json, run  # noqa: F401 (corpus is a fixture)

from memlm.train import load_tokenizer

pytest.importorskip("tokenizers", reason="the tok extra (tokenizers) is not installed")


def test_train_bpe_then_eval_generate_export(corpus, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "train", *TINY, "--data", corpus, "--fractions", "0.8", "0.1", "0.1",
                          "--tokenizer", "bpe:300", "--out", out, "--steps", "4", "--batch_size", "4", "--json")
    assert code == 0
    saved = json.loads((out / "config.json").read_text())
    tokenizer = load_tokenizer(out)
    assert tokenizer.kind == "bpe" and saved["model"]["vocab_size"] == tokenizer.vocab_size <= 300
    test_info = saved["data"]["splits"]["test"]

    code, stdout, _ = run(capsys, "eval", out, "--json")
    result = last_json(stdout)
    assert code == 0 and result["bpb"] == pytest.approx(last_json_of_train(out)["bpb"])
    assert result["bytes"] == test_info["bytes"] + test_info["documents"] and result["tokens"] == test_info["tokens"]
    assert result["tokens"] < result["bytes"]

    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"text": f"alpha beta gamma {i}\n" * 5}) + "\n" for i in range(12)))
    code, stdout, _ = run(capsys, "eval", out, "--data", f"hf:{held_out}", "--split", "train", "--json")
    other = last_json(stdout)
    assert code == 0 and other["data"] == f"hf:{held_out}" and other["bytes"] > other["tokens"] > 0

    code, stdout, _ = run(capsys, "generate", out, "--prompt", "alpha ", "--max-new-tokens", "12", "--seed", "1",
                          "--no-stop-at-eod", "--json")
    generated = last_json(stdout)
    assert code == 0 and len(generated["ids"]) == 12 and max(generated["ids"]) < tokenizer.vocab_size
    assert generated["completion"] == tokenizer.decode(generated["ids"])  # the run's tokenizer decoded them

    code, _, _ = run(capsys, "export", out, "--hf", tmp_path / "hf")
    assert code == 0 and (tmp_path / "hf" / "tokenizer.json").read_text() == tokenizer.json
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == tokenizer.vocab_size and config["eos_token_id"] == tokenizer.eod


def last_json_of_train(out):
    """The test record of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "test"][-1]

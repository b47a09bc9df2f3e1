"""The Hugging Face bridge: `memlm export RUN --hf OUT`, AutoModelForCausalLM with trust_remote_code
(logits, greedy and sampled generation equal memlm's, memory carried in a MemlmCache past seq_len),
the byte tokenizer, the model card, `memlm.from_pretrained` and CLI errors. Offline: the remote
code is copied into a tmp HF_MODULES_CACHE, nothing is downloaded."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import memlm  # noqa: E402
from memlm import cli  # noqa: E402
from memlm.data import EOD  # noqa: E402
from memlm.hf import ExportError  # noqa: E402
from memlm.train import checkpoint  # noqa: E402

SHAPE = {"layers": 2, "width": 32, "seq_len": 16, "attention.heads": 2}
PRESETS = {"seed-tiny": {}, "seed-xl-tiny": {"memory.xl.length": 16}, "seed-mem-tiny": {}}
"""Each preset shrunk to SHAPE; seed-xl-tiny's memory holds one segment, so a stream of 50 drops its oldest;
seed-mem-tiny: feedback, adaptive span (spans moved off their init), compressive and persistent memory."""
TEST_BPB = 2.345


def call(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def save_run(path: Path, preset: str) -> tuple[Path, torch.nn.Module]:
    """A run directory as the trainer writes it (checkpoint.save under checkpoints/, config.json, a
    test record in metrics.jsonl) holding an untrained model: 0 steps."""
    torch.manual_seed(0)
    model = memlm.build(preset, **SHAPE, **PRESETS[preset]).eval()
    if model.spans() is not None:  # learned spans, as training leaves them: the key limit follows them
        with torch.no_grad():
            for block in model.blocks:
                block.attention.span.span.copy_(torch.tensor([3.0, 9.0]))
        model.after_optimizer_step()
    config = {"preset": preset, "command": f"memlm train --preset {preset} --steps 0", "model": model.config.to_dict(),
              "train": {"steps": 0, "batch_size": 2, "lr": 1e-3, "precision": "fp32", "seed": 0},
              "data": {"spec": "stdlib", "fractions": [0.98, 0.01, 0.01],
                       "splits": {"test": {"documents": 3, "tokens": 1234}}}}
    checkpoint.save(path / checkpoint.CHECKPOINTS, 0, model, {"step": 0}, config)
    (path / checkpoint.CONFIG).write_text(json.dumps(config))
    (path / "metrics.jsonl").write_text(json.dumps({"kind": "test", "step": 0, "bpb": TEST_BPB, "weights_step": 0})
                                        + "\n")
    return path, model


@pytest.fixture(scope="module")
def hf_env(tmp_path_factory):
    """HF_HOME and HF_MODULES_CACHE in a tmp directory, offline (transformers read the module cache's
    path when imported, so its copies are patched too); sys.path restored afterwards."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"HF_HOME": home, "HF_MODULES_CACHE": home / "modules", "HF_HUB_OFFLINE": "1",
                            "TRANSFORMERS_OFFLINE": "1"}.items():
            mp.setenv(name, str(value))
        from transformers import dynamic_module_utils
        from transformers.utils import hub
        mp.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(home / "modules"))
        mp.setattr(hub, "HF_MODULES_CACHE", str(home / "modules"))
        mp.setattr(sys, "path", list(sys.path))
        yield home


@pytest.fixture(scope="module")
def exported(hf_env, tmp_path_factory):
    """preset -> (export directory, the memlm model, the transformers model)."""
    from transformers import AutoModelForCausalLM
    root, models = tmp_path_factory.mktemp("export"), {}
    for preset in PRESETS:
        run, model = save_run(root / f"run-{preset}", preset)
        out = root / f"hf-{preset}"
        code, stdout, stderr = call("export", run, "--hf", out)
        assert code == 0, stderr
        assert str(out) in stdout
        models[preset] = out, model, AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    return models


def test_the_directory_holds_what_transformers_loads(exported):
    out, model, hf = exported["seed-xl-tiny"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_memlm.py", "modeling_memlm.py", "tokenization_memlm.py",
            "tokenizer_config.json", "generation_config.json", "README.md"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "memlm" and config["memlm"] == model.config.to_dict()
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == EOD
    assert type(hf).__name__ == "MemlmForCausalLM" and isinstance(hf, transformers.GenerationMixin)
    assert hf.model.head.weight is hf.model.embed.weight  # tied, stored once
    with __import__("safetensors").safe_open(out / "model.safetensors", "pt") as f:
        assert "model.embed.weight" in f.keys() and "model.head.weight" not in f.keys()


@pytest.mark.parametrize("preset", PRESETS)
def test_logits_equal_memlm_forward(exported, preset):
    _, model, hf = exported[preset]
    if model.spans() is not None:  # the windows follow the loaded (clamped) spans
        assert [b.attention.span.limit for b in hf.model.blocks] == [b.attention.span.limit for b in model.blocks]
        assert hf.model.spans() == model.spans() == [[3.0, 9.0]] * 2 and model.blocks[0].attention.span.limit == 41
    ids = torch.randint(0, 257, (2, 40))  # longer than seq_len 16
    with torch.no_grad():
        expected, got = model(ids).logits, hf(ids).logits
        assert torch.allclose(got, expected, atol=1e-5, rtol=0)
        # with a cache: the stateful forward, piece by piece, as memlm reads a stream
        state, cache, pieces = model.init_state(2), None, []
        for piece in ids.split(12, dim=1):
            out = hf(piece, cache=cache, use_cache=True)
            cache, state = out.cache, model(piece, state=state).state
            pieces.append(out.logits)
        assert cache.get_seq_length() == 40 and cache.state.position == state.position
        assert torch.allclose(torch.cat(pieces, 1), memlm_pieces(model, ids, 12), atol=1e-5, rtol=0)


def memlm_pieces(model, ids, size):
    state, pieces = model.init_state(ids.shape[0]), []
    for piece in ids.split(size, dim=1):
        out = model(piece, state=state)
        state = out.state
        pieces.append(out.logits)
    return torch.cat(pieces, 1)


@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_generate_equals_memlm_generate(exported, preset):
    """Prompt 20 and 30 new tokens, past seq_len 16: seed-xl-tiny's memory (one segment) rolls at every
    segment boundary and drops the oldest segments. The logits of every step equal memlm's reading
    the same stream (prompt, then one token at a time) with its State."""
    _, model, hf = exported[preset]
    prompt = torch.randint(0, 256, (2, 20))
    expected = memlm.generate(model, prompt, max_new_tokens=30, temperature=0)
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False,
                      eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    assert out.sequences.shape == (2, 50) and torch.equal(out.sequences, expected)  # memlm does not stop at EOD
    assert type(out.cache).__name__ == "MemlmCache"
    assert out.cache.get_seq_length() == 49  # the prompt and every new token but the last were read
    with torch.no_grad():
        streamed = torch.cat([memlm_pieces(model, expected[:, :20], 20)[:, -1:]] + [
            memlm_step_logits(model, expected)], 1)  # (2, 30, V): the logits each new token was chosen from
        assert torch.allclose(torch.stack(out.logits, 1), streamed, atol=1e-5, rtol=0)
        if preset == "seed-xl-tiny":  # the memory matters: one stateless pass over the stream differs
            assert not torch.allclose(model(expected[:, :-1]).logits[:, 19:], streamed, atol=1e-3)


def memlm_step_logits(model, ids):
    """Logits (B, N - 21, V) after each of ids[:, 20:-1], fed one at a time after the prompt ids[:, :20]."""
    out = model(ids[:, :20], state=model.init_state(ids.shape[0]))
    state, pieces = out.state, []
    for t in range(20, ids.shape[1] - 1):
        out = model(ids[:, t:t + 1], state=state)
        state = out.state
        pieces.append(out.logits)
    return torch.cat(pieces, 1)


def test_sampling_equals_memlm_with_the_same_seed(exported):
    """transformers samples as memlm does (logits / temperature, top-k mask, softmax, torch.multinomial on
    the global generator), so the same seed gives the same tokens; top_p is not compared (the two
    nucleus implementations sort and accumulate differently and may round the boundary differently)."""
    _, model, hf = exported["seed-xl-tiny"]
    prompt = torch.randint(0, 256, (2, 20))
    for options in ({"temperature": 0.8}, {"temperature": 1.0, "top_k": 20}):
        torch.manual_seed(5)
        expected = memlm.generate(model, prompt, max_new_tokens=30, **options)
        torch.manual_seed(5)
        got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=True,
                          eos_token_id=None, **options)
        assert torch.equal(got, expected), options
    torch.manual_seed(5)  # the exported generation config samples by default, stopping at EOD (then padding)
    got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30)
    torch.manual_seed(5)
    expected = memlm.generate(model, prompt, max_new_tokens=30)
    for row, want in zip(got.tolist(), expected.tolist()):
        end = want.index(EOD, 20) + 1 if EOD in want[20:] else len(want)
        assert row[:end] == want[:end] and set(row[end:]) <= {EOD}


def test_labels_give_the_shifted_next_token_loss(exported):
    _, model, hf = exported["seed-tiny"]
    ids = torch.randint(0, 257, (2, 24))
    with torch.no_grad():
        expected = model(ids[:, :-1], targets=ids[:, 1:]).loss
        assert torch.allclose(hf(ids, labels=ids).loss, expected, atol=1e-6)
    with pytest.raises(ValueError, match="padding"):
        hf(ids, attention_mask=torch.ones_like(ids).index_fill(1, torch.tensor([0]), 0))


def test_tokenizer_encodes_bytes_after_eod(exported):
    from transformers import AutoTokenizer
    out, _, _ = exported["seed-tiny"]
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    ids = tokenizer("héllo").input_ids
    assert ids == [EOD, *"héllo".encode("utf-8")] and tokenizer.eos_token_id == EOD
    assert tokenizer.decode(ids) == "<|eod|>héllo" and tokenizer.decode(ids, skip_special_tokens=True) == "héllo"


def test_memlm_from_pretrained_round_trip(exported):
    for preset in PRESETS:
        out, model, _ = exported[preset]
        loaded = memlm.from_pretrained(out)
        assert loaded.spans() == model.spans()
        assert loaded.config == model.config and not loaded.training
        assert loaded.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
        assert loaded.head.weight is loaded.embed.weight
        ids = torch.randint(0, 257, (1, 30))
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_model_card_names_the_run(exported):
    out, model, _ = exported["seed-xl-tiny"]
    card = (out / "README.md").read_text()
    assert "# memlm seed-xl-tiny" in card and "| preset | seed-xl-tiny |" in card
    assert f"{TEST_BPB:.4f}" in card and "`stdlib`" in card and "memory.xl.length = 16" in card
    assert f"| parameters | {model.num_parameters():,} |" in card and "trust_remote_code=True" in card
    assert "- command: `memlm train --preset seed-xl-tiny --steps 0`" in card


def test_cli_errors_exit_2(tmp_path, exported):
    code, _, err = call("export", tmp_path / "missing", "--hf", tmp_path / "out")
    assert code == 2 and "no such run directory" in err and not (tmp_path / "out").exists()
    run, _ = save_run(tmp_path / "run", "seed-tiny")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    code, _, err = call("export", run, "--hf", tmp_path / "busy")
    assert code == 2 and "not empty" in err and (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    code, _, err = call("export", run)
    assert code == 2 and "--hf" in err
    for _ in range(2):  # an earlier export is replaced
        code, _, _ = call("export", run, "--hf", tmp_path / "again")
        assert code == 0
    with pytest.raises(ExportError, match="no exported memlm model"):
        memlm.from_pretrained(tmp_path / "busy")

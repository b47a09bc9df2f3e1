"""The model card (README.md) of an export: what the run directory records of the model.

From the checkpoint's config.json: the preset, the model config (shape, memory switches that
differ from the defaults), the data spec and split sizes, the training settings; from the run's
metrics.jsonl: the test bpb and the step whose weights it scored; the command that started the
run (runs before it was recorded: the card says so and lists the saved settings)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memlm.config import ModelConfig, describe
from memlm.config.memory import MemoryConfig
from memlm.config.io import to_dict
from memlm.data.tokenizer import EOD, EOD_TEXT

TRAIN_KEYS = ("steps", "tokens", "minutes", "batch_size", "grad_accum", "lr", "schedule", "warmup_steps",
              "weight_decay", "precision", "seed")
"""The training settings the card lists (when the run's saved config has them)."""


@dataclass
class RunRecord:
    """What a run directory says about the checkpoint being exported (all optional)."""

    run: str | None = None
    checkpoint: str | None = None
    preset: str | None = None
    step: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] | None = None
    """The run's last `test` metrics record (bpb, weights_step, ...), if it ran its test."""
    command: str | None = None
    """The command line that started the run (runs before it was recorded have none)."""

    @classmethod
    def read(cls, run: str | Path, found: Path, saved: dict[str, Any],
             read_metrics: Callable[[Path], list[dict[str, Any]]]) -> "RunRecord":
        """From a run path, the checkpoint directory found in it and that checkpoint's config.json."""
        run_dir = found.parent.parent if found.parent.name == "checkpoints" else Path(run)
        step = int(found.name.split("-", 1)[1]) if found.name.startswith("step-") else None
        tests = [r for r in read_metrics(run_dir) if r.get("kind") == "test"]
        return cls(run=str(run_dir), checkpoint=found.name, preset=saved.get("preset"), step=step,
                   data=saved.get("data") or {}, train=saved.get("train") or {}, test=tests[-1] if tests else None,
                   command=saved.get("command"))


def memory_switches(config: ModelConfig) -> list[str]:
    """The memory settings that differ from MemoryConfig's defaults, as dotted `key = value`."""
    return _differences(to_dict(config.memory), to_dict(MemoryConfig()), "memory.")


def _differences(a: dict, b: dict, prefix: str) -> list[str]:
    out = []
    for key, value in a.items():
        if isinstance(value, dict) and isinstance(b.get(key), dict):
            out += _differences(value, b[key], f"{prefix}{key}.")
        elif value != b.get(key):
            out.append(f"{prefix}{key} = {json.dumps(value)}")
    return out


def model_card(model, record: RunRecord, tokenizer=None) -> str:
    """README.md text for an exported `model` (a LanguageModel), what its run recorded and its
    tokenizer (None = bytes)."""
    byte_level = tokenizer is None or tokenizer.kind == "byte"
    c: ModelConfig = model.config
    name = record.preset or "custom"
    lines = ["---", "library_name: transformers", "tags: [memlm, byte-level, custom_code]", "---", "",
             f"# memlm {name}", ""]
    if record.preset:
        lines += [f"Preset `{record.preset}`: {_describe(record.preset)}.", ""]
    lines += [
        "| field | value |", "|---|---|",
        f"| preset | {record.preset or 'none (a custom config)'} |",
        f"| parameters | {model.num_parameters():,} |",
        f"| shape | {c.layers} layers x {c.width} wide, {c.attention.heads} heads ({c.kv_heads} key/value), "
        f"segment (seq_len) {c.seq_len} |",
        f"| positions, norm, feed-forward | {c.position.kind}, {c.norm.kind} ({c.norm.placement}), "
        f"{c.feedforward.kind} |",
        f"| memory | {'; '.join(memory_switches(c)) or 'none (a key/value cache while generating)'} |",
        f"| carries a state between segments | {'yes' if c.stateful else 'no'} |",
        f"| tokenizer | bytes of UTF-8 (ids 0-255) and end of document {EOD} (`{EOD_TEXT}`), "
        f"vocabulary {c.vocab_size} |" if byte_level else
        f"| tokenizer | `{tokenizer.spec}` (tokenizer.json), end of document {tokenizer.eod} "
        f"(`{tokenizer.eod_name}`), vocabulary {c.vocab_size} |",
    ]
    if record.run:
        lines.append(f"| exported from | `{record.run}`, checkpoint `{record.checkpoint}` |")
    if record.step is not None:
        lines.append(f"| training step of these weights | {record.step:,} |")
    lines += ["", "## Training", ""]
    if record.data:
        spec = record.data.get("spec")
        lines.append(f"- data: `{spec}`" + (f", split fractions {record.data['fractions']}"
                                             if record.data.get("fractions") else ""))
        for split, info in (record.data.get("splits") or {}).items():
            if isinstance(info, dict) and "tokens" in info:
                lines.append(f"  - {split}: {info.get('documents', '?'):,} documents, {info['tokens']:,} tokens")
    if record.test:
        bpb, weights_step = record.test.get("bpb"), record.test.get("weights_step", record.test.get("step"))
        same = weights_step is None or record.step is None or weights_step == record.step
        lines.append(f"- test bpb: **{bpb:.4f}**" + (f" (the weights of step {weights_step:,}" + (")" if same else
                     f"; this export holds step {record.step:,})") if weights_step is not None else ""))
    else:
        lines.append("- test bpb: not recorded (the run has no test record in metrics.jsonl)")
    settings = [f"{key} {json.dumps(record.train[key])}" for key in TRAIN_KEYS if record.train.get(key) is not None]
    if settings:
        lines.append(f"- training settings: {', '.join(settings)}")
    lines += [f"- command: `{record.command}`" if record.command else
              "- command: not recorded (the run predates it); the whole model config is in config.json under `memlm`",
              ""]
    lines += [
        "## Use", "",
        "The model code is remote code that imports memlm: install memlm (`pip install -e .` in its checkout) "
        "and transformers v5 where it runs.", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)",
        "tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)  # bytes; prepends <|eod|>"
        if byte_level else "tokenizer = AutoTokenizer.from_pretrained(PATH)  # tokenizer.json",
        "ids = tokenizer(\"def main(\", return_tensors=\"pt\").input_ids" if byte_level else
        f"ids = torch.tensor([[{tokenizer.eod}] + tokenizer(\"def main(\").input_ids])  # a prompt starts a document",
        "out = model.generate(ids, max_new_tokens=64, do_sample=False)",
        "print(tokenizer.decode(out[0, ids.shape[1]:]))",
        "```", "",
        ("Without the tokenizer: the ids are the UTF-8 bytes of the text, after an end-of-document id "
         f"{EOD} (a prompt starts a document). " if byte_level else "")
        + "The memory state travels between generation steps in a "
        "`MemlmCache`, so a stream longer than the segment is read with memory as memlm reads it.", "",
        "Back into memlm (no transformers needed): `model = memlm.from_pretrained(PATH)`.", "",
    ]
    return "\n".join(lines)


def _describe(preset: str) -> str:
    try:
        return describe(preset)
    except (KeyError, ValueError):
        return "a variant"

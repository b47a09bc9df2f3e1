"""Training configuration: one dataclass whose field docstrings are the CLI's help texts.

Fields left at None are filled in by `resolve(device)` from the device the run trains on
(the main job: seed-tiny for 3 minutes on CPU, seed-small for 1.5 minutes on CUDA), and the
resolved config is what a run directory records.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memlm.compile_modes import COMPILE_MODES
from memlm.config import ConfigError
from memlm.data import DEFAULT_FRACTIONS, DataError
from memlm.data.tokenizers import parse_spec as parse_tokenizer_spec
from memlm.tasks.recall_streams import TARGETS as RECALL_TARGETS

SCHEDULES = ("cosine", "wsd")
PRECISIONS = ("auto", "bf16", "fp32")
# On CUDA the embedded stdlib corpus (10-30M tokens) is small for seed-small, which passes over it
# in well under a minute: longer default budgets overfit it (BENCHMARKS.md, "Training runs").
# Bring more data for longer runs.
CPU_MINUTES, CUDA_MINUTES = 3.0, 1.5
CPU_BATCH, CUDA_BATCH = 8, 32
CPU_LR, CUDA_LR = 2e-3, 1e-3
TASKS = ("lm", "recall")
PARALLEL = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    data: str = "stdlib"
    """Training corpus: 'stdlib', 'stdlib-long', 'site-packages' (stdlib and installed packages; ':holdout=numpy+torch' puts those packages in the test split), 'site-packages-text', a file, a directory, an archive (.gz/.bz2/.xz/.zip, enwik8.zip), hf:PATH (local .txt/.jsonl/.parquet files through the datasets library, streamed; hf:PATH:field=NAME names the text column), or several separated by commas."""
    tokenizer: str = "bytes"
    """Tokenizer: bytes (UTF-8 bytes and an end-of-document id, 257 tokens), bpe:N (a byte-level BPE of N tokens trained on the train split, kept with the corpus cache and the run; needs the tokenizers library), or hf:PATH (a local tokenizer.json). The model's vocab_size follows it; bits per byte stay comparable across tokenizers."""
    task: str = "lm"
    """What to train on: lm (the corpus of --data), or recall (endless documents of the long-range recall task, memlm.tasks; --data then serves only the validation and test bpb, and the run ends with recall accuracy by distance)."""
    recall_distances: tuple[int, ...] | None = None
    """recall task: filler lengths in bytes between a key's definition and its query scored at the end; training documents draw theirs log-uniformly from 0 to the largest (memlm.tasks.recall_streams.spread_distance). None = derived from the segment length L: L/4, 3L/4 (inside a window), 3L/2 (one segment back: XL memory) and 3L (memlm.tasks.longrange.distances_for)."""
    recall_targets: str = "answers"
    """recall task: which bytes are trained: answers (the queried value digits only: the task's digit NLL is the loss; a batch holding no answer is trained on all its bytes), or all (language modelling of the whole documents, which a small model does not turn into recall)."""
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    """Train / validation / test share of the documents (split by a hash of each document's name)."""
    out: str | None = None
    """Run directory; None = runs/<preset>-<timestamp>."""
    resume: bool = False
    """Continue the run in --out from its latest checkpoint, with its saved configs (a budget given here replaces the saved one)."""

    steps: int | None = None
    """Budget in optimizer steps (give at most one of steps, tokens, minutes)."""
    tokens: int | None = None
    """Budget in training tokens, rounded up to whole steps."""
    minutes: float | None = None
    """Budget in wall-clock minutes of training (evaluations and checkpoints included); with no budget given: 3 on CPU, 1.5 on CUDA."""

    batch_size: int | None = None
    """Sequences per micro-step on each rank; None = 8 on CPU, 32 on CUDA."""
    grad_accum: int = 1
    """Micro-steps per optimizer step (tokens per step = batch_size * seq_len * grad_accum * ranks)."""
    lr: float | None = None
    """Peak learning rate; None = 2e-3 on CPU (for seed-tiny), 1e-3 on CUDA (for seed-small)."""
    min_lr_frac: float = 0.1
    """The schedule decays to lr * min_lr_frac."""
    warmup_steps: int = 100
    """Linear warmup from lr / warmup_steps to lr over this many steps."""
    schedule: str = "cosine"
    """Decay after warmup: cosine, or wsd (warmup-stable-decay: constant, then linear decay over the last decay_frac)."""
    decay_frac: float = 0.2
    """WSD only: share of the post-warmup budget spent decaying."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to parameters with >= 2 dimensions (matrices, embeddings) only."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 = no clipping."""

    seed: int = 0
    """Seed of the model init, the data order and dropout."""
    device: str = "auto"
    """Device: auto (cuda when available, else cpu), cpu, cuda, cuda:N. Under torchrun each rank takes cuda:LOCAL_RANK."""
    precision: str = "auto"
    """Compute precision: auto (bf16 autocast on CUDA, fp32 on CPU), bf16, fp32."""
    compile: bool | None = None
    """Wrap the model in torch.compile for training (evaluation and sampling run uncompiled); None = on CUDA only."""
    compile_mode: str = "default"
    """torch.compile's mode when compiling: default, reduce-overhead (the forward and backward replayed as CUDA graphs: a launch a graph instead of one a kernel, for steps the host cannot launch as fast as the GPU runs them), max-autotune (tiles searched, and CUDA graphs) or max-autotune-no-cudagraphs (memlm.compile_modes)."""
    parallel: str = "ddp"
    """How the ranks of a torchrun job share the work: ddp (a whole copy of the weights and optimizer on each rank, gradients all-reduced), or fsdp (FSDP2: weights, gradients and AdamW state sharded over the ranks, one block gathered at a time; distributed checkpoints that resume at any number of ranks; memlm.train.fsdp). Recorded with the run: a resume keeps it."""
    activation_checkpointing: bool = False
    """Keep only each block's input in the forward pass and recompute the rest in the backward pass (less activation memory for about one more forward's compute); kNN and slot-memory layers are not recomputed."""

    eval_every: int | None = None
    """Steps between validation evaluations (and text samples); None = 10 over the budget (in steps, or in time for minutes)."""
    eval_batches: int = 8
    """Validation batches (batch_size x seq_len tokens each, spread over the split) scored at each evaluation."""
    checkpoint_every: int | None = None
    """Steps between checkpoints; None = at every evaluation. The last step always saves one."""
    keep_best: bool = True
    """Also keep the checkpoint with the lowest validation bpb (checkpoints/best)."""
    test_weights: str = "last"
    """Weights the final test evaluation scores: last (the end of the budget), or best (those of the
    validation evaluation with the lowest bpb: early stopping, for budgets that overfit the corpus)."""
    max_nonfinite_steps: int = 10
    """Steps in a row whose loss or gradient norm is not finite (each one skipped: no update, the
    memory state dropped) after which the run stops with an error naming the last checkpoint."""
    log_every: int = 10
    """Steps between training-metric records (metrics.jsonl, TensorBoard, progress bar)."""
    sample_bytes: int = 200
    """Tokens sampled at each evaluation (written to samples.txt; bytes with the byte tokenizer)."""
    sample_prompt: str = ""
    """Text the samples continue (after an end-of-document token, i.e. at a document start)."""
    sample_temperature: float = 0.8
    """Sampling temperature of the samples."""
    cache_dir: str | None = None
    """Where prepared corpora are cached; None = $MEMLM_CACHE or ~/.cache/memlm."""
    verify_data: bool = False
    """Read every document again at start and rebuild the cached corpus if its contents changed (the
    default check is each file's name, size and mtime, which an edit keeping both passes)."""

    def resolve(self, device_type: str) -> "TrainConfig":
        """A validated copy with the device-dependent defaults (batch size, budget) filled in."""
        cpu = device_type == "cpu"
        default_batch, default_lr = (CPU_BATCH, CPU_LR) if cpu else (CUDA_BATCH, CUDA_LR)
        resolved = dataclasses.replace(self, batch_size=default_batch if self.batch_size is None else self.batch_size,
                                       lr=default_lr if self.lr is None else self.lr,
                                       compile=(not cpu) if self.compile is None else self.compile)
        if self.steps is None and self.tokens is None and self.minutes is None:
            resolved.minutes = CPU_MINUTES if cpu else CUDA_MINUTES
        return resolved.validate()

    def validate(self) -> "TrainConfig":
        """Raise ConfigError for the first invalid field; return self when all is well."""
        budgets = {k: v for k, v in [("steps", self.steps), ("tokens", self.tokens), ("minutes", self.minutes)]
                   if v is not None}
        if len(budgets) > 1:
            raise ConfigError("budget", budgets, "give only one of steps, tokens, minutes")
        for name in ("steps", "tokens", "batch_size", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(name, value, "must be a positive integer")
        if self.minutes is not None and not (self.minutes > 0 and math.isfinite(self.minutes)):
            raise ConfigError("minutes", self.minutes, "must be > 0")
        for name in ("grad_accum", "eval_batches", "log_every", "max_nonfinite_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, getattr(self, name), "must be a positive integer")
        if self.test_weights not in ("last", "best"):
            raise ConfigError("test_weights", self.test_weights, "allowed: last, best")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError("compile_mode", self.compile_mode, f"allowed: {', '.join(COMPILE_MODES)}")
        for name in ("warmup_steps", "sample_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(name, getattr(self, name), "must be >= 0")
        if self.task not in TASKS:
            raise ConfigError("task", self.task, f"allowed: {', '.join(TASKS)}")
        try:
            parse_tokenizer_spec(self.tokenizer)
        except DataError as e:
            raise ConfigError("tokenizer", self.tokenizer, str(e)) from None
        if self.task == "recall" and parse_tokenizer_spec(self.tokenizer)[0] != "byte":
            raise ConfigError("tokenizer", self.tokenizer, "the recall task's documents are byte ids: use bytes")
        if self.recall_distances is not None and (
                not self.recall_distances or any(not isinstance(d, int) or d < 0 for d in self.recall_distances)):
            raise ConfigError("recall_distances", self.recall_distances, "must be one or more byte counts >= 0")
        if self.recall_targets not in RECALL_TARGETS:
            raise ConfigError("recall_targets", self.recall_targets, f"allowed: {', '.join(RECALL_TARGETS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError("schedule", self.schedule, f"allowed: {', '.join(SCHEDULES)}")
        if self.parallel not in PARALLEL:
            raise ConfigError("parallel", self.parallel, f"allowed: {', '.join(PARALLEL)}")
        if self.precision not in PRECISIONS:
            raise ConfigError("precision", self.precision, f"allowed: {', '.join(PRECISIONS)}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError("lr", self.lr, "must be > 0")
        if not 0 <= self.min_lr_frac <= 1:
            raise ConfigError("min_lr_frac", self.min_lr_frac, "must lie in [0, 1]")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must lie in [0, 1)")
        if not 0 < self.decay_frac <= 1:
            raise ConfigError("decay_frac", self.decay_frac, "must lie in (0, 1]")
        for name in ("weight_decay", "grad_clip", "sample_temperature"):
            if getattr(self, name) < 0:
                raise ConfigError(name, getattr(self, name), "must be >= 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(unknown[0], data[unknown[0]], f"unknown train field; known: {', '.join(sorted(names))}")
        data = dict(data)
        for name in ("fractions", "recall_distances"):
            if data.get(name) is not None:
                data[name] = tuple(data[name])
        return cls(**data)


def launch_command() -> str:
    """The command line that started this process (program name without its directory), as a shell
    would read it: what a run directory records to say how it was made."""
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else ""

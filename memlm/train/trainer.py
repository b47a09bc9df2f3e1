"""The training loop: budget, schedule, data-parallel steps, evaluation, samples, checkpoints.

    train(model_config, TrainConfig(...))         # also the body of `memlm train` and of torchrun
      for each optimizer step (until the step, token or wall-clock budget is used):
        lr <- schedule(step, progress)
        grad_accum x [next batch -> forward (autocast) -> backward]   (DDP syncs on the last one)
        clip the gradient norm, AdamW step
        every log_every: metrics.jsonl + TensorBoard + progress bar
        every eval_every (default: 10 times a run): validation bpb on eval_batches batches, a text sample
        every checkpoint_every (default: with each evaluation) and at the end: checkpoint (latest, best)
      test bpb on the whole test split; PNGs: curves, test bpb by position in document, learned spans

The model is a LanguageModel built from the model config, or any module given as `model=` that
speaks its protocol: forward(input_ids, targets, state) -> ModelOutput, init_state, load_state,
after_optimizer_step, spans, num_parameters, flops_per_token, estimate_mfu, and a `config` with
seq_len, stateful, memory.reset_at_document, validate(), to_dict() and from_dict().

Public hooks: `warm_up(steps)` compiles before the clock (memlm.train.warmup), `evaluate(split)`
scores a split, and callbacks (memlm.train.callbacks) hear of warm-ups, evaluations, metrics
records and the end of `fit`. Resuming restores the weights, the optimizer, the counters, and
every rank's data-loader and RNG state (memlm.train.resume).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from memlm.compile_modes import begin_step, compile_module, keep
from memlm.config import ModelConfig
from memlm.data import RandomWindows, Streams
from memlm.tasks import RecallStreams, distances_for, recall_by_mode, recall_markdown
from memlm.eval import evaluate
from memlm.state import State, allow_memory_recompiles
from memlm.model import LanguageModel
from memlm.train import checkpoint, corpus, distributed, fsdp, resume, warmup
from memlm.train.callbacks import Callback, notify
from memlm.train.config import TrainConfig, launch_command
from memlm.train.lock import RunLock
from memlm.train.metrics import Meter, MetricsLog, peak_flops, read
from memlm.train.optim import make_optimizer
from memlm.train.plot import plot_by_position, plot_curves, plot_spans
from memlm.device import autocast
from memlm.train.progress import ProgressBar
from memlm.train.sample import sample_text
from memlm.train.schedule import Schedule, step_progress

EVALUATIONS = 10
"""Evaluations (and checkpoints) over a run whose eval_every is None."""


def train(model_config: ModelConfig | None, config: TrainConfig, preset: str | None = None, *,
          model: nn.Module | None = None, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train (or resume) a run and return its summary; joins the torchrun process group if any.
    `model`, `callbacks`: as `Trainer` takes them."""
    info = distributed.setup(config.device)
    trainer = None
    try:
        trainer = Trainer(model_config, config, info, preset, model=model, callbacks=callbacks)
        return trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        trainer = None  # gone before the group is: distributed.teardown says why
        distributed.teardown(info)


def default_run_dir(preset: str | None) -> Path:
    return Path("runs") / f"{preset or 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}"


class TrainingError(Exception):
    """A run that cannot go on (one line for the user): its loss or gradient norm stayed
    non-finite, or its weights are no longer finite and cannot be checkpointed."""


class Trainer:
    """One training run in one process (one rank of a data-parallel job)."""

    def __init__(self, model_config: ModelConfig | None, config: TrainConfig, info: distributed.Dist,
                 preset: str | None = None, *, model: nn.Module | None = None,
                 callbacks: Sequence[Callback] = ()):
        """model: the module to train, built by the caller (seeded as it likes; the trainer moves it
        to its device); None = a LanguageModel of model_config, built from the run's seed.
        model_config: None = model.config. callbacks: told of the run's events (Callback)."""
        if model_config is None:
            if model is None:
                raise ValueError("Trainer: give a model config, a model, or both")
            model_config = model.config
        self.info, self.device = info, info.device
        self.callbacks = list(callbacks)
        out = Path(config.out) if config.out else default_run_dir(preset)
        self.out = Path(distributed.all_gather_objects(info, str(out))[0])  # rank 0's timestamp everywhere
        if config.resume and not self.out.is_dir():
            raise checkpoint.CheckpointError(f"no such run directory: {self.out}")
        self.lock = RunLock(self.out).acquire() if info.main else None  # released by close()
        resume_from, self.resume_note = None, None
        if config.resume:
            resume_from, self.resume_note = resume.checkpoint_to_resume(self.out, info.main)
            if resume_from is not None:
                saved = checkpoint.read_config(resume_from)
                checkpoint.check_same_model(self.out, resume_from, saved)
                model_config, config = resume.resumed_configs(saved, config, type(model_config))
                preset = saved.get("preset") or preset
        elif (self.out / checkpoint.CHECKPOINTS).exists():
            raise checkpoint.CheckpointError(f"{self.out} already holds a run: pass --resume to continue it, "
                                             f"or choose another --out")
        self.config = c = config.resolve(self.device.type)
        self.preset = preset
        self.model_config = model_config.validate()
        self.autocast = autocast(self.device, c.precision)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.corpus = corpus.prepare_corpus(c, info, checkpoint.load_tokenizer(resume_from) if resume_from else None)
        self.tokenizer = self.corpus.tokenizer
        fixed = str(resume_from) if resume_from is not None else "the given model" if model is not None else None
        self.model_config = corpus.follow_tokenizer(self.model_config, self.tokenizer, fixed)
        self.train_split, self.val_split = self.corpus.split("train"), self.corpus.split("validation")
        self.corpus.split("test")  # a split with no documents fails now, not after the whole budget
        self.seq_len = self.model_config.seq_len
        self.recall_distances = c.recall_distances or distances_for(self.seq_len)  # recall task only
        self.stateful = self.model_config.stateful
        self.loader = self.make_loader(c.seed)

        if model is None:
            torch.manual_seed(c.seed)  # the same initial weights on every rank
            model = LanguageModel(self.model_config)
        self.model = fsdp.prepare(model.to(self.device), c, info)  # activation checkpointing, FSDP sharding
        torch.manual_seed(resume.derived_seed(c.seed, info.rank))  # per-rank dropout / forgetful masks
        self.optimizer = make_optimizer(self.model, c.lr, c.weight_decay, (c.beta1, c.beta2))
        self.schedule = Schedule(c.lr, c.warmup_steps, c.schedule, c.min_lr_frac, c.decay_frac)
        self.tokens_per_step = c.batch_size * self.seq_len * c.grad_accum * info.world_size
        self.step = self.tokens = 0
        self.elapsed = 0.0  # training seconds, earlier runs of a resumed run included
        self.decay_start = 0.0 if c.warmup_steps == 0 else None  # elapsed seconds when warmup ended
        self.best_bpb = math.inf
        self.best_evaluated_step: int | None = None  # the step whose evaluation set best_bpb
        self.skipped_steps = 0  # steps whose loss or gradient norm was not finite (no update)
        self.nonfinite_in_a_row = 0
        # (step, 0-d device flag: 1 where the step was not finite and made no update) not read yet
        self.unread_flags: list[tuple[int, torch.Tensor]] = []
        # test_weights=best: a device copy of the weights of the best validation so far, and its step
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.best_step: int | None = None
        self.sample: str | None = None  # the text sampled at the latest evaluation
        # carried across batches by models with memory (streams); None = independent random windows
        self.state: State | None = self.model.init_state(c.batch_size) if self.stateful else None
        if resume_from is not None:
            resume.load(self, resume_from)
        self.total_steps = self._total_steps()
        self.peak_flops, self.peak_source = peak_flops(self.device, c.precision) if info.main else (None, None)
        self.origin = time.perf_counter() - self.elapsed  # the clock (reset when training starts)
        self.next_mark = math.inf  # minutes budget: when the next evaluation is due (set by fit)

        self.train_model: torch.nn.Module = self.model
        # what the step's loop does for CUDA-graph replays (memlm.compile_modes); "default" uncompiled
        self.compile_mode = c.compile_mode if c.compile else "default"
        # compiled with memory: every memory length its own static graph (State.mark_static); memlm's
        # models only (a peer's state is its own)
        self.static_memory_shapes = bool(c.compile and self.stateful and isinstance(self.model_config, ModelConfig))
        if c.compile:
            if self.stateful:  # filling memories are new graphs
                allow_memory_recompiles()
            self.train_model = compile_module(self.train_model, self.compile_mode)
        if not fsdp.is_sharded(self.model):
            self.train_model = distributed.wrap(self.train_model, info, find_unused=self.stateful)
        self.log = None
        if info.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / checkpoint.CONFIG).write_text(json.dumps(self.run_config(), indent=2) + "\n")
            for name, contents in self.checkpoint_files().items():  # the run's tokenizer
                (self.out / name).write_bytes(contents)
            self.log = MetricsLog(self.out, resume_step=self.step if resume_from is not None else None)

    def close(self) -> None:
        """Release the run directory."""
        if self.lock is not None:
            self.lock.release()

    def make_loader(self, seed: int):
        """Contiguous streams for models that carry memory, random windows otherwise."""
        c, info = self.config, self.info
        if c.task == "recall":  # endless recall documents, as streams (models without memory ignore the state)
            return RecallStreams(c.batch_size, self.seq_len, self.recall_distances, seed=seed, rank=info.rank,
                                 world_size=info.world_size, targets=c.recall_targets)
        if self.stateful:
            return Streams(self.train_split, c.batch_size, self.seq_len, rank=info.rank, world_size=info.world_size)
        return RandomWindows(self.train_split, c.batch_size, self.seq_len, seed=seed, rank=info.rank,
                             world_size=info.world_size)

    def checkpoint_files(self) -> dict[str, bytes]:
        """Files a checkpoint holds beside its weights and configs: a non-byte tokenizer's tokenizer.json."""
        return corpus.tokenizer_files(self.tokenizer)

    # ----- the loop -------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train until the budget is used; then evaluate on the test split. Returns the summary."""
        c, main = self.config, self.info.main
        self.origin = time.perf_counter() - self.elapsed
        self.next_mark = self._next_mark()
        with ProgressBar(self.total_steps or c.minutes * 60, enabled=main) as self.bar:
            if main:
                self.bar.log(self._announce())
            if self.step == 0:
                self._evaluate()
            meter = Meter(self.device)
            while not self.done():
                lr = self.schedule(self.step, self.progress())
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss, grad_norm, bad = self.train_step()
                self.step += 1
                self.tokens += self.tokens_per_step
                self.elapsed = self._clock()
                if self.step == c.warmup_steps:
                    self.decay_start = self.elapsed
                meter.add(loss, bad)
                self.unread_flags.append((self.step, bad))
                self._read_flags(keep=1)  # the previous step's: the device has this step queued meanwhile
                last = self.done()
                if self.step % c.log_every == 0 or last:
                    self._read_flags(keep=0)
                    self._log_train(meter, lr, grad_norm)
                    meter = Meter(self.device)
                with meter.pause():
                    evaluate = last or self._due(c.eval_every)
                    checkpoint_due = last or (self._due(c.checkpoint_every) if c.checkpoint_every else evaluate)
                    if evaluate or checkpoint_due:
                        self._read_flags(keep=0)
                    if evaluate:
                        self._evaluate()
                    if checkpoint_due:
                        self.save()
                    if evaluate:
                        self.next_mark = self._next_mark()
                self.bar.update(self._bar_position())
            tested_step = resume.restore_best(self) if c.test_weights == "best" else self.step
            if c.test_weights == "best" and c.keep_best and self.best_weights is not None:
                resume.save_best_weights(self)
            test = self.evaluate("test")
            notify(self.callbacks, "on_evaluate", self, "test", test)
            recall = self._recall() if c.task == "recall" and main else None
            if self.sample is None and (main or fsdp.is_sharded(self.model)):
                self.sample = self._sample()
            sample = self.sample if main else ""
        summary = {"run_dir": str(self.out), "steps": self.step, "tokens": self.tokens,
                   "elapsed_s": round(self.elapsed, 1), "test_bpb": test["bpb"], "test_loss": test["loss"],
                   "test_perplexity": test["perplexity"], "test_tokens": test["tokens"],
                   "test_by_position": test["by_position"], "test_weights": c.test_weights,
                   "test_step": tested_step, "sample": sample,
                   "best_val_bpb": self.best_bpb if math.isfinite(self.best_bpb) else None}
        if recall is not None:
            summary["recall"] = recall
        if main:
            self._record("test", self.step, tokens=self.tokens, elapsed=round(self.elapsed, 3),
                         weights_step=tested_step, **_scored(test))
            self.log.close()
            name = f"{self.preset or 'model'} on {c.data}"
            plot_curves(read(self.out), self.out / "curves.png", title=name)
            plot_by_position(test["by_position"], self.out / "by_position.png", title=f"test bpb by position: {name}")
            if (spans := self.model.spans()) is not None:
                plot_spans(spans, self.out / "spans.png", self.model_config.span_max, title=f"learned spans: {name}")
        notify(self.callbacks, "on_fit_end", self, summary)
        return summary

    def _total_steps(self) -> int | None:
        """Steps of a step or token budget (None for minutes); tokens count from where the run is,
        so a resume on another number of ranks still ends at the token budget."""
        c = self.config
        if c.steps is not None:
            return c.steps
        if c.tokens is not None:
            return self.step + max(0, math.ceil((c.tokens - self.tokens) / self.tokens_per_step))
        return None

    def _clock(self) -> float:
        """Elapsed training seconds; for a minutes budget, rank 0's on every rank, since the clock
        then decides the schedule, the evaluations and the end."""
        elapsed = time.perf_counter() - self.origin
        return distributed.broadcast_float(self.info, elapsed) if self.total_steps is None else elapsed

    def _next_mark(self) -> float:
        """For a minutes budget: the next tenth of the budget after now (the next evaluation time)."""
        if self.total_steps is not None:
            return math.inf
        interval, now = self.config.minutes * 60 / EVALUATIONS, self._clock()
        # at least half an interval of training between evaluations, however slow they are
        return max((math.floor(now / interval) + 1) * interval, now + interval / 2)

    def _due(self, every: int | None) -> bool:
        """Whether the step just taken ends an interval of `every` steps; every=None: a tenth of the
        budget (in steps, or in time for minutes: the clock passed the mark set after the last evaluation,
        so an evaluation slower than the interval delays the next one instead of repeating it)."""
        if every is not None:
            return self.step % every == 0
        if self.total_steps is not None:
            return self.step % max(1, self.total_steps // EVALUATIONS) == 0
        return self.elapsed >= self.next_mark

    def _bar_position(self) -> float:
        return self.step if self.total_steps is not None else self.elapsed

    def done(self) -> bool:
        if self.total_steps is not None:
            return self.step >= self.total_steps
        return self.elapsed >= self.config.minutes * 60

    def progress(self) -> float:
        """Share of the post-warmup budget used: steps for step/token budgets, seconds for minutes."""
        if self.total_steps is not None:
            return step_progress(self.step, self.config.warmup_steps, self.total_steps)
        if self.decay_start is None:  # still warming up
            return 0.0
        budget = self.config.minutes * 60
        return (self.elapsed - self.decay_start) / max(budget - self.decay_start, 1e-9)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step over grad_accum micro-batches: (mean loss, gradient norm before
        clipping, 1.0 where the loss or the gradient norm was not finite on some rank and the step
        made no update, else 0.0), as 0-d device tensors. Nothing here reads the device: the fused
        AdamW skips a non-finite step itself (its `found_inf` input, as under a GradScaler) and
        the loop reads the flag a step later (`_read_flags`)."""
        accum = self.config.grad_accum
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y, *flags = self.loader.next_batch()
            x, y = self._to_device(x), self._to_device(y)  # (B, T)
            if self.state is not None:
                forget = self._rows_to_forget(flags[0][:, 0], micro)
                if forget is not None:
                    self.state = self.state.reset(self._to_device(forget))
            fsdp.set_gradient_sync(self.train_model, self.model, micro == accum - 1)  # on the last micro-step only
            if self.static_memory_shapes:
                self.state.mark_static()
            begin_step(self.compile_mode)
            with self.autocast:
                out = self.train_model(x, targets=y, state=self.state)
            ((out.loss + out.aux_loss) / accum).backward()
            loss_sum += out.loss.detach()
            self.state = keep(out.state, self.compile_mode) if out.state is not None else None
        fsdp.reduce_replicated(self.model, self.info)  # FSDP: the parameters it leaves whole
        grad_norm = fsdp.clip_grad_norm_(self.model, self.config.grad_clip or math.inf)
        # every rank sees the all-reduced gradients, and a rank whose own loss overflowed has
        # non-finite gradients too; the sum keeps the decision identical everywhere
        bad = (~(torch.isfinite(grad_norm) & torch.isfinite(loss_sum))).float()
        bad = distributed.all_reduce_sum(self.info, bad).clamp_(max=1.0)
        self.optimizer.found_inf = bad  # where 1 the fused step leaves weights, moments and step count as they are
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        self.model.after_optimizer_step()  # clamps only: a skipped step leaves them in range
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / accum, grad_norm, bad

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A loader's CPU tensor on the training device. On CUDA through pinned memory: a copy from
        pageable memory may wait for the device's queue to drain (CUDA's rules for staging it),
        which would stall the host once a step as a read would."""
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _read_flags(self, keep: int) -> None:
        """Read the non-finite flags of the steps taken, all but the newest `keep`: count each
        skipped step (`_skip_nonfinite_step`) or end a run of them. Reading waits for the device
        to finish that step, so the loop reads a step's flag once the next step is queued."""
        while len(self.unread_flags) > keep:
            step, bad = self.unread_flags.pop(0)
            if bad.item():
                self._skip_nonfinite_step(step)
            else:
                self.nonfinite_in_a_row = 0

    def _skip_nonfinite_step(self, step: int) -> None:
        """Count a step whose loss or gradient norm was not finite (it made no update); drop the
        memory state (its hidden states may be non-finite too); stop the run after
        max_nonfinite_steps such steps in a row. The flag is read a step late, so the step after a
        non-finite one has already read its state: if that state was poisoned, that step is not
        finite either and is skipped and counted too."""
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        if self.state is not None:
            self.state = self.model.init_state(self.config.batch_size, device=self.device)
        if self.info.main:
            self.bar.log(f"step {step:>6} | loss or gradient norm not finite: step skipped "
                         f"({self.nonfinite_in_a_row} in a row, {self.skipped_steps} in all)")
        if self.nonfinite_in_a_row >= self.config.max_nonfinite_steps:
            try:
                last = f"the last checkpoint is {checkpoint.find(self.out)}"
            except checkpoint.CheckpointError:
                last = "no checkpoint was written"
            raise TrainingError(
                f"stopped at step {step}: the loss or gradient norm was not finite in "
                f"{self.nonfinite_in_a_row} steps in a row (max_nonfinite_steps); {last}; lower --lr or "
                f"raise --warmup_steps, then resume or start again")

    def _rows_to_forget(self, doc_start: torch.Tensor, micro: int) -> torch.Tensor | None:
        """(B,) bool rows whose state is reset before this micro-batch, or None: rows starting a
        document (memory.reset_at_document) and, with memory.train_reset = p, each row with
        probability p, drawn from (seed, rank, step, micro) so that a resumed run draws the same."""
        m = self.model_config.memory
        forget = doc_start if m.reset_at_document else None  # (B,) bool
        if m.train_reset > 0:
            draw = np.random.default_rng([self.config.seed, self.info.rank, self.step, micro]).random(len(doc_start))
            chance = torch.from_numpy(draw < m.train_reset)  # (B,) bool
            forget = chance if forget is None else forget | chance
        return forget

    # ----- logging, evaluation, samples -------------------------------------------------
    def _log_train(self, meter: Meter, lr: float, grad_norm: torch.Tensor) -> None:
        """A train record of the steps since the last one (loss averaged over steps and ranks)."""
        finite = int(meter.finite_steps.item())  # every step since the last record may have been skipped
        loss = distributed.all_reduce_sum(self.info, meter.loss_sum.clone()).item()
        loss = loss / (finite * self.info.world_size) if finite else math.nan
        if not self.info.main:
            return
        tokens_per_s = meter.steps * self.tokens_per_step / meter.seconds()
        record = {"tokens": self.tokens, "elapsed": round(self.elapsed, 3), "loss": loss,
                  "bpb": loss / math.log(2) / corpus.bytes_per_token(self.corpus),
                  "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_s": tokens_per_s,
                  "skipped_steps": self.skipped_steps}
        if self.peak_flops:
            record["mfu"] = self.model.estimate_mfu(tokens_per_s / self.info.world_size, self.peak_flops)
        self._record("train", self.step, **record)
        self.bar.update(self._bar_position(), step=self.step, loss=loss, bpb=record["bpb"], tokens_per_s=tokens_per_s)

    def _recall(self) -> dict[str, Any]:
        """Recall accuracy by distance (memlm.tasks) with the model's memory and, for a model with
        memory, without it; written to recall.md in the run directory."""
        with self.autocast:
            results = recall_by_mode(self.model, self.recall_distances, 64, self.config.batch_size,
                                     seed=self.config.seed)
        (self.out / "recall.md").write_text("\n\n".join(recall_markdown(r) for r in results.values()) + "\n")
        self.bar.log("\n".join(recall_markdown(r) for r in results.values()))
        return results

    # ----- public hooks ---------------------------------------------------------------
    @property
    def eval_tokens(self) -> int:
        """Validation tokens each evaluation during training scores (eval_batches batches)."""
        return self.config.eval_batches * self.config.batch_size * self.seq_len

    def evaluate(self, split: str = "validation", max_tokens: int | None = None) -> dict[str, Any]:
        """Score the model as it is now on a split of the run's corpus (memlm.eval.evaluate: bpb,
        loss, perplexity, tokens, by_position), about `max_tokens` of it spread over the split
        (None = all of it), in the run's precision, with the memory kept across segments for a
        model with memory. Collective under data parallelism: every rank must call it."""
        data = self.val_split if split == "validation" else self.corpus.split(split)
        with self.autocast:
            return evaluate(self.model, data, self.config.batch_size, self.seq_len, max_tokens,
                            stateful=self.stateful, reset=self.model_config.memory.reset_at_document,
                            rank=self.info.rank, world_size=self.info.world_size)

    def warm_up(self, steps: int) -> float:
        """Compile before the clock: at least `steps` forward/backward passes with no update (more
        for a memory that takes longer to fill) and one validation evaluation, the loader and
        RNGs restored afterwards, so the run then trains as it would have (memlm.train.warmup).
        Nothing for an uncompiled run. Seconds taken; callbacks hear of it (on_warmup_end)."""
        seconds = warmup.compile_warm_up(self, steps)
        notify(self.callbacks, "on_warmup_end", self, seconds)
        return seconds

    def _record(self, kind: str, step: int, **values: Any) -> None:
        """A metrics record (rank 0), passed on to the callbacks."""
        self.log.write(kind, step, **values)
        notify(self.callbacks, "on_metrics", self, {"kind": kind, "step": step, **values})

    def _evaluate(self) -> None:
        """Validation bpb on eval_batches batches spread over the split, and a sample (rank 0)."""
        c = self.config
        result = self.evaluate("validation", self.eval_tokens)
        notify(self.callbacks, "on_evaluate", self, "validation", result)
        if result["bpb"] < self.best_bpb:  # never true for a non-finite bpb
            self.best_bpb, self.best_evaluated_step = result["bpb"], self.step
            if c.test_weights == "best":
                self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                self.best_step = self.step
        if self.info.main or fsdp.is_sharded(self.model):  # a sharded model's forward takes every rank
            self.sample = self._sample()
        if self.info.main:
            self._record("eval", self.step, tokens=self.tokens, elapsed=round(self.elapsed, 3), **_scored(result))
            self.bar.log(f"step {self.step:>6} | val bpb {result['bpb']:.4f} | sample: {self.sample[:100]!r}")

    def _sample(self) -> str:
        c = self.config
        if not c.sample_bytes:  # no sampling: not even the prompt's forward pass (new shapes to compile)
            return c.sample_prompt
        with self.autocast:
            text, _ = sample_text(self.model, c.sample_prompt, c.sample_bytes, c.sample_temperature, seed=c.seed,
                                  tokenizer=self.tokenizer)
        if self.log is not None:  # rank 0
            self.log.sample(self.step, c.sample_prompt + text)
        return c.sample_prompt + text

    def _announce(self) -> str:
        c = self.config
        budget = f"{self.total_steps} steps" if self.total_steps is not None else f"{c.minutes:g} minutes"
        return (f"run {self.out}: {self.preset or 'model'} ({self.model.num_parameters():,} parameters) on {c.data} "
                f"({len(self.train_split):,} train tokens), {self.info.world_size} x {self.device}, "
                f"{self.tokens_per_step:,} tokens/step, budget {budget}"
                + (f", resumed at step {self.step}" if self.step else "")
                + (f"; {self.resume_note}" if self.resume_note else "")
                + (f"; MFU against {self.peak_flops / 1e12:.1f} TFLOP/s ({self.peak_source})" if self.peak_flops else ""))

    # ----- checkpoints --------------------------------------------------------------
    def run_config(self) -> dict[str, Any]:
        """The resolved {"model", "train", "data"} configs of this run and the command that started it."""
        m = self.corpus.manifest
        data = {"spec": self.config.data, "fractions": list(self.config.fractions), "cache": str(self.corpus.path),
                "splits": m["splits"], "tokenizer": m["tokenizer"]}
        if any(m.get("inventory") or ()):  # what the sources read, kept: the cache is rebuilt in place on changes
            data["inventory"] = m["inventory"]
        return {"preset": self.preset, "command": launch_command(), "model": self.model_config.to_dict(),
                "train": self.config.to_dict(), "data": data}

    def save(self) -> None:
        """Checkpoint the run (collective: every rank contributes its loader and RNG state)."""
        ranks = distributed.all_gather_objects(self.info, resume.rank_state(self))
        if not resume.weights_finite(self):
            raise TrainingError(f"step {self.step}: the weights are no longer finite and are not checkpointed; "
                                f"the previous checkpoint is intact")
        resume.write_checkpoint(self, ranks)


def _scored(result: dict[str, float]) -> dict[str, float]:
    """An evaluation result for a metrics record: its token and byte counts renamed scored_tokens, scored_bytes."""
    names = {"tokens": "scored_tokens", "bytes": "scored_bytes"}
    return {names.get(k, k): v for k, v in result.items() if k != "by_position"}

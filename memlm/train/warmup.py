"""Compile warm-up: the graphs a compiled run needs, compiled before its clock starts, with the run
left exactly as it was (`Trainer.warm_up`).

torch.compile compiles on the first call of each graph variant: the first step, a state with
and without a (masked) memory, each stage of a memory filling up (its tensors change shape until
it is full), and the attention and kNN kernels of the first validation evaluation. A run with a
wall-clock budget would pay for that inside its budget; `warm_up` pays it before. Its passes
take no optimizer step, and the data order and RNGs are put back afterwards, so the run then
trains exactly as it would have without them.
"""

from __future__ import annotations

import time

import torch

from memlm.compile_modes import begin_step, keep
from memlm.config import ModelConfig


def memory_warmup(config: ModelConfig) -> int:
    """Steps until a stateful model's memory tensors keep their shapes and strides (so a compiled
    model stops recompiling), plus one: the first step has no memory, the next ones fill the
    longest recurrent memory, then the compressed memory; a rolled memory settles one step
    after it is full."""
    m, T = config.memory, config.seq_len
    longest = max(config.memory_lengths())
    steps = 2 + -(-longest // T)
    if m.compressive.rate:
        steps += -(-m.compressive.length * m.compressive.rate // T)
    return steps + 1


def compile_warm_up(trainer, passes: int) -> float:
    """`passes` forward/backward passes of the trainer's training model on its next batches, on
    a state of its own, with no optimizer step; then one validation evaluation, as the clock
    starts with one. Pass 1 resets no row and pass 2 resets row 0, so the graphs with and
    without a (masked) memory are both compiled; a memlm model with memory gets at least the
    passes its memories take to fill (`memory_warmup`). The loader and the RNGs are restored
    afterwards. Seconds taken; 0.0 (and nothing done) for an uncompiled run or passes <= 0."""
    if passes <= 0 or not trainer.config.compile:
        return 0.0
    if trainer.stateful and isinstance(trainer.model_config, ModelConfig):
        passes = max(passes, memory_warmup(trainer.model_config))
    start, device = time.perf_counter(), trainer.device
    loader_state, rng = trainer.loader.state_dict(), torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    # made as the trainer makes its own (on the model's device), so the compiled graphs' guards match it
    state = trainer.model.init_state(trainer.config.batch_size) if trainer.stateful else None
    for i in range(passes):
        x, y, *flags = trainer.loader.next_batch()
        x, y = x.to(device), y.to(device)  # (B, T)
        if state is not None and trainer.model_config.memory.reset_at_document:
            starts = flags[0][:, 0].clone()  # (B,) rows starting a document
            if i == 1:
                starts[:] = False
            elif i == 2:
                starts[0] = True
            state = state.reset(starts.to(device))
        if state is not None and trainer.static_memory_shapes:  # the graphs the steps will use
            state.mark_static()
        begin_step(trainer.compile_mode)
        with trainer.autocast:
            out = trainer.train_model(x, targets=y, state=state)
        (out.loss + out.aux_loss).backward()
        state = keep(out.state, trainer.compile_mode) if out.state is not None else None
    trainer.optimizer.zero_grad(set_to_none=True)
    # the validation the clock starts with: evaluation runs the model uncompiled, but its flex attention
    # and fused kNN search are compiled or jitted per shape, which took an XL + kNN model ~60 s
    trainer.evaluate("validation", trainer.eval_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    trainer.loader.load_state_dict(loader_state)
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, device)
    return time.perf_counter() - start

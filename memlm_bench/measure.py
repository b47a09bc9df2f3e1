"""The two measurements every workload gets: training steps and cached greedy generation.

Training: AdamW (fused on CUDA) over the objective, bf16 autocast on CUDA, random tokens
already on the device, `warmup` untimed steps (torch.compile happens in the first), then
`repeats` timed runs of `steps` steps with no host sync inside them. In a CUDA-graph compile
mode (memlm.compile_modes) each step is marked as a new one and what an objective carries to
the next step is copied out of the replayed graph's memory (its `keep_outputs`).

Generation: only the new tokens are counted. Each repeat prefills the cache with the prompt
(all but its last token, not timed), then times n single-token steps that make n new tokens:
decode tokens/s = batch * n / median time.
"""

from __future__ import annotations


import torch

from memlm_bench.workloads import Decoder, Shape, Workload
from memlm.compile_modes import begin_step, compile_module
from memlm.device import autocast, median, repeat_seconds, seconds



def random_tokens(vocab_size: int, size: tuple[int, ...], device: torch.device, seed: int) -> torch.Tensor:
    """Uniform random ids in [0, vocab_size) made on the device (never all zeros)."""
    generator = torch.Generator(device).manual_seed(seed)
    return torch.randint(0, vocab_size, size, device=device, generator=generator)


def measure_training(workload: Workload, shape: Shape, *, steps: int, warmup: int, repeats: int,
                     compile: bool, device: torch.device, seed: int, profile_steps: int = 0,
                     compile_mode: str = "default") -> dict:
    """Train the workload's objective and time it. Returns tokens (per timed run), seconds
    (each run), tokens_per_s (of the median run), initial_loss (the first step's, at init),
    peak_mem_bytes (CUDA, timed runs only; None elsewhere) and, with profile_steps, the profile
    of that many more steps (`step_profile`)."""
    objective = workload.objective.train()
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-4, fused=device.type == "cuda")
    mode = compile_mode if compile else "default"
    if hasattr(objective, "compile_mode"):  # an objective that compiles its model itself (StreamObjective)
        objective.compile_mode = mode
    forward = compile_module(objective, mode) if compile else objective
    keep_outputs = getattr(objective, "keep_outputs", None)
    data = random_tokens(shape.vocab_size, (steps, shape.batch_size, shape.seq_len + 1), device, seed)
    inputs, targets = data[..., :-1].contiguous(), data[..., 1:].contiguous()  # (S, B, T) each

    def train_step(i: int) -> torch.Tensor:
        begin_step(mode)
        with autocast(device):
            loss = forward(inputs[i % steps], targets[i % steps])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if keep_outputs is not None:
            keep_outputs(mode)
        return loss.detach()

    initial_loss = train_step(0).item()
    for i in range(1, warmup):
        train_step(i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = repeat_seconds(lambda: [train_step(i) for i in range(steps)], device, repeats)
    tokens = shape.batch_size * shape.seq_len * steps
    result = {
        "tokens": tokens,
        "seconds": runs,
        "tokens_per_s": tokens / median(runs),
        "initial_loss": initial_loss,
        "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    if profile_steps:
        result["profile"] = step_profile(train_step, profile_steps, device)
    return result


def step_profile(train_step, steps: int, device: torch.device, top: int = 25) -> dict:
    """torch.profiler over `steps` calls of train_step(i): what runs on the device (CUDA kernels;
    on a CPU, the operators' own CPU time) by name, per step. Returns ms_per_step (the sum over
    every name) and `top`: the `top` names by time, each {name, ms_per_step, calls_per_step,
    share}."""
    from torch.autograd import DeviceType

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(steps):
            train_step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if device.type == "cuda":  # kernels: events that ran on the device
        timed = [(e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
                 if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    else:  # operators, by their own CPU time (children excluded)
        timed = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_us = sum(us for _, us, _ in timed)
    ranked = sorted(timed, key=lambda item: -item[1])[:top]
    return {
        "steps": steps,
        "timed": "CUDA kernels" if device.type == "cuda" else "CPU operators (self time)",
        "ms_per_step": total_us / 1e3 / steps,
        "top": [{"name": name, "ms_per_step": us / 1e3 / steps, "calls_per_step": count / steps,
                 "share": us / total_us} for name, us, count in ranked],
    }


@torch.no_grad()
def measure_generation(decoder: Decoder, vocab_size: int, *, batch_size: int, prompt_len: int,
                       new_tokens: int, repeats: int, device: torch.device, seed: int) -> float:
    """Decode tokens/s of greedy cached generation at one batch size (prefill excluded)."""
    prompt = random_tokens(vocab_size, (batch_size, prompt_len), device, seed)  # (B, T0)

    def decode_seconds() -> float:
        context = decoder.prefill(prompt)
        return seconds(lambda: decoder.extend(context, new_tokens), device)

    with autocast(device):
        decode_seconds()  # warm-up: compiles, fills the allocator's caches
        runs = [decode_seconds() for _ in range(repeats)]
    return batch_size * new_tokens / median(runs)

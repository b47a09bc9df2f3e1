"""The two measurements every workload gets: training steps and cached greedy generation.

Training: AdamW (fused on CUDA) over the objective, bf16 autocast on CUDA, random tokens
already on the device, `warmup` untimed steps (torch.compile happens in the first), then
`repeats` timed runs of `steps` steps with no host sync inside them.

Generation: only the new tokens are counted. Each repeat prefills the cache with the prompt
(all but its last token, not timed), then times n single-token steps that make n new tokens:
decode tokens/s = batch * n / median time.
"""

from __future__ import annotations


import torch

from memlm_bench.workloads import Decoder, Shape, Workload
from memlm.device import autocast, median, repeat_seconds, seconds



def random_tokens(vocab_size: int, size: tuple[int, ...], device: torch.device, seed: int) -> torch.Tensor:
    """Uniform random ids in [0, vocab_size) made on the device (never all zeros)."""
    generator = torch.Generator(device).manual_seed(seed)
    return torch.randint(0, vocab_size, size, device=device, generator=generator)


def measure_training(workload: Workload, shape: Shape, *, steps: int, warmup: int, repeats: int,
                     compile: bool, device: torch.device, seed: int) -> dict:
    """Train the workload's objective and time it. Returns tokens (per timed run), seconds
    (each run), tokens_per_s (of the median run), initial_loss (the first step's, at init) and
    peak_mem_bytes (CUDA, timed runs only; None elsewhere)."""
    objective = workload.objective.train()
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(objective) if compile else objective
    data = random_tokens(shape.vocab_size, (steps, shape.batch_size, shape.seq_len + 1), device, seed)
    inputs, targets = data[..., :-1].contiguous(), data[..., 1:].contiguous()  # (S, B, T) each

    def train_step(i: int) -> torch.Tensor:
        with autocast(device):
            loss = forward(inputs[i % steps], targets[i % steps])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    initial_loss = train_step(0).item()
    for i in range(1, warmup):
        train_step(i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = repeat_seconds(lambda: [train_step(i) for i in range(steps)], device, repeats)
    tokens = shape.batch_size * shape.seq_len * steps
    return {
        "tokens": tokens,
        "seconds": runs,
        "tokens_per_s": tokens / median(runs),
        "initial_loss": initial_loss,
        "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
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

"""Profile compiled training steps of a preset on a GPU: where the step's time goes.

    python scripts/profile_step.py seed-small --batch-size 32 [--steps 10] [--override k=v ...]

Prints the step time, tokens/s, and torch.profiler's table of the CUDA kernels that take the
most time (self CUDA time), grouped so that matmuls, attention and elementwise kernels can
be told apart. Random tokens, bf16 autocast, AdamW fused, as `memlm bench` trains.

--host: where the host's time goes instead: the step's wall time against its kernels' time, the
operators and CUDA runtime calls by their own CPU time (launch counts among them), and whether
a step synchronises with the device (torch.cuda.set_sync_debug_mode, which warns at each sync).
--compile-mode MODE passes a torch.compile mode ("reduce-overhead": CUDA graphs).
"""

from __future__ import annotations

import argparse
import time

import torch

import memlm
from memlm.compile_modes import COMPILE_MODES, begin_step, compile_module, keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--override", nargs="*", default=[], help="dotted model overrides key=value")
    parser.add_argument("--rows", type=int, default=25, help="kernels listed")
    parser.add_argument("--host", action="store_true", help="profile the host side (see the docstring)")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                        help="torch.compile mode (reduce-overhead: CUDA graphs; memlm.compile_modes)")
    parser.add_argument("--reset", action="store_true",
                        help="stateful models: reset no row, but mark the state as reset (masked), as training on "
                             "documents does after the first document boundary")
    args = parser.parse_args()

    overrides = dict(item.split("=", 1) for item in args.override)
    model = memlm.build(args.preset, **overrides).cuda().train()
    config = model.config
    B, T = args.batch_size, config.seq_len
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    mode = "default" if args.no_compile else args.compile_mode
    forward = model if args.no_compile else compile_module(model, mode)
    data = torch.randint(0, config.vocab_size, (args.steps, B, T + 1), device="cuda")
    state = model.init_state(B) if config.stateful else None
    if state is not None and args.reset:
        state = state.reset(torch.zeros(B, dtype=torch.bool, device="cuda"))

    def step(i: int) -> None:
        nonlocal state
        begin_step(mode)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = forward(data[i, :, :-1], targets=data[i, :, 1:], state=state)
        (out.loss + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if state is not None:
            state = keep(out.state, mode)

    for i in range(5):  # compile and warm up
        step(i % args.steps)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for i in range(args.steps):
        step(i)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / args.steps
    print(f"{args.preset} B{B} T{T}: {seconds * 1e3:.1f} ms/step, {B * T / seconds:,.0f} tokens/s, "
          f"{model.estimate_mfu(B * T / seconds, 1.0) / 1e12:.1f} TFLOP/s model FLOPs")

    if args.host:
        profile_host(step, args.rows)
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(3):
            step(i)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=90))


def profile_host(step, rows: int, steps: int = 3) -> None:
    """The host side of `steps` steps: CPU operators and CUDA runtime calls by self CPU time,
    the kernels' total, and the syncs of one step (warnings from the sync debug mode)."""
    from torch.autograd import DeviceType
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(steps):
            step(i)
        torch.cuda.synchronize()
    wall = (time.perf_counter() - started) * 1e3 / steps
    events = prof.key_averages()
    kernels = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e3 / steps
    launches = sum(e.count for e in events if "LaunchKernel" in e.key or "cuLaunch" in e.key) / steps
    print(f"host profile: {wall:.1f} ms a step (profiled) against {kernels:.1f} ms of kernels; "
          f"{launches:.0f} kernel launches a step")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70))
    torch.cuda.set_sync_debug_mode("warn")
    try:
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(0)
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message)[:160] for w in caught if "synchroniz" in str(w.message)]
    print(f"syncs in one step: {len(syncs)}")
    for message in syncs[:10]:
        print("  ", message)


if __name__ == "__main__":
    main()

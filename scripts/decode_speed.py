"""Decode tokens/s of memlm's generation paths on a GPU, side by side in one run.

    python scripts/decode_speed.py [--presets vanilla-small seed-small] [--batch-sizes 1 16]
    python scripts/decode_speed.py --presets seed-xl-small --batch-sizes 16 --profile 32

Paths: `eager` (the model's forward with a growing cache, memlm.generate(decode="eager")),
`graph` (static cache, eager step captured in a CUDA graph), `compiled graph` (the step
compiled with torch.compile, then captured), and `compiled graph bf16` (the same over a bf16
copy of the weights, outside autocast). bf16 autocast around everything; greedy; random
weights and prompt; the prompt's prefill is not timed. `memlm bench --decode graph` measures
the last path. Models with recurrent memory decode through memlm.decode.static_memory (their
memory rolls every seq_len tokens; `eager` is then skipped unless asked for with --paths).

--profile N: instead of timing, profile N steps of the compiled bf16 step without the CUDA graph
(torch.profiler; kernel times are those the graph replays) after a warm-up, and print the
table of CUDA kernels by total time, with dynamo's compile counters.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import memlm
from memlm.decode.generate import static_decoder


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up (compiles, captures)
    runs = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["vanilla-small", "seed-small"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--paths", nargs="+", default=None,
                        help="paths to time (default: all; models with memory: the static ones)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="profile N steps instead of timing")
    parser.add_argument("--rows", type=int, default=25, help="kernels listed by --profile")
    args = parser.parse_args()
    if args.profile:
        for preset in args.presets:
            for B in args.batch_sizes:
                profile(preset, B, args)
        return
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| preset | batch | path | new tokens/s | ms/token |")
    print("|---|---|---|---|---|")
    for preset in args.presets:
        torch.manual_seed(0)
        model = memlm.build(preset).cuda().eval()
        for B in args.batch_sizes:
            prompt = torch.randint(0, 256, (B, args.prompt), device="cuda")
            max_len = args.prompt + args.new
            decoders = {
                "graph": static_decoder(model, B, max_len),
                "compiled graph": static_decoder(model, B, max_len, compile=True),
                "compiled graph bf16": static_decoder(model, B, max_len, compile=True, dtype=torch.bfloat16),
            }

            def eager():
                last = prompt[:, -1:]
                _, state = memlm.generate(model, prompt[:, :-1], 0, temperature=0, return_state=True)
                memlm.generate(model, last, args.new, temperature=0, state=state)

            def static(decoder):
                def run():
                    logits = decoder.prefill(prompt)
                    for _ in range(args.new):
                        logits = decoder.step(logits.argmax(-1, keepdim=True))
                return run

            paths = {"eager": eager, **{name: static(d) for name, d in decoders.items()}}
            wanted = args.paths or [name for name in paths if name != "eager" or not model.config.recurrent]
            for name, fn in ((name, fn) for name, fn in paths.items() if name in wanted):
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    try:
                        seconds = timed(fn)
                    except Exception as error:  # report and go on: one failing path must not hide the rest
                        print(f"| {preset} | {B} | {name} | failed: {type(error).__name__}: {error} | |")
                        continue
                print(f"| {preset} | {B} | {name} | {B * args.new / seconds:,.0f} | {seconds / args.new * 1e3:.2f} |",
                      flush=True)


def profile(preset: str, B: int, args) -> None:
    """torch.profiler's CUDA kernel table of args.profile compiled bf16 steps at batch B (no graph)."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = memlm.build(preset).cuda().eval()
    decoder = static_decoder(model, B, args.prompt + args.new + 64, compile=True, dtype=torch.bfloat16, graph=False)
    prompt = torch.randint(0, 256, (B, args.prompt), device="cuda")
    with torch.no_grad():
        logits = decoder.prefill(prompt)
        for _ in range(16):  # compile, warm up
            logits = decoder.step(logits.argmax(-1, keepdim=True))
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.profile):
            logits = decoder.step(logits.argmax(-1, keepdim=True))
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / args.profile
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.profile):
                logits = decoder.step(logits.argmax(-1, keepdim=True))
            torch.cuda.synchronize()
    table = prof.key_averages()
    # the kernels themselves (an operator's row repeats its kernels' device time)
    cuda_us = sum(e.self_device_time_total for e in table if e.device_type == torch.autograd.DeviceType.CUDA) / args.profile
    print(f"## {preset} B{B}: {seconds * 1e3:.3f} ms a step without graph (launch-bound), kernels {cuda_us:.0f} us "
          f"a step; frames compiled {counters['stats']['unique_graphs']}, graph breaks "
          f"{sum(counters['graph_break'].values())}", flush=True)
    print(table.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=90), flush=True)


if __name__ == "__main__":
    main()

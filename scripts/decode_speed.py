"""Decode tokens/s of memlm's generation paths on a GPU, side by side in one run.

    python scripts/decode_speed.py [--presets vanilla-small seed-small] [--batch-sizes 1 16]

Paths: `eager` (the model's forward with a growing cache, memlm.generate(decode="eager")),
`graph` (static cache, eager step captured in a CUDA graph), `compiled graph` (the step
compiled with torch.compile, then captured), and `compiled graph bf16` (the same over a bf16
copy of the weights, outside autocast). bf16 autocast around everything; greedy; random
weights and prompt; the prompt's prefill is not timed. `memlm bench --decode graph` measures
the last path.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import memlm
from memlm.decode.static import StaticDecoder


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
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| preset | batch | path | new tokens/s | ms/token |")
    print("|---|---|---|---|---|")
    for preset in args.presets:
        torch.manual_seed(0)
        model = memlm.build(preset).cuda().eval()
        for B in args.batch_sizes:
            prompt = torch.randint(0, 256, (B, args.prompt), device="cuda")
            decoders = {
                "graph": StaticDecoder(model, B, args.prompt + args.new),
                "compiled graph": StaticDecoder(model, B, args.prompt + args.new, compile=True),
                "compiled graph bf16": StaticDecoder(model, B, args.prompt + args.new, compile=True,
                                                     dtype=torch.bfloat16),
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
            for name, fn in paths.items():
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    try:
                        seconds = timed(fn)
                    except Exception as error:  # report and go on: one failing path must not hide the rest
                        print(f"| {preset} | {B} | {name} | failed: {type(error).__name__}: {error} | |")
                        continue
                print(f"| {preset} | {B} | {name} | {B * args.new / seconds:,.0f} | {seconds / args.new * 1e3:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()

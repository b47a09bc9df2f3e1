"""Load a running `memlm serve`: requests/s and latency percentiles at several client counts.

    memlm serve runs/mem --port 8000 &
    python scripts/serve_load.py --url http://127.0.0.1:8000 --clients 1 8 64 --requests 64 \
        --max-tokens 64 [--sessions] [--json]

Each client sends its requests one after another (a new one as soon as the last answer is in);
with --sessions every client keeps one session, so each request continues that client's stream
from its memory. Prints, per client count: requests/s, completion tokens/s and the p50 / p99
latency of whole (non-streamed) completions. The numbers belong in BENCHMARKS.md with the
device, model and command; the script itself claims nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between order statistics."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def client_run(url: str, requests: int, body: dict, sessions: bool) -> list[tuple[float, int]]:
    """(latency seconds, completion tokens) of each of one client's requests."""
    out = []
    with httpx.Client(base_url=url, timeout=600) as client:
        session = client.post("/v1/sessions").json()["id"] if sessions else None
        for i in range(requests):
            started = time.perf_counter()
            response = client.post("/v1/completions", json={**body, "seed": i, **({"session": session} if session else {})})
            response.raise_for_status()
            out.append((time.perf_counter() - started, response.json()["usage"]["completion_tokens"]))
        if session:
            client.delete(f"/v1/sessions/{session}")
    return out


def measure(url: str, clients: int, requests: int, body: dict, sessions: bool) -> dict:
    per_client = max(1, requests // clients)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(lambda _: client_run(url, per_client, body, sessions), range(clients))
                   for r in rs]
    wall = time.perf_counter() - started
    latencies = [latency for latency, _ in results]
    return {"clients": clients, "requests": len(results), "seconds": wall, "requests_per_s": len(results) / wall,
            "tokens_per_s": sum(tokens for _, tokens in results) / wall,
            "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
            "mean_s": statistics.fmean(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--requests", type=int, default=64, help="requests per client count (split over clients)")
    parser.add_argument("--prompt", default="def main(")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--sessions", action="store_true", help="each client continues its own session")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": args.temperature}
    client_run(args.url, 2, body, args.sessions)  # warm-up: first requests allocate and compile
    rows = []
    for clients in args.clients:  # each row printed as soon as it is measured
        row = measure(args.url, clients, args.requests, body, args.sessions)
        rows.append(row)
        print(f"{row['clients']:>3} clients: {row['requests_per_s']:.2f} req/s, {row['tokens_per_s']:,.0f} tok/s, "
              f"p50 {row['p50_s'] * 1e3:.0f} ms, p99 {row['p99_s'] * 1e3:.0f} ms ({row['requests']} requests)",
              flush=True)
    if args.json:
        print(json.dumps({"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()

"""Load test of ``finechat serve``: throughput and latency with 1, 4 and 16 concurrent streaming clients.

    python benchmarks/serve_load.py                       # the default model, 1 / 4 / 16 clients
    python benchmarks/serve_load.py --model DIR --clients 1,8 --requests 8 --max-tokens 32

First measures in-process ``stream_chat`` speed (``ChatModel.stream_text``, the generator ``stream_chat``
wraps) on the same prompts, then starts the server in a subprocess on 127.0.0.1 and drives it with N
concurrent clients (each sends its next request as soon as the previous answer ends) over streaming
``/v1/chat/completions``. Prints, per level: output tokens/s, time to first token p50/p99, per-token
latency p50/p99, and the ratios 4:1 and 16:1 against one client, and one client's server speed against
in-process. Goals on a 2-core CPU: 16 clients >= 4x one client; one client >= 0.9x in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works, step by step.",
    "Give me a list of ten ideas for a weekend trip.",
    "Describe the water cycle to a ten-year-old.",
    "Write a poem about the sea at night.",
    "What are the benefits of learning a second language?",
    "Explain what a neural network is in simple words.",
    "Plan a three-day menu for a vegetarian family.",
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def in_process_request(bot, prompt: str, max_tokens: int) -> tuple[int, float]:
    """One in-process answer (``stream_text``, the generator ``stream_chat`` wraps): (tokens, seconds)."""
    stats: dict = {}
    start = time.perf_counter()
    for _ in bot.stream_text([{"role": "user", "content": prompt}], stats=stats, greedy=True,
                             max_new_tokens=max_tokens):
        pass
    return stats["completion_tokens"], time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(client, url: str, prompt: str, max_tokens: int, model: str = "default") -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
    end = time.perf_counter()
    first = first or end
    per_token = ((last or end) - first) / max(1, tokens - 1)
    return {"ttft": first - start, "per_token": per_token, "tokens": tokens}


async def drive(base: str, clients: int, requests: int, max_tokens: int, offset: int = 0, model: str = "default") -> dict:
    import httpx

    url = base + "/v1/chat/completions"
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(PROMPTS[(i + offset) % len(PROMPTS)])
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 4)

    async def worker(client) -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            results.append(await one_request(client, url, prompt, max_tokens, model))

    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    return _summary(clients, results, wall)


def _summary(clients: int, results: list[dict], wall: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    return {
        "results": results, "clients": clients, "requests": len(results), "tokens": tokens, "wall": wall, "tps": tokens / wall,
        "ttft50": percentile([r["ttft"] for r in results], 50), "ttft99": percentile([r["ttft"] for r in results], 99),
        "tok50": percentile([r["per_token"] for r in results], 50), "tok99": percentile([r["per_token"] for r in results], 99),
    }


def _merge_rows(rows: list[dict]) -> dict:
    return _summary(rows[0]["clients"], [r for row in rows for r in row["results"]], sum(r["wall"] for r in rows))


def wait_for_server(base: str, process: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not start in time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--requests", type=int, default=8, help="requests per level (at least one per client)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for both sides (OMP_NUM_THREADS); default: torch's own choice. "
                             "On a machine busy with other work, 1 avoids threads waiting on each other")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        env["OMP_NUM_THREADS"] = str(args.threads)
    levels = [int(c) for c in args.clients.split(",")]

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "finechat", "serve", "--model", args.model, "--port", str(port),
               "--max-batch-size", str(max(levels)), "--model-name", "default"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    baseline = None
    rows = []
    try:
        bot = None
        if not args.skip_in_process:
            import finechat

            bot = finechat.load(args.model)
            bot.chat("warm up", greedy=True, max_new_tokens=4)
        wait_for_server(base, server)
        asyncio.run(drive(base, 1, 1, 8))  # warm up
        if bot is not None and 1 in levels:
            # One client against in-process, request by request in turn, so that other load on the machine
            # weighs on both sides alike.
            print(f"1 client and in-process, {args.requests} requests each ...", file=sys.stderr, flush=True)
            local_tokens, local_time, singles = 0, 0.0, []
            for i in range(args.requests):
                prompt = PROMPTS[i % len(PROMPTS)]
                tokens, seconds = in_process_request(bot, prompt, args.max_tokens)
                local_tokens, local_time = local_tokens + tokens, local_time + seconds
                singles.append(asyncio.run(drive(base, 1, 1, args.max_tokens, offset=i)))
            baseline = local_tokens / local_time
            rows.append(_merge_rows(singles))
        for clients in levels:
            if clients == 1 and rows:
                continue
            print(f"{clients} client(s) ...", file=sys.stderr, flush=True)
            rows.append(asyncio.run(drive(base, clients, max(clients, args.requests), args.max_tokens)))
    finally:
        server.terminate()
        server.wait(timeout=30)

    one = next((r["tps"] for r in rows if r["clients"] == 1), None)
    print(f"\nfinechat serve load test: model={args.model}, max_tokens={args.max_tokens}, greedy, streaming, "
          f"{os.cpu_count()} CPUs, torch threads: {args.threads or 'default'}\n")
    print("| clients | requests | output tokens | output tok/s | TTFT p50 (s) | TTFT p99 (s) | ms/token p50 | "
          "ms/token p99 | x one client |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['tps'] / one:.2f}" if one else "-"
        print(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['tps']:.1f} | {r['ttft50']:.2f} | "
              f"{r['ttft99']:.2f} | {r['tok50'] * 1000:.0f} | {r['tok99'] * 1000:.0f} | {ratio} |")
    print()
    if baseline:
        print(f"in-process stream_chat: {baseline:.1f} tok/s")
    by_clients = {r["clients"]: r["tps"] for r in rows}
    if one and 4 in by_clients:
        print(f"throughput 4:1  = {by_clients[4] / one:.2f}x")
    if one and 16 in by_clients:
        print(f"throughput 16:1 = {by_clients[16] / one:.2f}x  (goal >= 4x)")
    if one and baseline:
        print(f"server 1 client / in-process = {one / baseline:.2f}x  (goal >= 0.9x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

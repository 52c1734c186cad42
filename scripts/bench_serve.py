"""Serving speed: ``moe-local serve`` under N concurrent streaming clients vs the library's generate in-process.

    python scripts/bench_serve.py                          # 1 and 4 clients, tiny, torch, 1 thread
    python scripts/bench_serve.py --clients 1,4,8 --requests 8 --repeats 3 --backend mlx

A server process serves the embedded ``tiny`` model with four router adapters (the model's own last two
gates, perturbed; written to a temporary folder). Each client is a thread with the real ``openai``
client that streams its requests one after another (greedy, ``--max-tokens`` tokens, prompts from the
embedded task suite). Paths, taking turns in each repeat so that a drifting machine load touches them
alike:

- ``generate in-process``: the same prompts through ``m.stream`` in this process, one after another —
  the reference: what the model does without HTTP, queueing or adapter swaps (one model runs one
  request at a time either way);
- ``server, base``: every request names the base model;
- ``server, fixed adapter``: every request names the same adapter (its gates are swapped in and the
  base gates restored around each request);
- ``server, adapter per request``: request i names adapter i mod 4, so consecutive requests differ.

Requests/s = requests / wall time of the batch; time to first token (TTFT) = from sending a request to
its first piece of text (queueing included: with N clients a request waits for the others); inter-token
latency (ITL) = the gaps between consecutive text pieces. p50/p95 over every request of every repeat.
The last line times the swap alone: ``set_router_weights`` of an adapter and of the base gates back.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ADAPTERS = 4


def percentile(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def make_adapters(m, root: Path, layers: int = 2) -> dict[str, Path]:
    """ADAPTERS adapters of the model's last ``layers`` MoE layers: its gates plus seeded noise of their spread."""
    import numpy as np

    from moe_local.tuning.adapter import write_adapter

    tuned = m.spec.last_moe_layers(layers)
    base = m.get_router_weights(tuned)
    out = {}
    for i in range(ADAPTERS):
        rng = np.random.default_rng(i)
        weights = {k: w + w.std() * rng.standard_normal(w.shape).astype(np.float32) for k, w in base.items()}
        out[f"a{i}"] = root / f"a{i}"
        write_adapter(out[f"a{i}"], weights, m.spec, tuned, method="bench", hyperparameters={"seed": i})
    return out


def prompts(n: int) -> list[str]:
    from moe_local.checkpoint import BUILTIN_MODELS

    suite = BUILTIN_MODELS["tiny"].parent / "suite" / "test_seen.jsonl"
    return [json.loads(line)["question"] for line in suite.read_text().splitlines()[:n]]


class Timings:
    """Per-request TTFT, the ITL gaps and the generated tokens, gathered from any number of threads."""

    def __init__(self):
        self.ttft, self.itl, self.tokens, self.lock = [], [], 0, threading.Lock()

    def record(self, start: float, times: list[float], tokens: int) -> None:
        with self.lock:
            self.ttft.append(times[0] - start)
            self.itl.extend(b - a for a, b in zip(times, times[1:]))
            self.tokens += tokens


def in_process(m, texts: list[str], max_tokens: int, timings: Timings) -> tuple[float, int]:
    """(wall seconds, tokens generated) of the texts answered one after another."""
    start_all, tokens = time.perf_counter(), timings.tokens
    for text in texts:
        start = time.perf_counter()
        run = m.stream(text, max_tokens=max_tokens)
        times = [time.perf_counter() for piece in run if piece]
        timings.record(start, times, run.stats.generation_tokens)
    return time.perf_counter() - start_all, timings.tokens - tokens


def served(client_for, names, texts, clients: int, max_tokens: int, timings: Timings) -> tuple[float, int]:
    """(wall seconds, tokens generated) of the texts sent by ``clients`` streaming clients at once."""

    def one_client(c: int) -> None:
        client = client_for()
        for i in range(c, len(texts), clients):
            start = time.perf_counter()
            stream = client.chat.completions.create(
                model=names[i % len(names)],
                messages=[{"role": "user", "content": texts[i]}],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            times, tokens = [], 0
            for chunk in stream:  # timed as they arrive
                if chunk.choices and chunk.choices[0].delta.content:
                    times.append(time.perf_counter())
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            timings.record(start, times, tokens)

    start_all, tokens = time.perf_counter(), timings.tokens
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one_client, range(clients)))
    return time.perf_counter() - start_all, timings.tokens - tokens


def start_server(args, adapters: dict, log: Path) -> tuple[subprocess.Popen, str]:
    options = [x for name, path in adapters.items() for x in ("--adapter", f"{name}={path}")]
    command = [sys.executable, "-m", "moe_local", "serve", "--model", "tiny", "--backend", args.backend, *options]
    command += ["--port", "0", "--queue-size", str(max(args.clients) + 1)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as f:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=f, env=env)
    while not (found := re.search(r"at (http://\S+/v1)", log.read_text())):
        if process.poll() is not None:
            sys.exit(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return process, found.group(1)


def swap_seconds(m, adapter: Path, repeats: int = 200) -> float:
    from moe_local.tuning.adapter import read_adapter

    weights, _ = read_adapter(adapter)
    base = {name: w for name, w in m.get_router_weights().items() if name in weights}
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        m.set_router_weights(weights)
        m.set_router_weights(base)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--requests", type=int, default=8, help="requests per batch (all clients together)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="torch", choices=["torch", "mlx"])
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads, here and in the server")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import openai

    import moe_local

    if args.backend == "torch":
        import torch

        torch.set_num_threads(args.threads)
    m = moe_local.load("tiny", backend=args.backend)
    texts = prompts(args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(m, Path(tmp))
        process, url = start_server(args, adapters, Path(tmp) / "server.log")
        try:
            report(args, m, texts, adapters, lambda: openai.OpenAI(base_url=url, api_key="-", max_retries=0))
        finally:
            process.terminate()
            process.wait()


def report(args, m, texts, adapters, client_for) -> None:
    paths = {
        "server, base": ["tiny"],
        "server, fixed adapter": ["a0"],
        "server, adapter per request": list(adapters),
    }
    rows = {(1, "generate in-process"): ([], Timings())}
    for clients in args.clients:
        for path in paths:
            rows[(clients, path)] = ([], Timings())
    served(client_for, ["tiny"], texts, 1, args.max_tokens, Timings())  # warm-up
    in_process(m, texts[:2], args.max_tokens, Timings())
    for _ in range(args.repeats):
        batches, timings = rows[(1, "generate in-process")]
        batches.append(in_process(m, texts, args.max_tokens, timings))
        for clients in args.clients:
            for path, names in paths.items():
                batches, timings = rows[(clients, path)]
                batches.append(served(client_for, names, texts, clients, args.max_tokens, timings))
    print(
        f"# {args.backend}, {args.threads} thread(s), model tiny, {len(texts)} requests of at most {args.max_tokens} "
        f"tokens per batch, greedy, {args.repeats} repeats; requests/s and tokens/s: median of the batches"
    )
    print()
    print("| clients | path | requests/s | tokens/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for (clients, path), (batches, t) in rows.items():
        requests = statistics.median(len(texts) / seconds for seconds, _ in batches)
        tokens = statistics.median(n / seconds for seconds, n in batches)
        ms = [1e3 * percentile(v, q) for v in (t.ttft, t.itl) for q in (0.5, 0.95)]
        cells = " | ".join(f"{x:.1f}" for x in ms)
        print(f"| {clients} | {path} | {requests:.2f} | {tokens:.0f} | {cells} |")
    print()
    print(f"adapter swap alone (set_router_weights, adapter then base): {swap_seconds(m, adapters['a0']) * 1e6:.0f} µs")


if __name__ == "__main__":
    main()

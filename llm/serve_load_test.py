"""N concurrent streaming clients against a running llm.serve: time to first token and
inter-token latency, p50 and p99.

    python -m llm.serve --workdir=/tmp/default --port=8000 --max_len=256 &
    python -m llm.serve_load_test --port=8000 --clients=16 --requests=64 --max_tokens=32

Each client sends its share of the requests one after another (streaming, temperature 0, a
prompt drawn from --prompts) and records, per request, the time from sending to the first
non-empty text chunk and the gaps between later chunks. Prints the percentiles, the requests
that failed (with their status), and tokens per second over the run.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import aiohttp
import numpy as np
from absl import app, flags

PROMPTS = (
    "The list type",
    "def main(argv):\n    ",
    "A dictionary maps keys to values. To add an entry,",
    "Exceptions are raised when",
    (
        "In this section we describe how the module handles files, sockets and the other "
        "resources it opens, and what happens when one of them fails while it is in use"
    ),
)


async def one_request(session, url, headers, body) -> tuple[float | None, list[float], int, str]:
    """-> (time to first token, inter-token gaps, chunks received, error or "")."""
    start = time.perf_counter()
    first, last, gaps, chunks = None, None, [], 0
    async with session.post(url, json=body, headers=headers) as response:
        if response.status != 200:
            return None, [], 0, f"{response.status}: {(await response.text())[:200]}"
        async for line in response.content:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            if not json.loads(line[6:])["choices"][0]["text"]:
                continue
            now = time.perf_counter()
            if first is None:
                first = now - start
            else:
                gaps.append(now - last)
            last, chunks = now, chunks + 1
    return first, gaps, chunks, ""


async def run(url: str, clients: int, requests: int, max_tokens: int, api_key: str | None):
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results = []

    async def client(index: int, session):
        for i in range(index, requests, clients):
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens}
            body.update(temperature=0, stream=True)
            results.append(await one_request(session, url, headers, body))

    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(c, session) for c in range(clients)))
        return results, time.perf_counter() - start


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    url = f"http://{f.host}:{f.port}/v1/completions"
    results, seconds = asyncio.run(run(url, f.clients, f.requests, f.max_tokens, f.api_key))
    ok = [r for r in results if not r[3]]
    ttft = np.array([r[0] for r in ok if r[0] is not None]) * 1000
    itl = np.array([g for r in ok for g in r[1]]) * 1000
    chunks = sum(r[2] for r in ok)
    print(
        f"{len(results)} requests from {f.clients} clients in {seconds:.1f} s, {len(ok)} ok; "
        f"{chunks / seconds:.1f} text chunks/s; load average {os.getloadavg()[0]:.1f}"
    )
    for name, values in (("time to first token", ttft), ("inter-token latency", itl)):
        if values.size:
            p50, p99 = np.percentile(values, [50, 99])
            print(f"{name}: p50 {p50:.0f} ms, p99 {p99:.0f} ms ({values.size} samples)")
    for r in results:
        if r[3]:
            print("failed:", r[3])


if __name__ == "__main__":
    flags.DEFINE_string("host", "127.0.0.1", "Server address.")
    flags.DEFINE_integer("port", 8000, "Server port.")
    flags.DEFINE_integer("clients", 8, "Concurrent clients.")
    flags.DEFINE_integer("requests", 32, "Requests in all.")
    flags.DEFINE_integer("max_tokens", 32, "Tokens per request.")
    flags.DEFINE_string("api_key", None, "Bearer token, if the server wants one.")
    app.run(main)

"""Load / leak check: rounds of 200 concurrent mixed clients against a real server.

    python -m bench.load --checkpoint checkpoints/default [--clients 200] [--rounds 3]

Each round starts every client at once, a quarter of each kind: a full stream, a
non-streaming request, a stream dropped after two events, an invalid request.
After each round the server must drain (running and waiting back to 0); the line
printed per round gives the statuses seen, unexpected ones, drain time and the
server's resident memory, and with more than one round the last line the RSS growth
from round 1 to the last round (a leak shows as steady growth). Loopback only; bounded by --timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.cli import (
    add_checkpoint,
    add_device,
    at_most,
    bench_parser,
    check_device,
    exit_on_signals,
    positive_float,
    positive_int,
)
from bench.serve import MAX_CLIENTS, running_server, within_timeout
from bench.timing import run_async

EXPECTED = {"stream": {200}, "json": {200}, "dropped": {200}, "invalid": {422}}
KINDS = tuple(EXPECTED)


def gauges(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    wanted = {
        "pocketgpt_requests_running",
        "pocketgpt_requests_waiting",
        "process_resident_memory_bytes",
    }
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in wanted
    }


async def one_client(client: httpx.AsyncClient, kind: str, i: int) -> tuple[str, int]:
    """(kind, status); a stream that ends without `data: [DONE]` counts as status -1."""
    body = {"prompt": f"Request {i} says", "max_tokens": 32, "seed": i, "temperature": 0.8}
    if kind in ("invalid", "json"):
        invalid = {"max_tokens": 0} if kind == "invalid" else {}
        return kind, (await client.post("/v1/generate", json=body | invalid)).status_code
    events = 0
    async with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return kind, response.status_code
            json.loads(line.removeprefix("data: "))
            events += 1
            if kind == "dropped" and events == 2:
                return kind, response.status_code  # leaving the block drops the stream
    return kind, -1


async def one_round(base_url: str, clients: int, timeout: float) -> Counter:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        jobs = [one_client(client, KINDS[i % len(KINDS)], i) for i in range(clients)]
        results = await within_timeout(asyncio.gather(*jobs), timeout, f"{clients} clients")
    return Counter(results)


def wait_drained(base_url: str, timeout: float) -> float:
    start = time.monotonic()
    while True:
        g = gauges(base_url)
        if g["pocketgpt_requests_running"] == 0 and g["pocketgpt_requests_waiting"] == 0:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise SystemExit(f"the server did not drain within {timeout:.0f}s: {g}")
        time.sleep(0.05)  # polling interval


def main() -> None:
    exit_on_signals()
    parser = bench_parser("python -m bench.load", __doc__)
    add_checkpoint(parser)
    parser.add_argument(
        "--clients",
        type=at_most(MAX_CLIENTS, "the server's --max-queue"),
        default=200,
        help="concurrent clients in each round",
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=3, help="rounds, the server's RSS read after each"
    )
    add_device(parser)
    parser.add_argument("--timeout", type=positive_float, default=600.0, help="seconds per round")
    args = parser.parse_args()
    check_device(parser, args.device)
    rss, unexpected_total = [], 0
    with running_server(args.checkpoint, args.device, "auto") as base_url:
        for number in range(1, args.rounds + 1):
            seen = run_async(one_round(base_url, args.clients, args.timeout))
            drained = wait_drained(base_url, timeout=10)
            rss.append(gauges(base_url)["process_resident_memory_bytes"])
            unexpected = sum(n for (kind, code), n in seen.items() if code not in EXPECTED[kind])
            unexpected_total += unexpected
            statuses: Counter = Counter()
            for (_, code), n in seen.items():
                statuses[code] += n
            by_status = dict(sorted(statuses.items()))
            print(
                f"load round {number}: {args.clients} clients, statuses {by_status}, "
                f"unexpected {unexpected}, drained in {drained:.2f}s, "
                f"server RSS {rss[-1] / 2**20:.0f} MiB",
                flush=True,
            )
        if args.rounds > 1:  # one round has nothing to compare
            growth = rss[-1] / rss[0] - 1
            print(f"load: RSS after round {args.rounds} vs round 1: {100 * growth:+.1f}%")
    if unexpected_total:
        raise SystemExit(f"error: {unexpected_total} unexpected statuses (see the rounds above)")


if __name__ == "__main__":
    main()

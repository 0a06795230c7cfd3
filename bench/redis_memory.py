"""What sessions cost Redis: memory per session and the keys each one leaves, with how long they live.

    python bench/redis_memory.py [--sessions 100000] [--output bench/results.md]

Starts a redis-server of its own on a free loopback port (no persistence), then
runs jwtplus's own session calls against it through ``redis_store``: *--sessions*
logins of distinct subjects, one refresh of each, then one logout of each, and
reads ``INFO memory`` (``used_memory``) and the keys after each step. The calls are
the library's (``issue_tokens``, ``refresh_session``, ``end_session``), so the
keys are the ones a deployment writes; only HTTP is left out. Needs redis-server
and redis-py.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp.test_utils import make_mocked_request

import jwtplus

sys.path.insert(0, str(Path(__file__).resolve().parent))
from instructions import redis_server

SECRET = "bench secret of more than thirty-two bytes"  # noqa: S105 (a benchmark's own key)
Step = tuple[str, int, Counter[str], dict[str, float], dict[str, float]]
"""After which calls; Redis's used_memory_dataset; keys per kind; how long the first of each lives;
the mean MEMORY USAGE of up to 200 of each."""
BATCH = 50  # calls in flight at once: within redis-py's connection limit


def bearer(token: str) -> Any:
    return make_mocked_request("POST", "/", headers={"Authorization": f"Bearer {token}"})


async def measure(port: int, count: int) -> list[Step]:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(
        f"redis://127.0.0.1:{port}/0", socket_timeout=5, socket_connect_timeout=5
    )
    sessions = jwtplus.Sessions(
        manager=jwtplus.SecretManager(secret=SECRET), store=jwtplus.redis_store(client)
    )
    steps: list[Step] = []

    async def note(step: str) -> None:
        await client.connection_pool.disconnect()  # the server frees the buffers of idle connections
        await asyncio.sleep(0.2)
        used = int((await client.info("memory"))["used_memory_dataset"])
        kinds: Counter[str] = Counter()
        lives: dict[str, float] = {}
        sizes: dict[str, list[int]] = {}
        async for key in client.scan_iter(count=1000):
            kind = re.sub(r".*\}(\w+):.*", r"\1", key.decode())
            kinds[kind] += 1
            if kind not in lives:
                lives[kind] = (await client.pexpiretime(key)) / 1000 - time.time()
            if len(sample := sizes.setdefault(kind, [])) < 200:
                sample.append(int(await client.memory_usage(key, samples=0)))
        steps.append(
            (step, used, kinds, {k: lives[k] for k in kinds}, {k: sum(v) / len(v) for k, v in sizes.items()})
        )

    async def each(calls: list[Any]) -> list[Any]:
        done: list[Any] = []
        for start in range(0, len(calls), BATCH):
            done += await asyncio.gather(*(call() for call in calls[start : start + BATCH]))
        return done

    await client.flushall()
    await note("empty")
    pairs = await each(
        [
            lambda i=i: jwtplus.issue_tokens(sessions, f"user-{i}", {"username": f"user-{i}"})
            for i in range(count)
        ]
    )
    await note("logged in")
    renewed = await each([lambda p=p: jwtplus.refresh_session(bearer(p.refresh), sessions) for p in pairs])
    await note("refreshed once")
    await each([lambda p=p: jwtplus.end_session(bearer(p.refresh), sessions) for p in renewed])
    await note("logged out")
    await client.aclose()
    return steps


def table(count: int, steps: list[Step]) -> str:
    base = steps[0][1]
    lines = [
        f"### Redis memory of {count:,} sessions (bench/redis_memory.py, redis-server {REDIS_VERSION})",
        "",
        "| after | used_memory_dataset | per session | keys | per key kind: count, MEMORY USAGE, lifetime |",
        "|---|---:|---:|---:|---|",
    ]
    for step, used, kinds, lives, sizes in steps:
        described = "; ".join(
            f"`{kind}` {n:,}, {sizes[kind]:.0f} B, {lives[kind] / 86400:.1f} d"
            for kind, n in sorted(kinds.items())
        )
        lines.append(
            f"| {step} | {used / 2**20:.1f} MiB | {(used - base) / count:.0f} B | {sum(kinds.values()):,} "
            f"| {described or 'none'} |"
        )
    return "\n".join(lines) + "\n"


REDIS_VERSION = "?"


def main() -> None:
    global REDIS_VERSION
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--output", type=Path, help="append the table to this Markdown file")
    args = parser.parse_args()
    with redis_server(True) as port:
        import redis

        REDIS_VERSION = redis.Redis(port=port).info("server")["redis_version"]
        steps = asyncio.run(measure(port, args.sessions))
    text = table(args.sessions, steps)
    print(text)
    if args.output:
        with args.output.open("a") as out:
            out.write("\n" + text)


if __name__ == "__main__":
    main()

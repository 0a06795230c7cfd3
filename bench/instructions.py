"""Instructions per request, counted by valgrind's callgrind: the same on a busy machine as on a quiet one.

    python bench/instructions.py [--modes bare,jwtplus-setup,jwtplus-jwks] [--requests 1000]
    python bench/instructions.py --modes bare,jwtplus-fresh,jwtplus-sessions,jwtplus-redis --concurrency 50
    python bench/instructions.py --modes jwtplus-redis,jwtplus-cluster

Each mode's server (bench/servers.py, asyncio) runs under callgrind twice, answering
200 and then 200 + --requests requests with the reused token over one keep-alive
connection, then exits; the difference of the two totals, divided by --requests, is
what one request costs, start-up and shut-down cancelled out. Needs valgrind.
jwtplus-jwks gets an RS256 token of its identity provider, whose RSA key is made
once per run (its JWK Set is fetched before the server listens: bench/servers.py).
jwtplus-fresh gets a new token on every request (minted before the run), so each
one misses the verified-token cache. jwtplus-sessions and jwtplus-redis get an access
token of Sessions; jwtplus-redis's redis-server is started here, on a free loopback
port, and stopped at the end (needs redis-server and redis-py). jwtplus-redis-cached is
the same with ``redis_store(cache_for=1)``: one MGET a second, the other requests answered
from its copies. jwtplus-cluster is the
same server with a ``RedisCluster`` client (no retries, as redis_store demands;
replicas=1, its default for a cluster, which only writes wait for) on a cluster started
here too: six redis-servers on free loopback ports, three masters with a replica each,
joined by ``redis-cli --cluster create`` and in use once every node reports
cluster_state:ok with all 16384 slots and every replica is in sync (needs redis-cli).
Each of its requests is one MGET, to the master of the token's slot. --concurrency N
drives N keep-alive connections at once: each round sends one request on every
connection, then reads every answer, so the server has N requests in hand.

String hashing is randomised per process, and dict and set layouts with it: the same
code counts a few thousand instructions more or less from run to run. So each count is
taken under fixed hash seeds (--seeds, PYTHONHASHSEED), and the median is reported:
two versions of the code compared under the same seeds differ only by the code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwtplus

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from servers import IDP_CLAIMS, MODES, SESSION_MODES, SESSION_SETTINGS, idp_manager, new_idp_key  # noqa: E402

ALL_MODES = (*MODES, "jwtplus-fresh", *SESSION_MODES)

SECRET = "bench secret of more than thirty-two bytes"  # noqa: S105 (a benchmark's own key)
BASE = 200
BENCH_NOW = int(time.time()) // 86400 * 86400  # the same token all day: fixed jti, fixed instant


def free_port() -> int:
    (port,) = free_ports(1)
    return port


def free_ports(count: int) -> list[int]:
    """*count* distinct loopback ports that were free a moment ago (all held at once while picked)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def connect(port: int, timeout: float) -> socket.socket:
    """A connection to the server under callgrind, which takes a while to listen."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=60)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def answer_of(sock: socket.socket) -> None:
    """Read one answer to GET /hello from *sock*; it must be a 200."""
    answer = b""
    while b"Hello, world" not in answer:
        if b"\r\n\r\n" in answer and not answer.startswith(b"HTTP/1.1 200"):
            break  # an error answer never says hello: no use waiting for the socket's timeout
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError(f"the server closed the connection: {answer[:200]!r}")
        answer += chunk
    if not answer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"not a 200: {answer[:300]!r}")


def drive(port: int, requests: int, tokens: Callable[[int], str], connections: int = 1) -> None:
    """Send *requests* GET /hello (the i-th with ``tokens(i)``) over *connections* keep-alive connections,
    in rounds: one request on each connection, then every answer."""
    socks = [connect(port, 600) for _ in range(connections)]
    with contextlib.ExitStack() as stack:
        for sock in socks:
            stack.enter_context(sock)
        sent = 0
        while sent < requests:
            batch = socks[: requests - sent]
            for sock in batch:
                token = tokens(sent)
                sock.sendall(
                    f"GET /hello HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
                )
                sent += 1
            for sock in batch:
                answer_of(sock)


def instructions(
    mode: str,
    requests: int,
    tokens: Callable[[int], str],
    idp_key: str,
    directory: Path,
    seed: int,
    *,
    connections: int = 1,
    redis_port: int = 0,
) -> int:
    """Total instructions of one server run under callgrind that answers *requests* requests."""
    port = free_port()
    env = {
        **os.environ,
        "BENCH_SECRET": SECRET,
        "BENCH_IDP_KEY": idp_key,
        "BENCH_EXIT_AFTER": str(requests),
        "BENCH_PORT": str(port),
        "BENCH_REDIS_PORT": str(redis_port),
        "PYTHONHASHSEED": str(seed),
    }
    log = directory / f"{mode}-{requests}.log"
    command = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={directory / f'{mode}-{requests}.out'}",
        sys.executable,
        str(HERE / "servers.py"),
        mode,
        "asyncio",
    ]
    with log.open("w") as err:
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)  # noqa: S603
        try:
            drive(port, requests, tokens, connections)
            server.wait(timeout=600)
        finally:
            if server.poll() is None:
                server.kill()
    collected = re.search(r"Collected : (\d+)", log.read_text())
    if collected is None:
        raise RuntimeError(f"callgrind said no total for {mode}: {log.read_text()[-400:]}")
    return int(collected[1])


@contextlib.contextmanager
def redis_server(wanted: bool) -> Iterator[int]:
    """A redis-server of its own on a free loopback port (no persistence), stopped on the way out;
    0 when not *wanted*."""
    if not wanted:
        yield 0
        return
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("jwtplus-redis needs redis-server (Debian: apt-get install redis-server)")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
    try:
        connect(port, 30).close()
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextlib.contextmanager
def redis_cluster(wanted: bool) -> Iterator[int]:
    """A Redis Cluster of its own, three masters and a replica of each on free loopback ports (no
    persistence), stopped on the way out; yields one node's port, 0 when not *wanted*."""
    if not wanted:
        yield 0
        return
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if binary is None or cli is None:
        sys.exit("jwtplus-cluster needs redis-server and redis-cli (Debian: apt-get install redis-server)")
    import redis

    ports = free_ports(12)  # a client port and a cluster bus port for each of six nodes
    nodes = list(zip(ports[:6], ports[6:], strict=True))
    with tempfile.TemporaryDirectory() as directory:
        servers = []
        try:
            for port, bus in nodes:
                command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory]
                command += ["--cluster-enabled", "yes", "--cluster-port", str(bus)]
                command += ["--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "1000"]
                command += ["--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0"]
                server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
                servers.append(server)
            for port, _ in nodes:
                connect(port, 30).close()
            create = [cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port, _ in nodes)]
            create += ["--cluster-replicas", "1", "--cluster-yes"]  # the first three become the masters
            subprocess.run(create, check=True, stdout=subprocess.DEVNULL)  # noqa: S603
            clients = [redis.Redis(host="127.0.0.1", port=port) for port, _ in nodes]
            deadline = time.monotonic() + 60
            while not all(cluster_ready(client) for client in clients):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        "the Redis Cluster was not ready (all slots, replicas in sync) in 60 s"
                    )
                time.sleep(0.1)
            for client in clients:
                client.close()
            yield nodes[0][0]
        finally:
            for server in servers:
                server.terminate()
            for server in servers:
                server.wait(timeout=30)


def cluster_ready(node: Any) -> bool:
    """Whether a cluster node (a redis-py client) sees every slot served, and is a master with its
    replica attached or a replica whose link to its master is up."""
    cluster, replication = node.cluster("INFO"), node.info("replication")
    if cluster.get("cluster_state") != "ok" or int(cluster.get("cluster_slots_ok", 0)) != 16384:
        return False
    if replication["role"] == "master":
        return int(replication["connected_slaves"]) == 1 and replication["slave0"]["state"] == "online"
    return bool(replication["master_link_status"] == "up")


def ratio(bare: float | None, count: float) -> str:
    """Bare aiohttp's count divided by a mode's, as the tables print it (a dash when bare did not run)."""
    return f"{bare / count:.2f}\u00d7" if bare else "\u2014"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", default="bare,passthrough,jwtplus,jwtplus-setup,jwtplus-jwks")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--seeds", default="0,1,2", help="PYTHONHASHSEED values; the median is reported")
    parser.add_argument("--output", type=Path, help="append the table to this Markdown file")
    parser.add_argument("--concurrency", type=int, default=1, help="keep-alive connections driven at once")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("bench/instructions.py needs valgrind (Debian: apt-get install valgrind)")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    modes = args.modes.split(",")
    if unknown := [mode for mode in modes if mode not in ALL_MODES]:
        sys.exit(
            f"bench/instructions.py: unknown modes {', '.join(unknown)}: choose from {', '.join(ALL_MODES)}"
        )
    if args.concurrency < 1 or BASE % args.concurrency or args.requests % args.concurrency:
        sys.exit(f"--concurrency must divide {BASE} and --requests")
    manager = jwtplus.SecretManager(secret=SECRET)
    hs256 = manager.encode({"username": "bench", "jti": "bench"}, now=BENCH_NOW)
    idp_key = new_idp_key() if "jwtplus-jwks" in modes else ""
    rs256 = idp_manager(idp_key).encode({**IDP_CLAIMS, "jti": "bench"}, now=BENCH_NOW) if idp_key else ""
    fresh = [manager.encode({"username": "bench"}, now=BENCH_NOW) for _ in range(BASE + args.requests)]
    sessions = jwtplus.Sessions(manager=manager, **SESSION_SETTINGS)
    session_token = asyncio.run(jwtplus.issue_tokens(sessions, "bench", now=BENCH_NOW)).access
    token_of: dict[str, Callable[[int], str]] = {
        "jwtplus-jwks": lambda i: rs256,
        "jwtplus-fresh": fresh.__getitem__,
        "jwtplus-sessions": lambda i: session_token,
        "jwtplus-redis": lambda i: session_token,
        "jwtplus-redis-cached": lambda i: session_token,
        "jwtplus-cluster": lambda i: session_token,
    }
    per_request: dict[str, float] = {}
    with (
        tempfile.TemporaryDirectory() as scratch,
        redis_server(bool({"jwtplus-redis", "jwtplus-redis-cached"} & set(modes))) as redis_port,
        redis_cluster("jwtplus-cluster" in modes) as cluster_port,
    ):
        for mode in modes:
            counts = []
            tokens = token_of.get(mode, lambda i: hs256)
            for seed in seeds:
                run = functools.partial(
                    instructions,
                    mode,
                    tokens=tokens,
                    idp_key=idp_key,
                    directory=Path(scratch),
                    seed=seed,
                    connections=args.concurrency,
                    redis_port=cluster_port if mode == "jwtplus-cluster" else redis_port,
                )
                low, high = run(BASE), run(BASE + args.requests)
                counts.append((high - low) / args.requests)
            per_request[mode] = statistics.median(counts)
            each = ", ".join(f"{count:,.0f}" for count in counts)
            print(f"  {mode:<14} {per_request[mode]:>10,.0f} instructions per request ({each})", flush=True)
    bare = per_request.get("bare")
    lines = [
        f"Instructions per request (callgrind, asyncio, {args.concurrency} keep-alive connection(s); "
        f"median over PYTHONHASHSEED {args.seeds}), and bare aiohttp's count divided by the mode's:",
        "",
        "| mode | instructions per request | ratio to bare |",
        "|---|---:|---:|",
        *(f"| {mode} | {count:,.0f} | {ratio(bare, count)} |" for mode, count in per_request.items()),
        "",
    ]
    table = "\n".join(lines)
    print(table)
    if args.output:
        with args.output.open("a") as out:
            out.write("\n" + table)


if __name__ == "__main__":
    main()

"""Instructions per request, counted by valgrind's callgrind: the same on a busy machine as on a quiet one.

    python bench/instructions.py [--modes bare,jwtplus-setup,jwtplus-jwks] [--requests 1000]

Each mode's server (bench/servers.py, asyncio) runs under callgrind twice, answering
200 and then 200 + --requests requests with the reused token over one keep-alive
connection, then exits; the difference of the two totals, divided by --requests, is
what one request costs, start-up and shut-down cancelled out. Needs valgrind.
jwtplus-jwks gets an RS256 token of its identity provider, whose RSA key is made
once per run (its JWK Set is fetched before the server listens: bench/servers.py).

String hashing is randomised per process, and dict and set layouts with it: the same
code counts a few thousand instructions more or less from run to run. So each count is
taken under fixed hash seeds (--seeds, PYTHONHASHSEED), and the median is reported:
two versions of the code compared under the same seeds differ only by the code.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jwtplus

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from servers import IDP_CLAIMS, MODES, idp_manager, new_idp_key  # noqa: E402

SECRET = "bench secret of more than thirty-two bytes"  # noqa: S105 (a benchmark's own key)
BASE = 200
BENCH_NOW = int(time.time()) // 86400 * 86400  # the same token all day: fixed jti, fixed instant


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def drive(port: int, requests: int, token: str, timeout: float = 600) -> None:
    """Send *requests* GET /hello over one connection, each after the previous answer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=60)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    request = f"GET /hello HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    with sock:
        for _ in range(requests):
            sock.sendall(request)
            answer = b""
            while b"Hello, world" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError(f"the server closed the connection: {answer[:200]!r}")
                answer += chunk
            if not answer.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"not a 200: {answer[:200]!r}")


def instructions(mode: str, requests: int, token: str, idp_key: str, directory: Path, seed: int) -> int:
    """Total instructions of one server run under callgrind that answers *requests* requests."""
    port = free_port()
    env = {
        **os.environ,
        "BENCH_SECRET": SECRET,
        "BENCH_IDP_KEY": idp_key,
        "BENCH_EXIT_AFTER": str(requests),
        "BENCH_PORT": str(port),
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
            drive(port, requests, token)
            server.wait(timeout=600)
        finally:
            if server.poll() is None:
                server.kill()
    collected = re.search(r"Collected : (\d+)", log.read_text())
    if collected is None:
        raise RuntimeError(f"callgrind said no total for {mode}: {log.read_text()[-400:]}")
    return int(collected[1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", default="bare,passthrough,jwtplus,jwtplus-setup,jwtplus-jwks")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--seeds", default="0,1,2", help="PYTHONHASHSEED values; the median is reported")
    parser.add_argument("--output", type=Path, help="append the table to this Markdown file")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("bench/instructions.py needs valgrind (Debian: apt-get install valgrind)")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    modes = args.modes.split(",")
    if unknown := [mode for mode in modes if mode not in MODES]:
        sys.exit(f"bench/instructions.py: unknown modes {', '.join(unknown)}: choose from {', '.join(MODES)}")
    hs256 = jwtplus.SecretManager(secret=SECRET).encode({"username": "bench", "jti": "bench"}, now=BENCH_NOW)
    idp_key = new_idp_key() if "jwtplus-jwks" in modes else ""
    rs256 = idp_manager(idp_key).encode({**IDP_CLAIMS, "jti": "bench"}, now=BENCH_NOW) if idp_key else ""
    per_request: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for mode in modes:
            counts = []
            for seed in seeds:
                token = rs256 if mode == "jwtplus-jwks" else hs256
                low = instructions(mode, BASE, token, idp_key, Path(scratch), seed)
                high = instructions(mode, BASE + args.requests, token, idp_key, Path(scratch), seed)
                counts.append((high - low) / args.requests)
            per_request[mode] = statistics.median(counts)
            each = ", ".join(f"{count:,.0f}" for count in counts)
            print(f"  {mode:<14} {per_request[mode]:>10,.0f} instructions per request ({each})", flush=True)
    bare = per_request.get("bare")
    lines = [
        "Instructions per request (callgrind, asyncio, reused token, one keep-alive connection; median over",
        f"PYTHONHASHSEED {args.seeds}), and bare aiohttp's count divided by the mode's:",
        "",
        "| mode | instructions per request | ratio to bare |",
        "|---|---:|---:|",
        *(
            f"| {mode} | {count:,.0f} | {(bare / count if bare else float('nan')):.2f}\u00d7 |"
            for mode, count in per_request.items()
        ),
        "",
    ]
    table = "\n".join(lines)
    print(table)
    if args.output:
        with args.output.open("a") as out:
            out.write("\n" + table)


if __name__ == "__main__":
    main()

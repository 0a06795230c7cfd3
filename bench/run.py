"""Benchmark jwtplus against bare aiohttp and its peers: ``make bench``, or ``python bench/run.py``.

One server process per mode and event loop (bench/servers.py), pinned to one CPU with taskset; wrk
on the other CPU, 1 thread, keep-alive connections. On a shared machine a neighbour can slow a run
by a third, so no mode is compared with a median of bare runs taken minutes apart: for each loop
and token pattern, every mode runs right after a run of bare aiohttp (bare, mode, bare, mode, ...),
and each such adjacent pair gives one ratio, the mode's requests per second divided by bare's (and
one in the server's own CPU time per request, bare's divided by the mode's). Each round measures
one pair per mode, loop and pattern, the modes in an order rotated from round to round, so a
mode's pairs are spread over the whole run rather than bunched in one burst of a neighbour's. The
report quotes, per cell, the median of the mode's pairwise ratios and their spread: their range,
from the lowest to the highest.

The noise rule: one pass-through middleware ("passthrough" mode) costs a few percent of bare's
time (callgrind: 0.94x), so a column where its median ratio, in either view and as printed, lands
outside 0.90 to 1.00x was disturbed by more than the differences it should show. The report marks
such a column NOISY, in its table header and in a line of its own; the exit status stays 0 unless
--strict (BENCH_STRICT=1) is given, which exits 1 after writing the report.

Token patterns: "reused" (every request carries the same valid token, as real clients do) and
"fresh" (every request a different pre-minted token, the worst case for a token cache; each
server gets its own run of the token file, so no server that verifies tokens sees one twice
while the file lasts; bare, which never reads them and runs once per pair, goes round it).

Before every measured run, bare's included, one real request checks that the mode answers 200
"Hello, world" to the token: a mode answering 401 aborts the benchmark, since a benchmark of
refused requests measures nothing. A wrk run with any non-2xx answer or socket error aborts it too.
A micro benchmark of encode and decode against PyJWT called directly comes first (HS256; EdDSA,
ES256 and RS256 with one key on both sides; jwtplus's verified-token cache in front of EdDSA);
--micro-only runs just that.

Every mode gets HS256 tokens minted by jwtplus with the servers' secret, except jwtplus-jwks, a
resource server that gets RS256 tokens of its stand-in identity provider (bench/servers.py).

Settings (flags, or BENCH_* environment variables; see --help). A quick look:
BENCH_ROUNDS=1 BENCH_DURATION=2 make bench.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hmac
import http.client
import itertools
import os
import platform
import re
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import jwt

import jwtplus

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from instructions import redis_server  # noqa: E402
from servers import (  # noqa: E402
    BODY,
    IDP_CLAIMS,
    LOOPS,
    MODE_LABELS,
    MODES,
    PATH,
    SESSION_SETTINGS,
    idp_manager,
    new_idp_key,
)

PATTERNS = ("reused", "fresh")
SESSION_RUN_MODES = ("jwtplus-sessions", "jwtplus-redis", "jwtplus-redis-cached")
"""Modes on request (--modes), not by default: Sessions with memory_store, or with redis_store on a
redis-server this script starts on a free loopback port (strict, or cache_for=1); their tokens are
access tokens of Sessions."""
REDIS_MODES = frozenset({"jwtplus-redis", "jwtplus-redis-cached"})
TOKEN_MODES = frozenset(
    {"jwtplus", "jwtplus-setup", "jwtplus-jwks", "aiohttp-jwt", "pyjwt", *SESSION_RUN_MODES}
)
"""Modes that verify the token, so a repeated "fresh" token could be a cache hit for them."""
OPTIONAL_MODES = frozenset({"aiohttp-jwt"})
"""Peers left out (with the reason printed) when they cannot even start; anything else aborts."""
CLAIMS = {"username": "bench"}
IDP_MODES = frozenset({"jwtplus-jwks"})
"""Modes that verify RS256 tokens of the stand-in identity provider instead of HS256 ones."""
MICRO_ALGORITHMS = ("EdDSA", "ES256", "RS256")
MICRO_ISSUER, MICRO_AUDIENCE = "https://issuer.bench.invalid", "bench-api"
TIMES = "\N{MULTIPLICATION SIGN}"
DASH = "\N{EN DASH}"
FRESH_PER_SECOND = 40_000
"""A fresh run gets at most this many tokens per second of it: more than any server here serves."""
CONTROL = "passthrough"
"""The noise control: a mode whose true cost relative to bare is known (callgrind: 0.94x)."""
CONTROL_BAND = (0.90, 1.00)
"""The control's median pairwise ratio must lie in this band, as printed, or its column is noisy."""


class BenchError(Exception):
    """The benchmark cannot give a meaningful number: the message says why."""


# ---- Settings ----


def _env(name: str, default: str) -> str:
    return os.environ.get(f"BENCH_{name}", default)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    def names(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
        def parse(value: str) -> tuple[str, ...]:
            chosen = tuple(v for v in value.replace(",", " ").split() if v)
            unknown = [v for v in chosen if v not in allowed]
            if unknown or not chosen:
                raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}")
            return chosen

        return parse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--rounds", type=int, default=int(_env("ROUNDS", "3")), help="rounds (BENCH_ROUNDS, 3)")
    add("--duration", type=int, default=int(_env("DURATION", "5")), help="seconds per run (5)")
    add("--warmup", type=int, default=int(_env("WARMUP", "1")), help="seconds before each run (1)")
    add("--connections", type=int, default=int(_env("CONNECTIONS", "50")), help="wrk connections (50)")
    add(
        "--tokens",
        type=int,
        default=int(_env("TOKENS", "0")),
        help="distinct fresh tokens (BENCH_TOKENS; 0: enough for a server at 10k req/s)",
    )
    add(
        "--modes",
        type=names((*MODES, *SESSION_RUN_MODES)),
        default=names(MODES)(_env("MODES", " ".join(MODES))),
        help=f"modes (BENCH_MODES; all of MODES by default; on request: {', '.join(SESSION_RUN_MODES)})",
    )
    add("--loops", type=names(LOOPS), default=names(LOOPS)(_env("LOOPS", " ".join(LOOPS))))
    add("--patterns", type=names(PATTERNS), default=names(PATTERNS)(_env("PATTERNS", " ".join(PATTERNS))))
    add("--server-cpu", type=int, default=int(_env("SERVER_CPU", "0")), help="CPU of the servers (0)")
    add("--wrk-cpu", type=int, default=int(_env("WRK_CPU", "1")), help="CPU of wrk (1)")
    add("--no-micro", action="store_true", default=_env("MICRO", "1") == "0", help="skip (BENCH_MICRO=0)")
    add(
        "--micro-only",
        action="store_true",
        help="run only the micro benchmark, print its table, write nothing",
    )
    add("--output", type=Path, default=Path(_env("OUTPUT", str(HERE / "results.md"))), help="report file")
    add(
        "--strict",
        action="store_true",
        default=_env("STRICT", "0") == "1",
        help="exit 1 when a column is noisy, after writing the report (BENCH_STRICT=1; needs passthrough)",
    )
    args = p.parse_args(argv)
    if args.no_micro and args.micro_only:
        p.error("--no-micro and --micro-only exclude each other")
    if "bare" not in args.modes or len(set(args.modes)) < 2:
        p.error("--modes must include bare and another mode: every ratio is to bare aiohttp")
    if args.strict and CONTROL not in args.modes:
        p.error(f"--strict needs the {CONTROL} mode: it is the noise control")
    if args.rounds < 1 or args.duration <= 0 or args.warmup < 0 or args.connections < 1:
        p.error("--rounds, --duration and --connections must be positive, --warmup not negative")
    args.modes = tuple(dict.fromkeys(args.modes))  # bare once: it is paired with each of the others
    if args.server_cpu == args.wrk_cpu:
        p.error("the servers and wrk need a CPU each")
    if not args.tokens:
        args.tokens = int(args.rounds * (args.warmup + args.duration) * 10_000)
    return args


# ---- The machine ----


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        hint = " (Debian: apt-get install wrk)" if name == "wrk" else ""
        raise BenchError(f"{name} is not on PATH{hint}")
    return path


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def jwtplus_revision() -> str:
    """The checkout's commit, and whether jwtplus.py differs from it ("" outside a git checkout)."""
    git, root = shutil.which("git"), HERE.parent
    if git is None or not (root / ".git").exists():
        return ""
    run = functools.partial(subprocess.run, capture_output=True, text=True, check=False, cwd=root)
    commit = run([git, "rev-parse", "--short", "HEAD"]).stdout.strip()
    dirty = run([git, "status", "--porcelain", "--", "jwtplus.py"]).stdout.strip()
    return f" (git {commit}{', jwtplus.py modified' if dirty else ''})" if commit else ""


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def describe_machine(wrk: str) -> list[str]:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk_out = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False).stdout  # noqa: S603
    wrk_version = wrk_out.split()[1] if len(wrk_out.split()) > 1 else "unknown"
    return [
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        f"load average at start {load_average()}",
        f"Python {platform.python_version()}, aiohttp {_version('aiohttp')}, PyJWT {_version('PyJWT')}, "
        f"uvloop {_version('uvloop')}, aiohttp-jwt {_version('aiohttp-jwt')}, "
        f"jwtplus {_version('aiohttp-jwtplus')}{jwtplus_revision()}, wrk {wrk_version}",
    ]


# ---- Micro benchmark ----


@dataclass(frozen=True)
class MicroRow:
    operation: str
    jwtplus_us: float
    pyjwt_us: float


def per_call_us(func: Callable[[], object], repeat: int = 7) -> float:
    """Median over *repeat* timings of about 0.2 s each, in CPU microseconds per call: the process's own
    CPU time, which a neighbour stealing the core does not inflate."""
    timer = timeit.Timer(func, timer=time.process_time)
    number, _ = timer.autorange()
    return statistics.median(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def compare(
    operation: str, ours: Callable[[], object], theirs: Callable[[], object], repeat: int = 7
) -> MicroRow:
    """*ours* (jwtplus) and *theirs* (PyJWT) timed in turns, *repeat* timings of about 0.2 s each, so
    that what a neighbour does to the caches falls on both sides alike; the medians, in CPU µs per call."""
    timers = [timeit.Timer(ours, timer=time.process_time), timeit.Timer(theirs, timer=time.process_time)]
    numbers = [timer.autorange()[0] for timer in timers]
    times: list[list[float]] = [[], []]
    for _ in range(repeat):
        for timer, number, seconds in zip(timers, numbers, times, strict=True):
            seconds.append(timer.timeit(number) / number * 1e6)
    return MicroRow(operation, statistics.median(times[0]), statistics.median(times[1]))


def micro(secret: str) -> tuple[list[MicroRow], float]:
    """jwtplus encode/decode against PyJWT's on the same claims and key, and HMAC-SHA256 alone."""
    manager = jwtplus.SecretManager(secret=secret)
    token = manager.encode(CLAIMS)
    claims = manager.decode(token)  # what jwtplus signs: iat, exp, jti and the payload
    if jwt.decode(token, secret, algorithms=["HS256"]) != claims:
        raise BenchError("PyJWT and jwtplus read different claims from the same token")
    rows = [
        compare(
            "HS256 encode",
            lambda: manager.encode(CLAIMS),
            lambda: jwt.encode(claims, secret, algorithm="HS256"),
        ),
        compare(
            "HS256 decode",
            lambda: manager.decode(token),
            lambda: jwt.decode(token, secret, algorithms=["HS256"]),
        ),
    ]
    for algorithm in MICRO_ALGORITHMS:
        rows += micro_asymmetric(algorithm)
    key, signing_input = secret.encode(), token.rpartition(".")[0].encode()
    return rows, per_call_us(lambda: hmac.digest(key, signing_input, "sha256"))


def _private_key(algorithm: str) -> Any:
    """A new private key for *algorithm*: Ed25519, EC P-256, or RSA of 2048 bits."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def micro_asymmetric(algorithm: str) -> list[MicroRow]:
    """jwtplus against PyJWT with one *algorithm* key: jwtplus loads its PEM, PyJWT gets the key objects
    (given PEM text, PyJWT would parse it on every call). Both check exp (required), iss and aud. For
    EdDSA, a row more: jwtplus's cached_decoder hitting, against PyJWT's full decode."""
    from cryptography.hazmat.primitives import serialization

    private = _private_key(algorithm)
    public = private.public_key()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")
    manager = jwtplus.SecretManager(
        algorithm=algorithm, keys=[pem], issuer=MICRO_ISSUER, audience=MICRO_AUDIENCE
    )
    token = manager.encode(CLAIMS)
    claims = manager.decode(token)
    headers = {"kid": jwt.get_unverified_header(token)["kid"]}
    checks: dict[str, Any] = {
        "algorithms": [algorithm],
        "audience": MICRO_AUDIENCE,
        "issuer": MICRO_ISSUER,
        "options": {"require": ["exp"]},
    }
    if jwt.decode(token, public, **checks) != claims:
        raise BenchError(f"PyJWT and jwtplus read different claims from the same {algorithm} token")
    if manager.decode(jwt.encode(claims, private, algorithm=algorithm, headers=headers)) != claims:
        raise BenchError(f"jwtplus refuses PyJWT's {algorithm} token, or reads other claims from it")
    rows = [
        compare(
            f"{algorithm} encode",
            lambda: manager.encode(CLAIMS),
            lambda: jwt.encode(claims, private, algorithm=algorithm, headers=headers),
        ),
        compare(
            f"{algorithm} decode",
            lambda: manager.decode(token),
            lambda: jwt.decode(token, public, **checks),
        ),
    ]
    if algorithm == "EdDSA":
        decode = jwtplus.cached_decoder(manager)
        decode(token, time.time())
        rows.append(
            compare(
                f"{algorithm} decode, cached_decoder hit (PyJWT: no cache)",
                lambda: decode(token, time.time()),
                lambda: jwt.decode(token, public, **checks),
            )
        )
        if decode.cache_info().misses != 1:
            raise BenchError("cached_decoder missed a token it had verified")
    return rows


def _ratio(row: MicroRow) -> str:
    ratio = row.jwtplus_us / row.pyjwt_us
    return f"{ratio:.2f}{TIMES}" if ratio >= 0.1 else f"{ratio:.4f}{TIMES} (1/{1 / ratio:,.0f})"


def micro_table(rows: list[MicroRow], hmac_us: float) -> list[str]:
    return [
        "Micro benchmark, no server (CPU µs per call, median of 7 timings taken in turns with PyJWT's; "
        "same claims and key; "
        "jwtplus's encode also stamps iat, exp and a random jti on every call, and iss and aud in the "
        "asymmetric rows, where both sides' decode checks exp, iss and aud, and PyJWT gets key objects, "
        "not PEM):",
        "",
        "| call | jwtplus | PyJWT | jwtplus / PyJWT |",
        "|---|---:|---:|---:|",
        *(f"| {r.operation} | {r.jwtplus_us:.1f} µs | {r.pyjwt_us:.1f} µs | {_ratio(r)} |" for r in rows),
        "",
        f"For scale: HMAC-SHA256 of a token's signing input alone takes {hmac_us:.2f} µs.",
    ]


# ---- Servers ----


@dataclass
class Server:
    mode: str
    loop: str
    process: subprocess.Popen[str]
    log: TextIO
    port: int = 0
    fresh_cursor: int = 0
    """Tokens of the fresh file this server has been sent (or may have been): the next run starts here."""
    fresh_repeated: bool = False


def start_servers(
    modes: Sequence[str],
    loops: Sequence[str],
    secret: str,
    idp_key: str,
    cpu: int,
    logs: Path,
    redis_port: int = 0,
) -> tuple[dict[tuple[str, str], Server], dict[str, str]]:
    """Start one server per mode and loop; return them and the optional modes left out, with why."""
    taskset = _tool("taskset")
    env = {
        **os.environ,
        "BENCH_SECRET": secret,
        "BENCH_IDP_KEY": idp_key,
        "BENCH_REDIS_PORT": str(redis_port),
    }
    servers: dict[tuple[str, str], Server] = {}
    left_out: dict[str, str] = {}
    try:
        for mode in modes:
            for loop in loops:
                log = (logs / f"{mode}-{loop}.log").open("w+")
                process = subprocess.Popen(  # noqa: S603
                    [taskset, "-c", str(cpu), sys.executable, str(HERE / "servers.py"), mode, loop],
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                    env=env,
                )
                servers[mode, loop] = Server(mode, loop, process, log)
        for (mode, loop), server in list(servers.items()):
            try:
                server.port = _read_port(server)
            except BenchError as exc:
                if mode not in OPTIONAL_MODES:
                    raise
                left_out[mode] = str(exc)
                stop_server(servers.pop((mode, loop)))
    except BaseException:
        stop_servers(servers.values())
        raise
    return servers, left_out


def _read_port(server: Server, timeout: float = 30) -> int:
    stdout = server.process.stdout
    assert stdout is not None
    ready, _, _ = select.select([stdout], [], [], timeout)
    line = stdout.readline() if ready else ""
    if line.strip().isdigit():
        return int(line)
    server.log.seek(0)
    last_line = (server.log.read().strip().splitlines() or ["(no output)"])[-1]
    what = "did not start" if ready else f"did not print its port within {timeout:.0f} s"
    raise BenchError(f"the {server.mode} server ({server.loop} loop) {what}: {last_line}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    if server.process.stdout is not None:
        server.process.stdout.close()
    server.log.close()


def stop_servers(servers: Iterable[Server]) -> None:
    for server in servers:
        stop_server(server)


def check(server: Server, token: str) -> None:
    """One real request with *token*: anything but 200 "Hello, world" aborts the benchmark."""
    if server.process.poll() is not None:
        raise BenchError(f"the {server.mode} server ({server.loop}) exited ({server.process.returncode})")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", PATH, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        status, body = response.status, response.read()
    finally:
        conn.close()
    if status != 200 or body != BODY.encode():
        raise BenchError(
            f"{MODE_LABELS[server.mode]} ({server.loop}) answered {status} {body[:120]!r} to a valid token, "
            f'not 200 "{BODY}": a benchmark of refused requests measures nothing, so it stops here'
        )


# ---- wrk ----


@dataclass(frozen=True)
class WrkResult:
    requests: int
    rps: float
    cpu_us: float
    """The server's CPU time (user + system) per request: robust to a noisy neighbour stealing the core."""


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk_run(
    wrk: list[str], server: Server, seconds: int, connections: int, pattern: str, tokens: TokenFile
) -> WrkResult:
    """Drive *server* for *seconds*; any non-2xx answer or socket error aborts the benchmark."""
    url = f"http://127.0.0.1:{server.port}{PATH}"
    command = [*wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s"]
    given = 0  # fresh tokens this run can send before it repeats one
    if pattern == "reused":
        command += ["-H", f"Authorization: Bearer {tokens.reused}", url]
    else:
        first = server.fresh_cursor % tokens.count
        given = min(tokens.count - first, int(seconds * FRESH_PER_SECOND) + connections)
        command += ["-s", str(HERE / "fresh_tokens.lua"), url, "--", str(tokens.path), str(first), str(given)]
    cpu_before = cpu_seconds(server.process.pid)
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)  # noqa: S603
    cpu = cpu_seconds(server.process.pid) - cpu_before
    out = done.stdout
    what = f"wrk against {MODE_LABELS[server.mode]} ({server.loop}, {pattern} token)"
    requests, rps = re.search(r"(\d+) requests in", out), re.search(r"Requests/sec:\s*([\d.]+)", out)
    if done.returncode or requests is None or rps is None:
        raise BenchError(f"{what} failed ({done.returncode}): {(done.stderr or out).strip()[-400:]}")
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        raise BenchError(f"{what}: {m[1]} of {requests[1]} answers were not 2xx, so the run measures nothing")
    if m := re.search(r"Socket errors: (.*)", out):
        raise BenchError(f"{what}: socket errors ({m[1]})")
    if cpu <= 0:
        raise BenchError(f"{what}: the server used no measurable CPU time; run longer (--duration)")
    result = WrkResult(int(requests[1]), float(rps[1]), cpu * 1e6 / max(1, int(requests[1])))
    if pattern == "fresh":  # every connection may hold one more request than wrk counts
        sent = result.requests + connections
        server.fresh_cursor += sent
        server.fresh_repeated |= sent > given or server.fresh_cursor > tokens.count
    return result


# ---- Tokens ----


@dataclass(frozen=True)
class TokenFile:
    reused: str
    path: Path
    count: int


def mint_tokens(encode: Callable[[], str], count: int, path: Path) -> TokenFile:
    """The reused token and *count* distinct fresh ones, each a call of *encode*; the fresh ones in *path*."""
    with path.open("w") as f:
        for _ in range(count):
            f.write(encode() + "\n")
    return TokenFile(encode(), path, count)


async def session_tokens(sessions: jwtplus.Sessions, count: int) -> list[str]:
    """*count* access tokens of *sessions*, each of a login of its own."""
    return [(await jwtplus.issue_tokens(sessions, "bench")).access for _ in range(count)]


def mint_all(
    modes: Sequence[str], secret: str, idp_key: str, count: int, directory: Path
) -> dict[str, TokenFile]:
    """Each mode's tokens: HS256 ones minted by jwtplus with the servers' secret, and for the modes of
    IDP_MODES RS256 ones of their identity provider (a few hundred µs each: RSA signing is slow)."""
    hs256 = jwtplus.SecretManager(secret=secret)
    print(f"minting {count:,} fresh HS256 tokens ...", flush=True)
    files = {"HS256": mint_tokens(lambda: hs256.encode(CLAIMS), count, directory / "fresh_tokens.txt")}
    if any(mode in SESSION_RUN_MODES for mode in modes):
        sessions = jwtplus.Sessions(manager=hs256, **SESSION_SETTINGS)
        print(f"minting {count:,} fresh access tokens of Sessions ...", flush=True)
        minted = iter(asyncio.run(session_tokens(sessions, count + 1)))
        files["session"] = mint_tokens(lambda: next(minted), count, directory / "fresh_session_tokens.txt")
    if any(mode in IDP_MODES for mode in modes):
        idp = idp_manager(idp_key)
        print(f"minting {count:,} fresh RS256 tokens of the identity provider ...", flush=True)
        files["RS256"] = mint_tokens(
            lambda: idp.encode(IDP_CLAIMS), count, directory / "fresh_idp_tokens.txt"
        )
    kind = {**dict.fromkeys(IDP_MODES, "RS256"), **dict.fromkeys(SESSION_RUN_MODES, "session")}
    return {mode: files[kind.get(mode, "HS256")] for mode in modes}


def next_fresh_token(server: Server, tokens: TokenFile) -> str:
    """The token the server's next fresh run would send first, used up by the check."""
    with tokens.path.open() as f:
        line = next(itertools.islice(f, server.fresh_cursor % tokens.count, None), "")
    server.fresh_cursor += 1
    return line.strip()


# ---- The run ----


@dataclass(frozen=True)
class Pair:
    """A run of bare aiohttp and the run of a mode right after it, in the same loop and pattern."""

    bare: WrkResult
    mode: WrkResult

    @property
    def rps_ratio(self) -> float:
        """The mode's requests per second divided by bare's."""
        return self.mode.rps / self.bare.rps

    @property
    def cpu_ratio(self) -> float:
        """Bare's CPU time per request divided by the mode's: the throughput ratio on a quiet core."""
        return self.bare.cpu_us / self.mode.cpu_us


@dataclass(frozen=True)
class Spread:
    """The median of some values, and their range (lowest and highest)."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """The spread of *values* (at least one)."""
        return cls(statistics.median(values), min(values), max(values))


@dataclass
class Results:
    """Every pair measured, by column and mode: all the report's numbers come from these."""

    pairs: dict[tuple[str, str, str], list[Pair]] = field(default_factory=dict)
    """(loop, pattern, mode) -> the mode's pairs with bare, one per round, in the order run."""

    def bare_runs(self, loop: str, pattern: str) -> list[WrkResult]:
        """Every bare run of one column: the first half of each of its pairs."""
        return [
            pair.bare
            for (lp, pt, _), pairs in self.pairs.items()
            if (lp, pt) == (loop, pattern)
            for pair in pairs
        ]

    def ratios(self, loop: str, pattern: str, mode: str, view: str) -> Spread:
        """The median and range of a mode's pairwise ratios, in the "rps" or the "cpu" view."""
        pairs = self.pairs[loop, pattern, mode]
        return Spread.of([p.rps_ratio if view == "rps" else p.cpu_ratio for p in pairs])


def rotated(modes: Sequence[str], by: int) -> list[str]:
    by %= len(modes)
    return [*modes[by:], *modes[:by]]


def benchmark(
    args: argparse.Namespace,
    servers: dict[tuple[str, str], Server],
    tokens_of: dict[str, TokenFile],
    modes: Sequence[str],
) -> Results:
    """Every round, loop and pattern: each mode but bare, in rotated order, run right after a bare run."""
    wrk = [_tool("taskset"), "-c", str(args.wrk_cpu), _tool("wrk")]

    def measure(mode: str, loop: str, pattern: str) -> WrkResult:
        """The 200-check, the warmup and the measured run of one mode."""
        server, tokens = servers[mode, loop], tokens_of[mode]
        token = tokens.reused if pattern == "reused" else next_fresh_token(server, tokens)
        check(server, token)
        if args.warmup:
            wrk_run(wrk, server, args.warmup, args.connections, pattern, tokens)
        return wrk_run(wrk, server, args.duration, args.connections, pattern, tokens)

    results = Results()
    others = [mode for mode in modes if mode != "bare"]
    for round_ in range(args.rounds):
        for loop in args.loops:
            for pattern in args.patterns:
                for mode in rotated(others, round_):
                    pair = Pair(measure("bare", loop, pattern), measure(mode, loop, pattern))
                    results.pairs.setdefault((loop, pattern, mode), []).append(pair)
                    print(
                        f"  round {round_ + 1}/{args.rounds}  {loop:<7}  {pattern:<6}  {mode:<14}"
                        f"bare {pair.bare.rps:>7,.0f} req/s {pair.bare.cpu_us:>6.1f} µs, "
                        f"mode {pair.mode.rps:>7,.0f} req/s {pair.mode.cpu_us:>6.1f} µs: "
                        f"{pair.rps_ratio:.2f}{TIMES} / {pair.cpu_ratio:.2f}{TIMES}",
                        flush=True,
                    )
    return results


# ---- The report ----


def _outside(ratio: float) -> bool:
    """Whether *ratio*, rounded as the report prints it, lies outside CONTROL_BAND."""
    low, high = CONTROL_BAND
    return not low <= round(ratio, 2) <= high


@dataclass(frozen=True)
class Noisy:
    """A column whose pass-through control fell outside CONTROL_BAND in at least one view."""

    loop: str
    pattern: str
    rps: Spread
    cpu: Spread

    def line(self) -> str:
        """The report's line for this column, naming the view or views that fell outside the band."""
        low, high = CONTROL_BAND
        views = [
            f"{spread.median:.2f}{TIMES} of bare by {name}"
            + (" (outside)" if _outside(spread.median) else "")
            for name, spread in (("req/s", self.rps), ("CPU time per request", self.cpu))
        ]
        return (
            f"NOISY: {self.loop}, {self.pattern} token: the pass-through control is at {views[0]} and "
            f"{views[1]}, where {low:.2f}{DASH}{high:.2f}{TIMES} is expected: this column's ratios are "
            "not to be trusted"
        )


def noisy_columns(args: argparse.Namespace, modes: Sequence[str], results: Results) -> list[Noisy]:
    """The columns where the control's median pairwise ratio, in either view and as printed, is
    outside CONTROL_BAND: a neighbour disturbed them more than the differences they should show."""
    if CONTROL not in modes:
        return []
    noisy = []
    for loop in args.loops:
        for pattern in args.patterns:
            rps, cpu = (results.ratios(loop, pattern, CONTROL, view) for view in ("rps", "cpu"))
            if _outside(rps.median) or _outside(cpu.median):
                noisy.append(Noisy(loop, pattern, rps, cpu))
    return noisy


def report(
    args: argparse.Namespace,
    machine: list[str],
    modes: Sequence[str],
    left_out: dict[str, str],
    results: Results,
    micro_rows: tuple[list[MicroRow], float] | None,
    repeated: list[str],
    token_count: int,
    noisy: list[Noisy],
) -> str:
    columns = [(loop, pattern) for loop in args.loops for pattern in args.patterns]
    noisy_at = {(n.loop, n.pattern) for n in noisy}
    low, high = CONTROL_BAND

    def table(view: str, number: Callable[[float], str], unit: str) -> list[str]:
        """One Markdown table in *view* ("rps" or "cpu"): per mode and column, the median of its
        pairwise ratios to bare, their range, and the mode's median value (*number*, then *unit*)."""
        header = [
            f"{loop}, {pattern} token" + (" (NOISY)" if (loop, pattern) in noisy_at else "")
            for loop, pattern in columns
        ]
        rows = ["| mode | " + " | ".join(header) + " |", "|---|" + "---:|" * len(columns)]
        for mode in modes:
            cells = []
            for loop, pattern in columns:
                if mode == "bare":
                    runs = Spread.of(
                        [r.rps if view == "rps" else r.cpu_us for r in results.bare_runs(loop, pattern)]
                    )
                    cells.append(
                        f"1.00{TIMES} ({number(runs.median)}{unit}; "
                        f"runs {number(runs.low)}{DASH}{number(runs.high)}{unit})"
                    )
                    continue
                pairs = results.pairs[loop, pattern, mode]
                value = statistics.median(p.mode.rps if view == "rps" else p.mode.cpu_us for p in pairs)
                r = results.ratios(loop, pattern, mode, view)
                cells.append(
                    f"{r.median:.2f}{TIMES} ({r.low:.2f}{DASH}{r.high:.2f}{TIMES}; {number(value)}{unit})"
                )
            rows.append(f"| {MODE_LABELS[mode]} | " + " | ".join(cells) + " |")
        return rows

    if CONTROL not in modes:
        noise = [f"Noise check: not made, since the {CONTROL} mode (the control) was not run."]
    elif noisy:
        noise = [f"**{n.line()}.**" for n in noisy] + [
            "",
            f"(The pass-through control should be at 0.94{TIMES} of bare, as callgrind counts it; a "
            f"column where it lands outside {low:.2f}{DASH}{high:.2f}{TIMES} was disturbed by a "
            "neighbour: run again on a quieter machine, or with more rounds.)",
        ]
    else:
        noise = [
            f"Noise check: the pass-through control is within {low:.2f}{DASH}{high:.2f}{TIMES} of bare in "
            "every column, by req/s and by CPU time per request."
        ]
    lines = [
        "# jwtplus benchmark",
        "",
        f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by bench/run.py (`make bench`); "
        f"load average at the end {load_average()}.",
        "",
        *(f"- {line}" for line in machine),
        f"- one server process per mode and loop on CPU {args.server_cpu}, wrk on CPU {args.wrk_cpu} "
        f"(taskset); wrk: 1 thread, {args.connections} keep-alive connections, `GET {PATH}` "
        f'answering "{BODY}"; HS256 tokens minted by jwtplus'
        + (
            ", except for jwtplus-jwks: RS256 tokens of an identity provider in the same process, whose "
            "JWK Set the server fetched before the first measured request"
            if any(mode in IDP_MODES for mode in modes)
            else ""
        ),
        f"- {args.rounds} round(s); in each, for every loop and token pattern, every mode runs right "
        "after a run of bare aiohttp (bare, mode, bare, mode, ...), the modes in an order rotated from "
        f"round to round; every run is {args.warmup} s of warmup then {args.duration} s measured",
        '- tokens: "reused" sends the same valid token on every request; "fresh" a different one on '
        f"every request ({token_count:,} distinct tokens; "
        + (f"too few: {', '.join(repeated)} saw some twice" if repeated else "no server saw one twice")
        + ")",
        "",
        *noise,
        "",
        "Each (bare run, mode run) pair gives one ratio, the mode's requests per second divided by "
        f"bare's; each cell gives the median of the mode's pairwise ratios, their min{DASH}max, and the "
        "mode's median requests per second (bare's row: its median over all its runs, and their "
        f"min{DASH}max); a column headed (NOISY) failed the noise check above:",
        "",
        *table("rps", "{:,.0f}".format, "/s"),
        "",
        "The same pairs measured by the server's own CPU time per request (user + system, from /proc),",
        "which a neighbour stealing the core does not inflate: bare aiohttp's CPU µs per request divided by",
        f"the mode's in each pair, i.e. the throughput ratio on a quiet core; median, min{DASH}max, and the",
        "mode's median CPU µs per request:",
        "",
        *table("cpu", "{:.0f}".format, " µs"),
    ]
    for mode, reason in left_out.items():
        lines += ["", f"{MODE_LABELS[mode]} was left out: {reason}"]
    if micro_rows is not None:
        lines += ["", *micro_table(*micro_rows)]
    lines += [
        "",
        "Each round's pair: bare's requests per second, then the mode's, and the pair's ratios "
        "(by req/s / by CPU time per request):",
        "",
        "| loop | token | mode | pairs |",
        "|---|---|---|---|",
    ]
    for loop, pattern in columns:
        for mode in modes:
            if mode == "bare":
                continue
            runs = ", ".join(
                f"{p.bare.rps:,.0f} → {p.mode.rps:,.0f} ({p.rps_ratio:.2f}{TIMES} / {p.cpu_ratio:.2f}{TIMES})"
                for p in results.pairs[loop, pattern, mode]
            )
            lines.append(f"| {loop} | {pattern} | {mode} | {runs} |")
    return "\n".join(lines) + "\n"


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(f"bench/run.py: stopped by signal {signum}")


def run_micro(args: argparse.Namespace, secret: str) -> tuple[list[MicroRow], float]:
    """The micro benchmark, pinned to wrk's CPU (idle while it runs)."""
    print("micro benchmark (encode/decode) ...", flush=True)
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {args.wrk_cpu})
    try:
        return micro(secret)
    finally:
        os.sched_setaffinity(0, cpus)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    started = time.monotonic()
    if max(args.server_cpu, args.wrk_cpu) >= (os.cpu_count() or 1):
        raise BenchError(f"CPUs {args.server_cpu} and {args.wrk_cpu} are needed; this machine has fewer")
    secret = secrets.token_urlsafe(32)
    if args.micro_only:
        print(
            f"Python {platform.python_version()}, PyJWT {_version('PyJWT')}, "
            f"cryptography {_version('cryptography')}, jwtplus{jwtplus_revision()}; "
            f"load average {load_average()}",
            flush=True,
        )
        print("\n" + "\n".join(micro_table(*run_micro(args, secret))), flush=True)
        return 0
    wrk = _tool("wrk")
    _tool("taskset")
    machine = describe_machine(wrk)
    print("\n".join(machine), flush=True)
    micro_rows = None if args.no_micro else run_micro(args, secret)
    idp_key = new_idp_key() if any(mode in IDP_MODES for mode in args.modes) else ""
    with (
        tempfile.TemporaryDirectory(prefix="jwtplus-bench-") as tmp,
        redis_server(bool(REDIS_MODES & set(args.modes))) as redis_port,
    ):
        tokens_of = mint_all(args.modes, secret, idp_key, args.tokens, Path(tmp))
        servers, left_out = start_servers(
            args.modes, args.loops, secret, idp_key, args.server_cpu, Path(tmp), redis_port
        )
        for mode, reason in left_out.items():
            print(f"LEFT OUT {MODE_LABELS[mode]}: {reason}", file=sys.stderr, flush=True)
        modes = [m for m in args.modes if m not in left_out]
        try:
            results = benchmark(args, servers, tokens_of, modes)
        finally:
            stop_servers(servers.values())
    repeated = sorted(
        {s.mode for s in servers.values() if s.fresh_repeated and s.mode in TOKEN_MODES and s.mode in modes}
    )
    noisy = noisy_columns(args, modes, results)
    text = report(args, machine, modes, left_out, results, micro_rows, repeated, args.tokens, noisy)
    args.output.write_text(text)
    print("\n" + text, flush=True)
    print(f"written to {args.output} in {time.monotonic() - started:.0f} s", flush=True)
    for column in noisy:
        print(f"bench/run.py: {column.line()}", file=sys.stderr, flush=True)
    return 1 if noisy and args.strict else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as exc:
        sys.exit(f"bench/run.py: {exc}")

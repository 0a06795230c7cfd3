"""A fault campaign: two jwtplus servers, one real redis-server, concurrent clients, and faults.

    .venv/bin/python .ci/campaign.py [--output report.md] [--phases clean,kill,...] [--seed N]

Two .ci/campaign_server.py processes share one secret, key rotation every second, a 2 s
leeway, 10 s access and 1 h refresh tokens, and one redis-server with an append-only file
fsynced on every write. Client workers log in, use, refresh, steal, forge and log out tokens
against both servers, and judge every answer: a revoked or forged token accepted is a false
accept, a valid one refused a false reject, a 5xx other than a deliberate 503 (or a connection
error, or a timeout) an error. The phases: clean load; redis-server SIGKILLed and restarted;
redis-server paused (SIGSTOP) and resumed; one server's clock skewed within the leeway; one
skewed beyond it. It prints a Markdown report (and writes it to --output) and exits 1 when an
invariant fails.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import enum
import json
import math
import os
import random
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import aiohttp

import jwtplus

HERE = Path(__file__).resolve().parent
SERVER_SCRIPT = HERE / "campaign_server.py"
T = TypeVar("T")

# The servers' settings (passed to both on their command lines).
ROTATION = 1  # seconds: a new signing key every second
LEEWAY = 2.0
ACCESS = 10.0
REFRESH = 3600.0
SOCKET_TIMEOUT = 0.5  # the servers' Redis socket timeouts

# The driver's.
WORKERS = 12
HTTP_TIMEOUT = 5.0  # a request that takes longer is a hang
START_TIMEOUT = 15.0  # seconds for a process to answer
STOP_TIMEOUT = 5.0  # seconds for a server to exit after SIGTERM
BACKOFF = 0.05  # a worker's pause after a 503 or an error, so an outage is not a busy loop
SETTLE = 1.0  # seconds after Redis is back in which a 503 still counts as the outage's
LATENCY_BOUND = 2 * SOCKET_TIMEOUT + 0.5  # the slowest answer allowed while Redis hangs
THEFT_RATE, FORGERY_RATE, EVERYWHERE_RATE = 0.1, 0.3, 0.05
GRAVEYARD_SIZE = 4000  # revoked tokens kept for probes
FINAL_PROBES = 400  # revoked tokens probed on both servers after a fault

DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGKILL); "
    "os.getppid() == int(sys.argv[1]) or sys.exit(1); os.execvp(sys.argv[2], sys.argv[2:])"
)
"""Exec the command with PR_SET_PDEATHSIG (1) = SIGKILL: a child outlives no driver, even a SIGKILLed one."""


# ---- Child processes ----


class Child:
    """One child process in a process group of its own, logging to a file, killed at exit."""

    live: ClassVar[set[Child]] = set()

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.log, self.env = name, argv, log, env
        self.proc: asyncio.subprocess.Process | None = None
        self.paused = False

    async def spawn(self, stdout: int | None = None) -> asyncio.subprocess.Process:
        """Start the command, unable to outlive this driver, in a new session (its own process group)."""
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                DIE_WITH_PARENT,
                str(os.getpid()),
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log if stdout is None else stdout,
                stderr=log,
                env=self.env,
                start_new_session=True,
            )
        Child.live.add(self)
        return self.proc

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def signal(self, signum: int) -> None:
        """Send *signum* to the child's whole process group."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signum)

    async def kill(self) -> None:
        """SIGKILL, at once (it ends a paused process too), and reap it."""
        if self.running:
            self.signal(signal.SIGKILL)
        if self.proc is not None:
            await self.proc.wait()
        self.paused = False
        Child.live.discard(self)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT."""
        if self.running:
            if self.paused:
                self.resume()
            self.signal(signal.SIGTERM)
            assert self.proc is not None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
        await self.kill()

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.signal(signal.SIGCONT)
        self.paused = False

    def rss(self) -> int | None:
        """Resident memory in KiB (VmRSS), or None when it has exited."""
        if not self.running:
            return None
        assert self.proc is not None
        return resident_kib(self.proc.pid)

    def log_tail(self, lines: int = 20) -> str:
        """The last *lines* of the child's log, for an error message."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    @classmethod
    def kill_all(cls) -> None:
        """The last resort at exit: SIGKILL every child's process group (synchronously)."""
        for child in list(cls.live):
            if child.running:
                child.signal(signal.SIGKILL)


def resident_kib(pid: int) -> int | None:
    """VmRSS of *pid* in KiB, from /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def until(what: str, probe: Callable[[], Awaitable[bool]], child: Child, timeout: float) -> None:
    """Poll *probe* every 20 ms until it is true; fail naming *what* after *timeout* or if *child* exits."""
    deadline = time.monotonic() + timeout
    while not await probe():
        if not child.running:
            raise RuntimeError(f"{child.name} exited while waiting for {what}:\n{child.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name}: no {what} within {timeout:.0f} s:\n{child.log_tail()}")
        await asyncio.sleep(0.02)


class RedisServer(Child):
    """redis-server on one loopback port and directory, persistent across SIGKILL (AOF, fsync always)."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.port, self.directory, self.starts = free_port(), directory, 0
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory)]
        argv += ["--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"]
        super().__init__("redis-server", argv, directory / "redis.log")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start it (again, on the same port and directory) and wait until it answers PING."""
        self.starts += 1
        await self.spawn()
        await until("PONG", self.ping, self, START_TIMEOUT)

    async def ping(self) -> bool:
        """Whether it answers PING with PONG right now (within half a second)."""

        async def exchange() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            try:
                writer.write(b"PING\r\n")
                await writer.drain()
                return await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

        try:
            return await asyncio.wait_for(exchange(), 0.5) == b"+PONG\r\n"
        except (OSError, asyncio.TimeoutError):
            return False


class AppServer(Child):
    """One campaign_server.py process; its port is the one it prints."""

    def __init__(
        self, name: str, skew: float, redis_url: str, secret: str, directory: Path, run: int
    ) -> None:
        argv = [SERVER_SCRIPT.as_posix(), "--name", name, "--redis-url", redis_url, "--skew", str(skew)]
        argv += ["--rotation", str(ROTATION), "--leeway", str(LEEWAY), "--access", str(ACCESS)]
        argv += ["--refresh", str(REFRESH), "--socket-timeout", str(SOCKET_TIMEOUT)]
        env = {**os.environ, "JWTPLUS_CAMPAIGN_SECRET": secret, "PYTHONUNBUFFERED": "1"}
        super().__init__(name, [sys.executable, *argv], directory / f"server-{name}-{run}.log", env)
        self.skew, self.port = skew, 0

    @property
    def label(self) -> str:
        return f"{self.name} ({self.skew:+g} s)" if self.skew else self.name

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, http: aiohttp.ClientSession) -> None:
        """Start it, read its port, and wait until GET /me without a token answers 401."""
        proc = await self.spawn(stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
            self.port = int(json.loads(line)["port"])
        except (asyncio.TimeoutError, ValueError, KeyError) as exc:
            raise RuntimeError(f"{self.name} printed no port ({exc!r}):\n{self.log_tail()}") from None

        async def answers() -> bool:
            try:
                async with http.get(self.url + "/me") as reply:
                    return reply.status == 401
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return False

        await until("401 from GET /me", answers, self, START_TIMEOUT)


# ---- Tokens and what each server must make of them ----


class State(enum.Enum):
    """What the driver knows of a family: only its own actions change it."""

    LIVE = "live"
    REVOKED = "revoked"  # by a logout (one family, or the subject everywhere)
    THEFT = "theft"  # its family was killed by a refresh token's reuse
    UNCERTAIN = "uncertain"  # a logout or refresh answered 503: it may or may not have happened


class Expect(enum.Enum):
    """What a server must answer to a token, as the driver predicts it."""

    ACCEPT = "accept"
    REFUSE = "refuse"  # revoked, reused, forged or of the wrong type
    THEFT = "theft"  # refused because a reuse killed its family
    TIME = "time"  # refused for its times at that server's clock (skew beyond the leeway, or age)
    UNJUDGED = "unjudged"  # at a boundary, or uncertain


@dataclass
class Family:
    """The tokens of one login; a revocation covers them all."""

    subject: str
    state: State = State.LIVE


@dataclass
class Token:
    """A token the driver holds, its claims read without verification, and who minted it."""

    text: str
    kind: str  # "access" or "refresh"
    family: Family
    minted_by: str
    iat: float
    exp: float
    period: int
    consumed: bool = False
    revoked_at: float = 0.0

    @classmethod
    def of(cls, text: str, family: Family, minted_by: str) -> Token:
        header, claims = segment_json(text, 0), segment_json(text, 1)
        return cls(text, claims["type"], family, minted_by, claims["iat"], claims["exp"], int(header["kid"]))

    def times_at(self, skew: float, sent: float, answered: float) -> Expect:
        """What a server with clock time.time() + *skew* must make of this token's times, for a request
        sent at *sent* and answered at *answered* (real time): the server looks between the two."""
        early, late = sent + skew, answered + skew
        start = max(self.iat, self.period * ROTATION)
        end = min(self.exp, (self.period + 1) * ROTATION + REFRESH) + LEEWAY
        if start <= early + LEEWAY and late < end:
            return Expect.ACCEPT
        if start > late + LEEWAY or early >= end:
            return Expect.TIME
        return Expect.UNJUDGED

    def expect_at(self, skew: float, sent: float, answered: float) -> Expect:
        """What a server must make of this token: its state first, then its times."""
        state = self.family.state
        if state is State.UNCERTAIN:
            return Expect.UNJUDGED
        if state is State.REVOKED or self.consumed:
            return Expect.REFUSE
        if state is State.THEFT:
            return Expect.THEFT
        return self.times_at(skew, sent, answered)


def segment_json(token: str, index: int) -> dict[str, Any]:
    """The JSON object in segment *index* of a compact JWS, read without any verification."""
    segment = token.split(".")[index]
    parsed: dict[str, Any] = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    return parsed


def b64(data: dict[str, Any]) -> str:
    """base64url without padding of *data* as JSON: a segment of a hand-made token."""
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@dataclass
class Pair:
    """The access and refresh token a login or a refresh answered with."""

    access: Token
    refresh: Token


# ---- What each phase saw ----

FAILURES = {
    "false accept": "false accepts (a revoked, reused or forged token accepted)",
    "false reject": "false rejects (a valid token refused)",
    "error": "errors (5xx but a deliberate 503, connection errors, timeouts, wrong answers)",
    "theft undetected": "accepts of a family a reuse should have killed (theft undetected)",
    "unexpected accept": "accepts of tokens the server's clock cannot accept",
    "accepted while Redis was down": "accepts while Redis was down (fail open)",
}


@dataclass
class Window:
    """A Redis outage: down from *start* to *end* (restart or SIGCONT), answering again from *back*."""

    start: float
    end: float = math.inf
    back: float = math.inf

    def overlaps(self, sent: float, answered: float) -> bool:
        """Whether a 503 to this request is the outage's: it overlaps it, or the SETTLE after it."""
        return sent < self.back + SETTLE and answered > self.start

    def holds(self, sent: float, answered: float) -> bool:
        """Whether the whole request happened while Redis was down (no answer from it possible)."""
        return self.start < sent and answered < self.end


@dataclass
class PhaseStats:
    """Counters of one phase: outcomes, statuses by route, latencies, the cross-server skew matrix."""

    name: str
    title: str
    tolerated: frozenset[str] = frozenset()
    started: float = 0.0
    ended: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    routes: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    skew_matrix: dict[tuple[str, str, str], Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter)
    )
    thefts: dict[tuple[str, str], Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    """(server that consumed the refresh token, server it was reused on) -> what became of the family."""
    windows: list[Window] = field(default_factory=list)
    max_latency: float = 0.0
    max_latency_in_window: float = 0.0
    latencies: list[float] = field(default_factory=list)
    rss: dict[str, list[int | None]] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    checks: list[tuple[str, str, bool]] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(sum(c.values()) for c in self.routes.values())

    @property
    def seconds(self) -> float:
        return max(self.ended - self.started, 1e-9)

    def check(self, name: str, value: Any, ok: bool) -> None:
        self.checks.append((name, str(value), ok))

    def status_total(self, status: str) -> int:
        return sum(c[status] for c in self.routes.values())

    def invariants(self) -> list[tuple[str, str, bool]]:
        """(invariant, value, held): the failure counters (where not tolerated), then the phase's own."""
        rows = []
        for name, label in FAILURES.items():
            tolerated = name in self.tolerated
            rows.append(
                (
                    label + (" (reported, not a failure here)" if tolerated else ""),
                    str(self.outcomes[name]),
                    tolerated or self.outcomes[name] == 0,
                )
            )
        return rows + self.checks

    def details(self) -> list[str]:
        """This phase's section of the report: statuses by route, latencies, facts, memory, skew."""
        statuses = sorted({s for c in self.routes.values() for s in c}, key=lambda s: (not s.isdigit(), s))
        lines = ["| route | " + " | ".join(statuses) + " |", "|---|" + "---:|" * len(statuses)]
        for route in ("login", "me", "refresh", "logout"):
            counts = self.routes.get(route, Counter())
            lines.append(f"| {route} | " + " | ".join(str(counts[s]) for s in statuses) + " |")
        lines.append("")
        if self.latencies:
            ordered = sorted(self.latencies)
            median, p99 = ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.99)]
            lines.append(
                f"- latency: median {median * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
                f"max {self.max_latency * 1000:.0f} ms"
            )
        if self.windows:
            lines.append(
                f"- slowest answer overlapping the outage: {self.max_latency_in_window * 1000:.0f} ms"
            )
        lines += [f"- {name}: {value}" for name, value in self.facts.items()]
        rss = ", ".join(f"{label} {mib(kib[0])} → {mib(kib[-1])}" for label, kib in self.rss.items())
        lines.append(f"- resident memory (VmRSS, start → end): {rss}")
        lines += [f"- first {name}: {example}" for name, example in self.examples.items()]
        if any(verdicts["family alive"] for verdicts in self.thefts.values()):
            lines += [
                "",
                "| refresh token consumed on | reused on | family dead | family alive |",
                "|---|---|---:|---:|",
            ]
            for (consumed, reused), verdicts in sorted(self.thefts.items()):
                lines.append(
                    f"| {consumed} | {reused} | {verdicts['family dead']} | {verdicts['family alive']} |"
                )
        if self.name.startswith("skew"):
            lines += ["", "| minted by | presented to | token | answers |", "|---|---|---|---|"]
            for (minted, shown, kind), counts in sorted(self.skew_matrix.items()):
                answers = ", ".join(f"{status}: {n}" for status, n in sorted(counts.items()))
                lines.append(f"| {minted} | {shown} | {kind} | {answers} |")
        return lines


# ---- The load ----


@dataclass
class Campaign:
    """Shared state of the run: servers, the HTTP client, the current phase, revoked tokens."""

    http: aiohttp.ClientSession
    servers: list[AppServer]
    rng: random.Random
    foreign: jwtplus.SecretManager
    stats: PhaseStats | None = None
    running: bool = False
    graveyard: list[Token] = field(default_factory=list)
    uncertain_refreshes: list[Token] = field(default_factory=list)

    def bury(self, *tokens: Token) -> None:
        """Keep revoked tokens for later probes: a ring of the newest GRAVEYARD_SIZE."""
        now = time.time()
        for token in tokens:
            token.revoked_at = now
            self.graveyard.append(token)
        del self.graveyard[:-GRAVEYARD_SIZE]


@dataclass
class Reply:
    """One judged answer: its status (or the client error's name), its body, its outcome."""

    status: int | str
    body: Any
    outcome: str

    @property
    def good(self) -> bool:
        return self.outcome in ("accepted", "refused", "time refused", "unjudged")


class Client:
    """One worker: judged HTTP calls, and the cycle of a session's life."""

    def __init__(self, campaign: Campaign, index: int) -> None:
        self.c, self.index, self.count = campaign, index, 0

    @property
    def stats(self) -> PhaseStats:
        assert self.c.stats is not None
        return self.c.stats

    async def call(
        self,
        route: str,
        server: AppServer,
        *,
        token: Token | None = None,
        text: str | None = None,
        in_body: bool = False,
        expect: Expect | None = None,
        query: str = "",
    ) -> Reply:
        """Send one request and judge its answer: *expect* if given, else what *token* deserves."""
        method, path = ("GET", "/me") if route == "me" else ("POST", "/" + route)
        text = token.text if text is None and token is not None else text
        headers, body = {}, None
        if route == "login":
            body = {"username": query}
            query = ""
        elif in_body:
            body = {"refresh_token": text}
        elif text is not None:
            headers["Authorization"] = f"Bearer {text}"
        sent = time.time()
        status: int | str
        try:
            async with self.c.http.request(
                method, server.url + path + query, headers=headers, json=body
            ) as answer:
                status, raw = answer.status, await answer.read()
            parsed: Any = json.loads(raw) if raw.startswith(b"{") else raw.decode(errors="replace")
        except asyncio.TimeoutError:
            status, parsed = "timeout", None
        except aiohttp.ClientError as exc:
            status, parsed = type(exc).__name__, None
        answered = time.time()
        if expect is None:
            expect = Expect.ACCEPT if token is None else token.expect_at(server.skew, sent, answered)
        outcome = self.judge(route, status, parsed, expect, sent, answered, token)
        stats = self.stats
        stats.routes[route][str(status)] += 1
        stats.outcomes[outcome] += 1
        latency = answered - sent
        stats.latencies.append(latency)
        stats.max_latency = max(stats.max_latency, latency)
        if any(w.overlaps(sent, answered) for w in stats.windows):
            stats.max_latency_in_window = max(stats.max_latency_in_window, latency)
        if outcome in FAILURES and outcome not in stats.examples:
            when = f"{sent - stats.started:.3f} s into the phase"
            if stats.windows:
                when += f", {sent - stats.windows[-1].back:+.3f} s after Redis was back"
            stats.examples[outcome] = f"{route} on {server.label}: {status}, expected {expect.value} ({when})"
        if token is not None and token.family.state is State.LIVE and not token.consumed:
            stats.skew_matrix[(token.minted_by, server.label, token.kind)][str(status)] += 1
        return Reply(status, parsed, outcome)

    def judge(
        self,
        route: str,
        status: int | str,
        body: Any,
        expect: Expect,
        sent: float,
        answered: float,
        token: Token | None,
    ) -> str:
        """Name the outcome of one answer."""
        windows = self.stats.windows
        if status == 503:
            return "deliberate 503" if any(w.overlaps(sent, answered) for w in windows) else "error"
        if not isinstance(status, int) or status >= 500:
            return "error"
        needs_redis = route == "login" or (token is not None and expect is not Expect.TIME)
        if status == 200 and needs_redis and any(w.holds(sent, answered) for w in windows):
            return "accepted while Redis was down"
        if route in ("login", "logout"):  # logout answers 200 whether or not there was anything to revoke
            return "accepted" if status == 200 else "error"
        if status == 200:
            if route == "me" and token is not None and body.get("username") != token.family.subject:
                return "error"
            return {
                Expect.ACCEPT: "accepted",
                Expect.REFUSE: "false accept",
                Expect.THEFT: "theft undetected",
                Expect.TIME: "unexpected accept",
                Expect.UNJUDGED: "unjudged",
            }[expect]
        if status == 401:
            return {
                Expect.ACCEPT: "false reject",
                Expect.REFUSE: "refused",
                Expect.THEFT: "refused",
                Expect.TIME: "time refused",
                Expect.UNJUDGED: "unjudged",
            }[expect]
        return "error"

    # -- steps --

    def valid_on(self, token: Token) -> list[AppServer]:
        """The servers whose clocks accept *token*'s times for the next second."""
        now = time.time()
        return [s for s in self.c.servers if token.times_at(s.skew, now, now + 1) is Expect.ACCEPT]

    def pair_of(self, reply: Reply, family: Family, server: AppServer) -> Pair:
        """The pair in a login's or refresh's answer, of *family*, minted by *server*."""
        return Pair(
            Token.of(reply.body["access_token"], family, server.label),
            Token.of(reply.body["refresh_token"], family, server.label),
        )

    async def login(self, subject: str, server: AppServer | None = None) -> Pair | None:
        """Log *subject* in on *server* (a random one by default): a pair in a new family, or None."""
        server = server or self.c.rng.choice(self.c.servers)
        reply = await self.call("login", server, query=subject)
        return self.pair_of(reply, Family(subject), server) if reply.outcome == "accepted" else None

    async def use(self, *tokens: Token) -> bool:
        """Present access tokens on every server, refresh tokens only where that cannot consume them:
        revoked, used, or refused there for their times (the other clock is too far off)."""
        ok, now = True, time.time()
        for token in tokens:
            for server in self.c.servers:
                if token.kind == "access":
                    ok = (await self.call("me", server, token=token)).good and ok
                elif (
                    token.family.state is not State.LIVE
                    or token.consumed
                    or token.times_at(server.skew, now, now + 1) is Expect.TIME
                ):
                    ok = (await self.call("refresh", server, token=token, in_body=True)).good and ok
        return ok

    async def refresh(self, pair: Pair) -> Pair | None:
        """Refresh on a random server that accepts the refresh token: the new pair, or None."""
        servers = self.valid_on(pair.refresh)
        if not servers:
            return None
        server = self.c.rng.choice(servers)
        reply = await self.call("refresh", server, token=pair.refresh, in_body=True)
        if reply.outcome != "accepted":
            if reply.status == 503:
                pair.refresh.family.state = State.UNCERTAIN
                self.c.uncertain_refreshes.append(pair.refresh)
            return None
        pair.refresh.consumed = True
        return self.pair_of(reply, pair.refresh.family, server)

    async def logout(self, pair: Pair, everywhere: bool = False) -> bool:
        """Log out on a server that can verify the access token; True when it answered 200."""
        servers = self.valid_on(pair.access)
        if not servers:
            return False
        query = "?everywhere=1" if everywhere else ""
        reply = await self.call("logout", self.c.rng.choice(servers), token=pair.access, query=query)
        if reply.outcome != "accepted":
            pair.access.family.state = State.UNCERTAIN
            return False
        return True

    async def theft(self, old: Pair, new: Pair) -> None:
        """Reuse a consumed refresh token: refused, and the whole family dies on both servers."""
        servers = self.valid_on(old.refresh)
        if not servers:
            return
        thief = self.c.rng.choice(servers)
        reply = await self.call("refresh", thief, token=old.refresh, in_body=True)
        if reply.status != 401:
            return
        old.refresh.family.state = State.THEFT
        answers = [
            (await self.call("me", s, token=t)).outcome
            for t in (old.access, new.access)
            for s in self.c.servers
        ]
        await self.call("refresh", self.c.rng.choice(self.c.servers), token=new.refresh, in_body=True)
        self.c.bury(old.access, new.access, new.refresh)
        verdict = "family alive" if "theft undetected" in answers else "family dead"
        self.stats.thefts[(new.refresh.minted_by, thief.label)][verdict] += 1

    async def forgeries(self, pair: Pair) -> None:
        """Tampered claims and signatures, another secret's signature, and tokens of the wrong type."""
        rng, access = self.c.rng, pair.access.text
        header, payload, signature = access.split(".")
        claims = segment_json(access, 1)
        middle = len(signature) // 2
        flipped = "A" if signature[middle] != "A" else "B"
        forged = {
            "claims": f"{header}.{b64({**claims, 'username': 'admin'})}.{signature}",
            "signature": f"{header}.{payload}.{signature[:middle]}{flipped}{signature[middle + 1 :]}",
            "secret": jwtplus.encode_token(self.c.foreign, claims, now=time.time()),
            "alg": f"{b64({**segment_json(access, 0), 'alg': 'HS512'})}.{payload}.{signature}",
        }
        for name in rng.sample(sorted(forged), 2):
            await self.call("me", rng.choice(self.c.servers), text=forged[name], expect=Expect.REFUSE)
        server = rng.choice(self.c.servers)
        await self.call("me", server, text=pair.refresh.text, expect=Expect.REFUSE)  # refresh as access
        await self.call("refresh", server, text=access, in_body=True, expect=Expect.REFUSE)  # and the reverse

    async def probe_graveyard(self) -> None:
        if self.c.graveyard:
            await self.probe(self.c.rng.choice(self.c.graveyard), self.c.rng.choice(self.c.servers))

    async def probe(self, token: Token, server: AppServer) -> Reply:
        """Present a token where it is used: an access token to GET /me, a refresh token to /refresh."""
        route = "me" if token.kind == "access" else "refresh"
        return await self.call(route, server, token=token, in_body=token.kind == "refresh")

    async def everywhere(self, first: Pair) -> None:
        """Two logins of one subject; logging out everywhere on one server kills both on both."""
        second = await self.login(first.access.family.subject)
        if second is None or not await self.use(second.access):
            return
        if not await self.logout(first, everywhere=True):
            return
        for pair in (first, second):
            pair.access.family.state = State.REVOKED
        await self.use(first.access, second.access, first.refresh, second.refresh)
        self.c.bury(first.access, second.access, first.refresh, second.refresh)
        again = await self.login(first.access.family.subject)  # a login after it is not refused
        if again is not None and await self.use(again.access) and await self.logout(again):
            again.access.family.state = State.REVOKED

    async def cycle(self) -> None:
        """A session's life: login, use on both, refresh, use, then theft, or logout and its checks."""
        self.count += 1
        subject = f"{self.stats.name}-w{self.index}-{self.count}"
        first = await self.login(subject)
        if first is None or not await self.use(first.access) or not self.c.running:
            return
        second = await self.refresh(first)
        if second is None or not await self.use(first.access, second.access, second.refresh):
            return
        if not self.c.running:  # the phase ended: no theft or logout to judge in the next one
            return
        if self.c.rng.random() < THEFT_RATE:
            await self.theft(first, second)
            return
        if self.c.rng.random() < FORGERY_RATE:
            await self.forgeries(second)
        await self.probe_graveyard()
        if self.c.rng.random() < EVERYWHERE_RATE:
            await self.everywhere(second)
            return
        if await self.logout(second):
            second.access.family.state = State.REVOKED
            await self.use(first.access, second.access, second.refresh)
            self.c.bury(first.access, second.access, second.refresh)

    async def run(self) -> None:
        """Run cycles until the phase ends, pausing briefly after a cycle that met a 503 or an error."""
        while self.c.running:
            before = sum(self.stats.outcomes[name] for name in ("deliberate 503", "error"))
            await self.cycle()
            if sum(self.stats.outcomes[name] for name in ("deliberate 503", "error")) > before:
                await asyncio.sleep(BACKOFF)


# ---- Phases ----


class Run:
    """The whole campaign: processes, phases and the report."""

    def __init__(self, args: argparse.Namespace, directory: Path) -> None:
        self.args, self.directory = args, directory
        self.secret = secrets.token_urlsafe(32)
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("campaign: redis-server is not on PATH (apt-get install redis-server)")
        (directory / "redis").mkdir()
        self.redis = RedisServer(binary, directory / "redis")
        self.server_runs = 0
        self.phases: list[PhaseStats] = []
        self.retired: list[AppServer] = []

    async def start_server(self, http: aiohttp.ClientSession, name: str, skew: float) -> AppServer:
        """Start one campaign server (a new process each time) and wait until it answers."""
        self.server_runs += 1
        server = AppServer(name, skew, self.redis.url, self.secret, self.directory, self.server_runs)
        await server.start(http)
        return server

    async def load(self, campaign: Campaign, stats: PhaseStats, body: Callable[[], Awaitable[None]]) -> None:
        """Run the workers while *body* (the phase's script of faults and waits) runs."""
        campaign.stats, campaign.running = stats, True
        stats.rss = {s.label: [s.rss()] for s in campaign.servers}
        stats.rss["redis-server"] = [self.redis.rss()]
        stats.started = time.time()
        workers = [asyncio.ensure_future(Client(campaign, i).run()) for i in range(WORKERS)]
        try:
            await body()
        finally:
            campaign.running = False
            done, pending = await asyncio.wait(workers, timeout=4 * HTTP_TIMEOUT)
            for task in pending:
                task.cancel()
            for task in done:
                task.result()  # a worker's own exception is a bug of this script: raise it
            stats.ended = time.time()
        for server in campaign.servers:
            stats.rss[server.label].append(server.rss())
        stats.rss["redis-server"].append(self.redis.rss())

    async def final_probes(self, campaign: Campaign, stats: PhaseStats, before: float) -> None:
        """Probe tokens revoked before *before* on both servers (all 401), and retry refreshes that
        answered 503 once: did the 503 consume the token anyway?"""
        revoked = [t for t in campaign.graveyard if t.revoked_at < before]
        chosen = [t for t in revoked if t.kind == "access" and t.exp + LEEWAY > time.time() + 1]
        chosen += [t for t in revoked if t.kind == "refresh"][-FINAL_PROBES:]
        gate, client = asyncio.Semaphore(16), Client(campaign, -1)
        counts: Counter[str] = Counter()

        async def probe(token: Token, server: AppServer) -> None:
            async with gate:
                reply = await client.probe(token, server)
                counts[f"{token.kind} {reply.status}"] += 1

        campaign.stats = stats
        await asyncio.gather(*(probe(t, s) for t in chosen for s in campaign.servers))
        accepted = sum(n for key, n in counts.items() if key.endswith(" 200"))
        stats.facts["revoked tokens probed after the fault"] = (
            f"{sum(t.kind == 'access' for t in chosen)} unexpired access + "
            f"{sum(t.kind == 'refresh' for t in chosen)} refresh, on both servers: "
            + ", ".join(f"{k}: {n}" for k, n in sorted(counts.items()))
        )
        stats.check(
            "revoked before the fault, probed after it: accepted", accepted, accepted == 0 and bool(chosen)
        )
        retried: Counter[str] = Counter()
        for token in campaign.uncertain_refreshes[:50]:
            token.family.state = State.UNCERTAIN
            servers = client.valid_on(token)
            if servers:
                reply = await client.call("refresh", servers[0], token=token, in_body=True)
                retried["200 (not consumed)" if reply.status == 200 else f"{reply.status} (consumed)"] += 1
        if retried:
            stats.facts["refreshes that answered 503, retried once after"] = ", ".join(
                f"{k}: {n}" for k, n in sorted(retried.items())
            )
        campaign.uncertain_refreshes.clear()

    async def phase_clean(self, campaign: Campaign) -> None:
        """Load with no fault: every answer must be right, and none a 503."""
        stats = PhaseStats("clean", f"Clean load ({self.args.clean:g} s)")
        self.phases.append(stats)
        await self.load(campaign, stats, lambda: asyncio.sleep(self.args.clean))
        stats.check("no 503 at all", stats.outcomes["deliberate 503"], stats.outcomes["deliberate 503"] == 0)

    async def phase_kill(self, campaign: Campaign) -> None:
        """SIGKILL redis-server under load, restart it 3 s later: 503s meanwhile, all revocations kept."""
        stats = PhaseStats("kill", "redis-server SIGKILLed, restarted 3 s later on the same port and dir")
        self.phases.append(stats)
        marks: dict[str, float] = {}

        async def script() -> None:
            await asyncio.sleep(3)
            window = Window(time.time())
            stats.windows.append(window)
            marks["killed"] = window.start
            await self.redis.kill()
            await asyncio.sleep(3)
            window.end = time.time()
            await self.redis.start()
            window.back = marks["back"] = time.time()
            await asyncio.sleep(5)

        await self.load(campaign, stats, script)
        stats.facts["Redis down (kill to PONG)"] = f"{marks['back'] - marks['killed']:.2f} s"
        await self.final_probes(campaign, stats, marks["killed"])
        self.outage_checks(stats)

    async def phase_pause(self, campaign: Campaign) -> None:
        """SIGSTOP redis-server for 3 s under load: 503s within about one socket timeout, no hang."""
        stats = PhaseStats("pause", "redis-server paused (SIGSTOP) for 3 s, then SIGCONT")
        self.phases.append(stats)
        marks: dict[str, float] = {}

        async def script() -> None:
            await asyncio.sleep(2)
            window = Window(time.time())
            stats.windows.append(window)
            marks["paused"] = window.start
            self.redis.pause()
            await asyncio.sleep(3)
            window.end = window.back = time.time()
            self.redis.resume()
            await asyncio.sleep(4)

        await self.load(campaign, stats, script)
        latency = stats.max_latency_in_window
        stats.check(
            f"slowest answer around the pause (bound {LATENCY_BOUND:g} s)",
            f"{latency:.3f} s",
            latency <= LATENCY_BOUND,
        )
        await self.final_probes(campaign, stats, marks["paused"])
        self.outage_checks(stats)

    def outage_checks(self, stats: PhaseStats) -> None:
        """What every outage must show: 503s (fail closed), and never a 500."""
        stats.check(
            "deliberate 503s (fail closed)",
            stats.outcomes["deliberate 503"],
            stats.outcomes["deliberate 503"] > 0,
        )
        stats.check("500s", stats.status_total("500"), stats.status_total("500") == 0)

    async def phase_skew(
        self, campaign: Campaign, http: aiohttp.ClientSession, skew: float, name: str
    ) -> None:
        """Restart server B with its clock *skew* seconds ahead, then load both servers."""
        beyond = skew > LEEWAY
        title = (
            f"server B restarted with its clock {skew:+g} s ({'beyond' if beyond else 'within'} the leeway)"
        )
        # beyond the leeway the servers' clocks disagree by more than jwtplus tolerates: refusals across
        # them are expected, and a reuse on the server whose clock is behind can look like no reuse
        stats = PhaseStats(name, title, frozenset({"theft undetected"}) if beyond else frozenset())
        self.phases.append(stats)
        old = campaign.servers[1]
        await old.stop()
        self.retired.append(old)
        campaign.servers[1] = await self.start_server(http, "B", skew)
        await self.load(campaign, stats, lambda: asyncio.sleep(self.args.skewed))
        refused = stats.outcomes["time refused"]
        if beyond:
            stats.check("refusals for time across the servers (expected)", refused, refused > 0)
        else:
            stats.check("refusals for time", refused, refused == 0)

    async def main(self) -> tuple[str, bool]:
        """Start Redis and the servers, run the chosen phases, stop everything: the report and the verdict."""
        started = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(
            timeout=timeout, connector=connector, cookie_jar=aiohttp.DummyCookieJar()
        ) as http:
            await self.redis.start()
            servers = list(
                await asyncio.gather(self.start_server(http, "A", 0.0), self.start_server(http, "B", 0.0))
            )
            foreign = jwtplus.SecretManager(
                secret=secrets.token_urlsafe(32), refresh_interval=ROTATION, exptime=REFRESH, leeway=LEEWAY
            )
            rng = random.Random(self.args.seed)  # noqa: S311 (load, not secrets)
            campaign = Campaign(http, servers, rng, foreign)
            phases = self.args.phases
            if "clean" in phases:
                await self.phase_clean(campaign)
            if "kill" in phases:
                await self.phase_kill(campaign)
            if "pause" in phases:
                await self.phase_pause(campaign)
            if "skew" in phases:
                await self.phase_skew(campaign, http, 1.0, "skew")
            if "skew-beyond" in phases:
                await self.phase_skew(campaign, http, 30.0, "skew-beyond")
            for server in campaign.servers:
                await server.stop()
            await self.redis.stop()
        return self.report(time.monotonic() - started, [*self.retired, *campaign.servers])

    # -- the report --

    def report(self, wall: float, servers: list[AppServer]) -> tuple[str, bool]:
        """The Markdown report, and whether every invariant held."""
        lines = [
            "# jwtplus fault campaign",
            "",
            f"Two servers (key rotation {ROTATION} s, leeway {LEEWAY:g} s, access {ACCESS:g} s, refresh "
            f"{REFRESH / 3600:g} h), one redis-server (AOF, fsync always; {SOCKET_TIMEOUT:g} s socket "
            f"timeouts, no retries), {WORKERS} client workers, seed {self.args.seed}; "
            f"wall time {wall:.0f} s.",
            "",
            "| phase | s | requests | req/s | false accepts | false rejects | errors | deliberate 503 "
            "| time refusals | unjudged | thefts undetected | max latency |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in self.phases:
            o = p.outcomes
            lines.append(
                f"| {p.name} | {p.seconds:.1f} | {p.requests} | {p.requests / p.seconds:,.0f} "
                f"| {o['false accept']} | {o['false reject']} | {o['error']} | {o['deliberate 503']} "
                f"| {o['time refused']} | {o['unjudged']} | {o['theft undetected']} | {p.max_latency:.3f} s |"
            )
        rows = [(p.name, *check) for p in self.phases for check in p.invariants()]
        text = "".join(s.log.read_text(errors="replace") for s in servers if s.log.exists())
        for name in ("Traceback", "Error handling request"):
            rows.append(("all", f'"{name}" in the server logs', str(text.count(name)), name not in text))
        lines += ["", "## Invariants", "", "| phase | invariant | value | |", "|---|---|---:|---|"]
        lines += [
            f"| {phase} | {name} | {value} | {'pass' if ok else '**FAIL**'} |"
            for phase, name, value, ok in rows
        ]
        for p in self.phases:
            lines += ["", f"## {p.name}: {p.title}", "", *p.details()]
        ok = all(row[-1] for row in rows)
        lines += ["", f"**Result: {'PASS' if ok else 'FAIL'}**", ""]
        return "\n".join(lines), ok


def mib(kib: int | None) -> str:
    """KiB as MiB for the report."""
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


async def interruptible(work: Awaitable[T]) -> T:
    """Run *work*, cancelled by SIGINT or SIGTERM: the finally clauses on the way out stop the children."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    try:
        return await work
    finally:
        for child in list(Child.live):  # SIGKILLed and reaped while the loop still runs
            await child.kill()


PHASES = ("clean", "kill", "pause", "skew", "skew-beyond")


def main(argv: list[str]) -> int:
    """Parse the arguments, run the campaign in a work directory, print the report; 1 on failure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--output", help="also write the Markdown report here")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"a comma-separated subset of {PHASES}")
    parser.add_argument("--seed", type=int, default=None, help="the workers' random seed (default: random)")
    parser.add_argument(
        "--workdir", help="a new directory for Redis's files and the logs, kept (default: temporary)"
    )
    parser.add_argument("--clean", type=float, default=20.0, help="seconds of clean load")
    parser.add_argument("--skewed", type=float, default=12.0, help="seconds of load in each skew phase")
    args = parser.parse_args(argv)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if unknown := set(args.phases) - set(PHASES):
        parser.error(f"unknown phases {sorted(unknown)}: use {', '.join(PHASES)}")
    if args.seed is None:
        args.seed = secrets.randbelow(10**6)
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="jwtplus-campaign-")))
        else:
            directory = Path(args.workdir)
            directory.mkdir(parents=True)
        try:
            report, ok = asyncio.run(interruptible(Run(args, directory).main()))
        except asyncio.CancelledError:
            print("campaign: interrupted", file=sys.stderr)
            return 130
        finally:
            Child.kill_all()  # whatever went wrong, no child outlives the run
    print(report)
    if args.output:
        Path(args.output).write_text(report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

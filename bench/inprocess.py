"""A new token's cost in process, without a server: where the time goes beyond the decode.

    python bench/inprocess.py [--against OLD/jwtplus.py] [--tokens 4000] [--rounds 7]

Times, in CPU time per call over distinct HS256 tokens: ``decode_token``; a ``cached_decoder``
miss; a whole identification by ``authentication_middleware`` (a real app's routing, the handler
and its response included); and PyJWT's ``jwt.decode`` for scale. With --against, that copy of
jwtplus.py is loaded beside the installed one and the two are timed in turns, round by round, so
both columns see the same machine; the median of the rounds is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import jwt
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

import jwtplus

SECRET = "s" * 64


def load(path: str) -> ModuleType:
    """The jwtplus.py at *path*, as a module of its own beside the installed one."""
    spec = importlib.util.spec_from_file_location("jwtplus_against", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--against: {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="Hello, world")


def timings(m: ModuleType, count: int) -> dict[str, Callable[[], float]]:
    """Each timed case of version *m*: a callable returning its seconds of CPU time for *count* tokens."""
    manager = m.SecretManager(secret=SECRET)
    tokens = [m.encode_token(manager, {"sub": f"u{i}"}) for i in range(count)]

    def decode() -> float:
        start = time.process_time()
        for token in tokens:
            m.decode_token(manager, token)
        return time.process_time() - start

    def miss() -> float:
        decoder, now = m.cached_decoder(manager, size=count + 1), time.time()
        start = time.process_time()
        for token in tokens:
            decoder(token, now)
        return time.process_time() - start

    def identification() -> float:
        app = web.Application()
        app.router.add_get("/hello", hello)
        app.freeze()
        middleware = m.authentication_middleware(manager=manager)

        async def run() -> float:
            requests = []
            for token in tokens:  # routed by the app, so the guards read the real handler
                request = make_mocked_request(
                    "GET", "/hello", headers={"Authorization": f"Bearer {token}"}, app=app
                )
                match = await app.router.resolve(request)
                match.add_app(app)
                request._match_info = match
                requests.append(request)
            start = time.process_time()
            for request in requests:
                answer = await middleware(request, hello)
            elapsed = time.process_time() - start
            assert answer.status == 200, answer.status
            return elapsed

        return asyncio.run(run())

    def pyjwt() -> float:
        start = time.process_time()
        for token in tokens:
            jwt.decode(token, SECRET, algorithms=["HS256"])
        return time.process_time() - start

    return {
        "`decode_token` of a new token": decode,
        "a `cached_decoder` miss": miss,
        "a whole identification by `authentication_middleware`": identification,
        "PyJWT's `jwt.decode`, for scale": pyjwt,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", help="another jwtplus.py, timed in turns with the installed one")
    parser.add_argument("--tokens", type=int, default=4000, help="distinct tokens per round (default: 4000)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the median is reported (default: 7)")
    args = parser.parse_args()
    if args.against and not Path(args.against).is_file():
        parser.error(f"--against: no file {args.against}")
    if args.tokens < 1 or args.rounds < 1:
        parser.error("--tokens and --rounds take a whole number of 1 or more")
    versions = {"this": jwtplus} | ({"against": load(args.against)} if args.against else {})
    cases = {name: timings(m, args.tokens) for name, m in versions.items()}
    seconds: dict[str, dict[str, list[float]]] = {
        name: {case: [] for case in cases["this"]} for name in cases
    }
    for _ in range(args.rounds):
        for case in cases["this"]:
            for name in cases:
                seconds[name][case].append(cases[name][case]() / args.tokens * 1e6)
    header = "| call | " + " | ".join(("jwtplus.py", f"{args.against}")[: len(cases)]) + " |"
    print(header, "|---|" + "---:|" * len(cases), sep="\n")
    for case in cases["this"]:
        cells = " | ".join(f"{statistics.median(seconds[name][case]):.2f} µs" for name in cases)
        print(f"| {case} | {cells} |")


if __name__ == "__main__":
    main()

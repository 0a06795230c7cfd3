"""The benchmarked hello-world app, one mode per process.

    BENCH_SECRET=... python bench/servers.py MODE LOOP

MODE is one of MODES, LOOP is "asyncio" or "uvloop". The server listens on
127.0.0.1 at a port the kernel picks, prints that port on one line, and serves
``GET /hello`` ("Hello, world") until it is killed. Every mode serves the same
handler; only the middlewares differ. The HS256 secret comes from the
environment, never from the command line.
"""

from __future__ import annotations

import asyncio
import os
import sys
import warnings
from typing import Any

import jwt
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

import jwtplus

MODES = ("bare", "passthrough", "jwtplus", "jwtplus-setup", "aiohttp-jwt", "pyjwt")
"""Modes in table order: the baseline first, then the cost of one middleware, then the JWT middlewares."""

LOOPS = ("asyncio", "uvloop")

MODE_LABELS = {
    "bare": "bare aiohttp",
    "passthrough": "one pass-through middleware",
    "jwtplus": "jwtplus, the seed's two middlewares (pre_jwt_identifier + post_jwt_router)",
    "jwtplus-setup": "jwtplus, one middleware (jwtplus.setup)",
    "aiohttp-jwt": "aiohttp-jwt 0.6.1 (JWTMiddleware)",
    "pyjwt": "plain jwt.decode middleware",
}

PATH = "/hello"
BODY = "Hello, world"

_PAYLOAD = web.RequestKey[dict[str, Any]]("payload")


async def hello(request: web.Request) -> web.Response:
    return web.Response(text=BODY)


@web.middleware
async def passthrough(request: web.Request, handler: Handler) -> web.StreamResponse:
    return await handler(request)


def pyjwt_middleware(secret: str) -> Middleware:
    """What an application writes by hand: PyJWT's decode on every request, 401 on failure."""

    @web.middleware
    async def decode(request: web.Request, handler: Handler) -> web.StreamResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not token:
            raise web.HTTPUnauthorized()
        try:
            request[_PAYLOAD] = jwt.decode(token, secret, algorithms=["HS256"])
        except jwt.InvalidTokenError:
            raise web.HTTPUnauthorized() from None
        return await handler(request)

    return decode


def aiohttp_jwt_middlewares(secret: str) -> list[Middleware]:
    """hzlmn's aiohttp-jwt, configured so that it accepts HS256 tokens on PyJWT 2."""
    from aiohttp_jwt import JWTMiddleware  # type: ignore[import-untyped]

    # It stores the payload under the string key "payload": aiohttp 3.14 warns once, harmlessly.
    warnings.filterwarnings("ignore", category=web.NotAppKeyWarning)
    # Without algorithms=, PyJWT 2 refuses every token (it requires the argument).
    return [JWTMiddleware(secret, algorithms=["HS256"])]


def middlewares(mode: str, secret: str) -> list[Middleware]:
    if mode == "bare":
        return []
    if mode == "passthrough":
        return [passthrough]
    if mode == "jwtplus":
        manager = jwtplus.SecretManager(secret=secret)
        helper = jwtplus.JWTHelper(secret_manager=manager, protected_apis=(PATH,))
        return [helper.pre_jwt_identifier(), helper.post_jwt_router()]
    if mode == "jwtplus-setup":
        manager = jwtplus.SecretManager(secret=secret)
        return [jwtplus.JWTHelper(secret_manager=manager, protected_apis=(PATH,)).middleware()]
    if mode == "aiohttp-jwt":
        return aiohttp_jwt_middlewares(secret)
    if mode == "pyjwt":
        return [pyjwt_middleware(secret)]
    raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")


async def serve(mode: str, secret: str, exit_after: int = 0) -> None:
    """Serve until killed, or (for bench/instructions.py) until *exit_after* answers to /hello."""
    done, answered = asyncio.Event(), 0

    async def hello_then_maybe_exit(request: web.Request) -> web.Response:
        nonlocal answered
        answered += 1
        if answered == exit_after:
            asyncio.get_running_loop().call_later(0.05, done.set)
        return await hello(request)

    app = web.Application(middlewares=middlewares(mode, secret))
    app.router.add_get(PATH, hello_then_maybe_exit if exit_after else hello)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", int(os.environ.get("BENCH_PORT", "0"))).start()
        print(runner.addresses[0][1], flush=True)
        await done.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in MODES or argv[1] not in LOOPS:
        sys.exit(f"usage: BENCH_SECRET=... servers.py {{{'|'.join(MODES)}}} {{{'|'.join(LOOPS)}}}")
    mode, loop = argv
    secret, exit_after = os.environ["BENCH_SECRET"], int(os.environ.get("BENCH_EXIT_AFTER", "0"))
    if loop == "uvloop":
        import uvloop

        uvloop.run(serve(mode, secret, exit_after))
    else:
        asyncio.run(serve(mode, secret, exit_after))


if __name__ == "__main__":
    main(sys.argv[1:])

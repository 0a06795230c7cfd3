"""One API server of the fault campaign (.ci/campaign.py): jwtplus sessions kept in Redis.

    JWTPLUS_CAMPAIGN_SECRET=... python .ci/campaign_server.py --name A --redis-url URL [--skew S] ...

A non-browser API: tokens travel in ``Authorization`` headers and JSON bodies, never in cookies.
POST /login (``{"username"}``, no password: a load test), POST /refresh (``{"refresh_token"}``),
POST /logout (the access token in ``Authorization``; ``?everywhere=1`` logs the subject out
everywhere) and GET /me (protected). ``--skew`` moves this server's clock, for the middleware
and for every session helper. It listens on 127.0.0.1 at a port the kernel picks, prints that
port on one line, and serves until SIGTERM. The secret comes from the environment.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import redis.asyncio
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

import jwtplus

T = TypeVar("T")


async def settled(value: T | Awaitable[T]) -> T:
    """Await *value* if it is awaitable: issue_tokens is turning into a coroutine."""
    if inspect.isawaitable(value):
        return await value
    return value


def without_maintenance_notifications() -> dict[str, Any]:
    """redis-py 8's default maintenance notifications ("auto") switch off the pool's check of a pooled
    connection before use: after a Redis restart each dead one then fails a request (a 503) at its
    next use, seconds later. Turned off, the pool reconnects it instead."""
    try:
        from redis.maint_notifications import MaintNotificationsConfig
    except ImportError:  # redis-py before 7: no such thing, and the check always runs
        return {}
    return {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The server's settings; the driver passes them all, so that both servers share them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--skew", type=float, default=0.0, help="seconds this server's clock runs ahead")
    parser.add_argument("--rotation", type=int, default=1, help="key rotation period, seconds")
    parser.add_argument("--leeway", type=float, default=2.0)
    parser.add_argument("--access", type=float, default=10.0, help="access token lifetime, seconds")
    parser.add_argument("--refresh", type=float, default=3600.0, help="refresh token lifetime, seconds")
    parser.add_argument("--socket-timeout", type=float, default=0.5, help="Redis socket timeouts, seconds")
    return parser.parse_args(argv)


def make_app(args: argparse.Namespace, secret: str) -> web.Application:
    """The four routes behind jwtplus, with a Redis client that gives up after one timeout."""
    skew = args.skew

    def clock() -> float:
        return time.time() + skew

    # One attempt per command: Redis() defaults to ten retries with backoff (from_url, in redis-py 8.1,
    # to none), each one more socket timeout a request waits on a hung Redis; redis_store refuses any.
    client = redis.asyncio.Redis.from_url(
        args.redis_url,
        socket_timeout=args.socket_timeout,
        socket_connect_timeout=args.socket_timeout,
        retry=Retry(NoBackoff(), 0),
        **without_maintenance_notifications(),
    )
    manager = jwtplus.SecretManager(
        secret=secret, refresh_interval=args.rotation, exptime=args.refresh, leeway=args.leeway
    )
    sessions = jwtplus.Sessions(
        manager=manager,
        store=jwtplus.redis_store(client, prefix="campaign:"),
        access_exptime=args.access,
        refresh_exptime=args.refresh,
    )
    helper = jwtplus.JWTHelper(sessions=sessions, whitelist=("/login",), clock=clock)
    routes = web.RouteTableDef()

    def pair_response(pair: jwtplus.TokenPair) -> web.Response:
        return web.json_response({"access_token": pair.access, "refresh_token": pair.refresh})

    @routes.post("/login")
    async def login(request: web.Request) -> web.Response:
        try:
            body: Any = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="a JSON body is required") from None
        username = body.get("username") if isinstance(body, dict) else None
        if not isinstance(username, str) or not username:
            raise web.HTTPBadRequest(text="username is required")
        pair = await settled(jwtplus.issue_tokens(sessions, username, {"username": username}, now=clock()))
        return pair_response(pair)

    @routes.post("/refresh")
    @jwtplus.session_route
    async def refresh(request: web.Request) -> web.Response:
        return pair_response(await jwtplus.refresh_session(request, sessions, now=clock()))

    @routes.post("/logout")
    @jwtplus.session_route
    async def logout(request: web.Request) -> web.Response:
        everywhere = request.query.get("everywhere") == "1"
        await jwtplus.end_session(request, sessions, everywhere=everywhere, now=clock())
        return web.json_response({"ok": True})

    @routes.get("/me")
    async def me(request: web.Request) -> web.Response:
        return web.json_response({"username": request[jwtplus.AUTH_CARRY]["username"], "server": args.name})

    async def redis_client(app: web.Application) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = web.Application()
    jwtplus.setup(app, helper)
    app.add_routes(routes)
    app.cleanup_ctx.append(redis_client)
    return app


def main(argv: list[str]) -> None:
    """Bind a port, print it with the pid as one JSON line, and serve until SIGTERM."""
    args = parse_args(argv)
    secret = os.environ["JWTPLUS_CAMPAIGN_SECRET"]
    logging.basicConfig(level=logging.WARNING, format=f"{args.name} %(levelname)s %(message)s")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    app = make_app(args, secret)
    print(json.dumps({"port": sock.getsockname()[1], "pid": os.getpid()}), flush=True)
    web.run_app(app, sock=sock, print=None, access_log=None, handle_signals=True)


if __name__ == "__main__":
    main(sys.argv[1:])

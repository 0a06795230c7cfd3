"""The benchmarked hello-world app, one mode per process.

    BENCH_SECRET=... python bench/servers.py MODE LOOP

MODE is one of MODES, LOOP is "asyncio" or "uvloop". The server listens on
127.0.0.1 at a port the kernel picks, prints that port on one line, and serves
``GET /hello`` ("Hello, world") until it is killed. Every mode serves the same
handler; only the middlewares differ. The HS256 secret comes from the
environment, never from the command line.

jwtplus-jwks is a resource server: it verifies RS256 tokens of an identity
provider with ``jwtplus.IdentityProvider``, whose JWK Set it fetches over HTTP.
The provider is a stand-in in the same process, on a second loopback port:
``jwtplus.jwks_handler`` publishing the public half of BENCH_IDP_KEY, an RSA
private key (PEM) the driver makes with :func:`new_idp_key` and mints its
tokens with (:func:`idp_manager`). Before the server prints its port, one
request through a temporary site fetches the keys, so every measured request
finds them cached. RS256 because identity providers sign with it by default
(and ``IdentityProvider`` expects it by default); a reused token is a cache hit
whatever the algorithm, and bench/run.py's micro benchmark gives the cost of
each algorithm's verification for the fresh-token pattern.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import warnings
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

import jwtplus

MODES = ("bare", "passthrough", "jwtplus", "jwtplus-setup", "jwtplus-jwks", "aiohttp-jwt", "pyjwt")
"""Modes in table order: the baseline first, then the cost of one middleware, then the JWT middlewares."""
SESSION_MODES = ("jwtplus-sessions", "jwtplus-redis", "jwtplus-redis-cached", "jwtplus-cluster")
"""bench/instructions.py's modes besides MODES: ``setup()`` with :class:`jwtplus.Sessions`, their
revocations in a memory store, in a real redis-server at BENCH_REDIS_PORT (one MGET per request, or
with ``cache_for=1`` one a second), or in a Redis Cluster one of whose nodes is at BENCH_REDIS_PORT
(the same MGET, through RedisCluster).
jwtplus-fresh is jwtplus-setup's server; the driver sends it a new token every request."""
SESSION_SETTINGS: dict[str, Any] = {"access_exptime": "1d", "refresh_exptime": "30d"}
"""The sessions of the session modes, driver and server alike: a token minted at the start of a day
stays valid all day, as the other modes' does."""

LOOPS = ("asyncio", "uvloop")

MODE_LABELS = {
    "bare": "bare aiohttp",
    "passthrough": "one pass-through middleware",
    "jwtplus": "jwtplus, the seed's two middlewares (pre_jwt_identifier + post_jwt_router)",
    "jwtplus-setup": "jwtplus, one middleware (jwtplus.setup)",
    "jwtplus-jwks": "jwtplus, JWKS consumer (IdentityProvider, RS256, keys cached)",
    "aiohttp-jwt": "aiohttp-jwt 0.6.1 (JWTMiddleware)",
    "pyjwt": "plain jwt.decode middleware",
    "jwtplus-fresh": "jwtplus, setup(), a different token every request",
    "jwtplus-sessions": "jwtplus, setup() + Sessions + memory_store",
    "jwtplus-redis": "jwtplus, setup() + Sessions + redis_store (redis-server on loopback)",
    "jwtplus-redis-cached": "jwtplus, setup() + Sessions + redis_store(cache_for=1) (redis-server)",
    "jwtplus-cluster": "jwtplus, setup() + Sessions + redis_store (RedisCluster, 3 masters on loopback)",
}

PATH = "/hello"
BODY = "Hello, world"

_PAYLOAD = web.RequestKey[dict[str, Any]]("payload")

IDP_ISSUER = "https://idp.bench.invalid"
"""The ``iss`` of jwtplus-jwks tokens: only compared, never fetched (the JWK Set's address is given)."""
IDP_AUDIENCE = "bench-api"
IDP_CLAIMS = {"sub": "bench"}
"""What jwtplus-jwks tokens carry besides iat, exp, jti, iss and aud: the subject its identifier needs."""
JWKS_PATH = "/.well-known/jwks.json"


def new_idp_key() -> str:
    """A new RSA-2048 private key, PEM: the jwtplus-jwks provider's key for one benchmark run."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")


def idp_manager(private_pem: str) -> jwtplus.SecretManager:
    """The jwtplus-jwks identity provider: it signs the drivers' tokens and publishes its public key."""
    return jwtplus.SecretManager(
        algorithm="RS256", keys=[private_pem], issuer=IDP_ISSUER, audience=IDP_AUDIENCE
    )


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


async def bench_sessions(secret: str, mode: str) -> jwtplus.Sessions:
    """The Sessions of a session mode: the memory store, or redis-py on BENCH_REDIS_PORT, a plain
    client or a cluster client, with the timeouts redis_store asks for and no retries. Each keeps
    redis_store's default replicas: 0 for the plain client, 1 for the cluster client (every write
    waits for a replica's WAIT); the measured requests only read.

    The cluster client learns the cluster's slots here, before the server listens: a RedisCluster
    that has not learnt them sends its first commands to an arbitrary node (MOVED), and as they
    follow the redirections it closes the connections of the others in flight (ConnectionError: a
    503 when it may not retry), so the first round of 50 requests would fail."""
    manager = jwtplus.SecretManager(secret=secret)
    if mode not in ("jwtplus-redis", "jwtplus-redis-cached", "jwtplus-cluster"):
        return jwtplus.Sessions(manager=manager, **SESSION_SETTINGS)
    import redis.asyncio as redis
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    client_class = RedisCluster if mode == "jwtplus-cluster" else redis.Redis
    client = client_class(
        host="127.0.0.1",
        port=int(os.environ["BENCH_REDIS_PORT"]),
        socket_timeout=1,
        socket_connect_timeout=1,
        retry=Retry(NoBackoff(), 0),
    )
    if isinstance(client, RedisCluster):
        await client.initialize()
    cached: dict[str, Any] = {"cache_for": 1} if mode == "jwtplus-redis-cached" else {}  # default: none
    store = jwtplus.redis_store(client, **cached)
    return jwtplus.Sessions(manager=manager, store=store, **SESSION_SETTINGS)


def middlewares(
    mode: str, secret: str, jwks_uri: str | None = None, sessions: jwtplus.Sessions | None = None
) -> list[Middleware]:
    if mode in SESSION_MODES:
        if sessions is None:
            raise ValueError(f"{mode} needs its Sessions (bench_sessions)")
        return [jwtplus.JWTHelper(sessions=sessions, protected_apis=(PATH,)).middleware()]
    if mode == "jwtplus-fresh":
        mode = "jwtplus-setup"
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
    if mode == "jwtplus-jwks":
        if jwks_uri is None:
            raise ValueError("jwtplus-jwks needs the address of its provider's JWK Set")
        provider = jwtplus.IdentityProvider(
            issuer=IDP_ISSUER, audience=IDP_AUDIENCE, jwks_uri=jwks_uri, algorithms=("RS256",)
        )
        return [jwtplus.jwt_middleware(issuers=provider, rules=jwtplus.RoutingRules(protected_apis=(PATH,)))]
    if mode == "aiohttp-jwt":
        return aiohttp_jwt_middlewares(secret)
    if mode == "pyjwt":
        return [pyjwt_middleware(secret)]
    raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")


async def start_idp(idp: jwtplus.SecretManager, stack: contextlib.AsyncExitStack) -> str:
    """Publish *idp*'s JWK Set on a loopback port of its own (stopped with *stack*); return its URL."""
    app = web.Application()
    app.router.add_get(JWKS_PATH, jwtplus.jwks_handler(idp))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return f"http://127.0.0.1:{runner.addresses[0][1]}{JWKS_PATH}"


async def warm_up(runner: web.AppRunner, token: str) -> None:
    """One request with *token* through a temporary site of *runner*, which must answer 200."""
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}{PATH}"
        async with (
            aiohttp.ClientSession() as http,
            http.get(url, headers={"Authorization": f"Bearer {token}"}) as response,
        ):
            status, body = response.status, await response.text()
    finally:
        await site.stop()
    if status != 200 or body != BODY:
        raise RuntimeError(f"the warm-up request got {status} {body[:120]!r}, not 200 {BODY!r}")


async def serve(mode: str, secret: str, exit_after: int = 0) -> None:
    """Serve until killed, or (for bench/instructions.py) until *exit_after* answers to /hello."""
    done, answered = asyncio.Event(), 0

    async def hello_then_maybe_exit(request: web.Request) -> web.Response:
        nonlocal answered
        answered += 1
        if answered == exit_after:
            asyncio.get_running_loop().call_later(0.05, done.set)
        return await hello(request)

    async with contextlib.AsyncExitStack() as stack:
        idp = idp_manager(os.environ["BENCH_IDP_KEY"]) if mode == "jwtplus-jwks" else None
        jwks_uri = await start_idp(idp, stack) if idp is not None else None
        sessions = await bench_sessions(secret, mode) if mode in SESSION_MODES else None
        app = web.Application(middlewares=middlewares(mode, secret, jwks_uri, sessions))
        app.router.add_get(PATH, hello_then_maybe_exit if exit_after else hello)
        runner = web.AppRunner(app)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        if idp is not None:  # fetch the provider's keys now, not in the first measured request
            await warm_up(runner, idp.encode(IDP_CLAIMS))
            answered = 0
        await web.TCPSite(runner, "127.0.0.1", int(os.environ.get("BENCH_PORT", "0"))).start()
        print(runner.addresses[0][1], flush=True)
        await done.wait()


def main(argv: list[str]) -> None:
    known = (*MODES, "jwtplus-fresh", *SESSION_MODES)
    if len(argv) != 2 or argv[0] not in known or argv[1] not in LOOPS:
        sys.exit(
            f"usage: BENCH_SECRET=... [BENCH_IDP_KEY=PEM] [BENCH_REDIS_PORT=N] servers.py "
            f"{{{'|'.join(known)}}} {{{'|'.join(LOOPS)}}}"
        )
    mode, loop = argv
    secret, exit_after = os.environ["BENCH_SECRET"], int(os.environ.get("BENCH_EXIT_AFTER", "0"))
    if loop == "uvloop":
        import uvloop

        uvloop.run(serve(mode, secret, exit_after))
    else:
        asyncio.run(serve(mode, secret, exit_after))


if __name__ == "__main__":
    main(sys.argv[1:])

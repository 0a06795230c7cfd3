"""A small real SPA behind jwtplus: log in with a form, see who you are, call protected APIs, log out.

    python examples/spa_demo.py --host 127.0.0.1 --port 8080    # or: make demo
    python examples/spa_demo.py --certfile cert.pem --keyfile key.pem    # https and wss

The browser never sees a token: the short access token and the long refresh token
live in HttpOnly cookies. Unsafe requests echo the script-readable CSRF cookie in
the X-CSRF-Token header. When the access token expires, the page renews it
silently with the refresh token; logging out revokes the whole login family. The
routing table is the seed's: logged out, /index.html shows the login page; logged
in, /login.html shows the app; unknown paths fall back to one or the other. The
login page's own assets (/static/login.css, /favicon.ico, /robots.txt) are
whitelisted, so they are served without a token instead of the login page. The
WebSocket at /api/socket is authenticated by the same cookie: it greets the user
with {"username": ..., "role": ..., "exp": ...}, echoes what it is sent, and closes
with 4401 when the access token expires or the session ends (a logout in another
tab); the page's live panel then renews over HTTP and reconnects, or goes to the
login page. Tabs renew one at a time (the Web Locks API), so two tabs whose token
expired together stay logged in.

Many processes behind one port accept each other's tokens and see each other's logouts when they
share the secret (JWTPLUS_SECRET, at least 32 bytes; without it each process draws its own) and a
Redis for the sessions (--redis-url, or JWTPLUS_REDIS_URL; pip install redis). The signing key
rotates every --rotation (or JWTPLUS_ROTATION, e.g. 1h; default 0: never) with no coordination:
each period's key derives from the secret and the clock. Two processes sharing port 8080:

    export JWTPLUS_SECRET=$(python -c "import secrets; print(secrets.token_urlsafe(32))")
    python examples/spa_demo.py --reuse-port --redis-url redis://127.0.0.1:6379/0 --rotation 1h &
    python examples/spa_demo.py --reuse-port --redis-url redis://127.0.0.1:6379/0 --rotation 1h

Two gunicorn workers (pip install gunicorn), each building the app with gunicorn_app(); the access
log's first field is the pid of the worker that answered:

    export JWTPLUS_REDIS_URL=redis://127.0.0.1:6379/0 JWTPLUS_ROTATION=1h    # and JWTPLUS_SECRET
    gunicorn 'spa_demo:gunicorn_app' --chdir examples --worker-class aiohttp.GunicornWebWorker \\
        --workers 2 --bind 127.0.0.1:8080 --access-logfile - --access-logformat '%P %s "%r"'
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hashlib
import hmac
import logging
import os
import secrets
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web

import jwtplus

PAGES = Path(__file__).parent / "spa"
# The demo's accounts (name: password, role), printed at start-up and in the README.
DEMO_USERS = {"jacky": ("jwtplus-demo", "user"), "admin": ("jwtplus-admin", "admin")}
# What the login page needs before anyone logs in: served without a token. The patterns must match
# the whole path (re.fullmatch), so escape the dots: r"/favicon.ico" would let "/faviconXico" through.
LOGIN_ASSETS = {
    "/static/login.css": "login.css",
    "/favicon.ico": "favicon.ico",
    "/robots.txt": "robots.txt",
}
WHITELIST = ("/api/login", r"/static/login\.css", r"/favicon\.ico", r"/robots\.txt")
# What processes behind one port must share, from the environment: a secret is never put on argv.
SECRET_ENV, REDIS_ENV, ROTATION_ENV = "JWTPLUS_SECRET", "JWTPLUS_REDIS_URL", "JWTPLUS_ROTATION"


def _scrypt(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)


def make_user_store(users: dict[str, tuple[str, str]]) -> dict[str, tuple[bytes, bytes]]:
    """Username -> (salt, scrypt hash): what a real app keeps in its database."""
    store = {}
    for name, (password, _role) in users.items():
        salt = secrets.token_bytes(16)
        store[name] = (salt, _scrypt(password, salt))
    return store


def check_password(store: dict[str, tuple[bytes, bytes]], username: str, password: str) -> bool:
    """Constant-time check; unknown users cost the same scrypt as known ones."""
    salt, digest = store.get(username, (b"\0" * 16, b""))
    return hmac.compare_digest(_scrypt(password, salt), digest) and bool(digest)


def page(name: str) -> web.Response:
    response = web.Response(body=(PAGES / name).read_bytes(), content_type="text/html")
    response.headers["Cache-Control"] = "no-store"  # the same URL answers differently by login state
    return response


async def index_page(request: web.Request) -> web.Response:
    return page("index.html")


async def login_page(request: web.Request) -> web.Response:
    return page("login.html")


def asset(name: str) -> Callable[[web.Request], Awaitable[web.FileResponse]]:
    async def handler(request: web.Request) -> web.FileResponse:
        return web.FileResponse(PAGES / name)  # the content type follows the file name

    return handler


def make_app(
    cookies: jwtplus.CookiePolicy,
    *,
    secret: str | bytes = "",
    access_exptime: str = "15m",
    rotation: jwtplus.Duration = 0,
    redis_url: str | None = None,
) -> web.Application:
    """The demo app. secret="" draws a random one for this process alone; *rotation* is the key
    rotation period (0: one key); sessions live in Redis at *redis_url*, else in this process."""
    revocations, client = jwtplus.memory_store(), None
    if redis_url:
        import redis.asyncio  # only when asked for: the memory store needs no redis-py

        client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
        revocations = jwtplus.redis_store(client)
    sessions = jwtplus.Sessions(
        manager=jwtplus.SecretManager(secret=secret, refresh_interval=rotation),
        store=revocations,
        access_exptime=access_exptime,
        refresh_exptime="30d",
        # The pages renew one tab at a time (one refresh in flight per tab, serialized across tabs by
        # the Web Locks API), so a refresh token is normally used once. This grace is the second line
        # of defence, for a browser without Web Locks or a request that races anyway: a reuse within
        # 10 s of the first use is refused (401) without revoking the family, and the page picks up
        # the pair the first use set. Within those 10 s a thief's reuse goes unseen too, so keep it
        # small (at most 60 s, and under access_exptime: half of it for --access-exptime 3s).
        reuse_grace=min(10, jwtplus.parse_duration(access_exptime) / 2),
    )
    store = make_user_store(DEMO_USERS)
    helper = jwtplus.JWTHelper(
        unauthorized_return_route="/login.html",
        unauthorized_return_route_handler=login_page,
        authorized_return_page_handler=index_page,
        whitelist=WHITELIST,
        protected_apis=("/api/.*",),
        cookies=cookies,
        sessions=sessions,
    )
    routes = web.RouteTableDef()

    @routes.post("/api/login")
    async def api_login(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        # ValueError: not JSON (JSONDecodeError) or not in its charset (UnicodeDecodeError);
        # LookupError: a charset Python does not know; RecursionError: nested too deep ("[" * 100_000).
        except (ValueError, LookupError, RecursionError):
            raise web.HTTPBadRequest(text="send JSON") from None
        username, password = (
            body.get(k) if isinstance(body, dict) else None for k in ("username", "password")
        )
        if not (isinstance(username, str) and isinstance(password, str)):
            raise web.HTTPBadRequest(text="username and password are required")
        # scrypt takes tens of milliseconds: in a thread, so that a burst of logins stalls no other
        # request, nor a Redis call, whose timeout would expire on a stalled loop (503)
        if not await asyncio.to_thread(check_password, store, username, password):
            return web.json_response({"error": "wrong username or password"}, status=401)
        response = web.json_response({"username": username})
        claims = {"username": username, "role": DEMO_USERS[username][1]}
        await jwtplus.start_session(response, sessions, username, claims, cookies=cookies)
        return response

    @routes.post("/api/refresh")
    @jwtplus.session_route  # runs with an expired access token: refresh_session judges the refresh token
    async def api_refresh(request: web.Request) -> web.Response:
        pair = await jwtplus.refresh_session(request, sessions, cookies=cookies)  # 401 unless it may
        response = web.json_response({"ok": True})
        jwtplus.set_session_cookies(response, sessions, pair, cookies=cookies)
        return response

    @routes.get("/api/me")
    async def api_me(request: web.Request) -> web.Response:
        claims = request[jwtplus.AUTH_CARRY]
        return web.json_response({"username": claims["username"], "role": claims["role"]})

    @routes.get("/api/socket")
    async def api_socket(request: web.Request) -> web.WebSocketResponse:
        claims = request[jwtplus.AUTH_CARRY]
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        await socket.send_json({"username": claims["username"], "role": claims["role"], "exp": claims["exp"]})
        # closes with 4401 at expiry, and within 5 seconds of a logout anywhere
        async for message in jwtplus.authenticated_messages(request, socket, recheck="5s"):
            if message.type == web.WSMsgType.TEXT:
                await socket.send_str(message.data)
        return socket

    @routes.post("/api/setattr")
    async def api_setattr(request: web.Request) -> web.Response:
        user = request[jwtplus.AUTH_CARRY]["username"]
        return web.json_response({"ok": True, "message": f"attribute set for {user}"})

    @routes.post("/api/admin")
    @jwtplus.require_claims(role="admin")
    async def api_admin(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "message": "admin action done"})

    @routes.post("/api/logout")
    @jwtplus.session_route  # logging out works in every state: valid, expired or already revoked
    async def api_logout(request: web.Request) -> web.Response:
        await jwtplus.end_session(request, sessions, cookies=cookies)  # revokes the login family
        response = web.json_response({"ok": True})
        jwtplus.clear_login_cookies(response, cookies=cookies)
        return response

    routes.get("/index.html")(index_page)
    routes.get("/login.html")(login_page)
    for path, name in LOGIN_ASSETS.items():
        routes.get(path)(asset(name))
    app = web.Application()
    jwtplus.setup(app, helper)
    app.add_routes(routes)
    if client is not None:

        async def close_redis(app: web.Application) -> AsyncIterator[None]:
            yield
            await client.aclose()

        app.cleanup_ctx.append(close_redis)
    return app


def unshared(secret: str, redis_url: str | None, *, redis_setting: str) -> str | None:
    """Why processes sharing a port would disagree with these settings, or None if they agree;
    *redis_setting* names where the Redis URL comes from."""
    missing = []
    if not secret:
        missing.append(f"{SECRET_ENV} (without it each process draws its own and refuses the others' tokens)")
    if not redis_url:
        missing.append(f"{redis_setting} (without it a logout holds only on the process that answered it)")
    return "set " + " and ".join(missing) if missing else None


async def gunicorn_app() -> web.Application:
    """The app for gunicorn's aiohttp worker, which awaits this factory in each worker process.

    gunicorn passes the app no options, so its settings come from the environment: JWTPLUS_SECRET
    and JWTPLUS_REDIS_URL, both required (workers must agree), and JWTPLUS_ROTATION.
    """
    secret, redis_url = os.environ.get(SECRET_ENV, ""), os.environ.get(REDIS_ENV)
    if problem := unshared(secret, redis_url, redis_setting=REDIS_ENV):
        raise RuntimeError(f"spa_demo under gunicorn: {problem}")
    logging.basicConfig(level=logging.INFO, format="[%(process)d] %(message)s")  # jwtplus's refusals
    rotation = os.environ.get(ROTATION_ENV, "0")
    return make_app(jwtplus.CookiePolicy(), secret=secret, rotation=rotation, redis_url=redis_url)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default: %(default)s)")
    parser.add_argument(
        "--access-exptime", default="15m", help="access token lifetime, e.g. 30s to watch renewals"
    )
    parser.add_argument("--certfile", help="PEM certificate chain: serve https (and wss) instead of http")
    parser.add_argument("--keyfile", help="PEM private key of --certfile")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get(REDIS_ENV),
        help=f"keep sessions in Redis, e.g. redis://127.0.0.1:6379/0 (default: ${REDIS_ENV}, else memory)",
    )
    parser.add_argument(
        "--rotation",
        default=os.environ.get(ROTATION_ENV, "0"),
        help=f"key rotation period, e.g. 1h (default: ${ROTATION_ENV}, else 0: never)",
    )
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help=f"share the port with other processes (SO_REUSEPORT); needs ${SECRET_ENV} and --redis-url",
    )
    args = parser.parse_args()
    if (args.certfile is None) != (args.keyfile is None):
        parser.error("--certfile and --keyfile go together")
    secret = os.environ.get(SECRET_ENV, "")
    if args.reuse_port and (problem := unshared(secret, args.redis_url, redis_setting="--redis-url")):
        parser.error(f"--reuse-port: {problem}")
    tls = None
    if args.certfile:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.certfile, args.keyfile)
    # the access log, and jwtplus's refusals; processes sharing a port (and a terminal) say which answered
    logging.basicConfig(
        level=logging.INFO, format="[%(process)d] %(message)s" if args.reuse_port else "%(message)s"
    )
    # The demo serves plain http on 127.0.0.1, which browsers treat as a secure context, so the
    # strict defaults (Secure, __Host- names) work as they would behind https in production.
    cookies = jwtplus.CookiePolicy()
    try:
        app = make_app(
            cookies,
            secret=secret,
            access_exptime=args.access_exptime,
            rotation=args.rotation,
            redis_url=args.redis_url,
        )
    except ValueError as exc:  # a short JWTPLUS_SECRET, a --rotation of no whole seconds, a bad --redis-url
        sys.exit(f"spa_demo: {exc}")
    # bind first: a busy port is one line, before any banner
    listening = listen(args.host, args.port, reuse_port=args.reuse_port)
    url = f"{'https' if tls else 'http'}://{args.host}:{args.port}"
    print(f"jwtplus SPA demo on {url}/index.html - log in as", flush=True)
    for name, (password, role) in DEMO_USERS.items():
        print(f"    username: {name:<6} password: {password:<14} ({role})", flush=True)
    web.run_app(app, sock=listening, ssl_context=tls, print=None)


def listen(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A socket listening on *host*:*port*, or exit with one line on stderr that names the port.

    With *reuse_port* (SO_REUSEPORT), other processes that set it too listen on the same port, and
    the kernel spreads the new connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        # SO_REUSEADDR always, as aiohttp; SO_REUSEPORT when asked
        return socket.create_server((host, port), family=family, backlog=128, reuse_port=reuse_port)
    except ValueError as exc:  # no SO_REUSEPORT on this platform
        sys.exit(f"spa_demo: --reuse-port: {exc}")
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            sys.exit(f"spa_demo: port {port} on {host} is already in use (make demo PORT=8081 picks another)")
        sys.exit(f"spa_demo: cannot listen on {host} port {port}: {exc.strerror or exc}")


if __name__ == "__main__":
    main()

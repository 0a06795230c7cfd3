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
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import hmac
import logging
import secrets
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable
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
    cookies: jwtplus.CookiePolicy, *, secret: str | bytes = "", access_exptime: str = "15m"
) -> web.Application:
    sessions = jwtplus.Sessions(
        manager=jwtplus.SecretManager(secret=secret),
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
        if not check_password(store, username, password):
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
    return app


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
    args = parser.parse_args()
    if (args.certfile is None) != (args.keyfile is None):
        parser.error("--certfile and --keyfile go together")
    tls = None
    if args.certfile:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.certfile, args.keyfile)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the access log, and jwtplus's refusals
    # The demo serves plain http on 127.0.0.1, which browsers treat as a secure context, so the
    # strict defaults (Secure, __Host- names) work as they would behind https in production.
    cookies = jwtplus.CookiePolicy()
    app = make_app(cookies, access_exptime=args.access_exptime)
    listening = listen(args.host, args.port)  # bind first: a busy port is one line, before any banner
    url = f"{'https' if tls else 'http'}://{args.host}:{args.port}"
    print(f"jwtplus SPA demo on {url}/index.html - log in as", flush=True)
    for name, (password, role) in DEMO_USERS.items():
        print(f"    username: {name:<6} password: {password:<14} ({role})", flush=True)
    web.run_app(app, sock=listening, ssl_context=tls, print=None)


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on *host*:*port*, or exit with one line on stderr that names the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)  # SO_REUSEADDR, as aiohttp
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            sys.exit(f"spa_demo: port {port} on {host} is already in use (make demo PORT=8081 picks another)")
        sys.exit(f"spa_demo: cannot listen on {host} port {port}: {exc.strerror or exc}")


if __name__ == "__main__":
    main()

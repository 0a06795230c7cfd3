"""A small real SPA behind jwtplus: log in with a form, see who you are, call a protected API, log out.

    python examples/spa_demo.py --host 127.0.0.1 --port 8080    # or: make demo

The browser never sees the token: it lives in an HttpOnly cookie. Unsafe requests
echo the script-readable CSRF cookie in the X-CSRF-Token header. The routing table is
the seed's: logged out, /index.html shows the login page; logged in, /login.html
shows the app; unknown paths fall back to one or the other.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import secrets
from pathlib import Path

from aiohttp import web

import jwtplus

PAGES = Path(__file__).parent / "spa"
DEMO_USERS = {"jacky": "jwtplus-demo"}  # the demo's only account; printed at start-up and in the README


def _scrypt(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)


def make_user_store(users: dict[str, str]) -> dict[str, tuple[bytes, bytes]]:
    """Username -> (salt, scrypt hash): what a real app keeps in its database."""
    store = {}
    for name, password in users.items():
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


def make_app(cookies: jwtplus.CookiePolicy, secret: str | bytes = "") -> web.Application:
    manager = jwtplus.SecretManager(secret=secret, exptime="1h")
    store = make_user_store(DEMO_USERS)
    helper = jwtplus.JWTHelper(
        unauthorized_return_route="/login.html",
        unauthorized_return_route_handler=login_page,
        authorized_return_page_handler=index_page,
        secret_manager=manager,
        whitelist=("/api/login",),
        protected_apis=("/api/.*",),
        cookies=cookies,
    )
    routes = web.RouteTableDef()

    @routes.post("/api/login")
    async def api_login(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            raise web.HTTPBadRequest(text="send JSON") from None
        username, password = (
            body.get(k) if isinstance(body, dict) else None for k in ("username", "password")
        )
        if not (isinstance(username, str) and isinstance(password, str)):
            raise web.HTTPBadRequest(text="username and password are required")
        if not check_password(store, username, password):
            return web.json_response({"error": "wrong username or password"}, status=401)
        response = web.json_response({"username": username})
        jwtplus.login(response, manager, {"username": username}, cookies=cookies)
        return response

    @routes.get("/api/me")
    async def api_me(request: web.Request) -> web.Response:
        return web.json_response({"username": request[jwtplus.AUTH_CARRY]["username"]})

    @routes.post("/api/setattr")
    async def api_setattr(request: web.Request) -> web.Response:
        user = request[jwtplus.AUTH_CARRY]["username"]
        return web.json_response({"ok": True, "message": f"attribute set for {user}"})

    @routes.post("/api/logout")
    async def api_logout(request: web.Request) -> web.Response:
        response = web.json_response({"ok": True})
        jwtplus.logout(response, cookies=cookies)
        return response

    routes.get("/index.html")(index_page)
    routes.get("/login.html")(login_page)
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
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the access log, and jwtplus's refusals
    # The demo serves plain http on 127.0.0.1, which browsers treat as a secure context, so the
    # strict defaults (Secure, __Host- names) work as they would behind https in production.
    cookies = jwtplus.CookiePolicy()
    url = f"http://{args.host}:{args.port}"
    print(f"jwtplus SPA demo on {url}/index.html - log in as", flush=True)
    for name, password in DEMO_USERS.items():
        print(f"    username: {name}    password: {password}", flush=True)
    web.run_app(make_app(cookies), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()

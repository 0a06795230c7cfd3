"""The seed's demo: server_basic.py plus a few lines to start it with jwtplus in front.

    python examples/server.py --host 127.0.0.1 --port 8080    # (make demo runs the SPA demo, spa_demo.py)
    python examples/client.py --url http://127.0.0.1:8080     # in another shell

Routing table (what a request gets):

    path             logged in (valid token)    anyone else
    /index.html      /index.html                /login.html
    /login.html      /index.html                /login.html
    /authentication  /authentication            /authentication   (whitelisted)
    /setattr         /setattr                   401               (protected api)
    /404             /index.html                /login.html       (404s are left to the SPA)
"""

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from jwtplus import (
    JWTHelper,
    SecretManager,
    basic_identifier,
    basic_token_getter,
    show_request_info,
)

# Add several lines to easily start a server with jwtplus-plugin.
routes = web.RouteTableDef()


@routes.get("/index.html")
async def main_spa_page(request: web.Request) -> web.Response:
    show_request_info(request)
    return web.Response(text="this is index.html")


@routes.get("/login.html")
async def login_spa_page(request: web.Request) -> web.Response:
    show_request_info(request)
    return web.Response(text="this is login.html")


@routes.get("/authentication")
async def loginapi(request: web.Request) -> web.Response:
    show_request_info(request)
    return web.Response(text="loginapi called")


@routes.get("/setattr")
async def setattr_api(request: web.Request) -> web.Response:
    show_request_info(request)
    return web.Response(text="this is a protected api")


# 'testsecret' is the seed's demo secret: shorter than HS256's 32 bytes, so jwtplus refuses it unless
# told otherwise (allow_weak_secret). In a real app use secrets.token_urlsafe(32), kept out of the code.
secret_manager = SecretManager(
    secret="testsecret",  # default empty, will generate a random string.
    refresh_interval="30d",  # default 0, represents secret auto refresh disabled. Accept string or int
    scheme="Bearer",  # default.
    algorithm="HS256",  # default.
    exptime="30d",  # default.
    allow_weak_secret=True,  # the seed's demo secret: for this example only
)

jwt = JWTHelper(
    unauthorized_return_route="/login.html",
    # this's an exception which means if you've already logged in, you cannot access to this page.
    unauthorized_return_route_handler=login_spa_page,
    authorized_return_page_handler=main_spa_page,
    secret_manager=secret_manager,
    token_getter=basic_token_getter,  # default
    identifier=basic_identifier,  # default
    whitelist=("/authentication",),  # must be a tuple, accepts regular expressions (whole path).
    protected_apis=["/setattr"],
)


async def secret_auto_refresh(app: web.Application) -> AsyncIterator[None]:
    """Run secret_manager.auto_refresh() in the background while the app runs.

    Keys are a pure function of the secret and the clock, so this only warms the
    key cache; it is kept because the seed runs it.
    """
    task = asyncio.create_task(secret_manager.auto_refresh())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def make_app() -> web.Application:
    app = web.Application(
        middlewares=[
            jwt.pre_jwt_identifier(),
            jwt.post_jwt_router(),
        ]
    )
    app.add_routes(routes)
    app.cleanup_ctx.append(secret_auto_refresh)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default: %(default)s)")
    args = parser.parse_args()

    url = f"http://{args.host}:{args.port}"
    print(f"jwtplus demo on {url} - try it with: python examples/client.py --url {url}", flush=True)
    web.run_app(make_app(), host=args.host, port=args.port)


if __name__ == "__main__":
    main()

"""A basic aiohttp hello-world server with four kinds of routing requirement.

No authentication yet: compare it with server.py, which adds jwtplus in front.

    python examples/server_basic.py --host 127.0.0.1 --port 8080
"""

import argparse

from aiohttp import web

# here's a basic aiohttp hello-world server with four kinds of routing requirement respectively.
routes = web.RouteTableDef()


@routes.get("/index.html")
async def main_spa_page(request: web.Request) -> web.Response:
    return web.Response(text="this is index.html")


@routes.get("/login.html")
async def login_spa_page(request: web.Request) -> web.Response:
    return web.Response(text="this is login.html")


@routes.get("/authentication")
async def loginapi(request: web.Request) -> web.Response:
    return web.Response(text="loginapi called")


@routes.get("/setattr")
async def setattr_api(request: web.Request) -> web.Response:
    return web.Response(text="this is a protected api")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default: %(default)s)")
    args = parser.parse_args()

    app = web.Application(middlewares=[])
    app.add_routes(routes)
    web.run_app(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()

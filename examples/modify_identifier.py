"""Self-modified identifier (a token getter is swapped the same way, with token_getter=...).

    python examples/modify_identifier.py --host 127.0.0.1 --port 8080

Then start a simulated client and send a header with a jwt whose payload has
'username': 'admin' in it, and check that you get the correct response:

    token = SecretManager(secret="testsecret", allow_weak_secret=True).encode({"username": "admin"})
    GET /index.html with "Authorization: Bearer <token>"  ->  pass
    any other username, a bad token or no token           ->  fail
"""

import argparse
from typing import Any

from aiohttp import web

from jwtplus import JWTHelper, SecretManager

routes = web.RouteTableDef()


async def identifier_mod(payload: dict[str, Any]) -> dict[str, Any] | bool:
    """
    An identifier accepts a payload (as dictionary of jwt decoded result),
    and whose return value will be stored as one of request's property named 'auth_carry'.
    If you would like to make identification fail in middleware (before handle requests),
    return False.
    You don't need to worry about exceptions: one raised here rejects the request.
    """
    if "username" in payload:
        return payload
    else:
        return False


@routes.get("/index.html")
async def authorised(request: web.Request) -> web.Response:
    # 'auth_carry' is what identifier_mod returned, or None when the token was missing,
    # invalid, expired or rejected (jwtplus.AUTH_CARRY is the same value under a typed key).
    carry = request["auth_carry"]
    username = carry["username"] if carry else None
    if username == "admin":
        return web.Response(text="pass")
    else:
        return web.Response(text="fail")


# 'testsecret' is the seed's demo secret: shorter than HS256's 32 bytes, so jwtplus refuses it unless
# told otherwise. In a real app use secrets.token_urlsafe(32), kept out of the code.
secret_manager = SecretManager(secret="testsecret", allow_weak_secret=True)
jwt = JWTHelper(
    unauthorized_return_route="",
    unauthorized_return_route_handler=authorised,
    authorized_return_page_handler=authorised,
    secret_manager=secret_manager,
    identifier=identifier_mod,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default: %(default)s)")
    args = parser.parse_args()

    app = web.Application(
        middlewares=[
            jwt.pre_jwt_identifier(),
            jwt.post_jwt_router(),
        ]
    )
    app.add_routes(routes)
    web.run_app(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()

"""A resource server: an API that accepts the access tokens of your identity provider, and mints none.

    python examples/resource_server.py --issuer https://idp.example.com/realms/main --audience my-api

jwtplus finds the provider's keys through OpenID discovery (or --jwks-uri), fetches them with aiohttp's
client and keeps them by kid; it needs the crypto extra (pip install 'aiohttp-jwtplus[crypto]').

    GET /health       public
    GET /api/me       the token's subject, client and scopes
    GET /api/reports  only with the "reports:read" scope
    GET /api/socket   a WebSocket (token in Authorization, or ?access_token= for browsers); it closes
                      with 4401 when the token expires, unless the client sends a fresh one:
                      {"type": "authenticate", "token": "..."}
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

import jwtplus


def scopes(claims: dict[str, Any]) -> set[str]:
    """The scopes of an access token: RFC 9068's space-separated ``scope`` (or a list, as some send)."""
    scope = claims.get("scope", "")
    return set(scope.split() if isinstance(scope, str) else scope)


class PathOnlyAccessLogger(AbstractAccessLogger):
    """aiohttp's access log writes the query string, and a browser's socket sends its token there."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %d %.3fs", request.remote, request.method, request.path, response.status, time
        )


def make_app(provider: jwtplus.IdentityProvider) -> web.Application:
    routes = web.RouteTableDef()

    @routes.get("/health")
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    @routes.get("/api/me")
    async def me(request: web.Request) -> web.Response:
        claims = request[jwtplus.AUTH_CLAIMS] or {}
        return web.json_response(
            {"sub": claims["sub"], "client_id": claims.get("client_id"), "scopes": sorted(scopes(claims))}
        )

    @routes.get("/api/reports")
    @jwtplus.require(lambda claims: "reports:read" in scopes(claims))
    async def reports(request: web.Request) -> web.Response:
        return web.json_response({"reports": []})

    @routes.get("/api/socket")
    @jwtplus.route_options(locations=("header", "query"))
    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        async for message in jwtplus.authenticated_messages(request, ws):
            if message.type == web.WSMsgType.TEXT:
                await ws.send_str(message.data)
        return ws

    rules = jwtplus.RoutingRules(whitelist=("/health",), protected_apis=("/api/.*",))
    app = web.Application(middlewares=[jwtplus.jwt_middleware(issuers=provider, rules=rules)])
    app.add_routes(routes)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--issuer", required=True, help="the provider's issuer URL, exactly as in its tokens")
    parser.add_argument("--audience", required=True, help="this API's identifier in the tokens' aud")
    parser.add_argument("--jwks-uri", help="the provider's JWK Set (default: from OpenID discovery)")
    parser.add_argument("--algorithms", default="RS256", help="comma-separated (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8081, help="port to listen on (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the access log, and jwtplus's warnings
    provider = jwtplus.IdentityProvider(
        issuer=args.issuer,
        audience=args.audience,
        jwks_uri=args.jwks_uri,
        algorithms=tuple(args.algorithms.split(",")),
    )
    web.run_app(make_app(provider), host=args.host, port=args.port, access_log_class=PathOnlyAccessLogger)


if __name__ == "__main__":
    main()

"""Tests for jwtplus: real aiohttp apps through the test client, and the pure pieces alone.

Sections follow jwtplus.py: durations, configuration, keys and rotation,
encode/decode, token getters and identifiers, the routing decision, the
middlewares and the seed's table, aiohttp wiring, hardening, path spellings,
and the examples and servers as real processes.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import math
import time
import warnings
from datetime import timedelta
from typing import Any

import jwt
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

import jwtplus
from jwtplus import Action, JWTHelper, RoutingRules, SecretManager, decide

SECRET = b"0123456789abcdef0123456789abcdef"  # 32 bytes: no WeakSecretWarning
NOW = 1_800_000_000.0


def manager(**kwargs: Any) -> SecretManager:
    kwargs.setdefault("secret", SECRET)
    return SecretManager(**kwargs)


# ---- Durations ----


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30d", 2_592_000),
        ("12h", 43_200),
        ("15m", 900),
        ("10s", 10),
        ("1.5h", 5_400),
        ("2w", 1_209_600),
        ("3600", 3_600),
        ("0", 0),
        (90, 90),
        (2.5, 2.5),
        (timedelta(minutes=3), 180),
    ],
)
def test_parse_duration_accepts_the_documented_forms(value: jwtplus.Duration, seconds: float) -> None:
    assert jwtplus.parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    [
        "",
        "30x",
        "-5",
        "1e3",
        "30 d",
        "d",
        "1.5.h",
        "\u0663\u0660d",
        True,
        None,
        -1,
        math.inf,
        math.nan,
        10**11,
        [30],
    ],
)
def test_parse_duration_refuses_anything_else_naming_the_parameter(value: Any) -> None:
    with pytest.raises(ValueError, match=r"exptime=.*(use|between)") as excinfo:
        jwtplus.parse_duration(value, name="exptime")
    assert '"30d"' in str(excinfo.value)


@given(st.integers(0, 10**4), st.sampled_from(["", "s", "m", "h", "d", "w"]))
def test_parse_duration_units_multiply(number: int, unit: str) -> None:
    factor = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    assert jwtplus.parse_duration(f"{number}{unit}") == number * factor


@given(st.text(max_size=12))
def test_parse_duration_never_fails_but_with_value_error(text: str) -> None:
    try:
        seconds = jwtplus.parse_duration(text, name="leeway")
    except ValueError as exc:
        assert "leeway=" in str(exc)
    else:
        assert 0 <= seconds <= 10**10


# ---- Configuration ----


def test_secret_manager_defaults_follow_the_seed() -> None:
    sm = SecretManager()
    assert (sm.refresh_interval, sm.scheme, sm.algorithm, sm.exptime) == (0, "Bearer", "HS256", "30d")
    assert sm.exptime_seconds == 30 * 86400
    assert sm.refresh_seconds == 0
    token = sm.encode({"username": "ann"})
    assert SecretManager().decode is not None
    with pytest.raises(jwt.InvalidSignatureError):
        SecretManager().decode(token)  # a new random secret each time
    assert sm.decode(token)["username"] == "ann"


def test_secret_manager_is_frozen_and_hides_its_secret() -> None:
    sm = manager(refresh_interval="1h")
    assert "0123456789abcdef" not in repr(sm)
    with pytest.raises(AttributeError):
        sm.exptime = "1d"  # type: ignore[misc]


def test_secret_manager_accepts_seed_positional_arguments() -> None:
    sm = SecretManager(SECRET * 2, "1h", "JWT", "HS512", "15m", leeway=5)
    assert (sm.refresh_seconds, sm.scheme, sm.algorithm, sm.exptime_seconds, sm.leeway_seconds) == (
        3600,
        "JWT",
        "HS512",
        900,
        5,
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exptime": 0}, "exptime=0 must be positive"),
        ({"exptime": "soon"}, "exptime='soon' is not a duration"),
        ({"refresh_interval": -1}, "refresh_interval=-1"),
        ({"refresh_interval": "1.5s"}, "whole number of seconds"),
        ({"leeway": "a bit"}, "leeway="),
        ({"algorithm": "none"}, "algorithm='none' is not supported: use one of HS256, HS384, HS512"),
        ({"algorithm": "RS256"}, "algorithm='RS256'"),
        ({"scheme": "Bear er"}, "scheme="),
        ({"scheme": ""}, "scheme="),
        ({"secret": b"ssh-ed25519 " + SECRET}, "secret is not usable"),
    ],
)
def test_secret_manager_refuses_bad_configuration(kwargs: dict[str, Any], message: str) -> None:
    kwargs.setdefault("secret", SECRET)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("?", r"\?")):
        SecretManager(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"secret": 12345}, "secret must be str or bytes"),
        ({"audience": 5}, "audience=5"),
        ({"audience": []}, "audience="),
        ({"issuer": ["a"]}, "issuer="),
    ],
)
def test_secret_manager_refuses_bad_types(kwargs: dict[str, Any], message: str) -> None:
    kwargs.setdefault("secret", SECRET)
    with pytest.raises(TypeError, match=message):
        SecretManager(**kwargs)


@pytest.mark.parametrize(("algorithm", "size"), [("HS256", 32), ("HS384", 48), ("HS512", 64)])
def test_short_secret_warns_once_at_construction(algorithm: str, size: int) -> None:
    with pytest.warns(
        jwtplus.WeakSecretWarning, match=f"{size - 1} bytes; {algorithm} wants at least {size}"
    ):
        sm = SecretManager(secret=b"x" * (size - 1), algorithm=algorithm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        token = sm.encode({"username": "ann"})  # no warning from jwtplus nor PyJWT here
        assert sm.decode(token)["username"] == "ann"
        SecretManager(secret=b"x" * size, algorithm=algorithm)


def test_seed_testsecret_still_works() -> None:
    with pytest.warns(jwtplus.WeakSecretWarning):
        sm = SecretManager(secret="testsecret", refresh_interval="30d", exptime="30d")
    assert sm.decode(sm.encode({"username": "jacky"}))["username"] == "jacky"


def test_routing_rules_validate_patterns_at_construction() -> None:
    with pytest.raises(ValueError, match=r"whitelist holds the bad regular expression '/css/\('"):
        RoutingRules(whitelist=("/css/(",))
    with pytest.raises(TypeError, match="trailing comma"):
        RoutingRules(protected_apis="/api")
    with pytest.raises(TypeError, match="protected_apis holds 5"):
        RoutingRules(protected_apis=[5])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"login_route='login\.html'"):
        RoutingRules(login_route="login.html")
    with pytest.raises(ValueError, match="protected_apis"):
        JWTHelper(secret_manager=manager(), protected_apis=["/api/[a-"])


def test_jwt_helper_refuses_bad_arguments() -> None:
    with pytest.raises(TypeError, match="secret_manager must be a SecretManager"):
        JWTHelper(secret_manager="testsecret")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="identifier must be callable"):
        JWTHelper(secret_manager=manager(), identifier="username")  # type: ignore[arg-type]


# ---- Keys and rotation ----


def test_rotation_off_signs_with_the_secret_itself_and_no_kid() -> None:
    sm = manager()
    token = sm.encode({"username": "ann"}, now=NOW)
    assert "kid" not in jwt.get_unverified_header(token)
    claims = jwt.decode(
        token, SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_iat": False}
    )
    assert claims["username"] == "ann"


def test_rotation_key_derivation_is_the_documented_hmac() -> None:
    sm = manager(refresh_interval=3600)
    period = jwtplus.period_of(NOW, 3600)
    token = sm.encode({"username": "ann"}, now=NOW)
    assert jwt.get_unverified_header(token)["kid"] == str(period) == "500000"
    expected = hmac.new(SECRET, b"jwtplus-rotation-v1:500000", hashlib.sha256).digest()
    assert jwtplus.key_for_period(sm, period) == expected
    claims = jwt.decode(
        token, expected, algorithms=["HS256"], options={"verify_exp": False, "verify_iat": False}
    )
    assert claims["username"] == "ann"
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_iat": False})


@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
def test_rotation_derives_keys_as_long_as_the_hash(algorithm: str) -> None:
    sm = SecretManager(secret=SECRET * 2, algorithm=algorithm, refresh_interval=60)
    assert len(jwtplus.key_for_period(sm, 7)) == hashlib.new(algorithm.replace("HS", "sha")).digest_size


def test_a_token_verifies_at_every_instant_until_it_expires_and_fails_after() -> None:
    interval, life = 100, 250
    sm = manager(refresh_interval=interval, exptime=life)
    minted = NOW + 37.5  # somewhere inside a period
    token = sm.encode({"username": "ann"}, now=minted)
    for offset in range(0, life):
        assert sm.decode(token, now=int(minted) + offset)["username"] == "ann"
    with pytest.raises(jwt.ExpiredSignatureError):
        sm.decode(token, now=int(minted) + life)
    with pytest.raises(jwt.InvalidTokenError):
        sm.decode(token, now=int(minted) + life + 10 * interval)


def test_the_rotation_window_is_enforced_even_when_the_payload_claims_longer() -> None:
    interval, life = 100, 50
    sm = manager(refresh_interval=interval, exptime=life)
    period = jwtplus.period_of(NOW, interval)
    token = sm.encode({"exp": NOW + 10_000}, now=NOW)  # the payload's exp wins in the token...
    end = (period + 1) * interval + life
    assert sm.decode(token, now=end - 1)["exp"] == NOW + 10_000
    with pytest.raises(jwtplus.KeyIdError):  # ...but the period's key is retired at its window's end
        sm.decode(token, now=end)
    with pytest.raises(jwtplus.KeyIdError):  # and a period cannot be used before it starts
        sm.decode(sm.encode({}, now=NOW + interval), now=(period + 1) * interval - 1)


def test_leeway_widens_every_time_check() -> None:
    sm = manager(refresh_interval=100, exptime=50, leeway=10)
    token = sm.encode({}, now=NOW)
    assert sm.decode(token, now=NOW + 59)
    with pytest.raises(jwt.ExpiredSignatureError):
        sm.decode(token, now=NOW + 60)
    early = sm.encode({}, now=NOW + 100)  # next period, minted by a clock running 5 s fast
    assert sm.decode(early, now=NOW + 95)


def test_two_managers_with_the_same_secret_agree_and_different_secrets_do_not() -> None:
    a, b = manager(refresh_interval="1h"), manager(refresh_interval="1h")
    other = SecretManager(secret=b"another secret of thirty-two byte", refresh_interval="1h")
    for now in (NOW, NOW + 3599, NOW + 3600, NOW + 86400):
        token = a.encode({"username": "ann"}, now=now)
        assert b.decode(token, now=now + 1)["username"] == "ann"
        with pytest.raises(jwt.InvalidSignatureError):
            other.decode(token, now=now + 1)


def test_turning_rotation_on_retires_tokens_minted_without_it() -> None:
    token = manager().encode({}, now=NOW)
    with pytest.raises(jwtplus.KeyIdError):
        manager(refresh_interval=60).decode(token, now=NOW)


async def test_auto_refresh_is_harmless_and_cancels_cleanly() -> None:
    await manager().auto_refresh()  # no rotation: returns at once
    task = asyncio.create_task(manager(refresh_interval=3600).auto_refresh())
    await asyncio.sleep(0)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# ---- Encode / decode ----


def test_encode_adds_iat_exp_jti_and_the_payload_wins() -> None:
    sm = manager(exptime="1h")
    claims = sm.decode(sm.encode({"username": "ann"}, now=NOW), now=NOW)
    assert claims["iat"] == NOW and claims["exp"] == NOW + 3600 and len(claims["jti"]) >= 16
    mine = sm.decode(sm.encode({"jti": "mine", "exp": NOW + 5}, now=NOW), now=NOW)
    assert mine["jti"] == "mine" and mine["exp"] == NOW + 5
    assert sm.decode(sm.encode({}, now=NOW), now=NOW)["jti"] != claims["jti"]


def test_encode_refuses_what_decode_would_refuse() -> None:
    sm = manager()
    with pytest.raises(TypeError, match="payload must be a mapping"):
        sm.encode([("username", "ann")])  # type: ignore[arg-type]
    with pytest.raises(jwt.DecodeError, match="exp claim must be a number"):
        sm.encode({"exp": "9999999999"})
    with pytest.raises(TypeError):
        sm.encode({"when": object()})


def test_audience_and_issuer_are_stamped_and_required() -> None:
    sm = manager(audience=["web", "app"], issuer="https://auth.example")
    claims = sm.decode(sm.encode({}, now=NOW), now=NOW)
    assert claims["aud"] == ["web", "app"] and claims["iss"] == "https://auth.example"
    assert sm.decode(sm.encode({"aud": "app"}, now=NOW), now=NOW)
    with pytest.raises(jwt.InvalidAudienceError):
        sm.decode(sm.encode({"aud": "mobile"}, now=NOW), now=NOW)
    with pytest.raises(jwt.InvalidIssuerError):
        sm.decode(sm.encode({"iss": "https://evil.example"}, now=NOW), now=NOW)
    plain = manager()
    with pytest.raises(jwt.InvalidAudienceError):
        plain.decode(plain.encode({"aud": "web"}, now=NOW), now=NOW)


def test_decode_of_an_expired_token_raises_expired_signature() -> None:
    sm = manager(exptime=10)
    with pytest.raises(jwt.ExpiredSignatureError):
        sm.decode(sm.encode({}, now=NOW), now=NOW + 10)


# ---- Token getters and identifiers ----


def test_basic_identifier_wants_a_non_empty_username() -> None:
    assert jwtplus.basic_identifier({"username": "ann"}) == {"username": "ann"}
    for payload in ({}, {"username": ""}, {"username": 5}, {"username": None}):
        assert jwtplus.basic_identifier(payload) is None


# ---- The routing decision, without a server ----

SPA = RoutingRules(
    login_route="/login.html",
    whitelist=("/login_api", "/css/.+"),
    protected_apis=("/setattr_api",),
    login_page=True,
    app_page=True,
)
API = RoutingRules(whitelist=("/login_api",), protected_apis=("/setattr_api",))


@pytest.mark.parametrize(
    ("path", "method", "route_found", "authorized", "unauthorized"),
    [
        # the seed's table
        ("/index.html", "GET", True, Action.HANDLER, Action.LOGIN_PAGE),
        ("/login.html", "GET", True, Action.APP_PAGE, Action.LOGIN_PAGE),
        ("/login_api", "GET", True, Action.HANDLER, Action.HANDLER),
        ("/login_api", "POST", True, Action.HANDLER, Action.HANDLER),
        ("/setattr_api", "GET", True, Action.HANDLER, Action.UNAUTHORIZED),
        ("/setattr_api", "POST", True, Action.HANDLER, Action.UNAUTHORIZED),
        ("/404", "GET", False, Action.APP_PAGE, Action.LOGIN_PAGE),
        # the rest of the table
        ("/index.html", "HEAD", True, Action.HANDLER, Action.LOGIN_PAGE),
        ("/login.html", "POST", True, Action.HANDLER, Action.UNAUTHORIZED),
        ("/anything", "POST", True, Action.HANDLER, Action.UNAUTHORIZED),
        ("/nothing", "DELETE", False, Action.HANDLER, Action.UNAUTHORIZED),
        ("/css/1.css", "GET", True, Action.HANDLER, Action.HANDLER),
        ("/css/", "GET", False, Action.APP_PAGE, Action.LOGIN_PAGE),
    ],
)
def test_decide_spa_table(
    path: str, method: str, route_found: bool, authorized: Action, unauthorized: Action
) -> None:
    assert decide(SPA, path, method, route_found, "pass") is authorized
    for status in ("missing", "invalid", "expired"):
        assert decide(SPA, path, method, route_found, status) is unauthorized
    rejected = Action.FORBIDDEN if unauthorized is Action.UNAUTHORIZED else unauthorized
    assert decide(SPA, path, method, route_found, "rejected") is rejected


@pytest.mark.parametrize(
    ("path", "method", "route_found", "authorized", "unauthorized"),
    [
        ("/index.html", "GET", True, Action.HANDLER, Action.UNAUTHORIZED),
        ("/404", "GET", False, Action.HANDLER, Action.UNAUTHORIZED),
        ("/login_api", "POST", True, Action.HANDLER, Action.HANDLER),
        ("/setattr_api", "GET", True, Action.HANDLER, Action.UNAUTHORIZED),
        ("/anything", "PUT", True, Action.HANDLER, Action.UNAUTHORIZED),
    ],
)
def test_decide_api_mode_without_page_handlers(
    path: str, method: str, route_found: bool, authorized: Action, unauthorized: Action
) -> None:
    assert decide(API, path, method, route_found, "pass") is authorized
    assert decide(API, path, method, route_found, "missing") is unauthorized


def test_decide_each_missing_page_handler_falls_back_on_its_own() -> None:
    login_only = RoutingRules(login_route="/login.html", login_page=True)
    assert decide(login_only, "/login.html", "GET", True, "pass") is Action.HANDLER
    assert decide(login_only, "/404", "GET", False, "pass") is Action.HANDLER  # the real 404
    assert decide(login_only, "/index.html", "GET", True, "missing") is Action.LOGIN_PAGE
    app_only = RoutingRules(login_route="/login.html", app_page=True)
    assert decide(app_only, "/login.html", "GET", True, "missing") is Action.HANDLER
    assert decide(app_only, "/index.html", "GET", True, "missing") is Action.UNAUTHORIZED
    assert decide(app_only, "/index.html", "GET", True, "rejected") is Action.FORBIDDEN
    assert decide(app_only, "/404", "GET", False, "pass") is Action.APP_PAGE


@given(
    st.text(alphabet="/.%2F5abc\n", max_size=20),
    st.sampled_from(["GET", "HEAD", "POST", "OPTIONS", "get"]),
    st.booleans(),
    st.sampled_from(["pass", "missing", "invalid", "expired", "rejected"]),
)
def test_decide_never_runs_a_non_whitelisted_handler_without_a_pass(
    path: str, method: str, route_found: bool, status: jwtplus.AuthStatus
) -> None:
    action = decide(SPA, "/" + path, method, route_found, status)
    if status != "pass" and action is Action.HANDLER:
        assert all(
            any(p.fullmatch(r) for p in SPA._whitelist) for r in jwtplus.path_readings("/" + path)
        ) or ("/" + path == "/login.html" and method in ("GET", "HEAD"))


# ---- The middlewares and the seed's table, through a real app ----


async def index_page(request: web.Request) -> web.Response:
    return web.Response(text="this is index.html")


async def login_page(request: web.Request) -> web.Response:
    return web.Response(text="this is login.html")


async def echo(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "path": request.path,
            "status": request[jwtplus.AUTH_STATUS],
            "carry": request[jwtplus.AUTH_CARRY],
            "seed_status": request["auth_status"],
            "seed_carry": request["auth_carry"],
        }
    )


def seed_app(helper: JWTHelper) -> web.Application:
    app = web.Application(middlewares=[helper.pre_jwt_identifier(), helper.post_jwt_router()])
    app.router.add_get("/index.html", index_page)
    app.router.add_get("/login.html", login_page)
    app.router.add_route("*", "/login_api", echo)
    app.router.add_route("*", "/setattr_api", echo)
    app.router.add_post("/form", echo)
    app.router.add_get("/css/{name}", echo)
    return app


def seed_helper(sm: SecretManager, **kwargs: Any) -> JWTHelper:
    kwargs.setdefault("unauthorized_return_route", "/login.html")
    kwargs.setdefault("unauthorized_return_route_handler", login_page)
    kwargs.setdefault("authorized_return_page_handler", index_page)
    kwargs.setdefault("whitelist", ("/login_api", "/css/.+"))
    kwargs.setdefault("protected_apis", ["/setattr_api"])
    return JWTHelper(secret_manager=sm, **kwargs)


@pytest.fixture
def make_client(aiohttp_client: Any) -> Any:
    async def make(helper: JWTHelper | None = None, app: web.Application | None = None) -> Any:
        return await aiohttp_client(app or seed_app(helper or seed_helper(manager(refresh_interval="1h"))))

    return make


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tampered(token: str) -> str:
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["username"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{forged}.{sig}"


SEED_ROWS = [
    # path, text when authorized, text when not (None: the 401 JSON)
    ("/index.html", "this is index.html", "this is login.html"),
    ("/login.html", "this is index.html", "this is login.html"),
    ("/login_api", "/login_api", "/login_api"),
    ("/setattr_api", "/setattr_api", None),
    ("/404", "this is index.html", "this is login.html"),
]


async def check_seed_table(client: Any, headers: dict[str, str], *, authorized: bool) -> None:
    for path, yes, no in SEED_ROWS:
        response = await client.get(path, headers=headers)
        expected = yes if authorized else no
        if expected is None:
            assert response.status == 401, path
            assert await response.json() == {"error": "unauthorized"}
            continue
        assert response.status == 200, path
        text = await response.text()
        if expected.startswith("/"):
            assert json.loads(text)["path"] == expected
        else:
            assert text == expected, path


async def test_seed_table_with_a_valid_token(make_client: Any) -> None:
    sm = manager(refresh_interval="1h")
    client = await make_client(seed_helper(sm))
    await check_seed_table(client, bearer(sm.encode({"username": "jacky"})), authorized=True)


@pytest.mark.parametrize(
    "kind", ["none", "seed_none_header", "tampered", "expired", "other_secret", "garbage"]
)
async def test_seed_table_without_a_good_token(make_client: Any, kind: str) -> None:
    sm = manager(refresh_interval="1h", exptime="1m")
    good = sm.encode({"username": "jacky"})
    headers = {
        "none": {},
        "seed_none_header": {"Authorization": "None"},
        "tampered": bearer(tampered(good)),
        "expired": bearer(sm.encode({"username": "jacky"}, now=time.time() - 61)),
        "other_secret": bearer(
            SecretManager(secret=b"x" * 32, refresh_interval="1h").encode({"username": "jacky"})
        ),
        "garbage": bearer("not.a.token"),
    }[kind]
    client = await make_client(seed_helper(sm))
    await check_seed_table(client, headers, authorized=False)


async def test_auth_status_and_carry_reach_the_handler(make_client: Any) -> None:
    sm = manager(refresh_interval="1h", exptime="1m")
    client = await make_client(seed_helper(sm))
    cases = {
        "pass": bearer(sm.encode({"username": "jacky"})),
        "missing": {},
        "invalid": bearer(tampered(sm.encode({"username": "jacky"}))),
        "expired": bearer(sm.encode({"username": "jacky"}, now=time.time() - 120)),
        "rejected": bearer(sm.encode({"user": "no username"})),
    }
    for status, headers in cases.items():
        body = await (await client.get("/login_api", headers=headers)).json()
        assert body["status"] == body["seed_status"] == status
        if status == "pass":
            assert body["carry"]["username"] == body["seed_carry"]["username"] == "jacky"
        else:
            assert body["carry"] is body["seed_carry"] is None


async def test_protected_api_answers_401_and_403_and_never_runs_the_handler(make_client: Any) -> None:
    ran: list[str] = []

    async def protected(request: web.Request) -> web.Response:
        ran.append(request.method)
        return web.Response(text="ran")

    sm = manager()
    helper = seed_helper(sm)
    app = web.Application(middlewares=[helper.pre_jwt_identifier(), helper.post_jwt_router()])
    app.router.add_route("*", "/setattr_api", protected)
    client = await make_client(app=app)

    missing = await client.post("/setattr_api")
    assert missing.status == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    invalid = await client.post("/setattr_api", headers=bearer("a.b.c"))
    assert invalid.status == 401 and invalid.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert await missing.read() == await invalid.read() == b'{"error":"unauthorized"}'
    forbidden = await client.get("/setattr_api", headers=bearer(sm.encode({"username": ""})))
    assert forbidden.status == 403
    assert forbidden.headers["WWW-Authenticate"] == 'Bearer error="insufficient_scope"'
    assert await forbidden.json() == {"error": "forbidden"}
    assert ran == []
    ok = await client.put("/setattr_api", headers=bearer(sm.encode({"username": "ann"})))
    assert ok.status == 200 and ran == ["PUT"]


async def test_other_methods_need_a_token_and_keep_the_real_404_and_405(make_client: Any) -> None:
    sm = manager()
    client = await make_client(seed_helper(sm))
    assert (await client.post("/form")).status == 401
    assert (await client.post("/nowhere")).status == 401
    assert (await client.post("/form", headers=bearer(sm.encode({"user": "x"})))).status == 403
    good = bearer(sm.encode({"username": "ann"}))
    assert (await client.post("/form", headers=good)).status == 200
    assert (await client.post("/nowhere", headers=good)).status == 404
    assert (await client.delete("/index.html", headers=good)).status == 405


async def test_head_requests_follow_the_get_rows(make_client: Any) -> None:
    sm = manager()
    client = await make_client(seed_helper(sm))
    assert (await client.head("/index.html")).status == 200
    assert (await client.head("/setattr_api")).status == 401


async def test_api_mode_without_page_handlers(make_client: Any) -> None:
    sm = manager()
    helper = JWTHelper(secret_manager=sm, whitelist=("/login_api",))
    client = await make_client(helper)
    assert (await client.get("/index.html")).status == 401
    assert (await client.get("/404")).status == 401
    assert (await client.get("/login_api")).status == 200
    good = bearer(sm.encode({"username": "ann"}))
    assert await (await client.get("/index.html", headers=good)).text() == "this is index.html"
    assert (await client.get("/404", headers=good)).status == 404


async def test_whitelist_patterns_match_the_whole_path(make_client: Any) -> None:
    client = await make_client(seed_helper(manager()))
    assert (await client.get("/css/1.css")).status == 200
    assert await (await client.get("/css/1.css")).json() == {
        "path": "/css/1.css",
        "status": "missing",
        "carry": None,
        "seed_status": "missing",
        "seed_carry": None,
    }
    assert await (await client.get("/css/")).text() == "this is login.html"


async def test_custom_scheme_is_read_and_challenged(make_client: Any) -> None:
    sm = manager(scheme="JWT")
    client = await make_client(seed_helper(sm))
    token = sm.encode({"username": "ann"})
    assert (await client.get("/setattr_api", headers={"Authorization": f"jwt {token}"})).status == 200
    refused = await client.get("/setattr_api", headers=bearer(token))
    assert refused.status == 401 and refused.headers["WWW-Authenticate"] == "JWT"


async def plain_getter(request: web.Request) -> str | None:
    return request.headers.get("X-Token")


def sync_getter(request: web.Request) -> str | None:
    return request.query.get("token")


@pytest.mark.parametrize("getter", [plain_getter, sync_getter])
async def test_custom_token_getters_may_be_plain_or_coroutines(make_client: Any, getter: Any) -> None:
    sm = manager()
    client = await make_client(seed_helper(sm, token_getter=getter))
    token = sm.encode({"username": "ann"})
    response = await client.get("/setattr_api", headers={"X-Token": token}, params={"token": token})
    assert response.status == 200
    assert (await client.get("/setattr_api", headers=bearer(token))).status == 401


async def test_a_raising_token_getter_is_an_invalid_token(
    make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(request: web.Request) -> str:
        raise KeyError("no cookie here")

    client = await make_client(seed_helper(manager(), token_getter=broken))
    response = await client.get("/setattr_api")
    assert response.status == 401 and "no cookie" not in await response.text()
    assert "token getter raised" in caplog.text


async def async_username(payload: dict[str, Any]) -> str | None:
    return payload.get("username")


def admin_only(payload: dict[str, Any]) -> bool:
    return payload.get("role") == "admin"


def raises(payload: dict[str, Any]) -> Any:
    raise RuntimeError("database is down: " + str(payload.get("username")))


@pytest.mark.parametrize(
    ("identifier", "payload", "status", "carry"),
    [
        (async_username, {"username": "ann"}, "pass", "ann"),
        (async_username, {}, "rejected", None),
        (admin_only, {"role": "admin"}, "pass", True),
        (admin_only, {"role": "user"}, "rejected", None),
        (raises, {"username": "ann"}, "rejected", None),
        (lambda payload: 0, {"username": "ann"}, "rejected", None),
        (lambda payload: [], {"username": "ann"}, "rejected", None),
    ],
)
async def test_custom_identifiers(
    make_client: Any,
    caplog: pytest.LogCaptureFixture,
    identifier: Any,
    payload: dict[str, Any],
    status: str,
    carry: Any,
) -> None:
    sm = manager()
    client = await make_client(seed_helper(sm, identifier=identifier))
    token = sm.encode(payload)
    body = await (await client.get("/login_api", headers=bearer(token))).json()
    assert (body["status"], body["carry"]) == (status, carry)
    protected = await client.get("/setattr_api", headers=bearer(token))
    assert protected.status == (200 if status == "pass" else 403)
    assert "database is down" not in await protected.text()
    if identifier is raises:
        assert "identifier raised" in caplog.text
    assert token not in caplog.text


async def test_no_not_app_key_warning_reaches_users(make_client: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jwtplus._quiet_keys.clear()
        client = await make_client(seed_helper(manager()))
        assert (await client.get("/login_api")).status == 200


async def test_the_router_without_the_identifier_is_a_clear_error(aiohttp_client: Any) -> None:
    helper = seed_helper(manager())
    app = web.Application(middlewares=[helper.post_jwt_router()])
    app.router.add_get("/index.html", index_page)
    client = await aiohttp_client(app)
    # a server misconfiguration, not a bad request: it fails closed, and the log says what to do
    with pytest.raises(RuntimeError, match="jwtplus middleware is not installed"):
        await helper.post_jwt_router()(_bare_request(), index_page)
    assert (await client.get("/index.html")).status == 500


def _bare_request() -> web.Request:
    from aiohttp.test_utils import make_mocked_request

    return make_mocked_request("GET", "/")


# ---- aiohttp wiring ----


async def test_setup_installs_both_middlewares_in_order(aiohttp_client: Any) -> None:
    sm = manager()
    app = web.Application()
    app.router.add_route("*", "/setattr_api", echo)
    helper = jwtplus.setup(app, JWTHelper(secret_manager=sm))
    assert app[jwtplus.JWTPLUS_HELPER] is helper
    client = await aiohttp_client(app)
    assert (await client.get("/setattr_api")).status == 401
    body = await (await client.get("/setattr_api", headers=bearer(sm.encode({"username": "ann"})))).json()
    assert body["carry"]["username"] == "ann"


def test_accessors_say_what_to_do_when_jwtplus_is_missing() -> None:
    for accessor in (jwtplus.get_auth_status, jwtplus.get_auth_carry):
        with pytest.raises(RuntimeError, match="jwtplus middleware is not installed"):
            accessor(_bare_request())


def test_show_request_info_prints_no_token(capsys: pytest.CaptureFixture[str]) -> None:
    token = manager().encode({"username": "ann"})
    request = _bare_request().clone(headers={"Authorization": f"Bearer {token}"})
    jwtplus.show_request_info(request)
    out = capsys.readouterr().out
    assert out.startswith("GET / ") and token not in out


def test_functools_composition_of_the_factories() -> None:
    sm = manager()
    identify = functools.partial(jwtplus.identifier_middleware, manager=sm)
    assert callable(identify(identifier=async_username))
    with pytest.raises(ValueError, match="login_page"):
        jwtplus.router_middleware(rules=SPA)

"""JWT authentication for aiohttp servers, in one file.

jwtplus signs and checks JSON Web Tokens (HMAC; PyJWT's errors and key checks),
rotates its keys from the clock so that every worker agrees without talking to
the others, and puts the SPA routing table of aiohttp-jwtplus 0.2.0 in front of
your handlers: a logged-in user gets the app, everyone else the login page, and
protected APIs answer 401 or 403 before their handler runs. For browsers, tokens
travel in HttpOnly cookies with CSRF protection; sessions pair short access
tokens with refresh tokens that can be revoked, in memory or in Redis.

Quick start::

    from aiohttp import web
    import jwtplus

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"hello": request[jwtplus.AUTH_CARRY]["username"]})

    manager = jwtplus.SecretManager(secret=b"32 or more random bytes .........")
    helper = jwtplus.JWTHelper(secret_manager=manager, protected_apis=("/hello",))
    app = web.Application(middlewares=[helper.pre_jwt_identifier(), helper.post_jwt_router()])
    app.router.add_get("/hello", hello)
    # a client sends:  Authorization: Bearer <manager.encode({"username": "ann"})>

Depends on aiohttp and PyJWT only. Read it top to bottom: errors, durations,
configuration, keys and rotation, encode/decode, request keys, token getters,
identifiers, the routing decision, middleware factories, cookies, sessions,
revocation stores, guards, aiohttp wiring, the seed's names
(``grep '^# ----' jwtplus.py`` lists them).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import enum
import functools
import hashlib
import heapq
import hmac
import inspect
import json
import logging
import math
import re
import secrets
import time
import warnings
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, NamedTuple, TypeAlias

import jwt
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from jwt.algorithms import HMACAlgorithm

__all__ = (
    # errors and constants
    "MAX_TOKEN_LENGTH",
    "AuthStatus",
    "Duration",
    "KeyIdError",
    "AmbiguousTokenError",
    "StoreFullError",
    "TokenTooLargeError",
    "WeakSecretWarning",
    # durations
    "parse_duration",
    # configuration
    "CookiePolicy",
    "RevocationStore",
    "RoutingRules",
    "SecretManager",
    "Sessions",
    # keys and rotation
    "key_for_period",
    "period_of",
    # encode / decode
    "cached_decoder",
    "decode_token",
    "encode_token",
    # request keys
    "AUTH_CARRY",
    "AUTH_CLAIMS",
    "AUTH_STATUS",
    "TOKEN_SOURCE",
    "get_auth_carry",
    "get_auth_status",
    # token getters
    "TokenGetter",
    "any_token_getter",
    "basic_token_getter",
    "cookie_token_getter",
    "header_token_getter",
    "query_token_getter",
    # identifiers
    "Identifier",
    "AuthResult",
    "authenticate",
    "basic_identifier",
    # routing decision
    "Action",
    "decide",
    "path_readings",
    # middleware factories
    "identifier_middleware",
    "jwt_middleware",
    "router_middleware",
    # cookies: login and logout
    "login",
    "logout",
    "set_token_cookies",
    # sessions: token pairs, refresh, revocation, stores
    "TokenPair",
    "end_session",
    "issue_tokens",
    "memory_store",
    "redis_store",
    "refresh_session",
    "revoke_family",
    "revoke_subject",
    "revoke_token",
    "set_session_cookies",
    "start_session",
    # guards
    "fresh_login_required",
    "login_required",
    "require",
    "require_claims",
    # aiohttp wiring
    "JWTPLUS_HELPER",
    "setup",
    # the seed's names
    "JWTHelper",
    "show_request_info",
)

_log = logging.getLogger("jwtplus")

Duration: TypeAlias = "str | int | float | timedelta"
AuthStatus: TypeAlias = Literal[
    "pass", "missing", "invalid", "expired", "rejected", "malformed", "unavailable"
]
TokenGetter: TypeAlias = Callable[[web.Request], "str | Awaitable[str | None] | None"]
Identifier: TypeAlias = Callable[[dict[str, Any]], Any]
_Patterns: TypeAlias = "Iterable[str | re.Pattern[str]]"


# ---- Constants and errors ----

MAX_TOKEN_LENGTH = 8192
"""Tokens longer than this many characters are refused before any decoding."""

_MAX_NUMERIC_DATE = 253402300799  # 9999-12-31T23:59:59Z
_MAX_DURATION = 10**10  # seconds, about 317 years: keeps now + exptime below the year 9999
_MAX_KID_DIGITS = 15
_ROTATION_LABEL = b"jwtplus-rotation-v1:"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_HTTP_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_HASHES = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}


class TokenTooLargeError(jwt.DecodeError):
    """Raised when a token is longer than MAX_TOKEN_LENGTH, before any decoding."""


class KeyIdError(jwt.InvalidTokenError):
    """Raised when a rotating token's ``kid`` is missing, malformed or out of its window."""


class AmbiguousTokenError(Exception):
    """Raised by a token getter when a request offers two different tokens (RFC 6750 ``invalid_request``)."""


class StoreFullError(RuntimeError):
    """Raised by the memory store when it is full of unexpired entries: fail closed, never forget."""


class WeakSecretWarning(UserWarning):
    """Warned once per SecretManager whose secret is shorter than its hash output."""


# ---- Durations ----

_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)([smhdw]?)", re.ASCII)
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_FORMS = (
    'a number of seconds (int or float), a timedelta, or a string such as "30d", '
    '"12h", "15m", "10s", "1.5h", "2w" or "3600"'
)


def parse_duration(value: Duration, *, name: str = "duration") -> float:
    """Return *value* as a number of seconds, an int when it is whole.

    *name* is the parameter the value came from; a bad value raises
    ``ValueError`` naming it and the accepted forms.

    >>> parse_duration("1.5h"), parse_duration("30d"), parse_duration(90)
    (5400, 2592000, 90)
    """
    seconds: float
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str) and (m := _DURATION_RE.fullmatch(value)):
        seconds = float(m[1]) * _UNITS[m[2]]
    else:
        raise ValueError(f"{name}={value!r} is not a duration: use {_DURATION_FORMS}")
    if not (math.isfinite(seconds) and 0 <= seconds <= _MAX_DURATION):
        raise ValueError(
            f"{name}={value!r} must be between 0 and {_MAX_DURATION} seconds: use {_DURATION_FORMS}"
        )
    return int(seconds) if float(seconds).is_integer() else seconds


# ---- Configuration ----


def _compile_patterns(patterns: _Patterns, *, name: str, flags: int = 0) -> tuple[re.Pattern[str], ...]:
    """Compile route patterns once, failing with the parameter's name."""
    if isinstance(patterns, (str, bytes)):
        raise TypeError(
            f"{name} must be a tuple or list of regular expressions, got the string {patterns!r} "
            f"(a one-pattern tuple needs a trailing comma: ({patterns!r},))"
        )
    compiled = []
    for entry in patterns:
        source, own_flags = (entry.pattern, entry.flags) if isinstance(entry, re.Pattern) else (entry, 0)
        if not isinstance(source, str):
            raise TypeError(f"{name} holds {entry!r}: each entry must be a regular expression string")
        try:
            compiled.append(re.compile(source, own_flags | flags))
        except re.error as exc:
            raise ValueError(f"{name} holds the bad regular expression {source!r}: {exc}") from None
    return tuple(compiled)


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingRules:
    """Configuration of the SPA routing table (see :func:`decide`).

    Patterns are regular expressions that must match the whole path. A ``.``
    in a protected pattern also matches a newline, so an encoded ``%0A``
    cannot step out of it.
    """

    login_route: str = ""
    """Path of the login page: a logged-in GET gets the app page instead ("" for none)."""
    whitelist: _Patterns = ()
    """Paths whose handler always runs, token or not."""
    protected_apis: _Patterns = ()
    """Paths that answer 401/403 instead of a page when the token is not accepted."""
    login_page: bool = False
    """Whether an unauthorized_return_route_handler exists (otherwise 401/403)."""
    app_page: bool = False
    """Whether an authorized_return_page_handler exists (otherwise the real handler)."""
    _whitelist: tuple[re.Pattern[str], ...] = field(init=False, repr=False)
    _protected: tuple[re.Pattern[str], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.login_route, str) or (
            self.login_route and not self.login_route.startswith("/")
        ):
            raise ValueError(
                f'login_route={self.login_route!r} must be "" (no login page) or a path starting with "/"'
            )
        whitelist = _compile_patterns(self.whitelist, name="whitelist")
        protected = _compile_patterns(self.protected_apis, name="protected_apis", flags=re.DOTALL)
        object.__setattr__(self, "whitelist", whitelist)
        object.__setattr__(self, "protected_apis", protected)
        object.__setattr__(self, "_whitelist", whitelist)
        object.__setattr__(self, "_protected", protected)


@dataclass(frozen=True, slots=True, kw_only=True)
class CookiePolicy:
    """How tokens travel in cookies, and the CSRF protection that comes with them.

    Defaults are the strict ones: HttpOnly, Secure, SameSite=Lax, Path=/, no
    Domain, and so the ``__Host-`` name prefix, which browsers accept only with
    exactly those scoping attributes. The CSRF cookie is the same but readable
    by scripts, which echo it in *csrf_header* on unsafe requests.
    """

    name: str = "access_token"
    """The token cookie's name (before any ``__Host-`` prefix)."""
    csrf_name: str = "csrf_token"
    """The script-readable CSRF cookie's name (before any ``__Host-`` prefix)."""
    csrf_header: str = "X-CSRF-Token"
    """The header an unsafe cookie-authenticated request must echo the CSRF value in."""
    refresh_name: str = "refresh_token"
    """The refresh token cookie's name (see :class:`Sessions`), before any prefix."""
    refresh_path: str = "/"
    """The refresh cookie's path, e.g. the refresh route alone (then ``__Secure-``, not ``__Host-``)."""
    secure: bool = True
    httponly: bool = True
    samesite: Literal["Lax", "Strict", "None"] = "Lax"
    path: str = "/"
    domain: str | None = None
    host_prefix: bool = True
    """Prefix both names with ``__Host-`` when secure, Path=/ and no Domain allow it."""
    trusted_origins: tuple[str, ...] = ()
    """Origins besides the request's own (``"https://app.example"``) allowed to send unsafe requests."""
    token_cookie: str = field(init=False)
    """The token cookie's full name."""
    csrf_cookie: str = field(init=False)
    """The CSRF cookie's full name."""
    refresh_cookie: str = field(init=False)
    """The refresh cookie's full name."""

    def __post_init__(self) -> None:
        for name in ("name", "csrf_name", "csrf_header", "refresh_name"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _HTTP_TOKEN.fullmatch(value):
                raise ValueError(f"{name}={value!r} must be a cookie or header name (letters, digits, -_.)")
        if self.samesite not in ("Lax", "Strict", "None"):
            raise ValueError(f'samesite={self.samesite!r} must be "Lax", "Strict" or "None"')
        if self.samesite == "None" and not self.secure:
            raise ValueError('samesite="None" needs secure=True: browsers refuse it otherwise')
        for name in ("path", "refresh_path"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.startswith("/"):
                raise ValueError(f'{name}={value!r} must start with "/"')
        origins = (self.trusted_origins,) if isinstance(self.trusted_origins, str) else self.trusted_origins
        if not all(isinstance(o, str) and re.fullmatch(r"https?://[^/\s]+", o) for o in origins):
            raise ValueError(
                f'trusted_origins={self.trusted_origins!r} must be origins like "https://app.example"'
            )
        object.__setattr__(self, "trusted_origins", tuple(origins))
        prefix = (
            "__Host-" if self.host_prefix and self.secure and self.path == "/" and not self.domain else ""
        )
        object.__setattr__(self, "token_cookie", prefix + self.name)
        object.__setattr__(self, "csrf_cookie", prefix + self.csrf_name)
        refresh_prefix = "__Host-" if prefix and self.refresh_path == "/" else "__Secure-" if prefix else ""
        object.__setattr__(self, "refresh_cookie", refresh_prefix + self.refresh_name)


DEFAULT_COOKIES = CookiePolicy()


@dataclass(frozen=True, slots=True)
class RevocationStore:
    """Where revocations live: three async operations, built by :func:`memory_store` or :func:`redis_store`.

    Keys are strings, values floats, and every entry expires at its *until*
    (Unix seconds), when the tokens it covers have expired too.
    """

    put: Callable[[str, float, float, float], Awaitable[None]]
    """``put(key, value, until, now)``: set an entry."""
    get_many: Callable[[Sequence[str], float], Awaitable[list[float | None]]]
    """``get_many(keys, now)``: the live values of *keys* (None where absent), in one round trip."""
    consume: Callable[[str, float, float, float], Awaitable[float | None]]
    """``consume(key, value, until, now)``: set *key* only if absent, atomically; None if it was set
    now, else the value it already had."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Sessions:
    """Access and refresh tokens, and the store their revocations live in.

    Access tokens are short (``type: "access"``), refresh tokens long
    (``type: "refresh"``); both carry ``jti``, ``sub`` and the family id
    ``fam`` of the login they descend from. A refresh token is used once: a
    second use is theft, and kills the family. When the store cannot be
    reached, requests fail closed (503) unless *fail_open*.
    """

    manager: SecretManager
    """Signs both kinds; with rotation on, its exptime must cover refresh_exptime."""
    store: RevocationStore = field(default_factory=lambda: memory_store())
    """Where revocations and used refresh tokens are kept (per process by default: use Redis for many)."""
    access_exptime: Duration = "15m"
    refresh_exptime: Duration = "30d"
    reuse_grace: Duration = 0
    """A refresh token used again within this many seconds of its first use is refused without killing
    its family (tabs racing to refresh); 0: every reuse is theft."""
    fail_open: bool = False
    """Accept tokens (logging a warning) when the store cannot be reached, instead of answering 503."""
    access_seconds: float = field(init=False)
    refresh_seconds: float = field(init=False)
    grace_seconds: float = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.manager, SecretManager):
            raise TypeError(f"manager must be a SecretManager, got {self.manager!r}")
        if not isinstance(self.store, RevocationStore):
            raise TypeError(
                f"store must be a RevocationStore (memory_store() or redis_store(...)), got {self.store!r}"
            )
        access = parse_duration(self.access_exptime, name="access_exptime")
        refresh = parse_duration(self.refresh_exptime, name="refresh_exptime")
        if not 0 < access <= refresh:
            raise ValueError(
                f"access_exptime={self.access_exptime!r} and refresh_exptime={self.refresh_exptime!r} "
                "must be positive, access no longer than refresh"
            )
        if self.manager.refresh_seconds and refresh > self.manager.exptime_seconds:
            raise ValueError(
                f"refresh_exptime={self.refresh_exptime!r} is longer than the manager's exptime="
                f"{self.manager.exptime!r}: with rotation on, no token outlives its period's window"
            )
        object.__setattr__(self, "access_seconds", access)
        object.__setattr__(self, "refresh_seconds", refresh)
        object.__setattr__(self, "grace_seconds", parse_duration(self.reuse_grace, name="reuse_grace"))


def _secret_bytes(secret: str | bytes) -> bytes:
    """Encode the configured secret; an empty one becomes 32 random bytes."""
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if not isinstance(secret, bytes):
        raise TypeError(f"secret must be str or bytes, got {type(secret).__name__}")
    return secret or secrets.token_bytes(32)


@dataclass(frozen=True, slots=True, eq=False)
class SecretManager:
    """Everything needed to sign and check tokens: secret, algorithm, lifetimes.

    Frozen and validated at construction. Every process that must accept the
    others' tokens needs the same *secret*, *algorithm*, *refresh_interval* and
    *exptime*; across machines, give *leeway* a few seconds for clock skew.
    An empty *secret* draws 32 random bytes, so tokens then die with the process.

    .. warning:: the algorithm comes from here, never from a token.
    """

    secret: str | bytes = field(default="", repr=False)
    """The HMAC secret ("" draws a random one); warned about when shorter than the hash."""
    refresh_interval: Duration = 0
    """Rotation period (0: one key, the secret itself). Whole seconds."""
    scheme: str = "Bearer"
    """Authorization scheme read by the basic token getter and sent in challenges."""
    algorithm: str = "HS256"
    """HS256, HS384 or HS512."""
    exptime: Duration = "30d"
    """Lifetime of a token from its issue."""
    _: KW_ONLY
    audience: str | Sequence[str] | None = None
    """Required ``aud`` (any of these); also stamped on new tokens."""
    issuer: str | None = None
    """Required ``iss``; also stamped on new tokens."""
    leeway: Duration = 0
    """Clock skew tolerated on every time check."""
    refresh_seconds: int = field(init=False)
    exptime_seconds: float = field(init=False)
    leeway_seconds: float = field(init=False)
    _key: bytes = field(init=False, repr=False)
    _audiences: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        setattr_ = functools.partial(object.__setattr__, self)
        if self.algorithm not in _HASHES:
            raise ValueError(
                f"algorithm={self.algorithm!r} is not supported: use one of {', '.join(_HASHES)}"
            )
        if not isinstance(self.scheme, str) or not _HTTP_TOKEN.fullmatch(self.scheme):
            raise ValueError(f'scheme={self.scheme!r} must be an HTTP auth scheme such as "Bearer"')
        refresh = parse_duration(self.refresh_interval, name="refresh_interval")
        if refresh != int(refresh):
            raise ValueError(
                f"refresh_interval={self.refresh_interval!r} must be 0 or a whole number of seconds"
            )
        exptime = parse_duration(self.exptime, name="exptime")
        if exptime <= 0:
            raise ValueError(f"exptime={self.exptime!r} must be positive: use {_DURATION_FORMS}")
        setattr_("refresh_seconds", int(refresh))
        setattr_("exptime_seconds", exptime)
        setattr_("leeway_seconds", parse_duration(self.leeway, name="leeway"))
        setattr_("_audiences", _audience_set(self.audience))
        if self.issuer is not None and not isinstance(self.issuer, str):
            raise TypeError(f"issuer={self.issuer!r} must be a string or None")
        key = _secret_bytes(self.secret)
        try:
            HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(key)  # PyJWT's own refusal of PEM and SSH keys
        except jwt.InvalidKeyError as exc:
            raise ValueError(f"secret is not usable as an HMAC key: {exc}") from None
        setattr_("_key", key)
        wanted = hashlib.new(_HASHES[self.algorithm]).digest_size
        if len(key) < wanted:
            warnings.warn(
                f"SecretManager: the secret is {len(key)} bytes; {self.algorithm} wants at least "
                f"{wanted} (RFC 7518 section 3.2). Generate one with secrets.token_urlsafe({wanted}).",
                WeakSecretWarning,
                stacklevel=3,
            )

    def encode(self, payload: Mapping[str, Any], *, now: float | None = None) -> str:
        """Sign *payload* into a token: see :func:`encode_token`."""
        return encode_token(self, payload, now=now)

    def decode(self, token: str | bytes, *, now: float | None = None) -> dict[str, Any]:
        """Verify *token* and return its claims: see :func:`decode_token`."""
        return decode_token(self, token, now=now)

    async def auto_refresh(self) -> None:
        """Kept so the seed's code runs: keys are a pure function of secret and clock.

        With rotation on, it derives each period's key as the period starts
        (warming the cache) until cancelled; without rotation it returns at once.
        """
        interval = self.refresh_seconds
        while interval:
            now = time.time()
            key_for_period(self, period_of(now, interval))
            await asyncio.sleep(interval - now % interval)


def _audience_set(audience: str | Sequence[str] | None) -> frozenset[str]:
    """Validate the configured audience into the set a token's ``aud`` must meet."""
    if audience is None:
        return frozenset()
    values = [audience] if isinstance(audience, str) else audience
    if (
        not isinstance(values, (list, tuple))
        or not values
        or not all(isinstance(v, str) and v for v in values)
    ):
        raise TypeError(f"audience={audience!r} must be None, a string, or a list of non-empty strings")
    return frozenset(values)


# ---- Keys and rotation ----


def period_of(now: float, interval: int) -> int:
    """Return the rotation period holding instant *now*: periods of *interval* seconds from the epoch.

    >>> period_of(59.9, 60), period_of(60, 60)
    (0, 1)
    """
    return int(now // interval)


def _hmac_key(secret: bytes, period: int, algorithm: str) -> bytes:
    return hmac.new(secret, _ROTATION_LABEL + str(period).encode("ascii"), _HASHES[algorithm]).digest()


_cached_key = functools.lru_cache(maxsize=64)(_hmac_key)


def _uncached_key(manager: SecretManager, period: int) -> bytes:
    """A key outside its window: derived only to tell a forgery from an old token, never cached."""
    return _hmac_key(manager._key, period, manager.algorithm)


def key_for_period(manager: SecretManager, period: int) -> bytes:
    """Return the signing key of rotation *period*: HMAC(secret, label + decimal period).

    The HMAC uses the algorithm's own hash (SHA-256 for HS256), so any process
    with the same secret derives the same key with nothing shared or stored.
    """
    return _cached_key(manager._key, period, manager.algorithm)


def _period_of_kid(header: Mapping[str, Any]) -> int:
    """Read a rotating token's ``kid`` strictly: 1 to 15 ASCII digits, no leading zero."""
    kid = header.get("kid")
    if not (
        isinstance(kid, str)
        and 0 < len(kid) <= _MAX_KID_DIGITS
        and kid.isascii()
        and kid.isdigit()
        and (kid == "0" or kid[0] != "0")
    ):
        raise KeyIdError("the token's kid is missing or malformed")
    return int(kid)


def _window(manager: SecretManager, period: int, now: float) -> int:
    """Where *now* stands against the window in which *period*'s key verifies: -1 before, 0 in, 1 after.

    The window is n·R ≤ now + leeway and now < (n+1)·R + exptime + leeway: from
    the period's start until its last token can have expired.
    """
    interval, leeway = manager.refresh_seconds, manager.leeway_seconds
    if period * interval > now + leeway:
        return -1
    return 0 if now < (period + 1) * interval + manager.exptime_seconds + leeway else 1


# ---- Encode / decode ----


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """Read a time claim strictly: a JSON number of seconds between 0 and the year 9999."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= _MAX_NUMERIC_DATE:
        raise jwt.DecodeError(f"the {name} claim must be a number of seconds before the year 9999")
    return float(value)


def _check_claims(manager: SecretManager, claims: Mapping[str, Any], now: float) -> None:
    """Check time, audience, issuer and string claims of verified *claims* at *now*."""
    leeway = manager.leeway_seconds
    exp = _numeric_date(claims, "exp")
    if exp is None:
        raise jwt.MissingRequiredClaimError("exp")
    iat, nbf = _numeric_date(claims, "iat"), _numeric_date(claims, "nbf")
    if now >= exp + leeway:
        raise jwt.ExpiredSignatureError("Signature has expired")
    if (iat is not None and iat > now + leeway) or (nbf is not None and nbf > now + leeway):
        raise jwt.ImmatureSignatureError("The token is not yet valid")
    for name in ("iss", "sub", "jti"):
        if name in claims and not isinstance(claims[name], str):
            raise jwt.DecodeError(f"the {name} claim must be a string")
    if manager.issuer is not None and claims.get("iss") != manager.issuer:
        raise jwt.InvalidIssuerError("Invalid issuer")
    aud = claims.get("aud")
    if not manager._audiences:
        if aud:
            raise jwt.InvalidAudienceError("Invalid audience")
        return
    auds = [aud] if isinstance(aud, str) else aud
    if not isinstance(auds, list) or not all(isinstance(a, str) for a in auds):
        raise jwt.InvalidAudienceError("Invalid audience")
    if manager._audiences.isdisjoint(auds):
        raise jwt.InvalidAudienceError("Invalid audience")


def _time_claim(value: Any, name: str) -> Any:
    """Turn a datetime into NumericDate; refuse (ValueError) a time claim that decode would refuse."""
    if isinstance(value, datetime):
        value = int(value.timestamp())
    try:
        _numeric_date({name: value}, name)
    except jwt.DecodeError as exc:
        raise ValueError(f"payload[{name!r}]={value!r}: {exc}") from None
    return value


def encode_token(manager: SecretManager, payload: Mapping[str, Any], *, now: float | None = None) -> str:
    """Sign *payload* into a compact JWT.

    Adds ``iat``, ``exp`` (*now* + exptime), a random ``jti``, and ``iss``/``aud``
    when configured; the payload's own items win. With rotation on, the token
    is signed with its period's key and names the period in ``kid``.
    """
    if not isinstance(payload, Mapping):
        raise TypeError(f"payload must be a mapping of claims, got {type(payload).__name__}")
    now = time.time() if now is None else now
    iat = int(now)
    claims: dict[str, Any] = {
        "iat": iat,
        "exp": iat + manager.exptime_seconds,
        "jti": secrets.token_urlsafe(16),
    }
    if manager.issuer is not None:
        claims["iss"] = manager.issuer
    if manager.audience is not None:
        claims["aud"] = manager.audience if isinstance(manager.audience, str) else list(manager.audience)
    claims.update(payload)
    for name in ("exp", "iat", "nbf"):
        if name in claims:
            claims[name] = _time_claim(claims[name], name)
    key, kid = manager._key, None
    if manager.refresh_seconds:
        period = period_of(now, manager.refresh_seconds)
        key, kid = key_for_period(manager, period), str(period)
    signing_input = (
        _header_segment(manager.algorithm, kid)
        + "."
        + _b64encode(json.dumps(claims, separators=(",", ":")).encode())
    )
    signature = hmac.new(key, signing_input.encode("ascii"), _HASHES[manager.algorithm]).digest()
    return signing_input + "." + _b64encode(signature)


def _b64encode(data: bytes) -> str:
    """base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


def _b64decode(segment: str) -> bytes:
    """The bytes of an unpadded base64url *segment* that :data:`_COMPACT_JWS` has already checked."""
    if len(segment) % 4 == 1:  # no byte string encodes to this length
        raise jwt.DecodeError("a token segment has an impossible length")
    padded = (segment + "=" * (-len(segment) % 4)).encode("ascii")
    return binascii.a2b_base64(padded.translate(_URLSAFE_TO_STANDARD))


@functools.lru_cache(maxsize=32)
def _header_segment(algorithm: str, kid: str | None) -> str:
    """The encoded JOSE header of our tokens: the same for every token of a period, so built once."""
    header = {"alg": algorithm, "typ": "JWT"} if kid is None else {"alg": algorithm, "kid": kid, "typ": "JWT"}
    return _b64encode(json.dumps(header, separators=(",", ":")).encode())


@functools.lru_cache(maxsize=64)
def _header(segment: str) -> dict[str, Any]:
    """A token's JOSE header: every token of a period shares one, so it is parsed once. Read-only."""
    return _json_object(segment, "header")


def _json_object(segment: str, what: str) -> dict[str, Any]:
    """Decode a header or payload segment that must hold a UTF-8 JSON object."""
    try:
        value = json.loads(_b64decode(segment).decode("utf-8"))
    except (ValueError, RecursionError):  # bad base64, UTF-8 or JSON, or nested too deeply
        raise jwt.DecodeError(f"the {what} is not JSON") from None
    if not isinstance(value, dict):
        raise jwt.DecodeError(f"the {what} is not a JSON object")
    return value


_COMPACT_JWS = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)")


def decode_token(manager: SecretManager, token: str | bytes, *, now: float | None = None) -> dict[str, Any]:
    """Verify *token* and return its claims.

    Checks, in order: size and form (three unpadded base64url segments, the
    signature in its one canonical spelling, so a token has one spelling: the
    signature covers the other two), the header's ``alg`` against the configured one,
    the ``kid``, the signature, the ``kid``'s rotation window, then ``exp`` (required),
    ``iat``, ``nbf``, ``iss`` and ``aud`` at *now* with the leeway. Any failure
    raises ``jwt.InvalidTokenError`` or a subclass (``jwt.ExpiredSignatureError``
    when expired).
    """
    return _verify(manager, token, time.time() if now is None else now)[0]


def cached_decoder(manager: SecretManager, *, size: int = 10_000) -> Callable[[str, float], dict[str, Any]]:
    """Return ``decode(token, now)``: :func:`decode_token` behind a bounded LRU of verified tokens.

    Keyed by the exact token string, a hit re-checks the instant the token
    stops being valid (its ``exp``, and its rotation window) against *now*, so
    a cached token never outlives its validity; failures are never cached.
    Each call returns a fresh copy of the claims. *size* 0 disables the cache.
    """
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"size={size!r} must be a whole number of tokens (0: no cache)")
    if size == 0:
        return lambda token, now: _verify(manager, token, now)[0]
    cache: OrderedDict[str, tuple[dict[str, Any], float, bool]] = OrderedDict()

    def decode(token: str, now: float) -> dict[str, Any]:
        hit = cache.get(token)
        if hit is not None and now < hit[1]:
            cache.move_to_end(token)
            return dict(hit[0]) if hit[2] else copy.deepcopy(hit[0])
        claims, deadline = _verify(manager, token, now)
        flat = all(isinstance(v, (str, int, float, bool)) or v is None for v in claims.values())
        cache[token] = (claims, deadline, flat)
        cache.move_to_end(token)
        if len(cache) > size:
            cache.popitem(last=False)
        return dict(claims) if flat else copy.deepcopy(claims)

    return decode


def _verify(manager: SecretManager, token: str | bytes, now: float) -> tuple[dict[str, Any], float]:
    """:func:`decode_token`'s work at *now*: the claims, and the first instant the token is no longer
    valid (its ``exp``, or its rotation window's end, plus the leeway), for the cache."""
    if isinstance(token, bytes):
        token = token.decode("ascii", "replace")
    if not isinstance(token, str):
        raise jwt.DecodeError("a token must be a string")
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenTooLargeError("the token is too large")
    form = _COMPACT_JWS.fullmatch(token)
    if form is None:
        raise jwt.DecodeError("the token is not three unpadded base64url segments")
    header_b64, payload_b64, signature_b64 = form.groups()
    signature = _b64decode(signature_b64)
    if _b64encode(signature) != signature_b64:  # one token, one spelling: no other bits at the end
        raise jwt.DecodeError("the signature is not in its canonical spelling")
    header = _header(header_b64)
    if header.get("alg") != manager.algorithm:
        raise jwt.InvalidAlgorithmError("The specified alg value is not allowed")
    if "crit" in header:  # RFC 7515 section 4.1.11: we understand no extension, so none may be critical
        raise jwt.InvalidTokenError("the token names critical header extensions")
    key, window, window_end = manager._key, 0, math.inf
    if manager.refresh_seconds:  # exactly one key may verify: its period's, named by kid
        period = _period_of_kid(header)
        window = _window(manager, period, now)
        key = (key_for_period if window == 0 else _uncached_key)(manager, period)
        window_end = (period + 1) * manager.refresh_seconds + manager.exptime_seconds + manager.leeway_seconds
    expected = hmac.new(
        key, f"{header_b64}.{payload_b64}".encode("ascii"), _HASHES[manager.algorithm]
    ).digest()
    if not hmac.compare_digest(signature, expected):
        raise jwt.InvalidSignatureError("Signature verification failed")
    if window < 0:
        raise KeyIdError("the token's key period has not started")
    if window > 0:
        raise jwt.ExpiredSignatureError("the token's key period has ended")
    claims = _json_object(payload_b64, "payload")
    _check_claims(manager, claims, now)
    return claims, min(claims["exp"] + manager.leeway_seconds, window_end)


# ---- Request keys ----

AUTH_STATUS = web.RequestKey[AuthStatus]("auth_status")
"""The request's :data:`AuthStatus`: "pass", "missing", "invalid", "expired" or "rejected"."""
AUTH_CARRY = web.RequestKey[Any]("auth_carry")
"""What the identifier returned for the request's token (None unless the status is "pass")."""
AUTH_CLAIMS = web.RequestKey["dict[str, Any] | None"]("auth_claims")
"""The verified claims of the request's token when its status is "pass" (else None): guards read these."""
TOKEN_SOURCE = web.RequestKey[str]("token_source")
"""Where the request's token came from: "header", "cookie" or "query" (set by the built-in getters)."""


def _not_installed() -> RuntimeError:
    return RuntimeError(
        "jwtplus middleware is not installed: put JWTHelper.pre_jwt_identifier() before "
        "post_jwt_router() in the app's middlewares, or call jwtplus.setup(app, helper)"
    )


def get_auth_status(request: web.Request) -> AuthStatus:
    """Return the request's auth status; raises RuntimeError when jwtplus is not installed."""
    if AUTH_STATUS not in request:
        raise _not_installed()
    return request[AUTH_STATUS]


def get_auth_carry(request: web.Request) -> Any:
    """Return what the identifier returned for the request (None unless it passed)."""
    if AUTH_STATUS not in request:
        raise _not_installed()
    return request[AUTH_CARRY]


# ---- Token getters ----


async def _maybe_await(value: Any) -> Any:
    """Let getters and identifiers be plain functions or coroutines."""
    return await value if inspect.isawaitable(value) else value


def header_token_getter(scheme: str = "Bearer", *, header: str = "Authorization") -> TokenGetter:
    """Return a getter reading ``<header>: <scheme> <token>``.

    The scheme is compared case-insensitively and separated by spaces (RFC
    7235: not tabs or other white space); anything but exactly one scheme and
    one token (or several such headers) counts as no token.
    """
    wanted = scheme.lower()

    def get_token(request: web.Request) -> str | None:
        values = request.headers.getall(header, ())
        if len(values) != 1:
            return None
        parts = values[0].split(" ")
        if len(parts) != 2 or not all(parts):  # not the plain "<scheme> <token>": allow more spaces
            parts = [part for part in values[0].strip(" \t").split(" ") if part]
        if len(parts) != 2 or parts[0].lower() != wanted:
            return None
        request[TOKEN_SOURCE] = "header"
        return parts[1]

    get_token.__qualname__ = get_token.__name__ = f"header_token_getter({scheme!r})"
    return get_token


basic_token_getter = header_token_getter("Bearer")
"""The seed's getter: ``Authorization: Bearer <token>``; JWTHelper makes it follow the manager's scheme."""


def cookie_token_getter(name: str = DEFAULT_COOKIES.token_cookie) -> TokenGetter:
    """Return a getter reading the token from cookie *name* (see :class:`CookiePolicy`).

    Unsafe requests authenticated this way must pass the CSRF check.
    """

    def get_token(request: web.Request) -> str | None:
        token = request.cookies.get(name)
        if not token:
            return None
        request[TOKEN_SOURCE] = "cookie"
        return token

    return get_token


def query_token_getter(name: str = "access_token") -> TokenGetter:
    """Return a getter reading the token from query parameter *name*.

    Only for WebSocket handshakes, where browsers can send neither headers nor
    (cross-site) cookies: query strings end up in access logs and browser history.
    """

    def get_token(request: web.Request) -> str | None:
        values = request.query.getall(name, ())
        if len(values) != 1 or not values[0]:
            return None
        request[TOKEN_SOURCE] = "query"
        return values[0]

    return get_token


def any_token_getter(*getters: TokenGetter) -> TokenGetter:
    """Return a getter that asks every getter and takes the token they agree on.

    ``request[TOKEN_SOURCE]`` names the first getter that found it (a custom
    getter may set it too; otherwise "custom"). Two different tokens raise
    :class:`AmbiguousTokenError`: the request gets 400 ``invalid_request``.
    """

    async def get_token(request: web.Request) -> str | None:
        found: dict[str, str] = {}
        for getter in getters:
            request.pop(TOKEN_SOURCE, None)
            token = await _maybe_await(getter(request))
            if token:
                found.setdefault(token, request.get(TOKEN_SOURCE, "custom"))
        request.pop(TOKEN_SOURCE, None)
        if len(found) > 1:
            raise AmbiguousTokenError("the request offers two different tokens")
        for token, source in found.items():
            request[TOKEN_SOURCE] = source
            return token
        return None

    return get_token


# ---- Identifiers ----


def basic_identifier(payload: dict[str, Any]) -> dict[str, Any] | None:
    """The seed's identifier: accept a payload with a non-empty ``username`` string, carry it whole."""
    username = payload.get("username")
    return payload if isinstance(username, str) and username else None


class AuthResult(NamedTuple):
    """What identification made of a request: its status, the identifier's result, the verified claims."""

    status: AuthStatus
    carry: Any = None
    claims: dict[str, Any] | None = None


_MISSING = AuthResult("missing")
_INVALID = AuthResult("invalid")
_EXPIRED = AuthResult("expired")
_REJECTED = AuthResult("rejected")
_MALFORMED = AuthResult("malformed")
_UNAVAILABLE = AuthResult("unavailable")


def _revocation_keys(claims: Mapping[str, Any]) -> list[str]:
    """The store keys that can revoke a token: its own jti, its family, its subject's cutoff."""
    keys = [f"revoked:{claims.get('jti')}"]
    if isinstance(claims.get("fam"), str):
        keys.append(f"family:{claims['fam']}")
    if isinstance(claims.get("sub"), str):
        keys.append(f"cutoff:{claims['sub']}")
    return keys


def _store_failed(exc: Exception, outcome: str) -> None:
    """Log a store failure in one line: its kind and message (never a token), and what came of it."""
    _log.warning("jwtplus: the revocation store failed (%s: %s); %s", type(exc).__name__, exc, outcome)


async def _is_revoked(sessions: Sessions, claims: Mapping[str, Any], now: float) -> bool:
    """Whether the store revokes *claims*: by jti, by family, or by a cutoff at or after its ``iat``.

    Raises whatever the store raises when it cannot be reached.
    """
    keys = _revocation_keys(claims)
    values = await sessions.store.get_many(keys, now)
    for key, value in zip(keys, values, strict=True):
        if value is None:
            continue
        if not key.startswith("cutoff:"):
            return True
        iat = claims.get("iat")
        if not isinstance(iat, (int, float)) or iat <= value:
            return True
    return False


def _csrf_ok(request: web.Request, claims: Mapping[str, Any], cookies: CookiePolicy) -> bool:
    """Whether an unsafe request authenticated by cookie comes from the app itself.

    It must echo the token's ``csrf`` claim in the CSRF header (compared in
    constant time), and where the browser says where it comes from
    (``Sec-Fetch-Site``, ``Origin``), that must be the same origin or a trusted one.
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    foreign = origin is not None and origin.partition("://")[2] != request.host
    if foreign and origin not in cookies.trusted_origins:
        return False
    expected, given = claims.get("csrf"), request.headers.get(cookies.csrf_header)
    if not isinstance(expected, str) or not expected or given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8", "replace"))


async def authenticate(
    request: web.Request,
    manager: SecretManager,
    token_getter: TokenGetter = basic_token_getter,
    identifier: Identifier = basic_identifier,
    *,
    cookies: CookiePolicy = DEFAULT_COOKIES,
    sessions: Sessions | None = None,
    decode: Callable[[str, float], dict[str, Any]] | None = None,
    now: float | None = None,
) -> AuthResult:
    """Find, verify and identify the request's token; never raises.

    The status is "missing" (no token), "malformed" (two different tokens),
    "invalid" (including a refresh token, and a token revoked in *sessions*'
    store), "expired", "rejected" (the identifier returned a falsy value or
    raised, or a cookie-borne unsafe request failed the CSRF check),
    "unavailable" (the store could not be reached, unless fail-open) or
    "pass", with the identifier's result as ``carry``. Failures are logged
    without the token. *decode* is :func:`decode_token` for *manager* unless
    given (say a :func:`cached_decoder`).
    """
    check = _authenticator(manager, token_getter, identifier, cookies, sessions, decode)
    return await check(request, time.time() if now is None else now)


def _authenticator(
    manager: SecretManager,
    token_getter: TokenGetter,
    identifier: Identifier,
    cookies: CookiePolicy,
    sessions: Sessions | None,
    decode: Callable[[str, float], dict[str, Any]] | None,
) -> Callable[[web.Request, float], Awaitable[AuthResult]]:
    """:func:`authenticate` with its configuration bound once: what a middleware calls per request."""
    if decode is None:

        def decode(token: str, now: float) -> dict[str, Any]:
            return _verify(manager, token, now)[0]

    verify = decode

    async def check(request: web.Request, now: float) -> AuthResult:
        try:
            token = token_getter(request)
            if token is not None and not isinstance(token, str):
                token = await _maybe_await(token)
        except AmbiguousTokenError:
            return _MALFORMED
        except Exception:
            _log.warning("jwtplus: the token getter raised; request treated as invalid", exc_info=True)
            return _INVALID
        if token is None or token == "":
            return _MISSING
        try:
            payload = verify(token, now)
        except jwt.ExpiredSignatureError:
            return _EXPIRED
        except jwt.InvalidTokenError as exc:
            _log.debug("jwtplus: token refused (%s)", type(exc).__name__)
            return _INVALID
        except Exception:  # a bug, here or in PyJWT: refuse, and say so where it is seen
            _log.warning("jwtplus: verifying a token raised; request treated as invalid", exc_info=True)
            return _INVALID
        if payload.get("type", "access") != "access":
            return _INVALID  # a refresh token is never an access token
        # fail closed: only a token a browser cannot attach by itself (a header, a query) skips the check
        ambient = request.get(TOKEN_SOURCE) not in ("header", "query")
        if ambient and request.method not in _SAFE_METHODS and not _csrf_ok(request, payload, cookies):
            _log.info("jwtplus: CSRF check failed for %s %s", request.method, request.path)
            return _REJECTED
        if sessions is not None:
            try:
                if await _is_revoked(sessions, payload, now):
                    return _INVALID
            except Exception as exc:
                _store_failed(
                    exc, "request accepted (fail-open)" if sessions.fail_open else "request refused (503)"
                )
                if not sessions.fail_open:
                    return _UNAVAILABLE
        try:
            carry = identifier(payload)
            if hasattr(carry, "__await__"):  # a coroutine function's, or any awaitable
                carry = await carry
        except Exception:
            _log.warning("jwtplus: the identifier raised; request rejected", exc_info=True)
            return _REJECTED
        if not carry:
            return _REJECTED
        return tuple.__new__(
            AuthResult, ("pass", carry, payload)
        )  # AuthResult(...), without its Python __new__

    return check


# ---- The routing decision ----


class Action(enum.Enum):
    """What the router does with a request, decided before any handler runs."""

    HANDLER = "handler"
    APP_PAGE = "app_page"
    LOGIN_PAGE = "login_page"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    BAD_REQUEST = "bad_request"
    UNAVAILABLE = "unavailable"


def _without_dot_segments(path: str) -> str:
    """Resolve ``.`` and ``..`` and merge slashes, as a proxy or file server in front might."""
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if out:
                out.pop()
        elif segment not in (".", ""):
            out.append(segment)
    trailing = path.endswith(("/", "/.", "/..")) and out
    return "/" + "/".join(out) + ("/" if trailing else "")


def path_readings(path: str) -> tuple[str, ...]:
    """Every way a path can be read, from the router's own (``rel_url.path_safe``).

    The router's spelling keeps ``%2F`` and ``%25`` encoded; other readings
    decode them and resolve dot segments.

    >>> path_readings("/public%2Fx/../settings")
    ('/public%2Fx/../settings', '/public/x/../settings', '/settings', '/public/settings')
    """
    if "%" not in path and "/." not in path and "//" not in path:
        return (path,)
    decoded = path.replace("%2F", "/").replace("%25", "%")
    readings = (path, decoded, _without_dot_segments(path), _without_dot_segments(decoded))
    return tuple(dict.fromkeys(readings))


def decide(
    rules: RoutingRules,
    path: str,
    method: str,
    route_found: bool,
    status: AuthStatus,
    *,
    preflight: bool = False,
) -> Action:
    """The SPA routing table, as a pure function.

    *path* is the path the router matched (``request.rel_url.path_safe``). A
    path is whitelisted only if every reading of it matches a whitelist
    pattern, and protected if any reading matches a protected one. A CORS
    *preflight* (OPTIONS with ``Access-Control-Request-Method``) never carries
    credentials, so it goes to the handler (aiohttp-cors answers it there).

    >>> rules = RoutingRules(login_route="/login.html", login_page=True, app_page=True)
    >>> decide(rules, "/index.html", "GET", True, "missing"), decide(rules, "/api", "POST", True, "pass")
    (<Action.LOGIN_PAGE: 'login_page'>, <Action.HANDLER: 'handler'>)
    """
    if preflight and method == "OPTIONS":
        return Action.HANDLER
    readings = path_readings(path)
    if rules._whitelist and all(any(p.fullmatch(r) for p in rules._whitelist) for r in readings):
        return Action.HANDLER
    if status == "malformed":
        return Action.BAD_REQUEST
    if status == "unavailable":
        return Action.UNAVAILABLE
    ok = status == "pass"
    denied = Action.FORBIDDEN if status == "rejected" else Action.UNAUTHORIZED
    page = method in ("GET", "HEAD")
    if page and rules.login_route and path == rules.login_route:
        if ok:
            return Action.APP_PAGE if rules.app_page else Action.HANDLER
        return Action.LOGIN_PAGE if rules.login_page else Action.HANDLER
    if not page or any(p.fullmatch(r) for p in rules._protected for r in readings):
        return Action.HANDLER if ok else denied
    if ok:
        return Action.HANDLER if route_found or not rules.app_page else Action.APP_PAGE
    return Action.LOGIN_PAGE if rules.login_page else denied


# ---- Middleware factories ----

_BODY_400 = b'{"error":"bad_request"}'
_BODY_401 = b'{"error":"unauthorized"}'
_BODY_403 = b'{"error":"forbidden"}'
_BODY_503 = b'{"error":"unavailable"}'


def _challenge(scheme: str, action: Action, status: AuthStatus) -> web.Response:
    """The 400/401/403/503 answer (RFC 6750): the same body whatever check failed."""
    if action is Action.UNAVAILABLE:
        return web.Response(
            body=_BODY_503,
            status=503,
            content_type="application/json",
            headers={"Retry-After": "5", "Cache-Control": "no-store"},
        )
    if action is Action.FORBIDDEN:
        challenge, body, code = f'{scheme} error="insufficient_scope"', _BODY_403, 403
    elif action is Action.BAD_REQUEST:
        challenge, body, code = f'{scheme} error="invalid_request"', _BODY_400, 400
    else:
        challenge = scheme if status == "missing" else f'{scheme} error="invalid_token"'
        body, code = _BODY_401, 401
    return web.Response(
        body=body,
        status=code,
        content_type="application/json",
        headers={"WWW-Authenticate": challenge, "Cache-Control": "no-store"},
    )


_quiet_keys: set[str] = set()  # the seed's keys once set under a muted warning


def _set_seed_keys(request: web.Request, status: AuthStatus, carry: Any) -> None:
    """Set the seed's string keys without aiohttp's NotAppKeyWarning reaching users.

    aiohttp warns once per process per string key, so only the first set needs muting.
    """
    if _quiet_keys:
        request["auth_status"], request["auth_carry"] = status, carry
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", web.NotAppKeyWarning)
        request["auth_status"], request["auth_carry"] = status, carry
    _quiet_keys.update(("auth_status", "auth_carry"))


def _identifier(
    manager: SecretManager,
    token_getter: TokenGetter | None,
    identifier: Identifier | None,
    cookies: CookiePolicy | None,
    sessions: Sessions | None,
    cache_size: int,
) -> Callable[[web.Request], Awaitable[AuthStatus]]:
    """Return ``identify(request)``: authenticate it, store the result on it, return its status."""
    if token_getter is None or token_getter is basic_token_getter:
        token_getter = header_token_getter(manager.scheme)
        if cookies is not None:
            token_getter = any_token_getter(token_getter, cookie_token_getter(cookies.token_cookie))
    check = _authenticator(
        manager,
        token_getter,
        identifier or basic_identifier,
        cookies or DEFAULT_COOKIES,
        sessions,
        cached_decoder(manager, size=cache_size),
    )
    clock = time.time

    async def identify(request: web.Request) -> AuthStatus:
        status, carry, claims = await check(request, clock())
        request[AUTH_STATUS] = status
        request[AUTH_CARRY] = carry
        request[AUTH_CLAIMS] = claims
        _set_seed_keys(request, status, carry)
        return status

    return identify


def _router(
    rules: RoutingRules,
    login_page_handler: Handler | None,
    app_page_handler: Handler | None,
    scheme: str,
) -> Callable[[web.Request, AuthStatus], Handler | web.Response | None]:
    """Return ``route(request, status)``: None to run the request's own handler, a page handler to run
    instead, or a ready 400/401/403/503 answer. Decisions are remembered (``decide`` is pure)."""
    if rules.login_page != (login_page_handler is not None) or rules.app_page != (
        app_page_handler is not None
    ):
        raise ValueError("rules.login_page and rules.app_page must say whether each page handler is given")

    @functools.lru_cache(maxsize=4096)
    def decided(path: str, method: str, found: bool, status: AuthStatus, preflight: bool) -> Action:
        return decide(rules, path, method, found, status, preflight=preflight)

    def route(request: web.Request, status: AuthStatus) -> Handler | web.Response | None:
        action = decided(
            request.rel_url.path_safe,
            request.method,
            request.match_info.http_exception is None,
            status,
            # a preflight goes to its handler only where a route answers OPTIONS itself (aiohttp-cors does)
            "Access-Control-Request-Method" in request.headers
            and request.match_info.route.method == "OPTIONS",
        )
        if action is Action.HANDLER:
            return None
        if action is Action.LOGIN_PAGE and login_page_handler is not None:
            return login_page_handler
        if action is Action.APP_PAGE and app_page_handler is not None:
            return app_page_handler
        return _challenge(scheme, action, status)

    return route


def identifier_middleware(
    *,
    manager: SecretManager,
    token_getter: TokenGetter | None = None,
    identifier: Identifier | None = None,
    cookies: CookiePolicy | None = None,
    sessions: Sessions | None = None,
    cache_size: int = 10_000,
) -> Middleware:
    """Return the middleware that identifies each request and stores the result.

    It sets ``request[AUTH_STATUS]`` and ``request[AUTH_CARRY]`` (and the
    seed's ``'auth_status'`` and ``'auth_carry'``), then always calls the handler.
    The default getter reads ``Authorization`` with the manager's scheme (so
    does :data:`basic_token_getter` here) and, given *cookies*, the token
    cookie too; the default identifier is :func:`basic_identifier`. Unsafe
    requests whose token came from a cookie must pass the CSRF check of
    *cookies* (or of the default policy). Given *sessions*, every token is
    checked against its revocation store. Verified tokens are remembered in a
    :func:`cached_decoder` of *cache_size* entries (0: none).
    """
    identify = _identifier(manager, token_getter, identifier, cookies, sessions, cache_size)

    @web.middleware
    async def jwt_identifier(request: web.Request, handler: Handler) -> web.StreamResponse:
        await identify(request)
        return await handler(request)

    return jwt_identifier


def router_middleware(
    *,
    rules: RoutingRules,
    login_page_handler: Handler | None = None,
    app_page_handler: Handler | None = None,
    scheme: str = "Bearer",
) -> Middleware:
    """Return the middleware that applies :func:`decide` to each identified request.

    It must come after :func:`identifier_middleware`.
    """
    route = _router(rules, login_page_handler, app_page_handler, scheme)

    @web.middleware
    async def jwt_router(request: web.Request, handler: Handler) -> web.StreamResponse:
        target = route(request, get_auth_status(request))
        if target is None:
            return await handler(request)
        return target if isinstance(target, web.StreamResponse) else await target(request)

    return jwt_router


def jwt_middleware(
    *,
    manager: SecretManager,
    rules: RoutingRules,
    token_getter: TokenGetter | None = None,
    identifier: Identifier | None = None,
    login_page_handler: Handler | None = None,
    app_page_handler: Handler | None = None,
    cookies: CookiePolicy | None = None,
    sessions: Sessions | None = None,
    cache_size: int = 10_000,
) -> Middleware:
    """Both middlewares in one: identify, then route; one layer fewer on every request.

    The arguments are those of :func:`identifier_middleware` and :func:`router_middleware`.
    """
    identify = _identifier(manager, token_getter, identifier, cookies, sessions, cache_size)
    route = _router(rules, login_page_handler, app_page_handler, manager.scheme)

    @web.middleware
    async def jwt_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        target = route(request, await identify(request))
        if target is None:
            return await handler(request)
        return target if isinstance(target, web.StreamResponse) else await target(request)

    return jwt_auth


# ---- Cookies: login and logout ----


def set_token_cookies(
    response: web.StreamResponse,
    manager: SecretManager,
    token: str,
    *,
    cookies: CookiePolicy = DEFAULT_COOKIES,
    now: float | None = None,
) -> dict[str, Any]:
    """Put *token* in its cookie on *response*, and its ``csrf`` claim in the CSRF cookie.

    Both live as long as the token (Max-Age is its remaining life). The token
    is verified first, so a bad one never becomes a cookie; its claims are returned.
    """
    claims = decode_token(manager, token, now=now)
    now = time.time() if now is None else now
    attributes: dict[str, Any] = {
        "max_age": max(0, int(claims["exp"] - now)),
        "path": cookies.path,
        "domain": cookies.domain,
        "secure": cookies.secure,
        "samesite": cookies.samesite,
    }
    response.set_cookie(cookies.token_cookie, token, httponly=cookies.httponly, **attributes)
    csrf = claims.get("csrf")
    if isinstance(csrf, str) and csrf:
        response.set_cookie(cookies.csrf_cookie, csrf, httponly=False, **attributes)
    return claims


def login(
    response: web.StreamResponse,
    manager: SecretManager,
    claims: Mapping[str, Any],
    *,
    cookies: CookiePolicy = DEFAULT_COOKIES,
    now: float | None = None,
) -> str:
    """Mint a token for *claims* with a fresh random ``csrf`` claim, set both cookies, return the token."""
    token = encode_token(manager, {**claims, "csrf": secrets.token_urlsafe(32)}, now=now)
    set_token_cookies(response, manager, token, cookies=cookies, now=now)
    return token


def logout(response: web.StreamResponse, *, cookies: CookiePolicy = DEFAULT_COOKIES) -> None:
    """Clear the token, refresh and CSRF cookies on *response*, under every spelling of their names."""
    names = {cookies.token_cookie, cookies.name, cookies.csrf_cookie, cookies.csrf_name}
    for name in sorted(names):
        host_only = name.startswith("__Host-")
        response.del_cookie(
            name,
            path="/" if host_only else cookies.path,
            domain=None if host_only else cookies.domain,
            secure=cookies.secure or host_only,
            samesite=cookies.samesite,
        )
    for name in sorted({cookies.refresh_cookie, cookies.refresh_name}):
        host_only = name.startswith("__Host-")
        response.del_cookie(
            name,
            path="/" if host_only else cookies.refresh_path,
            domain=None if host_only else cookies.domain,
            secure=cookies.secure or name.startswith("__"),
            samesite="Strict",
        )


# ---- Sessions: token pairs, refresh, revocation ----


@dataclass(frozen=True, slots=True)
class TokenPair:
    """A short access token and the long refresh token that renews it, from one login family."""

    access: str
    refresh: str
    family: str
    csrf: str


def issue_tokens(
    sessions: Sessions,
    subject: str,
    claims: Mapping[str, Any] | None = None,
    *,
    family: str | None = None,
    fresh: bool = True,
    now: float | None = None,
) -> TokenPair:
    """Mint an access and a refresh token for *subject* (``sub``) with *claims*, in *family* or a new one.

    *fresh* marks a token minted by a password login (not by a refresh), for
    :func:`fresh_login_required`. Both tokens carry the same ``csrf`` claim.
    """
    if not isinstance(subject, str) or not subject:
        raise ValueError(f"subject={subject!r} must be a non-empty string (it becomes the sub claim)")
    now = time.time() if now is None else now
    family = family or secrets.token_urlsafe(16)
    csrf = secrets.token_urlsafe(32)
    base = {**(claims or {}), "sub": subject, "fam": family, "csrf": csrf}
    iat = int(now)
    access = encode_token(
        sessions.manager,
        {**base, "type": "access", "fresh": fresh, "exp": iat + sessions.access_seconds},
        now=now,
    )
    refresh = encode_token(
        sessions.manager, {**base, "type": "refresh", "exp": iat + sessions.refresh_seconds}, now=now
    )
    return TokenPair(access, refresh, family, csrf)


def set_session_cookies(
    response: web.StreamResponse,
    sessions: Sessions,
    pair: TokenPair,
    *,
    cookies: CookiePolicy = DEFAULT_COOKIES,
    now: float | None = None,
) -> None:
    """Set the access and CSRF cookies (as :func:`set_token_cookies`) and the refresh cookie.

    The refresh cookie is HttpOnly, SameSite=Strict, scoped to ``cookies.refresh_path``.
    """
    set_token_cookies(response, sessions.manager, pair.access, cookies=cookies, now=now)
    now = time.time() if now is None else now
    claims = decode_token(sessions.manager, pair.refresh, now=now)
    response.set_cookie(
        cookies.refresh_cookie,
        pair.refresh,
        max_age=max(0, int(claims["exp"] - now)),
        path=cookies.refresh_path,
        domain=None if cookies.refresh_cookie.startswith("__Host-") else cookies.domain,
        secure=cookies.secure,
        httponly=True,
        samesite="Strict",
    )
    # the CSRF cookie lives as long as the refresh token, which renews it with each pair
    response.set_cookie(
        cookies.csrf_cookie,
        pair.csrf,
        max_age=max(0, int(claims["exp"] - now)),
        path=cookies.path,
        domain=cookies.domain,
        secure=cookies.secure,
        httponly=False,
        samesite=cookies.samesite,
    )


def start_session(
    response: web.StreamResponse,
    sessions: Sessions,
    subject: str,
    claims: Mapping[str, Any] | None = None,
    *,
    cookies: CookiePolicy = DEFAULT_COOKIES,
    now: float | None = None,
) -> TokenPair:
    """After a password check: mint a fresh pair in a new family and set its cookies on *response*."""
    pair = issue_tokens(sessions, subject, claims, now=now)
    set_session_cookies(response, sessions, pair, cookies=cookies, now=now)
    return pair


def _unauthorized(scheme: str = "Bearer") -> web.HTTPUnauthorized:
    return web.HTTPUnauthorized(
        text=_BODY_401.decode(),
        content_type="application/json",
        headers={"WWW-Authenticate": f'{scheme} error="invalid_token"', "Cache-Control": "no-store"},
    )


def _unavailable() -> web.HTTPServiceUnavailable:
    return web.HTTPServiceUnavailable(
        text=_BODY_503.decode(),
        content_type="application/json",
        headers={"Retry-After": "5", "Cache-Control": "no-store"},
    )


async def _presented_refresh_token(request: web.Request, cookies: CookiePolicy) -> tuple[str | None, bool]:
    """The refresh token from the refresh cookie, else from a JSON body's ``refresh_token``; and whether
    it came from the cookie."""
    token = request.cookies.get(cookies.refresh_cookie)
    if token:
        return token, True
    if request.content_type == "application/json" and request.can_read_body:
        try:
            body = await request.json()
        except Exception:  # bad JSON, charset or nesting: no refresh token, never a 500
            return None, False
        value = body.get("refresh_token") if isinstance(body, dict) else None
        return (value, False) if isinstance(value, str) else (None, False)
    return None, False


async def refresh_session(
    request: web.Request,
    sessions: Sessions,
    *,
    cookies: CookiePolicy = DEFAULT_COOKIES,
    now: float | None = None,
) -> TokenPair:
    """Exchange the request's refresh token (cookie, or JSON ``refresh_token``) for a new pair.

    The refresh token is verified, checked against revocations, and consumed
    atomically: of concurrent refreshes with one token, exactly one wins. A
    token used before is theft: its whole family is revoked. A cookie-borne
    refresh must pass the CSRF check. Raises ``web.HTTPUnauthorized`` (401)
    or, when the store cannot be reached, ``web.HTTPServiceUnavailable`` (503).
    """
    scheme = sessions.manager.scheme
    token, from_cookie = await _presented_refresh_token(request, cookies)
    if not token:
        raise _unauthorized(scheme)
    now = time.time() if now is None else now
    try:
        claims = decode_token(sessions.manager, token, now=now)
    except jwt.InvalidTokenError:
        raise _unauthorized(scheme) from None
    family, jti, subject = claims.get("fam"), claims.get("jti"), claims.get("sub")
    if not (isinstance(family, str) and isinstance(jti, str) and isinstance(subject, str)):
        raise _unauthorized(scheme)
    if claims.get("type") != "refresh" or not (family and jti and subject):
        raise _unauthorized(scheme)
    if from_cookie and not _csrf_ok(request, claims, cookies):
        raise _unauthorized(scheme)
    try:
        if await _is_revoked(sessions, claims, now):
            raise _unauthorized(scheme)
        used_at = await sessions.store.consume(f"used:{jti}", now, _outlives(sessions, claims["exp"]), now)
        if used_at is not None:
            if now - used_at > sessions.grace_seconds:
                _log.warning("jwtplus: a refresh token was used twice; its family is revoked")
                await revoke_family(sessions, family, now=now)
            raise _unauthorized(scheme)
    except web.HTTPException:
        raise
    except Exception as exc:
        _store_failed(exc, "refresh refused (503)")
        raise _unavailable() from None
    kept = {k: v for k, v in claims.items() if k not in _REGISTERED_CLAIMS}
    return issue_tokens(sessions, subject, kept, family=family, fresh=False, now=now)


_REGISTERED_CLAIMS = frozenset(
    {"iat", "exp", "nbf", "jti", "iss", "aud", "sub", "fam", "csrf", "type", "fresh"}
)


def _outlives(sessions: Sessions, exp: float) -> float:
    """Until when a store entry about a token expiring at *exp* must live: past exp by the leeway."""
    return float(exp) + sessions.manager.leeway_seconds


async def revoke_token(sessions: Sessions, claims: Mapping[str, Any], *, now: float | None = None) -> None:
    """Revoke one token, by its ``jti``, until it expires."""
    now = time.time() if now is None else now
    await sessions.store.put(f"revoked:{claims['jti']}", now, _outlives(sessions, claims["exp"]), now)


async def revoke_family(sessions: Sessions, family: str, *, now: float | None = None) -> None:
    """Revoke every token of a login family, for as long as any of them can live."""
    now = time.time() if now is None else now
    await sessions.store.put(
        f"family:{family}", now, _outlives(sessions, now + sessions.refresh_seconds), now
    )


async def revoke_subject(sessions: Sessions, subject: str, *, now: float | None = None) -> None:
    """Log *subject* out everywhere: tokens issued up to this second are refused from now on."""
    now = time.time() if now is None else now
    until = _outlives(sessions, now + sessions.refresh_seconds)
    await sessions.store.put(f"cutoff:{subject}", float(int(now)), until, now)


async def end_session(
    request: web.Request,
    sessions: Sessions,
    *,
    cookies: CookiePolicy = DEFAULT_COOKIES,
    everywhere: bool = False,
    now: float | None = None,
) -> None:
    """Log out: revoke the family of the request's token (or of its refresh cookie, once the access
    token has expired), or with *everywhere* every token of its subject. Clear the cookies with
    :func:`logout`. Raises ``web.HTTPServiceUnavailable`` when the store cannot be reached."""
    now = time.time() if now is None else now
    claims = request.get(AUTH_CLAIMS)
    if claims is None:
        token = request.cookies.get(cookies.refresh_cookie)
        try:
            claims = decode_token(sessions.manager, token, now=now) if token else None
        except jwt.InvalidTokenError:
            claims = None
    if claims is None:
        return
    try:
        if everywhere and isinstance(claims.get("sub"), str):
            await revoke_subject(sessions, claims["sub"], now=now)
        elif isinstance(claims.get("fam"), str):
            await revoke_family(sessions, claims["fam"], now=now)
        else:
            await revoke_token(sessions, claims, now=now)
    except Exception as exc:
        _store_failed(exc, "logout refused (503)")
        raise _unavailable() from None


# ---- Revocation stores ----


def memory_store(*, max_entries: int = 100_000) -> RevocationStore:
    """A store in this process's memory: for one process, and for tests.

    Entries are dropped when they expire; when *max_entries* unexpired ones
    fill it, writes raise :class:`StoreFullError` (a refresh or logout then
    answers 503) rather than forget a revocation.
    """
    if not isinstance(max_entries, int) or max_entries < 1:
        raise ValueError(f"max_entries={max_entries!r} must be a positive int")
    entries: dict[str, tuple[float, float]] = {}  # key -> (value, until)
    expiries: list[tuple[float, str]] = []  # a heap of (until, key), stale items included

    def purge(now: float) -> None:
        while expiries and expiries[0][0] <= now:
            until, key = heapq.heappop(expiries)
            if key in entries and entries[key][1] == until:
                del entries[key]

    def write(key: str, value: float, until: float, now: float) -> None:
        purge(now)
        if key not in entries and len(entries) >= max_entries:
            raise StoreFullError(f"the memory store holds {max_entries} unexpired entries")
        entries[key] = (value, until)
        heapq.heappush(expiries, (until, key))

    def live(key: str, now: float) -> float | None:
        entry = entries.get(key)
        return entry[0] if entry is not None and entry[1] > now else None

    async def put(key: str, value: float, until: float, now: float) -> None:
        write(key, value, until, now)

    async def get_many(keys: Sequence[str], now: float) -> list[float | None]:
        return [live(key, now) for key in keys]

    async def consume(key: str, value: float, until: float, now: float) -> float | None:
        previous = live(key, now)
        if previous is None:
            write(key, value, until, now)
        return previous

    return RevocationStore(put, get_many, consume)


def redis_store(client: Any, *, prefix: str = "jwtplus:") -> RevocationStore:
    """A store in Redis, shared by every process and machine: *client* is a ``redis.asyncio.Redis``.

    Writes are single atomic commands (``SET ... EXAT``, ``SET ... NX GET``),
    so two servers racing to consume one refresh token never both win; reads
    are one ``MGET``. jwtplus never imports redis itself: install it with the
    ``redis`` extra and pass the client.
    """

    def expire_at(until: float, now: float) -> int:
        return max(math.ceil(until), math.ceil(now) + 1)

    async def put(key: str, value: float, until: float, now: float) -> None:
        await client.set(prefix + key, repr(value), exat=expire_at(until, now))

    async def get_many(keys: Sequence[str], now: float) -> list[float | None]:
        values = await client.mget([prefix + key for key in keys])
        return [None if value is None else float(value) for value in values]

    async def consume(key: str, value: float, until: float, now: float) -> float | None:
        previous = await client.set(prefix + key, repr(value), exat=expire_at(until, now), nx=True, get=True)
        return None if previous is None else float(previous)

    return RevocationStore(put, get_many, consume)


# ---- Guards ----


def _guard(check: Callable[[dict[str, Any]], bool], failure: Action) -> Callable[[Handler], Handler]:
    """A handler decorator: 401 unless the request passed, then *failure* unless *check(claims)*."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            status, claims = get_auth_status(request), request.get(AUTH_CLAIMS)
            helper = request.config_dict.get(JWTPLUS_HELPER)
            scheme = helper.manager.scheme if helper is not None else "Bearer"
            if status != "pass" or claims is None:
                action = Action.FORBIDDEN if status == "rejected" else Action.UNAUTHORIZED
                return _challenge(scheme, action, status)
            if not check(claims):
                return _challenge(scheme, failure, "invalid")
            return await handler(request)

        return guarded

    return decorate


login_required: Callable[[Handler], Handler] = _guard(lambda claims: True, Action.UNAUTHORIZED)
"""Decorate a handler to answer 401 (or 403) unless the request carries an accepted token."""

fresh_login_required: Callable[[Handler], Handler] = _guard(
    lambda claims: claims.get("fresh") is True, Action.UNAUTHORIZED
)
"""Decorate a sensitive handler: 401 unless the token came from a password login, not a refresh."""


def require(predicate: Callable[[dict[str, Any]], bool]) -> Callable[[Handler], Handler]:
    """Decorate a handler to answer 403 ``insufficient_scope`` unless *predicate(claims)* holds."""
    return _guard(predicate, Action.FORBIDDEN)


def require_claims(**expected: Any) -> Callable[[Handler], Handler]:
    """Decorate a handler to need these claim values: equal, an item of a list claim, or a word of a
    space-separated ``scope``.

    >>> require_claims(role="admin")  # doctest: +ELLIPSIS
    <function ...>
    """

    for name, value in expected.items():
        if not isinstance(value, (str, int, float, bool)):
            raise TypeError(f"require_claims({name}={value!r}): expect a string, number or bool")

    def same(actual: Any, value: Any) -> bool:
        return type(actual) is type(value) and actual == value  # True is no 1, 7.0 no 7

    def holds(claims: dict[str, Any]) -> bool:
        for name, value in expected.items():
            actual = claims.get(name)
            in_list = isinstance(actual, list) and any(same(item, value) for item in actual)
            in_scope = name == "scope" and isinstance(actual, str) and value in actual.split()
            if not (same(actual, value) or in_list or in_scope):
                return False
        return True

    return require(holds)


# ---- aiohttp wiring ----

JWTPLUS_HELPER = web.AppKey["JWTHelper"]("jwtplus_helper")
"""Where :func:`setup` keeps the app's JWTHelper."""


def setup(app: web.Application, helper: JWTHelper) -> JWTHelper:
    """Install *helper*'s middleware on *app* (both in one layer) and keep it at ``app[JWTPLUS_HELPER]``."""
    app.middlewares.append(helper.middleware())
    app[JWTPLUS_HELPER] = helper
    return helper


# ---- The seed's names ----


@dataclass(frozen=True, slots=True, eq=False)
class JWTHelper:
    """The seed's configuration object: where tokens come from, who passes, and the routing table.

    Without page handlers it is in API mode: every path that is not
    whitelisted needs a valid token (401/403). Put ``pre_jwt_identifier()``
    before ``post_jwt_router()`` in the app's middlewares, or call :func:`setup`.
    """

    unauthorized_return_route: str = ""
    """The login page's path: a logged-in GET of it gets the authorized page."""
    unauthorized_return_route_handler: Handler | None = None
    """The login page: served for page requests without an accepted token."""
    authorized_return_page_handler: Handler | None = None
    """The app page: served to logged-in GETs of the login route and of unknown paths."""
    secret_manager: SecretManager | None = None
    """None: a new SecretManager() with a random secret."""
    token_getter: TokenGetter | None = None
    """None: read ``Authorization: <scheme> <token>`` with the manager's scheme."""
    identifier: Identifier | None = None
    """None: :func:`basic_identifier`."""
    whitelist: _Patterns = ()
    """Paths whose handler always runs."""
    protected_apis: _Patterns = ()
    """Paths that answer 401/403 rather than a page."""
    _: KW_ONLY
    cookies: CookiePolicy | None = None
    """Also read the token from cookies under this policy (for browsers), with its CSRF check."""
    sessions: Sessions | None = None
    """Check every token against these sessions' revocation store."""
    cache_size: int = 10_000
    """How many verified tokens to remember (see :func:`cached_decoder`); 0: none."""
    manager: SecretManager = field(init=False, repr=False)
    """The secret manager in use (the given one, or a new one)."""
    rules: RoutingRules = field(init=False, repr=False)
    """The routing table this helper's router applies."""

    def __post_init__(self) -> None:
        setattr_ = functools.partial(object.__setattr__, self)
        for name in (
            "unauthorized_return_route_handler",
            "authorized_return_page_handler",
            "token_getter",
            "identifier",
        ):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be callable or None, got {value!r}")
        if self.cookies is not None and not isinstance(self.cookies, CookiePolicy):
            raise TypeError(f"cookies must be a CookiePolicy or None, got {self.cookies!r}")
        if self.sessions is not None and not isinstance(self.sessions, Sessions):
            raise TypeError(f"sessions must be a Sessions or None, got {self.sessions!r}")
        manager = self.secret_manager
        if self.sessions is not None and manager not in (None, self.sessions.manager):
            raise ValueError("secret_manager and sessions.manager must be the same SecretManager")
        if manager is None:
            manager = self.sessions.manager if self.sessions is not None else SecretManager()
        if not isinstance(manager, SecretManager):
            raise TypeError(f"secret_manager must be a SecretManager or None, got {manager!r}")
        setattr_("manager", manager)
        setattr_(
            "rules",
            RoutingRules(
                login_route=self.unauthorized_return_route,
                whitelist=self.whitelist,
                protected_apis=self.protected_apis,
                login_page=self.unauthorized_return_route_handler is not None,
                app_page=self.authorized_return_page_handler is not None,
            ),
        )

    def pre_jwt_identifier(self) -> Middleware:
        """The first middleware: identify the request (see :func:`identifier_middleware`)."""
        return identifier_middleware(
            manager=self.manager,
            token_getter=self.token_getter,
            identifier=self.identifier,
            cookies=self.cookies,
            sessions=self.sessions,
            cache_size=self.cache_size,
        )

    def middleware(self) -> Middleware:
        """Both in one middleware (see :func:`jwt_middleware`): what :func:`setup` installs."""
        return jwt_middleware(
            manager=self.manager,
            rules=self.rules,
            token_getter=self.token_getter,
            identifier=self.identifier,
            login_page_handler=self.unauthorized_return_route_handler,
            app_page_handler=self.authorized_return_page_handler,
            cookies=self.cookies,
            sessions=self.sessions,
            cache_size=self.cache_size,
        )

    def post_jwt_router(self) -> Middleware:
        """The second middleware: route by the table (see :func:`router_middleware`)."""
        return router_middleware(
            rules=self.rules,
            login_page_handler=self.unauthorized_return_route_handler,
            app_page_handler=self.authorized_return_page_handler,
            scheme=self.manager.scheme,
        )


def show_request_info(request: web.Request) -> None:
    """Print a request's method, path and what jwtplus made of it (never its token)."""
    status, carry = request.get(AUTH_STATUS), request.get(AUTH_CARRY)
    print(f"{request.method} {request.path} from {request.remote}: auth_status={status} auth_carry={carry!r}")

"""JWT authentication for aiohttp servers, in one file.

jwtplus signs and checks JSON Web Tokens (HMAC, or key pairs that others verify
from a JWKS; PyJWT's errors), rotates its keys from the clock so that every
worker agrees without talking to the others, accepts the tokens of identity
providers, and puts a routing table in front of your handlers: protected APIs
answer 401 or 403 before their handler runs, and for an SPA a logged-in user
gets the app, everyone else the login page. For browsers, tokens travel in
HttpOnly cookies with CSRF protection; sessions pair short access tokens with
refresh tokens that can be revoked, in memory or in Redis.

Quick start, the functional API::

    from aiohttp import web
    import jwtplus

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"hello": request[jwtplus.AUTH_CARRY]["username"]})

    manager = jwtplus.SecretManager(secret=b"32 or more random bytes .........")
    rules = jwtplus.RoutingRules(protected_apis=("/hello",))
    app = web.Application(middlewares=[jwtplus.jwt_middleware(manager=manager, rules=rules)])
    app.router.add_get("/hello", hello)
    # a client sends:  Authorization: Bearer <manager.encode({"username": "ann"})>

Every request goes through one pipeline: token getter, decode, token type,
checks (CSRF, revocation, your own), identifier. Guards and per-route options
are data on the handler that the middleware enforces before it runs.

Coming from aiohttp-jwtplus 0.2.0: ``JWTHelper`` keeps its arguments and its
``pre_jwt_identifier()`` / ``post_jwt_router()`` pair, and builds these pieces.

Depends on aiohttp and PyJWT only (EdDSA, ES256, RS256 and PS256 keys, the JWKS
handler and identity providers need the crypto extra, which brings cryptography).
Three parts, read top to bottom (``grep '^# ----' jwtplus.py`` lists the
sections): I tokens and requests; II browsers and sessions; III aiohttp wiring
and 0.2.0 compatibility.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import enum
import functools
import hashlib
import heapq
import hmac
import inspect
import itertools
import json
import logging
import math
import re
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, NamedTuple, Protocol, TypeAlias, TypeVar, cast
from urllib.parse import quote, urlsplit

import aiohttp
import jwt
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_urldispatcher import PrefixedSubAppResource
from jwt.algorithms import HMACAlgorithm

__version__ = "1.1.0"

__all__ = (
    # I. tokens and requests: errors and constants
    "MAX_TOKEN_LENGTH",
    "AmbiguousTokenError",
    "AuthStatus",
    "Duration",
    "KeyIdError",
    "StoreFullError",
    "StoreNotDurableError",
    "TokenTooLargeError",
    # durations
    "parse_duration",
    # keys and rotation
    "KeyInput",
    "SecretManager",
    "key_for_period",
    "period_of",
    # encode / decode
    "CacheInfo",
    "TokenDecoder",
    "cached_decoder",
    "decode_token",
    "encode_token",
    # publishing keys
    "jwks_handler",
    "public_jwks",
    # identity providers
    "IdentityProvider",
    # request keys
    "AUTH_CARRY",
    "AUTH_CLAIMS",
    "AUTH_STATUS",
    "TOKEN_SOURCE",
    "get_auth_carry",
    "get_auth_claims",
    "get_auth_identity",
    "get_auth_status",
    # token getters
    "TokenGetter",
    "any_token_getter",
    "basic_token_getter",
    "body_token_getter",
    "cookie_token_getter",
    "header_token_getter",
    "query_token_getter",
    # the authentication pipeline
    "AuthResult",
    "Check",
    "Identifier",
    "authenticate",
    "basic_identifier",
    "subject_identifier",
    "user_identifier",
    # routing
    "Action",
    "RoutePolicy",
    "RoutingRules",
    "decide",
    "path_readings",
    "policy_of",
    # answers
    "REFUSAL_REASONS",
    "OnRefusal",
    "Refusal",
    # middleware factories
    "authentication_middleware",
    "jwt_middleware",
    "router_middleware",
    # II. browsers and sessions: cookies and CSRF
    "CookiePolicy",
    "clear_login_cookies",
    "csrf_check",
    "set_login_cookies",
    "set_token_cookies",
    # sessions
    "Sessions",
    "TokenPair",
    "end_session",
    "issue_tokens",
    "refresh_session",
    "revocation_check",
    "revoke_family",
    "revoke_subject",
    "revoke_token",
    "set_session_cookies",
    "start_session",
    # stores
    "RevocationStore",
    "memory_store",
    "redis_store",
    "MAX_CACHE_FOR",
    "MAX_STORE_TIMEOUT",
    # guards and route options
    "fresh_login_required",
    "login_required",
    "require",
    "require_claims",
    "require_user",
    "route_options",
    "session_route",
    # WebSockets
    "SOCKET_REFUSED",
    "SOCKET_UNAVAILABLE",
    "authenticated_messages",
    # III. aiohttp wiring and 0.2.0 compatibility
    "JWTPLUS_HELPER",
    "JWTHelper",
    "auth_headers",
    "setup",
    "show_request_info",
)

_log = logging.getLogger("jwtplus")

Duration: TypeAlias = "str | int | float | timedelta"
KeyInput: TypeAlias = "str | bytes | Mapping[str, Any]"
"""An asymmetric key: PEM text (a private or public key), or a JWK as a dict or its JSON text."""
AuthStatus: TypeAlias = Literal[
    "pass", "missing", "invalid", "expired", "rejected", "malformed", "unavailable"
]
TokenGetter: TypeAlias = Callable[[web.Request], "str | Awaitable[str | None] | None"]
Identifier: TypeAlias = Callable[[dict[str, Any]], Any]
Check: TypeAlias = Callable[[web.Request, dict[str, Any], float], "str | Awaitable[str | None] | None"]
"""A pipeline step after the token is verified: ``check(request, claims, now)`` returns None to pass,
or the status that refuses the request ("invalid", "expired", "rejected" or "unavailable")."""
ReloadClaims: TypeAlias = Callable[
    [str, dict[str, Any]], "Mapping[str, Any] | Awaitable[Mapping[str, Any] | None] | None"
]
"""``reload_claims(subject, claims)`` of :class:`Sessions`: the claims a refreshed pair carries, or None."""
_Patterns: TypeAlias = "Iterable[str | re.Pattern[str]]"
_H = TypeVar("_H")


# ==== Part I: tokens and requests ====

# ---- Constants and errors ----

MAX_TOKEN_LENGTH = 8192
"""Tokens longer than this many characters are refused before any decoding."""

_MAX_NUMERIC_DATE = 253402300799  # 9999-12-31T23:59:59Z
_MAX_DURATION = 10**10  # seconds, about 317 years: keeps now + exptime below the year 9999
_MAX_KID_DIGITS = 15
_MAX_LEEWAY = 300  # seconds: more is no clock skew, it is a longer lifetime
_MAX_REUSE_GRACE = 60  # seconds: tabs racing to refresh take less; more lets a thief in unseen
_ROTATION_LABEL = b"jwtplus-rotation-v1:"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_HTTP_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_HASHES = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}
_ASYMMETRIC = {
    "EdDSA": ("OKP", "Ed25519"),
    "ES256": ("EC", "P-256"),
    "RS256": ("RSA", ""),
    "PS256": ("RSA", ""),
}
"""The asymmetric algorithms, with the JWK ``kty`` and ``crv`` their keys must have."""
_ED25519_LABEL = b"jwtplus-ed25519-v1:"
_MIN_RSA_BITS = 2048
_MAX_RSA_BITS = 8192
_MAX_RSA_EXPONENT = 2**32
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_MAX_PUBLISHED_KEYS = 100
_NO_CRYPTO = (
    "asymmetric keys (EdDSA, ES256, RS256, PS256) need the cryptography package: "
    "pip install 'aiohttp-jwtplus[crypto]'"
)


class TokenTooLargeError(jwt.DecodeError):
    """Raised when a token is longer than MAX_TOKEN_LENGTH, before any decoding."""


class KeyIdError(jwt.InvalidTokenError):
    """Raised when a rotating token's ``kid`` is missing, malformed or out of its window."""


class AmbiguousTokenError(Exception):
    """Raised by a token getter when a request offers two different tokens (RFC 6750 ``invalid_request``)."""


class StoreFullError(RuntimeError):
    """Raised by the memory store when it is full of unexpired entries: fail closed, never forget."""


class StoreNotDurableError(RuntimeError):
    """Raised by :func:`redis_store` when no replica confirmed a write in time: a failover could lose
    it, so jwtplus does not acknowledge it (503)."""


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


# ---- Keys and rotation ----


def _secret_bytes(secret: str | bytes, size: int) -> bytes:
    """Encode the configured secret; an empty one becomes *size* random bytes."""
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if not isinstance(secret, bytes):
        raise TypeError(f"secret must be str or bytes, got {type(secret).__name__}")
    return secret or secrets.token_bytes(size)


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


@dataclass(frozen=True, slots=True, eq=False)
class SecretManager:
    """Everything needed to sign and check tokens: secret, algorithm, lifetimes.

    Frozen and validated at construction. Every process that must accept the
    others' tokens needs the same *secret*, *algorithm*, *refresh_interval* and
    *exptime*; across machines, give *leeway* a few seconds for clock skew.
    An empty *secret* draws random bytes (as many as the hash), so tokens then die with the process.

    With ``algorithm="EdDSA"`` the secret derives Ed25519 key pairs (one per
    rotation period), so other services verify with the public keys alone
    (:func:`jwks_handler`). EdDSA, ES256, RS256 and PS256 also take static
    *keys* instead of a secret: PEM or JWK, oldest first; the last one signs.

    .. warning:: the algorithm comes from here, never from a token.
    """

    secret: str | bytes = field(default="", repr=False)
    """The HMAC secret ("" draws a random one); refused when shorter than the hash output."""
    refresh_interval: Duration = 0
    """Key rotation period (0: one key, the secret itself). Whole seconds. The seed's name."""
    scheme: str = "Bearer"
    """Authorization scheme read by the basic token getter and sent in challenges."""
    algorithm: str = "HS256"
    """HS256, HS384 or HS512; EdDSA, ES256, RS256 or PS256 (the crypto extra)."""
    exptime: Duration = "30d"
    """Lifetime of a token from its issue."""
    _: KW_ONLY
    audience: str | Sequence[str] | None = None
    """Required ``aud`` (any of these); also stamped on new tokens."""
    issuer: str | None = None
    """Required ``iss``; also stamped on new tokens."""
    leeway: Duration = 0
    """Clock skew tolerated on every time check."""
    allow_weak_secret: bool = False
    """Accept a secret shorter than the hash output: for tests and demos only."""
    keys: Sequence[KeyInput] | Mapping[str, Any] = ()
    """Static asymmetric keys (PEM or JWK, or a JWKS), oldest first: each verifies the tokens naming its
    ``kid``, the last one signs (all public: this manager only verifies). Instead of a secret."""
    rotation_seconds: int = field(init=False)
    """The key rotation period in seconds (0: no rotation)."""
    exptime_seconds: float = field(init=False)
    leeway_seconds: float = field(init=False)
    _key: bytes = field(init=False, repr=False)
    _audiences: frozenset[str] = field(init=False, repr=False)
    _keys: Mapping[str, _Key] | None = field(init=False, repr=False)
    """Asymmetric keys by kid (None: HMAC; empty: EdDSA keys derived per rotation period)."""
    _signing: _Key | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        setattr_ = functools.partial(object.__setattr__, self)
        if self.algorithm not in _HASHES and self.algorithm not in _ASYMMETRIC:
            raise ValueError(
                f"algorithm={self.algorithm!r} is not supported: use one of "
                f"{', '.join([*_HASHES, *_ASYMMETRIC])}"
            )
        if not isinstance(self.scheme, str) or not _HTTP_TOKEN.fullmatch(self.scheme):
            raise ValueError(f'scheme={self.scheme!r} must be an HTTP auth scheme such as "Bearer"')
        rotation = parse_duration(self.refresh_interval, name="refresh_interval")
        if rotation != int(rotation):
            raise ValueError(
                f"refresh_interval={self.refresh_interval!r} must be 0 or a whole number of seconds"
            )
        exptime = parse_duration(self.exptime, name="exptime")
        if exptime <= 0:
            raise ValueError(f"exptime={self.exptime!r} must be positive: use {_DURATION_FORMS}")
        setattr_("rotation_seconds", int(rotation))
        setattr_("exptime_seconds", exptime)
        leeway = parse_duration(self.leeway, name="leeway")
        if leeway >= min(_MAX_LEEWAY, exptime):
            raise ValueError(
                f"leeway={self.leeway!r} must be shorter than {_MAX_LEEWAY} seconds and than "
                f"exptime={self.exptime!r}: it keeps expired tokens alive that long (a few seconds of "
                "clock skew is what it is for)"
            )
        setattr_("leeway_seconds", leeway)
        setattr_("_audiences", _audience_set(self.audience))
        if self.issuer is not None and not isinstance(self.issuer, str):
            raise TypeError(f"issuer={self.issuer!r} must be a string or None")
        setattr_("_keys", None)
        setattr_("_signing", None)
        if self.algorithm in _ASYMMETRIC:
            _require_crypto()
            if _static_keys(self, setattr_):
                return
        elif self.keys:
            raise ValueError(
                f"keys= holds asymmetric keys, which {self.algorithm} does not use: pass "
                'algorithm="EdDSA", "ES256", "RS256" or "PS256" with them, or drop keys='
            )
        wanted = hashlib.new(_HASHES.get(self.algorithm, "sha256")).digest_size
        key = _secret_bytes(self.secret, wanted)
        try:
            HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(key)  # PyJWT's own refusal of PEM and SSH keys
        except jwt.InvalidKeyError as exc:
            raise ValueError(f"secret is not usable as an HMAC key: {exc}") from None
        setattr_("_key", key)
        if len(key) < wanted and not self.allow_weak_secret:
            raise ValueError(
                f"secret is {len(key)} bytes; {self.algorithm} needs at least {wanted} (RFC 7518 section "
                f"3.2), or one token gives it away to a brute force. Make one with secrets.token_urlsafe"
                f'({wanted}), or pass secret="" for a random one (tokens then die with the process); '
                "allow_weak_secret=True accepts a short one, for tests and demos only"
            )
        if self.algorithm in _ASYMMETRIC:  # EdDSA: key pairs derived from the secret
            setattr_("_keys", {})
            if self.rotation_seconds:
                published = math.ceil((exptime + 2 * leeway) / self.rotation_seconds) + 3
                if published > _MAX_PUBLISHED_KEYS:
                    raise ValueError(
                        f"refresh_interval={self.refresh_interval!r} with exptime={self.exptime!r} keeps "
                        f"{published} key periods alive, and the JWKS would publish them all: make "
                        f"refresh_interval at least exptime/{_MAX_PUBLISHED_KEYS - 3}"
                    )
            else:
                single = _derived_key(key, None)
                setattr_("_keys", {single.kid: single})
                setattr_("_signing", single)

    def encode(
        self, payload: Mapping[str, Any], *, now: float | None = None, expires_in: Duration | None = None
    ) -> str:
        """Sign *payload* into a token: see :func:`encode_token`."""
        return encode_token(self, payload, now=now, expires_in=expires_in)

    def decode(self, token: str | bytes, *, now: float | None = None) -> dict[str, Any]:
        """Verify *token* and return its claims: see :func:`decode_token`."""
        return decode_token(self, token, now=now)

    async def auto_refresh(self) -> None:
        """Kept so the seed's code runs: keys are a pure function of secret and clock.

        With rotation on, it derives each period's key as the period starts
        (warming the cache) until cancelled; without rotation it returns at once.
        """
        interval = self.rotation_seconds
        while interval:
            now = time.time()
            period = period_of(now, interval)
            if self._keys is None:
                key_for_period(self, period)
            else:
                _derived_key(self._key, period)
            await asyncio.sleep(interval - now % interval)


def period_of(now: float, interval: int) -> int:
    """Return the rotation period holding instant *now*: periods of *interval* seconds from the epoch.

    >>> period_of(59.9, 60), period_of(60, 60)
    (0, 1)
    """
    return int(now // interval)


def _hmac_key(secret: bytes, period: int, algorithm: str) -> bytes:
    return hmac.new(secret, _ROTATION_LABEL + str(period).encode("ascii"), _HASHES[algorithm]).digest()


_cached_key = functools.lru_cache(maxsize=64)(_hmac_key)


@functools.lru_cache(maxsize=64)
def _keyed(key: bytes, algorithm: str) -> Any:
    """An HMAC of *key* that has read nothing yet: copying it skips the key's set-up on every token."""
    return hmac.new(key, digestmod=_HASHES[algorithm])


def _mac(key: bytes, message: bytes, algorithm: str) -> bytes:
    """HMAC(*key*, *message*) with the hash of HS256, HS384 or HS512 (*algorithm*)."""
    mac = _keyed(key, algorithm).copy()
    mac.update(message)
    return cast(bytes, mac.digest())


def _uncached_key(manager: SecretManager, period: int) -> bytes:
    """A key outside its window: derived only to tell a forgery from an old token, never cached."""
    return _hmac_key(manager._key, period, manager.algorithm)


def key_for_period(manager: SecretManager, period: int) -> bytes:
    """Return the signing key of rotation *period*: HMAC(secret, label + decimal period).

    The HMAC uses the algorithm's own hash (SHA-256 for HS256), so any process
    with the same secret derives the same key with nothing shared or stored.
    For EdDSA it is the Ed25519 seed, HMAC-SHA256(secret, "jwtplus-ed25519-v1:" + decimal period).
    """
    if manager._keys is not None:
        if manager._keys:
            raise ValueError(
                "key_for_period: this manager has no rotation periods (static keys, or EdDSA without "
                "refresh_interval)"
            )
        return hmac.new(manager._key, _ED25519_LABEL + str(period).encode("ascii"), "sha256").digest()
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
    interval, leeway = manager.rotation_seconds, manager.leeway_seconds
    if period * interval > now + leeway:
        return -1
    return 0 if now < (period + 1) * interval + manager.exptime_seconds + leeway else 1


# ---- Asymmetric keys ----


class _Key(NamedTuple):
    """One asymmetric key: its ``kid``, a verifier per algorithm it may check, its public JWK, and a
    signer when it is private."""

    kid: str
    verifiers: Mapping[str, Callable[[bytes, bytes], bool]]
    jwk: Mapping[str, Any]
    sign: Callable[[bytes], bytes] | None


def _require_crypto() -> None:
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise ImportError(_NO_CRYPTO) from None


def _static_keys(manager: SecretManager, setattr_: Callable[[str, Any], None]) -> bool:
    """Load an asymmetric manager's *keys* (True), or say that its secret derives them (False)."""
    given: Any = manager.keys
    if isinstance(given, Mapping) and "keys" in given:  # a JWKS
        given = given["keys"]
    if isinstance(given, (str, bytes, Mapping)) or not isinstance(given, (list, tuple)):
        raise TypeError(
            f"keys must be a list of keys (PEM text, or JWKs as dicts or JSON), oldest first, or a JWKS "
            f"dict; got {type(given).__name__} (one key is keys=[key])"
        )
    if not given:
        if manager.algorithm != "EdDSA":
            raise ValueError(
                f"algorithm={manager.algorithm!r} needs keys=[...] (PEM or JWK, the private key last): only "
                "EdDSA derives its key pairs from the secret"
            )
        return False
    if manager.secret:
        raise ValueError('secret and keys exclude each other: static keys need no secret (leave secret="")')
    if manager.rotation_seconds:
        raise ValueError(
            "refresh_interval rotates keys derived from the secret (EdDSA); static keys rotate by listing "
            "them, oldest first, the signing key last: leave refresh_interval=0"
        )
    loaded = [_load_key(value, (manager.algorithm,), name=f"keys[{i}]") for i, value in enumerate(given)]
    by_kid = {key.kid: key for key in loaded}
    if len(by_kid) != len(loaded):
        raise ValueError("keys holds two keys with one kid: each key needs its own")
    if any(key.sign for key in loaded) and loaded[-1].sign is None:
        raise ValueError("the last key in keys signs, and it is public: put the private key last")
    setattr_("_keys", by_kid)
    setattr_("_signing", loaded[-1] if loaded[-1].sign else None)
    setattr_("_key", b"")
    return True


def _load_key(value: KeyInput, algorithms: Sequence[str], *, name: str, kid: str | None = None) -> _Key:
    """Load PEM text or a JWK as a key of *algorithms*; a key of another type, a JWK whose ``kty``,
    ``crv``, ``alg`` or ``use`` disagrees, or RSA under 2048 bits raises ValueError naming *name*."""
    from cryptography.hazmat.primitives import serialization

    jwk: Any = None
    if isinstance(value, Mapping):
        jwk = dict(value)
    elif isinstance(value, (str, bytes)):
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        if text.lstrip().startswith("{"):
            try:
                jwk = json.loads(text)
            except (ValueError, RecursionError):
                raise ValueError(f"{name} is not a JSON JWK") from None
    else:
        raise TypeError(f"{name} must be PEM text or a JWK (dict or JSON text), got {type(value).__name__}")
    if jwk is not None:  # a dict, or JSON text that starts as an object
        key = _jwk_key(jwk, algorithms, name)
        kid = jwk.get("kid") if kid is None else kid
        if kid is not None and (not isinstance(kid, str) or not kid):
            raise ValueError(f"{name}: its kid must be a non-empty string")
    else:
        data = text.encode("utf-8")
        try:
            if b"PRIVATE KEY-----" in data:
                key = serialization.load_pem_private_key(data, password=None)
            elif b"PUBLIC KEY-----" in data:
                key = serialization.load_pem_public_key(data)
            else:
                raise ValueError("no PEM key")
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"{name} is neither a PEM private or public key (unencrypted) nor a JWK: {exc}"
            ) from None
    return _key_of(key, algorithms, kid, name)


def _kty_fits(jwk: Mapping[str, Any], algorithm: str) -> bool:
    """Whether *jwk*'s ``kty`` (and ``crv``) are those *algorithm* signs with."""
    kty, crv = _ASYMMETRIC[algorithm]
    return jwk.get("kty") == kty and (not crv or jwk.get("crv") == crv)


def _jwk_key(jwk: dict[str, Any], algorithms: Sequence[str], name: str) -> Any:
    """The cryptography key of *jwk*, which must fit every algorithm of *algorithms*."""
    for algorithm in algorithms:
        kty, crv = _ASYMMETRIC[algorithm]
        if not _kty_fits(jwk, algorithm):
            raise ValueError(
                f"{name} is a JWK with kty={jwk.get('kty')!r} crv={jwk.get('crv')!r}; {algorithm} needs "
                f"kty={kty!r}" + (f" crv={crv!r}" if crv else "")
            )
        if jwk.get("alg", algorithm) != algorithm:
            raise ValueError(f"{name} is a JWK for alg={jwk.get('alg')!r}, not {algorithm}")
    if jwk.get("use", "sig") != "sig":
        raise ValueError(f"{name} is a JWK for use={jwk.get('use')!r}, not signatures")
    try:
        return jwt.PyJWK(jwk, algorithms[0]).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{name} is not a valid {algorithms[0]} JWK: {exc}") from None


def _key_of(key: Any, algorithms: Sequence[str], kid: str | None, name: str) -> _Key:
    """Check that *key* (a cryptography key) fits *algorithms* and build its verifiers and signer."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    private = isinstance(key, (ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey))
    public = key.public_key() if private else key
    for algorithm in algorithms:
        kind = _ASYMMETRIC[algorithm][0]
        if kind == "OKP":
            fits = isinstance(public, ed25519.Ed25519PublicKey)
        elif kind == "EC":
            fits = isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
        else:
            fits = isinstance(public, rsa.RSAPublicKey)
            if fits and public.key_size < _MIN_RSA_BITS:
                raise ValueError(
                    f"{name} is a {public.key_size}-bit RSA key: {algorithm} needs {_MIN_RSA_BITS} bits or "
                    "more (RFC 7518 section 3.3)"
                )
            if fits and (public.key_size > _MAX_RSA_BITS or public.public_numbers().e > _MAX_RSA_EXPONENT):
                raise ValueError(
                    f"{name} is an RSA key of {public.key_size} bits, exponent {public.public_numbers().e}: "
                    f"jwtplus takes at most {_MAX_RSA_BITS} bits and an exponent up to 2**32, so that no key "
                    "makes each verification a denial of service"
                )
        if not fits:
            raise ValueError(
                f"{name} is a {type(public).__name__.replace('_', '')}; {algorithm} needs "
                + {"OKP": "an Ed25519 key", "EC": "an EC P-256 key", "RSA": "an RSA key"}[kind]
            )
    jwk = _public_jwk(public)
    thumbprint = _b64encode(
        hashlib.sha256(json.dumps(jwk, sort_keys=True, separators=(",", ":")).encode()).digest()
    )
    kid = thumbprint if kid is None else kid
    published = {**jwk, "kid": kid, "use": "sig"}
    if len(algorithms) == 1:
        published["alg"] = algorithms[0]
    verifiers = {algorithm: _verifier(public, algorithm) for algorithm in algorithms}
    sign = _signer(key, algorithms[0]) if private and len(algorithms) == 1 else None
    return _Key(kid, verifiers, published, sign)


def _public_jwk(public: Any) -> dict[str, str]:
    """The members of *public*'s JWK that RFC 7638 hashes into its thumbprint."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    def b64int(n: int, size: int = 0) -> str:
        return _b64encode(n.to_bytes(size or max(1, (n.bit_length() + 7) // 8), "big"))

    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"crv": "Ed25519", "kty": "OKP", "x": _b64encode(raw)}
    numbers = public.public_numbers()
    if isinstance(public, ec.EllipticCurvePublicKey):
        return {"crv": "P-256", "kty": "EC", "x": b64int(numbers.x, 32), "y": b64int(numbers.y, 32)}
    return {"e": b64int(numbers.e), "kty": "RSA", "n": b64int(numbers.n)}


def _verifier(public: Any, algorithm: str) -> Callable[[bytes, bytes], bool]:
    """``verify(signature, message)`` for *algorithm* under *public*; only the signature's one
    encoding passes (raw R‖S of 64 bytes for ES256, never DER)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

    size = {"EdDSA": 64, "ES256": 64}.get(algorithm) or (public.key_size + 7) // 8
    check: Callable[[bytes, bytes], None]
    if algorithm == "EdDSA":
        check = public.verify
    elif algorithm == "ES256":
        ecdsa = ec.ECDSA(hashes.SHA256())

        def check(signature: bytes, message: bytes) -> None:
            r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            public.verify(utils.encode_dss_signature(r, s), message, ecdsa)

    else:
        pad = (
            padding.PKCS1v15()
            if algorithm == "RS256"
            else padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        )
        sha256 = hashes.SHA256()

        def check(signature: bytes, message: bytes) -> None:
            public.verify(signature, message, pad, sha256)

    def verify(signature: bytes, message: bytes) -> bool:
        if len(signature) != size:
            return False
        try:
            check(signature, message)
        except InvalidSignature:
            return False
        return True

    return verify


def _signer(private: Any, algorithm: str) -> Callable[[bytes], bytes]:
    """``sign(message)`` for *algorithm* with *private*, in the JWS encoding (raw R‖S for ES256)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

    if algorithm == "EdDSA":
        return cast(Callable[[bytes], bytes], private.sign)
    if algorithm == "ES256":
        ecdsa = ec.ECDSA(hashes.SHA256())

        def sign(message: bytes) -> bytes:
            r, s = utils.decode_dss_signature(private.sign(message, ecdsa))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")

        return sign
    pad = (
        padding.PKCS1v15()
        if algorithm == "RS256"
        else padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    )
    sha256 = hashes.SHA256()

    def sign_rsa(message: bytes) -> bytes:
        return cast(bytes, private.sign(message, pad, sha256))

    return sign_rsa


def _derive_ed25519(secret: bytes, period: int | None) -> _Key:
    """Rotation *period*'s Ed25519 key pair (None: the one key without rotation): its 32-byte seed is
    HMAC-SHA256(secret, "jwtplus-ed25519-v1:" + decimal period), its kid the period (or its thumbprint)."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    label = _ED25519_LABEL + (b"" if period is None else str(period).encode("ascii"))
    seed = hmac.new(secret, label, "sha256").digest()
    private = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    return _key_of(private, ("EdDSA",), None if period is None else str(period), "secret")


_derived_key = functools.lru_cache(maxsize=2 * _MAX_PUBLISHED_KEYS)(_derive_ed25519)


# ---- Encode / decode ----


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """Read a time claim strictly: a JSON number of seconds between 0 and the year 9999."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= _MAX_NUMERIC_DATE:
        raise jwt.DecodeError(f"the {name} claim must be a number of seconds before the year 9999")
    return float(value)


class _ClaimRules(Protocol):
    """What a token's claims are checked against: a :class:`SecretManager` or an :class:`IdentityProvider`."""

    @property
    def issuer(self) -> str | None: ...

    @property
    def leeway_seconds(self) -> float: ...

    @property
    def _audiences(self) -> frozenset[str]: ...


def _check_claims(manager: _ClaimRules, claims: Mapping[str, Any], now: float) -> None:
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


def encode_token(
    manager: SecretManager,
    payload: Mapping[str, Any],
    *,
    now: float | None = None,
    expires_in: Duration | None = None,
) -> str:
    """Sign *payload* into a compact JWT.

    Adds ``iat``, ``exp`` (*now* + *expires_in*, by default the manager's
    exptime), a random ``jti``, and ``iss``/``aud`` when configured; the
    payload's own items win (a ``datetime`` time claim becomes seconds), but an
    ``exp`` and *expires_in* together raise ValueError. With rotation on, the
    token is signed with its period's key and names the period in ``kid``.
    """
    if not isinstance(payload, Mapping):
        raise TypeError(f"payload must be a mapping of claims, got {type(payload).__name__}")
    now = time.time() if now is None else now
    iat = int(now)
    lifetime = manager.exptime_seconds
    if expires_in is not None:
        if "exp" in payload:
            raise ValueError("pass expires_in= or an exp claim, not both: they say the same thing")
        lifetime = parse_duration(expires_in, name="expires_in")
        if lifetime < 1:  # iat is whole seconds: less would be born expired
            raise ValueError(f"expires_in={expires_in!r} must be at least 1 second: use {_DURATION_FORMS}")
    claims: dict[str, Any] = {
        "iat": iat,
        "exp": iat + lifetime,
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
    for name in ("iss", "sub", "jti"):
        if name in claims and not isinstance(claims[name], str):
            raise ValueError(
                f"payload[{name!r}]={claims[name]!r} must be a string (RFC 7519 section 4.1): "
                "jwtplus, like every JWT library, refuses tokens where it is not"
            )
    aud = claims.get("aud")
    if (
        aud is not None
        and not isinstance(aud, str)
        and not (isinstance(aud, list) and all(isinstance(a, str) for a in aud))
    ):
        raise ValueError(f"payload['aud']={aud!r} must be a string or a list of strings (RFC 7519 4.1.3)")
    payload_segment = _b64encode(json.dumps(claims, separators=(",", ":")).encode())
    period = period_of(now, manager.rotation_seconds) if manager.rotation_seconds else None
    if manager._keys is None:
        key = manager._key if period is None else key_for_period(manager, period)
        signing_input = _header_segment(manager.algorithm, None if period is None else str(period))
        signing_input += "." + payload_segment
        signature = _mac(key, signing_input.encode("ascii"), manager.algorithm)
        return signing_input + "." + _b64encode(signature)
    signer = manager._signing if period is None else _derived_key(manager._key, period)
    if signer is None or signer.sign is None:
        raise ValueError("this manager holds public keys only: it verifies tokens but cannot sign them")
    signing_input = _header_segment(manager.algorithm, signer.kid) + "." + payload_segment
    return signing_input + "." + _b64encode(signer.sign(signing_input.encode("ascii")))


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


def _parsed(token: str | bytes) -> tuple[str, str, bytes, dict[str, Any]]:
    """Check a token's size and form (the signature in its one canonical spelling, so a token has one
    spelling: the signature covers the rest) and split it: header and payload segments, signature bytes,
    and the parsed header, which may name no critical extension."""
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
    if "crit" in header:  # RFC 7515 section 4.1.11: we understand no extension, so none may be critical
        raise jwt.InvalidTokenError("the token names critical header extensions")
    return header_b64, payload_b64, signature, header


def _verify(manager: SecretManager, token: str | bytes, now: float) -> tuple[dict[str, Any], float]:
    """:func:`decode_token`'s work at *now*: the claims, and the first instant the token is no longer
    valid (its ``exp``, or its rotation window's end, plus the leeway), for the cache."""
    header_b64, payload_b64, signature, header = _parsed(token)
    if header.get("alg") != manager.algorithm:
        raise jwt.InvalidAlgorithmError("The specified alg value is not allowed")
    period, window, window_end = None, 0, math.inf
    if manager.rotation_seconds:  # exactly one key may verify: its period's, named by kid
        period = _period_of_kid(header)
        window = _window(manager, period, now)
        window_end = (
            (period + 1) * manager.rotation_seconds + manager.exptime_seconds + manager.leeway_seconds
        )
    message = f"{header_b64}.{payload_b64}".encode("ascii")
    if manager._keys is None:
        if window == 0:
            key = manager._key if period is None else key_for_period(manager, period)
            expected = _mac(key, message, manager.algorithm)
        else:  # its period's key, outside its window: neither it nor its HMAC is cached
            key = _uncached_key(manager, cast(int, period))
            expected = hmac.new(key, message, _HASHES[manager.algorithm]).digest()
        valid = hmac.compare_digest(signature, expected)
    else:
        valid = _own_key(manager, header, period, window).verifiers[manager.algorithm](signature, message)
    if not valid:
        raise jwt.InvalidSignatureError("Signature verification failed")
    if window < 0:
        raise KeyIdError("the token's key period has not started")
    if window > 0:
        raise jwt.ExpiredSignatureError("the token's key period has ended")
    claims = _json_object(payload_b64, "payload")
    _check_claims(manager, claims, now)
    return claims, min(claims["exp"] + manager.leeway_seconds, window_end)


def _own_key(manager: SecretManager, header: Mapping[str, Any], period: int | None, window: int) -> _Key:
    """The asymmetric key that may verify a token of *manager*: its period's, or the static key its
    ``kid`` names (KeyIdError when none does)."""
    if period is not None:
        return (_derived_key if window == 0 else _derive_ed25519)(manager._key, period)
    keys = cast("Mapping[str, _Key]", manager._keys)
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise KeyIdError("the token's kid names none of the keys")
    return key


class CacheInfo(NamedTuple):
    """How a :func:`cached_decoder` is doing, as ``functools.lru_cache`` reports it."""

    hits: int
    misses: int
    maxsize: int
    currsize: int


class TokenDecoder(Protocol):
    """``decode(token, now) -> claims``, ``cache_info()`` and ``cache_clear()``: what :func:`cached_decoder`
    returns."""

    def __call__(self, token: str, now: float, /) -> dict[str, Any]: ...

    def cache_info(self) -> CacheInfo: ...

    def cache_clear(self) -> None: ...


def cached_decoder(manager: SecretManager, *, size: int = 10_000) -> TokenDecoder:
    """Return ``decode(token, now)``: :func:`decode_token` behind a bounded LRU of verified tokens.

    Keyed by the exact token string, a hit re-checks the instant the token
    stops being valid (its ``exp``, and its rotation window) against *now*, so
    a cached token never outlives its validity; failures are never cached.
    Each call returns a fresh copy of the claims. *size* 0 disables the cache.
    ``decode.cache_info()`` says how full it is.

    >>> decode = cached_decoder(SecretManager(secret=b"k" * 32), size=2)
    >>> decode.cache_info()
    CacheInfo(hits=0, misses=0, maxsize=2, currsize=0)
    """
    return _cached(functools.partial(_verify, manager), size)


Verify: TypeAlias = Callable[[str, float], "tuple[dict[str, Any], float]"]


def _cached(verify: Verify, size: int) -> TokenDecoder:
    """:func:`cached_decoder` in front of any ``verify(token, now) -> (claims, valid_until)``; its
    ``cache_clear()`` forgets every token (when the keys that verified them are gone)."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"size={size!r} must be a whole number of tokens (0: no cache)")
    cache: OrderedDict[str, tuple[dict[str, Any], float, bool]] = OrderedDict()
    hits = misses = 0

    def decode(token: str, now: float) -> dict[str, Any]:
        nonlocal hits, misses
        hit = cache.get(token)
        if hit is not None and now < hit[1]:
            hits += 1
            cache.move_to_end(token)
            return dict(hit[0]) if hit[2] else copy.deepcopy(hit[0])
        misses += 1
        claims, deadline = verify(token, now)
        if not size:
            return claims
        flat = all(isinstance(v, (str, int, float, bool)) or v is None for v in claims.values())
        cache[token] = (claims, deadline, flat)
        cache.move_to_end(token)
        if len(cache) > size:
            cache.popitem(last=False)
        return dict(claims) if flat else copy.deepcopy(claims)

    def cache_info() -> CacheInfo:
        return CacheInfo(hits, misses, size, len(cache))

    decode.cache_info = cache_info  # type: ignore[attr-defined]
    decode.cache_clear = cache.clear  # type: ignore[attr-defined]
    return cast(TokenDecoder, decode)


# ---- Publishing keys ----


def _published_periods(manager: SecretManager, now: float) -> range:
    """The rotation periods whose keys verify at *now*, and every period a clock up to the leeway ahead
    can sign in before the current one ends (the next one at least): the JWKS publishes them, so a
    copy cached until the period's end holds every key the manager accepts meanwhile."""
    interval, leeway = manager.rotation_seconds, manager.leeway_seconds
    current = period_of(now, interval)
    first = period_of(now - manager.exptime_seconds - leeway, interval)  # the oldest still in its window
    last = max(current + 1, period_of((current + 1) * interval + leeway, interval))
    return range(first, last + 1)


def public_jwks(manager: SecretManager, *, now: float | None = None) -> dict[str, Any]:
    """The JWK Set (RFC 7517) other services verify *manager*'s tokens with, at *now*.

    With derived EdDSA keys: the key of every rotation period that can still
    verify a token, plus the next period's, ahead of time. With static keys:
    every key. Public members only, each with ``kid``, ``alg`` and ``use``.
    """
    keys = manager._keys
    if keys is None:
        raise ValueError(
            'an HMAC manager has no public keys to publish: use algorithm="EdDSA" (keys derived from the '
            'secret) or static keys with "ES256", "RS256" or "PS256"'
        )
    if keys:
        return {"keys": [dict(key.jwk) for key in keys.values()]}
    now = time.time() if now is None else now
    secret = manager._key
    return {"keys": [dict(_derived_key(secret, p).jwk) for p in _published_periods(manager, now)]}


_STATIC_MAX_AGE = 300


def jwks_handler(manager: SecretManager, *, clock: Callable[[], float] = time.time) -> Handler:
    """Return the aiohttp handler that publishes :func:`public_jwks`, for ``/.well-known/jwks.json``.

    ``Cache-Control: public, max-age`` ends no later than the current rotation
    period (5 minutes for static keys), so a cache always holds the key of the
    next period before its first token; an ``ETag`` answers ``If-None-Match``
    with 304. The route is public: the middlewares let every request through.
    """
    public_jwks(manager, now=clock())  # refuse an HMAC manager now, not on the first request
    interval = manager.rotation_seconds if not manager._keys else 0
    last: list[Any] = [None, b"", ""]  # the periods published, their body, its ETag

    async def jwks(request: web.Request) -> web.Response:
        now = clock()
        periods = _published_periods(manager, now) if interval else None
        if periods != last[0] or not last[1]:
            body = json.dumps(public_jwks(manager, now=now), separators=(",", ":")).encode()
            last[:] = [periods, body, '"' + _b64encode(hashlib.sha256(body).digest()[:18]) + '"']
        max_age = (
            _STATIC_MAX_AGE
            if not interval
            else max(0, min(interval, int((now // interval + 1) * interval - now)))
        )
        headers = {"Cache-Control": f"public, max-age={max_age}", "ETag": last[2]}
        wanted = request.headers.get("If-None-Match", "")
        if last[2] in (tag.strip() for tag in wanted.split(",")) or wanted.strip() == "*":
            return web.Response(status=304, headers=headers)
        return web.Response(body=last[1], content_type="application/jwk-set+json", headers=headers)

    return _declare(jwks, RoutePolicy(any_state=True))


# ---- Identity providers: tokens another issuer signs ----

_MAX_JWKS_BYTES = 512 * 1024
_MAX_KID_LENGTH = 256
_DEFAULT_MAX_AGE = 300
_MAX_MAX_AGE = 86400
_AT_JWT = frozenset({"at+jwt", "application/at+jwt"})
_LOOPBACK = frozenset({"127.0.0.1", "::1", "[::1]", "localhost"})


def _loopback(url: str) -> bool:
    """Whether *url* names this machine: only there may a test's identity provider speak plain http."""
    return urlsplit(url).hostname in _LOOPBACK


def _https_url(value: Any, name: str, *, loopback: bool = True) -> str:
    """*value* as an absolute https URL (http on a loopback host, for tests, where *loopback* allows
    it: a discovery document of an https issuer may not send us to one), or ValueError."""
    if not isinstance(value, str):
        raise TypeError(f"{name}={value!r} must be a URL string")
    parts = urlsplit(value)
    if (
        not parts.hostname
        or parts.scheme not in ("https", "http")
        or (parts.scheme == "http" and not (loopback and parts.hostname in _LOOPBACK))
    ):
        raise ValueError(f"{name}={value!r} must be an https:// URL (http:// only on 127.0.0.1 or localhost)")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class IdentityProvider:
    """An issuer whose access tokens this app accepts: Keycloak, Auth0, Okta, Cognito, Entra, any OpenID
    provider. Pass it as ``issuers=`` to a middleware factory; the app then only verifies.

    Its public keys come from *jwks_uri*, or from the ``jwks_uri`` of the issuer's
    discovery document (``<issuer>/.well-known/openid-configuration``), fetched
    with aiohttp's client, never blocking the loop. Keys are cached by ``kid``
    for as long as ``Cache-Control`` says (5 minutes without one, a day at most);
    a token naming an unknown ``kid`` fetches them again, at most once per
    *cooldown*, and concurrent requests share one fetch. ``iss`` and ``aud`` are
    required; RFC 9068 ``at+jwt`` tokens are accepted (*require_at_jwt*: only those).
    """

    issuer: str
    """The exact ``iss`` of its tokens (https; http only on a loopback host)."""
    audience: str | Sequence[str]
    """This API's identifier: a token's ``aud`` must hold one of these."""
    jwks_uri: str | None = None
    """Where its JWK Set lives (None: from OpenID discovery)."""
    algorithms: Sequence[str] = ("RS256",)
    """What it signs with: any of EdDSA, ES256, RS256, PS256; a key verifies only those its type fits."""
    leeway: Duration = "5s"
    """Clock skew tolerated between it and this server."""
    cooldown: Duration = "30s"
    """The least time between two fetches prompted by unknown ``kid`` values."""
    timeout: Duration = 5
    """The limit on each fetch of the keys (discovery, connections and the key set together)."""
    max_keys: int = 32
    """The most keys kept from one JWK Set."""
    require_at_jwt: bool = False
    """Accept only RFC 9068 access tokens (header ``typ`` ``at+jwt``)."""
    leeway_seconds: float = field(init=False)
    cooldown_seconds: float = field(init=False)
    timeout_seconds: float = field(init=False)
    _audiences: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        setattr_ = functools.partial(object.__setattr__, self)
        _https_url(self.issuer, "issuer")
        if self.jwks_uri is not None:
            _https_url(self.jwks_uri, "jwks_uri")
        if self.audience is None:
            raise ValueError("audience is required: the identifier of this API in the provider's tokens")
        setattr_("_audiences", _audience_set(self.audience))
        algorithms = (self.algorithms,) if isinstance(self.algorithms, str) else tuple(self.algorithms)
        if not algorithms or not all(a in _ASYMMETRIC for a in algorithms):
            raise ValueError(
                f"algorithms={self.algorithms!r} must name one or more of {', '.join(_ASYMMETRIC)}: a "
                "provider's keys are public, so HMAC (HS256) and none are never accepted"
            )
        setattr_("algorithms", algorithms)
        _require_crypto()
        leeway = parse_duration(self.leeway, name="leeway")
        if leeway >= _MAX_LEEWAY:
            raise ValueError(f"leeway={self.leeway!r} must be shorter than {_MAX_LEEWAY} seconds")
        setattr_("leeway_seconds", leeway)
        cooldown = parse_duration(self.cooldown, name="cooldown")
        if not 1 <= cooldown <= _MAX_MAX_AGE:
            raise ValueError(f"cooldown={self.cooldown!r} must be between 1 second and 1 day")
        setattr_("cooldown_seconds", cooldown)
        timeout = parse_duration(self.timeout, name="timeout")
        if not 0 < timeout <= 30:
            raise ValueError(f"timeout={self.timeout!r} must be more than 0 and at most 30 seconds")
        setattr_("timeout_seconds", timeout)
        if (
            not isinstance(self.max_keys, int)
            or isinstance(self.max_keys, bool)
            or not 1 <= self.max_keys <= 1000
        ):
            raise ValueError(f"max_keys={self.max_keys!r} must be a whole number from 1 to 1000")


class _KeysMissing(jwt.InvalidTokenError):
    """The token names a ``kid`` not yet fetched: the pipeline awaits :attr:`fetch`, then verifies again."""

    def __init__(self, fetch: Callable[[], Awaitable[None]]) -> None:
        super().__init__("the token's kid is not among the keys fetched so far")
        self.fetch = fetch


class _KeysUnavailable(jwt.InvalidTokenError):
    """The issuer's keys could not be fetched: the request gets 503, as with a store that is down."""


def _max_age(cache_control: str | None) -> float:
    """How long a response may be cached, from its ``Cache-Control`` (RFC 9111), bounded to a day."""
    if cache_control is None:
        return _DEFAULT_MAX_AGE
    directives = [part.strip().lower() for part in cache_control.split(",")]
    if "no-store" in directives or "no-cache" in directives:
        return 0
    for directive in directives:
        name, _, value = directive.partition("=")
        seconds = value.strip().strip('"')
        if name.strip() == "max-age" and re.fullmatch("[0-9]{1,10}", seconds):
            return min(int(seconds), _MAX_MAX_AGE)
    return _DEFAULT_MAX_AGE


async def _get_json(http: aiohttp.ClientSession, url: str) -> tuple[Any, float]:
    """GET *url* (no redirects, at most 512 KiB): its JSON body, and how long it may be cached."""
    async with http.get(url, headers={"Accept": "application/json"}, allow_redirects=False) as response:
        if response.status != 200:
            raise ValueError(f"GET {url} answered {response.status}")
        body = bytearray()
        async for chunk in response.content.iter_chunked(64 * 1024):  # as it arrives (and is inflated)
            body += chunk
            if len(body) > _MAX_JWKS_BYTES:
                raise ValueError(f"GET {url} answered more than {_MAX_JWKS_BYTES} bytes")
        return json.loads(body), _max_age(response.headers.get("Cache-Control"))


def _jwks_keys(document: Any, provider: IdentityProvider) -> dict[str, _Key]:
    """The usable keys of a fetched JWK Set: signing keys with a ``kid``, of a type one of the provider's
    algorithms fits (and its ``alg``, when the JWK names one). Others are skipped, never trusted."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("the JWK Set has no keys list")
    found: dict[str, _Key] = {}
    kids = Counter(jwk.get("kid") for jwk in document["keys"] if isinstance(jwk, dict))
    twice = {kid for kid, count in kids.items() if count > 1 and isinstance(kid, str)}
    for kid in twice:
        _log.warning("jwtplus: %s publishes two keys with kid %r: neither is used", provider.issuer, kid)
    for jwk in document["keys"]:
        if len(found) == provider.max_keys:
            _log.warning(
                "jwtplus: %s publishes more than %d keys; the rest are ignored", provider.issuer, len(found)
            )
            break
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str) or not jwk["kid"]:
            continue
        algorithms = [a for a in provider.algorithms if jwk.get("alg", a) == a and _kty_fits(jwk, a)]
        if not algorithms or jwk.get("use", "sig") != "sig" or len(jwk["kid"]) > _MAX_KID_LENGTH:
            continue
        if jwk["kid"] in twice:
            continue
        if _PRIVATE_MEMBERS & jwk.keys():
            _log.warning(
                "jwtplus: %s publishes the private key %r: it is not used (anyone can sign with it)",
                provider.issuer,
                jwk["kid"],
            )
            continue
        try:
            found[jwk["kid"]] = _load_key(jwk, algorithms, name=f"{provider.issuer} key {jwk['kid']!r}")
        except (ValueError, TypeError) as exc:
            _log.warning("jwtplus: %s", exc)
    return found


KeyLookup: TypeAlias = Callable[[str, float], "tuple[_Key, float]"]


def _remote_keys(
    provider: IdentityProvider, forget: Callable[[], None], clock: Callable[[], float]
) -> KeyLookup:
    """Return ``lookup(kid, now)``: the provider's key named *kid*, from a cache filled by fetches, and
    the instant the key set stops being fresh (the verified-token cache trusts it no longer).

    An unknown kid raises :class:`_KeysMissing` so that the caller awaits one
    fetch (shared by every request that waits meanwhile), at most once per
    cooldown; within it, KeyIdError when the last fetch worked, :class:`_KeysUnavailable`
    when it failed. A stale cache is refreshed in the background while its keys go on verifying.
    *forget* runs when a fetch drops or replaces keys, to forget the tokens they verified. Times
    (cooldown, freshness) are the middleware's *clock*, as *now* is.
    """
    keys: dict[str, _Key] = {}
    jwks_uri = provider.jwks_uri
    fresh_until = fetched_at = -math.inf
    fetched = False
    running: asyncio.Task[None] | None = None
    background: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=provider.timeout_seconds)

    async def get_keys() -> tuple[Any, float]:
        nonlocal jwks_uri
        async with aiohttp.ClientSession(timeout=timeout) as http:
            if jwks_uri is None:
                discovery = provider.issuer.rstrip("/") + "/.well-known/openid-configuration"
                document, _ = await _get_json(http, discovery)
                if not isinstance(document, dict) or document.get("issuer") != provider.issuer:
                    raise ValueError(f"{discovery} names another issuer")  # OpenID Discovery 4.3
                jwks_uri = _https_url(
                    document.get("jwks_uri"), "its jwks_uri", loopback=_loopback(provider.issuer)
                )
            return await _get_json(http, jwks_uri)

    async def download() -> None:
        nonlocal keys, jwks_uri, fresh_until, fetched_at, fetched, running
        try:
            document, max_age = await asyncio.wait_for(get_keys(), provider.timeout_seconds)
            found = _jwks_keys(document, provider)
        except Exception as exc:  # unreachable, slow, not JSON, not a JWK Set: keep the keys we have
            fetched = False
            jwks_uri = provider.jwks_uri  # discover again next time: the provider may have moved it
            _log.warning(
                "jwtplus: fetching the keys of %s failed: %s", provider.issuer, str(exc) or type(exc).__name__
            )
        else:
            if any(kid not in found or found[kid].jwk != key.jwk for kid, key in keys.items()):
                forget()  # a key gone or replaced: the tokens it verified are not trusted any more
            keys, fetched = found, True
            fresh_until = clock() + max_age
        finally:
            fetched_at, running = clock(), None

    def busy() -> bool:
        """Whether a fetch runs now, on this loop (a task of a loop that closed is none)."""
        return running is not None and not running.done() and running.get_loop() is asyncio.get_running_loop()

    async def fetch() -> None:
        nonlocal running
        if not busy():
            running = asyncio.get_running_loop().create_task(download())
        await asyncio.shield(cast("asyncio.Task[None]", running))

    # a request's now may precede the end of the fetch it waited for, by as long as a fetch takes; a
    # clock set back further than that ends the cooldown and the freshness
    slack = provider.timeout_seconds + 1

    def cooling(now: float) -> bool:
        """Whether the last fetch ended less than a cooldown ago."""
        return fetched_at - slack <= now < fetched_at + provider.cooldown_seconds

    def lookup(kid: str, now: float) -> tuple[_Key, float]:
        key = keys.get(kid)
        if key is not None:
            stale = not fetched_at - slack <= now < fresh_until
            if stale and not busy() and not cooling(now):
                task = asyncio.get_running_loop().create_task(fetch())
                background.add(task)
                task.add_done_callback(background.discard)
            return key, fresh_until
        if not busy() and cooling(now):
            if fetched:
                raise KeyIdError("the token's kid names none of the issuer's keys")
            raise _KeysUnavailable("the issuer's keys could not be fetched")
        raise _KeysMissing(fetch)

    return lookup


def _provider_verifier(
    providers: tuple[IdentityProvider, ...], forget: Callable[[], None], clock: Callable[[], float]
) -> Verify:
    """``verify(token, now)`` for tokens of *providers*: the one its ``iss`` names, with that
    provider's keys and algorithms, then the claims."""
    by_issuer = {p.issuer: (p, _remote_keys(p, forget, clock)) for p in providers}

    def verify(token: str, now: float) -> tuple[dict[str, Any], float]:
        header_b64, payload_b64, signature, header = _parsed(token)
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in _AT_JWT | {"jwt"}):
            raise jwt.InvalidTokenError("the token's typ is not JWT or at+jwt")
        claims = _json_object(payload_b64, "payload")
        issuer = claims.get("iss")
        found = by_issuer.get(issuer) if isinstance(issuer, str) else None
        if found is None:
            raise jwt.InvalidIssuerError("Invalid issuer")
        provider, lookup = found
        if provider.require_at_jwt and (not isinstance(typ, str) or typ.lower() not in _AT_JWT):
            raise jwt.InvalidTokenError("the token is not an RFC 9068 access token (typ at+jwt)")
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in provider.algorithms:
            raise jwt.InvalidAlgorithmError("The specified alg value is not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not 0 < len(kid) <= _MAX_KID_LENGTH:
            raise KeyIdError("the token's kid is missing or malformed")
        key, fresh_until = lookup(kid, now)
        check = key.verifiers.get(algorithm)
        if check is None:
            raise jwt.InvalidAlgorithmError("the token's key does not sign with its alg")
        if not check(signature, f"{header_b64}.{payload_b64}".encode("ascii")):
            raise jwt.InvalidSignatureError("Signature verification failed")
        _check_claims(provider, claims, now)
        # remembered until the key set is stale: then the key is looked up again, which refreshes the set
        return claims, min(claims["exp"] + provider.leeway_seconds, fresh_until)

    return verify


def _provider_decoder(
    providers: tuple[IdentityProvider, ...], size: int, clock: Callable[[], float]
) -> TokenDecoder:
    """A :func:`cached_decoder` for tokens of *providers*, forgetting them when their keys go."""
    forgets: list[Callable[[], None]] = []
    decode = _cached(_provider_verifier(providers, lambda: forgets[0](), clock), size)
    forgets.append(decode.cache_clear)
    return decode


# ---- Request keys ----

AUTH_STATUS = web.RequestKey[AuthStatus]("auth_status")
"""The request's :data:`AuthStatus`: "pass", "missing", "invalid", "expired", "rejected", ..."""
AUTH_CARRY = web.RequestKey[Any]("auth_carry")
"""What the identifier returned for the request's token (None unless the status is "pass")."""
AUTH_CLAIMS = web.RequestKey["dict[str, Any] | None"]("auth_claims")
"""The verified claims of the request's token when its status is "pass" (else None)."""
TOKEN_SOURCE = web.RequestKey[str]("token_source")
"""Where the request's token came from: "header", "cookie", "query" or "body" (set by the built-in
getters)."""
_ENFORCED = web.RequestKey["RoutePolicy"]("jwtplus_enforced")
"""Set by the middleware once it has enforced the route's policy: a guard without it fails loudly."""


def _not_installed() -> RuntimeError:
    return RuntimeError(
        "jwtplus middleware is not installed: add jwtplus.jwt_middleware(...) to the app's middlewares, "
        "or JWTHelper.pre_jwt_identifier() before post_jwt_router(), or call jwtplus.setup(app, helper)"
    )


_TWICE = (
    "jwtplus: two jwtplus authentication middlewares judged one request (setup() or the middlewares on an "
    "app and on its sub-application?): the request is refused; install jwtplus once, on the outermost app"
)
_UNROUTED = (
    "jwtplus: JWTHelper.pre_jwt_identifier() runs without post_jwt_router() after it, so its whitelist and "
    "protected_apis would not apply: every request is refused; add helper.post_jwt_router() after it in the "
    "app's middlewares, or call jwtplus.setup(app, helper) instead of both"
)


def _misconfigured(message: str) -> web.Response:
    """The answer of a wiring that would let requests through unjudged: 500, and the reason in the log."""
    _log.error(message)
    return web.json_response({"error": "server misconfigured"}, status=500)


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


def get_auth_claims(request: web.Request) -> dict[str, Any] | None:
    """Return the verified claims of the request's token (None unless it passed): flask-jwt-extended's
    ``get_jwt()``."""
    if AUTH_STATUS not in request:
        raise _not_installed()
    return request[AUTH_CLAIMS]


def get_auth_identity(request: web.Request) -> str | None:
    """Return who the request's token names, its ``sub`` or else its ``username`` (None unless it
    passed): flask-jwt-extended's ``get_jwt_identity()``."""
    return _identity(get_auth_claims(request))


# ---- Token getters ----

_NOT_AMBIENT = frozenset({"header", "query", "body"})
"""Token sources a browser never attaches by itself: only these skip the CSRF check."""


async def _maybe_await(value: Any) -> Any:
    """Let getters, checks and identifiers be plain functions or coroutines."""
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
        request._state[TOKEN_SOURCE] = "header"  # request[...] = ..., minus a Python call
        return parts[1]

    get_token.__qualname__ = get_token.__name__ = f"header_token_getter({scheme!r})"
    return get_token


basic_token_getter = header_token_getter("Bearer")
"""The seed's getter: ``Authorization: Bearer <token>``; the middlewares make it follow the manager's
scheme."""


def cookie_token_getter(name: str = "__Host-access_token") -> TokenGetter:
    """Return a getter reading the token from cookie *name* (see :class:`CookiePolicy`).

    A browser attaches cookies by itself, so unsafe requests authenticated
    this way must pass the CSRF check.
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


def body_token_getter(name: str = "refresh_token") -> TokenGetter:
    """Return a getter reading the string *name* of a JSON object body (``application/json`` only).

    For clients without cookies (a mobile app, a CLI) sending their refresh
    token; a cross-site form cannot send JSON, so this needs no CSRF check.
    The body stays readable by the handler.
    """

    async def get_token(request: web.Request) -> str | None:
        if request.content_type != "application/json" or not request.body_exists:
            return None
        try:
            body = await request.json()
        except Exception:  # bad JSON, charset or nesting, or too large: no token, never a 500
            return None
        value = body.get(name) if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            return None
        request[TOKEN_SOURCE] = "body"
        return value

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


# ---- The authentication pipeline ----


def basic_identifier(payload: dict[str, Any]) -> dict[str, Any] | None:
    """The seed's identifier: accept a payload with a non-empty ``username`` string, carry it whole."""
    username = payload.get("username")
    return payload if isinstance(username, str) and username else None


def subject_identifier(payload: dict[str, Any]) -> dict[str, Any] | None:
    """Accept a payload with a non-empty ``sub`` string (what identity providers and :class:`Sessions`
    issue), carry it whole: the default identifier with ``issuers=``."""
    subject = payload.get("sub")
    return payload if isinstance(subject, str) and subject else None


def user_identifier(payload: dict[str, Any]) -> dict[str, Any] | None:
    """Accept a payload that names its user, by a non-empty ``sub`` (RFC 7519, what :class:`Sessions`
    issue) or ``username`` string (the seed's), and carry it whole: the functional API's default."""
    return payload if _identity(payload) is not None else None


def _identity(claims: Mapping[str, Any] | None) -> str | None:
    """Who *claims* name: their ``sub``, else their ``username`` (non-empty strings), else None."""
    if claims is None:
        return None
    for name in ("sub", "username"):
        value = claims.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def _claims_themselves(payload: dict[str, Any]) -> dict[str, Any]:
    """The identifier of the session helpers: they want the claims."""
    return payload


class AuthResult(NamedTuple):
    """What the pipeline made of a request: its status, the identifier's result, the verified claims."""

    status: AuthStatus
    carry: Any = None
    claims: dict[str, Any] | None = None


_RESULTS: dict[str, AuthResult] = {
    status: AuthResult(status)
    for status in ("missing", "invalid", "expired", "rejected", "malformed", "unavailable")
}
_MISSING, _INVALID, _EXPIRED = _RESULTS["missing"], _RESULTS["invalid"], _RESULTS["expired"]
_REJECTED, _MALFORMED, _UNAVAILABLE = _RESULTS["rejected"], _RESULTS["malformed"], _RESULTS["unavailable"]
_CHECK_VERDICTS = frozenset({"invalid", "expired", "rejected", "unavailable"})
_TOKEN_TYPES = ("access", "refresh")

Authenticator: TypeAlias = Callable[[web.Request, float], Awaitable[AuthResult]]

REFUSAL_REASONS = (
    "missing",
    "malformed",
    "invalid",
    "expired",
    "revoked",
    "csrf",
    "unidentified",
    "rejected",
    "needs_fresh",
    "forbidden",
    "unavailable",
)
"""Why a request was refused (:attr:`Refusal.reason`): no token; two different tokens; a bad token
(signature, format, claims, the wrong type); an expired one; a revoked one; a failed CSRF check; a
token the identifier did not accept (no such user); a check of yours that said "rejected"; a guard
that wants a fresh login; a guard's predicate that did not hold; a store or key source that cannot
be reached."""
_REASON = web.RequestKey["tuple[str, str]"]("jwtplus_reason")
"""Why the pipeline or a guard refused the request, and a detail for the log: never shown to clients."""


_CHECK_DETAIL = web.RequestKey[str]("jwtplus_check_detail")
"""What a check that refused may add for the log (say, why a form could not be read)."""


def _failed(state: Any, result: AuthResult, reason: str, detail: str) -> AuthResult:
    """Note on the request (its ``_state``) why the pipeline gave *result*, and return it."""
    state[_REASON] = (reason, detail)
    return result


def _name(function: Any) -> str:
    """A function's name for the log, never its arguments."""
    return str(getattr(function, "__name__", None) or type(function).__name__)


def _authenticator(
    verify: Callable[[str, float], dict[str, Any]],
    token_getter: TokenGetter,
    identifier: Identifier,
    token_type: str,
    checks: tuple[Check, ...],
) -> Authenticator:
    """The pipeline, bound once: getter, decode (*verify*), token type, checks, identifier. Never raises.

    Every way jwtplus judges a token (the middlewares, :func:`refresh_session`,
    :func:`end_session`, :func:`authenticated_messages`) runs this one function.
    """

    async def judge(request: web.Request, now: float) -> AuthResult:
        state = request._state
        try:
            token = token_getter(request)
            if token is not None and not isinstance(token, str):
                token = await _maybe_await(token)
        except AmbiguousTokenError:
            return _failed(state, _MALFORMED, "malformed", "two different tokens")
        except Exception:
            _log.warning("jwtplus: the token getter raised; request treated as invalid", exc_info=True)
            return _failed(state, _INVALID, "invalid", "the token getter raised")
        if token is None or token == "":
            return _failed(state, _MISSING, "missing", "no token")
        try:
            try:
                payload = verify(token, now)
            except _KeysMissing as missing:  # an identity provider's keys are being fetched: wait, once
                await missing.fetch()
                payload = verify(token, now)
        except jwt.ExpiredSignatureError:
            return _failed(state, _EXPIRED, "expired", "exp is past")
        except _KeysUnavailable:
            return _failed(state, _UNAVAILABLE, "unavailable", "the issuer's keys cannot be fetched")
        except jwt.InvalidTokenError as exc:
            return _failed(state, _INVALID, "invalid", type(exc).__name__)
        except Exception:  # a bug, here or in PyJWT: refuse, and say so where it is seen
            _log.warning("jwtplus: verifying a token raised; request treated as invalid", exc_info=True)
            return _failed(state, _INVALID, "invalid", "verifying raised")
        if payload.get("type", "access") != token_type:  # a refresh token is never an access token
            return _failed(state, _INVALID, "invalid", f"not an {token_type} token")
        for check in checks:
            try:
                verdict = check(request, payload, now)
                if verdict is not None and not isinstance(verdict, str) and inspect.isawaitable(verdict):
                    verdict = await verdict
            except Exception:
                _log.warning("jwtplus: a check raised; request rejected", exc_info=True)
                return _failed(state, _REJECTED, "rejected", f"{_name(check)} raised")
            if verdict is not None:
                if isinstance(verdict, str) and verdict in _CHECK_VERDICTS:
                    own = (
                        getattr(check, "jwtplus_reason", None) if verdict in ("invalid", "rejected") else None
                    )
                    detail = state.pop(_CHECK_DETAIL, None) or _name(check)
                    return _failed(state, _RESULTS[verdict], own or verdict, detail)
                _log.warning(
                    "jwtplus: a check returned a %s, not None or a status; request rejected",
                    type(verdict).__name__,
                )
                return _failed(state, _REJECTED, "rejected", f"{_name(check)} returned no status")
        try:
            carry = identifier(payload)
            if hasattr(carry, "__await__"):  # a coroutine function's, or any awaitable
                carry = await carry
            if not carry:
                return _failed(state, _REJECTED, "unidentified", f"{_name(identifier)} said no")
        except Exception:
            _log.warning("jwtplus: the identifier raised; request rejected", exc_info=True)
            return _failed(state, _REJECTED, "unidentified", f"{_name(identifier)} raised")
        return tuple.__new__(AuthResult, ("pass", carry, payload))  # AuthResult(...), minus its __new__

    return judge


def _validated_checks(checks: Iterable[Check], *, name: str = "checks") -> tuple[Check, ...]:
    """*checks* as a tuple of callables, or a TypeError naming the parameter."""
    if callable(checks) or isinstance(checks, (str, bytes)):
        raise TypeError(
            f"{name} must be a tuple or list of checks, got {checks!r} "
            "(a one-check tuple needs a trailing comma: (check,))"
        )
    checks = tuple(checks)
    for check in checks:
        if not callable(check):
            raise TypeError(f"{name} holds {check!r}: each check is a function (request, claims, now)")
    return checks


def _csrf_policy(checks: tuple[Check, ...]) -> CookiePolicy | None:
    """The policy of the first CSRF check among *checks*, or None when there is none."""
    for check in checks:
        policy = getattr(check, "csrf_policy", None)
        if isinstance(policy, CookiePolicy):
            return policy
    return None


def _checks(checks: Iterable[Check]) -> tuple[Check, ...]:
    """Validate *checks*, putting the default CSRF check first unless one of them is a CSRF check:
    no list of checks can turn CSRF protection off by leaving it out."""
    checks = _validated_checks(checks)
    return checks if _csrf_policy(checks) else (csrf_check(), *checks)


def _token_type(value: str, name: str = "token_type") -> str:
    if value not in _TOKEN_TYPES:
        raise ValueError(f'{name}={value!r} must be "access" or "refresh"')
    return value


async def authenticate(
    request: web.Request,
    manager: SecretManager,
    token_getter: TokenGetter = basic_token_getter,
    identifier: Identifier = user_identifier,
    *,
    token_type: str = "access",  # noqa: S107 (a token type, not a password)
    checks: Iterable[Check] = (),
    now: float | None = None,
) -> AuthResult:
    """Run the pipeline on *request*: find, verify, type-check, check and identify its token.

    Never raises. The status is "missing" (no token), "malformed" (two
    different tokens), "invalid" (including a token of the other type, and
    one a check calls invalid, such as a revoked one), "expired", "rejected"
    (the identifier returned a falsy value or raised, or a check said so, such
    as CSRF), "unavailable" (a check could not decide: the store is down) or
    "pass", with the identifier's result as ``carry``. The CSRF check of the
    default :class:`CookiePolicy` runs unless *checks* holds a :func:`csrf_check`.
    """
    decode = cached_decoder(manager, size=0)
    judge = _authenticator(decode, token_getter, identifier, _token_type(token_type), _checks(checks))
    return await judge(request, time.time() if now is None else now)


# ---- Routing: the table, and the policies on handlers ----


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
    """Paths whose handler always runs, token or not (unless a guard on the handler says otherwise)."""
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


class Action(enum.Enum):
    """What the router does with a request, decided before any handler runs."""

    HANDLER = "handler"
    APP_PAGE = "app_page"
    LOGIN_PAGE = "login_page"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    BAD_REQUEST = "bad_request"
    UNAVAILABLE = "unavailable"


def _refusal(status: AuthStatus) -> Action:
    """The answer to a request whose token did not pass, where a token is needed."""
    if status == "rejected":
        return Action.FORBIDDEN
    if status == "malformed":
        return Action.BAD_REQUEST
    if status == "unavailable":
        return Action.UNAVAILABLE
    return Action.UNAUTHORIZED


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
    optional: bool = False,
) -> Action:
    """The SPA routing table, as a pure function.

    *path* is the path the router matched (``request.rel_url.path_safe``). A
    path is whitelisted only if every reading of it matches a whitelist
    pattern, and protected if any reading matches a protected one. A CORS
    *preflight* (OPTIONS with ``Access-Control-Request-Method``) never carries
    credentials, so it goes to the handler (aiohttp-cors answers it there).
    On an *optional* route (see :func:`route_options`) no token is fine, but a
    token that fails is refused even where the path is whitelisted.

    >>> rules = RoutingRules(login_route="/login.html", login_page=True, app_page=True)
    >>> decide(rules, "/index.html", "GET", True, "missing"), decide(rules, "/api", "POST", True, "pass")
    (<Action.LOGIN_PAGE: 'login_page'>, <Action.HANDLER: 'handler'>)
    """
    if preflight and method == "OPTIONS":
        return Action.HANDLER
    if optional and status != "pass":
        return Action.HANDLER if status == "missing" else _refusal(status)
    readings = path_readings(path)
    if rules._whitelist and all(any(p.fullmatch(r) for p in rules._whitelist) for r in readings):
        return Action.HANDLER
    if status in ("malformed", "unavailable"):
        return _refusal(status)
    ok = status == "pass"
    denied = _refusal(status)
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


_LOCATIONS = ("header", "cookie", "query", "body")
Requirement: TypeAlias = "tuple[Callable[[dict[str, Any]], bool | Awaitable[bool]], Action]"


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutePolicy:
    """What one handler requires, declared by guards and :func:`route_options` and read by the middleware.

    It lives on the handler object (``handler.jwtplus_policy``; for a
    ``web.View``, on the class or the method being called), so the order of
    decorators cannot drop it.
    """

    requirements: tuple[Requirement, ...] = ()
    """(predicate on the claims, the answer when it does not hold); any requirement needs a passing token."""
    optional: bool = False
    """No token is fine; a token that fails (invalid, expired, revoked) is still refused."""
    any_state: bool = False
    """The handler runs whatever the token's state: refresh and logout, which judge tokens themselves."""
    locations: tuple[str, ...] | None = None
    """Where this route's token may come from: "header", "cookie", "query", "body" (None: the app's)."""
    token_type: str = "access"  # noqa: S105 (a token type, not a password)
    """The token type this route accepts: "access" or "refresh"."""

    def __post_init__(self) -> None:
        _token_type(self.token_type)
        if self.locations is not None:
            given = (self.locations,) if isinstance(self.locations, str) else self.locations
            locations = tuple(dict.fromkeys(given))
            if not locations or not all(loc in _LOCATIONS for loc in locations):
                raise ValueError(
                    f"locations={self.locations!r} must name one or more of {', '.join(_LOCATIONS)}"
                )
            object.__setattr__(self, "locations", locations)
        if self.requirements and (self.optional or self.any_state):
            raise ValueError(
                "a guarded route cannot also be optional or any_state: the guard needs a passing token"
            )
        if self.optional and self.any_state:
            raise ValueError("optional and any_state exclude each other: any_state already admits no token")


_POLICY = "jwtplus_policy"
_VIEW_METHODS = ("get", "head", "post", "put", "patch", "delete", "options")


def _merge(outer: RoutePolicy | None, inner: RoutePolicy) -> RoutePolicy:
    """Two declarations on one handler as one policy; contradictory options raise ValueError."""
    if outer is None:
        return inner
    if outer.locations is not None and inner.locations is not None and outer.locations != inner.locations:
        raise ValueError(
            f"two route options on one handler disagree on locations: {outer.locations!r} and "
            f"{inner.locations!r}"
        )
    return RoutePolicy(
        requirements=outer.requirements + inner.requirements,
        optional=outer.optional or inner.optional,
        any_state=outer.any_state or inner.any_state,
        locations=outer.locations or inner.locations,
        token_type="refresh" if "refresh" in (outer.token_type, inner.token_type) else "access",
    )


def policy_of(request: web.Request) -> RoutePolicy | None:
    """The policy of the handler *request* matched (for a ``web.View``, of the class and the method
    being called), or None when it declares none."""
    handler: Any = request.match_info.handler
    policy = getattr(handler, _POLICY, None)
    if isinstance(handler, type) and issubclass(handler, web.View):
        return _view_policy(handler, request.method.lower())
    return policy if isinstance(policy, RoutePolicy) else None


@functools.lru_cache(maxsize=1024)
def _view_policy(view: type[web.View], method: str) -> RoutePolicy | None:
    """A class-based view's policy for one method: the class's and the method's, merged once."""
    own, whole = getattr(getattr(view, method, None), _POLICY, None), getattr(view, _POLICY, None)
    own = own if isinstance(own, RoutePolicy) else None
    whole = whole if isinstance(whole, RoutePolicy) else None
    if whole is None or own is None:
        return own or whole
    try:
        return _merge(whole, own)
    except ValueError as exc:  # a subclass's method disagrees with its base class: refuse, never a 500
        _log.error("jwtplus: %s.%s: %s; every request to it is refused", view.__qualname__, method, exc)
        return _CONTRADICTED


_CONTRADICTED = RoutePolicy(requirements=((lambda claims: False, Action.FORBIDDEN),))


# ---- Answers ----

_BODY_400 = b'{"error":"bad_request"}'
_BODY_401 = b'{"error":"unauthorized"}'
_BODY_403 = b'{"error":"forbidden"}'
_BODY_503 = b'{"error":"unavailable"}'
_BODY_CSRF = b'{"error":"csrf_failed"}'
_BODIES = {400: _BODY_400, 401: _BODY_401, 403: _BODY_403, 503: _BODY_503}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_TOKEN_LIKE = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")


def _loggable(text: str, limit: int) -> str:
    """*text* as one safe log field: percent-encoded (no line breaks, bidi or lone surrogates, whatever
    parser read the request), anything shaped like a JWT replaced, cut at *limit* characters."""
    quoted = quote(text, safe="/%:@!$&'()*+,;=-._~", errors="backslashreplace")
    return _TOKEN_LIKE.sub("<token>", quoted)[:limit]


class Refusal(NamedTuple):
    """A refused request, as an ``on_refusal`` hook sees it: the HTTP status, why (one of
    :data:`REFUSAL_REASONS`), the request's :data:`AuthStatus`, and the answer jwtplus gives by default."""

    status: int
    reason: str
    auth_status: AuthStatus
    response: web.Response


OnRefusal: TypeAlias = Callable[
    [web.Request, Refusal], "web.StreamResponse | Awaitable[web.StreamResponse | None] | None"
]
"""``on_refusal(request, refusal)``, plain or async: the answer to give instead of ``refusal.response``,
or None to give that one."""


def _challenge(scheme: str, action: Action, status: AuthStatus, reason: str = "") -> web.Response:
    """The 400/401/403/503 answer (RFC 6750): the same body whatever check failed, but for CSRF, which
    the app's own script must be able to tell from a permission it lacks."""
    if action is Action.UNAVAILABLE:
        return web.Response(
            body=_BODY_503,
            status=503,
            content_type="application/json",
            headers={"Retry-After": "5", "Cache-Control": "no-store"},
        )
    if reason == "csrf" and action is Action.FORBIDDEN:  # not the token's fault: no challenge
        return web.Response(
            body=_BODY_CSRF,
            status=403,
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
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


def _refusal_of(request: web.Request, scheme: str, action: Action, status: AuthStatus) -> Refusal:
    """The refusal of *request* with *action*, logged in one line at INFO on the ``jwtplus`` logger:
    the reason, the route and the request id (``X-Request-ID``), never a token or a secret."""
    reason, detail = request._state.get(_REASON) or (status, "")
    answer = _challenge(scheme, action, status, reason)
    if _log.isEnabledFor(logging.INFO):
        given = request.headers.get("X-Request-ID", "")
        _log.info(
            "jwtplus: refused %s %s with %d: %s (%s) [request id %s]",
            _loggable(request.method, 32),
            _loggable(request.rel_url.raw_path, 200),  # never the query, where a token may be
            answer.status,
            reason,
            detail or reason,
            _loggable(given, 128) if _REQUEST_ID.fullmatch(given) else "-",
        )
    return Refusal(answer.status, reason, status, answer)


Refuse: TypeAlias = Callable[[web.Request, "Action | web.Response"], Awaitable[web.StreamResponse]]


def _refuser(scheme: str, on_refusal: OnRefusal | None) -> Refuse:
    """Return ``refuse(request, verdict)``: log a refusal (an :class:`Action`) and answer it, through
    *on_refusal* if any; a ready answer (the 500 of a wiring that judges twice) goes out as it is."""
    if on_refusal is not None and not callable(on_refusal):
        raise TypeError(f"on_refusal must be a function (request, refusal) or None, got {on_refusal!r}")

    async def refuse(request: web.Request, verdict: Action | web.Response) -> web.StreamResponse:
        if not isinstance(verdict, Action):
            return verdict
        refusal = _refusal_of(request, scheme, verdict, request._state.get(AUTH_STATUS, "invalid"))
        return refusal.response if on_refusal is None else await _shaped(request, refusal, on_refusal)

    return refuse


async def _shaped(request: web.Request, refusal: Refusal, on_refusal: OnRefusal) -> web.StreamResponse:
    """What *on_refusal* answers to *refusal*: its response, or the default one when it returns None,
    raises (logged) or returns something that is no response (logged)."""
    try:
        answer = await _maybe_await(on_refusal(request, refusal))
    except web.HTTPException:
        raise  # aiohttp's way to answer, say a redirect to the login page: the hook's answer
    except Exception:
        _log.warning("jwtplus: on_refusal raised; the default answer is given", exc_info=True)
        return refusal.response
    if answer is None:
        return refusal.response
    if not isinstance(answer, web.StreamResponse):
        _log.warning(
            "jwtplus: on_refusal returned a %s, not a response or None; the default answer is given",
            type(answer).__name__,
        )
        return refusal.response
    return answer


def _http_error(
    scheme: str, status: AuthStatus, request: web.Request | None = None, detail: str = "", reason: str = ""
) -> web.HTTPException:
    """:func:`_challenge`'s answer as an exception, for the helpers called inside handlers: logged like
    the middleware's refusals when *request* is given, and shaped by the middleware's ``on_refusal`` hook.
    With a *detail*, the refusal is this one (*reason*, by default the status); without, the one the
    pipeline just noted on the request."""
    action = _refusal(status)
    if request is None:
        answer = _challenge(scheme, action, status, reason)
        refusal = Refusal(answer.status, reason or status, status, answer)
    else:
        if detail:
            request._state[_REASON] = (reason or status, detail)
        refusal = _refusal_of(request, scheme, action, status)
    answer = refusal.response
    error = {400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 403: web.HTTPForbidden}.get(
        answer.status, web.HTTPServiceUnavailable
    )
    headers = {k: v for k, v in answer.headers.items() if k != "Content-Type"}
    raised: web.HTTPException = error(
        text=cast(bytes, answer.body).decode(), content_type="application/json", headers=headers
    )
    raised.jwtplus_refusal = refusal  # type: ignore[attr-defined]
    return raised


async def _enforce(
    policy: RoutePolicy, status: AuthStatus, claims: dict[str, Any] | None, carry: Any, state: Any
) -> Action | None:
    """The answer a guarded route gives instead of running its handler, or None to run it.

    A predicate may be a coroutine function; one that raises refuses. A guard that fails notes why."""
    if status != "pass" or claims is None:
        return _refusal(status)
    for predicate, failure in policy.requirements:
        try:
            subject = carry if getattr(predicate, "jwtplus_on_carry", False) else claims
            held = bool(await _maybe_await(predicate(subject)))
        except Exception:
            _log.warning("jwtplus: a guard's predicate raised; request refused", exc_info=True)
            held = False
        if not held:
            state[_REASON] = (getattr(predicate, "jwtplus_reason", "forbidden"), _name(predicate))
            return failure
    return None


# ---- Middleware factories ----


def _located_getter(
    locations: tuple[str, ...], token_type: str, scheme: str, cookies: CookiePolicy
) -> TokenGetter:
    """The getter of a route's own token *locations* (see :class:`RoutePolicy`)."""
    refresh = token_type == "refresh"  # noqa: S105 (a token type)
    built = {
        "header": lambda: header_token_getter(scheme),
        "cookie": lambda: cookie_token_getter(cookies.refresh_cookie if refresh else cookies.token_cookie),
        "query": lambda: query_token_getter("refresh_token" if refresh else "access_token"),
        "body": lambda: body_token_getter("refresh_token" if refresh else "access_token"),
    }
    getters = [built[location]() for location in locations]
    return getters[0] if len(getters) == 1 else any_token_getter(*getters)


Identify: TypeAlias = Callable[
    [web.Request, "RoutePolicy | None"], Awaitable["AuthStatus | Action | web.Response"]
]


class _Pipeline(NamedTuple):
    """The pieces of one route's pipeline, left on the request for :func:`authenticated_messages`."""

    token_getter: TokenGetter
    decode: TokenDecoder
    identifier: Identifier
    token_type: str
    checks: tuple[Check, ...]
    clock: Callable[[], float]
    leeway: float


_PIPELINE = web.RequestKey[_Pipeline]("jwtplus_pipeline")


def _key_source(
    manager: SecretManager | None,
    issuers: IdentityProvider | Iterable[IdentityProvider],
    cache_size: int,
    clock: Callable[[], float],
) -> tuple[TokenDecoder, str, float]:
    """The decoder of a middleware's tokens: the manager's own, or those of its identity providers;
    with the scheme its challenges name and the longest leeway it grants."""
    providers = (issuers,) if isinstance(issuers, IdentityProvider) else tuple(issuers)
    if not all(isinstance(p, IdentityProvider) for p in providers):
        raise TypeError(f"issuers must be IdentityProvider values, got {issuers!r}")
    if (manager is None) == (not providers):
        raise ValueError(
            "pass manager= (tokens this app signs) or issuers= (tokens of identity providers), exactly one"
        )
    if manager is not None:
        if not isinstance(manager, SecretManager):
            raise TypeError(f"manager must be a SecretManager, got {manager!r}")
        return cached_decoder(manager, size=cache_size), manager.scheme, manager.leeway_seconds
    if len({p.issuer for p in providers}) != len(providers):
        raise ValueError("issuers names one issuer twice: each provider needs its own issuer")
    return _provider_decoder(providers, cache_size, clock), "Bearer", max(p.leeway_seconds for p in providers)


def _identifier(
    manager: SecretManager | None,
    issuers: IdentityProvider | Iterable[IdentityProvider],
    token_getter: TokenGetter | None,
    identifier: Identifier | None,
    checks: Iterable[Check],
    cache_size: int,
    clock: Callable[[], float],
) -> tuple[Identify, TokenDecoder, str]:
    """Return ``identify(request, policy)``: run the pipeline (as the route's policy says), put the
    result on the request, and return its status, or the refusal of a guard on the route (an
    :class:`Action`), or the 500 of a wiring that judges twice; with the decoder and the scheme."""
    if not callable(clock):
        raise TypeError(f"clock must be a function returning Unix seconds, such as time.time, got {clock!r}")
    decode, scheme, leeway = _key_source(manager, issuers, cache_size, clock)
    if token_getter is None or token_getter is basic_token_getter:
        token_getter = header_token_getter(scheme)
    if not callable(token_getter):
        raise TypeError(f"token_getter must be callable or None, got {token_getter!r}")
    if identifier is not None and not callable(identifier):
        raise TypeError(f"identifier must be callable or None, got {identifier!r}")
    identifier = identifier or (user_identifier if manager is not None else subject_identifier)
    checks = _checks(checks)
    cookies = _csrf_policy(checks) or DEFAULT_COOKIES

    def pipeline(getter: TokenGetter, token_type: str) -> tuple[Authenticator, _Pipeline]:
        parts = _Pipeline(getter, decode, identifier, token_type, checks, clock, leeway)
        return _authenticator(decode, getter, identifier, token_type, checks), parts

    judge, parts = pipeline(token_getter, "access")
    judges: dict[tuple[tuple[str, ...] | None, str], tuple[Authenticator, _Pipeline]] = {
        (None, "access"): (judge, parts)
    }

    def judge_for(policy: RoutePolicy) -> tuple[Authenticator, _Pipeline]:
        key = (policy.locations, policy.token_type)
        found = judges.get(key)
        if found is None:
            locations = policy.locations
            if locations is None:  # a refresh token comes from its own cookie, a header or a JSON body
                locations = ("header", "cookie", "body")
            getter = _located_getter(locations, policy.token_type, scheme, cookies)
            found = judges[key] = pipeline(getter, policy.token_type)
        return found

    async def identify(
        request: web.Request, policy: RoutePolicy | None
    ) -> AuthStatus | Action | web.Response:
        # the request's own storage: request[...] = ... costs a Python call per key on every request,
        # and warns once per string key (the seed's two)
        state = request._state
        if "auth_status" in state:
            return _misconfigured(_TWICE)
        run, used = (judge, parts) if policy is None else judge_for(policy)
        status, carry, claims = await run(request, clock())
        state[AUTH_STATUS] = status
        state[AUTH_CARRY] = carry
        state[AUTH_CLAIMS] = claims
        state["auth_status"] = status
        state["auth_carry"] = carry
        state[_PIPELINE] = used
        if policy is None:
            return status
        request[_ENFORCED] = policy
        if policy.requirements:
            action = await _enforce(policy, status, claims, carry, state)
            if action is not None:
                return action
        return status

    return identify, decode, scheme


Route: TypeAlias = Callable[[web.Request, AuthStatus, "RoutePolicy | None"], "Handler | Action | None"]


def _router(
    rules: RoutingRules,
    login_page_handler: Handler | None,
    app_page_handler: Handler | None,
) -> Route:
    """Return ``route(request, status, policy)``: None to run the request's own handler, a page handler to
    run instead, or the refusal (an :class:`Action`) to answer. Decisions are remembered (``decide``
    is pure)."""
    if not isinstance(rules, RoutingRules):
        raise TypeError(f"rules must be a RoutingRules, got {rules!r}")
    if rules.login_page != (login_page_handler is not None) or rules.app_page != (
        app_page_handler is not None
    ):
        raise ValueError("rules.login_page and rules.app_page must say whether each page handler is given")

    hinted: set[str] = set()  # the sub-application prefixes already warned about

    @functools.lru_cache(maxsize=4096)
    def decided(
        path: str, method: str, found: bool, status: AuthStatus, preflight: bool, optional: bool
    ) -> Action:
        return decide(rules, path, method, found, status, preflight=preflight, optional=optional)

    def route(
        request: web.Request, status: AuthStatus, policy: RoutePolicy | None
    ) -> Handler | Action | None:
        if policy is not None and policy.any_state:
            return None
        action = decided(
            request.rel_url.path_safe,
            request.method,
            request.match_info.http_exception is None,
            status,
            # a preflight goes to its handler only where a route answers OPTIONS itself (aiohttp-cors does)
            "Access-Control-Request-Method" in request.headers
            and request.match_info.route.method == "OPTIONS",
            policy is not None and policy.optional,
        )
        if action is Action.HANDLER:
            return None
        if len(request.match_info.apps) > 1:
            _hint_relative_patterns(request, decided, status, hinted)
        if action is Action.LOGIN_PAGE and login_page_handler is not None:
            return login_page_handler
        if action is Action.APP_PAGE and app_page_handler is not None:
            return app_page_handler
        return action

    return route


def _mount_prefixes(apps: tuple[web.Application, ...]) -> list[str]:
    """The path prefixes the sub-applications among *apps* are mounted at, outermost first."""
    prefixes = []
    for parent, child in itertools.pairwise(apps):
        for resource in parent.router.resources():
            if isinstance(resource, PrefixedSubAppResource) and resource._app is child:
                prefixes.append(resource.canonical)
    return prefixes


def _hint_relative_patterns(
    request: web.Request, decided: Callable[..., Action], status: AuthStatus, hinted: set[str]
) -> None:
    """Say once per prefix when a refused request in a sub-application would have been let through had
    the whitelist been written relative to it: patterns match the full path, prefix included."""
    path = request.rel_url.path_safe
    for prefix in _mount_prefixes(request.match_info.apps):
        inner = path[len(prefix) :] if path.startswith(prefix) else None
        if prefix in hinted or not inner or not inner.startswith("/"):
            continue
        if decided(inner, request.method, True, status, False, False) is Action.HANDLER:
            hinted.add(prefix)
            _log.warning(
                "jwtplus: %s %s was refused, but %s, its path within the sub-application mounted at %s, is "
                "whitelisted: patterns match the full path, so write them with the prefix (%s%s)",
                request.method,
                path,
                inner,
                prefix,
                prefix,
                inner,
            )


def _with_cache_info(middleware: Middleware, decode: TokenDecoder) -> Middleware:
    """Let ``middleware.cache_info()`` report on its verified-token cache."""
    middleware.cache_info = decode.cache_info  # type: ignore[attr-defined]
    return middleware


def _kind(middleware: Middleware, kind: str) -> Middleware:
    """Mark *middleware* as jwtplus's, so that :func:`setup` and the helper's pair can find it."""
    middleware.jwtplus_kind = kind  # type: ignore[attr-defined]
    return middleware


def _has_router(apps: tuple[web.Application, ...]) -> bool:
    """Whether a jwtplus router runs on requests through *apps* (an app and the sub-apps it mounts)."""
    return any(
        getattr(m, "jwtplus_kind", None) in ("router", "both") for app in apps for m in app.middlewares
    )


def authentication_middleware(
    *,
    manager: SecretManager | None = None,
    issuers: IdentityProvider | Iterable[IdentityProvider] = (),
    token_getter: TokenGetter | None = None,
    identifier: Identifier | None = None,
    checks: Iterable[Check] = (),
    cache_size: int = 10_000,
    clock: Callable[[], float] = time.time,
    on_refusal: OnRefusal | None = None,
) -> Middleware:
    """Return the middleware that runs the pipeline on each request and stores the result.

    It sets ``request[AUTH_STATUS]``, ``[AUTH_CARRY]`` and ``[AUTH_CLAIMS]`` (and the
    seed's ``'auth_status'`` and ``'auth_carry'``), enforces the guards on the
    matched handler, then calls the handler. The default getter reads
    ``Authorization`` with the manager's scheme (so does :data:`basic_token_getter`
    here); the default identifier is :func:`user_identifier`. *checks* run after
    the signature and the token type, CSRF first (see :func:`authenticate`).
    Verified tokens are remembered in a :func:`cached_decoder` of *cache_size*
    entries (0: none); ``middleware.cache_info()`` reports on it. *clock* tells the time (Unix
    seconds) tokens are judged at: a test, or a server whose clock is known to be off, passes its own.

    Tokens are this app's own (*manager*), or those of identity providers
    (*issuers*, one or several, chosen by each token's ``iss``): exactly one of
    the two. With *issuers* the default identifier is :func:`subject_identifier`.

    Each refusal (a guard's here) is logged in one line at INFO on the ``jwtplus`` logger;
    *on_refusal*, given, shapes its answer, and those of the session helpers that raise inside
    handlers (see :class:`Refusal`).
    """
    return _authentication(
        manager, issuers, token_getter, identifier, checks, cache_size, clock, on_refusal, needs_router=False
    )


async def _shaping(handler: Handler, request: web.Request, on_refusal: OnRefusal) -> web.StreamResponse:
    """Run *handler*; a refusal a jwtplus helper raises in it goes through *on_refusal* too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        refusal = getattr(exc, "jwtplus_refusal", None)
        if not isinstance(refusal, Refusal):
            raise
        return await _shaped(request, refusal, on_refusal)


def _authentication(
    manager: SecretManager | None,
    issuers: IdentityProvider | Iterable[IdentityProvider],
    token_getter: TokenGetter | None,
    identifier: Identifier | None,
    checks: Iterable[Check],
    cache_size: int,
    clock: Callable[[], float],
    on_refusal: OnRefusal | None,
    *,
    needs_router: bool,
) -> Middleware:
    """:func:`authentication_middleware`; *needs_router* refuses every request (500, logged) where no jwtplus
    router runs after it, as the helper's first middleware does: its routing table would not apply."""
    identify, decode, scheme = _identifier(
        manager, issuers, token_getter, identifier, checks, cache_size, clock
    )
    refuse = _refuser(scheme, on_refusal)
    routed: dict[tuple[web.Application, ...], bool] = {}

    @web.middleware
    async def jwt_authentication(request: web.Request, handler: Handler) -> web.StreamResponse:
        if needs_router:
            apps = request.match_info.apps
            found = routed.get(apps)
            if found is None:
                found = routed[apps] = _has_router(apps)
            if not found:
                return _misconfigured(_UNROUTED)
        verdict = await identify(request, policy_of(request))
        if verdict.__class__ is not str:
            return await refuse(request, cast("Action | web.Response", verdict))
        if on_refusal is None:
            return await handler(request)
        return await _shaping(handler, request, on_refusal)

    return _with_cache_info(_kind(jwt_authentication, "authentication"), decode)


def router_middleware(
    *,
    rules: RoutingRules,
    login_page_handler: Handler | None = None,
    app_page_handler: Handler | None = None,
    scheme: str = "Bearer",
    on_refusal: OnRefusal | None = None,
) -> Middleware:
    """Return the middleware that applies :func:`decide` to each authenticated request.

    It must come after :func:`authentication_middleware`; *scheme* is the
    manager's, for the challenges it sends. Each refusal is logged in one line,
    and *on_refusal*, given, shapes its answer (see :class:`Refusal`).
    """
    route = _router(rules, login_page_handler, app_page_handler)
    refuse = _refuser(scheme, on_refusal)

    @web.middleware
    async def jwt_router(request: web.Request, handler: Handler) -> web.StreamResponse:
        state = request._state  # what the authentication middleware left: its status and the policy
        status = state.get(AUTH_STATUS)
        if status is None:
            raise _not_installed()
        target = route(request, status, state.get(_ENFORCED))
        if target is None:
            return await handler(request)
        return await refuse(request, target) if isinstance(target, Action) else await target(request)

    return _kind(jwt_router, "router")


def jwt_middleware(
    *,
    manager: SecretManager | None = None,
    issuers: IdentityProvider | Iterable[IdentityProvider] = (),
    rules: RoutingRules,
    token_getter: TokenGetter | None = None,
    identifier: Identifier | None = None,
    checks: Iterable[Check] = (),
    login_page_handler: Handler | None = None,
    app_page_handler: Handler | None = None,
    cache_size: int = 10_000,
    clock: Callable[[], float] = time.time,
    on_refusal: OnRefusal | None = None,
) -> Middleware:
    """Both middlewares in one: authenticate, then route; one layer fewer on every request.

    The arguments are those of :func:`authentication_middleware` and :func:`router_middleware`.
    """
    identify, decode, scheme = _identifier(
        manager, issuers, token_getter, identifier, checks, cache_size, clock
    )
    route = _router(rules, login_page_handler, app_page_handler)
    refuse = _refuser(scheme, on_refusal)

    @web.middleware
    async def jwt_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        policy = policy_of(request)
        verdict = await identify(request, policy)
        if verdict.__class__ is not str:
            return await refuse(request, cast("Action | web.Response", verdict))
        target = route(request, cast(AuthStatus, verdict), policy)
        if target is None:
            if on_refusal is None:
                return await handler(request)
            return await _shaping(handler, request, on_refusal)
        return await refuse(request, target) if isinstance(target, Action) else await target(request)

    return _with_cache_info(_kind(jwt_auth, "both"), decode)


# ==== Part II: browsers and sessions ====

# ---- Cookies and CSRF ----


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
    csrf_field: str | None = None
    """A form field that may carry the CSRF value instead of the header, for a plain HTML
    ``<form method="post">`` (urlencoded or multipart); None: the header only."""
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
        if self.csrf_field is not None and (
            not isinstance(self.csrf_field, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.csrf_field)
        ):
            raise ValueError(
                f"csrf_field={self.csrf_field!r} must be None (the header only) or a form field name "
                "(letters, digits, -_.)"
            )
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


def _header_or_cookie_getter(scheme: str, cookies: CookiePolicy) -> TokenGetter:
    """Where a browser app's access token comes from: the Authorization header, or the token cookie."""
    return any_token_getter(header_token_getter(scheme), cookie_token_getter(cookies.token_cookie))


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


def set_login_cookies(
    response: web.StreamResponse,
    manager: SecretManager,
    claims: Mapping[str, Any],
    *,
    cookies: CookiePolicy = DEFAULT_COOKIES,
    now: float | None = None,
    expires_in: Duration | None = None,
) -> str:
    """Log in with cookies alone: mint a token for *claims* (see :func:`encode_token`) with a fresh random
    ``csrf`` claim, set the token and CSRF cookies on *response*, and return the token. :class:`Sessions`
    do more."""
    token = encode_token(
        manager, {**claims, "csrf": secrets.token_urlsafe(32)}, now=now, expires_in=expires_in
    )
    set_token_cookies(response, manager, token, cookies=cookies, now=now)
    return token


def clear_login_cookies(response: web.StreamResponse, *, cookies: CookiePolicy = DEFAULT_COOKIES) -> None:
    """Clear the token, refresh and CSRF cookies on *response*, under every spelling of their names.

    This only forgets the tokens in the browser; :func:`end_session` revokes them.
    """
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


def _origin_ok(request: web.Request, cookies: CookiePolicy) -> bool:
    """Whether the ``Origin`` a browser sent, if any, is the request's own or a trusted one."""
    origin = request.headers.get("Origin")
    if origin is None:
        # every browser sends Origin on a WebSocket handshake: one without it is no page of ours
        return request.headers.get("Upgrade", "").lower() != "websocket"
    return origin.partition("://")[2] == request.host or origin in cookies.trusted_origins


_FORMS = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})


def _csrf_ok(
    request: web.Request, claims: Mapping[str, Any], cookies: CookiePolicy, given: str | None
) -> bool:
    """Whether an unsafe request authenticated by cookie comes from the app itself.

    It must echo the token's ``csrf`` claim (*given*: from the CSRF header or
    form field; compared in constant time), and where the browser says where it
    comes from (``Sec-Fetch-Site``, ``Origin``), that must be the same origin or a trusted one.
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    if not _origin_ok(request, cookies):
        return False
    expected = claims.get("csrf")
    if not isinstance(expected, str) or not expected or given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8", "replace"))


async def _form_csrf(request: web.Request, claims: Mapping[str, Any], cookies: CookiePolicy) -> str | None:
    """The CSRF verdict of a form that carries the value in ``cookies.csrf_field``. It reads the form with
    ``request.post()``, which aiohttp keeps, files included, for the handler; a body too large
    (``client_max_size``) or unreadable fails, and the log says so."""
    try:
        form = await request.post()
    except Exception as exc:
        request._state[_CHECK_DETAIL] = f"the form could not be read ({type(exc).__name__})"
        return "rejected"
    value = form.get(cast(str, cookies.csrf_field))
    return None if isinstance(value, str) and _csrf_ok(request, claims, cookies, value) else "rejected"


def csrf_check(cookies: CookiePolicy = DEFAULT_COOKIES, *, every_method: bool = False) -> Check:
    """The check the cookie section contributes, for tokens a browser attached by itself (any source
    but a header, a query or a JSON body): whatever the method, an ``Origin`` must be the request's
    own or in ``cookies.trusted_origins``, and a WebSocket handshake must carry one; an unsafe request
    must also pass the double-submit test (the CSRF header, or ``cookies.csrf_field`` of a form).
    Failing is ``"rejected"``, answered 403 ``{"error":"csrf_failed"}`` on
    every route. *every_method* asks the double-submit test of safe methods too.

    Every pipeline has one: without a CSRF check of your own, the default policy's runs first.
    """
    if not isinstance(cookies, CookiePolicy):
        raise TypeError(f"cookies must be a CookiePolicy, got {cookies!r}")
    exempt: frozenset[str] = frozenset() if every_method else _SAFE_METHODS
    header, field_name = cookies.csrf_header, cookies.csrf_field

    def check_csrf(
        request: web.Request, claims: dict[str, Any], now: float
    ) -> str | Awaitable[str | None] | None:
        if request._state.get(TOKEN_SOURCE) in _NOT_AMBIENT:  # request.get, minus two Python calls
            return None
        if request.method in exempt:
            return None if _origin_ok(request, cookies) else "rejected"
        given = request.headers.get(header)
        if given is None and field_name is not None and request.content_type in _FORMS:
            return _form_csrf(request, claims, cookies)
        return None if _csrf_ok(request, claims, cookies, given) else "rejected"

    check_csrf.csrf_policy = cookies  # type: ignore[attr-defined]
    check_csrf.jwtplus_reason = "csrf"  # type: ignore[attr-defined]
    return check_csrf


# ---- Sessions: token pairs, refresh, revocation ----


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
    login_lifetime: Duration = "90d"
    """How long one login lasts however often it is refreshed (from its ``auth_time``): then the
    password again. At least refresh_exptime."""
    reload_claims: ReloadClaims | None = None
    """``reload_claims(subject, claims)``, plain or async, runs at each refresh: it returns the claims
    the new pair carries (re-read, so a demoted user loses the role), or None to end the login (its
    family is revoked, 401). One that raises refuses the refresh with 503 and keeps the family."""
    namespace: str | None = None
    """Prefix of this app's entries in the store. None: derived from the manager's secret (without
    revealing it), so apps with different secrets sharing one Redis never touch each other's
    entries; "": none. Braces are refused: they hold the slot tag that keeps a token's keys on one
    Redis Cluster node."""
    access_seconds: float = field(init=False)
    """The access token lifetime in seconds."""
    refresh_seconds: float = field(init=False)
    """The refresh token lifetime in seconds."""
    grace_seconds: float = field(init=False)
    login_seconds: float = field(init=False)
    """The login lifetime in seconds."""

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
        if self.manager.rotation_seconds and refresh > self.manager.exptime_seconds:
            raise ValueError(
                f"refresh_exptime={self.refresh_exptime!r} is longer than the manager's exptime="
                f"{self.manager.exptime!r}: with rotation on, no token outlives its period's window"
            )
        if self.manager.leeway_seconds >= access:
            raise ValueError(
                f"access_exptime={self.access_exptime!r} must be longer than the manager's "
                f"leeway={self.manager.leeway!r}, which keeps an expired access token alive that long"
            )
        grace = parse_duration(self.reuse_grace, name="reuse_grace")
        if grace > _MAX_REUSE_GRACE or grace >= access:
            raise ValueError(
                f"reuse_grace={self.reuse_grace!r} must be at most {_MAX_REUSE_GRACE} seconds and shorter "
                f"than access_exptime={self.access_exptime!r}: within it, a stolen refresh token is used "
                "again without killing its family"
            )
        login = parse_duration(self.login_lifetime, name="login_lifetime")
        if login < refresh:
            raise ValueError(
                f"login_lifetime={self.login_lifetime!r} must be at least refresh_exptime="
                f"{self.refresh_exptime!r}: it bounds every refresh token of a login"
            )
        if self.reload_claims is not None and not callable(self.reload_claims):
            raise TypeError(
                f"reload_claims must be a function (subject, claims) or None, got {self.reload_claims!r}"
            )
        namespace = self.namespace
        if namespace is None:
            if not self.manager._key:
                raise ValueError(
                    "namespace= is needed with static keys (there is no secret to derive it from): "
                    'name the app\'s share of the store, say namespace="myapp:"'
                )
            digest = hmac.new(self.manager._key, b"jwtplus-store-namespace-v1", hashlib.sha256).hexdigest()
            namespace = digest[:16] + ":"
        if not isinstance(namespace, str):
            raise TypeError(f"namespace={namespace!r} must be a string or None (derived from the secret)")
        if "{" in namespace or "}" in namespace:
            raise ValueError(
                f"namespace={namespace!r} must not contain braces: jwtplus puts each subject's hash tag "
                'in braces, so that its keys share one Redis Cluster slot (say namespace="myapp:")'
            )
        object.__setattr__(self, "namespace", namespace)
        object.__setattr__(self, "access_seconds", access)
        object.__setattr__(self, "refresh_seconds", refresh)
        object.__setattr__(self, "grace_seconds", grace)
        object.__setattr__(self, "login_seconds", login)


@dataclass(frozen=True, slots=True)
class TokenPair:
    """A short access token and the long refresh token that renews it, from one login family."""

    access: str
    refresh: str
    family: str
    csrf: str


def _mint(
    sessions: Sessions,
    subject: str,
    claims: Mapping[str, Any],
    *,
    family: str,
    fresh: bool,
    generation: float | None,
    auth_time: int,
    now: float,
) -> TokenPair:
    """Sign a pair for *subject*: both tokens end by the login's end (*auth_time* + login lifetime)."""
    csrf = secrets.token_urlsafe(32)
    base = {**claims, "sub": subject, "fam": family, "csrf": csrf, "auth_time": auth_time}
    if generation is not None:
        base["gen"] = generation
    iat, end = int(now), auth_time + sessions.login_seconds
    access = encode_token(
        sessions.manager,
        {**base, "type": "access", "fresh": fresh, "exp": min(iat + sessions.access_seconds, end)},
        now=now,
    )
    refresh = encode_token(
        sessions.manager,
        {**base, "type": "refresh", "exp": min(iat + sessions.refresh_seconds, end)},
        now=now,
    )
    return TokenPair(access, refresh, family, csrf)


async def issue_tokens(
    sessions: Sessions,
    subject: str,
    claims: Mapping[str, Any] | None = None,
    *,
    now: float | None = None,
) -> TokenPair:
    """Log *subject* in: mint an access and a refresh token (``sub``) with *claims*, in a new family.

    The access token is *fresh* (minted by a password login, for
    :func:`fresh_login_required`); both carry the same ``csrf`` claim, the
    login's ``auth_time``, and the subject's logout generation, read from the
    store (so a :func:`revoke_subject` that returned before never refuses
    them). Raises ``web.HTTPServiceUnavailable`` when the store cannot be reached.
    """
    if not isinstance(subject, str) or not subject:
        raise ValueError(f"subject={subject!r} must be a non-empty string (it becomes the sub claim)")
    now = time.time() if now is None else now
    try:
        key = _store_key(sessions, _slot_tag(subject), "subject", subject)
        (generation,) = await sessions.store.get_many([key], now)
    except Exception as exc:
        if not sessions.fail_open:
            _store_failed(exc, "login refused (503)")
            raise _http_error(sessions.manager.scheme, "unavailable") from None
        _store_failed(exc, "login goes on without the subject's generation (fail-open)")
        generation = None
    family = f"{_slot_tag(subject)}.{secrets.token_urlsafe(16)}"
    return _mint(
        sessions,
        subject,
        claims or {},
        family=family,
        fresh=True,
        generation=generation,
        auth_time=int(now),
        now=now,
    )


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


async def start_session(
    response: web.StreamResponse,
    sessions: Sessions,
    subject: str,
    claims: Mapping[str, Any] | None = None,
    *,
    cookies: CookiePolicy = DEFAULT_COOKIES,
    now: float | None = None,
) -> TokenPair:
    """After a password check: mint a fresh pair in a new family (:func:`issue_tokens`) and set its
    cookies on *response*."""
    pair = await issue_tokens(sessions, subject, claims, now=now)
    set_session_cookies(response, sessions, pair, cookies=cookies, now=now)
    return pair


def _text(claims: Mapping[str, Any], name: str) -> str | None:
    """A claim that names something (``jti``, ``fam``, ``sub``): a non-empty string, else None."""
    value = claims.get(name)
    return value if isinstance(value, str) and value else None


@functools.lru_cache(maxsize=4096)
def _slot_tag(name: str) -> str:
    """The Redis Cluster hash tag of a subject's entries (8 hex digits of its SHA-256): every key one
    token needs then lies in one slot, so one ``MGET`` reads them on a cluster too."""
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]


_FAMILY = re.compile(r"([0-9a-f]{8})\.[A-Za-z0-9_-]{22}")
"""A family id as :func:`issue_tokens` mints it: its subject's slot tag, a dot, 16 random bytes."""


def _family_tag(family: str, subject: str | None) -> str | None:
    """The slot tag of a family's entries: the one it carries, else its subject's (None: unknown)."""
    if subject is not None:
        return _slot_tag(subject)
    anchored = _FAMILY.fullmatch(family)
    return anchored.group(1) if anchored is not None else None


def _token_tag(claims: Mapping[str, Any]) -> str | None:
    """The slot tag of a token's entries: its subject's, else its family's, else its jti's."""
    return _tag_of(_text(claims, "jti"), _text(claims, "fam"), _text(claims, "sub"))


def _tag_of(jti: str | None, family: str | None, subject: str | None) -> str | None:
    """:func:`_token_tag` of the claims *jti*, *family* and *subject* (each a non-empty string, or None)."""
    if subject is not None:
        return _slot_tag(subject)
    if family is not None:
        return _family_tag(family, None) or _slot_tag(family)
    return None if jti is None else _slot_tag(jti)


def _store_key(sessions: Sessions, tag: str, kind: str, value: str) -> str:
    """The store key of one fact: ``<namespace>{<tag>}<kind>:<value>``, the tag in Redis's braces."""
    return f"{sessions.namespace}{{{tag}}}{kind}:{value}"


def _revocation_keys(sessions: Sessions, claims: Mapping[str, Any]) -> tuple[str, ...]:
    """The store keys that can revoke a token: its own jti, its family, its subject's generation,
    all in one slot.

    A claim that is absent, empty or not a string has no key, so no two tokens share one by accident.
    """
    jti, family, subject = claims.get("jti"), claims.get("fam"), claims.get("sub")
    return _keys_of(  # _text's test, written out: this runs on every request
        sessions.namespace,
        jti if jti.__class__ is str and jti else None,
        family if family.__class__ is str and family else None,
        subject if subject.__class__ is str and subject else None,
    )


@functools.lru_cache(maxsize=4096)
def _keys_of(namespace: str, jti: str | None, family: str | None, subject: str | None) -> tuple[str, ...]:
    """:func:`_revocation_keys` of one token, built once while it is in use."""
    tag = _tag_of(jti, family, subject)  # None only when all three are: then no key
    named = (("revoked", jti), ("family", family), ("subject", subject))
    return tuple(f"{namespace}{{{tag}}}{kind}:{value}" for kind, value in named if value is not None)


def _store_failed(exc: Exception, outcome: str) -> None:
    """Log a store failure in one line: its kind and message (never a token), and what came of it."""
    _log.warning("jwtplus: the revocation store failed (%s: %s); %s", type(exc).__name__, exc, outcome)


def _revoked_by(claims: Mapping[str, Any], keys: Sequence[str], values: Sequence[float | None]) -> bool:
    """Whether the store's *values* for *keys* (:func:`_revocation_keys`) revoke *claims*: by jti, by
    family, or by a logout of its subject everywhere since the token was issued (its ``gen`` is not the
    subject's generation)."""
    subject_key = keys[-1] if _text(claims, "sub") is not None else None
    for key, value in zip(keys, values, strict=True):
        if value is None:
            continue
        if key is not subject_key or claims.get("gen") != value:
            return True
    return False


def revocation_check(sessions: Sessions) -> Check:
    """The check the sessions section contributes: "invalid" for a revoked token, "unavailable" when
    the store cannot be reached (unless ``sessions.fail_open``)."""
    if not isinstance(sessions, Sessions):
        raise TypeError(f"sessions must be a Sessions, got {sessions!r}")

    # a store's get_many may carry a reader that answers at once (memory_store's; redis_store's copies
    # with cache_for, None when it has none): no coroutine to make and await. The attribute goes with
    # the function, so a store built around another get_many never uses it
    read_now = getattr(sessions.store.get_many, "_jwtplus_read_now", None)

    async def revoked_later(claims: dict[str, Any], keys: tuple[str, ...], now: float) -> str | None:
        try:
            return "invalid" if _revoked_by(claims, keys, await sessions.store.get_many(keys, now)) else None
        except Exception as exc:
            if sessions.fail_open:
                _store_failed(exc, "the token is accepted (fail-open)")
                return None
            _store_failed(exc, "auth_status is 'unavailable' (503 wherever a token is needed)")
            return "unavailable"

    def check_revocation(
        request: web.Request, claims: dict[str, Any], now: float
    ) -> str | Awaitable[str | None] | None:
        keys = _revocation_keys(sessions, claims)  # a token with no jti, family or subject: no lookup
        if not keys:
            return None
        if read_now is not None and claims.get("type", "access") == "access":  # refresh tokens: the store
            values = read_now(keys, now)
            if values is not None:
                return "invalid" if _revoked_by(claims, keys, values) else None
        return revoked_later(claims, keys, now)  # a store across the network: the pipeline awaits it

    check_revocation.jwtplus_reason = "revoked"  # type: ignore[attr-defined]
    return check_revocation


def _session_judge(sessions: Sessions, cookies: CookiePolicy, token_type: str) -> Authenticator:
    """The pipeline as the session helpers run it: refresh tokens from their cookie, a JSON body or
    a header; access tokens from the header or their cookie; CSRF on every method, then revocation."""
    scheme = sessions.manager.scheme
    if token_type == "refresh":  # noqa: S105 (a token type)
        getter = any_token_getter(
            cookie_token_getter(cookies.refresh_cookie), body_token_getter(), header_token_getter(scheme)
        )
    else:
        getter = _header_or_cookie_getter(scheme, cookies)
    checks = (csrf_check(cookies, every_method=True), revocation_check(sessions))
    return _authenticator(
        cached_decoder(sessions.manager, size=0), getter, _claims_themselves, token_type, checks
    )


async def refresh_session(
    request: web.Request,
    sessions: Sessions,
    *,
    cookies: CookiePolicy = DEFAULT_COOKIES,
    now: float | None = None,
) -> TokenPair:
    """Exchange the request's refresh token (its cookie, or JSON ``refresh_token``) for a new pair.

    The refresh token goes through the pipeline (a cookie-borne one must pass
    the CSRF check, whatever the method), then is consumed atomically: of
    concurrent refreshes with one token, exactly one wins. A token used before
    is theft: its whole family is revoked. Raises ``web.HTTPUnauthorized`` (401),
    ``web.HTTPForbidden`` (403, CSRF), ``web.HTTPBadRequest`` (400, two tokens)
    or, when the store cannot be reached, ``web.HTTPServiceUnavailable`` (503).
    """
    scheme = sessions.manager.scheme
    now = time.time() if now is None else now
    status, _, claims = await _session_judge(sessions, cookies, "refresh")(request, now)
    if status != "pass" or claims is None:
        raise _http_error(scheme, status, request)
    family, jti, subject = _text(claims, "fam"), _text(claims, "jti"), _text(claims, "sub")
    if family is None or jti is None or subject is None:
        raise _http_error(scheme, "invalid", request, "a refresh token without fam, jti or sub")
    auth_time = claims.get("auth_time", claims.get("iat"))  # 1.0's tokens have no auth_time
    if (
        not isinstance(auth_time, int)
        or isinstance(auth_time, bool)
        or now >= auth_time + sessions.login_seconds
    ):
        raise _http_error(scheme, "invalid", request, "the login lifetime is over", reason="expired")
    kept = await _reloaded(request, sessions, claims, subject, family, now)
    try:
        key = _store_key(sessions, _slot_tag(subject), "used", jti)
        used_at = await sessions.store.consume(key, now, _outlives(sessions, claims["exp"]), now)
        if used_at is not None:
            # within the grace only forward in time: a server whose clock runs behind forgives no thief
            if not sessions.grace_seconds or not 0 <= now - used_at <= sessions.grace_seconds:
                _log.warning("jwtplus: a refresh token was used twice; its family is revoked")
                await revoke_family(sessions, family, subject=subject, now=now)
            raise _http_error(scheme, "invalid", request, "a refresh token used again", reason="revoked")
    except web.HTTPException:
        raise
    except Exception as exc:
        _store_failed(exc, "refresh refused (503)")
        raise _http_error(scheme, "unavailable", request, "the store failed") from None
    generation = claims.get("gen")
    return _mint(
        sessions,
        subject,
        kept,
        family=family,
        fresh=False,
        generation=generation if isinstance(generation, (int, float)) else None,
        auth_time=auth_time,
        now=now,
    )


async def _reloaded(
    request: web.Request,
    sessions: Sessions,
    claims: Mapping[str, Any],
    subject: str,
    family: str,
    now: float,
) -> dict[str, Any]:
    """The claims a refreshed pair carries: the refresh token's own, or what ``reload_claims`` says.

    It runs before the refresh token is used up, so a refusal here leaves the
    token as it was (a retry is no reuse). None ends the login: 401, family revoked.
    """
    kept = {k: v for k, v in claims.items() if k not in _REGISTERED_CLAIMS}
    if sessions.reload_claims is None:
        return kept
    scheme = sessions.manager.scheme
    try:
        reloaded = await _maybe_await(sessions.reload_claims(subject, kept))
        if reloaded is None:
            _log.info("jwtplus: reload_claims ended a login; its family is revoked")
            await revoke_family(sessions, family, subject=subject, now=now)
            raise _http_error(scheme, "invalid", request, "reload_claims ended the login", reason="revoked")
    except web.HTTPException:
        raise
    except Exception:
        _log.warning("jwtplus: reload_claims or the store raised; refresh refused (503)", exc_info=True)
        raise _http_error(scheme, "unavailable", request, "reload_claims raised") from None
    if not isinstance(reloaded, Mapping):
        _log.warning(
            "jwtplus: reload_claims returned a %s, not claims or None; refresh refused (503)",
            type(reloaded).__name__,
        )
        raise _http_error(scheme, "unavailable", request, "reload_claims returned no claims")
    return {k: v for k, v in reloaded.items() if k not in _REGISTERED_CLAIMS}


_REGISTERED_CLAIMS = frozenset(
    {"iat", "exp", "nbf", "jti", "iss", "aud", "sub", "fam", "csrf", "type", "fresh", "auth_time", "gen"}
)


def _outlives(sessions: Sessions, exp: float) -> float:
    """Until when a store entry about a token expiring at *exp* must live: past exp by the leeway."""
    return float(exp) + sessions.manager.leeway_seconds


async def revoke_token(sessions: Sessions, claims: Mapping[str, Any], *, now: float | None = None) -> None:
    """Revoke one token, by its ``jti``, until it expires; a token without a ``jti`` raises ValueError
    (revoke its family or subject instead)."""
    jti = _text(claims, "jti")
    if jti is None:
        raise ValueError("the token has no jti to revoke it by: use revoke_family or revoke_subject")
    now = time.time() if now is None else now
    key = _store_key(sessions, cast(str, _token_tag(claims)), "revoked", jti)
    await sessions.store.put(key, now, _outlives(sessions, claims["exp"]), now)


async def revoke_family(
    sessions: Sessions, family: str, *, subject: str | None = None, now: float | None = None
) -> None:
    """Revoke every token of a login family, for as long as any of them can live.

    A family id :func:`issue_tokens` minted names its subject's slot; one minted
    before 1.1 does not, and needs *subject* (the tokens' ``sub``).
    """
    if not isinstance(family, str) or not family:
        raise ValueError(f"family={family!r} must be a non-empty string (a token's fam claim)")
    if subject is not None and (not isinstance(subject, str) or not subject):
        raise ValueError(f"subject={subject!r} must be a non-empty string (the tokens' sub claim) or None")
    tag = _family_tag(family, subject)
    if tag is None:
        raise ValueError(
            f"family={family!r} was not minted by jwtplus 1.1 and names no subject: "
            "pass subject= (the sub claim of its tokens)"
        )
    now = time.time() if now is None else now
    await _revoke_family(sessions, tag, family, now)


async def _revoke_family(sessions: Sessions, tag: str, family: str, now: float) -> None:
    """Put a family's revocation under *tag*, as long as any of its tokens can live."""
    until = _outlives(sessions, now + sessions.manager.leeway_seconds + sessions.refresh_seconds)
    await sessions.store.put(_store_key(sessions, tag, "family", family), now, until, now)


async def revoke_subject(sessions: Sessions, subject: str, *, now: float | None = None) -> None:
    """Log *subject* out everywhere: every token issued before this returns is refused from now on,
    on every server, whatever its clock; logins after it are not.

    It gives the subject a new random generation in the store; tokens carry the
    generation they were issued in (:func:`issue_tokens` reads it), so the
    comparison needs no clock. The entry lives as long as any older token can.
    """
    if not isinstance(subject, str) or not subject:
        raise ValueError(f"subject={subject!r} must be a non-empty string (a token's sub claim)")
    now = time.time() if now is None else now
    until = _outlives(sessions, now + sessions.manager.leeway_seconds + sessions.refresh_seconds)
    generation = float(secrets.randbits(52))  # a float is what a store keeps, exactly
    await sessions.store.put(
        _store_key(sessions, _slot_tag(subject), "subject", subject), generation, until, now
    )


async def end_session(
    request: web.Request,
    sessions: Sessions,
    *,
    cookies: CookiePolicy = DEFAULT_COOKIES,
    everywhere: bool = False,
    now: float | None = None,
) -> None:
    """Log out, in whatever state the tokens are: revoke the login family of the request's access
    token, or (expired, absent or revoked) of its refresh token, from its cookie (CSRF-checked) or a
    JSON ``refresh_token``; with *everywhere*, every token of the subject.

    Nothing left to revoke (logged out already, or never logged in) is no
    error, so logging out twice works; what the middleware refused (CSRF, two tokens, the store down)
    logout refuses the same way. Clear the browser's cookies with
    :func:`clear_login_cookies`. Raises ``web.HTTPForbidden`` when a cookie-borne
    token fails the CSRF check, ``web.HTTPBadRequest`` for two different tokens,
    and ``web.HTTPServiceUnavailable`` when the store cannot be reached. Mark the
    logout handler with :func:`session_route`, so it runs once the access token has expired.
    """
    scheme = sessions.manager.scheme
    now = time.time() if now is None else now
    judged = request.get(AUTH_STATUS)
    if judged in ("rejected", "malformed", "unavailable"):  # what the middleware refused, logout refuses
        raise _http_error(scheme, judged, request)
    if judged == "pass":
        claims = request[AUTH_CLAIMS]
        # the middleware lets safe methods skip CSRF; a logout, whatever its method, may not
        if claims is not None and await _maybe_await(
            csrf_check(cookies, every_method=True)(request, claims, now)
        ):
            raise _http_error(scheme, "rejected", request, "a logout without the CSRF value", reason="csrf")
    else:
        claims = None
        for token_type in ("access", "refresh"):
            status, _, claims = await _session_judge(sessions, cookies, token_type)(request, now)
            if status in ("rejected", "malformed", "unavailable"):
                raise _http_error(scheme, status, request)
            if status == "pass":
                break
    if claims is None:
        return
    subject, family, jti = _text(claims, "sub"), _text(claims, "fam"), _text(claims, "jti")
    try:
        if everywhere and subject is not None:
            await revoke_subject(sessions, subject, now=now)
        elif family is not None:
            await _revoke_family(sessions, cast(str, _token_tag(claims)), family, now)
        elif jti is not None:
            await revoke_token(sessions, claims, now=now)
        elif subject is not None:  # a token minted elsewhere, with no family or jti: only its subject is left
            _log.info("jwtplus: logout of a token without fam or jti: every token of its subject is revoked")
            await revoke_subject(sessions, subject, now=now)
        else:
            _log.warning(
                "jwtplus: logout of a token without jti, fam or sub: it stays valid until it expires"
            )
    except Exception as exc:
        _store_failed(exc, "logout refused (503)")
        raise _http_error(scheme, "unavailable", request, "the store failed") from None


# ---- Revocation stores ----


@dataclass(frozen=True, slots=True, repr=False)
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
    info: Callable[[], dict[str, Any]] | None = None
    """``info()``: what the store can say about itself without a round trip (its kind, how full)."""

    def __repr__(self) -> str:
        described = self.info() if self.info is not None else {"kind": "custom"}
        return "RevocationStore(" + ", ".join(f"{k}={v!r}" for k, v in described.items()) + ")"


def memory_store(*, max_entries: int = 100_000) -> RevocationStore:
    """A store in this process's memory: for one process, and for tests.

    Entries are dropped when they expire, and its memory is bounded by
    *max_entries* whatever the calls; when *max_entries* unexpired ones fill
    it, writes raise :class:`StoreFullError` (a refresh or logout then answers
    503) rather than forget a revocation.

    >>> memory_store(max_entries=10)
    RevocationStore(kind='memory', entries=0, max_entries=10)
    """
    if not isinstance(max_entries, int) or isinstance(max_entries, bool) or max_entries < 1:
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
        if len(expiries) > 2 * max_entries:  # rewrites of one key left stale items: keep the live ones
            expiries[:] = [(until, key) for key, (_, until) in entries.items()]
            heapq.heapify(expiries)

    def live(key: str, now: float) -> float | None:
        entry = entries.get(key)
        return entry[0] if entry is not None and entry[1] > now else None

    async def put(key: str, value: float, until: float, now: float) -> None:
        write(key, value, until, now)

    def read_now(keys: Sequence[str], now: float) -> list[float | None]:
        values = []
        for key in keys:  # live(key, now), written out: this runs on every request
            entry = entries.get(key)
            values.append(entry[0] if entry is not None and entry[1] > now else None)
        return values

    async def get_many(keys: Sequence[str], now: float) -> list[float | None]:
        return read_now(keys, now)

    async def consume(key: str, value: float, until: float, now: float) -> float | None:
        previous = live(key, now)
        if previous is None:
            write(key, value, until, now)
        return previous

    def info() -> dict[str, Any]:
        return {"kind": "memory", "entries": len(entries), "max_entries": max_entries}

    get_many._jwtplus_read_now = read_now  # type: ignore[attr-defined]  # its answer, without a coroutine
    return RevocationStore(put, get_many, consume, info)


MAX_STORE_TIMEOUT = 5.0
"""The longest socket timeout :func:`redis_store` accepts, in seconds: a request waits at most one."""
MAX_CACHE_FOR = 60.0
"""The longest *cache_for* :func:`redis_store` accepts, in seconds: how late another server's logout
may be refused here."""
_CACHED_KEYS = 10_000
"""How many keys a *cache_for* store keeps copies of, at most (the oldest make room)."""


def _bounded_client(client: Any, kind: str, waited: float) -> None:
    """Refuse a redis-py client that could stall a request: no timeout, a long one, one that ends
    before a ``WAIT`` of *waited* seconds does, or one that retries (a cluster client's retry would
    also send a write's ``WAIT`` to another node, which confirms nothing).

    Clients that are not redis-py's (no connection settings to read) are their own business.
    """
    if kind == "cluster":
        settings = getattr(client, "connection_kwargs", None)
        retry = getattr(client, "retry", None)
        forms = (
            "build it with RedisCluster(host=..., port=..., socket_timeout=1, socket_connect_timeout=1, "
            "retry=Retry(NoBackoff(), 0))"
        )
    else:
        settings = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
        retry = None if not isinstance(settings, dict) else settings.get("retry")
        forms = (
            "build it with redis.asyncio.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1), "
            "or Redis(..., socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))"
        )
    if not isinstance(settings, dict):
        return
    for name in ("socket_timeout", "socket_connect_timeout"):
        value = settings.get(name)
        if not isinstance(value, (int, float)) or not 0 < value <= MAX_STORE_TIMEOUT:
            raise ValueError(
                f"redis_store: the client's {name}={value!r} lets a hung Redis stall requests "
                f"(it must be a number of seconds up to {MAX_STORE_TIMEOUT:g}): {forms}"
            )
    if settings["socket_timeout"] <= waited:
        raise ValueError(
            f"redis_store: the client's socket_timeout={settings['socket_timeout']!r} ends before a WAIT "
            f"of replica_timeout={waited:g} s: make replica_timeout shorter, or the socket timeout longer"
        )
    retries = getattr(retry, "_retries", 0)
    if isinstance(retries, int) and retries > 0:
        raise ValueError(
            f"redis_store: the client's retry makes {retries} more attempts, with backoff, so a hung Redis "
            f"stalls a request for many timeouts: {forms}"
        )


def _client_kind(client: Any) -> str:
    """What a redis-py client talks to: "cluster", "sentinel" (a ``Sentinel.master_for`` client) or
    "server"; each can fail over but the last."""
    if callable(getattr(client, "get_node_from_key", None)):
        return "cluster"
    if hasattr(getattr(client, "connection_pool", None), "sentinel_manager"):
        return "sentinel"
    return "server"


def _written_mget(
    client: Any, fallback: Callable[[list[str]], Awaitable[list[Any]]]
) -> Callable[[list[str]], Awaitable[list[Any]]]:
    """``MGET`` on a connection of *client*'s pool, written straight to its stream and read back by the
    connection itself (redis-py's parser, socket timeout, push messages and errors, which close the
    connection). It skips the command path's retry and observability hooks and its send in
    ``asyncio.wait_for``, a task of its own before Python 3.12: on 3.11, about 140,000 instructions
    fewer per lookup. A connection without a stream to write to gets *fallback*, the client's ``mget``."""
    pool = client.connection_pool
    settings = pool.connection_kwargs
    encoding, errors = settings.get("encoding", "utf-8"), settings.get("encoding_errors", "strict")

    async def mget(names: list[str]) -> list[Any]:
        command = [b"*%d\r\n$4\r\nMGET\r\n" % (len(names) + 1)]
        for name in names:
            raw = name.encode(encoding, errors)
            command += (b"$%d\r\n" % len(raw), raw, b"\r\n")
        conn = await pool.get_connection()
        try:
            writer = getattr(conn, "_writer", None)
            if writer is None or not callable(getattr(conn, "read_response", None)):
                await pool.release(conn)
                conn = None
                return await fallback(names)
            await conn.check_health()  # a PING first, if the client asks for one (health_check_interval)
            if writer.transport.is_closing():
                raise ConnectionError("Redis closed the connection before the MGET")
            writer.write(b"".join(command))
            values = await conn.read_response()
            if not isinstance(values, list) or len(values) != len(names):
                raise ConnectionError("Redis answered an MGET with a reply of another shape")
            return values
        except BaseException:
            if conn is not None:
                await conn.disconnect()  # its reply may be half read: never reused
            raise
        finally:
            if conn is not None:
                await pool.release(conn)

    return mget


_Waiter: TypeAlias = "tuple[list[str], asyncio.Future[list[Any]]]"


def _coalesced(
    mget: Callable[[list[str]], Awaitable[list[Any]]],
) -> Callable[[list[str]], Awaitable[list[Any]]]:
    """Return ``read(names)``, *mget* shared by concurrent requests: while one lookup is in flight, the
    lookups that start meanwhile wait for it to end, then go to Redis together in one ``MGET``.

    Each lookup is still sent after its request started, so a logout acknowledged before then is
    seen; alone, a lookup goes at once. One round trip serves a burst, so Redis's cost per request
    falls as the load grows. A failed lookup fails those that waited for it too: none waits for two
    timeouts of a hung Redis.
    """
    waiting: list[_Waiter] | None = None  # None: no lookup in flight
    waiting_on: asyncio.AbstractEventLoop | None = None  # the loop of the lookup in flight
    serving: set[asyncio.Task[None]] = set()

    def fail(waiters: list[_Waiter], exc: BaseException) -> None:
        for _, future in waiters:
            if not future.done():
                future.set_exception(exc)

    async def serve(batch: list[_Waiter]) -> None:
        nonlocal waiting
        failure: BaseException = ConnectionError("the store lookup was cancelled")
        try:
            while batch:
                names = list(dict.fromkeys(name for wanted, _ in batch for name in wanted))
                found = dict(zip(names, await mget(names), strict=True))
                for wanted, future in batch:
                    if not future.done():
                        future.set_result([found[name] for name in wanted])
                batch, waiting = waiting or [], []
        except Exception as exc:  # those that started waiting meanwhile fail with it too
            failure = exc
        finally:  # also when cancelled, as the loop closes: nobody may wait for ever
            fail(batch + (waiting or []), failure)
            waiting = None

    def hand_off(failure: Exception | None) -> None:
        """The lookup in flight ended: send the lookups that waited for it, or fail them with it."""
        nonlocal waiting
        batch, waiting = waiting or [], None
        if batch and failure is not None:
            fail(batch, failure)
        elif batch:
            waiting = []  # still in flight: the batch's own lookup
            task = asyncio.get_running_loop().create_task(serve(batch))
            serving.add(task)
            task.add_done_callback(serving.discard)

    async def read(names: list[str]) -> list[Any]:
        nonlocal waiting, waiting_on
        loop = asyncio.get_running_loop()
        if waiting is not None and waiting_on is loop:
            future: asyncio.Future[list[Any]] = loop.create_future()
            waiting.append((names, future))
            return await future
        waiting, waiting_on = [], loop
        failure = None
        try:
            return await mget(names)
        except Exception as exc:
            failure = exc
            raise
        finally:
            hand_off(failure)

    return read


def redis_store(
    client: Any,
    *,
    prefix: str = "jwtplus:",
    replicas: int | None = None,
    replica_timeout: Duration = 0.5,
    cache_for: Duration = 0,
) -> RevocationStore:
    """A store in Redis, shared by every process and machine: *client* is a ``redis.asyncio.Redis``,
    a ``redis.asyncio.RedisCluster``, or a Sentinel's ``master_for(...)`` client.

    Writes are single atomic commands (``SET ... EXAT``, ``SET ... NX GET``),
    so two servers racing to consume one refresh token never both win; reads
    are one ``MGET``, in one cluster slot. jwtplus never imports redis itself:
    install it with the ``redis`` extra and pass the client.

    A write is acknowledged (a login, refresh or logout answers) only once
    *replicas* replicas hold it, waited for with ``WAIT`` for at most
    *replica_timeout*; else it raises :class:`StoreNotDurableError` (503), so
    a failover never brings back a logged-out token. None: 1 for a cluster or
    Sentinel client, 0 for a plain one (set 1 when its server has a replica
    that can take over).

    A hung Redis must cost a request one short timeout, so a redis-py client
    without ``socket_timeout`` and ``socket_connect_timeout`` (each at most
    :data:`MAX_STORE_TIMEOUT` seconds, and longer than *replica_timeout*), or one
    that retries, is refused:
    ``Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)`` is right.

    Lookups that start while one is in flight share the next ``MGET``, which a redis-py ``Redis`` or
    Sentinel client's pool connection is handed directly (its command hooks do not see it). By
    default every access token is looked up, so a logout on any server is
    refused everywhere from the next request on. *cache_for* (at most
    :data:`MAX_CACHE_FOR` seconds) trades that for speed: this process may then
    answer an access token from what it read less than *cache_for* ago, so
    another server's logout is refused here up to *cache_for* later (this
    process's own at once; refresh tokens are always looked up).
    """
    if not isinstance(prefix, str) or "{" in prefix or "}" in prefix:
        raise ValueError(
            f"prefix={prefix!r} must be a string without braces: they hold the slot tag that keeps a "
            'token\'s keys on one Redis Cluster node (say prefix="myapp:")'
        )
    kind = _client_kind(client)
    if replicas is None:
        replicas = 0 if kind == "server" else 1
    if not isinstance(replicas, int) or isinstance(replicas, bool) or not 0 <= replicas <= 16:
        raise ValueError(
            f"replicas={replicas!r} must be an int from 0 to 16, or None (1 when the client can fail over)"
        )
    waited = parse_duration(replica_timeout, name="replica_timeout")
    if not 0 < waited <= MAX_STORE_TIMEOUT:
        raise ValueError(
            f"replica_timeout={replica_timeout!r} must be more than 0 and at most "
            f"{MAX_STORE_TIMEOUT:g} seconds"
        )
    _bounded_client(client, kind, waited if replicas else 0.0)
    wait_ms = max(1, round(waited * 1000))
    horizon = parse_duration(cache_for, name="cache_for")
    if not 0 <= horizon <= MAX_CACHE_FOR:
        raise ValueError(
            f"cache_for={cache_for!r} must be from 0 (every lookup goes to Redis) to {MAX_CACHE_FOR:g} "
            'seconds, as a number or a duration such as "1s"'
        )
    cached: dict[str, tuple[float | None, float]] = {}  # key -> (value, read at): cache_for's copies
    writes = 0  # this process's writes begun and ended: a read that overlaps one is not kept

    def forget(key: str) -> None:
        nonlocal writes
        writes += 1
        cached.pop(key, None)

    def expire_at(until: float, now: float) -> int:
        return max(math.ceil(until), math.ceil(now) + 1)

    async def write(key: str, value: float, until: float, now: float, *, once: bool) -> Any:
        forget(key)
        try:
            return await send(key, value, until, now, once=once)
        finally:
            forget(key)

    async def send(key: str, value: float, until: float, now: float, *, once: bool) -> Any:
        name = prefix + key
        if not replicas:
            return await client.set(name, repr(value), exat=expire_at(until, now), nx=once, get=once)
        pipe = client.pipeline(transaction=False)  # one connection: WAIT counts the writes sent on it
        pipe.set(name, repr(value), exat=expire_at(until, now), nx=once, get=once)
        if kind != "cluster":
            pipe.execute_command("WAIT", replicas, wait_ms)
            previous, confirmed = await pipe.execute()
        else:  # WAIT to the node that owns the key; a redirected SET would be resent apart from it: refused
            await client.initialize()  # a no-op once the slots are known
            pipe.execute_command("WAIT", replicas, wait_ms, target_nodes=client.get_node_from_key(name))
            previous, confirmed = await pipe.execute(allow_redirections=False)
        if not isinstance(confirmed, int) or confirmed < replicas:
            raise StoreNotDurableError(
                f"{confirmed} of {replicas} replicas confirmed a write within {waited:g} s"
            )
        return previous

    async def put(key: str, value: float, until: float, now: float) -> None:
        await write(key, value, until, now, once=False)

    def mget(names: list[str]) -> Awaitable[list[Any]]:
        return cast("Awaitable[list[Any]]", client.mget(names))

    read: Callable[[list[str]], Awaitable[list[Any]]] = mget  # a cluster client's: one node per slot
    if kind != "cluster":  # coalesced; written to the connection when the client is redis-py's
        pooled = isinstance(
            getattr(getattr(client, "connection_pool", None), "connection_kwargs", None), dict
        )
        read = _coalesced(_written_mget(client, mget) if pooled else mget)

    async def get_many(keys: Sequence[str], now: float) -> list[float | None]:
        began = writes
        values = [
            None if value is None else float(value) for value in await read([prefix + key for key in keys])
        ]
        if horizon and writes == began:
            read_at = min(now, time.time())  # never later than the read: a copy is never kept too long
            for key, value in zip(keys, values, strict=True):
                cached.pop(key, None)
                if len(cached) >= _CACHED_KEYS:
                    del cached[next(iter(cached))]
                cached[key] = (value, read_at)
        return values

    def read_cached(keys: Sequence[str], now: float) -> list[float | None] | None:
        values = []
        for key in keys:
            entry = cached.get(key)
            if entry is None or not entry[1] <= now < entry[1] + horizon:
                return None
            values.append(entry[0])
        return values

    async def consume(key: str, value: float, until: float, now: float) -> float | None:
        previous = await write(key, value, until, now, once=True)
        return None if previous is None else float(previous)

    def info() -> dict[str, Any]:
        described = {"kind": "redis", "prefix": prefix, "client": kind, "replicas": replicas}
        return {**described, "cache_for": horizon, "cached": len(cached)} if horizon else described

    if horizon:
        get_many._jwtplus_read_now = read_cached  # type: ignore[attr-defined]
    return RevocationStore(put, get_many, consume, info)


# ---- Guards and route options ----


def _declare(target: _H, policy: RoutePolicy) -> _H:
    """Put *policy* on *target*, merged with what is there, and its guards on everything *target* wraps
    (``__wrapped__``): whichever of them the route holds, no guard is lost. Options that admit more
    (optional, any_state, locations, token_type) stay on *target*: a wrapped function that serves
    another route too must not be opened up by a decorator on its wrapper."""
    merged = _merge(getattr(target, _POLICY, None), policy)
    if isinstance(target, type):  # a web.View: its methods' policies must agree with the class's now
        for name in _VIEW_METHODS:
            own = getattr(getattr(target, name, None), _POLICY, None)
            if isinstance(own, RoutePolicy):
                _merge(merged, own)
    guards = RoutePolicy(requirements=policy.requirements)
    item: Any = target
    seen = set()
    while item is not None and id(item) not in seen:
        seen.add(id(item))
        try:
            if item is target:
                setattr(item, _POLICY, merged)
            elif policy.requirements:
                setattr(item, _POLICY, _merge(getattr(item, _POLICY, None), guards))
        except (AttributeError, TypeError):
            raise TypeError(
                f"cannot declare a route policy on {item!r}: decorate a handler function, "
                "a web.View class or one of its methods"
            ) from None
        item = getattr(item, "__wrapped__", None)
    return target


def _guarded(handler: _H, policy: RoutePolicy) -> _H:
    """Declare *policy* on *handler*, wrapped once so that it fails loudly where no jwtplus middleware
    enforced it (a guard that nothing enforces must not look like one that passed)."""
    if isinstance(handler, type):  # a web.View class: the middleware reads the class
        for name in _VIEW_METHODS:  # and each method it defines fails loudly where nothing enforces it
            method = vars(handler).get(name)
            if callable(method) and not getattr(method, "_jwtplus_guard", False):
                setattr(handler, name, _guarded(method, RoutePolicy()))
        return _declare(handler, policy)
    if not callable(handler):
        raise TypeError(f"a guard decorates a handler, got {handler!r}")
    if getattr(handler, "_jwtplus_guard", False):
        return _declare(handler, policy)

    @functools.wraps(handler)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        first = args[0] if args else None
        request = first if isinstance(first, web.BaseRequest) else getattr(first, "request", None)
        if not isinstance(request, web.BaseRequest) or _ENFORCED not in request:
            _log.error("jwtplus: a guarded handler ran without the jwtplus middleware; refused")
            raise _not_installed()
        return await handler(*args, **kwargs)

    guarded._jwtplus_guard = True  # type: ignore[attr-defined]
    return _declare(cast(_H, guarded), policy)


def _guard(requirement: Requirement) -> Callable[[_H], _H]:
    def decorate(handler: _H) -> _H:
        return _guarded(handler, RoutePolicy(requirements=(requirement,)))

    return decorate


def _always(claims: dict[str, Any]) -> bool:
    return True


def _fresh(claims: dict[str, Any]) -> bool:
    return claims.get("fresh") is True


_fresh.jwtplus_reason = "needs_fresh"  # type: ignore[attr-defined]


def login_required(handler: _H) -> _H:
    """Decorate a handler (a function, a ``web.View`` or one of its methods) to answer 401 (or 403, 503)
    unless the request carries an accepted token. Enforced by the middleware before the handler runs."""
    return _guard((_always, Action.UNAUTHORIZED))(handler)


def fresh_login_required(handler: _H) -> _H:
    """Decorate a sensitive handler: 401 unless the token came from a password login, not a refresh."""
    return _guard((_fresh, Action.UNAUTHORIZED))(handler)


def require(predicate: Callable[[dict[str, Any]], bool | Awaitable[bool]]) -> Callable[[_H], _H]:
    """Decorate a handler to answer 403 ``insufficient_scope`` unless *predicate(claims)* holds (is truthy;
    a predicate that raises is logged and refuses)."""
    if not callable(predicate):
        raise TypeError(f"require() takes a predicate on the claims, got {predicate!r}")
    return _guard((predicate, Action.FORBIDDEN))


def require_user(predicate: Callable[[Any], bool | Awaitable[bool]]) -> Callable[[_H], _H]:
    """Decorate a handler to answer 403 ``insufficient_scope`` unless *predicate(carry)* holds: it sees
    what the identifier returned (the user it loaded, with a role from the database, say), where
    :func:`require` sees the claims."""
    if not callable(predicate):
        raise TypeError(f"require_user() takes a predicate on the identifier's result, got {predicate!r}")

    async def on_carry(carry: Any) -> bool:
        return bool(await _maybe_await(predicate(carry)))

    on_carry.jwtplus_on_carry = True  # type: ignore[attr-defined]
    on_carry.__name__ = on_carry.__qualname__ = _name(predicate)
    return _guard((on_carry, Action.FORBIDDEN))


def _same(actual: Any, value: Any) -> bool:
    return type(actual) is type(value) and actual == value  # True is no 1, 7.0 no 7


def require_claims(**expected: Any) -> Callable[[_H], _H]:
    """Decorate a handler to need these claim values: equal, an item of a list claim, or a word of a
    space-separated ``scope``.

    >>> require_claims(role="admin")  # doctest: +ELLIPSIS
    <function ...>
    """
    if not expected:
        raise TypeError("require_claims() needs at least one claim=value")
    for name, value in expected.items():
        if not isinstance(value, (str, int, float, bool)):
            raise TypeError(f"require_claims({name}={value!r}): expect a string, number or bool")

    def holds(claims: dict[str, Any]) -> bool:
        for name, value in expected.items():
            actual = claims.get(name)
            in_list = isinstance(actual, list) and any(_same(item, value) for item in actual)
            in_scope = name == "scope" and isinstance(actual, str) and value in actual.split(" ")
            if not (_same(actual, value) or in_list or in_scope):
                return False
        return True

    return require(holds)


def route_options(
    *,
    optional: bool = False,
    locations: Iterable[str] | None = None,
    token_type: str = "access",  # noqa: S107 (a token type, not a password)
) -> Callable[[_H], _H]:
    """Decorate a handler with per-route options, read by the middleware.

    *optional*: no token is fine (the handler runs with status "missing"), but
    an invalid, expired or revoked token is still 401. *locations*: where this
    route's token may come from ("header", "cookie", "query", "body"), say
    ``("query",)`` for a WebSocket handshake. *token_type*: "access" or "refresh".
    """
    policy = RoutePolicy(
        optional=bool(optional),
        locations=None if locations is None else tuple(locations),
        token_type=_token_type(token_type),
    )

    def decorate(handler: _H) -> _H:
        return _declare(handler, policy)

    return decorate


def session_route(handler: _H) -> _H:
    """Mark a refresh or logout handler: it runs whatever the state of the access token (expired,
    revoked, absent), because :func:`refresh_session` and :func:`end_session` judge the tokens
    themselves. It needs no whitelist entry."""
    return _declare(handler, RoutePolicy(any_state=True))


# ---- WebSockets ----

SOCKET_REFUSED = 4401
"""The close code of a WebSocket whose token expired (reason "token expired") or was refused:
revoked, replaced by an invalid one, or for another user (reason "token refused")."""
SOCKET_UNAVAILABLE = 1013
"""The close code (RFC 6455 "try again later") when the token cannot be checked: the store is down."""


async def authenticated_messages(
    request: web.Request, socket: web.WebSocketResponse, *, recheck: Duration = "30s"
) -> AsyncIterator[aiohttp.WSMessage]:
    """Yield the messages of *socket*, a WebSocket opened by an authenticated handshake, until its token
    stops being valid; then close it with :data:`SOCKET_REFUSED` (4401) and stop.

    One task per connection judges the token again, with the route's whole
    pipeline (revocation included), when it expires and every *recheck*; no
    timer runs per message. A client keeps the socket open past its token's
    expiry by sending a fresh access token of the same subject (``sub``) and issuer,
    ``{"type": "authenticate", "token": "..."}``; it is answered
    ``{"type": "authenticated", "exp": ...}`` and not yielded. Prepares *socket* if needed.
    """
    parts = request.get(_PIPELINE)
    if parts is None:
        raise _not_installed()
    interval = parse_duration(recheck, name="recheck")
    if interval <= 0:
        raise ValueError(f"recheck={recheck!r} must be positive: use {_DURATION_FORMS}")
    if not socket.prepared:
        await socket.prepare(request)
    claims, status = request.get(AUTH_CLAIMS), request.get(AUTH_STATUS, "invalid")
    offered: list[str] = []  # the token of the last re-authentication, once it passed
    renewed = asyncio.Event()

    def current_token(request: web.Request) -> str | Awaitable[str | None] | None:
        return offered[-1] if offered else parts.token_getter(request)

    def judge(getter: TokenGetter) -> Authenticator:
        return _authenticator(parts.decode, getter, parts.identifier, parts.token_type, parts.checks)

    async def close(status: AuthStatus) -> None:
        if status == "unavailable":
            await socket.close(code=SOCKET_UNAVAILABLE, message=b"try again later")
        else:
            reason = b"token expired" if status == "expired" else b"token refused"
            await socket.close(code=SOCKET_REFUSED, message=reason)

    if status != "pass" or claims is None:  # an optional route, or one that runs in any state
        await close(status if status != "pass" else "invalid")
        return
    rejudge = judge(current_token)
    # who the socket is for: a renewal must be the same subject of the same issuer
    subject, deadline = (claims.get("iss"), claims.get("sub")), [float(claims["exp"]) + parts.leeway]

    async def watch() -> None:
        while not socket.closed:
            with contextlib.suppress(asyncio.TimeoutError):  # a renewal wakes it: the deadline moved
                await asyncio.wait_for(renewed.wait(), max(0.0, min(interval, deadline[0] - parts.clock())))
            renewed.clear()
            result = await rejudge(request, parts.clock())
            if result.status != "pass" or result.claims is None:
                await close(result.status)
                return
            deadline[0] = max(deadline[0], float(result.claims["exp"]) + parts.leeway)

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        async for message in socket:
            offer = _offered_token(message)
            if offer is None:
                yield message
                continue
            result = await judge(functools.partial(_given_token, offer))(request, parts.clock())
            fresh = result.claims or {}
            same = (
                isinstance(subject[1], str) and subject[1] and (fresh.get("iss"), fresh.get("sub")) == subject
            )
            if result.status != "pass" or not same:
                await close(result.status if result.status != "pass" else "rejected")
                break
            offered[:] = [offer]
            deadline[0] = float(fresh["exp"]) + parts.leeway
            renewed.set()
            await socket.send_json({"type": "authenticated", "exp": fresh["exp"]})
    finally:
        watcher.cancel()


def _given_token(token: str, request: web.Request) -> str:
    return token


def _offered_token(message: aiohttp.WSMessage) -> str | None:
    """The token of a re-authentication message, ``{"type": "authenticate", "token": "..."}``, or None
    for any other message ("" for one that names the type without a usable token)."""
    if message.type != aiohttp.WSMsgType.TEXT or '"authenticate"' not in message.data:
        return None
    try:
        body = json.loads(message.data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict) or body.get("type") != "authenticate":
        return None
    token = body.get("token")
    return token if isinstance(token, str) else ""


# ==== Part III: aiohttp wiring and 0.2.0 compatibility ====

# ---- aiohttp wiring ----

JWTPLUS_HELPER = web.AppKey["JWTHelper"]("jwtplus_helper")
"""Where :func:`setup` keeps the app's JWTHelper."""


def setup(app: web.Application, helper: JWTHelper) -> JWTHelper:
    """Install *helper*'s middleware on *app* (both in one layer) and keep it at ``app[JWTPLUS_HELPER]``.

    Once per app: a second call, or jwtplus middlewares already in ``app.middlewares``, raise RuntimeError
    (every request would be judged twice)."""
    if not isinstance(helper, JWTHelper):
        raise TypeError(f"helper must be a JWTHelper, got {helper!r}")
    if JWTPLUS_HELPER in app:
        raise RuntimeError("jwtplus.setup() was called twice on this app: call it once")
    if any(getattr(m, "jwtplus_kind", None) for m in app.middlewares):
        raise RuntimeError(
            "jwtplus middlewares are already in app.middlewares: call jwtplus.setup(app, helper) or install "
            "helper.pre_jwt_identifier() and helper.post_jwt_router(), not both"
        )
    app.middlewares.append(helper.middleware())
    app[JWTPLUS_HELPER] = helper
    return helper


# ---- Testing your app ----


def auth_headers(
    manager: SecretManager,
    claims: Mapping[str, Any],
    *,
    cookies: CookiePolicy | None = None,
    now: float | None = None,
    expires_in: Duration | None = None,
) -> dict[str, str]:
    """Headers that log a test request in as *claims*: ``Authorization: <scheme> <token>``; with
    *cookies*, what a logged-in browser sends instead (the token and CSRF cookies, and the CSRF header).

    For aiohttp's test client, whose cookie jar never sends the default ``Secure``
    cookies to ``http://127.0.0.1``::

        await client.get("/api/me", headers=jwtplus.auth_headers(manager, {"sub": "ann", "username": "ann"}))
    """
    if cookies is None:
        token = encode_token(manager, claims, now=now, expires_in=expires_in)
        return {"Authorization": f"{manager.scheme} {token}"}
    if not isinstance(cookies, CookiePolicy):
        raise TypeError(f"cookies must be a CookiePolicy or None, got {cookies!r}")
    login = web.Response()
    token = set_login_cookies(login, manager, claims, cookies=cookies, now=now, expires_in=expires_in)
    csrf = login.cookies[cookies.csrf_cookie].value
    return {
        "Cookie": f"{cookies.token_cookie}={token}; {cookies.csrf_cookie}={csrf}",
        cookies.csrf_header: csrf,
    }


# ---- The seed's names ----


@dataclass(frozen=True, slots=True, eq=False)
class JWTHelper:
    """The seed's configuration object: where tokens come from, who passes, and the routing table.

    It translates its arguments into the functional pieces: a
    :class:`RoutingRules`, a token getter, the checks (CSRF under *cookies*,
    revocation under *sessions*, then *checks*) and the middlewares. Without
    page handlers it is in API mode: every path that is not whitelisted needs a
    valid token (401/403). Put ``pre_jwt_identifier()`` before
    ``post_jwt_router()`` in the app's middlewares, or call :func:`setup`.
    """

    unauthorized_return_route: str = ""
    """The login page's path: a logged-in GET of it gets the authorized page."""
    unauthorized_return_route_handler: Handler | None = None
    """The login page: served for page requests without an accepted token."""
    authorized_return_page_handler: Handler | None = None
    """The app page: served to logged-in GETs of the login route and of unknown paths."""
    secret_manager: SecretManager | None = None
    """None: a new SecretManager() with a random secret (or ``sessions.manager``)."""
    token_getter: TokenGetter | None = None
    """None: read ``Authorization: <scheme> <token>`` with the manager's scheme (and the cookie)."""
    identifier: Identifier | None = None
    """None: :func:`basic_identifier` (the seed's: a ``username``), or with *sessions*, whose tokens
    carry ``sub``, :func:`user_identifier`."""
    whitelist: _Patterns = ()
    """Paths whose handler always runs."""
    protected_apis: _Patterns = ()
    """Paths that answer 401/403 rather than a page."""
    _: KW_ONLY
    cookies: CookiePolicy | None = None
    """Also read the token from cookies under this policy (for browsers), with its CSRF check."""
    sessions: Sessions | None = None
    """Check every token against these sessions' revocation store."""
    checks: Iterable[Check] = ()
    """Checks of your own, run after CSRF and revocation (see :func:`authenticate`)."""
    cache_size: int = 10_000
    """How many verified tokens to remember (see :func:`cached_decoder`); 0: none."""
    clock: Callable[[], float] = time.time
    """What time it is, in Unix seconds (see :func:`authentication_middleware`)."""
    on_refusal: OnRefusal | None = None
    """Shapes the answer to each refusal (see :class:`Refusal`); None: jwtplus's uniform answers."""
    manager: SecretManager = field(init=False, repr=False)
    """The secret manager in use (the given one, or a new one)."""
    rules: RoutingRules = field(init=False, repr=False)
    """The routing table this helper's router applies."""
    all_checks: tuple[Check, ...] = field(init=False, repr=False)
    """Every check the pipeline runs, in order."""

    def __post_init__(self) -> None:
        setattr_ = functools.partial(object.__setattr__, self)
        for name in (
            "unauthorized_return_route_handler",
            "authorized_return_page_handler",
            "token_getter",
            "identifier",
            "clock",
            "on_refusal",
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
        if not isinstance(self.cache_size, int) or isinstance(self.cache_size, bool) or self.cache_size < 0:
            raise ValueError(f"cache_size={self.cache_size!r} must be a whole number of tokens (0: no cache)")
        setattr_("manager", manager)
        own = _validated_checks(self.checks)
        contributed = [] if _csrf_policy(own) else [csrf_check(self.cookies or DEFAULT_COOKIES)]
        if self.sessions is not None:
            contributed.append(revocation_check(self.sessions))
        setattr_("all_checks", (*contributed, *own))
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

    def _getter(self) -> TokenGetter | None:
        """The seed's getter follows the manager's scheme; given cookies, the token cookie is read too."""
        if self.token_getter is not None and self.token_getter is not basic_token_getter:
            return self.token_getter
        return None if self.cookies is None else _header_or_cookie_getter(self.manager.scheme, self.cookies)

    def _identifier(self) -> Identifier:
        if self.identifier is not None:
            return self.identifier
        return basic_identifier if self.sessions is None else user_identifier

    def pre_jwt_identifier(self) -> Middleware:
        """The first middleware: authenticate the request (see :func:`authentication_middleware`).

        ``post_jwt_router()`` must come after it: without it every request answers 500 (and the log says
        why), since the routing table would not apply."""
        return _authentication(
            self.manager,
            (),
            self._getter(),
            self._identifier(),
            self.all_checks,
            self.cache_size,
            self.clock,
            self.on_refusal,
            needs_router=True,
        )

    def post_jwt_router(self) -> Middleware:
        """The second middleware: route by the table (see :func:`router_middleware`)."""
        return router_middleware(
            rules=self.rules,
            login_page_handler=self.unauthorized_return_route_handler,
            app_page_handler=self.authorized_return_page_handler,
            scheme=self.manager.scheme,
            on_refusal=self.on_refusal,
        )

    def middleware(self) -> Middleware:
        """Both in one middleware (see :func:`jwt_middleware`): what :func:`setup` installs."""
        return jwt_middleware(
            manager=self.manager,
            rules=self.rules,
            token_getter=self._getter(),
            identifier=self._identifier(),
            checks=self.all_checks,
            login_page_handler=self.unauthorized_return_route_handler,
            app_page_handler=self.authorized_return_page_handler,
            cache_size=self.cache_size,
            clock=self.clock,
            on_refusal=self.on_refusal,
        )


def show_request_info(request: web.Request) -> None:
    """Print a request's method, path, auth status and who it is (the carry's ``username`` or ``sub``):
    never a claim that could be a secret or a handle (a token, ``csrf``, ``jti``, ``fam``)."""
    status, carry = request.get(AUTH_STATUS), request.get(AUTH_CARRY)
    identity: Any = None
    if isinstance(carry, Mapping):
        identity = next(
            (carry[name] for name in ("username", "sub") if isinstance(carry.get(name), str)), None
        )
    elif isinstance(carry, (str, int)) and not isinstance(carry, bool):
        identity = carry
    print(
        f"{request.method} {request.path} from {request.remote}: auth_status={status} identity={identity!r}"
    )

"""Tests for jwtplus: real aiohttp apps through the test client, and the pure pieces alone.

In the three parts of jwtplus.py: I tokens and requests (durations, configuration,
keys and rotation, encode/decode, the cache, getters, the pipeline and its checks,
the routing decision, the middlewares and the seed's table, a hostile client's
tokens, headers and paths); II browsers and sessions (cookies and CSRF, sessions,
logout, guards and route options); III aiohttp wiring, the README's snippets, and
the examples and servers as real processes, a real browser and a real Redis.

One vocabulary throughout: SECRET and NOW (the fixed clock), manager() for a
SecretManager, make_client for a served app, bearer() for a header, and a ``ran``
list (or the HITS app key of the path tests) that proves whether a handler ran.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import contextlib
import dataclasses
import functools
import gzip
import hashlib
import hmac
import inspect
import itertools
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import textwrap
import time
import urllib.parse
import warnings
import zipfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

import aiohttp
import jwt
import pytest
import yarl
from aiohttp import ClientSession, ClientTimeout, DummyCookieJar, TCPConnector, web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from jwt.algorithms import get_default_algorithms
from multidict import CIMultiDict, CIMultiDictProxy
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

import jwtplus
from jwtplus import Action, JWTHelper, RoutingRules, SecretManager, decide

SECRET = bytes(range(0x21, 0x61))  # 64 printable bytes: enough for HS512, so neither jwtplus nor PyJWT warns
NOW = 1_700_000_000  # the one fixed clock of decode_token and friends; servers use the real clock


def manager(**kwargs: Any) -> SecretManager:
    kwargs.setdefault("secret", SECRET)
    return SecretManager(**kwargs)


# ==== Part I: tokens and requests ====

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
    assert sm.rotation_seconds == 0
    token = sm.encode({"username": "ann"})
    assert SecretManager().decode is not None
    with pytest.raises(jwt.InvalidSignatureError):
        SecretManager().decode(token)  # a new random secret each time
    assert sm.decode(token)["username"] == "ann"


def test_secret_manager_is_frozen_and_hides_its_secret() -> None:
    for sm in (manager(refresh_interval="1h"), SecretManager(secret="s3cr3t-" * 6, audience="web")):
        shown = repr(sm)
        assert "0123456789:;" not in shown and "s3cr3t" not in shown and "_key" not in shown
        assert "_audiences" not in shown
        with pytest.raises(AttributeError):
            sm.exptime = "1d"  # type: ignore[misc]
    with pytest.raises(TypeError):  # audience, issuer, leeway and allow_weak_secret are keyword-only
        SecretManager(SECRET, 0, "Bearer", "HS256", "30d", "web")  # type: ignore[misc]


def test_sessions_are_frozen_keyword_only_and_check_their_manager() -> None:
    sessions = sessions_for()
    with pytest.raises(AttributeError):
        sessions.reuse_grace = 30  # type: ignore[misc]
    with pytest.raises(TypeError):
        jwtplus.Sessions(manager())  # type: ignore[misc]
    with pytest.raises((AttributeError, TypeError)):
        sessions.extra = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="manager must be a SecretManager"):
        jwtplus.Sessions(manager="secret")  # type: ignore[arg-type]
    # without rotation a refresh token may outlive the manager's exptime: its exp is its own
    assert sessions_for(manager=manager(exptime="1d"), refresh_exptime="60d").refresh_seconds == 60 * 86400


def test_secret_manager_accepts_seed_positional_arguments() -> None:
    sm = SecretManager(SECRET * 2, "1h", "JWT", "HS512", "15m", leeway=5)
    assert (sm.rotation_seconds, sm.scheme, sm.algorithm, sm.exptime_seconds, sm.leeway_seconds) == (
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
def test_a_secret_shorter_than_the_hash_is_refused_unless_allowed(algorithm: str, size: int) -> None:
    for secret in (b"x" * (size - 1), "x" * (size - 1), "abc"):
        with pytest.raises(ValueError, match=f"needs at least {size}") as raised:
            SecretManager(secret=secret, algorithm=algorithm)
        message = str(raised.value)
        assert f"secret is {len(secret)} bytes" in message
        assert f"secrets.token_urlsafe({size})" in message
        assert 'secret=""' in message
        assert "allow_weak_secret=True" in message
        assert str(secret) not in message.replace("secrets.", "")  # the secret itself is never shown
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning from jwtplus nor PyJWT either way
        sm = SecretManager(secret=b"x" * (size - 1), algorithm=algorithm, allow_weak_secret=True)
        assert sm.decode(sm.encode({"username": "ann"}))["username"] == "ann"
        SecretManager(secret=b"x" * size, algorithm=algorithm)
        SecretManager(secret=secrets.token_urlsafe(size), algorithm=algorithm)
        SecretManager(algorithm=algorithm)  # a random one


def test_a_three_letter_secret_is_brute_forced_from_one_token() -> None:
    """Why short secrets are refused: one token gives the secret back, and then any token is forged."""
    victim = SecretManager(secret="abc", allow_weak_secret=True)
    signing_input, _, signature = victim.encode({"username": "jacky", "role": "user"}).rpartition(".")
    guesses = (
        "".join(letters) for n in (1, 2, 3) for letters in itertools.product(string.ascii_lowercase, repeat=n)
    )
    found = next(guess for guess in guesses if hs(guess.encode(), signing_input) == signature)
    assert found == "abc"
    forged = SecretManager(secret=found, allow_weak_secret=True).encode({"username": "x", "role": "admin"})
    assert victim.decode(forged)["role"] == "admin"


def test_seed_testsecret_works_when_allowed() -> None:
    with pytest.raises(ValueError, match="allow_weak_secret"):
        SecretManager(secret="testsecret", refresh_interval="30d", exptime="30d")
    sm = SecretManager(secret="testsecret", refresh_interval="30d", exptime="30d", allow_weak_secret=True)
    assert sm.decode(sm.encode({"username": "jacky"}))["username"] == "jacky"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"leeway": "5m"}, r"leeway='5m' must be shorter than 300 seconds"),
        ({"leeway": "1d", "exptime": "15m"}, r"leeway='1d' must be shorter"),
        ({"leeway": 60, "exptime": 60}, "and than exptime=60"),
        ({"leeway": 299.5, "exptime": 120}, "and than exptime=120"),
    ],
)
def test_a_leeway_that_outlives_tokens_is_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SecretManager(secret=SECRET, **settings)


def test_a_leeway_of_seconds_is_accepted() -> None:
    sm = SecretManager(secret=SECRET, leeway=299, exptime="15m")
    assert sm.leeway_seconds == 299
    assert SecretManager(secret=SECRET, leeway="5s", exptime=6).leeway_seconds == 5


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"reuse_grace": 61}, "reuse_grace=61 must be at most 60 seconds"),
        ({"reuse_grace": "30d"}, "reuse_grace='30d' must be at most 60 seconds"),
        ({"reuse_grace": 30, "access_exptime": 30}, "shorter than access_exptime=30"),
        ({"access_exptime": 5, "leeway": 5}, "access_exptime=5 must be longer than the manager's leeway=5"),
    ],
)
def test_session_settings_that_switch_protection_off_are_refused(
    settings: dict[str, Any], message: str
) -> None:
    leeway = settings.pop("leeway", 0)
    with pytest.raises(ValueError, match=re.escape(message)):
        jwtplus.Sessions(manager=SecretManager(secret=SECRET, leeway=leeway), **settings)


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
    assert jwt.get_unverified_header(token)["kid"] == str(period) == "472222"
    expected = hmac.new(SECRET, b"jwtplus-rotation-v1:472222", hashlib.sha256).digest()
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
    with pytest.raises(jwt.ExpiredSignatureError):  # ...but the period's key retires at its window's end
        sm.decode(token, now=end)
    with pytest.raises(jwtplus.KeyIdError):  # and a period cannot be used before it starts
        sm.decode(sm.encode({}, now=NOW + interval), now=(period + 1) * interval - 1)


def test_a_forged_token_naming_a_closed_period_is_invalid_not_expired() -> None:
    sm = manager(refresh_interval=100, exptime=50)
    forger = SecretManager(secret=b"not the secret, but 32 bytes long", refresh_interval=100, exptime=50)
    with pytest.raises(jwt.InvalidSignatureError):
        sm.decode(forger.encode({}, now=NOW), now=NOW + 1000)
    with pytest.raises(jwt.ExpiredSignatureError):
        sm.decode(sm.encode({}, now=NOW), now=NOW + 1000)


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
    with pytest.raises(ValueError, match=r"payload\['exp'\]='9999999999': the exp claim must be a number"):
        sm.encode({"exp": "9999999999"})
    with pytest.raises(ValueError, match="iat"):
        sm.encode({}, now=-5)
    with pytest.raises(TypeError):
        sm.encode({"when": object()})


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"sub": 42}, r"payload\['sub'\]=42 must be a string \(RFC 7519"),
        ({"iss": ["a"]}, r"payload\['iss'\]=\['a'\] must be a string"),
        ({"jti": 7}, r"payload\['jti'\]=7 must be a string"),
        ({"sub": None}, r"payload\['sub'\]=None must be a string"),
        ({"aud": 5}, r"payload\['aud'\]=5 must be a string or a list of strings"),
        ({"aud": ["web", 5]}, r"payload\['aud'\]=\['web', 5\] must be a string or a list of strings"),
    ],
)
def test_encode_refuses_string_claims_of_other_types(claims: dict[str, Any], message: str) -> None:
    sm = manager()
    with pytest.raises(ValueError, match=message):
        sm.encode(claims)
    # what such a token would meet: jwtplus and PyJWT both refuse it
    forged = forge({"alg": "HS256", "typ": "JWT"}, {"exp": NOW + 60, **claims})
    with pytest.raises(jwt.InvalidTokenError):
        sm.decode(forged, now=NOW)
    if "sub" in claims or "jti" in claims:  # PyJWT checks these two on decode (iss only when it is required)
        with pytest.raises(jwt.InvalidTokenError):
            jwt.decode(forged, SECRET, algorithms=["HS256"], options={"verify_exp": False})


def test_encode_keeps_string_claims_and_audience_lists() -> None:
    sm = manager(audience=["web", "app"])
    token = sm.encode({"sub": "42", "iss": "me", "jti": "j", "aud": ["web"]}, now=NOW)
    assert sm.decode(token, now=NOW) | {"iat": 0, "exp": 0} == {
        "sub": "42",
        "iss": "me",
        "jti": "j",
        "aud": ["web"],
        "iat": 0,
        "exp": 0,
    }


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
    for odd in ({"app": True}, ["app", 7], 7, None, True):  # an object's keys are no audience
        odd_token = forge({"alg": "HS256", "typ": "JWT"}, {"exp": NOW + 60, "iss": sm.issuer, "aud": odd})
        with pytest.raises(jwt.InvalidAudienceError):
            sm.decode(odd_token, now=NOW)
        if odd is not None:
            with pytest.raises(ValueError, match="must be a string or a list of strings"):
                sm.encode({"aud": odd})


def test_datetime_time_claims_become_seconds() -> None:
    sm = manager()
    at = datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)  # NOW
    token = sm.encode({"iat": at, "nbf": at, "exp": at + timedelta(hours=1)}, now=NOW)
    claims = sm.decode(token, now=NOW)
    assert (claims["iat"], claims["nbf"], claims["exp"]) == (NOW, NOW, NOW + 3600)
    assert all(type(claims[name]) is int for name in ("iat", "nbf", "exp"))
    with pytest.raises(jwt.ExpiredSignatureError):
        sm.decode(token, now=NOW + 3600)
    with pytest.raises(ValueError, match="exp"):
        sm.encode({"exp": datetime(1960, 1, 1, tzinfo=timezone.utc)})


@pytest.mark.parametrize("token", ["a.b.c", "0.0.0", "eyJ.eyJ.AAAAA", "x.y."])
def test_decode_refuses_impossible_base64_lengths_with_decode_error(token: str) -> None:
    with pytest.raises(jwt.DecodeError):
        manager().decode(token, now=NOW)


def test_decode_of_an_expired_token_raises_expired_signature() -> None:
    sm = manager(exptime=10)
    with pytest.raises(jwt.ExpiredSignatureError):
        sm.decode(sm.encode({}, now=NOW), now=NOW + 10)


# ---- The verified-token cache ----


def test_cache_hits_skip_verification_and_stay_bounded() -> None:
    sm = manager()
    decode = jwtplus.cached_decoder(sm, size=2)
    a, b, c = (sm.encode({"n": n}, now=NOW) for n in range(3))
    misses = []
    for token in (a, a, b, a, c, a, b):
        before = decode.cache_info().misses
        decode(token, NOW + 1)
        if decode.cache_info().misses > before:
            misses.append(token)
    assert misses == [a, b, c, b]  # a stayed (used most recently), b was evicted by c
    assert decode.cache_info() == jwtplus.CacheInfo(hits=3, misses=4, maxsize=2, currsize=2)
    with pytest.raises(ValueError, match="size"):
        jwtplus.cached_decoder(sm, size=-1)


def test_a_cached_token_never_outlives_its_exp() -> None:
    sm = manager(exptime=60, leeway=5)
    decode = jwtplus.cached_decoder(sm)
    token = sm.encode({}, now=NOW)
    assert decode(token, NOW + 64.9)["iat"] == NOW
    with pytest.raises(jwt.ExpiredSignatureError):
        decode(token, NOW + 65)


def test_a_cached_token_never_outlives_its_rotation_window() -> None:
    sm = manager(refresh_interval=100, exptime=50)
    decode = jwtplus.cached_decoder(sm)
    token = sm.encode({"exp": NOW + 10_000}, now=NOW)
    end = (jwtplus.period_of(NOW, 100) + 1) * 100 + 50
    assert decode(token, end - 0.001)
    with pytest.raises(jwt.ExpiredSignatureError):
        decode(token, end)


def test_failures_are_never_cached_and_hits_are_copies() -> None:
    sm = manager()
    decode = jwtplus.cached_decoder(sm)
    bad = tampered(sm.encode({"username": "ann"}, now=NOW))
    for _ in range(2):
        with pytest.raises(jwt.InvalidSignatureError):
            decode(bad, NOW)
    assert decode.cache_info() == jwtplus.CacheInfo(hits=0, misses=2, maxsize=10_000, currsize=0)
    good = sm.encode({"username": "ann"}, now=NOW)
    decode(good, NOW)["username"] = "mallory"
    assert decode(good, NOW)["username"] == "ann"


async def test_a_cached_token_is_still_checked_for_revocation(make_client: Any) -> None:
    ran: list[str] = []
    sessions = sessions_for()
    client = await make_client(app=session_app(sessions, ran))
    pair = await log_in(client)
    assert (await client.get("/me", headers=bearer(pair["access"]))).status == 200  # now cached
    await jwtplus.revoke_token(sessions, sessions.manager.decode(pair["access"]))
    assert (await client.get("/me", headers=bearer(pair["access"]))).status == 401


# ---- Asymmetric keys: EdDSA derived from the secret, static ES256/RS256/PS256/EdDSA ----
# Keys are made once per module (RSA generation is slow); tokens are checked by jwtplus, by PyJWT
# and, through the JWKS handler, by PyJWT's PyJWKClient and Node's jose.

ALGORITHMS = ("EdDSA", "ES256", "RS256", "PS256")
KIND = {"EdDSA": "ed25519", "ES256": "p256", "RS256": "rsa", "PS256": "rsa"}
"""The kind of key each algorithm signs with here (see private_key)."""
PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
ED25519_ORDER = 2**252 + 27742317777372353535851937790883648493
PYJWT_ANY_TIME = {"verify_exp": False, "verify_iat": False, "verify_nbf": False}
"""PyJWT checks times on the real clock; tokens minted at the fixed NOW are checked by jwtplus."""
ED25519_LABEL = b"jwtplus-ed25519-v1:"
_MAKERS: dict[str, Callable[[], Any]] = {
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "ed448": ed448.Ed448PrivateKey.generate,
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "secp256k1": lambda: ec.generate_private_key(ec.SECP256K1()),
    "rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "rsa1024": lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505
    "rsa2047": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2047),  # noqa: S505
}


@functools.cache
def private_key(kind: str) -> Any:
    """One key per kind and module; "p256-b" and the like are a second, different key of the kind."""
    return _MAKERS[kind.removesuffix("-b")]()


def pem(key: Any, *, private: bool = True) -> str:
    if private:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def jwk_of(key: Any, *, private: bool = True, **extra: Any) -> dict[str, Any]:
    """The key's JWK as PyJWT writes it (private members included when *private*)."""
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        algorithm = "EdDSA"
    else:
        algorithm = "ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256"
    value = get_default_algorithms()[algorithm].to_jwk(key if private else key.public_key(), as_dict=True)
    return {**value, **extra}


THUMBPRINT_MEMBERS = {"OKP": ("crv", "kty", "x"), "EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}


def thumbprint(key: Any) -> str:
    """RFC 7638: SHA-256 of the required public members, sorted, without whitespace."""
    jwk = jwk_of(key, private=False)
    members = {name: jwk[name] for name in THUMBPRINT_MEMBERS[jwk["kty"]]}
    return b64url(
        hashlib.sha256(json.dumps(members, sort_keys=True, separators=(",", ":")).encode()).digest()
    )


def keys_in(key: Any, form: str, *, private: bool) -> Any:
    """*key* as keys= takes it in *form*; the JWK forms carry their own kid."""
    if form == "pem":
        return [pem(key, private=private)]
    jwk = jwk_of(key, private=private, kid="key-2025")
    return {"jwk": [jwk], "jwk json": [json.dumps(jwk)], "jwks": {"keys": [jwk]}}[form]


def static(algorithm: str, *keys: Any, **kwargs: Any) -> SecretManager:
    return SecretManager(algorithm=algorithm, keys=list(keys), **kwargs)


def derived(interval: int = 3600, exptime: jwtplus.Duration = "2h", **kwargs: Any) -> SecretManager:
    kwargs.setdefault("secret", SECRET)
    return SecretManager(algorithm="EdDSA", refresh_interval=interval, exptime=exptime, **kwargs)


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def sign_with(algorithm: str, private: Any, signing_input: str) -> bytes:
    """A JWS signature of *signing_input* made with cryptography alone (raw R‖S for ES256)."""
    data = signing_input.encode("ascii")
    if algorithm == "EdDSA":
        return bytes(private.sign(data))
    if algorithm == "ES256":
        r, s = decode_dss_signature(private.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    pad = (
        padding.PKCS1v15()
        if algorithm == "RS256"
        else padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    )
    return bytes(private.sign(data, pad, hashes.SHA256()))


def signed(algorithm: str, private: Any, header: Any, payload: Any) -> str:
    """A compact JWS over any *header* and *payload* signed by *private*: only what is tested is wrong."""
    if isinstance(header, dict):
        header = {k: v for k, v in header.items() if v is not DROP}
    signing_input = b64url(to_json(header)) + "." + b64url(to_json(payload))
    return signing_input + "." + b64url(sign_with(algorithm, private, signing_input))


def resign(token: str, signature: bytes) -> str:
    head, payload, _ = token.split(".")
    return f"{head}.{payload}.{b64url(signature)}"


async def who(request: web.Request) -> web.Response:
    return web.json_response({"username": (request[jwtplus.AUTH_CLAIMS] or {})["username"]})


JWKS_PATH = "/.well-known/jwks.json"


@dataclass
class FixedClock:
    """A clock that stands still at *now* until a test moves it."""

    now: float

    def __call__(self) -> float:
        return self.now


def keys_app(sm: SecretManager, clock: Callable[[], float] = lambda: NOW) -> web.Application:
    """/api/me protected; the JWKS under a protected pattern too: its handler is reachable anyway."""
    rules = RoutingRules(protected_apis=("/api/.*", "/.well-known/.*"))
    middleware = jwtplus.jwt_middleware(manager=sm, rules=rules, clock=clock)
    app = web.Application(middlewares=[middleware])
    app.router.add_get("/api/me", who)
    app.router.add_get(JWKS_PATH, jwtplus.jwks_handler(sm, clock=clock))
    return app


async def assert_http_refused(client: Any, token: str) -> None:
    response = await client.get("/api/me", headers=bearer(token))
    assert response.status == 401, token
    assert await response.read() == BODY_401
    assert response.headers["WWW-Authenticate"] == CHALLENGE_INVALID


def jwks_key(sm: SecretManager, token: str, now: float | None = None) -> Any:
    """The public key that *sm*'s JWKS publishes for *token*'s kid, as PyJWT loads it."""
    kid = jwt.get_unverified_header(token)["kid"]
    (jwk,) = [key for key in jwtplus.public_jwks(sm, now=now)["keys"] if key["kid"] == kid]
    return jwt.PyJWK(jwk).key


# -- Sign and verify: jwtplus and PyJWT, both ways --


@pytest.mark.parametrize("interval", [0, 3600], ids=["one key", "rotation"])
def test_derived_eddsa_tokens_round_trip_and_pyjwt_verifies_them_with_the_jwks(interval: int) -> None:
    sm = derived(interval)
    token = sm.encode({"username": "ann"})
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA"
    assert sm.decode(token)["username"] == "ann"
    public = jwks_key(sm, token)
    assert jwt.decode(token, public, algorithms=["EdDSA"])["username"] == "ann"
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(tampered(token), public, algorithms=["EdDSA"])
    with pytest.raises(jwt.InvalidSignatureError):
        sm.decode(tampered(token))


@pytest.mark.parametrize("form", ["pem", "jwk", "jwk json", "jwks"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_static_keys_round_trip_and_pyjwt_verifies_them(algorithm: str, form: str) -> None:
    key = private_key(KIND[algorithm])
    signer = SecretManager(algorithm=algorithm, keys=keys_in(key, form, private=True))
    verifier = SecretManager(algorithm=algorithm, keys=keys_in(key, form, private=False))
    token = signer.encode({"username": "ann"})
    kid = thumbprint(key) if form == "pem" else "key-2025"
    assert jwt.get_unverified_header(token) == {"alg": algorithm, "kid": kid, "typ": "JWT"}
    assert signer.decode(token) == verifier.decode(token)
    assert verifier.decode(token)["username"] == "ann"
    assert jwt.decode(token, key.public_key(), algorithms=[algorithm])["username"] == "ann"
    with pytest.raises(ValueError, match="public keys only"):
        verifier.encode({"username": "ann"})
    with pytest.raises(jwt.InvalidSignatureError):
        verifier.decode(tampered(token))
    impostor = private_key(KIND[algorithm] + "-b")  # another key under the same kid
    forged = signed(algorithm, impostor, {"alg": algorithm, "kid": kid}, claims(time.time()))
    with pytest.raises(jwt.InvalidSignatureError):
        verifier.decode(forged)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_pyjwt_token_with_the_right_kid_verifies_in_jwtplus(algorithm: str) -> None:
    key = private_key(KIND[algorithm])
    verifier = static(algorithm, pem(key, private=False))
    payload = {"username": "ann", "exp": int(time.time()) + 60}
    token = jwt.encode(payload, key, algorithm=algorithm, headers={"kid": thumbprint(key)})
    assert verifier.decode(token)["username"] == "ann"
    for headers in ({}, {"kid": "another"}):
        with pytest.raises(jwtplus.KeyIdError):
            verifier.decode(jwt.encode(payload, key, algorithm=algorithm, headers=headers))


def test_a_pyjwt_token_signed_with_a_derived_seed_verifies_in_jwtplus() -> None:
    sm = derived(3600)
    period = jwtplus.period_of(time.time(), 3600)
    key = ed25519.Ed25519PrivateKey.from_private_bytes(jwtplus.key_for_period(sm, period))
    payload = {"username": "ann", "exp": int(time.time()) + 60}
    token = jwt.encode(payload, key, algorithm="EdDSA", headers={"kid": str(period)})
    assert sm.decode(token)["username"] == "ann"
    with pytest.raises(jwt.InvalidSignatureError):  # the seed of one period is no other period's
        sm.decode(jwt.encode(payload, key, algorithm="EdDSA", headers={"kid": str(period - 1)}))


def test_static_keys_rotate_by_listing_them_oldest_first() -> None:
    old, new = private_key("p256"), private_key("p256-b")
    before = static("ES256", pem(old))
    after = static("ES256", pem(old, private=False), pem(new))
    verifier = static("ES256", pem(old, private=False), pem(new, private=False))
    old_token, new_token = before.encode({"username": "old"}), after.encode({"username": "new"})
    assert jwt.get_unverified_header(new_token)["kid"] == thumbprint(new)
    assert [verifier.decode(t)["username"] for t in (old_token, new_token)] == ["old", "new"]
    assert after.decode(old_token)["username"] == "old"
    with pytest.raises(jwtplus.KeyIdError):
        before.decode(new_token)
    assert [k["kid"] for k in jwtplus.public_jwks(after)["keys"]] == [thumbprint(old), thumbprint(new)]
    with pytest.raises(ValueError, match="put the private key last"):
        static("ES256", pem(new), pem(old, private=False))


# -- Derived keys --


def test_two_eddsa_managers_with_one_secret_sign_alike_and_publish_one_jwks() -> None:
    a, b = derived(60, "5m"), derived(60, "5m")
    assert a is not b
    payload = {"username": "ann", "jti": "one"}  # Ed25519 is deterministic: same key, same token
    for now in (NOW, NOW + 59, NOW + 60, NOW + 86400):
        assert a.encode(payload, now=now) == b.encode(payload, now=now)
        assert jwtplus.public_jwks(a, now=now) == jwtplus.public_jwks(b, now=now)
        assert b.decode(a.encode(payload, now=now), now=now)["username"] == "ann"
    assert jwtplus.public_jwks(derived(0)) == jwtplus.public_jwks(derived(0))


@pytest.mark.parametrize("interval", [0, 60], ids=["one key", "rotation"])
def test_a_different_secret_derives_different_eddsa_keys(interval: int) -> None:
    ours, theirs = derived(interval, "5m"), derived(interval, "5m", secret=OTHER_SECRET)
    xs = {k["x"] for k in jwtplus.public_jwks(ours, now=NOW)["keys"]}
    assert xs.isdisjoint(k["x"] for k in jwtplus.public_jwks(theirs, now=NOW)["keys"])
    with pytest.raises(jwt.InvalidTokenError):  # rotation: a bad signature; one key: another kid
        ours.decode(theirs.encode({"username": "mallory"}, now=NOW), now=NOW)


def test_eddsa_seeds_are_the_documented_hmac_and_the_kid_is_the_period() -> None:
    sm = derived(3600)
    period = jwtplus.period_of(NOW, 3600)
    assert period == 472222
    for n in (period - 1, period, period + 1):
        seed = hmac.new(SECRET, ED25519_LABEL + str(n).encode(), hashlib.sha256).digest()
        assert jwtplus.key_for_period(sm, n) == seed
    seed = hmac.new(SECRET, b"jwtplus-ed25519-v1:472222", hashlib.sha256).digest()
    private = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    published = {key["kid"]: key for key in jwtplus.public_jwks(sm, now=NOW)["keys"]}
    assert published["472222"] == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": b64url(raw),
        "kid": "472222",
        "alg": "EdDSA",
        "use": "sig",
    }
    token = sm.encode({"username": "ann", "jti": "j"}, now=NOW)
    assert jwt.get_unverified_header(token)["kid"] == "472222"
    signing_input, _, signature = token.rpartition(".")
    assert b64url(private.sign(signing_input.encode())) == signature


def test_eddsa_without_rotation_has_one_seed_and_its_thumbprint_as_kid() -> None:
    sm = derived(0)
    seed = hmac.new(SECRET, ED25519_LABEL, hashlib.sha256).digest()
    private = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    kid = thumbprint(private)
    assert jwtplus.public_jwks(sm) == {
        "keys": [{**jwk_of(private, private=False), "kid": kid, "alg": "EdDSA", "use": "sig"}]
    }
    token = sm.encode({"username": "ann", "jti": "j"}, now=NOW)
    assert jwt.get_unverified_header(token)["kid"] == kid
    signing_input, _, signature = token.rpartition(".")
    assert b64url(private.sign(signing_input.encode())) == signature


async def test_an_eddsa_token_outside_its_period_window_is_refused(make_client: Any) -> None:
    interval, life = 100, 250
    sm = derived(interval, life)
    period = jwtplus.period_of(NOW, interval)
    start, end = period * interval, (period + 1) * interval + life
    token = sm.encode({"username": "ann", "exp": start + 10_000}, now=start)  # exp outlives the window
    assert jwt.get_unverified_header(token)["kid"] == str(period)
    assert sm.decode(token, now=end - 1)["username"] == "ann"
    with pytest.raises(jwt.ExpiredSignatureError):
        sm.decode(token, now=end)
    with pytest.raises(jwtplus.KeyIdError):  # invalid, not merely early: before its period started
        sm.decode(token, now=start - 1)
    forged = derived(interval, life, secret=OTHER_SECRET).encode({"username": "ann"}, now=start)
    with pytest.raises(jwt.InvalidSignatureError):  # a closed period's forgery is still a forgery
        sm.decode(forged, now=end + 1000)
    clock = FixedClock(start - 1)
    client = await make_client(app=keys_app(sm, clock))
    for instant, status in ((start - 1, 401), (start, 200), (end - 1, 200), (end, 401)):
        clock.now = instant
        assert (await client.get("/api/me", headers=bearer(token))).status == status, instant


def test_eddsa_configuration_is_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="keeps 723 key periods alive"):
        derived(3600, "30d")
    with pytest.raises(ValueError, match="secret is 31 bytes"):
        derived(secret=b"k" * 31)
    assert derived(secret="").encode({"username": "ann"})  # "" draws a random secret
    with pytest.raises(ValueError, match="static"):
        jwtplus.key_for_period(static("ES256", pem(private_key("p256"))), 1)


# -- Refused, at construction --


@pytest.mark.parametrize(
    ("algorithm", "bad", "message"),
    [
        ("ES256", lambda: jwk_of(private_key("p256-b"), alg="RS256"), r"keys\[1\] is a JWK for alg='RS256'"),
        ("ES256", lambda: jwk_of(private_key("p256-b"), alg="ES384"), r"keys\[1\] is a JWK for alg='ES384'"),
        ("ES256", lambda: jwk_of(private_key("p256-b"), alg="none"), r"keys\[1\] is a JWK for alg='none'"),
        ("ES256", lambda: jwk_of(private_key("p256-b"), alg="HS256"), r"keys\[1\] is a JWK for alg='HS256'"),
        ("ES256", lambda: jwk_of(private_key("p256-b"), kty="RSA"), r"keys\[1\] is a JWK with kty='RSA'"),
        ("ES256", lambda: jwk_of(private_key("p384")), r"keys\[1\] is a JWK with kty='EC' crv='P-384'"),
        ("ES256", lambda: jwk_of(private_key("secp256k1")), r"keys\[1\].*crv='secp256k1'"),
        ("ES256", lambda: jwk_of(private_key("rsa")), r"keys\[1\] is a JWK with kty='RSA'"),
        ("ES256", lambda: jwk_of(private_key("p256-b"), use="enc"), r"keys\[1\] is a JWK for use='enc'"),
        ("EdDSA", lambda: jwk_of(private_key("ed448")), r"keys\[1\] is a JWK with kty='OKP' crv='Ed448'"),
        ("EdDSA", lambda: jwk_of(private_key("ed25519-b"), crv="X25519"), r"keys\[1\].*crv='X25519'"),
        ("EdDSA", lambda: jwk_of(private_key("ed25519-b"), alg="Ed25519"), r"keys\[1\].*alg='Ed25519'"),
        ("RS256", lambda: jwk_of(private_key("rsa-b"), alg="PS256"), r"keys\[1\] is a JWK for alg='PS256'"),
        ("PS256", lambda: jwk_of(private_key("rsa-b"), alg="RS256"), r"keys\[1\] is a JWK for alg='RS256'"),
        ("RS256", lambda: jwk_of(private_key("p256")), r"keys\[1\] is a JWK with kty='EC'"),
    ],
)
def test_a_jwk_that_disagrees_with_the_algorithm_is_refused_naming_it(
    algorithm: str, bad: Callable[[], Any], message: str
) -> None:
    good = jwk_of(private_key(KIND[algorithm]), private=False)
    with pytest.raises(ValueError, match=message):
        static(algorithm, good, bad())
    with pytest.raises(ValueError, match=message.replace(r"keys\[1\]", r"keys\[0\]")):
        static(algorithm, bad())


@pytest.mark.parametrize("algorithm", ["RS256", "PS256"])
@pytest.mark.parametrize("kind", ["rsa1024", "rsa2047"])
def test_rsa_keys_under_2048_bits_are_refused(algorithm: str, kind: str) -> None:
    weak, bits = private_key(kind), kind.removeprefix("rsa")
    forms = [pem(weak), pem(weak, private=False), jwk_of(weak), jwk_of(weak, private=False)]
    for form in forms:
        with pytest.raises(ValueError, match=rf"keys\[1\] is a {bits}-bit RSA key: {algorithm} needs 2048"):
            static(algorithm, pem(private_key("rsa"), private=False), form)
    assert static(algorithm, pem(private_key("rsa"))).encode({"username": "ann"})  # 2048 bits: fine


@pytest.mark.parametrize(
    ("algorithm", "kind", "needs"),
    [
        ("ES256", "rsa", "an EC P-256 key"),
        ("ES256", "p384", "an EC P-256 key"),
        ("ES256", "secp256k1", "an EC P-256 key"),
        ("ES256", "ed25519", "an EC P-256 key"),
        ("EdDSA", "ed448", "an Ed25519 key"),
        ("EdDSA", "p256", "an Ed25519 key"),
        ("RS256", "ed25519", "an RSA key"),
        ("PS256", "p256", "an RSA key"),
    ],
)
def test_a_key_of_another_type_than_the_algorithm_is_refused_naming_it(
    algorithm: str, kind: str, needs: str
) -> None:
    good = pem(private_key(KIND[algorithm]), private=False)
    for private in (True, False):
        with pytest.raises(ValueError, match=rf"keys\[1\] is a .*; {algorithm} needs {needs}"):
            static(algorithm, good, pem(private_key(kind), private=private))


def test_static_key_configurations_that_cannot_work_are_refused() -> None:
    key = pem(private_key("p256"))
    encrypted = (
        private_key("p256")
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"password"),
        )
        .decode()
    )
    p256_b, rsa_public = jwk_of(private_key("p256-b")), jwk_of(private_key("rsa"), private=False)
    cases: list[tuple[Callable[[], Any], type[Exception], str]] = [
        (
            lambda: SecretManager(algorithm="ES256", secret=SECRET, keys=[key]),
            ValueError,
            "exclude each other",
        ),
        (
            lambda: SecretManager(algorithm="ES256", refresh_interval=60, keys=[key]),
            ValueError,
            "leave refresh",
        ),
        (lambda: SecretManager(algorithm="ES256"), ValueError, "needs keys="),
        (lambda: SecretManager(algorithm="RS256", secret=SECRET), ValueError, "needs keys="),
        (lambda: SecretManager(algorithm="HS256", secret=SECRET, keys=[key]), ValueError, "does not use"),
        (lambda: static("ES256", key, key), ValueError, "two keys with one kid"),
        (lambda: SecretManager(algorithm="ES256", keys=key), TypeError, r"one key is keys=\[key\]"),  # type: ignore[arg-type]
        (
            lambda: static("ES256", pem(private_key("p256-b")), "not a key"),
            ValueError,
            r"keys\[1\] is neither",
        ),
        (lambda: static("ES256", encrypted), ValueError, r"keys\[0\] is neither"),
        (lambda: static("ES256", "{not json"), ValueError, r"keys\[0\] is not a JSON JWK"),
        (lambda: static("ES256", jwk_of(private_key("p256"), kid="")), ValueError, r"keys\[0\]: its kid"),
        (lambda: static("ES256", 42), TypeError, r"keys\[0\] must be PEM text or a JWK"),
        (
            lambda: static("ES256", {**jwk_of(private_key("p256"), private=False), "y": p256_b["y"]}),
            ValueError,
            r"keys\[0\] is not a valid ES256 JWK",
        ),  # off the curve
        (
            lambda: static("ES256", {**jwk_of(private_key("p256")), "d": p256_b["d"]}),
            ValueError,
            r"keys\[0\] is not a valid",
        ),  # d of another key
        (
            lambda: static("RS256", {**rsa_public, "e": "AQ"}),
            ValueError,
            r"keys\[0\] is not a valid RS256 JWK",
        ),  # e = 1
        (
            lambda: static("ES256", {"kty": "oct", "k": "c2VjcmV0"}),
            ValueError,
            r"keys\[0\] is a JWK with kty='oct'",
        ),
        (
            lambda: SecretManager(
                algorithm="ES256", keys={"keys": [p256_b, {**p256_b, "kid": "x", "use": "enc"}]}
            ),
            ValueError,
            r"keys\[1\] is a JWK for use='enc'",
        ),
        (lambda: jwtplus.public_jwks(manager()), ValueError, "HMAC manager has no public keys"),
        (lambda: jwtplus.jwks_handler(manager()), ValueError, "HMAC manager has no public keys"),
        (lambda: SecretManager(algorithm="ES256", keys=p256_b), TypeError, "one key is keys="),  # type: ignore[arg-type]
        (lambda: SecretManager(algorithm="ES256", keys={key}), TypeError, "must be a list of keys"),  # type: ignore[arg-type]
        (lambda: static("ES256", "{" * 100_000), ValueError, r"keys\[0\] is not a JSON JWK"),
        (
            lambda: jwtplus.Sessions(manager=static("ES256", key)),
            ValueError,
            "namespace= is needed with static keys",
        ),
    ]
    for make, error, message in cases:
        with pytest.raises(error, match=message):
            make()
    named = jwtplus.Sessions(manager=static("ES256", key), namespace="api:")
    assert named.namespace == "api:"


@pytest.mark.parametrize("token", [123, None, ["a.b.c"], b"\xff.\xfe.\xfd"])
def test_a_token_that_is_not_a_string_is_a_decode_error(token: Any) -> None:
    for sm in (manager(), derived(), static("ES256", pem(private_key("p256")))):
        with pytest.raises(jwt.DecodeError):
            sm.decode(token, now=NOW)


# -- Refused, as tokens --


def confusion_tokens(sm: SecretManager, kid: str, now: float) -> dict[str, str]:
    """HS256/384/512 tokens keyed with the public key's texts (PEM, JWK JSON): PyJWT refuses to make them."""
    jwks = jwtplus.public_jwks(sm, now=now)
    (jwk,) = [key for key in jwks["keys"] if key["kid"] == kid]
    texts = {"jwk json": json.dumps(jwk), "jwk json compact": json.dumps(jwk, separators=(",", ":"))}
    texts["jwks json"] = json.dumps(jwks, separators=(",", ":"))
    public = jwt.PyJWK(jwk).key
    texts["pem"] = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    texts["pem without newline"] = texts["pem"].rstrip("\n")
    if jwk["kty"] == "RSA":
        texts["pkcs1 pem"] = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
        ).decode()
    tokens = {}
    for name, text in texts.items():
        for alg, digest in (("HS256", hashlib.sha256), ("HS384", hashlib.sha384), ("HS512", hashlib.sha512)):
            header = {"alg": alg, "typ": "JWT", "kid": kid}
            tokens[f"{alg} keyed with {name}"] = forge(header, claims(now), key=text.encode(), digest=digest)
    return tokens


@pytest.mark.parametrize("algorithm", [*ALGORITHMS, "EdDSA derived"])
async def test_hs256_tokens_keyed_with_the_public_key_are_refused(make_client: Any, algorithm: str) -> None:
    if algorithm == "EdDSA derived":
        sm, kid = derived(3600), str(jwtplus.period_of(NOW, 3600))
    else:
        key = private_key(KIND[algorithm])
        sm, kid = static(algorithm, pem(key)), thumbprint(key)
    client = await make_client(app=keys_app(sm))
    control = sm.encode({"username": "ann"}, now=NOW)
    response = await client.get("/api/me", headers=bearer(control))
    assert response.status == 200
    assert await response.json() == {"username": "ann"}
    tokens = confusion_tokens(sm, kid, NOW)
    assert len(tokens) >= 15
    for name, token in tokens.items():
        with pytest.raises(jwt.InvalidAlgorithmError):
            sm.decode(token, now=NOW)
        await assert_http_refused(client, token)
        assert name


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", "", None])
async def test_alg_none_is_refused(make_client: Any, alg: str | None) -> None:
    key = private_key("p256")
    sm = static("ES256", pem(key))
    client = await make_client(app=keys_app(sm))
    header = {"alg": alg, "typ": "JWT", "kid": thumbprint(key)}
    unsigned = f"{b64url(to_json(header))}.{b64url(to_json(claims(NOW)))}"
    real = sm.encode({"username": "mallory"}, now=NOW).rsplit(".", 1)[1]
    for token in (unsigned + ".", unsigned, f"{unsigned}.AAAA", f"{unsigned}.{real}"):
        with pytest.raises(jwt.InvalidTokenError):
            sm.decode(token, now=NOW)
        await assert_http_refused(client, token)


def es256_token(now: float = NOW) -> tuple[SecretManager, str, int, int]:
    sm = static("ES256", pem(private_key("p256")))
    token = sm.encode({"username": "ann"}, now=now)
    raw = unb64(token.rsplit(".", 1)[1])
    return sm, token, int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")


async def test_ecdsa_signatures_are_raw_r_s_of_64_bytes_and_nothing_else(make_client: Any) -> None:
    sm, token, r, s = es256_token()
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    client = await make_client(app=keys_app(sm))
    assert sm.decode(token, now=NOW)["username"] == "ann"
    assert (await client.get("/api/me", headers=bearer(token))).status == 200
    variants = {
        "DER": encode_dss_signature(r, s),
        "truncated": raw[:-1],
        "first byte dropped": raw[1:],
        "extended": raw + b"\x00",
        "leading zero": b"\x00" + raw,
        "r and s as 33 bytes each": b"\x00" + raw[:32] + b"\x00" + raw[32:],
        "s as 33 bytes": raw[:32] + b"\x00" + raw[32:],  # the same r and s, read as integers
        "r alone": raw[:32],
        "twice": raw * 2,
        "P-384 sized": raw[:32].rjust(48, b"\x00") + raw[32:].rjust(48, b"\x00"),
    }
    assert len(variants["DER"]) != 64 or variants["DER"] != raw
    for name, signature in variants.items():
        forged = resign(token, signature)
        with pytest.raises(jwt.InvalidSignatureError):
            sm.decode(forged, now=NOW)
        await assert_http_refused(client, forged)
        assert name


def test_ecdsa_signatures_with_r_or_s_zero_or_at_least_the_order_are_refused() -> None:
    sm, token, r, s = es256_token()
    n, top = P256_ORDER, 2**256 - 1
    for bad_r, bad_s in (
        (0, s),
        (r, 0),
        (0, 0),
        (n, s),
        (r, n),
        (top, s),
        (r, top),
        (r + n, s) if r + n <= top else (n + 1, s),
    ):
        forged = resign(token, bad_r.to_bytes(32, "big") + bad_s.to_bytes(32, "big"))
        with pytest.raises(jwt.InvalidSignatureError):
            sm.decode(forged, now=NOW)


async def test_an_es256_twin_signature_r_n_minus_s_carries_the_same_jti_and_dies_with_it(
    make_client: Any,
) -> None:
    # NOTE: (r, n - s) is a second valid ECDSA signature of the same token (ECDSA is malleable, and
    # PyJWT, cryptography and jose accept high s). jwtplus accepts it too, so the README's "a token has
    # one spelling ... a re-encoded signature is not a second valid token" does not hold for ES256.
    # What it must not do is dodge anything keyed by jti: revoking the token refuses its twin.
    sm, token, r, s = es256_token(time.time())
    twin = resign(token, r.to_bytes(32, "big") + (P256_ORDER - s).to_bytes(32, "big"))
    assert twin != token
    assert sm.decode(twin) == sm.decode(token)
    sessions = jwtplus.Sessions(manager=sm, namespace="keys-test:")
    helper = jwtplus.JWTHelper(secret_manager=sm, protected_apis=("/api/.*",), sessions=sessions)
    app = web.Application(middlewares=[helper.pre_jwt_identifier(), helper.post_jwt_router()])
    app.router.add_get("/api/me", who)
    client = await make_client(app=app)
    assert [(await client.get("/api/me", headers=bearer(t))).status for t in (token, twin)] == [200, 200]
    await jwtplus.revoke_token(sessions, sm.decode(token))
    assert [(await client.get("/api/me", headers=bearer(t))).status for t in (token, twin)] == [401, 401]


def test_an_ed25519_signature_with_s_beyond_the_group_order_is_refused() -> None:
    sm = derived(3600)
    token = sm.encode({"username": "ann"}, now=NOW)
    signature = unb64(token.rsplit(".", 1)[1])
    big_s = int.from_bytes(signature[32:], "little") + ED25519_ORDER
    assert big_s < 2**256
    with pytest.raises(jwt.InvalidSignatureError):
        sm.decode(resign(token, signature[:32] + big_s.to_bytes(32, "little")), now=NOW)
    for wrong in (signature[:-1], signature + b"\x00", signature[:32]):
        with pytest.raises(jwt.InvalidSignatureError):
            sm.decode(resign(token, wrong), now=NOW)


@pytest.mark.parametrize("algorithm", ["RS256", "PS256"])
def test_rsa_signatures_of_another_length_or_beyond_the_modulus_are_refused(algorithm: str) -> None:
    key = private_key("rsa")
    sm = static(algorithm, pem(key))
    token = sm.encode({"username": "ann"}, now=NOW)
    signature = unb64(token.rsplit(".", 1)[1])
    modulus = key.public_key().public_numbers().n
    assert sm.decode(token, now=NOW)
    for wrong in (
        b"\x00" + signature,
        signature[1:],
        signature + b"\x00",
        modulus.to_bytes(256, "big"),
        (2**2048 - 1).to_bytes(256, "big"),
        bytes(256),
    ):
        with pytest.raises(jwt.InvalidSignatureError):
            sm.decode(resign(token, wrong), now=NOW)


@pytest.mark.parametrize(
    ("configured", "signing"),
    [("RS256", "PS256"), ("PS256", "RS256"), ("ES256", "EdDSA"), ("EdDSA", "ES256"), ("RS256", "ES256")],
)
def test_a_token_of_another_asymmetric_algorithm_is_refused(configured: str, signing: str) -> None:
    own = private_key(KIND[configured])
    sm = static(configured, pem(own))
    # signed with the configured key where the algorithm allows it (RS256 and PS256 share RSA keys)
    key = own if KIND[configured] == KIND[signing] else private_key(KIND[signing])
    token = signed(signing, key, {"alg": signing, "kid": thumbprint(own)}, claims(NOW))
    with pytest.raises(jwt.InvalidAlgorithmError):
        sm.decode(token, now=NOW)


STATIC_KIDS: list[Any] = [
    "nope",
    "",
    None,
    123,
    ["kid"],
    {"kid": "x"},
    "../../../../etc/passwd",
    "..%2F..%2Fkeys",
    "https://evil.example/jwks.json",
    "\u0000",
    "k" * 4000,
]


async def test_a_static_token_whose_kid_names_no_key_is_refused(make_client: Any) -> None:
    key = private_key("p256")
    sm = static("ES256", pem(key))
    client = await make_client(app=keys_app(sm))
    real = thumbprint(key)
    kids = [
        *STATIC_KIDS,
        DROP,
        real.upper(),
        real + " ",
        " " + real,
        real[:-1],
        thumbprint(private_key("p256-b")),
    ]
    for kid in kids:
        token = signed("ES256", key, hdr(alg="ES256", kid=kid), claims(NOW))
        with pytest.raises(jwtplus.KeyIdError):
            sm.decode(token, now=NOW)
        await assert_http_refused(client, token)
    control = signed("ES256", key, hdr(alg="ES256", kid=real), claims(NOW))
    assert sm.decode(control, now=NOW)["username"] == "mallory"
    huge = signed("ES256", key, hdr(alg="ES256", kid="k" * 7000), claims(NOW))
    with pytest.raises(jwtplus.TokenTooLargeError):
        sm.decode(huge, now=NOW)


async def test_a_derived_token_whose_kid_is_not_exactly_its_period_is_refused(make_client: Any) -> None:
    sm = derived(3600)
    period = jwtplus.period_of(NOW, 3600)
    seed = ed25519.Ed25519PrivateKey.from_private_bytes(jwtplus.key_for_period(sm, period))
    client = await make_client(app=keys_app(sm))
    kids: list[Any] = [
        *STATIC_KIDS,
        DROP,
        period,
        float(period),
        f"0{period}",
        f"{period}.0",
        f" {period}",
        f"{period}\n",
        f"+{period}",
        f"../{period}",
        f"{period}/../{period + 1}",
        str(period).translate(ARABIC_INDIC),
        str(period).translate(FULLWIDTH),
        "9" * 16,
    ]
    for kid in kids:
        token = signed("EdDSA", seed, hdr(alg="EdDSA", kid=kid), claims(NOW))
        with pytest.raises(jwtplus.KeyIdError):
            sm.decode(token, now=NOW)
        await assert_http_refused(client, token)
    control = signed("EdDSA", seed, hdr(alg="EdDSA", kid=str(period)), claims(NOW))
    assert sm.decode(control, now=NOW)["username"] == "mallory"
    with pytest.raises(jwt.InvalidSignatureError):  # the right key under the next period's kid
        sm.decode(signed("EdDSA", seed, hdr(alg="EdDSA", kid=str(period + 1)), claims(NOW)), now=NOW - 1)


@pytest.mark.parametrize("member", ["jwk", "jku", "x5u", "x5c"])
def test_a_key_the_token_brings_in_its_header_is_never_used(member: str) -> None:
    ours, attacker = private_key("p256"), private_key("p256-b")
    sm = static("ES256", pem(ours))
    embedded: Any = {
        "jwk": jwk_of(attacker, private=False),
        "jku": "https://evil.example/jwks.json",
        "x5u": "https://evil.example/cert.pem",
        "x5c": ["MIIB"],
    }[member]
    for kid in (thumbprint(ours), thumbprint(attacker), DROP):
        token = signed("ES256", attacker, hdr(alg="ES256", kid=kid, **{member: embedded}), claims(NOW))
        with pytest.raises(jwt.InvalidTokenError):
            sm.decode(token, now=NOW)


# -- `import jwtplus` without cryptography --

NO_CRYPTOGRAPHY = """\
import sys

sys.modules["cryptography"] = None  # as if it were not installed: every import of it fails
import jwtplus

sm = jwtplus.SecretManager(secret=b"k" * 32)
assert sm.decode(sm.encode({"username": "ann"}))["username"] == "ann"
rotating = jwtplus.SecretManager(secret=b"k" * 32, refresh_interval=60, exptime="5m")
assert rotating.decode(rotating.encode({"username": "bob"}))["username"] == "bob"
for make in (
    lambda: jwtplus.SecretManager(algorithm="EdDSA"),
    lambda: jwtplus.SecretManager(secret=b"k" * 32, algorithm="EdDSA", refresh_interval=60, exptime="5m"),
    lambda: jwtplus.SecretManager(algorithm="ES256", keys=["-----BEGIN PUBLIC KEY-----"]),
):
    try:
        make()
    except ImportError as exc:
        print("ImportError:", exc)
    else:
        raise SystemExit("an asymmetric manager was built without cryptography")
print("HMAC OK")
"""


async def test_jwtplus_imports_and_signs_hmac_without_cryptography(tmp_path: Path) -> None:
    script = tmp_path / "no_cryptography.py"
    script.write_text(NO_CRYPTOGRAPHY)
    code, out, err = await run_script(script)
    assert code == 0, (out, err)
    lines = out.splitlines()
    assert lines[-1] == "HMAC OK", out
    errors = [line for line in lines if line.startswith("ImportError:")]
    assert len(errors) == 3, out
    assert all("pip install 'aiohttp-jwtplus[crypto]'" in line for line in errors), out
    assert err == ""


# -- The JWKS handler --


JWKS_MANAGERS: dict[str, Callable[[], SecretManager]] = {
    "EdDSA derived": lambda: derived(60, "5m"),
    "EdDSA one key": lambda: derived(0),
    "EdDSA static private JWK": lambda: static("EdDSA", jwk_of(private_key("ed25519"))),
    "ES256 static private PEM": lambda: static("ES256", pem(private_key("p256-b")), pem(private_key("p256"))),
    "ES256 static private JWK": lambda: static("ES256", jwk_of(private_key("p256"))),
    "RS256 static private PEM": lambda: static("RS256", pem(private_key("rsa"))),
    "RS256 static private JWK": lambda: static(
        "RS256", jwk_of(private_key("rsa-b")), jwk_of(private_key("rsa"))
    ),
    "PS256 static private JWK": lambda: static("PS256", jwk_of(private_key("rsa"))),
}


PUBLIC_MEMBERS = {"OKP": {"crv", "x"}, "EC": {"crv", "x", "y"}, "RSA": {"e", "n"}}


@pytest.mark.parametrize("name", list(JWKS_MANAGERS))
async def test_the_jwks_publishes_public_members_only(make_client: Any, name: str) -> None:
    sm = JWKS_MANAGERS[name]()
    client = await make_client(app=keys_app(sm))
    response = await client.get(JWKS_PATH)
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/jwk-set+json"
    body = await response.read()
    document = json.loads(body)
    assert document == jwtplus.public_jwks(sm, now=NOW)
    assert list(document) == ["keys"]
    assert document["keys"]
    for key in document["keys"]:
        assert key["use"] == "sig"
        assert key["alg"] == sm.algorithm
        assert isinstance(key["kid"], str)
        assert key["kid"]
        assert not set(PRIVATE_MEMBERS) & set(key), key
        assert set(key) == {"kty", "kid", "alg", "use", *PUBLIC_MEMBERS[key["kty"]]}, key
    for value in sm.keys:  # not one private value anywhere in the body
        if isinstance(value, dict):
            for member in PRIVATE_MEMBERS:
                if member in value:
                    assert value[member].encode() not in body
    if sm.algorithm == "EdDSA" and sm.rotation_seconds:
        for key in document["keys"]:
            seed = jwtplus.key_for_period(sm, int(key["kid"]))
            assert b64url(seed) not in body.decode()


def period_start(interval: int, now: float = NOW) -> int:
    return jwtplus.period_of(now, interval) * interval


@pytest.mark.parametrize(("offset", "max_age"), [(0, 60), (1, 59), (30, 30), (59, 1), (59.5, 0), (0.25, 59)])
async def test_the_jwks_cache_control_lasts_until_the_period_ends(
    make_client: Any, offset: float, max_age: int
) -> None:
    sm = derived(60, "5m")
    now = period_start(60) + offset
    client = await make_client(app=keys_app(sm, lambda: now))
    response = await client.get(JWKS_PATH)
    assert response.headers["Cache-Control"] == f"public, max-age={max_age}"
    assert max_age <= 60
    assert max_age <= period_start(60) + 60 - now < max_age + 1


@pytest.mark.parametrize("name", [name for name in JWKS_MANAGERS if name != "EdDSA derived"])
async def test_static_and_unrotated_jwks_are_cached_five_minutes(make_client: Any, name: str) -> None:
    client = await make_client(app=keys_app(JWKS_MANAGERS[name]()))
    assert (await client.get(JWKS_PATH)).headers["Cache-Control"] == "public, max-age=300"


async def test_the_jwks_etag_answers_if_none_match_with_304(make_client: Any) -> None:
    clock = FixedClock(period_start(60) + 10)
    sm = derived(60, "5m")
    client = await make_client(app=keys_app(sm, clock))
    first = await client.get(JWKS_PATH)
    body, etag = await first.read(), first.headers["ETag"]
    assert re.fullmatch(r'"[A-Za-z0-9_-]+"', etag), etag  # strong
    for tag in (etag, f'"other", {etag}', "*"):
        again = await client.get(JWKS_PATH, headers={"If-None-Match": tag})
        assert again.status == 304, tag
        assert await again.read() == b""
        assert again.headers["ETag"] == etag
        assert again.headers["Cache-Control"] == "public, max-age=50"
    for tag in ('"other"', etag.strip('"'), etag[:-2] + '"', ""):
        fresh = await client.get(JWKS_PATH, headers={"If-None-Match": tag})
        assert fresh.status == 200, tag
        assert await fresh.read() == body
    clock.now += 60  # the next period: another set, another tag, and the old tag gets it whole
    rotated = await client.get(JWKS_PATH, headers={"If-None-Match": etag})
    assert rotated.status == 200
    assert rotated.headers["ETag"] != etag
    assert await rotated.read() != body
    static_client = await make_client(app=keys_app(static("ES256", pem(private_key("p256")))))
    tag = (await static_client.get(JWKS_PATH)).headers["ETag"]
    assert (await static_client.get(JWKS_PATH, headers={"If-None-Match": tag})).status == 304


def expected_periods(interval: int, exptime: float, leeway: float, now: float) -> list[int]:
    """The window formula, from the spec: n·R <= now + leeway and now < (n+1)·R + exptime + leeway;
    and ahead, each period a clock the leeway ahead reaches before this one ends (the next, at least)."""
    current = int(now // interval)
    holding = {
        n
        for n in range(current - 2 * int(exptime // interval) - 10, current + 10)
        if n * interval <= now + leeway and now < (n + 1) * interval + exptime + leeway
    }
    ahead = range(current + 1, int(((current + 1) * interval + leeway) // interval) + 1)
    return sorted(holding | {current + 1, *ahead})


JWKS_CONFIGS = [(60, 300, 0), (60, 300, 5), (60, 90, 0), (60, 61, 0), (2, 10, 0), (10, 25, 12), (100, 250, 0)]


def offsets(interval: int) -> list[float]:
    return [0, 0.001, 0.5, 1, interval / 2, interval - 1, interval - 0.001]


@pytest.mark.parametrize(("interval", "exptime", "leeway"), JWKS_CONFIGS)
async def test_the_jwks_holds_exactly_the_periods_in_their_window_and_those_ahead(
    make_client: Any, interval: int, exptime: int, leeway: int
) -> None:
    sm = derived(interval, exptime, leeway=leeway)
    clock = FixedClock(NOW)
    client = await make_client(app=keys_app(sm, clock))
    for base in (period_start(interval), period_start(interval) + interval * 7):
        for offset in offsets(interval):
            clock.now = now = base + offset
            kids = [key["kid"] for key in jwtplus.public_jwks(sm, now=now)["keys"]]
            assert kids == [str(n) for n in expected_periods(interval, exptime, leeway, now)], now
            served = json.loads(await (await client.get(JWKS_PATH)).read())
            assert [key["kid"] for key in served["keys"]] == kids, now


@pytest.mark.parametrize(("interval", "exptime", "leeway"), JWKS_CONFIGS)
def test_the_jwks_verifies_every_token_the_manager_accepts(interval: int, exptime: int, leeway: int) -> None:
    sm = derived(interval, exptime, leeway=leeway)
    accepted = 0
    for offset in offsets(interval):
        now = period_start(interval) + offset
        published = {key["kid"]: jwt.PyJWK(key).key for key in jwtplus.public_jwks(sm, now=now)["keys"]}
        current = jwtplus.period_of(now, interval)
        for n in range(current - exptime // interval - 3, current + 3):
            for minted in (n * interval, n * interval + interval / 2, (n + 1) * interval - 0.001):
                if minted > now + leeway:
                    continue
                token = sm.encode({"username": "ann"}, now=minted)
                try:
                    sm.decode(token, now=now)
                except jwt.InvalidTokenError:
                    continue
                accepted += 1
                kid = jwt.get_unverified_header(token)["kid"]
                assert kid in published, (now, minted)
                claims_ = jwt.decode(token, published[kid], algorithms=["EdDSA"], options=PYJWT_ANY_TIME)
                assert claims_["username"] == "ann"
    assert accepted >= len(offsets(interval)) * (exptime // interval)


CACHE_CONFIGS = [
    *JWKS_CONFIGS[:5],
    (10, 25, 12),  # a leeway longer than the period: found publishing too few periods ahead
    (2, 10, 2),
    (2, 10, 3),
]


@pytest.mark.parametrize(("interval", "exptime", "leeway"), CACHE_CONFIGS)
async def test_a_jwks_cached_for_its_max_age_verifies_every_token_the_manager_accepts_meanwhile(
    make_client: Any, interval: int, exptime: int, leeway: int
) -> None:
    # With leeway > refresh_interval, a clock up to leeway ahead mints in period current + 2 (or later)
    # before the set fetched now expires: the set must hold those keys too.
    sm = derived(interval, exptime, leeway=leeway)
    clock = FixedClock(NOW)
    client = await make_client(app=keys_app(sm, clock))
    checked = 0
    for fetched in [period_start(interval) + offset for offset in offsets(interval)]:
        clock.now = fetched
        response = await client.get(JWKS_PATH)
        max_age = int(response.headers["Cache-Control"].removeprefix("public, max-age="))
        cached = {key["kid"] for key in json.loads(await response.read())["keys"]}
        for later in {fetched, fetched + max_age / 2, fetched + max_age - 0.001} if max_age else ():
            newest = jwtplus.period_of(later + leeway, interval)
            for n in range(newest - exptime // interval - 3, newest + 1):
                minted = min(later + leeway, (n + 1) * interval - 0.001)
                token = sm.encode({"username": "ann"}, now=minted)
                try:
                    sm.decode(token, now=later)
                except jwt.InvalidTokenError:
                    continue
                checked += 1
                kid = jwt.get_unverified_header(token)["kid"]
                assert kid in cached, f"fetched at {fetched} (max-age {max_age}), a token of {kid} at {later}"
    assert checked > 0


async def test_the_jwks_is_reachable_under_a_protected_pattern_with_any_token(make_client: Any) -> None:
    sm = derived(60, "5m")
    client = await make_client(app=keys_app(sm))
    expired = sm.encode({"username": "ann"}, now=NOW - 3600)
    good = sm.encode({"username": "ann"}, now=NOW)
    headers: list[dict[str, str]] = [
        {},
        bearer("garbage"),
        bearer(expired),
        bearer(tampered(good)),
        {"Authorization": "Basic Zm9vOmJhcg=="},
        bearer(good),
    ]
    for header in headers:
        response = await client.get(JWKS_PATH, headers=header)
        assert response.status == 200, header
        assert json.loads(await response.read()) == jwtplus.public_jwks(sm, now=NOW)
        assert (await client.head(JWKS_PATH, headers=header)).status == 200
    for header in headers[:-1]:  # the pattern does protect: /.well-known/other is not the handler
        assert (await client.get("/.well-known/other", headers=header)).status == 401, header
        assert (await client.get("/api/me", headers=header)).status == 401, header


# ---- Token getters and identifiers ----


def test_basic_identifier_wants_a_non_empty_username() -> None:
    assert jwtplus.basic_identifier({"username": "ann"}) == {"username": "ann"}
    for payload in ({}, {"username": ""}, {"username": 5}, {"username": None}):
        assert jwtplus.basic_identifier(payload) is None


# ---- The authentication pipeline: checks ----


def checked_app(ran: list[str], checks: Sequence[Any], **helper_args: Any) -> web.Application:
    """An API app whose /api handlers record that they ran, with *checks* in its pipeline."""
    helper = JWTHelper(secret_manager=manager(), checks=checks, **helper_args)
    app = web.Application()
    jwtplus.setup(app, helper)

    async def api(request: web.Request) -> web.Response:
        ran.append(request.method)
        return web.json_response({"tenant": request[jwtplus.AUTH_CLAIMS]["tenant"]})

    app.router.add_route("*", "/api", api)
    return app


def same_tenant(request: web.Request, claims: dict[str, Any], now: float) -> str | None:
    return None if claims.get("tenant") == request.headers.get("X-Tenant") else "rejected"


async def an_async_check(request: web.Request, claims: dict[str, Any], now: float) -> str | None:
    await asyncio.sleep(0)
    return None if claims.get("tenant") == request.headers.get("X-Tenant") else "rejected"


@pytest.mark.parametrize("check", [same_tenant, an_async_check], ids=["plain", "async"])
async def test_a_check_of_your_own_joins_the_pipeline(make_client: Any, check: Any) -> None:
    ran: list[str] = []
    client = await make_client(app=checked_app(ran, (check,)))
    token = manager().encode({"username": "ann", "tenant": "acme"})
    ok = await client.get("/api", headers={**bearer(token), "X-Tenant": "acme"})
    assert (ok.status, await ok.json()) == (200, {"tenant": "acme"})
    other = await client.get("/api", headers={**bearer(token), "X-Tenant": "globex"})
    assert other.status == 403
    assert other.headers["WWW-Authenticate"] == 'Bearer error="insufficient_scope"'
    assert ran == ["GET"]


@pytest.mark.parametrize(
    ("verdict", "status"),
    [
        ("invalid", 401),
        ("expired", 401),
        ("rejected", 403),
        ("unavailable", 503),
        (False, 403),
        (True, 403),
        ("pass", 403),
        (0, 403),
    ],
)
async def test_a_check_refuses_with_its_status_and_anything_but_none_fails_closed(
    make_client: Any, verdict: Any, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []
    client = await make_client(app=checked_app(ran, (lambda request, claims, now: verdict,)))
    token = manager().encode({"username": "ann", "tenant": "acme"})
    assert (await client.get("/api", headers=bearer(token))).status == status
    assert ran == []
    if verdict not in ("invalid", "expired", "rejected", "unavailable"):
        assert "not None or a status" in caplog.text


async def test_a_check_that_raises_rejects_and_logs_without_the_token(
    make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(request: web.Request, claims: dict[str, Any], now: float) -> str | None:
        raise KeyError("tenant")

    ran: list[str] = []
    client = await make_client(app=checked_app(ran, (broken,)))
    token = manager().encode({"username": "ann"})
    assert (await client.get("/api", headers=bearer(token))).status == 403
    assert ran == []
    assert "a check raised" in caplog.text
    assert token not in caplog.text


async def test_checks_of_your_own_never_drop_the_csrf_check(make_client: Any) -> None:
    ran: list[str] = []
    cookies = jwtplus.CookiePolicy()
    client = await make_client(app=checked_app(ran, (same_tenant,), cookies=cookies))
    response = web.Response()
    jwtplus.set_login_cookies(response, manager(), {"username": "ann", "tenant": "acme"})
    jar = {m.key: m.value for m in response.cookies.values()}
    cookie = "; ".join(f"{k}={v}" for k, v in jar.items())
    no_csrf = await client.post("/api", headers={"Cookie": cookie, "X-Tenant": "acme"})
    assert no_csrf.status == 403
    csrf = await client.post(
        "/api", headers={"Cookie": cookie, "X-Tenant": "acme", "X-CSRF-Token": jar["__Host-csrf_token"]}
    )
    assert csrf.status == 200
    assert ran == ["POST"]
    functional = jwtplus.jwt_middleware(
        manager=manager(),
        rules=RoutingRules(),
        checks=(same_tenant,),
        token_getter=jwtplus.cookie_token_getter(),
    )
    app = web.Application(middlewares=[functional])
    app.router.add_route("*", "/api", echo)
    bare = await make_client(app=app)
    assert (await bare.post("/api", headers={"Cookie": cookie, "X-Tenant": "acme"})).status == 403


@pytest.mark.parametrize("given", [list, iter, tuple])
async def test_checks_may_be_any_iterable_of_functions(make_client: Any, given: Any) -> None:
    rules = RoutingRules(protected_apis=("/api",))
    app = web.Application(
        middlewares=[jwtplus.jwt_middleware(manager=manager(), rules=rules, checks=given([same_tenant]))]
    )
    app.router.add_get("/api", echo)
    client = await make_client(app=app)
    token = bearer(manager().encode({"username": "ann", "tenant": "acme"}))
    assert (await client.get("/api", headers={**token, "X-Tenant": "acme"})).status == 200
    assert (await client.get("/api", headers={**token, "X-Tenant": "globex"})).status == 403


def test_middleware_factories_refuse_bad_pieces_at_construction() -> None:
    sm, rules = manager(), RoutingRules()
    with pytest.raises(TypeError, match="rules must be a RoutingRules"):
        jwtplus.jwt_middleware(manager=sm, rules={"whitelist": ()})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="token_getter must be callable"):
        jwtplus.authentication_middleware(manager=sm, token_getter="Authorization")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="identifier must be callable"):
        jwtplus.jwt_middleware(manager=sm, rules=rules, identifier="username")  # type: ignore[arg-type]
    for pages in ({"login_page": True}, {"app_page": True}):
        with pytest.raises(ValueError, match="must say whether each page handler is given"):
            jwtplus.router_middleware(rules=RoutingRules(**pages))
    with pytest.raises(ValueError, match="must say whether each page handler is given"):
        jwtplus.router_middleware(rules=rules, app_page_handler=index_page)
    with pytest.raises(TypeError, match="clock must be a function returning Unix seconds"):
        jwtplus.jwt_middleware(manager=sm, rules=rules, clock=NOW)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="clock must be callable"):
        JWTHelper(clock=NOW)  # type: ignore[arg-type]


async def test_the_middleware_judges_tokens_by_its_clock(make_client: Any) -> None:
    sm = manager(exptime="1h")
    token = sm.encode({"username": "ann"}, now=NOW)
    for clock, expected in [(NOW, 200), (NOW + 3599, 200), (NOW + 3600, 401), (NOW - 1, 401)]:
        helper = JWTHelper(secret_manager=sm, whitelist=("/open",), clock=lambda clock=clock: clock)
        app = web.Application()
        jwtplus.setup(app, helper)
        app.router.add_get("/private", echo)
        client = await make_client(app=app)
        async with client.get("/private", headers=bearer(token)) as response:
            assert response.status == expected, clock - NOW


def test_checks_are_refused_at_construction_unless_a_list_of_functions() -> None:
    with pytest.raises(TypeError, match="trailing comma"):
        JWTHelper(secret_manager=manager(), checks=same_tenant)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="each check is a function"):
        jwtplus.jwt_middleware(manager=manager(), rules=RoutingRules(), checks=("tenant",))  # type: ignore[arg-type]


async def test_authenticate_runs_the_pipeline_on_one_request() -> None:
    sm = manager()
    token = sm.encode({"username": "ann"}, now=NOW)
    get = functools.partial(make_mocked_request, "GET", "/x")
    passed = await jwtplus.authenticate(get(headers=bearer(token)), sm, now=NOW)
    assert (passed.status, passed.carry["username"], passed.claims["jti"]) == (
        "pass",
        "ann",
        passed.claims["jti"],
    )
    assert (await jwtplus.authenticate(get(), sm, now=NOW)).status == "missing"
    assert (
        await jwtplus.authenticate(get(headers=bearer(token)), sm, now=NOW + 31 * 86400)
    ).status == "expired"
    assert (await jwtplus.authenticate(get(headers=bearer(tampered(token))), sm, now=NOW)).status == "invalid"
    refresh = sm.encode({"username": "ann", "type": "refresh"}, now=NOW)
    assert (await jwtplus.authenticate(get(headers=bearer(refresh)), sm, now=NOW)).status == "invalid"
    typed = await jwtplus.authenticate(get(headers=bearer(refresh)), sm, token_type="refresh", now=NOW)
    assert typed.status == "pass"
    nobody = sm.encode({"name": "ann"}, now=NOW)
    assert (await jwtplus.authenticate(get(headers=bearer(nobody)), sm, now=NOW)).status == "rejected"
    refused = await jwtplus.authenticate(
        get(headers=bearer(token)), sm, checks=(lambda r, c, n: "unavailable",), now=NOW
    )
    assert refused == jwtplus.AuthResult("unavailable")
    cookie_post = make_mocked_request("POST", "/x", headers={"Cookie": f"__Host-access_token={token}"})
    getter = jwtplus.cookie_token_getter()
    assert (await jwtplus.authenticate(cookie_post, sm, getter, now=NOW)).status == "rejected"  # CSRF
    with pytest.raises(ValueError, match=r'token_type=.*"access" or "refresh"'):
        await jwtplus.authenticate(get(), sm, token_type="id")


def test_the_verified_token_cache_says_how_full_it_is() -> None:
    sm = manager()
    decode = jwtplus.cached_decoder(sm, size=2)
    tokens = [sm.encode({"username": f"u{i}"}, now=NOW) for i in range(3)]
    decode(tokens[0], NOW)
    decode(tokens[0], NOW)
    assert decode.cache_info() == jwtplus.CacheInfo(hits=1, misses=1, maxsize=2, currsize=1)
    for token in tokens:
        decode(token, NOW)
    assert decode.cache_info() == jwtplus.CacheInfo(hits=2, misses=3, maxsize=2, currsize=2)
    off = jwtplus.cached_decoder(sm, size=0)
    off(tokens[0], NOW)
    off(tokens[0], NOW)
    assert off.cache_info() == jwtplus.CacheInfo(hits=0, misses=2, maxsize=0, currsize=0)


async def test_a_middleware_reports_on_its_cache(make_client: Any) -> None:
    helper = seed_helper(manager())
    middleware = helper.middleware()
    app = web.Application(middlewares=[middleware])
    app.router.add_get("/setattr_api", echo)
    client = await make_client(app=app)
    token = manager().encode({"username": "ann"})
    for _ in range(3):
        assert (await client.get("/setattr_api", headers=bearer(token))).status == 200
    info = middleware.cache_info()  # type: ignore[attr-defined]
    assert (info.hits, info.misses, info.currsize) == (2, 1, 1)


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


def test_decide_lets_cors_preflight_through_and_nothing_else_that_is_options() -> None:
    assert decide(API, "/setattr_api", "OPTIONS", True, "missing", preflight=True) is Action.HANDLER
    assert decide(API, "/setattr_api", "OPTIONS", True, "missing") is Action.UNAUTHORIZED
    assert decide(API, "/setattr_api", "POST", True, "missing", preflight=True) is Action.UNAUTHORIZED


def test_routing_rules_keep_compiled_flags_through_replace() -> None:
    rules = RoutingRules(whitelist=[re.compile("/PUBLIC/.*", re.IGNORECASE)])
    for r in (rules, dataclasses.replace(rules, login_route="/login")):
        assert decide(r, "/public/x", "GET", True, "missing") is Action.HANDLER


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
        assert all(any(p.fullmatch(r) for p in SPA.whitelist) for r in jwtplus.path_readings("/" + path)) or (
            "/" + path == "/login.html" and method in ("GET", "HEAD")
        )


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


async def test_cors_preflight_reaches_only_an_options_route_without_a_token(make_client: Any) -> None:
    ran: list[str] = []

    async def preflight_answer(request: web.Request) -> web.Response:  # what aiohttp-cors registers
        ran.append("preflight")
        return web.Response(status=204)

    helper = seed_helper(manager())
    app = seed_app(helper)
    app.router.add_route("OPTIONS", "/cors_api", preflight_answer)
    app.router.add_post("/cors_api", echo)
    client = await make_client(app=app)
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert (await client.options("/cors_api", headers=preflight)).status == 204
    assert (await client.options("/cors_api")).status == 401  # not a preflight
    assert ran == ["preflight"]
    # a catch-all route would run its handler for OPTIONS: a preflight there needs a token like any request
    assert (await client.options("/setattr_api", headers=preflight)).status == 401


async def test_factories_alone_follow_the_managers_scheme(aiohttp_client: Any) -> None:
    sm = manager(scheme="JWT")
    rules = RoutingRules(protected_apis=("/setattr_api",))
    app = web.Application(
        middlewares=[
            jwtplus.authentication_middleware(manager=sm),
            jwtplus.router_middleware(rules=rules, scheme=sm.scheme),
        ]
    )
    app.router.add_get("/setattr_api", echo)
    client = await aiohttp_client(app)
    token = sm.encode({"username": "ann"})
    assert (await client.get("/setattr_api", headers={"Authorization": f"JWT {token}"})).status == 200
    assert (await client.get("/setattr_api", headers=bearer(token))).status == 401


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
        web.BaseRequest._seen_str_keys.difference_update({"auth_status", "auth_carry"})  # as if first
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


async def test_the_identifier_without_the_router_refuses_every_request(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """1.0 left protected_apis open (200 without a token) when post_jwt_router() was forgotten."""
    sm = manager()
    helper = seed_helper(sm)
    app = web.Application(middlewares=[helper.pre_jwt_identifier()])
    ran: list[str] = []

    async def setattr_api(request: web.Request) -> web.Response:
        ran.append("setattr")
        return web.Response(text="protected")

    app.router.add_get("/setattr_api", setattr_api)
    app.router.add_get("/index.html", index_page)
    client = await aiohttp_client(app)
    with caplog.at_level(logging.ERROR, logger="jwtplus"):
        for path, headers in [
            ("/setattr_api", {}),
            ("/setattr_api", bearer(sm.encode({"username": "ann"}))),
            ("/index.html", {}),
        ]:
            response = await client.get(path, headers=headers)
            assert (response.status, await response.json()) == (500, {"error": "server misconfigured"})
    assert ran == []
    assert "add helper.post_jwt_router() after it" in caplog.text
    # the pair, in order, and the functional authentication alone (guards only) both work
    paired = web.Application(middlewares=[helper.pre_jwt_identifier(), helper.post_jwt_router()])
    paired.router.add_get("/setattr_api", setattr_api)
    assert (await (await aiohttp_client(paired)).get("/setattr_api")).status == 401
    alone = web.Application(middlewares=[jwtplus.authentication_middleware(manager=sm)])
    alone.router.add_get("/setattr_api", setattr_api)
    assert (await (await aiohttp_client(alone)).get("/setattr_api")).status == 200
    assert ran == ["setattr"]


def test_setup_refuses_to_install_jwtplus_twice() -> None:
    helper = seed_helper(manager())
    app = web.Application()
    jwtplus.setup(app, helper)
    with pytest.raises(RuntimeError, match=r"setup\(\) was called twice"):
        jwtplus.setup(app, helper)
    for middlewares in ([helper.pre_jwt_identifier(), helper.post_jwt_router()], [helper.middleware()]):
        with pytest.raises(RuntimeError, match=r"already in app\.middlewares"):
            jwtplus.setup(web.Application(middlewares=middlewares), helper)
    with pytest.raises(TypeError, match="helper must be a JWTHelper"):
        jwtplus.setup(web.Application(), jwtplus.jwt_middleware)  # type: ignore[arg-type]


async def test_jwtplus_on_an_app_and_its_sub_application_refuses_rather_than_judge_twice(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sm = manager()
    app, api = web.Application(), web.Application()
    jwtplus.setup(app, JWTHelper(secret_manager=sm))
    jwtplus.setup(api, JWTHelper(secret_manager=sm))
    api.router.add_get("/me", echo)
    app.add_subapp("/api", api)
    app.router.add_get("/me", echo)
    client = await aiohttp_client(app)
    token = sm.encode({"username": "ann"})
    with caplog.at_level(logging.ERROR, logger="jwtplus"):
        assert (await client.get("/api/me", headers=bearer(token))).status == 500
    assert "two jwtplus authentication middlewares judged one request" in caplog.text
    assert (await client.get("/me", headers=bearer(token))).status == 200  # the outer app alone: once


async def test_a_whitelist_written_relative_to_a_sub_application_is_named_in_the_log(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Patterns match the full path: "/login" in an app mounted at /api never matches /api/login."""
    for whitelist, expected in ((("/login",), 401), (("/api/login",), 200)):
        caplog.clear()
        app, api = web.Application(), web.Application()
        jwtplus.setup(api, JWTHelper(secret_manager=manager(), whitelist=whitelist))
        api.router.add_post("/login", echo)
        api.router.add_post("/other", echo)
        app.router.add_get("/", index_page)  # a resource of the parent's that is no sub-app
        app.add_subapp("/api", api)
        client = await aiohttp_client(app)
        with caplog.at_level(logging.WARNING, logger="jwtplus"):
            assert (await client.post("/api/other")).status == 401  # refused, but not whitelisted inside
            assert (await client.post("/api/login")).status == expected
            assert (await client.post("/api/login")).status == expected
        hint = (
            "jwtplus: POST /api/login was refused, but /login, its path within the sub-application "
            "mounted at /api, is whitelisted: patterns match the full path, so write them with the prefix "
            "(/api/login)"
        )
        assert caplog.messages == ([hint] if expected == 401 else [])  # once, not per request


def _bare_request() -> web.Request:
    from aiohttp.test_utils import make_mocked_request

    return make_mocked_request("GET", "/")


# ---- Refusals a developer can diagnose: one log line each, and a hook that shapes the answer ----


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "jwtplus" and "refused" in r.getMessage()]


def refusal_app(sm: SecretManager, **kwargs: Any) -> web.Application:
    """An API app: /api/me (any passing token), /api/admin (role admin), /api/password (a fresh login)."""
    routes = web.RouteTableDef()

    @routes.get("/api/me")
    async def me(request: web.Request) -> web.Response:
        return web.json_response(
            {"identity": jwtplus.get_auth_identity(request), "claims": jwtplus.get_auth_claims(request)}
        )

    @routes.get("/api/admin")
    @jwtplus.require_claims(role="admin")
    async def admin(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    @routes.get("/api/password")
    @jwtplus.fresh_login_required
    async def password(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    kwargs.setdefault("rules", RoutingRules(protected_apis=("/api/.*",)))
    app = web.Application(middlewares=[jwtplus.jwt_middleware(manager=sm, **kwargs)])
    app.add_routes(routes)
    return app


def alg_none(claims: dict[str, Any]) -> str:
    head = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{body}."


async def test_each_refusal_is_one_log_line_with_its_reason_route_and_request_id(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sm = manager()
    client = await aiohttp_client(refusal_app(sm))
    ann = sm.encode({"sub": "ann"})
    cases = [
        ("/api/me", {}, 401, "missing"),
        ("/api/me", {"Authorization": f"Token {ann}"}, 401, "missing"),  # the wrong scheme: no token
        ("/api/me", bearer(sm.encode({"sub": "ann"}, now=time.time() - 86400 * 31)), 401, "expired"),
        ("/api/me", bearer(manager(secret=b"another secret of 32 bytes......").encode({"sub": "a"})), 401,
         "invalid (InvalidSignatureError)"),
        ("/api/me", bearer(alg_none({"sub": "ann"})), 401, "invalid"),
        ("/api/me", bearer(sm.encode({"type": "refresh", "sub": "a"})), 401, "invalid (not an access token)"),
        ("/api/me", bearer(sm.encode({"name": "no sub, no username"})), 403, "unidentified"),
        ("/api/admin", bearer(sm.encode({"sub": "ann", "role": "user"})), 403, "forbidden"),
        ("/api/password", bearer(ann), 401, "needs_fresh"),
    ]  # fmt: skip
    caplog.set_level(logging.INFO, logger="jwtplus")
    for path, headers, status, reason in cases:
        caplog.clear()
        response = await client.get(path, headers={**headers, "X-Request-ID": "req-42"})
        assert response.status == status, (path, reason)
        (line,) = refusal_lines(caplog)
        assert line.startswith(f"jwtplus: refused GET {path} with {status}: {reason.split(' ')[0]} ")
        assert reason in line and line.endswith("[request id req-42]"), line
        token = headers.get("Authorization", "").partition(" ")[2]
        assert SECRET.decode() not in line and (not token or token not in line)
    # the answer is as uniform as before: the log, not the client, learns which check failed
    bodies = {await (await client.get("/api/me", headers=h)).read() for _, h, s, _ in cases[2:6]}
    assert bodies == {b'{"error":"unauthorized"}'}
    caplog.clear()
    assert (await client.get("/api/me", headers=bearer(ann))).status == 200
    assert refusal_lines(caplog) == []  # a request that passes logs nothing


async def test_refusal_lines_carry_no_query_no_line_break_and_no_forged_request_id(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sm = manager()
    client = await aiohttp_client(refusal_app(sm))
    caplog.set_level(logging.INFO, logger="jwtplus")
    token = sm.encode({"name": "nobody"})
    response = await client.get(
        f"/api/me%0Aforged?access_token={token}", headers={**bearer(token), "X-Request-ID": "a\tb"}
    )
    assert response.status in (401, 403, 404)
    (line,) = refusal_lines(caplog)
    assert "\n" not in line and token not in line and "access_token" not in line
    assert line.endswith("[request id -]")


@pytest.mark.parametrize(
    "path",
    ["/api/a\u2028INFO:jwtplus:forged", "/api/a\nINFO:jwtplus:forged", "/api/\u202egnp", "/api/\udcff"],
)
def test_a_refusal_line_is_one_line_whatever_parser_read_the_path(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's C parser refuses these with a 400 before jwtplus runs; its pure-Python one (PyPy, no
    speedups) lets them through, so the line encodes them itself."""
    caplog.set_level(logging.INFO, logger="jwtplus")
    request = make_mocked_request("GET", path, headers={"X-Request-ID": "r-1"})
    jwtplus._refusal_of(request, "Bearer", Action.UNAUTHORIZED, "missing")
    (line,) = refusal_lines(caplog)
    assert line.isascii() and len(line.splitlines()) == 1 and line.isprintable(), line
    assert line.startswith("jwtplus: refused GET /api/") and line.endswith("[request id r-1]")


async def test_a_token_in_the_path_is_not_written_to_the_refusal_line(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sm = manager()
    client = await aiohttp_client(refusal_app(sm))
    caplog.set_level(logging.INFO, logger="jwtplus")
    token = sm.encode({"sub": "ann"})
    assert (await client.get(f"/api/me/{token}", headers={"X-Request-ID": token[:100]})).status == 401
    (line,) = refusal_lines(caplog)
    assert token.split(".")[1] not in line and "/api/me/<token>" in line, line


async def test_refusals_are_silent_at_the_default_level(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client = await aiohttp_client(refusal_app(manager()))
    caplog.set_level(logging.WARNING, logger="jwtplus")
    assert (await client.get("/api/me")).status == 401
    assert refusal_lines(caplog) == []


async def test_on_refusal_shapes_the_answer_per_reason(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sm = manager()
    seen: list[jwtplus.Refusal] = []

    async def on_refusal(request: web.Request, refusal: jwtplus.Refusal) -> web.StreamResponse | None:
        seen.append(refusal)
        if refusal.reason == "expired":
            return web.json_response({"msg": "Token has expired"}, status=401)
        if refusal.reason == "needs_fresh":
            return web.json_response({"msg": "Fresh token required"}, status=401)
        return None  # the default answer

    client = await aiohttp_client(refusal_app(sm, on_refusal=on_refusal))
    old = sm.encode({"sub": "ann"}, now=time.time() - 86400 * 31)
    expired = await client.get("/api/me", headers=bearer(old))
    assert (expired.status, await expired.json()) == (401, {"msg": "Token has expired"})
    stale = await client.get("/api/password", headers=bearer(sm.encode({"sub": "ann"})))
    assert await stale.json() == {"msg": "Fresh token required"}
    missing = await client.get("/api/me")
    assert (missing.status, missing.headers["WWW-Authenticate"], await missing.read()) == (
        401, "Bearer", b'{"error":"unauthorized"}',
    )  # fmt: skip
    assert [(r.status, r.reason, r.auth_status) for r in seen] == [
        (401, "expired", "expired"), (401, "needs_fresh", "pass"), (401, "missing", "missing"),
    ]  # fmt: skip
    assert seen[-1].response.status == 401 and seen[-1].response.body == b'{"error":"unauthorized"}'
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []  # None is no mistake


async def test_an_on_refusal_hook_may_redirect_the_aiohttp_way(aiohttp_client: Any) -> None:
    def on_refusal(request: web.Request, refusal: jwtplus.Refusal) -> None:
        if refusal.reason in ("missing", "expired"):
            raise web.HTTPFound("/login")

    client = await aiohttp_client(refusal_app(manager(), on_refusal=on_refusal))
    moved = await client.get("/api/me", allow_redirects=False)
    assert (moved.status, moved.headers["Location"]) == (302, "/login")
    forged = await client.get("/api/me", headers=bearer(tampered(manager().encode({"sub": "a"}))))
    assert forged.status == 401  # the hook said nothing: the default answer


@pytest.mark.parametrize("bad", ["raises", "not a response"])
async def test_a_broken_on_refusal_hook_gives_the_default_answer(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture, bad: str
) -> None:
    def on_refusal(request: web.Request, refusal: jwtplus.Refusal) -> Any:
        if bad == "raises":
            raise RuntimeError("a bug in the hook")
        return {"error": "a dict is no response"}

    client = await aiohttp_client(refusal_app(manager(), on_refusal=on_refusal))
    response = await client.get("/api/me")
    assert (response.status, await response.read()) == (401, b'{"error":"unauthorized"}')
    assert any("on_refusal" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_on_refusal_must_be_callable() -> None:
    rules = RoutingRules(protected_apis=("/api/.*",))
    for build in (
        lambda: jwtplus.jwt_middleware(manager=manager(), rules=rules, on_refusal="json"),  # type: ignore[arg-type]
        lambda: jwtplus.router_middleware(rules=rules, on_refusal=401),  # type: ignore[arg-type]
        lambda: jwtplus.authentication_middleware(manager=manager(), on_refusal=[]),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError, match="on_refusal must be a function"):
            build()
    with pytest.raises(TypeError, match="on_refusal must be callable or None"):
        JWTHelper(secret_manager=manager(), on_refusal="json")  # type: ignore[arg-type]


async def test_on_refusal_works_with_the_seed_pair_and_setup(aiohttp_client: Any) -> None:
    sm = manager()

    def on_refusal(request: web.Request, refusal: jwtplus.Refusal) -> web.Response:
        return web.json_response({"why": refusal.reason}, status=refusal.status)

    for install in ("pair", "setup"):
        helper = seed_helper(sm, on_refusal=on_refusal)
        app = seed_app(helper) if install == "pair" else web.Application()
        if install == "setup":
            jwtplus.setup(app, helper)
            app.router.add_route("*", "/setattr_api", echo)
        client = await aiohttp_client(app)
        refused = await client.post("/setattr_api", headers=bearer(sm.encode({"sub": "ann"})))
        assert (refused.status, await refused.json()) == (403, {"why": "unidentified"}), install
        assert await (await client.post("/setattr_api")).json() == {"why": "missing"}


# ---- Identifiers, identity and lifetimes: what flask-jwt-extended users look for ----


async def test_the_functional_default_identifier_accepts_sub_or_username(aiohttp_client: Any) -> None:
    sm = manager()
    client = await aiohttp_client(refusal_app(sm))
    for claims, identity in (
        ({"sub": "ann"}, "ann"),
        ({"username": "bob"}, "bob"),
        ({"sub": "c", "username": "d"}, "c"),
    ):
        response = await client.get("/api/me", headers=bearer(sm.encode(claims)))
        assert response.status == 200, claims
        assert (await response.json())["identity"] == identity
    for claims in ({"sub": ""}, {"username": ["ann"]}, {"username": ""}, {}):
        token = jwt.encode({**claims, "exp": time.time() + 60}, SECRET, algorithm="HS256")
        assert (await client.get("/api/me", headers=bearer(token))).status == 403, claims
    request = make_mocked_request("GET", "/", headers=bearer(sm.encode({"sub": "ann"})))
    assert (await jwtplus.authenticate(request, sm)).status == "pass"  # authenticate() agrees


async def test_the_seed_helper_keeps_basic_identifier_but_sessions_accept_sub(aiohttp_client: Any) -> None:
    sm = manager()
    client = await aiohttp_client(seed_app(seed_helper(sm)))
    assert (await client.post("/setattr_api", headers=bearer(sm.encode({"sub": "ann"})))).status == 403
    assert (await client.post("/setattr_api", headers=bearer(sm.encode({"username": "ann"})))).status == 200
    sessions = jwtplus.Sessions(manager=sm)
    client = await aiohttp_client(seed_app(seed_helper(sm, sessions=sessions)))
    pair = await jwtplus.issue_tokens(sessions, "user-1")  # sub only, no username
    assert (await client.post("/setattr_api", headers=bearer(pair.access))).status == 200


async def test_get_auth_identity_and_claims_are_none_on_a_route_without_a_token(aiohttp_client: Any) -> None:
    @jwtplus.route_options(optional=True)
    async def feed(request: web.Request) -> web.Response:
        claims = jwtplus.get_auth_claims(request)
        return web.json_response({"who": jwtplus.get_auth_identity(request), "claims": claims is not None})

    sm = manager()
    app = web.Application(
        middlewares=[jwtplus.jwt_middleware(manager=sm, rules=RoutingRules(protected_apis=("/.*",)))]
    )
    app.router.add_get("/feed", feed)
    client = await aiohttp_client(app)
    assert await (await client.get("/feed")).json() == {"who": None, "claims": False}
    for claims in ({"username": "bob"}, {"sub": "", "username": "bob"}, {"sub": "bob", "username": "al"}):
        named = await client.get("/feed", headers=bearer(sm.encode(claims)))
        assert await named.json() == {"who": "bob", "claims": True}, claims


def test_user_identifier_and_get_auth_identity_read_sub_before_username() -> None:
    assert jwtplus.user_identifier({"sub": "a"}) == {"sub": "a"}
    assert jwtplus.user_identifier({"username": "b"}) == {"username": "b"}
    assert jwtplus.user_identifier({"sub": "", "username": "b"}) == {"sub": "", "username": "b"}
    assert jwtplus.user_identifier({"sub": None}) is None
    assert jwtplus.basic_identifier({"sub": "a"}) is None  # the seed's meaning is kept
    with pytest.raises(RuntimeError, match="not installed"):
        jwtplus.get_auth_claims(make_mocked_request("GET", "/"))
    with pytest.raises(RuntimeError, match="not installed"):
        jwtplus.get_auth_identity(make_mocked_request("GET", "/"))


@pytest.mark.parametrize(
    ("expires_in", "seconds"), [("5m", 300), (90, 90), (timedelta(hours=2), 7200), ("1.5s", 1.5)]
)
def test_encode_takes_a_per_token_lifetime(expires_in: jwtplus.Duration, seconds: float) -> None:
    sm = manager(exptime="30d")
    claims = sm.decode(sm.encode({"sub": "ann"}, now=NOW, expires_in=expires_in), now=NOW)
    assert claims["exp"] - claims["iat"] == seconds
    token = jwtplus.encode_token(sm, {"sub": "ann"}, now=NOW, expires_in=expires_in)
    with pytest.raises(jwt.ExpiredSignatureError):
        sm.decode(token, now=NOW + seconds)


@pytest.mark.parametrize(
    ("payload", "expires_in", "message"),
    [
        ({}, 0, "expires_in=0 must be at least 1 second"),
        ({}, "0.5s", "expires_in='0.5s' must be at least 1 second"),
        ({}, timedelta(microseconds=1), "must be at least 1 second"),
        ({}, "-5m", "expires_in='-5m'"),
        ({}, "soon", "expires_in='soon'"),
        ({}, True, "expires_in=True"),
        ({"exp": NOW + 5}, "5m", "expires_in= or an exp claim, not both"),
    ],
)
def test_a_bad_lifetime_at_encode_is_refused_naming_it(
    payload: dict[str, Any], expires_in: Any, message: str
) -> None:
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        manager().encode(payload, now=NOW, expires_in=expires_in)


async def test_a_route_may_take_its_access_token_from_a_json_body(aiohttp_client: Any) -> None:
    sm = manager()

    @jwtplus.route_options(locations=("body",))
    async def submit(request: web.Request) -> web.Response:
        body = await request.json()  # the getter read it; the handler still can
        return web.json_response({"by": jwtplus.get_auth_identity(request), "item": body["item"]})

    app = web.Application(
        middlewares=[jwtplus.jwt_middleware(manager=sm, rules=RoutingRules(protected_apis=("/api/.*",)))]
    )
    app.router.add_post("/api/submit", submit)
    client = await aiohttp_client(app)
    token = sm.encode({"sub": "ann"})
    done = await client.post("/api/submit", json={"access_token": token, "item": 3})
    assert (done.status, await done.json()) == (200, {"by": "ann", "item": 3})
    assert (await client.post("/api/submit", json={"item": 3}, headers=bearer(token))).status == 401
    assert (await client.post("/api/submit", data={"access_token": token})).status == 401  # a form is no JSON
    assert (await client.post("/api/submit", json={"access_token": tampered(token)})).status == 401


# ---- Hardening: a hostile client's tokens, headers and paths ----
# Hardening tests for jwtplus (issue 2, sections 3 and 5): a hostile client's view.
#
# Part A sends bad tokens and malformed Authorization headers to a real aiohttp
# app and calls ``decode_token`` on them directly: every one must give a 401
# with the same body (never a 500, a stack trace or a hint), and ``decode_token``
# must raise a ``jwt.InvalidTokenError`` subclass. Tokens are forged by hand
# (base64url + HMAC with the right secret or the right period key) so that the
# only thing standing between them and the handler is the check under test.
#
# Part B spells paths every way a client can and checks, through real
# requests (raw sockets, so nothing normalises the request target), that no
# spelling reaches a handler that is not whitelisted without a token; and
# checks ``decide`` and ``path_readings`` as pure functions on the same spellings.

# -- Shared material --

OTHER_SECRET = bytes(range(0x30, 0x70))
ATTACKER_KEY = bytes(range(0x40, 0x80))
HOUR = 3600
BODY_401 = b'{"error":"unauthorized"}'
BODY_403 = b'{"error":"forbidden"}'
CHALLENGE_MISSING = "Bearer"
CHALLENGE_INVALID = 'Bearer error="invalid_token"'
CHALLENGE_FORBIDDEN = 'Bearer error="insufficient_scope"'
# Response headers a 401/403 may carry; anything else could leak which check failed.
CHALLENGE_HEADERS = {
    "content-type",
    "content-length",
    "www-authenticate",
    "cache-control",
    "date",
    "server",
    "connection",
}

MANAGER = jwtplus.SecretManager(secret=SECRET)
ROTATING = jwtplus.SecretManager(secret=SECRET, refresh_interval=HOUR, exptime=2 * HOUR)

HITS = web.AppKey("jwtplus_test_hits", list)
"""Each handler appends (its name, the path_safe it was called for): proof of whether it ran."""

Builder = Callable[[float], str]
"""Makes one token for the instant it is given (fixed NOW for decode_token, the real clock for servers)."""

DROP: Any = object()
"""A claim or header value meaning: leave this item out."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def to_json(value: Any) -> bytes:
    """Serialise a header or payload; bytes are sent as they are (for not-JSON and odd JSON)."""
    if isinstance(value, bytes):
        return value
    # allow_nan (the default) writes NaN and Infinity, which Python's json.loads accepts back.
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def hs(key: bytes, signing_input: str, digest: Callable[..., Any] = hashlib.sha256) -> str:
    return b64url(hmac.new(key, signing_input.encode("ascii"), digest).digest())


def forge(
    header: Any,
    payload: Any,
    *,
    key: bytes = SECRET,
    digest: Callable[..., Any] = hashlib.sha256,
) -> str:
    """A compact JWS over *header* and *payload*, HMAC-signed with *key* (the right secret by default)."""
    if isinstance(header, dict):
        header = {k: v for k, v in header.items() if v is not DROP}
    if isinstance(payload, dict):
        payload = {k: v for k, v in payload.items() if v is not DROP}
    signing_input = b64url(to_json(header)) + "." + b64url(to_json(payload))
    return signing_input + "." + hs(key, signing_input, digest)


def hdr(**extra: Any) -> dict[str, Any]:
    return {"alg": "HS256", "typ": "JWT", **extra}


def claims(now: float, **extra: Any) -> dict[str, Any]:
    """Claims that pass every check at *now*, with *extra* items replacing or (DROP) removing some."""
    return {"username": "mallory", "iat": int(now), "exp": int(now) + HOUR, **extra}


def good(now: float) -> str:
    """A hand-forged token that decode_token accepts: the control for every forged bad token."""
    return forge(hdr(), claims(now))


def sized(length: int, now: float) -> str:
    """A validly signed token of exactly *length* characters."""
    base = len(forge(hdr(), claims(now, pad="")))
    start = max(0, (length - base) * 3 // 4 - 8)
    for header_pad in range(4):
        for pad in range(start, length):
            candidate = forge(hdr(p="h" * header_pad), claims(now, pad="x" * pad))
            if len(candidate) == length:
                return candidate
            if len(candidate) > length:
                break
    raise AssertionError(f"no token of length {length}")


def padded(segment: int) -> Builder:
    """A token whose header (0) or payload (1) segment carries its base64 '=' padding, signed as sent."""

    def build(now: float) -> str:
        for pad in range(4):
            parts = [b64url(to_json(hdr(p="h" * pad))), b64url(to_json(claims(now, pad="x" * pad)))]
            if len(parts[segment]) % 4:
                parts[segment] += "=" * (-len(parts[segment]) % 4)
                signing_input = ".".join(parts)
                return signing_input + "." + hs(SECRET, signing_input)
        raise AssertionError("unreachable")

    return build


def resigned(now: float, rewrite: Callable[[str], str]) -> str:
    """A good token whose signature segment is rewritten by *rewrite* (an attacker needs no key for this)."""
    for pad in range(64):
        h, p, sig = forge(hdr(), claims(now, pad="x" * pad)).split(".")
        if rewrite(sig) != sig:
            return f"{h}.{p}.{rewrite(sig)}"
    raise AssertionError("no signature to rewrite")


def non_canonical_last_char(sig: str) -> str:
    """Flip the unused low bits of the last base64url character: the same bytes, another string."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return sig[:-1] + alphabet[alphabet.index(sig[-1]) ^ 1]


def period_token(kid: Any, key_period: int, now: float, **claim_items: Any) -> str:
    """A token signed with rotation period *key_period*'s real key, its header naming *kid*."""
    key = jwtplus.key_for_period(ROTATING, key_period)
    return forge(hdr(kid=kid), claims(now, **claim_items), key=key)


def period(now: float) -> int:
    return int(now) // HOUR


ARABIC_INDIC = str.maketrans("0123456789", "".join(chr(0x660 + d) for d in range(10)))
FULLWIDTH = str.maketrans("0123456789", "".join(chr(0xFF10 + d) for d in range(10)))

# -- Part A: bad tokens --
# (id, builder(now) -> token, the InvalidTokenError subclass decode_token must raise)

PLAIN_BAD: list[tuple[str, Builder, type[Exception]]] = [
    # The algorithm comes from configuration, never from the token.
    (
        "alg none, empty signature",
        lambda n: forge(hdr(alg="none"), claims(n)).rsplit(".", 1)[0] + ".",
        jwt.DecodeError,  # refused by form first: empty signature segment
    ),
    (
        "alg none, no signature segment",
        lambda n: forge(hdr(alg="none"), claims(n)).rsplit(".", 1)[0],
        jwt.DecodeError,
    ),
    (
        "alg none, with a valid HS256 signature",
        lambda n: forge(hdr(alg="none"), claims(n)),
        jwt.InvalidAlgorithmError,
    ),
    (
        "alg None",
        lambda n: forge(hdr(alg="None"), claims(n)).rsplit(".", 1)[0] + ".",
        jwt.DecodeError,  # refused by form first: empty signature segment
    ),
    (
        "alg NONE",
        lambda n: forge(hdr(alg="NONE"), claims(n)).rsplit(".", 1)[0] + ".",
        jwt.DecodeError,  # refused by form first: empty signature segment
    ),
    (
        "alg HS512 signed with the secret (PyJWT)",
        lambda n: jwt.encode(claims(n), SECRET, algorithm="HS512"),
        jwt.InvalidAlgorithmError,
    ),
    (
        "alg HS384 signed with the secret (PyJWT)",
        lambda n: jwt.encode(claims(n), SECRET, algorithm="HS384"),
        jwt.InvalidAlgorithmError,
    ),
    (
        "alg RS256 label, HMAC-SHA256 signature with the secret",
        lambda n: forge(hdr(alg="RS256"), claims(n)),
        jwt.InvalidAlgorithmError,
    ),
    (
        "alg RS256 label, junk signature",
        lambda n: forge(hdr(alg="RS256"), claims(n)).rsplit(".", 1)[0] + "." + b64url(b"\x00" * 256),
        jwt.InvalidAlgorithmError,
    ),
    ("alg ES256 label", lambda n: forge(hdr(alg="ES256"), claims(n)), jwt.InvalidAlgorithmError),
    ("alg missing", lambda n: forge(hdr(alg=DROP), claims(n)), jwt.InvalidAlgorithmError),
    ("alg hs256 lowercase", lambda n: forge(hdr(alg="hs256"), claims(n)), jwt.InvalidAlgorithmError),
    ("alg as a list", lambda n: forge(hdr(alg=["HS256"]), claims(n)), jwt.InvalidAlgorithmError),
    ("alg null", lambda n: forge(hdr(alg=None), claims(n)), jwt.InvalidAlgorithmError),
    # Signatures.
    (
        "signed with another secret",
        lambda n: forge(hdr(), claims(n), key=OTHER_SECRET),
        jwt.InvalidSignatureError,
    ),
    (
        "jwk header carrying the attacker's key, signed with it",
        lambda n: forge(hdr(jwk={"kty": "oct", "k": b64url(ATTACKER_KEY)}), claims(n), key=ATTACKER_KEY),
        jwt.InvalidSignatureError,
    ),
    (
        "payload swapped after signing",
        lambda n: ".".join(
            [good(n).split(".")[0], b64url(to_json(claims(n, username="admin"))), good(n).split(".")[2]]
        ),
        jwt.InvalidSignatureError,
    ),
    ("signature emptied", lambda n: good(n).rsplit(".", 1)[0] + ".", jwt.InvalidTokenError),
    ("signature truncated", lambda n: good(n)[:-4], jwt.InvalidTokenError),
    # Size and alphabet, refused before any decoding.
    (
        "over 8 KiB (MAX_TOKEN_LENGTH + 1), validly signed",
        lambda n: sized(jwtplus.MAX_TOKEN_LENGTH + 1, n),
        jwtplus.TokenTooLargeError,
    ),
    (
        "64 KiB, validly signed",
        lambda n: forge(hdr(), claims(n, pad="x" * 49_000)),
        jwtplus.TokenTooLargeError,
    ),
    ("non-ASCII letter in front", lambda n: "\u00e9" + good(n), jwt.DecodeError),
    (
        "non-ASCII fullwidth full stops as separators",
        lambda n: good(n).replace(".", "\uff0e"),
        jwt.DecodeError,
    ),
    (
        "non-ASCII digit inside the signature",
        lambda n: good(n)[:-2] + "\u0663" + good(n)[-1:],
        jwt.DecodeError,
    ),
    # Base64url.
    ("bad base64 in the header segment", lambda n: "!!!!" + good(n)[good(n).index(".") :], jwt.DecodeError),
    (
        "bad base64 in the payload segment",
        lambda n: good(n).split(".")[0] + ".!!!!." + good(n).split(".")[2],
        jwt.DecodeError,
    ),
    ("bad base64 in the signature segment", lambda n: good(n).rsplit(".", 1)[0] + ".!!!!", jwt.DecodeError),
    (
        "header segment of impossible length (1 char)",
        lambda n: "e" + good(n)[good(n).index(".") :],
        jwt.DecodeError,
    ),
    (
        "padding '=' written out in the signature segment (RFC 7515 forbids it)",
        lambda n: good(n) + "=",
        jwt.DecodeError,
    ),
    (
        "signature in the standard base64 alphabet (+ and / for - and _)",
        lambda n: resigned(n, lambda sig: sig.translate(str.maketrans("-_", "+/"))),
        jwt.DecodeError,
    ),
    (
        "signature with non-canonical trailing bits",
        lambda n: resigned(n, non_canonical_last_char),
        jwt.DecodeError,
    ),
    (
        "signature with four junk characters inserted (length kept a multiple of 4)",
        lambda n: resigned(n, lambda sig: sig[:8] + "!*~$" + sig[8:]),
        jwt.DecodeError,
    ),
    (
        "signature with an embedded space",
        lambda n: resigned(n, lambda sig: sig[:8] + " " + sig[8:]),
        jwt.DecodeError,
    ),
    (
        "padding '=' written out in the payload segment, signed as sent (RFC 7515 forbids it)",
        padded(1),
        jwt.DecodeError,
    ),
    (
        "padding '=' written out in the header segment, signed as sent (RFC 7515 forbids it)",
        padded(0),
        jwt.DecodeError,
    ),
    ("empty string", lambda n: "", jwt.DecodeError),
    ("only dots", lambda n: "..", jwt.DecodeError),
    ("two segments", lambda n: good(n).rsplit(".", 1)[0], jwt.DecodeError),
    ("four segments", lambda n: good(n) + ".e30", jwt.DecodeError),
    # Header that is not a JSON object.
    ("header not JSON", lambda n: forge(b"alg=HS256", claims(n)), jwt.DecodeError),
    ("header a JSON array", lambda n: forge(b'["HS256"]', claims(n)), jwt.DecodeError),
    ("header a JSON string", lambda n: forge(b'"HS256"', claims(n)), jwt.DecodeError),
    ("header a JSON number", lambda n: forge(b"256", claims(n)), jwt.DecodeError),
    ("header null", lambda n: forge(b"null", claims(n)), jwt.DecodeError),
    ("header not UTF-8", lambda n: forge(b'{"alg":"HS256","x":"\xff"}', claims(n)), jwt.DecodeError),
    ("header nested 2900 deep", lambda n: forge(b"[" * 2900 + b"]" * 2900, claims(n)), jwt.DecodeError),
    (
        "header with a 5000-digit integer",
        lambda n: forge(b'{"alg":"HS256","x":' + b"9" * 5000 + b"}", claims(n)),
        jwt.DecodeError,
    ),
    (
        "header b64=false (unencoded payload)",
        lambda n: forge(hdr(b64=False, crit=["b64"]), claims(n)),
        jwt.InvalidTokenError,
    ),
    (
        "header crit naming an unknown extension",
        lambda n: forge(hdr(crit=["x"], x=1), claims(n)),
        jwt.InvalidTokenError,
    ),
    # Payload that is not a JSON object (all validly signed).
    ("payload not JSON", lambda n: forge(hdr(), b"username=admin"), jwt.DecodeError),
    ("payload a JSON array", lambda n: forge(hdr(), b'[{"username":"admin"}]'), jwt.DecodeError),
    ("payload a JSON string", lambda n: forge(hdr(), b'"admin"'), jwt.DecodeError),
    ("payload a JSON number", lambda n: forge(hdr(), b"1"), jwt.DecodeError),
    ("payload null", lambda n: forge(hdr(), b"null"), jwt.DecodeError),
    ("payload true", lambda n: forge(hdr(), b"true"), jwt.DecodeError),
    ("payload not UTF-8", lambda n: forge(hdr(), b'{"username":"\xff"}'), jwt.DecodeError),
    ("payload nested 3000 deep", lambda n: forge(hdr(), b"[" * 3000 + b"]" * 3000), jwt.DecodeError),
    (
        "payload with a 5000-digit exp",
        lambda n: forge(hdr(), b'{"exp":' + b"9" * 5000 + b"}"),
        jwt.DecodeError,
    ),
    # exp: a JSON number of seconds, before the year 9999, required.
    (
        'exp the string "9999999999" (PyJWT)',
        lambda n: jwt.encode(claims(n, exp="9999999999"), SECRET, algorithm="HS256"),
        jwt.DecodeError,
    ),
    (
        "exp 1e308 (PyJWT)",
        lambda n: jwt.encode(claims(n, exp=1e308), SECRET, algorithm="HS256"),
        jwt.DecodeError,
    ),
    ("exp true", lambda n: forge(hdr(), claims(n, exp=True)), jwt.DecodeError),
    ("exp false", lambda n: forge(hdr(), claims(n, exp=False)), jwt.DecodeError),
    ("exp NaN", lambda n: forge(hdr(), claims(n, exp=float("nan"))), jwt.DecodeError),
    ("exp Infinity", lambda n: forge(hdr(), claims(n, exp=float("inf"))), jwt.DecodeError),
    ("exp -Infinity", lambda n: forge(hdr(), claims(n, exp=float("-inf"))), jwt.DecodeError),
    ("exp null", lambda n: forge(hdr(), claims(n, exp=None)), jwt.DecodeError),
    ("exp a list", lambda n: forge(hdr(), claims(n, exp=[int(n) + HOUR])), jwt.DecodeError),
    ("exp an object", lambda n: forge(hdr(), claims(n, exp={"$date": int(n) + HOUR})), jwt.DecodeError),
    ('exp the string "1e10"', lambda n: forge(hdr(), claims(n, exp="1e10")), jwt.DecodeError),
    ("exp 10**30", lambda n: forge(hdr(), claims(n, exp=10**30)), jwt.DecodeError),
    (
        "exp in the year 10000 (253402300800)",
        lambda n: forge(hdr(), claims(n, exp=253402300800)),
        jwt.DecodeError,
    ),
    ("exp negative", lambda n: forge(hdr(), claims(n, exp=-1)), jwt.DecodeError),
    ("exp missing", lambda n: forge(hdr(), claims(n, exp=DROP)), jwt.MissingRequiredClaimError),
    (
        "exp passed",
        lambda n: forge(hdr(), claims(n, iat=int(n) - 2 * HOUR, exp=int(n) - 1)),
        jwt.ExpiredSignatureError,
    ),
    ("exp 0", lambda n: forge(hdr(), claims(n, iat=DROP, exp=0)), jwt.ExpiredSignatureError),
    # iat and nbf.
    ("iat in the future", lambda n: forge(hdr(), claims(n, iat=int(n) + 600)), jwt.ImmatureSignatureError),
    ("nbf in the future", lambda n: forge(hdr(), claims(n, nbf=int(n) + 600)), jwt.ImmatureSignatureError),
    ("iat a string", lambda n: forge(hdr(), claims(n, iat=str(int(n)))), jwt.DecodeError),
    ("nbf a string", lambda n: forge(hdr(), claims(n, nbf=str(int(n)))), jwt.DecodeError),
    ("iat true", lambda n: forge(hdr(), claims(n, iat=True)), jwt.DecodeError),
    ("iat NaN", lambda n: forge(hdr(), claims(n, iat=float("nan"))), jwt.DecodeError),
    ("iat 1e308", lambda n: forge(hdr(), claims(n, iat=1e308)), jwt.DecodeError),
    ("nbf -Infinity", lambda n: forge(hdr(), claims(n, nbf=float("-inf"))), jwt.DecodeError),
    ("iat negative", lambda n: forge(hdr(), claims(n, iat=-5)), jwt.DecodeError),
    # String claims and an audience nobody configured.
    ("sub a number", lambda n: forge(hdr(), claims(n, sub=1)), jwt.DecodeError),
    ("jti a list", lambda n: forge(hdr(), claims(n, jti=["a"])), jwt.DecodeError),
    (
        "aud present but no audience configured",
        lambda n: forge(hdr(), claims(n, aud="other-service")),
        jwt.InvalidAudienceError,
    ),
]

ROTATING_BAD: list[tuple[str, Builder, type[Exception]]] = [
    ("kid missing", lambda n: period_token(DROP, period(n), n), jwtplus.KeyIdError),
    ('kid ""', lambda n: period_token("", period(n), n), jwtplus.KeyIdError),
    ('kid "abc"', lambda n: period_token("abc", period(n), n), jwtplus.KeyIdError),
    ('kid "../../etc/passwd"', lambda n: period_token("../../etc/passwd", period(n), n), jwtplus.KeyIdError),
    ('kid "1 OR 1=1"', lambda n: period_token("1 OR 1=1", period(n), n), jwtplus.KeyIdError),
    ("kid a list [period]", lambda n: period_token([str(period(n))], period(n), n), jwt.InvalidTokenError),
    (
        "kid an int (the current period)",
        lambda n: period_token(period(n), period(n), n),
        jwt.InvalidTokenError,
    ),
    ("kid null", lambda n: period_token(None, period(n), n), jwt.InvalidTokenError),
    ('kid "\\u0663" (ARABIC-INDIC DIGIT THREE)', lambda n: period_token("\u0663", 3, n), jwtplus.KeyIdError),
    (
        "kid = the current period in Arabic-Indic digits (int() reads it)",
        lambda n: period_token(str(period(n)).translate(ARABIC_INDIC), period(n), n),
        jwtplus.KeyIdError,
    ),
    (
        "kid = the current period in fullwidth digits (int() reads it)",
        lambda n: period_token(str(period(n)).translate(FULLWIDTH), period(n), n),
        jwtplus.KeyIdError,
    ),
    (
        'kid "\\u00b2" (SUPERSCRIPT TWO: isdigit() but not ASCII)',
        lambda n: period_token("\u00b2", 2, n),
        jwtplus.KeyIdError,
    ),
    ('kid "007"', lambda n: period_token("007", 7, n), jwtplus.KeyIdError),
    (
        "kid = the current period with a leading zero",
        lambda n: period_token("0" + str(period(n)), period(n), n),
        jwtplus.KeyIdError,
    ),
    (
        "kid = the current period with a leading space (int() strips it)",
        lambda n: period_token(" " + str(period(n)), period(n), n),
        jwtplus.KeyIdError,
    ),
    (
        "kid = the current period with a trailing newline",
        lambda n: period_token(str(period(n)) + "\n", period(n), n),
        jwtplus.KeyIdError,
    ),
    (
        "kid = the current period with a plus sign",
        lambda n: period_token("+" + str(period(n)), period(n), n),
        jwtplus.KeyIdError,
    ),
    (
        "kid = the current period with an underscore (int() reads 1_2)",
        lambda n: period_token(str(period(n))[:2] + "_" + str(period(n))[2:], period(n), n),
        jwtplus.KeyIdError,
    ),
    (
        "kid = the current period as a float",
        lambda n: period_token(f"{period(n)}.0", period(n), n),
        jwtplus.KeyIdError,
    ),
    ('kid "-1"', lambda n: period_token("-1", -1, n), jwtplus.KeyIdError),
    ("kid of 40 digits", lambda n: period_token("1" * 40, period(n), n), jwtplus.KeyIdError),
    ("kid of 16 digits", lambda n: period_token("1" * 16, period(n), n), jwtplus.KeyIdError),
    (
        "kid 2 periods in the future, signed with that period's real key",
        lambda n: period_token(str(period(n) + 2), period(n) + 2, n),
        jwtplus.KeyIdError,
    ),
    (
        "kid 1000 periods in the future, signed with that period's real key",
        lambda n: period_token(str(period(n) + 1000), period(n) + 1000, n),
        jwtplus.KeyIdError,
    ),
    (
        "kid 3 periods back (window closed), real key, exp still in the future",
        lambda n: period_token(str(period(n) - 3), period(n) - 3, n),
        jwt.ExpiredSignatureError,
    ),
    (
        'kid "0" (window long closed), real key, exp in the future',
        lambda n: period_token("0", 0, n),
        jwt.ExpiredSignatureError,
    ),
    (
        "signed with the current period's key, kid naming the previous period",
        lambda n: period_token(str(period(n) - 1), period(n), n),
        jwt.InvalidSignatureError,
    ),
    (
        "signed with the current period's key, kid naming the next period",
        lambda n: period_token(str(period(n) + 1), period(n), n),
        jwt.InvalidTokenError,
    ),
    (
        "signed with the bare secret, no kid (a token from before rotation)",
        lambda n: forge(hdr(), claims(n)),
        jwtplus.KeyIdError,
    ),
    (
        "signed with the bare secret, kid naming the current period",
        lambda n: forge(hdr(kid=str(period(n))), claims(n)),
        jwt.InvalidSignatureError,
    ),
    (
        "current period, alg HS512 with that period's key",
        lambda n: forge(
            hdr(alg="HS512", kid=str(period(n))),
            claims(n),
            key=jwtplus.key_for_period(ROTATING, period(n)),
            digest=hashlib.sha512,
        ),
        jwt.InvalidAlgorithmError,
    ),
    (
        "current period, real key, exp a string",
        lambda n: period_token(str(period(n)), period(n), n, exp="9999999999"),
        jwt.DecodeError,
    ),
]

ALL_BAD = [("plain", *row) for row in PLAIN_BAD] + [("rotating", *row) for row in ROTATING_BAD]
BAD_IDS = [f"{kind}: {name}" for kind, name, _, _ in ALL_BAD]


def manager_for(kind: str) -> jwtplus.SecretManager:
    return MANAGER if kind == "plain" else ROTATING


def test_forged_controls_are_accepted() -> None:
    """The forging helpers make tokens jwtplus accepts, so each bad token fails for its one flaw."""
    assert jwtplus.decode_token(MANAGER, good(NOW), now=NOW)["username"] == "mallory"
    assert jwtplus.decode_token(ROTATING, period_token(str(period(NOW)), period(NOW), NOW), now=NOW)
    previous = period_token(str(period(NOW) - 1), period(NOW) - 1, NOW)
    assert jwtplus.decode_token(ROTATING, previous, now=NOW)["username"] == "mallory"
    assert jwtplus.decode_token(MANAGER, sized(jwtplus.MAX_TOKEN_LENGTH, NOW), now=NOW)
    assert jwtplus.decode_token(MANAGER, good(NOW).encode("ascii"), now=NOW)
    assert jwtplus.decode_token(MANAGER, forge(hdr(), claims(NOW, exp=NOW + 0.5)), now=NOW)


@pytest.mark.parametrize(("kind", "build", "expected"), [row[0:1] + row[2:] for row in ALL_BAD], ids=BAD_IDS)
def test_decode_token_refuses(kind: str, build: Builder, expected: type[Exception]) -> None:
    assert issubclass(expected, jwt.InvalidTokenError)
    manager = manager_for(kind)
    bad = build(NOW)
    with pytest.raises(expected):
        jwtplus.decode_token(manager, bad, now=NOW)
    with pytest.raises(jwt.InvalidTokenError):
        manager.decode(bad.encode("utf-8"), now=NOW)


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(
            lambda n: jwt.encode(claims(n, exp="9999999999"), SECRET, algorithm="HS256"), id="exp str"
        ),
        pytest.param(lambda n: jwt.encode(claims(n, exp=1e308), SECRET, algorithm="HS256"), id="exp 1e308"),
        pytest.param(lambda n: forge(hdr(), claims(n, exp=True)), id="exp true"),
        pytest.param(lambda n: forge(hdr(), claims(n, exp=float("nan"))), id="exp NaN"),
        pytest.param(lambda n: forge(hdr(), claims(n, exp=float("inf"))), id="exp Infinity"),
        pytest.param(lambda n: forge(hdr(), b"[]"), id="payload array"),
    ],
)
def test_claim_checks_alone_reject_validly_signed_tokens(build: Builder) -> None:
    """These tokens carry a good signature: only jwtplus's own claim checks stand in their way."""
    bad = build(NOW)
    assert jwt.PyJWS().decode(bad, SECRET, algorithms=["HS256"])  # the signature verifies
    with pytest.raises(jwt.InvalidTokenError):
        jwtplus.decode_token(MANAGER, bad, now=NOW)


# -- Part A over HTTP --


class Reply(NamedTuple):
    status: int
    headers: CIMultiDict[str]
    body: bytes


async def raw_request(
    client: TestClient[Any, Any],
    target: str,
    *,
    method: str = "GET",
    headers: Sequence[tuple[str, str]] = (),
    raw_headers: bytes = b"",
) -> Reply:
    """Send one HTTP/1.1 request byte for byte (nothing normalises the target or the headers)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        lines = [f"{method} {target} HTTP/1.1", "Host: test", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers]
        request = "\r\n".join(lines).encode("utf-8") + b"\r\n" + raw_headers + b"\r\n"
        writer.write(request)
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed.add(name.strip(), value.strip())
    return Reply(int(status_line.split()[1]), parsed, body)


def marker(name: str) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.Response:
        request.app[HITS].append((name, request.rel_url.path_safe))
        return web.Response(text=f"HANDLER {name}")

    return handler


def hits(client: TestClient[Any, Any]) -> list[str]:
    return [name for name, _ in client.server.app[HITS]]


def token_app(manager: jwtplus.SecretManager = MANAGER, **helper_kwargs: Any) -> web.Application:
    """API mode: /public/.* whitelisted, /api/.* protected, /page neither. Headers up to 128 KiB reach it."""
    options: dict[str, Any] = {"whitelist": ("/public/.*",), "protected_apis": ("/api/.*",)}
    options.update(helper_kwargs)
    helper = jwtplus.JWTHelper(secret_manager=manager, **options)
    app = web.Application(
        middlewares=[helper.pre_jwt_identifier(), helper.post_jwt_router()],
        handler_args={"max_field_size": 1 << 17},
    )
    app[HITS] = []
    app.router.add_route("*", "/api/{name}", marker("api"))
    app.router.add_route("*", "/public/{name}", marker("public"))
    app.router.add_route("*", "/page", marker("page"))
    return app


def assert_refused(reply: Reply, challenge: str = CHALLENGE_INVALID) -> None:
    assert reply.status == 401, reply
    assert reply.body == BODY_401, reply
    assert reply.headers.getall("WWW-Authenticate") == [challenge], reply
    assert reply.headers["Content-Type"].startswith("application/json")
    assert {name.lower() for name in reply.headers} <= CHALLENGE_HEADERS, reply.headers


def bearer_pairs(value: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {value}")]


@pytest.mark.parametrize(("kind", "build"), [row[0:1] + row[2:3] for row in ALL_BAD], ids=BAD_IDS)
async def test_bad_token_gets_401_and_the_handler_never_runs(
    aiohttp_client: Any, kind: str, build: Builder
) -> None:
    manager = manager_for(kind)
    client = await aiohttp_client(token_app(manager))
    bad = build(time.time())
    # "Bearer " + "" reaches the server as "Bearer" (aiohttp strips the value), and "Bearer a b" is not
    # one token: in both, no token was presented.
    challenge = CHALLENGE_INVALID if bad and len(bad.split()) == 1 else CHALLENGE_MISSING
    for method, target in (("GET", "/api/x"), ("POST", "/api/x"), ("GET", "/page"), ("DELETE", "/page")):
        assert_refused(await raw_request(client, target, method=method, headers=bearer_pairs(bad)), challenge)
    assert hits(client) == []
    # The same request with a good token reaches the handler: the refusal was the token's doing.
    ok = await raw_request(client, "/api/x", headers=bearer_pairs(manager.encode({"username": "ann"})))
    assert (ok.status, ok.body, hits(client)) == (200, b"HANDLER api", ["api"])


async def test_every_401_cause_gives_the_same_body_and_headers(aiohttp_client: Any) -> None:
    """Bodies must not tell which check failed: one body and one challenge for every presented token."""
    clients = {kind: await aiohttp_client(token_app(manager_for(kind))) for kind in ("plain", "rotating")}
    now = time.time()
    causes = [(kind, build(now)) for kind, _, build, _ in ALL_BAD]
    causes += [("plain", MANAGER.encode({"username": "ann"}, now=now - 40 * 86400)), ("plain", "junk")]
    seen = set()
    for kind, value in causes:
        if not value or len(value.split()) != 1:
            continue  # not one token once in a header: see the test above
        reply = await raw_request(clients[kind], "/api/x", headers=bearer_pairs(value))
        assert reply.status == 401, (kind, value[:80])
        seen.add((reply.body, reply.headers["WWW-Authenticate"], reply.headers["Content-Type"]))
    assert seen == {(BODY_401, CHALLENGE_INVALID, "application/json")}
    assert hits(clients["plain"]) == hits(clients["rotating"]) == []


async def test_token_over_8kib_refused_even_when_the_server_takes_big_headers(aiohttp_client: Any) -> None:
    client = await aiohttp_client(token_app(MANAGER))
    now = time.time()
    fits = sized(jwtplus.MAX_TOKEN_LENGTH, now)
    assert (await raw_request(client, "/api/x", headers=bearer_pairs(fits))).status == 200
    for length in (jwtplus.MAX_TOKEN_LENGTH + 1, 20_000, 100_000):
        assert_refused(await raw_request(client, "/api/x", headers=bearer_pairs(sized(length, now))))
    assert hits(client) == ["api"]


async def test_header_over_aiohttp_limit_is_aiohttp_400_not_500(aiohttp_client: Any) -> None:
    """With aiohttp's default 8190-byte field limit, a 9000-byte Authorization never reaches jwtplus."""
    helper = jwtplus.JWTHelper(secret_manager=MANAGER, protected_apis=("/api/.*",))
    app = web.Application(middlewares=[helper.pre_jwt_identifier(), helper.post_jwt_router()])
    app[HITS] = []
    app.router.add_get("/api/{name}", marker("api"))
    client = await aiohttp_client(app)
    reply = await raw_request(client, "/api/x", headers=bearer_pairs("a" * 9000))
    assert reply.status == 400
    assert b"Traceback" not in reply.body
    assert hits(client) == []
    # Just under the limit: jwtplus sees it and refuses it as a token.
    assert_refused(await raw_request(client, "/api/x", headers=bearer_pairs("a" * 8000)))


# -- Authorization header spellings --


def _header_cases() -> list[Any]:
    """(id, headers(token) -> raw header bytes, expected): expected is 200 (read), or the 401 challenge."""

    def one(value: str) -> Callable[[str], bytes]:
        return lambda t: b"Authorization: " + value.replace("{t}", t).encode("utf-8") + b"\r\n"

    def many(*values: str) -> Callable[[str], bytes]:
        return lambda t: b"".join(one(v)(t) for v in values)

    rows: list[tuple[str, Callable[[str], bytes], int | str]] = [
        ("Bearer <token>", one("Bearer {t}"), 200),
        ("bearer <token> (scheme is case-insensitive)", one("bearer {t}"), 200),
        ("BEARER <token>", one("BEARER {t}"), 200),
        ("bEaReR <token>", one("bEaReR {t}"), 200),
        ("header name in lower case", lambda t: b"authorization: Bearer " + t.encode() + b"\r\n", 200),
        ("two spaces after the scheme (1*SP)", one("Bearer  {t}"), 200),
        ("OWS around the field value", lambda t: b"Authorization: \t Bearer " + t.encode() + b" \t\r\n", 200),
        ("no Authorization header", lambda t: b"", CHALLENGE_MISSING),
        ('"Bearer"', one("Bearer"), CHALLENGE_MISSING),
        ('"Bearer " (trailing space)', one("Bearer "), CHALLENGE_MISSING),
        ('"Bearer a b"', one("Bearer a b"), CHALLENGE_MISSING),
        ("Bearer <token> <token>", one("Bearer {t} {t}"), CHALLENGE_MISSING),
        ("Bearer <token> x", one("Bearer {t} x"), CHALLENGE_MISSING),
        ("Bearer Bearer <token>", one("Bearer Bearer {t}"), CHALLENGE_MISSING),
        ('"Basic xyz"', one("Basic xyz"), CHALLENGE_MISSING),
        ("Basic <token>", one("Basic {t}"), CHALLENGE_MISSING),
        ("Token <token>", one("Token {t}"), CHALLENGE_MISSING),
        ("<token> alone, no scheme", one("{t}"), CHALLENGE_MISSING),
        ("Bearer<token>, no space", one("Bearer{t}"), CHALLENGE_MISSING),
        ("two Authorization headers, both good", many("Bearer {t}", "Bearer {t}"), CHALLENGE_MISSING),
        ("two Authorization headers, good and junk", many("Bearer {t}", "Bearer junk"), CHALLENGE_MISSING),
        ("two credentials joined by a comma", one("Bearer {t}, Bearer {t}"), CHALLENGE_MISSING),
        (
            "token in X-Authorization",
            lambda t: b"X-Authorization: Bearer " + t.encode() + b"\r\n",
            CHALLENGE_MISSING,
        ),
        ("token in a cookie", lambda t: b"Cookie: token=" + t.encode() + b"\r\n", CHALLENGE_MISSING),
        ("Bearer,<token>", one("Bearer,{t}"), CHALLENGE_MISSING),
        ("Bearer <token>, (trailing comma)", one("Bearer {t},"), CHALLENGE_INVALID),
        ("Bearer <token minus its last char>", lambda t: one("Bearer {t}")(t[:-1]), CHALLENGE_INVALID),
        ('Bearer "<token>" (quoted)', one('Bearer "{t}"'), CHALLENGE_INVALID),
        ("Bearer <non-ASCII + token>", one("Bearer \u00e9{t}"), CHALLENGE_INVALID),
        ("Bearer <8000 junk chars> (very long header)", one("Bearer " + "a" * 8000), CHALLENGE_INVALID),
        # RFC 6750 / 7235: credentials = scheme 1*SP token. Tabs and Unicode spaces are not SP.
        ("Bearer<TAB><token>", one("Bearer\t{t}"), CHALLENGE_MISSING),
        ("Bearer<NBSP U+00A0><token>", one("Bearer\u00a0{t}"), CHALLENGE_MISSING),
        ("Bearer<EM SPACE U+2003><token>", one("Bearer\u2003{t}"), CHALLENGE_MISSING),
        ("Bearer<IDEOGRAPHIC SPACE U+3000><token>", one("Bearer\u3000{t}"), CHALLENGE_MISSING),
    ]
    return [pytest.param(build, expected, id=name) for name, build, expected in rows]


@pytest.mark.parametrize(("build", "expected"), _header_cases())
async def test_authorization_header_spellings(aiohttp_client: Any, build: Any, expected: int | str) -> None:
    client = await aiohttp_client(token_app(MANAGER))
    good_token = MANAGER.encode({"username": "ann"})
    for method in ("GET", "POST"):
        reply = await raw_request(client, "/api/x", method=method, raw_headers=build(good_token))
        if expected == 200:
            assert (reply.status, reply.body) == (200, b"HANDLER api"), reply
        else:
            assert isinstance(expected, str)
            assert_refused(reply, expected)
    assert hits(client) == (["api", "api"] if expected == 200 else [])


@pytest.mark.parametrize(
    "raw_header",
    [
        pytest.param(b"Authorization: Bearer\x1c{t}\r\n", id="0x1C (a str.split() separator)"),
        pytest.param(b"Authorization: Bearer\x0b{t}\r\n", id="vertical tab"),
        pytest.param(b"Authorization: Bearer {t}\x00\r\n", id="NUL"),
        pytest.param(b"Authorization: Bearer\r\n {t}\r\n", id="obs-fold"),
        pytest.param(b"Authorization : Bearer {t}\r\n", id="space before the colon"),
    ],
)
async def test_authorization_header_rejected_by_aiohttp_parser(
    aiohttp_client: Any, raw_header: bytes
) -> None:
    """Control characters and folding never reach jwtplus: aiohttp's parser answers 400, no handler runs."""
    client = await aiohttp_client(token_app(MANAGER))
    value = raw_header.replace(b"{t}", MANAGER.encode({"username": "ann"}).encode())
    reply = await raw_request(client, "/api/x", raw_headers=value)
    assert reply.status == 400
    assert b"Traceback" not in reply.body
    assert hits(client) == []


async def test_challenges(aiohttp_client: Any) -> None:
    """401 `Bearer` without a token, `Bearer error="invalid_token"` with one; 403 `insufficient_scope`."""
    client = await aiohttp_client(token_app(MANAGER))
    assert_refused(await raw_request(client, "/api/x"), CHALLENGE_MISSING)
    assert_refused(await raw_request(client, "/api/x", headers=bearer_pairs("junk")), CHALLENGE_INVALID)
    expired = MANAGER.encode({"username": "ann"}, now=time.time() - 31 * 86400)
    assert_refused(await raw_request(client, "/api/x", headers=bearer_pairs(expired)), CHALLENGE_INVALID)
    for method in ("GET", "POST"):
        nobody = MANAGER.encode({"role": "admin"})  # valid, but basic_identifier wants a username
        reply = await raw_request(client, "/api/x", method=method, headers=bearer_pairs(nobody))
        assert (reply.status, reply.body) == (403, BODY_403)
        assert reply.headers.getall("WWW-Authenticate") == [CHALLENGE_FORBIDDEN]
        assert {name.lower() for name in reply.headers} <= CHALLENGE_HEADERS
    assert hits(client) == []


async def test_raising_identifier_and_getter_never_leak(aiohttp_client: Any) -> None:
    def identifier(payload: dict[str, Any]) -> Any:
        raise RuntimeError("identifier exploded near the database password")

    async def getter(request: web.Request) -> str | None:
        if request.headers.get("X-Explode"):
            raise RuntimeError("getter exploded")
        return jwtplus.basic_token_getter(request)  # type: ignore[return-value]

    rejecting = await aiohttp_client(token_app(MANAGER, identifier=identifier))
    reply = await raw_request(rejecting, "/api/x", headers=bearer_pairs(MANAGER.encode({"username": "ann"})))
    assert (reply.status, reply.body) == (403, BODY_403)
    exploding = await aiohttp_client(token_app(MANAGER, token_getter=getter))
    assert_refused(await raw_request(exploding, "/api/x", headers=[("X-Explode", "1")]), CHALLENGE_INVALID)
    assert hits(rejecting) == hits(exploding) == []


async def test_tokens_and_keys_are_never_logged(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await aiohttp_client(token_app(ROTATING))
    now = time.time()
    sent = [build(now) for kind, _, build, _ in ALL_BAD if kind == "rotating"]
    sent.append(ROTATING.encode({"username": "ann"}))
    sent.append(ROTATING.encode({"role": "no username"}))
    for value in sent:
        await raw_request(client, "/api/x", headers=bearer_pairs(value))
    text = caplog.text
    secrets_ = [SECRET.decode("ascii"), jwtplus.key_for_period(ROTATING, period(now)).hex()]
    for value in sent + secrets_:
        for piece in {value, *value.split(".")} - {""}:
            if len(piece) >= 16:
                assert piece not in text


# -- Part A, hypothesis --

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
TIMES = (
    st.integers(min_value=-(10**13), max_value=10**13)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=NOW - 2 * HOUR, max_value=NOW + 2 * HOUR)
    | st.sampled_from(["9999999999", "1e308", True, False, None, [], {}])
    | JSON_VALUES
)
SANE_PAST = st.integers(min_value=0, max_value=NOW) | st.floats(min_value=0, max_value=NOW)
SANE_FUTURE = st.integers(min_value=NOW + 1, max_value=253402300799) | st.floats(
    min_value=NOW + 0.001, max_value=253402300799
)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@settings(max_examples=300, deadline=None)
@given(junk=st.text(max_size=300) | st.from_regex(r"[A-Za-z0-9_=+/.-]{0,400}", fullmatch=True))
def test_decode_token_on_junk_raises_only_invalid_token_error(junk: str) -> None:
    for manager in (MANAGER, ROTATING):
        with pytest.raises(jwt.InvalidTokenError):
            manager.decode(junk, now=NOW)


@settings(max_examples=400, deadline=None)
@given(
    header_extra=st.dictionaries(st.sampled_from(["kid", "typ", "cty", "jku"]), JSON_VALUES)
    | st.dictionaries(st.sampled_from(["alg", "kid", "crit", "b64"]), JSON_VALUES),
    times=st.fixed_dictionaries(
        {"exp": SANE_FUTURE | TIMES},
        optional={"iat": SANE_PAST | TIMES, "nbf": SANE_PAST | TIMES},
    ),
    other=st.dictionaries(st.sampled_from(["username", "sub", "aud", "iss", "jti"]), JSON_VALUES, max_size=3),
)
def test_decode_token_on_signed_random_claims(header_extra: Any, times: Any, other: Any) -> None:
    """A token with the right signature and random header/claims: accepted only if every claim is sane."""
    header = {"alg": "HS256", **header_extra}
    payload = {**other, **times}
    try:
        result = jwtplus.decode_token(MANAGER, forge(header, payload), now=NOW)
    except jwt.InvalidTokenError:
        event("refused")
        return
    event("accepted")
    assert header["alg"] == "HS256"
    assert is_number(result["exp"])
    assert NOW < result["exp"] <= 253402300799
    for name in ("iat", "nbf"):
        if name in result:
            assert is_number(result[name])
            assert 0 <= result[name] <= NOW
    assert "aud" not in result or not result["aud"]


@settings(max_examples=300, deadline=None)
@given(
    kid=st.text(max_size=20)
    | st.integers(min_value=-5, max_value=10**16).map(str)
    | st.integers(min_value=period(NOW) - 5, max_value=period(NOW) + 5).map(str)
    | st.sampled_from([str(period(NOW) - k) for k in range(3)])
    | JSON_VALUES,
    key_period=st.integers(min_value=period(NOW) - 5, max_value=period(NOW) + 5),
)
def test_rotating_decode_token_on_random_kids(kid: Any, key_period: int) -> None:
    """Only the canonical decimal of a period still in its window, signed with that period's key, passes."""
    try:
        jwtplus.decode_token(ROTATING, period_token(kid, key_period, NOW), now=NOW)
    except jwt.InvalidTokenError:
        event("refused")
        return
    event("accepted")
    assert kid == str(key_period)
    assert key_period in (period(NOW), period(NOW) - 1, period(NOW) - 2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    junk=st.text(
        st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp", "Zs")),
        min_size=1,
        max_size=300,
    )
    | st.from_regex(r"[A-Za-z0-9_=.-]{1,400}", fullmatch=True)
)
async def test_random_junk_tokens_over_http_get_401(aiohttp_client: Any, junk: str) -> None:
    client = await aiohttp_client(token_app(MANAGER))
    assert_refused(await raw_request(client, "/api/x", headers=bearer_pairs(junk)))
    assert_refused(await raw_request(client, "/page", method="PUT", headers=bearer_pairs(junk)))
    assert hits(client) == []


# -- Part B: path spellings --

WHITELIST = ("/public/.*", "/css/.+", "/static/.*")
PROTECTED = ("/api/.*",)
WHITELISTED_HANDLERS = {"public", "css", "static"}


def path_app(*, spa: bool = False, whitelist: Iterable[str] = WHITELIST) -> web.Application:
    """Routes under every whitelisted prefix, private ones beside them, and a catch-all behind all."""
    pages: dict[str, Any] = {}
    if spa:
        pages = {
            "unauthorized_return_route": "/login.html",
            "unauthorized_return_route_handler": marker("login page"),
            "authorized_return_page_handler": marker("app page"),
        }
    helper = jwtplus.JWTHelper(
        secret_manager=MANAGER, whitelist=tuple(whitelist), protected_apis=PROTECTED, **pages
    )
    app = web.Application(middlewares=[helper.pre_jwt_identifier(), helper.post_jwt_router()])
    app[HITS] = []
    for route, name in (
        ("/public/{tail:.*}", "public"),
        ("/css/{name:.*}", "css"),
        ("/static/{tail:.*}", "static"),
        ("/api/{name}", "api"),
        ("/{user}/settings", "settings"),
        ("/admin", "admin"),
        ("/{tail:.*}", "catchall"),
    ):
        app.router.add_route("*", route, marker(name))
    return app


def spa_path_rules() -> jwtplus.RoutingRules:
    """The SPA table of the path tests: a login page, an app page, WHITELIST and PROTECTED."""
    return jwtplus.RoutingRules(
        login_route="/login.html",
        whitelist=WHITELIST,
        protected_apis=PROTECTED,
        login_page=True,
        app_page=True,
    )


def router_path(target: str) -> str:
    """What aiohttp's router matches for a request target: ``rel_url.path_safe``."""
    path = target.partition("#")[0].partition("?")[0]
    if "://" in path:
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    return yarl.URL.build(path=path, encoded=True).path_safe


# (request target, handler a logged-in request reaches ("" for aiohttp's 404),
#  handler an anonymous request may reach, or None for a 401)
SPELLINGS: list[tuple[str, str, str | None]] = [
    # Controls: the whitelist works.
    ("/public/x", "public", "public"),
    ("/public/x/y.js", "public", "public"),
    ("/css/1.css", "css", "css"),
    ("/static/app.js", "static", "static"),
    ("/static/x/../y.js", "static", "static"),
    ("/static/../static/y.js", "static", "static"),
    ("/public/?x=1", "public", "public"),
    # Encoded slashes: request.path reads /public/x/settings, the router serves /{user}/settings.
    ("/public%2Fx/settings", "settings", None),
    ("/public%2fx/settings", "settings", None),
    ("/public%252Fx/settings", "settings", None),
    ("/public%25%32%46x/settings", "settings", None),
    ("/public%5C..%5Cadmin/settings", "settings", None),
    ("/api%2Fx", "catchall", None),
    ("/public%252F..%252Fadmin", "catchall", None),
    # Dot segments, plain and encoded.
    ("/public/../admin", "public", None),
    ("/public/%2e%2e/admin", "public", None),
    ("/public/%2E%2E/admin", "public", None),
    ("/public/.%2e/admin", "public", None),
    ("/public/./../admin", "public", None),
    ("/public/x/../../admin", "public", None),
    ("/public/x/..%2F..%2Fadmin", "public", None),
    ("/public/..%2Fadmin", "public", None),
    ("/public/..", "public", None),
    ("/static/../admin", "static", None),
    ("/static/%2e%2e/admin", "static", None),
    ("/static/..%2Fadmin", "static", None),
    ("/static/..%2F..%2Fetc%2Fpasswd", "static", None),
    ("/api/x/../../public/x", "catchall", None),
    ("/./admin", "catchall", None),
    # Doubled and trailing slashes, case.
    ("//admin", "catchall", None),
    ("///admin", "catchall", None),
    ("//public/x", "catchall", None),
    ("/admin/", "catchall", None),
    ("/admin", "admin", None),
    ("/%61dmin", "admin", None),
    ("/PUBLIC/x", "catchall", None),
    ("/public", "catchall", None),
    # /css/.+ must not cover /css/ however it is spelled.
    ("/css/", "css", None),
    ("/css//", "css", None),
    ("/css/.", "css", None),
    ("/css/%2e", "css", None),
    ("/css/x/..", "css", None),
    # Newlines.
    ("/api/public%0a", "api", None),
    ("/api/public%0A", "api", None),
    ("/public/%0a", "", None),  # no route: aiohttp's {tail:.*} does not match a newline either
    # Query strings and fragments are not the path.
    ("/admin?x=/public/", "admin", None),
    ("/admin?/public/x", "admin", None),
    ("/admin#/public/x", "admin", None),
    ("/admin?%2F/public/", "admin", None),
    # Absolute form.
    ("http://evil/admin", "admin", None),
    ("http://evil/public/x", "public", "public"),
]
SPELLING_IDS = [target for target, _, _ in SPELLINGS]


def api_rules(whitelist: Iterable[str] = WHITELIST) -> jwtplus.RoutingRules:
    return jwtplus.RoutingRules(whitelist=tuple(whitelist), protected_apis=PROTECTED)


@pytest.mark.parametrize(("target", "authed", "anonymous"), SPELLINGS, ids=SPELLING_IDS)
async def test_path_spelling_over_http(
    aiohttp_client: Any, target: str, authed: str, anonymous: str | None
) -> None:
    client = await aiohttp_client(path_app())
    for method in ("GET", "POST"):
        reply = await raw_request(client, target, method=method)
        if anonymous is None:
            assert_refused(reply, CHALLENGE_MISSING)
        else:
            assert (reply.status, reply.body) == (200, f"HANDLER {anonymous}".encode()), reply
    assert hits(client) == ([] if anonymous is None else [anonymous, anonymous])
    client.server.app[HITS].clear()
    # Logged in, the same spelling does reach a handler: this one (so the test above means something),
    # with the path the pure-function tests below feed to decide().
    token = MANAGER.encode({"username": "ann"})
    reply = await raw_request(client, target, headers=bearer_pairs(token))
    if not authed:
        assert reply.status == 404, reply
        assert client.server.app[HITS] == []
        return
    assert (reply.status, reply.body) == (200, f"HANDLER {authed}".encode()), reply
    assert client.server.app[HITS] == [(authed, router_path(target))]


@pytest.mark.parametrize(("target", "authed", "anonymous"), SPELLINGS, ids=SPELLING_IDS)
def test_path_spelling_decide(target: str, authed: str, anonymous: str | None) -> None:
    path = router_path(target)
    rules = api_rules()
    expected = jwtplus.Action.HANDLER if anonymous else jwtplus.Action.UNAUTHORIZED
    for method in ("GET", "HEAD", "POST", "DELETE"):
        assert jwtplus.decide(rules, path, method, True, "missing") is expected
        assert jwtplus.decide(rules, path, method, True, "invalid") is expected
        assert jwtplus.decide(rules, path, method, True, "pass") is jwtplus.Action.HANDLER
    expected_rejected = jwtplus.Action.HANDLER if anonymous else jwtplus.Action.FORBIDDEN
    assert jwtplus.decide(rules, path, "GET", True, "rejected") is expected_rejected


async def test_encoded_slash_through_the_test_client(aiohttp_client: Any) -> None:
    client = await aiohttp_client(path_app())
    async with client.get(yarl.URL("/public%2Fx/settings", encoded=True)) as resp:
        assert resp.status == 401
        assert await resp.read() == BODY_401
    async with client.post(yarl.URL("/public%2Fx/settings", encoded=True)) as resp:
        assert resp.status == 401
    assert hits(client) == []


async def test_whitelist_dollar_does_not_admit_a_newline(aiohttp_client: Any) -> None:
    """re.match('/api/public$') would admit '/api/public\\n'; the whole-string match must not."""
    client = await aiohttp_client(path_app(whitelist=("/api/public$", "/api/open")))
    for target in ("/api/public%0a", "/api/public%0A", "/api/open%0a", "/api/open%0d%0a"):
        assert_refused(await raw_request(client, target), CHALLENGE_MISSING)
        assert_refused(await raw_request(client, target, method="POST"), CHALLENGE_MISSING)
    assert hits(client) == []
    reply = await raw_request(client, "/api/open")
    assert (reply.status, reply.body, hits(client)) == (200, b"HANDLER api", ["api"])


async def test_head_of_private_path_is_refused(aiohttp_client: Any) -> None:
    client = await aiohttp_client(path_app())
    for target in ("/admin", "/public%2Fx/settings", "/public/../admin"):
        reply = await raw_request(client, target, method="HEAD")
        assert reply.status == 401
        assert reply.headers["WWW-Authenticate"] == CHALLENGE_MISSING
    assert hits(client) == []


# SPA mode: an anonymous GET gets the login page, never the real handler; protected spellings get 401.
SPA_SPELLINGS: list[tuple[str, str]] = [
    ("/public%2Fx/settings", "login page"),
    ("/public/../admin", "login page"),
    ("/static/../admin", "login page"),
    ("//admin", "login page"),
    ("/admin/", "login page"),
    ("/css/", "login page"),
    ("/API/x", "login page"),
    ("/api/x", "401"),
    ("/api/public%0a", "401"),
    ("/api%2Fx", "401"),
    ("/api%2fx", "401"),
    ("/x/../api/x", "401"),
    ("/x/%2e%2e/api/x", "401"),
    ("//api/x", "401"),
    ("/api//x", "401"),
    ("/api/x?next=/public/", "401"),
    ("/public/../api/x", "401"),
]


@pytest.mark.parametrize(("target", "anonymous"), SPA_SPELLINGS, ids=[t for t, _ in SPA_SPELLINGS])
async def test_path_spelling_spa_mode(aiohttp_client: Any, target: str, anonymous: str) -> None:
    client = await aiohttp_client(path_app(spa=True))
    reply = await raw_request(client, target)
    if anonymous == "401":
        assert_refused(reply, CHALLENGE_MISSING)
        assert hits(client) == []
    else:
        assert (reply.status, reply.body) == (200, f"HANDLER {anonymous}".encode())
        assert hits(client) == [anonymous]
    client.server.app[HITS].clear()
    assert_refused(await raw_request(client, target, method="POST"), CHALLENGE_MISSING)
    assert hits(client) == []
    rules = spa_path_rules()
    action = jwtplus.decide(rules, router_path(target), "GET", True, "missing")
    assert action is (jwtplus.Action.UNAUTHORIZED if anonymous == "401" else jwtplus.Action.LOGIN_PAGE)


# -- Part B, pure functions --


def remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4, written independently of jwtplus."""
    out: list[str] = []
    for segment in path.split("/")[1:]:
        if segment == "..":
            if len(out) > 0:
                out.pop()
        elif segment != ".":
            out.append(segment)
    trailing = path.rsplit("/", 1)[-1] in (".", "..")
    return "/" + "/".join(out) + ("/" if trailing and out else "")


def merge_slashes(path: str) -> str:
    return re.sub("/{2,}", "/", path)


def oracle_readings(path_safe: str) -> set[str]:
    """The path as the router saw it, fully decoded, and as a proxy that merges slashes and resolves dots."""
    decoded = urllib.parse.unquote(path_safe)  # path_safe keeps only %2F and %25 encoded
    return {
        path_safe,
        decoded,
        remove_dot_segments(merge_slashes(path_safe)),
        remove_dot_segments(merge_slashes(decoded)),
    }


@pytest.mark.parametrize(
    ("path", "must_include"),
    [
        ("/public%2Fx/settings", {"/public%2Fx/settings", "/public/x/settings"}),
        ("/public/../admin", {"/public/../admin", "/admin"}),
        ("/public/x/..%2F..%2Fadmin", {"/public/x/..%2F..%2Fadmin", "/public/x/../../admin", "/admin"}),
        ("//admin", {"//admin", "/admin"}),
        ("/static/../admin", {"/static/../admin", "/admin"}),
        ("/public%252Fx/settings", {"/public%252Fx/settings", "/public%2Fx/settings"}),
        ("/css/x/..", {"/css/x/..", "/css/"}),
        ("/css/.", {"/css/.", "/css/"}),
        ("/css//", {"/css//", "/css/"}),
        ("/api%2Fx", {"/api%2Fx", "/api/x"}),
        ("/x/../api/x", {"/x/../api/x", "/api/x"}),
    ],
)
def test_path_readings(path: str, must_include: set[str]) -> None:
    readings = jwtplus.path_readings(path)
    assert readings[0] == path
    assert must_include <= set(readings)
    assert len(readings) == len(set(readings))


def test_path_readings_of_plain_path_is_itself() -> None:
    for path in ("/", "/admin", "/public/x", "/css/1.css", "/api/public\n", "/a;b", "/a\\..\\b"):
        assert jwtplus.path_readings(path) == (path,)


PATH_SEGMENTS = [
    "public", "admin", "api", "css", "static", "settings", "x", "1.css",
    "", ".", "..", "%2e", "%2e%2e", ".%2E", "%2F", "%2f", "..%2F", "x%2F..", "%25", "%252F", "%252e%252e",
    "%0a", "%5C", "..;", "%3F",
]  # fmt: skip
RAW_PATHS = st.builds(
    lambda segments, query: "/" + "/".join(segments) + query,
    st.lists(st.sampled_from(PATH_SEGMENTS), min_size=1, max_size=6),
    st.sampled_from(["", "?x=/public/", "?/public/x"]),
)
STATUSES = ["pass", "missing", "invalid", "expired", "rejected"]


@settings(max_examples=500, deadline=None)
@given(
    path=st.text(max_size=60) | RAW_PATHS.map(router_path),
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "get"]) | st.text(max_size=8),
    route_found=st.booleans(),
    status=st.sampled_from(STATUSES),
    spa=st.booleans(),
)
def test_decide_never_raises(path: str, method: str, route_found: bool, status: Any, spa: bool) -> None:
    rules = jwtplus.RoutingRules(
        login_route="/login.html" if spa else "",
        whitelist=WHITELIST,
        protected_apis=PROTECTED,
        login_page=spa,
        app_page=spa,
    )
    action = jwtplus.decide(rules, path, method, route_found, status)
    assert isinstance(action, jwtplus.Action)
    readings = jwtplus.path_readings(path)
    assert readings[0] == path
    if status != "pass":
        assert action is not jwtplus.Action.APP_PAGE


@settings(max_examples=1000, deadline=None)
@given(raw=RAW_PATHS, method=st.sampled_from(["GET", "POST"]))
def test_decide_whitelists_only_what_every_reading_allows(raw: str, method: str) -> None:
    """An anonymous request runs a handler only if the path, decoded and normalised, is whitelisted."""
    path = router_path(raw)
    action = jwtplus.decide(api_rules(), path, method, True, "missing")
    assert action in (jwtplus.Action.HANDLER, jwtplus.Action.UNAUTHORIZED)
    if action is jwtplus.Action.HANDLER:
        for reading in oracle_readings(path):
            assert any(re.fullmatch(p, reading) for p in WHITELIST), (raw, path, reading)


@settings(max_examples=1000, deadline=None)
@given(raw=RAW_PATHS)
def test_decide_protects_what_any_reading_protects(raw: str) -> None:
    """In SPA mode a protected path answers 401, never the login page, however it is spelled."""
    path = router_path(raw)
    rules = spa_path_rules()
    action = jwtplus.decide(rules, path, "GET", True, "missing")
    if action is jwtplus.Action.HANDLER:
        return  # whitelisted: checked above
    protected = any(re.fullmatch(p, r, re.DOTALL) for p in PROTECTED for r in oracle_readings(path))
    if protected:
        assert action is jwtplus.Action.UNAUTHORIZED, (raw, path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=RAW_PATHS, method=st.sampled_from(["GET", "POST"]))
async def test_random_spellings_over_http_reach_only_whitelisted_handlers(
    aiohttp_client: Any, raw: str, method: str
) -> None:
    client = await aiohttp_client(path_app())
    reply = await raw_request(client, raw, method=method)
    assert reply.status in (200, 401), reply
    ran = client.server.app[HITS]
    if reply.status == 401:
        assert_refused(reply, CHALLENGE_MISSING)
        assert ran == []
        return
    [(name, path)] = ran
    assert name in WHITELISTED_HANDLERS, (raw, ran)
    assert path == router_path(raw)
    for reading in oracle_readings(path):
        assert any(re.fullmatch(p, reading) for p in WHITELIST), (raw, reading)


# ---- Identity providers: jwtplus as the consumer of another issuer's JWKS ----
#
# A fake identity provider (a real aiohttp app on 127.0.0.1) serves OpenID discovery and a JWK Set,
# counts every request, and can be switched to fail; tokens are signed with PyJWT. The resource server
# is a real app under the test client. Waiting out a cooldown or a max-age never sleeps: the
# ``provider_clock`` fixture is the resource server's clock, moved forward.

AUDIENCE = "https://api.jwtplus.test"
MAX_JWKS_BYTES = 512 * 1024


# -- Keys, generated once per module --


@functools.cache
def rsa_key(name: str, bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@functools.cache
def ec_key(name: str) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@functools.cache
def ed_key(name: str) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@dataclass(frozen=True)
class Key:
    """A provider's signing key: its kid, the alg it signs with, the private key."""

    kid: str
    alg: str
    private: Any

    def jwk(self, **extra: Any) -> dict[str, Any]:
        """The public JWK as a provider publishes it; *extra* items replace (None: remove) members."""
        public = jwt.get_algorithm_by_name(self.alg).to_jwk(self.private.public_key(), as_dict=True)
        jwk = {**public, "kid": self.kid, "alg": self.alg, "use": "sig", **extra}
        return {k: v for k, v in jwk.items() if v is not None}

    def private_jwk(self) -> dict[str, Any]:
        """The private JWK, for a real provider's key file."""
        private = jwt.get_algorithm_by_name(self.alg).to_jwk(self.private, as_dict=True)
        return {**private, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def public_pem(self) -> bytes:
        pem: bytes = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem

    def sign(self, claims: dict[str, Any], *, alg: str | None = None, **header: Any) -> str:
        """A token signed with PyJWT's algorithm for *alg* (ours by default). *header* items replace
        the defaults (our kid, typ "JWT"), DROP leaves one out; claims and header go out as they
        are, even those jwt.encode would refuse to write (a kid or an iss that is not a string)."""
        alg = alg or self.alg
        fields = {"alg": alg, "typ": "JWT", "kid": self.kid, **header}
        fields = {k: v for k, v in fields.items() if v is not DROP}
        algorithm = jwt.get_algorithm_by_name(alg)
        signing_input = b64url(json.dumps(fields).encode()) + "." + b64url(json.dumps(claims).encode())
        signature = algorithm.sign(signing_input.encode(), algorithm.prepare_key(self.private))
        return signing_input + "." + b64url(signature)


def rs(name: str) -> Key:
    return Key(f"rsa-{name}", "RS256", rsa_key(name))


def es(name: str) -> Key:
    return Key(f"ec-{name}", "ES256", ec_key(name))


def ed(name: str) -> Key:
    return Key(f"ed-{name}", "EdDSA", ed_key(name))


def ps(name: str) -> Key:
    return Key(f"ps-{name}", "PS256", rsa_key(name))


def raw_rs256(private: rsa.RSAPrivateKey, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """An RS256 token signed with cryptography alone (PyJWT refuses keys under 2048 bits)."""
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    signature = private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + b64url(signature)


# -- The fake identity provider --


JwksMode = str
"""How the JWKS endpoint answers: "ok", "slow", "hang", "status500", "garbage", "not_jwks", "bare_jwk",
"list", "html", "oversize", "gzip_bomb", "redirect", "split", "exactly_max"."""


@dataclass
class FakeIdP:
    """An identity provider on 127.0.0.1: discovery at the usual place, the JWK Set at *jwks_path*."""

    server: TestServer
    published: list[dict[str, Any]] = field(default_factory=list)
    cache_control: str | None = None
    mode: JwksMode = "ok"
    delay: float = 0.2
    discovery_issuer: Any = None
    """None: its own issuer; anything else is what discovery says (DROP-like: "<missing>")."""
    discovery_jwks_uri: Any = None
    jwks_path: str = "/jwks"
    counts: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @functools.cached_property
    def issuer(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def jwks_uri(self) -> str:
        return self.issuer + self.jwks_path

    def publish(self, *keys: Key | dict[str, Any]) -> None:
        self.published = [k.jwk() if isinstance(k, Key) else k for k in keys]

    def provider(self, *, discovery: bool = False, **kwargs: Any) -> jwtplus.IdentityProvider:
        kwargs.setdefault("audience", AUDIENCE)
        kwargs.setdefault("cooldown", 1)
        kwargs.setdefault("algorithms", ("RS256", "ES256", "EdDSA", "PS256"))
        if not discovery:
            kwargs.setdefault("jwks_uri", self.jwks_uri)
        return jwtplus.IdentityProvider(issuer=self.issuer, **kwargs)

    def claims(self, **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "user-" + secrets.token_hex(4),  # every token its own: no verified-token cache hits
            "iat": now,
            "exp": now + 3 * 86400,  # beyond any shift of provider_clock
            **extra,
        }
        return {k: v for k, v in claims.items() if v is not DROP}

    def token(
        self, key: Key, *, alg: str | None = None, header: dict[str, Any] | None = None, **extra: Any
    ) -> str:
        return key.sign(self.claims(**extra), alg=alg, **(header or {}))

    def jwks_body(self) -> bytes:
        return json.dumps({"keys": self.published}).encode()

    async def close(self) -> None:
        await self.server.close()


def idp_app(idp_ref: list[FakeIdP]) -> web.Application:
    """The provider's routes; they read the FakeIdP's switches on every request."""

    def current() -> FakeIdP:
        return idp_ref[0]

    async def discovery(request: web.Request) -> web.Response:
        idp = current()
        idp.counts["discovery"] += 1
        document: dict[str, Any] = {
            "issuer": idp.issuer if idp.discovery_issuer is None else idp.discovery_issuer,
            "jwks_uri": idp.jwks_uri if idp.discovery_jwks_uri is None else idp.discovery_jwks_uri,
            "token_endpoint": idp.issuer + "/token",
        }
        document = {k: v for k, v in document.items() if v != "<missing>"}
        return web.json_response(document)

    async def jwks(request: web.Request) -> web.StreamResponse:
        idp = current()
        idp.counts["jwks"] += 1
        idp.in_flight += 1
        try:
            return await answer(idp, request)
        finally:
            idp.in_flight -= 1

    async def answer(idp: FakeIdP, request: web.Request) -> web.StreamResponse:
        headers = {} if idp.cache_control is None else {"Cache-Control": idp.cache_control}
        body, mode = idp.jwks_body(), idp.mode
        if mode == "slow":
            await asyncio.sleep(idp.delay)
        elif mode == "hang":
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(idp.release.wait(), 30)
        elif mode == "status500":
            return web.Response(status=500, text="internal error")
        elif mode == "garbage":
            body = b"\x00{not json at all"
        elif mode == "not_jwks":
            body = b'{"keys": "all of them"}'
        elif mode == "bare_jwk":
            body = json.dumps(idp.published[0] if idp.published else {"kty": "RSA"}).encode()
        elif mode == "list":
            body = json.dumps(idp.published).encode()
        elif mode == "html":
            return web.Response(text="<html><body>maintenance</body></html>", content_type="text/html")
        elif mode in ("oversize", "exactly_max"):
            size = MAX_JWKS_BYTES + (1 if mode == "oversize" else 0)
            body = body[:-1] + b" " * (size - len(body)) + b"}"  # still a valid JWK Set, padded
        elif mode == "gzip_bomb":
            headers["Content-Encoding"] = "gzip"
            body = gzip.compress(body[:-1] + b" " * (16 * 1024 * 1024) + b"}", compresslevel=1)
        elif mode == "redirect":
            raise web.HTTPFound(idp.issuer + "/elsewhere")
        elif mode == "split":  # one valid JWK Set in two writes: what any network may deliver
            response = web.StreamResponse(headers={**headers, "Content-Type": "application/json"})
            response.content_length = len(body)
            await response.prepare(request)
            await response.write(body[: len(body) // 2])
            await asyncio.sleep(0.05)
            await response.write(body[len(body) // 2 :])
            await response.write_eof()
            return response
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def elsewhere(request: web.Request) -> web.Response:
        idp = current()
        idp.counts["elsewhere"] += 1
        return web.Response(body=idp.jwks_body(), content_type="application/json")

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/elsewhere", elsewhere)
    app.router.add_get("/{path:.*}", jwks)
    return app


MakeIdP = Callable[..., Awaitable[FakeIdP]]


def _jwks_fetches() -> list[asyncio.Task[Any]]:
    """jwtplus's key fetches still running (in the foreground or the background)."""
    return [
        task
        for task in asyncio.all_tasks()
        if "_remote_keys" in getattr(task.get_coro(), "__qualname__", "") and not task.done()
    ]


@pytest.fixture
async def make_idp() -> AsyncIterator[MakeIdP]:
    """Start fake identity providers; each is released (if hanging) and closed at teardown, once
    jwtplus's fetches from it have ended."""
    started: list[FakeIdP] = []

    async def start(*keys: Key | dict[str, Any], **settings: Any) -> FakeIdP:
        ref: list[FakeIdP] = []
        server = TestServer(idp_app(ref), host="127.0.0.1")
        await server.start_server()
        idp = FakeIdP(server, **settings)
        ref.append(idp)
        idp.publish(*keys)
        assert idp.issuer  # remembered: it outlives the server
        started.append(idp)
        return idp

    yield start
    for idp in started:
        idp.release.set()
    pending = _jwks_fetches()
    if pending:
        await asyncio.wait(pending, timeout=10)
    for idp in started:
        await idp.close()


class ShiftedClock:
    """The resource server's clock (the middleware's ``clock=``): real time, *offset* seconds ahead."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def provider_clock() -> ShiftedClock:
    """Move the key cache's clock forward instead of sleeping out cooldowns and max-ages; the tokens'
    exp lies three days ahead, beyond any shift."""
    return ShiftedClock()


async def me(request: web.Request) -> web.Response:
    claims = request[jwtplus.AUTH_CLAIMS]
    assert claims is not None
    return web.json_response(
        {"sub": claims["sub"], "iss": claims["iss"], "carry": request[jwtplus.AUTH_CARRY]}
    )


def resource_app(issuers: Any, **kwargs: Any) -> web.Application:
    """The API that trusts the provider(s): /api/me needs a token and echoes its subject."""
    app = web.Application(
        middlewares=[
            jwtplus.jwt_middleware(issuers=issuers, rules=RoutingRules(protected_apis=("/api/.*",)), **kwargs)
        ]
    )
    app.router.add_get("/api/me", me)
    return app


Client = TestClient[Any, Any]


async def resource(aiohttp_client: Any, issuers: Any, **kwargs: Any) -> Client:
    client: Client = await aiohttp_client(resource_app(issuers, **kwargs))
    return client


async def status_of(client: Client, token: str) -> int:
    """GET /api/me with *token*: its status, after checking that the body and headers fit it."""
    async with client.get("/api/me", headers=bearer(token)) as response:
        body = await response.read()
        if response.status == 200:
            assert json.loads(body)["iss"]
        elif response.status == 401:
            assert body == BODY_401
            assert response.headers["WWW-Authenticate"] == CHALLENGE_INVALID
        elif response.status == 503:
            assert body == BODY_503
            assert response.headers["Retry-After"] == "5"
            assert "WWW-Authenticate" not in response.headers
        return response.status


async def statuses(client: Client, tokens: list[str]) -> Counter[int]:
    """The statuses of concurrent requests, one per token."""
    return Counter(await asyncio.gather(*(status_of(client, t) for t in tokens)))


async def until(predicate: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


async def settled(idp: FakeIdP) -> None:
    """Wait until no fetch of jwtplus runs (so that a count that did not move never will)."""
    await asyncio.sleep(0.05)
    pending = _jwks_fetches()
    if pending:
        await asyncio.wait(pending, timeout=10)
    assert idp.in_flight == 0


# -- Where the keys come from --


@pytest.mark.parametrize("key", [rs("a"), es("a"), ed("a"), ps("a")], ids=lambda k: k.alg)
async def test_keys_come_from_the_jwks_uri(aiohttp_client: Any, make_idp: MakeIdP, key: Key) -> None:
    idp = await make_idp(key)
    client = await resource(aiohttp_client, idp.provider())
    token = idp.token(key, sub="ann")
    async with client.get("/api/me", headers=bearer(token)) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["sub"] == "ann"
    assert answer["iss"] == idp.issuer
    assert answer["carry"]["aud"] == AUDIENCE  # subject_identifier carries the claims
    assert idp.counts == {"jwks": 1}


async def test_keys_come_from_openid_discovery_without_a_jwks_uri(
    aiohttp_client: Any, make_idp: MakeIdP
) -> None:
    idp = await make_idp(rs("a"), jwks_path="/oauth2/v3/certs")  # not a path jwtplus could guess
    client = await resource(aiohttp_client, idp.provider(discovery=True))
    assert [await status_of(client, idp.token(rs("a"))) for _ in range(3)] == [200] * 3
    assert idp.counts == {"discovery": 1, "jwks": 1}


@pytest.mark.parametrize(
    "named",
    [
        "https://login.example.com",  # another issuer altogether
        "{issuer}/",  # ours but for a trailing slash: OpenID Discovery 4.3 wants it identical
        "http://localhost:{port}",  # the same server under another name
        "<missing>",
        42,
    ],
)
async def test_discovery_naming_another_issuer_is_refused(
    aiohttp_client: Any, make_idp: MakeIdP, named: Any
) -> None:
    idp = await make_idp(rs("a"))
    if isinstance(named, str):
        named = named.format(issuer=idp.issuer, port=idp.server.port)
    idp.discovery_issuer = named
    client = await resource(aiohttp_client, idp.provider(discovery=True))
    # Observed: no keys can be fetched, so every token is 503 (never 401, never 500); the JWK Set the
    # document points at is never read, and within the cooldown discovery is not asked again.
    assert await status_of(client, idp.token(rs("a"))) == 503
    assert await status_of(client, idp.token(rs("a"))) == 503
    assert idp.counts == {"discovery": 1}


@pytest.mark.parametrize(
    "jwks_uri",
    ["http://keys.example.com/jwks", "ftp://127.0.0.1/jwks", "/jwks", "", 42, "<missing>"],
)
async def test_discovery_pointing_at_a_jwks_uri_off_https_is_refused(
    aiohttp_client: Any, make_idp: MakeIdP, jwks_uri: Any
) -> None:
    idp = await make_idp(rs("a"), discovery_jwks_uri=jwks_uri)
    client = await resource(aiohttp_client, idp.provider(discovery=True))
    assert await status_of(client, idp.token(rs("a"))) == 503
    assert idp.counts == {"discovery": 1}


async def test_a_redirect_from_the_jwks_uri_is_not_followed(aiohttp_client: Any, make_idp: MakeIdP) -> None:
    idp = await make_idp(rs("a"), mode="redirect")
    client = await resource(aiohttp_client, idp.provider())
    assert await status_of(client, idp.token(rs("a"))) == 503
    assert idp.counts == {"jwks": 1}  # the keys it redirects to were never fetched
    assert idp.counts["elsewhere"] == 0


# -- The key cache --


async def test_a_hundred_tokens_with_one_kid_cost_one_jwks_fetch(
    aiohttp_client: Any, make_idp: MakeIdP
) -> None:
    idp = await make_idp(rs("a"))
    client = await resource(aiohttp_client, idp.provider())
    tokens = [idp.token(rs("a"), sub=f"user-{i}") for i in range(100)]
    assert len(set(tokens)) == 100  # no verified-token cache hit: each is verified with the cached key
    for i, token in enumerate(tokens):
        async with client.get("/api/me", headers=bearer(token)) as response:
            assert response.status == 200
            assert (await response.json())["sub"] == f"user-{i}"
    assert idp.counts == {"jwks": 1}


async def test_fifty_concurrent_requests_naming_a_new_kid_share_one_fetch(
    aiohttp_client: Any, make_idp: MakeIdP, provider_clock: ShiftedClock
) -> None:
    idp = await make_idp(rs("a"), mode="slow", delay=0.2)  # every request arrives while the fetch runs
    client = await resource(aiohttp_client, idp.provider(), clock=provider_clock)
    assert await statuses(client, [idp.token(rs("a")) for _ in range(50)]) == {200: 50}
    assert idp.counts == {"jwks": 1}
    idp.publish(rs("a"), es("b"))  # a kid the cache has never seen
    provider_clock.advance(1.5)  # past the cooldown
    assert await statuses(client, [idp.token(es("b")) for _ in range(50)]) == {200: 50}
    assert idp.counts == {"jwks": 2}


async def test_a_request_abandoned_while_its_fetch_runs_does_not_cancel_it_for_the_others(
    aiohttp_client: Any, make_idp: MakeIdP
) -> None:
    idp = await make_idp(rs("a"), mode="slow", delay=0.3)
    app = resource_app(idp.provider())
    client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})  # a gone client
    # cancels its handler
    first = asyncio.create_task(status_of(client, idp.token(rs("a"))))
    await until(lambda: idp.in_flight == 1)  # the first request started the fetch, and waits on it

    async def give_up() -> None:
        await asyncio.sleep(0.05)  # the others are waiting on the fetch too by now
        first.cancel()  # the first client gives up: aiohttp cancels its handler, mid-fetch

    others, _ = await asyncio.gather(statuses(client, [idp.token(rs("a")) for _ in range(5)]), give_up())
    assert others == {200: 5}
    with pytest.raises(asyncio.CancelledError):
        await first
    assert idp.counts == {"jwks": 1}


# -- Unknown kids --


async def test_an_unknown_kid_is_refetched_but_only_once_the_cooldown_has_passed(
    aiohttp_client: Any, make_idp: MakeIdP, provider_clock: ShiftedClock
) -> None:
    idp = await make_idp(rs("a"))
    client = await resource(aiohttp_client, idp.provider(cooldown="10s"), clock=provider_clock)
    assert await status_of(client, idp.token(rs("a"))) == 200
    idp.publish(rs("a"), es("b"))
    # within the cooldown of a fetch that worked, the kid does not exist: 401, and no fetch
    assert await status_of(client, idp.token(es("b"))) == 401
    provider_clock.advance(9)
    assert await status_of(client, idp.token(es("b"))) == 401
    assert idp.counts == {"jwks": 1}
    provider_clock.advance(1.5)
    assert await status_of(client, idp.token(es("b"))) == 200
    assert idp.counts == {"jwks": 2}


async def test_a_flood_of_made_up_kids_costs_at_most_one_fetch_per_cooldown(
    aiohttp_client: Any, make_idp: MakeIdP, provider_clock: ShiftedClock
) -> None:
    idp = await make_idp(rs("a"))
    client = await resource(aiohttp_client, idp.provider(cooldown=1), clock=provider_clock)
    assert await status_of(client, idp.token(rs("a"))) == 200
    attacker = es("attacker")
    info = client.server.app.middlewares[0].cache_info  # type: ignore[attr-defined]
    for round_ in range(2):
        before = idp.counts["jwks"]
        provider_clock.advance(1.01)  # the cooldown has passed: one made-up kid may cost a fetch
        made_up = [idp.token(attacker, header={"kid": secrets.token_urlsafe(12)}) for _ in range(200)]
        started = time.monotonic()
        assert await statuses(client, [*made_up, idp.token(rs("a"))]) == {401: 200, 200: 1}
        elapsed, fetches = time.monotonic() - started, idp.counts["jwks"] - before
        if elapsed < 1:  # the usual case: the whole flood within one cooldown
            assert fetches == 1
        else:  # a slow machine: still at most one fetch per cooldown the flood spanned
            assert 1 <= fetches <= 1 + int(elapsed)
        # only the good tokens are remembered: the flood leaves nothing behind
        assert info().currsize == 2 + round_
    # sequential made-up kids within the cooldown: not one more fetch
    before = idp.counts["jwks"]
    for _ in range(50):
        assert await status_of(client, idp.token(attacker, header={"kid": secrets.token_hex(8)})) == 401
    assert idp.counts["jwks"] == before


async def test_a_kid_longer_than_256_characters_never_costs_a_fetch(
    aiohttp_client: Any, make_idp: MakeIdP, provider_clock: ShiftedClock
) -> None:
    idp = await make_idp(rs("a"))
    client = await resource(aiohttp_client, idp.provider(), clock=provider_clock)
    assert await status_of(client, idp.token(rs("a"))) == 200
    provider_clock.advance(5)
    for kid in ("k" * 257, "k" * 5000, "", 7, None, ["rsa-a"], {"kid": "rsa-a"}):
        assert await status_of(client, idp.token(rs("a"), header={"kid": kid})) == 401, kid
    assert await status_of(client, idp.token(rs("a"), header={"kid": DROP})) == 401
    assert idp.counts == {"jwks": 1}


# -- The provider rotates its keys --


async def test_a_newly_published_kid_verifies_after_one_refetch(
    aiohttp_client: Any, make_idp: MakeIdP, provider_clock: ShiftedClock
) -> None:
    idp = await make_idp(rs("old"))
    client = await resource(aiohttp_client, idp.provider(), clock=provider_clock)
    assert await status_of(client, idp.token(rs("old"))) == 200
    idp.publish(rs("new"), rs("old"))
    provider_clock.advance(1.5)
    assert await status_of(client, idp.token(rs("new"))) == 200  # the first token with it: one refetch
    assert idp.counts == {"jwks": 2}
    assert [await status_of(client, idp.token(k)) for k in (rs("new"), rs("old"), rs("new"))] == [200] * 3
    assert idp.counts == {"jwks": 2}


async def test_a_kid_removed_from_the_jwks_stops_verifying_after_the_refetch_even_cached_tokens(
    aiohttp_client: Any, make_idp: MakeIdP, provider_clock: ShiftedClock
) -> None:
    idp = await make_idp(rs("old"), rs("new"))
    client = await resource(aiohttp_client, idp.provider(), clock=provider_clock)
    old_token = idp.token(rs("old"))
    assert [await status_of(client, old_token) for _ in range(3)] == [200] * 3
    info = client.server.app.middlewares[0].cache_info()  # type: ignore[attr-defined]
    assert info.hits == 2  # the token is now verified from the token cache
    idp.publish(rs("new"))  # the provider retires the old key
    assert await status_of(client, old_token) == 200  # nothing told jwtplus yet
    provider_clock.advance(301)  # the JWK Set (no Cache-Control: 300 s) is stale
    assert await status_of(client, idp.token(rs("new"))) == 200  # served from cache; refetch behind
    await until(lambda: idp.counts["jwks"] == 2)
    await settled(idp)
    assert await status_of(client, old_token) == 401  # the cached verdict went with its key
    assert await status_of(client, idp.token(rs("old"))) == 401
    assert await status_of(client, idp.token(rs("new"))) == 200
    assert idp.counts == {"jwks": 2}


async def test_a_key_replaced_under_the_same_kid_stops_verifying_even_cached_tokens(
    aiohttp_client: Any, make_idp: MakeIdP, provider_clock: ShiftedClock
) -> None:
    # a provider that replaces a (compromised) key under the same kid: tokens the old key verified
    # and the cache remembers are refused too (found cached before)
    old = Key("signing", "RS256", rsa_key("replaced-old"))
    new = Key("signing", "RS256", rsa_key("replaced-new"))
    idp = await make_idp(old)
    client = await resource(aiohttp_client, idp.provider(), clock=provider_clock)
    cached = idp.token(old)
    assert await status_of(client, cached) == 200
    idp.publish(new)
    provider_clock.advance(1.5)
    assert await status_of(client, idp.token(es("x"))) == 401  # an unknown kid: the refetch
    assert idp.counts == {"jwks": 2}
    assert await status_of(client, idp.token(new)) == 200
    assert await status_of(client, idp.token(old)) == 401  # a fresh token under the old key: refused
    assert await status_of(client, cached) == 401  # ... and so should the cached one be


# -- When the provider fails --


async def test_the_issuer_unreachable_with_a_known_kid_verification_goes_on_from_the_cache(
    aiohttp_client: Any, make_idp: MakeIdP, provider_clock: ShiftedClock
) -> None:
    idp = await make_idp(rs("a"))
    client = await resource(aiohttp_client, idp.provider(), clock=provider_clock)
    assert await status_of(client, idp.token(rs("a"))) == 200
    issuer, token = idp.issuer, idp.token(rs("a"))
    await idp.close()  # the provider is gone: connections are refused
    assert await status_of(client, token) == 200
    for _ in range(3):
        provider_clock.advance(400)  # stale: each request starts a background refetch, which fails
        assert await status_of(client, idp.token(rs("a"), iss=issuer)) == 200
        await settled(idp)
    assert idp.counts == {"jwks": 1}


async def test_an_unknown_kid_while_the_issuer_is_unreachable_is_503_never_500(
    aiohttp_client: Any, make_idp: MakeIdP, provider_clock: ShiftedClock
) -> None:
    idp = await make_idp(rs("a"))
    client = await resource(aiohttp_client, idp.provider(), clock=provider_clock)
    assert await status_of(client, idp.token(rs("a"))) == 200
    await idp.close()
    provider_clock.advance(1.5)
    assert await status_of(client, idp.token(es("b"))) == 503  # the refetch failed: maybe it exists
    assert await status_of(client, idp.token(es("b"))) == 503  # within the cooldown of a failed fetch
    assert await status_of(client, idp.token(rs("a"))) == 200  # known kids still verify
    provider_clock.advance(1.5)
    assert await status_of(client, idp.token(es("b"))) == 503


async def test_a_provider_never_reached_answers_503_for_every_token(aiohttp_client: Any) -> None:
    issuer = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = await resource(aiohttp_client, jwtplus.IdentityProvider(issuer=issuer, audience=AUDIENCE))
    token = rs("a").sign({"iss": issuer, "aud": AUDIENCE, "sub": "ann", "exp": int(time.time()) + 60})
    assert [await status_of(client, token) for _ in range(3)] == [503] * 3
    async with client.get("/api/me") as response:  # no token at all is still a plain 401
        assert response.status == 401


async def test_an_unknown_kid_is_401_once_a_fetch_says_it_does_not_exist(
    aiohttp_client: Any, make_idp: MakeIdP, provider_clock: ShiftedClock
) -> None:
    idp = await make_idp(rs("a"), mode="status500")
    client = await resource(aiohttp_client, idp.provider(), clock=provider_clock)
    assert await status_of(client, idp.token(rs("a"))) == 503  # the fetch failed: unknown, not refused
    idp.mode = "ok"
    assert await status_of(client, idp.token(rs("a"))) == 503  # within the cooldown of the failure
    provider_clock.advance(1.5)
    assert await status_of(client, idp.token(rs("a"))) == 200
    assert await status_of(client, idp.token(es("never"))) == 401  # this fetch worked: no such kid
    assert idp.counts == {"jwks": 2}


async def test_a_jwks_endpoint_that_hangs_past_the_timeout_answers_503_in_time(
    aiohttp_client: Any, make_idp: MakeIdP, provider_clock: ShiftedClock
) -> None:
    timeout = 0.5
    idp = await make_idp(rs("a"), mode="hang")
    client = await resource(aiohttp_client, idp.provider(timeout=timeout), clock=provider_clock)
    started = time.monotonic()
    assert await statuses(client, [idp.token(rs("a")) for _ in range(20)]) == {503: 20}
    elapsed = time.monotonic() - started
    assert timeout * 0.9 <= elapsed < timeout + 1.0
    assert idp.counts == {"jwks": 1}  # twenty requests waited on one fetch
    idp.release.set()
    await until(lambda: idp.in_flight == 0)


async def test_a_hanging_provider_never_delays_tokens_of_known_kids(
    aiohttp_client: Any, make_idp: MakeIdP, provider_clock: ShiftedClock
) -> None:
    timeout = 1.0
    idp = await make_idp(rs("a"))
    client = await resource(aiohttp_client, idp.provider(timeout=timeout), clock=provider_clock)
    assert await status_of(client, idp.token(rs("a"))) == 200
    idp.mode = "hang"
    provider_clock.advance(301)  # stale: the next request starts a background refetch, which hangs
    assert await statuses(client, [idp.token(rs("a")) for _ in range(20)]) == {200: 20}
    assert _jwks_fetches(), "the requests were answered only once the fetch had given up"
    await until(lambda: idp.counts["jwks"] == 2)
    # a new kid now waits on that same hanging fetch, and no longer than the timeout
    started = time.monotonic()
    assert await status_of(client, idp.token(es("b"))) == 503
    assert time.monotonic() - started < timeout + 1.0
    assert idp.counts == {"jwks": 2}
    assert await status_of(client, idp.token(rs("a"))) == 200  # the keys were kept
    idp.release.set()


BROKEN = ["status500", "garbage", "not_jwks", "bare_jwk", "list", "html", "oversize", "gzip_bomb", "redirect"]


@pytest.mark.parametrize("mode", BROKEN)
async def test_a_broken_jwks_keeps_the_keys_and_answers_503_for_unknown_kids(
    aiohttp_client: Any, make_idp: MakeIdP, provider_clock: ShiftedClock, mode: str
) -> None:
    idp = await make_idp(rs("a"), mode=mode)
    client = await resource(aiohttp_client, idp.provider(), clock=provider_clock)
    assert await status_of(client, idp.token(rs("a"))) == 503  # broken from the start: no keys at all
    idp.mode = "ok"
    provider_clock.advance(1.5)
    assert await status_of(client, idp.token(rs("a"))) == 200
    idp.publish(rs("a"), es("b"))
    idp.mode = mode
    provider_clock.advance(1.5)
    assert await status_of(client, idp.token(es("b"))) == 503  # the refetch failed
    assert await status_of(client, idp.token(rs("a"))) == 200  # the keys we had are kept
    provider_clock.advance(400)  # stale, and the background refetch fails too
    assert await status_of(client, idp.token(rs("a"))) == 200
    await until(lambda: idp.counts["jwks"] == 4)
    await settled(idp)
    assert await status_of(client, idp.token(rs("a"))) == 200
    idp.mode = "ok"
    provider_clock.advance(1.5)
    assert await status_of(client, idp.token(es("b"))) == 200
    assert idp.counts["jwks"] == 5


async def test_a_jwks_that_arrives_in_pieces_is_read_whole(
    aiohttp_client: Any, make_idp: MakeIdP, provider_clock: ShiftedClock
) -> None:
    # a JWK Set that reaches the client in two reads is read whole (found cut in half before)
    idp = await make_idp(rs("a"), es("b"), ed("c"), mode="split")
    client = await resource(aiohttp_client, idp.provider(), clock=provider_clock)
    assert await status_of(client, idp.token(rs("a"))) == 200


async def test_a_jwks_of_exactly_512_kib_is_accepted(
    aiohttp_client: Any, make_idp: MakeIdP, provider_clock: ShiftedClock
) -> None:
    # a body of 512 KiB (the documented limit) arrives in several reads
    idp = await make_idp(rs("a"), mode="exactly_max")
    client = await resource(aiohttp_client, idp.provider(), clock=provider_clock)
    assert await status_of(client, idp.token(rs("a"))) == 200


async def test_an_empty_jwks_is_a_rotation_to_no_keys(
    aiohttp_client: Any, make_idp: MakeIdP, provider_clock: ShiftedClock
) -> None:
    idp = await make_idp(rs("a"))
    client = await resource(aiohttp_client, idp.provider(), clock=provider_clock)
    cached = idp.token(rs("a"))
    assert await status_of(client, cached) == 200
    idp.publish()  # a valid JWK Set with no keys: the provider withdrew them all
    provider_clock.advance(1.5)
    assert await status_of(client, idp.token(es("b"))) == 401
    assert await status_of(client, cached) == 401
    assert await status_of(client, idp.token(rs("a"))) == 401


# -- Cache-Control --


async def test_a_max_age_of_one_second_refetches_in_the_background_once_it_passes(
    aiohttp_client: Any, make_idp: MakeIdP
) -> None:
    idp = await make_idp(rs("a"), cache_control="public, max-age=1")
    client = await resource(aiohttp_client, idp.provider(cooldown=1))
    assert await status_of(client, idp.token(rs("a"))) == 200
    await asyncio.sleep(1.1)  # the one real wait of this file: max-age and cooldown on the real clock
    assert await status_of(client, idp.token(rs("a"))) == 200  # from the cache, at once
    await until(lambda: idp.counts["jwks"] == 2)
    await settled(idp)
    assert [await status_of(client, idp.token(rs("a"))) for _ in range(20)] == [200] * 20
    assert idp.counts == {"jwks": 2}


@pytest.mark.parametrize(
    ("cache_control", "fresh_for"),
    [
        (None, 300),  # no Cache-Control: five minutes
        ("max-age=1", 1),
        ("public, max-age=600", 600),
        ('max-age="120"', 120),
        ("private, MAX-AGE=45, must-revalidate", 45),
        ("max-age=172800", 86400),  # capped at a day
        ("no-store", 0),  # refetched as often as the cooldown (1 s) allows
        ("no-cache", 0),
        ("max-age=-5", 300),  # unreadable: the default
        ("max-age=soon", 300),
    ],
)
async def test_cache_control_max_age_sets_when_a_known_kid_triggers_a_refetch(
    aiohttp_client: Any,
    make_idp: MakeIdP,
    provider_clock: ShiftedClock,
    cache_control: str | None,
    fresh_for: float,
) -> None:
    idp = await make_idp(rs("a"), cache_control=cache_control)
    client = await resource(aiohttp_client, idp.provider(cooldown=1), clock=provider_clock)
    assert await status_of(client, idp.token(rs("a"))) == 200
    refetch_at = max(fresh_for, 1)  # the cooldown bounds background refetches too
    provider_clock.advance(refetch_at - 0.5)
    for _ in range(5):
        assert await status_of(client, idp.token(rs("a"))) == 200
    await settled(idp)
    assert idp.counts == {"jwks": 1}, "refetched while the keys were fresh"
    provider_clock.advance(1)
    for _ in range(5):
        assert await status_of(client, idp.token(rs("a"))) == 200
    await until(lambda: idp.counts["jwks"] >= 2)
    await settled(idp)
    assert idp.counts == {"jwks": 2}, "one stale cache, one background refetch"


# -- Bounds --


async def test_a_jwks_of_a_hundred_keys_with_max_keys_5_keeps_five(
    aiohttp_client: Any, make_idp: MakeIdP, caplog: pytest.LogCaptureFixture
) -> None:
    keys = [ed(f"many-{i}") for i in range(100)]
    idp = await make_idp(*keys)
    client = await resource(aiohttp_client, idp.provider(max_keys=5, algorithms=("EdDSA",)))
    with caplog.at_level(logging.WARNING, logger="jwtplus"):
        assert [await status_of(client, idp.token(k)) for k in keys[:5]] == [200] * 5
    assert "publishes more than 5 keys" in caplog.text
    assert [await status_of(client, idp.token(k)) for k in keys[5:]] == [401] * 95
    assert idp.counts == {"jwks": 1}


async def test_jwks_entries_jwtplus_cannot_use_are_skipped_and_do_not_count_against_max_keys(
    aiohttp_client: Any, make_idp: MakeIdP, caplog: pytest.LogCaptureFixture
) -> None:
    usable = es("usable")
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    off_curve = {**es("off-curve").jwk(), "y": es("other-point").jwk()["y"]}  # not a point of P-256
    junk: list[Any] = [
        "not a jwk",
        None,
        {"kty": "EC"},
        {**es("no-kid").jwk(), "kid": ""},
        {**es("numeric-kid").jwk(), "kid": 5},
        {**es("long-kid").jwk(), "kid": "k" * 257},
        {**es("enc").jwk(), "use": "enc"},
        {**jwt.get_algorithm_by_name("ES384").to_jwk(p384, as_dict=True), "kid": "p384", "crv": "P-384"},
        {
            **jwt.get_algorithm_by_name("ES384").to_jwk(p384, as_dict=True),
            "kid": "p384-as-p256",
            "crv": "P-256",
        },
        {**off_curve, "kid": "off-curve"},
        {"kty": "oct", "k": b64url(b"k" * 32), "kid": "oct", "alg": "HS256"},
        ed("wrong-type").jwk(),
    ]
    idp = await make_idp(*junk, usable)
    client = await resource(aiohttp_client, idp.provider(max_keys=1, algorithms=("ES256",)))
    with caplog.at_level(logging.WARNING, logger="jwtplus"):
        assert await status_of(client, idp.token(usable)) == 200
    assert "fetching the keys" not in caplog.text  # a bad entry never spoils the set
    assert "off-curve" in caplog.text  # the invalid key was seen and said so
    assert await status_of(client, idp.token(es("off-curve"), header={"kid": "off-curve"})) == 401
    symmetric = forge({"alg": "HS256", "typ": "JWT", "kid": "oct"}, idp.claims(), key=b"k" * 32)
    assert await status_of(client, symmetric) == 401  # a published symmetric key is never a key


# -- What a provider's token must be --

KEYS = {
    "rs": rs("claims"),
    "es": es("claims"),
    "ed": ed("claims"),
    "any": Key("rsa-no-alg", "PS256", rsa_key("no-alg")),  # published without "alg"
    "enc": Key("rsa-enc", "RS256", rsa_key("enc")),
    "other": rs("not-published"),
}


async def claims_idp(make_idp: MakeIdP) -> FakeIdP:
    idp = await make_idp()
    idp.publish(
        KEYS["rs"],
        KEYS["es"],
        KEYS["ed"],
        KEYS["any"].jwk(alg=None),
        KEYS["enc"].jwk(use="enc"),
    )
    return idp


def der_signature(token: str) -> str:
    """*token* with its ES256 signature re-encoded as DER (what OpenSSL gives, what JWS forbids)."""
    head, body, sig = token.split(".")
    raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    return f"{head}.{body}.{b64url(der)}"


def unsigned(idp: FakeIdP, alg: str) -> str:
    header = b64url(json.dumps({"alg": alg, "kid": KEYS["rs"].kid, "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(idp.claims()).encode())}.{b64url(b'x')}"


def hs256(idp: FakeIdP, key: bytes, **header: Any) -> str:
    """HS256 keyed with *key*: the algorithm-confusion attack, with the provider's public key as secret."""
    return forge({"alg": "HS256", "typ": "JWT", "kid": KEYS["rs"].kid, **header}, idp.claims(), key=key)


TokenCase = Callable[[FakeIdP], str]

TOKEN_CASES: list[tuple[str, TokenCase, int]] = [
    ("RS256", lambda i: i.token(KEYS["rs"]), 200),
    ("ES256", lambda i: i.token(KEYS["es"]), 200),
    ("EdDSA", lambda i: i.token(KEYS["ed"]), 200),
    ("PS256 under a JWK without alg", lambda i: i.token(KEYS["any"]), 200),
    ("RS256 under a JWK without alg", lambda i: i.token(KEYS["any"], alg="RS256"), 200),
    ("aud a list holding ours", lambda i: i.token(KEYS["rs"], aud=["https://other", AUDIENCE]), 200),
    ("expired within the leeway", lambda i: i.token(KEYS["rs"], exp=int(time.time()) - 2), 200),
    ("wrong iss", lambda i: i.token(KEYS["rs"], iss="https://login.example.com"), 401),
    ("iss with a trailing slash", lambda i: i.token(KEYS["rs"], iss=i.issuer + "/"), 401),
    ("missing iss", lambda i: i.token(KEYS["rs"], iss=DROP), 401),
    ("wrong aud", lambda i: i.token(KEYS["rs"], aud="https://other.example"), 401),
    ("missing aud", lambda i: i.token(KEYS["rs"], aud=DROP), 401),
    ("aud a list without ours", lambda i: i.token(KEYS["rs"], aud=["https://other"]), 401),
    ("aud empty", lambda i: i.token(KEYS["rs"], aud=[]), 401),
    ("missing exp", lambda i: i.token(KEYS["rs"], exp=DROP), 401),
    ("expired", lambda i: i.token(KEYS["rs"], exp=int(time.time()) - 60), 401),
    ("not yet valid", lambda i: i.token(KEYS["rs"], nbf=int(time.time()) + 60), 401),
    ("missing sub: the identifier rejects it", lambda i: i.token(KEYS["rs"], sub=DROP), 403),
    ("typ absent", lambda i: i.token(KEYS["rs"], header={"typ": DROP}), 200),
    ("typ at+jwt", lambda i: i.token(KEYS["rs"], header={"typ": "at+jwt"}), 200),
    ("typ application/at+jwt", lambda i: i.token(KEYS["rs"], header={"typ": "application/at+jwt"}), 200),
    ("typ AT+JWT", lambda i: i.token(KEYS["rs"], header={"typ": "AT+JWT"}), 200),
    ("typ dpop+jwt", lambda i: i.token(KEYS["rs"], header={"typ": "dpop+jwt"}), 401),
    ("typ logout+jwt", lambda i: i.token(KEYS["rs"], header={"typ": "logout+jwt"}), 401),
    ("typ JOSE", lambda i: i.token(KEYS["rs"], header={"typ": "JOSE"}), 401),
    ("typ empty", lambda i: i.token(KEYS["rs"], header={"typ": ""}), 401),
    ("typ null", lambda i: i.token(KEYS["rs"], header={"typ": None}), 200),
    ("typ a number", lambda i: i.token(KEYS["rs"], header={"typ": 1}), 401),
    ("PS256 under a JWK that says RS256", lambda i: i.token(KEYS["rs"], alg="PS256"), 401),
    ("RS256 naming an EC kid", lambda i: i.token(KEYS["rs"], header={"kid": KEYS["es"].kid}), 401),
    ("ES256 naming an RSA kid", lambda i: i.token(KEYS["es"], header={"kid": KEYS["rs"].kid}), 401),
    ("EdDSA naming an RSA kid", lambda i: i.token(KEYS["ed"], header={"kid": KEYS["rs"].kid}), 401),
    ("HS256 keyed with the public key PEM", lambda i: hs256(i, KEYS["rs"].public_pem()), 401),
    ("HS256 keyed with the JWK JSON", lambda i: hs256(i, json.dumps(KEYS["rs"].jwk()).encode()), 401),
    ("HS256 without a kid", lambda i: hs256(i, KEYS["rs"].public_pem(), kid=DROP), 401),
    ("alg none", lambda i: unsigned(i, "none"), 401),
    ("alg None", lambda i: unsigned(i, "None"), 401),
    ("alg ES512", lambda i: unsigned(i, "ES512"), 401),
    ("a JWK with use enc", lambda i: i.token(KEYS["enc"]), 401),
    (
        "signed with a key never published",
        lambda i: i.token(KEYS["other"], header={"kid": KEYS["rs"].kid}),
        401,
    ),
    ("ES256 with a DER signature", lambda i: der_signature(i.token(KEYS["es"])), 401),
    ("no kid", lambda i: i.token(KEYS["rs"], header={"kid": DROP}), 401),
    ("kid null", lambda i: i.token(KEYS["rs"], header={"kid": None}), 401),
    ("crit header", lambda i: i.token(KEYS["rs"], header={"crit": ["exp"], "exp": 1}), 401),
    (
        "its own key embedded as jwk",
        lambda i: i.token(KEYS["other"], header={"kid": KEYS["other"].kid, "jwk": KEYS["other"].jwk()}),
        401,
    ),
]


@pytest.mark.parametrize(("build", "expected"), [c[1:] for c in TOKEN_CASES], ids=[c[0] for c in TOKEN_CASES])
async def test_a_providers_token_must_be_what_its_keys_and_the_rules_allow(
    aiohttp_client: Any, make_idp: MakeIdP, build: TokenCase, expected: int
) -> None:
    idp = await claims_idp(make_idp)
    client = await resource(aiohttp_client, idp.provider())
    token = build(idp)
    async with client.get("/api/me", headers=bearer(token)) as response:
        assert response.status == expected, await response.text()
    assert idp.counts["jwks"] <= 1  # header-level refusals (alg, typ, kid, iss) never cost a fetch


@pytest.mark.parametrize(
    ("typ", "expected"),
    [
        ("at+jwt", 200),
        ("application/at+jwt", 200),
        ("At+Jwt", 200),
        ("JWT", 401),
        (DROP, 401),
        (None, 401),
        ("dpop+jwt", 401),
    ],
    ids=["at+jwt", "application/at+jwt", "At+Jwt", "JWT", "absent", "null", "dpop+jwt"],
)
async def test_require_at_jwt_accepts_only_rfc_9068_access_tokens(
    aiohttp_client: Any, make_idp: MakeIdP, typ: Any, expected: int
) -> None:
    idp = await make_idp(rs("a"))
    client = await resource(aiohttp_client, idp.provider(require_at_jwt=True))
    assert await status_of(client, idp.token(rs("a"), header={"typ": typ})) == expected


async def test_the_providers_algorithms_limit_what_its_tokens_may_use(
    aiohttp_client: Any, make_idp: MakeIdP
) -> None:
    idp = await make_idp(
        rs("a"), es("a"), ed("a"), Key("rsa-no-alg", "PS256", rsa_key("no-alg")).jwk(alg=None)
    )
    client = await resource(aiohttp_client, idp.provider(algorithms=("ES256",)))
    assert await status_of(client, idp.token(es("a"))) == 200
    for key in (rs("a"), ed("a"), Key("rsa-no-alg", "PS256", rsa_key("no-alg"))):
        assert await status_of(client, idp.token(key)) == 401, key.alg
    client = await resource(aiohttp_client, idp.provider(algorithms=("PS256",)))
    assert await status_of(client, idp.token(Key("rsa-no-alg", "PS256", rsa_key("no-alg")))) == 200
    assert await status_of(client, idp.token(Key("rsa-no-alg", "RS256", rsa_key("no-alg")))) == 401
    assert await status_of(client, idp.token(rs("a"), alg="PS256")) == 401  # its JWK says RS256


async def test_an_rsa_1024_jwk_is_skipped_and_logged(
    aiohttp_client: Any, make_idp: MakeIdP, caplog: pytest.LogCaptureFixture
) -> None:
    weak = Key("weak", "RS256", rsa_key("weak", 1024))
    idp = await make_idp(weak, rs("strong"))
    client = await resource(aiohttp_client, idp.provider())
    weak_token = raw_rs256(weak.private, {"alg": "RS256", "kid": "weak", "typ": "JWT"}, idp.claims())
    with caplog.at_level(logging.WARNING, logger="jwtplus"):
        assert await status_of(client, weak_token) == 401
    assert "1024-bit RSA key" in caplog.text
    assert await status_of(client, idp.token(rs("strong"))) == 200  # the rest of the set is used
    assert idp.counts == {"jwks": 1}


async def test_a_jku_header_is_never_followed(aiohttp_client: Any, make_idp: MakeIdP) -> None:
    idp = await make_idp(rs("a"))
    attacker_key = rs("jku-attacker")
    attacker = await make_idp(attacker_key)
    client = await resource(aiohttp_client, idp.provider())
    for header in ({"jku": attacker.jwks_uri}, {"x5u": attacker.jwks_uri}):
        assert await status_of(client, idp.token(attacker_key, header=header)) == 401
    assert attacker.counts == {}
    assert idp.counts == {"jwks": 1}


async def test_an_iss_that_is_not_a_string_is_refused_quietly(
    aiohttp_client: Any, make_idp: MakeIdP, caplog: pytest.LogCaptureFixture
) -> None:
    # an iss that is a JSON array or object must not reach the issuer lookup (a dict, so unhashable
    # values would raise into the pipeline's catch-all, which logs "verifying a token raised" with a
    # traceback on every such request: a log flood); fixed in 3e05899, kept as its regression test
    idp = await make_idp(rs("a"))
    client = await resource(aiohttp_client, idp.provider())
    with caplog.at_level(logging.WARNING, logger="jwtplus"):
        for iss in ([idp.issuer], {"iss": idp.issuer}, 42, None):
            assert await status_of(client, idp.token(rs("a"), iss=iss)) == 401
    assert "raised" not in caplog.text


# -- What the red team found --


async def test_a_withdrawn_key_stops_verifying_cached_tokens_on_a_quiet_service(
    aiohttp_client: Any, make_idp: MakeIdP, provider_clock: ShiftedClock
) -> None:
    leaked = rs("leaked")
    idp = await make_idp(leaked, rs("b"), cache_control="max-age=1")
    client = await resource(aiohttp_client, idp.provider(), clock=provider_clock)
    forged = idp.token(leaked, sub="admin", exp=_MAX_EXP)
    assert await status_of(client, forged) == 200
    idp.publish(rs("b"))  # the provider withdraws the leaked key; no other token comes in
    provider_clock.advance(1.5)
    for _ in range(10):  # replays only: the cached verdict lasts no longer than the key set is fresh
        if await status_of(client, forged) == 401:
            break
        await asyncio.sleep(0.05)
    assert await status_of(client, forged) == 401
    assert idp.counts["jwks"] == 2


_MAX_EXP = 253402300000


async def test_a_clock_set_back_does_not_extend_the_cooldown(
    aiohttp_client: Any, make_idp: MakeIdP, provider_clock: ShiftedClock
) -> None:
    idp = await make_idp(rs("a"))
    client = await resource(aiohttp_client, idp.provider(cooldown=1), clock=provider_clock)
    assert await status_of(client, idp.token(rs("a"))) == 200
    provider_clock.advance(-600)  # NTP steps the clock back ten minutes
    idp.publish(rs("a"), rs("new"))
    provider_clock.advance(2)
    assert await status_of(client, idp.token(rs("new"), iat=int(provider_clock()))) == 200
    assert idp.counts["jwks"] == 2


@pytest.mark.parametrize(
    "cache_control", ["max-age=\u00b2", "max-age=" + "9" * 5000, "max-age=-1", "max-age="]
)
async def test_a_cache_control_jwtplus_cannot_read_is_the_default(
    aiohttp_client: Any, make_idp: MakeIdP, cache_control: str
) -> None:
    idp = await make_idp(rs("a"), cache_control=cache_control)
    client = await resource(aiohttp_client, idp.provider())
    assert [await status_of(client, idp.token(rs("a"))) for _ in range(3)] == [200] * 3
    assert idp.counts == {"jwks": 1}


async def test_a_published_private_key_and_two_keys_under_one_kid_are_not_used(
    aiohttp_client: Any, make_idp: MakeIdP, caplog: pytest.LogCaptureFixture
) -> None:
    exposed, first, second = rs("exposed"), es("twin-1"), es("twin-2")
    idp = await make_idp()
    idp.publish(
        exposed.private_jwk(),
        first.jwk(kid="twin"),
        second.jwk(kid="twin"),
        rs("fine").jwk(),
    )
    client = await resource(aiohttp_client, idp.provider())
    assert await status_of(client, idp.token(rs("fine"))) == 200
    assert await status_of(client, idp.token(exposed)) == 401  # anyone can sign with a published key
    for twin in (first, second):
        assert await status_of(client, idp.token(Key("twin", "ES256", twin.private))) == 401
    assert "publishes the private key 'rsa-exposed'" in caplog.text
    assert "two keys with kid 'twin'" in caplog.text
    assert exposed.private_jwk()["d"] not in caplog.text


def test_an_rsa_key_that_would_make_each_verification_a_denial_of_service_is_refused() -> None:
    n = rsa_key("a").public_key().public_numbers().n
    huge_exponent = rsa.RSAPublicNumbers(e=2**32 + 15, n=n).public_key()
    jwk = {**jwt.algorithms.RSAAlgorithm.to_jwk(huge_exponent, as_dict=True), "alg": "RS256"}
    with pytest.raises(ValueError, match="exponent up to 2"):
        SecretManager(algorithm="RS256", keys=[jwk])


async def test_a_provider_that_moves_its_key_set_is_discovered_again(
    aiohttp_client: Any, make_idp: MakeIdP, provider_clock: ShiftedClock
) -> None:
    idp = await make_idp(rs("a"))
    idp.discovery_jwks_uri = idp.issuer + "/keys-1"
    client = await resource(aiohttp_client, idp.provider(discovery=True), clock=provider_clock)
    assert await status_of(client, idp.token(rs("a"))) == 200
    idp.mode = "status500"  # the old address stops answering
    provider_clock.advance(1.5)
    assert await status_of(client, idp.token(rs("b"))) == 503
    idp.mode, idp.discovery_jwks_uri = "ok", idp.issuer + "/keys-2"
    idp.publish(rs("a"), rs("b"))
    provider_clock.advance(1.5)
    assert await status_of(client, idp.token(rs("b"))) == 200
    assert idp.counts["discovery"] == 2


async def test_an_algorithm_the_provider_does_not_use_never_costs_a_fetch(
    aiohttp_client: Any, make_idp: MakeIdP, caplog: pytest.LogCaptureFixture
) -> None:
    idp = await make_idp(rs("a"))
    client = await resource(aiohttp_client, idp.provider(algorithms=("RS256",)))
    for alg in ("PS256", "RS512", "HS256"):
        token = idp.token(rs("a"), alg=alg) if alg != "HS256" else forge_hs256(idp, rs("a"))
        assert await status_of(client, token) == 401
    assert idp.counts == Counter()
    assert await status_of(client, idp.token(rs("a"))) == 200
    both = await resource(aiohttp_client, idp.provider(algorithms=("RS256", "PS256")))
    assert await status_of(both, idp.token(rs("a"), alg="PS256")) == 401  # its JWK says RS256
    assert "raised" not in caplog.text


def forge_hs256(idp: FakeIdP, key: Key) -> str:
    """An HS256 token keyed with the provider's public key PEM, which PyJWT refuses to make."""
    header = b64url(json.dumps({"alg": "HS256", "kid": key.kid}).encode())
    payload = b64url(json.dumps(idp.claims()).encode())
    mac = hmac.new(key.public_pem(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(mac)}"


# -- Several issuers --


async def test_each_issuer_has_its_own_keys_and_cache(
    aiohttp_client: Any, make_idp: MakeIdP, provider_clock: ShiftedClock
) -> None:
    a_key = Key("k1", "RS256", rsa_key("tenant-a"))
    b_key = Key("k1", "RS256", rsa_key("tenant-b"))  # the same kid at both providers
    a, b = await make_idp(a_key), await make_idp(b_key)
    client = await resource(aiohttp_client, [a.provider(), b.provider()], clock=provider_clock)
    assert await status_of(client, a.token(a_key)) == 200
    assert (a.counts, b.counts) == ({"jwks": 1}, {})
    assert await status_of(client, b.token(b_key)) == 200
    assert (a.counts, b.counts) == ({"jwks": 1}, {"jwks": 1})
    assert await status_of(client, b.token(a_key)) == 401  # A's key, B's iss
    assert await status_of(client, a.token(b_key)) == 401  # B's key, A's iss, the same kid
    a_only = rs("tenant-a-only")
    a.publish(a_key, a_only)
    provider_clock.advance(1.5)
    assert await status_of(client, b.token(a_only)) == 401  # B refetches; A's key is not there
    assert await status_of(client, a.token(a_only)) == 200
    assert (a.counts, b.counts) == ({"jwks": 2}, {"jwks": 2})
    assert await status_of(client, a.token(a_key, iss="https://third.example.com")) == 401
    assert (a.counts, b.counts) == ({"jwks": 2}, {"jwks": 2})


async def test_an_issuer_down_leaves_the_others_working(
    aiohttp_client: Any, make_idp: MakeIdP, provider_clock: ShiftedClock
) -> None:
    a, b = await make_idp(rs("a")), await make_idp(es("b"), mode="status500")
    client = await resource(aiohttp_client, [a.provider(), b.provider(discovery=True)], clock=provider_clock)
    assert await status_of(client, a.token(rs("a"))) == 200
    assert await status_of(client, b.token(es("b"))) == 503
    assert await status_of(client, a.token(rs("a"))) == 200


async def test_authentication_middleware_takes_issuers_too(aiohttp_client: Any, make_idp: MakeIdP) -> None:
    idp = await make_idp(es("a"))
    app = web.Application(middlewares=[jwtplus.authentication_middleware(issuers=idp.provider())])

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"status": request[jwtplus.AUTH_STATUS]})

    app.router.add_get("/", status)
    client = await aiohttp_client(app)
    for token, expected in ((idp.token(es("a")), "pass"), (idp.token(es("a"), aud="x"), "invalid")):
        async with client.get("/", headers=bearer(token)) as response:
            assert (await response.json())["status"] == expected


# -- Construction --

GOOD_ISSUER = "https://login.example.com"


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"issuer": "http://login.example.com"}, ValueError, "issuer="),
        ({"issuer": "http://127.0.0.1.example.com"}, ValueError, "issuer="),
        ({"issuer": "http://localhost@evil.example.com"}, ValueError, "issuer="),
        ({"issuer": "ftp://127.0.0.1"}, ValueError, "issuer="),
        ({"issuer": "https://"}, ValueError, "issuer="),
        ({"issuer": "login.example.com"}, ValueError, "issuer="),
        ({"issuer": b"https://login.example.com"}, TypeError, "issuer="),
        ({"jwks_uri": "http://login.example.com/jwks"}, ValueError, "jwks_uri="),
        ({"audience": None}, ValueError, "audience"),
        ({"audience": ""}, TypeError, "audience="),
        ({"audience": []}, TypeError, "audience="),
        ({"audience": ["https://api.test", ""]}, TypeError, "audience="),
        ({"algorithms": ("HS256",)}, ValueError, "algorithms="),
        ({"algorithms": ("none",)}, ValueError, "algorithms="),
        ({"algorithms": ("RS256", "HS256")}, ValueError, "algorithms="),
        ({"algorithms": ()}, ValueError, "algorithms="),
        ({"algorithms": ("RS512",)}, ValueError, "algorithms="),
        ({"cooldown": 0}, ValueError, "cooldown="),
        ({"cooldown": "0.5s"}, ValueError, "cooldown="),
        ({"cooldown": "2d"}, ValueError, "cooldown="),
        ({"timeout": 0}, ValueError, "timeout="),
        ({"timeout": 31}, ValueError, "timeout="),
        ({"max_keys": 0}, ValueError, "max_keys="),
        ({"max_keys": 1001}, ValueError, "max_keys="),
        ({"max_keys": True}, ValueError, "max_keys="),
        ({"leeway": "1h"}, ValueError, "leeway="),
    ],
)
def test_an_identity_provider_refuses_bad_settings_naming_the_parameter(
    kwargs: dict[str, Any], error: type[Exception], names: str
) -> None:
    with pytest.raises(error, match=re.escape(names)):
        jwtplus.IdentityProvider(**{"issuer": GOOD_ISSUER, "audience": AUDIENCE, **kwargs})


@pytest.mark.parametrize(
    "issuer", ["https://login.example.com", "http://127.0.0.1:8080", "http://localhost", "http://[::1]:9000"]
)
def test_an_identity_provider_takes_https_or_loopback_http(issuer: str) -> None:
    provider = jwtplus.IdentityProvider(issuer=issuer, audience=AUDIENCE, algorithms="ES256", cooldown="1s")
    assert provider.algorithms == ("ES256",)
    assert provider.cooldown_seconds == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        provider.issuer = "https://else.example.com"  # type: ignore[misc]


def test_middlewares_want_manager_or_issuers_exactly_once() -> None:
    provider = jwtplus.IdentityProvider(issuer=GOOD_ISSUER, audience=AUDIENCE)
    rules = RoutingRules(protected_apis=("/api/.*",))
    own = jwtplus.SecretManager(secret=b"s" * 32)
    for factory in (
        functools.partial(jwtplus.jwt_middleware, rules=rules),
        jwtplus.authentication_middleware,
    ):
        with pytest.raises(ValueError, match=r"manager=.*issuers="):
            factory(manager=own, issuers=provider)
        with pytest.raises(ValueError, match=r"manager=.*issuers="):
            factory()
        with pytest.raises(ValueError, match=r"manager=.*issuers="):
            factory(issuers=[])
        with pytest.raises(ValueError, match="issuers names one issuer twice"):
            factory(issuers=[provider, dataclasses.replace(provider, audience="https://other.test")])
        with pytest.raises(TypeError, match="issuers must be IdentityProvider"):
            factory(issuers=[GOOD_ISSUER])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="issuers must be IdentityProvider"):
            factory(issuers=provider.issuer)  # type: ignore[arg-type]


# ==== Part II: browsers and sessions ====

# ---- Cookies and CSRF ----

COOKIES = jwtplus.CookiePolicy()


def test_cookie_policy_names_and_validation() -> None:
    assert (COOKIES.token_cookie, COOKIES.csrf_cookie) == ("__Host-access_token", "__Host-csrf_token")
    assert jwtplus.CookiePolicy(secure=False).token_cookie == "access_token"
    assert jwtplus.CookiePolicy(path="/app").token_cookie == "access_token"
    assert jwtplus.CookiePolicy(domain="example.com").csrf_cookie == "csrf_token"
    assert jwtplus.CookiePolicy(host_prefix=False).token_cookie == "access_token"
    with pytest.raises(ValueError, match="needs secure=True"):
        jwtplus.CookiePolicy(samesite="None", secure=False)
    with pytest.raises(ValueError, match="samesite='lax'"):
        jwtplus.CookiePolicy(samesite="lax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name='access token'"):
        jwtplus.CookiePolicy(name="access token")
    with pytest.raises(ValueError, match="trusted_origins"):
        jwtplus.CookiePolicy(trusted_origins=("app.example",))
    with pytest.raises(TypeError, match="cookies must be a CookiePolicy"):
        JWTHelper(secret_manager=manager(), cookies="yes")  # type: ignore[arg-type]


def set_cookie_headers(response: web.StreamResponse) -> dict[str, str]:
    return {morsel.key: morsel.OutputString() for morsel in response.cookies.values()}


def test_login_sets_both_cookies_with_strict_attributes() -> None:
    sm = manager(exptime="1h")
    response = web.Response()
    token = jwtplus.set_login_cookies(response, sm, {"username": "ann"}, now=NOW)
    headers = set_cookie_headers(response)
    access, csrf = headers["__Host-access_token"], headers["__Host-csrf_token"]
    for attribute in ("Secure", "SameSite=Lax", "Path=/", "Max-Age=3600"):
        assert attribute in access
        assert attribute in csrf
    assert "HttpOnly" in access
    assert "HttpOnly" not in csrf
    assert "Domain" not in access
    assert access.startswith(f"__Host-access_token={token};")
    assert csrf.startswith(f"__Host-csrf_token={sm.decode(token, now=NOW)['csrf']};")


def test_cookie_attributes_are_overridable() -> None:
    sm = manager(exptime="10m")
    policy = jwtplus.CookiePolicy(
        name="tok", samesite="Strict", path="/app", domain="example.com", secure=False, httponly=False
    )
    response = web.Response()
    jwtplus.set_login_cookies(response, sm, {"username": "ann"}, cookies=policy)
    access = set_cookie_headers(response)["tok"]
    assert "SameSite=Strict" in access
    assert "Path=/app" in access
    assert "Domain=example.com" in access
    assert "Secure" not in access
    assert "HttpOnly" not in access


def test_a_bad_token_never_becomes_a_cookie() -> None:
    with pytest.raises(jwt.InvalidTokenError):
        jwtplus.set_token_cookies(web.Response(), manager(), "a.b.c")


def test_logout_clears_both_cookies_under_both_spellings() -> None:
    response = web.Response()
    jwtplus.clear_login_cookies(response)
    headers = set_cookie_headers(response)
    assert set(headers) == {
        "__Host-access_token",
        "access_token",
        "__Host-csrf_token",
        "csrf_token",
        "__Host-refresh_token",
        "refresh_token",
    }
    for name, header in headers.items():
        assert header.startswith(f'{name}="";') or header.startswith(f"{name}=;")
        assert "Max-Age=0" in header
        assert "Path=/" in header
        if name.startswith("__Host-"):
            assert "Secure" in header


def cookie_app(sm: SecretManager, ran: list[str], **helper_args: Any) -> web.Application:
    async def protected(request: web.Request) -> web.Response:
        ran.append(request.method)
        return web.json_response(
            {"source": request.get(jwtplus.TOKEN_SOURCE), "status": request[jwtplus.AUTH_STATUS]}
        )

    helper_args.setdefault("cookies", COOKIES)
    helper = seed_helper(sm, protected_apis=["/api/.*"], **helper_args)
    app = seed_app(helper)
    app.router.add_route("*", "/api/thing", protected)
    return app


def cookie_header(token: str, csrf: str | None = None) -> dict[str, str]:
    value = f"__Host-access_token={token}"
    if csrf is not None:
        value += f"; __Host-csrf_token={csrf}"
    return {"Cookie": value}


async def test_a_token_cookie_authenticates_safe_requests_and_pages(make_client: Any) -> None:
    sm, ran = manager(), []
    client = await make_client(app=cookie_app(sm, ran))
    response = web.Response()
    token = jwtplus.set_login_cookies(response, sm, {"username": "ann"})
    body = await (await client.get("/api/thing", headers=cookie_header(token))).json()
    assert body == {"source": "cookie", "status": "pass"}
    assert (
        await (await client.get("/login.html", headers=cookie_header(token))).text() == "this is index.html"
    )
    assert await (await client.get("/index.html")).text() == "this is login.html"
    assert ran == ["GET"]


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_unsafe_cookie_requests_need_the_csrf_header(make_client: Any, method: str) -> None:
    sm, ran = manager(), []
    client = await make_client(app=cookie_app(sm, ran))
    token = jwtplus.set_login_cookies(web.Response(), sm, {"username": "ann"})
    csrf = sm.decode(token)["csrf"]
    for headers in (
        cookie_header(token, csrf),  # the cookie alone: what a cross-site form sends
        {**cookie_header(token, csrf), "X-CSRF-Token": "wrong"},
        {**cookie_header(token, csrf), "X-CSRF-Token": csrf[:-1]},
        {**cookie_header(token, csrf), "X-CSRF-Token": ""},
        {**cookie_header(token, csrf), "X-CSRF-Token": csrf, "Origin": "http://evil.example"},
        {**cookie_header(token, csrf), "X-CSRF-Token": csrf, "Origin": "null"},
        {**cookie_header(token, csrf), "X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site"},
        {**cookie_header(token, csrf), "X-CSRF-Token": csrf, "Sec-Fetch-Site": "same-site"},
    ):
        response = await client.request(method, "/api/thing", headers=headers)
        assert response.status == 403, headers
        assert "WWW-Authenticate" not in response.headers  # not the token's fault, nor a missing scope
        assert await response.read() == CSRF_FAILED
    assert ran == []
    good = {**cookie_header(token, csrf), "X-CSRF-Token": csrf}
    assert (await client.request(method, "/api/thing", headers=good)).status == 200
    same_origin = {**good, "Origin": f"http://{client.host}:{client.port}", "Sec-Fetch-Site": "same-origin"}
    assert (await client.request(method, "/api/thing", headers=same_origin)).status == 200
    assert ran == [method, method]


async def test_trusted_origins_may_send_unsafe_requests(make_client: Any) -> None:
    sm, ran = manager(), []
    policy = jwtplus.CookiePolicy(trusted_origins=("https://app.example",))
    client = await make_client(app=cookie_app(sm, ran, cookies=policy))
    token = jwtplus.set_login_cookies(web.Response(), sm, {"username": "ann"}, cookies=policy)
    csrf = sm.decode(token)["csrf"]
    headers = {**cookie_header(token), "X-CSRF-Token": csrf}
    assert (
        await client.post("/api/thing", headers={**headers, "Origin": "https://app.example"})
    ).status == 200
    assert (
        await client.post("/api/thing", headers={**headers, "Origin": "https://evil.example"})
    ).status == 403


# -- A CSRF failure says so, on every route; plain HTML forms may carry the value --


async def test_a_csrf_failure_is_answered_the_same_on_the_api_the_refresh_and_the_logout_route(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sessions, ran = jwtplus.Sessions(manager=manager()), []
    client = await aiohttp_client(session_app(sessions, ran))
    login = await client.post("/login", json={"sub": "u-1", "claims": {"username": "ann", "role": "admin"}})
    jar = cookies_of(login)
    caplog.set_level(logging.INFO, logger="jwtplus")
    for path in ("/admin", "/password", "/refresh", "/logout"):
        caplog.clear()
        response = await client.post(path, headers=as_cookie_header(jar))  # the cookies, no CSRF header
        assert (response.status, await response.read()) == (403, CSRF_FAILED), path
        assert "WWW-Authenticate" not in response.headers
        (line,) = refusal_lines(caplog)
        assert f"refused POST {path} with 403: csrf" in line
    assert "admin" not in ran  # the logout handler ran: end_session refused inside it
    good = {**as_cookie_header(jar), "X-CSRF-Token": jar["__Host-csrf_token"]}
    assert (await client.post("/refresh", headers=good)).status == 200  # the pair was not used up


async def test_on_refusal_shapes_what_refresh_session_and_end_session_raise(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[str, int]] = []

    def on_refusal(request: web.Request, refusal: jwtplus.Refusal) -> web.Response | None:
        seen.append((refusal.reason, refusal.status))
        if refusal.reason == "revoked":
            return web.json_response({"msg": "Token has been revoked"}, status=401)
        return None

    sessions = jwtplus.Sessions(manager=manager())
    client = await aiohttp_client(session_app(sessions, [], on_refusal=on_refusal))
    caplog.set_level(logging.INFO, logger="jwtplus")
    login = await client.post("/login", json={"sub": "u-1", "claims": {"username": "ann"}})
    refresh = {"Authorization": f"Bearer {(await login.json())['refresh']}"}
    assert (await client.post("/refresh", headers=refresh)).status == 200
    again = await client.post("/refresh", headers=refresh)  # the same refresh token twice: theft
    assert (again.status, await again.json()) == (401, {"msg": "Token has been revoked"})
    csrf = await client.post("/logout", headers=as_cookie_header(cookies_of(login)))
    assert (csrf.status, await csrf.read()) == (403, CSRF_FAILED)  # None: the default answer
    assert seen == [("revoked", 401), ("csrf", 403)]
    lines = refusal_lines(caplog)
    assert [line.split(": ")[1].split(" (")[0] for line in lines] == [
        "refused POST /refresh with 401", "refused POST /logout with 403",
    ]  # fmt: skip
    assert "revoked (a refresh token used again)" in lines[0]


def form_app(sm: SecretManager, policy: jwtplus.CookiePolicy, ran: list[Any]) -> web.Application:
    """A server-rendered page whose <form method=post> carries the CSRF value in a hidden field."""

    async def page(request: web.Request) -> web.Response:
        csrf = request.cookies[policy.csrf_cookie]
        return web.Response(
            text=f'<form method="post" action="/api/note"><input type="hidden" name="csrf_token" '
            f'value="{csrf}"><input name="note"></form>',
            content_type="text/html",
        )

    async def note(request: web.Request) -> web.Response:
        form = await request.post()  # the check read the form: the handler still can
        ran.append(form["note"])
        return web.json_response({"saved": form["note"]})

    helper = JWTHelper(secret_manager=sm, cookies=policy, protected_apis=("/api/.*",), whitelist=())
    app = web.Application()
    jwtplus.setup(app, helper)
    app.router.add_get("/page", page)
    app.router.add_post("/api/note", note)
    return app


async def test_on_refusal_sees_a_login_the_store_refused_and_never_an_error_of_the_apps_own(
    aiohttp_client: Any,
) -> None:
    seen: list[tuple[str, int]] = []

    def on_refusal(request: web.Request, refusal: jwtplus.Refusal) -> web.Response:
        seen.append((refusal.reason, refusal.status))
        return web.json_response({"shaped": refusal.reason}, status=refusal.status)

    sessions = jwtplus.Sessions(manager=manager(), store=broken_store())
    app = session_app(sessions, [], on_refusal=on_refusal)

    async def teapot(request: web.Request) -> web.Response:
        raise web.HTTPForbidden(text="the app's own 403")

    app.router.add_get("/own", teapot)
    client = await aiohttp_client(app)
    login = await client.post("/login", json={"sub": "u-1"})  # issue_tokens: the store is down
    assert (login.status, await login.json()) == (503, {"shaped": "unavailable"})
    lookup_free = jwt.encode({"username": "ann", "exp": time.time() + 60}, SECRET, algorithm="HS256")
    own = await client.get("/own", headers=bearer(lookup_free))  # no jti, fam or sub: no store lookup
    assert (own.status, await own.text()) == (403, "the app's own 403")  # not jwtplus's: untouched
    assert seen == [("unavailable", 503)]


async def test_a_revoked_token_is_logged_as_revoked_and_answered_as_any_invalid_one(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sessions = jwtplus.Sessions(manager=manager())
    reasons: list[str] = []

    def on_refusal(request: web.Request, refusal: jwtplus.Refusal) -> None:
        reasons.append(refusal.reason)

    client = await aiohttp_client(session_app(sessions, [], on_refusal=on_refusal))
    pair = await jwtplus.issue_tokens(sessions, "u-1", {"username": "ann"})
    await jwtplus.revoke_token(sessions, sessions.manager.decode(pair.access))
    caplog.set_level(logging.INFO, logger="jwtplus")
    refused = await client.get("/me", headers=bearer(pair.access))
    assert (refused.status, await refused.read()) == (401, b'{"error":"unauthorized"}')
    assert reasons == ["revoked"]
    (line,) = refusal_lines(caplog)
    assert "with 401: revoked (check_revocation)" in line


async def test_a_plain_html_form_may_carry_the_csrf_value_in_a_field_when_the_policy_says_so(
    aiohttp_client: Any,
) -> None:
    sm, ran = manager(), []
    policy = jwtplus.CookiePolicy(csrf_field="csrf_token")
    client = await aiohttp_client(form_app(sm, policy, ran))
    token = jwtplus.set_login_cookies(web.Response(), sm, {"username": "ann"}, cookies=policy)
    csrf = sm.decode(token)["csrf"]
    cookies = cookie_header(token, csrf)
    page = await (await client.get("/page", headers=cookies)).text()
    assert f'value="{csrf}"' in page
    saved = await client.post("/api/note", data={"csrf_token": csrf, "note": "hello"}, headers=cookies)
    assert (saved.status, await saved.json()) == (200, {"saved": "hello"})
    multipart = aiohttp.FormData({"csrf_token": csrf, "note": "multi"})
    multipart._is_multipart = True
    assert (await client.post("/api/note", data=multipart, headers=cookies)).status == 200
    for data, headers in (
        ({"note": "no field"}, cookies),
        ({"csrf_token": csrf[:-1], "note": "wrong"}, cookies),
        ({"csrf_token": "", "note": "empty"}, cookies),
        ({"csrf_token": csrf, "note": "foreign"}, {**cookies, "Origin": "https://evil.example"}),
        ({"csrf_token": csrf, "note": "cross-site"}, {**cookies, "Sec-Fetch-Site": "cross-site"}),
    ):
        refused = await client.post("/api/note", data=data, headers=headers)
        assert (refused.status, await refused.read()) == (403, CSRF_FAILED), data
    # JSON is no form: its csrf_token field is not read
    assert (await client.post("/api/note", json={"csrf_token": csrf}, headers=cookies)).status == 403
    assert ran == ["hello", "multi"]


async def test_an_upload_form_with_the_csrf_field_reaches_its_handler_with_its_files(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sm, policy = manager(), jwtplus.CookiePolicy(csrf_field="csrf_token")

    async def upload(request: web.Request) -> web.Response:
        form = await request.post()  # what the CSRF check read, files included
        part = form["file"]
        assert isinstance(part, web.FileField)
        return web.json_response({"name": part.filename, "size": len(part.file.read())})

    helper = JWTHelper(secret_manager=sm, cookies=policy, protected_apis=("/api/.*",))
    app = web.Application(client_max_size=64 * 1024)
    jwtplus.setup(app, helper)
    app.router.add_post("/api/upload", upload)
    client = await aiohttp_client(app)
    token = jwtplus.set_login_cookies(web.Response(), sm, {"username": "ann"}, cookies=policy)
    csrf = sm.decode(token)["csrf"]

    def form(size: int) -> aiohttp.FormData:
        data = aiohttp.FormData()
        data.add_field("csrf_token", csrf)
        data.add_field("file", b"x" * size, filename="notes.txt", content_type="text/plain")
        return data

    done = await client.post("/api/upload", data=form(1000), headers=cookie_header(token, csrf))
    assert (done.status, await done.json()) == (200, {"name": "notes.txt", "size": 1000})
    caplog.set_level(logging.INFO, logger="jwtplus")
    big = await client.post("/api/upload", data=form(100 * 1024), headers=cookie_header(token, csrf))
    assert (big.status, await big.read()) == (403, CSRF_FAILED)  # fail closed, and the log says why
    (line,) = refusal_lines(caplog)
    assert "csrf (the form could not be read (HTTPRequestEntityTooLarge))" in line


async def test_without_csrf_field_a_form_field_is_never_read(aiohttp_client: Any) -> None:
    sm, ran = manager(), []
    client = await aiohttp_client(form_app(sm, COOKIES, ran))
    token = jwtplus.set_login_cookies(web.Response(), sm, {"username": "ann"}, cookies=COOKIES)
    csrf = sm.decode(token)["csrf"]
    data = {"csrf_token": csrf, "note": "x"}
    refused = await client.post("/api/note", data=data, headers=cookie_header(token, csrf))
    assert (refused.status, await refused.read()) == (403, CSRF_FAILED)
    assert ran == []


async def test_a_form_too_large_to_read_fails_the_csrf_check_without_a_500(aiohttp_client: Any) -> None:
    sm, ran = manager(), []
    policy = jwtplus.CookiePolicy(csrf_field="csrf_token")
    app = form_app(sm, policy, ran)
    app._client_max_size = 1024
    client = await aiohttp_client(app)
    token = jwtplus.set_login_cookies(web.Response(), sm, {"username": "ann"}, cookies=policy)
    csrf = sm.decode(token)["csrf"]
    big = {"csrf_token": csrf, "note": "x" * 4096}
    refused = await client.post("/api/note", data=big, headers=cookie_header(token, csrf))
    assert refused.status == 403 and ran == []


@pytest.mark.parametrize("value", ["", "csrf token", "a;b", 7])
def test_a_bad_csrf_field_is_refused_naming_it(value: Any) -> None:
    with pytest.raises(ValueError, match="csrf_field="):
        jwtplus.CookiePolicy(csrf_field=value)


# -- Origin on every cookie-borne request, and on every WebSocket handshake --

FORBIDDEN = b'{"error":"forbidden"}'
CSRF_FAILED = b'{"error":"csrf_failed"}'


def socket_app(sm: SecretManager, ran: list[str], **helper_args: Any) -> web.Application:
    """cookie_app with a WebSocket at /api/socket that greets with who it is and where the token came from."""

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ran.append("socket")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json(
            {"username": request[jwtplus.AUTH_CARRY]["username"], "source": request[jwtplus.TOKEN_SOURCE]}
        )
        await ws.close()
        return ws

    app = cookie_app(sm, ran, **helper_args)
    app.router.add_get("/api/socket", socket)
    return app


def foreign_origins(host: str, port: int) -> list[str]:
    """Origins that are not the test server's own http://host:port."""
    return [
        "https://evil.example",
        f"http://{host}:{port + 1}",  # another port is another origin
        f"http://{host}",  # and so is the default one
        f"http://evil.{host}:{port}",  # a subdomain, however close
        f"http://{host}:{port}.evil.example",
        "null",  # sandboxed frames, data: URLs, file: pages
    ]


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])
async def test_a_cookie_request_from_a_foreign_origin_is_refused_whatever_the_method(
    make_client: Any, method: str
) -> None:
    sm, ran = manager(), []
    policy = jwtplus.CookiePolicy(trusted_origins=("https://app.example",))
    client = await make_client(app=cookie_app(sm, ran, cookies=policy))
    token = jwtplus.set_login_cookies(web.Response(), sm, {"username": "ann"}, cookies=policy)
    good = {**cookie_header(token), "X-CSRF-Token": sm.decode(token)["csrf"]}  # passes the double-submit
    for origin in foreign_origins(client.host, client.port):
        response = await client.request(method, "/api/thing", headers={**good, "Origin": origin})
        assert response.status == 403, origin
        assert "WWW-Authenticate" not in response.headers
        assert await response.read() == (b"" if method == "HEAD" else CSRF_FAILED)
    assert ran == []
    own = f"http://{client.host}:{client.port}"
    for headers in ({**good, "Origin": own}, {**good, "Origin": "https://app.example"}):
        assert (await client.request(method, "/api/thing", headers=headers)).status == 200, headers
    assert ran == [method, method]


async def test_a_cookie_get_without_origin_still_passes(make_client: Any) -> None:
    sm, ran = manager(), []
    client = await make_client(app=cookie_app(sm, ran))
    token = jwtplus.set_login_cookies(web.Response(), sm, {"username": "ann"})
    response = await client.get("/api/thing", headers=cookie_header(token))  # a top-level navigation
    assert response.status == 200
    assert await response.json() == {"source": "cookie", "status": "pass"}
    assert ran == ["GET"]


async def test_a_websocket_handshake_with_the_cookie_needs_an_acceptable_origin(make_client: Any) -> None:
    sm, ran = manager(), []
    policy = jwtplus.CookiePolicy(trusted_origins=("https://app.example",))
    client = await make_client(app=socket_app(sm, ran, cookies=policy))
    cookie = cookie_header(jwtplus.set_login_cookies(web.Response(), sm, {"username": "ann"}, cookies=policy))

    # No Origin: every browser sends one on a handshake, so this is no page of the app's.
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/api/socket", headers=cookie)
    assert refused.value.status == 403
    for origin in foreign_origins(client.host, client.port):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect("/api/socket", headers=cookie, origin=origin)
        assert refused.value.status == 403, origin
    assert ran == []

    for origin in (f"http://{client.host}:{client.port}", "https://app.example"):  # its own, a trusted one
        async with client.ws_connect("/api/socket", headers=cookie, origin=origin) as ws:
            assert await ws.receive_json() == {"username": "ann", "source": "cookie"}
    assert ran == ["socket", "socket"]


async def test_a_websocket_handshake_with_a_header_token_needs_no_origin(make_client: Any) -> None:
    sm, ran = manager(), []
    client = await make_client(app=socket_app(sm, ran))
    token = sm.encode({"username": "ann"})
    for origin in (None, "https://evil.example"):  # a page cannot make a browser attach the header
        async with client.ws_connect("/api/socket", headers=bearer(token), origin=origin) as ws:
            assert await ws.receive_json() == {"username": "ann", "source": "header"}
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/api/socket", origin=f"http://{client.host}:{client.port}")
    assert refused.value.status == 401  # no token at all
    assert ran == ["socket", "socket"]


async def test_a_cookie_token_without_a_csrf_claim_cannot_make_unsafe_requests(make_client: Any) -> None:
    sm, ran = manager(), []
    client = await make_client(app=cookie_app(sm, ran))
    token = sm.encode({"username": "ann"})  # minted without login(): no csrf claim
    assert (await client.get("/api/thing", headers=cookie_header(token))).status == 200
    response = await client.post("/api/thing", headers={**cookie_header(token), "X-CSRF-Token": ""})
    assert response.status == 403
    assert ran == ["GET"]


async def test_header_tokens_need_no_csrf_header(make_client: Any) -> None:
    sm, ran = manager(), []
    client = await make_client(app=cookie_app(sm, ran))
    body = await (await client.post("/api/thing", headers=bearer(sm.encode({"username": "ann"})))).json()
    assert body == {"source": "header", "status": "pass"}


async def test_two_different_tokens_are_a_bad_request(make_client: Any) -> None:
    sm, ran = manager(), []
    client = await make_client(app=cookie_app(sm, ran))
    one, two = sm.encode({"username": "ann"}), sm.encode({"username": "bob"})
    response = await client.get("/api/thing", headers={**bearer(one), **cookie_header(two)})
    assert response.status == 400
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_request"'
    assert await response.read() == b'{"error":"bad_request"}'
    page = await client.get("/index.html", headers={**bearer(one), **cookie_header(two)})
    assert page.status == 400
    whitelisted = await (await client.get("/login_api", headers={**bearer(one), **cookie_header(two)})).json()
    assert whitelisted["status"] == "malformed"
    same = await (await client.get("/api/thing", headers={**bearer(one), **cookie_header(one)})).json()
    assert same == {"source": "header", "status": "pass"}
    assert ran == ["GET"]


async def test_query_getter_is_for_websocket_handshakes(make_client: Any) -> None:
    sm, ran = manager(), []
    getter = jwtplus.any_token_getter(jwtplus.basic_token_getter, jwtplus.query_token_getter())
    client = await make_client(app=cookie_app(sm, ran, token_getter=getter))
    token = sm.encode({"username": "ann"})
    body = await (await client.get("/api/thing", params={"access_token": token})).json()
    assert body == {"source": "query", "status": "pass"}
    twice = await client.get("/api/thing", params=[("access_token", token), ("access_token", token)])
    assert twice.status == 401


async def test_a_custom_getter_in_a_chain_is_named_custom(make_client: Any) -> None:
    sm, ran = manager(), []
    getter = jwtplus.any_token_getter(plain_getter)
    client = await make_client(app=cookie_app(sm, ran, token_getter=getter))
    body = await (await client.get("/api/thing", headers={"X-Token": sm.encode({"username": "ann"})})).json()
    assert body == {"source": "custom", "status": "pass"}


# ---- Sessions: token pairs, refresh, revocation ----


def sessions_for(**kwargs: Any) -> jwtplus.Sessions:
    kwargs.setdefault("manager", manager())
    return jwtplus.Sessions(**kwargs)


def test_sessions_validate_their_configuration() -> None:
    with pytest.raises(ValueError, match="access no longer than refresh"):
        sessions_for(access_exptime="1d", refresh_exptime="1h")
    with pytest.raises(ValueError, match="refresh_exptime='30d' is longer than the manager's exptime"):
        sessions_for(manager=manager(refresh_interval="1h", exptime="1d"))
    with pytest.raises(TypeError, match="store must be a RevocationStore"):
        sessions_for(store={})
    with pytest.raises(ValueError, match="max_entries"):
        jwtplus.memory_store(max_entries=0)
    with pytest.raises(ValueError, match="same SecretManager"):
        JWTHelper(secret_manager=manager(), sessions=sessions_for())


async def test_a_pair_has_two_types_one_family_one_csrf() -> None:
    sessions = sessions_for()
    pair = await jwtplus.issue_tokens(sessions, "user-1", {"username": "ann"}, now=NOW)
    access, refresh = (sessions.manager.decode(t, now=NOW) for t in (pair.access, pair.refresh))
    assert (access["type"], refresh["type"]) == ("access", "refresh")
    assert access["fam"] == refresh["fam"] == pair.family
    assert access["csrf"] == refresh["csrf"] == pair.csrf
    assert access["sub"] == refresh["sub"] == "user-1"
    assert access["username"] == refresh["username"] == "ann"
    assert access["exp"] - NOW == 15 * 60
    assert refresh["exp"] - NOW == 30 * 86400
    assert access["fresh"] is True
    assert access["jti"] != refresh["jti"]
    with pytest.raises(ValueError, match="subject"):
        await jwtplus.issue_tokens(sessions, "")


def session_app(sessions: jwtplus.Sessions, ran: list[str], **helper_args: Any) -> web.Application:
    cookies = jwtplus.CookiePolicy()
    helper = JWTHelper(sessions=sessions, whitelist=("/login",), cookies=cookies, **helper_args)
    routes = web.RouteTableDef()

    @routes.post("/login")
    async def login(request: web.Request) -> web.Response:
        body = await request.json()
        response = web.json_response({"ok": True})
        pair = await jwtplus.start_session(
            response, sessions, body["sub"], body.get("claims"), cookies=cookies
        )
        response.text = json.dumps({"access": pair.access, "refresh": pair.refresh})
        return response

    @routes.post("/refresh")
    @jwtplus.session_route  # as the README says: no whitelist entry, any state of the access token
    async def refresh(request: web.Request) -> web.Response:
        pair = await jwtplus.refresh_session(request, sessions, cookies=cookies)
        response = web.json_response({"access": pair.access, "refresh": pair.refresh})
        jwtplus.set_session_cookies(response, sessions, pair, cookies=cookies)
        return response

    @routes.post("/logout")
    @jwtplus.session_route
    async def logout(request: web.Request) -> web.Response:
        ran.append("logout")
        body = await request.json() if request.can_read_body else {}
        await jwtplus.end_session(
            request, sessions, cookies=cookies, everywhere=body.get("everywhere", False)
        )
        response = web.json_response({"ok": True})
        jwtplus.clear_login_cookies(response, cookies=cookies)
        return response

    @routes.get("/me")
    async def me(request: web.Request) -> web.Response:
        ran.append("me")
        return web.json_response({"sub": request[jwtplus.AUTH_CLAIMS].get("sub")})

    @routes.post("/admin")
    @jwtplus.require_claims(role="admin")
    async def admin(request: web.Request) -> web.Response:
        ran.append("admin")
        return web.json_response({"ok": True})

    @routes.post("/password")
    @jwtplus.fresh_login_required
    async def change_password(request: web.Request) -> web.Response:
        ran.append("password")
        return web.json_response({"ok": True})

    app = web.Application()
    jwtplus.setup(app, helper)
    app.add_routes(routes)
    return app


async def log_in(client: Any, sub: str = "user-1", **claims: Any) -> dict[str, str]:
    response = await client.post("/login", json={"sub": sub, "claims": {"username": sub, **claims}})
    assert response.status == 200
    return dict(await response.json())


async def test_a_refresh_token_is_not_an_access_token_nor_the_reverse(make_client: Any) -> None:
    ran: list[str] = []
    client = await make_client(app=session_app(sessions_for(), ran))
    pair = await log_in(client)
    assert (await client.get("/me", headers=bearer(pair["access"]))).status == 200
    assert (await client.get("/me", headers=bearer(pair["refresh"]))).status == 401
    assert (await client.post("/refresh", json={"refresh_token": pair["access"]})).status == 401
    assert (await client.post("/refresh", json={"refresh_token": pair["refresh"]})).status == 200
    assert ran == ["me"]


async def test_refresh_rotates_within_the_family_and_a_reuse_kills_it(make_client: Any) -> None:
    ran: list[str] = []
    sessions = sessions_for()
    client = await make_client(app=session_app(sessions, ran))
    first = await log_in(client)
    second = await (await client.post("/refresh", json={"refresh_token": first["refresh"]})).json()
    claims = sessions.manager.decode(second["access"])
    assert claims["fam"] == sessions.manager.decode(first["access"])["fam"]
    assert claims["fresh"] is False
    assert claims["username"] == "user-1"
    third = await (await client.post("/refresh", json={"refresh_token": second["refresh"]})).json()
    assert (await client.get("/me", headers=bearer(third["access"]))).status == 200
    # the thief replays the first refresh token: the whole family dies, the rightful owner's tokens too
    replay = await client.post("/refresh", json={"refresh_token": first["refresh"]})
    assert replay.status == 401
    assert replay.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    for token in (first["access"], second["access"], third["access"]):
        assert (await client.get("/me", headers=bearer(token))).status == 401
    assert (await client.post("/refresh", json={"refresh_token": third["refresh"]})).status == 401
    # another login is another family, untouched
    other = await log_in(client)
    assert (await client.get("/me", headers=bearer(other["access"]))).status == 200


async def test_a_reuse_within_the_grace_is_refused_without_killing_the_family(make_client: Any) -> None:
    ran: list[str] = []
    client = await make_client(app=session_app(sessions_for(reuse_grace="10s"), ran))
    first = await log_in(client)
    second = await (await client.post("/refresh", json={"refresh_token": first["refresh"]})).json()
    assert (await client.post("/refresh", json={"refresh_token": first["refresh"]})).status == 401
    assert (await client.get("/me", headers=bearer(second["access"]))).status == 200


async def test_fifty_concurrent_refreshes_of_one_token_give_exactly_one_pair(make_client: Any) -> None:
    ran: list[str] = []
    client = await make_client(app=session_app(sessions_for(), ran))
    first = await log_in(client)
    replies = await asyncio.gather(
        *(client.post("/refresh", json={"refresh_token": first["refresh"]}) for _ in range(50))
    )
    assert sorted(reply.status for reply in replies) == [200] + [401] * 49


async def test_logout_revokes_the_family_and_everywhere_revokes_the_subject(make_client: Any) -> None:
    ran: list[str] = []
    client = await make_client(app=session_app(sessions_for(), ran))
    phone, laptop, tablet = await log_in(client), await log_in(client), await log_in(client)
    bystander = await log_in(client, "bob")
    logout = await client.post("/logout", headers=bearer(phone["access"]))
    assert logout.status == 200
    assert (await client.get("/me", headers=bearer(phone["access"]))).status == 401
    assert (await client.post("/refresh", json={"refresh_token": phone["refresh"]})).status == 401
    assert (await client.get("/me", headers=bearer(laptop["access"]))).status == 200
    everywhere = await client.post("/logout", headers=bearer(laptop["access"]), json={"everywhere": True})
    assert everywhere.status == 200
    assert (await client.get("/me", headers=bearer(laptop["access"]))).status == 401
    assert (await client.post("/refresh", json={"refresh_token": laptop["refresh"]})).status == 401
    assert (await client.get("/me", headers=bearer(tablet["access"]))).status == 401  # another family, too
    assert (await client.post("/refresh", json={"refresh_token": tablet["refresh"]})).status == 401
    assert (await client.get("/me", headers=bearer(bystander["access"]))).status == 200


async def is_revoked(sessions: jwtplus.Sessions, claims: dict[str, Any], now: float) -> bool:
    """What the pipeline's revocation check says of *claims* at *now*: revoked or not (it must not
    find the store unreachable)."""
    revoked, _ = await looked_up(sessions, claims, now)
    return revoked


async def looked_up(sessions: jwtplus.Sessions, claims: dict[str, Any], now: float) -> tuple[bool, bool]:
    """What the revocation check says of *claims* at *now*: whether they are revoked, and whether it
    had to ask the store (it returned an awaitable) rather than answer at once."""
    verdict = jwtplus.revocation_check(sessions)(make_mocked_request("GET", "/"), claims, now)
    asked = inspect.isawaitable(verdict)
    if asked:
        verdict = await verdict
    assert verdict in (None, "invalid"), verdict
    return verdict == "invalid", asked


async def test_revocation_is_checked_after_the_signature_and_keyed_by_jti() -> None:
    sessions = sessions_for()
    pair = await jwtplus.issue_tokens(sessions, "user-1", now=NOW)
    claims = sessions.manager.decode(pair.access, now=NOW)
    await jwtplus.revoke_token(sessions, claims, now=NOW)
    assert await is_revoked(sessions, claims, NOW)
    key = jwtplus._store_key(sessions, jwtplus._slot_tag("user-1"), "revoked", claims["jti"])
    assert await sessions.store.get_many([key], claims["exp"]) == [None]  # expired
    other = sessions.manager.decode((await jwtplus.issue_tokens(sessions, "user-1", now=NOW)).access, now=NOW)
    assert not await is_revoked(sessions, other, NOW)


async def test_logout_everywhere_refuses_every_earlier_token_and_no_later_one() -> None:
    sessions = sessions_for()
    before = sessions.manager.decode((await jwtplus.issue_tokens(sessions, "u", now=NOW)).access, now=NOW)
    await jwtplus.revoke_subject(sessions, "u", now=NOW + 0.5)
    after = sessions.manager.decode((await jwtplus.issue_tokens(sessions, "u", now=NOW)).access, now=NOW)
    assert await is_revoked(sessions, before, NOW + 1)
    assert not await is_revoked(sessions, after, NOW + 1)  # even minted "at" the same second
    await jwtplus.revoke_subject(sessions, "u", now=NOW + 2)  # again: the later login goes too
    assert await is_revoked(sessions, after, NOW + 3)
    other = sessions.manager.decode((await jwtplus.issue_tokens(sessions, "v", now=NOW)).access, now=NOW)
    assert not await is_revoked(sessions, other, NOW + 3)  # another subject is untouched


async def test_logout_everywhere_covers_a_server_whose_clock_runs_ahead(aiohttp_client: Any) -> None:
    """Two servers on one store, B's clock 3 s ahead within a 5 s leeway: a pair B mints 0.5 s before
    A's revoke_subject (so "issued" 2.5 s after it) is refused by both; a login after it is not."""
    sm = manager(leeway=5)
    sessions = sessions_for(manager=sm)
    now = time.time()
    ahead = await jwtplus.issue_tokens(sessions, "u", {"username": "ann"}, now=now + 3 - 0.5)
    await jwtplus.revoke_subject(sessions, "u", now=now)
    later = await jwtplus.issue_tokens(sessions, "u", {"username": "ann"}, now=now + 3 + 0.1)
    ran: list[str] = []
    client = await aiohttp_client(session_app(sessions, ran))
    for token in (ahead.access, later.access):
        assert sm.decode(token, now=now)["iat"] >= int(now)  # a cutoff second would not tell them apart
    assert (await client.get("/me", headers=bearer(ahead.access))).status == 401
    assert (await client.post("/refresh", json={"refresh_token": ahead.refresh})).status == 401
    assert (await client.get("/me", headers=bearer(later.access))).status == 200
    refreshed = await client.post("/refresh", json={"refresh_token": later.refresh})
    assert refreshed.status == 200
    assert (await client.get("/me", headers=bearer((await refreshed.json())["access"]))).status == 200


async def test_memory_store_drops_expired_entries_and_refuses_to_forget() -> None:
    store = jwtplus.memory_store(max_entries=2)
    await store.put("a", 1.0, NOW + 10, NOW)
    assert await store.consume("b", 2.0, NOW + 20, NOW) is None
    assert await store.consume("b", 3.0, NOW + 20, NOW) == 2.0
    with pytest.raises(jwtplus.StoreFullError):
        await store.put("c", 1.0, NOW + 30, NOW)
    assert await store.get_many(["a", "b"], NOW) == [1.0, 2.0]
    await store.put("c", 1.0, NOW + 30, NOW + 10)  # "a" expired, so there is room
    assert await store.get_many(["a", "b", "c"], NOW + 10) == [None, 2.0, 1.0]


def broken_store() -> jwtplus.RevocationStore:
    async def fail(*args: Any) -> Any:
        raise ConnectionError("store is down")

    return jwtplus.RevocationStore(fail, fail, fail)


@pytest.mark.parametrize("fail_open", [False, True])
async def test_a_store_that_cannot_be_reached_fails_closed_unless_told(
    make_client: Any, fail_open: bool
) -> None:
    ran: list[str] = []
    working = sessions_for()
    pair = await jwtplus.issue_tokens(working, "user-1", {"username": "ann"})
    down = jwtplus.Sessions(manager=working.manager, store=broken_store(), fail_open=fail_open)
    client = await make_client(app=session_app(down, ran))
    me = await client.get("/me", headers=bearer(pair.access))
    assert me.status == (200 if fail_open else 503)
    if not fail_open:
        assert await me.json() == {"error": "unavailable"}
        assert me.headers["Retry-After"] == "5"
    refresh = await client.post("/refresh", json={"refresh_token": pair.refresh})
    assert refresh.status == 503  # a refresh always needs the store: never mint without consuming
    assert (await client.post("/logout", headers=bearer(pair.access))).status == 503  # cannot revoke
    assert (await client.get("/me")).status == 401  # no token: nothing to look up


async def test_guards_answer_401_and_403_before_the_handler(make_client: Any) -> None:
    ran: list[str] = []
    client = await make_client(app=session_app(sessions_for(), ran))
    user, admin = await log_in(client, "ann"), await log_in(client, "root", role="admin")
    assert (await client.post("/admin")).status == 401
    forbidden = await client.post("/admin", headers=bearer(user["access"]))
    assert forbidden.status == 403
    assert forbidden.headers["WWW-Authenticate"] == 'Bearer error="insufficient_scope"'
    assert (await client.post("/admin", headers=bearer(admin["access"]))).status == 200
    assert ran == ["admin"]


async def test_fresh_login_required_refuses_refreshed_tokens(make_client: Any) -> None:
    ran: list[str] = []
    client = await make_client(app=session_app(sessions_for(), ran))
    fresh = await log_in(client)
    refreshed = await (await client.post("/refresh", json={"refresh_token": fresh["refresh"]})).json()
    assert (await client.post("/password", headers=bearer(refreshed["access"]))).status == 401
    assert (await client.post("/password", headers=bearer(fresh["access"]))).status == 200
    assert ran == ["password"]


def test_require_claims_reads_lists_and_scopes() -> None:
    holds = jwtplus.require_claims(scope="write", roles="admin")
    assert callable(holds)
    check = jwtplus.require_claims(scope="write")

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    assert check(handler).__name__ == "handler"  # functools.wraps


async def test_cookie_sessions_refresh_with_csrf_and_log_out(make_client: Any) -> None:
    ran: list[str] = []
    sessions = sessions_for()
    client = await make_client(app=session_app(sessions, ran))
    login = await client.post("/login", json={"sub": "ann"})
    jar = {morsel.key: morsel.value for morsel in login.cookies.values()}
    assert set(jar) == {"__Host-access_token", "__Host-refresh_token", "__Host-csrf_token"}
    refresh_cookie = login.cookies["__Host-refresh_token"]
    assert refresh_cookie["httponly"] is True
    assert refresh_cookie["samesite"] == "Strict"
    cookie = "; ".join(f"{k}={v}" for k, v in jar.items())
    refused = await client.post("/refresh", headers={"Cookie": cookie})  # no CSRF header
    assert refused.status == 403  # a CSRF failure is 403, as everywhere else
    renewed = await client.post(
        "/refresh", headers={"Cookie": cookie, "X-CSRF-Token": jar["__Host-csrf_token"]}
    )
    assert renewed.status == 200
    assert renewed.cookies["__Host-csrf_token"].value != jar["__Host-csrf_token"]


async def test_revocations_and_used_refresh_tokens_outlive_the_leeway() -> None:
    sessions = sessions_for(manager=manager(leeway=30))
    pair = await jwtplus.issue_tokens(sessions, "u", {"username": "ann"}, now=NOW)
    access = sessions.manager.decode(pair.access, now=NOW)
    await jwtplus.revoke_token(sessions, access, now=NOW + 1)
    assert await is_revoked(sessions, access, access["exp"] + 29)  # still valid, still revoked
    refresh = sessions.manager.decode(pair.refresh, now=NOW)
    assert (
        await sessions.store.consume(
            jwtplus._store_key(sessions, jwtplus._slot_tag("u"), "used", refresh["jti"]),
            NOW,
            jwtplus._outlives(sessions, refresh["exp"]),
            NOW,
        )
        is None
    )
    used = await sessions.store.get_many(
        [jwtplus._store_key(sessions, jwtplus._slot_tag("u"), "used", refresh["jti"])], refresh["exp"] + 29
    )
    assert used == [NOW]


async def test_a_custom_getter_reading_a_cookie_still_gets_the_csrf_check(make_client: Any) -> None:
    sm, ran = manager(), []

    def my_cookie_getter(request: web.Request) -> str | None:  # sets no TOKEN_SOURCE
        return request.cookies.get("__Host-access_token")

    for getter in (my_cookie_getter, jwtplus.any_token_getter(jwtplus.basic_token_getter, my_cookie_getter)):
        client = await make_client(app=cookie_app(sm, ran, token_getter=getter))
        token = jwtplus.set_login_cookies(web.Response(), sm, {"username": "ann"})
        assert (await client.post("/api/thing", headers=cookie_header(token))).status == 403
        csrf = sm.decode(token)["csrf"]
        assert (
            await client.post("/api/thing", headers={**cookie_header(token), "X-CSRF-Token": csrf})
        ).status == 200
    # a header getter says where its token came from, and needs no CSRF header
    header_getter = jwtplus.header_token_getter("Bearer", header="X-Token")
    client = await make_client(app=cookie_app(sm, ran, token_getter=header_getter))
    assert (
        await client.post("/api/thing", headers={"X-Token": f"Bearer {sm.encode({'username': 'ann'})}"})
    ).status == 200


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", '{"refresh_token": "TOKEN"}'),  # a cross-site form can send text/plain: never a source
        ("application/x-www-form-urlencoded", "refresh_token=TOKEN"),
        ("application/json", '{"refresh_token": 123}'),
        ("application/json", '{"refresh_token": ""}'),
        ("application/json", '["TOKEN"]'),
        ("application/json", '{"refresh": "TOKEN"}'),
        ("application/json", '{"refresh_token": "TOKEN"'),
        ("application/json", '{"refresh_token": "TOKEN"}'),  # the control: this one is a token
    ],
)
async def test_the_body_getter_takes_only_a_json_objects_string(
    aiohttp_client: Any, content_type: str, body: str
) -> None:
    getter = jwtplus.body_token_getter()

    async def probe(request: web.Request) -> web.Response:
        token = await getter(request)  # type: ignore[misc]
        return web.json_response({"token": token, "source": request.get(jwtplus.TOKEN_SOURCE)})

    app = web.Application()
    app.router.add_post("/probe", probe)
    client = await aiohttp_client(app)
    good = (await jwtplus.issue_tokens(sessions_for(), "ann")).refresh
    answer = await client.post(
        "/probe", data=body.replace("TOKEN", good), headers={"Content-Type": content_type}
    )
    control = body == '{"refresh_token": "TOKEN"}' and content_type == "application/json"
    expected = {"token": good, "source": "body"} if control else {"token": None, "source": None}
    assert (answer.status, await answer.json()) == (200, expected)


async def test_a_verifier_that_breaks_is_an_invalid_token_never_a_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(token: str, now: float) -> dict[str, Any]:
        raise RuntimeError("a bug in the verifier")

    sm = manager()
    judge = jwtplus._authenticator(broken, jwtplus.basic_token_getter, jwtplus.basic_identifier, "access", ())
    request = make_mocked_request("GET", "/x", headers=bearer(sm.encode({"username": "ann"})))
    assert (await judge(request, time.time())).status == "invalid"
    assert "verifying a token raised" in caplog.text


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json; charset=x-nope", b'{"refresh_token": "x"}'),
        ("application/json", b"[" * 100_000 + b"]" * 100_000),
        ("application/json", b"\xff\xfe"),
    ],
)
async def test_a_bad_refresh_body_is_401_never_500(make_client: Any, content_type: str, body: bytes) -> None:
    ran: list[str] = []
    client = await make_client(app=session_app(sessions_for(), ran))
    response = await client.post("/refresh", data=body, headers={"Content-Type": content_type})
    assert response.status == 401


def test_logout_clears_a_domain_scoped_refresh_cookie_with_its_domain() -> None:
    policy = jwtplus.CookiePolicy(domain="example.com", refresh_path="/api/refresh")
    response = web.Response()
    jwtplus.clear_login_cookies(response, cookies=policy)
    refresh = set_cookie_headers(response)["refresh_token"]
    assert "Domain=example.com" in refresh
    assert "Path=/api/refresh" in refresh


def test_cached_nested_claims_are_not_shared_between_requests() -> None:
    sm = manager()
    decode = jwtplus.cached_decoder(sm)
    token = sm.encode({"roles": ["user"], "profile": {"name": "ann"}}, now=NOW)
    decode(token, NOW)["roles"].append("admin")
    decode(token, NOW)["profile"]["name"] = "mallory"
    again = decode(token, NOW)
    assert again["roles"] == ["user"]
    assert again["profile"] == {"name": "ann"}


def test_require_claims_compares_types_strictly() -> None:
    with pytest.raises(TypeError, match="require_claims"):
        jwtplus.require_claims(tenant=None)


async def test_require_claims_refuses_look_alike_values(make_client: Any) -> None:
    sessions = sessions_for()
    app = web.Application()
    jwtplus.setup(app, JWTHelper(sessions=sessions))

    @jwtplus.require_claims(admin=True, level=1)
    async def guarded(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/guarded", guarded)
    client = await make_client(app=app)
    for claims, status in (
        ({"admin": True, "level": 1}, 200),
        ({"admin": 1, "level": 1}, 403),
        ({"admin": True, "level": True}, 403),
        ({"admin": True, "level": 1.0}, 403),
        ({"admin": True, "level": [1, 2]}, 200),
    ):
        pair = await jwtplus.issue_tokens(sessions, "u", {"username": "ann", **claims})
        assert (await client.get("/guarded", headers=bearer(pair.access))).status == status, claims


# ---- Logout in every state; jti optional; whitelisted paths and the store ----


def cookie_jar_of(response: Any) -> dict[str, str]:
    return {morsel.key: morsel.value for morsel in response.cookies.values()}


def cookie_line(jar: dict[str, str], *names: str) -> str:
    return "; ".join(f"{name}={jar[name]}" for name in names)


async def session_client(make_client: Any, **sessions_args: Any) -> tuple[Any, jwtplus.Sessions, list[str]]:
    ran: list[str] = []
    sessions = sessions_for(**sessions_args)
    return await make_client(app=session_app(sessions, ran)), sessions, ran


async def pair_login(client: Any) -> dict[str, str]:
    """Log ann in on a session_app; return the pair as its JSON gives it (access, refresh)."""
    answer = await client.post("/login", json={"sub": "ann", "claims": {"username": "ann"}})
    assert answer.status == 200
    return dict(await answer.json())


async def cookie_login(client: Any) -> dict[str, str]:
    login = await client.post("/login", json={"sub": "ann", "claims": {"username": "ann"}})
    assert login.status == 200
    return cookie_jar_of(login)


async def test_logout_after_the_access_token_expired_revokes_the_refresh_token(make_client: Any) -> None:
    client, sessions, ran = await session_client(make_client, access_exptime=1)
    jar = await cookie_login(client)
    expired = (
        await jwtplus.issue_tokens(sessions, "ann", now=time.time() - 5)
    ).access  # an expired access cookie
    cookie = f"__Host-access_token={expired}; " + cookie_line(
        jar, "__Host-refresh_token", "__Host-csrf_token"
    )
    csrf = {"X-CSRF-Token": jar["__Host-csrf_token"]}
    assert (await client.get("/me", headers={"Cookie": cookie})).status == 401
    out = await client.post("/logout", headers={"Cookie": cookie, **csrf})
    assert out.status == 200
    assert ran == ["logout"]
    refresh = await client.post(
        "/refresh", headers={"Cookie": cookie_line(jar, "__Host-refresh_token"), **csrf}
    )
    assert refresh.status == 401
    again = await client.post("/logout", headers={"Cookie": cookie, **csrf})
    assert again.status == 200  # twice in a row: nothing left to revoke is no error


async def test_a_client_with_only_its_refresh_token_can_log_out(make_client: Any) -> None:
    client, _, _ = await session_client(make_client)
    pair = await (await client.post("/login", json={"sub": "ann", "claims": {"username": "ann"}})).json()
    assert (await client.post("/logout", json={"refresh_token": pair["refresh"]})).status == 200
    assert (await client.post("/refresh", json={"refresh_token": pair["refresh"]})).status == 401
    assert (await client.get("/me", headers=bearer(pair["access"]))).status == 401  # the family is gone
    assert (await client.post("/logout", json={"refresh_token": pair["refresh"]})).status == 200


async def test_logout_with_a_valid_access_token_and_with_nothing(make_client: Any) -> None:
    client, _, ran = await session_client(make_client)
    pair = await (await client.post("/login", json={"sub": "ann", "claims": {"username": "ann"}})).json()
    assert (await client.post("/logout", headers=bearer(pair["access"]))).status == 200
    assert (await client.get("/me", headers=bearer(pair["access"]))).status == 401
    assert (await client.post("/refresh", json={"refresh_token": pair["refresh"]})).status == 401
    assert (await client.post("/logout")).status == 200  # never logged in: nothing to do
    assert (await client.post("/logout", headers=bearer(pair["access"]))).status == 200
    assert ran == ["logout", "logout", "logout"]


@pytest.mark.parametrize(
    "foreign",
    [
        {"Origin": "https://evil.example"},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "cross-site"},
        {},  # same origin, but no CSRF header
    ],
)
async def test_a_cross_site_page_cannot_log_a_user_out_with_the_refresh_cookie(
    make_client: Any, foreign: dict[str, str]
) -> None:
    client, _, _ = await session_client(make_client)
    jar = await cookie_login(client)
    refresh_only = cookie_line(jar, "__Host-refresh_token")
    refused = await client.post("/logout", headers={"Cookie": refresh_only, **foreign})
    assert refused.status == 403
    csrf = {"X-CSRF-Token": jar["__Host-csrf_token"]}
    still = await client.post("/refresh", headers={"Cookie": refresh_only, **csrf})
    assert still.status == 200  # the session survived the attempt


async def test_the_refresh_cookie_needs_csrf_even_on_a_get_logout(aiohttp_client: Any) -> None:
    sessions = sessions_for()
    routes = web.RouteTableDef()

    @routes.get("/logout")
    @jwtplus.session_route
    async def logout(request: web.Request) -> web.Response:
        await jwtplus.end_session(request, sessions)
        return web.json_response({"ok": True})

    app = web.Application()
    jwtplus.setup(app, JWTHelper(sessions=sessions, cookies=jwtplus.CookiePolicy()))
    app.add_routes(routes)
    app.router.add_get("/me", echo)
    client = await aiohttp_client(app)
    pair = await jwtplus.issue_tokens(sessions, "ann", {"username": "ann"})
    refused = await client.get("/logout", headers={"Cookie": f"__Host-refresh_token={pair.refresh}"})
    assert refused.status == 403  # an <img src=/logout> on a sibling site gets nowhere
    both = {"Cookie": f"__Host-access_token={pair.access}; __Host-refresh_token={pair.refresh}"}
    for foreign in ({}, {"Origin": "https://evil.example", "Sec-Fetch-Site": "same-site"}):
        assert (
            await client.get("/logout", headers={**both, **foreign})
        ).status == 403  # a valid access cookie too
    assert (await client.get("/me", headers=bearer(pair.access))).status == 200  # nothing was revoked
    assert (await client.get("/logout", headers={**both, "X-CSRF-Token": pair.csrf})).status == 200
    assert (await client.get("/me", headers=bearer(pair.access))).status == 401


async def test_a_token_without_jti_passes_and_logs_out_without_a_503(
    make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client, sessions, ran = await session_client(make_client)
    foreign = jwt.encode(
        {"sub": "ann", "username": "ann", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"
    )
    assert "jti" not in jwt.decode(foreign, SECRET, algorithms=["HS256"])
    assert (await client.get("/me", headers=bearer(foreign))).status == 200
    out = await client.post("/logout", headers=bearer(foreign))
    assert out.status == 200
    assert "store failed" not in caplog.text
    assert ran == ["me", "logout"]
    with pytest.raises(ValueError, match="no jti"):
        await jwtplus.revoke_token(sessions, {"sub": "ann", "exp": time.time() + 60})


async def test_logout_of_a_token_with_only_a_subject_revokes_the_subject(make_client: Any) -> None:
    client, _, _ = await session_client(make_client)
    foreign = jwt.encode(
        {"sub": "u1", "username": "u1", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"
    )
    assert (await client.get("/me", headers=bearer(foreign))).status == 200
    assert (await client.post("/logout", headers=bearer(foreign))).status == 200
    assert (await client.get("/me", headers=bearer(foreign))).status == 401


async def test_logout_of_a_token_with_a_jti_but_no_family_revokes_that_token(make_client: Any) -> None:
    client, sessions, _ = await session_client(make_client)
    plain, other = (sessions.manager.encode({"username": "u", "sub": "u"}) for _ in range(2))
    assert (await client.post("/logout", headers=bearer(plain))).status == 200
    assert (await client.get("/me", headers=bearer(plain))).status == 401
    assert (await client.get("/me", headers=bearer(other))).status == 200  # by jti: not the whole subject


async def test_a_refresh_token_in_the_authorization_header_refreshes_and_logs_out(make_client: Any) -> None:
    client, _, _ = await session_client(make_client)
    pair = await log_in(client)
    renewed = await client.post("/refresh", headers=bearer(pair["refresh"]))
    assert renewed.status == 200
    newer = await renewed.json()
    assert (await client.post("/logout", headers=bearer(newer["refresh"]))).status == 200
    assert (await client.post("/refresh", headers=bearer(newer["refresh"]))).status == 401
    assert (await client.get("/me", headers=bearer(newer["access"]))).status == 401


async def test_revocation_keys_of_absent_or_odd_claims_never_collide(make_client: Any) -> None:
    client, sessions, _ = await session_client(make_client)
    none_jti = sessions.manager.encode({"username": "x", "jti": "None"})
    await jwtplus.revoke_token(sessions, sessions.manager.decode(none_jti))
    no_jti = jwt.encode({"username": "y", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    empty = jwt.encode({"username": "z", "jti": "", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    assert (await client.get("/me", headers=bearer(none_jti))).status == 401
    assert (await client.get("/me", headers=bearer(no_jti))).status == 200  # "None" is no wildcard
    assert (await client.get("/me", headers=bearer(empty))).status == 200
    assert jwtplus._revocation_keys(sessions, {}) == ()
    assert jwtplus._revocation_keys(sessions, {"jti": "", "fam": None, "sub": 7}) == ()
    assert jwtplus._revocation_keys(sessions, {"jti": ["a"], "fam": {"b": 1}, "sub": 7.5}) == ()
    keys = jwtplus._revocation_keys(sessions, {"jti": "a", "fam": "a", "sub": "a"})
    assert len(set(keys)) == 3


def cluster_slot(key: str) -> int:
    """The Redis Cluster slot of *key* (redis-py's CRC16 of its hash tag, as the servers compute it)."""
    from redis.crc import key_slot

    return int(key_slot(("jwtplus:" + key).encode("utf-8", "surrogatepass")))


def recording_store(seen: list[tuple[str, str]]) -> jwtplus.RevocationStore:
    """A memory store that notes each key it is asked about: ("get" | "put" | "consume", key)."""
    inner = jwtplus.memory_store()

    async def put(key: str, value: float, until: float, now: float) -> None:
        seen.append(("put", key))
        await inner.put(key, value, until, now)

    async def get_many(keys: Sequence[str], now: float) -> list[float | None]:
        seen.extend(("get", key) for key in keys)
        return await inner.get_many(keys, now)

    async def consume(key: str, value: float, until: float, now: float) -> float | None:
        seen.append(("consume", key))
        return await inner.consume(key, value, until, now)

    return jwtplus.RevocationStore(put, get_many, consume)


@pytest.mark.parametrize("subject", ["ann", "{ann}", "}{", "a}b{c", "{}", "ünïcode ☃", "x" * 300])
async def test_every_key_of_a_subjects_sessions_lies_in_one_redis_cluster_slot(
    make_client: Any, subject: str
) -> None:
    """Login, checks, refresh, reuse, logout and "everywhere": a cluster serves each from one node."""
    pytest.importorskip("redis.crc", reason="needs redis-py (the test extra)")
    seen: list[tuple[str, str]] = []
    client, sessions, _ = await session_client(make_client, store=recording_store(seen))
    login = await (await client.post("/login", json={"sub": subject, "claims": {"username": "x"}})).json()
    assert (await client.get("/me", headers=bearer(login["access"]))).status == 200
    renewed = await client.post("/refresh", json={"refresh_token": login["refresh"]})
    assert renewed.status == 200
    pair = await renewed.json()
    assert (await client.post("/refresh", json={"refresh_token": login["refresh"]})).status == 401  # reuse
    second = await (await client.post("/login", json={"sub": subject, "claims": {"username": "x"}})).json()
    assert (await client.post("/logout", headers=bearer(second["access"]))).status == 200
    everywhere = await client.post("/logout", headers=bearer(pair["access"]), json={"everywhere": True})
    assert everywhere.status == 200
    claims = sessions.manager.decode(second["access"])
    await jwtplus.revoke_token(sessions, claims)
    await jwtplus.revoke_family(sessions, claims["fam"])  # by the family id alone: it names the slot
    await jwtplus.revoke_subject(sessions, subject)
    assert {operation for operation, _ in seen} == {"get", "put", "consume"}
    assert len({cluster_slot(key) for _, key in seen}) == 1, seen
    assert all(f"{{{jwtplus._slot_tag(subject)}}}" in key for _, key in seen)
    assert re.fullmatch(r"[0-9a-f]{8}\.[A-Za-z0-9_-]{22}", claims["fam"])
    assert claims["fam"].startswith(jwtplus._slot_tag(subject) + ".")


@given(st.text(min_size=1), st.text(min_size=1), st.text(min_size=1))
def test_the_revocation_keys_of_any_token_share_one_slot(sub: str, fam: str, jti: str) -> None:
    pytest.importorskip("redis.crc", reason="needs redis-py (the test extra)")
    sessions = SLOT_SESSIONS
    for claims in ({"sub": sub, "fam": fam, "jti": jti}, {"fam": fam, "jti": jti}, {"jti": jti}):
        keys = jwtplus._revocation_keys(sessions, claims)
        assert len(keys) == len(claims)
        assert len({cluster_slot(key) for key in keys}) == 1, keys


SLOT_SESSIONS = sessions_for(namespace="app:")


async def test_a_token_without_sub_is_refused_once_its_family_is_revoked_by_the_family_alone() -> None:
    """Without ``sub`` the family's tag names the slot (a jti's would miss what revoke_family wrote)."""
    sessions = sessions_for()
    pair = await jwtplus.issue_tokens(sessions, "ann")
    claims = {k: v for k, v in sessions.manager.decode(pair.access).items() if k != "sub"}
    now = time.time()
    assert not await is_revoked(sessions, claims, now)
    await jwtplus.revoke_family(sessions, claims["fam"], now=now)
    assert await is_revoked(sessions, claims, now)
    assert await is_revoked(sessions, {"fam": claims["fam"]}, now)


async def test_a_whitelisted_path_without_a_token_never_touches_the_store(make_client: Any) -> None:
    touched: list[str] = []
    inner = jwtplus.memory_store()

    async def get_many(keys: Sequence[str], now: float) -> list[float | None]:
        touched.extend(keys)
        return await inner.get_many(keys, now)

    store = jwtplus.RevocationStore(inner.put, get_many, inner.consume)
    client, sessions, _ = await session_client(make_client, store=store)
    assert (await client.post("/login", json={"sub": "ann", "claims": {"username": "ann"}})).status == 200
    assert touched == [jwtplus._store_key(sessions, jwtplus._slot_tag("ann"), "subject", "ann")]  # no check


async def test_a_token_with_nothing_to_look_up_never_touches_the_store(make_client: Any) -> None:
    touched: list[Sequence[str]] = []
    inner = jwtplus.memory_store()

    async def get_many(keys: Sequence[str], now: float) -> list[float | None]:
        touched.append(list(keys))
        return await inner.get_many(keys, now)

    client, sessions, _ = await session_client(
        make_client, store=jwtplus.RevocationStore(inner.put, get_many, inner.consume)
    )
    bare = jwt.encode({"username": "u", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    assert (await client.get("/me", headers=bearer(bare))).status == 200
    assert touched == []
    with_jti = jwt.encode(
        {"username": "u", "jti": "j1", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"
    )
    assert (await client.get("/me", headers=bearer(with_jti))).status == 200
    assert touched == [[jwtplus._store_key(sessions, jwtplus._slot_tag("j1"), "revoked", "j1")]]
    with pytest.raises(TypeError, match="cookies must be a CookiePolicy"):
        jwtplus.csrf_check("__Host-csrf_token")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sessions must be a Sessions"):
        jwtplus.revocation_check(inner)  # type: ignore[arg-type]


async def test_a_revoked_family_stays_revoked_for_tokens_issued_after_it() -> None:
    sessions = sessions_for()
    pair = await jwtplus.issue_tokens(sessions, "ann", now=NOW)
    await jwtplus.revoke_family(sessions, pair.family, now=NOW)
    later = jwtplus._mint(
        sessions, "ann", {}, family=pair.family, fresh=False, generation=None, auth_time=NOW, now=NOW + 60
    )
    claims = sessions.manager.decode(later.access, now=NOW + 61)
    assert await is_revoked(sessions, claims, NOW + 61)


async def test_revoking_a_family_or_subject_lasts_exactly_as_long_as_their_tokens() -> None:
    sessions = sessions_for()
    pair = await jwtplus.issue_tokens(sessions, "ann", now=NOW)
    claims = sessions.manager.decode(pair.refresh, now=NOW)
    for revoke in (jwtplus.revoke_family, jwtplus.revoke_subject):
        sessions = sessions_for(manager=sessions.manager)
        await revoke(sessions, pair.family if revoke is jwtplus.revoke_family else "ann", now=NOW)
        assert await is_revoked(sessions, claims, NOW + 1)
        end = NOW + sessions.refresh_seconds  # every token of the family has expired by then
        assert not await is_revoked(sessions, claims, end + 1)
    for bad in ("", None, 7):
        with pytest.raises(ValueError, match="non-empty string"):
            await jwtplus.revoke_family(sessions, bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="non-empty string"):
            await jwtplus.revoke_subject(sessions, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"family='f-now' was not minted by jwtplus 1\.1 .* pass subject="):
        await jwtplus.revoke_family(sessions, "f-now")  # no slot of its own: which subject's is it?
    await jwtplus.revoke_family(sessions, "f-now", subject="other")  # the real clock, when no now is given
    await jwtplus.revoke_subject(sessions, "s-now")
    live = {"fam": "f-now", "sub": "other", "iat": time.time() - 1}
    assert await is_revoked(sessions, live, time.time())


@pytest.mark.parametrize("wiring", ["a custom getter", "no jwtplus middleware"])
async def test_end_session_revokes_what_the_app_authenticated(aiohttp_client: Any, wiring: str) -> None:
    sessions = sessions_for()

    @jwtplus.session_route
    async def logout(request: web.Request) -> web.Response:
        await jwtplus.end_session(request, sessions)
        return web.json_response({"ok": True})

    if wiring == "a custom getter":

        def x_token(request: web.Request) -> str | None:
            token = request.headers.get("X-Token")
            if token:
                request[jwtplus.TOKEN_SOURCE] = "header"  # as the README says: not a cookie, no CSRF
            return token

        app = web.Application()
        jwtplus.setup(app, JWTHelper(sessions=sessions, token_getter=x_token))
        headers = lambda token: {"X-Token": token}  # noqa: E731
    else:
        app = web.Application()
        headers = bearer
    app.router.add_post("/logout", logout)
    client = await aiohttp_client(app)
    pair = await jwtplus.issue_tokens(sessions, "ann", {"username": "ann"})
    assert (await client.post("/logout", headers=headers(pair.access))).status == 200
    claims = sessions.manager.decode(pair.access)
    assert await is_revoked(sessions, claims, time.time())


async def test_a_logout_the_middleware_refused_is_refused(aiohttp_client: Any) -> None:
    sessions = sessions_for()

    @jwtplus.session_route
    async def logout(request: web.Request) -> web.Response:
        await jwtplus.end_session(request, sessions)
        return web.json_response({"ok": True})

    unlabelled = JWTHelper(sessions=sessions, token_getter=lambda request: request.headers.get("X-Token"))
    app = web.Application()
    jwtplus.setup(app, unlabelled)
    app.router.add_post("/logout", logout)
    client = await aiohttp_client(app)
    pair = await jwtplus.issue_tokens(sessions, "ann", {"username": "ann"})
    assert (await client.post("/logout", headers={"X-Token": pair.access})).status == 403  # CSRF fails closed


async def test_a_store_that_answers_short_is_unavailable_never_a_pass(make_client: Any) -> None:
    async def short(keys: Sequence[str], now: float) -> list[float | None]:
        return []

    inner = jwtplus.memory_store()
    client, sessions, _ = await session_client(
        make_client, store=jwtplus.RevocationStore(inner.put, short, inner.consume)
    )
    with pytest.raises(web.HTTPServiceUnavailable):  # a login cannot read the subject's generation
        await jwtplus.issue_tokens(sessions, "ann", {"username": "ann"})
    pair = await jwtplus.issue_tokens(sessions_for(manager=sessions.manager), "ann", {"username": "ann"})
    assert (await client.get("/me", headers=bearer(pair.access))).status == 503


@pytest.mark.parametrize("missing", ["jti", "fam", "sub"])
async def test_a_refresh_token_without_jti_fam_or_sub_cannot_refresh(make_client: Any, missing: str) -> None:
    client, sessions, _ = await session_client(make_client)
    claims = {"type": "refresh", "username": "ann", "jti": "j-1", "fam": "f-1", "sub": "ann"}
    del claims[missing]
    token = sessions.manager.encode(claims)
    if missing == "jti":  # encode adds a random jti: strip it again by minting the token by hand
        token = jwt.encode({**claims, "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    assert (await client.post("/refresh", json={"refresh_token": token})).status == 401


async def test_a_whitelisted_path_with_a_token_is_served_when_the_store_is_down(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    down = sessions_for(store=broken_store())
    helper = JWTHelper(sessions=down, whitelist=("/open",))
    app = web.Application()
    jwtplus.setup(app, helper)
    app.router.add_get("/open", echo)
    client = await aiohttp_client(app)
    token = (
        await jwtplus.issue_tokens(sessions_for(manager=down.manager), "ann", {"username": "ann"})
    ).access
    with caplog.at_level(logging.WARNING, logger="jwtplus"):
        served = await client.get("/open", headers=bearer(token))
    assert served.status == 200
    assert (await served.json())["status"] == "unavailable"  # never "pass" for a token it could not check
    assert "refused" not in caplog.text
    assert "auth_status is 'unavailable'" in caplog.text


def test_the_memory_store_says_how_full_it_is() -> None:
    store = jwtplus.memory_store(max_entries=3)
    assert repr(store) == "RevocationStore(kind='memory', entries=0, max_entries=3)"
    asyncio.run(store.put("a", 1.0, NOW + 10, NOW))
    assert store.info is not None
    assert store.info() == {"kind": "memory", "entries": 1, "max_entries": 3}
    assert (
        repr(jwtplus.RevocationStore(store.put, store.get_many, store.consume))
        == "RevocationStore(kind='custom')"
    )


async def test_the_memory_store_stays_bounded_when_one_key_is_rewritten() -> None:
    import tracemalloc

    sessions = sessions_for(store=jwtplus.memory_store(max_entries=10))
    await jwtplus.revoke_subject(sessions, "42", now=NOW)  # the first entry and its heap item
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(100_000):
            await jwtplus.revoke_subject(sessions, "42", now=NOW + i / 1000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 16 * 1024, grown  # 1.0 grew 14 MiB: one stale heap item per call
    assert sessions.store.info is not None and sessions.store.info()["entries"] == 1
    claims = {"sub": "42", "iat": NOW, "exp": NOW + 60}
    assert await is_revoked(sessions, claims, NOW + 100)  # still revoked, of course


async def test_apps_with_different_secrets_on_one_store_never_revoke_each_other() -> None:
    store = jwtplus.memory_store()
    app_a = sessions_for(manager=manager(), store=store)
    app_b = sessions_for(manager=SecretManager(secret=secrets.token_bytes(32)), store=store)
    a42, b42 = (await jwtplus.issue_tokens(app_a, "42")), (await jwtplus.issue_tokens(app_b, "42"))
    await jwtplus.revoke_subject(app_a, "42")
    await jwtplus.revoke_family(app_a, b42.family)  # even a family id learnt from the other app
    await jwtplus.revoke_token(app_a, app_b.manager.decode(b42.access))
    assert await is_revoked(app_a, app_a.manager.decode(a42.access), time.time())
    assert not await is_revoked(app_b, app_b.manager.decode(b42.access), time.time())
    # the namespace is derived from the secret and tells nothing about it; the same secret shares it
    assert re.fullmatch(r"[0-9a-f]{16}:", app_a.namespace or "")
    assert app_a.namespace != app_b.namespace
    assert app_a.namespace == sessions_for(manager=manager()).namespace
    assert (app_a.namespace or "")[:-1].encode() not in SECRET
    bare = sessions_for(namespace="")  # no namespace; the slot tag stays
    tag = jwtplus._slot_tag("s")
    assert jwtplus._revocation_keys(bare, {"jti": "j", "fam": "f", "sub": "s"}) == (
        f"{{{tag}}}revoked:j",
        f"{{{tag}}}family:f",
        f"{{{tag}}}subject:s",
    )
    with pytest.raises(TypeError, match="namespace=7 must be a string or None"):
        sessions_for(namespace=7)
    for braced in ("{app}:", "app}", "{"):
        with pytest.raises(ValueError, match=r"namespace=.* must not contain braces: jwtplus puts each"):
            sessions_for(namespace=braced)


def refresh_request(token: str) -> web.Request:
    return make_mocked_request("POST", "/refresh", headers=bearer(token))


@pytest.mark.parametrize(
    ("grace", "reused_after", "theft"),
    [(0, 0, True), (0, 5, True), (10, 5, False), (10, 11, True), (10, -1, True), (0, -3, True)],
)
async def test_a_reused_refresh_token_is_theft_unless_within_the_grace_forward_in_time(
    grace: int, reused_after: float, theft: bool
) -> None:
    """A reuse on a server whose clock runs behind (reused_after < 0) is forgiven by no grace: in 1.0 a
    thief replaying a token there within the skew kept the family alive, even with reuse_grace=0."""
    sessions = sessions_for(reuse_grace=grace)
    pair = await jwtplus.issue_tokens(sessions, "ann", now=NOW)
    await jwtplus.refresh_session(refresh_request(pair.refresh), sessions, now=NOW + 100)
    with pytest.raises(web.HTTPUnauthorized):
        await jwtplus.refresh_session(refresh_request(pair.refresh), sessions, now=NOW + 100 + reused_after)
    access = sessions.manager.decode(pair.access, now=NOW)
    assert await is_revoked(sessions, access, NOW + 101) is theft


async def test_a_login_ends_after_its_lifetime_however_often_it_is_refreshed() -> None:
    """1.0 kept one family alive 348 days with twelve refreshes 29 days apart."""
    sessions = sessions_for(manager=manager(exptime="400d"))
    day = 86400
    pair = await jwtplus.issue_tokens(sessions, "ann", {"role": "admin"}, now=NOW)
    for refreshed_at in (29, 58, 87, 89.9):
        now = NOW + refreshed_at * day
        pair = await jwtplus.refresh_session(refresh_request(pair.refresh), sessions, now=now)
        for token in (pair.access, pair.refresh):
            claims = sessions.manager.decode(token, now=now)
            assert claims["auth_time"] == NOW
            assert claims["exp"] <= NOW + 90 * day
    with pytest.raises(web.HTTPUnauthorized):  # the refresh token itself ends with the login
        await jwtplus.refresh_session(refresh_request(pair.refresh), sessions, now=NOW + 90 * day)
    short = sessions_for(manager=manager(exptime="400d"), login_lifetime="31d")
    pair = await jwtplus.issue_tokens(short, "ann", now=NOW)
    pair = await jwtplus.refresh_session(refresh_request(pair.refresh), short, now=NOW + 29 * day)
    assert short.manager.decode(pair.refresh, now=NOW + 29 * day)["exp"] == NOW + 31 * day
    with pytest.raises(ValueError, match="login_lifetime='1d' must be at least refresh_exptime='30d'"):
        sessions_for(login_lifetime="1d")
    with pytest.raises(TypeError, match="reload_claims must be a function"):
        sessions_for(reload_claims="role")


async def test_reload_claims_demotes_or_ends_a_login_at_its_next_refresh() -> None:
    accounts = {"ann": {"role": "admin"}, "bob": {"role": "user"}}
    calls: list[tuple[str, dict[str, Any]]] = []

    async def reload(subject: str, claims: dict[str, Any]) -> dict[str, Any] | None:
        calls.append((subject, claims))
        account = accounts.get(subject)
        return None if account is None else {**claims, **account}

    sessions = sessions_for(reload_claims=reload)
    ann = await jwtplus.issue_tokens(sessions, "ann", {"role": "admin", "username": "ann"}, now=NOW)
    accounts["ann"] = {"role": "user"}  # demoted
    renewed = await jwtplus.refresh_session(refresh_request(ann.refresh), sessions, now=NOW + 60)
    claims = sessions.manager.decode(renewed.access, now=NOW + 60)
    assert (claims["role"], claims["username"], claims["sub"]) == ("user", "ann", "ann")
    assert calls == [("ann", {"role": "admin", "username": "ann"})]  # never the registered claims

    bob = await jwtplus.issue_tokens(sessions, "bob", now=NOW)
    del accounts["bob"]  # disabled: the login ends, family and all
    with pytest.raises(web.HTTPUnauthorized):
        await jwtplus.refresh_session(refresh_request(bob.refresh), sessions, now=NOW + 60)
    assert await is_revoked(sessions, sessions.manager.decode(bob.access, now=NOW), NOW + 61)

    def broken(subject: str, claims: dict[str, Any]) -> Any:
        raise ConnectionError("the user database is down")

    for hook, expected in (
        (broken, web.HTTPServiceUnavailable),
        (lambda s, c: ["role"], web.HTTPServiceUnavailable),
    ):
        failing = sessions_for(manager=sessions.manager, reload_claims=hook)
        pair = await jwtplus.issue_tokens(failing, "ann", now=NOW)
        with pytest.raises(expected):
            await jwtplus.refresh_session(refresh_request(pair.refresh), failing, now=NOW + 60)
        working = dataclasses.replace(failing, reload_claims=None)  # the database is back
        renewed = await jwtplus.refresh_session(refresh_request(pair.refresh), working, now=NOW + 61)
        assert not await is_revoked(working, working.manager.decode(renewed.access, now=NOW + 61), NOW + 61)


# ---- Guards and route options: data on the handler, enforced by the middleware ----

GUARD_WIRINGS = ["seed pair", "setup", "functional pair", "one functional layer", "authentication only"]


def wired_app(
    wiring: str, routes: web.RouteTableDef, sm: SecretManager | None = None, **helper_args: Any
) -> web.Application:
    """An app holding *routes* behind jwtplus, wired each way a user can."""
    sm = sm or manager()
    helper = JWTHelper(secret_manager=sm, **helper_args)
    if wiring == "seed pair":
        app = web.Application(middlewares=[helper.pre_jwt_identifier(), helper.post_jwt_router()])
    elif wiring == "setup":
        app = web.Application()
        jwtplus.setup(app, helper)
    elif wiring == "functional pair":
        app = web.Application(
            middlewares=[
                jwtplus.authentication_middleware(manager=sm, checks=helper.all_checks),
                jwtplus.router_middleware(rules=helper.rules, scheme=sm.scheme),
            ]
        )
    elif wiring == "one functional layer":
        app = web.Application(middlewares=[jwtplus.jwt_middleware(manager=sm, rules=helper.rules)])
    else:
        app = web.Application(middlewares=[jwtplus.authentication_middleware(manager=sm)])
    app.add_routes(routes)
    return app


def guarded_routes(ran: list[str], guard_above: bool) -> web.RouteTableDef:
    """POST /admin guarded by require_claims(role="admin"), the guard above or below the route decorator."""
    routes = web.RouteTableDef()

    async def admin(request: web.Request) -> web.Response:
        ran.append("admin")
        return web.json_response({"ok": True})

    if guard_above:
        jwtplus.require_claims(role="admin")(routes.post("/admin")(admin))
    else:
        routes.post("/admin")(jwtplus.require_claims(role="admin")(admin))
    return routes


@pytest.mark.parametrize("guard_above", [True, False], ids=["guard above the route", "guard below"])
@pytest.mark.parametrize("wiring", GUARD_WIRINGS)
async def test_a_guard_holds_whatever_the_decorator_order_and_wiring(
    make_client: Any, wiring: str, guard_above: bool
) -> None:
    ran: list[str] = []
    sm = manager()
    client = await make_client(
        app=wired_app(wiring, guarded_routes(ran, guard_above), sm, whitelist=("/admin",))
    )
    user = sm.encode({"username": "ann", "role": "user"})
    admin = sm.encode({"username": "root", "role": "admin"})
    forbidden = await client.post("/admin", headers=bearer(user))
    assert forbidden.status == 403
    assert forbidden.headers["WWW-Authenticate"] == 'Bearer error="insufficient_scope"'
    missing = await client.post("/admin")  # whitelisted: only the guard stands in the way
    assert (missing.status, missing.headers["WWW-Authenticate"]) == (401, "Bearer")
    expired = await client.post(
        "/admin", headers=bearer(sm.encode({"role": "admin"}, now=time.time() - 40 * 86400))
    )
    assert (expired.status, expired.headers["WWW-Authenticate"]) == (401, 'Bearer error="invalid_token"')
    assert ran == []
    assert (await client.post("/admin", headers=bearer(admin))).status == 200
    assert ran == ["admin"]


@pytest.mark.parametrize("wiring", GUARD_WIRINGS)
async def test_guards_on_a_class_based_view_and_its_methods(make_client: Any, wiring: str) -> None:
    ran: list[str] = []
    routes = web.RouteTableDef()

    @routes.view("/items")
    class Items(web.View):
        async def get(self) -> web.Response:
            ran.append("get")
            return web.json_response({"items": []})

        @jwtplus.login_required
        async def post(self) -> web.Response:
            ran.append("post")
            return web.json_response({"by": self.request[jwtplus.AUTH_CLAIMS]["username"]})

        @jwtplus.require_claims(role="admin")
        async def delete(self) -> web.Response:
            ran.append("delete")
            return web.json_response({"ok": True})

    @routes.view("/secret")
    @jwtplus.login_required
    class Secret(web.View):
        async def get(self) -> web.Response:
            ran.append("secret")
            return web.json_response({"ok": True})

    sm = manager()
    client = await make_client(app=wired_app(wiring, routes, sm, whitelist=("/items", "/secret")))
    token = bearer(sm.encode({"username": "ann", "role": "user"}))
    assert (await client.get("/items")).status == 200
    assert (await client.post("/items")).status == 401
    assert (await client.delete("/items", headers=token)).status == 403
    assert (await client.get("/secret")).status == 401
    posted = await client.post("/items", headers=token)
    assert (posted.status, await posted.json()) == (200, {"by": "ann"})
    assert (await client.get("/secret", headers=token)).status == 200
    assert ran == ["get", "post", "secret"]


@pytest.mark.parametrize("guard_above", [True, False], ids=["guard above the route", "guard below"])
@pytest.mark.parametrize("wiring", GUARD_WIRINGS)
async def test_a_guards_answer_uses_the_managers_scheme(
    make_client: Any, wiring: str, guard_above: bool
) -> None:
    ran: list[str] = []
    sm = manager(scheme="JWT")
    routes = guarded_routes(ran, guard_above)
    client = await make_client(app=wired_app(wiring, routes, sm, whitelist=("/admin",)))
    missing = await client.post("/admin")
    assert (missing.status, missing.headers["WWW-Authenticate"]) == (401, "JWT")
    user = {"Authorization": f"JWT {sm.encode({'username': 'ann'})}"}
    forbidden = await client.post("/admin", headers=user)
    assert forbidden.headers["WWW-Authenticate"] == 'JWT error="insufficient_scope"'
    assert ran == []


async def test_a_guard_without_a_jwtplus_middleware_fails_loudly(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []
    app = web.Application()
    app.add_routes(guarded_routes(ran, guard_above=False))
    client = await aiohttp_client(app)
    sm = manager()
    response = await client.post("/admin", headers=bearer(sm.encode({"role": "admin"})))
    assert response.status == 500
    assert ran == []
    assert "without the jwtplus middleware" in caplog.text


def test_a_guard_refuses_what_cannot_carry_a_policy() -> None:
    with pytest.raises(TypeError, match="decorates a handler"):
        jwtplus.login_required("not a handler")  # type: ignore[type-var]
    with pytest.raises(TypeError, match="predicate"):
        jwtplus.require("role")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="at least one claim"):
        jwtplus.require_claims()
    with pytest.raises(ValueError, match="cannot also be optional"):
        jwtplus.login_required(jwtplus.route_options(optional=True)(echo_copy()))
    with pytest.raises(ValueError, match="locations="):
        jwtplus.route_options(locations=("url",))
    with pytest.raises(ValueError, match=r'token_type=.*"access" or "refresh"'):
        jwtplus.route_options(token_type="id")
    with pytest.raises(ValueError, match=r'token_type=.*"access" or "refresh"'):
        jwtplus.RoutePolicy(token_type="id")
    with pytest.raises(ValueError, match="exclude each other"):
        jwtplus.session_route(jwtplus.route_options(optional=True)(echo_copy()))
    with pytest.raises(ValueError, match="cannot also be optional or any_state"):
        jwtplus.login_required(jwtplus.session_route(echo_copy()))
    with pytest.raises(ValueError, match="disagree on locations"):
        jwtplus.route_options(locations=("query",))(jwtplus.route_options(locations=("header",))(echo_copy()))


def test_a_route_policy_is_frozen_keyword_data_with_its_locations_in_order() -> None:
    policy = jwtplus.RoutePolicy(locations="query")  # type: ignore[arg-type]
    assert policy.locations == ("query",)
    assert jwtplus.RoutePolicy(locations=["body", "header", "body"]).locations == ("body", "header")  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.optional = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        jwtplus.RoutePolicy((), True)  # type: ignore[misc]
    assert not hasattr(policy, "__dict__")
    handler = jwtplus.route_options(locations=["query", "query"])(echo_copy())
    assert handler.jwtplus_policy == jwtplus.RoutePolicy(locations=("query",))


def test_stacked_declarations_keep_every_option_whatever_their_order() -> None:
    def policy(*decorators: Any) -> jwtplus.RoutePolicy:
        handler = echo_copy()
        for decorate in reversed(decorators):
            handler = decorate(handler)
        return handler.jwtplus_policy  # type: ignore[no-any-return]

    where = jwtplus.route_options(locations=("query",))
    refresh = jwtplus.route_options(token_type="refresh")
    optional = jwtplus.route_options(optional=True)
    for a, b in ((where, refresh), (refresh, where)):
        assert (policy(a, b).locations, policy(a, b).token_type) == (("query",), "refresh")
    for a, b in ((jwtplus.session_route, where), (where, jwtplus.session_route)):
        assert (policy(a, b).any_state, policy(a, b).locations) == (True, ("query",))
    for a, b in ((optional, where), (where, optional)):
        assert (policy(a, b).optional, policy(a, b).locations) == (True, ("query",))
    guarded = policy(jwtplus.login_required, where, jwtplus.require_claims(role="admin"))
    assert (len(guarded.requirements), guarded.locations) == (2, ("query",))
    assert policy(where, where).locations == ("query",)  # the same twice is no contradiction


async def test_an_async_predicate_is_awaited(make_client: Any) -> None:
    routes = web.RouteTableDef()

    async def is_admin(claims: dict[str, Any]) -> bool:
        await asyncio.sleep(0)
        return claims.get("role") == "admin"

    @routes.post("/admin")
    @jwtplus.require(is_admin)
    async def admin(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    sm = manager()
    client = await make_client(app=wired_app("setup", routes, sm))
    assert (
        await client.post("/admin", headers=bearer(sm.encode({"username": "a", "role": "user"})))
    ).status == 403
    assert (
        await client.post("/admin", headers=bearer(sm.encode({"username": "a", "role": "admin"})))
    ).status == 200


async def test_an_option_on_a_wrapper_never_opens_the_function_it_wraps(make_client: Any) -> None:
    async def report(request: web.Request) -> web.Response:
        return web.json_response({"status": request[jwtplus.AUTH_STATUS]})

    def logged(handler: Any) -> Any:
        @functools.wraps(handler)
        async def wrapper(request: web.Request) -> web.StreamResponse:
            return await handler(request)

        return wrapper

    routes = web.RouteTableDef()
    routes.get("/report")(report)
    routes.get("/report-any")(jwtplus.session_route(logged(report)))
    routes.get("/report-optional")(jwtplus.route_options(optional=True)(logged(report)))
    routes.get("/report-guarded")(jwtplus.require_claims(role="admin")(logged(report)))
    sm = manager()
    client = await make_client(app=wired_app("setup", routes, sm, protected_apis=("/report.*",)))
    assert (await client.get("/report-any")).status == 200
    assert (await client.get("/report-optional")).status == 200
    assert (await client.get("/report")).status == 401  # the wrapped function's own route stays closed
    bad = bearer(tampered(sm.encode({"username": "a"})))
    assert (await client.get("/report", headers=bad)).status == 401
    user = bearer(sm.encode({"username": "a", "role": "user"}))
    assert (await client.get("/report-guarded", headers=user)).status == 403
    assert (
        await client.get("/report", headers=user)
    ).status == 403  # a guard reaches what it wraps: stricter


@pytest.mark.parametrize(
    "verdict",
    [[], {}, ["invalid"], {"csrf": "a-claim-value"}, object()],
    ids=["empty list", "empty dict", "a list", "a dict", "an object"],
)
async def test_a_check_returning_anything_odd_rejects_and_logs_no_value(
    make_client: Any, verdict: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def odd(request: web.Request, claims: dict[str, Any], now: float) -> Any:
        return verdict

    ran: list[str] = []
    client = await make_client(app=checked_app(ran, (odd,)))
    assert (await client.get("/api", headers=bearer(manager().encode({"username": "ann"})))).status == 403
    assert ran == []
    assert "a-claim-value" not in caplog.text


async def test_an_identifier_whose_result_cannot_be_judged_rejects(make_client: Any) -> None:
    class Moody:
        def __bool__(self) -> bool:
            raise RuntimeError("no opinion")

    helper = seed_helper(manager(), identifier=lambda payload: Moody())
    client = await make_client(helper)
    assert (
        await client.get("/setattr_api", headers=bearer(manager().encode({"username": "a"})))
    ).status == 403


async def test_a_view_subclass_that_contradicts_its_base_is_refused_never_a_500(
    make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    @jwtplus.login_required
    class Base(web.View):
        async def get(self) -> web.Response:
            return web.json_response({"ok": True})

    class Child(Base):
        @jwtplus.route_options(optional=True)
        async def get(self) -> web.Response:
            return web.json_response({"ok": True})

    routes = web.RouteTableDef()
    routes.view("/child")(Child)
    sm = manager()
    client = await make_client(app=wired_app("setup", routes, sm))
    assert (await client.get("/child", headers=bearer(sm.encode({"username": "a"})))).status == 403
    assert "every request to it is refused" in caplog.text


async def test_a_foreign_attribute_of_the_policy_name_is_no_policy(make_client: Any) -> None:
    class Plain(web.View):
        async def get(self) -> web.Response:
            return web.json_response({"ok": True})

    Plain.get.jwtplus_policy = "not a policy"  # type: ignore[attr-defined]
    Plain.jwtplus_policy = {"optional": True}  # type: ignore[attr-defined]
    routes = web.RouteTableDef()
    routes.view("/plain")(Plain)
    sm = manager()
    client = await make_client(app=wired_app("setup", routes, sm, protected_apis=("/plain",)))
    assert (await client.get("/plain")).status == 401  # neither admits anything
    assert (await client.get("/plain", headers=bearer(sm.encode({"username": "a"})))).status == 200


async def test_a_guarded_view_without_a_jwtplus_middleware_fails_loudly(aiohttp_client: Any) -> None:
    ran: list[str] = []

    @jwtplus.login_required
    class Secret(web.View):
        async def get(self) -> web.Response:
            ran.append("get")
            return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_view("/secret", Secret)
    client = await aiohttp_client(app)
    assert (await client.get("/secret")).status == 500
    assert ran == []


def test_a_view_class_and_its_methods_must_agree_at_decoration() -> None:
    class Socket(web.View):
        @jwtplus.route_options(locations=("query",))
        async def get(self) -> web.Response:
            return web.json_response({})

    with pytest.raises(ValueError, match="disagree on locations"):
        jwtplus.route_options(locations=("header",))(Socket)
    with pytest.raises(ValueError, match="cannot also be optional"):
        jwtplus.login_required(jwtplus.route_options(optional=True)(type("Open", (web.View,), {})))


def test_what_cannot_carry_a_policy_is_refused_by_every_decorator() -> None:
    for decorate in (jwtplus.route_options(optional=True), jwtplus.session_route):
        with pytest.raises(TypeError, match="cannot declare a route policy"):
            decorate(len)


def test_stacked_guards_share_one_wrapper() -> None:
    handler = echo_copy()
    guarded = jwtplus.login_required(jwtplus.require_claims(role="admin")(handler))
    assert guarded.__wrapped__ is handler  # type: ignore[attr-defined]
    assert len(guarded.jwtplus_policy.requirements) == 2  # type: ignore[attr-defined]


def test_a_wrapper_chain_that_loops_is_walked_once() -> None:
    handler = echo_copy()
    handler.__wrapped__ = handler  # type: ignore[attr-defined]
    assert jwtplus.login_required(handler).jwtplus_policy.requirements  # type: ignore[attr-defined]


def echo_copy() -> Any:
    async def handler(request: web.Request) -> web.Response:
        return await echo(request)

    return handler


SCOPES = [
    ("read write", 200),
    ("write", 200),
    ("write read", 200),
    ("read writer", 403),
    ("rewrite", 403),
    ("read,write", 403),
    ("", 403),
    (["write"], 200),
    (["read"], 403),
    (None, 403),
]


@pytest.mark.parametrize(("scope", "status"), SCOPES)
async def test_require_claims_matches_whole_scope_words(make_client: Any, scope: Any, status: int) -> None:
    routes = web.RouteTableDef()
    ran: list[str] = []

    @routes.post("/write")
    @jwtplus.require_claims(scope="write")
    async def write(request: web.Request) -> web.Response:
        ran.append("write")
        return web.json_response({"ok": True})

    sm = manager()
    client = await make_client(app=wired_app("setup", routes, sm))
    claims = {"username": "ann"} if scope is None else {"username": "ann", "scope": scope}
    assert (await client.post("/write", headers=bearer(sm.encode(claims)))).status == status
    assert ran == (["write"] if status == 200 else [])


async def test_login_required_on_a_whitelisted_route_needs_a_token(make_client: Any) -> None:
    routes = web.RouteTableDef()
    ran: list[str] = []

    @routes.get("/profile")
    @jwtplus.login_required
    async def profile(request: web.Request) -> web.Response:
        ran.append("profile")
        return web.json_response({"you": request[jwtplus.AUTH_CLAIMS]["username"]})

    sm = manager()
    client = await make_client(app=wired_app("seed pair", routes, sm, whitelist=("/profile",)))
    assert (await client.get("/profile")).status == 401
    assert (
        await client.get("/profile", headers=bearer(tampered(sm.encode({"username": "a"}))))
    ).status == 401
    assert ran == []
    ok = await client.get("/profile", headers=bearer(sm.encode({"username": "ann"})))
    assert (ok.status, await ok.json()) == (200, {"you": "ann"})


async def test_fresh_login_required_wants_fresh_true_exactly(make_client: Any) -> None:
    routes = web.RouteTableDef()

    @routes.post("/password")
    @jwtplus.fresh_login_required
    async def password(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    sm = manager()
    client = await make_client(app=wired_app("setup", routes, sm))
    for fresh, status in ((True, 200), (False, 401), ("true", 401), (1, 401), (None, 401)):
        claims = {"username": "ann"} if fresh is None else {"username": "ann", "fresh": fresh}
        assert (await client.post("/password", headers=bearer(sm.encode(claims)))).status == status, fresh


def optional_routes(ran: list[str]) -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.get("/feed")
    @jwtplus.route_options(optional=True)
    async def feed(request: web.Request) -> web.Response:
        ran.append("feed")
        carry = request[jwtplus.AUTH_CARRY]
        return web.json_response(
            {"status": request[jwtplus.AUTH_STATUS], "user": carry and carry["username"]}
        )

    return routes


@pytest.mark.parametrize("whitelisted", [False, True])
async def test_an_optional_route_admits_no_token_but_never_a_bad_one(
    make_client: Any, whitelisted: bool
) -> None:
    ran: list[str] = []
    sm = manager()
    args = {"whitelist": ("/feed",)} if whitelisted else {"protected_apis": ("/feed",)}
    client = await make_client(app=wired_app("setup", optional_routes(ran), sm, **args))
    anonymous = await client.get("/feed")
    assert (anonymous.status, await anonymous.json()) == (200, {"status": "missing", "user": None})
    known = await client.get("/feed", headers=bearer(sm.encode({"username": "ann"})))
    assert (known.status, await known.json()) == (200, {"status": "pass", "user": "ann"})
    assert ran == ["feed", "feed"]
    for bad in (
        tampered(sm.encode({"username": "a"})),
        sm.encode({"username": "a"}, now=time.time() - 40 * 86400),
    ):
        refused = await client.get("/feed", headers=bearer(bad))
        assert (refused.status, refused.headers["WWW-Authenticate"]) == (401, 'Bearer error="invalid_token"')
    assert ran == ["feed", "feed"]


def test_decide_optional_routes() -> None:
    rules = RoutingRules(whitelist=("/open",), protected_apis=("/api",))
    for path in ("/open", "/api", "/page"):
        assert decide(rules, path, "GET", True, "missing", optional=True) is Action.HANDLER
        assert decide(rules, path, "POST", True, "pass", optional=True) is Action.HANDLER
        assert decide(rules, path, "GET", True, "invalid", optional=True) is Action.UNAUTHORIZED
        assert decide(rules, path, "GET", True, "expired", optional=True) is Action.UNAUTHORIZED
        assert decide(rules, path, "GET", True, "rejected", optional=True) is Action.FORBIDDEN
        assert decide(rules, path, "GET", True, "unavailable", optional=True) is Action.UNAVAILABLE
        assert decide(rules, path, "GET", True, "malformed", optional=True) is Action.BAD_REQUEST
    assert decide(rules, "/api", "GET", True, "missing") is Action.UNAUTHORIZED


async def test_a_websocket_route_can_take_its_token_from_the_query_alone(make_client: Any) -> None:
    routes = web.RouteTableDef()

    @routes.get("/ws")
    @jwtplus.route_options(locations=("query",))
    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json(
            {"user": request[jwtplus.AUTH_CARRY]["username"], "source": request[jwtplus.TOKEN_SOURCE]}
        )
        await ws.close()
        return ws

    @routes.get("/api")
    async def api(request: web.Request) -> web.Response:
        return web.json_response({"source": request[jwtplus.TOKEN_SOURCE]})

    sm = manager()
    client = await make_client(app=wired_app("setup", routes, sm, protected_apis=("/.*",)))
    token = sm.encode({"username": "ann"})
    async with client.ws_connect(f"/ws?access_token={token}") as ws:
        assert await ws.receive_json() == {"user": "ann", "source": "query"}
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws", headers=bearer(token))
    assert refused.value.status == 401
    assert (await client.get(f"/api?access_token={token}")).status == 401  # elsewhere, no query tokens
    assert (await client.get("/api", headers=bearer(token))).status == 200


async def test_a_refresh_route_reads_the_refresh_cookie_and_body_and_every_location_given(
    make_client: Any,
) -> None:
    routes = web.RouteTableDef()

    @routes.route("*", "/renew")
    @jwtplus.route_options(token_type="refresh", locations=("cookie", "body"))
    async def renew(request: web.Request) -> web.Response:
        return web.json_response({"source": request[jwtplus.TOKEN_SOURCE]})

    @routes.get("/either")
    @jwtplus.route_options(locations=("header", "query"))
    async def either(request: web.Request) -> web.Response:
        return web.json_response({"source": request[jwtplus.TOKEN_SOURCE]})

    sessions = sessions_for()
    client = await make_client(app=wired_app("setup", routes, sessions.manager, protected_apis=("/.*",)))
    pair = await jwtplus.issue_tokens(sessions, "ann", {"username": "ann"})
    by_body = await client.post("/renew", json={"refresh_token": pair.refresh})
    assert (by_body.status, await by_body.json()) == (200, {"source": "body"})
    cookie = {"Cookie": f"__Host-refresh_token={pair.refresh}", "X-CSRF-Token": pair.csrf}
    by_cookie = await client.post("/renew", headers=cookie)
    assert (by_cookie.status, await by_cookie.json()) == (200, {"source": "cookie"})
    assert (
        await client.post("/renew", headers={"Cookie": f"__Host-refresh_token={pair.refresh}"})
    ).status == 403
    assert (await client.post("/renew", json={"access_token": pair.refresh})).status == 401
    assert (await client.post("/renew", headers=bearer(pair.refresh))).status == 401  # not a location here
    query = await client.get(f"/either?access_token={pair.access}")
    assert (query.status, await query.json()) == (200, {"source": "query"})
    header = await client.get("/either", headers=bearer(pair.access))
    assert (header.status, await header.json()) == (200, {"source": "header"})


async def test_a_refresh_route_without_locations_takes_the_header_the_refresh_cookie_or_the_body(
    make_client: Any,
) -> None:
    routes = web.RouteTableDef()

    @routes.post("/renew")
    @jwtplus.route_options(token_type="refresh")
    async def renew(request: web.Request) -> web.Response:
        return web.json_response({"source": request[jwtplus.TOKEN_SOURCE]})

    sessions = sessions_for()
    client = await make_client(app=wired_app("seed pair", routes, sessions.manager))
    pair = await jwtplus.issue_tokens(sessions, "ann", {"username": "ann"})
    cookie = {"Cookie": f"__Host-refresh_token={pair.refresh}", "X-CSRF-Token": pair.csrf}
    for kwargs, source in (
        ({"headers": bearer(pair.refresh)}, "header"),
        ({"json": {"refresh_token": pair.refresh}}, "body"),
        ({"headers": cookie}, "cookie"),
    ):
        answer = await client.post("/renew", **kwargs)
        assert (answer.status, await answer.json()) == (200, {"source": source})
    assert (await client.post("/renew", headers=bearer(pair.access))).status == 401


async def test_a_guarded_route_uses_the_apps_own_token_getter(make_client: Any) -> None:
    routes = web.RouteTableDef()

    @routes.get("/mine")
    @jwtplus.login_required
    async def mine(request: web.Request) -> web.Response:
        return web.json_response({"source": request.get(jwtplus.TOKEN_SOURCE, "custom")})

    def x_token(request: web.Request) -> str | None:
        return request.headers.get("X-Token")

    sm = manager()
    client = await make_client(app=wired_app("setup", routes, sm, token_getter=x_token))
    token = sm.encode({"username": "ann"})
    assert (await client.get("/mine", headers={"X-Token": token})).status == 200
    assert (await client.get("/mine", headers=bearer(token))).status == 401  # not where this app looks


async def test_a_guard_whose_predicate_raises_refuses_without_a_500(
    make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    routes = web.RouteTableDef()

    @routes.get("/team")
    @jwtplus.require(lambda claims: claims["team"] == "red")
    async def team(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    sm = manager()
    client = await make_client(app=wired_app("seed pair", routes, sm))
    assert (await client.get("/team", headers=bearer(sm.encode({"username": "ann"})))).status == 403
    assert "predicate raised" in caplog.text
    assert (
        await client.get("/team", headers=bearer(sm.encode({"username": "a", "team": "red"})))
    ).status == 200


async def test_a_route_can_want_a_refresh_token(make_client: Any) -> None:
    routes = web.RouteTableDef()

    @routes.post("/exchange")
    @jwtplus.route_options(token_type="refresh", locations=("header",))
    async def exchange(request: web.Request) -> web.Response:
        return web.json_response({"type": request[jwtplus.AUTH_CLAIMS]["type"]})

    sm = manager()
    client = await make_client(app=wired_app("seed pair", routes, sm))
    access = sm.encode({"username": "ann", "type": "access"})
    refresh = sm.encode({"username": "ann", "type": "refresh"})
    assert (await client.post("/exchange", headers=bearer(access))).status == 401
    ok = await client.post("/exchange", headers=bearer(refresh))
    assert (ok.status, await ok.json()) == (200, {"type": "refresh"})
    assert jwtplus.RoutePolicy(token_type="refresh").token_type == "refresh"


async def test_require_user_sees_what_the_identifier_loaded(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sm, asked = manager(), []
    users = {"u-1": {"name": "ann", "role": "admin"}, "u-2": {"name": "bob", "role": "user"}}

    async def load_user(claims: dict[str, Any]) -> dict[str, str] | None:
        return users.get(claims.get("sub", ""))

    async def is_admin(user: dict[str, str]) -> bool:
        asked.append(user["name"])
        return user["role"] == "admin"  # from the database, not from the token

    @jwtplus.require_user(is_admin)
    async def admin(request: web.Request) -> web.Response:
        return web.json_response({"admin": jwtplus.get_auth_carry(request)["name"]})

    app = web.Application(
        middlewares=[
            jwtplus.jwt_middleware(
                manager=sm, rules=RoutingRules(protected_apis=("/.*",)), identifier=load_user
            )
        ]
    )
    app.router.add_get("/admin", admin)
    client = await aiohttp_client(app)
    ok = await client.get("/admin", headers=bearer(sm.encode({"sub": "u-1", "role": "user"})))
    assert (ok.status, await ok.json()) == (200, {"admin": "ann"})
    caplog.set_level(logging.INFO, logger="jwtplus")
    no = await client.get("/admin", headers=bearer(sm.encode({"sub": "u-2", "role": "admin"})))
    assert "with 403: forbidden (is_admin)" in refusal_lines(caplog)[0]
    assert (no.status, no.headers["WWW-Authenticate"]) == (403, 'Bearer error="insufficient_scope"')
    assert (await client.get("/admin", headers=bearer(sm.encode({"sub": "u-3"})))).status == 403
    assert asked == ["ann", "bob"]  # never asked about a user the identifier did not load
    with pytest.raises(TypeError, match="require_user"):
        jwtplus.require_user("admin")  # type: ignore[arg-type]


# ---- WebSockets: sessions that end on time ----


@dataclass
class Clock:
    """The servers' clock: real time plus an offset a test moves forward instead of sleeping."""

    offset: float = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def live_socket_app(
    sessions: jwtplus.Sessions, clock: Clock, received: list[str], *, recheck: float = 0.05
) -> web.Application:
    """/ws echoes through ``authenticated_messages``; /q is the same socket with a query-string token."""

    async def echo(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        async for message in jwtplus.authenticated_messages(request, socket, recheck=recheck):
            received.append(message.data)
            await socket.send_str("echo " + message.data)
        return socket

    app = web.Application(
        middlewares=[
            jwtplus.jwt_middleware(
                manager=sessions.manager,
                rules=RoutingRules(protected_apis=("/.*",)),
                identifier=jwtplus.subject_identifier,
                checks=(jwtplus.revocation_check(sessions),),
                clock=clock,
            )
        ]
    )

    @jwtplus.route_options(locations=("query",))
    async def echo_query(request: web.Request) -> web.WebSocketResponse:
        return await echo(request)

    app.router.add_get("/ws", echo)
    app.router.add_get("/q", echo_query)
    return app


async def socket_pair(
    sessions: jwtplus.Sessions, subject: str = "user-1"
) -> tuple[jwtplus.TokenPair, dict[str, str]]:
    pair = await jwtplus.issue_tokens(sessions, subject, {"username": "ann"})
    return pair, bearer(pair.access)


async def closed(ws: aiohttp.ClientWebSocketResponse, within: float = 5.0) -> tuple[int | None, str]:
    """Read until the server closes *ws*: its close code and reason."""
    while True:
        message = await ws.receive(timeout=within)
        if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            return ws.close_code, message.extra or ""


async def test_a_socket_handshake_is_authenticated_like_any_request(make_client: Any) -> None:
    sessions, received = sessions_for(), []
    client = await make_client(app=live_socket_app(sessions, Clock(), received))
    pair, headers = await socket_pair(sessions)
    for attempt in ({}, bearer("not-a-token"), {"Authorization": "Basic " + pair.access}):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect("/ws", headers=attempt)
        assert refused.value.status == 401
    ws = await client.ws_connect("/ws", headers=headers)
    await ws.send_str("hello")
    assert (await ws.receive()).data == "echo hello"
    await ws.close()
    assert received == ["hello"]


async def test_the_query_string_token_works_on_the_route_that_allows_it_only(make_client: Any) -> None:
    sessions = sessions_for()
    client = await make_client(app=live_socket_app(sessions, Clock(), []))
    pair, _ = await socket_pair(sessions)
    ws = await client.ws_connect("/q", params={"access_token": pair.access})
    await ws.send_str("x")
    assert (await ws.receive()).data == "echo x"
    await ws.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws", params={"access_token": pair.access})
    assert refused.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as header_there:
        await client.ws_connect("/q", headers=bearer(pair.access))
    assert header_there.value.status == 401


async def test_a_socket_closes_with_4401_when_its_token_expires(make_client: Any) -> None:
    sessions, clock = sessions_for(access_exptime="10m"), Clock()
    client = await make_client(app=live_socket_app(sessions, clock, []))
    _, headers = await socket_pair(sessions)
    ws = await client.ws_connect("/ws", headers=headers)
    clock.offset = 9 * 60  # still valid: the socket stays open
    await asyncio.sleep(0.2)
    await ws.send_str("still here")
    assert (await ws.receive()).data == "echo still here"
    clock.offset = 10 * 60 + 1
    assert await closed(ws, within=2) == (jwtplus.SOCKET_REFUSED, "token expired")


async def test_a_socket_closes_when_its_session_ends_elsewhere(make_client: Any) -> None:
    sessions = sessions_for()
    client = await make_client(app=live_socket_app(sessions, Clock(), []))
    pair, headers = await socket_pair(sessions)
    other, other_headers = await socket_pair(sessions, "user-2")
    ws, bystander = (
        await client.ws_connect("/ws", headers=headers),
        await client.ws_connect("/ws", headers=other_headers),
    )
    await jwtplus.revoke_family(sessions, pair.family)
    assert await closed(ws, within=2) == (jwtplus.SOCKET_REFUSED, "token refused")
    await bystander.send_str("unaffected")
    assert (await bystander.receive()).data == "echo unaffected"
    await jwtplus.revoke_subject(sessions, "user-2")  # log out everywhere
    assert await closed(bystander, within=2) == (jwtplus.SOCKET_REFUSED, "token refused")
    assert other.family != pair.family


async def test_a_fresh_token_over_the_open_socket_keeps_it_alive(make_client: Any) -> None:
    sessions, clock, received = sessions_for(access_exptime="10m"), Clock(), []
    client = await make_client(app=live_socket_app(sessions, clock, received))
    pair, headers = await socket_pair(sessions)
    ws = await client.ws_connect("/ws", headers=headers)
    clock.offset = 9 * 60
    fresh = await jwtplus.refresh_session(refresh_request(pair.refresh), sessions, now=clock())
    await ws.send_json({"type": "authenticate", "token": fresh.access})
    answer = await ws.receive_json()
    assert answer == {
        "type": "authenticated",
        "exp": sessions.manager.decode(fresh.access, now=clock())["exp"],
    }
    clock.offset = 15 * 60  # the first token is long expired; the fresh one holds
    await asyncio.sleep(0.2)
    await ws.send_str("renewed")
    assert (await ws.receive()).data == "echo renewed"
    assert received == ["renewed"]  # the authenticate message was never the handler's
    clock.offset = 19 * 60 + 1
    assert await closed(ws, within=2) == (jwtplus.SOCKET_REFUSED, "token expired")


async def test_a_bad_reauthentication_closes_the_socket(make_client: Any) -> None:
    sessions, clock = sessions_for(), Clock()
    client = await make_client(app=live_socket_app(sessions, clock, []))
    forged = SecretManager(secret=b"f" * 64).encode({"sub": "user-1", "type": "access"})
    other, _ = await socket_pair(sessions, "user-2")
    pair, headers = await socket_pair(sessions)
    expired = sessions.manager.encode({"sub": "user-1", "type": "access", "exp": int(time.time()) - 60})
    for token, reason in (
        (forged, "token refused"),
        (other.access, "token refused"),  # another user's token cannot take over the socket
        (pair.refresh, "token refused"),  # a refresh token is never an access token
        (expired, "token expired"),
        ("", "token refused"),
        (42, "token refused"),
    ):
        ws = await client.ws_connect("/ws", headers=headers)
        await ws.send_json({"type": "authenticate", "token": token})
        assert await closed(ws) == (jwtplus.SOCKET_REFUSED, reason), token


async def test_other_messages_pass_through_and_no_timer_runs_per_message(make_client: Any) -> None:
    sessions, received = sessions_for(), []
    client = await make_client(app=live_socket_app(sessions, Clock(), received, recheck=30))
    _, headers = await socket_pair(sessions)
    ws = await client.ws_connect("/ws", headers=headers)
    await ws.send_str("warm up")
    await ws.receive()
    tasks = len(asyncio.all_tasks())
    texts = ['{"type": "chat", "text": "\\"authenticate\\""}', '"authenticate"', "{not json", "plain"] * 50
    for text in texts:
        await ws.send_str(text)
        assert (await ws.receive()).data == "echo " + text
        assert len(asyncio.all_tasks()) == tasks
    await ws.close()
    assert received[1:201] == texts


async def test_a_socket_closes_with_1013_when_its_token_cannot_be_checked(make_client: Any) -> None:
    outage = Outage()
    sessions = sessions_for(store=failing_store(outage, jwtplus.memory_store()))
    client = await make_client(app=live_socket_app(sessions, Clock(), []))
    _, headers = await socket_pair(sessions)
    ws = await client.ws_connect("/ws", headers=headers)
    outage.down = True
    assert await closed(ws, within=2) == (jwtplus.SOCKET_UNAVAILABLE, "try again later")


async def test_a_socket_cannot_be_renewed_without_a_subject_nor_by_another_user(aiohttp_client: Any) -> None:
    sm = manager(exptime="1h")

    async def echo(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        async for message in jwtplus.authenticated_messages(request, socket):
            await socket.send_str(request[jwtplus.AUTH_CARRY]["username"] + ":" + message.data)
        return socket

    app = web.Application(middlewares=[jwtplus.jwt_middleware(manager=sm, rules=RoutingRules())])
    app.router.add_get("/ws", echo)  # basic_identifier: tokens with a username and no sub
    client = await aiohttp_client(app)
    for token in (sm.encode({"username": "mallory"}), sm.encode({"username": "ann"})):
        ws = await client.ws_connect("/ws", headers=bearer(sm.encode({"username": "ann"})))
        await ws.send_json({"type": "authenticate", "token": token})
        assert await closed(ws) == (jwtplus.SOCKET_REFUSED, "token refused")


async def test_a_renewal_with_a_shorter_token_closes_the_socket_when_that_token_ends(
    make_client: Any,
) -> None:
    sessions = sessions_for(access_exptime="10m")
    client = await make_client(app=live_socket_app(sessions, Clock(), [], recheck=30))
    pair, headers = await socket_pair(sessions)
    ws = await client.ws_connect("/ws", headers=headers)
    short = sessions.manager.encode({**sessions.manager.decode(pair.access), "exp": int(time.time()) + 1})
    await ws.send_json({"type": "authenticate", "token": short})
    assert (await ws.receive_json())["type"] == "authenticated"
    started = time.monotonic()
    assert await closed(ws, within=5) == (jwtplus.SOCKET_REFUSED, "token expired")
    assert time.monotonic() - started < 3  # not the 30 s recheck


async def test_a_deeply_nested_message_is_the_handlers_and_keeps_the_socket(make_client: Any) -> None:
    sessions, received = sessions_for(), []
    client = await make_client(app=live_socket_app(sessions, Clock(), received))
    _, headers = await socket_pair(sessions)
    ws = await client.ws_connect("/ws", headers=headers)
    deep = '{"type": "authenticate", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    await ws.send_str(deep)
    assert (await ws.receive()).data == "echo " + deep
    assert received == [deep]


async def test_a_recheck_that_is_not_positive_is_refused(aiohttp_client: Any) -> None:
    sm = manager()

    async def echo(request: web.Request) -> web.StreamResponse:
        socket = web.WebSocketResponse()
        try:
            async for _ in jwtplus.authenticated_messages(request, socket, recheck=0):
                pass
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=500)
        return socket

    app = web.Application(middlewares=[jwtplus.jwt_middleware(manager=sm, rules=RoutingRules())])
    app.router.add_get("/ws", echo)
    client = await aiohttp_client(app)
    answer = await client.get("/ws", headers=bearer(sm.encode({"username": "ann", "sub": "u"})))
    assert answer.status == 500
    assert "recheck=0 must be positive" in (await answer.json())["error"]


async def test_a_socket_on_an_optional_route_without_a_token_is_closed_at_once(aiohttp_client: Any) -> None:
    sm = manager()

    @jwtplus.route_options(optional=True)
    async def echo(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        async for message in jwtplus.authenticated_messages(request, socket):
            await socket.send_str(message.data)
        return socket

    app = web.Application(middlewares=[jwtplus.jwt_middleware(manager=sm, rules=RoutingRules())])
    app.router.add_get("/ws", echo)
    client = await aiohttp_client(app)
    ws = await client.ws_connect("/ws")  # the route lets it in; the helper does not
    assert await closed(ws) == (jwtplus.SOCKET_REFUSED, "token refused")


async def test_after_a_renewal_the_watcher_waits_again(aiohttp_client: Any) -> None:
    sm, judged = manager(exptime="1h"), []

    def counting(request: web.Request, claims: dict[str, Any], now: float) -> None:
        judged.append(now)

    async def echo(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        async for message in jwtplus.authenticated_messages(request, socket, recheck=30):
            await socket.send_str(message.data)
        return socket

    middleware = jwtplus.jwt_middleware(
        manager=sm, rules=RoutingRules(), identifier=jwtplus.subject_identifier, checks=(counting,)
    )
    app = web.Application(middlewares=[middleware])
    app.router.add_get("/ws", echo)
    client = await aiohttp_client(app)
    ws = await client.ws_connect("/ws", headers=bearer(sm.encode({"sub": "ann"})))
    await ws.send_json({"type": "authenticate", "token": sm.encode({"sub": "ann"})})
    assert (await ws.receive_json())["type"] == "authenticated"
    await asyncio.sleep(0.3)
    await ws.close()
    assert len(judged) <= 4  # the handshake, the renewal, and one recheck it wakes: no busy loop


async def test_the_socket_helper_needs_the_middleware(aiohttp_client: Any) -> None:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        try:
            async for _ in jwtplus.authenticated_messages(request, socket):
                pass
        except RuntimeError as exc:
            return web.json_response({"error": str(exc)}, status=500)  # type: ignore[return-value]
        return socket

    app = web.Application()
    app.router.add_get("/ws", echo)
    client = await aiohttp_client(app)
    answer = await client.get("/ws")
    assert answer.status == 500
    assert "jwtplus" in (await answer.json())["error"]


# ---- The whole stack under hypothesis ----
#
# Real aiohttp apps (an SPA table and API-only ones; rotation on and off; sessions on and off, with a
# store that fails on demand; cookies on and off; a guarded admin route, a WebSocket route that reads
# the query, a preflight route, refresh and logout session routes) get random raw requests: paths
# spelled every way, every method, Authorization, Cookie, X-CSRF-Token, Origin, Sec-Fetch-Site and
# Upgrade headers, and bodies, with tokens of every kind minted afresh for each example. On every
# example: no 5xx but a deliberate 503 while the store is down; no private handler without a valid
# token where its route reads one (nor, from a cookie, without passing the CSRF test; nor the admin
# handler without role admin); no refresh or logout without the token it needs; and no token, CSRF
# value, secret or key in a response or a log line.

_T = TypeVar("_T")


async def resolved(value: _T | Awaitable[_T]) -> _T:
    """issue_tokens and start_session are becoming coroutines: await what they return when it is awaitable."""
    return await value if inspect.isawaitable(value) else value


# -- The apps --

FUZZ_WHITELIST = ("/public/.*", "/static/.*")
FUZZ_PROTECTED = ("/api/.*",)
WHITELISTED = {"public", "static"}
OPEN = {*WHITELISTED, "login page", "refresh", "logout"}
"""Handlers that may run without a token ("refresh" and "logout" are recorded only when they succeed)."""
TOKEN_COOKIE, CSRF_COOKIE, REFRESH_COOKIE = COOKIES.token_cookie, COOKIES.csrf_cookie, COOKIES.refresh_cookie
OWN_ORIGINS = ("http://test", "https://test")  # raw_request sends Host: test
SAFE = {"GET", "HEAD", "OPTIONS", "TRACE"}
BODY_503 = b'{"error":"unavailable"}'


@dataclass(frozen=True)
class Variant:
    name: str
    spa: bool
    rotation: bool
    sessions: bool
    cookies: bool
    broken: str = ""
    """For the tests that show the fuzz has teeth: "no jwtplus", "lying getter" or "no revocation"."""


VARIANTS = [
    Variant("spa, rotating, sessions with a failing store, cookies", True, True, True, True),
    Variant("api, plain, header only", False, False, False, False),
    Variant("api, plain, sessions with a failing store, cookies", False, False, True, True),
    Variant("spa, rotating, cookies", True, True, False, True),
]


@dataclass
class Outage:
    down: bool = False


def failing_store(outage: Outage, inner: jwtplus.RevocationStore) -> jwtplus.RevocationStore:
    """*inner*, but every operation raises ConnectionError while the outage lasts."""

    def up() -> None:
        if outage.down:
            raise ConnectionError("store is down")

    async def put(key: str, value: float, until: float, now: float) -> None:
        up()
        await inner.put(key, value, until, now)

    async def get_many(keys: Any, now: float) -> list[float | None]:
        up()
        return await inner.get_many(keys, now)

    async def consume(key: str, value: float, until: float, now: float) -> float | None:
        up()
        return await inner.consume(key, value, until, now)

    return jwtplus.RevocationStore(put, get_many, consume)


@dataclass(repr=False)
class Stack:
    """One served app, its event loop, and what the fuzz needs to mint tokens for it."""

    variant: Variant
    loop: asyncio.AbstractEventLoop
    manager: jwtplus.SecretManager
    foreign: jwtplus.SecretManager  # another 64-byte secret
    other_rotation: jwtplus.SecretManager  # the same secret, rotating where the app does not (or the reverse)
    sessions: jwtplus.Sessions | None
    store: jwtplus.RevocationStore  # the store behind the outage, to read what a request revoked
    outage: Outage
    client: TestClient[Any, Any] | None = None
    subjects: Iterator[int] = field(default_factory=itertools.count)

    def __repr__(self) -> str:  # hypothesis prints a failing example's fixtures: no secrets there
        return f"Stack({self.variant.name!r})"

    def run(self, coro: Awaitable[_T]) -> _T:
        return self.loop.run_until_complete(coro)

    @property
    def hits(self) -> list[tuple[str, str]]:
        assert self.client is not None
        return self.client.server.app[HITS]  # type: ignore[no-any-return]


def lying_getter(request: web.Request) -> str | None:
    """A broken getter: it reads the token cookie but says the token came from a header (so no CSRF test)."""
    token = jwtplus.basic_token_getter(request) or request.cookies.get(TOKEN_COOKIE)
    if token:
        request[jwtplus.TOKEN_SOURCE] = "header"
    return token  # type: ignore[return-value]


def fuzz_app(stack: Stack) -> web.Application:
    variant, sessions = stack.variant, stack.sessions
    routes = web.RouteTableDef()
    routes.route("*", "/public/{tail:.*}")(marker("public"))
    routes.route("*", "/static/{tail:.*}")(marker("static"))
    routes.route("*", "/api/admin")(jwtplus.require_claims(role="admin")(marker("admin")))
    routes.route("OPTIONS", "/api/cors")(marker("cors"))
    routes.route("*", "/api/{name}")(marker("api"))
    routes.route("*", "/admin")(marker("admin page"))
    routes.route("*", "/{user}/settings")(marker("settings"))
    routes.route("*", "/index.html")(marker("index"))
    routes.route("*", "/login.html")(marker("login route"))
    routes.get("/ws")(jwtplus.route_options(locations=("query",))(marker("ws")))
    if sessions is not None:

        @routes.post("/auth/refresh")
        @jwtplus.session_route
        async def refresh(request: web.Request) -> web.Response:
            pair = await jwtplus.refresh_session(request, sessions, cookies=COOKIES)
            request.app[HITS].append(("refresh", request.rel_url.path_safe))
            response = web.json_response({"ok": True})
            jwtplus.set_session_cookies(response, sessions, pair, cookies=COOKIES)
            return response

        @routes.route("*", "/auth/logout")
        @jwtplus.session_route
        async def logout(request: web.Request) -> web.Response:
            await jwtplus.end_session(request, sessions, cookies=COOKIES)
            request.app[HITS].append(("logout", request.rel_url.path_safe))
            response = web.json_response({"ok": True})
            jwtplus.clear_login_cookies(response, cookies=COOKIES)
            return response

    pages: dict[str, Any] = {}
    if variant.spa:
        pages = {
            "unauthorized_return_route": "/login.html",
            "unauthorized_return_route_handler": marker("login page"),
            "authorized_return_page_handler": marker("app page"),
        }
    helper = jwtplus.JWTHelper(
        secret_manager=stack.manager,
        sessions=None if variant.broken == "no revocation" else sessions,
        cookies=COOKIES if variant.cookies else None,
        token_getter=lying_getter if variant.broken == "lying getter" else None,
        whitelist=FUZZ_WHITELIST,
        protected_apis=FUZZ_PROTECTED,
        **pages,
    )
    app = web.Application()
    if variant.broken != "no jwtplus":
        jwtplus.setup(app, helper)
    app[HITS] = []
    app.add_routes(routes)
    return app


async def started(app: web.Application) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    return client


@contextlib.contextmanager
def served(variant: Variant) -> Iterator[Stack]:
    """Serve *variant*'s app on an event loop of its own, for a sync hypothesis test to drive."""
    rotation = 1 if variant.rotation else 0
    sm = jwtplus.SecretManager(secret=SECRET, refresh_interval=rotation, exptime="1h")
    outage, inner = Outage(), jwtplus.memory_store()
    sessions = None
    if variant.sessions:
        sessions = jwtplus.Sessions(manager=sm, store=failing_store(outage, inner), refresh_exptime="1h")
    loop = asyncio.new_event_loop()
    stack = Stack(
        variant,
        loop,
        sm,
        jwtplus.SecretManager(secret=OTHER_SECRET, refresh_interval=rotation, exptime="1h"),
        jwtplus.SecretManager(secret=SECRET, refresh_interval=1 - rotation, exptime="1h"),
        sessions,
        inner,
        outage,
    )
    try:
        stack.client = stack.run(started(fuzz_app(stack)))
        yield stack
    finally:
        if stack.client is not None:
            stack.run(stack.client.close())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


# -- The requests --

GOOD = {"valid", "valid2", "admin"}
"""Access tokens that pass: of the app's secret and rotation, unexpired, unrevoked, with a username."""
KINDS = (*GOOD, "refresh", "expired", "tampered", "foreign", "anonymous", "future", "alg", "other rotation")
SESSION_KINDS = ("revoked", "revoked refresh")
TOKEN_COOKIE_NAMES = [TOKEN_COOKIE, TOKEN_COOKIE, REFRESH_COOKIE, "access_token", "__Secure-access_token"]
CSRF_REFS = tuple(f"csrf:{kind}" for kind in sorted(GOOD))
FOREIGN_ORIGINS = ((1, "http://evil.example"), (1, "null"), (1, "http://test:8080"))
FETCH_SITES = ("same-origin", "same-origin", "same-site", "cross-site", "none")
AUTHORIZATIONS = {  # template: whether header_token_getter reads the token out of it
    "Bearer {token}": True,
    "bearer {token}": True,
    "BEARER   {token}": True,
    " Bearer {token} ": True,
    "Bearer\t{token}": False,
    "Basic {token}": False,
    "Bearer {token} {token}": False,
    "{token}": False,
}
REFRESH_JSON = ("application/json", '{"refresh_token": "{token}"}')
BODIES = [
    REFRESH_JSON,
    ("application/json", '{"access_token": "{token}"}'),
    ("application/json", '["{token}"'),
    ("application/x-www-form-urlencoded", "refresh_token={token}"),
    ("text/plain", "{token}"),
]
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND", "get"]
ROUTE_PATHS = [
    "/", "/api/x", "/api/admin", "/api/cors", "/admin", "/ann/settings", "/ws", "/auth/refresh",
    "/auth/logout", "/login.html", "/index.html", "/public/x", "/static/app.js", "/nope",
]  # fmt: skip
PREFIXES = ["", "", "/", "/.", "/public/..", "/static/%2e%2e", "/public%2F..", "/public/x/..%2F..", "/%2e"]
SUFFIXES = ["", "", "/", "/.", "/..", "%0a", "%2F", "%2F..%2F..%2Fapi%2Fx", "/%2e%2e/api/x", ";x", "#x", "?x"]
UNICODE = st.text(st.characters(min_codepoint=0xA0, exclude_categories=("Cs",)), min_size=1, max_size=3)
NAMED_SEGMENTS = st.sampled_from([*PATH_SEGMENTS, "ws", "auth", "refresh", "logout", "login.html", "%C3%A9"])
SEGMENTS = st.one_of(*[NAMED_SEGMENTS] * 6, UNICODE.map(urllib.parse.quote), UNICODE)  # raw: aiohttp's 400
GARBAGE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40) | (
    st.from_regex(r"[A-Za-z0-9_-]{1,30}\.[A-Za-z0-9_-]{1,30}\.[A-Za-z0-9_-]{0,30}", fullmatch=True)
)


@dataclass(frozen=True)
class Fuzzed:
    """One request, naming token kinds rather than tokens: the tokens are minted afresh for each example."""

    method: str
    target: str
    query: str | None  # the kind of token sent as ?access_token=
    authorization: tuple[str, str] | None  # (template, kind)
    cookies: tuple[tuple[str, str, bool], ...]  # (name, kind or "csrf:<kind>", quoted)
    csrf: str | None  # X-CSRF-Token: "csrf:<kind>", or a literal
    origin: str | None
    fetch_site: str | None
    upgrade: bool
    preflight: bool
    body: tuple[str, str, str] | None  # (content type, template, kind)
    garbage: str
    store_down: bool


def weighted(*choices: tuple[int, Any]) -> st.SearchStrategy[Any]:
    """sampled_from, each choice *weight* times."""
    return st.sampled_from([value for weight, value in choices for _ in range(weight)])


METHOD_CHOICES = weighted((3, "GET"), (4, "POST"), *((1, method) for method in METHODS[2:]))
PARSED = [template for template, parsed in AUTHORIZATIONS.items() if parsed]
UNPARSED = [template for template, parsed in AUTHORIZATIONS.items() if not parsed]
TEMPLATES = weighted((6, PARSED[0]), *((1, t) for t in PARSED[1:]), *((1, t) for t in UNPARSED))
TARGETS = st.one_of(
    st.sampled_from(ROUTE_PATHS),
    st.sampled_from(ROUTE_PATHS),
    st.builds(lambda *parts: "".join(parts), *map(st.sampled_from, (PREFIXES, ROUTE_PATHS, SUFFIXES))),
    RAW_PATHS,
    st.lists(SEGMENTS, max_size=5).map(lambda segments: "/" + "/".join(segments)),
)


@functools.cache
def fuzzed_requests(variant: Variant) -> st.SearchStrategy[Fuzzed]:
    """Requests around one main token, placed where some route reads it, with other tokens as noise."""
    bad = [*KINDS[len(GOOD) + 1 :], "garbage", *(SESSION_KINDS if variant.sessions else ())]
    kinds = weighted((8, "valid"), (4, "admin"), (1, "valid2"), (2, "refresh"), *((1, kind) for kind in bad))
    in_cookie = 4 if variant.cookies else 0
    places = weighted(
        (6 - in_cookie, "header"), (in_cookie, "cookie"), (1, "query"), (1, "body"), (1, "nowhere")
    )
    noise = st.tuples(st.sampled_from(TOKEN_COOKIE_NAMES), kinds, st.booleans()) | st.tuples(
        st.just(CSRF_COOKIE), st.sampled_from(CSRF_REFS), st.booleans()
    )
    rarely = functools.partial(weighted, (3, None))

    @st.composite
    def build(draw: st.DrawFn) -> Fuzzed:
        main, where = draw(kinds), draw(places)
        refreshing = main.endswith("refresh") and variant.sessions
        # the routes that read the main token where it is: the refresh and logout routes, the WebSocket
        routes = ["/auth/refresh", "/auth/logout"] if refreshing else ["/ws"] if where == "query" else []
        target = draw(st.sampled_from(routes * 2) | TARGETS if routes else TARGETS)
        method = draw(METHOD_CHOICES)
        if refreshing and draw(st.booleans()):
            method = "POST"
        cookies = []
        if where == "cookie":
            name = REFRESH_COOKIE if refreshing else draw(weighted((3, TOKEN_COOKIE), (1, REFRESH_COOKIE)))
            cookies.append((name, main, draw(st.booleans())))
            if draw(st.booleans()):  # as a browser would send it
                cookies.append((CSRF_COOKIE, f"csrf:{main}", False))
        cookies += draw(st.one_of(st.just([]), st.just([]), st.lists(noise, min_size=1, max_size=2)))
        echo = f"csrf:{main}" if where == "cookie" else draw(st.sampled_from(CSRF_REFS))
        authorization = draw(st.one_of(*[st.none()] * 4, st.tuples(TEMPLATES, kinds)))
        body = draw(rarely(*((1, body) for body in BODIES)))
        return Fuzzed(
            method=method,
            target=target,
            query=main if where == "query" else draw(rarely((1, "valid"), (1, "expired"))),
            authorization=(draw(TEMPLATES), main) if where == "header" else authorization,
            cookies=tuple(cookies),
            csrf=draw(weighted((1, None), (3, echo), (1, ""), (1, "nope"))),
            origin=draw(rarely((3, None), (2, OWN_ORIGINS[0]), (1, OWN_ORIGINS[1]), *FOREIGN_ORIGINS)),
            fetch_site=draw(rarely((3, None), *((1, site) for site in FETCH_SITES))),
            # a handshake has no body: aiohttp 3.14.0 drops the connection of an upgrade that carries one
            upgrade=draw(weighted((3, False), (1, True))) if body is None and where != "body" else False,
            preflight=draw(weighted((3, False), (1, True))),
            body=(*REFRESH_JSON, main) if where == "body" else None if body is None else (*body, draw(kinds)),
            garbage=draw(GARBAGE),
            store_down=draw(weighted((3, False), (1, True))) if variant.sessions else False,
        )

    return build()


@dataclass
class Minted:
    """One example's tokens by kind, their CSRF values and families, and the pieces never to be seen."""

    tokens: dict[str, str]
    csrf: dict[str, str]
    families: dict[str, str]
    secret_pieces: dict[str, set[str]] = field(default_factory=dict)
    """Every string never to be seen, with the kinds of token it is part of (none: a CSRF value or a key)."""

    def value(self, ref: str) -> str:
        if ref.startswith("csrf:"):
            return self.csrf.get(ref.removeprefix("csrf:"), "no csrf claim")
        return self.tokens.get(ref, ref)


async def mint(stack: Stack, fuzzed: Fuzzed) -> Minted:
    now, sm, sessions = time.time(), stack.manager, stack.sessions
    tokens: dict[str, str] = {}
    csrf: dict[str, str] = {}
    families: dict[str, str] = {}
    if sessions is not None:
        subject = f"user-{next(stack.subjects)}"
        for kind, role, at in (
            ("valid", "user", now),
            ("valid2", "user", now),
            ("admin", "admin", now),
            ("revoked", "user", now),
            ("expired", "user", now - 2 * HOUR),
        ):
            issued = jwtplus.issue_tokens(sessions, subject, {"username": "ann", "role": role}, now=at)
            pair = await resolved(issued)
            tokens[kind], csrf[kind], families[kind] = pair.access, pair.csrf, pair.family
            if kind == "valid":
                tokens["refresh"], csrf["refresh"], families["refresh"] = pair.refresh, pair.csrf, pair.family
            if kind == "revoked":
                tokens["revoked refresh"], csrf["revoked refresh"] = pair.refresh, pair.csrf
                await jwtplus.revoke_family(sessions, pair.family)
    else:
        for kind, role in (("valid", "user"), ("valid2", "user"), ("admin", "admin")):
            csrf[kind] = secrets.token_urlsafe(32)
            tokens[kind] = sm.encode({"username": "ann", "role": role, "csrf": csrf[kind]})
        csrf["refresh"] = csrf["valid"]
        tokens["refresh"] = sm.encode({"username": "ann", "type": "refresh", "csrf": csrf["valid"]})
        tokens["expired"] = sm.encode({"username": "ann", "csrf": csrf["valid"]}, now=now - 2 * HOUR)
    mine = {"username": "ann", "role": "admin", "csrf": csrf["valid"]}
    tokens["tampered"] = tampered(tokens["valid"])
    tokens["foreign"] = stack.foreign.encode(mine)
    tokens["anonymous"] = sm.encode({"role": "admin", "csrf": csrf["valid"]})
    tokens["future"] = sm.encode({**mine, "nbf": int(now) + HOUR})
    tokens["alg"] = forge(hdr(alg="HS512"), claims(now, **mine), digest=hashlib.sha512)
    tokens["other rotation"] = stack.other_rotation.encode(mine)
    for kind in tokens:
        csrf.setdefault(kind, csrf["valid"])  # the claim each token carries
    minted = Minted({**tokens, "garbage": fuzzed.garbage}, csrf, families)
    for kind, token in tokens.items():
        for piece in (token, *token.split(".")[1:]):  # the header segment is every token's
            minted.secret_pieces.setdefault(piece, set()).add(kind)
    minted.secret_pieces.update((value, set()) for value in csrf.values())
    keys = [SECRET, OTHER_SECRET]
    if sm.rotation_seconds:
        period = jwtplus.period_of(now, sm.rotation_seconds)
        keys += [jwtplus.key_for_period(sm, period + step) for step in (-1, 0, 1)]
    for key in keys:
        minted.secret_pieces.update(
            (piece, set()) for piece in (key.hex(), b64url(key), key.decode("latin-1"))
        )
    return minted


@dataclass(frozen=True)
class Sent:
    target: str
    query: str | None  # the kind of token the query carried, if it was sent
    headers: list[tuple[str, str]]
    raw: bytes  # raw_request's raw_headers: the body's headers, then the body but its last CRLF


def request_of(fuzzed: Fuzzed, minted: Minted) -> Sent:
    target, query = fuzzed.target, fuzzed.query
    # a query token only in a request line aiohttp parses: its parser echoes a bad line in its 400 and its log
    if query is not None and fuzzed.method != "get" and target.isascii() and target.isprintable():
        target += ("&" if "?" in target else "?") + "access_token=" + minted.value(query)
    else:
        query = None
    headers = []
    if fuzzed.authorization is not None:
        template, kind = fuzzed.authorization
        headers.append(("Authorization", template.replace("{token}", minted.value(kind))))
    if fuzzed.cookies:
        values = ((name, minted.value(ref), quoted) for name, ref, quoted in fuzzed.cookies)
        headers.append(("Cookie", "; ".join(f'{n}="{v}"' if q else f"{n}={v}" for n, v, q in values)))
    if fuzzed.csrf is not None:
        headers.append((COOKIES.csrf_header, minted.value(fuzzed.csrf)))
    if fuzzed.origin is not None:
        headers.append(("Origin", fuzzed.origin))
    if fuzzed.fetch_site is not None:
        headers.append(("Sec-Fetch-Site", fuzzed.fetch_site))
    if fuzzed.upgrade:
        headers += [("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")]
        headers.append(("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="))
    if fuzzed.preflight:
        headers.append(("Access-Control-Request-Method", "POST"))
    raw = b""
    if fuzzed.body is not None:
        content_type, template, kind = fuzzed.body
        body = template.replace("{token}", minted.value(kind)).encode() + b"\r\n"  # raw_request adds the CRLF
        raw = f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:-2]
    return Sent(target, query, headers, raw)


# -- The properties --


def header_kinds(fuzzed: Fuzzed) -> set[str]:
    """The kind of token the Authorization header carries, where header_token_getter can read it."""
    if fuzzed.authorization is None or not AUTHORIZATIONS[fuzzed.authorization[0]]:
        return set()
    return {fuzzed.authorization[1]}


def cookie_kinds(fuzzed: Fuzzed, name: str) -> set[str]:
    return {kind for cookie, kind, _ in fuzzed.cookies if cookie == name}


def origin_passes(fuzzed: Fuzzed) -> bool:
    """The Origin test of every cookie-borne request: none or our own, and one on a WebSocket handshake."""
    return fuzzed.origin in (OWN_ORIGINS if fuzzed.upgrade else (None, *OWN_ORIGINS))


def csrf_passes(fuzzed: Fuzzed, minted: Minted, kind: str) -> bool:
    """The CSRF test of an unsafe cookie-borne request with a token of *kind*: its csrf claim echoed,
    and no other site in Sec-Fetch-Site or Origin."""
    return (
        fuzzed.csrf is not None
        and minted.value(fuzzed.csrf) == minted.csrf.get(kind)
        and fuzzed.fetch_site in (None, "same-origin", "none")
        and origin_passes(fuzzed)
    )


def refusal(stack: Stack, fuzzed: Fuzzed, sent: Sent, minted: Minted, handler: str) -> str | None:
    """Why *handler* must not run for this request (None: it may)."""
    good = {"admin"} if handler == "admin" else GOOD
    in_header = header_kinds(fuzzed) & good
    if handler == "ws":
        carried = {sent.query} & good
    else:
        carried = in_header | (cookie_kinds(fuzzed, TOKEN_COOKIE) & good if stack.variant.cookies else set())
    if not carried:
        return "without a valid token" if handler != "admin" else "without a valid admin token"
    if fuzzed.store_down:
        return "while the store was down"
    from_cookie = handler != "ws" and not in_header
    if from_cookie and not origin_passes(fuzzed):
        return "on a cookie from another origin, or a WebSocket handshake without one"
    if from_cookie and fuzzed.method not in SAFE and not any(csrf_passes(fuzzed, minted, k) for k in carried):
        return "on a cookie without the CSRF test"
    return None


def refresh_refusal(fuzzed: Fuzzed, minted: Minted) -> str | None:
    """Why a refresh must not mint a pair for this request (None: it may)."""
    if fuzzed.store_down:
        return "while the store was down"
    in_body = fuzzed.body is not None and fuzzed.body[:2] == REFRESH_JSON and fuzzed.body[2] == "refresh"
    in_cookie = "refresh" in cookie_kinds(fuzzed, REFRESH_COOKIE) and csrf_passes(fuzzed, minted, "refresh")
    if "refresh" in header_kinds(fuzzed) or in_body or in_cookie:
        return None
    return "without a valid refresh token (CSRF-tested from its cookie)"


def logout_refusal(stack: Stack, fuzzed: Fuzzed, minted: Minted) -> str | None:
    """Why the request must not revoke the family of "valid" and "refresh" (None: it may)."""
    in_cookie = ("valid" in cookie_kinds(fuzzed, TOKEN_COOKIE) and csrf_passes(fuzzed, minted, "valid")) or (
        "refresh" in cookie_kinds(fuzzed, REFRESH_COOKIE) and csrf_passes(fuzzed, minted, "refresh")
    )
    in_body = fuzzed.body is not None and fuzzed.body[:2] == REFRESH_JSON and fuzzed.body[2] == "refresh"
    if header_kinds(fuzzed) & {"valid", "refresh"} or in_body or in_cookie:
        return None
    return "without a token of that family (CSRF-tested from a cookie)"


def whitelisted(path: str) -> bool:
    return all(any(re.fullmatch(p, r) for p in FUZZ_WHITELIST) for r in oracle_readings(path))


LOG_FORMAT = logging.Formatter("%(name)s %(levelname)s %(message)s")


def assert_nothing_leaks(sent: Sent, minted: Minted, reply: Reply, records: list[logging.LogRecord]) -> None:
    seen = [("the body", reply.body.decode("latin-1"), "")]
    seen += [("a response header", f"{name}: {value}", "") for name, value in reply.headers.items()]
    for record in records:
        # the access log writes the request line: a query token is there, as the README says
        exempt = sent.query if record.name == "aiohttp.access" and sent.query else ""
        seen.append((f"a log line of {record.name}", LOG_FORMAT.format(record), exempt))
    everything = "\n".join(text for _, text, _ in seen)
    for piece, kinds in minted.secret_pieces.items():
        if piece not in everything:
            continue
        for where, text, exempt in seen:
            if piece in text and exempt not in kinds:
                raise AssertionError(
                    f"{piece!r} ({', '.join(kinds) or 'a key or CSRF value'}) in {where}: {text!r}"
                )


def check_example(stack: Stack, fuzzed: Fuzzed, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="jwtplus")
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    hits, records = stack.hits, caplog.records
    hits.clear()
    minted = stack.run(mint(stack, fuzzed))
    sent = request_of(fuzzed, minted)
    logged = len(records)
    stack.outage.down = fuzzed.store_down
    try:
        client, method = stack.client, fuzzed.method
        reply = stack.run(
            raw_request(client, sent.target, method=method, headers=sent.headers, raw_headers=sent.raw)
        )
    finally:
        stack.outage.down = False
    ran = [name for name, _ in hits]
    event(f"{reply.status} {' '.join(ran) or 'no handler'}")
    if reply.status >= 500:
        assert (reply.status, fuzzed.store_down) == (503, True), reply
        assert reply.body == (b"" if fuzzed.method == "HEAD" else BODY_503), reply
    assert len(hits) <= 1, hits
    for name, path in hits:
        if name == "refresh":
            reason = refresh_refusal(fuzzed, minted)
            assert reason is None, f"a refresh minted a pair {reason}"
        elif (
            name == "cors" and fuzzed.method == "OPTIONS" and fuzzed.preflight
        ) or name in OPEN - WHITELISTED:
            pass
        elif name in WHITELISTED:
            reason = refusal(stack, fuzzed, sent, minted, name)
            assert reason is None or whitelisted(path), f"{name} ran for {path!r} {reason}"
        else:
            reason = refusal(stack, fuzzed, sent, minted, name)
            assert reason is None, f"{name} ran {reason}"
    if stack.sessions is not None:
        family = f"family:{minted.families['valid']}"
        if stack.run(stack.store.get_many([family], time.time()))[0] is not None:
            reason = logout_refusal(stack, fuzzed, minted)
            assert ran == ["logout"], f"{ran} revoked a family"
            assert reason is None, f"a logout revoked a family {reason}"
    assert_nothing_leaks(sent, minted, reply, records[logged:])


# -- The tests --

FUZZ_EXAMPLES = 600
TEETH_EXAMPLES = 1000  # generation stops at the first failure: a few dozen examples


@pytest.fixture(scope="module", params=VARIANTS, ids=[variant.name for variant in VARIANTS])
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    with served(request.param) as stack:
        yield stack


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_requests_to_the_whole_stack_run_no_handler_they_must_not_and_leak_nothing(
    stack: Stack, caplog: pytest.LogCaptureFixture, data: st.DataObject
) -> None:
    check_example(stack, data.draw(fuzzed_requests(stack.variant), label="request"), caplog)


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("no jwtplus", r"ran without a valid token|\(500,"),
        ("lying getter", "on a cookie (without the CSRF test|from another origin)"),
        ("no revocation", "ran without a valid token|ran while the store was down"),
    ],
)
def test_the_fuzz_finds_what_a_broken_stack_lets_through(
    caplog: pytest.LogCaptureFixture, broken: str, message: str
) -> None:
    with served(replace(VARIANTS[0], broken=broken)) as stack:

        @settings(
            max_examples=TEETH_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.generate],
            report_multiple_bugs=False,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(fuzzed=fuzzed_requests(stack.variant))
        def fuzz(fuzzed: Fuzzed) -> None:
            check_example(stack, fuzzed, caplog)

        with pytest.raises(AssertionError, match=message):
            fuzz()


# ==== Part III: aiohttp wiring and 0.2.0 compatibility ====

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


def test_show_request_info_prints_the_status_and_identity_never_a_secret(
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = manager().encode({"username": "ann"})
    request = _bare_request().clone(headers={"Authorization": f"Bearer {token}"})
    jwtplus.show_request_info(request)
    out = capsys.readouterr().out
    assert out == "GET / from None: auth_status=None identity=None\n"
    request[jwtplus.AUTH_STATUS] = "pass"
    for carry, identity in [
        ({"username": "ann", "csrf": "the-csrf-value", "jti": "the-jti", "fam": "the-fam"}, "'ann'"),
        ({"sub": "42", "csrf": "the-csrf-value", "jti": "the-jti", "fam": "the-fam"}, "'42'"),
        ({"role": "admin", "csrf": "the-csrf-value"}, "None"),
        ("ann", "'ann'"),
        (True, "None"),
    ]:
        request[jwtplus.AUTH_CARRY] = carry
        jwtplus.show_request_info(request)
        out = capsys.readouterr().out
        assert out == f"GET / from None: auth_status=pass identity={identity}\n"


def test_functools_composition_of_the_factories() -> None:
    sm = manager()
    identify = functools.partial(jwtplus.authentication_middleware, manager=sm)
    assert callable(identify(identifier=async_username))
    with pytest.raises(ValueError, match="login_page"):
        jwtplus.router_middleware(rules=SPA)


# ---- Testing your app ----


async def test_auth_headers_log_a_test_request_in_by_header_or_by_cookie(aiohttp_client: Any) -> None:
    sm, ran = manager(), []
    client = await aiohttp_client(cookie_app(sm, ran))
    by_header = jwtplus.auth_headers(sm, {"username": "ann"})
    assert set(by_header) == {"Authorization"} and by_header["Authorization"].startswith("Bearer ")
    assert await (await client.post("/api/thing", headers=by_header)).json() == {
        "source": "header",
        "status": "pass",
    }
    by_cookie = jwtplus.auth_headers(sm, {"username": "ann"}, cookies=COOKIES)
    assert set(by_cookie) == {"Cookie", "X-CSRF-Token"}
    assert await (await client.post("/api/thing", headers=by_cookie)).json() == {
        "source": "cookie",
        "status": "pass",
    }
    without_csrf = {"Cookie": by_cookie["Cookie"]}
    assert (await client.post("/api/thing", headers=without_csrf)).status == 403
    short = jwtplus.auth_headers(sm, {"username": "ann"}, now=time.time() - 120, expires_in=60)
    assert (await client.post("/api/thing", headers=short)).status == 401
    jwt_scheme = manager(scheme="JWT")
    assert jwtplus.auth_headers(jwt_scheme, {"sub": "a"})["Authorization"].startswith("JWT ")
    with pytest.raises(TypeError, match="cookies must be a CookiePolicy"):
        jwtplus.auth_headers(sm, {}, cookies={"name": "x"})  # type: ignore[arg-type]


# ---- Packaging ----


def wheel_contents(directory: Path) -> tuple[str, list[str], str]:
    """The one wheel in *directory*: its file name, its members, its METADATA."""
    (wheel,) = directory.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        return wheel.name, names, archive.read(metadata).decode()


def run_clean(*argv: str | Path, cwd: Path | None = None, timeout: float = 600) -> tuple[int, str]:
    """Run *argv* without this process's Python paths: its exit code and its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    return done.returncode, done.stdout + done.stderr


class Installed(NamedTuple):
    wheel: Path
    venv: Path  # a fresh venv holding the wheel and mypy, nothing else of the project
    app: Path  # a directory holding a user's app.py only

    def mypy(self) -> tuple[int, str]:
        """``mypy --strict app.py`` from the fresh venv: no other flag, no cache from an earlier run."""
        shutil.rmtree(self.app / ".mypy_cache", ignore_errors=True)
        return run_clean(self.venv / "bin" / "mypy", "--strict", "app.py", cwd=self.app, timeout=300)


USER_APP = '''
    """A user's aiohttp app on the installed jwtplus."""

    from __future__ import annotations

    from collections.abc import Awaitable, Callable
    from typing import TYPE_CHECKING, Any

    from aiohttp import web

    import jwtplus

    Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


    @jwtplus.login_required
    async def hello(request: web.Request) -> web.Response:
        carry: Any = jwtplus.get_auth_carry(request)
        return web.json_response({"hello": carry["username"], "who": jwtplus.get_auth_identity(request)})


    @jwtplus.login_required
    @jwtplus.require_claims(role="admin")
    async def admin(request: web.Request) -> web.Response:
        return web.json_response({"admin": True})


    def on_refusal(request: web.Request, refusal: jwtplus.Refusal) -> web.Response | None:
        return None if refusal.reason != "expired" else web.json_response({"msg": "expired"}, status=401)


    # the guards keep the handler's type: these assignments type-check only if they do
    typed_hello: Callable[[web.Request], Awaitable[web.Response]] = hello
    typed_admin: Handler = admin
    if TYPE_CHECKING:
        reveal_type(admin)


    def make_app() -> web.Application:
        manager = jwtplus.SecretManager(secret=b"32 or more random bytes .........")
        rules = jwtplus.RoutingRules(protected_apis=("/hello", "/admin"))
        middleware = jwtplus.jwt_middleware(manager=manager, rules=rules, on_refusal=on_refusal)
        app = web.Application(middlewares=[middleware])
        app.router.add_get("/hello", hello)
        app.router.add_get("/admin", admin)
        return app


    if __name__ == "__main__":
        web.run_app(make_app(), host="127.0.0.1", port=8080)
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel pip builds from the repository (isolated), installed with mypy into a fresh venv."""
    base = tmp_path_factory.mktemp("typed")
    dist, venv, app = base / "dist", base / "venv", base / "app"
    for argv in (
        (sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, ROOT),
        (sys.executable, "-m", "venv", venv),
    ):
        code, output = run_clean(*argv)
        assert code == 0, output
    (wheel,) = dist.glob("*.whl")
    code, output = run_clean(venv / "bin" / "python", "-m", "pip", "install", "-q", wheel, "mypy>=1.13")
    assert code == 0, output
    app.mkdir()
    (app / "app.py").write_text(textwrap.dedent(USER_APP))
    return Installed(wheel, venv, app)


@pytest.mark.packaging
def test_the_wheel_carries_the_license_the_version_and_the_aiohttp_range(installed: Installed) -> None:
    """Built the way pip builds it (the backend of pyproject.toml, isolated)."""
    name, names, metadata = wheel_contents(installed.wheel.parent)
    assert name == f"aiohttp_jwtplus-{jwtplus.__version__}-py3-none-any.whl"
    assert f"aiohttp_jwtplus-{jwtplus.__version__}.dist-info/licenses/LICENSE" in names
    assert "License-Expression: MIT" in metadata
    requires = [
        Requirement(line.removeprefix("Requires-Dist: "))
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist: ")
    ]
    (aiohttp_range,) = [r for r in requires if r.name == "aiohttp" and r.marker is None]
    assert aiohttp_range.specifier == SpecifierSet(">=3.14,<4")


@pytest.mark.packaging
def test_the_wheel_installs_jwtplus_as_a_typed_package(installed: Installed) -> None:
    """jwtplus/__init__.py, a byte copy of the repository's one file, and the PEP 561 marker."""
    _, names, _ = wheel_contents(installed.wheel.parent)
    assert [n for n in names if ".dist-info/" not in n] == ["jwtplus/__init__.py", "jwtplus/py.typed"]
    with zipfile.ZipFile(installed.wheel) as archive:
        assert archive.read("jwtplus/__init__.py") == (ROOT / "jwtplus.py").read_bytes()
        assert archive.read("jwtplus/py.typed") == b""


@pytest.mark.packaging
def test_a_typed_user_app_passes_mypy_strict_against_the_installed_wheel(installed: Installed) -> None:
    """No flag but --strict: no import-untyped, no untyped decorator, and the guards keep the type."""
    code, output = installed.mypy()
    assert code == 0, output
    assert (
        'Revealed type is "def (request: aiohttp.web_request.Request) -> '
        'typing.Coroutine[Any, Any, aiohttp.web_response.Response]"'
    ) in output
    imported = "import app, jwtplus; app.make_app(); print(jwtplus.__file__)"
    code, output = run_clean(installed.venv / "bin" / "python", "-c", imported, cwd=installed.app)
    assert code == 0, output
    assert Path(output.strip()).relative_to(installed.venv).parts[-2:] == ("jwtplus", "__init__.py")


@pytest.mark.packaging
def test_without_py_typed_mypy_refuses_the_installed_jwtplus(installed: Installed) -> None:
    """The marker is what makes the difference: remove it from site-packages and mypy says import-untyped."""
    (marker,) = installed.venv.glob("lib/python*/site-packages/jwtplus/py.typed")
    marker.unlink()
    try:
        code, output = installed.mypy()
    finally:
        marker.touch()
    assert code == 1 and "[import-untyped]" in output, output


# ---- The README's snippets, as pasted ----

README = Path(__file__).with_name("README.md")


class ReadmeBlock(NamedTuple):
    heading: str  # the ## section it is in ("" before the first)
    language: str
    code: str
    fragment: bool  # marked <!-- fragment: ... --> just above: a piece of a larger program, not run alone


def readme_blocks() -> list[ReadmeBlock]:
    """Every fenced code block of the README, in order."""
    blocks, heading = [], ""
    lines = README.read_text().split("\n")
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("## "):
            heading = line[3:]
        elif line.startswith("```"):
            language, body = line[3:], []
            index += 1
            while lines[index] != "```":
                body.append(lines[index])
                index += 1
            fragment = index - len(body) >= 2 and lines[index - len(body) - 2].startswith("<!-- fragment:")
            blocks.append(ReadmeBlock(heading, language, "\n".join(body) + "\n", fragment))
        index += 1
    return blocks


def readme_snippets(heading: str) -> list[str]:
    """The runnable Python code blocks of the README section titled *heading* (fragments left out)."""
    found = [b.code for b in readme_blocks() if b.heading == heading and b.language == "python"]
    assert found or heading in {b.heading for b in readme_blocks()}, f"no README section {heading!r}"
    return [
        b.code for b in readme_blocks() if b.heading == heading and b.language == "python" and not b.fragment
    ]


def run_snippet(code: str, **given: Any) -> dict[str, Any]:
    """Run a README snippet with only what the README says to fill in (or takes from an earlier one)."""
    namespace: dict[str, Any] = {"__name__": "readme", **given}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 (the project's own README)
    return namespace


def cookies_of(response: Any, jar: dict[str, str] | None = None) -> dict[str, str]:
    jar = dict(jar or {})
    for morsel in response.cookies.values():
        if morsel.value:
            jar[morsel.key] = morsel.value
        else:
            jar.pop(morsel.key, None)
    return jar


def as_cookie_header(jar: dict[str, str]) -> dict[str, str]:
    return {"Cookie": "; ".join(f"{k}={v}" for k, v in jar.items())}


async def test_readme_spa_snippet_runs_as_pasted(
    aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "login.html").write_text("the login page")
    (tmp_path / "static" / "index.html").write_text("the app")
    monkeypatch.chdir(tmp_path)

    async def check_password(username: Any, password: Any) -> str | None:
        return username if (username, password) == ("ann", "let me in") else None

    (spa,) = readme_snippets("Use it in front of an SPA")
    names = run_snippet(spa, web=web, jwtplus=jwtplus, manager=manager(), check_password=check_password)
    client = await aiohttp_client(names["app"])
    assert await (await client.get("/index.html")).text() == "the login page"
    wrong = await client.post("/api/login", data={"username": "ann", "password": "guess"})
    assert wrong.status == 401
    login = await client.post("/api/login", data={"username": "ann", "password": "let me in"})
    assert login.status == 200
    jar = cookies_of(login)
    assert set(jar) == {"__Host-access_token", "__Host-csrf_token"}
    assert await (await client.get("/index.html", headers=as_cookie_header(jar))).text() == "the app"
    assert await (await client.get("/login.html", headers=as_cookie_header(jar))).text() == "the app"
    assert (await client.post("/api/setattr", headers=as_cookie_header(jar))).status == 403  # no CSRF
    csrf = {"X-CSRF-Token": jar["__Host-csrf_token"], **as_cookie_header(jar)}
    done = await client.post("/api/setattr", headers=csrf)
    assert (done.status, await done.json()) == (200, {"ok": True, "for": "ann"})
    out = await client.post("/api/logout", headers=csrf)
    assert out.status == 200
    assert cookies_of(out, jar) == {}
    assert (await client.post("/api/setattr")).status == 401


async def test_readme_sessions_snippet_runs_as_pasted(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JWTPLUS_SECRET", SECRET.decode())
    users = {("ann", "pw"): {"id": "u-1", "name": "ann", "role": "user"}}

    async def find_user(username: Any, password: Any) -> dict[str, str] | None:
        return users.get((username, password))

    (snippet, *_) = readme_snippets("Sessions that last and can end")
    names = run_snippet(snippet, find_user=find_user)
    client = await aiohttp_client(names["app"])
    assert (await client.post("/api/login", json={"username": "ann", "password": "no"})).status == 401
    login = await client.post("/api/login", json={"username": "ann", "password": "pw"})
    jar = cookies_of(login)
    assert set(jar) == {"__Host-access_token", "__Host-refresh_token", "__Host-csrf_token"}
    csrf = {"X-CSRF-Token": jar["__Host-csrf_token"]}
    me = await client.get("/api/me", headers=as_cookie_header(jar))
    assert (me.status, await me.json()) == (200, {"username": "ann"})
    assert (await client.post("/api/admin", headers={**as_cookie_header(jar), **csrf})).status == 403
    assert (await client.post("/api/password", headers={**as_cookie_header(jar), **csrf})).status == 200
    renewed = await client.post("/api/refresh", headers={**as_cookie_header(jar), **csrf})
    assert renewed.status == 200
    jar = cookies_of(renewed, jar)
    csrf = {"X-CSRF-Token": jar["__Host-csrf_token"]}
    refreshed = {**as_cookie_header(jar), **csrf}
    assert (await client.post("/api/password", headers=refreshed)).status == 401  # not fresh
    sessions: jwtplus.Sessions = names["sessions"]
    expired = (
        await jwtplus.issue_tokens(sessions, "u-1", {"username": "ann"}, now=time.time() - 3600)
    ).access
    stale = {**jar, "__Host-access_token": expired}
    assert (await client.get("/api/me", headers=as_cookie_header(stale))).status == 401
    out = await client.post("/api/logout", headers={**as_cookie_header(stale), **csrf})  # after expiry
    assert out.status == 200
    assert cookies_of(out, jar) == {}
    assert (await client.post("/api/refresh", headers=refreshed)).status == 401  # the family is revoked
    assert (await client.get("/api/me", headers=as_cookie_header(jar))).status == 401
    assert (await client.post("/api/logout", headers=refreshed)).status == 200  # and again


async def test_readme_guards_snippet_runs_as_pasted(aiohttp_client: Any) -> None:
    sm = manager()
    (snippet,) = readme_snippets("Guards and route options")
    client = await aiohttp_client(run_snippet(snippet, web=web, jwtplus=jwtplus, manager=sm)["app"])
    user = bearer(sm.encode({"username": "ann", "role": "user"}))
    assert (await client.post("/admin", headers=user)).status == 403
    assert (
        await client.post("/admin", headers=bearer(sm.encode({"username": "r", "role": "admin"})))
    ).status == 200
    assert (await client.get("/items")).status == 200
    assert (await client.post("/items")).status == 401
    assert await (await client.post("/items", headers=user)).json() == {"by": "ann"}
    assert await (await client.get("/feed")).json() == {"for": "everyone"}
    assert await (await client.get("/feed", headers=user)).json() == {"for": "ann"}
    assert (await client.get("/feed", headers=bearer(tampered(sm.encode({"username": "x"}))))).status == 401


async def test_readme_check_snippet_runs_as_pasted(aiohttp_client: Any) -> None:
    sm = manager()
    (snippet,) = readme_snippets("How a request is judged")
    names = run_snippet(snippet, web=web, jwtplus=jwtplus, manager=sm)
    helper = names["helper"]
    assert helper.all_checks[-1] is names["same_tenant"]
    app = web.Application()
    jwtplus.setup(app, helper)
    app.router.add_get("/x", echo)
    client = await aiohttp_client(app)
    token = bearer(sm.encode({"username": "ann", "tenant": "acme"}))
    assert (await client.get("/x", headers={**token, "X-Tenant": "acme"})).status == 200
    assert (await client.get("/x", headers={**token, "X-Tenant": "other"})).status == 403


@functools.cache
def es256_pems() -> tuple[str, str, str]:
    """An old public key and a new key pair, as PEM text: what the README's static-keys snippet takes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    def public(key: Any) -> str:
        return (
            key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    private = new.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return public(old), private, public(new)


async def test_readme_publish_your_keys_snippets_run_as_pasted(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JWTPLUS_SECRET", SECRET.decode())
    publish, static = readme_snippets("Publish your keys")
    names = run_snippet(publish)
    client = await aiohttp_client(names["app"])
    answer = await client.get("/.well-known/jwks.json")
    assert answer.status == 200
    jwks = await answer.json()
    token = names["manager"].encode({"sub": "ann"})
    kid = jwt.get_unverified_header(token)["kid"]
    (jwk,) = [key for key in jwks["keys"] if key["kid"] == kid]
    public_key = jwt.PyJWK(jwk).key
    claims = jwt.decode(
        token, public_key, algorithms=["EdDSA"], audience="example-apis", issuer="https://auth.example.com"
    )
    assert claims["sub"] == "ann"
    old_public, new_private, new_public = es256_pems()
    keys = run_snippet(
        static,
        jwtplus=jwtplus,
        old_public_pem=old_public,
        new_private_pem=new_private,
        new_public_pem=new_public,
    )
    minted = keys["signer"].encode({"sub": "ann"})
    assert keys["verifier"].decode(minted)["sub"] == "ann"
    with pytest.raises(ValueError, match="cannot sign"):
        keys["verifier"].encode({"sub": "ann"})


async def test_readme_identity_provider_snippet_runs_as_pasted(aiohttp_client: Any) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())), "kid": "k1", "alg": "RS256"}
    provider_app = web.Application()
    issuer: list[str] = []

    async def discovery(request: web.Request) -> web.Response:
        return web.json_response({"issuer": issuer[0], "jwks_uri": issuer[0] + "/keys"})

    async def keys(request: web.Request) -> web.Response:
        return web.json_response({"keys": [jwk]})

    provider_app.router.add_get("/realms/main/.well-known/openid-configuration", discovery)
    provider_app.router.add_get("/realms/main/keys", keys)
    idp = await aiohttp_client(provider_app)
    issuer.append(str(idp.make_url("/realms/main")))
    (snippet,) = readme_snippets("Verify tokens from your identity provider")
    names = run_snippet(snippet.replace("https://idp.example.com/realms/main", issuer[0]))
    client = await aiohttp_client(names["app"])
    claims = {"sub": "svc-1", "iss": issuer[0], "aud": "my-api", "exp": int(time.time()) + 60}
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1", "typ": "at+jwt"})
    answer = await client.get("/api/me", headers=bearer(token))
    assert (answer.status, await answer.json()) == (200, {"sub": "svc-1"})
    assert (await client.get("/api/me")).status == 401
    stranger = jwt.encode({**claims, "aud": "another-api"}, key, algorithm="RS256", headers={"kid": "k1"})
    assert (await client.get("/api/me", headers=bearer(stranger))).status == 401


async def test_readme_websocket_snippet_runs_as_pasted(aiohttp_client: Any) -> None:
    (snippet,) = readme_snippets("WebSockets")
    names = run_snippet(snippet, web=web, jwtplus=jwtplus)
    sm = manager(exptime="1h")
    app = web.Application(
        middlewares=[
            jwtplus.jwt_middleware(
                manager=sm, rules=RoutingRules(protected_apis=("/ws",)), identifier=jwtplus.subject_identifier
            )
        ]
    )
    app.router.add_get("/ws", names["socket"])
    client = await aiohttp_client(app)
    ws = await client.ws_connect("/ws", headers=bearer(sm.encode({"sub": "ann"})))
    await ws.send_str("ping")
    assert (await ws.receive()).data == "ping"
    await ws.close()
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await client.ws_connect("/ws")


async def test_readme_first_example_runs_as_pasted(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    served: list[web.Application] = []
    monkeypatch.setattr(web, "run_app", lambda app, **kwargs: served.append(app))
    (first,) = readme_snippets("")
    run_snippet(first)
    client = await aiohttp_client(served[0])
    login = await client.post("/login", data={"username": "ann", "password": "let me in"})
    token = (await login.json())["token"]
    assert token.startswith("eyJhbGciOiJIUzI1NiIs")
    me = await client.get("/me", headers=bearer(token))
    assert (me.status, await me.json()) == (200, {"you": "ann"})
    assert (await client.get("/me")).status == 401
    assert (await client.post("/login", data={"username": "ann", "password": "guess"})).status == 401


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node (.ci/run installs it)")
async def test_readme_js_snippet_runs_in_a_classic_script() -> None:
    node = shutil.which("node")
    assert node is not None
    (js,) = [b.code for b in readme_blocks() if b.language == "js"]
    program = (
        "const vm = require('vm'); const calls = [];"
        "const context = {document: {cookie: 'a=1; __Host-csrf_token=xyz; b=2'},"
        " fetch: async (url, init) => { calls.push([url, init]); return {json: async () => ({ok: true})}; }};"
        f"new vm.Script({json.dumps(js)}).runInNewContext(context);"  # a classic script: no top-level await
        "context.setattr().then((body) => console.log(JSON.stringify({body, calls})));"
    )
    proc = await asyncio.create_subprocess_exec(
        node, "-e", program, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out) == {
        "body": {"ok": True},
        "calls": [["/api/setattr", {"method": "POST", "headers": {"X-CSRF-Token": "xyz"}}]],
    }


async def test_readme_on_refusal_snippet_runs_as_pasted(aiohttp_client: Any) -> None:
    sm = manager()
    _, hook = readme_snippets("When a request is refused")
    helper = run_snippet(hook, web=web, jwtplus=jwtplus, manager=sm)["helper"]
    app = web.Application()
    jwtplus.setup(app, helper)
    app.router.add_get("/me", echo)
    client = await aiohttp_client(app)
    old = bearer(sm.encode({"username": "ann"}, now=time.time() - 86400 * 31))
    expired = await client.get("/me", headers=old)
    assert (expired.status, await expired.json()) == (401, {"msg": "Token has expired"})
    assert expired.headers["Cache-Control"] == "no-store"
    missing = await client.get("/me")
    assert (missing.status, await missing.read()) == (401, b'{"error":"unauthorized"}')


async def test_readme_logging_snippet_shows_refusals(tmp_path: Path) -> None:
    """In a process of its own: basicConfig is global."""
    switch, _ = readme_snippets("When a request is refused")
    script = tmp_path / "refused.py"
    script.write_text(
        switch
        + textwrap.dedent(
            """
            import asyncio
            from aiohttp import web
            from aiohttp.test_utils import TestClient, TestServer
            import jwtplus

            async def me(request):
                return web.json_response({})

            async def main():
                manager = jwtplus.SecretManager(secret=b"x" * 32)
                rules = jwtplus.RoutingRules(protected_apis=("/api/.*",))
                app = web.Application(middlewares=[jwtplus.jwt_middleware(manager=manager, rules=rules)])
                app.router.add_get("/api/me", me)
                async with TestClient(TestServer(app)) as client:
                    await client.get("/api/me", headers={"X-Request-ID": "7f3a"})

            asyncio.run(main())
            """
        )
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-W",
        "error",
        str(script),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    assert proc.returncode == 0, err.decode()
    assert "INFO:jwtplus:jwtplus: refused GET /api/me with 401: missing (no token) [request id 7f3a]" in (
        err.decode().splitlines()
    )


async def test_readme_sliding_snippet_runs_as_pasted(aiohttp_client: Any) -> None:
    sm, policy = manager(), jwtplus.CookiePolicy()
    (snippet,) = readme_snippets("Sliding sessions")
    sliding = run_snippet(snippet, web=web, jwtplus=jwtplus, manager=sm, cookies=policy)["sliding"]
    helper = JWTHelper(secret_manager=sm, cookies=policy, protected_apis=("/api/.*",))
    app = web.Application(middlewares=[helper.middleware(), sliding])
    app.router.add_get("/api/me", echo)
    client = await aiohttp_client(app)
    now = time.time()

    def cookie_login(iat: float, lifetime: float, **extra: Any) -> tuple[dict[str, str], str]:
        csrf = "the-csrf-value"
        token = sm.encode({"username": "ann", "csrf": csrf, **extra}, now=iat, expires_in=lifetime)
        return cookie_header(token, csrf), csrf

    near_end, csrf = cookie_login(now - 28 * 60, 30 * 60)  # 2 minutes left
    renewed = await client.get("/api/me", headers=near_end)
    assert renewed.status == 200
    fresh = renewed.cookies["__Host-access_token"].value
    claims = sm.decode(fresh)
    assert 29 * 60 < claims["exp"] - now <= 30 * 60 + 1
    assert claims["csrf"] == csrf and claims["username"] == "ann"
    assert claims["auth_time"] == int(now - 28 * 60)
    assert renewed.cookies["__Host-csrf_token"].value == csrf
    plenty, _ = cookie_login(now, 30 * 60)
    assert "__Host-access_token" not in (await client.get("/api/me", headers=plenty)).cookies
    too_old, _ = cookie_login(now - 28 * 60, 30 * 60, auth_time=int(now - 9 * 3600))
    assert "__Host-access_token" not in (await client.get("/api/me", headers=too_old)).cookies
    by_header = bearer(sm.encode({"username": "ann"}, now=now - 28 * 60, expires_in=30 * 60))
    assert "__Host-access_token" not in (await client.get("/api/me", headers=by_header)).cookies


@pytest.mark.parametrize("name", ["test_me_by_header", "test_login_then_me"])
async def test_readme_testing_snippets_run_as_pasted(
    name: str, aiohttp_client: Any, aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each of the README's tests in a loop of its own, as pytest runs them: make_app() builds the app."""
    monkeypatch.setenv("JWTPLUS_SECRET", SECRET.decode())

    async def find_user(username: Any, password: Any) -> dict[str, str] | None:
        known = (username, password) == ("ann", "ann's password")
        return {"id": "u-1", "name": "ann", "role": "user"} if known else None

    (sessions_app, _) = readme_snippets("Sessions that last and can end")

    def make_app() -> web.Application:
        return cast(web.Application, run_snippet(sessions_app, find_user=find_user)["app"])

    (snippet,) = readme_snippets("Testing your app")
    manager_of_the_app = run_snippet(sessions_app, find_user=find_user)["manager"]
    tests = run_snippet(snippet, jwtplus=jwtplus, make_app=make_app, manager=manager_of_the_app)
    await tests[name](aiohttp_client if name == "test_me_by_header" else aiohttp_server)


async def test_the_default_jar_of_the_test_client_drops_the_secure_cookies_as_the_readme_says(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JWTPLUS_SECRET", SECRET.decode())

    async def find_user(username: Any, password: Any) -> dict[str, str]:
        return {"id": "u-1", "name": "ann", "role": "user"}

    (sessions_app, _) = readme_snippets("Sessions that last and can end")
    client = await aiohttp_client(run_snippet(sessions_app, find_user=find_user)["app"])
    assert (await client.post("/api/login", json={"username": "ann", "password": "x"})).status == 200
    assert (await client.get("/api/me")).status == 401  # the jar kept the cookies, and sends none back


README_RUN_BY = {  # every runnable Python block of the README, by section, and the test that runs it
    "": ["test_readme_first_example_runs_as_pasted"],
    "Use it in front of an SPA": ["test_readme_spa_snippet_runs_as_pasted"],
    "Sessions that last and can end": [
        "test_readme_sessions_snippet_runs_as_pasted",
        "test_the_readmes_redis_client_answers_503_in_about_its_timeout_when_redis_hangs",
    ],
    "Sliding sessions": ["test_readme_sliding_snippet_runs_as_pasted"],
    "Guards and route options": ["test_readme_guards_snippet_runs_as_pasted"],
    "How a request is judged": ["test_readme_check_snippet_runs_as_pasted"],
    "When a request is refused": [
        "test_readme_logging_snippet_shows_refusals",
        "test_readme_on_refusal_snippet_runs_as_pasted",
    ],
    "Publish your keys": [
        "test_readme_publish_your_keys_snippets_run_as_pasted",
        "test_readme_publish_your_keys_snippets_run_as_pasted",
    ],
    "Verify tokens from your identity provider": ["test_readme_identity_provider_snippet_runs_as_pasted"],
    "WebSockets": ["test_readme_websocket_snippet_runs_as_pasted"],
    "Testing your app": ["test_readme_testing_snippets_run_as_pasted"],
    "Running on many servers": ["test_readme_running_on_many_servers_snippet_runs_as_pasted"],
}


def test_every_runnable_readme_snippet_has_a_test_that_runs_it() -> None:
    """A new Python block in the README fails here until a test runs it (or it is marked a fragment)."""
    runnable: dict[str, int] = Counter(
        b.heading for b in readme_blocks() if b.language == "python" and not b.fragment
    )
    assert runnable == {heading: len(tests) for heading, tests in README_RUN_BY.items()}
    for tests in README_RUN_BY.values():
        for name in tests:
            assert callable(globals().get(name)), name
    for block in readme_blocks():  # fragments are still Python
        if block.language == "python":
            compile(block.code, "README.md", "exec")


# ---- Real processes: the examples, and two servers sharing rotating keys ----
# Real processes: the examples run as subprocesses, and two servers share rotating keys.
#
# Every server is started with ``sys.executable`` on a free port, waited for with a
# bounded poll, and always stopped at teardown; its stdout and stderr go to files
# in ``tmp_path`` and are printed at teardown, so a failing test shows them.
# Subprocesses run with warnings as errors.

ROOT = Path(__file__).resolve().parent
EXAMPLES = ROOT / "examples"

START_TIMEOUT = 20.0  # seconds for a server to accept connections
RUN_TIMEOUT = 60.0  # seconds for a client run
STOP_TIMEOUT = 10.0  # seconds for a server to exit after SIGTERM
HTTP_TIMEOUT = ClientTimeout(total=10)

WARNING_FLAGS = ("-W", "error")  # warnings are errors in the subprocesses too


# -- Process helpers --


def free_port() -> int:
    """A port nothing listens on right now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a subprocess: this checkout's jwtplus first on the path, output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class Server:
    """A server subprocess, with the files its output goes to."""

    name: str
    proc: asyncio.subprocess.Process
    url: str
    stdout_path: Path
    stderr_path: Path

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def logs(self) -> str:
        return (
            f"---- {self.name} (exit code {self.proc.returncode}) stdout ----\n{self.stdout()}"
            f"---- {self.name} stderr ----\n{self.stderr()}"
        )

    async def stop(self) -> int:
        """SIGTERM (aiohttp's graceful shutdown), then SIGKILL if it hangs; return the exit code."""
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
            except asyncio.TimeoutError:  # not the builtin before Python 3.11
                self.proc.kill()
                await self.proc.wait()
                pytest.fail(f"{self.name} did not exit within {STOP_TIMEOUT}s of SIGTERM\n{self.logs()}")
        return self.proc.returncode  # type: ignore[return-value]


async def wait_until_accepting(server: Server, port: int) -> None:
    """Poll until *server* accepts TCP connections, failing (with its output) after START_TIMEOUT."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if server.proc.returncode is not None:
            pytest.fail(f"{server.name} exited before accepting connections\n{server.logs()}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{server.name} did not accept connections within {START_TIMEOUT}s\n{server.logs()}"
                )
            await asyncio.sleep(0.05)
        else:
            writer.close()
            await writer.wait_closed()
            return


StartCommand = Callable[..., Awaitable[Server]]


@pytest.fixture
async def start_command(tmp_path: Path) -> AsyncIterator[StartCommand]:
    """Start ``command`` (a server on 127.0.0.1:*port*), its output in files; all stopped at teardown.
    It returns once *ready* is in the server's output, or once the port accepts connections."""
    started: list[Server] = []

    async def start(
        name: str, port: int, *command: str, env: dict[str, str], ready: str | None = None
    ) -> Server:
        stdout_path, stderr_path = tmp_path / f"{name}.stdout", tmp_path / f"{name}.stderr"
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=subprocess_env(env),
                cwd=ROOT,
            )
        server = Server(name, proc, f"http://127.0.0.1:{port}", stdout_path, stderr_path)
        started.append(server)
        if ready is None:
            await wait_until_accepting(server, port)
            return server
        deadline = time.monotonic() + START_TIMEOUT
        while ready not in server.stdout() + server.stderr():
            if server.proc.returncode is not None or time.monotonic() > deadline:
                pytest.fail(f"{name} did not print {ready!r} within {START_TIMEOUT}s\n{server.logs()}")
            await asyncio.sleep(0.05)
        return server

    yield start
    for server in started:
        await server.stop()
        print(server.logs())  # shown by pytest when the test failed


Spawn = Callable[..., Awaitable[Server]]


@pytest.fixture
def spawn(start_command: StartCommand) -> Spawn:
    """Start ``script --host 127.0.0.1 --port <free port> *args``; every one is stopped at teardown."""

    async def start(name: str, script: Path, *args: str, env: dict[str, str] | None = None) -> Server:
        port = free_port()
        command = (sys.executable, *WARNING_FLAGS, str(script), "--host", "127.0.0.1", "--port", str(port))
        return await start_command(name, port, *command, *args, env=env or {})

    return start


async def run_script(script: Path, *args: str) -> tuple[int, str, str]:
    """Run a script to its end; return its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *WARNING_FLAGS,
        str(script),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(),
        cwd=ROOT,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    except asyncio.TimeoutError:  # not the builtin before Python 3.11
        proc.kill()
        await proc.wait()
        pytest.fail(f"{script.name} did not finish within {RUN_TIMEOUT}s")
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def fetch(
    url: str, headers: dict[str, str] | None = None, method: str = "GET", json_body: Any = None
) -> tuple[int, str]:
    async with (
        ClientSession(timeout=HTTP_TIMEOUT) as session,
        session.request(method, url, headers=headers, json=json_body) as response,
    ):
        return response.status, await response.text()


def demo_manager(**settings: object) -> jwtplus.SecretManager:
    """A SecretManager on the examples' demo secret 'testsecret', as they build it."""
    return jwtplus.SecretManager("testsecret", allow_weak_secret=True, **settings)  # type: ignore[arg-type]


# -- The examples --

INDEX, LOGIN = "this is index.html", "this is login.html"
LOGIN_API_TEXT, PROTECTED_TEXT = "loginapi called", "this is a protected api"
BODY_401_TEXT = '{"error":"unauthorized"}'

# The seed's table, as client.py prints it against server.py: (path, status, text) per section.
SEED_TABLE = {
    "With authentication": [
        ("/index.html", 200, INDEX),
        ("/login.html", 200, INDEX),  # a logged-in user gets the app, not the login page
        ("/authentication", 200, LOGIN_API_TEXT),
        ("/setattr", 200, PROTECTED_TEXT),
        ("/404", 200, INDEX),  # 404s are left to the SPA
    ],
    "Without authentication": [
        ("/index.html", 200, LOGIN),
        ("/login.html", 200, LOGIN),
        ("/authentication", 200, LOGIN_API_TEXT),
        ("/setattr", 401, BODY_401_TEXT),
        ("/404", 200, LOGIN),
    ],
}

_ROW = re.compile(r"called (?P<path>\S+) +get statuscode (?P<status>\d{3}) +return text (?P<text>.*)")


def parse_client_table(stdout: str) -> dict[str, list[tuple[str, int, str]]]:
    """Read client.py's output back into SEED_TABLE's shape; any other line fails the test."""
    table: dict[str, list[tuple[str, int, str]]] = {}
    section: list[tuple[str, int, str]] | None = None
    for line in stdout.splitlines():
        if set(line) == {"#"}:
            continue
        if line in SEED_TABLE:
            section = table.setdefault(line, [])
        elif (row := _ROW.fullmatch(line)) and section is not None:
            section.append((row["path"], int(row["status"]), ast.literal_eval(row["text"])))
        else:
            pytest.fail(f"unexpected line from client.py: {line!r}\n{stdout}")
    return table


async def test_server_and_client_print_the_seed_table(spawn: Spawn) -> None:
    server = await spawn("server", EXAMPLES / "server.py")
    code, out, err = await run_script(EXAMPLES / "client.py", "--url", server.url)
    assert code == 0, f"client.py failed\n{out}\n{err}\n{server.logs()}"
    assert parse_client_table(out) == SEED_TABLE, f"{out}\n{server.logs()}"
    assert "Warning" not in err, err
    assert "eyJ" not in out  # no token printed

    assert await server.stop() == 0, server.logs()  # SIGTERM: graceful, auto_refresh cancelled cleanly
    stdout, stderr = server.stdout(), server.stderr()
    assert f"python examples/client.py --url {server.url}" in stdout  # how to try it
    assert "Warning" not in stderr, stderr
    assert "Traceback" not in stderr
    for secret_or_token in ("testsecret", "eyJ"):
        assert secret_or_token not in stdout + stderr
    # show_request_info ran in the handlers: the protected one only for the logged-in call
    requests = re.findall(r"^GET (\S+) from \S+: auth_status=(\w+)", stdout, re.MULTILINE)
    assert requests == [
        *((path, "pass") for path in ("/index.html", "/login.html", "/authentication", "/setattr", "/404")),
        *((path, "missing") for path in ("/index.html", "/login.html", "/authentication", "/404")),
    ], stdout


async def test_client_tokens_are_minted_like_the_servers(spawn: Spawn) -> None:
    """client.py's settings are server.py's: a token of either verifies with the other's manager."""
    server_manager = demo_manager(refresh_interval="30d", scheme="Bearer", algorithm="HS256", exptime="30d")
    server = await spawn("server", EXAMPLES / "server.py")
    token = server_manager.encode({"username": "jacky"})
    status, text = await fetch(server.url + "/setattr", {"Authorization": f"Bearer {token}"})
    assert (status, text) == (200, PROTECTED_TEXT)
    assert jwt.get_unverified_header(token)["kid"] == str(jwtplus.period_of(time.time(), 30 * 86400))


async def test_server_basic_serves_its_four_routes(spawn: Spawn) -> None:
    server = await spawn("server_basic", EXAMPLES / "server_basic.py")
    for path, text in (
        ("/index.html", INDEX),
        ("/login.html", LOGIN),
        ("/authentication", LOGIN_API_TEXT),
        ("/setattr", PROTECTED_TEXT),
    ):
        assert await fetch(server.url + path) == (200, text), server.logs()
    assert (await fetch(server.url + "/404"))[0] == 404
    assert await server.stop() == 0, server.logs()
    assert "Traceback" not in server.stderr()


async def test_modify_identifier_passes_admin_only_and_never_500s(spawn: Spawn) -> None:
    server = await spawn("modify_identifier", EXAMPLES / "modify_identifier.py")
    demo = demo_manager()
    stranger = jwtplus.SecretManager(secrets.token_urlsafe(32))

    def auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    admin = auth(demo.encode({"username": "admin"}))
    cases: list[tuple[str, str, dict[str, str] | None, tuple[int, str]]] = [
        ("GET", "/index.html", admin, (200, "pass")),
        ("GET", "/anywhere", admin, (200, "pass")),  # unknown page: the authorized page handler
        ("GET", "/index.html", auth(demo.encode({"username": "bob"})), (200, "fail")),
        ("GET", "/index.html", None, (200, "fail")),  # no token: auth_carry is None
        ("GET", "/anywhere", None, (200, "fail")),
        ("GET", "/index.html", {"Authorization": "None"}, (200, "fail")),
        ("GET", "/index.html", auth("not.a.token"), (200, "fail")),
        ("GET", "/index.html", auth(demo.encode({"name": "admin"})), (200, "fail")),  # identifier: no
        ("GET", "/index.html", auth(stranger.encode({"username": "admin"})), (200, "fail")),
        (
            "GET",
            "/index.html",
            auth(demo.encode({"username": "admin"}, now=time.time() - 31 * 86400)),  # expired
            (200, "fail"),
        ),
        ("POST", "/index.html", None, (401, BODY_401_TEXT)),  # not a page request: 401, not the handler
    ]
    for method, path, headers, expected in cases:
        got = await fetch(server.url + path, headers, method=method)
        assert got == expected, (method, path, headers, server.logs())
    assert await server.stop() == 0, server.logs()
    stderr = server.stderr()
    assert "Traceback" not in stderr, stderr
    assert "Error handling request" not in stderr, stderr
    assert "Warning" not in stderr, stderr


async def post_raw(url: str, body: bytes, content_type: str) -> tuple[int, str]:
    async with (
        ClientSession(timeout=HTTP_TIMEOUT) as session,
        session.post(url, data=body, headers={"Content-Type": content_type}) as response,
    ):
        return response.status, await response.text()


def test_an_example_that_says_make_runs_it_is_the_one_make_runs() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for example in sorted((ROOT / "examples").glob("*.py")):
        docstring = ast.get_docstring(ast.parse(example.read_text())) or ""
        for target in re.findall(r"or: make (\w+)", docstring):
            recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
            assert recipe is not None and f"examples/{example.name}" in recipe.group(1), (
                example.name,
                target,
            )


async def test_the_spa_demo_login_answers_400_to_what_is_not_a_json_object(spawn: Spawn) -> None:
    demo = await spawn("spa_demo", EXAMPLES / "spa_demo.py")
    json_type = "application/json"
    bodies = [
        (b"[" * 100_000, json_type, "send JSON"),  # json.loads: RecursionError
        (b'{"username": "jacky\xff", "password": "x"}', json_type, "send JSON"),  # UnicodeDecodeError
        (b"{}", "application/json; charset=no-such-charset", "send JSON"),  # LookupError
        (b"username=jacky&password=jwtplus-demo", json_type, "send JSON"),  # JSONDecodeError
        (b"", json_type, "send JSON"),
        (b'["jacky", "jwtplus-demo"]', json_type, "username and password are required"),
        (b'"jacky"', json_type, "username and password are required"),
        (b'{"username": "jacky", "password": 1}', json_type, "username and password are required"),
    ]
    for body, content_type, text in bodies:
        assert await post_raw(f"{demo.url}/api/login", body, content_type) == (400, text), body[:40]
    good = b'{"username": "jacky", "password": "jwtplus-demo"}'
    assert await post_raw(f"{demo.url}/api/login", good, json_type) == (200, '{"username": "jacky"}')
    assert "Traceback" not in demo.stderr()
    assert "Error handling request" not in demo.stderr()


async def test_the_resource_server_example_accepts_its_providers_tokens(
    spawn: Spawn, aiohttp_server: Any
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    jwk = {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())), "kid": "es-1", "alg": "ES256"}
    issuer: list[str] = []
    provider = web.Application()

    async def discovery(request: web.Request) -> web.Response:
        return web.json_response({"issuer": issuer[0], "jwks_uri": issuer[0] + "/jwks"})

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response({"keys": [jwk]})

    provider.router.add_get("/.well-known/openid-configuration", discovery)
    provider.router.add_get("/jwks", jwks)
    idp = await aiohttp_server(provider, host="127.0.0.1")
    issuer.append(str(idp.make_url("")).rstrip("/"))
    api = await spawn(
        "resource_server",
        EXAMPLES / "resource_server.py",
        *("--issuer", issuer[0], "--audience", "reports-api", "--algorithms", "ES256"),
    )

    def token(**claims: Any) -> str:
        base = {"sub": "svc-7", "iss": issuer[0], "aud": "reports-api", "exp": int(time.time()) + 300}
        return jwt.encode(
            {**base, **claims}, key, algorithm="ES256", headers={"kid": "es-1", "typ": "at+jwt"}
        )

    socket_token = token()
    async with ClientSession(timeout=HTTP_TIMEOUT) as http:
        assert await fetch(api.url + "/health") == (200, '{"ok": true}')
        assert (await fetch(api.url + "/api/me"))[0] == 401
        status, body = await fetch(
            api.url + "/api/me", headers=bearer(token(scope="reports:read", client_id="cli"))
        )
        assert (status, json.loads(body)) == (
            200,
            {"sub": "svc-7", "client_id": "cli", "scopes": ["reports:read"]},
        )
        assert (await fetch(api.url + "/api/reports", headers=bearer(token())))[0] == 403
        assert (await fetch(api.url + "/api/reports", headers=bearer(token(scope="reports:read"))))[0] == 200
        assert (await fetch(api.url + "/api/me", headers=bearer(token(aud="another-api"))))[0] == 401
        async with http.ws_connect(api.url + "/api/socket", params={"access_token": socket_token}) as ws:
            await ws.send_str("over the socket")
            assert (await ws.receive()).data == "over the socket"
    for _ in range(100):  # the access log line of a socket comes when it closes
        if "GET /api/socket 101" in api.stderr():
            break
        await asyncio.sleep(0.05)
    assert "GET /api/socket 101" in api.stderr()
    assert socket_token not in api.stderr() + api.stdout()  # the access log writes paths, not query strings


# -- Two real servers, one secret, rotating keys --

ROTATION_SERVER = '''\
"""A protected app on rotating keys (HMAC, or EdDSA with its JWKS): the secret comes from
JWTPLUS_TEST_SECRET."""

import argparse
import os

from aiohttp import web

import jwtplus

parser = argparse.ArgumentParser()
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--name", required=True)
parser.add_argument("--algorithm", default="HS256")
parser.add_argument("--interval", type=int, default=60)
parser.add_argument("--exptime", default="5m")
args = parser.parse_args()

manager = jwtplus.SecretManager(
    secret=os.environ["JWTPLUS_TEST_SECRET"],
    refresh_interval=args.interval,
    exptime=args.exptime,
    algorithm=args.algorithm,
)
helper = jwtplus.JWTHelper(
    secret_manager=manager, whitelist=("/mint",), protected_apis=("/me",)
)


async def mint(request: web.Request) -> web.Response:
    return web.Response(text=manager.encode({"username": "user-of-" + args.name}))


async def me(request: web.Request) -> web.Response:
    carry = request[jwtplus.AUTH_CARRY]
    return web.json_response({"server": args.name, "username": carry["username"]})


app = web.Application(middlewares=[helper.pre_jwt_identifier(), helper.post_jwt_router()])
app.router.add_get("/mint", mint)
app.router.add_get("/me", me)
if args.algorithm == "EdDSA":
    app.router.add_get("/.well-known/jwks.json", jwtplus.jwks_handler(manager))
web.run_app(app, host=args.host, port=args.port, print=None)
'''


async def test_two_servers_accept_each_others_tokens_across_a_rotation_boundary(
    spawn: Spawn, tmp_path: Path
) -> None:
    secret = secrets.token_urlsafe(32)  # 43 bytes: long enough for HS256
    script = tmp_path / "rotation_server.py"
    script.write_text(ROTATION_SERVER)
    env = {"JWTPLUS_TEST_SECRET": secret}
    servers = [await spawn(name, script, "--name", name, env=env) for name in ("A", "B")]

    minted: dict[str, str] = {}
    for server in servers:
        status, token = await fetch(server.url + "/mint")
        assert status == 200, server.logs()
        minted["user-of-" + server.name] = token
    period = jwtplus.period_of(time.time(), 60)
    for token in minted.values():
        assert int(jwt.get_unverified_header(token)["kid"]) in (period - 1, period)

    ours = jwtplus.SecretManager(secret, refresh_interval=60, exptime="5m")
    now = time.time()
    previous = ours.encode({"username": "previous-period"}, now=now - 60)
    current = ours.encode({"username": "current-period"}, now=now)
    kids = [int(jwt.get_unverified_header(t)["kid"]) for t in (previous, current)]
    assert kids == [jwtplus.period_of(now, 60) - 1, jwtplus.period_of(now, 60)]  # across the boundary
    accepted = {**minted, "previous-period": previous, "current-period": current}

    refused = {
        "another secret": jwtplus.SecretManager(secrets.token_urlsafe(32), refresh_interval=60, exptime="5m"),
        "another secret, no rotation": jwtplus.SecretManager(secrets.token_urlsafe(32), exptime="5m"),
        "same secret, no rotation": jwtplus.SecretManager(secret, exptime="5m"),  # retired by rotation
    }

    for server in servers:
        for username, token in accepted.items():
            status, text = await fetch(server.url + "/me", {"Authorization": f"Bearer {token}"})
            assert status == 200, (server.name, username, text, server.logs())
            assert json.loads(text) == {"server": server.name, "username": username}
        for why, other in refused.items():
            token = other.encode({"username": "intruder"})
            status, _ = await fetch(server.url + "/me", {"Authorization": f"Bearer {token}"})
            assert status == 401, (server.name, why, server.logs())
        assert (await fetch(server.url + "/me"))[0] == 401


# -- PyJWT's PyJWKClient against the real handler --


def pyjwk_cooldown(seconds: float) -> dict[str, float]:
    """PyJWKClient's cooldown between refetches, where it has one (PyJWT 2.14 and newer)."""
    has = "cooldown_duration" in inspect.signature(jwt.PyJWKClient).parameters
    return {"cooldown_duration": seconds} if has else {}


@pytest.mark.parametrize("kind", ["EdDSA derived", "ES256", "RS256"])
async def test_pyjwkclient_verifies_jwtplus_tokens_from_the_handler(aiohttp_server: Any, kind: str) -> None:
    if kind == "EdDSA derived":
        sm = derived(60, "5m")
    else:
        sm = static(kind, pem(private_key(KIND[kind] + "-b"), private=False), pem(private_key(KIND[kind])))
    server = await aiohttp_server(keys_app(sm, time.time))
    assert server.host == "127.0.0.1"
    url = str(server.make_url(JWKS_PATH))
    client = jwt.PyJWKClient(url, cache_jwk_set=True, lifespan=1, **pyjwk_cooldown(0))
    now = time.time()
    tokens = {"now": sm.encode({"username": "now"}, now=now)}
    if sm.rotation_seconds:
        tokens["previous period"] = sm.encode({"username": "previous period"}, now=now - 60)
        assert len({jwt.get_unverified_header(t)["kid"] for t in tokens.values()}) == 2
    for username, token in tokens.items():
        key = await asyncio.to_thread(client.get_signing_key_from_jwt, token)
        assert jwt.decode(token, key, algorithms=[sm.algorithm])["username"] == username
        with pytest.raises(jwt.InvalidSignatureError):
            jwt.decode(tampered(token), key, algorithms=[sm.algorithm])
    if sm.rotation_seconds:  # the next period's key is there before its first token
        upcoming = str(jwtplus.period_of(now, 60) + 1)
        assert (await asyncio.to_thread(client.get_signing_key, upcoming)).key_id == upcoming
    else:
        old = thumbprint(private_key(KIND[kind] + "-b"))
        assert (await asyncio.to_thread(client.get_signing_key, old)).key_id == old


# -- Two real servers, one secret, rotating EdDSA keys --

KEYS_INTERVAL = 2
KEYS_EXPTIME = 10
MINT_SECONDS = 5.0  # at least two period boundaries of 2 s


@dataclass
class KeyServers:
    secret: str
    servers: list[Server]

    def manager(self, secret: str | None = None) -> SecretManager:
        return SecretManager(
            secret=secret or self.secret,
            algorithm="EdDSA",
            refresh_interval=KEYS_INTERVAL,
            exptime=KEYS_EXPTIME,
        )


@pytest.fixture
async def key_servers(spawn: Spawn, tmp_path: Path) -> KeyServers:
    secret = secrets.token_urlsafe(32)
    script = tmp_path / "rotation_server.py"
    script.write_text(ROTATION_SERVER)
    env = {"JWTPLUS_TEST_SECRET": secret}
    settings = ("--algorithm", "EdDSA", "--interval", str(KEYS_INTERVAL), "--exptime", f"{KEYS_EXPTIME}s")
    return KeyServers(
        secret, [await spawn(name, script, "--name", name, *settings, env=env) for name in ("A", "B")]
    )


class MintedToken(NamedTuple):
    server: str
    token: str
    kid: int


class PublishedSet(NamedTuple):
    before: float
    after: float
    bodies: tuple[bytes, ...]


async def get_bytes(session: ClientSession, url: str) -> bytes:
    async with session.get(url) as response:
        assert response.status == 200, url
        return await response.read()


async def mint_across_boundaries(
    servers: list[Server], verify: Callable[[str], Awaitable[None]]
) -> tuple[list[MintedToken], list[PublishedSet]]:
    """For MINT_SECONDS, mint on every server and fetch every JWKS at once, handing each token to
    *verify* as it comes (so a verifier meets each new period's first tokens)."""
    minted: list[MintedToken] = []
    published: list[PublishedSet] = []
    deadline = time.monotonic() + MINT_SECONDS
    async with ClientSession(timeout=HTTP_TIMEOUT) as session:
        while time.monotonic() < deadline:
            tokens = await asyncio.gather(*(get_bytes(session, s.url + "/mint") for s in servers))
            for server, token in zip(servers, tokens, strict=True):
                text = token.decode()
                minted.append(MintedToken(server.name, text, int(jwt.get_unverified_header(text)["kid"])))
                await verify(text)
            before = time.time()
            bodies = await asyncio.gather(*(get_bytes(session, s.url + JWKS_PATH) for s in servers))
            published.append(PublishedSet(before, time.time(), tuple(bodies)))
            await asyncio.sleep(0.2)
    assert len({m.kid for m in minted}) >= 3, "two period boundaries crossed"
    return minted, published


def check_published(keys: KeyServers, minted: list[MintedToken], published: list[PublishedSet]) -> None:
    ours = keys.manager()
    same_period = [p for p in published if period_of_time(p.before) == period_of_time(p.after)]
    assert len({period_of_time(p.before) for p in same_period}) >= 3
    for entry in same_period:
        assert len(set(entry.bodies)) == 1, entry  # A and B publish byte for byte the same set
        expected = jwtplus.public_jwks(ours, now=entry.before)
        assert json.loads(entry.bodies[0]) == expected
        kids = [int(key["kid"]) for key in expected["keys"]]
        assert period_of_time(entry.before) + 1 in kids  # the next period, ahead of its first token
    all_kids = {int(k["kid"]) for p in published for body in p.bodies for k in json.loads(body)["keys"]}
    assert {m.kid for m in minted} <= all_kids


def period_of_time(instant: float) -> int:
    return jwtplus.period_of(instant, KEYS_INTERVAL)


async def test_pyjwkclient_verifies_two_rotating_servers_tokens_across_boundaries(
    key_servers: KeyServers,
) -> None:
    a, b = key_servers.servers
    # lifespan=1 s, under the 2 s period (the longest max-age the handler sends: PyJWKClient ignores
    # Cache-Control), and a cooldown that never lets an unknown kid force a refetch: every key must
    # already be in the set cached, the next period's included (PyJWT 2.13 has no cooldown: there, an
    # unknown kid refetches, and the test proves less).
    client = jwt.PyJWKClient(a.url + JWKS_PATH, cache_jwk_set=True, lifespan=1, **pyjwk_cooldown(3600))

    async def verify(token: str) -> None:
        key = await asyncio.to_thread(client.get_signing_key_from_jwt, token)
        assert jwt.decode(token, key, algorithms=["EdDSA"])["username"].startswith("user-of-")

    minted, published = await mint_across_boundaries(key_servers.servers, verify)
    for token in [m.token for m in minted]:  # and all of them again, now that periods have passed
        await verify(token)
    assert {m.server for m in minted} == {"A", "B"}
    check_published(key_servers, minted, published)
    async with ClientSession(timeout=HTTP_TIMEOUT) as session:  # and each server takes the other's
        for m in (minted[0], minted[-1]):
            for server in (a, b):
                async with session.get(server.url + "/me", headers=bearer(m.token)) as response:
                    assert response.status == 200, (m, server.logs())
                    assert (await response.json())["username"] == "user-of-" + m.server
    forged = key_servers.manager(secrets.token_urlsafe(32)).encode({"username": "mallory"})
    with pytest.raises(jwt.InvalidSignatureError):
        await verify(forged)


# -- Node's jose against the two servers --

JOSE_VERIFY = ROOT / ".ci" / "peers" / "jose_verify.mjs"
NODE = shutil.which("node")


class JoseVerifier:
    """node .ci/peers/jose_verify.mjs: one token a line in, one JSON answer a line out."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def verify(self, token: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(token.encode() + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), RUN_TIMEOUT)
        assert line, "jose_verify.mjs exited"
        answer: dict[str, Any] = json.loads(line)
        return answer


@contextlib.asynccontextmanager
async def jose_verifier(*args: str) -> AsyncIterator[JoseVerifier]:
    if NODE is None or not (ROOT / "node_modules" / "jose").is_dir():
        pytest.skip("needs node and node_modules/jose: run npm ci (CI installs them)")
    proc = await asyncio.create_subprocess_exec(
        NODE,
        str(JOSE_VERIFY),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
        assert ready == b"ready\n", ready
        yield JoseVerifier(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_jose_verifies_two_rotating_servers_tokens_across_boundaries_and_refuses_forgeries(
    key_servers: KeyServers,
) -> None:
    a, _ = key_servers.servers
    # jose's own cooldown (30 s) and a cache of 1 s, under the 2 s period: as with PyJWKClient, a
    # token whose kid is not in the cached set would fail, not be saved by a refetch.
    args = ("--jwks-url", a.url + JWKS_PATH, "--algorithms", "EdDSA", "--cache-max-age-ms", "1000")
    async with jose_verifier(*args) as jose:
        answers: list[tuple[str, dict[str, Any]]] = []

        async def verify(token: str) -> None:
            answers.append((token, await jose.verify(token)))

        minted, published = await mint_across_boundaries(key_servers.servers, verify)
        for m in minted:
            answers.append((m.token, await jose.verify(m.token)))
        by_token = {m.token: m for m in minted}
        for token, answer in answers:
            m = by_token[token]
            assert answer["ok"] is True, (m, answer)
            assert answer["kid"] == str(m.kid)
            assert answer["payload"]["username"] == "user-of-" + m.server
        check_published(key_servers, minted, published)

        ours = key_servers.manager()
        good = ours.encode({"username": "ann"})
        assert (await jose.verify(good))["ok"] is True
        refused = {
            "another secret": key_servers.manager(secrets.token_urlsafe(32)).encode({"username": "mallory"}),
            "tampered": tampered(good),
            "a retired period": ours.encode({"username": "ann"}, now=time.time() - 60),
            "HS256 keyed with the JWK": next(
                iter(confusion_tokens(ours, good_kid(good), time.time()).values())
            ),
            "expired": ours.encode({"username": "ann", "exp": int(time.time()) - 5}),
        }
        for why, token in refused.items():
            answer = await jose.verify(token)
            assert answer["ok"] is False, (why, answer)
            assert answer["code"].startswith("ERR_"), (why, answer)
        assert (await jose.verify(refused["another secret"]))[
            "code"
        ] == "ERR_JWS_SIGNATURE_VERIFICATION_FAILED"


def good_kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


# -- A real OpenID provider: panva's oidc-provider under Node --

OIDC_PEER = ROOT / ".ci" / "peers" / "oidc_provider.mjs"
OIDC_INSTALLED = (ROOT / "node_modules" / "oidc-provider").is_dir()
CLIENT_ID, CLIENT_SECRET = "resource-test", "resource-test-secret-0123456789abcdef"

needs_oidc_provider = pytest.mark.skipif(
    NODE is None or not OIDC_INSTALLED or not OIDC_PEER.exists(),
    reason="needs node and oidc-provider (npm ci in the checkout; CI installs both)",
)


@dataclass
class OidcPeer:
    """One oidc-provider process, restartable on its port with other keys."""

    tmp_path: Path
    port: int = field(default_factory=free_port)
    server: Server | None = None
    starts: int = 0

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, keys: list[Key], alg: str, resource: str = AUDIENCE) -> None:
        await self.stop()
        self.starts += 1
        name = f"oidc-provider-{self.starts}"
        key_file = self.tmp_path / f"{name}.keys.json"
        key_file.write_text(json.dumps({"keys": [k.private_jwk() for k in keys]}))
        stdout_path, stderr_path = self.tmp_path / f"{name}.stdout", self.tmp_path / f"{name}.stderr"
        assert NODE is not None
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                NODE,
                str(OIDC_PEER),
                "--port",
                str(self.port),
                "--keys",
                str(key_file),
                "--alg",
                alg,
                "--resource",
                resource,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=ROOT,
            )
        self.server = Server(name, proc, self.issuer, stdout_path, stderr_path)
        await wait_until_accepting(self.server, self.port)
        deadline = time.monotonic() + START_TIMEOUT
        while f"ready {self.issuer}" not in self.server.stdout():
            assert time.monotonic() < deadline, self.server.logs()
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self.server is not None:
            assert await self.server.stop() == 0, self.server.logs()
            self.server = None

    async def token(self, resource: str = AUDIENCE) -> str:
        """An access token by the client_credentials grant, for *resource* (RFC 8707)."""
        basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.get(self.issuer + "/.well-known/openid-configuration") as response:
                assert response.status == 200
                endpoint = (await response.json())["token_endpoint"]
            async with http.post(
                endpoint,
                data={"grant_type": "client_credentials", "resource": resource, "scope": "api:read"},
                headers={"Authorization": f"Basic {basic}"},
            ) as response:
                answer = await response.json()
                assert response.status == 200, answer
        assert answer["token_type"].lower() == "bearer"
        token: str = answer["access_token"]
        return token


@pytest.fixture
async def oidc_peer(tmp_path: Path) -> AsyncIterator[OidcPeer]:
    peer = OidcPeer(tmp_path)
    try:
        yield peer
    finally:
        server = peer.server
        await peer.stop()
        if server is not None:
            print(server.logs())  # shown by pytest when the test failed


def peer_keys(alg: str, *names: str) -> list[Key]:
    """Keys of *alg* named *names* (the first signs), with an RS256 key last: oidc-provider refuses the
    client (its id_token_signed_response_alg defaults to RS256) when no RS256 key is published."""
    make = {"RS256": rs, "ES256": es, "EdDSA": ed, "PS256": ps}[alg]
    keys = [make(f"peer-{name}") for name in names]
    return keys if alg == "RS256" else [*keys, rs("peer-companion")]


@needs_oidc_provider
@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_the_consumer_verifies_a_real_openid_providers_tokens_through_its_rotation(
    aiohttp_client: Any, oidc_peer: OidcPeer, provider_clock: ShiftedClock, alg: str
) -> None:
    old, new = peer_keys(alg, "old")[0], peer_keys(alg, "new")[0]
    await oidc_peer.start(peer_keys(alg, "old"), alg)
    provider = jwtplus.IdentityProvider(
        issuer=oidc_peer.issuer, audience=AUDIENCE, algorithms=(alg,), cooldown=1
    )
    client = await resource(
        aiohttp_client, provider, clock=provider_clock
    )  # keys by OpenID discovery: no jwks_uri
    old_token = await oidc_peer.token()
    header = jwt.get_unverified_header(old_token)
    assert (header["alg"], header["kid"], header["typ"]) == (alg, old.kid, "at+jwt")
    async with client.get("/api/me", headers=bearer(old_token)) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["sub"] == CLIENT_ID  # RFC 9068: a client's own token has its client_id as sub
    assert answer["carry"]["aud"] == AUDIENCE
    assert answer["carry"]["client_id"] == CLIENT_ID
    assert answer["iss"] == oidc_peer.issuer
    forged = jwt.encode(  # the right claims under a key the provider never had
        {**jwt.decode(old_token, options={"verify_signature": False}), "sub": "admin"},
        peer_keys(alg, "forger")[0].private,
        algorithm=alg,
        headers={"kid": old.kid, "typ": "at+jwt"},
    )
    assert await status_of(client, forged) == 401

    # rotation: the provider signs with a new key and still publishes the old one
    await oidc_peer.start([new, old, *peer_keys(alg)], alg)
    new_token = await oidc_peer.token()
    assert jwt.get_unverified_header(new_token)["kid"] == new.kid
    provider_clock.advance(1.5)  # the restart may have taken less than the cooldown
    assert await status_of(client, new_token) == 200  # one refetch learns the new kid
    assert await status_of(client, old_token) == 200
    fresh = await resource(
        aiohttp_client, provider, clock=provider_clock
    )  # a second server, with no cache at all
    assert [await status_of(fresh, t) for t in (old_token, new_token)] == [200, 200]

    # the old key is withdrawn: its tokens verify until a refetch says so, then never again
    await oidc_peer.start([new, *peer_keys(alg)], alg)
    assert await status_of(client, old_token) == 200
    provider_clock.advance(1.5)
    unknown = jwt.encode(
        jwt.decode(new_token, options={"verify_signature": False}),
        new.private,
        algorithm=alg,
        headers={"kid": "no-such-kid", "typ": "at+jwt"},
    )
    assert await status_of(client, unknown) == 401  # the refetch: no such kid
    assert await status_of(client, old_token) == 401
    assert await status_of(client, new_token) == 200
    newest = await oidc_peer.token()
    assert await status_of(client, newest) == 200


@needs_oidc_provider
async def test_a_real_providers_token_for_another_resource_is_refused(
    aiohttp_client: Any, oidc_peer: OidcPeer
) -> None:
    other = "https://other.jwtplus.test"
    await oidc_peer.start(peer_keys("PS256", "a"), "PS256", resource=other)
    token = await oidc_peer.token(resource=other)
    assert jwt.get_unverified_header(token)["alg"] == "PS256"
    ours = jwtplus.IdentityProvider(issuer=oidc_peer.issuer, audience=AUDIENCE, algorithms=("PS256",))
    theirs = jwtplus.IdentityProvider(issuer=oidc_peer.issuer, audience=other, algorithms=("PS256",))
    assert await status_of(await resource(aiohttp_client, ours), token) == 401
    assert await status_of(await resource(aiohttp_client, theirs), token) == 200


# -- A real browser against the SPA demo --

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = EXAMPLES / "spa" / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # this machine's network is closed: no phoning home
    "--disable-component-update",
    "--disable-sync",
]

ATTACKER = '''
import argparse
from aiohttp import web

parser = argparse.ArgumentParser()
parser.add_argument("--host")
parser.add_argument("--port", type=int)
parser.add_argument("--target")
args = parser.parse_args()
PAGE = """<!doctype html><title>evil</title>
<form id="f" method="POST" action="%(target)s/api/setattr"><input name="x" value="1"></form>
<script>
async function attack() {
  try {
    await fetch("%(target)s/api/setattr", {method: "POST", credentials: "include", body: "x=1"});
    return "sent";
  } catch (error) { return "blocked: " + error; }
}
</script>""" % {"target": args.target}

async def evil(request):
    return web.Response(text=PAGE, content_type="text/html")

app = web.Application()
app.router.add_get("/", evil)
web.run_app(app, host=args.host, port=args.port, print=None)
'''


async def attacker_posts(demo: Server, attacker: Server) -> list[str]:
    """Statuses the demo's access log shows for POSTs to its API from the attacker's page."""
    pattern = re.compile(r'"POST /api/setattr HTTP/1\.1" (\d{3}) .*"' + re.escape(attacker.url) + '/"')
    for _ in range(100):
        statuses = pattern.findall(demo.stderr())
        if statuses:
            return statuses
        await asyncio.sleep(0.05)
    return []


@pytest.mark.skipif(
    not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium (.ci/run installs it)"
)
async def test_the_spa_demo_in_a_real_browser(spawn: Spawn, tmp_path: Path) -> None:
    playwright_api = pytest.importorskip("playwright.async_api", reason="needs playwright (the test extra)")

    demo = await spawn("spa_demo", EXAMPLES / "spa_demo.py")
    attacker_script = tmp_path / "attacker.py"
    attacker_script.write_text(ATTACKER)
    attacker = await spawn("attacker", attacker_script, "--target", demo.url)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 900, "height": 640})
            page = await context.new_page()

            # Logged out, the app's URL shows the login page.
            await page.goto(f"{demo.url}/index.html")
            await page.wait_for_selector("#login-form")
            await page.screenshot(path=str(SCREENSHOTS / "logged-out.png"))

            # A wrong password stays on the login page.
            await page.fill("#username", "jacky")
            await page.fill("#password", "not the password")
            await page.click("button[type=submit]")
            await page.wait_for_function("document.getElementById('error').textContent !== ''")
            assert "Wrong username or password" in await page.text_content("#error")

            # Log in: land on the app, with the user's name.
            await page.fill("#password", "jwtplus-demo")
            async with page.expect_navigation():
                await page.click("button[type=submit]")
            await page.wait_for_selector("#app-page")
            await page.wait_for_function("document.getElementById('user').textContent === 'jacky'")
            assert page.url == f"{demo.url}/index.html"

            # The token cookie is HttpOnly (scripts cannot see it) and SameSite=Lax.
            cookies = {cookie["name"]: cookie for cookie in await context.cookies()}
            assert cookies["__Host-access_token"]["httpOnly"] is True
            assert cookies["__Host-access_token"]["sameSite"] == "Lax"
            assert cookies["__Host-access_token"]["secure"] is True
            assert cookies["__Host-csrf_token"]["httpOnly"] is False
            document_cookie = await page.evaluate("document.cookie")
            assert "access_token" not in document_cookie
            assert "__Host-csrf_token=" in document_cookie

            # A logged-in visit to the login page shows the app.
            await page.goto(f"{demo.url}/login.html")
            await page.wait_for_selector("#app-page")
            await page.wait_for_function("document.getElementById('user').textContent === 'jacky'")

            # The protected API answers 200 with the CSRF header, 403 without it.
            await page.click("#call-api")
            await page.wait_for_function("document.getElementById('result').textContent !== ''")
            assert (await page.text_content("#result")).startswith("200 ")
            await page.screenshot(path=str(SCREENSHOTS / "logged-in.png"))
            status = await page.evaluate("async () => (await fetch('/api/setattr', {method: 'POST'})).status")
            assert status == 403

            # jacky is no admin: the admin-only action answers 403.
            await page.click("#admin-action")
            await page.wait_for_function("document.getElementById('result').textContent.startsWith('403')")

            # The access token expires (its cookie is dropped): the page renews it silently.
            refresh_before = cookies["__Host-refresh_token"]["value"]
            await context.clear_cookies(name="__Host-access_token")
            await page.goto(f"{demo.url}/index.html")  # logged out for a moment: the login page...
            await page.wait_for_selector("#app-page")  # ...renews and comes back to the app
            await page.wait_for_function("document.getElementById('user').textContent === 'jacky'")
            renewed = {cookie["name"]: cookie["value"] for cookie in await context.cookies()}
            assert renewed["__Host-refresh_token"] != refresh_before
            assert "__Host-access_token" in renewed

            # A page on another origin (a second port) that POSTs with credentials is refused.
            # The fetch's answer is hidden from the attacker's script (CORS), so read the demo's access log.
            evil = await context.new_page()
            await evil.goto(attacker.url)
            assert (await evil.evaluate("attack()")).startswith("blocked")
            assert await attacker_posts(demo, attacker) == ["403"]
            async with evil.expect_navigation() as navigated:
                await evil.evaluate("document.getElementById('f').submit()")
            posted = await navigated.value
            assert posted is not None
            assert posted.status == 403
            assert await posted.text() == '{"error":"csrf_failed"}'
            assert await attacker_posts(demo, attacker) == ["403", "403"]
            await evil.close()

            # Log out: the app shows the login page again, the cookies are gone, the family is revoked.
            refresh_last = renewed["__Host-refresh_token"]
            async with page.expect_navigation():
                await page.click("#logout")
            await page.wait_for_selector("#login-form")
            assert page.url == f"{demo.url}/index.html"
            assert not [c for c in await context.cookies() if "token" in c["name"]]
            status, _ = await fetch(
                f"{demo.url}/api/refresh", method="POST", json_body={"refresh_token": refresh_last}
            )
            assert status == 401

            # The admin may do the admin-only action.
            await page.fill("#username", "admin")
            await page.fill("#password", "jwtplus-admin")
            async with page.expect_navigation():
                await page.click("button[type=submit]")
            await page.wait_for_function("document.getElementById('user').textContent === 'admin'")
            await page.click("#admin-action")
            await page.wait_for_function("document.getElementById('result').textContent.startsWith('200')")
        finally:
            await browser.close()


@pytest.mark.skipif(
    not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium (.ci/run installs it)"
)
async def test_the_demo_live_panel_renews_at_expiry_and_ends_with_a_logout_in_another_tab(
    spawn: Spawn,
) -> None:
    playwright_api = pytest.importorskip("playwright.async_api", reason="needs playwright (the test extra)")
    demo = await spawn("spa_demo", EXAMPLES / "spa_demo.py", "--access-exptime", "3s")
    log_has = "(text) => document.getElementById('live-log').textContent.includes(text)"
    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context()
            page = await context.new_page()
            await page.goto(f"{demo.url}/login.html")
            await page.fill("#username", "jacky")
            await page.fill("#password", "jwtplus-demo")
            async with page.expect_navigation():
                await page.click("button[type=submit]")
            await page.wait_for_function(log_has, arg="connected as jacky", timeout=10_000)
            await page.wait_for_function(
                "document.getElementById('live-state').textContent.startsWith('connected, token expires in')",
                timeout=5_000,
            )
            # The 3-second access token expires: the server closes the socket, the page renews and
            # reconnects, on the same page.
            await page.wait_for_function(log_has, arg="closed 4401 (token expired)", timeout=10_000)
            await page.wait_for_function(log_has, arg="renewed the tokens over HTTP", timeout=5_000)
            await page.wait_for_function(
                "document.getElementById('live-log').textContent.split('connected as jacky').length > 2",
                timeout=5_000,
            )
            assert page.url == f"{demo.url}/index.html"
            # A second tab logs out: the first tab's socket is closed and its page goes to the login page.
            other = await context.new_page()
            await other.goto(f"{demo.url}/index.html")
            await other.wait_for_selector("#app-page")
            await other.click("#logout")
            await page.wait_for_url(f"{demo.url}/login.html", timeout=12_000)
            await page.wait_for_selector("#login-form")
        finally:
            await browser.close()
    statuses = re.findall(r'"GET /api/socket HTTP/1\.1" (\d{3}) ', demo.stderr())
    assert statuses[:2] == ["101", "101"], statuses


# -- A real browser: a sibling subdomain's page opens the app's WebSocket --
#
# The app is https://app.jwtplus.test, the attacker https://evil.jwtplus.test: another origin but the
# same site, so the SameSite=Lax token cookie goes along with the attacker's handshake. Chromium
# resolves both names to 127.0.0.1 (--host-resolver-rules) and accepts the test's self-signed
# certificate (ignore_https_errors, which covers wss too).

OPENSSL = shutil.which("openssl")
APP_HOST, EVIL_HOST = "app.jwtplus.test", "evil.jwtplus.test"
TLS_CHROMIUM_ARGS = [*CHROMIUM_ARGS, "--host-resolver-rules=MAP *.jwtplus.test 127.0.0.1"]

TLS_PAGE_SERVER = """
import argparse
import ssl
from pathlib import Path
from aiohttp import web

parser = argparse.ArgumentParser()
parser.add_argument("--host")
parser.add_argument("--port", type=int)
parser.add_argument("--page")
parser.add_argument("--certfile")
parser.add_argument("--keyfile")
args = parser.parse_args()
PAGE = Path(args.page).read_bytes()
tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
tls.load_cert_chain(args.certfile, args.keyfile)

async def page(request):
    return web.Response(body=PAGE, content_type="text/html")

app = web.Application()
app.router.add_get("/", page)
web.run_app(app, host=args.host, port=args.port, ssl_context=tls, print=None)
"""

# Open a WebSocket, close it after its first message, and resolve to what happened, in order.
LISTEN = """(url) => new Promise((resolve) => {
  const events = [];
  const socket = new WebSocket(url);
  socket.onopen = () => events.push("open");
  socket.onmessage = (event) => { events.push(event.data); socket.close(1000); };
  socket.onerror = () => events.push("error");
  socket.onclose = (event) => { events.push("close " + event.code); resolve(events); };
})"""


async def self_signed_certificate(directory: Path, *names: str) -> tuple[Path, Path]:
    """A one-day self-signed certificate for *names*, and its key: (certfile, keyfile)."""
    assert OPENSSL is not None
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    proc = await asyncio.create_subprocess_exec(
        OPENSSL,
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "1",
        "-subj",
        f"/CN={names[0]}",
        "-addext",
        "subjectAltName=" + ",".join(f"DNS:{name}" for name in names),
        "-keyout",
        str(keyfile),
        "-out",
        str(certfile),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    assert proc.returncode == 0, output.decode(errors="replace")
    return certfile, keyfile


def https_url(server: Server, host: str) -> str:
    """The https URL of *server* (listening on 127.0.0.1) under the name *host*."""
    return f"https://{host}:{yarl.URL(server.url).port}"


async def socket_statuses(demo: Server, count: int) -> list[str]:
    """The statuses of the demo's access log for GET /api/socket, once there are *count* (or 5s on)."""
    pattern = re.compile(r'"GET /api/socket HTTP/1\.1" (\d{3}) ')
    for _ in range(100):
        statuses: list[str] = pattern.findall(demo.stderr())
        if len(statuses) >= count:
            return statuses
        await asyncio.sleep(0.05)
    return statuses


# -- The demo: two tabs, a forced logout, a splash, a phone, a busy port, the login page's assets --


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """Debian's Chromium driven by Playwright, closed on the way out (skips without playwright)."""
    playwright_api = pytest.importorskip("playwright.async_api", reason="needs playwright (the test extra)")
    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


needs_chromium = pytest.mark.skipif(
    not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium (.ci/run installs it)"
)
PAGES = EXAMPLES / "spa"
ENDED_NOTE = "Your session ended, please log in again."


async def browser_log_in(
    page: Any,
    demo: Server,
    username: str = "jacky",
    password: str = "jwtplus-demo",  # noqa: S107
) -> None:
    await page.goto(f"{demo.url}/login.html")
    await page.fill("#username", username)
    await page.fill("#password", password)
    async with page.expect_navigation():
        await page.click("button[type=submit]")
    await page.wait_for_function(f"document.getElementById('user').textContent === {username!r}")


CALL_API = "(path) => api(path, 'POST').then((response) => response.status)"  # the page's own api()


def refreshes(demo: Server) -> list[str]:
    """The statuses of the demo's access log for POST /api/refresh, in order."""
    return re.findall(r'"POST /api/refresh HTTP/1\.1" (\d{3}) ', demo.stderr())


# -- 18: two tabs, and several requests in one tab, never log the user out by themselves --

ME_STATUS = "() => fetch('/api/me').then((response) => response.status)"


async def two_logged_in_tabs(context: Any, demo: Server) -> tuple[Any, Any]:
    """Two pages of one browser context (their cookies shared), jacky logged in through the first."""
    first, second = await context.new_page(), await context.new_page()
    await browser_log_in(first, demo)
    await second.goto(f"{demo.url}/index.html")
    await second.wait_for_function("document.getElementById('user').textContent === 'jacky'")
    return first, second


@needs_chromium
async def test_two_tabs_whose_access_cookie_is_dropped_at_once_stay_logged_in(spawn: Spawn) -> None:
    demo = await spawn("spa_demo", EXAMPLES / "spa_demo.py")
    async with chromium() as browser:
        context = await browser.new_context()
        first, second = await two_logged_in_tabs(context, demo)

        # Every refresh is held 300 ms on its way, so two tabs that do not wait for each other
        # both send the same refresh token before either gets its new pair.
        async def slow(route: Any) -> None:
            await asyncio.sleep(0.3)
            await route.continue_()

        await context.route("**/api/refresh", slow)

        # The access token "expires" in both tabs at once; both call the API at the same moment.
        await context.clear_cookies(name="__Host-access_token")
        statuses = await asyncio.gather(
            first.evaluate(CALL_API, "/api/setattr"),
            second.evaluate(CALL_API, "/api/setattr"),
            return_exceptions=True,
        )
        assert statuses == [200, 200], statuses
        for page in (first, second):
            assert page.url == f"{demo.url}/index.html"
            assert await page.is_visible("#app-page")
        assert refreshes(demo) == ["200"], "one tab renewed, the other used its new pair"

        # Several requests at once in one tab: one refresh, every request answered.
        await context.clear_cookies(name="__Host-access_token")
        many = await first.evaluate(
            "() => Promise.all(['/api/setattr', '/api/setattr', '/api/setattr', '/api/admin', "
            "'/api/setattr'].map((path) => api(path, 'POST').then((response) => response.status)))"
        )
        assert many == [200, 200, 200, 403, 200], many
        assert refreshes(demo) == ["200", "200"]

        # The family lives: a later request from either tab, with no refresh in between, works.
        for page in (first, second):
            assert await page.evaluate(ME_STATUS) == 200
        await context.unroute("**/api/refresh")
        await context.clear_cookies(name="__Host-access_token")
        assert await second.evaluate(CALL_API, "/api/setattr") == 200
        assert first.url == second.url == f"{demo.url}/index.html"
    assert refreshes(demo) == ["200", "200", "200"]
    assert "used twice" not in demo.stderr()


@needs_chromium
async def test_without_web_locks_the_reuse_grace_keeps_racing_tabs_logged_in(spawn: Spawn) -> None:
    demo = await spawn("spa_demo", EXAMPLES / "spa_demo.py")
    async with chromium() as browser:
        context = await browser.new_context()
        # A browser without the Web Locks API: nothing serializes the tabs' refreshes.
        await context.add_init_script(
            "Object.defineProperty(Navigator.prototype, 'locks', {get: () => undefined})"
        )
        pages = await two_logged_in_tabs(context, demo)
        assert await pages[1].evaluate("navigator.locks === undefined")

        # Each refresh reaches the server at once, and its answer reaches the page 300 ms later:
        # the other tab's refresh goes out meanwhile, with the same refresh token.
        async def late(route: Any) -> None:
            response = await route.fetch()
            await asyncio.sleep(0.3)
            await route.fulfill(response=response)

        await context.route("**/api/refresh", late)
        for attempt in range(3):  # both refreshes carry the same refresh token: a reuse, forgiven
            await context.clear_cookies(name="__Host-access_token")
            statuses = await asyncio.gather(
                *(page.evaluate(CALL_API, "/api/setattr") for page in pages), return_exceptions=True
            )
            assert statuses == [200, 200], (attempt, statuses, refreshes(demo))
        for page in pages:
            assert page.url == f"{demo.url}/index.html"
            assert await page.evaluate(ME_STATUS) == 200
    assert refreshes(demo).count("200") == 3, refreshes(demo)
    assert refreshes(demo).count("401") >= 1, f"no race happened: {refreshes(demo)}"
    assert "used twice" not in demo.stderr()


# -- 19: a forced logout says so on the login page --


@needs_chromium
async def test_a_forced_logout_lands_on_the_login_page_with_a_note(spawn: Spawn) -> None:
    demo = await spawn("spa_demo", EXAMPLES / "spa_demo.py")
    async with chromium() as browser:
        context = await browser.new_context()
        page = await context.new_page()

        # A logout the user asked for: the login page, no note.
        await browser_log_in(page, demo)
        async with page.expect_navigation():
            await page.click("#logout")
        await page.wait_for_selector("#login-form")
        assert await page.is_hidden("#note")

        # The server ends the login behind the page's back (its family revoked, as a logout on
        # another device does); the access token then expires, and the refresh is refused.
        await browser_log_in(page, demo)
        refresh_token = {c["name"]: c["value"] for c in await context.cookies()}["__Host-refresh_token"]
        status, _ = await fetch(
            f"{demo.url}/api/logout", method="POST", json_body={"refresh_token": refresh_token}
        )
        assert status == 200
        await page.click("#call-api")
        await page.wait_for_url(f"{demo.url}/login.html")
        await page.wait_for_selector("#login-form")
        await page.wait_for_selector("#note")
        assert (await page.text_content("#note")) == ENDED_NOTE
        # The page's refresh, refused; then the login page's silent one (the CSRF cookie is
        # still there: the server revoked the family, it cleared no cookie), refused too.
        assert refreshes(demo) == ["401", "401"]

        # The note is said once: reloading the login page drops it.
        await page.reload()
        await page.wait_for_selector("#login-form")
        assert await page.is_hidden("#note")


# -- 22: make demo binds first; a busy port is one line; PORT= picks the port --


async def run_command(*command: str, cwd: Path = ROOT) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(),
        cwd=cwd,
    )
    out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def make_demo(port: int) -> list[str]:
    """`make demo PORT=port`, with this test's Python and without installing it again."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("needs make (apt-get install make)")
    bin_dir = str(Path(sys.executable).parent)
    return [make, "-s", "-o", ".venv/.installed", "demo", f"PORT={port}", f"BIN={bin_dir}"]


async def test_a_busy_port_is_a_one_line_error_and_port_picks_another(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        # The script itself: nothing on stdout (no banner, no passwords), one line on stderr.
        code, out, err = await run_command(
            sys.executable, *WARNING_FLAGS, str(EXAMPLES / "spa_demo.py"), "--port", str(port)
        )
        assert code != 0
        assert out == ""
        assert err.splitlines() == [
            f"spa_demo: port {port} on 127.0.0.1 is already in use (make demo PORT=8081 picks another)"
        ]

        # Through make: the same line, then make's own "Error 1"; no traceback, no banner.
        code, out, err = await run_command(*make_demo(port))
        assert code != 0
        assert out == ""
        assert err.splitlines()[0] == f"spa_demo: port {port} on 127.0.0.1 is already in use " + (
            "(make demo PORT=8081 picks another)"
        )
        assert "Traceback" not in err
        assert "password" not in out + err

    # make demo PORT=<a free port> serves there, and prints the banner once it listens.
    port = free_port()
    stdout_path, stderr_path = tmp_path / "make.stdout", tmp_path / "make.stderr"
    with stdout_path.open("wb") as out_file, stderr_path.open("wb") as err_file:
        proc = await asyncio.create_subprocess_exec(
            *make_demo(port),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out_file,
            stderr=err_file,
            env=subprocess_env(),
            cwd=ROOT,
            start_new_session=True,
        )
    server = Server("make demo", proc, f"http://127.0.0.1:{port}", stdout_path, stderr_path)
    try:
        await wait_until_accepting(server, port)
        assert server.stdout().splitlines()[:3] == [
            f"jwtplus SPA demo on http://127.0.0.1:{port}/index.html - log in as",
            "    username: jacky  password: jwtplus-demo   (user)",
            "    username: admin  password: jwtplus-admin  (admin)",
        ]
        async with ClientSession(timeout=HTTP_TIMEOUT) as session:
            async with session.post(
                f"{server.url}/api/login", json={"username": "jacky", "password": "jwtplus-demo"}
            ) as response:
                assert response.status == 200
                access = response.cookies["__Host-access_token"].value
            async with session.get(
                f"{server.url}/api/me", headers={"Cookie": f"__Host-access_token={access}"}
            ) as response:
                assert (response.status, await response.json()) == (
                    200,
                    {"username": "jacky", "role": "user"},
                )
    finally:
        # make and the demo under it are one process group of their own: stop both.
        os.killpg(proc.pid, signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)
        print(server.logs())


# -- 16: the login page's own assets are served without a token --


async def test_the_login_pages_assets_are_served_without_a_token(spawn: Spawn) -> None:
    demo = await spawn("spa_demo", EXAMPLES / "spa_demo.py")
    assets = {
        "/static/login.css": ("text/css", PAGES / "login.css"),
        "/favicon.ico": ("image/vnd.microsoft.icon", PAGES / "favicon.ico"),
        "/robots.txt": ("text/plain", PAGES / "robots.txt"),
    }
    async with ClientSession(timeout=HTTP_TIMEOUT) as session:
        for path, (content_type, file) in assets.items():
            async with session.get(demo.url + path) as response:
                assert (response.status, response.content_type) == (200, content_type), path
                assert await response.read() == file.read_bytes(), path
        # The whitelist is those files, no more: anything else is still the login page.
        for path in ("/static/other.css", "/static/login.css.map", "/favicon.ico/x", "/faviconXico"):
            async with session.get(demo.url + path) as response:
                assert (response.status, response.content_type) == (200, "text/html"), path
                assert 'id="login-form"' in await response.text(), path
    assert "Traceback" not in demo.stderr()


@needs_chromium
async def test_the_login_page_loads_its_stylesheet_and_icon(spawn: Spawn) -> None:
    demo = await spawn("spa_demo", EXAMPLES / "spa_demo.py")
    async with chromium() as browser:
        page = await (await browser.new_context()).new_page()
        answers: dict[str, tuple[int, str]] = {}

        async def seen(response: Any) -> None:
            answers[response.url.removeprefix(demo.url)] = (
                response.status,
                (await response.all_headers()).get("content-type", ""),
            )

        page.on("response", seen)
        await page.goto(f"{demo.url}/index.html")
        await page.wait_for_selector("#login-form")
        # login.css applied: the card is 22rem wide at most, and the body's background is set.
        assert await page.evaluate("getComputedStyle(document.querySelector('main')).maxWidth") == "352px"
        icon = await page.evaluate("() => fetch('/favicon.ico').then((r) => r.blob()).then((b) => b.type)")
        assert icon == "image/vnd.microsoft.icon"
        assert answers["/static/login.css"] == (200, "text/css")


# -- 20: a neutral splash while the silent refresh runs --


@needs_chromium
async def test_the_login_form_does_not_flash_while_the_silent_refresh_runs(spawn: Spawn) -> None:
    demo = await spawn("spa_demo", EXAMPLES / "spa_demo.py")
    async with chromium() as browser:
        context = await browser.new_context()
        page = await context.new_page()
        # Logged out with no cookie at all: the form at once, no splash.
        await page.goto(f"{demo.url}/index.html")
        assert await page.is_visible("#login-form")
        assert await page.is_hidden("#splash")

        await browser_log_in(page, demo)
        await context.clear_cookies(name="__Host-access_token")
        held, release = asyncio.Event(), asyncio.Event()

        async def slow(route: Any) -> None:
            held.set()
            await release.wait()
            await route.continue_()

        await page.route("**/api/refresh", slow)
        # Before every frame the browser paints, note whether the login form is on screen.
        await page.add_init_script(
            """window.formShown = false;
            (function watch() {
              const form = document.getElementById("login-form");
              if (form && form.offsetParent !== null) window.formShown = true;
              requestAnimationFrame(watch);
            })();"""
        )
        await page.goto(f"{demo.url}/index.html")
        await page.wait_for_selector("#splash")
        await asyncio.wait_for(held.wait(), 10)
        await asyncio.sleep(0.5)  # a slow network: still the splash, and the form never painted
        assert await page.is_visible("#splash")
        assert await page.is_hidden("#login-form")
        assert await page.evaluate("window.formShown") is False
        assert (await page.text_content("#splash")) == "Checking your session…"
        release.set()
        await page.wait_for_selector("#app-page")
        await page.wait_for_function("document.getElementById('user').textContent === 'jacky'")
        assert page.url == f"{demo.url}/index.html"

        # A refused refresh ends the splash: the form.
        await page.unroute("**/api/refresh")
        await page.route(
            "**/api/refresh",
            lambda route: route.fulfill(status=401, body='{"error":"unauthorized"}'),
        )
        await context.clear_cookies(name="__Host-access_token")
        await page.goto(f"{demo.url}/index.html")
        await page.wait_for_selector("#login-form")
        assert await page.is_hidden("#splash")
        assert await page.evaluate("window.formShown") is True  # the watch sees a form when there is one


# -- 21: readable results, the admin button explained, the card's margins at 375 px --


async def card_margins(page: Any) -> tuple[float, float]:
    """The space left and right of the page's card, in CSS pixels, at a 375 px viewport."""
    box = await page.locator("main").bounding_box()
    assert box is not None
    return box["x"], 375 - (box["x"] + box["width"])


@needs_chromium
async def test_a_phone_sees_the_cards_with_margins_and_a_non_admin_is_told_why(spawn: Spawn) -> None:
    demo = await spawn("spa_demo", EXAMPLES / "spa_demo.py")
    result_is = "(text) => document.getElementById('result').textContent === text"
    async with chromium() as browser:
        context = await browser.new_context(viewport={"width": 375, "height": 740})
        page = await context.new_page()
        await page.goto(f"{demo.url}/index.html")
        await page.wait_for_selector("#login-form")
        assert min(await card_margins(page)) >= 8
        assert await page.evaluate("document.documentElement.scrollWidth") <= 375

        await browser_log_in(page, demo)
        assert min(await card_margins(page)) >= 8
        assert await page.evaluate("document.documentElement.scrollWidth") <= 375

        # jacky is told before and after that the admin-only action is not for her.
        assert await page.is_visible("#admin-hint")
        assert "needs the admin role" in await page.text_content("#admin-hint")
        await page.click("#call-api")
        await page.wait_for_function(result_is, arg="200 OK: attribute set for jacky")
        await page.click("#admin-action")
        await page.wait_for_function(
            result_is,
            arg="403 Forbidden: only admins may do this, and jacky has the role user. "
            "Log out and log in as admin to try it.",
        )
        await page.screenshot(path=str(Path(demo.stdout_path).parent / "phone.png"), full_page=True)
        assert min(await card_margins(page)) >= 8

        # The admin is not warned, and the action works.
        async with page.expect_navigation():
            await page.click("#logout")
        await browser_log_in(page, demo, "admin", "jwtplus-admin")
        assert await page.is_hidden("#admin-hint")
        await page.click("#admin-action")
        await page.wait_for_function(result_is, arg="200 OK: admin action done")


@pytest.mark.skipif(
    not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium (.ci/run installs it)"
)
@pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command (apt-get install openssl)")
async def test_a_sibling_subdomain_cannot_open_the_apps_websocket_in_a_real_browser(
    spawn: Spawn, tmp_path: Path
) -> None:
    playwright_api = pytest.importorskip("playwright.async_api", reason="needs playwright (the test extra)")

    certfile, keyfile = await self_signed_certificate(tmp_path, APP_HOST, EVIL_HOST)
    tls = ("--certfile", str(certfile), "--keyfile", str(keyfile))
    demo = await spawn("spa_demo", EXAMPLES / "spa_demo.py", *tls)
    app_url = https_url(demo, APP_HOST)
    socket_url = app_url.replace("https://", "wss://") + "/api/socket"
    evil_page = tmp_path / "evil.html"
    evil_page.write_text(f"<!doctype html><title>evil</title><script>const listen = {LISTEN};</script>")
    server_script = tmp_path / "tls_page_server.py"
    server_script.write_text(TLS_PAGE_SERVER)
    attacker = await spawn("attacker", server_script, "--page", str(evil_page), *tls)
    greeting = {"username": "jacky", "role": "user"}

    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=TLS_CHROMIUM_ARGS)
        try:
            context = await browser.new_context(ignore_https_errors=True)
            page = await context.new_page()

            # Log in through the form, over https on the app's name.
            await page.goto(f"{app_url}/index.html")
            await page.fill("#username", "jacky")
            await page.fill("#password", "jwtplus-demo")
            async with page.expect_navigation():
                await page.click("button[type=submit]")
            await page.wait_for_function("document.getElementById('user').textContent === 'jacky'")
            cookie = {c["name"]: c for c in await context.cookies()}["__Host-access_token"]
            assert (cookie["domain"], cookie["secure"], cookie["sameSite"]) == (APP_HOST, True, "Lax")

            # The app's own page opens the socket and is greeted.
            events = await page.evaluate(LISTEN, socket_url)
            assert events[::2] == ["open", "close 1000"], events
            assert {**json.loads(events[1]), "exp": None} == {**greeting, "exp": None}, events
            assert await socket_statuses(demo, 1) == ["101"]

            # The sibling subdomain's page opens the same URL: the handshake is refused, nothing arrives.
            evil = await context.new_page()
            await evil.goto(https_url(attacker, EVIL_HOST) + "/")
            events = await evil.evaluate("(url) => listen(url)", socket_url)
            assert events == ["error", "close 1006"], f"the attacker's page got {events}"
            # 403, not 401: the cookie went along (a handshake without it is the 401 below).
            assert await socket_statuses(demo, 2) == ["101", "403"]

            # Without the cookie the same handshake from the app's own page is a 401.
            await context.clear_cookies()
            events = await page.evaluate(LISTEN, socket_url)
            assert events == ["error", "close 1006"], events
            assert await socket_statuses(demo, 3) == ["101", "403", "401"]
        finally:
            await browser.close()


# -- Redis: two real app processes sharing one real redis-server --
#
# The fixture starts its own redis-server on a free loopback port, without persistence
# (--save '' --appendonly no): a restarted server starts empty. An outage with the data kept
# is a paused server (SIGSTOP: connections hang until the client's socket timeout); a real
# stop is SIGTERM, then the same port again.

REDIS_SERVER = shutil.which("redis-server")
REDIS_SKIP = "needs redis-server on PATH (.ci/run installs it with apt-get install redis-server)"
REDIS_SOCKET_TIMEOUT = 0.5  # the app servers' redis-py socket timeouts: a hung Redis costs this per call


@dataclass
class RedisServer:
    """A redis-server subprocess on 127.0.0.1:*port*, to stop, pause and start again."""

    port: int
    directory: Path
    args: tuple[str, ...] = ()
    """More redis-server options, e.g. ``("--replicaof", "127.0.0.1", "6379")``."""
    proc: asyncio.subprocess.Process | None = None
    paused: bool = False
    starts: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def log(self) -> str:
        return "".join(
            f"---- redis-server run {n} ----\n{path.read_text(errors='replace')}"
            for n in range(1, self.starts + 1)
            if (path := self.directory / f"redis-{n}.log").exists()
        )

    async def start(self) -> None:
        """Start it (again, on the same port) and wait until it answers PING."""
        assert self.proc is None or self.proc.returncode is not None, "redis-server is already running"
        assert REDIS_SERVER is not None
        self.starts += 1
        with (self.directory / f"redis-{self.starts}.log").open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                *self.args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        self.paused = False
        deadline = time.monotonic() + START_TIMEOUT
        while not await self.ping():
            if self.proc.returncode is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not answer PING within {START_TIMEOUT}s\n{self.log()}")
            await asyncio.sleep(0.02)

    async def ping(self) -> bool:
        """Whether it answers PING with PONG right now (within a second)."""

        async def exchange() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            try:
                writer.write(b"PING\r\n")
                await writer.drain()
                return await reader.readline()
            finally:
                writer.close()
                await writer.wait_closed()

        try:
            return await asyncio.wait_for(exchange(), 1) == b"+PONG\r\n"
        except (OSError, asyncio.TimeoutError):  # not the builtin before Python 3.11
            return False

    def pause(self) -> None:
        """An outage that keeps the data: the process stops (SIGSTOP), its connections hang."""
        assert self.proc is not None
        assert self.proc.returncode is None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        assert self.paused
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    async def stop(self) -> None:
        """A real stop (SIGTERM, SIGKILL after STOP_TIMEOUT); without persistence its data is gone."""
        if self.proc is None or self.proc.returncode is not None:
            return
        if self.paused:
            self.resume()
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
        except asyncio.TimeoutError:  # not the builtin before Python 3.11
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A real redis-server of this test's own, killed at teardown whatever state it is left in."""
    if REDIS_SERVER is None:
        pytest.skip(REDIS_SKIP)
    pytest.importorskip("redis.asyncio", reason="needs redis-py (pip install 'aiohttp-jwtplus[test]')")
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(free_port(), directory)
    try:
        await server.start()
        yield server
    finally:
        if server.proc is not None and server.proc.returncode is None:
            server.proc.kill()  # SIGKILL ends a paused (SIGSTOPped) process too
            await server.proc.wait()
        print(server.log())  # shown by pytest when the test failed


SESSION_SERVER = '''\
"""An API on jwtplus sessions kept in Redis: the secret comes from JWTPLUS_TEST_SECRET."""

import argparse
import json
import logging
import os

import redis.asyncio
from aiohttp import web
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

import jwtplus

parser = argparse.ArgumentParser()
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--name", required=True)
where = parser.add_mutually_exclusive_group(required=True)
where.add_argument("--redis-url")
where.add_argument("--cluster", help="HOST:PORT of one node of a Redis Cluster")
where.add_argument("--sentinel", help="HOST:PORT of a Sentinel that monitors the primary 'jwtplus'")
parser.add_argument("--replicas", type=int, help="redis_store(replicas=...); its default if left out")
parser.add_argument("--fail-mode", choices=("closed", "open"), required=True)
parser.add_argument("--socket-timeout", type=float, required=True)
parser.add_argument("--cache-for", type=float, default=0, help="redis_store(cache_for=...)")
args = parser.parse_args()

# every record on stderr, one "LOG" head line each (tracebacks follow their head line)
logging.basicConfig(level=logging.INFO, format="LOG %(name)s %(levelname)s %(message)s")


async def make_app() -> web.Application:
    closing = []  # clients to close besides *client* when the app stops
    bounded = {
        "socket_timeout": args.socket_timeout,
        "socket_connect_timeout": args.socket_timeout,
        "retry": Retry(NoBackoff(), 0),  # one attempt: a request waits one timeout, not several
    }
    if args.cluster:
        host, _, port = args.cluster.rpartition(":")
        client = RedisCluster(host=host, port=int(port), **bounded)
    elif args.sentinel:
        host, _, port = args.sentinel.rpartition(":")
        timeouts = {name: bounded[name] for name in ("socket_timeout", "socket_connect_timeout")}
        sentinel = Sentinel([(host, int(port))], sentinel_kwargs=timeouts)
        client = sentinel.master_for("jwtplus", **bounded)
        closing.extend(sentinel.sentinels)  # the Sentinel's own connections: the client does not own them
    else:
        client = redis.asyncio.Redis.from_url(args.redis_url, **bounded)
    durable = {} if args.replicas is None else {"replicas": args.replicas}
    sessions = jwtplus.Sessions(
        manager=jwtplus.SecretManager(secret=os.environ["JWTPLUS_TEST_SECRET"]),
        store=jwtplus.redis_store(
            client, replica_timeout=args.socket_timeout / 2, cache_for=args.cache_for, **durable
        ),
        fail_open=args.fail_mode == "open",
    )
    helper = jwtplus.JWTHelper(sessions=sessions, whitelist=("/login", "/refresh"))
    routes = web.RouteTableDef()

    @routes.post("/login")
    async def login(request: web.Request) -> web.Response:
        body = await request.json()
        response = web.json_response({})
        pair = await jwtplus.start_session(response, sessions, body["sub"], {"username": body["sub"]})
        response.text = json.dumps({"access": pair.access, "refresh": pair.refresh})
        return response

    @routes.post("/refresh")
    async def refresh(request: web.Request) -> web.Response:
        pair = await jwtplus.refresh_session(request, sessions)
        return web.json_response({"access": pair.access, "refresh": pair.refresh})

    @routes.post("/logout")
    async def logout(request: web.Request) -> web.Response:
        await jwtplus.end_session(request, sessions)
        return web.json_response({"ok": True})

    @routes.post("/logout-everywhere")
    async def logout_everywhere(request: web.Request) -> web.Response:
        await jwtplus.end_session(request, sessions, everywhere=True)
        return web.json_response({"ok": True})

    @routes.get("/me")
    async def me(request: web.Request) -> web.Response:
        claims = request[jwtplus.AUTH_CLAIMS]
        return web.json_response({"server": args.name, "sub": claims["sub"]})

    async def redis_client(app: web.Application):
        yield
        await client.aclose()
        for other in closing:
            await other.aclose()

    app = web.Application()
    jwtplus.setup(app, helper)
    app.add_routes(routes)
    app.cleanup_ctx.append(redis_client)
    return app


web.run_app(make_app(), host=args.host, port=args.port, print=None, access_log_format='"%r" %s')
'''


class Answer(NamedTuple):
    status: int
    body: Any  # the parsed JSON, else the text
    headers: CIMultiDictProxy[str]


@dataclass
class SessionServer:
    """HTTP calls to one SESSION_SERVER process; remembers every token it was given."""

    server: Server
    http: ClientSession
    tokens: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.server.name

    async def call(self, method: str, path: str, *, token: str | None = None, body: Any = None) -> Answer:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with self.http.request(method, self.server.url + path, headers=headers, json=body) as reply:
            text = await reply.text()
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = text
            answer = Answer(reply.status, parsed, reply.headers)
        if answer.status == 200 and isinstance(parsed, dict) and "access" in parsed:
            self.tokens.update((parsed["access"], parsed["refresh"]))
        return answer

    async def login(self, sub: str) -> dict[str, str]:
        answer = await self.call("POST", "/login", body={"sub": sub})
        assert answer.status == 200, (self.name, answer, self.server.logs())
        assert set(answer.body) == {"access", "refresh"}
        return dict(answer.body)

    async def refresh(self, refresh_token: str) -> Answer:
        return await self.call("POST", "/refresh", body={"refresh_token": refresh_token})

    async def me(self, access_token: str | None) -> Answer:
        return await self.call("GET", "/me", token=access_token)

    async def logout(self, access_token: str) -> Answer:
        return await self.call("POST", "/logout", token=access_token)


StartSessionServers = Callable[..., Awaitable[tuple[SessionServer, SessionServer]]]


async def until_durable(write: Callable[[], Awaitable[Answer]]) -> Answer:
    """Repeat *write* while it gets 503, for up to START_TIMEOUT, and return the first other answer.
    On a loaded machine a replica can miss the WAIT's deadline; a 503 is then the right answer."""
    deadline = time.monotonic() + START_TIMEOUT
    while (answer := await write()).status == 503:
        assert time.monotonic() < deadline, ("still 503", answer)
        await asyncio.sleep(0.1)
    return answer


@pytest.fixture
async def session_servers(spawn: Spawn, tmp_path: Path) -> AsyncIterator[StartSessionServers]:
    """Start servers A and B on one secret and one Redis:
    ``await session_servers("--redis-url", url, fail_mode=...)``, or ``"--cluster", "host:port"``."""
    script = tmp_path / "session_server.py"
    script.write_text(SESSION_SERVER)
    secret = secrets.token_urlsafe(32)  # 43 bytes: long enough for HS256
    async with ClientSession(timeout=HTTP_TIMEOUT, cookie_jar=DummyCookieJar()) as http:

        async def start(*redis: str, fail_mode: str = "closed") -> tuple[SessionServer, SessionServer]:
            args = (*redis, "--fail-mode", fail_mode, "--socket-timeout", str(REDIS_SOCKET_TIMEOUT))
            servers = await asyncio.gather(
                *(
                    spawn(name, script, "--name", name, *args, env={"JWTPLUS_TEST_SECRET": secret})
                    for name in ("A", "B")
                )
            )
            a, b = (SessionServer(server, http) for server in servers)
            return a, b

        yield start


UNAUTHORIZED = {"error": "unauthorized"}
UNAVAILABLE = {"error": "unavailable"}

_LOG_HEAD = re.compile(r"LOG (?P<logger>\S+) (?P<level>[A-Z]+) (?P<message>.*)")
_ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/1\.1" (?P<status>\d{3})')


async def assert_clean_logs(*servers: SessionServer) -> dict[str, list[tuple[str, str, str]]]:
    """Stop *servers* (they must exit 0) and check their logs: no 500, no traceback, no token.
    Return each server's (logger, level, message) records."""
    records: dict[str, list[tuple[str, str, str]]] = {}
    for session_server in servers:
        server = session_server.server
        assert await server.stop() == 0, server.logs()
        stdout, stderr = server.stdout(), server.stderr()
        assert stdout == "", server.logs()
        mine: list[tuple[str, str, str]] = []
        for line in stderr.splitlines():
            if head := _LOG_HEAD.fullmatch(line):
                mine.append((head["logger"], head["level"], head["message"]))
            else:  # a line that is no log record's head: a traceback, which no record may carry
                raise AssertionError((line, server.logs()))
        statuses = [
            int(access["status"])
            for logger, _, message in mine
            if logger == "aiohttp.access" and (access := _ACCESS.fullmatch(message))
        ]
        assert statuses, server.logs()
        assert 500 not in statuses, server.logs()
        assert all(level in ("INFO", "WARNING") for _, level, _ in mine), server.logs()
        assert "Error handling request" not in stderr, server.logs()
        assert "eyJ" not in stderr  # a JWT's first characters
        for token in session_server.tokens:
            for part in token.split("."):
                assert part not in stderr, server.logs()
        records[session_server.name] = mine
    return records


CLOSED_LOG = (
    "jwtplus: the revocation store failed; auth_status is 'unavailable' (503 wherever a token is needed)"
)
OPEN_LOG = "jwtplus: the revocation store failed; the token is accepted (fail-open)"


def warnings_of(records: list[tuple[str, str, str]]) -> list[str]:
    """jwtplus's warnings, with a store failure's cause cut out: "...store failed; <outcome>"."""
    return [
        re.sub(r" \(\w+: .*\); ", "; ", message)
        for logger, level, message in records
        if logger == "jwtplus" and level == "WARNING"
    ]


async def test_redis_logout_on_one_server_is_refused_on_the_other_at_once(
    session_servers: StartSessionServers, redis_server: RedisServer
) -> None:
    a, b = await session_servers("--redis-url", redis_server.url)
    phone, laptop = await a.login("ann"), await b.login("ann")
    for server in (a, b):
        for pair in (phone, laptop):
            assert (await server.me(pair["access"])).body == {"server": server.name, "sub": "ann"}

    logout = await a.logout(phone["access"])
    assert (logout.status, logout.body) == (200, {"ok": True})
    for server in (b, a):  # B first: nothing to wait for, the revocation is in Redis already
        me = await server.me(phone["access"])
        assert (me.status, me.body, me.headers["WWW-Authenticate"]) == (401, UNAUTHORIZED, CHALLENGE_INVALID)
        refresh = await server.refresh(phone["refresh"])
        assert (refresh.status, refresh.body, refresh.headers["WWW-Authenticate"]) == (
            401,
            UNAUTHORIZED,
            CHALLENGE_INVALID,
        )
    # the other session of the same user is untouched, on both
    for server in (b, a):
        me = await server.me(laptop["access"])
        assert (me.status, me.body) == (200, {"server": server.name, "sub": "ann"})
    renewed = await b.refresh(laptop["refresh"])
    assert renewed.status == 200
    assert (await a.me(renewed.body["access"])).body == {"server": "A", "sub": "ann"}
    records = await assert_clean_logs(a, b)
    assert warnings_of(records["A"]) == warnings_of(records["B"]) == []


async def test_redis_cache_for_lets_another_servers_logout_through_for_at_most_that_long(
    session_servers: StartSessionServers, redis_server: RedisServer
) -> None:
    """With cache_for=2, B answers ann's access token from its copy for a while after A logged her out,
    and refuses it from at most 2 s after the logout's answer on; A refuses it and the refresh token
    at once. The staleness measured is printed."""
    cache_for = 2.0
    a, b = await session_servers("--redis-url", redis_server.url, "--cache-for", str(cache_for))
    pair = await a.login("ann")
    assert (await a.me(pair["access"])).status == 200
    copied = time.time()
    assert (await b.me(pair["access"])).status == 200  # B's copy: read at or after *copied*
    assert (await a.logout(pair["access"])).status == 200
    logged_out = time.time()
    assert (await a.me(pair["access"])).status == 401  # its own logout: at once
    assert (await a.refresh(pair["refresh"])).status == 401
    polls: list[tuple[float, int]] = []
    while not polls or polls[-1][1] == 200:
        sent = time.time()
        assert sent < logged_out + cache_for + 3, polls  # B must come to refuse it
        polls.append((sent, (await b.me(pair["access"])).status))
        await asyncio.sleep(0.02)
    for _ in range(5):  # refused once, refused for good
        assert (await b.me(pair["access"])).status == 401
    assert (await b.refresh(pair["refresh"])).status == 401
    served = [sent for sent, status in polls if status == 200]
    assert all(sent < logged_out + cache_for for sent in served), (polls, logged_out)
    if polls[0][0] < copied + cache_for / 2:  # asked well within its copy's life, B answered from it
        assert served, polls
    stale = (served[-1] - logged_out) if served else 0.0
    print(
        f"B accepted the logged-out token for {stale:.3f} s after the logout's answer (cache_for={cache_for})"
    )
    records = await assert_clean_logs(a, b)
    assert warnings_of(records["A"]) == warnings_of(records["B"]) == []


async def test_redis_a_replayed_refresh_token_kills_the_family_on_both_servers(
    session_servers: StartSessionServers, redis_server: RedisServer
) -> None:
    a, b = await session_servers("--redis-url", redis_server.url)
    first = await a.login("ann")
    rotated = await b.refresh(first["refresh"])  # the rightful client rotates on B
    assert rotated.status == 200
    second = rotated.body
    assert (await a.me(second["access"])).body == {"server": "A", "sub": "ann"}
    bystander = await b.login("bob")

    replay = await a.refresh(first["refresh"])  # the thief replays the stolen first token on A
    assert (replay.status, replay.body, replay.headers["WWW-Authenticate"]) == (
        401,
        UNAUTHORIZED,
        CHALLENGE_INVALID,
    )
    for server in (a, b):
        for token in (first["access"], second["access"]):
            me = await server.me(token)
            assert (me.status, me.body, me.headers["WWW-Authenticate"]) == (
                401,
                UNAUTHORIZED,
                CHALLENGE_INVALID,
            )
        refresh = await server.refresh(second["refresh"])
        assert (refresh.status, refresh.body) == (401, UNAUTHORIZED)
        assert (await server.me(bystander["access"])).body == {"server": server.name, "sub": "bob"}
    records = await assert_clean_logs(a, b)
    assert warnings_of(records["A"]) == ["jwtplus: a refresh token was used twice; its family is revoked"]
    assert warnings_of(records["B"]) == []


async def raw_refresh_requests(servers: Sequence[SessionServer], refresh_token: str) -> list[Answer]:
    """POST /refresh with *refresh_token* once per item of *servers*, all at the same instant.

    Each request is sent on its own connection but its last byte; once every one is in,
    the last bytes go out together, so the servers run the refreshes concurrently.
    """
    body = json.dumps({"refresh_token": refresh_token}).encode()
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]] = []

    async def answer(reader: asyncio.StreamReader) -> Answer:
        raw = await asyncio.wait_for(reader.read(), HTTP_TIMEOUT.total)  # Connection: close
        head, _, text = raw.decode().partition("\r\n\r\n")
        status_line, *header_lines = head.split("\r\n")
        headers = CIMultiDict(tuple(line.split(": ", 1)) for line in header_lines)
        return Answer(int(status_line.split()[1]), json.loads(text), CIMultiDictProxy(headers))

    try:
        for server in servers:
            url = yarl.URL(server.server.url)
            request = (
                f"POST /refresh HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode() + body
            reader, writer = await asyncio.open_connection(url.host, url.port)
            streams.append((reader, writer, request[-1:]))
            writer.write(request[:-1])
            await writer.drain()
        for _, writer, last in streams:
            writer.write(last)
        return list(await asyncio.gather(*(answer(reader) for reader, _, _ in streams)))
    finally:
        for _, writer, _ in streams:
            writer.close()
        await asyncio.gather(*(writer.wait_closed() for _, writer, _ in streams), return_exceptions=True)


async def test_redis_fifty_concurrent_refreshes_over_two_servers_give_exactly_one_pair(
    session_servers: StartSessionServers, redis_server: RedisServer
) -> None:
    a, b = await session_servers("--redis-url", redis_server.url)
    first = await a.login("ann")
    answers = await raw_refresh_requests((a, b) * 25, first["refresh"])
    assert sorted(answer.status for answer in answers) == [200] + [401] * 49, answers
    (winner,) = (answer for answer in answers if answer.status == 200)
    assert set(winner.body) == {"access", "refresh"}
    assert all(answer.body == UNAUTHORIZED for answer in answers if answer.status == 401)
    for server in (a, b):  # the new pair is never revealed in a log: let the log check look for it
        server.tokens.update(winner.body.values())
    # with no reuse_grace, each loser is a reuse, that is theft: the family is dead on both
    for server in (a, b):
        assert (await server.me(winner.body["access"])).status == 401
        assert (await server.refresh(winner.body["refresh"])).status == 401
    records = await assert_clean_logs(a, b)
    theft = "jwtplus: a refresh token was used twice; its family is revoked"
    assert {*warnings_of(records["A"]), *warnings_of(records["B"])} == {theft}


async def begin_outage(redis_server: RedisServer, outage: str) -> None:
    """Take Redis away: "paused" keeps its data, "stopped" ends the process."""
    if outage == "paused":
        redis_server.pause()  # every call hangs until the socket timeout
        return
    # Without persistence a restart forgets every revocation and used refresh token: snapshot them
    # first, as a Redis configured to persist would keep them.
    redis_asyncio = pytest.importorskip("redis.asyncio")
    client = redis_asyncio.Redis.from_url(redis_server.url)
    try:
        assert await client.save() is True
    finally:
        await client.aclose()
    await redis_server.stop()  # calls are refused at once


async def end_outage(redis_server: RedisServer, outage: str) -> None:
    if outage == "paused":
        redis_server.resume()
    else:
        await redis_server.start()  # the same port; loads the snapshot


async def at_once(**calls: Awaitable[Answer]) -> dict[str, Answer]:
    """Await *calls* concurrently (each may wait one socket timeout); their answers by name."""
    return dict(zip(calls, await asyncio.gather(*calls.values()), strict=True))


@pytest.mark.parametrize("outage", ["paused", "stopped"])
async def test_redis_down_fails_closed_with_503_and_recovers(
    session_servers: StartSessionServers, redis_server: RedisServer, outage: str
) -> None:
    a, b = await session_servers("--redis-url", redis_server.url, fail_mode="closed")
    revoked, alive = await a.login("ann"), await b.login("bob")
    assert (await b.logout(revoked["access"])).status == 200
    assert (await a.me(revoked["access"])).status == 401
    assert (await a.me(alive["access"])).status == 200

    await begin_outage(redis_server, outage)
    started = time.monotonic()
    for server in (a, b):
        down = await at_once(
            me=server.me(alive["access"]),
            revoked=server.me(revoked["access"]),  # never 200 (nor 401: it cannot be told)
            refresh=server.refresh(alive["refresh"]),
            logout=server.logout(alive["access"]),
            anonymous=server.me(None),  # no token: nothing to look up
            login=server.call("POST", "/login", body={"sub": "carol"}),  # it reads carol's generation
        )
        for name in ("me", "revoked", "refresh", "logout", "login"):
            answer = down[name]
            assert (answer.status, answer.body, answer.headers.get("Retry-After")) == (
                503,
                UNAVAILABLE,
                "5",
            ), (server.name, name, answer)
        assert (down["anonymous"].status, down["anonymous"].body) == (401, UNAUTHORIZED)
    assert time.monotonic() - started < 4 * REDIS_SOCKET_TIMEOUT + 3  # bounded: no hang, no retry storm

    await end_outage(redis_server, outage)
    during = await a.login("carol")
    for server in (a, b):
        assert (await server.me(alive["access"])).body == {"server": server.name, "sub": "bob"}
        assert (await server.me(during["access"])).body == {"server": server.name, "sub": "carol"}
        me = await server.me(revoked["access"])
        assert (me.status, me.body) == (401, UNAUTHORIZED)
    renewed = await a.refresh(alive["refresh"])  # the refresh that got a 503 may be retried
    assert renewed.status == 200, renewed
    assert (await b.me(renewed.body["access"])).status == 200
    assert (await b.logout(renewed.body["access"])).status == 200
    assert (await a.me(renewed.body["access"])).status == 401

    records = await assert_clean_logs(a, b)
    for name in ("A", "B"):
        assert CLOSED_LOG in warnings_of(records[name])
        assert OPEN_LOG not in warnings_of(records[name])


@pytest.mark.parametrize("outage", ["paused", "stopped"])
async def test_redis_down_fails_open_when_told_and_recovers(
    session_servers: StartSessionServers, redis_server: RedisServer, outage: str
) -> None:
    a, b = await session_servers("--redis-url", redis_server.url, fail_mode="open")
    revoked, alive, leaving = await a.login("ann"), await b.login("bob"), await a.login("dan")
    assert (await b.logout(revoked["access"])).status == 200
    assert (await a.me(revoked["access"])).status == 401

    await begin_outage(redis_server, outage)
    started = time.monotonic()
    for server in (a, b):
        down = await at_once(
            me=server.me(alive["access"]),
            # fail-open cannot know of revocations while Redis is down: the logged-out token passes too
            revoked=server.me(revoked["access"]),
            refresh=server.refresh(alive["refresh"]),  # a refresh never mints without consuming
            logout=server.logout(leaving["access"]),  # a revocation cannot be written
        )
        assert (down["me"].status, down["me"].body) == (200, {"server": server.name, "sub": "bob"})
        assert (down["revoked"].status, down["revoked"].body) == (200, {"server": server.name, "sub": "ann"})
        for name in ("refresh", "logout"):
            answer = down[name]
            assert (answer.status, answer.body, answer.headers.get("Retry-After")) == (
                503,
                UNAVAILABLE,
                "5",
            ), (server.name, name, answer)
    during = await b.login("carol")
    assert (await a.me(during["access"])).status == 200
    assert time.monotonic() - started < 4 * REDIS_SOCKET_TIMEOUT + 3

    await end_outage(redis_server, outage)
    for server in (a, b):
        assert (await server.me(alive["access"])).status == 200
        me = await server.me(revoked["access"])
        assert (me.status, me.body) == (401, UNAUTHORIZED)  # known again
    assert (await b.refresh(alive["refresh"])).status == 200

    records = await assert_clean_logs(a, b)
    for name in ("A", "B"):
        assert OPEN_LOG in warnings_of(records[name])
        assert CLOSED_LOG not in warnings_of(records[name])


def test_redis_store_refuses_a_client_that_could_stall_requests() -> None:
    redis_asyncio = pytest.importorskip("redis.asyncio", reason="needs redis-py (the test extra)")
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    url = "redis://127.0.0.1:1/0"  # never connected to: construction alone is judged
    refused = [
        (redis_asyncio.Redis.from_url(url), "socket_timeout=None"),
        (redis_asyncio.Redis.from_url(url, socket_timeout=1), "socket_connect_timeout=None"),
        (redis_asyncio.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=1), "socket_timeout=30"),
        (redis_asyncio.Redis(host="127.0.0.1", socket_timeout=1, socket_connect_timeout=1), "retry makes"),
    ]
    for client, message in refused:
        with pytest.raises(ValueError, match=re.escape(message)) as raised:
            jwtplus.redis_store(client)
        assert "Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)" in str(raised.value)

    class Fake:  # a client of another kind (a test double, a proxy): its timeouts are its own business
        async def set(self, *args: Any, **kwargs: Any) -> None: ...

    assert repr(jwtplus.redis_store(Fake())) == (
        "RevocationStore(kind='redis', prefix='jwtplus:', client='server', replicas=0)"
    )
    for client in (
        redis_asyncio.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1),
        redis_asyncio.Redis(
            host="127.0.0.1", socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
        ),
    ):
        assert repr(jwtplus.redis_store(client)) == (
            "RevocationStore(kind='redis', prefix='jwtplus:', client='server', replicas=0)"
        )


def test_redis_store_knows_cluster_and_sentinel_clients_and_waits_for_a_replica_with_them() -> None:
    redis_asyncio = pytest.importorskip("redis.asyncio", reason="needs redis-py (the test extra)")
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.retry import Retry
    from redis.asyncio.sentinel import Sentinel
    from redis.backoff import NoBackoff

    bounded = {"socket_timeout": 1, "socket_connect_timeout": 1}
    cluster = RedisCluster(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), 0), **bounded)
    sentinel = Sentinel([("127.0.0.1", 1)], **bounded).master_for("m", retry=Retry(NoBackoff(), 0), **bounded)
    server = redis_asyncio.Redis(port=1, retry=Retry(NoBackoff(), 0), **bounded)
    assert [jwtplus.redis_store(c).info() for c in (cluster, sentinel, server)] == [  # type: ignore[misc]
        {"kind": "redis", "prefix": "jwtplus:", "client": kind, "replicas": replicas}
        for kind, replicas in (("cluster", 1), ("sentinel", 1), ("server", 0))
    ]
    assert jwtplus.redis_store(server, replicas=2).info()["replicas"] == 2  # type: ignore[misc]
    assert jwtplus.redis_store(cluster, replicas=0).info()["replicas"] == 0  # type: ignore[misc]
    refused = [
        (lambda: jwtplus.redis_store(RedisCluster(host="127.0.0.1", port=1)), "retry makes 10 more attempts"),
        (
            lambda: jwtplus.redis_store(
                RedisCluster(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), 1), **bounded)
            ),
            "retry makes 1 more attempts",
        ),
        (lambda: jwtplus.redis_store(server, replicas=1, replica_timeout=1), "ends before a WAIT"),
        (lambda: jwtplus.redis_store(server, replicas=-1), "replicas=-1 must be an int from 0 to 16"),
        (lambda: jwtplus.redis_store(server, replicas=True), "replicas=True must be an int"),
        (lambda: jwtplus.redis_store(server, replica_timeout=0), "replica_timeout=0 must be more than 0"),
        (lambda: jwtplus.redis_store(server, replica_timeout="9s"), "at most 5 seconds"),
        (lambda: jwtplus.redis_store(server, prefix="{app}:"), "prefix='{app}:' must be a string without"),
    ]
    for build, message in refused:
        with pytest.raises(ValueError, match=re.escape(message)):
            build()
    jwtplus.redis_store(server, replica_timeout=1)  # no replica to wait for: the timeout is moot


@pytest.fixture
async def redis_replica(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A replica of *redis_server*, once it acknowledges the primary's writes."""
    import redis.asyncio

    directory = tmp_path / "replica"
    directory.mkdir()
    replica = RedisServer(free_port(), directory, ("--replicaof", "127.0.0.1", str(redis_server.port)))
    try:
        async with redis.asyncio.Redis(port=redis_server.port) as client:
            await client.config_set("repl-diskless-sync-delay", 0)  # no 5 s wait before the first sync
        await replica.start()
        await redis_ready(
            "the replica did not acknowledge a write",
            functools.partial(replica_acknowledges, redis_server.port),
            replica.log,
        )
        yield replica
    finally:
        if replica.proc is not None and replica.proc.returncode is None:
            replica.proc.kill()
            await replica.proc.wait()
        print(replica.log())


async def test_redis_store_acknowledges_a_logout_only_once_a_replica_holds_it(
    redis_server: RedisServer, redis_replica: RedisServer, make_client: Any
) -> None:
    """With replicas=1 a write answers after WAIT: while the replica hangs, logout and refresh are 503
    (after replica_timeout), though the primary made the write: fail closed both ways."""
    import redis.asyncio

    primary = bounded_redis(redis.asyncio.Redis, port=redis_server.port)
    replica = bounded_redis(redis.asyncio.Redis, port=redis_replica.port)
    store = jwtplus.redis_store(primary, replicas=1, replica_timeout=0.3)
    client, sessions, _ = await session_client(make_client, store=store)

    try:
        kept = await pair_login(client)
        assert (await client.post("/logout", headers=bearer(kept["access"]))).status == 200
        claims = sessions.manager.decode(kept["access"])
        (family_key,) = [key for key in jwtplus._revocation_keys(sessions, claims) if "}family:" in key]
        assert await replica.get("jwtplus:" + family_key) is not None  # on the replica when answered
        held = await pair_login(client)
        redis_replica.pause()
        started = time.monotonic()
        for answer in (
            await client.post("/refresh", json={"refresh_token": held["refresh"]}),
            await client.post("/logout", headers=bearer(held["access"])),
        ):
            assert (answer.status, await answer.json()) == (503, UNAVAILABLE), answer.url
        assert 0.6 <= time.monotonic() - started < 2.5  # two WAITs of 0.3 s, no socket timeout
        # the writes were made on the primary, only unconfirmed: the logout holds there already
        assert (await client.get("/me", headers=bearer(held["access"]))).status == 401
        during = await pair_login(client)  # a login only reads
        assert (await client.get("/me", headers=bearer(during["access"]))).status == 200
        redis_replica.resume()
        refreshed = await client.post("/refresh", json={"refresh_token": held["refresh"]})
        assert refreshed.status == 401  # its one use was written before the WAIT failed: a reuse now
        assert (await client.get("/me", headers=bearer(kept["access"]))).status == 401
        unwaited = jwtplus.redis_store(primary, replicas=0)
        redis_replica.pause()
        started = time.monotonic()
        await unwaited.put("unreplicated", 1.0, time.time() + 60, time.time())
        assert time.monotonic() - started < 0.2  # replicas=0 answers at once, replicated or not
    finally:
        if redis_replica.paused:
            redis_replica.resume()
        await primary.aclose()
        await replica.aclose()


async def test_redis_keys_live_as_long_as_what_they_guard_and_a_new_logout_everywhere_replaces_the_old(
    redis_server: RedisServer, make_client: Any
) -> None:
    """Each key expires when the last token it can refuse does (no key outlives that, none dies
    before it); a second "log out everywhere" overwrites the first, so the logins in between end too."""
    import redis.asyncio

    primary = bounded_redis(redis.asyncio.Redis, port=redis_server.port)
    client, sessions, _ = await session_client(make_client, store=jwtplus.redis_store(primary))

    try:
        first = await pair_login(client)
        assert (await client.post("/refresh", json={"refresh_token": first["refresh"]})).status == 200
        assert (await client.post("/logout", headers=bearer(first["access"]))).status == 200
        between = await pair_login(client)
        everywhere = {"everywhere": True}
        assert (
            await client.post("/logout", headers=bearer(between["access"]), json=everywhere)
        ).status == 200
        later = await pair_login(client)  # after the first logout everywhere, before the second
        assert (await client.get("/me", headers=bearer(later["access"]))).status == 200
        assert (await client.post("/logout", headers=bearer(later["access"]), json=everywhere)).status == 200
        assert (await client.get("/me", headers=bearer(later["access"]))).status == 401
        assert (await client.post("/refresh", json={"refresh_token": later["refresh"]})).status == 401
        lifetime = sessions.refresh_seconds + sessions.manager.leeway_seconds
        kinds = Counter[str]()
        for key in await primary.keys("jwtplus:*"):
            kind = key.decode().partition("}")[2].partition(":")[0]
            kinds[kind] += 1
            ttl = await primary.ttl(key)
            assert lifetime - 5 <= ttl <= lifetime + 5, (key, ttl, lifetime)
        assert kinds == {"used": 1, "family": 1, "subject": 1}, kinds
    finally:
        await primary.aclose()


async def test_the_readmes_redis_client_answers_503_in_about_its_timeout_when_redis_hangs(
    redis_server: RedisServer, aiohttp_client: Any
) -> None:
    """1.0's README form answered in 1 s but redis.Redis(host=..., socket_timeout=1) in 15 s (retries)."""
    redis_asyncio = pytest.importorskip("redis.asyncio", reason="needs redis-py (the test extra)")

    (snippet,) = [code for code in readme_snippets("Sessions that last and can end") if "redis_store" in code]
    assert "redis://127.0.0.1:6379/0" in snippet
    readme = run_snippet(
        snippet.replace("redis://127.0.0.1:6379/0", redis_server.url), jwtplus=jwtplus, manager=manager()
    )
    built = bounded_redis(redis_asyncio.Redis, port=redis_server.port)
    for sessions in (readme["sessions"], sessions_for(store=jwtplus.redis_store(built))):
        app = web.Application()
        jwtplus.setup(app, JWTHelper(sessions=sessions))
        app.router.add_get("/me", echo)
        client = await aiohttp_client(app)
        token = (await jwtplus.issue_tokens(sessions, "ann", {"username": "ann"})).access
        assert (await client.get("/me", headers=bearer(token))).status == 200
        redis_server.pause()
        try:
            started = time.monotonic()
            assert (await client.get("/me", headers=bearer(token))).status == 503
            waited = time.monotonic() - started
        finally:
            redis_server.resume()
        assert 0.9 < waited < 2.0, waited  # one socket timeout of 1 s, not several
        assert (await client.get("/me", headers=bearer(token))).status == 200
    await readme["client"].aclose()
    await built.aclose()


async def mget_calls(client: Any) -> int:
    """How many MGET commands the redis-server behind *client* has run."""
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_mget", {}).get("calls", 0))


async def test_redis_concurrent_lookups_share_round_trips_and_each_request_keeps_its_own_answer(
    redis_server: RedisServer, make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The lookups that start while one is in flight go to Redis together, in one MGET: fewer round
    trips than requests, each request the answer of its own token, a logout seen at once; a hung
    Redis fails every one of them in one socket timeout (503), each logged with Redis's own error,
    and nothing stays stuck."""
    import redis.asyncio

    primary = bounded_redis(redis.asyncio.Redis, port=redis_server.port)
    client, _, _ = await session_client(make_client, store=jwtplus.redis_store(primary))
    try:
        pairs = [await pair_login(client) for _ in range(12)]
        for pair in pairs[::3]:
            assert (await client.post("/logout", headers=bearer(pair["access"]))).status == 200
        expected = [401 if i % 12 % 3 == 0 else 200 for i in range(120)]

        before = await mget_calls(primary)
        answers = await asyncio.gather(
            *(client.get("/me", headers=bearer(pairs[i % 12]["access"])) for i in range(120))
        )
        sent = await mget_calls(primary) - before
        assert [answer.status for answer in answers] == expected
        assert 1 <= sent <= 60, sent  # alone, each lookup would be a round trip of its own

        logout = client.post("/logout", headers=bearer(pairs[1]["access"]))
        burst = [client.get("/me", headers=bearer(pairs[i]["access"])) for i in (1, 2, 1, 4)]
        assert (await logout).status == 200
        assert [answer.status for answer in await asyncio.gather(*burst)] == [401, 200, 401, 200]

        redis_server.pause()
        caplog.clear()
        try:
            started = time.monotonic()
            hung = await asyncio.gather(
                *(client.get("/me", headers=bearer(pairs[i % 12]["access"])) for i in range(40))
            )
            waited = time.monotonic() - started
        finally:
            redis_server.resume()
        assert [answer.status for answer in hung] == [503] * 40
        assert waited < 1.9, waited  # one socket timeout of 1 s for all, not one after another
        failures = [r.getMessage() for r in caplog.records if "revocation store failed" in r.getMessage()]
        assert len(failures) == 40, failures  # the waiters too: the lookup they shared timed out
        assert all("(TimeoutError: " in failure for failure in failures), failures
        answers = await asyncio.gather(
            *(client.get("/me", headers=bearer(pairs[i]["access"])) for i in range(12))
        )
        assert [answer.status for answer in answers] == [
            401 if i in (0, 1, 3, 6, 9) else 200 for i in range(12)
        ]
    finally:
        await primary.aclose()


async def test_redis_a_shared_lookup_that_fails_fails_every_lookup_that_waited_for_it_with_its_error(
    redis_server: RedisServer,
) -> None:
    """Lookups that queued behind one in flight go out together; when that shared MGET fails, each of
    them, and each that queued behind it, fails at once with Redis's own error (never left waiting for
    a second timeout, never a made-up error), and the next lookup goes out alone."""
    import redis.asyncio
    import redis.exceptions

    primary = bounded_redis(redis.asyncio.Redis, port=redis_server.port)
    pool = primary.connection_pool
    real = pool.get_connection
    plans: list[
        tuple[asyncio.Event, asyncio.Event, bool]
    ] = []  # per MGET: its arrival, its go, whether it fails

    async def get_connection(*args: Any, **kwargs: Any) -> Any:
        arrived, go, fails = plans.pop(0)
        arrived.set()
        await go.wait()
        if fails:
            raise redis.exceptions.TimeoutError("Timeout reading from socket")
        return await real(*args, **kwargs)

    def plan(fails: bool = False) -> tuple[asyncio.Event, asyncio.Event]:
        arrived, go = asyncio.Event(), asyncio.Event()
        plans.append((arrived, go, fails))
        return arrived, go

    try:
        store = jwtplus.redis_store(primary)
        misses, calls = (await primary.info("stats"))["keyspace_misses"], await mget_calls(primary)
        pool.get_connection = get_connection
        (arrived, go), (_, go_batch) = plan(), plan()
        first = asyncio.ensure_future(store.get_many(["a"], 0.0))
        await arrived.wait()
        batch = [asyncio.ensure_future(store.get_many([key], 0.0)) for key in ("b", "c", "b")]
        await asyncio.sleep(0)
        go.set()
        go_batch.set()
        assert await first == [None]
        assert await asyncio.wait_for(asyncio.gather(*batch), 2) == [[None]] * 3
        pool.get_connection = real  # the counts take a connection too
        stats = await primary.info("stats")
        assert (stats["keyspace_misses"] - misses, await mget_calls(primary) - calls) == (
            3,
            2,
        )  # b asked once

        pool.get_connection = get_connection
        (arrived, go), (batch_arrived, hang_up) = plan(), plan(fails=True)
        first = asyncio.ensure_future(store.get_many(["a"], 0.0))
        await arrived.wait()
        queued = [asyncio.ensure_future(store.get_many([key], 0.0)) for key in ("b", "c", "b")]
        await asyncio.sleep(0)
        go.set()
        assert await first == [None]
        await batch_arrived.wait()
        queued.append(asyncio.ensure_future(store.get_many(["e"], 0.0)))  # behind the batch's MGET
        await asyncio.sleep(0)
        hang_up.set()
        failed = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 2)
        assert [type(result) for result in failed] == [redis.exceptions.TimeoutError] * 4, failed
        assert not plans
        pool.get_connection = real
        assert await asyncio.wait_for(store.get_many(["d"], 0.0), 2) == [None]
    finally:
        pool.get_connection = real
        await primary.aclose()


@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("decode_responses", [False, True])
async def test_redis_lookups_go_on_the_pools_connections_whatever_the_clients_protocol_and_decoding(
    redis_server: RedisServer, make_client: Any, protocol: int, decode_responses: bool
) -> None:
    """An access token is looked up on a connection of the client's pool, not through the client's
    command path (its mget here fails the test), and read right whether Redis speaks RESP2 or RESP3
    and whether the client decodes replies: a logout is refused at once, the other token still passes."""
    import redis.asyncio

    primary = bounded_redis(
        redis.asyncio.Redis, port=redis_server.port, protocol=protocol, decode_responses=decode_responses
    )

    async def mget(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the client's own MGET was used")

    try:
        client, _, _ = await session_client(make_client, store=jwtplus.redis_store(primary))
        kept, ended = await pair_login(client), await pair_login(client)
        assert (await client.post("/logout", headers=bearer(ended["access"]))).status == 200
        primary.mget = mget
        before = await mget_calls(primary)
        assert (await client.get("/me", headers=bearer(ended["access"]))).status == 401
        assert (await client.get("/me", headers=bearer(kept["access"]))).status == 200
        assert await mget_calls(primary) - before == 2
        connected = (await primary.info("clients"))["connected_clients"]
        for _ in range(5):
            assert (await client.get("/me", headers=bearer(kept["access"]))).status == 200
        assert (await primary.info("clients"))["connected_clients"] == connected  # each one given back
    finally:
        await primary.aclose()


async def test_redis_lookups_ping_first_when_the_client_asks_for_health_checks(
    redis_server: RedisServer, make_client: Any
) -> None:
    """A client built with ``health_check_interval`` gets its PING before each lookup that follows an
    idle spell, as its own commands do: the lookup on the pool's connection keeps the client's health
    checks."""
    import redis.asyncio

    async def pings() -> int:
        stats = await redis_command(redis_server.port, "INFO", "commandstats")
        return int(stats.get("cmdstat_ping", {}).get("calls", 0))

    # no CLIENT SETINFO: before Redis 7.2 it is an error reply, which redis-py's own health check on
    # connect would read as the answer to its PING
    quiet = (
        {"driver_info": None} if "driver_info" in inspect.signature(redis.asyncio.Redis).parameters else {}
    )
    watched = bounded_redis(redis.asyncio.Redis, port=redis_server.port, health_check_interval=1e-6, **quiet)
    plain = bounded_redis(redis.asyncio.Redis, port=redis_server.port)
    try:
        for primary, expected in ((watched, 3), (plain, 0)):
            client, _, _ = await session_client(make_client, store=jwtplus.redis_store(primary))
            pair = await pair_login(client)
            before = await pings()
            for _ in range(3):
                assert (await client.get("/me", headers=bearer(pair["access"]))).status == 200
            assert await pings() - before == expected
    finally:
        await watched.aclose()
        await plain.aclose()


async def resp_command(reader: asyncio.StreamReader) -> list[bytes] | None:
    """One RESP command (an array of bulk strings) from *reader*, or None at the end of the stream."""
    line = await reader.readline()
    if not line:
        return None
    assert line.startswith(b"*"), line
    parts = []
    for _ in range(int(line[1:])):
        size = int((await reader.readline())[1:])
        parts.append((await reader.readexactly(size + 2))[:-2])
    return parts


async def test_redis_a_reply_of_another_shape_is_a_store_failure_and_its_connection_is_dropped(
    make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that answers an MGET with fewer values than keys (a proxy gone wrong, say) is never
    read as "not revoked": the request is refused 503, the log names the reply's shape, and the
    connection it came on is closed, never lent out again."""
    import redis.asyncio

    connections: list[list[int]] = []  # per connection the server accepted: the key count of each MGET

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append([])
        try:
            while (command := await resp_command(reader)) is not None:
                if command[0].upper() == b"MGET":
                    connections[-1].append(len(command) - 1)
                    writer.write(b"*1\r\n$-1\r\n")  # one nil, whatever the number of keys
                else:  # CLIENT SETINFO on connect
                    writer.write(b"+OK\r\n")
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    primary = bounded_redis(redis.asyncio.Redis, port=port, protocol=2)
    try:
        client, sessions, _ = await session_client(make_client, store=jwtplus.redis_store(primary))
        access = (await jwtplus.issue_tokens(sessions, "ann")).access
        with caplog.at_level(logging.WARNING, logger="jwtplus"):
            for _ in range(2):
                answer_ = await client.get("/me", headers=bearer(access))
                assert answer_.status == 503
                assert await answer_.json() == {"error": "unavailable"}
        # the login's one-key MGET is answered in shape; each request's three-key one is not, and the
        # connection it came on is closed: the second request comes on a new one
        assert connections == [[1, 3], [3]]
        failures = [r.getMessage() for r in caplog.records if "revocation store failed" in r.getMessage()]
        assert (
            failures
            == [
                "jwtplus: the revocation store failed (ConnectionError: Redis answered an MGET with a reply "
                "of another shape); auth_status is 'unavailable' (503 wherever a token is needed)"
            ]
            * 2
        )
    finally:
        await primary.aclose()
        server.close()
        await server.wait_closed()


async def test_redis_cache_for_answers_access_tokens_from_copies_younger_than_it_and_nothing_else(
    redis_server: RedisServer,
) -> None:
    """cache_for="5s": another server's logout is refused here once the copy read before it is 5 s old,
    never later; this process's own logouts, refresh tokens, a clock set back and a read that overlaps
    a write of this process always go to Redis."""
    import redis.asyncio

    clients = [bounded_redis(redis.asyncio.Redis, port=redis_server.port) for _ in range(2)]
    start = int(time.time()) - 100  # a past clock, whose keys Redis still keeps: exp is 15 minutes on
    try:
        store = jwtplus.redis_store(clients[0], cache_for="5s")
        here = sessions_for(store=store)
        there = sessions_for(manager=here.manager, store=jwtplus.redis_store(clients[1]))
        pairs = [await jwtplus.issue_tokens(here, "ann", now=start) for _ in range(3)]
        (access, refresh), (own, _), (raced, _) = (
            [here.manager.decode(token, now=start) for token in (pair.access, pair.refresh)] for pair in pairs
        )
        assert await looked_up(here, access, start) == (False, True)  # nothing kept yet
        before = await mget_calls(clients[0])
        assert await looked_up(here, access, start + 1) == (False, False)
        await jwtplus.revoke_token(there, access, now=start + 1)  # another server's logout
        assert await looked_up(here, access, start + 4.99) == (False, False)  # stale, as long as promised
        assert await mget_calls(clients[0]) == before
        assert await looked_up(here, access, start + 5) == (True, True)  # the copy is 5 s old
        assert await looked_up(here, access, start + 6) == (True, False)
        assert await looked_up(here, access, start + 4) == (True, True)  # the clock went back: ask
        assert await looked_up(here, refresh, start) == (False, True)
        assert await looked_up(here, refresh, start + 0.1) == (False, True)  # refresh tokens: always asked

        assert await looked_up(here, own, start) == (False, True)
        await jwtplus.revoke_token(here, own, now=start + 1)  # this process's logout: seen at once
        assert await looked_up(here, own, start + 1.5) == (True, True)

        (_, asked), _ = await asyncio.gather(
            looked_up(here, raced, start), jwtplus.revoke_token(here, raced, now=start)
        )
        assert asked
        assert await looked_up(here, raced, start + 0.5) == (True, True)  # the overlapping read was not kept

        assert store.info is not None
        assert store.info()["cached"] == 1 + 3 * 2 + 1  # ann, each family and access jti, one refresh jti
        many = [f"filler:{i}" for i in range(10_500)]
        for start in range(0, len(many), 1000):
            await store.get_many(many[start : start + 1000], start)
        assert store.info() == {
            "kind": "redis",
            "prefix": "jwtplus:",
            "client": "server",
            "replicas": 0,
            "cache_for": 5.0,
            "cached": 10_000,
        }
        for bad in (-1, 61, "forever"):
            with pytest.raises(ValueError, match="cache_for"):
                jwtplus.redis_store(clients[0], cache_for=bad)
        assert "cached" not in jwtplus.redis_store(clients[0]).info()  # type: ignore[misc]
    finally:
        for client in clients:
            await client.aclose()


# -- Redis Cluster and Sentinel: the store where the primary can change under it --
#
# A cluster is six redis-servers of the fixture above, three masters each with a replica,
# joined with redis-cli --cluster create; a Sentinel setup is a primary, its replica and
# one redis-sentinel. Both fail over for real: CLUSTER FAILOVER, or SIGKILL and a promotion.

REDIS_CLI = shutil.which("redis-cli")
REDIS_SENTINEL = shutil.which("redis-sentinel")
CLUSTER_SKIP = (
    "needs redis-server and redis-cli on PATH (.ci/run installs them with apt-get install redis-server)"
)
SENTINEL_SKIP = "needs redis-sentinel on PATH (.ci/run installs it with apt-get install redis-sentinel)"
SENTINEL_MASTER = "jwtplus"  # the name the Sentinel monitors the primary by


def bounded_redis(client_class: Any, **where: Any) -> Any:
    """A redis-py client of *client_class* as redis_store wants one: 1 s timeouts, one attempt."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return client_class(socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0), **where)


async def redis_command(port: int, *args: Any) -> Any:
    """One command to the redis-server on *port*, on a connection of its own (1 s timeouts)."""
    import redis.asyncio

    async with redis.asyncio.Redis(
        port=port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True
    ) as client:
        return await client.execute_command(*args)


async def redis_ready(what: str, ready: Callable[[], Awaitable[bool]], logs: Callable[[], str]) -> None:
    """Poll *ready* until it is true; fail after START_TIMEOUT with *what* and the servers' logs."""
    import redis.exceptions

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        with contextlib.suppress(OSError, asyncio.TimeoutError, redis.exceptions.RedisError):
            if await ready():
                return
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {START_TIMEOUT}s\n{logs()}")
        await asyncio.sleep(0.05)


async def replica_acknowledges(primary: int, key: str = "probe") -> bool:
    """Whether a replica of *primary* acknowledges a write of *key* now: its link being up is not yet
    enough."""
    import redis.asyncio

    async with redis.asyncio.Redis(port=primary, socket_timeout=1, socket_connect_timeout=1) as client:
        pipe = client.pipeline(transaction=False)  # one connection: WAIT counts the write made on it
        pipe.set(key, "1", ex=60)
        pipe.execute_command("WAIT", 1, 200)
        _, confirmed = await pipe.execute()
        return int(confirmed) >= 1


async def own_key(master: int) -> str:
    """A key in a slot of the cluster master on *master*, which it takes without a redirect."""
    from redis.crc import key_slot

    (myself,) = [
        line for line in (await redis_command(master, "CLUSTER", "NODES")).splitlines() if "myself" in line
    ]
    first, _, last = myself.split()[8].partition("-")  # the first of its slot ranges
    return next(
        key
        for n in itertools.count()
        if int(first) <= key_slot((key := f"probe-{n}").encode()) <= int(last or first)
    )


@dataclass
class RedisClusterServers:
    """A Redis Cluster of real redis-servers on loopback: three masters, each with one replica."""

    servers: list[RedisServer]

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers]

    def alive(self) -> list[RedisServer]:
        return [s for s in self.servers if s.proc is not None and s.proc.returncode is None]

    def log(self) -> str:
        return "".join(server.log() for server in self.servers)

    async def roles(self) -> dict[int, int | None]:
        """Each live server's primary: None for a master, else the port of the master it replicates."""
        roles = {}
        for server in self.alive():
            role = await redis_command(server.port, "ROLE")
            roles[server.port] = None if role[0] == "master" else int(role[2])
        return roles

    async def healthy(self) -> bool:
        """Every live server sees the cluster ok, and every master has a replica that acknowledges."""
        for server in self.alive():
            if "cluster_state:ok" not in await redis_command(server.port, "CLUSTER", "INFO"):
                return False
        masters = [port for port, primary in (await self.roles()).items() if primary is None]
        return len(masters) == 3 and all(
            [await replica_acknowledges(port, await own_key(port)) for port in masters]
        )

    async def wait_healthy(self, what: str) -> None:
        await redis_ready(what, self.healthy, self.log)

    async def failover(self, replica: int) -> None:
        """CLUSTER FAILOVER on *replica*: it and its master trade places, no write is lost."""
        assert await redis_command(replica, "CLUSTER", "FAILOVER") == "OK"

        async def promoted() -> bool:
            return (await self.roles())[replica] is None and await self.healthy()

        await redis_ready(f"{replica} was not promoted by CLUSTER FAILOVER", promoted, self.log)

    def kill(self, port: int) -> None:
        """SIGKILL the server on *port*: its replica takes over after the node timeout."""
        (server,) = [server for server in self.servers if server.port == port]
        assert server.proc is not None
        server.proc.kill()

    async def wait_promoted(self, replica: int) -> None:
        async def promoted() -> bool:
            if (await self.roles())[replica] is not None:
                return False
            return all(
                ["cluster_state:ok" in await redis_command(s.port, "CLUSTER", "INFO") for s in self.alive()]
            )

        await redis_ready(f"{replica} did not take over its killed master", promoted, self.log)


def cluster_port() -> int:
    """A free port for a cluster node: its bus listens 10000 above it, so it must be 55535 or less."""
    while True:
        port = free_port()
        if port <= 55535:
            with socket.socket() as bus, contextlib.suppress(OSError):
                bus.bind(("127.0.0.1", port + 10000))
                return port


@pytest.fixture
async def redis_cluster(tmp_path: Path) -> AsyncIterator[RedisClusterServers]:
    """A 3-master Redis Cluster with a replica for each master, ready: slots covered, replicas in sync."""
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip(CLUSTER_SKIP)
    pytest.importorskip("redis.asyncio", reason="needs redis-py (pip install 'aiohttp-jwtplus[test]')")
    node = (
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        "1000",
    )
    sync = ("--repl-diskless-sync-delay", "0")  # a replica's first sync at once, not after 5 s
    cluster = RedisClusterServers([])
    for n in range(6):
        directory = tmp_path / f"cluster-{n}"
        directory.mkdir()
        cluster.servers.append(RedisServer(cluster_port(), directory, (*node, *sync)))
    try:
        await asyncio.gather(*(server.start() for server in cluster.servers))
        create = await asyncio.create_subprocess_exec(
            REDIS_CLI,
            "--cluster",
            "create",
            *(f"127.0.0.1:{port}" for port in cluster.ports),
            "--cluster-replicas",
            "1",
            "--cluster-yes",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(create.communicate(), START_TIMEOUT)
        assert create.returncode == 0, out.decode(errors="replace")
        await cluster.wait_healthy("the cluster did not come up")
        yield cluster
    finally:
        for server in cluster.alive():
            assert server.proc is not None
            server.proc.kill()
            await server.proc.wait()
        print(cluster.log())


async def test_redis_cluster_two_servers_share_sessions_through_a_failover_and_a_killed_master(
    session_servers: StartSessionServers, redis_cluster: RedisClusterServers
) -> None:
    """Every key of one request in one slot: the cluster serves login, refresh, reuse detection, logout,
    logout everywhere and the refresh race; a failover and a killed master mid-run cost 503s only."""
    a, b = await session_servers("--cluster", f"127.0.0.1:{redis_cluster.ports[0]}")
    users = [f"user-{n}" for n in range(12)]  # over every master's slots
    pairs = {user: await (a if n % 2 else b).login(user) for n, user in enumerate(users)}
    for user in users:
        rotated = await b.refresh(pairs[user]["refresh"])
        assert rotated.status == 200, rotated
        assert (await a.me(rotated.body["access"])).body == {"server": "A", "sub": user}
        replay = await a.refresh(pairs[user]["refresh"])  # reuse: the family dies on both
        assert (replay.status, replay.body) == (401, UNAUTHORIZED)
        assert (await b.me(rotated.body["access"])).status == 401
        pairs[user] = await a.login(user)
    phone, laptop = await a.login("ann"), await b.login("ann")
    assert (await b.logout(phone["access"])).status == 200
    assert [(await s.me(phone["access"])).status for s in (a, b)] == [401, 401]
    assert (await a.me(laptop["access"])).status == 200
    assert (await a.call("POST", "/logout-everywhere", token=laptop["access"])).status == 200
    assert [(await s.me(laptop["access"])).status for s in (a, b)] == [401, 401]
    answers = await raw_refresh_requests((a, b) * 25, (await a.login("race"))["refresh"])
    assert sorted(answer.status for answer in answers) == [200] + [401] * 49, answers

    # Under load, fail over gracefully, then kill a master: each request's right answer is known.
    revoked = {user: pairs[user] for user in users[:6]}
    for n, user in enumerate(revoked):
        assert (await (a, b)[n % 2].logout(revoked[user]["access"])).status == 200
    alive = {user: pairs[user] for user in users[6:]}
    got: Counter[tuple[str, int]] = Counter()
    done = asyncio.Event()

    async def load() -> None:
        while not done.is_set():
            for n, user in enumerate(users):
                server = (a, b)[n % 2]
                kind = "revoked" if user in revoked else "alive"
                got[kind, (await server.me(pairs[user]["access"])).status] += 1
            login = await a.call("POST", "/login", body={"sub": "during"})
            got["login", login.status] += 1

    loading = asyncio.create_task(load())
    try:
        roles = await redis_cluster.roles()
        first, second = [port for port, primary in roles.items() if primary is not None][:2]
        await redis_cluster.failover(first)
        await asyncio.sleep(0.5)
        redis_cluster.kill(roles[second])  # type: ignore[arg-type]
        await redis_cluster.wait_promoted(second)
        await asyncio.sleep(1)
    finally:
        done.set()
        await loading
    print(sorted(got.items()))
    assert got["revoked", 200] == 0 and got["alive", 401] == 0, got
    assert {status for _, status in got} <= {200, 401, 503}, got
    assert got["alive", 200] > 0 and got["revoked", 401] > 0, got
    # after the promotion every answer is right again, on both servers, for writes too
    for user in users:
        for server in (a, b):
            status = (await server.me(pairs[user]["access"])).status
            assert status == (401 if user in revoked else 200), (user, server.name, status)
    # The promoted master has no replica: writes in its slots cannot be made durable, so they are
    # refused until the killed server is back, as that master's replica; the other masters' succeed.
    from redis.crc import key_slot

    orphaned = [
        range(start, end + 1)
        for start, end, (_, port, *_), *_ in await redis_cluster_slots(second)
        if port == second
    ]
    assert orphaned, await redis_cluster_slots(second)

    def on_orphan(user: str) -> bool:
        return any(key_slot(f"{{{jwtplus._slot_tag(user)}}}".encode()) in slots for slots in orphaned)

    extra = next(name for n in itertools.count() if on_orphan(name := f"orphan-{n}"))
    pairs[extra] = await a.login(extra)
    first_try = {user: await b.refresh(pairs[user]["refresh"]) for user in [*alive, extra]}
    for user, answer in first_try.items():
        assert answer.status in ((503,) if on_orphan(user) else (200, 503)), (user, answer)
    assert any(answer.status == 200 for answer in first_try.values()), first_try
    (killed,) = [server for server in redis_cluster.servers if server.port == roles[second]]
    await killed.start()  # its nodes.conf brings it back as a replica
    await redis_cluster.wait_healthy("the killed master did not come back as a replica")
    for user, answer in first_try.items():
        if answer.status == 503:  # its one use was written, only unconfirmed: a retry is a reuse
            reuse = await until_durable(lambda: a.refresh(pairs[user]["refresh"]))  # noqa: B023
            assert (reuse.status, reuse.body) == (401, UNAUTHORIZED)

            async def renew() -> Answer:
                return await a.refresh((await b.login(user))["refresh"])  # noqa: B023

            answer = await until_durable(renew)
        renewed = answer
        assert renewed.status == 200, renewed
        assert (await until_durable(lambda: b.logout(renewed.body["access"]))).status == 200  # noqa: B023
        assert (await a.me(renewed.body["access"])).status == 401
    records = await assert_clean_logs(a, b)
    for name in ("A", "B"):
        assert OPEN_LOG not in warnings_of(records[name])


async def test_redis_cluster_writes_with_a_new_client_and_refuses_one_sent_to_a_slots_old_master(
    redis_cluster: RedisClusterServers,
) -> None:
    """A client that has not read yet learns the slots before its first write; a write sent by a stale
    slot map is refused (a redirected SET would land apart from its WAIT), and the next read mends it."""
    from redis.asyncio.cluster import RedisCluster
    from redis.crc import key_slot

    node = {"host": "127.0.0.1", "port": redis_cluster.ports[0]}
    fresh, stale = bounded_redis(RedisCluster, **node), bounded_redis(RedisCluster, **node)
    try:
        sessions = sessions_for(store=jwtplus.redis_store(fresh))
        await jwtplus.revoke_subject(sessions, "ann")  # its very first command is a write
        key = jwtplus._store_key(sessions, jwtplus._slot_tag("ann"), "subject", "ann")
        (generation,) = await sessions.store.get_many([key], time.time())
        assert generation is not None

        store = jwtplus.redis_store(stale)
        moved = "{" + jwtplus._slot_tag("bob") + "}"
        await store.get_many([moved], time.time())  # the slot map, as it is now
        slot = key_slot(moved.encode())
        masters = [port for port, primary in (await redis_cluster.roles()).items() if primary is None]
        rows = await redis_cluster_slots(masters[0])
        (owner,) = [node[1] for start, end, node, *_ in rows if start <= slot <= end]
        target = next(port for port in masters if port != owner)
        owner_id, target_id = [await redis_command(port, "CLUSTER", "MYID") for port in (owner, target)]
        # the empty slot moves as redis-cli would move it: importing, migrating, then the new owner
        # first (leaving the importing state bumps its config epoch, so every node takes its claim)
        assert await redis_command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", owner_id) == "OK"
        assert await redis_command(owner, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id) == "OK"
        for port in (target, owner, *(port for port in masters if port not in (owner, target))):
            assert await redis_command(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id) == "OK"

        async def agreed() -> bool:
            for server in redis_cluster.alive():
                owners = [
                    node[1]
                    for start, end, node, *_ in await redis_cluster_slots(server.port)
                    if start <= slot <= end
                ]
                if owners != [target]:
                    return False
            return await redis_cluster.healthy()

        await redis_ready("the nodes did not agree on the moved slot", agreed, redis_cluster.log)
        with pytest.raises(
            Exception, match=f"of pipeline caused error: .*{slot} 127.0.0.1:{target}"
        ) as refused:
            await store.put(moved, 1.0, time.time() + 60, time.time())
        assert not isinstance(refused.value, jwtplus.StoreNotDurableError)
        assert await redis_command(target, "GET", moved) is None  # nothing written where it now lives
        assert await store.get_many([moved], time.time()) == [None]  # a read follows the move
        await store.put(moved, 2.0, time.time() + 60, time.time())
        assert await store.get_many([moved], time.time()) == [2.0]
    finally:
        await fresh.aclose()
        await stale.aclose()


@pytest.fixture
async def redis_sentinel(
    redis_server: RedisServer, redis_replica: RedisServer, tmp_path: Path
) -> AsyncIterator[RedisServer]:
    """A redis-sentinel that monitors *redis_server* as SENTINEL_MASTER, once it knows the replica;
    it fails over 0.5 s after the primary stops answering."""
    if REDIS_SENTINEL is None:
        pytest.skip(SENTINEL_SKIP)
    directory = tmp_path / "sentinel"
    directory.mkdir()
    port = free_port()
    config = directory / "sentinel.conf"  # a Sentinel rewrites its configuration file as it learns
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
        f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {redis_server.port} 1\n"
        f"sentinel down-after-milliseconds {SENTINEL_MASTER} 500\n"
        f"sentinel failover-timeout {SENTINEL_MASTER} 10000\n"
    )
    with (directory / "sentinel.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            REDIS_SENTINEL,
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    sentinel = RedisServer(port, directory, proc=proc)
    sentinel.starts = 0  # its log is sentinel.log

    def logs() -> str:
        return (directory / "sentinel.log").read_text(errors="replace")

    async def knows_the_replica() -> bool:
        replicas = await redis_command(port, "SENTINEL", "REPLICAS", SENTINEL_MASTER)
        return len(replicas) == 1 and "s_down" not in str(replicas)

    try:
        await redis_ready("the Sentinel did not find the replica", knows_the_replica, logs)
        yield sentinel
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        print(logs())


async def redis_cluster_slots(port: int) -> list[Any]:
    """CLUSTER SLOTS as the node on *port* answers it: [start, end, [host, port, id], replicas...]."""
    return cast(list[Any], await redis_command(port, "CLUSTER", "SLOTS"))


async def sentinel_primary(sentinel: RedisServer) -> int:
    """The port of the primary that *sentinel* names now."""
    _, port = await redis_command(sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER)
    return int(port)


async def test_redis_sentinel_failover_right_after_a_logout_keeps_it_and_the_used_refresh_token(
    session_servers: StartSessionServers,
    redis_server: RedisServer,
    redis_replica: RedisServer,
    redis_sentinel: RedisServer,
) -> None:
    """Sentinel clients wait for a replica by default: what was answered 200 survives the primary's
    SIGKILL right after, and nothing during the promotion is a 200 for a revoked token or a 500."""
    a, b = await session_servers("--sentinel", f"127.0.0.1:{redis_sentinel.port}")
    first, bob, carol = await a.login("ann"), await b.login("bob"), await a.login("carol")
    rotated = await b.refresh(first["refresh"])
    assert rotated.status == 200
    second = rotated.body
    carols = await a.refresh(carol["refresh"])  # carol's first refresh token is used, not revoked
    assert carols.status == 200
    assert (await a.logout(second["access"])).status == 200
    assert redis_server.proc is not None
    redis_server.proc.kill()  # at once: the replica got the writes only because they were waited for

    got: Counter[tuple[str, int]] = Counter()
    started = time.monotonic()
    settled = False
    while not settled:  # until the Sentinel names the replica and a round of requests gets no 503
        assert time.monotonic() - started < START_TIMEOUT, ("no recovery from the failover", got)
        promoted = await sentinel_primary(redis_sentinel) == redis_replica.port
        statuses = []
        for server in (a, b):
            statuses += [("revoked", (await server.me(second["access"])).status)]
            statuses += [("alive", (await server.me(bob["access"])).status)]
        got.update(statuses)
        settled = promoted and all(status != 503 for _, status in statuses)
        await asyncio.sleep(0.05)
    print(f"recovered after {time.monotonic() - started:.2f} s", sorted(got.items()))
    assert got["revoked", 200] == 0 and got["alive", 401] == 0, got
    assert {status for _, status in got} <= {200, 401, 503}, got

    for server in (a, b):  # on the promoted replica: the logout holds, and so does the used token
        assert (await server.me(second["access"])).status == 401
        assert (await server.me(bob["access"])).status == 200
    replay = await a.refresh(first["refresh"])
    assert (replay.status, replay.body) == (401, UNAUTHORIZED)
    # the new primary has no replica yet: a write cannot be made durable, so it is refused
    assert (await b.refresh(bob["refresh"])).status == 503
    await redis_server.start()  # the old primary comes back, as a replica of the new one
    await redis_command(redis_server.port, "REPLICAOF", "127.0.0.1", redis_replica.port)
    await redis_ready(
        "the old primary did not replicate the new one",
        functools.partial(replica_acknowledges, redis_replica.port),
        redis_server.log,
    )
    # detected as a reuse: its use outlived the failover (a retry after a 503 is a reuse too)
    theft = await until_durable(lambda: b.refresh(carol["refresh"]))
    assert (theft.status, theft.body) == (401, UNAUTHORIZED)
    assert [(await server.me(carols.body["access"])).status for server in (a, b)] == [401, 401]

    async def renew() -> Answer:
        return await a.refresh((await b.login("bob"))["refresh"])

    renewed = await until_durable(renew)
    assert renewed.status == 200, renewed
    records = await assert_clean_logs(a, b)
    assert "jwtplus: a refresh token was used twice; its family is revoked" in warnings_of(records["B"])


async def test_readme_running_on_many_servers_snippet_runs_as_pasted(
    redis_server: RedisServer,
    redis_replica: RedisServer,
    redis_sentinel: RedisServer,
    redis_cluster: RedisClusterServers,
) -> None:
    """Each of the section's three clients, on its real topology, revokes a family that all see."""
    (snippet,) = readme_snippets("Running on many servers")
    places = {
        "redis://127.0.0.1:6379/0": redis_server.url,
        "port=7000": f"port={redis_cluster.ports[0]}",
        '("127.0.0.1", 26379)': f'("127.0.0.1", {redis_sentinel.port})',
        '"mymaster"': repr(SENTINEL_MASTER),
    }
    for place, real in places.items():
        assert place in snippet, place
        snippet = snippet.replace(place, real)
    lines = snippet.splitlines()
    builds = [line for line in lines if line.startswith("client = ")]
    kinds = []
    for build in builds:
        one = "\n".join(line for line in lines if line == build or not line.startswith("client = "))
        readme = run_snippet(one, jwtplus=jwtplus, manager=manager())
        sessions = readme["sessions"]
        kinds.append(sessions.store.info())
        try:
            pair = await jwtplus.issue_tokens(sessions, "ann", {"username": "ann"})
            claims = sessions.manager.decode(pair.access)
            assert not await is_revoked(sessions, claims, time.time())
            await jwtplus.revoke_family(sessions, claims["fam"])
            assert await is_revoked(sessions, claims, time.time())
        finally:
            await readme["client"].aclose()
            for sentinel in readme["sentinel"].sentinels:  # the Sentinel object's own connections
                await sentinel.aclose()
    assert [(info["client"], info["replicas"]) for info in kinds] == [
        ("server", 0),
        ("cluster", 1),
        ("sentinel", 1),
    ]


# -- Many workers behind one port --
#
# Every request goes out on a connection of its own, so the kernel hands each to either process:
# a token is minted by one and checked, refreshed or logged out by whichever answers next. The
# access log names the process (its pid) and the request (the User-Agent carries its number), so
# the test knows who minted every token and who judged it. The key rotates every ROTATION seconds,
# and the tokens of the first half are used only once real time has crossed a boundary.

ROTATION = 2  # seconds: short, so that real time crosses a rotation boundary within the run
DEMO_PASSWORDS = {"jacky": "jwtplus-demo", "admin": "jwtplus-admin"}
AGENT = "test_workers/"  # + the request's number: the access log's key to the request
IN_FLIGHT = 16  # requests at once: enough that both processes are busy
# aiohttp's format under gunicorn (%P is "<pid>"), and the demo's own default one under a [pid] prefix
GUNICORN_LOG_FORMAT = '%P %s "%r" "%{User-Agent}i"'
_GUNICORN_ACCESS = re.compile(rf'<(?P<pid>\d+)> (?P<status>\d{{3}}) "[^"]*" "{AGENT}(?P<number>\d+)"')
_DEMO_ACCESS = re.compile(
    rf'\[(?P<pid>\d+)\] \S+ \[[^]]*\] "[^"]*" (?P<status>\d{{3}}) \S+ "[^"]*" "{AGENT}(?P<number>\d+)"'
)


@dataclass
class HeldPair:
    """A login's cookies as a browser holds them (kept after a logout, as a thief would keep them)."""

    username: str
    jar: dict[str, str] = field(repr=False)
    minted_by: int
    """The number of the request whose answer set them (-1: minted by the test)."""

    @property
    def kid(self) -> int:
        """The rotation period that signed the access token (-1: it names none)."""
        return int(jwt.get_unverified_header(self.jar["__Host-access_token"]).get("kid", -1))


class StoryCut(Exception):
    """A login or refresh that had to answer 200 did not: the rest of its login's story cannot run."""


@dataclass
class Judged:
    """One request of the run: what it had to get and what it got."""

    number: int
    what: str
    login: int | None
    """Which login (session) of the run it belongs to; None for an outsider's."""
    carried: HeldPair | None = field(repr=False)
    expected: int
    status: int
    period: int
    """The rotation period just before it went out (the server's is the same or later)."""
    right_body: bool
    """A 200 of /api/me names the pair's user; anything else is right."""


@dataclass
class SpreadRun:
    """The client side of the run: each request on a connection of its own, every one recorded."""

    url: str
    http: ClientSession
    sent: list[Judged] = field(default_factory=list)
    numbers: Iterator[int] = field(default_factory=itertools.count)
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(IN_FLIGHT))

    async def send(
        self,
        what: str,
        expected: int,
        path: str,
        carried: HeldPair | None = None,
        *,
        login: int | None,
        body: Any = None,
    ) -> tuple[Judged, dict[str, str]]:
        """One request; a POST with cookies echoes the CSRF cookie as the page does. Returns the
        record and the cookies after its answer."""
        number = next(self.numbers)
        headers = {"User-Agent": f"{AGENT}{number}"}
        if carried is not None:
            headers.update(as_cookie_header(carried.jar))
        method = "GET" if path == "/api/me" else "POST"
        if carried is not None and method == "POST":
            headers["X-CSRF-Token"] = carried.jar["__Host-csrf_token"]
        async with self.slots:
            period = jwtplus.period_of(time.time(), ROTATION)
            async with self.http.request(method, self.url + path, headers=headers, json=body) as reply:
                answer = await reply.json(content_type=None) if reply.status == 200 else None
                jar = cookies_of(reply, carried.jar if carried else None)
        right = True
        if path == "/api/me" and reply.status == 200:
            assert carried is not None
            right = isinstance(answer, dict) and answer.get("username") == carried.username
        sent = Judged(number, what, login, carried, expected, reply.status, period, right)
        self.sent.append(sent)
        return sent, jar

    async def log_in(self, login: int) -> HeldPair:
        username = ("jacky", "admin")[login % 2]
        body = {"username": username, "password": DEMO_PASSWORDS[username]}
        sent, jar = await self.send("login", 200, "/api/login", login=login, body=body)
        if sent.status != 200:
            raise StoryCut
        return HeldPair(username, jar, sent.number)

    async def me(self, pair: HeldPair, expected: int, login: int, what: str = "me") -> None:
        await self.send(what, expected, "/api/me", pair, login=login)

    async def refresh(self, pair: HeldPair, login: int) -> HeldPair:
        sent, jar = await self.send("refresh", 200, "/api/refresh", pair, login=login)
        if sent.status != 200:
            raise StoryCut
        return HeldPair(pair.username, jar, sent.number)

    async def refused_refresh(self, pair: HeldPair, login: int, what: str) -> None:
        await self.send(what, 401, "/api/refresh", pair, login=login)

    async def log_out(self, pair: HeldPair, login: int) -> None:
        await self.send("logout", 200, "/api/logout", pair, login=login)


# Each login's story in two halves: the first before a rotation boundary, the second after it,
# with the tokens of the first. 40 x 15 + 30 x 9 + 15 x 7 + 5 x 5 = 1,000 requests.


async def renewed_twice(run: SpreadRun, login: int) -> Callable[[], Awaitable[None]]:
    first = await run.log_in(login)
    await run.me(first, 200, login)
    await run.me(first, 200, login)

    async def after_the_boundary() -> None:
        await run.me(first, 200, login, "me, a token of an earlier period")
        second = await run.refresh(first, login)
        await run.me(second, 200, login)
        await run.me(first, 200, login, "me, the access token of a refreshed pair")
        third = await run.refresh(second, login)
        await run.me(third, 200, login)
        await run.log_out(third, login)
        for pair in (third, second, first):
            await run.me(pair, 401, login, "me, logged out")
        await run.refused_refresh(third, login, "refresh, logged out")
        await run.me(third, 401, login, "me, logged out")

    return after_the_boundary


async def refresh_reused(run: SpreadRun, login: int) -> Callable[[], Awaitable[None]]:
    first = await run.log_in(login)

    async def after_the_boundary() -> None:
        second = await run.refresh(first, login)
        await run.me(second, 200, login)
        await run.refused_refresh(first, login, "refresh, reused")
        # Within the demo's reuse grace (10 s) the reuse leaves the family alive, after it the
        # family is revoked: a logout makes what follows the same either way.
        await run.log_out(second, login)
        await run.me(second, 401, login, "me, logged out")
        await run.me(first, 401, login, "me, logged out")
        await run.refused_refresh(second, login, "refresh, logged out")
        await run.refused_refresh(first, login, "refresh, reused and logged out")

    return after_the_boundary


async def logged_out_early(run: SpreadRun, login: int) -> Callable[[], Awaitable[None]]:
    first = await run.log_in(login)
    await run.me(first, 200, login)
    await run.log_out(first, login)

    async def after_the_boundary() -> None:
        await run.me(first, 401, login, "me, logged out in an earlier period")
        await run.me(first, 401, login, "me, logged out in an earlier period")
        await run.refused_refresh(first, login, "refresh, logged out in an earlier period")
        await run.me(first, 401, login, "me, logged out in an earlier period")

    return after_the_boundary


async def forged_pair(manager: jwtplus.SecretManager) -> HeldPair:
    """The cookies of a login as *manager* would sign it: the demo's claims, not its secret."""
    pair = await jwtplus.issue_tokens(
        jwtplus.Sessions(manager=manager), "jacky", {"username": "jacky", "role": "user"}
    )
    jar = {"__Host-access_token": pair.access, "__Host-refresh_token": pair.refresh}
    return HeldPair("jacky", {**jar, "__Host-csrf_token": pair.csrf}, -1)


async def outsider(run: SpreadRun, secret: str) -> Callable[[], Awaitable[None]]:
    other = await forged_pair(jwtplus.SecretManager(secrets.token_urlsafe(32), refresh_interval=ROTATION))
    unrotated = await forged_pair(jwtplus.SecretManager(secret))  # signed with the secret itself: no kid

    async def after_the_boundary() -> None:
        await run.send("me, no token", 401, "/api/me", login=None)
        await run.send("me, another secret", 401, "/api/me", other, login=None)
        await run.send("refresh, another secret", 401, "/api/refresh", other, login=None)
        await run.send("me, the secret without rotation", 401, "/api/me", unrotated, login=None)
        wrong = {"username": "jacky", "password": "jwtplus-demo!"}
        await run.send("login, wrong password", 401, "/api/login", login=None, body=wrong)

    return after_the_boundary


async def unless_cut(story: Awaitable[_T]) -> _T | None:
    """What *story* returns, or None once it was cut short (its answers are in the run's record)."""
    try:
        return await story
    except StoryCut:
        return None


async def run_against(url: str, secret: str) -> list[Judged]:
    """The 1,000 requests: every first half at once, then (once the period of every token they got
    is over) every second half at once."""
    connector = TCPConnector(force_close=True)  # a connection per request: either process answers
    async with ClientSession(timeout=HTTP_TIMEOUT, cookie_jar=DummyCookieJar(), connector=connector) as http:
        run = SpreadRun(url, http)
        stories = [renewed_twice] * 40 + [refresh_reused] * 30 + [logged_out_early] * 15
        halves = await asyncio.gather(
            *(unless_cut(story(run, login)) for login, story in enumerate(stories)),
            *(outsider(run, secret) for _ in range(5)),
        )
        minted = [sent.carried.kid for sent in run.sent if sent.carried and sent.carried.minted_by >= 0]
        last = max([*minted, jwtplus.period_of(time.time(), ROTATION)])
        # sleeps only if the first halves took less than a period: the boundary is what is waited for
        await asyncio.sleep(max(0.0, (last + 1) * ROTATION - time.time()))
        await asyncio.gather(*(unless_cut(half()) for half in halves if half is not None))
        return sorted(run.sent, key=lambda sent: sent.number)


def answerers(logs: Sequence[str], access: re.Pattern[str]) -> dict[int, int]:
    """The pid that answered each numbered request, from the access logs."""
    found: dict[int, int] = {}
    for log in logs:
        for line in log.splitlines():
            if entry := access.fullmatch(line):
                assert int(entry["number"]) not in found, line
                found[int(entry["number"])] = int(entry["pid"])
    return found


def check_run(sent: list[Judged], answered: dict[int, int], pids: set[int]) -> dict[str, Any]:
    """Assert that every request got its answer, whichever process gave it, and that the run proves
    what it is for; return the counts."""
    false_accepts = [s for s in sent if s.expected != 200 and s.status == 200]
    false_rejects = [s for s in sent if s.expected == 200 and s.status in (401, 403)]
    wrong = [s for s in sent if s.status != s.expected or not s.right_body]
    assert not wrong, (
        f"{len(false_accepts)} false accepts, {len(false_rejects)} false rejects, {len(wrong)} wrong "
        f"answers of {len(sent)}, the first: "
        + "; ".join(f"#{s.number} {s.what}: {s.status} (not {s.expected})" for s in wrong[:8])
    )
    assert [s.number for s in sent] == list(range(1000))
    assert set(answered) == set(range(1000)), sorted(set(range(1000)) ^ set(answered))[:20]
    per_pid = Counter(answered.values())
    assert set(per_pid) == pids, per_pid
    assert min(per_pid.values()) >= 100, per_pid  # both take a real share, not a stray request

    def minted_elsewhere(s: Judged) -> bool:
        return (
            s.carried is not None
            and s.carried.minted_by >= 0
            and answered[s.carried.minted_by] != answered[s.number]
        )

    accepted = [s for s in sent if s.expected == 200 and s.carried is not None]
    crossed = {
        pid: [s for s in accepted if answered[s.number] == pid and minted_elsewhere(s)] for pid in pids
    }
    assert all(crossed.values()), {pid: len(found) for pid, found in crossed.items()}
    across_periods = {
        pid: [s for s in found if s.carried and s.period > s.carried.kid] for pid, found in crossed.items()
    }
    assert all(across_periods.values())
    assert len({s.period for s in sent}) >= 2
    refreshed_elsewhere = [s for s in sent if s.what == "refresh" and minted_elsewhere(s)]
    assert refreshed_elsewhere
    logouts = {s.login: s for s in sent if s.what == "logout"}
    refused_elsewhere = [
        s
        for s in sent
        if s.expected == 401
        and s.login in logouts
        and s.number > logouts[s.login].number
        and answered[s.number] != answered[logouts[s.login].number]
    ]
    assert refused_elsewhere
    return {
        "requests": len(sent),
        "false accepts": len(false_accepts),
        "false rejects": len(false_rejects),
        "per pid": dict(per_pid),
        "periods": sorted({s.period for s in sent}),
        "200s for a token minted by the other process": {pid: len(found) for pid, found in crossed.items()},
        "... of them in a later period than the token": {pid: len(v) for pid, v in across_periods.items()},
        "refreshes of a pair minted by the other process": len(refreshed_elsewhere),
        "refusals after a logout the other process answered": len(refused_elsewhere),
    }


def assert_clean(server: Server) -> None:
    """No traceback, no error and no token in a server's output."""
    output = server.stdout() + server.stderr()
    assert "Traceback" not in output, server.logs()
    assert "Error handling request" not in output, server.logs()
    assert "eyJ" not in output, server.logs()  # a JWT's first characters


async def test_the_demo_under_gunicorn_with_two_workers_agrees_on_tokens_refreshes_and_logouts(
    start_command: StartCommand, redis_server: RedisServer, tmp_path: Path
) -> None:
    pytest.importorskip("gunicorn", reason="needs gunicorn (pip install 'aiohttp-jwtplus[test]')")
    secret, port = secrets.token_urlsafe(32), free_port()
    env = {
        "JWTPLUS_SECRET": secret,
        "JWTPLUS_REDIS_URL": redis_server.url,
        "JWTPLUS_ROTATION": f"{ROTATION}s",
        "XDG_RUNTIME_DIR": str(tmp_path),  # gunicorn 25.1+'s control socket: here, not in ~/.gunicorn
    }
    gunicorn = await start_command(
        "gunicorn",
        port,
        sys.executable,
        *WARNING_FLAGS,
        # aiohttp's GunicornWebWorker.init_process calls asyncio.get_event_loop() with no loop set,
        # which Python 3.12+ deprecates: aiohttp's warning, not the demo's, and harmless there
        "-W",
        "ignore:There is no current event loop:DeprecationWarning:aiohttp.worker",
        "-m",
        "gunicorn",
        "spa_demo:gunicorn_app",
        "--chdir",
        str(EXAMPLES),
        "--worker-class",
        "aiohttp.GunicornWebWorker",
        "--workers",
        "2",
        "--bind",
        f"127.0.0.1:{port}",
        "--access-logfile",
        "-",
        "--access-logformat",
        GUNICORN_LOG_FORMAT,
        "--graceful-timeout",
        "5",
        env=env,
    )
    sent = await run_against(gunicorn.url, secret)
    assert await gunicorn.stop() == 0, gunicorn.logs()
    workers = {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", gunicorn.stderr())}
    assert len(workers) == 2, gunicorn.logs()  # none died and was replaced
    counts = check_run(sent, answerers([gunicorn.stdout()], _GUNICORN_ACCESS), workers)
    assert_clean(gunicorn)
    print(counts)


async def test_two_demo_processes_sharing_a_port_agree_on_tokens_refreshes_and_logouts(
    start_command: StartCommand, redis_server: RedisServer
) -> None:
    secret, port = secrets.token_urlsafe(32), free_port()
    demo = (
        sys.executable,
        *WARNING_FLAGS,
        str(EXAMPLES / "spa_demo.py"),
        "--port",
        str(port),
        "--reuse-port",
    )
    banner = "jwtplus SPA demo on"  # printed once the socket listens: the port is B's too from then
    # A has its settings on the command line, B from the environment
    a = await start_command(
        "A",
        port,
        *demo,
        "--redis-url",
        redis_server.url,
        "--rotation",
        f"{ROTATION}s",
        env={"JWTPLUS_SECRET": secret},
        ready=banner,
    )
    b = await start_command(
        "B",
        port,
        *demo,
        env={
            "JWTPLUS_SECRET": secret,
            "JWTPLUS_REDIS_URL": redis_server.url,
            "JWTPLUS_ROTATION": f"{ROTATION}s",
        },
        ready=banner,
    )
    sent = await run_against(a.url, secret)
    for server in (a, b):
        assert await server.stop() == 0, server.logs()
    answered = answerers([a.stderr(), b.stderr()], _DEMO_ACCESS)
    counts = check_run(sent, answered, {a.proc.pid, b.proc.pid})
    for server in (a, b):
        assert_clean(server)
    print(counts)

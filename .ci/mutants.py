"""A small mutation pass over jwtplus.py's security-relevant functions: can the tests fail?

    .venv/bin/python .ci/mutants.py [--jobs 2] [--only SECTION] [--list]

Each mutant changes one thing in one function of the pipeline, the checks, the route policies
and guards, scope matching, time claims, the session helpers, the keys and key sets, identity
providers or WebSockets: a comparison flipped
(== and !=, is and is not, in and not in, < and >=, ...), `and` and `or` swapped, a `not`
dropped, a boolean constant flipped, a status string swapped for another, or one statement
removed (logging calls excepted: they change no answer). The module is rewritten with
ast.unparse into a scratch copy of the repository, and test_jwtplus.py runs there with -x;
a mutant is killed when a test fails (or the run times out), and survives when every test
passes. Survivors are printed with their line, so each can be killed by a test or explained.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SECTIONS: dict[str, tuple[str, ...]] = {
    "pipeline": (
        "_authenticator",
        "_validated_checks",
        "_csrf_policy",
        "_checks",
        "_token_type",
        "authenticate",
        "basic_identifier",
    ),
    "route policies": (
        "RoutePolicy",
        "_merge",
        "policy_of",
        "_view_policy",
        "_enforce",
        "_refusal",
        "decide",
    ),
    "middlewares": (
        "_located_getter",
        "_identifier",
        "_router",
        "authentication_middleware",
        "router_middleware",
        "jwt_middleware",
    ),
    "checks": (
        "_csrf_ok",
        "csrf_check",
        "_text",
        "_revocation_keys",
        "_keys_of",
        "_revoked_by",
        "revocation_check",
    ),
    "guards": (
        "_declare",
        "_guarded",
        "_guard",
        "_fresh",
        "login_required",
        "fresh_login_required",
        "require",
        "_same",
        "require_claims",
        "route_options",
        "session_route",
    ),
    "time claims": ("_numeric_date", "_check_claims", "_time_claim"),
    "session helpers": (
        "_session_judge",
        "refresh_session",
        "_outlives",
        "revoke_token",
        "revoke_family",
        "revoke_subject",
        "end_session",
        "body_token_getter",
    ),
    "hardening": (
        "SecretManager",
        "Sessions",
        "encode_token",
        "_origin_ok",
        "_store_key",
        "_mint",
        "issue_tokens",
        "_reloaded",
        "memory_store",
        "_bounded_client",
        "_has_router",
        "_authentication",
        "_mount_prefixes",
        "_hint_relative_patterns",
        "setup",
        "show_request_info",
    ),
    "scale-out": (
        "_slot_tag",
        "_family_tag",
        "_token_tag",
        "_tag_of",
        "_client_kind",
        "_coalesced",
        "redis_store",
    ),
    "keys": (
        "_parsed",
        "_verify",
        "_own_key",
        "_static_keys",
        "_load_key",
        "_jwk_key",
        "_key_of",
        "_verifier",
        "_signer",
        "key_for_period",
        "_published_periods",
        "public_jwks",
        "jwks_handler",
    ),
    "providers and sockets": (
        "_https_url",
        "IdentityProvider",
        "_max_age",
        "_get_json",
        "_jwks_keys",
        "_remote_keys",
        "_provider_verifier",
        "_key_source",
        "subject_identifier",
        "authenticated_messages",
        "_offered_token",
    ),
    "refusals and conveniences": (
        "_failed",
        "user_identifier",
        "_identity",
        "_challenge",
        "_refusal_of",
        "_refuser",
        "_shaped",
        "_shaping",
        "_http_error",
        "_form_csrf",
        "require_user",
        "get_auth_claims",
        "get_auth_identity",
        "auth_headers",
    ),
}

FIRST = {  # the tests most likely to kill a section's mutants, run first (then, if all pass, every test)
    "pipeline": "check or authenticate or identifier or getter or seed or protected or csrf or cache",
    "route policies": "guard or optional or route or policy or view or decide or scope or location",
    "middlewares": "guard or optional or route or view or middleware or seed or cache or location",
    "checks": "csrf or cookie or revoc or logout or jti or store or session or trusted or origin",
    "guards": "guard or view or scope or fresh or login_required or require or policy or option or wrapper",
    "time claims": "claim or exp or iat or nbf or audience or datetime or decode or leeway",
    "session helpers": "session or refresh or logout or revoke or body or jti or store",
    "hardening": (
        "origin or socket or secret or leeway or grace or everywhere or namespace or lifetime or reload "
        "or bounded or stall or router or twice or sub_app or relative or show_request or encode or pair "
        "or ahead"
    ),
    "scale-out": (
        "slot or cluster or sentinel or replica or redis_store or revoke_family or namespace or keys_live "
        "or concurrent_lookups"
    ),
    "keys": (
        "(key or jwk or eddsa or ed25519 or es256 or rs256 or ps256 or alg or kid or pem or crypto or "
        "confusion or der or rotation or period or publish or readme) and not (servers or browser or redis)"
    ),
    "providers and sockets": (
        "(provider or issuer or jwks or kid or cooldown or discovery or socket or tenant or at_jwt or "
        "readme or renew or withdrawn or clock or cache_control) and not (servers or browser or redis)"
    ),
    "refusals and conveniences": (
        "(refusal or refused or identifier or identity or csrf or form or require_user or auth_headers or "
        "lifetime or revoked or readme or challenge or scheme) and not (servers or browser or redis)"
    ),
}

STATUSES = ("invalid", "rejected", "unavailable", "expired", "missing", "pass", "access", "refresh")
SWAPS: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Lt: ast.GtE,
    ast.GtE: ast.Lt,
    ast.Gt: ast.LtE,
    ast.LtE: ast.Gt,
}


@dataclass(frozen=True)
class Mutant:
    section: str
    function: str
    index: int  # the node's position in ast.walk of the function
    kind: str
    line: int
    text: str


def targets(tree: ast.Module) -> dict[str, tuple[str, ast.AST]]:
    """Top-level functions and classes named in SECTIONS, with their section."""
    wanted = {name: section for section, names in SECTIONS.items() for name in names}
    found = {}
    for node in tree.body:
        name = getattr(node, "name", None)
        if name in wanted:
            found[name] = (wanted[name], node)
    missing = set(wanted) - set(found)
    if missing:
        sys.exit(f"mutants.py: no such functions in jwtplus.py: {', '.join(sorted(missing))}")
    return found


def is_log_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Attribute)
        and isinstance(node.value.func.value, ast.Name)
        and node.value.func.value.id == "_log"
    ) or (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name)
        and node.value.func.id == "_store_failed"  # a log line too
    )


def is_docstring(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def kinds(node: ast.AST) -> list[str]:
    """The mutations that apply to *node*."""
    out = []
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in SWAPS:
        out.append("flip comparison")
    if isinstance(node, ast.BoolOp):
        out.append("swap and/or")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        out.append("drop not")
    if isinstance(node, ast.Constant) and isinstance(node.value, bool):
        out.append("flip bool")
    if isinstance(node, ast.Constant) and node.value in STATUSES:
        out.append("swap status")
    removable = not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    if isinstance(node, ast.stmt) and removable and not is_log_call(node) and not is_docstring(node):
        out.append("remove statement")
    return out


def mutants(source: str) -> list[Mutant]:
    tree = ast.parse(source)
    lines = source.splitlines()
    out = []
    for name, (section, node) in targets(tree).items():
        quiet = {id(n) for log in ast.walk(node) if is_log_call(log) for n in ast.walk(log)}
        for index, child in enumerate(ast.walk(node)):
            if id(child) in quiet:  # what a log line says changes no answer
                continue
            for kind in kinds(child):
                line = getattr(child, "lineno", node.lineno)
                out.append(Mutant(section, name, index, kind, line, lines[line - 1].strip()))
    return out


def mutate(source: str, mutant: Mutant | None) -> str:
    tree = ast.parse(source)
    if mutant is None:  # the control: the same module through ast.unparse, unchanged
        return ast.unparse(tree)
    node = targets(tree)[mutant.function][1]
    child = list(ast.walk(node))[mutant.index]
    if mutant.kind == "flip comparison":
        assert isinstance(child, ast.Compare)
        child.ops = [SWAPS[type(child.ops[0])]()]
    elif mutant.kind == "swap and/or":
        assert isinstance(child, ast.BoolOp)
        child.op = ast.Or() if isinstance(child.op, ast.And) else ast.And()
    elif mutant.kind == "drop not":
        assert isinstance(child, ast.UnaryOp)
        replace(node, child, child.operand)
    elif mutant.kind == "flip bool":
        assert isinstance(child, ast.Constant)
        child.value = not child.value
    elif mutant.kind == "swap status":
        assert isinstance(child, ast.Constant)
        order = list(STATUSES)
        child.value = order[(order.index(child.value) + 1) % len(order)]
    elif mutant.kind == "remove statement":
        replace(node, child, ast.Pass())
    return ast.unparse(ast.fix_missing_locations(tree))


def replace(root: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for parent in ast.walk(root):
        for field, value in ast.iter_fields(parent):
            if isinstance(value, list) and any(item is old for item in value):
                setattr(parent, field, [new if item is old else item for item in value])
                return
            if value is old:
                setattr(parent, field, new)
                return
    raise LookupError("node not found")


def run(mutant: Mutant | None, source: str, scratch: Path, timeout: float) -> tuple[Mutant | None, str]:
    (scratch / "jwtplus.py").write_text(mutate(source, mutant))
    env = {**os.environ, "PYTHONPATH": str(scratch), "PYTHONDONTWRITEBYTECODE": "1"}
    # the packaging tests build wheels: no mutant of jwtplus.py's logic shows there
    command = [
        sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header",
        "-o", "addopts=", "-m", "not packaging", "test_jwtplus.py",
    ]  # fmt: skip
    passes = [[*command, "-k", FIRST[mutant.section]], command] if mutant is not None else [command]
    for run_command in passes:
        try:
            done = subprocess.run(  # noqa: S603
                run_command,
                cwd=scratch,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return mutant, "killed (timeout)"
        if done.returncode not in (0, 5):  # 5: the first pass selected no test
            if mutant is None:
                print(done.stdout[-3000:], file=sys.stderr)
            return mutant, "killed"
    return mutant, "survived"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", help="only these sections (comma-separated)")
    parser.add_argument("--functions", help="only these functions (comma-separated), say a survivor's")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--timeout", type=float, default=180)
    args = parser.parse_args()
    source = (ROOT / "jwtplus.py").read_text()
    functions = set(args.functions.split(",")) if args.functions else None
    sections = set(args.only.split(",")) if args.only else None
    if sections is None and functions is not None:
        sections = set()
    todo = [
        m
        for m in mutants(source)
        if (sections is None or m.section in sections) or (functions is not None and m.function in functions)
    ]
    if args.list:
        for m in todo:
            print(f"{m.section:16} {m.function:26} line {m.line:5} {m.kind:18} {m.text}")
        print(f"{len(todo)} mutants")
        return
    scratches = []
    for _ in range(args.jobs):
        scratch = Path(tempfile.mkdtemp(prefix="jwtplus-mutant-"))
        for name in ("test_jwtplus.py", "README.md", "pyproject.toml", "Makefile"):
            shutil.copy(ROOT / name, scratch / name)
        shutil.copytree(ROOT / "examples", scratch / "examples")
        scratches.append(scratch)
    if run(None, source, scratches[0], args.timeout)[1] != "survived":
        sys.exit("mutants.py: the tests fail on the unmutated module in the scratch copy; nothing to learn")
    outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    survivors: list[Mutant] = []
    finished = 0
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        free = list(scratches)
        pending: dict[concurrent.futures.Future[tuple[Mutant | None, str]], Path] = {}
        queue = list(todo)
        while queue or pending:
            while queue and free:
                scratch = free.pop()
                pending[pool.submit(run, queue.pop(0), source, scratch, args.timeout)] = scratch
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                free.append(pending.pop(future))
                mutant, outcome = future.result()
                assert mutant is not None
                finished += 1
                if finished % 25 == 0:
                    print(f"  {finished}/{len(todo)} mutants run, {len(survivors)} survived", flush=True)
                outcomes[mutant.section]["made"] += 1
                outcomes[mutant.section]["survived" if outcome == "survived" else "killed"] += 1
                if outcome == "survived":
                    survivors.append(mutant)
                    where = f"{mutant.section}: {mutant.function} line {mutant.line}, {mutant.kind}"
                    print(f"SURVIVED {where}: {mutant.text}", flush=True)
    for scratch in scratches:
        shutil.rmtree(scratch, ignore_errors=True)
    print("\n| section | mutants | killed | survived |\n|---|---:|---:|---:|")
    for section in SECTIONS:
        c = outcomes[section]
        if c["made"]:
            print(f"| {section} | {c['made']} | {c['killed']} | {c['survived']} |")
    total = sum((c for c in outcomes.values()), Counter())
    print(f"| all | {total['made']} | {total['killed']} | {total['survived']} |")


if __name__ == "__main__":
    main()

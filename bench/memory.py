"""The verified-token cache stays bounded: a million distinct tokens through it, memory read as we go.

    python bench/memory.py [--tokens 1000000] [--size 10000] [--output bench/results.md]

Mints each token, has the cache verify it (every one a miss, the worst case), and
prints the process's resident memory at checkpoints. With a bounded cache the
resident size stops growing once the cache is full; an unbounded one would grow by
about a kilobyte a token. Appends its table to --output if given.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import jwtplus


def resident_mib() -> float:
    """Resident set size now (Linux: /proc/self/statm), in MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokens", type=int, default=1_000_000, help="distinct tokens (default: %(default)s)"
    )
    parser.add_argument("--size", type=int, default=10_000, help="cache size (default: %(default)s)")
    parser.add_argument("--output", type=Path, help="append the table to this Markdown file")
    args = parser.parse_args()

    manager = jwtplus.SecretManager(secret=b"bench secret of thirty-two bytes")
    decode = jwtplus.cached_decoder(manager, size=args.size)
    checkpoints = sorted({args.size, 10 * args.size, args.tokens // 10, args.tokens // 2, args.tokens})
    rows = [f"| 0 | {resident_mib():.1f} |"]
    started = time.perf_counter()
    now = time.time()
    for n in range(1, args.tokens + 1):
        token = manager.encode({"username": "ann", "n": n}, now=now)
        decode(token, now)
        if n in checkpoints:
            rows.append(f"| {n:,} | {resident_mib():.1f} |")
    seconds = time.perf_counter() - started
    table = "\n".join(
        [
            f"Memory with a million distinct tokens: `cached_decoder(size={args.size:,})`, every token",
            f"minted and verified once (all misses), resident memory at each checkpoint ({seconds:.0f} s):",
            "",
            "| distinct tokens seen | resident MiB |",
            "|---:|---:|",
            *rows,
            "",
        ]
    )
    print(table)
    if args.output:
        with args.output.open("a") as out:
            out.write("\n" + table)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Bounded fuzz campaigns against pyvhost; each prints its counts as one JSON line and exits non-zero on a
finding (a violated invariant, a crash, a hang, a leak).

    tools/fuzz.py ring [--states N] [--layout split|packed|both] [--seed S] [--sample K]
        random ring states through the compiled kernels (tools/fuzz_ring.py), both metadata paths
    tools/fuzz.py ring --layout L --replay-seed S --states N --sample K
        rerun one chunk of a campaign up to a failing state and print it
    tools/fuzz.py messages [--count N] [--seed S] [--metadata direct|copy]
        random vhost-user message sequences against `pyvhost serve net` (tools/fuzz_messages.py)
    tools/fuzz.py parser|chain [libFuzzer options, e.g. -runs=100000 -max_total_time=60]
        coverage-guided (atheris/libFuzzer) harnesses: the message parser and handlers, the chain walker
    tools/fuzz.py all [--states N] [--messages N] [--seed S]
        the CI campaign: ring (split and packed) and messages on both paths

Run from the repository with the project's venv (`.venv/bin/python tools/fuzz.py ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def cmd_ring(args: argparse.Namespace) -> int:
    import faulthandler

    import fuzz_ring

    faulthandler.enable()  # a fault in compiled code: at least the Python stack of the chunk that ran
    if args.replay_seed is not None:
        out = fuzz_ring.replay(args.replay_seed, args.states, args.sample, args.layout)
        print(json.dumps(out))
        return 1 if out["violation"] else 0
    layouts = ["split", "packed"] if args.layout == "both" else [args.layout]
    results = []
    for i, layout in enumerate(layouts):
        n = args.states // len(layouts) + (args.states % len(layouts) if i == 0 else 0)
        try:
            results.append(fuzz_ring.campaign(n, seed=args.seed, sample=args.sample, layout=layout))
        except AssertionError as e:
            print(json.dumps({"finding": str(e)}))
            return 1
    print(json.dumps({"ring": results, "states": sum(r["states"] for r in results)}))
    return 0


def cmd_messages(args: argparse.Namespace) -> int:
    import fuzz_messages

    metadatas = ["direct", "copy"] if args.metadata == "both" else [args.metadata]
    results = []
    for i, metadata in enumerate(metadatas):
        n = args.count // len(metadatas) + (args.count % len(metadatas) if i == 0 else 0)
        try:
            out = fuzz_messages.run_campaign(
                n,
                seed=args.seed + i,
                metadata=metadata,
                log=(lambda m: print(m, file=sys.stderr)) if args.verbose else None,
            )
        except fuzz_messages.ModelError as e:
            print(json.dumps({"finding": str(e)}))
            return 1
        results.append({"metadata": metadata, **out})
    print(json.dumps({"messages": results, "count": sum(r["messages"] for r in results)}))
    return 0


def cmd_atheris(args: argparse.Namespace, rest: list[str]) -> int:
    import fuzz_atheris

    return fuzz_atheris.main(args.command, rest)


def cmd_all(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    ring = argparse.Namespace(states=args.states, layout="both", seed=args.seed, sample=args.sample, replay_seed=None)
    rc = cmd_ring(ring)
    if rc == 0:
        rc = cmd_messages(argparse.Namespace(count=args.messages, seed=args.seed, metadata="both", verbose=False))
    print(json.dumps({"total_seconds": round(time.perf_counter() - t0, 1), "ok": rc == 0}))
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="tools/fuzz.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    ring = sub.add_parser("ring", help="compiled ring-state fuzzer")
    ring.add_argument("--states", type=int, default=1_000_000)
    ring.add_argument("--layout", choices=["split", "packed", "both"], default="both")
    ring.add_argument("--seed", type=int, default=1)
    ring.add_argument("--sample", type=int, default=16, help="compare copy and direct on every K-th state")
    ring.add_argument("--replay-seed", type=int, help="rerun this chunk seed (printed with a finding)")
    msgs = sub.add_parser("messages", help="message sequences against pyvhost serve net")
    msgs.add_argument("--count", type=int, default=100_000)
    msgs.add_argument("--seed", type=int, default=1)
    msgs.add_argument("--metadata", choices=["direct", "copy", "both"], default="both")
    msgs.add_argument("-v", "--verbose", action="store_true")
    sub.add_parser(
        "parser", help="atheris: vhost-user message parser and handlers (libFuzzer options follow)", add_help=False
    )
    sub.add_parser("chain", help="atheris: descriptor chain walker (libFuzzer options follow)", add_help=False)
    every = sub.add_parser("all", help="the CI campaign")
    every.add_argument("--states", type=int, default=1_000_000)
    every.add_argument("--messages", type=int, default=100_000)
    every.add_argument("--seed", type=int, default=1)
    every.add_argument("--sample", type=int, default=16)
    args, rest = p.parse_known_args(argv)
    if args.command in ("parser", "chain"):
        return cmd_atheris(args, rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    return {"ring": cmd_ring, "messages": cmd_messages, "all": cmd_all}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

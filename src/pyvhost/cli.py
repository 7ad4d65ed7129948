"""Command line: ``pyvhost serve net``, ``pyvhost drive net``, ``pyvhost bench``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from .access import Metadata

log = logging.getLogger("pyvhost")


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def cmd_serve(args: argparse.Namespace) -> int:
    from .backend import Server
    from .devices.net import Mode, NetDevice, warm_up

    _pin(args.cpu)
    if args.tap:  # a guest on a real network: frames go to and come from this tap device
        from .devices import tap

        device = tap.TapDevice(args.tap, offloads=not args.no_offloads)
        tap.warm_up()
    else:
        device = NetDevice(Mode(args.mode), queue_pairs=args.queue_pairs, pkt_size=args.pkt_size,
                           count=args.count)
        warm_up()
    server = Server(device, args.socket_path, Metadata(args.metadata), batch=args.batch)

    def on_signal(signum, frame):
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGUSR1, lambda s, f: log.info("stats %s", json.dumps(server.stats())))
    ticker = None
    if args.stats_interval:
        done = threading.Event()

        def tick():
            while not done.wait(args.stats_interval):
                log.info("stats %s", json.dumps(server.stats()))
        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
    log.info("serving %s (%s, %s path) on %s", f"tap {args.tap}" if args.tap else device.mode.value, "net",
             args.metadata, args.socket_path)
    if args.ready_file:
        with open(args.ready_file, "w") as f:
            f.write(str(os.getpid()))
    try:
        server.serve(connections=args.connections)
    finally:
        stats = server.stats()
        server.close()
        if ticker:
            done.set()
        print(json.dumps({"stats": stats}), flush=True)
        if args.stats_json:
            with open(args.stats_json, "w") as f:
                json.dump(stats, f)
    return 0


def cmd_serve_rng(args: argparse.Namespace) -> int:
    from .backend import Server
    from .devices.rng import RngDevice

    _pin(args.cpu)
    server = Server(RngDevice(), args.socket_path, Metadata(args.metadata))
    signal.signal(signal.SIGTERM, lambda s, f: server.stop())
    signal.signal(signal.SIGINT, lambda s, f: server.stop())
    log.info("serving rng (%s path) on %s", args.metadata, args.socket_path)
    try:
        server.serve(connections=args.connections)
    finally:
        print(json.dumps({"stats": server.stats()}), flush=True)
        server.close()
    return 0


def cmd_serve_blk(args: argparse.Namespace) -> int:
    from .devices.blk import serve_main

    _pin(args.cpu)
    return serve_main(args)


def cmd_drive(args: argparse.Namespace) -> int:
    import time

    from .frontend import Frontend, warm_up

    _pin(args.cpu)
    warm_up()
    t_connect = time.perf_counter()
    with Frontend(args.socket_path, queue_size=args.queue_size, event_idx=not args.no_event_idx,
                  packed=args.packed) as fe:
        fe.setup()
        result = fe.run(args.direction, seconds=args.seconds, count=args.count, pkt_size=args.pkt_size,
                        warmup=args.warmup, batch=args.batch)
        result["final"] = fe.drain(args.direction)
    first = result.pop("first_completion_at")
    result["first_packet_s"] = None if first is None else first - t_connect
    print(json.dumps(result), flush=True)
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    """Build (or load) every cached kernel now, so no server or benchmark waits for the compiler later."""
    import time

    from .devices.net import warm_up as warm_net
    from .devices.tap import warm_up as warm_tap
    from .frontend import warm_up as warm_frontend

    t = time.perf_counter()
    warm_net()
    warm_tap()
    warm_frontend()
    print(f"kernels ready in {time.perf_counter() - t:.1f} s", flush=True)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyvhost", description="vhost-user device back-ends in Python")
    p.add_argument("-v", "--verbose", action="count", default=0)
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a device on a vhost-user socket")
    serve_sub = serve.add_subparsers(dest="device", required=True)
    net = serve_sub.add_parser("net", help="virtio-net")
    net.add_argument("--socket-path", required=True)
    net.add_argument("--mode", choices=["sink", "source", "loopback"], default="sink")
    net.add_argument("--tap", metavar="NAME", help="connect the guest to tap device NAME (created if missing); "
                     "--mode is then ignored")
    net.add_argument("--no-offloads", action="store_true",
                     help="with --tap: offer no checksum/TSO/UFO offloads to the guest")
    net.add_argument("--metadata", choices=[m.value for m in Metadata], default="direct",
                     help="ring metadata access: direct (validated-once views) or copy (checked every access)")
    net.add_argument("--pkt-size", type=int, default=64, help="frame size generated in source mode")
    net.add_argument("--queue-pairs", type=int, default=1)
    net.add_argument("--count", type=int, default=-1, help="source mode: stop after this many packets per queue")
    net.add_argument("--batch", type=int, default=256, help="most chains taken per pass")
    net.add_argument("--cpu", type=int, help="pin to this CPU")
    net.add_argument("--connections", type=int, help="exit after this many connections have ended")
    net.add_argument("--stats-json", help="write the per-queue counters here at exit")
    net.add_argument("--stats-interval", type=float, default=0, help="log the counters every N seconds")
    net.add_argument("--ready-file", help="write the pid here once the socket listens")
    net.set_defaults(func=cmd_serve)

    rng = serve_sub.add_parser("rng", help="virtio-rng (a device written in plain Python)")
    rng.add_argument("--socket-path", required=True)
    rng.add_argument("--metadata", choices=[m.value for m in Metadata], default="direct")
    rng.add_argument("--connections", type=int, help="exit after this many connections have ended")
    rng.add_argument("--cpu", type=int, help="pin to this CPU")
    rng.set_defaults(func=cmd_serve_rng)

    from .devices.blk import add_serve_arguments
    blk = serve_sub.add_parser("blk", help="virtio-blk on a raw image file or block device")
    add_serve_arguments(blk)
    blk.add_argument("--cpu", type=int, help="pin to this CPU")
    blk.set_defaults(func=cmd_serve_blk)

    drive = sub.add_parser("drive", help="drive a vhost-user net back-end with pyvhost's front-end")
    drive.add_argument("device", choices=["net"])
    drive.add_argument("--socket-path", required=True)
    drive.add_argument("--direction", choices=["tx", "rx"], default="tx")
    drive.add_argument("--seconds", type=float, default=0)
    drive.add_argument("--count", type=int, default=-1, help="stop after this many completions")
    drive.add_argument("--warmup", type=float, default=0)
    drive.add_argument("--pkt-size", type=int, default=64)
    drive.add_argument("--queue-size", type=int, default=256)
    drive.add_argument("--batch", type=int, default=64)
    drive.add_argument("--no-event-idx", action="store_true")
    drive.add_argument("--packed", action="store_true", help="packed virtqueues (VIRTIO_F_RING_PACKED)")
    drive.add_argument("--cpu", type=int)
    drive.set_defaults(func=cmd_drive)

    comp = sub.add_parser("compile", help="compile (or load from cache) the datapath kernels ahead of use")
    comp.set_defaults(func=cmd_compile)

    from .bench import add_arguments
    bench = sub.add_parser("bench", help="measure the metadata paths side by side")
    add_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    log.setLevel(logging.INFO if args.verbose <= 1 else logging.DEBUG)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

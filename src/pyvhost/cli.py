"""Command line: ``pyvhost serve net``, ``pyvhost drive net``, ``pyvhost bench``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING

from .bench import add_arguments as add_bench_arguments
from .devices.builtin import SPECS
from .devices.registry import DeviceSpec, discover

if TYPE_CHECKING:
    from .devices.base import Device

log = logging.getLogger("pyvhost")

#: ``access.Metadata``'s values, named here so that the parser needs no NumPy (a test keeps them equal)
METADATA_PATHS = ("direct", "copy")
#: the first fd systemd passes (sd_listen_fds(3))
SD_LISTEN_FDS_START = 3


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def socket_activated() -> bool:
    """systemd passed this process its sockets (sd_listen_fds)."""
    return os.environ.get("LISTEN_PID") == str(os.getpid()) and int(os.environ.get("LISTEN_FDS") or 0) >= 1


def listening_socket(args: argparse.Namespace) -> socket.socket | None:
    """The socket passed in (``--socket-fd N``, or systemd's first one: LISTEN_PID/LISTEN_FDS), checked to be a
    bound Unix stream socket and listening; None when pyvhost is to create ``--socket-path`` itself."""
    fd = args.socket_fd
    if fd is None and args.socket_path is None and socket_activated():
        fd = SD_LISTEN_FDS_START
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):  # not for our children
        os.environ.pop(name, None)
    if fd is None:
        return None
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise SystemExit(f"pyvhost serve: --socket-fd {fd}: not a socket ({e.strerror})") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise SystemExit(f"pyvhost serve: --socket-fd {fd}: not a Unix stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        if not sock.getsockname():
            sock.detach()
            raise SystemExit(f"pyvhost serve: --socket-fd {fd}: the socket is not bound to an address")
        sock.listen(1)
    sock.set_inheritable(False)
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve one device (any in the registry) on one socket, or on ``--socket-count`` sockets with a device
    each, until a signal, or until ``--connections`` connections have ended on every socket."""
    from .access import Metadata
    from .backend import Server
    from .servers import ServerGroup, socket_paths

    spec: DeviceSpec = args.spec
    count = args.socket_count
    if count < 1:
        raise SystemExit(f"pyvhost serve: --socket-count {count}: at least 1")
    if count > 1 and args.socket_path is None:
        raise SystemExit("pyvhost serve: --socket-count N > 1 needs --socket-path PATH (it serves PATH0..PATH{N-1})")
    if count > 1 and spec.one_socket is not None:
        raise SystemExit(f"pyvhost serve {spec.name}: --socket-count {count} refused: {spec.one_socket}")
    _pin(args.cpu)
    listener = listening_socket(args)
    paths: list[str | None] = list(socket_paths(args.socket_path, count)) if args.socket_path else [None]
    devices: list[Device] = []
    servers: list[Server] = []
    try:
        for i, path in enumerate(paths):
            device = spec.create(argparse.Namespace(**vars(args), socket_index=i if count > 1 else None))
            devices.append(device)
            servers.append(
                Server(device, path, Metadata(args.metadata), batch=args.batch, listener=listener if i == 0 else None)
            )
    except BaseException:
        for s in servers:
            s.close()
        for d in devices:
            d.close()
        raise
    group = ServerGroup(servers)
    metrics = None
    if args.metrics_port is not None:
        from .metrics import MetricsServer

        metrics = MetricsServer(lambda: group.servers, args.metrics_port, args.metrics_addr)
        log.info("metrics on http://%s:%d/metrics", args.metrics_addr, metrics.port)

    def stats() -> dict:
        return servers[0].stats() if count == 1 else group.stats()

    def on_signal(signum, frame):
        group.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGUSR1, lambda s, f: log.info("stats %s", json.dumps(stats())))
    done = threading.Event()
    if args.stats_interval:

        def tick():
            while not done.wait(args.stats_interval):
                log.info("stats %s", json.dumps(stats()))

        threading.Thread(target=tick, daemon=True).start()
    where = servers[0].socket_path if count == 1 else f"{count} sockets {paths[0]}..{paths[-1]}"
    log.info("serving %s (%s path) on %s", spec.name, args.metadata, where)
    if args.ready_file:
        with open(args.ready_file, "w") as f:
            f.write(str(os.getpid()))
    try:
        if count == 1:
            servers[0].serve(connections=args.connections)
        else:
            group.serve(connections=args.connections)
    finally:
        done.set()
        if metrics is not None:
            metrics.close()
        final = stats()
        group.close()
        for d in devices:
            d.close()
        if count == 1:
            print(json.dumps({"stats": final, spec.name: devices[0].stats()}), flush=True)
        else:
            per_socket = {
                s.socket_path: {"stats": final[s.socket_path], spec.name: d.stats()} for s, d in zip(servers, devices)
            }
            print(json.dumps({"sockets": per_socket}), flush=True)
        if args.stats_json:
            with open(args.stats_json, "w") as f:
                json.dump(final, f)
    return 0


def cmd_drive(args: argparse.Namespace) -> int:
    import time

    from .frontend.net import Frontend, warm_up

    _pin(args.cpu)
    warm_up()
    t_connect = time.perf_counter()
    with Frontend(
        args.socket_path,
        queue_size=args.queue_size,
        event_idx=not args.no_event_idx,
        packed=args.packed,
        dirty_log=args.dirty_log,
        iommu=args.iommu_entries is not None,
        iommu_prefill=args.iommu_entries,
        regions=args.regions,
    ) as fe:
        fe.setup()
        if args.dirty_log:
            fe.set_logging(True)
        result = fe.run(
            args.direction,
            seconds=args.seconds,
            count=args.count,
            pkt_size=args.pkt_size,
            warmup=args.warmup,
            batch=args.batch,
        )
        result["final"] = fe.drain(args.direction)
        if fe.log is not None:
            result["dirty_pages"] = int(fe.log.dirty_pages().size)
    first = result.pop("first_completion_at")
    result["first_packet_s"] = None if first is None else first - t_connect
    print(json.dumps(result), flush=True)
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    """Build (or load) every cached kernel now, so no server or benchmark waits for the compiler later."""
    import time

    from .devices.net import warm_up as warm_net
    from .devices.tap import warm_up as warm_tap
    from .frontend.net import warm_up as warm_frontend

    t = time.perf_counter()
    warm_net()
    warm_tap()
    warm_frontend()
    print(f"kernels ready in {time.perf_counter() - t:.1f} s", flush=True)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def serve_arguments() -> argparse.ArgumentParser:
    """The arguments every ``serve DEVICE`` takes (the rust-vmm vhost-device convention where it has one)."""
    p = argparse.ArgumentParser(add_help=False)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket-path", help="listen on this Unix socket path (created; replaced if it exists)")
    p.add_argument(
        "--socket-count",
        type=int,
        default=1,
        metavar="N",
        help="serve N front-ends at once, each with a device of its own, on sockets PATH0..PATH{N-1} of "
        "--socket-path PATH (the rust-vmm vhost-device convention; default 1: PATH itself)",
    )
    where.add_argument(
        "--socket-fd",
        type=int,
        metavar="N",
        help="serve on the listening Unix socket already open as fd N (socket activation; "
        "without either option, systemd's LISTEN_FDS socket is used)",
    )
    p.add_argument(
        "--metadata",
        choices=METADATA_PATHS,
        default="direct",
        help="ring metadata access: direct (validated-once views) or copy (checked every access)",
    )
    p.add_argument("--batch", type=int, default=256, help="most chains taken per pass")
    p.add_argument("--cpu", type=int, help="pin to this CPU")
    p.add_argument("--connections", type=int, help="exit after this many connections have ended")
    p.add_argument("--stats-json", help="write the per-queue counters here at exit")
    p.add_argument("--stats-interval", type=float, default=0, help="log the counters every N seconds")
    p.add_argument("--ready-file", help="write the pid here once the socket listens")
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="N",
        help="serve Prometheus metrics (per connection and queue) on this TCP port (0: any free one)",
    )
    p.add_argument("--metrics-addr", default="127.0.0.1", help="address the metrics port binds (default 127.0.0.1)")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyvhost", description="vhost-user device back-ends in Python")
    p.add_argument("-v", "--verbose", action="count", default=0)
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a device on a vhost-user socket")
    serve_sub = serve.add_subparsers(dest="device", required=True, metavar="DEVICE")
    common = serve_arguments()
    for name, spec in sorted(discover(SPECS).items()):
        dev = serve_sub.add_parser(name, help=spec.help, parents=[common])
        spec.add_arguments(dev)
        dev.set_defaults(func=cmd_serve, spec=spec)

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
    drive.add_argument(
        "--dirty-log",
        action="store_true",
        help="share a dirty log and switch VHOST_F_LOG_ALL on before the traffic (as QEMU does to migrate)",
    )
    drive.add_argument(
        "--iommu-entries",
        type=int,
        metavar="N",
        help="play a vIOMMU (VIRTIO_F_ACCESS_PLATFORM) whose IOTLB holds N entries, all sent up front",
    )
    drive.add_argument(
        "--regions",
        type=int,
        default=1,
        metavar="N",
        help="share guest RAM as N memory regions (ADD_MEM_REG when the back-end offers CONFIGURE_MEM_SLOTS)",
    )
    drive.add_argument("--cpu", type=int)
    drive.set_defaults(func=cmd_drive)

    comp = sub.add_parser("compile", help="compile (or load from cache) the datapath kernels ahead of use")
    comp.set_defaults(func=cmd_compile)

    bench = sub.add_parser("bench", help="measure the metadata paths side by side")
    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve" and args.socket_path is None and args.socket_fd is None and not socket_activated():
        parser.error("serve: one of --socket-path or --socket-fd is required")
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )
    log.setLevel(logging.INFO if args.verbose <= 1 else logging.DEBUG)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

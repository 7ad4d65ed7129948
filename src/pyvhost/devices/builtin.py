"""pyvhost's own devices as ``pyvhost serve`` sees them: names, arguments and factories.

Declared here, in a module that imports nothing heavy, so that the command line answers ``--help`` and
argument errors without loading NumPy, Numba or the compiled datapath; each factory imports its device module
when the device is actually served (the server warms its kernels up, ``Device.warm_up``).
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from .registry import DeviceSpec

if TYPE_CHECKING:
    from .base import Device

log = logging.getLogger("pyvhost")

MODES = ("sink", "sink-read", "source", "loopback")


def net_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=MODES, default="sink")
    p.add_argument(
        "--tap",
        metavar="NAME",
        help="connect the guest to tap device NAME (created if missing); --mode is then ignored",
    )
    p.add_argument(
        "--no-offloads", action="store_true", help="with --tap: offer no checksum/TSO/UFO offloads to the guest"
    )
    p.add_argument(
        "--pkt-size",
        type=int,
        default=64,
        help="frame size generated in source mode (each numbered and UDP-checksummed: devices/net_frame.py)",
    )
    p.add_argument(
        "--queue-pairs",
        type=int,
        default=1,
        help="RX/TX queue pairs (VIRTIO_NET_F_MQ when more than 1; with --tap one tap queue per pair, "
        "IFF_MULTI_QUEUE); each pair has worker threads of its own (--cpus to pin them)",
    )
    p.add_argument("--count", type=int, default=-1, help="source mode: stop after this many packets per queue")
    p.add_argument(
        "--plain-frames",
        action="store_true",
        help="source mode: identical frames, without sequence numbers and UDP checksums",
    )


def create_net(args: argparse.Namespace) -> Device:
    if args.tap:  # a guest on a real network: frames go to and come from this tap device
        from . import tap

        # --socket-count N: socket PATHi gets tap NAMEi (a guest per tap, as a guest per socket)
        index = getattr(args, "socket_index", None)
        name = args.tap if index is None else f"{args.tap}{index}"
        log.info("net on tap %s", name)
        return tap.TapDevice(name, offloads=not args.no_offloads, queue_pairs=args.queue_pairs)
    from . import net

    log.info("net in %s mode, %d queue pair(s)", args.mode, args.queue_pairs)
    return net.NetDevice(
        net.Mode(args.mode),
        queue_pairs=args.queue_pairs,
        pkt_size=args.pkt_size,
        count=args.count,
        numbered=not args.plain_frames,
    )


def blk_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--file", required=True, help="raw image file or block device")
    p.add_argument("--readonly", action="store_true", help="expose the image read-only (VIRTIO_BLK_F_RO)")
    p.add_argument("--queues", type=int, default=1, help="request queues (VIRTIO_BLK_F_MQ)")
    p.add_argument("--io-threads", type=int, default=4, help="I/O threads (0: do the I/O in the queue's worker)")
    p.add_argument(
        "--no-nowait",
        action="store_true",
        help="send every read and write to the I/O threads "
        "(default: try it first without blocking, RWF_NOWAIT, in the queue's worker)",
    )
    p.add_argument("--serial", help="the ID string GET_ID returns (default: the file's name)")
    p.add_argument(
        "--io-delay-ms",
        type=float,
        default=0.0,
        help="make every request take this long at least (simulates a slow medium)",
    )


def create_blk(args: argparse.Namespace) -> Device:
    from . import blk

    device = blk.BlkDevice(
        args.file,
        readonly=args.readonly,
        num_queues=args.queues,
        io_threads=args.io_threads,
        serial=args.serial,
        io_delay=args.io_delay_ms / 1000,
        nowait=not args.no_nowait,
    )
    log.info(
        "blk %s (%d sectors%s, %d queues)",
        args.file,
        device.capacity,
        ", read-only" if args.readonly else "",
        args.queues,
    )
    return device


def rng_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source",
        metavar="FILE",
        help="read random bytes from FILE (a device, a FIFO, a file: its end is an error, never wrapped around); "
        "default: the kernel's getrandom",
    )
    p.add_argument(
        "--max-bytes",
        type=int,
        default=0,
        metavar="N",
        help="give the guest at most N bytes per --period (default 0: no limit); requests beyond wait",
    )
    p.add_argument("--period", type=int, default=1000, metavar="MS", help="the --max-bytes window (default 1000 ms)")


def create_rng(args: argparse.Namespace) -> Device:
    from . import rng

    if args.max_bytes < 0 or args.period <= 0:
        raise SystemExit("serve rng: --max-bytes must be >= 0 and --period > 0")
    try:
        device = rng.RngDevice(args.source, max_bytes=args.max_bytes, period=args.period / 1000)
    except OSError as e:
        raise SystemExit(f"serve rng: --source {args.source}: {e.strerror}") from None
    log.info(
        "rng from %s%s",
        args.source or "getrandom",
        f", at most {args.max_bytes} bytes per {args.period} ms" if args.max_bytes else "",
    )
    return device


def vsock_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guest-cid", type=int, required=True, help="the guest's CID (3 or more)")
    p.add_argument(
        "--uds-path",
        required=True,
        metavar="PATH",
        help="host side: a guest connecting to port P reaches the Unix socket PATH_P; a host process connects "
        "to PATH and writes 'CONNECT P\\n' to reach guest port P",
    )


def create_vsock(args: argparse.Namespace) -> Device:
    from . import vsock

    try:
        device = vsock.VsockDevice(args.guest_cid, args.uds_path)
    except (ValueError, OSError) as e:
        raise SystemExit(f"serve vsock: {e}") from None
    log.info("vsock for guest cid %d on %s", args.guest_cid, args.uds_path)
    return device


def input_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--events",
        metavar="FILE",
        help="inject the events of FILE (- : standard input; a FIFO may be written to by one writer after another), "
        'JSON lines {"type": "EV_KEY", "code": "KEY_A", "value": 1} (names of linux/input-event-codes.h or numbers)',
    )
    p.add_argument("--name", default="pyvhost keyboard and mouse", help="the name the guest sees")
    p.add_argument("--serial", default="pyvhost-input", help="the serial the guest sees")
    p.add_argument(
        "--abs-max",
        type=int,
        default=0,
        metavar="N",
        help="an absolute pointer too: ABS_X and ABS_Y from 0 to N (default 0: none)",
    )


def create_input(args: argparse.Namespace) -> Device:
    import dataclasses

    from . import input as input_device

    if args.abs_max < 0:
        raise SystemExit("serve input: --abs-max must be >= 0")
    try:
        profile = dataclasses.replace(input_device.keyboard_mouse(args.abs_max), name=args.name, serial=args.serial)
    except ValueError as e:
        raise SystemExit(f"serve input: {e}") from None
    device = input_device.InputDevice(profile)
    if args.events:
        try:
            device.read_events(args.events)
        except OSError as e:
            raise SystemExit(f"serve input: --events {args.events}: {e.strerror}") from None
    log.info("input %r%s", args.name, f", events from {args.events}" if args.events else "")
    return device


def _lun(text: str) -> tuple[int, str]:
    number, sep, path = text.partition(":")
    if not sep or not number.isdigit() or not path:
        raise argparse.ArgumentTypeError(f"--lun {text!r}: expected N:PATH (a LUN number and an image)")
    return int(number), path


def scsi_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lun",
        type=_lun,
        action="append",
        required=True,
        metavar="N:PATH",
        help="logical unit N on raw image file or block device PATH (repeat for more LUNs)",
    )
    p.add_argument("--readonly", action="store_true", help="every LUN write-protected")
    p.add_argument("--queues", type=int, default=1, help="request queues (num_queues)")
    p.add_argument("--io-threads", type=int, default=4, help="I/O threads (0: do the I/O in the queue's worker)")
    p.add_argument("--no-nowait", action="store_true", help="send every read and write to the I/O threads")


def create_scsi(args: argparse.Namespace) -> Device:
    from . import scsi

    luns = dict(args.lun)
    if len(luns) != len(args.lun):
        raise SystemExit("serve scsi: a LUN number is given twice")
    try:
        device = scsi.ScsiDevice(
            luns,
            readonly=args.readonly,
            request_queues=args.queues,
            io_threads=args.io_threads,
            nowait=not args.no_nowait,
        )
    except (ValueError, OSError) as e:
        raise SystemExit(f"serve scsi: {e}") from None
    for n, unit in sorted(device.units.items()):
        log.info(
            "scsi LUN %d: %s (%d blocks%s)", n, unit.path, unit.info.blocks, ", read-only" if args.readonly else ""
        )
    return device


CACHE_MODES = ("none", "auto", "always")


def fs_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group()
    what.add_argument("--shared-dir", metavar="DIR", help="share this host directory (nothing outside it is reachable)")
    what.add_argument(
        "--ops", metavar="MODULE:CLASS", help="serve a filesystem written in Python (a pyvhost.fs.Operations subclass)"
    )
    p.add_argument(
        "--tag",
        default="pyvhost",
        help="the name in the config space (QEMU's vhost-user-fs-pci sets the one the guest mounts with its tag=)",
    )
    p.add_argument("--readonly", action="store_true", help="refuse every change (EROFS)")
    p.add_argument(
        "--cache",
        choices=CACHE_MODES,
        default="auto",
        help="guest caching: none (direct I/O, no metadata cache), auto (1 s), always (a day, page cache kept)",
    )
    p.add_argument("--thread-pool-size", type=int, default=4, help="threads answering requests (0: the queue's worker)")
    p.add_argument("--request-queues", type=int, default=1, help="request queues (num_request_queues)")
    p.add_argument("--max-inodes", type=int, help="inodes the guest may hold open (default: from RLIMIT_NOFILE)")
    p.add_argument("--max-handles", type=int, help="files and directories the guest may hold open")


def create_fs(args: argparse.Namespace) -> Device:
    import importlib

    from . import fs

    if not (args.shared_dir or args.ops):
        raise SystemExit("serve fs: give --shared-dir DIR or --ops MODULE:CLASS")
    if args.shared_dir:
        from . import fs_passthrough

        ops = fs_passthrough.Passthrough(
            args.shared_dir,
            readonly=args.readonly,
            max_inodes=args.max_inodes,
            max_handles=args.max_handles,
            share=getattr(args, "socket_count", 1),  # --socket-count N: N guests share the fd budget
        )
        what = args.shared_dir
    else:
        module, _, name = args.ops.partition(":")
        if not name:
            raise SystemExit(f"--ops {args.ops!r}: expected MODULE:CLASS")
        ops = getattr(importlib.import_module(module), name)()
        what = args.ops
    log.info("fs %s as tag %r (cache %s%s)", what, args.tag, args.cache, ", read-only" if args.readonly else "")
    return fs.FsDevice(
        ops,
        args.tag,
        request_queues=args.request_queues,
        thread_pool_size=args.thread_pool_size,
        cache=args.cache,
        readonly=args.readonly,
    )


SPECS: dict[str, DeviceSpec] = {
    s.name: s
    for s in (
        DeviceSpec(
            "net", "virtio-net: a sink, a source or a loopback, or a guest on a tap device", create_net, net_arguments
        ),
        DeviceSpec(
            "blk",
            "virtio-blk on a raw image file or block device",
            create_blk,
            blk_arguments,
            one_socket="an image is one guest's disk (one guest writing under another's page cache corrupts it); "
            "run one process per image, as vhost-device does",
        ),
        DeviceSpec(
            "scsi",
            "virtio-scsi: one target whose LUNs are raw image files or block devices",
            create_scsi,
            scsi_arguments,
            one_socket="an image is one guest's disk; run one process per guest",
        ),
        DeviceSpec("rng", "virtio-rng (a device written in plain Python)", create_rng, rng_arguments),
        DeviceSpec(
            "vsock", "virtio-vsock to host Unix sockets (Firecracker's hybrid scheme)", create_vsock, vsock_arguments
        ),
        DeviceSpec(
            "input",
            "virtio-input: a keyboard and mouse whose events come from a JSON-lines stream or from Python",
            create_input,
            input_arguments,
            one_socket="one event stream feeds one guest",
        ),
        DeviceSpec(
            "fs", "virtio-fs sharing a host directory, or a filesystem written in Python", create_fs, fs_arguments
        ),
    )
}

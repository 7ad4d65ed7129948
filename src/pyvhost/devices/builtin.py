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

MODES = ("sink", "source", "loopback")


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
    p.add_argument("--pkt-size", type=int, default=64, help="frame size generated in source mode")
    p.add_argument("--queue-pairs", type=int, default=1)
    p.add_argument("--count", type=int, default=-1, help="source mode: stop after this many packets per queue")


def create_net(args: argparse.Namespace) -> Device:
    if args.tap:  # a guest on a real network: frames go to and come from this tap device
        from . import tap

        log.info("net on tap %s", args.tap)
        return tap.TapDevice(args.tap, offloads=not args.no_offloads)
    from . import net

    log.info("net in %s mode, %d queue pair(s)", args.mode, args.queue_pairs)
    return net.NetDevice(net.Mode(args.mode), queue_pairs=args.queue_pairs, pkt_size=args.pkt_size, count=args.count)


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


def create_rng(args: argparse.Namespace) -> Device:
    from . import rng

    return rng.RngDevice()


SPECS: dict[str, DeviceSpec] = {
    s.name: s
    for s in (
        DeviceSpec(
            "net", "virtio-net: a sink, a source or a loopback, or a guest on a tap device", create_net, net_arguments
        ),
        DeviceSpec("blk", "virtio-blk on a raw image file or block device", create_blk, blk_arguments),
        DeviceSpec("rng", "virtio-rng (a device written in plain Python)", create_rng),
    )
}

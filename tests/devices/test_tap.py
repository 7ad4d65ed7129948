"""virtio-net on a tap (devices/tap.py), byte for byte, without a VM: pyvhost's front-end plays the driver
(descriptors posted by hand), a packet socket on the tap plays the network.  The tap lives in a network
namespace each test creates; the frames use a local experimental EtherType and never leave it."""

from __future__ import annotations

import ctypes
import itertools
import os
import socket
import struct
import subprocess
import threading
import time

import numpy as np
import pytest

from pyvhost import protocol as P
from pyvhost.devices.net import VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ, make_frame
from pyvhost.frontend.net import Frontend
from pyvhost.ring.split import VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from pyvhost.ring.state import Q_LAST_AVAIL

from ..conftest import needs_root, needs_tun

pytestmark = [
    needs_tun,
    needs_root,
]

TAP = "pvtap0"
ETH_P_ALL = 0x0003
ETHERTYPE = 0x88B5  # IEEE local experimental
PACKET_OUTGOING = 4
CLONE_NEWNET = 0x40000000
HDR = 12
_names = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


def frame(size: int, seq: int) -> bytes:
    """An Ethernet frame of ``size`` bytes with a recognisable body."""
    head = bytes.fromhex("52540012345602000000aa01") + struct.pack("!HI", ETHERTYPE, seq)
    body = bytes((seq + i) & 0xFF for i in range(size - len(head)))
    return head + body


class Namespace:
    def __init__(self) -> None:
        self.name = f"pyvhost-tap-{os.getpid()}-{next(_names)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)

    def call(self, fn):
        """Run ``fn`` on a thread that has entered the namespace (what it opens belongs there)."""
        out: list = []

        def run() -> None:
            fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
                out.append(fn())
            except BaseException as e:  # noqa: BLE001
                out.append(e)
            finally:
                os.close(fd)

        t = threading.Thread(target=run)
        t.start()
        t.join()
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]

    def run(self, *cmd: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.name, *cmd], check=True, capture_output=True)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


class Wire:
    """The network side of the tap: a packet socket bound to it."""

    def __init__(self, ns: Namespace) -> None:
        self.sock = ns.call(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)))
        self.sock.bind((TAP, 0))
        self.sock.settimeout(0.2)

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def recv(self, count: int, timeout: float = 10) -> list[bytes]:
        """``count`` frames the device wrote to the tap (ours only: our EtherType, not our own sends)."""
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            try:
                data, addr = self.sock.recvfrom(70000)
            except TimeoutError:
                continue
            if addr[2] != PACKET_OUTGOING and data[12:14] == struct.pack("!H", ETHERTYPE):
                got.append(data)
        return got

    def close(self) -> None:
        self.sock.close()


class Driver:
    """Descriptors posted by hand on one of the front-end's rings."""

    def __init__(self, fe: Frontend, index: int) -> None:
        self.fe, self.ring, self.ram = fe, fe.rings[index], fe.ram
        self.next_desc = 0
        self.avail_idx = 0
        self.last_used = 0

    def buffer(self, data: bytes | int) -> tuple[int, int]:
        """Guest memory holding ``data`` (or ``data`` zeroed bytes): (offset, length)."""
        n = data if isinstance(data, int) else len(data)
        off = self.ram.alloc(n, 64)
        self.ram.buf[off : off + n] = 0 if isinstance(data, int) else np.frombuffer(data, np.uint8)
        return off, n

    def post(self, bufs: list[tuple[int, int]], write: bool, bad_next: bool = False) -> int:
        """One chain of ``bufs``; returns its head.  ``bad_next``: the last descriptor says NEXT, to an index
        beyond the ring (a broken chain)."""
        r = self.ring
        head = self.next_desc
        for k, (off, n) in enumerate(bufs):
            d = self.next_desc % r.size
            self.next_desc += 1
            more = k + 1 < len(bufs) or bad_next
            flags = (VRING_DESC_F_WRITE if write else 0) | (VRING_DESC_F_NEXT if more else 0)
            nxt = (d + 1) % r.size if k + 1 < len(bufs) else 9999
            r.desc[2 * d] = self.ram.gpa(off)
            r.desc[2 * d + 1] = n | (flags << 32) | (nxt << 48)
        r.avail[2 + self.avail_idx % r.size] = head % r.size
        self.avail_idx += 1
        r.avail[1] = self.avail_idx & 0xFFFF
        os.eventfd_write(r.kick_fd, 1)
        return head % r.size

    def used(self, count: int, timeout: float = 10) -> list[tuple[int, int]]:
        """The next ``count`` used entries (id, len), waiting for them."""
        r = self.ring
        deadline = time.monotonic() + timeout
        while (int(r.used16[1]) - self.last_used) & 0xFFFF < count and time.monotonic() < deadline:
            time.sleep(0.005)
        out = []
        while (int(r.used16[1]) - self.last_used) & 0xFFFF and len(out) < count:
            slot = self.last_used % r.size
            out.append((int(r.used32[1 + 2 * slot]), int(r.used32[2 + 2 * slot])))
            self.last_used += 1
        return out

    def pending(self) -> int:
        return (int(self.ring.used16[1]) - self.last_used) & 0xFFFF

    def read(self, off: int, n: int) -> bytes:
        return bytes(self.ram.buf[off : off + n])


@pytest.fixture
def ns():
    n = Namespace()
    yield n
    n.close()


@pytest.fixture
def tap(ns, sock_path):
    """``tap(offloads=True, metadata="direct", mrg=True)`` -> (frontend, rx driver, tx driver, wire, device,
    server)."""
    from pyvhost.access import Metadata
    from pyvhost.devices.tap import TapDevice
    from tests.conftest import RunningServer

    made: list = []

    def start(offloads: bool = True, metadata: str = "direct", mrg: bool = True, queue_pairs: int = 1):
        dev = ns.call(lambda: TapDevice(TAP, offloads=offloads, queue_pairs=queue_pairs))
        ns.run("sysctl", "-qw", f"net.ipv6.conf.{TAP}.disable_ipv6=1")
        ns.run("ip", "link", "set", TAP, "up")
        wire = Wire(ns)
        srv = RunningServer(sock_path, None, Metadata(metadata), device=dev)
        fe = Frontend(sock_path, mrg_rxbuf=mrg, queue_pairs=queue_pairs)
        made.append((fe, wire, dev, srv))
        fe.setup()
        srv.assert_path(metadata, list(range(2 * queue_pairs)))
        return fe, Driver(fe, 0), Driver(fe, 1), wire, dev, srv

    yield start
    for fe, wire, dev, srv in made:
        fe.close()
        wire.close()
        srv.stop()  # workers stopped before the tap's fd closes
        dev.close()


def wait_for(cond, timeout: float = 30.0) -> None:
    """Poll ``cond()`` until it holds (failing the test after a generous ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "the awaited event did not happen"
        time.sleep(0.005)


def vnet_hdr(num_buffers: int = 0) -> bytes:
    return bytes(10) + struct.pack("<H", num_buffers)


@pytest.mark.parametrize("metadata", ["direct", "copy"])
def test_tx_frames_reach_the_tap_intact(tap, metadata):
    fe, rx, tx, wire, dev, srv = tap(metadata=metadata)
    frames = [frame(60, 1), frame(1514, 2), frame(800, 3)]
    # header and frame in one buffer; header apart; the frame split over three buffers
    tx.post([tx.buffer(vnet_hdr() + frames[0])], write=False)
    tx.post([tx.buffer(vnet_hdr()), tx.buffer(frames[1])], write=False)
    tx.post(
        [tx.buffer(vnet_hdr() + frames[2][:7]), tx.buffer(frames[2][7:500]), tx.buffer(frames[2][500:])], write=False
    )
    assert wire.recv(3) == frames
    assert [ln for _, ln in tx.used(3)] == [0, 0, 0]
    assert dev.counters["tx_frames"] == 3 and dev.counters["tx_drops"] == 0


@pytest.mark.parametrize("metadata", ["direct", "copy"])
def test_rx_frames_land_in_the_guests_buffers(tap, metadata):
    fe, rx, tx, wire, dev, srv = tap(metadata=metadata)
    bufs = [rx.buffer(2048) for _ in range(8)]
    heads = [rx.post([b], write=True) for b in bufs]
    frames = [frame(60, 7), frame(1514, 8), frame(333, 9)]
    for f in frames:
        wire.send(f)
    used = rx.used(3)
    assert [h for h, _ in used] == heads[:3]
    for (off, _), (_, ln), f in zip(bufs, used, frames):
        assert ln == HDR + len(f)
        assert rx.read(off, HDR + len(f)) == vnet_hdr(1) + f  # num_buffers = 1
    assert dev.counters["rx_frames"] == 3


def test_mergeable_frame_spans_buffers_with_num_buffers(tap):
    fe, rx, tx, wire, dev, srv = tap()
    bufs = [rx.buffer(256) for _ in range(12)]
    for b in bufs:
        rx.post([b], write=True)
    f = frame(1514, 4)
    wire.send(f)
    used = rx.used(6, timeout=10)
    total = HDR + len(f)
    assert [ln for _, ln in used] == [256] * 5 + [246]  # 1526 bytes
    assert sum(ln for _, ln in used) == total and rx.pending() == 0
    data = b"".join(rx.read(off, ln) for (off, _), (_, ln) in zip(bufs, used))
    assert data == vnet_hdr(6) + f
    wire.send(frame(100, 5))  # the next frame starts in the next buffer
    ((h, ln),) = rx.used(1)
    assert ln == HDR + 100 and rx.read(bufs[6][0], ln) == vnet_hdr(1) + frame(100, 5)


def test_frame_larger_than_the_posted_buffers_waits_for_more(tap):
    """Mergeable buffers too few for a frame: its tail waits in the bounce buffer until the driver posts more;
    nothing is lost or reordered."""
    fe, rx, tx, wire, dev, srv = tap()
    bufs = [rx.buffer(512) for _ in range(2)]
    for b in bufs:
        rx.post([b], write=True)
    f = frame(1400, 6)
    wire.send(f)
    wait_for(lambda: dev.counters["rx_bounced"] == 1)  # the device read it: its tail waits in the bounce buffer
    assert rx.pending() == 0  # not completed: the frame needs 1412 bytes, 1024 are posted
    more = [rx.buffer(512) for _ in range(2)]
    for b in more:
        rx.post([b], write=True)
    used = rx.used(3)
    data = b"".join(rx.read(off, ln) for (off, _), (_, ln) in zip(bufs + more, used))
    assert data == vnet_hdr(3) + f
    assert dev.counters["rx_drops"] == 0


def test_full_rx_ring_stops_reading_the_tap_and_drops_nothing(tap):
    """No RX buffers: frames wait in the tap's queue (the kernel's to drop, as with vhost-net), and arrive in
    order once the driver posts buffers."""
    fe, rx, tx, wire, dev, srv = tap()
    frames = [frame(200 + i, 20 + i) for i in range(20)]
    for f in frames:
        wire.send(f)
    # the frames wait in the tap (no buffers, nothing read); a device that read them anyway would have to
    # drop or bounce them, which the counters below show whenever it happened
    assert rx.pending() == 0 and dev.counters["rx_frames"] == 0
    bufs = [rx.buffer(2048) for _ in range(32)]
    for b in bufs[:5]:
        rx.post([b], write=True)
    used = rx.used(5)
    for b in bufs[5:]:
        rx.post([b], write=True)
    used += rx.used(15)
    got = [rx.read(off + HDR, ln - HDR) for (off, _), (_, ln) in zip(bufs, used)]
    assert got == frames
    assert dev.counters["rx_drops"] == dev.counters["rx_bounced"] == 0 and dev.counters["rx_frames"] == 20
    assert srv.connection.stats()[0]["drops"] == 0


def test_stopping_the_ring_gives_held_buffers_back(tap):
    """GET_VRING_BASE while the device holds posted RX buffers (popped, not used): the base it reports is the
    used index, and the ring restarted there serves the same buffers."""
    fe, rx, tx, wire, dev, srv = tap()
    bufs = [rx.buffer(2048) for _ in range(6)]
    for b in bufs:
        rx.post([b], write=True)
    wire.send(frame(100, 1))
    assert len(rx.used(1)) == 1
    wait_for(lambda: srv.connection.vrings[0].q[Q_LAST_AVAIL] == 6)  # the device holds the other five
    base = fe.stop_ring(rx.ring)
    assert base == 1  # one completed; the five held were given back
    fe.start_ring(rx.ring, base)
    wire.send(frame(120, 2))
    ((h, ln),) = rx.used(1)
    assert h == 1 and ln == HDR + 120 and rx.read(bufs[1][0], ln) == vnet_hdr(1) + frame(120, 2)


def test_without_mergeable_buffers_a_frame_too_big_is_dropped(tap):
    """No MRG_RXBUF: one chain per frame; a frame larger than the chain is dropped (as vhost-net does) and the
    chain serves the next frame."""
    fe, rx, tx, wire, dev, srv = tap(mrg=False)
    assert not fe.features & (1 << 15)
    off, _ = rx.buffer(600)
    rx.post([(off, 600)], write=True)
    wire.send(frame(1000, 1))
    wire.send(frame(500, 2))
    ((h, ln),) = rx.used(1)
    assert ln == HDR + 500 and rx.read(off, ln) == vnet_hdr(1) + frame(500, 2)
    assert dev.counters["rx_drops"] == 1


def test_offloads_offered_only_when_asked(ns):
    from pyvhost.devices.tap import OFFLOAD_FEATURES, TapDevice

    on = ns.call(lambda: TapDevice(TAP))
    on.close()
    off = ns.call(lambda: TapDevice(TAP, offloads=False))
    off.close()
    assert on.features & OFFLOAD_FEATURES == OFFLOAD_FEATURES  # a Linux tap takes every one of them
    assert off.features & OFFLOAD_FEATURES == 0
    assert off.features & (1 << 15)  # MRG_RXBUF either way


def test_tx_frame_the_kernel_refuses_is_counted_and_completed(tap):
    """A vnet header the tap rejects (unknown GSO type): write fails with EINVAL, the frame is a counted
    drop, its chain is completed, and the next frame goes through."""
    fe, rx, tx, wire, dev, srv = tap()
    bad = bytes([0, 0x7E]) + bytes(8) + struct.pack("<H", 0)  # gso_type 0x7e
    tx.post([tx.buffer(bad + frame(200, 1))], write=False)
    tx.post([tx.buffer(vnet_hdr() + frame(200, 2))], write=False)
    assert wire.recv(1) == [frame(200, 2)]
    assert len(tx.used(2)) == 2
    assert dev.counters["tx_drops"] == 1 and dev.counters["tx_frames"] == 1


def test_broken_rx_ring_stops_only_that_queue(tap, errors):
    """An RX chain with a next index out of range breaks the RX queue (logged); TX goes on."""
    fe, rx, tx, wire, dev, srv = tap()
    rx.post([rx.buffer(2048)], write=True)
    rx.post([rx.buffer(2048)], write=True, bad_next=True)
    wire.send(frame(100, 1))  # wakes the worker, which takes both chains
    rx.post([rx.buffer(2048)], write=True)
    wait_for(lambda: srv.connection.vrings[0].broken)
    assert any("vring 0 broken: NEXT_OUT_OF_RANGE" in m for m in errors())
    tx.post([tx.buffer(vnet_hdr() + frame(300, 2))], write=False)
    assert wire.recv(1) == [frame(300, 2)]


def test_broken_tx_ring_stops_only_that_queue(tap, errors):
    fe, rx, tx, wire, dev, srv = tap()
    tx.post([tx.buffer(vnet_hdr() + frame(100, 1))], write=False, bad_next=True)
    tx.post([tx.buffer(vnet_hdr() + frame(100, 2))], write=False)
    wait_for(lambda: srv.connection.vrings[1].broken)
    assert any("vring 1 broken: NEXT_OUT_OF_RANGE" in m for m in errors())
    buf = rx.buffer(2048)
    rx.post([buf], write=True)
    wire.send(frame(200, 3))
    ((h, ln),) = rx.used(1)
    assert rx.read(buf[0], ln) == vnet_hdr(1) + frame(200, 3)


def test_socket_count_gives_each_socket_its_own_tap(ns):
    """``serve net --tap NAME --socket-count 3``: socket i's device is on tap NAMEi (one guest per tap)."""
    import argparse

    from pyvhost.cli import build_parser

    args = build_parser().parse_args(
        ["serve", "net", "--tap", "pvmq", "--socket-path", "/nonexistent/s", "--socket-count", "3"]
    )
    devices = [ns.call(lambda: args.spec.create(argparse.Namespace(**vars(args), socket_index=i))) for i in range(3)]
    try:
        links = subprocess.run(
            ["ip", "netns", "exec", ns.name, "ip", "-o", "link"], check=True, capture_output=True, text=True
        ).stdout
        for i in range(3):
            assert f" pvmq{i}:" in links, links
        assert " pvmq:" not in links
    finally:
        for d in devices:
            d.close()


def udp_frame(port: int, size: int = 100) -> bytes:
    """A UDP/IPv4 frame of flow ``port`` (its source port): the tap spreads flows over its queues by hash."""
    f = bytearray(make_frame(size).tobytes())
    f[34:36] = struct.pack("!H", port)
    return bytes(f)


def test_queue_pairs_each_have_a_tap_queue(tap, ns):
    """``--tap NAME --queue-pairs 2``: MQ (with CTRL_VQ) offered, max_virtqueue_pairs 2, a tap with
    IFF_MULTI_QUEUE; each pair transmits through its own tap queue and the kernel's flows come in on both pairs;
    a disabled pair's tap queue is detached, so that every flow then comes in on pair 0."""
    fe, rx0, tx0, wire, dev, srv = tap(queue_pairs=2)
    rx1, tx1 = Driver(fe, 2), Driver(fe, 3)
    assert dev.features & (1 << VIRTIO_NET_F_MQ) and dev.features & (1 << VIRTIO_NET_F_CTRL_VQ)
    assert struct.unpack_from("<H", dev.config_space(), 8)[0] == 2
    assert len(dev.fds) == 2 and dev.stats()["pairs"][0]["tx_frames"] == 0
    # TX on both pairs
    tx0.post([tx0.buffer(vnet_hdr() + frame(60, 1))], write=False)
    tx1.post([tx1.buffer(vnet_hdr() + frame(70, 2))], write=False)
    assert sorted(wire.recv(2)) == sorted([frame(60, 1), frame(70, 2)])
    assert len(tx0.used(1)) == len(tx1.used(1)) == 1  # (counted before completed)
    assert [c["tx_frames"] for c in dev.stats()["pairs"]] == [1, 1]
    # RX: 64 flows over the two tap queues (all of them on one queue: a chance of 2 in 2**64)
    flows = 64
    for d in (rx0, rx1):
        for _ in range(2 * flows):
            d.post([d.buffer(2048)], write=True)
    for port in range(flows):
        wire.send(udp_frame(1000 + port))
    wait_for(lambda: dev.counters["rx_frames"] == flows)
    per_pair = [c["rx_frames"] for c in dev.stats()["pairs"]]
    assert all(per_pair) and sum(per_pair) == flows, per_pair
    assert rx0.pending() + rx1.pending() == flows
    # pair 1 disabled (as QEMU does after VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 1): its tap queue is detached
    for i in (2, 3):
        fe.command(P.Request.SET_VRING_ENABLE, P.VRING_STATE.pack(i, 0))
    assert dev.attached == [True, False]
    before = [c["rx_frames"] for c in dev.stats()["pairs"]]
    for port in range(flows):
        wire.send(udp_frame(1000 + port))
    wait_for(lambda: dev.counters["rx_frames"] == 2 * flows)
    after = [c["rx_frames"] for c in dev.stats()["pairs"]]
    assert after == [before[0] + flows, before[1]]
    for i in (2, 3):  # enabled again: attached again
        fe.command(P.Request.SET_VRING_ENABLE, P.VRING_STATE.pack(i, 1))
    assert dev.attached == [True, True]

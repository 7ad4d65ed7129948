"""Packed virtqueues end to end, both metadata paths: pyvhost's front-end (packed) against ``pyvhost serve net``
in all three modes with exact counts; GET/SET_VRING_BASE with wrap counters; a hostile driver's packed ring
breaking only its queue; DPDK's virtio-user (packed_vq=1) against pyvhost, and pyvhost's front-end against
DPDK's vhost PMD."""

from __future__ import annotations

import os
import re
import select
import signal
import struct
import time

import numpy as np
import pytest

from pyvhost.devices.base import VIRTIO_F_RING_PACKED
from pyvhost.errors import QueueError as E
from pyvhost.frontend.net import Frontend, FrontendError
from pyvhost.frontend.packed import D_AVAIL_IDX, D_AVAIL_WRAP, D_DONE, PackedDriverRing, drive_rx, drive_tx
from pyvhost.frontend.split import D_BYTES, D_LIMIT
from pyvhost.protocol import ADDR_LIMIT, U64, VRING_STATE
from pyvhost.protocol import Request as R
from pyvhost.ring.packed import VRING_PACKED_DESC_F_AVAIL as AV
from pyvhost.ring.packed import VRING_PACKED_DESC_F_USED as US
from pyvhost.ring.packed import encode_base
from pyvhost.ring.split import VRING_DESC_F_INDIRECT as INDIRECT
from pyvhost.ring.split import VRING_DESC_F_NEXT as NEXT
from pyvhost.ring.split import VRING_DESC_F_WRITE as WRITE
from pyvhost.ring.state import Q_AVAIL_WRAP, Q_DIRECT, Q_LAST_AVAIL, Q_USED_IDX, Q_USED_WRAP

from .conftest import needs_dpdk

PATHS = ["direct", "copy"]
QSIZE = 64
RAM = 16 << 20
FRAME_LEN = 12 + 64
TIMEOUT = 10.0
GOOD = 3


@pytest.fixture(scope="module", autouse=True)
def compiled():
    """Compile (or load) the kernels first: a test that runs traffic for a time must not spend it compiling."""
    from pyvhost.devices.net import warm_up as warm_up_device
    from pyvhost.frontend.net import warm_up as warm_up_driver

    warm_up_device()
    warm_up_driver()


def started_packed(srv, index: int, metadata: str) -> None:
    vr = srv.connection.vrings[index]
    assert srv.connection.features & (1 << VIRTIO_F_RING_PACKED)
    assert vr.q[Q_DIRECT] == (metadata == "direct")


# =========================================================================================================
# pyvhost's front-end <-> pyvhost serve net
@pytest.mark.parametrize("metadata", PATHS)
@pytest.mark.parametrize("size", [256, 100])
def test_sink_counts_exactly(serve, sock_path, metadata, size):
    srv = serve("sink", metadata)
    with Frontend(sock_path, packed=True, queue_size=size) as fe:
        fe.setup()
        started_packed(srv, 1, metadata)
        r = fe.run("tx", count=100_000)
        final = fe.drain("tx")
    assert r["packets"] == final["packets"] == 100_000
    stats = srv.ended()[-1]
    assert stats[1]["packets"] == 100_000 and stats[1]["error"] == 0 and stats[1]["drops"] == 0
    assert stats[1]["bytes"] == 100_000 * 64
    # both cursors where 100000 one-descriptor chains leave them
    pos, laps = 100_000 % size, 100_000 // size
    assert final["base"] == encode_base(pos, 1 - laps % 2, pos, 1 - laps % 2)


@pytest.mark.parametrize("metadata", PATHS)
def test_source_counts_exactly(serve, sock_path, metadata):
    srv = serve("source", metadata, count=100_000, pkt_size=128)
    with Frontend(sock_path, packed=True) as fe:
        fe.setup()
        started_packed(srv, 0, metadata)
        r = fe.run("rx", count=100_000)
        final = fe.drain("rx")
    assert r["packets"] == final["packets"] == 100_000
    assert final["bytes"] == 100_000 * 128
    stats = srv.ended()[-1]
    assert stats[0]["packets"] == 100_000 and stats[0]["error"] == 0


@pytest.mark.parametrize("metadata", PATHS)
def test_source_mergeable_rx_buffers(serve, sock_path, metadata):
    """A 3000-byte frame spans two 2048-byte buffers: two used descriptors, num_buffers = 2."""
    from pyvhost.devices.net import make_frame
    from pyvhost.frontend.ram import BUF_SIZE

    serve("source", metadata, count=10, pkt_size=3000)
    with Frontend(sock_path, packed=True) as fe:
        fe.setup()
        fe.run("rx", count=20)
        ring = fe.rings[0]
        frame = make_frame(3000)
        for k in range(10):
            (id1, len1), (id2, len2) = (
                (int(ring.desc[2 * p + 1] >> np.uint64(32)) & 0xFFFF, int(ring.desc[2 * p + 1]) & 0xFFFFFFFF)
                for p in (2 * k, 2 * k + 1)
            )
            assert (len1, len2) == (BUF_SIZE, 3000 + 12 - BUF_SIZE)
            b1 = fe.ram.buf[ring.bufs_off + id1 * BUF_SIZE :][:len1]
            b2 = fe.ram.buf[ring.bufs_off + id2 * BUF_SIZE :][:len2]
            assert int(b1[10]) | int(b1[11]) << 8 == 2
            assert np.array_equal(np.concatenate([b1[12:], b2]), frame)


def exchange(fe: Frontend, count: int, pkt_size: int = 64, timeout: float = 30.0) -> tuple[int, int]:
    """Transmit ``count`` frames on pair 0 while keeping its RX ring full of buffers; returns (TX, RX)
    completions once every frame has come back."""
    rx, tx = fe.rings[0], fe.rings[1]
    tx.d[D_LIMIT] = count
    length = fe.fill_tx_frames(tx, pkt_size)
    deadline = time.monotonic() + timeout
    while int(rx.d[D_DONE]) < count or int(tx.d[D_DONE]) < count:
        assert time.monotonic() < deadline, (int(tx.d[D_DONE]), int(rx.d[D_DONE]))
        drive_rx(*rx.views(), rx.buf_gpa(0), 64)
        drive_tx(*tx.views(), tx.buf_gpa(0), length, 64)
    return int(tx.d[D_DONE]), int(rx.d[D_DONE])


@pytest.mark.parametrize("metadata", PATHS)
def test_loopback_counts_exactly(serve, sock_path, metadata):
    srv = serve("loopback", metadata)
    with Frontend(sock_path, packed=True, queue_size=128) as fe:
        fe.setup()
        started_packed(srv, 0, metadata)
        assert exchange(fe, 50_000, pkt_size=200) == (50_000, 50_000)
        assert fe.rings[0].d[D_BYTES] == 50_000 * 200
        fe.drain("tx")
        assert fe.drain("rx")["packets"] == 50_000
    stats = srv.ended()[-1]
    assert stats[1]["packets"] == stats[0]["packets"] == 50_000
    assert stats[0]["bytes"] == stats[1]["bytes"] == 50_000 * 200
    assert stats[0]["error"] == stats[1]["error"] == 0 and stats[0]["drops"] == stats[1]["drops"] == 0


# =========================================================================================================
# GET/SET_VRING_BASE
@pytest.mark.parametrize("metadata", PATHS)
@pytest.mark.parametrize("half", [False, True])
def test_ring_restart_from_base(serve, sock_path, metadata, half):
    """Stop the TX ring mid-lap (GET_VRING_BASE: cursors with wrap counters), restart it from that base --
    whole, or only its avail half as DPDK's virtio-user sends it -- and carry on: the device resumes exactly
    where the driver is, on the right lap."""
    srv = serve("sink", metadata)
    size = 100
    with Frontend(sock_path, packed=True, queue_size=size) as fe:
        fe.setup()
        ring = fe.rings[1]
        fe.run("tx", count=1134)
        base = fe.drain("tx")["base"]
        assert base == encode_base(34, 0, 34, 0)  # 1134 = 11 laps + 34: both wrap counters flipped 11 times
        assert (int(ring.d[D_AVAIL_IDX]), int(ring.d[D_AVAIL_WRAP])) == (34, 0)
        ring.d[D_LIMIT] = -1
        ring.stopped = False
        fe.start_ring(ring, base & 0xFFFF if half else base)
        vr = srv.connection.vrings[1]
        assert (vr.q[Q_LAST_AVAIL], vr.q[Q_AVAIL_WRAP], vr.q[Q_USED_IDX], vr.q[Q_USED_WRAP]) == (34, 0, 34, 0)
        fe.run("tx", count=1100)
        final = fe.drain("tx")
        assert final["packets"] == 2234
        assert final["base"] == encode_base(34, 1, 34, 1)  # 2234 = 22 laps + 34
    stats = srv.ended()[-1]
    assert stats[1]["packets"] == 2234 and stats[1]["error"] == 0  # cumulative over the restart


@pytest.mark.parametrize(
    "bad", [encode_base(100, 1, 0, 1), encode_base(0, 1, 100, 1), encode_base(5, 1, 10, 1), encode_base(50, 0, 49, 1)]
)
def test_bad_base_refused(serve, sock_path, errors, bad):
    """Positions beyond the ring, or an avail cursor more than a ring ahead of the used one (or behind it)."""
    serve("sink", "direct")
    with Frontend(sock_path, packed=True, queue_size=100) as fe:
        fe.setup()
        fe.stop_ring(fe.rings[1])
        with pytest.raises(FrontendError, match="SET_VRING_BASE failed"):
            fe.command(R.SET_VRING_BASE, VRING_STATE.pack(1, bad))
    assert any("packed base" in e for e in errors())


def test_split_still_default(serve, sock_path):
    """Without asking for packed rings a front-end gets split ones (and the back-end offers both)."""
    srv = serve("sink", "direct")
    with Frontend(sock_path) as fe:
        fe.setup()
        assert not fe.features & (1 << VIRTIO_F_RING_PACKED)
        offered = U64.unpack(fe.request(R.GET_FEATURES))[0]
        assert offered & (1 << VIRTIO_F_RING_PACKED)
        fe.run("tx", count=1000)
        assert fe.drain("tx")["base"] == 1000
    assert srv.ended()[-1][1]["packets"] == 1000


# =========================================================================================================
# A hostile driver: a bad packed ring breaks only its queue
class Guest:
    """Hand-written descriptors of packed ring ``index`` of a set-up (packed) Frontend."""

    def __init__(self, fe: Frontend, index: int) -> None:
        self.fe = fe
        self.ring: PackedDriverRing = fe.rings[index]
        self.size = self.ring.size
        self.index = index
        self.dir = WRITE if index % 2 == 0 else 0
        self.pos, self.wrap = 0, 1
        self.err_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fe.command(R.SET_VRING_ERR, U64.pack(index), [self.err_fd])

    def buf(self, i: int) -> int:
        return self.ring.buf_gpa(i % self.size)

    def post(self, descs: list[tuple], raw: bool = False, kick: bool = True) -> None:
        """Descriptors (addr, len, id, flags) from the cursor; the ring's direction and the AVAIL/USED bits of
        each position's lap are added unless ``raw``; the first one's flags are written last."""
        first = None
        for addr, length, bid, flags in descs:
            if not raw:
                flags |= self.dir | (AV if self.wrap else US)
            o = self.ring.desc_off + 16 * self.pos
            struct.pack_into("<QIH", self.fe.ram.mm, o, addr, length, bid)
            if first is None:
                first = (o, flags)
            else:
                struct.pack_into("<H", self.fe.ram.mm, o + 14, flags)
            self.pos += 1
            if self.pos == self.size:
                self.pos, self.wrap = 0, self.wrap ^ 1
        if first is not None:
            struct.pack_into("<H", self.fe.ram.mm, first[0] + 14, first[1])
        if kick:
            os.eventfd_write(self.ring.kick_fd, 1)

    def good(self, n: int = GOOD) -> None:
        self.post(
            [
                (self.buf(self.pos + k), FRAME_LEN if not self.dir else 2048, (self.pos + k) % self.size, 0)
                for k in range(n)
            ]
        )

    def used(self, n: int = GOOD) -> list[int]:
        """Buffer ids of the used descriptors among the first ``n`` positions (first lap, one descriptor each)."""
        out = []
        for p in range(n):
            _, _, bid, flags = struct.unpack_from("<QIHH", self.fe.ram.mm, self.ring.desc_off + 16 * p)
            if flags & (AV | US) != AV | US:
                break
            out.append(bid)
        return out

    def rest(self) -> bytes:
        """The descriptor ring from position GOOD on."""
        return self.fe.ram.buf[self.ring.desc_off + 16 * GOOD : self.ring.desc_off + 16 * self.size].tobytes()

    def wait_err(self) -> int:
        ready, _, _ = select.select([self.err_fd], [], [], TIMEOUT)
        assert ready, "the ERR eventfd was not signalled"
        return os.eventfd_read(self.err_fd)

    def close(self) -> None:
        os.close(self.err_fd)


def _table(g: Guest, entries: list[tuple]) -> int:
    off = g.fe.ram.alloc(16 * len(entries), 16)
    for j, e in enumerate(entries):
        struct.pack_into("<QIHH", g.fe.ram.mm, off + 16 * j, *e)
    return g.fe.ram.gpa(off)


def _whole_ring(g: Guest) -> None:
    # after GOOD completed chains: a chain of every descriptor of the ring, each with NEXT
    g.post([(g.buf(i), 16, i, NEXT) for i in range(g.size)])


CASES = {
    # name: (build after GOOD good chains, error)
    "head used in this lap": (lambda g: g.post([(g.buf(3), 16, 3, g.dir | AV | US)], raw=True), E.PACKED_BAD_WRAP),
    "chain into a descriptor not made available": (
        lambda g: g.post([(g.buf(3), 16, 3, g.dir | NEXT | AV), (g.buf(4), 16, 4, g.dir)], raw=True),
        E.PACKED_BAD_WRAP,
    ),
    "chain into a used descriptor": (
        lambda g: g.post([(g.buf(3), 16, 3, g.dir | NEXT | AV), (g.buf(4), 16, 4, g.dir | AV | US)], raw=True),
        E.PACKED_BAD_WRAP,
    ),
    "buffer id == size": (lambda g: g.post([(g.buf(3), FRAME_LEN, QSIZE, 0)]), E.PACKED_BAD_ID),
    "buffer id 0xffff in the last descriptor": (
        lambda g: g.post([(g.buf(3), 16, 3, NEXT), (g.buf(4), 64, 0xFFFF, 0)]),
        E.PACKED_BAD_ID,
    ),
    "chain over the ring size": (_whole_ring, E.CHAIN_TOO_LONG),
    "indirect with next": (
        lambda g: g.post([(_table(g, [(g.buf(9), 64, 0, g.dir)]), 16, 3, INDIRECT | NEXT)]),
        E.INDIRECT_WITH_NEXT,
    ),
    "indirect after a chained descriptor": (
        lambda g: g.post([(g.buf(3), 16, 3, NEXT), (_table(g, [(g.buf(9), 64, 0, g.dir)]), 16, 4, INDIRECT)]),
        E.PACKED_INDIRECT_IN_CHAIN,
    ),
    "indirect length 24": (
        lambda g: g.post([(_table(g, [(g.buf(9), 64, 0, g.dir)] * 2), 24, 3, INDIRECT)]),
        E.INDIRECT_BAD_SIZE,
    ),
    "nested indirect": (
        lambda g: g.post([(_table(g, [(g.buf(9), 64, 0, g.dir | INDIRECT)]), 16, 3, INDIRECT)]),
        E.INDIRECT_NESTED,
    ),
    "indirect table past guest memory": (lambda g: g.post([(g.fe.ram.gpa(RAM), 16, 3, INDIRECT)]), E.INDIRECT_UNMAPPED),
    "zero length": (lambda g: g.post([(g.buf(3), 0, 3, 0)]), E.ZERO_LENGTH),
    "buffer at 2**62": (lambda g: g.post([(ADDR_LIMIT, 64, 3, 0)]), E.BAD_ADDRESS),
    "wrong direction": (
        lambda g: g.post([(g.buf(3), 2048, 3, AV | (0 if g.dir else WRITE))], raw=True),
        E.BAD_DIRECTION,
    ),
}


@pytest.mark.parametrize("metadata", PATHS)
@pytest.mark.parametrize("mode", ["sink", "source"])
@pytest.mark.parametrize("name", list(CASES))
def test_bad_packed_ring_breaks_only_its_queue(serve, sock_path, errors, metadata, mode, name):
    build, expect = CASES[name]
    srv = serve(mode, metadata, queue_pairs=2)
    index, direction = (1, "tx") if mode == "sink" else (0, "rx")
    with Frontend(sock_path, packed=True, queue_pairs=2, queue_size=QSIZE, ram_size=RAM) as fe:
        fe.setup()
        started_packed(srv, index, metadata)
        g = Guest(fe, index)
        try:
            g.good()
            deadline = time.monotonic() + TIMEOUT
            while len(g.used()) < GOOD:
                assert time.monotonic() < deadline, g.used()
                time.sleep(0.001)
            build(g)
            written = g.rest()
            assert g.wait_err() == 1
            lines = [e for e in errors() if e.startswith(f"vring {index} broken")]
            assert len(lines) == 1, errors()
            assert re.match(
                rf"vring {index} broken: {expect.name}: {re.escape(expect.text)} \(value 0x[0-9a-f]+\)$", lines[0]
            ), lines[0]
            assert g.rest() == written  # nothing of the bad chain completed
            if build is not _whole_ring:  # (which reuses the positions of the good chains' used descriptors)
                assert g.used() == list(range(GOOD))
            assert srv.connection.vrings[index].broken
            # the device's other queue pair keeps working, exactly
            done = int(fe.rings[index + 2].d[D_DONE])
            fe.run(direction, count=1000, pair=1, timeout=TIMEOUT)
            assert fe.drain(direction, pair=1)["packets"] == done + 1000
        finally:
            g.close()
    stats = srv.ended()[-1]
    assert stats[index]["error"] == expect and stats[index]["chains"] == GOOD
    assert stats[index + 2]["packets"] == 1000 and stats[index + 2]["error"] == 0
    assert [e for e in errors() if "broken" not in e] == []
    # and the server takes the next connection
    with Frontend(sock_path, packed=True, queue_size=QSIZE, ram_size=RAM) as fe:
        fe.setup()
        fe.run(direction, count=1000, timeout=TIMEOUT)
        assert fe.drain(direction)["packets"] == 1000
    assert srv.ended()[-1][index]["packets"] == 1000 and srv.ended()[-1][index]["error"] == 0


# =========================================================================================================
# DPDK: testpmd's virtio-user with packed_vq=1 against pyvhost; pyvhost's front-end against DPDK's vhost PMD
PACKED_VDEV = ",packed_vq=1"


@needs_dpdk
@pytest.mark.dpdk
@pytest.mark.parametrize("metadata", PATHS)
def test_testpmd_packed_txonly_to_pyvhost_sink(tmp_path, metadata):
    from .test_dpdk import finish, run_virtio_user
    from .test_dpdk import serve as serve_proc

    proc, sock, stats = serve_proc(tmp_path, "sink", metadata)
    res = run_virtio_user(tmp_path, sock, "txonly", 2.0, vdev_args=PACKED_VDEV)
    counts = finish(proc, stats)["1"]
    assert "packed rings" in (tmp_path / "pyvhost.log").read_text()
    assert res["tx_packets"] > 100_000
    assert counts["packets"] == res["tx_packets"], (counts, res)
    assert counts["bytes"] == 64 * res["tx_packets"]
    assert counts["error"] == 0 and counts["drops"] == 0


@needs_dpdk
@pytest.mark.dpdk
@pytest.mark.parametrize("metadata", PATHS)
def test_pyvhost_source_to_testpmd_packed_rxonly(tmp_path, metadata):
    from .test_dpdk import finish, run_virtio_user
    from .test_dpdk import serve as serve_proc

    n = 300_000
    proc, sock, stats = serve_proc(tmp_path, "source", metadata, "--count", str(n))
    res = run_virtio_user(tmp_path, sock, "rxonly", 0.5, until_rx=n, vdev_args=PACKED_VDEV)
    counts = finish(proc, stats)["0"]
    assert "packed rings" in (tmp_path / "pyvhost.log").read_text()
    assert counts["packets"] == n and counts["error"] == 0
    assert res["rx_packets"] == n, res


@needs_dpdk
@pytest.mark.dpdk
@pytest.mark.parametrize("metadata", PATHS)
def test_testpmd_packed_io_through_pyvhost_loopback(tmp_path, metadata):
    from .test_dpdk import QUEUE, finish, run_virtio_user
    from .test_dpdk import serve as serve_proc

    proc, sock, stats = serve_proc(tmp_path, "loopback", metadata)
    res = run_virtio_user(tmp_path, sock, "io", 2.0, vdev_args=PACKED_VDEV)
    counts = finish(proc, stats)
    tx, rx = counts["1"], counts["0"]
    assert "packed rings" in (tmp_path / "pyvhost.log").read_text()
    assert res["tx_packets"] > 10_000
    assert rx["packets"] == tx["packets"]
    assert 0 <= res["tx_packets"] - tx["packets"] <= QUEUE, (counts, res)
    assert 0 <= rx["packets"] - res["rx_packets"] <= 4 * QUEUE
    assert tx["error"] == rx["error"] == 0 and tx["drops"] == rx["drops"] == 0


@needs_dpdk
@pytest.mark.dpdk
@pytest.mark.parametrize("direction", ["tx", "rx"])
def test_pyvhost_packed_frontend_with_dpdk_vhost_pmd(tmp_path, direction):
    from pyvhost.bench.peers import parse_testpmd

    from .test_dpdk import QUEUE, start_testpmd

    sock = tmp_path / "dpdk-vhost.sock"
    proc, log = start_testpmd(
        tmp_path, f"net_vhost0,iface={sock},queues=1", "rxonly" if direction == "tx" else "txonly", 0, "vhost"
    )
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        with Frontend(str(sock), queue_size=QUEUE, packed=True) as fe:
            fe.setup()
            assert fe.features & (1 << VIRTIO_F_RING_PACKED)
            r = fe.run(direction, seconds=1.0)
            final = fe.drain(direction)
        assert r["packets"] > 10_000 and final["packets"] >= r["packets"]
        if direction == "rx":
            assert final["bytes"] == 64 * final["packets"]
    finally:
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    stats = parse_testpmd(log.read_text(errors="replace"))
    if direction == "tx":
        assert stats["rx_packets"] == final["packets"], stats
    else:
        assert stats["tx_packets"] == final["packets"], stats


# =========================================================================================================
# Invariant 1 on packed rings: memory and ring-address changes hammered while traffic runs
@pytest.mark.parametrize("metadata", PATHS)
def test_memory_and_vring_addr_changes_hammered(serve, sock_path, errors, metadata):
    import os as _os

    from .test_invalidation import EXTRA, EXTRA_SIZE, TX, MemSlotsFrontend, Traffic, finish, hammer

    srv = serve("sink", metadata)
    fe = MemSlotsFrontend(sock_path, ram_size=RAM, packed=True)
    fe.setup()
    extra_fd = _os.memfd_create("pyvhost-extra", _os.MFD_CLOEXEC)
    _os.ftruncate(extra_fd, EXTRA_SIZE)
    try:
        traffic = Traffic(fe, seconds=3.0)
        traffic.wait_progress(0)
        changes = hammer(
            traffic,
            [
                fe.set_mem_table,
                lambda: fe.resend_vring_addr(TX),
                lambda: fe.add_region(EXTRA, extra_fd),
                lambda: fe.resend_vring_addr(0),  # the idle RX ring: must not disturb TX
                lambda: fe.rem_region(EXTRA),
            ],
            seconds=2.0,
        )
        assert changes >= 10
        assert srv.connection.packed
        done, stats = finish(fe, traffic, srv)
    finally:
        _os.close(extra_fd)
    assert errors() == []
    assert done > changes and stats["error"] == 0 and stats["drops"] == 0
    assert done == stats["packets"] == stats["chains"]


@pytest.mark.parametrize("metadata", PATHS)
@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
def test_restarted_worker_asks_for_kicks_before_sleeping(serve, sock_path, errors, metadata, event_idx):
    """A worker stopped while polling leaves DISABLE in the device area; restarted from GET/SET_VRING_BASE
    with nothing to do, it must ask for kicks again (ENABLE, or DESC at its avail cursor) before it sleeps."""
    from pyvhost.ring.packed import RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE

    srv = serve("sink", metadata, spins=64)
    fe = Frontend(sock_path, ram_size=RAM, event_idx=event_idx, packed=True, queue_size=100)
    fe.setup()
    tx = fe.rings[1]
    fe.run("tx", count=1050)
    cursor = int(tx.d[D_AVAIL_IDX]) | int(tx.d[D_AVAIL_WRAP]) << 15  # 50, wrap 1 after 10 laps + 50

    def asks() -> bool:
        if event_idx:
            return int(tx.device[1]) == RING_EVENT_FLAGS_DESC and int(tx.device[0]) == cursor
        return int(tx.device[1]) == RING_EVENT_FLAGS_ENABLE

    deadline = time.monotonic() + TIMEOUT
    while not asks() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert asks()  # idle and asleep
    base = fe.stop_ring(tx)
    tx.stopped = False
    tx.device[1] = RING_EVENT_FLAGS_DISABLE  # as a worker stopped while polling leaves it
    tx.device[0] = 0
    fe.start_ring(tx, base)
    deadline = time.monotonic() + 0.5
    while not asks() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert asks(), "the restarted worker sleeps with kicks suppressed"
    r = fe.run("tx", count=1000)
    assert r["kicks"] > 0
    assert fe.drain("tx")["packets"] == 2050
    fe.close()
    assert errors() == [] and srv.ended()[-1][1]["packets"] == 2050  # cumulative over the restart

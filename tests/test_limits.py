"""Resource limits a hostile front-end or guest runs into (docs/threat-model.md, "Limits"): message size,
memory regions (509 by ADD_MEM_REG, the 510th refused), queues, chain length in descriptors and in segments,
the work one pass of a worker does, and 1,000 connect/set-up/traffic/disconnect cycles with open fds,
mappings, threads and RSS flat."""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import threading
import time

import numpy as np
import pytest

from pyvhost import protocol as P
from pyvhost.access import Metadata, bind
from pyvhost.backend import DEFAULT_BUDGET
from pyvhost.devices.base import VIRTIO_F_VERSION_1, Step
from pyvhost.devices.net import tx_sink
from pyvhost.errors import QueueError as E
from pyvhost.frontend.ram import GuestRam
from pyvhost.memory import GuestMemory
from pyvhost.protocol import SINGLE_REGION_HDR, U64, VRING_ADDR, VRING_STATE, MemRegion
from pyvhost.protocol import Request as R
from pyvhost.ring.chain import MAX_INDIRECT, new_sg
from pyvhost.ring.split import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT
from pyvhost.ring.state import Q_BATCH, Q_CHAINS, Q_ERROR, Q_HDR_LEN, Q_LAST_AVAIL, Q_STOP, new_queue_state

from .conftest import mapping_count, open_fds
from .test_hostile import QSIZE, TIMEOUT, Guest, broken_lines, fresh_connection_works, traffic
from .test_invalidation import MemSlotsFrontend

PATHS = ["direct", "copy"]
KiB, MiB = 1 << 10, 1 << 20
NEED_REPLY = P.VHOST_USER_VERSION | P.VHOST_USER_NEED_REPLY_MASK


def ack(sock: socket.socket, request: int, payload: bytes = b"", fds: list[int] | None = None) -> int:
    P.send_message(sock, request, payload, fds, flags=NEED_REPLY)
    return U64.unpack(P.recv_reply(sock, request).payload)[0]


# =========================================================================================================
def test_message_size_limit(serve, sock_path):
    """A payload of MAX_PAYLOAD (4096) bytes is read; a header announcing one byte more ends the connection
    before anything is read or allocated; the server goes on."""
    srv = serve("sink")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(sock_path)
        P.send_message(s, R.SET_STATUS, bytes(P.MAX_PAYLOAD))
        P.send_message(s, R.GET_QUEUE_NUM)
        assert U64.unpack(P.recv_reply(s, R.GET_QUEUE_NUM).payload)[0] == 2
        s.sendall(P.HEADER.pack(R.SET_STATUS, 1, P.MAX_PAYLOAD + 1) + bytes(64))
        try:
            assert s.recv(1) == b""
        except ConnectionResetError:  # closed with our 64 bytes unread
            pass
    fresh_connection_works(srv, sock_path, "sink")


@pytest.mark.parametrize("queue_pairs", [1, 4])
def test_queue_limit(serve, sock_path, queue_pairs):
    """A device has 2 queues per pair; every request naming a queue at or past that is refused."""
    serve("sink", queue_pairs=queue_pairs)
    n = 2 * queue_pairs
    with MemSlotsFrontend(sock_path, queue_pairs=queue_pairs, queue_size=QSIZE, ram_size=8 * MiB) as fe:
        fe.setup()
        assert U64.unpack(fe.request(R.GET_QUEUE_NUM))[0] == n
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        for index in (n, n + 1, 255):
            assert ack(fe.sock, R.SET_VRING_NUM, VRING_STATE.pack(index, 64)) != 0
            assert ack(fe.sock, R.SET_VRING_ENABLE, VRING_STATE.pack(index, 1)) != 0
            assert ack(fe.sock, R.SET_VRING_KICK, U64.pack(index), [efd]) != 0
        assert ack(fe.sock, R.SET_VRING_KICK, U64.pack(n - 1), [efd]) == 0  # the last queue is fine
        os.close(efd)
        traffic(fe, "tx", 0, 200)


# =========================================================================================================
SLOT = 4 * KiB
EXTRA_GPA = 0x10_0000_0000  # the extra regions: adjacent 4 KiB slots, far from the front-end's RAM
EXTRA_UVA = 0x7000_0000_0000


def _slot(i: int) -> MemRegion:
    return MemRegion(EXTRA_GPA + i * SLOT, SLOT, EXTRA_UVA + i * SLOT, i * SLOT)


@pytest.mark.parametrize("metadata", PATHS)
def test_509_memory_regions_and_not_one_more(serve, sock_path, errors, metadata):
    """GET_MAX_MEM_SLOTS says 509; 508 ADD_MEM_REGs next to the front-end's RAM make 509 regions with traffic
    running; the 510th is refused; a buffer in region 300 and one crossing 500 region seams both work (a chain
    whose segments outnumber the scatter list is refused); all 508 go again and traffic is unaffected."""
    srv = serve("source", metadata)
    extra = os.memfd_create("slots", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(extra, 510 * SLOT)
    mm = mmap.mmap(extra, 510 * SLOT)
    buf = np.frombuffer(mm, np.uint8)
    maps0 = mapping_count()
    try:
        with MemSlotsFrontend(sock_path, queue_size=QSIZE, ram_size=8 * MiB) as fe:
            fe.setup()
            srv.assert_path(metadata, [0])
            assert U64.unpack(fe.request(R.GET_MAX_MEM_SLOTS))[0] == P.MAX_MEM_SLOTS == 509
            fe.run("rx", count=500, timeout=TIMEOUT)
            for i in range(P.MAX_MEM_SLOTS - 1):
                fe.add_region(_slot(i), extra)
            conn = srv.connection
            assert conn.mem.nregions == 509 and mapping_count() >= maps0 + 508
            srv.assert_path(metadata, [0])  # the ring, rebound 508 times, still runs on its path
            assert ack(fe.sock, R.ADD_MEM_REG, SINGLE_REGION_HDR.pack(0) + _slot(508).pack(), [extra]) != 0
            assert any("already 509 regions, at most 509" in e for e in errors())
            g = Guest(fe, 0)
            base = int(g.ring.avail[1])
            g.idx = base
            # a frame into region 300; and one into a buffer that crosses 500 region seams (501 segments)
            g.desc(40, EXTRA_GPA + 300 * SLOT + 100, 2048, 2)
            g.desc(41, EXTRA_GPA + 3 * SLOT + 5, 500 * SLOT, 2)
            done = int(g.ring.used16[1])
            g.post(40, 41)
            g.wait_used((done + 2) & 0xFFFF)
            frame = bytes(buf[300 * SLOT + 100 + 12 : 300 * SLOT + 100 + 12 + 64])
            assert frame == bytes(buf[3 * SLOT + 5 + 12 : 3 * SLOT + 5 + 12 + 64]) != bytes(64)
            # three such buffers in one chain: 1503 segments, more than the scatter list holds (64 + 1024)
            gpa, t = g.table(3)
            for j in range(3):
                g.desc(j, EXTRA_GPA + j * SLOT + 1, 500 * SLOT, 2 | (VRING_DESC_F_NEXT if j < 2 else 0), j + 1, table=t)
            g.desc(42, gpa, 48, VRING_DESC_F_INDIRECT)
            g.post(42)
            assert g.wait_err() == 1
            assert "CHAIN_TOO_LONG" in broken_lines(errors, 0)[-1]
            g.close()
            del t
            for i in range(P.MAX_MEM_SLOTS - 1):
                fe.rem_region(_slot(i))
            assert srv.connection.mem.nregions == 1
        stats = srv.ended()[-1]
        assert stats[0]["error"] == E.CHAIN_TOO_LONG
        assert mapping_count() <= maps0 + 8
    finally:
        buf = None
        mm.close()
        os.close(extra)
    fresh_connection_works(srv, sock_path, "source")


# =========================================================================================================
# bounded work per pass
def _full_ring_of_worst_chains(size: int, indirect: bool):
    """Guest RAM, a bound ring and queue state: every avail entry names head 0, whose chain is every
    descriptor of the table (or an indirect table of MAX_INDIRECT entries)."""
    ram = GuestRam(4 * MiB)
    mem = GuestMemory(arena_size=1 << 30)
    mem.set_table([ram.region()], [ram.fd])
    d, a, u = ram.alloc(16 * size, 4096), ram.alloc(6 + 2 * size, 64), ram.alloc(6 + 8 * size, 4096)
    data = ram.alloc(64 * KiB, 4096)
    desc = ram.buf[d : d + 16 * size].view(np.uint64)
    if indirect:
        t = ram.alloc(16 * MAX_INDIRECT, 16)
        table = ram.buf[t : t + 16 * MAX_INDIRECT].view(np.uint64)
        for j in range(MAX_INDIRECT):
            table[2 * j] = ram.gpa(data + 16 * j)
            table[2 * j + 1] = 16 | (VRING_DESC_F_NEXT << 32 if j < MAX_INDIRECT - 1 else 0) | (j + 1) << 48
        desc[0] = ram.gpa(t)
        desc[1] = 16 * MAX_INDIRECT | VRING_DESC_F_INDIRECT << 32
    else:
        for i in range(size):
            desc[2 * i] = ram.gpa(data + 16 * i)
            desc[2 * i + 1] = 16 | (VRING_DESC_F_NEXT << 32 if i < size - 1 else 0) | (i + 1) << 48
    avail = ram.buf[a : a + 6 + 2 * size].view(np.uint16)
    avail[2 : 2 + size] = 0
    avail[1] = size  # a full ring
    return ram, mem, P.VringAddr(0, 0, ram.uva(d), ram.uva(u), ram.uva(a), 0)


@pytest.mark.parametrize("metadata", [Metadata.DIRECT, Metadata.COPY])
@pytest.mark.parametrize("indirect", [False, True])
def test_one_pass_does_bounded_work(metadata, indirect):
    """One kick with a full ring of the longest chains: a pass takes at most Q_BATCH chains (each at most the
    queue size, or MAX_INDIRECT, descriptors), and a kernel call returns after its budget of passes."""
    size, batch = 256, 32
    ram, mem, addr = _full_ring_of_worst_chains(size, indirect)
    try:
        q = new_queue_state(size)
        q[Q_BATCH] = batch
        q[Q_HDR_LEN] = 12
        views = bind(mem, addr, size, metadata, q)
        sg = new_sg(size)
        tx_sink(q, *views.args(), mem.arena.view, mem.table, sg, 0, 1)  # compiled (or loaded) first: no pass
        assert q[Q_CHAINS] == 0
        for calls in range(1, size // batch + 1):
            t0 = time.thread_time()  # CPU time of this thread (the kernel runs in it): not the machine's load
            ret = tx_sink(q, *views.args(), mem.arena.view, mem.table, sg, 1, 1)  # one pass
            dt = time.thread_time() - t0
            assert ret == 1 and q[Q_ERROR] == 0
            assert q[Q_CHAINS] == calls * batch and q[Q_LAST_AVAIL] == calls * batch
            assert dt < 1.0  # 32 chains of 256 (or 1024) descriptors: milliseconds of CPU
            # a stop asked for is seen before the next pass, with the ring still full of work
            q[Q_STOP] = 1
            ret = tx_sink(q, *views.args(), mem.arena.view, mem.table, sg, 4, 1)
            assert ret == Step.STOPPED and q[Q_CHAINS] == calls * batch, (ret, int(q[Q_CHAINS]))
            q[Q_STOP] = 0
        ret = tx_sink(q, *views.args(), mem.arena.view, mem.table, sg, 4, 1)
        assert q[Q_CHAINS] == size and ret in (0, 1)  # nothing left: the next passes find it empty
    finally:
        views = None  # (before the unmap: a failure's report must not read unmapped views)
        mem.close()
        ram.close()


def test_worker_stops_promptly_under_a_flood_of_worst_chains(serve, sock_path):
    """A guest that keeps the ring full of the longest chains cannot keep the worker from a stop: the worker
    checks for one every pass, and GET_VRING_BASE returns at once."""
    assert DEFAULT_BUDGET > 0
    srv = serve("sink", "direct")
    with MemSlotsFrontend(sock_path, queue_size=QSIZE, ram_size=8 * MiB) as fe:
        fe.setup()
        g = Guest(fe, 1)
        for i in range(QSIZE):
            g.desc(i, g.ring.buf_gpa(i), 16, VRING_DESC_F_NEXT if i < QSIZE - 1 else 0, i + 1)
        stop = threading.Event()

        def flood() -> None:
            while not stop.is_set():
                room = QSIZE - ((g.idx - g.used) & 0xFFFF)
                if room:
                    g.post(*([0] * room))
                time.sleep(0)

        t = threading.Thread(target=flood, daemon=True)
        t.start()
        stopped = threading.Event()

        def stop_ring() -> None:
            fe.stop_ring(fe.rings[1])
            stopped.set()

        try:
            deadline = time.monotonic() + TIMEOUT
            while g.used < 4 * QSIZE:  # the flood is on: the worker is busy with it
                assert time.monotonic() < deadline, f"{g.used} chains completed"
                time.sleep(0.001)
            # a worker that did not check for a stop every pass would never leave this flood: no time bound
            # is needed to tell, only a deadline generous enough for any load
            stopper = threading.Thread(target=stop_ring, daemon=True)
            stopper.start()
            assert stopped.wait(60), "GET_VRING_BASE did not return under a flood of worst chains"
            assert not srv.connection.workers, "the ring's worker still runs"
        finally:
            stop.set()
            t.join()
            g.close()
    # the front-end saw at least 4 * QSIZE completions before the stop (the stop may follow the last at once)
    assert srv.ended()[-1][1]["chains"] >= 4 * QSIZE


# =========================================================================================================
# 1,000 connections, each a minimal set-up with a running worker and a little traffic
class MiniGuest:
    """One sealed memfd with one split ring of 8 (ring 1, TX) and its buffers; set up over a raw socket."""

    SIZE = 8

    def __init__(self) -> None:
        self.fd = os.memfd_create("mini-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, 1 * MiB)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.mm = mmap.mmap(self.fd, 1 * MiB)
        self.buf = np.frombuffer(self.mm, np.uint8)
        self.uva = self.buf.ctypes.data
        self.gpa = 0x4000_0000
        n = self.SIZE
        self.desc = self.buf[0 : 16 * n].view(np.uint64)
        self.avail = self.buf[4096 : 4096 + 6 + 2 * n].view(np.uint16)
        self.used = self.buf[8192 : 8192 + 6 + 8 * n].view(np.uint16)
        for i in range(n):
            self.desc[2 * i] = self.gpa + 65536 + 2048 * i
            self.desc[2 * i + 1] = 12 + 64
            self.avail[2 + i] = i
        self.kick, self.call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
        self.base = 0

    def cycle(self, path: str, graceful: bool) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(TIMEOUT)
            s.connect(path)
            send = lambda req, payload=b"", fds=None: P.send_message(s, req, payload, fds)  # noqa: E731
            send(R.GET_FEATURES)  # answered once the previous connection (and its worker) is gone
            P.recv_reply(s, R.GET_FEATURES)
            send(R.SET_OWNER)
            send(R.SET_FEATURES, U64.pack(1 << VIRTIO_F_VERSION_1))
            region = MemRegion(self.gpa, 1 * MiB, self.uva, 0)
            send(R.SET_MEM_TABLE, P.MEM_TABLE_HDR.pack(1, 0) + region.pack(), [self.fd])
            send(R.SET_VRING_NUM, VRING_STATE.pack(1, self.SIZE))
            send(R.SET_VRING_BASE, VRING_STATE.pack(1, self.base))
            send(R.SET_VRING_ADDR, VRING_ADDR.pack(1, 0, self.uva, self.uva + 8192, self.uva + 4096, 0))
            send(R.SET_VRING_KICK, U64.pack(1), [self.kick])
            send(R.SET_VRING_CALL, U64.pack(1), [self.call])
            target = (self.base + 2) & 0xFFFF
            self.avail[1] = target  # two more chains (the ring's entries name every descriptor in turn)
            os.eventfd_write(self.kick, 1)
            deadline = time.monotonic() + TIMEOUT
            while self.used[1] != target:
                assert time.monotonic() < deadline, "no completion"
                time.sleep(0.0002)
            self.base = target
            if graceful:
                P.send_message(s, R.GET_VRING_BASE, VRING_STATE.pack(1, 0))
                assert VRING_STATE.unpack(P.recv_reply(s, R.GET_VRING_BASE).payload)[1] == target

    def close(self) -> None:
        self.desc = self.avail = self.used = self.buf = None
        self.mm.close()
        for fd in (self.fd, self.kick, self.call):
            os.close(fd)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.parametrize("metadata", PATHS)
def test_1000_connections_leak_nothing(serve, sock_path, metadata):
    srv = serve("sink", metadata)
    g = MiniGuest()
    samples = {}
    try:
        for cycle in range(1, 1001):
            g.cycle(sock_path, graceful=cycle % 2 == 0)  # (the next connection is served after this one ended)
            if cycle in (100, 1000):
                srv.ended()
                samples[cycle] = (open_fds(), mapping_count(), threading.active_count(), _rss_kib())
    finally:
        g.close()
    (f1, m1, t1, r1), (f2, m2, t2, r2) = samples[100], samples[1000]
    assert f2 == f1, sorted(f2 ^ f1)
    assert m2 <= m1 + 4, (m1, m2)
    assert t2 <= t1
    assert r2 - r1 < 4 * 1024, f"RSS grew by {r2 - r1} KiB over 900 connections"
    history = srv.server.history
    assert history.maxlen is not None and len(history) <= history.maxlen  # per-connection stats are bounded
    assert all(h[1]["packets"] == 2 for h in list(history)[-10:])

"""Every known vhost / vhost-user CVE class as a test against ``pyvhost serve net``, on both metadata paths.

Each test is named after the class it covers (docs/threat-model.md says which guarantee each one shows).  The
guest is a :class:`GuardedFrontend`: its RAM is one memfd of which only two regions are in the memory table --
A and, after a hole, B -- and the bytes around them (before A, between A and B, after B) are guard bytes the
back-end was never given.  Region edges are not page aligned, so the back-end's page-rounded mappings contain
guard bytes right next to each region: a stray write there would not fault, but it would change a guard byte,
and every test checks that none changed.  A stray access further out faults in the back-end's PROT_NONE arena
and kills the test process.  Where a value is an error, the test checks the one clear log line and the queue
marked broken (the other queue pair keeps working); every test ends with a fresh, well-behaved connection
passing exact traffic.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import select
import socket
import struct
import threading
import time

import numpy as np
import pytest

from pyvhost import protocol as P
from pyvhost.devices.net import VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, make_frame
from pyvhost.errors import QueueError as E
from pyvhost.frontend.net import Frontend
from pyvhost.protocol import INFLIGHT, LOG_HDR, MEM_TABLE_HDR, U64, VRING_ADDR, VRING_STATE, MemRegion
from pyvhost.protocol import ProtocolFeature as PF
from pyvhost.protocol import Request as R
from pyvhost.ring.split import VRING_DESC_F_INDIRECT as INDIRECT
from pyvhost.ring.split import VRING_DESC_F_NEXT as NEXT
from pyvhost.ring.split import VRING_DESC_F_WRITE as WRITE

from .conftest import mapping_count, open_fds
from .test_hostile import FRAME_LEN, GOOD, QSIZE, TIMEOUT, Guest, broken_lines, fresh_connection_works, traffic

PATHS = ["direct", "copy"]
KiB, MiB = 1 << 10, 1 << 20
RAM = 16 * MiB
A_OFF, A_END = 64 * KiB + 256, 12 * MiB - 192
B_OFF, B_END = 12 * MiB + 4096 + 128, RAM - 64 * KiB - 320
GUARD = 0xA5
NEED_REPLY = P.VHOST_USER_VERSION | P.VHOST_USER_NEED_REPLY_MASK
VHOST_F_LOG_ALL = 26
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1


class GuardedFrontend(Frontend):
    """A Frontend whose memory table has two regions, A and B, of one memfd; everything else in the memfd is
    guard bytes.  GPA and UVA are the memfd offset plus a base, so the guard between A and B is a hole in both
    address spaces -- exactly where a back-end that computed addresses linearly, ignoring the table, would
    land."""

    def __init__(self, path: str, **kw) -> None:
        super().__init__(path, ram_size=RAM, **kw)
        for lo, hi in self.guards():
            self.ram.buf[lo:hi] = GUARD
        self.ram.top = A_OFF  # rings, buffers and indirect tables are allocated in region A

    @staticmethod
    def guards() -> list[tuple[int, int]]:
        return [(0, A_OFF), (A_END, B_OFF), (B_END, RAM)]

    def regions(self) -> list[MemRegion]:
        r = self.ram
        return [
            MemRegion(r.gpa(A_OFF), A_END - A_OFF, r.uva(A_OFF), A_OFF),
            MemRegion(r.gpa(B_OFF), B_END - B_OFF, r.uva(B_OFF), B_OFF),
        ]

    def set_mem_table(self) -> None:
        payload = MEM_TABLE_HDR.pack(2, 0) + b"".join(x.pack() for x in self.regions())
        self.command(R.SET_MEM_TABLE, payload, [self.ram.fd, self.ram.fd])

    def guards_intact(self) -> bool:
        return all(bool(np.all(self.ram.buf[lo:hi] == GUARD)) for lo, hi in self.guards())


def ack(fe: Frontend, request: int, payload: bytes = b"", fds: list[int] | None = None) -> int:
    """Send with NEED_REPLY (REPLY_ACK is negotiated); the back-end's status, 0 = success."""
    P.send_message(fe.sock, request, payload, fds, flags=NEED_REPLY)
    reply = P.recv_reply(fe.sock, request)
    assert len(reply.payload) == 8 and not reply.fds
    return U64.unpack(reply.payload)[0]


def process_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def hostile(
    serve,
    sock_path,
    errors,
    metadata: str,
    mode: str,
    build,
    expect: E | None,
    good: int = GOOD,
    before=None,
    check=None,
) -> None:
    """2 queue pairs; ``build(g)`` makes ring 1 (sink) or 0 (source) meet the hostile value after ``good``
    valid chains.  ``expect``: the QueueError (one log line, ERR signalled, queue marked broken), or None for
    a value that must be harmless (every chain completes, nothing broken).  Then: the other pair passes exact
    traffic, no guard byte changed, and a fresh connection passes exact traffic."""
    srv = serve(mode, metadata, queue_pairs=2)
    index, direction = (1, "tx") if mode == "sink" else (0, "rx")
    with GuardedFrontend(sock_path, queue_pairs=2, queue_size=QSIZE) as fe:
        fe.setup()
        g = Guest(fe, index)
        try:
            if before:
                before(g)
                # a ring moved across a region's end cannot be mapped directly: it falls back to copy
                srv.assert_path("copy", [index])
            else:
                srv.assert_path(metadata)
            build(g)
            if expect is None:
                g.wait_used(good)  # the hostile chain completed: it was walked whole and did not break the ring
                assert not select.select([g.err_fd], [], [], 0)[0] and not broken_lines(errors, index)
                assert not srv.connection.vrings[index].broken
            else:
                assert g.wait_err() == 1
                lines = broken_lines(errors, index)
                assert len(lines) == 1, errors()
                assert re.match(rf"vring {index} broken: {expect.name}: {re.escape(expect.text)} ", lines[0]), lines
                assert g.used == good and srv.connection.vrings[index].broken
            if check:
                check(g)
            traffic(fe, direction, 1, 500)
            assert fe.guards_intact(), "a guard byte outside the guest regions changed"
        finally:
            g.close()
    stats = srv.ended()[-1]
    assert stats[index]["error"] == (expect or 0)
    assert [e for e in errors() if "broken" not in e] == []
    fresh_connection_works(srv, sock_path, mode)


def post_bad(*descs, head: int = 8, raw: bool = False):
    """GOOD good chains, then a chain from ``head``: descs are (index, addr(g) or int, length, flags, next);
    the ring's direction (WRITE on RX) is added to the flags unless ``raw``."""

    def build(g: Guest) -> None:
        for i, addr, length, flags, nxt in descs:
            a = addr(g) if callable(addr) else addr
            g.desc(i, a, length, flags | (0 if raw else g.dir), nxt)
        g.post(*g.good_chains(), head)

    return build


def gpa(g: Guest, off: int) -> int:
    return g.ram.gpa(off)


# =========================================================================================================
# CVE-2018-1059 (DPDK vhost): a descriptor's GPA range was not checked to lie in guest memory
GPA_CASES = {
    # name: (descs, expected error or None)
    "straddles the end of region A": ([(8, lambda g: gpa(g, A_END) - 32, FRAME_LEN, 0, 0)], E.BAD_ADDRESS),
    "lies in the hole between A and B": ([(8, lambda g: gpa(g, A_END) + 64, FRAME_LEN, 0, 0)], E.BAD_ADDRESS),
    "starts in the hole, ends in B": ([(8, lambda g: gpa(g, B_OFF) - 16, FRAME_LEN, 0, 0)], E.BAD_ADDRESS),
    "4 GiB from the last byte of B": ([(8, lambda g: gpa(g, B_END) - 1, 0xFFFFFFFF, 0, 0)], E.BAD_ADDRESS),
    "addr + len wraps around 2**64": ([(8, 2**64 - 16, FRAME_LEN, 0, 0)], E.BAD_ADDRESS),
    "second buffer of a chain past A": (
        [(8, None, 16, NEXT, 9), (9, lambda g: gpa(g, A_END) - 8, 64, 0, 0)],
        E.BAD_ADDRESS,
    ),
    "ends exactly at the end of A (valid)": ([(8, lambda g: gpa(g, A_END) - FRAME_LEN, FRAME_LEN, 0, 0)], None),
    "lies in region B (valid)": ([(8, lambda g: gpa(g, B_OFF), FRAME_LEN, 0, 0)], None),
}


def _gpa_build(descs):
    fixed = [(i, (lambda g, i=i: g.ring.buf_gpa(i)) if a is None else a, n, f, x) for i, a, n, f, x in descs]
    return post_bad(*fixed)


def _frame_in_b(g: Guest) -> None:
    if g.dir:  # RX: the frame landed in region B, behind its 12-byte header
        got = g.ram.buf[B_OFF : B_OFF + FRAME_LEN]
        assert got[10] == 1 and bytes(got[12:]) == make_frame(64).tobytes()


@pytest.mark.parametrize("metadata", PATHS)
@pytest.mark.parametrize("mode", ["sink", "source"])
@pytest.mark.parametrize("case", list(GPA_CASES))
def test_cve_2018_1059_unchecked_gpa_range(serve, sock_path, errors, metadata, mode, case):
    descs, expect = GPA_CASES[case]
    hostile(
        serve,
        sock_path,
        errors,
        metadata,
        mode,
        _gpa_build(descs),
        expect,
        good=GOOD if expect else GOOD + 1,
        check=_frame_in_b if "region B" in case else None,
    )


# =========================================================================================================
# CVE-2020-10725 (DPDK vhost): a translated ring/table address was used without checking that the whole
# ring or table lies in the region (only its first byte did)
def _readdress(part: str, where):
    def before(g: Guest) -> None:
        a = g.ring.addr()
        addrs = {"desc": a.desc, "used": a.used, "avail": a.avail}
        addrs[part] = where(g)
        g.fe.command(R.SET_VRING_ADDR, VRING_ADDR.pack(g.index, 0, addrs["desc"], addrs["used"], addrs["avail"], 0))

    return before


def _desc_across_end(g: Guest) -> None:
    # the first half of the table is the last 512 bytes of A; descriptor 40 lies in the guard
    t = g.ram.buf[A_END - 16 * QSIZE // 2 : A_END].view(np.uint64)
    g.good(0, 1, 2, table=t)
    g.post(0, 1, 2, 40)


def _post_good_then():
    def build(g: Guest) -> None:
        g.post(*g.good_chains())

    return build


RING_TABLE_CASES = {
    # name: (before, build, error, completions before the error)
    "descriptor table straddles the end of A": (
        _readdress("desc", lambda g: g.ram.uva(A_END) - 16 * QSIZE // 2),
        _desc_across_end,
        E.RING_UNMAPPED,
        GOOD,
    ),
    "used ring straddles the end of A": (
        _readdress("used", lambda g: g.ram.uva(A_END) - 8),
        _post_good_then(),
        E.RING_UNMAPPED,
        0,
    ),
    "avail ring straddles the end of A": (
        _readdress("avail", lambda g: g.ram.uva(A_END) - 4),
        lambda g: (g.ram.buf[A_END - 2 : A_END].view(np.uint16).__setitem__(0, 1), g.kick()),
        E.RING_UNMAPPED,
        0,
    ),
    "used ring in the hole between A and B": (
        _readdress("used", lambda g: g.ram.uva(A_END) + 256),
        _post_good_then(),
        E.RING_UNMAPPED,
        0,
    ),
    "indirect table straddles the end of A": (
        None,
        post_bad((8, lambda g: gpa(g, A_END) - 16, 32, INDIRECT, 0), raw=True),
        E.INDIRECT_UNMAPPED,
        GOOD,
    ),
    "indirect table in the hole between A and B": (
        None,
        post_bad((8, lambda g: gpa(g, A_END) + 4096, 64, INDIRECT, 0), raw=True),
        E.INDIRECT_UNMAPPED,
        GOOD,
    ),
}


@pytest.mark.parametrize("metadata", PATHS)
@pytest.mark.parametrize("mode", ["sink", "source"])
@pytest.mark.parametrize("case", list(RING_TABLE_CASES))
def test_cve_2020_10725_translated_address_not_checked(serve, sock_path, errors, metadata, mode, case):
    before, build, expect, good = RING_TABLE_CASES[case]
    hostile(serve, sock_path, errors, metadata, mode, build, expect, good=good, before=before)


# =========================================================================================================
# CVE-2019-14818 (DPDK vhost): fds and memory leaked by repeated malformed set-up messages
@pytest.mark.parametrize("metadata", PATHS)
def test_cve_2019_14818_no_leak_on_repeated_malformed_setups(serve, sock_path, errors, metadata):
    srv = serve("sink", metadata)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # let the server reach its steady state
        s.connect(sock_path)
        P.send_message(s, R.GET_QUEUE_NUM)
        P.recv_reply(s, R.GET_QUEUE_NUM)
    srv.ended()
    fds0, maps0, threads0 = open_fds(), mapping_count(), threading.active_count()
    refused = 0
    for cycle in range(60):
        fe = Frontend(sock_path, queue_size=QSIZE, ram_size=2 * MiB)
        fe.negotiate()
        ram = fe.ram
        r, w = os.pipe()
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        good = ram.region()
        bad_tables = [
            (
                MEM_TABLE_HDR.pack(1, 0) + MemRegion(good.guest_phys_addr, 4 * MiB, good.userspace_addr, 0).pack(),
                [ram.fd],
            ),  # region larger than its file
            (MEM_TABLE_HDR.pack(2, 0) + good.pack() * 2, [ram.fd]),  # 2 regions, 1 fd
            (MEM_TABLE_HDR.pack(1, 0) + good.pack(), [r]),  # a pipe
            (MEM_TABLE_HDR.pack(2, 0) + good.pack() * 2, [ram.fd, ram.fd]),  # overlapping
            (MEM_TABLE_HDR.pack(9, 0) + good.pack() * 9, [ram.fd] * 8),  # too many regions
        ]
        for payload, fds in bad_tables:
            refused += ack(fe, R.SET_MEM_TABLE, payload, fds) != 0
        for rid in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
            refused += ack(fe, rid, U64.pack(1), [efd, efd]) != 0  # two fds
            refused += ack(fe, rid, U64.pack(1 | P.VHOST_USER_VRING_NOFD_MASK), [efd]) != 0  # NOFD and an fd
            refused += ack(fe, rid, U64.pack(7), [efd]) != 0  # no such ring
            refused += ack(fe, rid, U64.pack(1), [w]) != 0  # not an eventfd
        refused += ack(fe, R.SET_LOG_BASE, LOG_HDR.pack(1 << 20, 0), [ram.fd]) != 0
        refused += ack(fe, R.SET_INFLIGHT_FD, INFLIGHT.pack(2**63, 0, 2, 64) + bytes(4), [ram.fd]) != 0
        refused += (
            ack(
                fe,
                R.ADD_MEM_REG,
                P.SINGLE_REGION_HDR.pack(0) + MemRegion(good.guest_phys_addr, 8 * MiB, good.userspace_addr, 0).pack(),
                [ram.fd],
            )
            != 0
        )
        os.close(r)
        os.close(w)
        os.close(efd)
        # then a good set-up (negotiating again is harmless), traffic, and a way of leaving
        fe.setup()
        srv.assert_path(metadata, [1])
        fe.run("tx", count=2 * QSIZE, timeout=TIMEOUT)
        if cycle % 3 == 2:  # hang up in the middle of a message that carries fds
            socket.send_fds(fe.sock, [P.HEADER.pack(R.SET_MEM_TABLE, 1, 40) + bytes(10)], [ram.fd])
            fe.close(stop_rings=False)
        else:
            fe.close(stop_rings=cycle % 3 == 0)
        assert srv.ended()[-1][1]["packets"] == 2 * QSIZE
    assert refused == 60 * 20
    fds1, maps1, threads1 = open_fds(), mapping_count(), threading.active_count()
    assert fds1 == fds0, sorted(fds1 ^ fds0)
    assert maps1 <= maps0 + 8, (maps0, maps1)
    assert threads1 <= threads0
    fresh_connection_works(srv, sock_path, "sink")


# =========================================================================================================
# CVE-2020-10722 (DPDK vhost): the dirty log's size overflowed (a log mapped smaller than it was used).  Every
# SET_LOG_BASE is checked: size and offset, against its fd and against guest memory
@pytest.mark.parametrize("metadata", PATHS)
def test_cve_2020_10722_log_size_overflow_log_base_refused(serve, sock_path, errors, metadata):
    """SET_LOG_BASE's size and offset come from the front-end: a size whose sum with the offset overflows, a
    log past its file's end, one too small for guest memory, a malformed payload, no fd, the wrong kind of fd,
    or SET_LOG_BASE before LOG_SHMFD -- each refused with a clear error, every fd closed, nothing mapped; the
    queues go on, and a sound log is then accepted."""
    srv = serve("sink", metadata)
    with GuardedFrontend(sock_path, queue_size=QSIZE) as fe:
        fe.setup()
        offered = U64.unpack(fe.request(R.GET_FEATURES))[0]
        offered_pf = U64.unpack(fe.request(R.GET_PROTOCOL_FEATURES))[0]
        assert offered & (1 << VHOST_F_LOG_ALL) and offered_pf & (1 << PF.LOG_SHMFD)
        need = -(-((fe.ram.gpa_base + fe.ram.size) >> 12) // 8)  # bytes of log guest memory needs
        logfd = os.memfd_create("log", os.MFD_CLOEXEC)
        os.ftruncate(logfd, 2 * need + 4096)
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        s1, s2 = socket.socketpair()
        fds0 = process_fds()
        maps0 = mapping_count()
        n = len(errors())
        assert ack(fe, R.SET_LOG_BASE, LOG_HDR.pack(need, 0), [logfd]) != 0  # LOG_SHMFD not negotiated yet
        assert ack(fe, R.SET_PROTOCOL_FEATURES, U64.pack(fe.protocol_features | 1 << PF.LOG_SHMFD)) == 0
        for size, offset, fd in (
            (2**64 - 1, 0, logfd),  # size + offset overflow
            (2**64 - 4096, 2**64 - 4096, logfd),
            (1 << 62, 1 << 63, logfd),
            (need, 2 * need + 4096, logfd),  # past the file's end
            (need, need + 4097, logfd),  # straddles the file's end
            (max(1, need // 2), 0, logfd),  # too small for guest memory
            (0, 0, logfd),  # empty
            (need, 0, efd),  # not mappable
            (need, 0, s1.fileno()),
        ):
            assert ack(fe, R.SET_LOG_BASE, LOG_HDR.pack(size, offset), [fd]) != 0, (size, offset)
        assert ack(fe, R.SET_LOG_BASE, LOG_HDR.pack(need, 0)) != 0  # no fd
        assert ack(fe, R.SET_LOG_BASE, U64.pack(0), [logfd]) != 0  # short payload
        assert ack(fe, R.SET_LOG_FD, b"", [s1.fileno()]) != 0  # not an eventfd
        assert mapping_count() == maps0  # nothing refused stayed mapped
        assert process_fds() == fds0  # every fd the refused messages carried was closed
        new = errors()[n:]
        assert sum("SET_LOG" in e for e in new) == 13, new
        # a sound log (and a log fd) are accepted, and the queues go on
        assert ack(fe, R.SET_LOG_BASE, LOG_HDR.pack(need, 4096), [logfd]) == 0
        assert ack(fe, R.SET_LOG_FD, b"", [efd]) == 0
        traffic(fe, "tx", 0, 1000)
        assert fe.guards_intact()
        for fd in (logfd, efd):
            os.close(fd)
        s1.close()
        s2.close()
    fresh_connection_works(srv, sock_path, "sink")


# =========================================================================================================
# CVE-2020-10723 (DPDK vhost): a vring index was truncated (to 8 or 16 bits) after being checked
@pytest.mark.parametrize("metadata", PATHS)
def test_cve_2020_10723_vring_index_truncation(serve, sock_path, errors, metadata):
    srv = serve("sink", metadata)
    with GuardedFrontend(sock_path, queue_size=QSIZE) as fe:
        fe.setup()
        fe.run("tx", count=200, timeout=TIMEOUT)  # ring 1 is running
        fds0 = process_fds()
        n = len(errors())
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        # KICK/CALL/ERR: bits 0-7 index, bit 8 NOFD; anything above is refused, not masked off
        for rid in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
            for value in (0x201, 0x1_0000_0001, 0x8000_0000_0000_0001, 0xFFFF_FFFF_FFFF_FE01):
                assert ack(fe, rid, U64.pack(value), [efd]) != 0
            assert ack(fe, rid, U64.pack(0x101), [efd]) != 0  # index 257 reads as 1 | NOFD: and an fd came
        # u32 indices elsewhere: 257, 65537 and 2**32-1 are out of range, not ring 1
        for index in (0x101, 0x1_0001, 0xFFFF_FFFF):
            assert ack(fe, R.SET_VRING_NUM, VRING_STATE.pack(index, 128)) != 0
            assert ack(fe, R.SET_VRING_BASE, VRING_STATE.pack(index, 7)) != 0
            assert ack(fe, R.SET_VRING_ENABLE, VRING_STATE.pack(index, 0)) != 0
            assert ack(fe, R.SET_VRING_ADDR, VRING_ADDR.pack(index, 0, 0, 0, 0, 0)) != 0
            reply = fe.request(R.GET_VRING_BASE, VRING_STATE.pack(index, 0))
            assert len(reply) == VRING_STATE.size
        os.close(efd)
        new = errors()[n:]
        assert sum("has bits set besides the vring index" in e for e in new) == 12
        assert sum("out of range" in e for e in new) == 15
        vr = srv.connection.vrings[1]
        assert vr.size == QSIZE and vr.started and vr.enabled and not vr.broken  # ring 1 untouched
        assert process_fds() == fds0
        traffic(fe, "tx", 0, 1000)
    fresh_connection_works(srv, sock_path, "sink")


# =========================================================================================================
# CVE-2020-10726 (DPDK vhost): GET_INFLIGHT_FD computed an area size from unchecked queue counts and sizes
@pytest.mark.parametrize("metadata", PATHS)
def test_cve_2020_10726_get_inflight_fd(serve, sock_path, errors, metadata):
    from pyvhost.ring import inflight

    srv = serve("sink", metadata)
    with GuardedFrontend(sock_path, queue_size=QSIZE) as fe:
        fe.setup()
        fds0 = process_fds()
        n = len(errors())
        # hostile sizes: a clean failure, a reply of the right shape, no fd
        for num_queues, queue_size in ((0xFFFF, 0xFFFF), (0xFFFF, 32768), (0, 256), (1, 0), (4, 65535)):
            P.send_message(fe.sock, R.GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, num_queues, queue_size) + bytes(4))
            reply = P.recv_reply(fe.sock, R.GET_INFLIGHT_FD)
            assert len(reply.payload) == inflight.PAYLOAD_SIZE and not reply.fds
        assert sum("GET_INFLIGHT_FD failed" in e for e in errors()[n:]) == 5
        # a sane one: a sealed memfd of exactly the size the reply states
        P.send_message(fe.sock, R.GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, 2, QSIZE) + bytes(4))
        reply = P.recv_reply(fe.sock, R.GET_INFLIGHT_FD)
        size, offset, nq, qs = INFLIGHT.unpack_from(reply.payload)
        assert len(reply.fds) == 1 and (nq, qs, offset) == (2, QSIZE, 0)
        assert size == 2 * inflight.queue_region_size(QSIZE) == os.fstat(reply.fds[0]).st_size
        seals = fcntl.fcntl(reply.fds[0], fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        reply.close_fds()
        # SET_INFLIGHT_FD with sizes that overflow or do not fit its file: refused, the fd closed
        r, w = os.pipe()
        small = os.memfd_create("small", os.MFD_CLOEXEC)
        os.ftruncate(small, 4096)
        for desc, fds in (
            (INFLIGHT.pack(2**64 - 1, 0, 2, QSIZE), [small]),
            (INFLIGHT.pack(4096, 2**64 - 4096, 1, 8), [small]),
            (INFLIGHT.pack(4096, 1, 1, 8), [small]),
            (INFLIGHT.pack(1 << 30, 0, 0xFFFF, 0xFFFF), [small]),
            (INFLIGHT.pack(1 << 20, 0, 2, QSIZE), [small]),  # larger than the file
            (INFLIGHT.pack(4096, 0, 1, 8), [r]),
            (INFLIGHT.pack(4096, 0, 1, 8), []),
        ):
            assert ack(fe, R.SET_INFLIGHT_FD, desc + bytes(4), fds) != 0
        for fd in (r, w, small):
            os.close(fd)
        assert process_fds() == fds0
        traffic(fe, "tx", 0, 1000)
    fresh_connection_works(srv, sock_path, "sink")


# =========================================================================================================
# CVE-2022-2132 (DPDK vhost): a descriptor chain too small for the virtio-net header
def _hdr_split_tx(g: Guest) -> None:
    # the header in 12 one-byte descriptors, then the frame: a valid packet; and a chain of 11 bytes: a drop
    for i in range(12):
        g.desc(8 + i, g.ring.buf_gpa(8 + i), 1, NEXT, 9 + i)
    g.desc(20, g.ring.buf_gpa(20), 64, 0, 0)
    g.desc(30, gpa(g, A_END) - 11, 11, 0, 0)
    g.post(*g.good_chains(), 8, 30)


def _hdr_split_rx(g: Guest) -> None:
    # an 11-byte buffer ending exactly at the end of A: too small, completed empty, nothing written past it;
    # then the header over 12 one-byte buffers (the last one the last byte of A) and the frame in a second chain
    g.desc(30, gpa(g, A_END) - 11, 11, WRITE, 0)
    for i in range(11):
        g.desc(8 + i, g.ring.buf_gpa(8 + i), 1, WRITE | NEXT, 9 + i)
    g.desc(19, gpa(g, A_END) - 1, 1, WRITE, 0)
    g.desc(21, g.ring.buf_gpa(21), 2048, WRITE, 0)
    g.ram.buf[A_END - 11 : A_END] = 0x5A
    g.post(*g.good_chains(), 30, 8, 21)


def _check_small_rx(g: Guest) -> None:
    ids = g.used_ids()
    lens = [int(g.ring.used32[2 + 2 * (k % g.size)]) for k in range(g.used)]
    assert ids[GOOD:] == [30, 8, 21] and lens[GOOD:] == [0, 12, 64]
    assert bytes(g.ram.buf[A_END - 11 : A_END - 1]) == b"\x5a" * 10  # the dropped chain: untouched
    hdr = bytes(g.ram.buf[g.ring.bufs_off + (8 + i) * 2048] for i in range(11)) + bytes(g.ram.buf[A_END - 1 : A_END])
    assert hdr == bytes(10) + b"\x02\x00"  # num_buffers = 2, written across the one-byte buffers
    assert bytes(g.ram.buf[g.ring.bufs_off + 21 * 2048 :][:64]) == make_frame(64).tobytes()


@pytest.mark.parametrize("metadata", PATHS)
@pytest.mark.parametrize("mode", ["sink", "source"])
def test_cve_2022_2132_chain_too_small_for_net_header(serve, sock_path, errors, metadata, mode):
    srv = serve(mode, metadata, queue_pairs=2)
    index, direction = (1, "tx") if mode == "sink" else (0, "rx")
    with GuardedFrontend(sock_path, queue_pairs=2, queue_size=QSIZE) as fe:
        fe.setup()
        g = Guest(fe, index)
        try:
            if mode == "sink":
                _hdr_split_tx(g)
                g.wait_used(GOOD + 2)
            else:
                _hdr_split_rx(g)
                g.wait_used(GOOD + 3)
                _check_small_rx(g)
            assert not select.select([g.err_fd], [], [], 0)[0] and not srv.connection.vrings[index].broken
            traffic(fe, direction, 1, 500)
            assert fe.guards_intact()
        finally:
            g.close()
    stats = srv.ended()[-1][index]
    assert stats["error"] == 0 and stats["drops"] == 1
    assert stats["packets"] == GOOD + 1 and stats["chains"] == GOOD + (2 if mode == "sink" else 3)
    if mode == "sink":
        assert stats["bytes"] == GOOD * 64 + 64
    fresh_connection_works(srv, sock_path, mode)


# =========================================================================================================
# CVE-2024-11614 (DPDK vhost): csum_start of a TX header was used as an offset without a bounds check.
# pyvhost offers no checksum offload and never interprets csum_start/csum_offset: the frame passes unchanged.
HOSTILE_HDR = struct.pack("<BBHHHHH", VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 1)


@pytest.mark.parametrize("metadata", PATHS)
def test_cve_2024_11614_csum_start_out_of_bounds(serve, sock_path, errors, metadata):
    srv = serve("loopback", metadata)
    with GuardedFrontend(sock_path, queue_size=QSIZE) as fe:
        fe.setup()
        offered = U64.unpack(fe.request(R.GET_FEATURES))[0]
        assert not offered & ((1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_GUEST_CSUM))
        rx, tx = Guest(fe, 0), Guest(fe, 1)
        try:
            frame = make_frame(64).tobytes()
            rx.good(0, 1)
            rx.post(0, 1)
            for i in (0, 1):  # the hostile header, csum_start far past the frame
                off = tx.ring.bufs_off + i * 2048
                fe.ram.buf[off : off + 12] = np.frombuffer(HOSTILE_HDR, np.uint8)
                fe.ram.buf[off + 12 : off + 12 + 64] = np.frombuffer(frame, np.uint8)
                tx.desc(i, tx.ring.buf_gpa(i), FRAME_LEN)
            # the second frame's buffer ends exactly at the end of region A
            tx.desc(1, gpa(tx, A_END) - FRAME_LEN, FRAME_LEN)
            fe.ram.buf[A_END - FRAME_LEN : A_END - 64] = np.frombuffer(HOSTILE_HDR, np.uint8)
            fe.ram.buf[A_END - 64 : A_END] = np.frombuffer(frame, np.uint8)
            tx.post(0, 1)
            tx.wait_used(2)
            rx.wait_used(2)
            for i in (0, 1):
                got = bytes(fe.ram.buf[rx.ring.bufs_off + i * 2048 :][:FRAME_LEN])
                assert got == bytes(10) + b"\x01\x00" + frame  # our own header, the frame unchanged
            assert not select.select([tx.err_fd, rx.err_fd], [], [], 0)[0]  # both completed: none broke
            assert fe.guards_intact()
        finally:
            rx.close()
            tx.close()
    stats = srv.ended()[-1]
    assert stats[1]["packets"] == 2 and stats[1]["error"] == 0 and stats[0]["packets"] == 2
    assert not errors()


# =========================================================================================================
# dead loops: chains that never end, and a full ring of the longest chain (bounded work, no break)
def _whole_ring(g: Guest) -> None:
    g.post(*g.good_chains())
    g.wait_used(GOOD)
    for i in range(g.size):
        g.desc(i, g.ring.buf_gpa(i), 16, g.dir | NEXT, (i + 1) % g.size)
    g.post(5)


def _indirect_loop(g: Guest) -> None:
    gpa_t, t = g.table(2)
    g.desc(0, g.ring.buf_gpa(16), 16, g.dir | NEXT, 1, table=t)
    g.desc(1, g.ring.buf_gpa(17), 16, g.dir | NEXT, 0, table=t)
    g.desc(8, gpa_t, 32, INDIRECT)
    g.post(*g.good_chains(), 8)


def _same_head_everywhere(g: Guest) -> None:
    # one chain of every descriptor, made available QSIZE times over: QSIZE * QSIZE descriptors walked, all fine
    for i in range(g.size):
        g.desc(i, g.ring.buf_gpa(i), 2048 if g.dir else 16, g.dir | (NEXT if i < g.size - 1 else 0), i + 1)
    g.post(*([0] * g.size))


DEAD_LOOPS = {
    "descriptor chained to itself": (post_bad((8, lambda g: g.ring.buf_gpa(8), 16, NEXT, 8)), E.CHAIN_TOO_LONG, GOOD),
    "two descriptors chained to each other": (
        post_bad((8, lambda g: g.ring.buf_gpa(8), 16, NEXT, 9), (9, lambda g: g.ring.buf_gpa(9), 16, NEXT, 8)),
        E.CHAIN_TOO_LONG,
        GOOD,
    ),
    "every descriptor in one cycle": (_whole_ring, E.CHAIN_TOO_LONG, GOOD),
    "a loop inside an indirect table": (_indirect_loop, E.CHAIN_TOO_LONG, GOOD),
    "the longest chain made available QSIZE times": (_same_head_everywhere, None, QSIZE),
}


@pytest.mark.parametrize("metadata", PATHS)
@pytest.mark.parametrize("mode", ["sink", "source"])
@pytest.mark.parametrize("case", list(DEAD_LOOPS))
def test_dead_loop_chains(serve, sock_path, errors, metadata, mode, case):
    build, expect, good = DEAD_LOOPS[case]
    hostile(serve, sock_path, errors, metadata, mode, build, expect, good=good)


# =========================================================================================================
# a descriptor's length (and address) read twice: a guest thread flips them while the back-end walks
@pytest.mark.parametrize("metadata", PATHS)
@pytest.mark.parametrize("mode", ["loopback", "source"])
def test_descriptor_length_read_twice_toctou(serve, sock_path, errors, metadata, mode):
    """Half the descriptors end exactly at the end of region A; a guest thread keeps flipping their length
    (76 -> 2048 or 0xFFFFFFFF -> 76) and address (valid -> 8 bytes before the end of A -> valid) with separate
    stores while the guest makes them available as fast as the back-end completes them.  The device touches every
    payload    byte: ``source`` writes the frame into RX buffers (a write past A changes a guard byte), ``loopback``
    reads each TX frame and delivers it into an RX buffer (a read past A, or of a length other than the one
    checked, delivers guard bytes or a wrong length).  A back-end that checked one read and used another shows
    up either way; pyvhost reads each word once: every round either completes every chain it posted, each
    delivered frame exact, or breaks the queue with BAD_ADDRESS -- and nothing outside A is touched."""
    srv = serve(mode, metadata, queue_pairs=2)
    index, direction = (1, "tx") if mode == "loopback" else (0, "rx")
    frame = make_frame(64).tobytes()
    packet = bytes(12) + frame  # what every TX buffer holds: a header and the frame
    outcomes = []
    for rnd in range(8):
        with GuardedFrontend(sock_path, queue_pairs=2, queue_size=QSIZE) as fe:
            fe.setup()
            srv.assert_path(metadata)
            g = Guest(fe, index)
            rx = Guest(fe, 0) if mode == "loopback" else None
            edge = gpa(g, A_END) - FRAME_LEN
            for i in range(QSIZE):
                g.desc(i, edge if i % 2 else g.ring.buf_gpa(i), FRAME_LEN, g.dir)
                if rx is not None:
                    off = g.ring.bufs_off + i * 2048
                    fe.ram.buf[off : off + FRAME_LEN] = np.frombuffer(packet, np.uint8)
                    rx.desc(i, rx.ring.buf_gpa(i), 2048, WRITE)
            if rx is not None:
                fe.ram.buf[A_END - FRAME_LEN : A_END] = np.frombuffer(packet, np.uint8)
                rx.post(*range(QSIZE))
            stop = threading.Event()
            flips = [0]

            def flip(d=g.ring.desc) -> None:
                # each bad value is there only between two stores: a back-end that reads each word once
                # rarely meets one (and then breaks cleanly); one that reads a word again later is likely to
                # check the good value and use the bad one
                rng = np.random.default_rng(rnd)
                good_len = np.uint64(FRAME_LEN | g.dir << 32)
                bad_lens = [np.uint64(n | g.dir << 32) for n in (2048, 0xFFFFFFFF)]
                good_addr, bad_addr = np.uint64(edge), np.uint64(edge + FRAME_LEN - 8)
                while not stop.is_set():
                    for _ in range(256):
                        i = int(rng.integers(0, QSIZE // 2)) * 2 + 1
                        if rng.integers(0, 2):
                            d[2 * i + 1] = bad_lens[int(rng.integers(0, 2))]
                            d[2 * i + 1] = good_len
                        else:
                            d[2 * i] = bad_addr
                            d[2 * i] = good_addr
                    flips[0] += 256
                    time.sleep(0)

            received = [0]

            def take_rx() -> None:
                """Check each frame delivered since the last call (length and bytes), then repost its buffer."""
                n = (rx.used - received[0]) & 0xFFFF
                heads = []
                for k in range(received[0], received[0] + n):
                    slot = k % QSIZE
                    head, length = int(rx.ring.used32[1 + 2 * slot]), int(rx.ring.used32[2 + 2 * slot])
                    got = bytes(fe.ram.buf[rx.ring.bufs_off + head * 2048 :][:length])
                    assert length == FRAME_LEN and got[12:] == frame, (k, head, length, got[12:].hex())
                    heads.append(head)
                received[0] += n
                if heads:
                    rx.post(*heads)

            seen = len(broken_lines(errors, index))  # lines of earlier rounds are theirs
            t = threading.Thread(target=flip, daemon=True)
            t.start()
            posted = 0
            deadline = time.monotonic() + 0.4
            broke = False
            try:
                while time.monotonic() < deadline or posted == 0:
                    if select.select([g.err_fd], [], [], 0)[0]:
                        broke = True
                        break
                    if QSIZE - (posted - g.used) >= 16:
                        g.post(*range((posted % QSIZE), (posted % QSIZE) + 16))
                        posted += 16
                    if rx is not None:
                        take_rx()
                    time.sleep(0.0005)
            finally:
                stop.set()
                t.join()
            broke = broke or bool(select.select([g.err_fd], [], [], 0)[0])
            if not broke:  # every chain posted completes (or the queue breaks meanwhile)
                deadline = time.monotonic() + TIMEOUT
                while g.used != posted & 0xFFFF and not broke:
                    assert time.monotonic() < deadline, f"used index {g.used}, {posted} posted"
                    if rx is not None:
                        take_rx()
                    broke = bool(select.select([g.err_fd], [], [], 0.001)[0])
            lines = broken_lines(errors, index)[seen:]
            if lines and not broke:  # logged, the ERR signal follows
                broke = bool(select.select([g.err_fd], [], [], TIMEOUT)[0])
            if broke:
                assert lines and "BAD_ADDRESS" in lines[-1], lines
                assert g.used <= posted
            else:
                assert not lines and g.used == posted & 0xFFFF, lines
            assert posted > 0 and flips[0] > 0 and srv.thread.is_alive()
            assert fe.guards_intact(), "a guard byte outside the guest regions changed"
            if rx is not None:
                # every frame the back-end took from TX arrived in RX, whole and exact (length and bytes)
                take_rx()
                assert received[0] == g.used > 0, (received[0], g.used)
                rx.close()
            else:
                traffic(fe, direction, 1, 300)
            outcomes.append((broke, posted, int(g.used), flips[0]))
            g.close()
        srv.ended()
    assert len(outcomes) == 8 and all(posted > 0 and flips > 0 for _, posted, _, flips in outcomes), outcomes
    assert sum(used for _, _, used, _ in outcomes) > QSIZE, outcomes  # the race ran over many chains
    assert not [e for e in errors() if "broken" not in e]
    if mode == "source":
        fresh_connection_works(srv, sock_path, mode)


# =========================================================================================================
# libvhost-user's checks (its error messages), each a test
def _avail_jump(g: Guest) -> None:
    g.post(*g.good_chains())
    g.wait_used(GOOD)
    g.ring.avail[1] = (g.idx + QSIZE + 1) & 0xFFFF
    g.kick()


def _scribble_used_idx(g: Guest) -> None:
    g.post(*g.good_chains())
    g.wait_used(GOOD)
    g.ring.used16[1] = 0x1234  # the device's index, which only the device may write
    g.post(*g.good_chains())


def _used_idx_ignored(g: Guest) -> None:
    assert g.used == 2 * GOOD  # the device published from its own count, not from what the guest wrote


LIBVHOST_USER = {
    # libvhost-user's message: (build, error, completions before it, check)
    "Guest moved used index from %u to %u (the avail index jumped)": (_avail_jump, E.AVAIL_IDX_JUMP, GOOD, None),
    "the guest wrote the used index": (_scribble_used_idx, None, 2 * GOOD, _used_idx_ignored),
    "Guest says index %u is available": (post_bad(head=QSIZE), E.HEAD_OUT_OF_RANGE, GOOD, None),
    "Desc next is %u": (post_bad((8, lambda g: g.ring.buf_gpa(8), 16, NEXT, QSIZE)), E.NEXT_OUT_OF_RANGE, GOOD, None),
    "Looped descriptor": (
        post_bad((8, lambda g: g.ring.buf_gpa(8), 16, NEXT, 9), (9, lambda g: g.ring.buf_gpa(9), 16, NEXT, 8)),
        E.CHAIN_TOO_LONG,
        GOOD,
        None,
    ),
    "Invalid size for indirect buffer table": (
        post_bad((8, lambda g: g.ring.buf_gpa(8), 24, INDIRECT, 0), raw=True),
        E.INDIRECT_BAD_SIZE,
        GOOD,
        None,
    ),
    "Indirect buffer table too big": (
        post_bad((8, lambda g: g.ring.buf_gpa(8), 16 * 1025, INDIRECT, 0), raw=True),
        E.INDIRECT_BAD_SIZE,
        GOOD,
        None,
    ),
    "Indirect buffer with NEXT": (
        post_bad((8, lambda g: g.ring.buf_gpa(8), 32, INDIRECT | NEXT, 9), raw=True),
        E.INDIRECT_WITH_NEXT,
        GOOD,
        None,
    ),
}


@pytest.mark.parametrize("metadata", PATHS)
@pytest.mark.parametrize("case", list(LIBVHOST_USER))
def test_libvhost_user_checks(serve, sock_path, errors, metadata, case):
    build, expect, good, check = LIBVHOST_USER[case]
    hostile(serve, sock_path, errors, metadata, "sink", build, expect, good=good, check=check)


# =========================================================================================================
# fds: an err fd replaced (and its number reused) while a worker signals it
def test_err_fd_replaced_while_the_worker_signals_it(serve, sock_path, errors, monkeypatch):
    """SET_VRING_ERR closed the old err fd while a worker, which had just read its number, was about to signal
    it: the number, reused by the next fd the back-end received (here ring 0's call fd), got the ERR signal.
    The worker now signals under the connection's lock and SET_VRING_ERR swaps the fd under it."""
    signalling = threading.Event()
    real = os.eventfd_write

    def slow_write(fd, value):  # widen the window between reading vr.err_fd and writing to it
        if threading.current_thread().name.startswith("pyvhost-q"):
            signalling.set()
            time.sleep(0.3)
        return real(fd, value)

    monkeypatch.setattr(os, "eventfd_write", slow_write)
    serve("sink", "direct")
    with GuardedFrontend(sock_path, queue_size=QSIZE) as fe:
        fe.setup()
        g = Guest(fe, 1)
        new_err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call0 = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            g.post(QSIZE)  # a head out of range: the worker breaks ring 1 and signals its err fd
            assert signalling.wait(TIMEOUT)
            fe.command(R.SET_VRING_ERR, U64.pack(1), [new_err])
            fe.command(R.SET_VRING_CALL, U64.pack(0), [call0])  # takes the lowest free fd number
            assert os.eventfd_read(g.err_fd) == 1  # the ERR signal (one write) went to the err fd of its time
            with pytest.raises(BlockingIOError):
                os.eventfd_read(call0)  # and not to whatever fd got its number next
        finally:
            g.close()
            os.close(new_err)
            os.close(call0)
    assert not [e for e in errors() if "signalling the err fd failed" in e]


# =========================================================================================================
# the front-end's memory file: sealing noted (truncation survived: tests/test_sigbus.py)
def test_unsealed_memfd_is_warned_about_sealed_is_not(serve, sock_path, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="pyvhost")
    serve("sink", "direct")
    text = "not sealed against shrinking"
    with Frontend(sock_path, queue_size=QSIZE, ram_size=4 * MiB, seal_memory=False) as fe:  # unsealed
        fe.setup()
        traffic(fe, "tx", 0, 100)
    assert sum(text in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    with Frontend(sock_path, queue_size=QSIZE, ram_size=4 * MiB) as fe:  # pyvhost's front-end seals by default
        with pytest.raises(PermissionError):
            os.ftruncate(fe.ram.fd, 0)  # sealed: the front-end cannot shrink it any more
        fe.setup()
        traffic(fe, "tx", 0, 100)
    assert not any(text in r.getMessage() for r in caplog.records)

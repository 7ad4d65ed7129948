"""The vhost-user wire format (unit tests of protocol.py) and the back-end's answer to bad messages.

Every bad message must get a logged error and, with REPLY_ACK negotiated and NEED_REPLY set, a non-zero ack
(a GET_* gets a reply of the right shape instead); it must leave no fd behind; the connection goes on where
the message was merely wrong and is dropped where the stream itself is unusable; and the server then still
serves a fresh, well-behaved front-end with exact packet counts.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import tempfile

import pytest

from pyvhost import protocol as P
from pyvhost.devices.base import VIRTIO_F_VERSION_1
from pyvhost.frontend.net import Frontend
from pyvhost.frontend.split import D_DONE
from pyvhost.protocol import MEM_REGION, MEM_TABLE_HDR, U64, VRING_ADDR, VRING_STATE, MemRegion
from pyvhost.protocol import ProtocolFeature as PF
from pyvhost.protocol import Request as R

try:
    from .conftest import open_fds
except ImportError:  # tests/ not a package
    from conftest import open_fds

RAM = 8 << 20
EFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC
NEED_REPLY = P.VHOST_USER_VERSION | P.VHOST_USER_NEED_REPLY_MASK


# =========================================================================================================
# unit tests of protocol.py, over a socketpair
@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def pipe_fds(n: int) -> list[int]:
    """``n`` fds (pipe ends) to send as ancillary data; the caller closes them."""
    fds: list[int] = []
    while len(fds) < n:
        fds.extend(os.pipe())
    for fd in fds[n:]:
        os.close(fd)
    return fds[:n]


def close_all(fds) -> None:
    for fd in fds:
        os.close(fd)


def test_pack_message_layout():
    data = P.pack_message(R.SET_VRING_NUM, VRING_STATE.pack(1, 256))
    assert len(data) == P.HEADER_SIZE + 8
    assert P.HEADER.unpack_from(data) == (R.SET_VRING_NUM, P.VHOST_USER_VERSION, 8)
    assert P.pack_message(R.GET_FEATURES) == struct.pack("<III", 1, 1, 0)


@pytest.mark.parametrize(
    "request_id,payload",
    [
        (R.GET_FEATURES, b""),
        (R.SET_FEATURES, U64.pack((1 << 32) | (1 << 30))),
        (R.SET_VRING_ADDR, VRING_ADDR.pack(1, 0, 0x1000, 0x3000, 0x2000, 0)),
        (R.SET_CONFIG, P.CONFIG_HDR.pack(0, 6, 0) + bytes(range(6))),
        (99, b"\x01\x02\x03"),
        (R.SET_OWNER, bytes(P.MAX_PAYLOAD)),
    ],
)
def test_round_trip(pair, request_id, payload):
    a, b = pair
    P.send_message(a, request_id, payload, flags=NEED_REPLY)
    msg = P.recv_message(b)
    assert (msg.request, msg.flags, msg.payload, msg.fds) == (request_id, NEED_REPLY, payload, [])
    assert msg.need_reply


def test_round_trip_with_fds(pair):
    a, b = pair
    efd = os.eventfd(0, EFD_FLAGS)
    try:
        P.send_message(a, R.SET_VRING_KICK, U64.pack(1), [efd])
        msg = P.recv_message(b)
        assert msg.request == R.SET_VRING_KICK and len(msg.fds) == 1 and msg.fds[0] != efd
        os.eventfd_write(efd, 7)  # the received fd is the same eventfd
        assert os.eventfd_read(msg.fds[0]) == 7
        fd = msg.take_fd(0)
        assert msg.fds == [-1]
        msg.close_fds()  # nothing left to close: the taken fd stays open
        os.fstat(fd)
        os.close(fd)
    finally:
        os.close(efd)


def test_reply_round_trip(pair):
    a, b = pair
    P.send_reply(a, R.GET_FEATURES, U64.pack(1 << 32))
    msg = P.recv_reply(b, R.GET_FEATURES)
    assert U64.unpack(msg.payload)[0] == 1 << 32
    assert msg.flags & P.VHOST_USER_REPLY_MASK


def test_recv_reply_rejects_the_wrong_reply_and_closes_its_fds(pair):
    a, b = pair
    P.send_reply(a, R.GET_STATUS, U64.pack(0))
    with pytest.raises(P.ProtocolError, match="expected reply to GET_FEATURES"):
        P.recv_reply(b, R.GET_FEATURES)
    P.send_message(a, R.GET_FEATURES, U64.pack(0))  # the right id but not flagged as a reply
    with pytest.raises(P.ProtocolError):
        P.recv_reply(b, R.GET_FEATURES)
    fds = pipe_fds(2)
    before = open_fds()
    socket.send_fds(a, [P.pack_message(R.GET_STATUS, U64.pack(0), P.VHOST_USER_VERSION | P.VHOST_USER_REPLY_MASK)], fds)
    with pytest.raises(P.ProtocolError):
        P.recv_reply(b, R.GET_FEATURES)
    assert open_fds() == before
    close_all(fds)


def test_typed_payload_views():
    regions = [MemRegion(0x4000_0000, 1 << 20, 0x7F00_0000_0000, 0), MemRegion(0, 4096, 0x1000, 8192)]
    msg = P.Message(R.SET_MEM_TABLE, 1, MEM_TABLE_HDR.pack(2, 0) + b"".join(r.pack() for r in regions), [10, 11])
    assert msg.mem_table() == regions
    assert P.Message(R.SET_FEATURES, 1, U64.pack(2**64 - 1)).u64() == 2**64 - 1
    assert P.Message(R.SET_VRING_NUM, 1, VRING_STATE.pack(3, 1024)).vring_state() == (3, 1024)
    addr = P.Message(R.SET_VRING_ADDR, 1, VRING_ADDR.pack(1, 0, 16, 32, 48, 64)).vring_addr()
    assert (addr.index, addr.desc, addr.used, addr.avail, addr.log) == (1, 16, 32, 48, 64)
    single = P.Message(R.ADD_MEM_REG, 1, P.SINGLE_REGION_HDR.pack(0) + regions[0].pack())
    assert single.single_region() == regions[0]
    cfg = P.Message(R.SET_CONFIG, 1, P.CONFIG_HDR.pack(4, 2, 0) + b"\xaa\xbb")
    assert cfg.config() == (4, 2, 0, b"\xaa\xbb")
    assert P.Message(99, 1, b"").name == "UNKNOWN(99)"
    assert P.Message(R.SET_OWNER, 1, b"").name == "SET_OWNER"


@pytest.mark.parametrize(
    "view,payload",
    [
        ("u64", b"\x00" * 7),
        ("vring_state", b"\x00" * 7),
        ("vring_addr", b"\x00" * (VRING_ADDR.size - 1)),
        ("mem_table", b"\x00" * 7),
        ("mem_table", MEM_TABLE_HDR.pack(2, 0) + bytes(MEM_REGION.size)),  # 2 regions announced, 1 present
        ("mem_table", MEM_TABLE_HDR.pack(9, 0) + bytes(9 * MEM_REGION.size)),  # over the baseline of 8
        ("single_region", bytes(P.SINGLE_REGION_HDR.size + MEM_REGION.size - 1)),
        ("config", bytes(11)),
        ("config", P.CONFIG_HDR.pack(0, 257, 0) + bytes(257)),
        ("config", P.CONFIG_HDR.pack(257, 0, 0)),
    ],
)
def test_typed_views_reject_short_or_oversized_payloads(view, payload):
    with pytest.raises(P.ProtocolError):
        getattr(P.Message(R.SET_MEM_TABLE, 1, payload), view)()


@pytest.mark.parametrize("nregions,nfds", [(1, 0), (1, 2), (2, 1), (0, 1)])
def test_mem_table_fd_count_must_match(nregions, nfds):
    payload = MEM_TABLE_HDR.pack(nregions, 0) + bytes(nregions * MEM_REGION.size)
    with pytest.raises(P.ProtocolError, match="regions but"):
        P.Message(R.SET_MEM_TABLE, 1, payload, list(range(100, 100 + nfds))).mem_table()


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x2 | P.VHOST_USER_NEED_REPLY_MASK])
def test_bad_version_bits_rejected_fds_closed_stream_kept(pair, flags):
    a, b = pair
    fds = pipe_fds(3)
    before = open_fds()
    socket.send_fds(a, [P.pack_message(R.SET_FEATURES, U64.pack(0), flags)], fds)
    with pytest.raises(P.ProtocolError, match="unsupported version"):
        P.recv_message(b)
    assert open_fds() == before
    # the whole payload was consumed: the next message parses
    P.send_message(a, R.GET_FEATURES)
    assert P.recv_message(b).request == R.GET_FEATURES
    close_all(fds)


@pytest.mark.parametrize("size", [P.MAX_PAYLOAD + 1, 1 << 20, 0xFFFFFFFF])
def test_payload_over_max_closes_the_connection(pair, size):
    a, b = pair
    fds = pipe_fds(2)
    before = open_fds()
    socket.send_fds(a, [P.HEADER.pack(R.SET_FEATURES, 1, size) + bytes(64)], fds)
    with pytest.raises(P.ConnectionClosed, match=f"payload size {size} over 4096"):
        P.recv_message(b)  # raised before reading (or allocating) the payload
    assert open_fds() == before
    close_all(fds)


def test_payload_of_exactly_max_is_accepted(pair):
    a, b = pair
    P.send_message(a, R.SET_OWNER, bytes(P.MAX_PAYLOAD))
    assert len(P.recv_message(b).payload) == P.MAX_PAYLOAD


@pytest.mark.parametrize("request_id", sorted(P._MIN_PAYLOAD), ids=lambda r: R(r).name)
def test_too_short_payload_rejected_and_fds_closed(pair, request_id):
    a, b = pair
    need = P._MIN_PAYLOAD[request_id]
    fds = pipe_fds(1)
    before = open_fds()
    for short in sorted({0, need // 2, need - 1}):
        socket.send_fds(a, [P.pack_message(request_id, bytes(short))], fds)
        with pytest.raises(P.ProtocolError, match=f"{R(request_id).name}: payload of {short} bytes"):
            P.recv_message(b)
        assert open_fds() == before
    P.send_message(a, request_id, bytes(need))  # exactly the minimum is accepted
    msg = P.recv_message(b)
    assert msg.request == request_id and len(msg.payload) == need
    close_all(fds)


def test_more_than_max_fds_rejected_and_all_closed(pair):
    a, b = pair
    fds = pipe_fds(P.MAX_FDS + 1)
    before = open_fds()
    payload = MEM_TABLE_HDR.pack(1, 0) + bytes(MEM_REGION.size)
    data = P.HEADER.pack(R.SET_MEM_TABLE, 1, len(payload))
    socket.send_fds(a, [data], fds[: P.MAX_FDS])  # the header carries 8 fds...
    socket.send_fds(a, [payload], fds[P.MAX_FDS :])  # ...and the payload one more
    with pytest.raises(P.ProtocolError, match="at most 8"):
        P.recv_message(b)
    assert open_fds() == before
    close_all(fds)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("extra", [1, 4, 32])
def test_truncated_fd_list_refused_and_all_closed(pair, extra):
    """More fds in one sendmsg than the receiver's ancillary buffer holds: the kernel truncates the list
    (MSG_CTRUNC).  The message is refused as a whole, every fd that did arrive is closed, and the stream stays
    in step (the next message parses)."""
    a, b = pair
    fds = pipe_fds(P.MAX_FDS + extra)
    before = fd_count()
    payload = MEM_TABLE_HDR.pack(1, 0) + bytes(MEM_REGION.size)
    socket.send_fds(a, [P.pack_message(R.SET_MEM_TABLE, payload)], fds)
    with pytest.raises(P.ProtocolError, match="fd list truncated") as e:
        P.recv_message(b)
    assert e.value.message is not None and e.value.message.request == R.SET_MEM_TABLE
    assert all(fd == -1 for fd in e.value.message.fds)
    assert fd_count() == before
    P.send_message(a, R.GET_FEATURES)
    assert P.recv_message(b).request == R.GET_FEATURES
    close_all(fds)


def test_received_fds_are_close_on_exec(pair):
    a, b = pair
    r, w = os.pipe2(0)  # sent without O_CLOEXEC: the receiver must set it
    try:
        P.send_message(a, R.SET_VRING_KICK, U64.pack(0), [r, w])
        msg = P.recv_message(b)
        assert len(msg.fds) == 2
        assert all(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC for fd in msg.fds)
        msg.close_fds()
    finally:
        close_all([r, w])


@pytest.mark.parametrize("sent", ["nothing", "half a header", "a header", "header and half the payload"])
def test_peer_closing_mid_message(pair, sent):
    a, b = pair
    fds = pipe_fds(2)
    before = open_fds()
    whole = P.pack_message(R.SET_VRING_ADDR, VRING_ADDR.pack(0, 0, 0, 0, 0, 0))
    part = {
        "nothing": b"",
        "half a header": whole[:6],
        "a header": whole[: P.HEADER_SIZE],
        "header and half the payload": whole[: P.HEADER_SIZE + 20],
    }[sent]
    if part:
        socket.send_fds(a, [part], fds)
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(P.ConnectionClosed):
        P.recv_message(b)
    assert open_fds() == before
    close_all(fds)


# =========================================================================================================
# against a running server
def connect(sock_path: str) -> Frontend:
    """A front-end that has negotiated features, with REPLY_ACK."""
    fe = Frontend(sock_path, ram_size=RAM)
    fe.sock.settimeout(10)
    fe.negotiate()
    assert fe.protocol_features & (1 << PF.REPLY_ACK)
    return fe


def ack(fe: Frontend, request_id: int, payload: bytes = b"", fds: list[int] | None = None) -> int:
    """Send with NEED_REPLY; return the back-end's status (0 = success)."""
    P.send_message(fe.sock, request_id, payload, fds, flags=NEED_REPLY)
    reply = P.recv_reply(fe.sock, request_id)
    assert len(reply.payload) == 8 and not reply.fds
    return U64.unpack(reply.payload)[0]


_failed = [0]  # requests fails() has seen refused in the current test


def fails(fe: Frontend, request_id: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
    assert ack(fe, request_id, payload, fds) != 0
    _failed[0] += 1


def passes_traffic(fe: Frontend, count: int = 1000, drain: bool = True) -> None:
    """``count`` more TX completions; with ``drain``, stop the ring and check the exact total."""
    target = int(fe.rings[1].d[D_DONE]) + count
    fe.run("tx", count=count, timeout=10)  # count more completions, from this call on
    assert int(fe.rings[1].d[D_DONE]) == target
    if drain:
        assert fe.drain("tx")["packets"] == target


def fresh_connection_works(srv, sock_path: str, count: int = 1000) -> None:
    srv.ended()
    with Frontend(sock_path, ram_size=RAM) as fe:
        fe.setup()
        passes_traffic(fe, count)
    stats = srv.ended()[-1]
    assert stats[1]["packets"] == count and stats[1]["error"] == 0 and stats[1]["drops"] == 0


def baseline_fds(srv, sock_path: str) -> set[str]:
    """The process's open fds once the server is serving (its selector exists), with no connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock_path)
        P.send_message(s, R.GET_QUEUE_NUM)
        P.recv_reply(s, R.GET_QUEUE_NUM)
    srv.ended()
    return open_fds()


def mem_table(*regions: MemRegion) -> bytes:
    return MEM_TABLE_HDR.pack(len(regions), 0) + b"".join(r.pack() for r in regions)


def single(region: MemRegion) -> bytes:
    return P.SINGLE_REGION_HDR.pack(0) + region.pack()


class Fds:
    """fds a case sends (closed after the case)."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def add(self, *fds: int) -> list[int]:
        self.fds.extend(fds)
        return list(fds)

    def pipe(self) -> list[int]:
        r, w = os.pipe()
        self.add(w)
        return self.add(r)

    def socket(self) -> list[int]:
        s1, s2 = socket.socketpair()
        self.add(s2.detach())
        return self.add(s1.detach())

    def eventfd(self) -> list[int]:
        return self.add(os.eventfd(0, EFD_FLAGS))

    def dup(self, fd: int) -> list[int]:
        return self.add(os.dup(fd))

    def readonly_file(self, size: int) -> list[int]:
        with tempfile.TemporaryFile() as f:
            f.truncate(size)
            fd = os.open(f"/proc/self/fd/{f.fileno()}", os.O_RDONLY)
        return self.add(fd)

    def close(self) -> None:
        close_all(self.fds)


# Each case: (needs the rings set up first, function(fe, fds) sending the bad message(s), expected log text).
# The function asserts the non-zero ack itself (or the right reply shape for a GET_*).
def _unknown(fe, f):
    for rid in (0, 99, 0xFFFF, 0xFFFFFFFF, R.SET_LOG_BASE, R.IOTLB_MSG, R.POSTCOPY_ADVISE):
        fails(fe, rid, bytes(8), f.eventfd() if rid == 99 else None)


def _region(fe, **kw):
    r = fe.ram.region()
    return MemRegion(
        kw.get("gpa", r.guest_phys_addr),
        kw.get("size", r.memory_size),
        kw.get("uva", r.userspace_addr),
        kw.get("off", r.mmap_offset),
    )


def _mem_fd_kind(kind):
    def case(fe, f):
        fails(
            fe,
            R.SET_MEM_TABLE,
            mem_table(fe.ram.region()),
            getattr(f, kind)() if kind != "readonly_file" else f.readonly_file(RAM),
        )

    return case


def _mem_too_big(fe, f):
    fails(fe, R.SET_MEM_TABLE, mem_table(_region(fe, size=2 * RAM)), f.dup(fe.ram.fd))
    fails(fe, R.SET_MEM_TABLE, mem_table(_region(fe, size=RAM // 2, off=RAM // 2 + 4096)), f.dup(fe.ram.fd))


def _mem_overlap(fe, f):
    half = RAM // 2
    a = _region(fe, size=half)
    both = _region(
        fe, gpa=a.guest_phys_addr + half - 4096, uva=a.userspace_addr + half - 4096, size=half, off=half - 4096
    )
    gpa_only = _region(fe, gpa=a.guest_phys_addr + 4096, uva=a.userspace_addr + half, size=half, off=half)
    uva_only = _region(fe, gpa=a.guest_phys_addr + 2 * RAM, uva=a.userspace_addr, size=half, off=half)
    for b in (both, gpa_only, uva_only, a):
        fails(fe, R.SET_MEM_TABLE, mem_table(a, b), f.dup(fe.ram.fd) + f.dup(fe.ram.fd))


def _mem_too_many(fe, f):
    regions = [
        _region(fe, gpa=fe.ram.gpa_base + i * 4096, uva=fe.ram.uva_base + i * 4096, size=4096, off=i * 4096)
        for i in range(9)
    ]
    fails(fe, R.SET_MEM_TABLE, mem_table(*regions), f.dup(fe.ram.fd))
    fails(fe, R.SET_MEM_TABLE, mem_table(*regions), [f.dup(fe.ram.fd)[0] for _ in range(8)])


def _mem_fd_count(fe, f):
    r = fe.ram.region()
    fails(fe, R.SET_MEM_TABLE, mem_table(r))
    fails(fe, R.SET_MEM_TABLE, mem_table(r), f.dup(fe.ram.fd) + f.dup(fe.ram.fd))
    half = _region(fe, size=RAM // 2)
    other = _region(fe, gpa=r.guest_phys_addr + RAM, uva=r.userspace_addr + RAM, size=RAM // 2, off=RAM // 2)
    fails(fe, R.SET_MEM_TABLE, mem_table(half, other), f.dup(fe.ram.fd))


def _mem_high(fe, f):
    for kw in (
        {"gpa": P.ADDR_LIMIT},
        {"uva": P.ADDR_LIMIT},
        {"size": P.ADDR_LIMIT},
        {"off": P.ADDR_LIMIT},
        {"gpa": 2**64 - 4096},
        {"uva": 2**64 - 4096},
        {"size": 2**64 - 1},
        {"off": 2**64 - 4096},
        {"size": 0},
    ):
        fails(fe, R.SET_MEM_TABLE, mem_table(_region(fe, **kw)), f.dup(fe.ram.fd))


def _add_no_fd(fe, f):
    fails(fe, R.ADD_MEM_REG, single(fe.ram.region()))
    fails(fe, R.ADD_MEM_REG, single(fe.ram.region()), f.dup(fe.ram.fd) + f.dup(fe.ram.fd))


def _add_overlap(fe, f):  # on a running device: the table stays and so does the traffic
    # (the very same region again is one more holder, as QEMU 7.2 sends it once per queue pair: test_multiqueue)
    fails(fe, R.ADD_MEM_REG, single(_region(fe, size=RAM // 2)), f.dup(fe.ram.fd))
    fails(fe, R.ADD_MEM_REG, single(_region(fe, gpa=fe.ram.gpa_base + RAM)), f.pipe())


def _rem_unknown(fe, f):
    fails(fe, R.REM_MEM_REG, single(_region(fe, gpa=fe.ram.gpa_base + RAM)))
    fails(fe, R.REM_MEM_REG, single(_region(fe, size=RAM // 2)))


def _mem_table_running(fe, f):
    fails(fe, R.SET_MEM_TABLE, mem_table(fe.ram.region()), f.pipe())
    fails(fe, R.SET_MEM_TABLE, mem_table(_region(fe, size=2 * RAM)), f.dup(fe.ram.fd))


def _vring_num(fe, f):
    for num in (0, 3, 100, 65536, 2**32 - 1):
        fails(fe, R.SET_VRING_NUM, VRING_STATE.pack(0, num))


def _vring_num_running(fe, f):
    fails(fe, R.SET_VRING_NUM, VRING_STATE.pack(1, 128))
    fails(fe, R.SET_VRING_BASE, VRING_STATE.pack(1, 5))


def _index_out_of_range(fe, f):
    for index in (2, 255, 2**32 - 1):
        fails(fe, R.SET_VRING_NUM, VRING_STATE.pack(index, 256))
        fails(fe, R.SET_VRING_BASE, VRING_STATE.pack(index, 0))
        fails(fe, R.SET_VRING_ADDR, VRING_ADDR.pack(index, 0, 0x1000, 0x2000, 0x3000, 0))
        fails(fe, R.SET_VRING_ENABLE, VRING_STATE.pack(index, 1))
        reply = fe.request(R.GET_VRING_BASE, VRING_STATE.pack(index, 0))
        assert len(reply) == VRING_STATE.size
    for index in (2, 0xFF):
        for rid in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
            fails(fe, rid, U64.pack(index), f.eventfd())
            fails(fe, rid, U64.pack(index | P.VHOST_USER_VRING_NOFD_MASK))


def _addr_misaligned(fe, f):
    good = fe.rings[1].addr() if fe.rings else P.VringAddr(1, 0, 0x10000, 0x20000, 0x30000, 0)
    for desc, used, avail in (
        (good.desc + 8, good.used, good.avail),
        (good.desc, good.used + 2, good.avail),
        (good.desc, good.used, good.avail + 1),
        (good.desc + 1, good.used + 1, good.avail + 1),
    ):
        fails(fe, R.SET_VRING_ADDR, VRING_ADDR.pack(1, 0, desc, used, avail, 0))


def _addr_high(fe, f):
    good = fe.rings[1].addr()
    for bad in (P.ADDR_LIMIT, 1 << 63, 2**64 - 16):
        for desc, used, avail in (
            (bad, good.used, good.avail),
            (good.desc, bad, good.avail),
            (good.desc, good.used, bad),
        ):
            fails(fe, R.SET_VRING_ADDR, VRING_ADDR.pack(1, 0, desc, used, avail, 0))


def _base_too_big(fe, f):
    for base in (0x10000, 0xFFFFFFFF):
        fails(fe, R.SET_VRING_BASE, VRING_STATE.pack(0, base))


def _features_not_offered(fe, f):
    offered = U64.unpack(fe.request(R.GET_FEATURES))[0]
    fails(fe, R.SET_FEATURES, U64.pack(fe.features | (1 << 63)))
    fails(fe, R.SET_FEATURES, U64.pack(~offered & (2**64 - 1)))
    fails(fe, R.SET_PROTOCOL_FEATURES, U64.pack(fe.protocol_features | (1 << PF.PAGEFAULT)))


def _enable_value(fe, f):
    fails(fe, R.SET_VRING_ENABLE, VRING_STATE.pack(0, 2))


def _fd_flag_mismatch(fe, f):
    for rid in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
        fails(fe, rid, U64.pack(0 | P.VHOST_USER_VRING_NOFD_MASK), f.eventfd())
        fails(fe, rid, U64.pack(0))
        fails(fe, rid, U64.pack(0), f.eventfd() + f.eventfd())


def _vring_fd_kind(fe, f):
    for rid in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
        for fds in (f.pipe(), f.socket(), f.readonly_file(4096)):
            fails(fe, rid, U64.pack(1), fds)


def _get_config_out_of_range(fe, f):
    for offset, size in ((0, 64), (10, 4), (256, 0), (0, 257), (1 << 20, 1)):
        payload = P.CONFIG_HDR.pack(offset, size, 0) + bytes(min(size, 256))
        P.send_message(fe.sock, R.GET_CONFIG, payload, flags=NEED_REPLY)
        reply = P.recv_reply(fe.sock, R.GET_CONFIG)  # the reply still comes, as long as the request
        assert len(reply.payload) == len(payload)
    # and a valid one still works
    reply = fe.request(R.GET_CONFIG, P.CONFIG_HDR.pack(0, 6, 0) + bytes(6))
    assert reply[P.CONFIG_HDR.size :] == bytes.fromhex("020000000002")


CASES = {
    "unknown request": (False, _unknown, "unsupported request"),
    "mem table: pipe fd": (False, _mem_fd_kind("pipe"), "not a regular file"),
    "mem table: socket fd": (False, _mem_fd_kind("socket"), "not a regular file"),
    "mem table: eventfd": (False, _mem_fd_kind("eventfd"), "not a regular file"),
    "mem table: read-only file": (False, _mem_fd_kind("readonly_file"), "mmap of fd"),
    "mem table: region larger than its file": (False, _mem_too_big, "the region needs"),
    "mem table: overlapping regions": (False, _mem_overlap, "regions overlap"),
    "mem table: more than 8 regions": (False, _mem_too_many, "at most 8"),
    "mem table: fd count != nregions": (False, _mem_fd_count, "regions but"),
    "mem table: address >= 2**62": (False, _mem_high, "out of range"),
    "mem table: bad one on a running device": (True, _mem_table_running, "SET_MEM_TABLE failed"),
    "ADD_MEM_REG without fd": (False, _add_no_fd, "ADD_MEM_REG with 0 fds"),
    "ADD_MEM_REG overlapping, running": (True, _add_overlap, "regions overlap"),
    "REM_MEM_REG unknown region": (True, _rem_unknown, "REM_MEM_REG: no region"),
    "SET_VRING_NUM bad size": (False, _vring_num, "not a power of two"),
    "SET_VRING_NUM/BASE on a running ring": (True, _vring_num_running, "on running vring 1"),
    "vring index out of range": (False, _index_out_of_range, "out of range (device has 2 queues)"),
    "vring index out of range, running": (True, _index_out_of_range, "out of range (device has 2 queues)"),
    "SET_VRING_ADDR misaligned": (False, _addr_misaligned, "aligned"),
    "SET_VRING_ADDR misaligned, running": (True, _addr_misaligned, "aligned"),
    "SET_VRING_ADDR address >= 2**62, running": (True, _addr_high, "out of range"),
    "SET_VRING_BASE over 0xffff": (False, _base_too_big, "bits above 15"),
    "SET_FEATURES not offered": (False, _features_not_offered, "features not offered"),
    "SET_VRING_ENABLE value 2": (False, _enable_value, "is not 0 or 1"),
    "KICK/CALL/ERR fd and NOFD flag disagree": (False, _fd_flag_mismatch, "NOFD flag set but 1 fds sent"),
    "GET_CONFIG out of range": (False, _get_config_out_of_range, "GET_CONFIG"),
    "KICK/CALL/ERR fd not an eventfd, running": (True, _vring_fd_kind, "not an eventfd"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_fails_cleanly(serve, sock_path, errors, case):
    setup_first, send, expect = CASES[case]
    srv = serve("sink", "direct")
    fds_before = baseline_fds(srv, sock_path)
    fds = Fds()
    fe = connect(sock_path)
    try:
        if setup_first:
            fe.setup()
            passes_traffic(fe, 500, drain=False)
        n_errors = len(errors())
        _failed[0] = 0
        send(fe, fds)
        new = errors()[n_errors:]
        assert len(new) >= max(_failed[0], 1), new  # one error logged per refused request
        assert any(expect in line for line in new), new
        # the connection goes on: it can (still) set up and pass traffic
        if not setup_first:
            fe.setup()
        passes_traffic(fe)
    finally:
        fe.close()
        fds.close()
    fresh_connection_works(srv, sock_path)
    assert srv.thread.is_alive()
    assert open_fds() == fds_before, "fds leaked"


def test_reset_owner_then_set_up_again(serve, sock_path, errors):
    """RESET_OWNER tears the device down; the same connection can set it up again (as QEMU does)."""
    srv = serve("sink", "direct")
    with connect(sock_path) as fe:
        fe.setup()
        passes_traffic(fe, 500)
        P.send_message(fe.sock, R.RESET_OWNER, flags=NEED_REPLY)
        assert U64.unpack(P.recv_reply(fe.sock, R.RESET_OWNER).payload)[0] == 0
        for ring in fe.rings:
            ring.close()
        fe.rings = []
        fe.setup()
        passes_traffic(fe)
    assert not errors()
    fresh_connection_works(srv, sock_path)


@pytest.mark.parametrize("metadata", ["direct", "copy"])
def test_get_vring_base_with_bad_index_keeps_the_stream_in_sync(serve, sock_path, errors, metadata):
    srv = serve("sink", metadata)
    with connect(sock_path) as fe:
        fe.setup()
        reply = fe.request(R.GET_VRING_BASE, VRING_STATE.pack(7, 0))
        assert len(reply) == 8
        assert U64.unpack(fe.request(R.GET_QUEUE_NUM))[0] == 2  # the next reply is the next request's
        assert any("GET_VRING_BASE failed" in e for e in errors())
        passes_traffic(fe)
    fresh_connection_works(srv, sock_path)


# -- messages the stream layer refuses ----------------------------------------------------------------------
def test_bad_version_and_short_payload_are_refused_connection_kept(serve, sock_path, errors):
    srv = serve("sink", "direct")
    fds_before = baseline_fds(srv, sock_path)
    fds = Fds()
    with connect(sock_path) as fe:
        for flags in (0, 2, 3):
            socket.send_fds(fe.sock, [P.pack_message(R.SET_VRING_NUM, VRING_STATE.pack(0, 3), flags)], fds.eventfd())
        socket.send_fds(fe.sock, [P.pack_message(R.SET_VRING_KICK, b"\x00" * 4)], fds.eventfd())
        P.send_message(fe.sock, R.SET_MEM_TABLE, b"")
        # none of those asked for a reply: the next reply is GET_FEATURES's
        assert U64.unpack(fe.request(R.GET_FEATURES))[0] & (1 << VIRTIO_F_VERSION_1)
        bad = [e for e in errors() if e.startswith("bad message")]
        assert len(bad) == 5 and sum("unsupported version" in e for e in bad) == 3
        fe.setup()
        passes_traffic(fe)
    fds.close()
    fresh_connection_works(srv, sock_path)
    assert open_fds() == fds_before


def _dropped(s: socket.socket) -> bool:
    s.settimeout(10)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("metadata", ["direct", "copy"])
def test_truncated_fd_list_is_refused_connection_kept(serve, sock_path, errors, metadata):
    """A SET_MEM_TABLE with more fds than the server's ancillary buffer holds: refused with a failure ack and a
    logged error, no fd of it kept (the process's fd count comes back), the connection goes on."""
    srv = serve("sink", metadata)
    fds_before = baseline_fds(srv, sock_path)
    fe = connect(sock_path)
    sent = pipe_fds(P.MAX_FDS + 8)
    try:
        payload = mem_table(fe.ram.region())
        socket.send_fds(fe.sock, [P.pack_message(R.SET_MEM_TABLE, payload, NEED_REPLY)], sent)
        assert U64.unpack(P.recv_reply(fe.sock, R.SET_MEM_TABLE).payload)[0] != 0
        assert any("SET_MEM_TABLE: fd list truncated" in e for e in errors()), errors()
        close_all(sent)
        sent = []
        conn = srv.connection
        assert conn is not None and conn.mem.nregions == 0  # nothing of the refused table was used
        fe.setup()
        passes_traffic(fe)
    finally:
        fe.close()
        close_all(sent)
    fresh_connection_works(srv, sock_path)
    assert open_fds() == fds_before, "fds leaked"


@pytest.mark.parametrize("garbage", ["0xff bytes", "random bytes", "oversized payload"])
def test_garbage_drops_the_connection(serve, sock_path, caplog, garbage):
    caplog.set_level(logging.INFO, logger="pyvhost")
    srv = serve("sink", "direct")
    fds_before = baseline_fds(srv, sock_path)
    fds = Fds()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    if garbage == "0xff bytes":
        s.sendall(b"\xff" * 64)
    elif garbage == "random bytes":
        # a header whose size field is below MAX_PAYLOAD: the server waits for the payload, then sees EOF
        data = P.HEADER.pack(0x1234, 0x55, 3000) + bytes((i * 37 + 11) & 0xFF for i in range(1000))
        socket.send_fds(s, [data], fds.pipe())
        s.shutdown(socket.SHUT_WR)
    else:
        socket.send_fds(s, [P.HEADER.pack(R.SET_MEM_TABLE, 1, P.MAX_PAYLOAD + 1) + bytes(100)], fds.eventfd())
    assert _dropped(s)
    s.close()
    srv.ended()
    assert any("disconnected" in r.getMessage() for r in caplog.records)
    fds.close()
    fresh_connection_works(srv, sock_path)
    assert open_fds() == fds_before


@pytest.mark.parametrize("cut", [3, P.HEADER_SIZE, P.HEADER_SIZE + 9])
def test_close_mid_message(serve, sock_path, cut):
    srv = serve("sink", "direct")
    fds_before = baseline_fds(srv, sock_path)
    fds = Fds()
    fe = connect(sock_path)
    fe.setup()
    passes_traffic(fe, 200)
    whole = P.pack_message(R.SET_MEM_TABLE, mem_table(fe.ram.region()), NEED_REPLY)
    socket.send_fds(fe.sock, [whole[:cut]], fds.dup(fe.ram.fd))
    fe.close(stop_rings=False)  # gone, with the rings running and a message half sent
    fds.close()
    srv.ended()
    fresh_connection_works(srv, sock_path)
    assert open_fds() == fds_before


# =========================================================================================================
# messages rejected before they reach a handler still get what they are owed; a stalled peer is dropped
@pytest.mark.parametrize("request_id", [R.SET_VRING_NUM, R.SET_FEATURES, R.SET_VRING_ADDR])
def test_short_payload_with_need_reply_gets_a_failure_ack(serve, sock_path, errors, request_id):
    srv = serve("sink")
    fe = connect(sock_path)
    try:
        fails(fe, request_id, b"\x00\x00")  # too short: rejected by the parser, before any handler
        assert any("expected at least" in e for e in errors())
    finally:
        fe.close(stop_rings=False)
    fresh_connection_works(srv, sock_path)


def test_short_get_request_still_gets_a_reply_of_the_right_shape(serve, sock_path):
    serve("sink")
    fe = connect(sock_path)
    try:
        P.send_message(fe.sock, R.GET_VRING_BASE, b"\x00")  # 1 byte where 8 are due
        reply = P.recv_reply(fe.sock, R.GET_VRING_BASE)
        assert len(reply.payload) == VRING_STATE.size
    finally:
        fe.close(stop_rings=False)


def test_peer_stalling_inside_a_message_is_dropped(serve, sock_path, errors, monkeypatch):
    from pyvhost import backend

    monkeypatch.setattr(backend, "MESSAGE_TIMEOUT", 0.3)
    srv = serve("sink")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        s.sendall(P.HEADER.pack(R.SET_FEATURES, P.VHOST_USER_VERSION, 8) + b"\x01\x02")  # 6 bytes never come
        s.settimeout(5)
        assert s.recv(1) == b""  # the back-end gave up on us and closed the connection
    assert any("socket error" in e for e in errors())
    fresh_connection_works(srv, sock_path)

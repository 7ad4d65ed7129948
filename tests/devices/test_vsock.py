"""virtio-vsock through pyvhost's front-end and a small driver of its three rings: connections both ways byte for
byte with credit flow control, SHUTDOWN/RST, a host peer that stops reading, malformed packets, TRANSPORT_RESET."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest

from pyvhost.devices.vsock import BUF_ALLOC, VsockDevice
from pyvhost.devices.vsock_packet import (
    EVENT,
    HDR_LEN,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_BOTH,
    VIRTIO_VSOCK_TYPE_SEQPACKET,
    VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST,
    Header,
)
from pyvhost.frontend.chains import ring_driver
from pyvhost.frontend.net import Frontend
from pyvhost.frontend.ram import BUF_SIZE

CID = 3
#: the driver's receive buffer per connection (what it advertises as buf_alloc)
GUEST_BUF = 64 << 10
CHUNK = BUF_SIZE - HDR_LEN  # payload of one TX packet (header and payload in one buffer)


class Driver:
    """The guest's vsock driver: RX buffers kept posted, TX packets, events."""

    def __init__(self, fe: Frontend, rx_buffers: int = 64) -> None:
        self.rx, self.tx, self.ev = ring_driver(fe, 0), ring_driver(fe, 1), ring_driver(fe, 2)
        for _ in range(rx_buffers):
            self.rx.post(BUF_SIZE, kick=False)
        os.eventfd_write(self.rx.ring.kick_fd, 1)
        for _ in range(4):
            self.ev.post(EVENT.size)
        self.inbox: list[tuple[Header, bytes]] = []
        #: bytes the guest has read per (port, host port): the fwd_cnt of every packet it sends there
        self.fwd: dict[tuple[int, int], int] = {}

    def send(self, op: int, src_port: int, dst_port: int, payload: bytes = b"", **kw) -> None:
        fields = dict(
            src_cid=CID, dst_cid=VMADDR_CID_HOST, src_port=src_port, dst_port=dst_port, len=len(payload),
            type=VIRTIO_VSOCK_TYPE_STREAM, op=op, flags=0, buf_alloc=GUEST_BUF,
            fwd_cnt=self.fwd.get((src_port, dst_port), 0),
        )  # fmt: skip
        fields.update(kw)
        self.send_raw(Header(**fields).pack() + payload)

    def send_raw(self, *segments: bytes | int) -> None:
        deadline = time.monotonic() + 10
        while len(self.tx.free) < len(segments):  # the ring is full: wait for the device to take packets
            self.poll()
            assert time.monotonic() < deadline, "the device takes no TX packets"
            time.sleep(0.0005)
        self.tx.post(*segments)

    def poll(self) -> None:
        done = [bytes(self.rx.buf(head)[:n]) for head, n in self.rx.used()]  # before any buffer is reposted
        for data in done:
            n = len(data)
            assert n >= HDR_LEN, f"an RX packet of {n} bytes"
            h = Header.unpack(data)
            assert h.src_cid == VMADDR_CID_HOST and h.dst_cid == CID and h.len == n - HDR_LEN, h
            self.inbox.append((h, data[HDR_LEN:]))
            self.rx.post(BUF_SIZE)
        self.tx.used()

    def expect(self, op: int, timeout: float = 10.0, **match) -> tuple[Header, bytes]:
        """The first packet received with ``op`` (and the fields of ``match``), waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            for i, (h, p) in enumerate(self.inbox):
                if h.op == op and all(getattr(h, k) == v for k, v in match.items()):
                    del self.inbox[i]
                    return h, p
            assert time.monotonic() < deadline, f"no op {op} {match} within {timeout} s; got {self.inbox[-5:]}"
            time.sleep(0.001)

    def events(self) -> list[int]:
        return [EVENT.unpack(bytes(self.ev.buf(h)[:n]))[0] for h, n in self.ev.used() if n == EVENT.size]


@pytest.fixture(params=["direct", "copy", "direct-packed", "copy-packed"])
def vsock(serve, sock_path, tmp_path, request):
    """A vsock device served on each metadata path, split and packed rings, a front-end with its three rings,
    the driver, the uds path."""
    uds = str(tmp_path / "vm.vsock")
    dev = VsockDevice(CID, uds)
    metadata, _, layout = request.param.partition("-")
    srv = serve(device=dev, metadata=metadata)
    fe = Frontend(sock_path, num_queues=3, packed=layout == "packed")
    fe.setup()
    srv.assert_path(metadata, [0, 1, 2])
    try:
        yield dev, fe, Driver(fe), uds
    finally:
        fe.close()
        dev.close()


def listen(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(16)
    return s


def closed_by_peer(c: socket.socket) -> bool:
    """The device closed its end (EOF, or a reset when it left bytes of ours unread)."""
    c.settimeout(10)
    try:
        return c.recv(10) == b""
    except ConnectionResetError:
        return True


def guest_stream(drv: Driver, port: int, host_port: int, data: bytes) -> None:
    """The guest sends ``data`` on an established connection, within the credit the device gives."""
    sent, peer_fwd = 0, 0
    while sent < len(data):
        while sent - peer_fwd + CHUNK > BUF_ALLOC:  # wait for a CREDIT_UPDATE
            h, _ = drv.expect(VIRTIO_VSOCK_OP_CREDIT_UPDATE, src_port=host_port, dst_port=port)
            peer_fwd = h.fwd_cnt
        piece = data[sent : sent + CHUNK]
        drv.send(VIRTIO_VSOCK_OP_RW, port, host_port, piece)
        sent += len(piece)


def guest_receive(drv: Driver, port: int, host_port: int, n: int) -> bytes:
    """The guest reads ``n`` bytes, telling the device its credit as it goes."""
    got = bytearray()
    while len(got) < n:
        _, p = drv.expect(VIRTIO_VSOCK_OP_RW, src_port=host_port, dst_port=port)
        got += p
        drv.fwd[(port, host_port)] = drv.fwd.get((port, host_port), 0) + len(p)
        drv.send(VIRTIO_VSOCK_OP_CREDIT_UPDATE, port, host_port)
    return bytes(got)


def test_transport_reset_event_for_a_new_driver(vsock):
    dev, fe, drv, _ = vsock
    deadline = time.monotonic() + 10
    events: list[int] = []
    while not events:
        events = drv.events()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert events == [VIRTIO_VSOCK_EVENT_TRANSPORT_RESET]
    assert dev.config_space() == CID.to_bytes(8, "little")


def test_guest_connects_to_host_byte_for_byte(vsock):
    dev, fe, drv, uds = vsock
    srv = listen(f"{uds}_5000")
    up = os.urandom(1 << 20)
    down = os.urandom(1 << 20)
    result = {}

    def host() -> None:
        c, _ = srv.accept()
        got = bytearray()
        while len(got) < len(up):
            got += c.recv(1 << 16)
        result["up"] = hashlib.sha256(got).hexdigest()
        c.sendall(down)
        result["eof"] = c.recv(1)  # b"" once the guest shuts down
        c.close()

    t = threading.Thread(target=host)
    t.start()
    drv.send(VIRTIO_VSOCK_OP_REQUEST, 1234, 5000)
    h, _ = drv.expect(VIRTIO_VSOCK_OP_RESPONSE, src_port=5000, dst_port=1234)
    assert h.buf_alloc == BUF_ALLOC
    guest_stream(drv, 1234, 5000, up)
    assert guest_receive(drv, 1234, 5000, len(down)) == down
    drv.send(VIRTIO_VSOCK_OP_SHUTDOWN, 1234, 5000, flags=VIRTIO_VSOCK_SHUTDOWN_BOTH)
    drv.expect(VIRTIO_VSOCK_OP_RST, src_port=5000, dst_port=1234)  # the device finishes the close
    t.join(30)
    assert result == {"up": hashlib.sha256(up).hexdigest(), "eof": b""}
    assert dev.stats()["connections"] == 0
    srv.close()


def test_host_connects_to_guest_byte_for_byte(vsock):
    dev, fe, drv, uds = vsock
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(uds)
    c.sendall(b"CONNECT 52\n")
    h, _ = drv.expect(VIRTIO_VSOCK_OP_REQUEST, dst_port=52)
    local = h.src_port
    drv.send(VIRTIO_VSOCK_OP_RESPONSE, 52, local)
    f = c.makefile("rb")
    assert f.readline() == f"OK {local}\n".encode()
    down = os.urandom(300_000)
    threading.Thread(target=c.sendall, args=(down,)).start()
    assert guest_receive(drv, 52, local, len(down)) == down
    up = os.urandom(300_000)
    guest_stream(drv, 52, local, up)
    assert f.read(len(up)) == up
    f.close()
    c.close()  # the host peer is done: SHUTDOWN to the guest, which answers RST
    h, _ = drv.expect(VIRTIO_VSOCK_OP_SHUTDOWN, src_port=local, dst_port=52)
    assert h.flags == VIRTIO_VSOCK_SHUTDOWN_BOTH
    drv.send(VIRTIO_VSOCK_OP_RST, 52, local)
    deadline = time.monotonic() + 10
    while dev.stats()["connections"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_connect_to_nothing_and_bad_connect_lines(vsock):
    dev, fe, drv, uds = vsock
    drv.send(VIRTIO_VSOCK_OP_REQUEST, 77, 6000)  # no <uds>_6000
    drv.expect(VIRTIO_VSOCK_OP_RST, src_port=6000, dst_port=77)
    for line in (b"HELLO 5\n", b"CONNECT x\n", b"CONNECT 99999999999\n", b"A" * 100):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(uds)
        c.sendall(line)
        assert closed_by_peer(c)
        c.close()
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(uds)
    c.sendall(b"CONNECT 9\n")
    h, _ = drv.expect(VIRTIO_VSOCK_OP_REQUEST, dst_port=9)
    drv.send(VIRTIO_VSOCK_OP_RST, 9, h.src_port)  # the guest refuses
    assert closed_by_peer(c)
    c.close()


def test_a_host_peer_that_stops_reading_blocks_only_itself(vsock):
    """Connection A's host peer never reads: the guest fills the whole credit the device gave it and A's data
    waits in the device; connection B goes on byte for byte meanwhile; beyond its credit A is reset."""
    dev, fe, drv, uds = vsock
    srv_a, srv_b = listen(f"{uds}_7000"), listen(f"{uds}_7001")
    drv.send(VIRTIO_VSOCK_OP_REQUEST, 100, 7000)
    drv.expect(VIRTIO_VSOCK_OP_RESPONSE, src_port=7000, dst_port=100)
    a, _ = srv_a.accept()
    drv.send(VIRTIO_VSOCK_OP_REQUEST, 101, 7001)
    drv.expect(VIRTIO_VSOCK_OP_RESPONSE, src_port=7001, dst_port=101)
    b, _ = srv_b.accept()
    filled = 0
    while filled + CHUNK <= BUF_ALLOC:  # A's peer reads nothing; the socket buffer takes some, the device the rest
        drv.send(VIRTIO_VSOCK_OP_RW, 100, 7000, bytes(CHUNK))
        filled += CHUNK
    data = os.urandom(200_000)
    threading.Thread(target=guest_stream, args=(drv, 101, 7001, data)).start()
    got = bytearray()
    b.settimeout(30)
    while len(got) < len(data):
        got += b.recv(1 << 16)
    assert bytes(got) == data
    # A: the guest ignores its credit and sends far more than the device gave
    for _ in range(2 * BUF_ALLOC // CHUNK):
        drv.send(VIRTIO_VSOCK_OP_RW, 100, 7000, bytes(CHUNK))
    drv.expect(VIRTIO_VSOCK_OP_RST, src_port=7000, dst_port=100)
    assert dev.stats()["credit_overflow"] == 1
    for s in (a, b, srv_a, srv_b):
        s.close()


@pytest.mark.parametrize(
    "what",
    ["short", "writable", "unknown_op", "seqpacket", "len_mismatch", "too_long", "misaddressed", "rw_unconnected"],
)
def test_malformed_packets(vsock, errors, what):
    """Each malformed packet gets the spec's answer (RST where there is someone to answer) or is dropped and
    counted; the device goes on: a connection made afterwards works."""
    dev, fe, drv, uds = vsock
    if what == "short":
        drv.send_raw(bytes(20))
    elif what == "writable":
        drv.send_raw(Header(CID, 2, 1, 2, 0, 1, VIRTIO_VSOCK_OP_REQUEST).pack(), 64)
    elif what == "misaddressed":
        drv.send(VIRTIO_VSOCK_OP_REQUEST, 1, 2, src_cid=CID + 1)
    else:
        kw: dict = {
            "unknown_op": {"op": 99},
            "seqpacket": {"type": VIRTIO_VSOCK_TYPE_SEQPACKET},
            "len_mismatch": {"len": 500},
            "too_long": {"len": 1 << 31},
            "rw_unconnected": {"op": VIRTIO_VSOCK_OP_RW},
        }[what]
        op = kw.pop("op", VIRTIO_VSOCK_OP_CREDIT_REQUEST)
        drv.send(op, 1, 2, b"x" * 10, **kw)
        drv.expect(VIRTIO_VSOCK_OP_RST, src_port=2, dst_port=1)
    srv = listen(f"{uds}_8000")
    drv.send(VIRTIO_VSOCK_OP_REQUEST, 11, 8000)
    drv.expect(VIRTIO_VSOCK_OP_RESPONSE, src_port=8000, dst_port=11)
    c, _ = srv.accept()
    drv.send(VIRTIO_VSOCK_OP_RW, 11, 8000, b"still here")
    c.settimeout(10)
    assert c.recv(100) == b"still here"
    c.close()
    srv.close()
    counted = dev.stats()
    if what in ("short", "writable", "seqpacket", "len_mismatch", "too_long", "unknown_op"):
        assert counted["malformed"] == 1, counted
    if what == "misaddressed":
        assert counted["misaddressed"] == 1, counted


def test_credit_request_answered_and_reconnect_resets(serve, sock_path, tmp_path):
    """CREDIT_REQUEST gets a CREDIT_UPDATE; a new front-end connection (a new driver) drops the host sockets
    of the old one and posts TRANSPORT_RESET again."""
    uds = str(tmp_path / "vm.vsock")
    dev = VsockDevice(CID, uds)
    serve(device=dev)
    srv = listen(f"{uds}_9000")
    with Frontend(sock_path, num_queues=3) as fe:
        fe.setup()
        drv = Driver(fe)
        drv.send(VIRTIO_VSOCK_OP_REQUEST, 5, 9000)
        drv.expect(VIRTIO_VSOCK_OP_RESPONSE, src_port=9000, dst_port=5)
        c, _ = srv.accept()
        drv.send(VIRTIO_VSOCK_OP_CREDIT_REQUEST, 5, 9000)
        h, _ = drv.expect(VIRTIO_VSOCK_OP_CREDIT_UPDATE, src_port=9000, dst_port=5)
        assert h.buf_alloc == BUF_ALLOC and h.fwd_cnt == 0
    with Frontend(sock_path, num_queues=3) as fe:
        fe.setup()
        drv = Driver(fe)
        deadline = time.monotonic() + 10
        events: list[int] = []
        while not events:
            events = drv.events()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert events == [VIRTIO_VSOCK_EVENT_TRANSPORT_RESET]
        assert closed_by_peer(c)  # the old connection's host socket is closed
    c.close()
    srv.close()
    dev.close()


def test_sixteen_connections_at_once(vsock):
    """16 guest connections to one host listener, interleaved: each echoes 100 KB byte for byte."""
    dev, fe, drv, uds = vsock
    srv = listen(f"{uds}_4000")
    n, size = 16, 100_000

    def echo(c: socket.socket) -> None:
        got = bytearray()
        while len(got) < size:
            got += c.recv(1 << 16)
        c.sendall(bytes(got))
        c.close()

    threads = []
    for i in range(n):
        drv.send(VIRTIO_VSOCK_OP_REQUEST, 2000 + i, 4000)
        drv.expect(VIRTIO_VSOCK_OP_RESPONSE, src_port=4000, dst_port=2000 + i)
        c, _ = srv.accept()
        threads.append(threading.Thread(target=echo, args=(c,)))
        threads[-1].start()
    data = [os.urandom(size) for _ in range(n)]
    for off in range(0, size, CHUNK):  # round robin over the connections
        for i in range(n):
            drv.send(VIRTIO_VSOCK_OP_RW, 2000 + i, 4000, data[i][off : off + CHUNK])
    for i in range(n):
        assert guest_receive(drv, 2000 + i, 4000, size) == data[i]
    for t in threads:
        t.join(30)
    assert dev.stats()["connections"] == n  # each waits for the guest's close
    srv.close()

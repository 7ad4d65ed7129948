"""virtio-vsock (virtio 1.2 §5.10) on the hybrid AF_UNIX scheme of Firecracker and vhost-device-vsock.

A guest connecting to host port P reaches the Unix socket ``<uds_path>_P``; a host process connecting to
``<uds_path>`` and writing ``CONNECT P\\n`` reaches guest port P and reads ``OK <local port>\\n``.  Stream sockets
only, with credit-based flow control both ways.

Threads: the TX queue's worker parses each packet the guest sends and acts on it at once; the RX and event
queues' buffers are held (``submit``) until the device has something for the guest; one loop thread waits
(selectors) on the Unix sockets and fills RX buffers -- control packets first, then data of the connections
that have both data and the guest's credit, in turn.  Every host socket is non-blocking: what a host peer does
not read stays in its connection's buffer, bounded by the credit the device gave the guest (``buf_alloc``), so a
peer that stops reading stalls its own connection only.
"""

from __future__ import annotations

import collections
import logging
import os
import selectors
import socket
import struct
import threading

from .chain_device import ChainDevice, Request
from .vsock_packet import (
    EVENT,
    HDR_LEN,
    VIRTIO_ID_VSOCK,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_BOTH,
    VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST,
    Header,
)

log = logging.getLogger(__name__)

RX, TX, EVENT_Q = 0, 1, 2
#: bytes of guest data a connection buffers for its host peer: the credit the device gives the guest
BUF_ALLOC = 256 << 10
#: the largest payload of one packet either way (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE)
MAX_PKT = 64 << 10
#: control packets waiting for RX buffers, at most (beyond: dropped and logged -- a guest that posts no RX
#: buffers only hurts itself)
MAX_CONTROL = 4096
#: bytes of "CONNECT <port>\n" a host peer may send
MAX_CONNECT_LINE = 64
#: host ports the device gives to host-initiated connections start here
FIRST_LOCAL_PORT = 1 << 30

# connection states
CONNECTING_HOST = "connect-line"  # a host peer that has not sent its CONNECT line yet
REQUESTED = "requested"  # REQUEST sent to the guest, waiting for its RESPONSE
ESTABLISHED = "established"


class Conn:
    """One stream: a host Unix socket and the guest's (cid, port)."""

    def __init__(self, sock: socket.socket, local_port: int = 0, peer_port: int = 0, state: str = CONNECTING_HOST):
        self.sock = sock
        self.local_port, self.peer_port = local_port, peer_port
        self.state = state
        self.line = b""  # the CONNECT line so far
        self.out = bytearray()  # guest data not yet written to the host socket
        self.fwd_cnt = 0  # guest bytes written to the host socket
        self.reported = 0  # fwd_cnt last told to the guest
        self.tx_cnt = 0  # bytes sent to the guest
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.credit_asked = False
        self.guest_shut = 0  # SHUTDOWN flags the guest sent
        self.host_eof = False
        self.shut_wr = False
        self.events = 0  # selector interest now

    def credit(self) -> int:
        """Bytes the guest can take now (virtio 1.2 §5.10.6.3: buf_alloc - (tx_cnt - fwd_cnt))."""
        return max(0, self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt))


class VsockDevice(ChainDevice):
    """A vsock device for guest CID ``guest_cid`` on the Unix socket ``uds_path``."""

    device_id = VIRTIO_ID_VSOCK
    num_queues = 3
    batch = 32

    def __init__(self, guest_cid: int, uds_path: str, buf_alloc: int = BUF_ALLOC) -> None:
        if not 3 <= guest_cid < 0xFFFFFFFF:
            raise ValueError(f"guest CID {guest_cid}: CIDs 0-2 and 2^32-1 are reserved")
        self.guest_cid, self.uds_path, self.buf_alloc = guest_cid, uds_path, buf_alloc
        self.lock = threading.RLock()
        self.rx_bufs: collections.deque[Request] = collections.deque()
        self.event_bufs: collections.deque[Request] = collections.deque()
        self.control: collections.deque[bytes] = collections.deque()
        self.conns: dict[tuple[int, int], Conn] = {}  # (local port, guest port) -> established or requested
        self.by_sock: dict[int, Conn] = {}  # fileno -> every connection (host-initiated ones before their line)
        self.next_port = FIRST_LOCAL_PORT
        self.reset_pending = True  # the first driver too: it may be a guest whose old back-end died
        self.counters = collections.Counter[str]()
        self.sel = selectors.DefaultSelector()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.sel.register(self.wake_fd, selectors.EVENT_READ, None)
        if os.path.exists(uds_path):
            os.unlink(uds_path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self.listener.bind(uds_path)
        self.listener.listen(64)
        self.sel.register(self.listener, selectors.EVENT_READ, "listener")
        self.closed = False
        self.loop = threading.Thread(target=self._loop, name="vsock-loop", daemon=True)
        self.loop.start()

    # -- the device API --------------------------------------------------------------------------------------
    def config_space(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)  # struct virtio_vsock_config: le64 guest_cid

    def driver_gone(self) -> None:
        """The connections of the old driver are gone; the next one is told with TRANSPORT_RESET as soon as it
        posts an event buffer (a guest whose back-end restarted, or that migrated, drops its old sockets)."""
        with self.lock:
            if self.by_sock:
                log.info("vsock: driver gone; %d connections closed", len(self.by_sock))
            for conn in list(self.by_sock.values()):
                self._drop(conn)
            self.control.clear()
            self.reset_pending = True

    def submit(self, req: Request) -> None:
        if req.queue == TX:
            try:
                with self.lock:
                    self._tx(req)
            finally:
                req.complete(0)
            return
        with self.lock:
            if req.queue == RX:
                if sum(len(b) for b in req.writable) < HDR_LEN:
                    self.counters["bad_rx_buffers"] += 1
                    log.error("vsock: RX chain %d has room for no header; completed empty", req.head)
                    req.complete(0)
                    return
                self.rx_bufs.append(req)
            else:
                if sum(len(b) for b in req.writable) < EVENT.size:
                    self.counters["bad_event_buffers"] += 1
                    req.complete(0)
                    return
                self.event_bufs.append(req)
                self._send_events()
                return
        self._wake()

    def stopping(self, queue: int) -> None:
        """RX and event buffers held are handed back empty (the ring is going)."""
        with self.lock:
            bufs = self.rx_bufs if queue == RX else self.event_bufs if queue == EVENT_Q else None
            held = list(bufs) if bufs is not None else []
            if bufs is not None:
                bufs.clear()
        for req in held:
            req.complete(0)

    def stats(self) -> dict:
        with self.lock:
            return {"connections": len(self.by_sock), **self.counters}

    def close(self) -> None:
        with self.lock:
            self.closed = True
        self._wake()
        self.loop.join(10)
        with self.lock:
            for conn in list(self.by_sock.values()):
                self._drop(conn)
            for req in (*self.rx_bufs, *self.event_bufs):
                req.complete(0)
            self.rx_bufs.clear()
            self.event_bufs.clear()
        self.sel.close()
        self.listener.close()
        os.close(self.wake_fd)
        try:
            os.unlink(self.uds_path)
        except OSError:
            pass

    # -- packets from the guest (TX worker, under the lock) ------------------------------------------------------
    def _tx(self, req: Request) -> None:
        total = sum(len(b) for b in req.readable)
        if total < HDR_LEN or req.writable:
            self.counters["malformed"] += 1
            log.error(
                "vsock: TX chain %d: %d readable bytes, %d writable buffers (a header is %d device-readable bytes)",
                req.head,
                total,
                len(req.writable),
                HDR_LEN,
            )
            return
        raw = b"".join(bytes(b) for b in req.readable)  # one copy: read once, then checked and used
        h = Header.unpack(raw)
        payload = raw[HDR_LEN : HDR_LEN + h.len]
        if h.src_cid != self.guest_cid or h.dst_cid != VMADDR_CID_HOST:
            self.counters["misaddressed"] += 1
            log.error("vsock: packet from cid %d to cid %d dropped (guest is %d)", h.src_cid, h.dst_cid, self.guest_cid)
            return
        key = (h.dst_port, h.src_port)
        conn = self.conns.get(key)
        known = VIRTIO_VSOCK_OP_REQUEST <= h.op <= VIRTIO_VSOCK_OP_CREDIT_REQUEST
        if h.type != VIRTIO_VSOCK_TYPE_STREAM or len(payload) != h.len or h.len > MAX_PKT or not known:
            self.counters["malformed"] += 1
            log.error("vsock: packet op %d type %d len %d (%d bytes there): reset", h.op, h.type, h.len, len(payload))
            if conn is not None:
                self._drop(conn)
            self._rst(h)
            return
        if conn is not None:
            conn.peer_buf_alloc, conn.peer_fwd_cnt = h.buf_alloc, h.fwd_cnt
        op = h.op
        if op == VIRTIO_VSOCK_OP_REQUEST:
            if conn is not None:
                self._drop(conn)
                self._rst(h)
                return
            self._guest_connects(h)
        elif conn is None:
            if op != VIRTIO_VSOCK_OP_RST:
                self._rst(h)
        elif op == VIRTIO_VSOCK_OP_RESPONSE:
            if conn.state != REQUESTED:
                self._drop(conn)
                self._rst(h)
                return
            conn.state = ESTABLISHED
            self._host_write(conn, f"OK {conn.local_port}\n".encode(), count=False)
        elif op == VIRTIO_VSOCK_OP_RW:
            if conn.state != ESTABLISHED or conn.guest_shut & VIRTIO_VSOCK_SHUTDOWN_SEND:
                self._drop(conn)
                self._rst(h)
                return
            if len(conn.out) + len(payload) > self.buf_alloc:
                self.counters["credit_overflow"] += 1
                log.error(
                    "vsock: guest port %d sent %d bytes beyond its credit: reset",
                    h.src_port,
                    len(conn.out) + len(payload) - self.buf_alloc,
                )
                self._drop(conn)
                self._rst(h)
                return
            self._host_write(conn, payload)
        elif op == VIRTIO_VSOCK_OP_CREDIT_UPDATE:
            pass  # the credit fields were taken above
        elif op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
            self._control(conn, VIRTIO_VSOCK_OP_CREDIT_UPDATE)
        elif op == VIRTIO_VSOCK_OP_SHUTDOWN:
            conn.guest_shut |= h.flags & VIRTIO_VSOCK_SHUTDOWN_BOTH
            if conn.guest_shut == VIRTIO_VSOCK_SHUTDOWN_BOTH:
                self._drop(conn)
                self._rst(h)  # the guest waits for it to finish closing
                return
            if conn.guest_shut & VIRTIO_VSOCK_SHUTDOWN_SEND:
                self._flush(conn)
        else:  # RST
            self._drop(conn)
        self._wake()

    def _guest_connects(self, h: Header) -> None:
        """REQUEST: connect to ``<uds_path>_<port>``; RESPONSE if it listens, else RST."""
        path = f"{self.uds_path}_{h.dst_port}"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            s.connect(path)
        except OSError as e:
            s.close()
            log.info("vsock: guest port %d -> %s: %s; reset", h.src_port, path, e.strerror)
            self._rst(h)
            return
        conn = Conn(s, h.dst_port, h.src_port, ESTABLISHED)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = h.buf_alloc, h.fwd_cnt
        self.conns[(conn.local_port, conn.peer_port)] = conn
        self.by_sock[s.fileno()] = conn
        self.sel.register(s, selectors.EVENT_READ, conn)
        conn.events = selectors.EVENT_READ
        self._control(conn, VIRTIO_VSOCK_OP_RESPONSE)

    # -- toward the host sockets ---------------------------------------------------------------------------------
    def _host_write(self, conn: Conn, data: bytes, count: bool = True) -> None:
        if count:
            conn.out += data
        else:  # the OK line: not guest data, not counted in fwd_cnt
            try:
                conn.sock.send(data)
            except OSError:
                pass
            return
        self._flush(conn)

    def _flush(self, conn: Conn) -> None:
        if conn.out:
            try:
                n = conn.sock.send(conn.out)
            except BlockingIOError:
                n = 0
            except OSError as e:
                log.info("vsock: host peer of guest port %d: %s; reset", conn.peer_port, e.strerror)
                self._reset_conn(conn)
                return
            del conn.out[:n]
            conn.fwd_cnt += n
        if conn.fwd_cnt - conn.reported >= self.buf_alloc // 4:  # before the guest can run out of credit
            self._control(conn, VIRTIO_VSOCK_OP_CREDIT_UPDATE)
        if not conn.out:
            if conn.guest_shut & VIRTIO_VSOCK_SHUTDOWN_SEND and not conn.shut_wr:
                conn.shut_wr = True
                try:
                    conn.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    # -- toward the guest ----------------------------------------------------------------------------------------
    def _header(self, conn: Conn, op: int, length: int = 0, flags: int = 0) -> bytes:
        conn.reported = conn.fwd_cnt
        return Header(
            VMADDR_CID_HOST,
            self.guest_cid,
            conn.local_port,
            conn.peer_port,
            length,
            VIRTIO_VSOCK_TYPE_STREAM,
            op,
            flags,
            self.buf_alloc,
            conn.fwd_cnt,
        ).pack()

    def _control(self, conn: Conn, op: int, flags: int = 0) -> None:
        self._queue_control(self._header(conn, op, 0, flags))

    def _rst(self, h: Header) -> None:
        """RST in answer to the guest's packet ``h`` (no connection needed)."""
        if h.op == VIRTIO_VSOCK_OP_RST:
            return
        pkt = Header(
            VMADDR_CID_HOST, self.guest_cid, h.dst_port, h.src_port, 0, VIRTIO_VSOCK_TYPE_STREAM, VIRTIO_VSOCK_OP_RST
        )
        self._queue_control(pkt.pack())

    def _queue_control(self, pkt: bytes) -> None:
        if len(self.control) >= MAX_CONTROL:
            self.counters["control_dropped"] += 1
            if self.counters["control_dropped"] == 1:
                log.error("vsock: the guest posts no RX buffers; control packets dropped")
            return
        self.control.append(pkt)
        self._pump()

    def _deliver(self, pkt: bytes, payload: bytes = b"") -> None:
        """Write a packet into the first RX buffer (the caller checked there is one with room)."""
        req = self.rx_bufs.popleft()
        data = memoryview(pkt + payload) if payload else memoryview(pkt)
        off = 0
        for b in req.writable:
            n = min(len(b), len(data) - off)
            b[:n] = data[off : off + n]
            off += n
            if off == len(data):
                break
        self.counters["rx_packets"] += 1
        req.complete(off)

    def _pump(self) -> None:
        """Fill RX buffers: control packets first, in order."""
        while self.control and self.rx_bufs:
            self._deliver(self.control.popleft())

    def _send_events(self) -> None:
        if self.reset_pending and self.event_bufs:
            req = self.event_bufs.popleft()
            ev = EVENT.pack(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)
            req.writable[0][: len(ev)] = ev
            self.reset_pending = False
            self.counters["transport_resets"] += 1
            req.complete(len(ev))

    def _reset_conn(self, conn: Conn) -> None:
        """The host side failed: RST to the guest, and the connection is gone."""
        if conn.state != CONNECTING_HOST:
            self._control(conn, VIRTIO_VSOCK_OP_RST)
        self._drop(conn)

    def _drop(self, conn: Conn) -> None:
        self.conns.pop((conn.local_port, conn.peer_port), None)
        fd = conn.sock.fileno()
        if fd >= 0:
            self.by_sock.pop(fd, None)
            try:
                self.sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.sock.close()

    def _wake(self) -> None:
        try:
            os.eventfd_write(self.wake_fd, 1)
        except OSError:
            pass

    # -- the loop thread -----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.lock:
                if self.closed:
                    return
                self._interest()
            for key, mask in self.sel.select(1.0):
                with self.lock:
                    if self.closed:
                        return
                    if key.data is None:
                        try:
                            os.eventfd_read(self.wake_fd)
                        except BlockingIOError:
                            pass
                    elif key.data == "listener":
                        self._accept()
                    elif isinstance(key.data, Conn) and key.data.sock.fileno() >= 0:
                        self._ready(key.data, mask)
            with self.lock:
                self._pump()

    def _interest(self) -> None:
        """Read a host socket only when its data can go somewhere (an RX buffer and credit); write when its
        buffer holds guest data."""
        for conn in list(self.by_sock.values()):
            ev = 0
            if conn.state == CONNECTING_HOST:
                ev = selectors.EVENT_READ
            elif conn.state == ESTABLISHED:
                if (
                    self.rx_bufs
                    and not self.control
                    and conn.credit() > 0
                    and not conn.host_eof
                    and not conn.guest_shut & VIRTIO_VSOCK_SHUTDOWN_RCV
                ):
                    ev |= selectors.EVENT_READ
                if conn.out:
                    ev |= selectors.EVENT_WRITE
                if conn.credit() == 0 and not conn.credit_asked and not conn.host_eof:
                    conn.credit_asked = True
                    self._control(conn, VIRTIO_VSOCK_OP_CREDIT_REQUEST)
                elif conn.credit() > 0:
                    conn.credit_asked = False
            if ev != conn.events:
                if conn.events and ev:
                    self.sel.modify(conn.sock, ev, conn)
                elif ev:
                    self.sel.register(conn.sock, ev, conn)
                else:
                    self.sel.unregister(conn.sock)
                conn.events = ev

    def _accept(self) -> None:
        try:
            s, _ = self.listener.accept()
        except BlockingIOError:
            return
        s.setblocking(False)
        conn = Conn(s)
        self.by_sock[s.fileno()] = conn
        self.sel.register(s, selectors.EVENT_READ, conn)
        conn.events = selectors.EVENT_READ

    def _ready(self, conn: Conn, mask: int) -> None:
        if conn.state == CONNECTING_HOST:
            self._connect_line(conn)
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
            if conn.sock.fileno() < 0:
                return
        if mask & selectors.EVENT_READ and conn.state == ESTABLISHED and self.rx_bufs:
            room = sum(len(b) for b in self.rx_bufs[0].writable) - HDR_LEN
            n = min(conn.credit(), room, MAX_PKT)
            if n <= 0:
                return
            try:
                data = conn.sock.recv(n)
            except BlockingIOError:
                return
            except OSError as e:
                log.info("vsock: host peer of guest port %d: %s; reset", conn.peer_port, e.strerror)
                self._reset_conn(conn)
                return
            if not data:  # the host peer is done: the guest reads its end (and closes; it sends RST then)
                conn.host_eof = True
                self._control(conn, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_BOTH)
                return
            conn.tx_cnt += len(data)
            self.counters["bytes_to_guest"] += len(data)
            self._deliver(self._header(conn, VIRTIO_VSOCK_OP_RW, len(data)), data)

    def _connect_line(self, conn: Conn) -> None:
        """A host peer's ``CONNECT <port>\\n``: a REQUEST to the guest (its RESPONSE makes the OK line)."""
        try:  # up to the end of the line, not beyond: what follows is data for the guest
            peek = conn.sock.recv(MAX_CONNECT_LINE - len(conn.line), socket.MSG_PEEK)
            end = peek.find(b"\n")
            data = conn.sock.recv(end + 1 if end >= 0 else len(peek))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        conn.line += data
        if b"\n" not in conn.line:
            if not data or len(conn.line) >= MAX_CONNECT_LINE:
                log.info("vsock: host peer sent no CONNECT line (%r); closed", conn.line[:MAX_CONNECT_LINE])
                self._drop(conn)
            return
        line = conn.line[:-1]
        words = line.decode(errors="replace").split()
        if len(words) != 2 or words[0].upper() != "CONNECT" or not words[1].isdigit() or int(words[1]) > 0xFFFFFFFF:
            log.info("vsock: host peer sent %r, not CONNECT <port>; closed", line[:MAX_CONNECT_LINE])
            self._drop(conn)
            return
        conn.peer_port = int(words[1])
        while (self.next_port, conn.peer_port) in self.conns:
            self.next_port = FIRST_LOCAL_PORT + (self.next_port + 1 - FIRST_LOCAL_PORT) % (1 << 30)
        conn.local_port = self.next_port
        self.next_port = FIRST_LOCAL_PORT + (self.next_port + 1 - FIRST_LOCAL_PORT) % (1 << 30)
        conn.state = REQUESTED
        self.conns[(conn.local_port, conn.peer_port)] = conn
        self._control(conn, VIRTIO_VSOCK_OP_REQUEST)

"""A vhost-user front-end (the driver side): guest RAM in a memfd, split rings, and a compiled driver loop.

It connects to any vhost-user back-end socket (pyvhost's, DPDK's net_vhost PMD, ...), negotiates features,
shares its memory, sets the rings up, then transmits frames or posts receive buffers and counts completions.
It is what ``pyvhost bench`` drives by default, and what the tests use as a guest, well-behaved or hostile
(``ram``, ``rings`` and ``sock`` are open for tests to write bad state or bad messages).
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import socket
import time
from dataclasses import dataclass

import numpy as np
from .jit import helper, kernel

from . import protocol as P
from .atomic import eventfd_write, fence_full, load_acquire, store_release
from .devices.base import VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX
from .devices.net import NET_HDR_LEN, NET_HDR_LEN_LEGACY, VIRTIO_NET_F_MRG_RXBUF, make_frame
from .protocol import ProtocolFeature as PF, Request as R
from .ring.split import (VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY, avail_bytes,
                         desc_bytes, need_event, used_bytes)

log = logging.getLogger(__name__)

PAGE = 4096
#: Guest-physical address of the start of the frontend's RAM (not 0, and unlike its virtual address, so that
#: a back-end mixing the two address spaces fails at once).
GPA_BASE = 0x4000_0000
BUF_SIZE = 2048


class GuestRam:
    """A memfd shared with the back-end, with a bump allocator and GPA/UVA helpers."""

    def __init__(self, size: int, gpa_base: int = GPA_BASE, seal: bool = True) -> None:
        self.size = size
        self.fd = os.memfd_create("pyvhost-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        if seal:  # a back-end maps this memory: it must never shrink under it (that would be SIGBUS there)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        self.mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.buf = np.frombuffer(self.mm, dtype=np.uint8)
        self.uva_base = self.buf.ctypes.data
        self.gpa_base = gpa_base
        self.top = 0

    def alloc(self, n: int, align: int = 64) -> int:
        """Offset of ``n`` fresh bytes."""
        off = -(-self.top // align) * align
        if off + n > self.size:
            raise MemoryError(f"guest RAM of {self.size} bytes exhausted")
        self.top = off + n
        return off

    def gpa(self, off: int) -> int:
        return self.gpa_base + off

    def uva(self, off: int) -> int:
        return self.uva_base + off

    def region(self) -> P.MemRegion:
        return P.MemRegion(self.gpa_base, self.size, self.uva_base, 0)

    def close(self) -> None:
        self.buf = None  # type: ignore[assignment]
        try:
            self.mm.close()
        except BufferError:
            log.warning("guest RAM still has views; left mapped")
        os.close(self.fd)


# driver ring state fields
D_SIZE, D_MASK, D_AVAIL_IDX, D_LAST_USED, D_FREE_TOP, D_EVENT_IDX, D_KICKFD = 0, 1, 2, 3, 4, 5, 6
D_POSTED, D_DONE, D_BYTES, D_KICKS, D_LIMIT, D_HDR, D_BUFLEN, D_BATCH, D_LEN_ERRORS = 7, 8, 9, 10, 11, 12, 13, 14, 15
D_FIELDS = 16


@dataclass
class DriverRing:
    """One split ring laid out in guest RAM, seen by the driver through NumPy views."""

    index: int
    size: int
    desc_off: int
    avail_off: int
    used_off: int
    bufs_off: int
    ram: GuestRam
    kick_fd: int
    call_fd: int

    def __post_init__(self) -> None:
        b = self.ram.buf
        n = self.size
        self.desc = b[self.desc_off:self.desc_off + desc_bytes(n)].view(np.uint64)
        self.avail = b[self.avail_off:self.avail_off + avail_bytes(n)].view(np.uint16)
        self.used16 = b[self.used_off:self.used_off + used_bytes(n)].view(np.uint16)
        self.used32 = b[self.used_off:self.used_off + used_bytes(n) - 2].view(np.uint32)
        self.d = np.zeros(D_FIELDS, dtype=np.int64)
        self.d[D_SIZE], self.d[D_MASK], self.d[D_KICKFD] = n, n - 1, self.kick_fd
        self.d[D_LIMIT] = -1
        self.d[D_BUFLEN] = BUF_SIZE
        self.d[D_BATCH] = 64
        self.free = np.arange(n, dtype=np.int64)[::-1].copy()
        self.d[D_FREE_TOP] = n
        self.stopped = False

    def addr(self) -> P.VringAddr:
        r = self.ram
        return P.VringAddr(self.index, 0, r.uva(self.desc_off), r.uva(self.used_off), r.uva(self.avail_off), 0)

    def buf_gpa(self, i: int) -> int:
        return self.ram.gpa(self.bufs_off + i * BUF_SIZE)

    def views(self):
        return self.d, self.desc, self.avail, self.used16, self.used32, self.free

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            os.close(fd)
        self.desc = self.avail = self.used16 = self.used32 = None  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------------------
@helper
def _reclaim(d, used16, used32, free, count_bytes):
    """Take back completed buffers; count them (and their bytes for RX)."""
    used_idx = np.int64(load_acquire(used16, 1))
    n = (used_idx - d[D_LAST_USED]) & 0xFFFF
    last = d[D_LAST_USED]
    for k in range(n):
        slot = (last + k) & d[D_MASK]
        head = np.int64(used32[1 + 2 * slot])
        if count_bytes:
            ln = np.int64(used32[2 + 2 * slot])
            if ln < d[D_HDR]:
                d[D_LEN_ERRORS] += 1
            else:
                d[D_BYTES] += ln - d[D_HDR]
        free[d[D_FREE_TOP]] = head & d[D_MASK]
        d[D_FREE_TOP] += 1
    d[D_LAST_USED] = used_idx
    d[D_DONE] += n
    return n


@helper
def _post(d, desc, avail, used16, free, bufs_gpa, length, flags):
    """Post up to a batch of free buffers (respecting D_LIMIT) and kick if the device asked for it."""
    n = min(d[D_FREE_TOP], d[D_BATCH])
    if d[D_LIMIT] >= 0:
        n = min(n, d[D_LIMIT] - d[D_POSTED])
    if n <= 0:
        return 0
    old = d[D_AVAIL_IDX]
    for k in range(n):
        d[D_FREE_TOP] -= 1
        i = free[d[D_FREE_TOP]]
        desc[2 * i] = np.uint64(bufs_gpa + i * d[D_BUFLEN])
        desc[2 * i + 1] = np.uint64(length) | (np.uint64(flags) << np.uint64(32))
        avail[2 + ((old + k) & d[D_MASK])] = np.uint16(i)
    new = (old + n) & 0xFFFF
    store_release(avail, 1, np.uint16(new))
    d[D_AVAIL_IDX] = new
    d[D_POSTED] += n
    fence_full()
    if d[D_EVENT_IDX]:
        kick = need_event(np.int64(used16[2 + 4 * d[D_SIZE]]), new, old)
    else:
        kick = (used16[0] & VRING_USED_F_NO_NOTIFY) == 0
    if kick:
        d[D_KICKS] += 1
        eventfd_write(d[D_KICKFD], 1)
    return n


@kernel
def drive_tx(d, desc, avail, used16, used32, free, bufs_gpa, length, passes):
    """Transmit: keep the ring full of frames; return completions seen."""
    done = 0
    for _ in range(passes):
        done += _reclaim(d, used16, used32, free, False)
        _post(d, desc, avail, used16, free, bufs_gpa, length, 0)
    return done


@kernel
def drive_rx(d, desc, avail, used16, used32, free, bufs_gpa, passes):
    """Receive: keep the ring full of empty buffers; count what comes back."""
    done = 0
    for _ in range(passes):
        done += _reclaim(d, used16, used32, free, True)
        _post(d, desc, avail, used16, free, bufs_gpa, d[D_BUFLEN], VRING_DESC_F_WRITE)
    return done


# ---------------------------------------------------------------------------------------------------------
class FrontendError(Exception):
    pass


class Frontend:
    """Driver side of one vhost-user connection to a net device."""

    def __init__(self, socket_path: str, *, queue_size: int = 256, queue_pairs: int = 1, packed: bool = False,
                 ram_size: int = 64 << 20, event_idx: bool = True, mrg_rxbuf: bool = True,
                 connect_timeout: float = 10.0, num_queues: int | None = None, seal_memory: bool = True) -> None:
        self.socket_path = socket_path
        #: virtqueues to set up: a net device's 2 per pair unless told otherwise (e.g. 1 for virtio-rng)
        self.num_queues = num_queues or 2 * queue_pairs
        self.queue_size = queue_size
        self.queue_pairs = queue_pairs
        self.want_event_idx = event_idx
        self.want_mrg = mrg_rxbuf
        self.want_packed = packed  # VIRTIO_F_RING_PACKED: packed rings (frontend_packed.py)
        self.ram = GuestRam(ram_size, seal=seal_memory)
        self.sock = self._connect(socket_path, connect_timeout)
        self.rings: list[DriverRing] = []
        self.features = 0
        self.protocol_features = 0

    @staticmethod
    def _connect(path: str, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                return s
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # -- messages ---------------------------------------------------------------------------------------
    def request(self, req: int, payload: bytes = b"", fds: list[int] | None = None) -> bytes:
        """Send a request that has a reply; return the reply payload."""
        P.send_message(self.sock, req, payload, fds)
        return P.recv_reply(self.sock, req).payload

    def command(self, req: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
        """Send a request without a reply, asking for REPLY_ACK when negotiated; raise if it failed."""
        ack = bool(self.protocol_features & (1 << PF.REPLY_ACK))
        flags = P.VHOST_USER_VERSION | (P.VHOST_USER_NEED_REPLY_MASK if ack else 0)
        P.send_message(self.sock, req, payload, fds, flags=flags)
        if ack:
            status = P.U64.unpack(P.recv_reply(self.sock, req).payload[:8])[0]
            if status:
                raise FrontendError(f"{R(req).name} failed on the back-end (status {status})")

    def negotiate(self) -> None:
        self.command(R.SET_OWNER)
        offered = P.U64.unpack(self.request(R.GET_FEATURES))[0]
        want = (1 << VIRTIO_F_VERSION_1) | (1 << P.VHOST_USER_F_PROTOCOL_FEATURES)
        if self.want_event_idx:
            want |= 1 << VIRTIO_RING_F_EVENT_IDX
        if self.want_mrg:
            want |= 1 << VIRTIO_NET_F_MRG_RXBUF
        if self.want_packed:
            if not offered & (1 << VIRTIO_F_RING_PACKED):
                raise FrontendError(f"back-end does not offer VIRTIO_F_RING_PACKED (features {offered:#x})")
            want |= 1 << VIRTIO_F_RING_PACKED
        if not offered & (1 << VIRTIO_F_VERSION_1):
            raise FrontendError(f"back-end does not offer VIRTIO_F_VERSION_1 (features {offered:#x})")
        self.features = want & offered
        if self.features & (1 << P.VHOST_USER_F_PROTOCOL_FEATURES):
            pf = P.U64.unpack(self.request(R.GET_PROTOCOL_FEATURES))[0]
            self.protocol_features = pf & ((1 << PF.REPLY_ACK) | (1 << PF.MQ) | (1 << PF.CONFIG))
            P.send_message(self.sock, R.SET_PROTOCOL_FEATURES, P.U64.pack(self.protocol_features))
            if self.protocol_features & (1 << PF.MQ):
                nq = P.U64.unpack(self.request(R.GET_QUEUE_NUM))[0]
                if nq < self.num_queues:
                    raise FrontendError(f"back-end has {nq} queues, {self.num_queues} wanted")
        self.command(R.SET_FEATURES, P.U64.pack(self.features))

    @property
    def hdr_len(self) -> int:
        if self.features & ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF)):
            return NET_HDR_LEN
        return NET_HDR_LEN_LEGACY

    def setup(self) -> None:
        """Negotiate, share memory, lay out and start every ring."""
        self.negotiate()
        n = self.queue_size
        for i in range(self.num_queues):
            if self.want_packed:
                from . import frontend_packed
                self.rings.append(frontend_packed.new_ring(self.ram, i, n))
                self.rings[-1].d[D_EVENT_IDX] = 1 if self.features & (1 << VIRTIO_RING_F_EVENT_IDX) else 0
                self.rings[-1].d[D_HDR] = self.hdr_len
                continue
            desc = self.ram.alloc(desc_bytes(n), PAGE)
            avail = self.ram.alloc(avail_bytes(n), 64)
            used = self.ram.alloc(used_bytes(n), PAGE)
            bufs = self.ram.alloc(n * BUF_SIZE, PAGE)
            ring = DriverRing(i, n, desc, avail, used, bufs, self.ram,
                              os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
                              os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            ring.d[D_EVENT_IDX] = 1 if self.features & (1 << VIRTIO_RING_F_EVENT_IDX) else 0
            ring.d[D_HDR] = self.hdr_len
            ring.avail[0] = VRING_AVAIL_F_NO_INTERRUPT  # a polling driver
            self.rings.append(ring)
        self.set_mem_table()
        for ring in self.rings:
            self.start_ring(ring)

    def set_mem_table(self) -> None:
        payload = P.MEM_TABLE_HDR.pack(1, 0) + self.ram.region().pack()
        self.command(R.SET_MEM_TABLE, payload, [self.ram.fd])

    def start_ring(self, ring: DriverRing, base: int | None = None) -> None:
        i = ring.index
        if base is None:
            from . import frontend_packed
            base = frontend_packed.INITIAL_BASE if self.want_packed else 0
        self.command(R.SET_VRING_NUM, P.VRING_STATE.pack(i, ring.size))
        self.command(R.SET_VRING_BASE, P.VRING_STATE.pack(i, base))
        a = ring.addr()
        self.command(R.SET_VRING_ADDR, P.VRING_ADDR.pack(i, a.flags, a.desc, a.used, a.avail, a.log))
        self.command(R.SET_VRING_KICK, P.U64.pack(i), [ring.kick_fd])
        self.command(R.SET_VRING_CALL, P.U64.pack(i), [ring.call_fd])
        if self.features & (1 << P.VHOST_USER_F_PROTOCOL_FEATURES):
            self.command(R.SET_VRING_ENABLE, P.VRING_STATE.pack(i, 1))

    def stop_ring(self, ring: DriverRing) -> int:
        """GET_VRING_BASE: the back-end stops the ring and says where it got to."""
        _, base = P.VRING_STATE.unpack(self.request(R.GET_VRING_BASE, P.VRING_STATE.pack(ring.index, 0))[:8])
        ring.stopped = True
        return base

    # -- traffic ----------------------------------------------------------------------------------------
    def fill_tx_frames(self, ring: DriverRing, pkt_size: int) -> int:
        frame = make_frame(pkt_size)
        hdr = self.hdr_len
        for i in range(ring.size):
            off = ring.bufs_off + i * BUF_SIZE
            self.ram.buf[off:off + hdr] = 0
            self.ram.buf[off + hdr:off + hdr + len(frame)] = frame
        return hdr + len(frame)

    def run(self, direction: str, seconds: float = 0.0, count: int = -1, pkt_size: int = 64, pair: int = 0,
            warmup: float = 0.0, batch: int = 64, timeout: float = 30.0) -> dict:
        """Transmit (``tx``) or receive (``rx``) on queue pair ``pair`` for ``seconds`` or until ``count``
        completions (counted from this call); return counts and the rate measured after ``warmup``."""
        ring = self.rings[2 * pair + (1 if direction == "tx" else 0)]
        ring.d[D_BATCH] = batch
        done0 = int(ring.d[D_DONE])
        ring.d[D_LIMIT] = ring.d[D_POSTED] + count if count >= 0 else -1
        gpa = ring.buf_gpa(0)
        tx_k, rx_k = self._kernels()
        if direction == "tx":
            length = self.fill_tx_frames(ring, pkt_size)
            step = lambda passes: tx_k(*ring.views(), gpa, length, passes)  # noqa: E731
        else:
            step = lambda passes: rx_k(*ring.views(), gpa, passes)  # noqa: E731
        passes = 256
        t0 = time.perf_counter()
        t_warm = t0 + warmup
        done_warm = None
        end = t0 + (seconds + warmup if seconds else timeout)
        first_at = None
        while True:
            step(passes)
            now = time.perf_counter()
            done = int(ring.d[D_DONE]) - done0
            if first_at is None and done:
                first_at = now - t0
            if done_warm is None and now >= t_warm:
                done_warm, t_warm = done, now
            if count >= 0 and done >= count:
                break
            if now >= end:
                if count >= 0 and not seconds:
                    raise FrontendError(f"{direction}: {done} of {count} completions after {timeout} s")
                break
        t_end = time.perf_counter()
        measured = done - (done_warm or 0)
        secs = t_end - t_warm
        return {"direction": direction, "packets": done, "posted": int(ring.d[D_POSTED]),
                "bytes": int(ring.d[D_BYTES]), "kicks": int(ring.d[D_KICKS]), "len_errors": int(ring.d[D_LEN_ERRORS]),
                "seconds": secs, "mpps": measured / secs / 1e6 if secs > 0 else 0.0,
                "first_completion_s": first_at, "first_completion_at": None if first_at is None else t0 + first_at}

    def _kernels(self):
        """The compiled driver loops (TX, RX) for this front-end's ring layout."""
        if self.want_packed:
            from . import frontend_packed
            return frontend_packed.drive_tx, frontend_packed.drive_rx
        return drive_tx, drive_rx

    def drain(self, direction: str, pair: int = 0) -> dict:
        """Stop the ring (GET_VRING_BASE: the back-end finishes and stops), then take back every completion
        it published.  After this, ``packets`` is exact: what the back-end processed."""
        ring = self.rings[2 * pair + (1 if direction == "tx" else 0)]
        base = self.stop_ring(ring)
        ring.d[D_LIMIT] = ring.d[D_POSTED]  # post nothing more
        gpa = ring.buf_gpa(0)
        tx_k, rx_k = self._kernels()
        if direction == "tx":
            tx_k(*ring.views(), gpa, 0, 1)
        else:
            rx_k(*ring.views(), gpa, 1)
        return {"packets": int(ring.d[D_DONE]), "posted": int(ring.d[D_POSTED]), "bytes": int(ring.d[D_BYTES]),
                "base": base}

    def close(self, stop_rings: bool = True) -> None:
        if stop_rings:
            for ring in self.rings:
                if ring.stopped:
                    continue
                try:
                    self.stop_ring(ring)
                except (OSError, P.ProtocolError, P.ConnectionClosed) as e:
                    log.warning("GET_VRING_BASE %d: %s", ring.index, e)
        self.sock.close()
        for ring in self.rings:
            ring.close()
        self.rings = []
        self.ram.close()

    def __enter__(self) -> "Frontend":
        return self

    def __exit__(self, *exc) -> None:
        self.close(stop_rings=exc[0] is None)


def warm_up() -> None:
    """Compile (or load from cache) the driver kernels before connecting, off the measured path."""
    ram = GuestRam(1 << 20)
    try:
        ring = DriverRing(0, 4, ram.alloc(64, PAGE), ram.alloc(14), ram.alloc(38, PAGE), ram.alloc(4 * BUF_SIZE, PAGE),
                          ram, os.eventfd(0), os.eventfd(0))
        drive_tx(*ring.views(), ring.buf_gpa(0), 64, 0)
        drive_rx(*ring.views(), ring.buf_gpa(0), 0)
        ring.close()
    finally:
        ram.close()
    from . import frontend_packed
    frontend_packed.warm_up()

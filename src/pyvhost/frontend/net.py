"""A vhost-user net front-end (the driver side): negotiation, memory sharing, rings (split or packed), traffic.

It connects to any vhost-user back-end socket (pyvhost's, DPDK's net_vhost PMD, ...), negotiates features,
shares its memory, sets the rings up, then transmits frames or posts receive buffers and counts completions.
It is what ``pyvhost bench`` drives by default, and what the tests use as a guest, well-behaved or hostile
(``ram``, ``rings`` and ``sock`` are open for tests to write bad state or bad messages).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from .. import protocol as P
from ..devices.base import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX
from ..devices.net import NET_HDR_LEN, NET_HDR_LEN_LEGACY, VIRTIO_NET_F_MRG_RXBUF, make_frame
from ..protocol import ProtocolFeature as PF
from ..protocol import Request as R
from ..ring.split import (
    VRING_AVAIL_F_NO_INTERRUPT,
    avail_bytes,
    desc_bytes,
    used_bytes,
)
from . import packed as frontend_packed
from .iommu import RO, RW, Viommu
from .log import FrontendLog
from .ram import BUF_SIZE, PAGE, GuestRam
from .split import (
    D_BATCH,
    D_BYTES,
    D_DONE,
    D_EVENT_IDX,
    D_HDR,
    D_KICKS,
    D_LEN_ERRORS,
    D_LIMIT,
    D_POSTED,
    DriverRing,
    drive_rx,
    drive_tx,
)

log = logging.getLogger(__name__)


class FrontendError(Exception):
    pass


class Frontend:
    """Driver side of one vhost-user connection to a net device."""

    def __init__(
        self,
        socket_path: str,
        *,
        queue_size: int = 256,
        queue_pairs: int = 1,
        packed: bool = False,
        ram_size: int = 64 << 20,
        event_idx: bool = True,
        mrg_rxbuf: bool = True,
        connect_timeout: float = 10.0,
        num_queues: int | None = None,
        seal_memory: bool = True,
        dirty_log: bool = False,
        iommu: bool = False,
        iommu_grain: int = PAGE,
        iommu_prefill: int | None = None,
        regions: int = 1,
    ) -> None:
        """``regions``: share guest RAM as that many memory regions, rings and buffers spread over them (by
        ADD_MEM_REG when the back-end offers CONFIGURE_MEM_SLOTS, else by SET_MEM_TABLE, 8 regions at most).
        ``iommu``: play a vIOMMU (frontend/iommu.py): rings and buffers at IOVAs, MISS answered with UPDATEs
        of at most ``iommu_grain`` bytes; ``iommu_prefill``: before the rings start, send UPDATEs for all of
        them cut into about that many entries (None: nothing, the back-end asks for each page)."""
        self.socket_path = socket_path
        #: virtqueues to set up: a net device's 2 per pair unless told otherwise (e.g. 1 for virtio-rng)
        self.num_queues = num_queues or 2 * queue_pairs
        self.queue_size = queue_size
        self.queue_pairs = queue_pairs
        self.want_event_idx = event_idx
        self.want_mrg = mrg_rxbuf
        self.want_packed = packed  # VIRTIO_F_RING_PACKED: packed rings (frontend_packed.py)
        self.ram = GuestRam(ram_size, seal=seal_memory, regions=regions)
        #: the socket on which the regions were last sent by ADD_MEM_REG (to be removed before sending again)
        self.regions_sent_on: socket.socket | None = None
        self.sock = self._connect(socket_path, connect_timeout)
        self.rings: list[DriverRing] = []
        self.features = 0
        self.protocol_features = 0
        #: dirty_log: ask for LOG_SHMFD, share a log after the memory table; set_logging() switches LOG_ALL
        self.want_dirty_log = dirty_log
        self.log: FrontendLog | None = None
        self.want_iommu = iommu
        self.iommu_grain = iommu_grain
        self.iommu_prefill = iommu_prefill
        self.viommu: Viommu | None = None
        #: one exchange (request and its reply) at a time on the socket: the vIOMMU's thread answers MISSes too
        self.lock = threading.RLock()

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
        with self.lock:
            P.send_message(self.sock, req, payload, fds)
            return P.recv_reply(self.sock, req).payload

    def command(self, req: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
        """Send a request without a reply, asking for REPLY_ACK when negotiated; raise if it failed."""
        ack = bool(self.protocol_features & (1 << PF.REPLY_ACK))
        flags = P.VHOST_USER_VERSION | (P.VHOST_USER_NEED_REPLY_MASK if ack else 0)
        with self.lock:
            P.send_message(self.sock, req, payload, fds, flags=flags)
            status = P.U64.unpack(P.recv_reply(self.sock, req).payload[:8])[0] if ack else 0
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
        if self.want_iommu:
            if not offered & (1 << VIRTIO_F_ACCESS_PLATFORM):
                raise FrontendError(f"back-end does not offer VIRTIO_F_ACCESS_PLATFORM (features {offered:#x})")
            want |= 1 << VIRTIO_F_ACCESS_PLATFORM
        self.features = want & offered
        if self.features & (1 << P.VHOST_USER_F_PROTOCOL_FEATURES):
            pf = P.U64.unpack(self.request(R.GET_PROTOCOL_FEATURES))[0]
            mine = (1 << PF.REPLY_ACK) | (1 << PF.MQ) | (1 << PF.CONFIG) | self.log_pf(pf) | self.slots_pf()
            if self.want_iommu:
                mine |= 1 << PF.BACKEND_REQ
            self.protocol_features = pf & mine
            P.send_message(self.sock, R.SET_PROTOCOL_FEATURES, P.U64.pack(self.protocol_features))
            if self.want_iommu:
                self.start_viommu()
            if self.protocol_features & (1 << PF.MQ):
                nq = P.U64.unpack(self.request(R.GET_QUEUE_NUM))[0]
                if nq < self.num_queues:
                    raise FrontendError(f"back-end has {nq} queues, {self.num_queues} wanted")
        self.command(R.SET_FEATURES, P.U64.pack(self.features))

    def start_viommu(self) -> None:
        """Become the vIOMMU: the backend channel (SET_BACKEND_REQ_FD) and the page table answering MISS
        (QEMU refuses ACCESS_PLATFORM without BACKEND_REQ and REPLY_ACK: so does this front-end)."""
        need = (1 << PF.BACKEND_REQ) | (1 << PF.REPLY_ACK)
        if self.protocol_features & need != need:
            raise FrontendError("an IOMMU needs VHOST_USER_PROTOCOL_F_BACKEND_REQ and REPLY_ACK from the back-end")
        if self.viommu is None:
            self.viommu = Viommu(self.ram, lambda m: self.command(R.IOTLB_MSG, m.pack()), self.iommu_grain)
        else:  # a new connection: the same page table, a new backend channel
            self.viommu.close()
        fd = self.viommu.channel_pair()
        try:
            self.command(R.SET_BACKEND_REQ_FD, b"", [fd])
        finally:
            os.close(fd)

    def ring_addr(self, ring) -> P.VringAddr:
        """SET_VRING_ADDR's addresses: front-end virtual ones, or IOVAs behind the vIOMMU."""
        a = ring.addr()
        if self.viommu is None:
            return a
        used_off, avail_off = (
            (ring.device_off, ring.driver_off) if self.want_packed else (ring.used_off, ring.avail_off)
        )
        v = self.viommu
        return P.VringAddr(a.index, a.flags, v.iova(ring.desc_off), v.iova(used_off), v.iova(avail_off), a.log)

    def buf_addr(self, ring) -> int:
        """Address of the ring's first buffer in descriptors: guest-physical, or its IOVA."""
        return ring.buf_gpa(0) if self.viommu is None else self.viommu.iova(ring.bufs_off)

    def _map_ring(self, ring) -> None:
        """Map a ring's parts and buffers in the vIOMMU: TX buffers read-only (unless everything is sent up
        front: then, as one run of read/write pages, all of RAM in use is one IOTLB entry); RX ones read/write,
        as an IOMMU without zero-length-read support maps DMA_FROM_DEVICE, and as DPDK's vhost asks for them."""
        v = self.viommu
        assert v is not None
        n = ring.size
        if self.want_packed:
            v.map(ring.desc_off, frontend_packed.ring_bytes(n), RW)
            v.map(ring.driver_off, 4, RW)
            v.map(ring.device_off, 4, RW)
        else:
            v.map(ring.desc_off, desc_bytes(n), RW)
            v.map(ring.avail_off, avail_bytes(n), RW)
            v.map(ring.used_off, used_bytes(n), RW)
        net = self.num_queues == 2 * self.queue_pairs
        v.map(ring.bufs_off, n * BUF_SIZE, RO if net and ring.index % 2 and self.iommu_prefill is None else RW)

    @property
    def hdr_len(self) -> int:
        if self.features & ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF)):
            return NET_HDR_LEN
        return NET_HDR_LEN_LEGACY

    def setup(self) -> None:
        """Negotiate, share memory, lay out and start every ring."""
        self.negotiate()
        self.setup_rings()
        self.start()

    def setup_rings(self) -> None:
        """Lay every ring out in guest RAM (and map it in the vIOMMU)."""
        n = self.queue_size
        for i in range(self.num_queues):
            if self.want_packed:
                self.rings.append(frontend_packed.new_ring(self.ram, i, n))  # type: ignore[arg-type]  # same use
                self.rings[-1].d[D_EVENT_IDX] = 1 if self.features & (1 << VIRTIO_RING_F_EVENT_IDX) else 0
                self.rings[-1].d[D_HDR] = self.hdr_len
                continue
            desc = self.ram.alloc(desc_bytes(n), PAGE)
            avail = self.ram.alloc(avail_bytes(n), 64)
            used = self.ram.alloc(used_bytes(n), PAGE)
            bufs = self.ram.alloc(n * BUF_SIZE, PAGE)
            ring = DriverRing(
                i,
                n,
                desc,
                avail,
                used,
                bufs,
                self.ram,
                os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
                os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
            )
            ring.d[D_EVENT_IDX] = 1 if self.features & (1 << VIRTIO_RING_F_EVENT_IDX) else 0
            ring.d[D_HDR] = self.hdr_len
            ring.avail[0] = VRING_AVAIL_F_NO_INTERRUPT  # a polling driver
            self.rings.append(ring)
        if self.viommu is not None:
            for ring in self.rings:
                self._map_ring(ring)

    def start(self) -> None:
        """Share memory (and send the vIOMMU's UPDATEs, if asked to up front), start every ring."""
        self.set_mem_table()
        self.share_log()
        if self.viommu is not None and self.iommu_prefill is not None:
            self.viommu.prefill(self.iommu_prefill)
        for ring in self.rings:
            self.start_ring(ring)

    # -- dirty logging (live migration) -----------------------------------------------------------------
    def log_pf(self, offered_pf: int) -> int:
        """LOG_SHMFD if a dirty log is wanted (and VHOST_F_LOG_ALL with it); raise if the back-end lacks them."""
        if not self.want_dirty_log:
            return 0
        if not offered_pf & (1 << PF.LOG_SHMFD):
            raise FrontendError("back-end does not offer VHOST_USER_PROTOCOL_F_LOG_SHMFD")
        return 1 << PF.LOG_SHMFD

    def share_log(self) -> None:
        """With ``dirty_log``: a log sized for guest memory, handed over by SET_LOG_BASE (logging still off)."""
        if not self.want_dirty_log:
            return
        if self.log is None:
            self.log = FrontendLog(self.ram.gpa_base + self.ram.size)
        self.log.set_base(self.sock)

    def set_logging(self, on: bool) -> None:
        """Switch ``VHOST_F_LOG_ALL`` on or off by SET_FEATURES while the rings run (the back-end quiesces,
        switches, resumes), then give each running ring its log address (SET_VRING_ADDR), as QEMU does."""
        if self.log is None:
            raise FrontendError("no dirty log shared (Frontend(dirty_log=True))")
        bit = 1 << P.VHOST_F_LOG_ALL
        self.features = self.features | bit if on else self.features & ~bit
        self.command(R.SET_FEATURES, P.U64.pack(self.features))
        for ring in self.rings:
            if not ring.stopped:
                self.set_vring_addr(ring)

    def set_vring_addr(self, ring: DriverRing) -> None:
        """SET_VRING_ADDR; while logging, with VHOST_VRING_F_LOG and the used (device) area's guest address."""
        a = self.ring_addr(ring)
        flags, log_addr = a.flags, a.log
        if self.features & (1 << P.VHOST_F_LOG_ALL):  # the log address is guest-physical, even behind a vIOMMU
            flags |= 1 << P.VHOST_VRING_F_LOG
            used_off = ring.device_off if isinstance(ring, frontend_packed.PackedDriverRing) else ring.used_off
            log_addr = self.ram.gpa(used_off)
        self.command(R.SET_VRING_ADDR, P.VRING_ADDR.pack(ring.index, flags, a.desc, a.used, a.avail, log_addr))

    def slots_pf(self) -> int:
        """CONFIGURE_MEM_SLOTS when guest RAM is shared as more than one region."""
        return 1 << PF.CONFIGURE_MEM_SLOTS if self.ram.nregions > 1 else 0

    def set_mem_table(self) -> None:
        """Share guest RAM: in several regions with CONFIGURE_MEM_SLOTS, one ADD_MEM_REG per region (after
        removing those sent before on this connection); else one SET_MEM_TABLE."""
        regions = self.ram.regions()
        if self.protocol_features & (1 << PF.CONFIGURE_MEM_SLOTS) and len(regions) > 1:
            most = P.U64.unpack(self.request(R.GET_MAX_MEM_SLOTS))[0]
            if len(regions) > most:
                raise FrontendError(f"{len(regions)} regions, the back-end takes {most} memory slots")
            if self.regions_sent_on is self.sock:
                for r in regions:
                    self.command(R.REM_MEM_REG, P.SINGLE_REGION_HDR.pack(0) + r.pack())
            for r in regions:
                self.command(R.ADD_MEM_REG, P.SINGLE_REGION_HDR.pack(0) + r.pack(), [self.ram.fd])
            self.regions_sent_on = self.sock
            return
        if len(regions) > P.MEMORY_BASELINE_NREGIONS:
            raise FrontendError(f"{len(regions)} regions need CONFIGURE_MEM_SLOTS, which the back-end lacks")
        payload = P.MEM_TABLE_HDR.pack(len(regions), 0) + b"".join(r.pack() for r in regions)
        self.command(R.SET_MEM_TABLE, payload, [self.ram.fd] * len(regions))

    def start_ring(self, ring: DriverRing, base: int | None = None) -> None:
        i = ring.index
        if base is None:
            base = frontend_packed.INITIAL_BASE if self.want_packed else 0
        self.command(R.SET_VRING_NUM, P.VRING_STATE.pack(i, ring.size))
        self.command(R.SET_VRING_BASE, P.VRING_STATE.pack(i, base))
        self.set_vring_addr(ring)
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
            self.ram.buf[off : off + hdr] = 0
            self.ram.buf[off + hdr : off + hdr + len(frame)] = frame
        return hdr + len(frame)

    def run(
        self,
        direction: str,
        seconds: float = 0.0,
        count: int = -1,
        pkt_size: int = 64,
        pair: int = 0,
        warmup: float = 0.0,
        batch: int = 64,
        timeout: float = 30.0,
    ) -> dict:
        """Transmit (``tx``) or receive (``rx``) on queue pair ``pair`` for ``seconds`` or until ``count``
        completions (counted from this call); return counts and the rate measured after ``warmup``."""
        ring = self.rings[2 * pair + (1 if direction == "tx" else 0)]
        ring.d[D_BATCH] = batch
        done0 = int(ring.d[D_DONE])
        ring.d[D_LIMIT] = ring.d[D_POSTED] + count if count >= 0 else -1
        gpa = self.buf_addr(ring)
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
        return {
            "direction": direction,
            "packets": done,
            "posted": int(ring.d[D_POSTED]),
            "bytes": int(ring.d[D_BYTES]),
            "kicks": int(ring.d[D_KICKS]),
            "len_errors": int(ring.d[D_LEN_ERRORS]),
            "seconds": secs,
            "mpps": measured / secs / 1e6 if secs > 0 else 0.0,
            "first_completion_s": first_at,
            "first_completion_at": None if first_at is None else t0 + first_at,
        }

    def _kernels(self):
        """The compiled driver loops (TX, RX) for this front-end's ring layout."""
        if self.want_packed:
            return frontend_packed.drive_tx, frontend_packed.drive_rx
        return drive_tx, drive_rx

    def drain(self, direction: str, pair: int = 0) -> dict:
        """Stop the ring (GET_VRING_BASE: the back-end finishes and stops), then take back every completion
        it published.  After this, ``packets`` is exact: what the back-end processed."""
        ring = self.rings[2 * pair + (1 if direction == "tx" else 0)]
        base = self.stop_ring(ring)
        ring.d[D_LIMIT] = ring.d[D_POSTED]  # post nothing more
        gpa = self.buf_addr(ring)
        tx_k, rx_k = self._kernels()
        if direction == "tx":
            tx_k(*ring.views(), gpa, 0, 1)
        else:
            rx_k(*ring.views(), gpa, 1)
        return {
            "packets": int(ring.d[D_DONE]),
            "posted": int(ring.d[D_POSTED]),
            "bytes": int(ring.d[D_BYTES]),
            "base": base,
        }

    def close(self, stop_rings: bool = True) -> None:
        if stop_rings:
            for ring in self.rings:
                if ring.stopped:
                    continue
                try:
                    self.stop_ring(ring)
                except (OSError, P.ProtocolError, P.ConnectionClosed) as e:
                    log.warning("GET_VRING_BASE %d: %s", ring.index, e)
        if self.viommu is not None:
            self.viommu.close()
        self.sock.close()
        for ring in self.rings:
            ring.close()
        self.rings = []
        self.ram.close()
        if self.log is not None:
            self.log.close()
            self.log = None

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc) -> None:
        self.close(stop_rings=exc[0] is None)


def warm_up() -> None:
    """Compile (or load from cache) the driver kernels before connecting, off the measured path."""
    ram = GuestRam(1 << 20)
    try:
        ring = DriverRing(
            0,
            4,
            ram.alloc(64, PAGE),
            ram.alloc(14),
            ram.alloc(38, PAGE),
            ram.alloc(4 * BUF_SIZE, PAGE),
            ram,
            os.eventfd(0),
            os.eventfd(0),
        )
        drive_tx(*ring.views(), ring.buf_gpa(0), 64, 0)
        drive_rx(*ring.views(), ring.buf_gpa(0), 0)
        ring.close()
    finally:
        ram.close()
    frontend_packed.warm_up()

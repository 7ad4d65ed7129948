"""A virtio-blk driver over vhost-user (pyvhost's front-end for block devices).

It negotiates the blk features, reads the config space, hands the back-end an inflight area (GET/SET_INFLIGHT_FD,
as QEMU does), lays out its rings and request buffers in a memfd, and issues requests: each request slot ``s``
of a queue owns descriptors ``3s`` (16-byte header, device-readable), ``3s+1`` (data) and ``3s+2`` (status
byte, device-writable), so a completion's head names its slot.  Completions are taken from the used ring,
checked (a head that is not outstanding, a completion seen twice, a status never written) and returned.

When the back-end dies, :meth:`reconnect` does what QEMU does with ``reconnect=1``: connect again, negotiate,
give the same memory and the same inflight area, and restart each ring at the driver's view of the used index;
the requests still outstanding are the back-end's to resubmit.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field

import numpy as np

from .. import protocol as P
from ..atomic import fence_full, store_release
from ..devices.base import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1
from ..devices.blk import (
    DISCARD_WZ,
    OUTHDR,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_CONFIG_WCE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from ..jit import kernel
from ..protocol import ProtocolFeature as PF
from ..protocol import Request as R
from ..ring import inflight as INF
from ..ring.packed import VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED, ring_bytes
from ..ring.split import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    avail_bytes,
    desc_bytes,
    used_bytes,
)
from .net import Frontend, FrontendError
from .packed import PackedDriverRing
from .ram import PAGE
from .split import DriverRing

log = logging.getLogger(__name__)

BLK_FEATURES = (
    (1 << VIRTIO_BLK_F_SIZE_MAX)
    | (1 << VIRTIO_BLK_F_SEG_MAX)
    | (1 << VIRTIO_BLK_F_BLK_SIZE)
    | (1 << VIRTIO_BLK_F_FLUSH)
    | (1 << VIRTIO_BLK_F_RO)
    | (1 << VIRTIO_BLK_F_MQ)
    | (1 << VIRTIO_BLK_F_DISCARD)
    | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
    | (1 << VIRTIO_BLK_F_CONFIG_WCE)
)
#: bytes of config space read: up to write_zeroes_may_unmap (every back-end's struct has at least these)
CONFIG_READ = 60
CONFIG_FIELDS = (
    "capacity",
    "size_max",
    "seg_max",
    "cylinders",
    "heads",
    "sectors",
    "blk_size",
    "physical_block_exp",
    "alignment_offset",
    "min_io_size",
    "opt_io_size",
    "writeback",
    "unused0",
    "num_queues",
    "max_discard_sectors",
    "max_discard_seg",
    "discard_sector_alignment",
    "max_write_zeroes_sectors",
    "max_write_zeroes_seg",
    "write_zeroes_may_unmap",
)
STATUS_UNSET = 0xFF


@kernel
def _publish(avail, used16, idx):
    """Release-store the avail index, then (after a full fence) read the device's used flags."""
    store_release(avail, 1, np.uint16(idx))
    fence_full()
    return np.int64(used16[0])


@dataclass
class Completion:
    tag: object
    status: int
    length: int
    rtype: int
    sector: int
    slot: int


@dataclass
class BlkQueue:
    """Driver state of one request queue."""

    ring: DriverRing
    slots: int
    hdr_off: int
    status_off: int
    data_off: int
    max_io: int
    free: list[int] = field(default_factory=list)
    busy: dict[int, tuple] = field(default_factory=dict)  # slot -> (tag, rtype, sector, nbytes)
    avail_idx: int = 0
    published: int = 0
    last_used: int = 0
    #: packed rings: the avail and used cursors (position, wrap counter), the descriptors written but not yet
    #: made available ((position, second word), in order), and the descriptors each slot's chain took
    pos: int = 0
    wrap: int = 1
    used_pos: int = 0
    used_wrap: int = 1
    pending: list[tuple[int, int]] = field(default_factory=list)
    ndesc: dict[int, int] = field(default_factory=dict)


class BlkFrontend(Frontend):
    """Driver side of one vhost-user connection to a block device."""

    def __init__(
        self,
        socket_path: str,
        *,
        queue_size: int = 128,
        num_queues: int = 1,
        max_io: int = 128 << 10,
        inflight: bool = True,
        poll: bool = False,
        connect_timeout: float = 10.0,
        dirty_log: bool = False,
        iommu: bool = False,
        regions: int = 1,
        packed: bool = False,
    ) -> None:
        """``packed``: packed rings (VIRTIO_F_RING_PACKED; a slot's buffer id is the slot).
        ``regions``: guest RAM shared as that many regions (see ``Frontend``).  ``iommu``: play a vIOMMU
        (frontend/iommu.py): every address the back-end sees is an IOVA, and the driver reaches
        headers, data and status through the vIOMMU's page table (pages may be remapped)."""
        slots = queue_size // 3
        per_queue = (
            desc_bytes(queue_size)
            + avail_bytes(queue_size)
            + used_bytes(queue_size)
            + 3 * PAGE
            + slots * (16 + 1 + max_io)
            + 2 * PAGE
        )
        ram = -(-(per_queue * num_queues + (1 << 20)) // (2 << 20)) * (2 << 20)
        super().__init__(
            socket_path,
            queue_size=queue_size,
            ram_size=ram,
            event_idx=False,
            mrg_rxbuf=False,
            connect_timeout=connect_timeout,
            num_queues=num_queues,
            dirty_log=dirty_log,
            iommu=iommu,
            regions=regions,
            packed=packed,
        )
        self.max_io = max_io
        self.want_inflight = inflight
        self.poll = poll
        self.queues: list[BlkQueue] = []
        self.config: dict[str, int] = {}
        self.inflight_fd: int | None = None
        self.inflight_desc = (0, 0)  # mmap_size, mmap_offset
        #: problems seen in the used ring (spurious or repeated completions, unwritten status)
        self.anomalies: list[str] = []
        self.reconnects = 0

    # -- set-up -----------------------------------------------------------------------------------------
    def negotiate(self) -> None:
        self.features = self.protocol_features = 0  # a new connection: nothing is negotiated (no REPLY_ACK yet)
        self.command(R.SET_OWNER)
        offered = P.U64.unpack(self.request(R.GET_FEATURES))[0]
        if not offered & (1 << VIRTIO_F_VERSION_1):
            raise FrontendError(f"back-end does not offer VIRTIO_F_VERSION_1 (features {offered:#x})")
        want = (1 << VIRTIO_F_VERSION_1) | (1 << P.VHOST_USER_F_PROTOCOL_FEATURES) | BLK_FEATURES
        if self.want_iommu:
            if not offered & (1 << VIRTIO_F_ACCESS_PLATFORM):
                raise FrontendError(f"back-end does not offer VIRTIO_F_ACCESS_PLATFORM (features {offered:#x})")
            want |= 1 << VIRTIO_F_ACCESS_PLATFORM
        if self.want_packed:
            if not offered & (1 << VIRTIO_F_RING_PACKED):
                raise FrontendError(f"back-end does not offer VIRTIO_F_RING_PACKED (features {offered:#x})")
            want |= 1 << VIRTIO_F_RING_PACKED
        self.features = want & offered
        if self.features & (1 << P.VHOST_USER_F_PROTOCOL_FEATURES):
            pf = P.U64.unpack(self.request(R.GET_PROTOCOL_FEATURES))[0]
            mine = (1 << PF.REPLY_ACK) | (1 << PF.MQ) | (1 << PF.CONFIG) | self.slots_pf()
            if self.want_inflight:
                mine |= 1 << PF.INFLIGHT_SHMFD
            if self.want_iommu:
                mine |= 1 << PF.BACKEND_REQ
            self.protocol_features = pf & (mine | self.log_pf(pf))
            P.send_message(self.sock, R.SET_PROTOCOL_FEATURES, P.U64.pack(self.protocol_features))
            if self.want_iommu:
                self.start_viommu()
            if self.protocol_features & (1 << PF.MQ):
                nq = P.U64.unpack(self.request(R.GET_QUEUE_NUM))[0]
                if nq < self.num_queues:
                    raise FrontendError(f"back-end has {nq} queues, {self.num_queues} wanted")
        self.command(R.SET_FEATURES, P.U64.pack(self.features))

    def read_config(self) -> dict[str, int]:
        if not self.protocol_features & (1 << PF.CONFIG):
            raise FrontendError("back-end does not offer VHOST_USER_PROTOCOL_F_CONFIG")
        reply = self.request(R.GET_CONFIG, P.CONFIG_HDR.pack(0, CONFIG_READ, 0) + bytes(CONFIG_READ))
        data = reply[P.CONFIG_HDR.size :]
        if len(data) < CONFIG_READ:
            raise FrontendError(f"GET_CONFIG answered {len(data)} bytes")
        values = struct.unpack_from("<QII HBB I BBHI BBH IIIII B", data)
        return dict(zip(CONFIG_FIELDS, values))

    def setup(self) -> None:
        """Negotiate, read the config, share memory and the inflight area, lay out and start every queue."""
        self.negotiate()
        self.config = self.read_config()
        n = self.queue_size
        for i in range(self.num_queues):
            slots = n // 3
            if self.want_packed:
                pdesc = self.ram.alloc(ring_bytes(n), PAGE)
                driver, device = self.ram.alloc(4, 64), self.ram.alloc(4, 64)
                hdr = self.ram.alloc(16 * slots, 64)
                status = self.ram.alloc(slots, 64)
                data = self.ram.alloc(slots * self.max_io, PAGE)
                kick, call = (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2))
                pring = PackedDriverRing(i, n, pdesc, driver, device, data, self.ram, kick, call)
                if not self.poll:
                    pring.driver[1] = 0  # RING_EVENT_FLAGS_ENABLE: a call for every used batch
                self.rings.append(pring)  # type: ignore[arg-type]  # the same use as a split ring
                self.queues.append(BlkQueue(pring, slots, hdr, status, data, self.max_io, list(range(slots))[::-1]))  # type: ignore[arg-type]
                if self.viommu is not None:
                    self.viommu.map(pdesc, ring_bytes(n))
                    self.viommu.map(driver, device + 4 - driver)
                    self.viommu.map(hdr, status + slots - hdr)
                    self.viommu.map(data, slots * self.max_io)
                continue
            desc = self.ram.alloc(desc_bytes(n), PAGE)
            avail = self.ram.alloc(avail_bytes(n), 64)
            used = self.ram.alloc(used_bytes(n), PAGE)
            hdr = self.ram.alloc(16 * slots, 64)
            status = self.ram.alloc(slots, 64)
            data = self.ram.alloc(slots * self.max_io, PAGE)
            ring = DriverRing(
                i,
                n,
                desc,
                avail,
                used,
                data,
                self.ram,
                os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
                os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
            )
            ring.avail[0] = VRING_AVAIL_F_NO_INTERRUPT if self.poll else 0
            self.rings.append(ring)
            self.queues.append(BlkQueue(ring, slots, hdr, status, data, self.max_io, list(range(slots))[::-1]))
            if self.viommu is not None:
                for off, size in ((desc, desc_bytes(n)), (avail, avail_bytes(n)), (used, used_bytes(n))):
                    self.viommu.map(off, size)
                self.viommu.map(hdr, status + slots - hdr)  # headers and status bytes
                self.viommu.map(data, slots * self.max_io)
        self.setup_inflight()
        self.set_mem_table()
        self.share_log()
        for ring in self.rings:
            self.start_ring(ring)

    def setup_inflight(self) -> None:
        """GET_INFLIGHT_FD the first time, then SET_INFLIGHT_FD with that area (again after each reconnect)."""
        if not self.protocol_features & (1 << PF.INFLIGHT_SHMFD):
            return
        if self.inflight_fd is None:
            P.send_message(self.sock, R.GET_INFLIGHT_FD, INF.pack_description(0, 0, self.num_queues, self.queue_size))
            reply = P.recv_reply(self.sock, R.GET_INFLIGHT_FD)
            size, offset, _nq, _qs = INF.unpack_description(reply.payload)
            if not size or len(reply.fds) != 1:
                reply.close_fds()
                log.warning("back-end gave no inflight area")
                return
            self.inflight_fd = reply.take_fd(0)
            self.inflight_desc = (size, offset)
        size, offset = self.inflight_desc
        self.command(
            R.SET_INFLIGHT_FD, INF.pack_description(size, offset, self.num_queues, self.queue_size), [self.inflight_fd]
        )

    # -- back-end restarts --------------------------------------------------------------------------------
    def backend_alive(self) -> bool:
        """False once the back-end has closed the connection (it crashed or exited)."""
        ready, _, _ = select.select([self.sock], [], [], 0)
        if not ready:
            return True
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    def reconnect(self, timeout: float = 60.0) -> None:
        """Connect to the (restarted) back-end and give it everything again, as QEMU does after a crash: the
        same memory, the same inflight area, each ring restarted at the used index the driver sees."""
        self.sock.close()
        self.sock = self._connect(self.socket_path, timeout)
        self.negotiate()
        self.setup_inflight()
        self.set_mem_table()
        self.share_log()
        for ring in self.rings:
            self.start_ring(ring, base=int(ring.used16[1]))
        self.reconnects += 1

    # -- requests ---------------------------------------------------------------------------------------
    def capacity(self) -> int:
        return self.config["capacity"]

    def free_slots(self, queue: int = 0) -> int:
        return len(self.queues[queue].free)

    def outstanding(self, queue: int = 0) -> dict[int, tuple]:
        return self.queues[queue].busy

    def post(
        self,
        rtype: int,
        sector: int,
        nbytes: int = 0,
        data: bytes | None = None,
        queue: int = 0,
        tag: object = None,
        publish: bool = True,
    ) -> int:
        """Queue one request (data written into its slot for a write) and return its slot."""
        bq = self.queues[queue]
        if not bq.free:
            raise FrontendError(f"queue {queue}: no free request slot")
        if data is not None:
            nbytes = len(data)
        if nbytes > bq.max_io:
            raise FrontendError(f"request of {nbytes} bytes over the slot size {bq.max_io}")
        s = bq.free.pop()
        ring = bq.ring
        h_off, st_off, d_off = bq.hdr_off + 16 * s, bq.status_off + s, bq.data_off + s * bq.max_io
        self._put(h_off, OUTHDR.pack(rtype, 0, sector))
        self._put(st_off, bytes([STATUS_UNSET]))
        if data is not None:
            self._put(d_off, data)
        if self.want_packed:
            segs = [(h_off, 16, False)]
            if nbytes:
                segs.append((d_off, nbytes, rtype in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID)))
            segs.append((st_off, 1, True))
            self._post_packed(bq, s, segs)
            bq.busy[s] = (tag, rtype, sector, nbytes)
            if publish:
                self.publish(queue)
            return s
        desc = ring.desc
        d0, d1, d2 = 3 * s, 3 * s + 1, 3 * s + 2
        desc[2 * d0] = self.dma(h_off)
        if nbytes:
            wflag = VRING_DESC_F_WRITE if rtype in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID) else 0
            desc[2 * d0 + 1] = 16 | (VRING_DESC_F_NEXT << 32) | (d1 << 48)
            desc[2 * d1] = self.dma(d_off)
            desc[2 * d1 + 1] = nbytes | ((VRING_DESC_F_NEXT | wflag) << 32) | (d2 << 48)
        else:
            desc[2 * d0 + 1] = 16 | (VRING_DESC_F_NEXT << 32) | (d2 << 48)
        desc[2 * d2] = self.dma(st_off)
        desc[2 * d2 + 1] = 1 | (VRING_DESC_F_WRITE << 32)
        ring.avail[2 + (bq.avail_idx & (ring.size - 1))] = d0
        bq.avail_idx = (bq.avail_idx + 1) & 0xFFFF
        bq.busy[s] = (tag, rtype, sector, nbytes)
        if publish:
            self.publish(queue)
        return s

    def post_chain(
        self,
        segments: list[tuple[str, int, bool]],
        header: bytes = b"",
        data: bytes = b"",
        queue: int = 0,
        tag: object = "raw",
    ) -> int:
        """A hand-made (possibly malformed) request for tests: up to 3 ``(area, length, device_writable)``
        segments, ``area`` one of ``hdr`` (at most 16 bytes), ``data``, ``status`` (at most 1) of the slot."""
        bq = self.queues[queue]
        s = bq.free.pop()
        desc = bq.ring.desc
        areas = {
            "hdr": (bq.hdr_off + 16 * s, 16),
            "data": (bq.data_off + s * bq.max_io, bq.max_io),
            "status": (bq.status_off + s, 1),
        }
        self._put(areas["hdr"][0], header)
        self._put(areas["data"][0], data)
        self._put(areas["status"][0], bytes([STATUS_UNSET]))
        if self.want_packed:
            segs = []
            for area, length, writable in segments:
                off, room = areas[area]
                assert length <= room, (area, length)
                segs.append((off, length, writable))
            self._post_packed(bq, s, segs)
            bq.busy[s] = (tag, -1, 0, 0)
            self.publish(queue)
            return s
        for k, (area, length, writable) in enumerate(segments):
            off, room = areas[area]
            assert length <= room, (area, length)
            d = 3 * s + k
            more = k + 1 < len(segments)
            flags = (VRING_DESC_F_NEXT if more else 0) | (VRING_DESC_F_WRITE if writable else 0)
            desc[2 * d] = self.dma(off)
            desc[2 * d + 1] = length | (flags << 32) | ((d + 1 if more else 0) << 48)
        bq.ring.avail[2 + (bq.avail_idx & (bq.ring.size - 1))] = 3 * s
        bq.avail_idx = (bq.avail_idx + 1) & 0xFFFF
        bq.busy[s] = (tag, -1, 0, 0)
        self.publish(queue)
        return s

    def _post_packed(self, bq: BlkQueue, s: int, segs: list[tuple[int, int, bool]]) -> None:
        """Slot ``s``'s chain of ``(offset, length, device_writable)`` segments at the avail cursor of a
        packed ring, buffer id ``s``; made available by ``publish``."""
        ring = bq.ring
        for k, (off, length, writable) in enumerate(segs):
            flags = (VRING_DESC_F_NEXT if k + 1 < len(segs) else 0) | (VRING_DESC_F_WRITE if writable else 0)
            flags |= VRING_PACKED_DESC_F_AVAIL if bq.wrap else VRING_PACKED_DESC_F_USED
            ring.desc[2 * bq.pos] = self.dma(off)
            bq.pending.append((bq.pos, length | (s << 32) | (flags << 48)))
            bq.pos += 1
            if bq.pos == ring.size:
                bq.pos, bq.wrap = 0, bq.wrap ^ 1
        bq.ndesc[s] = len(segs)

    def publish(self, queue: int = 0) -> None:
        """Make the posted requests visible and kick the device unless it said it is polling."""
        bq = self.queues[queue]
        if self.want_packed:  # every descriptor but the first, then the first: the device sees whole chains
            if not bq.pending:
                return
            for pos, word in bq.pending[::-1]:
                bq.ring.desc[2 * pos + 1] = word
            bq.pending.clear()
            os.eventfd_write(bq.ring.kick_fd, 1)
            return
        if bq.published == bq.avail_idx:
            return
        bq.published = bq.avail_idx
        flags = _publish(bq.ring.avail, bq.ring.used16, bq.avail_idx)
        if not flags & VRING_USED_F_NO_NOTIFY:
            os.eventfd_write(bq.ring.kick_fd, 1)

    def reap(self, queue: int = 0) -> list[Completion]:
        """Completions published since the last call, checked against what is outstanding."""
        bq = self.queues[queue]
        if self.want_packed:
            return self._reap_packed(queue, bq)
        ring = bq.ring
        used = int(ring.used16[1])
        out = []
        mask = ring.size - 1
        status_mm = self.ram.buf
        while bq.last_used != used:
            e = bq.last_used & mask
            head, length = int(ring.used32[1 + 2 * e]), int(ring.used32[2 + 2 * e])
            bq.last_used = (bq.last_used + 1) & 0xFFFF
            s = head // 3
            if head % 3 or s >= bq.slots or s not in bq.busy:
                self.anomalies.append(f"queue {queue}: completion of head {head} that is not outstanding")
                continue
            tag, rtype, sector, _n = bq.busy.pop(s)
            status = (
                self._get(bq.status_off + s, 1)[0] if self.viommu is not None else int(status_mm[bq.status_off + s])
            )
            if status == STATUS_UNSET and rtype >= 0:
                self.anomalies.append(f"queue {queue}: request {tag!r} completed without a status")
            out.append(Completion(tag, status, length, rtype, sector, s))
            bq.free.append(s)
        return out

    def _reap_packed(self, queue: int, bq: BlkQueue) -> list[Completion]:
        """``reap`` on a packed ring: used descriptors from the used cursor, each moving it by the descriptors of
        its chain (a buffer id that is not outstanding is an anomaly and stops the reaping)."""
        ring = bq.ring
        out: list[Completion] = []
        both = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED
        while True:
            word = int(ring.desc[2 * bq.used_pos + 1])
            if (word >> 48) & both != (both if bq.used_wrap else 0):
                return out
            s, length = (word >> 32) & 0xFFFF, word & 0xFFFFFFFF
            if s not in bq.busy:
                self.anomalies.append(f"queue {queue}: completion of buffer id {s} that is not outstanding")
                return out
            tag, rtype, sector, _n = bq.busy.pop(s)
            status = self._get(bq.status_off + s, 1)[0]
            if status == STATUS_UNSET and rtype >= 0:
                self.anomalies.append(f"queue {queue}: request {tag!r} completed without a status")
            out.append(Completion(tag, status, length, rtype, sector, s))
            bq.free.append(s)
            bq.used_pos += bq.ndesc.pop(s)
            if bq.used_pos >= ring.size:
                bq.used_pos, bq.used_wrap = bq.used_pos - ring.size, bq.used_wrap ^ 1

    def data(self, c: Completion, nbytes: int, queue: int = 0) -> bytes:
        """The data buffer of a completed request's slot (valid until the slot is reused)."""
        off = self.queues[queue].data_off + c.slot * self.max_io
        return self._get(off, nbytes)

    # -- guest RAM as the device sees it --------------------------------------------------------------------
    def dma(self, off: int) -> int:
        """The address a descriptor gives for RAM offset ``off``: guest-physical, or its IOVA."""
        return self.ram.gpa(off) if self.viommu is None else self.viommu.iova(off)

    def _pieces(self, off: int, n: int) -> list[tuple[int, int]]:
        """(RAM offset, length) of [off, off+n) as the device reaches it (through the vIOMMU's pages)."""
        if self.viommu is None:
            return [(off, n)]
        out, at, end = [], off, off + n
        while at < end:
            take = min(end, (at // PAGE + 1) * PAGE) - at
            ram_off = self.viommu.resolve(self.viommu.iova(at))
            if ram_off is None:
                raise FrontendError(f"RAM offset {at:#x} is not mapped in the vIOMMU")
            out.append((ram_off, take))
            at += take
        return out

    def _put(self, off: int, data: bytes) -> None:
        done = 0
        for ram_off, n in self._pieces(off, len(data)):
            self.ram.mm[ram_off : ram_off + n] = data[done : done + n]
            done += n

    def _get(self, off: int, n: int) -> bytes:
        return b"".join(bytes(self.ram.mm[o : o + k]) for o, k in self._pieces(off, n))

    def wait(self, queue: int = 0, timeout: float = 10.0) -> list[Completion]:
        """Completions, waiting (on the call fd, or polling) until there is at least one."""
        deadline = time.monotonic() + timeout
        ring = self.queues[queue].ring
        while True:
            done = self.reap(queue)
            if done:
                return done
            if time.monotonic() > deadline:
                raise FrontendError(
                    f"queue {queue}: no completion in {timeout} s ({len(self.queues[queue].busy)} outstanding)"
                )
            if self.poll:
                continue
            ready, _, _ = select.select([ring.call_fd], [], [], 0.05)
            if ready:
                try:
                    os.eventfd_read(ring.call_fd)
                except BlockingIOError:
                    pass

    def io(
        self, rtype: int, sector: int, nbytes: int = 0, data: bytes | None = None, queue: int = 0, timeout: float = 10.0
    ) -> tuple[int, bytes, int]:
        """One request, waited for: (status, data read, used length)."""
        s = self.post(rtype, sector, nbytes, data, queue, tag="io")
        while True:
            for c in self.wait(queue, timeout):
                if c.slot == s:
                    out = self.data(c, nbytes, queue) if rtype in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID) else b""
                    return c.status, out, c.length

    def read(self, sector: int, nbytes: int, queue: int = 0) -> tuple[int, bytes]:
        status, data, _ = self.io(VIRTIO_BLK_T_IN, sector, nbytes, queue=queue)
        return status, data

    def write(self, sector: int, data: bytes, queue: int = 0) -> int:
        return self.io(VIRTIO_BLK_T_OUT, sector, data=data, queue=queue)[0]

    def flush(self, queue: int = 0) -> int:
        return self.io(VIRTIO_BLK_T_FLUSH, 0, queue=queue)[0]

    def get_id(self, queue: int = 0) -> tuple[int, bytes]:
        status, data, _ = self.io(VIRTIO_BLK_T_GET_ID, 0, 20, queue=queue)
        return status, data

    def discard(self, rtype: int, ranges: list[tuple[int, int, int]], queue: int = 0) -> int:
        """DISCARD or WRITE_ZEROES of (sector, num_sectors, flags) ranges."""
        payload = b"".join(DISCARD_WZ.pack(*r) for r in ranges)
        return self.io(rtype, 0, data=payload, queue=queue)[0]

    def close(self, stop_rings: bool = True) -> None:
        super().close(stop_rings)
        if self.inflight_fd is not None:
            os.close(self.inflight_fd)
            self.inflight_fd = None

    def __enter__(self) -> BlkFrontend:
        return self

"""pyvhost's front-end playing a virtual IOMMU: IOVAs for rings and buffers, IOTLB UPDATE/INVALIDATE, MISS answers.

With ``iommu=True`` a front-end (``Frontend``, ``BlkFrontend``) negotiates ``VIRTIO_F_ACCESS_PLATFORM`` with
``VHOST_USER_PROTOCOL_F_BACKEND_REQ`` and ``REPLY_ACK``, gives the back-end a backend channel
(``SET_BACKEND_REQ_FD``), and names its rings and buffers by IOVAs that differ from their guest-physical
addresses (``IOVA_BASE`` + the RAM offset, unless remapped).  :class:`Viommu` is the page table: each IOVA page
maps one page of guest RAM with a permission.  It answers the back-end's MISS messages with UPDATEs of the
entry holding the IOVA -- ``grain`` bytes of IOVA space at most, contiguous in RAM -- the way QEMU's
intel-iommu answers a device IOTLB miss, and can send UPDATEs unasked (:meth:`Viommu.prefill`), invalidate
(:meth:`Viommu.invalidate`, which returns once the back-end acknowledged) and remap pages while traffic runs.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import socket
import threading
from collections.abc import Callable

from .. import protocol as P
from ..protocol import BackendRequest
from .ram import PAGE, GuestRam

log = logging.getLogger(__name__)

#: IOVA of RAM offset 0 (the front-end's guest-physical addresses start at ram.GPA_BASE: a back-end mixing
#: them up with IOVAs fails at once).
IOVA_BASE = 0x20_0000_0000
RO, WO, RW = P.VHOST_ACCESS_RO, P.VHOST_ACCESS_WO, P.VHOST_ACCESS_RW


class Viommu:
    """IOVA pages -> guest RAM pages with permissions; the backend channel's reader that answers MISS."""

    def __init__(
        self,
        ram: GuestRam,
        send: Callable[[P.IotlbMsg], None],
        grain: int = PAGE,
        iova_base: int = IOVA_BASE,
    ) -> None:
        """``send`` sends one IOTLB_MSG on the main channel and waits for its REPLY_ACK (the front-end's
        command); ``grain`` is the largest UPDATE a MISS is answered with (a multiple of the page size)."""
        if grain % PAGE or grain <= 0:
            raise ValueError(f"grain {grain} is not a positive multiple of {PAGE}")
        self.ram = ram
        self.send = send
        self.grain = grain
        self.iova_base = iova_base
        #: IOVA page number -> (RAM offset of the page, VHOST_ACCESS_* permission)
        self.pages: dict[int, tuple[int, int]] = {}
        self.lock = threading.Lock()
        #: held while an answer is worked out and sent, and while a page is unmapped or remapped: an UPDATE
        #: computed from a mapping is on the wire before that mapping can change (and be invalidated)
        self.answer_lock = threading.RLock()
        #: IOVA pages asked for (MISS) while unmapped: answered when they are mapped again (:meth:`remap`)
        self.pending: set[int] = set()
        self.misses = 0  # MISS messages received
        #: MISS messages received per IOVA page
        self.asked: collections.Counter[int] = collections.Counter()
        self.unanswered = 0  # MISSes for IOVAs not mapped here (or without the permission asked)
        self.access_fails = 0  # ACCESS_FAIL messages received
        self.updates = 0  # UPDATEs sent
        self.invalidations = 0  # INVALIDATEs sent (each acknowledged)
        self.channel: socket.socket | None = None
        self._stop_fd = -1
        self._thread: threading.Thread | None = None

    # -- the page table ----------------------------------------------------------------------------------
    def iova(self, off: int) -> int:
        """The IOVA that RAM offset ``off`` was mapped at by :meth:`map`."""
        return self.iova_base + off

    def map(self, off: int, size: int, perm: int = RW) -> int:
        """Map the pages holding RAM [off, off+size) at their IOVAs (``iova(off)``) with ``perm``; return
        the IOVA of ``off``.  Nothing is sent: the back-end asks (MISS) or :meth:`prefill` tells it."""
        first, last = off // PAGE, (off + size - 1) // PAGE
        with self.lock:
            for page in range(first, last + 1):
                self.pages[self.iova_base // PAGE + page] = (page * PAGE, perm)
        return self.iova(off)

    def remap(self, iova: int, ram_off: int, perm: int = RW, update: bool = False) -> None:
        """Point the IOVA page holding ``iova`` at the RAM page at ``ram_off`` (the caller unmapped and
        invalidated it first, and waited for the ack).  The back-end is told (UPDATE) if ``update`` or if it
        asked for the page meanwhile; otherwise it asks when it needs it."""
        if ram_off % PAGE:
            raise ValueError(f"RAM offset {ram_off:#x} is not page aligned")
        page = iova // PAGE
        with self.answer_lock:
            with self.lock:
                self.pages[page] = (ram_off, perm)
                asked = page in self.pending
                self.pending.discard(page)
            if update or asked:
                upd = self.entry(iova, perm & RO or perm)
                assert upd is not None
                self.update(upd)

    def unmap(self, iova: int, size: int) -> None:
        """Forget [iova, iova+size) (the caller invalidates it next): from here on no UPDATE maps it."""
        with self.answer_lock, self.lock:
            for page in range(iova // PAGE, (iova + size - 1) // PAGE + 1):
                self.pages.pop(page, None)

    def resolve(self, iova: int) -> int | None:
        """The RAM offset ``iova`` points at now, or None."""
        with self.lock:
            hit = self.pages.get(iova // PAGE)
        return None if hit is None else hit[0] + iova % PAGE

    def entry(self, iova: int, perm: int = RO) -> P.IotlbMsg | None:
        """The UPDATE answering a MISS at ``iova``: the grain-aligned run of mapped pages around it that are
        contiguous in RAM with one permission granting ``perm``; None if ``iova`` is not mapped so."""
        page = iova // PAGE
        with self.lock:
            hit = self.pages.get(page)
            if hit is None or hit[1] & perm != perm:
                return None
            per = self.grain // PAGE
            lo = hi = page
            start = page - page % per
            while lo > start and self._follows(lo - 1, lo):
                lo -= 1
            while hi + 1 < start + per and self._follows(hi, hi + 1):
                hi += 1
            ram_off, p = self.pages[lo]
        return P.IotlbMsg(lo * PAGE, (hi - lo + 1) * PAGE, self.ram.uva(ram_off), p, P.VHOST_IOTLB_UPDATE)

    def _follows(self, a: int, b: int) -> bool:
        """IOVA page ``b`` (= a + 1) continues page ``a``: mapped, next in RAM, same permission."""
        pa, pb = self.pages.get(a), self.pages.get(b)
        return pa is not None and pb is not None and pb[0] == pa[0] + PAGE and pb[1] == pa[1]

    def runs(self) -> list[tuple[int, int, int, int]]:
        """Every mapping as maximal runs (iova, size, RAM offset, perm), sorted by IOVA."""
        out: list[tuple[int, int, int, int]] = []
        with self.lock:
            for page in sorted(self.pages):
                off, perm = self.pages[page]
                if (
                    out
                    and out[-1][0] + out[-1][1] == page * PAGE
                    and out[-1][2] + out[-1][1] == off
                    and out[-1][3] == perm
                ):
                    out[-1] = (out[-1][0], out[-1][1] + PAGE, out[-1][2], perm)
                else:
                    out.append((page * PAGE, PAGE, off, perm))
        return out

    def prefill(self, entries: int | None = None) -> int:
        """Send UPDATEs for every mapping unasked, cut into about ``entries`` pieces of equal size (None: one
        per run); return how many were sent."""
        runs = self.runs()
        if entries is not None and entries > len(runs):
            total = sum(r[1] for r in runs) // PAGE
            per = max(1, -(-total // entries))  # pages per entry
            cut = []
            for iova, size, off, perm in runs:
                for k in range(0, size // PAGE, per):
                    n = min(per, size // PAGE - k)
                    cut.append((iova + k * PAGE, n * PAGE, off + k * PAGE, perm))
            runs = cut
        for iova, size, off, perm in runs:
            self.update(P.IotlbMsg(iova, size, self.ram.uva(off), perm, P.VHOST_IOTLB_UPDATE))
        return len(runs)

    # -- messages ------------------------------------------------------------------------------------------
    def update(self, msg: P.IotlbMsg) -> None:
        self.send(msg)
        self.updates += 1

    def invalidate(self, iova: int, size: int) -> None:
        """INVALIDATE [iova, iova+size); returns once the back-end acknowledged it (no access through the old
        translation can happen after that)."""
        self.send(P.IotlbMsg(iova, size, 0, 0, P.VHOST_IOTLB_INVALIDATE))
        self.invalidations += 1

    # -- the backend channel -------------------------------------------------------------------------------
    def channel_pair(self) -> int:
        """Make the backend channel; returns the back-end's end (to send with SET_BACKEND_REQ_FD, then close)
        and starts the thread that reads ours."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.channel = ours
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name="pyvhost-viommu", daemon=True)
        self._thread.start()
        return theirs.detach()

    def _serve(self) -> None:
        assert self.channel is not None
        while True:
            ready, _, _ = select.select([self.channel.fileno(), self._stop_fd], [], [])
            if self._stop_fd in ready:
                return
            try:
                msg = P.recv_message(self.channel)
            except (P.ConnectionClosed, P.ProtocolError, OSError) as e:
                log.info("backend channel closed (%s)", e)
                return
            try:
                self._handle(msg)
            except (P.ProtocolError, OSError) as e:
                log.error("backend channel: %s failed: %s", msg.name, e)
            finally:
                msg.close_fds()

    def _handle(self, msg: P.Message) -> None:
        ok = True
        if msg.request == BackendRequest.IOTLB_MSG:
            m = P.IotlbMsg.unpack(msg.payload, "backend IOTLB_MSG")
            if m.type == P.VHOST_IOTLB_MISS:
                self.misses += 1
                self.asked[m.iova // PAGE] += 1
                with self.answer_lock:
                    upd = self.entry(m.iova, m.perm)
                    if upd is not None:
                        self.update(upd)
                    elif m.iova // PAGE in self.pages:  # mapped, without the permission asked for
                        self.unanswered += 1
                        ok = False
                        log.warning("IOTLB MISS at iova %#x (perm %d): not mapped so", m.iova, m.perm)
                    else:  # not mapped (now): answered if it is mapped again
                        with self.lock:
                            self.pending.add(m.iova // PAGE)
            elif m.type == P.VHOST_IOTLB_ACCESS_FAIL:
                self.access_fails += 1
                log.warning("IOTLB ACCESS_FAIL at iova %#x (perm %d)", m.iova, m.perm)
        else:
            ok = False
            log.warning("backend channel: unexpected request %d", msg.request)
        if msg.need_reply and self.channel is not None:
            P.send_reply(self.channel, msg.request, P.U64.pack(0 if ok else 1))

    def close(self) -> None:
        if self._thread is not None:
            os.eventfd_write(self._stop_fd, 1)
            self._thread.join(5.0)
            self._thread = None
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1
        if self.channel is not None:
            self.channel.close()
            self.channel = None

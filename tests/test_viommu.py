"""vIOMMU (issue 11): pyvhost's front-end plays the IOMMU, the back-end translates IOVAs through its IOTLB.

The front-end names rings and buffers by IOVAs (``frontend/iommu.py``), answers the back-end's MISS messages with
UPDATEs, and invalidates and remaps while traffic runs.  Counts are exact; no error may be logged unless the test
provokes it.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time

import numpy as np
import pytest

from pyvhost import backend
from pyvhost import protocol as P
from pyvhost.bench.peers import parse_testpmd
from pyvhost.devices.blk import BlkDevice
from pyvhost.frontend.blk import BlkFrontend
from pyvhost.frontend.iommu import RO, RW, WO
from pyvhost.frontend.net import Frontend, FrontendError
from pyvhost.frontend.ram import BUF_SIZE, PAGE
from pyvhost.frontend.split import D_DONE
from pyvhost.iotlb import MAX_ENTRIES
from pyvhost.protocol import Request as R
from pyvhost.ring.packed import ring_bytes as packed_ring_bytes
from pyvhost.ring.split import avail_bytes, desc_bytes, used_bytes

from .conftest import needs_dpdk

PATHS = ["direct", "copy"]
TX, RX = 1, 0
TIMEOUT = 30.0


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("metadata", PATHS)
def test_miss_answered_then_traffic_exact(serve, sock_path, errors, metadata, packed):
    """Nothing is mapped up front: every ring part and buffer page is asked for (MISS) and answered (UPDATE)."""
    srv = serve("sink", metadata)
    with Frontend(sock_path, iommu=True, packed=packed, ram_size=8 << 20) as fe:
        fe.setup()
        r = fe.run("tx", count=5000, timeout=TIMEOUT)
        assert r["packets"] == 5000
        d = fe.drain("tx")
        v = fe.viommu
        assert v is not None and v.misses > 0 and v.unanswered == 0 and v.access_fails == 0
        assert d["packets"] == d["posted"]
    stats = srv.ended()[-1]
    assert stats[TX]["packets"] == d["packets"]
    assert errors() == []


# -- the stale-view detector (invariants 6 and 8) ---------------------------------------------------------
POISON = 0xA5  # as a descriptor it points far past ADDR_LIMIT; as an index it jumps past any queue size
SPARES = 48  # spare RAM pages a remap moves an IOVA page to (each checked to be still poison when reused)


class Driver:
    """A front-end ring's driver loop in a background thread that the main thread can hold: while held it
    touches no guest memory, so the main thread may move a ring part to another page."""

    def __init__(self, fe: Frontend, direction: str) -> None:
        self.fe, self.direction = fe, direction
        self.ring = fe.rings[TX if direction == "tx" else RX]
        tx_k, rx_k = fe._kernels()
        addr = fe.buf_addr(self.ring)
        if direction == "tx":
            length = fe.fill_tx_frames(self.ring, 64)
            self.step = lambda: tx_k(*self.ring.views(), addr, length, 16)
        else:
            self.step = lambda: rx_k(*self.ring.views(), addr, 16)
        self.cv = threading.Condition()
        self.want_hold = self.held = self.stopping = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="driver", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                with self.cv:
                    if self.want_hold:
                        self.held = True
                        self.cv.notify_all()
                        self.cv.wait_for(lambda: not self.want_hold or self.stopping)
                        self.held = False
                    if self.stopping:
                        return
                self.step()
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.error = e

    @property
    def done(self) -> int:
        return int(self.ring.d[D_DONE])

    def hold(self) -> None:
        with self.cv:
            self.want_hold = True
            assert self.cv.wait_for(lambda: self.held, TIMEOUT), "driver did not stop"

    def release(self) -> None:
        with self.cv:
            self.want_hold = False
            self.cv.notify_all()

    def wait_progress(self, since: int, why) -> int:
        deadline = time.monotonic() + TIMEOUT
        while self.done <= since:
            assert self.error is None and time.monotonic() < deadline, f"no completion after {since}: {why()}"
            time.sleep(0.0005)
        return self.done

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def ring_pages(fe: Frontend, ring) -> list[str]:
    """The ring's parts that are each one page of their own (the ones a test may move)."""
    return ["desc", "event"] if fe.want_packed else ["desc", "avail", "used"]


def part_offset(fe: Frontend, ring, part: str) -> int:
    if part == "desc":
        return ring.desc_off
    if part == "event":
        return ring.driver_off
    return ring.avail_off if part == "avail" else ring.used_off


def move_part(fe: Frontend, ring, part: str, new_page: int) -> None:
    """Point the driver's views of ``part`` (one page) at RAM page ``new_page`` (same offset in the page)."""
    buf, n = fe.ram.buf, ring.size
    old = part_offset(fe, ring, part)
    new = new_page + old % PAGE
    if fe.want_packed:
        if part == "desc":
            ring.desc_off = new
            ring.desc = buf[new : new + packed_ring_bytes(n)].view(np.uint64)
        else:
            delta = new - ring.driver_off
            ring.driver_off += delta
            ring.device_off += delta
            ring.driver = buf[ring.driver_off : ring.driver_off + 4].view(np.uint16)
            ring.device = buf[ring.device_off : ring.device_off + 4].view(np.uint16)
    elif part == "desc":
        ring.desc_off = new
        ring.desc = buf[new : new + desc_bytes(n)].view(np.uint64)
    elif part == "avail":
        ring.avail_off = new
        ring.avail = buf[new : new + avail_bytes(n)].view(np.uint16)
    else:
        ring.used_off = new
        ring.used16 = buf[new : new + used_bytes(n)].view(np.uint16)
        ring.used32 = buf[new : new + used_bytes(n) - 2].view(np.uint32)


class Remapper:
    """Moves IOVA pages to spare RAM pages: unmap, INVALIDATE (acknowledged), copy, remap, poison the old page.
    Every page a remap left is poison until it is used again; ``stale`` counts the bytes found changed then."""

    def __init__(self, fe: Frontend) -> None:
        self.fe = fe
        assert fe.viommu is not None
        self.v = fe.viommu
        first = fe.ram.alloc(SPARES * PAGE, PAGE)
        self.free = collections.deque(first + k * PAGE for k in range(SPARES))
        fe.ram.buf[first : first + SPARES * PAGE] = POISON
        self.stale = 0
        self.moves = 0

    def take(self) -> int:
        page = self.free.popleft()
        self.stale += int(np.count_nonzero(self.fe.ram.buf[page : page + PAGE] != POISON))
        return page

    def move(self, iova: int, perm: int, before_remap=None, update: bool = False) -> None:
        """Move IOVA page ``iova`` to a spare page; ``before_remap(new_page)`` runs after the ack."""
        buf = self.fe.ram.buf
        old = self.v.resolve(iova)
        assert old is not None and old % PAGE == 0
        new = self.take()
        self.v.unmap(iova, PAGE)
        self.v.invalidate(iova, PAGE)  # returns at the ack: the back-end can no longer reach ``old``
        buf[new : new + PAGE] = buf[old : old + PAGE]
        if before_remap is not None:
            before_remap(new)
        self.v.remap(iova, new, perm, update=update)
        buf[old : old + PAGE] = POISON
        self.free.append(old)
        self.moves += 1

    def check_all(self) -> int:
        """Stale bytes on every page currently poisoned (none may have been written since)."""
        buf = self.fe.ram.buf
        return self.stale + sum(int(np.count_nonzero(buf[p : p + PAGE] != POISON)) for p in self.free)


#: repetitions per case: 2 layouts x 2 paths x 2 targets x REPS = 10,000 invalidate/remap cycles in all
REPS = int(os.environ.get("PYVHOST_VIOMMU_REPS", 1250))


@pytest.mark.parametrize("target", ["ring", "rxbuf"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("metadata", PATHS)
def test_stale_view_detector(serve, sock_path, errors, metadata, packed, target):
    """While traffic runs the front-end invalidates the IOVA page of a ring part (desc, avail, used / desc,
    event areas) or of an RX buffer, waits for the ack, remaps the IOVA to a different page and poisons the old
    one.  A stale read of a ring breaks the queue (poison is no valid index or descriptor); a stale write
    (used entries, packed descriptors, RX data) shows as non-poison bytes.  Half the remaps are told to the
    back-end at once (UPDATE), half wait for its MISS.  Counts are exact."""
    direction = "tx" if target == "ring" else "rx"
    srv = serve("sink" if direction == "tx" else "source", metadata)
    fe = Frontend(sock_path, iommu=True, packed=packed, ram_size=4 << 20, queue_pairs=1)
    try:
        fe.setup()
        remap = Remapper(fe)
        drv = Driver(fe, direction)
        ring = drv.ring
        v = fe.viommu
        assert v is not None
        why = lambda: f"errors {errors()}"  # noqa: E731
        done = drv.wait_progress(0, why)
        parts = ring_pages(fe, ring)
        iovas = {part: ring_iova(fe, ring, part) for part in parts}  # fixed: their pages move
        for rep in range(REPS):
            if target == "ring":
                part = parts[rep % len(parts)]
                iova = iovas[part]
                drv.hold()
                try:
                    remap.move(iova, RW, lambda page: move_part(fe, ring, part, page), update=rep % 2 == 0)
                finally:
                    drv.release()
            else:
                page = (rep * 7) % (ring.size * BUF_SIZE // PAGE)
                remap.move(v.iova(ring.bufs_off) + page * PAGE, RW, update=rep % 2 == 0)
            done = drv.wait_progress(done, why)
        drv.stop()
        assert remap.check_all() == 0, "the back-end wrote pages it had given up"
        final = fe.drain(direction)
        assert v.unanswered == 0 and v.access_fails == 0
    finally:
        fe.close()
    stats = srv.ended()[-1]
    assert stats[TX if direction == "tx" else RX]["packets"] == final["packets"]
    assert errors() == []


def ring_iova(fe: Frontend, ring, part: str) -> int:
    """The IOVA of ``part``'s page: where it was first mapped (the IOVA never moves; its page does)."""
    a = fe.ring_addr(ring)
    if part == "desc":
        return a.desc - a.desc % PAGE
    if part in ("avail", "event"):
        return a.avail - a.avail % PAGE
    return a.used - a.used % PAGE


# -- permissions, unanswered misses ------------------------------------------------------------------------
def test_tx_buffer_mapped_write_only_is_refused_with_access_fail(serve, sock_path, errors):
    """The device must read a TX buffer: one mapped write-only is refused (ACCESS_FAIL to the front-end, the
    queue broken with a logged error), never read."""
    srv = serve("sink", "direct")
    with Frontend(sock_path, iommu=True, ram_size=4 << 20, iommu_prefill=1) as fe:
        fe.negotiate()
        v = fe.viommu
        assert v is not None
        fe.setup_rings()
        ring = fe.rings[TX]
        v.map(ring.bufs_off, ring.size * BUF_SIZE, WO)
        fe.start()
        with pytest.raises(FrontendError):
            fe.run("tx", count=10, timeout=3)
        deadline = time.monotonic() + TIMEOUT
        while not srv.connection.vrings[TX].broken:
            assert time.monotonic() < deadline, "the queue did not break"
            time.sleep(0.01)
        assert v.access_fails >= 1
    assert any("without read permission" in e for e in errors()), errors()


def test_used_ring_mapped_read_only_is_refused(serve, sock_path, errors):
    """The device writes the used ring: mapped read-only, the first completion is refused (ACCESS_FAIL)."""
    srv = serve("sink", "copy")
    with Frontend(sock_path, iommu=True, ram_size=4 << 20, iommu_prefill=1) as fe:
        fe.negotiate()
        v = fe.viommu
        assert v is not None
        fe.setup_rings()
        ring = fe.rings[TX]
        v.map(ring.used_off, used_bytes(ring.size), RO)
        fe.start()
        with pytest.raises(FrontendError):
            fe.run("tx", count=10, timeout=3)
        deadline = time.monotonic() + TIMEOUT
        while not srv.connection.vrings[TX].broken:
            assert time.monotonic() < deadline, "the queue did not break"
            time.sleep(0.01)
        assert v.access_fails >= 1 and fe.rings[TX].d[D_DONE] == 0
    assert any("without write permission" in e for e in errors()), errors()


def test_unanswered_miss_breaks_the_queue_after_bounded_tries(serve, sock_path, errors, monkeypatch):
    """A MISS the front-end never answers: the worker sleeps between tries (no busy loop) and the queue breaks
    after MISS_TRIES of them, with a logged error."""
    monkeypatch.setattr(backend, "MISS_INTERVAL", 0.05)
    srv = serve("sink", "direct")
    with Frontend(sock_path, iommu=True, ram_size=4 << 20, iommu_prefill=1) as fe:
        fe.negotiate()
        v = fe.viommu
        assert v is not None
        fe.setup_rings()
        ring = fe.rings[TX]
        # the first buffer's page: asked for, never mapped; everything else is sent up front, so that no UPDATE
        # comes later (each would start the count of tries afresh)
        v.unmap(v.iova(ring.bufs_off), PAGE)
        fe.start()
        with pytest.raises(FrontendError):
            fe.run("tx", count=10, timeout=3)
        deadline = time.monotonic() + TIMEOUT
        while not srv.connection.vrings[TX].broken:
            assert time.monotonic() < deadline, "the queue did not break"
            time.sleep(0.01)
        assert v.asked[v.iova(ring.bufs_off) // PAGE] == backend.MISS_TRIES
    assert any(f"not answered after {backend.MISS_TRIES} MISS" in e for e in errors()), errors()


def test_waiting_queue_does_not_ask_again_on_every_iotlb_change(serve, sock_path, errors, monkeypatch):
    """A queue waiting for a MISS answer sends its MISS again only MISS_INTERVAL later, not on each UPDATE the
    front-end sends for other IOVAs meanwhile (other queues' answers): asking again on every change made the
    waiting queues' MISSes and the front-end's UPDATEs feed each other (a Linux guest's bulk TCP behind QEMU's
    intel-iommu: ~1M of each in minutes, the guest starved)."""
    monkeypatch.setattr(backend, "MISS_INTERVAL", 60.0)  # no timed re-ask within the test
    serve("sink", "direct")
    with Frontend(sock_path, iommu=True, ram_size=4 << 20, iommu_prefill=1) as fe:
        fe.negotiate()
        v = fe.viommu
        assert v is not None
        fe.setup_rings()
        page = v.iova(fe.rings[TX].bufs_off) // PAGE
        v.unmap(page * PAGE, PAGE)  # asked for, not answered
        fe.start()
        with pytest.raises(FrontendError):
            fe.run("tx", count=1, timeout=1)
        deadline = time.monotonic() + TIMEOUT
        while v.asked[page] == 0:
            assert time.monotonic() < deadline, "no MISS"
            time.sleep(0.01)
        for k in range(50):  # UPDATEs of IOVAs nobody waits for, each acknowledged before the next
            v.update(P.IotlbMsg(v.iova_base // 2 + k * PAGE, PAGE, v.ram.uva(0), RO, P.VHOST_IOTLB_UPDATE))
        assert v.asked[page] == 1, v.asked[page]
    assert not errors(), errors()


# -- hostile IOTLB input -------------------------------------------------------------------------------------
def iotlb(fe: Frontend, iova: int, size: int, uaddr: int, perm: int, kind: int = P.VHOST_IOTLB_UPDATE) -> bool:
    """Send one IOTLB_MSG (packed by hand: any field value); True if the back-end acknowledged it."""
    payload = P.IOTLB.pack(iova, size, uaddr, perm, kind)
    try:
        fe.command(R.IOTLB_MSG, payload)
    except FrontendError:
        return False
    return True


def test_iotlb_before_access_platform_is_refused(serve, sock_path, errors):
    serve("sink", "direct")
    with Frontend(sock_path, ram_size=4 << 20) as fe:
        fe.setup()
        ok = iotlb(fe, 0x1000, PAGE, fe.ram.uva(0), RW)
        assert not ok
        assert fe.run("tx", count=100, timeout=TIMEOUT)["packets"] == 100  # the connection goes on
    assert any("before VIRTIO_F_ACCESS_PLATFORM" in e for e in errors()), errors()


def test_hostile_iotlb_messages_are_refused(serve, sock_path, errors):
    """Size 0, a range wrapping past 2^64, uaddr outside every region or only partly inside one, permission 0
    or unknown bits, a front-end sending MISS: each refused with a logged error.  An INVALIDATE of what was
    never mapped is harmless (acknowledged).  Traffic goes on with exact counts after all of it."""
    srv = serve("sink", "direct")
    with Frontend(sock_path, iommu=True, ram_size=4 << 20, iommu_prefill=1) as fe:
        fe.setup()
        u = fe.ram.uva(0)
        end = fe.ram.uva(fe.ram.size)
        refused = [
            (0x1000, 0, u, RW, P.VHOST_IOTLB_UPDATE),  # size 0
            (2**64 - PAGE, 2 * PAGE, u, RW, P.VHOST_IOTLB_UPDATE),  # iova + size wraps
            (0x1000, PAGE, 2**64 - PAGE, RW, P.VHOST_IOTLB_UPDATE),  # uaddr + size wraps
            (0x1000, PAGE, 0x10_0000, RW, P.VHOST_IOTLB_UPDATE),  # uaddr outside every region
            (0x1000, 2 * PAGE, end - PAGE, RW, P.VHOST_IOTLB_UPDATE),  # uaddr only partly inside
            (0x1000, PAGE, u, 0, P.VHOST_IOTLB_UPDATE),  # no permission
            (0x1000, PAGE, u, 0x7, P.VHOST_IOTLB_UPDATE),  # unknown permission bits
            (0x1000, PAGE, u, RW, P.VHOST_IOTLB_MISS),  # a MISS is the back-end's to send
            (0x1000, 0, 0, 0, P.VHOST_IOTLB_INVALIDATE),  # empty invalidation
            (2**64 - PAGE, 2 * PAGE, 0, 0, P.VHOST_IOTLB_INVALIDATE),  # wraps
            (0x1000, PAGE, u, RW, 9),  # unknown type
        ]
        entries = len(srv.connection.iotlb)  # sent up front
        for msg in refused:
            assert not iotlb(fe, *msg), f"accepted: {msg}"
        assert len(errors()) == len(refused)
        assert iotlb(fe, 0x7700_0000, 1 << 30, 0, 0, P.VHOST_IOTLB_INVALIDATE)  # never mapped: harmless
        assert iotlb(fe, 0x3F00_0000_0000_0000, 1 << 62, 0, 0, P.VHOST_IOTLB_INVALIDATE)  # past ADDR_LIMIT
        assert len(srv.connection.iotlb) == entries
        r = fe.run("tx", count=1000, timeout=TIMEOUT)
        final = fe.drain("tx")
        assert r["packets"] == 1000 and final["packets"] == final["posted"]
    assert srv.ended()[-1][TX]["packets"] == final["packets"]
    assert len(errors()) == len(refused)


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


def test_update_storm_keeps_the_bound_and_rss_flat(serve, sock_path, errors):
    """100,000 UPDATEs of distinct pages while traffic runs: the IOTLB keeps at most MAX_ENTRIES (the oldest
    go first), memory stays flat, and traffic (whose ring and buffer pages get evicted and asked for again)
    ends with exact counts."""
    srv = serve("sink", "direct")
    with Frontend(sock_path, iommu=True, ram_size=4 << 20) as fe:
        fe.setup()
        fe.run("tx", count=1000, timeout=TIMEOUT)
        conn = srv.connection
        u = fe.ram.uva(0)
        base = 0x40_0000_0000

        def storm(first: int, n: int) -> None:
            with fe.lock:
                for k in range(first, first + n):
                    msg = P.IotlbMsg(base + k * PAGE, PAGE, u + (k % 512) * PAGE, RO, P.VHOST_IOTLB_UPDATE)
                    P.send_message(fe.sock, R.IOTLB_MSG, msg.pack())  # no ack asked: a flood
                P.U64.unpack(fe.request(R.GET_FEATURES))  # the server has handled all of them

        storm(0, 10_000)
        before = rss()
        for k in range(1, 10):
            storm(k * 10_000, 10_000)
            assert len(conn.iotlb) <= MAX_ENTRIES
            r = fe.run("tx", count=100, timeout=TIMEOUT)
            assert r["packets"] == 100
        grown = rss() - before
        assert grown < 8 << 20, f"RSS grew by {grown >> 20} MiB over 90,000 UPDATEs"
        assert len(conn.iotlb) == MAX_ENTRIES and conn.iotlb.evictions >= 100_000 - MAX_ENTRIES
        final = fe.drain("tx")
    assert srv.ended()[-1][TX]["packets"] == final["packets"]
    assert errors() == []


# -- DPDK interop: pyvhost's front-end as the vIOMMU of DPDK's vhost library -----------------------------------
@needs_dpdk
@pytest.mark.dpdk
@pytest.mark.parametrize("prefill", [None, 64], ids=["on-miss", "prefilled"])
@pytest.mark.parametrize("direction", ["tx", "rx"])
def test_frontend_iommu_with_dpdk_vhost_pmd(tmp_path, direction, prefill):
    """testpmd's net_vhost with iommu-support=1 translates every ring and buffer address through the IOTLB that
    pyvhost's front-end fills (answering its MISSes, or up front): packets counted exactly on both sides."""
    from .test_dpdk import QUEUE, start_testpmd

    sock = tmp_path / "dpdk-vhost.sock"
    fwd = "rxonly" if direction == "tx" else "txonly"
    proc, log = start_testpmd(tmp_path, f"net_vhost0,iface={sock},queues=1,iommu-support=1", fwd, 0, "vhost-iommu")
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        with Frontend(str(sock), queue_size=QUEUE, iommu=True, iommu_prefill=prefill) as fe:
            fe.setup()
            r = fe.run(direction, count=10_000, timeout=120)
            final = fe.drain(direction)
            v = fe.viommu
            assert v is not None and v.unanswered == 0 and v.access_fails == 0
            if prefill is None:
                assert v.misses > 0  # DPDK asked for what it used
        assert r["packets"] >= 10_000 and final["packets"] >= r["packets"]
        if direction == "rx":
            assert final["bytes"] == 64 * final["packets"]  # DPDK txonly frames are 64 bytes
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    stats = parse_testpmd(log.read_text(errors="replace"))
    assert stats["rx_packets" if direction == "tx" else "tx_packets"] == final["packets"], stats


# -- blk: buffers the device reads (stale reads show in the image) and writes ---------------------------------
BLK_REPS = int(os.environ.get("PYVHOST_VIOMMU_BLK_REPS", 300))


@pytest.mark.parametrize("metadata", PATHS)
def test_blk_stale_buffer_detector(serve, sock_path, tmp_path, errors, metadata):
    """BlkFrontend as the vIOMMU: before each write the front-end moves a page of the request's data buffer
    (invalidate, ack, remap, poison the old page); the data is written through the new mapping and read back
    through yet another.  A stale read of the old page puts poison in the image, a stale write of a read
    request changes a poisoned page: neither may happen.  Requests span several IOTLB entries (a remapped
    page in the middle of a 16 KiB buffer is a segment of its own)."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 << 20))  # 200 places of 16 KiB
    srv = serve(device=BlkDevice(str(image)), metadata=metadata)
    fe = BlkFrontend(sock_path, iommu=True, max_io=16 << 10, poll=True)
    try:
        fe.setup()
        v = fe.viommu
        assert v is not None
        remap = Remapper(fe)
        bq = fe.queues[0]
        size = 4 * PAGE
        for rep in range(BLK_REPS):
            slot = bq.free[-1]  # the slot the next request takes
            data_off = bq.data_off + slot * bq.max_io
            remap.move(v.iova(data_off) + (rep % 4) * PAGE, RW, update=rep % 2 == 0)
            payload = bytes([(rep + k) % 251 for k in range(64)]) * (size // 64)
            sector = (rep % 200) * (size // 512)
            assert fe.write(sector, payload) == 0
            slot = bq.free[-1]
            data_off = bq.data_off + slot * bq.max_io
            remap.move(v.iova(data_off) + ((rep + 1) % 4) * PAGE, RW, update=rep % 3 == 0)
            status, back = fe.read(sector, size)
            assert status == 0 and back == payload, f"rep {rep}: read back differs"
            with open(image, "rb") as f:
                f.seek(sector * 512)
                assert f.read(size) == payload, f"rep {rep}: the image holds other bytes (a stale read?)"
        assert remap.check_all() == 0, "the back-end wrote pages it had given up"
        assert v.unanswered == 0 and v.access_fails == 0 and not fe.anomalies
    finally:
        fe.close()
    srv.ended()
    assert errors() == []

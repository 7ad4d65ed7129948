"""The dirty-log oracle (issue #12): every page the back-end writes while logging is on has its bit set.

The front-end shares a log (``Frontend(dirty_log=True)``), runs traffic with logging off (the bitmap must stay
untouched), scrubs the buffers the device writes (so that its writes change bytes), snapshots guest memory,
switches ``VHOST_F_LOG_ALL`` on by SET_FEATURES, runs traffic, stops the rings (GET_VRING_BASE: every write
done), and checks that each page whose bytes changed -- the driver's own writes (descriptors, avail ring,
request headers, data it writes) aside -- has its bit set, and that no bit lies outside guest memory.  Net
(TX sink, RX source, loopback), blk and virtio-rng (a ``ChainDevice``), split and packed, both metadata paths;
Hypothesis draws ring sizes, how far the rings have run before (their indices and wrap counters), batch sizes,
frame sizes, mergeable buffers and EVENT_IDX.  Then ``VHOST_F_LOG_ALL`` is switched on and off while the rings
run: every write between the acknowledged switch-on and switch-off is logged, and none after switch-off.
Hostile front-ends: a ``log_guest_addr`` outside guest memory is refused and the ring goes on; a memory table
that outgrows the log is reported and nothing is written outside the log (sentinels around it in its file).
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvhost import protocol as P
from pyvhost.access import Metadata
from pyvhost.devices.blk import VIRTIO_BLK_S_OK, BlkDevice
from pyvhost.devices.chain_device import ChainDevice
from pyvhost.devices.net import Mode
from pyvhost.devices.rng import RngDevice
from pyvhost.frontend.blk import BlkFrontend
from pyvhost.frontend.log import FrontendLog
from pyvhost.frontend.net import Frontend, FrontendError
from pyvhost.frontend.packed import PackedDriverRing
from pyvhost.frontend.ram import BUF_SIZE
from pyvhost.frontend.split import D_DONE, D_LIMIT, D_POSTED
from pyvhost.protocol import Request as R
from pyvhost.ring.packed import EVENT_BYTES as PK_EVENT_BYTES
from pyvhost.ring.packed import ring_bytes
from pyvhost.ring.split import avail_bytes, desc_bytes, used_bytes

from .conftest import RunningServer

PATHS = ["direct", "copy"]
LAYOUTS = ["split", "packed"]
PAGE = 4096
RAM = 4 << 20
TIMEOUT = 30.0
SENTINEL = 0xA5
EXAMPLES = settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


# ---------------------------------------------------------------------------------------------------------
# the oracle
def changed_pages(before: np.ndarray, after: np.ndarray, driver: np.ndarray, gpa_base: int) -> set[int]:
    """Log pages (guest-physical page numbers) holding a byte that changed and that the driver did not write."""
    offs = np.flatnonzero((before != after) & ~driver)
    return set(np.unique((offs + gpa_base) >> 12).tolist())


def assert_logged(fe: Frontend, before: np.ndarray, driver: np.ndarray) -> set[int]:
    """Every page the device changed is logged; no bit lies outside guest memory.  Takes (clears) the log."""
    logged = set(fe.log.take().tolist())
    ram = fe.ram
    changed = changed_pages(before, ram.buf, driver, ram.gpa_base)
    assert changed, "the device changed nothing: the oracle would prove nothing"
    missing = sorted(changed - logged)
    assert not missing, f"{len(missing)} page(s) written but not logged, first {[hex(p << 12) for p in missing[:8]]}"
    lo, hi = ram.gpa_base >> 12, (ram.gpa_base + ram.size) >> 12
    outside = sorted(p for p in logged if not lo <= p < hi)
    assert not outside, f"bits outside guest memory: {[hex(p << 12) for p in outside[:8]]}"
    return changed


def driver_written(fe: Frontend, done_before: list[int]) -> np.ndarray:
    """A mask of the bytes the driver itself writes while traffic runs: a split ring's descriptor table and
    avail ring; a packed ring's driver area and the descriptors it made available that the device has not
    written back (the device writes completion ``k`` into slot ``k % size``: one-buffer chains)."""
    mask = np.zeros(fe.ram.size, dtype=bool)
    for ring, done0 in zip(fe.rings, done_before):
        if isinstance(ring, PackedDriverRing):
            mask[ring.driver_off : ring.driver_off + 4] = True
            device_slots = np.zeros(ring.size, dtype=bool)
            for k in range(done0, min(int(ring.d[D_DONE]), done0 + ring.size)):
                device_slots[k % ring.size] = True
            slots = mask[ring.desc_off : ring.desc_off + ring_bytes(ring.size)].reshape(ring.size, 16)
            slots[~device_slots] = True
        else:
            mask[ring.desc_off : ring.desc_off + desc_bytes(ring.size)] = True
            mask[ring.avail_off : ring.avail_off + avail_bytes(ring.size)] = True
    return mask


def scrub(fe: Frontend, indices: list[int], value: int = 0xEE) -> None:
    """Overwrite the buffers of rings ``indices`` (idle: nothing posted is outstanding), so that the device's
    next writes into them change bytes even when it writes what it wrote before."""
    for i in indices:
        ring = fe.rings[i]
        fe.ram.buf[ring.bufs_off : ring.bufs_off + ring.size * BUF_SIZE] = value


def serve_on(path: str, metadata: str, mode: str = "sink", device=None, **kw) -> RunningServer:
    return RunningServer(path, Mode(mode), Metadata(metadata), device, **kw)


# ---------------------------------------------------------------------------------------------------------
# traffic
def loopback(fe: Frontend, count: int, pkt_size: int) -> None:
    """``count`` frames transmitted and received back (RX kept full, TX limited to ``count``)."""
    rx, tx = fe.rings[0], fe.rings[1]
    tx_k, rx_k = fe._kernels()
    length = fe.fill_tx_frames(tx, pkt_size)
    want_tx, want_rx = int(tx.d[D_DONE]) + count, int(rx.d[D_DONE]) + count
    tx.d[D_LIMIT] = tx.d[D_POSTED] + count
    rx.d[D_LIMIT] = -1
    deadline = time.monotonic() + TIMEOUT
    while tx.d[D_DONE] < want_tx or rx.d[D_DONE] < want_rx:
        assert time.monotonic() < deadline, f"loopback: tx {tx.d[D_DONE]}/{want_tx}, rx {rx.d[D_DONE]}/{want_rx}"
        rx_k(*rx.views(), rx.buf_gpa(0), 64)
        tx_k(*tx.views(), tx.buf_gpa(0), length, 64)
    rx.d[D_LIMIT] = rx.d[D_POSTED]  # nothing more posted: the device is idle once TX is done


def net_traffic(fe: Frontend, mode: str, count: int, pkt_size: int, batch: int) -> None:
    if mode == "sink":
        fe.run("tx", count=count, pkt_size=pkt_size, batch=batch, timeout=TIMEOUT)
    elif mode == "source":
        fe.run("rx", count=count, batch=batch, timeout=TIMEOUT)
    else:
        loopback(fe, count, pkt_size)


# ---------------------------------------------------------------------------------------------------------
# net: TX sink, RX source, loopback
NET_CASE = st.fixed_dictionaries(
    {
        "size": st.sampled_from([2, 4, 16, 64, 256, 512]),
        "before": st.integers(0, 1500),  # completions before logging: where the indices (and wraps) stand
        "count": st.integers(1, 1500),
        "pkt_size": st.integers(60, 2000),
        "batch": st.sampled_from([1, 3, 64]),
        "mrg": st.booleans(),
        "event_idx": st.booleans(),
    }
)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("metadata", PATHS)
@pytest.mark.parametrize("mode", ["sink", "source", "loopback"])
@EXAMPLES
@given(case=NET_CASE)
def test_net_writes_are_logged(mode, metadata, layout, case):
    path = os.path.join(tempfile.mkdtemp(prefix="pyvhost-oracle-"), "vhost.sock")
    pkt = case["pkt_size"] if case["mrg"] else min(case["pkt_size"], BUF_SIZE - 12)
    srv = serve_on(path, metadata, mode, pkt_size=pkt, numbered=True)
    written = [0]  # the ring whose buffers the device writes (RX)
    try:
        with Frontend(
            path,
            queue_size=case["size"],
            ram_size=RAM,
            packed=layout == "packed",
            mrg_rxbuf=case["mrg"],
            event_idx=case["event_idx"],
            dirty_log=True,
        ) as fe:
            fe.setup()
            srv.assert_path(metadata)
            if case["before"]:
                net_traffic(fe, mode, case["before"], pkt, case["batch"])
            assert not fe.log.bitmap.any(), "logging is off, yet the bitmap was written"
            if mode != "sink":
                scrub(fe, written)
            if mode != "source":  # the frames the driver transmits: written now, rewritten (the same) later
                fe.fill_tx_frames(fe.rings[1], pkt)
            fe.set_logging(True)
            before = fe.ram.buf.copy()
            done_before = [int(r.d[D_DONE]) for r in fe.rings]
            net_traffic(fe, mode, case["count"], pkt, case["batch"])
            for direction in {"sink": ["tx"], "source": ["rx"], "loopback": ["tx", "rx"]}[mode]:
                fe.drain(direction)  # GET_VRING_BASE: the ring stopped, every write done and logged
            assert_logged(fe, before, driver_written(fe, done_before))
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------------------
# a ChainDevice: virtio-rng, and a device that writes a few bytes at odd places of its buffers
class Scatter(ChainDevice):
    """Writes one byte at a pseudo-random offset of each writable buffer (a few pages of a large buffer
    stay untouched: the log must name the page written, not the whole buffer)."""

    num_queues = 1

    def __init__(self) -> None:
        self.rand = random.Random(7)

    def handle(self, queue: int, readable: list[memoryview], writable: list[memoryview]) -> int:
        for buf in writable:
            buf[self.rand.randrange(len(buf))] = self.rand.randrange(1, 255)
        return sum(len(b) for b in writable)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("metadata", PATHS)
@pytest.mark.parametrize("kind", ["rng", "scatter"])
@EXAMPLES
@given(size=st.sampled_from([2, 8, 64, 256]), before=st.integers(0, 300), count=st.integers(1, 300))
def test_chain_device_writes_are_logged(kind, metadata, layout, size, before, count):
    """A ChainDevice's writes (logged whole on completion) and the used ring or descriptors, split and packed."""
    path = os.path.join(tempfile.mkdtemp(prefix="pyvhost-oracle-"), "vhost.sock")
    dev = RngDevice() if kind == "rng" else Scatter()
    srv = serve_on(path, metadata, device=dev)
    try:
        with Frontend(
            path, num_queues=1, queue_size=size, ram_size=RAM, dirty_log=True, packed=layout == "packed"
        ) as fe:
            fe.setup()
            srv.assert_path(metadata, [0])
            if before:
                fe.run("rx", count=before, timeout=TIMEOUT)
            assert not fe.log.bitmap.any(), "logging is off, yet the bitmap was written"
            scrub(fe, [0], 0)
            fe.set_logging(True)
            snapshot = fe.ram.buf.copy()
            done_before = [int(r.d[D_DONE]) for r in fe.rings]
            fe.run("rx", count=count, timeout=TIMEOUT)
            fe.drain("rx")
            changed = assert_logged(fe, snapshot, driver_written(fe, done_before))
            if kind == "scatter":  # one byte per buffer: pages of buffers count, not every page of them
                ring = fe.rings[0]
                buf_pages = (ring.bufs_off + fe.ram.gpa_base) >> 12
                assert len([p for p in changed if p >= buf_pages]) <= count
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------------------
# blk (a ChainDevice with I/O threads): read data, status bytes, used ring
@pytest.mark.parametrize("metadata", PATHS)
@EXAMPLES
@given(
    size=st.sampled_from([4, 16, 128]),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 255), st.integers(1, 32)), min_size=1, max_size=40),
    before=st.integers(0, 300),
)
def test_blk_writes_are_logged(metadata, size, ops, before):
    tmp = tempfile.mkdtemp(prefix="pyvhost-oracle-")
    path, image = os.path.join(tmp, "vhost.sock"), os.path.join(tmp, "disk.img")
    with open(image, "wb") as f:
        f.write(random.Random(1).randbytes(2 << 20))
    srv = serve_on(path, metadata, device=BlkDevice(image))
    try:
        with BlkFrontend(path, queue_size=size, max_io=32 << 10, dirty_log=True) as fe:
            fe.setup()
            srv.assert_path(metadata, [0])
            for i in range(before):  # move the ring's indices on (reads, logging off)
                assert fe.read(8 * (i % 256), 512)[0] == VIRTIO_BLK_S_OK
            assert not fe.log.bitmap.any(), "logging is off, yet the bitmap was written"
            bq = fe.queues[0]
            fe.ram.buf[bq.data_off : bq.data_off + bq.slots * bq.max_io] = 0  # reads then change bytes
            fe.set_logging(True)
            snapshot = fe.ram.buf.copy()
            driver = driver_written(fe, [0])
            driver[bq.hdr_off : bq.hdr_off + 16 * bq.slots] = True  # request headers: the driver's
            for is_write, block, nblocks in ops:
                n = min(nblocks * 1024, bq.max_io)
                if is_write:
                    data = random.Random(block).randbytes(n)
                    slot = fe.post(1, 2 * block, data=data)  # VIRTIO_BLK_T_OUT: the driver writes the data
                    driver[bq.data_off + slot * bq.max_io :][:n] = True
                else:
                    fe.post(0, 2 * block, n)  # VIRTIO_BLK_T_IN: the device writes the data
                while not bq.free:
                    for c in fe.wait():
                        assert c.status == VIRTIO_BLK_S_OK
            while fe.outstanding():
                for c in fe.wait():
                    assert c.status == VIRTIO_BLK_S_OK
            assert not fe.anomalies, fe.anomalies
            fe.stop_ring(fe.rings[0])
            assert_logged(fe, snapshot, driver)
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------------------
# VHOST_F_LOG_ALL switched on and off while the rings run
@pytest.mark.parametrize("metadata", PATHS)
@pytest.mark.parametrize("kind", ["rng", "source-split", "source-packed"])
def test_log_all_switched_while_rings_run(kind, metadata):
    """A driver thread keeps the ring busy; the test switches logging on (acknowledged: the back-end has
    quiesced, switched and resumed), snapshots memory, lets traffic run, snapshots again, switches logging off
    (acknowledged: every write before it is done and logged) and checks that each page changed between the
    snapshots is logged; then, with logging off and traffic still running, that the bitmap stays untouched."""
    path = os.path.join(tempfile.mkdtemp(prefix="pyvhost-oracle-"), "vhost.sock")
    layout = kind.removeprefix("source-")
    # numbered frames (and random bytes): every frame written changes its buffer's bytes
    srv = (
        serve_on(path, metadata, "source", RngDevice())
        if kind == "rng"
        else serve_on(path, metadata, "source", numbered=True)
    )
    stop = threading.Event()
    with Frontend(
        path,
        num_queues=1 if kind == "rng" else 2,
        queue_size=64,
        ram_size=RAM,
        packed=layout == "packed",
        dirty_log=True,
    ) as fe:
        fe.setup()
        ring = fe.rings[0]
        failed: list[BaseException] = []

        def drive() -> None:
            try:
                while not stop.is_set():
                    fe.run("rx", seconds=0.05, batch=8)
            except BaseException as e:  # reported by the test thread
                failed.append(e)

        def progress(n: int) -> None:
            """Wait for ``n`` more completions (traffic runs in the driver thread)."""
            target = int(ring.d[D_DONE]) + n
            deadline = time.monotonic() + TIMEOUT
            while int(ring.d[D_DONE]) < target:
                assert time.monotonic() < deadline and not failed, failed
                time.sleep(0.001)

        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
        try:
            driver_bytes = driver_written(fe, [0] * len(fe.rings))
            if layout == "packed":  # the driver re-posts descriptors all the time: only the buffers count
                driver_bytes[ring.desc_off : ring.desc_off + ring_bytes(ring.size)] = True
            for cycle in range(6):
                progress(50)
                fe.set_logging(True)
                first = fe.ram.buf.copy()
                progress(200)
                second = fe.ram.buf.copy()
                fe.set_logging(False)
                logged = set(fe.log.take().tolist())
                changed = changed_pages(first, second, driver_bytes, fe.ram.gpa_base)
                assert changed, f"cycle {cycle}: nothing changed"
                missing = sorted(changed - logged)
                assert not missing, f"cycle {cycle}: {len(missing)} page(s) written while logging, not logged"
                progress(200)
                assert not fe.log.take().size, f"cycle {cycle}: logged after LOG_ALL was switched off"
        finally:
            stop.set()
            driver.join(TIMEOUT)
        assert not failed, failed
    srv.stop()


# ---------------------------------------------------------------------------------------------------------
# hostile front-ends (SET_LOG_BASE's own checks -- sizes, offsets, fds -- are in test_dirtylog.py and
# test_cve_classes.py): a log address outside memory, a memory table that outgrows the log
def log_addr_cases(fe: Frontend, ring_len: int) -> list[int]:
    end = fe.ram.gpa_base + fe.ram.size
    return [0, fe.ram.gpa_base - ring_len, end - ring_len + 2, end, P.ADDR_LIMIT - 8, (1 << 64) - 8]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("metadata", PATHS)
def test_log_guest_addr_outside_memory_is_refused(serve, sock_path, errors, metadata, layout):
    """SET_VRING_ADDR with VHOST_VRING_F_LOG and a ``log_guest_addr`` whose used area is not (wholly) in guest
    memory: refused with a clear error, the ring goes on with the address it had, its writes logged."""
    srv = serve("source", metadata)
    with Frontend(sock_path, queue_size=64, ram_size=RAM, packed=layout == "packed", dirty_log=True) as fe:
        fe.setup()
        fe.set_logging(True)
        fe.run("rx", count=100, timeout=TIMEOUT)
        ring = fe.rings[0]
        a = ring.addr()
        ring_len = PK_EVENT_BYTES if layout == "packed" else used_bytes(ring.size)
        n = len(errors())
        cases = log_addr_cases(fe, ring_len)
        for bad in cases:
            payload = P.VRING_ADDR.pack(0, 1 << P.VHOST_VRING_F_LOG, a.desc, a.used, a.avail, bad)
            with pytest.raises(FrontendError, match="SET_VRING_ADDR failed"):
                fe.command(R.SET_VRING_ADDR, payload)
        new = errors()[n:]
        assert sum("not in guest memory" in e for e in new) == len(cases), new
        fe.log.take()
        before = fe.ram.buf.copy()
        done_before = [int(r.d[D_DONE]) for r in fe.rings]
        fe.run("rx", count=500, timeout=TIMEOUT)
        fe.drain("rx")
        assert_logged(fe, before, driver_written(fe, done_before))
    assert srv.ended()[-1][0]["error"] == 0


class HalfTable(Frontend):
    """Shares the lower ``table_size`` bytes of its RAM in its memory table (all of it once told)."""

    def __init__(self, path: str, **kw) -> None:
        super().__init__(path, **kw)
        self.table_size = self.ram.size // 2

    def set_mem_table(self) -> None:
        region = P.MemRegion(self.ram.gpa_base, self.table_size, self.ram.uva_base, 0)
        self.command(R.SET_MEM_TABLE, P.MEM_TABLE_HDR.pack(1, 0) + region.pack(), [self.ram.fd])


def rx_into(fe: Frontend, off: int, count: int) -> None:
    """``count`` RX completions into buffers at RAM offset ``off`` (not where the ring's own buffers lie)."""
    ring = fe.rings[0]
    _, rx_k = fe._kernels()
    want = int(ring.d[D_DONE]) + count
    ring.d[D_LIMIT] = ring.d[D_POSTED] + count
    deadline = time.monotonic() + TIMEOUT
    while ring.d[D_DONE] < want:
        assert time.monotonic() < deadline, f"{ring.d[D_DONE]} of {want} completions"
        rx_k(*ring.views(), fe.ram.gpa(off), 64)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("metadata", PATHS)
def test_memory_table_outgrowing_the_log_writes_nothing_outside_it(serve, sock_path, errors, metadata, layout):
    """A log that covers the memory table exactly, sentinels before it (SET_LOG_BASE's offset) and after it in
    its file; then a memory table twice as large (QEMU grows the log first): the back-end says so, goes on,
    and logs nothing past the log's end -- the sentinels stay intact -- until a log that covers it comes."""
    serve("source", metadata)
    half = RAM // 2
    with HalfTable(sock_path, queue_size=64, ram_size=RAM, packed=layout == "packed", dirty_log=True) as fe:
        fe.log = FrontendLog(fe.ram.gpa_base + half, offset=PAGE, tail=PAGE)
        fe.log.file[:PAGE] = fe.log.file[-PAGE:] = SENTINEL
        fe.setup()  # SET_LOG_BASE: covers the table exactly
        fe.set_logging(True)
        fe.run("rx", count=300, timeout=TIMEOUT)
        assert fe.log.bitmap.any()
        n = len(errors())
        fe.table_size = RAM
        fe.set_mem_table()
        assert any("outgrew the dirty log" in e for e in errors()[n:]), errors()[n:]
        upper = half + PAGE
        fe.ram.buf[upper : upper + 64 * BUF_SIZE] = 0
        rx_into(fe, upper, 300)  # frames written above the log's reach
        assert fe.ram.buf[upper : upper + 64 * BUF_SIZE].any()
        fe.set_logging(False)  # acknowledged once the workers are quiet: every write done, every bit set
        lo, hi = fe.ram.gpa_base >> 12, (fe.ram.gpa_base + half) >> 12
        assert all(lo <= p < hi for p in fe.log.take().tolist())
        assert (fe.log.file[:PAGE] == SENTINEL).all() and (fe.log.file[-PAGE:] == SENTINEL).all()
        # a log that covers the table: the same writes are logged again
        n = len(errors())
        old, fe.log = fe.log, FrontendLog(fe.ram.gpa_base + RAM)
        fe.share_log()
        old.close()
        fe.set_logging(True)
        fe.ram.buf[upper : upper + 64 * BUF_SIZE] = 0
        rx_into(fe, upper, 300)
        fe.set_logging(False)
        pages = set(fe.log.take().tolist())
        first = (fe.ram.gpa_base + upper) >> 12
        assert set(range(first, first + 64 * BUF_SIZE // PAGE)) <= pages
        assert not errors()[n:], errors()[n:]

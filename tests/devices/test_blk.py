"""virtio-blk: requests end to end (both metadata paths), malformed requests, out-of-order completion, and the
inflight protocol -- a back-end restart (clean, crafted, and kill -9 during a stream of writes) loses no request
and repeats none."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from pyvhost import protocol as P
from pyvhost.access import Metadata
from pyvhost.backend import Server
from pyvhost.devices.blk import (
    OUTHDR,
    VIRTIO_BLK_F_CONFIG_WCE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    BlkDevice,
    IOPool,
)
from pyvhost.frontend.blk import BlkFrontend
from pyvhost.frontend.net import FrontendError
from pyvhost.protocol import ProtocolFeature as PF
from pyvhost.protocol import Request as R
from pyvhost.ring import inflight as INF
from pyvhost.ring.packed import encode_base

from ..conftest import assert_log_path, assert_path

PATHS = ["direct", "copy"]
MiB = 1 << 20
BLOCK = 4096
#: ring layouts (the front-end drives packed rings with buffer id = request slot)
LAYOUTS = ["split", "packed"]


@pytest.fixture
def image(tmp_path: Path) -> str:
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(32 * MiB)
    return str(p)


@contextlib.contextmanager
def server(device, path: str, metadata: str = "direct"):
    """An in-process server; stopping it ends the connection (teardown waits for requests in flight)."""
    srv = Server(device, path, Metadata(metadata))
    t = threading.Thread(target=srv.serve, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.stop()
        t.join(30)
        assert not t.is_alive()
        srv.close()


def payload(seq: int, block: int, size: int = BLOCK) -> bytes:
    """A block that names its write (sequence number, block) and carries a checksum of itself."""
    head = struct.pack("<QQ", seq, block)
    body = random.Random(seq * 7919 + block).randbytes(size - 16 - 32)
    return head + body + hashlib.sha256(head + body).digest()


def parse(data: bytes) -> tuple[int, int] | None:
    """(seq, block) of a block written by payload(), None if it is not one (zeros, torn, corrupt)."""
    if hashlib.sha256(data[:-32]).digest() != data[-32:]:
        return None
    return struct.unpack_from("<QQ", data)


def file_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("metadata", PATHS)
def test_config_and_features(image, sock_path, metadata, layout):
    dev = BlkDevice(image, num_queues=2)
    with server(dev, sock_path, metadata) as srv, BlkFrontend(sock_path, num_queues=2, packed=layout == "packed") as fe:
        fe.setup()
        assert_path(srv, metadata, [0, 1])
        assert fe.config["capacity"] == 32 * MiB // 512
        assert fe.config["blk_size"] == 512 and fe.config["num_queues"] == 2
        assert fe.config["seg_max"] > 0 and fe.config["size_max"] > 0
        assert fe.features & (1 << VIRTIO_BLK_F_FLUSH) and fe.features & (1 << VIRTIO_BLK_F_DISCARD)
        assert not fe.features & (1 << VIRTIO_BLK_F_RO)
        assert fe.protocol_features & (1 << PF.INFLIGHT_SHMFD) and fe.inflight_fd is not None
        status, ident = fe.get_id()
        assert status == VIRTIO_BLK_S_OK and ident.rstrip(b"\0") == b"disk.img"
        for q in (0, 1):  # both request queues work
            assert fe.write(8 * q, payload(q, q), queue=q) == VIRTIO_BLK_S_OK
            assert fe.read(8 * q, BLOCK, queue=q) == (VIRTIO_BLK_S_OK, payload(q, q))
        # CONFIG_WCE: the driver turns the write cache off (write-through: every write is synced) and on
        assert fe.features & (1 << VIRTIO_BLK_F_CONFIG_WCE) and fe.config["writeback"] == 1
        fe.command(R.SET_CONFIG, P.CONFIG_HDR.pack(32, 1, 0) + b"\0")
        assert fe.read_config()["writeback"] == 0 and dev.writeback == 0
        assert fe.write(16, payload(2, 2)) == VIRTIO_BLK_S_OK  # one pwritev with RWF_DSYNC
        assert fe.read(16, BLOCK) == (VIRTIO_BLK_S_OK, payload(2, 2))
        with pytest.raises(FrontendError):  # any other field is read-only
            fe.command(R.SET_CONFIG, P.CONFIG_HDR.pack(0, 8, 0) + bytes(8))
        fe.command(R.SET_CONFIG, P.CONFIG_HDR.pack(32, 1, 0) + b"\1")
        assert fe.read_config()["writeback"] == 1
        assert fe.anomalies == []
    dev.close()


@pytest.mark.parametrize("metadata", PATHS)
def test_checksummed_data_survives_backend_restart(image, sock_path, metadata):
    blocks = random.Random(1).sample(range(32 * MiB // BLOCK), 300)
    dev = BlkDevice(image)
    with server(dev, sock_path, metadata) as srv, BlkFrontend(sock_path) as fe:
        fe.setup()
        assert_path(srv, metadata, [0])
        tags = {}
        for seq, b in enumerate(blocks):  # a stream of writes, many in flight at once
            while not fe.free_slots():
                for c in fe.wait():
                    assert c.status == VIRTIO_BLK_S_OK, c
                    tags.pop(c.tag)
            fe.post(VIRTIO_BLK_T_OUT, b * 8, data=payload(seq, b), tag=seq)
            tags[seq] = b
        while fe.outstanding():
            for c in fe.wait():
                assert c.status == VIRTIO_BLK_S_OK
                tags.pop(c.tag)
        assert fe.flush() == VIRTIO_BLK_S_OK
        assert fe.anomalies == []
    dev.close()
    dev = BlkDevice(image)  # a new back-end on the same image
    with server(dev, sock_path, metadata) as srv, BlkFrontend(sock_path, max_io=64 * BLOCK) as fe:
        fe.setup()
        assert_path(srv, metadata, [0])
        for seq, b in enumerate(blocks):
            status, data = fe.read(b * 8, BLOCK)
            assert status == VIRTIO_BLK_S_OK and parse(data) == (seq, b)
        status, data = fe.read(0, 64 * BLOCK)  # a large read across written and unwritten blocks
        assert status == VIRTIO_BLK_S_OK
        for i in range(64):
            chunk = data[i * BLOCK : (i + 1) * BLOCK]
            assert chunk == (payload(blocks.index(i), i) if i in blocks else bytes(BLOCK))
    dev.close()
    with open(image, "rb") as f:  # and on the file itself
        for seq, b in enumerate(blocks[:20]):
            f.seek(b * BLOCK)
            assert parse(f.read(BLOCK)) == (seq, b)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("metadata", PATHS)
def test_malformed_and_refused_requests(image, tmp_path, sock_path, metadata, errors, layout):
    ro_image = str(tmp_path / "ro.img")
    Path(ro_image).write_bytes(os.urandom(1 * MiB))
    before = file_hash(image)
    dev = BlkDevice(image)
    cap = dev.capacity
    with server(dev, sock_path, metadata) as srv, BlkFrontend(sock_path, packed=layout == "packed") as fe:
        fe.setup()
        assert_path(srv, metadata, [0])
        # out of range: past the end, straddling the end, a sector number near 2^64
        assert fe.read(cap, 512)[0] == VIRTIO_BLK_S_IOERR
        assert fe.write(cap - 1, bytes(1024)) == VIRTIO_BLK_S_IOERR
        assert fe.write((1 << 64) - 1, bytes(512)) == VIRTIO_BLK_S_IOERR
        assert fe.discard(VIRTIO_BLK_T_WRITE_ZEROES, [(cap - 8, 16, 0)]) == VIRTIO_BLK_S_IOERR
        # data length not a multiple of 512
        assert fe.write(0, bytes(513)) == VIRTIO_BLK_S_IOERR
        assert fe.read(0, 100)[0] == VIRTIO_BLK_S_IOERR
        # unknown request type
        assert fe.io(99, 0)[0] == VIRTIO_BLK_S_UNSUPP
        # discard with the unmap flag (reserved for discard)
        assert fe.discard(VIRTIO_BLK_T_DISCARD, [(0, 8, 1)]) == VIRTIO_BLK_S_UNSUPP
        # short header (8 of 16 bytes), then a status byte
        fe.post_chain([("hdr", 8, False), ("status", 1, True)], header=OUTHDR.pack(VIRTIO_BLK_T_OUT, 0, 0)[:8])
        (c,) = fe.wait()
        assert c.status == VIRTIO_BLK_S_IOERR and c.length == 1
        # a header split over two descriptors is fine (the device gathers it)
        hdr = OUTHDR.pack(VIRTIO_BLK_T_FLUSH, 0, 0)
        fe.post_chain([("hdr", 8, False), ("data", 8, False), ("status", 1, True)], header=hdr[:8], data=hdr[8:])
        (c,) = fe.wait()
        assert c.status == VIRTIO_BLK_S_OK and c.length == 1
        # no status byte at all: nothing can be reported; the chain completes with length 0, the queue goes on
        fe.post_chain(
            [("hdr", 16, False), ("data", 512, False)], header=OUTHDR.pack(VIRTIO_BLK_T_OUT, 0, 0), data=b"\xaa" * 512
        )
        (c,) = fe.wait()
        assert c.length == 0 and fe.ram.buf[fe.queues[0].status_off + c.slot] == 0xFF
        # and a good request still works
        assert fe.write(8, payload(1, 1)) == VIRTIO_BLK_S_OK
        # data and status in one buffer (the device writes the status into its last byte)
        fe.post_chain([("hdr", 16, False), ("data", BLOCK + 1, True)], header=OUTHDR.pack(VIRTIO_BLK_T_IN, 0, 8))
        (c,) = fe.wait()
        assert c.length == BLOCK + 1 and fe.data(c, BLOCK + 1) == payload(1, 1) + bytes([VIRTIO_BLK_S_OK])
        assert fe.read(8, BLOCK) == (VIRTIO_BLK_S_OK, payload(1, 1))
        assert fe.write(8, bytes(BLOCK)) == VIRTIO_BLK_S_OK  # back to zeros
        # a write whose header is split, its second half and the data in one buffer: the data starts past it
        hdr = OUTHDR.pack(VIRTIO_BLK_T_OUT, 0, 16)
        fe.post_chain(
            [("hdr", 8, False), ("data", 8 + BLOCK, False), ("status", 1, True)],
            header=hdr[:8],
            data=hdr[8:] + payload(3, 3),
        )
        (c,) = fe.wait()
        assert c.status == VIRTIO_BLK_S_OK and c.length == 1
        assert fe.read(16, BLOCK) == (VIRTIO_BLK_S_OK, payload(3, 3))
        assert fe.write(16, bytes(BLOCK)) == VIRTIO_BLK_S_OK  # back to zeros
        assert fe.anomalies == []
    assert dev.stats()["ioerr"] >= 8
    dev.close()
    assert file_hash(image) == before  # nothing refused touched the file
    assert Path(image).stat().st_size == 32 * MiB
    assert any("no writable status byte" in m for m in errors())
    assert not any("still has views" in m or "still in use" in m for m in errors())  # all released on time

    # a read-only image: writes, discards and write-zeroes fail, reads work, the file is unchanged
    ro_before = file_hash(ro_image)
    dev = BlkDevice(ro_image, readonly=True)
    with server(dev, sock_path, metadata) as srv, BlkFrontend(sock_path, packed=layout == "packed") as fe:
        fe.setup()
        assert_path(srv, metadata, [0])
        assert fe.features & (1 << VIRTIO_BLK_F_RO)
        assert fe.write(0, bytes(512)) == VIRTIO_BLK_S_IOERR
        assert fe.discard(VIRTIO_BLK_T_WRITE_ZEROES, [(0, 8, 0)]) == VIRTIO_BLK_S_IOERR
        status, data = fe.read(0, BLOCK)
        assert status == VIRTIO_BLK_S_OK and data == Path(ro_image).read_bytes()[:BLOCK]
        assert fe.flush() == VIRTIO_BLK_S_OK
    dev.close()
    assert file_hash(ro_image) == ro_before


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("metadata", PATHS)
def test_discard_and_write_zeroes(image, sock_path, metadata, layout):
    dev = BlkDevice(image)
    with server(dev, sock_path, metadata) as srv, BlkFrontend(sock_path, packed=layout == "packed") as fe:
        fe.setup()
        assert_path(srv, metadata, [0])
        for b in range(4):
            assert fe.write(b * 8, payload(b, b)) == VIRTIO_BLK_S_OK
        assert fe.discard(VIRTIO_BLK_T_WRITE_ZEROES, [(0, 8, 0), (16, 8, 1)]) == VIRTIO_BLK_S_OK
        assert fe.read(0, BLOCK) == (VIRTIO_BLK_S_OK, bytes(BLOCK))
        assert fe.read(16, BLOCK) == (VIRTIO_BLK_S_OK, bytes(BLOCK))
        assert fe.read(8, BLOCK) == (VIRTIO_BLK_S_OK, payload(1, 1))
        assert fe.discard(VIRTIO_BLK_T_DISCARD, [(24, 8, 0)]) == VIRTIO_BLK_S_OK
        assert fe.read(8, BLOCK) == (VIRTIO_BLK_S_OK, payload(1, 1))  # the neighbour is intact
    assert dev.stats()["write_zeroes"] == 1 and dev.stats()["discard"] == 1
    dev.close()


class SlowSector(BlkDevice):
    """Requests for sector 0 take a while (like data that is not in the page cache: RWF_NOWAIT declines it
    and an I/O thread waits for it); ``started``/``finished`` say when the last of them began and ended."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.started, self.finished = threading.Event(), threading.Event()

    def _try_nowait(self, req, kind, offset, what):
        return -1 if offset == 0 else super()._try_nowait(req, kind, offset, what)

    def _do(self, req, kind, offset, what):
        slow = offset == 0 and kind in ("read", "write")
        if slow:
            self.finished.clear()
            self.started.set()
            time.sleep(0.5)
        n = super()._do(req, kind, offset, what)
        if slow:
            self.finished.set()
        return n


def _taken(ev: threading.Event) -> None:
    assert ev.wait(30), "the device never took the slow request"
    ev.clear()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("metadata", PATHS)
def test_slow_request_does_not_stall_the_queue(image, sock_path, metadata, layout):
    dev = SlowSector(image, io_threads=4)
    with server(dev, sock_path, metadata) as srv, BlkFrontend(sock_path, packed=layout == "packed") as fe:
        fe.setup()
        assert_path(srv, metadata, [0])
        fe.post(VIRTIO_BLK_T_IN, 0, BLOCK, tag="slow")
        _taken(dev.started)  # an I/O thread is on it: everything after is posted behind it
        for i in range(1, 30):
            fe.post(VIRTIO_BLK_T_IN, 8 * i, BLOCK, tag=i)
        order = []
        while len(order) < 30:
            order += [c.tag for c in fe.wait()]
        assert order[-1] == "slow" and sorted(order[:-1]) == list(range(1, 30))  # completed out of order
        # stopping a ring waits for what is in flight: GET_VRING_BASE returns once the slow one is done
        fe.post(VIRTIO_BLK_T_IN, 0, BLOCK, tag="slow2")
        _taken(dev.started)
        base = fe.stop_ring(fe.rings[0])
        assert dev.finished.is_set(), "GET_VRING_BASE returned while a request was in flight"
        if layout == "packed":  # both cursors where the driver's avail cursor is: nothing left in flight
            bq = fe.queues[0]
            assert base == encode_base(bq.pos, bq.wrap, bq.pos, bq.wrap)
        else:
            assert base == fe.rings[0].used16[1] == fe.queues[0].avail_idx
        assert [c.tag for c in fe.reap()] == ["slow2"]
    dev.close()


# ---------------------------------------------------------------------------------------------------------
# The inflight protocol
def _region(size: int) -> INF.QueueRegion:
    return INF.QueueRegion(np.zeros(INF.queue_region_size(size), np.uint8), size)


class Crash(Exception):
    """The back-end died here: no store after this one happened."""


class Stores:
    """Counts the stores the datapath makes into the inflight area (and its used-index publication) and
    crashes the back-end before the store numbered ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit, self.done = limit, 0

    def store(self) -> None:
        if self.done == self.limit:
            raise Crash
        self.done += 1


class RecordingArray(np.ndarray):
    """A view of an inflight area whose every item store goes through ``Stores``."""

    stores: Stores

    def __setitem__(self, key, value) -> None:
        self.stores.store()
        super().__setitem__(key, value)


def _recording(a: np.ndarray, stores: Stores) -> RecordingArray:
    r = a.view(RecordingArray)
    r.stores = stores
    return r


def _as_run(kernel, stores: Stores):
    """The kernel's own Python source, run with its inflight stores counted and the used-index publication
    (flush_used, one store) counted too; fences are no-ops in one thread."""
    from pyvhost.devices import chain_device

    real_flush = chain_device.flush_used

    def flush_used(*args):
        stores.store()  # the crash may come before the publication ...
        return real_flush(*args)  # ... or after it (the next store)

    f = kernel.py_func
    glb = dict(f.__globals__, fence_full=lambda: None, flush_used=flush_used)
    return types.FunctionType(f.__code__, glb, f.__name__, f.__defaults__, f.__closure__)


def test_inflight_recovery_after_a_crash_at_every_step():
    """The datapath's real pop and completion code (ChainDevice's pop_chains and push_used, their own source,
    their stores counted) is cut before each of its stores into the inflight area and its used-index
    publication.  Whatever the cut, recovery makes every chain the driver made available be served exactly
    once: completed (in the used ring the driver sees), resubmitted (in the order it was taken), or taken anew
    after the resubmitted ones."""
    from pyvhost.access import bind
    from pyvhost.devices.chain_device import C_HEAD, CHAIN_COLS, IST_COUNTER, IST_TRACK, pop_chains, push_used
    from pyvhost.frontend.ram import GuestRam
    from pyvhost.memory import GuestMemory
    from pyvhost.ring.chain import new_sg
    from pyvhost.ring.state import Q_EVENT_IDX, Q_LAST_AVAIL, Q_USED_IDX, new_queue_state

    size, before = 8, 3  # 3 requests completed before this batch
    taken = [5, 2, 7, 0]  # heads in avail order
    completing = [7, 2]  # completed together, out of order
    total = None
    cut = 0
    while total is None or cut <= total:
        ram = GuestRam(1 << 20)
        mem = GuestMemory(arena_size=1 << 24)
        try:
            mem.set_table([ram.region()], [ram.fd])
            d, a, u = ram.alloc(16 * size, 4096), ram.alloc(6 + 2 * size, 64), ram.alloc(6 + 8 * size, 4096)
            data = ram.alloc(size * 512, 4096)
            desc = ram.buf[d : d + 16 * size].view(np.uint64)
            for i in range(size):
                desc[2 * i], desc[2 * i + 1] = ram.gpa(data + 512 * i), 512
            avail = ram.buf[a : a + 6 + 2 * size].view(np.uint16)
            used16 = ram.buf[u : u + 6 + 8 * size].view(np.uint16)
            for k, h in enumerate([1, 3, 4] + taken):
                avail[2 + k % size] = h
            avail[1] = before + len(taken)
            used16[1] = before
            q = new_queue_state(size)
            q[Q_LAST_AVAIL] = q[Q_USED_IDX] = before
            q[Q_EVENT_IDX] = 0
            views = bind(mem, P.VringAddr(0, 0, ram.uva(d), ram.uva(u), ram.uva(a), 0), size, Metadata.DIRECT, q)
            dv, av, u16v, u32v = views.args()
            region = _region(size)
            region.recover(before)  # a fresh area, as SET_INFLIGHT_FD gives it
            ist = np.zeros(2, dtype=np.int64)
            ist[IST_COUNTER], ist[IST_TRACK] = 100, 1
            stores = Stores(cut)
            i8, i16, i64 = (_recording(x, stores) for x in (region.u8, region.u16, region.u64))
            sg, chains = new_sg(2 * size), np.zeros((size, CHAIN_COLS), dtype=np.int64)
            try:
                n = _as_run(pop_chains, stores)(
                    q, dv, av, u16v, mem.arena.view, mem.table, sg, chains, size, 4, i8, i64, ist
                )
                assert [int(h) for h in chains[:n, C_HEAD]] == taken
                heads = np.array(completing + [0] * (size - len(completing)), dtype=np.int64)
                lens = np.zeros(size, dtype=np.int64)
                assert _as_run(push_used, stores)(
                    q, av, u16v, u32v, mem.arena.view, mem.table, heads, lens, len(completing), i8, i16, 1
                )
                total = stores.done  # no crash: every store made
            except Crash:
                pass
            # the restarted back-end: what the driver sees is the used ring; recovery starts from it
            seen = int(used16[1])
            completed = [int(u32v[1 + 2 * (k % size)]) for k in range(before, seen)]
            heads_back, counter = region.recover(seen)
            next_avail = seen + len(heads_back)  # where ChainDevice.make_step goes on taking new chains
            served = sorted(completed + heads_back)
            assert served == sorted(taken[: next_avail - before]), (cut, completed, heads_back)
            assert heads_back == [h for h in taken[: next_avail - before] if h not in completed], (cut, heads_back)
            assert int(region.u16[INF.U16_USED_IDX]) == seen
            assert region.recover(seen) == (heads_back, counter)  # recovery is idempotent
            if heads_back:
                assert counter > max(int(region.u64[INF.desc_counter(h)]) for h in heads_back)
            views = dv = av = u16v = u32v = desc = avail = used16 = None
        finally:
            mem.close()
            ram.close()
        cut += 1
    assert total is not None and total >= 2 * len(taken) + 2 * len(completing) + 1 + len(completing) + 1


def test_inflight_area_from_a_hostile_frontend_is_bounded():
    r = _region(8)
    r.recover(0)
    r.u16[INF.U16_LAST_BATCH_HEAD] = 999  # out of range
    r.u16[INF.U16_USED_IDX] = 40000  # the batch would be huge
    r.u8[INF.desc_inflight(3)] = 7  # any non-zero value counts
    heads, _ = r.recover(0)
    assert heads == [3]
    for bad in [dict(mmap_size=10), dict(queue_size=0), dict(num_queues=0), dict(mmap_offset=1)]:
        fd, size = INF.new_area_fd(1, 8)
        kw = dict(mmap_size=size, mmap_offset=0, num_queues=1, queue_size=8) | bad
        with pytest.raises(ValueError):
            INF.InflightArea(fd, **kw)
        os.close(fd)
    fd, size = INF.new_area_fd(1, 8)
    with pytest.raises(ValueError):  # more than the file holds
        INF.InflightArea(fd, size + 4096, 0, 1, 8)
    os.close(fd)


def _map_region(fe: BlkFrontend, queue: int = 0) -> tuple[mmap.mmap, INF.QueueRegion]:
    size, offset = fe.inflight_desc
    mm = mmap.mmap(fe.inflight_fd, size, offset=offset)
    buf = np.frombuffer(mm, np.uint8)
    rs = INF.queue_region_size(fe.queue_size)
    return mm, INF.QueueRegion(buf[queue * rs : (queue + 1) * rs], fe.queue_size)


class Recorder(BlkDevice):
    """Records the writes it executes, in order (I/O in the worker: execution order = submission order)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, io_threads=0, **kw)
        self.executed = []

    def _do(self, req, kind, offset, what):
        if kind == "write":
            self.executed.append(offset // 512)
        return super()._do(req, kind, offset, what)


@pytest.mark.parametrize("metadata", PATHS)
def test_restart_resubmits_in_counter_order_and_repeats_nothing(image, sock_path, metadata):
    """A crash crafted in the shared state: of six writes the dead back-end had taken, two were completed,
    two were published but not yet cleared in the inflight area, and two were still in flight (taken in the
    order w6, w5).  The new back-end must run w6 then w5, and nothing else, before new requests."""
    dev = Recorder(image)
    with server(dev, sock_path, metadata):
        fe = BlkFrontend(sock_path)
        fe.setup()
        for i in range(3):
            assert fe.write(800 + 8 * i, payload(100 + i, i)) == VIRTIO_BLK_S_OK
    dev.close()
    try:
        bq, ring = fe.queues[0], fe.rings[0]
        used0 = int(ring.used16[1])
        assert used0 == 3
        mm, region = _map_region(fe)
        assert region.version == 1 and int(region.u16[INF.U16_USED_IDX]) == 3 and not len(region.inflight_heads())
        # six writes posted while no back-end runs
        slots = [fe.post(VIRTIO_BLK_T_OUT, 8 * (k + 1), data=payload(k + 1, k + 1), tag=f"w{k + 1}") for k in range(6)]
        heads = [3 * s for s in slots]
        # what the dead back-end did: took all six (counters in taking order: w1..w4, w6, w5) ...
        for h, counter in zip(heads, [10, 11, 12, 13, 15, 14]):
            region.u64[INF.desc_counter(h)] = counter
            region.u8[INF.desc_inflight(h)] = 1
        # ... wrote w1..w4 to the image, completed w1, w2 fully ...
        with open(image, "r+b") as f:
            for k in range(4):
                f.seek(8 * (k + 1) * 512)
                f.write(payload(k + 1, k + 1))
        for n, k in enumerate(range(4)):
            e = (used0 + n) & (ring.size - 1)
            ring.used32[1 + 2 * e], ring.used32[2 + 2 * e] = heads[k], 1
            fe.ram.buf[bq.status_off + slots[k]] = VIRTIO_BLK_S_OK
        for k in (0, 1):
            region.u8[INF.desc_inflight(heads[k])] = 0
        region.u16[INF.U16_USED_IDX] = used0 + 2
        # ... and w3, w4 as a batch: linked, used index published, crash before their flags were cleared
        region.u16[INF.desc_next(heads[2])] = region.u16[INF.U16_LAST_BATCH_HEAD]
        region.u16[INF.desc_next(heads[3])] = heads[2]
        region.u16[INF.U16_LAST_BATCH_HEAD] = heads[3]
        ring.used16[1] = used0 + 4
        del region
        dev = Recorder(image)
        with server(dev, sock_path, metadata) as srv:
            fe.reconnect()
            assert_path(srv, metadata, [0])  # the new back-end's memory table, on the path asked for
            done = []
            while len(done) < 6:
                done += [c.tag for c in fe.wait()]
            assert done[:4] == ["w1", "w2", "w3", "w4"] and done[4:] == ["w6", "w5"]
            assert dev.executed == [48, 40]  # w6 (sector 48) then w5 (sector 40); nothing repeated
            assert fe.write(800, payload(7, 7)) == VIRTIO_BLK_S_OK  # new requests after them
            assert dev.executed == [48, 40, 800]
            for k in range(6):
                assert fe.read(8 * (k + 1), BLOCK) == (VIRTIO_BLK_S_OK, payload(k + 1, k + 1))
            assert fe.anomalies == []
            fe.stop_ring(ring)  # the worker has finished its last completion (flags are cleared after publishing)
            _, region = _map_region(fe)
            assert not len(region.inflight_heads()) and int(region.u16[INF.U16_USED_IDX]) == int(ring.used16[1])
            del region
        dev.close()
    finally:
        fe.close(stop_rings=False)


# ---------------------------------------------------------------------------------------------------------
# kill -9 of `pyvhost serve blk` during a stream of writes
class Backend:
    def __init__(self, tmp: Path, image: str, sock: str, metadata: str, delay_ms: float) -> None:
        self.tmp, self.n = tmp, 0
        self.cmd = [
            sys.executable,
            "-m",
            "pyvhost",
            "serve",
            "blk",
            "--socket-path",
            sock,
            "--file",
            image,
            "--metadata",
            metadata,
            "--io-delay-ms",
            str(delay_ms),
        ]
        self.sock = sock
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.n += 1
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.log = self.tmp / f"backend{self.n}.log"
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        deadline = time.monotonic() + 120
        while not os.path.exists(self.sock):
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "backend did not listen"
            time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def resubmitted(self) -> list[int]:
        m = re.search(r"resubmitting \d+ in-flight requests \(heads ([\d ]+)\)", self.log.read_text())
        return [int(x) for x in m.group(1).split()] if m else []

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.mark.parametrize("metadata", PATHS)
def test_kill9_during_writes_loses_and_repeats_nothing(tmp_path, image, metadata):
    """Writes stream to a ring of 192 blocks (write ``seq`` goes to block ``seq % 192``, one write per block in
    flight); the back-end process is killed (SIGKILL) three times while writes are in flight, restarted on the
    same socket, and the front-end reconnects.  After each recovery every block holds the newest write posted
    to it, every write completed exactly once, and what was resubmitted was only what was outstanding."""
    sock = str(tmp_path / "blk.sock")
    be = Backend(tmp_path, image, sock, metadata, delay_ms=3)
    nblocks, total, kills_at = 192, 1500, (300, 700, 1100)
    be.start()
    fe = BlkFrontend(sock, queue_size=128, max_io=BLOCK)
    mm = region = None
    try:
        fe.setup()
        assert_log_path(be.log.read_text(), metadata)
        mm, region = _map_region(fe)
        latest: dict[int, int] = {}  # block -> newest seq posted
        busy: set[int] = set()  # blocks with a write in flight
        completed: set[int] = set()
        posted = 0
        kills = 0
        resubmitted_total = 0

        def take(cs):
            for c in cs:
                assert c.status == VIRTIO_BLK_S_OK, c
                assert c.tag not in completed, f"write {c.tag} completed twice"
                completed.add(c.tag)
                busy.discard(c.tag % nblocks)

        def verify_all():
            with open(image, "rb") as f:
                for b in range(nblocks):
                    f.seek(b * BLOCK)
                    got = parse(f.read(BLOCK))
                    assert got == ((latest[b], b) if b in latest else None), (b, got, latest.get(b))

        while len(completed) < total:
            while posted < total and fe.free_slots() and (posted % nblocks) not in busy:
                b = posted % nblocks
                fe.post(VIRTIO_BLK_T_OUT, b * 8, data=payload(posted, b), tag=posted, publish=False)
                latest[b] = posted
                busy.add(b)
                posted += 1
            fe.publish()
            if kills < len(kills_at) and len(completed) >= kills_at[kills]:
                # kill while the back-end holds writes it took and has not completed: its inflight area
                # (shared with this front-end) says so (the back-end takes them faster than it finishes them)
                deadline = time.monotonic() + 30
                while not len(region.inflight_heads()):
                    assert fe.outstanding() and time.monotonic() < deadline, "no write in flight in the back-end"
                    time.sleep(0.0005)
                be.kill()
                kills += 1
                take(fe.reap())  # completions it published before dying
                outstanding = {3 * s for s in fe.outstanding()}
                be.start()
                fe.reconnect()
                assert_log_path(be.log.read_text(), metadata)
                while fe.outstanding():
                    take(fe.wait(timeout=30))
                redone = be.resubmitted()
                assert set(redone) <= outstanding, "a completed request was resubmitted"
                assert len(set(redone)) == len(redone)
                resubmitted_total += len(redone)
                verify_all()  # nothing lost, nothing older written over something newer
                continue
            take(fe.wait(timeout=30))
        assert kills == 3 and len(completed) == total == posted
        assert resubmitted_total > 0, "no kill found a request in flight in the back-end"
        assert fe.flush() == VIRTIO_BLK_S_OK
        verify_all()
        assert fe.anomalies == []
    finally:
        region = None
        if mm is not None:
            mm.close()
        fe.close(stop_rings=False)
        be.stop()


# ---------------------------------------------------------------------------------------------------------
def test_bench_blk(tmp_path):
    """``pyvhost bench --device blk``, short: every workload measured on each back-end, no errors (no speed
    thresholds); qemu-storage-daemon is compared when installed.  Each window is long enough for a loaded
    machine to complete some requests (0.3 s once saw none: the bench counts an empty window as an error)."""
    import json
    import shutil

    out = tmp_path / "rows.json"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyvhost",
            "bench",
            "--device",
            "blk",
            "--seconds",
            "1.5",
            "--warmup",
            "0.2",
            "--runs",
            "1",
            "--image-mb",
            "16",
            "--queue-size",
            "128",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads(out.read_text())
    backends = {"pyvhost"} | ({"qsd"} if shutil.which("qemu-storage-daemon") else set())
    assert {r["backend"] for r in rows} == backends
    assert {r["workload"] for r in rows} == {"randread", "randwrite", "seqread", "seqwrite"}
    for r in rows:
        assert r["ops"] > 0 and r["errors"] == 0 and r["iops"] > 0, r
    assert "pyvhost/qsd" in p.stdout


def test_packed_ring_with_an_inflight_area_works_untracked(image, sock_path, caplog):
    """A front-end that gives an inflight area on a packed ring: requests are served, not tracked, and that is
    logged once for the ring, however often it is restarted."""
    caplog.set_level(logging.INFO, logger="pyvhost")
    dev = BlkDevice(image)
    with server(dev, sock_path) as srv, BlkFrontend(sock_path, packed=True) as fe:
        fe.setup()
        assert fe.inflight_fd is not None
        for k in range(3):
            assert fe.write(8 * k, payload(k, k)) == VIRTIO_BLK_S_OK
            assert fe.read(8 * k, BLOCK) == (VIRTIO_BLK_S_OK, payload(k, k))
            bq = fe.queues[0]
            base = fe.stop_ring(fe.rings[0])
            assert base == encode_base(bq.pos, bq.wrap, bq.pos, bq.wrap)
            fe.start_ring(fe.rings[0], base)
        region = srv.connection.inflight.queue(0, fe.queue_size)
        assert region is not None and len(region.inflight_heads()) == 0  # nothing recorded
        assert fe.anomalies == []
    warned = [r for r in caplog.records if "inflight tracking is split-ring only" in r.getMessage()]
    assert len(warned) == 1 and "vring 0" in warned[0].getMessage()
    dev.close()


def test_io_pool_thread_survives_a_failing_job(caplog):
    """An exception escaping an I/O job is logged and the pool's thread goes on with the next job."""
    pool = IOPool(1, name="pyvhost-blk-io-test")
    done = threading.Event()

    def fail() -> None:
        raise RuntimeError("job failed on purpose")

    try:
        with caplog.at_level(logging.ERROR):
            pool.put(fail)
            pool.put(done.set)
            assert done.wait(30), "the job after a failing one never ran"
        assert any("an I/O job failed" in r.getMessage() for r in caplog.records)
    finally:
        pool.close()

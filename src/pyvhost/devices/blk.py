"""virtio-blk (virtio 1.2 §5.2) on a raw image file or a block device.

Each chain is a request: a 16-byte header the device reads (type, reserved, sector), data (read by the device
for writes, written for reads), and a status byte the device writes last.  The worker thread parses and checks
the request -- header whole, status byte present, length a multiple of 512, every sector inside the image, the
image writable for writes -- and a pool of I/O threads does the system calls: ``os.preadv``/``os.pwritev``
straight into and out of the chain's memoryviews of guest memory (no copy), ``fdatasync`` for FLUSH,
``fallocate`` (or the block-device ioctls) for DISCARD and WRITE_ZEROES.  A request that fails any check gets
VIRTIO_BLK_S_IOERR (or UNSUPP for an unknown type) and never reaches the file.  Requests complete out of order,
so a slow one does not hold up the queue; with the front-end's inflight area they survive a back-end crash
(see ``inflight.py``).
"""

from __future__ import annotations

import collections
import ctypes
import errno
import fcntl
import logging
import os
import queue
import stat
import struct
import sys
import threading
import time

from .chain_device import ChainDevice, Request, complete_all

log = logging.getLogger(__name__)

VIRTIO_ID_BLOCK = 2
# feature bits (§5.2.3)
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14
# request types (§5.2.6)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
# status
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

SECTOR_SIZE = 512
VIRTIO_BLK_ID_BYTES = 20
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
OUTHDR = struct.Struct("<IIQ")  # type, reserved (ioprio), sector
DISCARD_WZ = struct.Struct("<QII")  # sector, num_sectors, flags
#: struct virtio_blk_config (§5.2.4), zoned characteristics included: 96 bytes
CONFIG = struct.Struct("<QII HBB I BBHI BBH IIIII B3x III IIIIIB3x")
IOV_MAX = 1024
BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
#: _try_nowait's answer for a request the kernel would have blocked on (EAGAIN)
WOULD_BLOCK = -2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int


class BlkError(Exception):
    """A request the device refuses: ``status`` is what the driver gets."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


def _skip(views: list[memoryview], n: int) -> list[memoryview]:
    """The views without their first ``n`` bytes (slices, no copy)."""
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:] if n else v)
        n = 0
    return out


def _total(views: list[memoryview]) -> int:
    return sum(map(len, views))


def _release(views: list[memoryview]) -> None:
    """Release the views (slices of the chain's buffers included) before the request completes: after that,
    guest memory may be unmapped, and a slice still alive would keep the mapping from being released."""
    for v in views:
        v.release()


class IOPool:
    """Threads that run I/O functions taken from a queue (the system calls release the GIL)."""

    def __init__(self, threads: int, name: str = "pyvhost-blk-io") -> None:
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._run, name=f"{name}{i}", daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

    def put(self, fn, *args) -> None:
        self.q.put((fn, args))

    def _run(self) -> None:
        while True:
            fn, args = self.q.get()
            if fn is None:
                return
            try:
                fn(*args)
            except Exception:  # the thread lives on; the job's request is the stop timeout's to report
                log.exception("%s: an I/O job failed", threading.current_thread().name)
            del fn, args  # nothing of the request outlives it here

    def close(self) -> None:
        for _ in self.threads:
            self.q.put((None, ()))
        for t in self.threads:
            t.join(30)


class BlkDevice(ChainDevice):
    """virtio-blk on ``path`` (a raw image file or a block device)."""

    device_id = VIRTIO_ID_BLOCK
    access_platform = True  # behind a vIOMMU: every access translated, requests drained on a stop

    def __init__(
        self,
        path: str,
        readonly: bool = False,
        num_queues: int = 1,
        io_threads: int = 4,
        serial: str | None = None,
        seg_max: int = 126,
        size_max: int = 1 << 20,
        max_discard_sectors: int = (1 << 22) - 1,
        max_discard_seg: int = 32,
        io_delay: float = 0.0,
        nowait: bool = True,
    ) -> None:
        self.path = path
        self.readonly = readonly
        self.num_queues = num_queues
        self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            st = os.fstat(self.fd)
            self.is_blockdev = stat.S_ISBLK(st.st_mode)
            if self.is_blockdev:
                buf = bytearray(8)
                fcntl.ioctl(self.fd, BLKGETSIZE64, buf)
                size = struct.unpack("<Q", buf)[0]
            elif stat.S_ISREG(st.st_mode):
                size = st.st_size
            else:
                raise ValueError(f"{path} is neither a regular file nor a block device")
        except BaseException:
            os.close(self.fd)
            raise
        self.size = size
        self.capacity = size // SECTOR_SIZE  # sectors; a partial last sector is not exposed
        if size % SECTOR_SIZE:
            log.warning(
                "%s: %d bytes is not a multiple of %d; the last %d bytes are not exposed",
                path,
                size,
                SECTOR_SIZE,
                size % SECTOR_SIZE,
            )
        self.serial = (serial if serial is not None else os.path.basename(path)).encode()[:VIRTIO_BLK_ID_BYTES]
        self.seg_max, self.size_max = seg_max, size_max
        self.max_discard_sectors, self.max_discard_seg = max_discard_sectors, max_discard_seg
        self.features = (
            (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_CONFIG_WCE)
            | (1 << VIRTIO_BLK_F_MQ)
        )
        if readonly:
            self.features |= 1 << VIRTIO_BLK_F_RO
        else:
            self.features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
        self.writeback = 1  # the config's cache mode: 1 write-back (FLUSH needed), 0 write-through
        self.negotiated = 0
        self.pool = IOPool(io_threads) if io_threads > 0 else None
        self.counts = {
            "read": 0,
            "write": 0,
            "flush": 0,
            "get_id": 0,
            "discard": 0,
            "write_zeroes": 0,
            "read_bytes": 0,
            "write_bytes": 0,
            "ioerr": 0,
            "unsupp": 0,
        }
        self.lock = threading.Lock()
        #: seconds each request takes at least (simulates a slow medium; tests and demonstrations)
        self.io_delay = io_delay
        #: request kinds tried at once without blocking before going to the I/O threads (_try_nowait)
        self.nowait = {"read", "write"} if nowait else set()
        self.nowait_max = 64 << 10
        self._nowait_failures = {"read": 0, "write": 0}
        self._nowait_worked: set[str] = set()
        #: a job that takes longer than this (seconds) blocked: the ones after it go to the other threads (longer
        #: than a wait for the GIL, which another thread holds for up to the switch interval)
        self.block_time = 2 * sys.getswitchinterval()
        #: reads and writes waiting for a runner (see _run_backlog); runners at work; when the job a runner
        #: is on began (time.perf_counter)
        self.backlog: collections.deque[tuple] = collections.deque()
        self.runners = 0
        self.runner_lock = threading.Lock()
        self.busy_since = 0.0
        #: an I/O thread completes its requests at least this often in time (seconds); in requests it is
        #: ChainDevice.publish_every, the size of the lots the worker hands over
        self.publish_time = 200e-6

    # -- configuration ----------------------------------------------------------------------------------
    def config_space(self) -> bytes:
        return CONFIG.pack(
            self.capacity,
            self.size_max,
            self.seg_max,
            0,
            0,
            0,  # geometry (not offered)
            SECTOR_SIZE,  # blk_size
            0,
            0,
            0,
            0,  # topology (not offered)
            self.writeback,
            0,
            self.num_queues,
            self.max_discard_sectors,
            self.max_discard_seg,
            8,  # discard (alignment: 4 KiB)
            self.max_discard_sectors,
            self.max_discard_seg,
            1,  # write zeroes, may unmap
            0,
            0,
            0,  # secure erase (not offered)
            0,
            0,
            0,
            0,
            0,
            0,
        )  # zoned (not offered)

    def write_config(self, offset: int, data: bytes) -> None:
        wce = 32  # offset of ``writeback``
        if not self.negotiated & (1 << VIRTIO_BLK_F_CONFIG_WCE) or offset != wce or len(data) != 1 or data[0] > 1:
            raise ValueError(
                f"config write of {len(data)} bytes at {offset}: only 'writeback' (offset {wce}, "
                "0 or 1) is writable, with VIRTIO_BLK_F_CONFIG_WCE"
            )
        self.writeback = data[0]
        log.info("cache mode: %s", "write-back" if self.writeback else "write-through")

    def set_features(self, features: int) -> None:
        self.negotiated = features
        if not features & (1 << VIRTIO_BLK_F_FLUSH) and not features & (1 << VIRTIO_BLK_F_CONFIG_WCE):
            self.writeback = 0  # a driver that cannot flush gets write-through
        elif not features & (1 << VIRTIO_BLK_F_CONFIG_WCE):
            self.writeback = 1

    # -- requests -----------------------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        self.submit_batch([req])

    def submit_batch(self, reqs: list[Request]) -> None:
        """Check each request, do at once what needs no wait (a refusal, a read from the page cache), and hand
        the rest of the reads and writes to the I/O threads' backlog: no wake-up while a runner is at work,
        their completions published a few at a time (:meth:`_run_backlog`).  What waits on the medium (a
        read not in the page cache, a flush, a discard) goes to a thread of its own."""
        jobs: list[tuple] = []  # reads and writes, to one thread together
        alone: list[tuple] = []  # requests that wait on the medium (a flush, a read from the disk): one each
        done: list[tuple[Request, int]] = []
        for req in reqs:
            writable = req.writable
            if not writable or not len(writable[-1]):
                log.error(
                    "queue %d: request %d has no writable status byte; completed with length 0", req.queue, req.head
                )
                self._count("ioerr")
                done.append((req, 0))
                continue
            try:
                job = self._parse(req)
            except BlkError as e:
                log.debug("queue %d: request %d refused: %s", req.queue, req.head, e)
                done.append((req, self._status(req, e.status, 0)))
                continue
            if job[0] in self.nowait:
                n = self._try_nowait(req, *job)
                if n >= 0:
                    done.append((req, n))
                    continue
                if n == WOULD_BLOCK:  # not in the page cache: the disk's own parallelism is worth a thread
                    alone.append((req, *job))
                    continue
            (jobs if job[0] in ("read", "write") else alone).append((req, *job))
        complete_all(done)
        if self.pool is None:
            complete_all([(job[0], self._do(*job)) for job in jobs + alone])
            return
        if self.io_delay:  # a slow medium: each request to a thread of its own
            alone += jobs
        elif jobs:
            self._queue(jobs)
        for job in alone:
            self.pool.put(self._run_alone, *job)

    def _run_alone(self, req: Request, *job) -> None:
        req.complete(self._do(req, *job))

    def _queue(self, jobs: list[tuple]) -> None:
        """Add reads and writes to the backlog; start a runner (an I/O thread that works through the backlog)
        if none is at work, or another one if the one at work has been on its job for longer than
        ``block_time`` (it blocked)."""
        assert self.pool is not None
        self.backlog.extend(jobs)
        with self.runner_lock:
            busy = self.runners and time.perf_counter() - self.busy_since > self.block_time
            if self.runners and not (busy and self.runners < len(self.pool.threads)):
                return  # a runner will see the jobs (it looks at the backlog under the lock before it stops)
            self.runners += 1
        self.pool.put(self._run_backlog)

    def _run_backlog(self) -> None:
        """A runner, in an I/O thread: do the backlog's jobs in order, completing them a few at a time
        (``publish_every``, or what ``publish_time`` saw done) -- the driver sees some early and sends more
        meanwhile, and the queue's worker is woken once per lot, not per request; stop when the backlog is
        empty.  One runner works while its jobs do not block: on one CPU more threads buy nothing but
        switches; a job that blocks (a slow medium) starts another runner for the jobs behind it."""
        assert self.pool is not None
        done: list[tuple[Request, int]] = []
        t_pub = time.perf_counter()
        backlog = self.backlog
        while True:
            try:
                job = backlog.popleft()
            except IndexError:
                complete_all(done)
                done = []
                with self.runner_lock:
                    if backlog:
                        continue
                    self.runners -= 1
                    return
            self.busy_since = t = time.perf_counter()
            try:
                done.append((job[0], self._do(*job)))
            except BaseException:  # (_do catches what the request may raise) the jobs done are still completed
                complete_all(done)
                with self.runner_lock:
                    self.runners -= 1
                raise
            now = time.perf_counter()
            if now - t > self.block_time and backlog:  # blocked: the jobs behind it need not wait for it
                with self.runner_lock:
                    if self.runners < len(self.pool.threads):
                        self.runners += 1
                        self.pool.put(self._run_backlog)
            if len(done) >= self.publish_every or now - t_pub > self.publish_time:
                complete_all(done)
                done = []
                t_pub = now

    def _try_nowait(self, req: Request, kind: str, offset: int, views) -> int:
        """The fast path, in the queue's worker: a read or write the kernel can do without blocking (the data
        is in the page cache; RWF_NOWAIT) is done at once, saving the trip through the I/O threads; its used
        length, or -1 for anything that would block, or is only partly done: that goes to the threads (and
        is done whole there), WOULD_BLOCK for a read or write the kernel said would block (EAGAIN)."""
        if self.io_delay or len(views) > IOV_MAX or (kind == "write" and not self.writeback):
            return -1
        total = _total(views)
        if total > self.nowait_max:  # a long copy would hold up the queue's other requests
            return -1
        try:
            if kind == "read":
                n = os.preadv(self.fd, views, offset, os.RWF_NOWAIT)
            else:
                n = os.pwritev(self.fd, views, offset, os.RWF_NOWAIT)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self.nowait.discard(kind)  # not for this file (system): always use the threads
            elif e.errno == errno.EAGAIN:
                self._nowait_failures[kind] += 1
                if self._nowait_failures[kind] >= 64 and kind not in self._nowait_worked:
                    # e.g. buffered writes on a file system that never does them without blocking
                    log.info("%ss never complete without blocking here; they all go to the I/O threads", kind)
                    self.nowait.discard(kind)
                return WOULD_BLOCK
            return -1
        if n != total:
            return -1
        self._nowait_worked.add(kind)
        _release(views)
        self._count(kind, kind + "_bytes", n)
        return self._status(req, VIRTIO_BLK_S_OK, n if kind == "read" else 0)

    def _parse(self, req: Request) -> tuple:
        """Check the request; return what the I/O thread does: (kind, offset, views or ranges)."""
        hdr = req.readable[0] if req.readable else b""
        if len(hdr) == OUTHDR.size:
            rtype, _reserved, sector = OUTHDR.unpack(hdr)
        elif len(hdr) > OUTHDR.size:
            rtype, _reserved, sector = OUTHDR.unpack_from(hdr)
        else:
            raw = b"".join(bytes(v) for v in req.readable)
            if len(raw) < OUTHDR.size:
                raise BlkError(VIRTIO_BLK_S_IOERR, f"header of {len(raw)} bytes, expected {OUTHDR.size}")
            rtype, _reserved, sector = OUTHDR.unpack_from(raw)
        if rtype == VIRTIO_BLK_T_IN or rtype == VIRTIO_BLK_T_OUT:
            if rtype == VIRTIO_BLK_T_IN:
                last = req.writable[-1]
                data = req.writable[:-1] if len(last) == 1 else [*req.writable[:-1], last[:-1]]
            else:
                if self.readonly:
                    raise BlkError(VIRTIO_BLK_S_IOERR, "write to a read-only image")
                # the usual layout: the header alone in the first buffer
                data = req.readable[1:] if len(hdr) == OUTHDR.size else _skip(req.readable, OUTHDR.size)
            n = _total(data)
            if n % SECTOR_SIZE:
                raise BlkError(VIRTIO_BLK_S_IOERR, f"data of {n} bytes is not a multiple of {SECTOR_SIZE}")
            self._check_range(sector, n // SECTOR_SIZE)
            return ("read" if rtype == VIRTIO_BLK_T_IN else "write", sector * SECTOR_SIZE, data)
        if rtype == VIRTIO_BLK_T_FLUSH:
            return ("flush", 0, None)
        if rtype == VIRTIO_BLK_T_GET_ID:
            return ("get_id", 0, None)
        if rtype == VIRTIO_BLK_T_DISCARD or rtype == VIRTIO_BLK_T_WRITE_ZEROES:
            kind = "discard" if rtype == VIRTIO_BLK_T_DISCARD else "write_zeroes"
            bit = VIRTIO_BLK_F_DISCARD if rtype == VIRTIO_BLK_T_DISCARD else VIRTIO_BLK_F_WRITE_ZEROES
            if self.readonly:
                raise BlkError(VIRTIO_BLK_S_IOERR, f"{kind} on a read-only image")
            if not self.negotiated & (1 << bit):
                raise BlkError(VIRTIO_BLK_S_UNSUPP, f"{kind} not negotiated")
            raw = b"".join(bytes(v) for v in _skip(req.readable, OUTHDR.size))
            if not raw or len(raw) % DISCARD_WZ.size or len(raw) // DISCARD_WZ.size > self.max_discard_seg:
                raise BlkError(VIRTIO_BLK_S_IOERR, f"{kind}: {len(raw)} bytes of segments")
            ranges = []
            for s, num, flags in DISCARD_WZ.iter_unpack(raw):
                allowed = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if rtype == VIRTIO_BLK_T_WRITE_ZEROES else 0
                if flags & ~allowed:
                    raise BlkError(VIRTIO_BLK_S_UNSUPP, f"{kind}: flags {flags:#x}")
                if num > self.max_discard_sectors:
                    raise BlkError(VIRTIO_BLK_S_IOERR, f"{kind}: {num} sectors, at most {self.max_discard_sectors}")
                self._check_range(s, num)
                ranges.append((s * SECTOR_SIZE, num * SECTOR_SIZE, flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
            return (kind, 0, ranges)
        raise BlkError(VIRTIO_BLK_S_UNSUPP, f"request type {rtype}")

    def _check_range(self, sector: int, count: int) -> None:
        if sector + count > self.capacity:
            raise BlkError(VIRTIO_BLK_S_IOERR, f"sectors {sector}+{count} beyond the capacity {self.capacity}")

    def _do(self, req: Request, kind: str, offset: int, what) -> int:
        """In an I/O thread: do the request and write its status; its used length."""
        written = 0
        status = VIRTIO_BLK_S_OK
        try:
            if self.io_delay:
                time.sleep(self.io_delay)
            if kind == "read":
                written = self._preadv(what, offset)
                self._count("read", "read_bytes", written)
            elif kind == "write":  # write-through: durable in the same call (RWF_DSYNC), no fdatasync after
                n = self._pwritev(what, offset, 0 if self.writeback else os.RWF_DSYNC)
                self._count("write", "write_bytes", n)
            elif kind == "flush":
                if not self.readonly:
                    os.fdatasync(self.fd)
                self._count("flush")
            elif kind == "get_id":
                last = req.writable[-1]
                data = req.writable[:-1] + ([last[:-1]] if len(last) > 1 else [])
                ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
                for v in data:
                    take = min(len(v), len(ident) - written)
                    v[:take] = ident[written : written + take]
                    written += take
                self._count("get_id")
            else:
                for off, length, unmap in what:
                    if kind == "discard":
                        self._discard(off, length)
                    else:
                        self._write_zeroes(off, length, unmap)
                if not self.writeback:
                    os.fdatasync(self.fd)
                self._count(kind)
        except OSError as e:
            log.error("queue %d: %s at byte %d failed: %s", req.queue, kind, offset, e)
            status, written = VIRTIO_BLK_S_IOERR, 0
        except Exception:
            log.exception("queue %d: %s request failed", req.queue, kind)
            status, written = VIRTIO_BLK_S_IOERR, 0
        if kind in ("read", "write"):
            _release(what)
        return self._status(req, status, written)

    def _status(self, req: Request, status: int, written: int) -> int:
        """Write the status byte; the used length (``written`` data bytes and the status)."""
        if status == VIRTIO_BLK_S_IOERR:
            self._count("ioerr")
        elif status == VIRTIO_BLK_S_UNSUPP:
            self._count("unsupp")
        last = req.writable[-1]
        last[len(last) - 1] = status
        return written + 1

    def _count(self, name: str, bytes_name: str | None = None, n: int = 0) -> None:
        with self.lock:
            self.counts[name] += 1
            if bytes_name:
                self.counts[bytes_name] += n

    # -- system calls -----------------------------------------------------------------------------------
    def _preadv(self, views: list[memoryview], offset: int) -> int:
        total = _total(views)
        done = os.preadv(self.fd, views, offset) if 0 < len(views) <= IOV_MAX else 0  # one call, usually all
        while done < total:
            part = _skip(views, done)[:IOV_MAX]
            n = os.preadv(self.fd, part, offset + done)
            if n == 0:
                raise OSError(errno.EIO, f"end of file at byte {offset + done}")
            done += n
        return done

    def _pwritev(self, views: list[memoryview], offset: int, flags: int = 0) -> int:
        """Write ``views`` at ``offset``; ``flags``: RWF_DSYNC makes each call durable (write-through)."""
        total = _total(views)
        done = os.pwritev(self.fd, views, offset, flags) if 0 < len(views) <= IOV_MAX else 0  # usually all
        while done < total:
            part = _skip(views, done)[:IOV_MAX]
            n = os.pwritev(self.fd, part, offset + done, flags)
            if n == 0:
                raise OSError(errno.EIO, f"no progress writing at byte {offset + done}")
            done += n
        return done

    def _discard(self, offset: int, length: int) -> None:
        """Best effort: the data of a discarded range is unspecified afterwards, so a failure is not an error."""
        try:
            if self.is_blockdev:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("<QQ", offset, length))
            else:
                self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            log.debug("discard %d+%d: %s", offset, length, e)

    def _write_zeroes(self, offset: int, length: int, unmap: int) -> None:
        try:
            if self.is_blockdev:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("<QQ", offset, length))
            else:
                mode = FALLOC_FL_PUNCH_HOLE if unmap else FALLOC_FL_ZERO_RANGE
                self._fallocate(mode | FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise
        zeros = memoryview(bytes(min(length, 1 << 20)))
        done = 0
        while done < length:
            done += os.pwrite(self.fd, zeros[: min(len(zeros), length - done)], offset + done)

    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        if _libc.fallocate(self.fd, mode, offset, length) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    # -- lifetime -----------------------------------------------------------------------------------------
    def stats(self) -> dict:
        with self.lock:
            return dict(self.counts)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

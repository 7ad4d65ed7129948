"""virtio-fs (virtio 1.2 §5.11): FUSE requests from the guest, answered by a :class:`pyvhost.fs.Operations`.

Queue 0 is the high-priority queue (FORGET, BATCH_FORGET, INTERRUPT: answered at once in its worker), queues 1..n
are request queues.  Each chain is one FUSE request: the device-readable part holds the ``fuse_in_header`` and
the arguments (and, for WRITE, the data), the device-writable part receives the ``fuse_out_header`` and the
result (for READ, the data).  The header and arguments are gathered and checked (``fuse``: lengths, names,
offsets); READ and WRITE hand the guest's buffers themselves to ``Operations.read_into``/``write_from`` (the
passthrough does ``os.preadv``/``os.pwritev`` on them: no copy).  Requests run on a thread pool and complete
out of order.  A request too short to carry a header is logged and completed with nothing written; anything
else wrong gets an errno in its reply.  DAX (the shared memory window) is not offered.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .. import fuse as F
from ..fs import NOW, Attr, Context, Entry, Operations, SetAttr, dtype
from ..ring.state import Q_SIZE
from .base import Ring, StepFn
from .chain_device import ChainDevice, Request

log = logging.getLogger(__name__)

VIRTIO_ID_FS = 26
#: struct virtio_fs_config: tag (UTF-8, NUL-padded), num_request_queues
CONFIG = struct.Struct("<36sI")
TAG_MAX = 36
HIPRIO_QUEUE = 0
#: --cache: entry and attribute timeout (seconds), FOPEN_* flags of every open, of every opendir
CACHE_MODES: dict[str, tuple[float, int, int]] = {
    "none": (0.0, F.FOPEN_DIRECT_IO, 0),
    "auto": (1.0, 0, 0),
    "always": (86400.0, F.FOPEN_KEEP_CACHE, F.FOPEN_KEEP_CACHE | F.FOPEN_CACHE_DIR),
}
#: the largest WRITE (and READ) before INIT, and the least offered: FUSE's default of 32 pages
MAX_WRITE = 32 * 4096
#: the most pages a request may carry (FUSE_MAX_MAX_PAGES), when the guest offers FUSE_MAX_PAGES
MAX_PAGES = 256
#: descriptors of a READ or WRITE besides its pages (in header, arguments, out header, reply; one spare)
REQUEST_OVERHEAD = 8
PAGE = 4096
#: the largest request other than WRITE (names and a symlink target, with room to spare)
MAX_IN = 16384
#: INIT flags offered (when the guest offers them)
INIT_FLAGS = (
    F.FUSE_ASYNC_READ
    | F.FUSE_ATOMIC_O_TRUNC
    | F.FUSE_BIG_WRITES
    | F.FUSE_AUTO_INVAL_DATA
    | F.FUSE_DO_READDIRPLUS
    | F.FUSE_READDIRPLUS_AUTO
    | F.FUSE_PARALLEL_DIROPS
)
#: opcodes that change the filesystem (EROFS when read-only)
MODIFYING = {
    F.FUSE_SETATTR,
    F.FUSE_SYMLINK,
    F.FUSE_MKNOD,
    F.FUSE_MKDIR,
    F.FUSE_UNLINK,
    F.FUSE_RMDIR,
    F.FUSE_RENAME,
    F.FUSE_RENAME2,
    F.FUSE_LINK,
    F.FUSE_WRITE,
    F.FUSE_CREATE,
    F.FUSE_FALLOCATE,
    F.FUSE_SETXATTR,
    F.FUSE_REMOVEXATTR,
}
NO_REPLY = {F.FUSE_FORGET, F.FUSE_BATCH_FORGET, F.FUSE_INTERRUPT}
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536


def gather(views: list[memoryview], n: int) -> bytes:
    """The first ``n`` bytes of ``views`` (fewer if they hold fewer)."""
    out = []
    for v in views:
        if n <= 0:
            break
        out.append(bytes(v[:n]))
        n -= len(v)
    return b"".join(out)


def scatter(views: list[memoryview], data: bytes) -> int:
    """Write ``data`` across ``views`` in order; the bytes written."""
    done = 0
    for v in views:
        if done >= len(data):
            break
        n = min(len(v), len(data) - done)
        v[:n] = data[done : done + n]
        done += n
    return done


def window(views: list[memoryview], skip: int, n: int) -> list[memoryview]:
    """Slices of ``views`` covering bytes ``skip`` .. ``skip + n`` (no copy; release them after use)."""
    out = []
    for v in views:
        if n <= 0:
            break
        if skip >= len(v):
            skip -= len(v)
            continue
        part = v[skip : skip + n]
        out.append(part)
        n -= len(part)
        skip = 0
    return out


def release(views: list[memoryview]) -> None:
    for v in views:
        v.release()


class FsDevice(ChainDevice):
    """virtio-fs serving ``ops`` under ``tag``."""

    device_id = VIRTIO_ID_FS

    def __init__(
        self,
        ops: Operations,
        tag: str,
        request_queues: int = 1,
        thread_pool_size: int = 4,
        cache: str = "auto",
        readonly: bool = False,
    ) -> None:
        raw = tag.encode()
        if not 0 < len(raw) <= TAG_MAX or b"\0" in raw:
            raise ValueError(f"tag {tag!r}: 1 to {TAG_MAX} bytes of UTF-8 without NUL")
        if cache not in CACHE_MODES:
            raise ValueError(f"cache mode {cache!r}: one of {', '.join(CACHE_MODES)}")
        if request_queues < 1:
            raise ValueError("at least one request queue")
        self.ops, self.tag, self.request_queues, self.readonly = ops, raw, request_queues, readonly
        self.num_queues = 1 + request_queues
        self.timeout, self.open_flags, self.opendir_flags = CACHE_MODES[cache]
        self.pool = ThreadPoolExecutor(thread_pool_size, "pyvhost-fs") if thread_pool_size > 0 else None
        #: held around each request when the Operations are not thread-safe
        self.serial: contextlib.AbstractContextManager = (
            contextlib.nullcontext() if ops.concurrent else threading.Lock()
        )
        self.minor = 0  # the protocol's minor version, once INIT is done
        #: the largest READ/WRITE of this session (INIT sets it from the request queues' sizes)
        self.max_io = MAX_WRITE
        #: sizes of the request queues, as their workers start
        self.queue_sizes: dict[int, int] = {}
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.handlers: dict[int, Callable[[F.InHeader, F.Args, Context], bytes]] = {
            F.FUSE_INIT: self._init,
            F.FUSE_DESTROY: self._destroy,
            F.FUSE_LOOKUP: self._lookup,
            F.FUSE_GETATTR: self._getattr,
            F.FUSE_SETATTR: self._setattr,
            F.FUSE_READLINK: lambda h, a, c: self.ops.readlink(h.nodeid, c),
            F.FUSE_SYMLINK: self._symlink,
            F.FUSE_MKNOD: self._mknod,
            F.FUSE_MKDIR: self._mkdir,
            F.FUSE_UNLINK: self._unlink,
            F.FUSE_RMDIR: self._rmdir,
            F.FUSE_RENAME: self._rename,
            F.FUSE_RENAME2: self._rename,
            F.FUSE_LINK: self._link,
            F.FUSE_OPEN: self._open,
            F.FUSE_STATFS: self._statfs,
            F.FUSE_RELEASE: self._release,
            F.FUSE_FSYNC: self._fsync,
            F.FUSE_FLUSH: self._flush,
            F.FUSE_OPENDIR: self._opendir,
            F.FUSE_RELEASEDIR: self._releasedir,
            F.FUSE_FSYNCDIR: self._fsyncdir,
            F.FUSE_ACCESS: self._access,
            F.FUSE_CREATE: self._create,
            F.FUSE_FALLOCATE: self._fallocate,
            F.FUSE_LSEEK: self._lseek,
            F.FUSE_GETXATTR: self._getxattr,
            F.FUSE_LISTXATTR: self._listxattr,
        }

    # -- device --------------------------------------------------------------------------------------------
    def config_space(self) -> bytes:
        return CONFIG.pack(self.tag, self.request_queues)

    def make_step(self, rings: list[Ring]) -> StepFn:
        for ring in rings:
            if ring.index != HIPRIO_QUEUE:
                self.queue_sizes[ring.index] = int(ring.q[Q_SIZE])
        return super().make_step(rings)

    def max_pages(self) -> int:
        """Pages a READ/WRITE may carry: up to 256, but a request must fit the smallest request queue (a chain is
        never longer than its queue, indirect or not -- virtio 1.2 2.7.5.3.1), and never fewer than 32."""
        sizes = list(self.queue_sizes.values())
        fit = (min(sizes) if sizes else 0) - REQUEST_OVERHEAD
        return max(MAX_WRITE // PAGE, min(MAX_PAGES, fit))

    def submit(self, req: Request) -> None:
        if self.pool is None or req.queue == HIPRIO_QUEUE:
            self.serve(req)
        else:
            self.pool.submit(self.serve, req)

    def serve(self, req: Request) -> None:
        """Answer one request and complete its chain (whatever happens)."""
        n = 0
        try:
            with self.serial:
                n = self.process(req.queue, req.readable, req.writable)
        except Exception:
            log.exception("queue %d: FUSE request (chain %d) failed", req.queue, req.head)
        finally:
            req.complete(n)

    def stats(self) -> dict:
        with self.lock:
            return dict(self.counts)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.ops.destroy()

    def _count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    # -- one request ----------------------------------------------------------------------------------------
    def process(self, queue: int, readable: list[memoryview], writable: list[memoryview]) -> int:
        """Answer the request in ``readable`` into ``writable``; the bytes written."""
        total = sum(len(v) for v in readable)
        try:
            h = F.InHeader.parse(gather(readable, F.IN_HEADER.size))
        except F.FuseError as e:
            log.error("queue %d: %s; completed without a reply", queue, e)
            self._count("malformed")
            return 0
        name = F.OPCODE_NAMES.get(h.opcode, str(h.opcode))
        if h.opcode in NO_REPLY:
            try:
                self._no_reply(h, readable, total)
            except (F.FuseError, OSError) as e:
                log.error("queue %d: %s: %s", queue, name, e)
                self._count("malformed")
            return 0
        room = sum(len(v) for v in writable)
        if room < F.OUT_HEADER.size:
            log.error("queue %d: %s request with %d writable bytes, no room for a reply", queue, name, room)
            self._count("malformed")
            return 0
        self._count(name if h.opcode in F.OPCODE_NAMES else "unknown")
        try:
            if not F.IN_HEADER.size <= h.len <= total:
                raise F.FuseError(errno.EINVAL, f"header says {h.len} bytes, the request has {total}")
            if self.minor == 0 and h.opcode != F.FUSE_INIT:
                raise F.FuseError(errno.EIO, "request before INIT")
            if self.readonly and (h.opcode in MODIFYING):
                raise F.FuseError(errno.EROFS)
            ctx = Context(h.uid, h.gid, h.pid)
            if h.opcode == F.FUSE_READ:
                return self._read(h, readable, writable, room)
            if h.opcode == F.FUSE_WRITE:
                payload = self._write(h, readable)
            elif h.opcode in (F.FUSE_READDIR, F.FUSE_READDIRPLUS):
                payload = self._readdir(h, F.Args(gather(readable, h.len)[F.IN_HEADER.size :]), ctx, room)
            else:
                handler = self.handlers.get(h.opcode)
                if handler is None:
                    raise F.FuseError(errno.ENOSYS)
                if h.len > MAX_IN:
                    raise F.FuseError(errno.EINVAL, f"{h.len} bytes of request")
                payload = handler(h, F.Args(gather(readable, h.len)[F.IN_HEADER.size :]), ctx)
            if F.OUT_HEADER.size + len(payload) > room:
                raise F.FuseError(errno.ERANGE, f"a reply of {len(payload)} bytes, {room} bytes of room")
            return scatter(writable, F.out_header(h.unique, 0, len(payload)) + payload)
        except (F.FuseError, OSError) as e:
            err = e.errno if e.errno and 0 < e.errno < 4096 else errno.EIO
            if isinstance(e, F.FuseError) and err != errno.ENOSYS:
                log.warning("queue %d: %s (unique %d, node %d): %s", queue, name, h.unique, h.nodeid, e)
                self._count("refused")
            return scatter(writable, F.out_header(h.unique, err, 0))
        except Exception:  # a bug in the Operations: the guest gets EIO, the device goes on
            log.exception("queue %d: %s (unique %d, node %d) failed", queue, name, h.unique, h.nodeid)
            self._count("failed")
            return scatter(writable, F.out_header(h.unique, errno.EIO, 0))

    def _no_reply(self, h: F.InHeader, readable: list[memoryview], total: int) -> None:
        if not F.IN_HEADER.size <= h.len <= min(total, MAX_IN + F.IN_HEADER.size):
            raise F.FuseError(errno.EINVAL, f"header says {h.len} bytes, the request has {total}")
        args = F.Args(gather(readable, h.len)[F.IN_HEADER.size :])
        if h.opcode == F.FUSE_FORGET:
            (n,) = args.struct(F.FORGET_IN)
            self._count("FORGET")
            self.ops.forget(h.nodeid, n)
        elif h.opcode == F.FUSE_BATCH_FORGET:
            count, _ = args.struct(F.BATCH_FORGET_IN)
            if count * F.FORGET_ONE.size > len(args.data) - args.pos:
                raise F.FuseError(errno.EINVAL, f"BATCH_FORGET of {count} entries in {h.len} bytes")
            self._count("BATCH_FORGET")
            for _ in range(count):
                nodeid, n = args.struct(F.FORGET_ONE)
                self.ops.forget(nodeid, n)
        else:
            self._count("INTERRUPT")  # requests are not interrupted: each one finishes and is answered

    # -- replies --------------------------------------------------------------------------------------------
    @staticmethod
    def _attr(a: Attr) -> bytes:
        return F.pack_attr(
            a.ino,
            a.size,
            a.blocks,
            a.atime_ns,
            a.mtime_ns,
            a.ctime_ns,
            a.mode,
            a.nlink,
            a.uid,
            a.gid,
            a.rdev,
            a.blksize,
        )

    def _entry(self, e: Entry) -> bytes:
        s, ns = F.timeout_split(self.timeout)
        return F.ENTRY_OUT.pack(e.ino, e.generation, s, s, ns, ns) + self._attr(e.attr)

    def _attr_out(self, a: Attr) -> bytes:
        s, ns = F.timeout_split(self.timeout)
        return F.ATTR_OUT.pack(s, ns, 0) + self._attr(a)

    @staticmethod
    def _offset(offset: int, length: int = 0) -> None:
        if offset > F.OFF_MAX or length > F.OFF_MAX or offset + length > F.OFF_MAX:
            raise F.FuseError(errno.EINVAL, f"offset {offset} length {length} out of range")

    # -- opcodes --------------------------------------------------------------------------------------------
    def _init(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        major, minor, readahead, flags = a.struct(F.INIT_IN)
        if major < F.FUSE_KERNEL_VERSION:
            raise F.FuseError(errno.EPROTO, f"FUSE {major}.{minor} is too old")
        if major > F.FUSE_KERNEL_VERSION:  # the guest asks again with our major
            return F.INIT_OUT.pack(F.FUSE_KERNEL_VERSION, F.FUSE_KERNEL_MINOR_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        if self.minor:
            self.ops.destroy()  # a new session (the guest rebooted or remounted)
        self.minor = min(minor, F.FUSE_KERNEL_MINOR_VERSION)
        self.ops.init()
        pages = self.max_pages() if flags & F.FUSE_MAX_PAGES else MAX_WRITE // PAGE
        self.max_io = pages * PAGE
        out_flags = flags & (INIT_FLAGS | F.FUSE_MAX_PAGES)
        log.info(
            "FUSE %d.%d session (guest offers %d.%d, flags %#x); requests of up to %d pages",
            major, self.minor, major, minor, flags, pages,
        )  # fmt: skip
        return F.INIT_OUT.pack(
            F.FUSE_KERNEL_VERSION, self.minor, readahead, out_flags, 64, 48, self.max_io, 1, pages, 0, 0
        )

    def _destroy(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        self.ops.destroy()
        self.minor = 0
        return b""

    def _lookup(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        return self._entry(self.ops.lookup(h.nodeid, a.last_name(), c))

    def _getattr(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        flags, _, fh = a.struct(F.GETATTR_IN)
        return self._attr_out(self.ops.getattr(h.nodeid, fh if flags & F.FUSE_GETATTR_FH else None, c))

    def _setattr(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        valid, _, fh, size, _lo, atime, mtime, _ct, atimens, mtimens, _ctn, mode, _u4, uid, gid, _u5 = a.struct(
            F.SETATTR_IN
        )
        ch = SetAttr()
        if valid & F.FATTR_MODE:
            ch.mode = mode & 0o7777
        if valid & F.FATTR_UID:
            ch.uid = uid
        if valid & F.FATTR_GID:
            ch.gid = gid
        if valid & F.FATTR_SIZE:
            self._offset(size)
            ch.size = size
        for bit, now, sec, nsec, attr in (
            (F.FATTR_ATIME, F.FATTR_ATIME_NOW, atime, atimens, "atime_ns"),
            (F.FATTR_MTIME, F.FATTR_MTIME_NOW, mtime, mtimens, "mtime_ns"),
        ):
            if valid & now:
                setattr(ch, attr, NOW)
            elif valid & bit:
                if sec > F.OFF_MAX // 1_000_000_000 or nsec >= 1_000_000_000:
                    raise F.FuseError(errno.EINVAL, f"time {sec}.{nsec} out of range")
                setattr(ch, attr, sec * 1_000_000_000 + nsec)
        return self._attr_out(self.ops.setattr(h.nodeid, ch, fh if valid & F.FATTR_FH else None, c))

    def _symlink(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        name = a.name()
        target = a.cstring(F.PATH_MAX - 1)
        if a.pos != len(a.data):
            raise F.FuseError(errno.EINVAL, "bytes after the symlink target")
        if not target:
            raise F.FuseError(errno.ENOENT, "empty symlink target")
        return self._entry(self.ops.symlink(h.nodeid, name, target, c))

    def _mknod(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        mode, rdev, umask, _ = a.struct(F.MKNOD_IN)
        c.umask = umask
        return self._entry(self.ops.mknod(h.nodeid, a.last_name(), mode, rdev, c))

    def _mkdir(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        mode, umask = a.struct(F.MKDIR_IN)
        c.umask = umask
        return self._entry(self.ops.mkdir(h.nodeid, a.last_name(), mode, c))

    def _unlink(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        self.ops.unlink(h.nodeid, a.last_name(), c)
        return b""

    def _rmdir(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        self.ops.rmdir(h.nodeid, a.last_name(), c)
        return b""

    def _rename(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        if h.opcode == F.FUSE_RENAME2:
            newdir, flags, _ = a.struct(F.RENAME2_IN)
        else:
            (newdir,), flags = a.struct(F.RENAME_IN), 0
        old, new = a.name(), a.last_name()
        self.ops.rename(h.nodeid, old, newdir, new, flags, c)
        return b""

    def _link(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        (old,) = a.struct(F.LINK_IN)
        return self._entry(self.ops.link(old, h.nodeid, a.last_name(), c))

    def _open(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        flags, _ = a.struct(F.OPEN_IN)
        if self.readonly and (flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC):
            raise F.FuseError(errno.EROFS)
        fh = self.ops.open(h.nodeid, flags, c)
        return F.OPEN_OUT.pack(fh, self.open_flags, 0)

    def _create(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        flags, mode, umask, _ = a.struct(F.CREATE_IN)
        c.umask = umask
        entry, fh = self.ops.create(h.nodeid, a.last_name(), mode, flags, c)
        return self._entry(entry) + F.OPEN_OUT.pack(fh, self.open_flags, 0)

    def _read(self, h: F.InHeader, readable: list[memoryview], writable: list[memoryview], room: int) -> int:
        a = F.Args(gather(readable, min(h.len, F.RW_HEADER))[F.IN_HEADER.size :])
        fh, offset, size, *_ = a.struct(F.READ_IN)
        self._offset(offset)
        size = min(size, self.max_io, room - F.OUT_HEADER.size)
        bufs = window(writable, F.OUT_HEADER.size, size)
        try:
            n = self.ops.read_into(h.nodeid, fh, offset, bufs)
        finally:
            release(bufs)
        n = max(0, min(int(n), size))
        with self.lock:
            self.counts["read_bytes"] += n
        return F.OUT_HEADER.size + n if scatter(writable, F.out_header(h.unique, 0, n)) else 0

    def _write(self, h: F.InHeader, readable: list[memoryview]) -> bytes:
        a = F.Args(gather(readable, min(h.len, F.RW_HEADER))[F.IN_HEADER.size :])
        fh, offset, size, *_ = a.struct(F.WRITE_IN)
        self._offset(offset, size)
        if size > self.max_io or F.RW_HEADER + size != h.len:
            raise F.FuseError(errno.EINVAL, f"WRITE of {size} bytes in a request of {h.len}")
        bufs = window(readable, F.RW_HEADER, size)
        try:
            n = self.ops.write_from(h.nodeid, fh, offset, bufs)
        finally:
            release(bufs)
        n = max(0, min(int(n), size))
        with self.lock:
            self.counts["write_bytes"] += n
        return F.WRITE_OUT.pack(n, 0)

    def _statfs(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        s = self.ops.statfs(h.nodeid)
        return F.STATFS_OUT.pack(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize, 0)

    def _release(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        fh, *_ = a.struct(F.RELEASE_IN)
        self.ops.release(h.nodeid, fh)
        return b""

    def _flush(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        fh, *_ = a.struct(F.FLUSH_IN)
        self.ops.flush(h.nodeid, fh)
        return b""

    def _fsync(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        fh, flags, _ = a.struct(F.FSYNC_IN)
        self.ops.fsync(h.nodeid, fh, bool(flags & F.FUSE_FSYNC_FDATASYNC))
        return b""

    def _opendir(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        a.struct(F.OPEN_IN)
        return F.OPEN_OUT.pack(self.ops.opendir(h.nodeid, c), self.opendir_flags, 0)

    def _releasedir(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        fh, *_ = a.struct(F.RELEASE_IN)
        self.ops.releasedir(h.nodeid, fh)
        return b""

    def _fsyncdir(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        fh, flags, _ = a.struct(F.FSYNC_IN)
        self.ops.fsyncdir(h.nodeid, fh, bool(flags & F.FUSE_FSYNC_FDATASYNC))
        return b""

    def _readdir(self, h: F.InHeader, a: F.Args, c: Context, room: int) -> bytes:
        fh, offset, size, *_ = a.struct(F.READ_IN)
        self._offset(offset)
        size = min(size, room - F.OUT_HEADER.size, MAX_WRITE)
        plus = h.opcode == F.FUSE_READDIRPLUS
        out: list[bytes] = []
        used = 0
        for d in self.ops.readdir(h.nodeid, fh, offset):
            name = bytes(d.name)
            if not name or len(name) > F.NAME_MAX or b"/" in name or b"\0" in name:
                log.error("readdir of node %d gave a bad name %r; left out", h.nodeid, name[:64])
                continue
            need = F.dirent_size(name, plus)
            if used + need > size:
                break  # the entry that does not fit is not looked up (its reference would leak)
            ent = F.dirent(d.ino, d.offset, dtype(d.mode), name)
            if plus:
                entry = Entry(0, Attr(d.ino, d.mode))
                if name not in (b".", b".."):
                    try:
                        entry = self.ops.lookup(h.nodeid, name, c)
                    except OSError:
                        pass  # gone meanwhile: listed, not instantiated (node 0)
                ent = self._entry(entry) + ent
            out.append(ent)
            used += need
        return b"".join(out)

    def _access(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        mask, _ = a.struct(F.ACCESS_IN)
        self.ops.access(h.nodeid, mask, c)
        return b""

    def _fallocate(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        fh, offset, length, mode, _ = a.struct(F.FALLOCATE_IN)
        self._offset(offset, length)
        self.ops.fallocate(h.nodeid, fh, mode, offset, length)
        return b""

    def _lseek(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        fh, offset, whence, _ = a.struct(F.LSEEK_IN)
        self._offset(offset)
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
            raise F.FuseError(errno.EINVAL, f"whence {whence}")
        return F.LSEEK_OUT.pack(self.ops.lseek(h.nodeid, fh, offset, whence))

    def _xattr_reply(self, value: bytes, size: int) -> bytes:
        if size == 0:
            return F.GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise OSError(errno.ERANGE, "")
        return value

    def _getxattr(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        size, _ = a.struct(F.GETXATTR_IN)
        name = a.cstring(XATTR_NAME_MAX)
        return self._xattr_reply(bytes(self.ops.getxattr(h.nodeid, name, c)), min(size, XATTR_SIZE_MAX))

    def _listxattr(self, h: F.InHeader, a: F.Args, c: Context) -> bytes:
        size, _ = a.struct(F.GETXATTR_IN)
        names = b"".join(bytes(n) + b"\0" for n in self.ops.listxattr(h.nodeid, c))
        return self._xattr_reply(names, min(size, XATTR_SIZE_MAX))

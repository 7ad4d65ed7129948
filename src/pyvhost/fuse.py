"""The FUSE wire protocol as virtio-fs carries it (include/uapi/linux/fuse.h, protocol 7.31).

Each request is a ``fuse_in_header`` followed by the opcode's arguments; the reply is a ``fuse_out_header``
followed by the opcode's result.  This module names the opcodes, flags and structures of the spec, parses a
request's header and arguments with every length checked (:class:`FuseError` with an errno otherwise), and
builds replies.  It knows nothing of virtqueues or filesystems.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

FUSE_KERNEL_VERSION = 7
#: the minor version spoken (the guest's, if lower)
FUSE_KERNEL_MINOR_VERSION = 31
FUSE_ROOT_ID = 1
NAME_MAX = 255
PATH_MAX = 4096

# opcodes (enum fuse_opcode)
FUSE_LOOKUP = 1
FUSE_FORGET = 2
FUSE_GETATTR = 3
FUSE_SETATTR = 4
FUSE_READLINK = 5
FUSE_SYMLINK = 6
FUSE_MKNOD = 8
FUSE_MKDIR = 9
FUSE_UNLINK = 10
FUSE_RMDIR = 11
FUSE_RENAME = 12
FUSE_LINK = 13
FUSE_OPEN = 14
FUSE_READ = 15
FUSE_WRITE = 16
FUSE_STATFS = 17
FUSE_RELEASE = 18
FUSE_FSYNC = 20
FUSE_SETXATTR = 21
FUSE_GETXATTR = 22
FUSE_LISTXATTR = 23
FUSE_REMOVEXATTR = 24
FUSE_FLUSH = 25
FUSE_INIT = 26
FUSE_OPENDIR = 27
FUSE_READDIR = 28
FUSE_RELEASEDIR = 29
FUSE_FSYNCDIR = 30
FUSE_GETLK = 31
FUSE_SETLK = 32
FUSE_SETLKW = 33
FUSE_ACCESS = 34
FUSE_CREATE = 35
FUSE_INTERRUPT = 36
FUSE_BMAP = 37
FUSE_DESTROY = 38
FUSE_IOCTL = 39
FUSE_POLL = 40
FUSE_NOTIFY_REPLY = 41
FUSE_BATCH_FORGET = 42
FUSE_FALLOCATE = 43
FUSE_READDIRPLUS = 44
FUSE_RENAME2 = 45
FUSE_LSEEK = 46
FUSE_COPY_FILE_RANGE = 47
FUSE_SETUPMAPPING = 48
FUSE_REMOVEMAPPING = 49
FUSE_SYNCFS = 50

#: opcode -> name (for logs)
OPCODE_NAMES = {
    v: k[5:]
    for k, v in dict(globals()).items()
    if k.startswith("FUSE_") and k not in ("FUSE_KERNEL_VERSION", "FUSE_KERNEL_MINOR_VERSION", "FUSE_ROOT_ID")
}

# INIT flags (fuse_init_in.flags / fuse_init_out.flags)
FUSE_ASYNC_READ = 1 << 0
FUSE_POSIX_LOCKS = 1 << 1
FUSE_FILE_OPS = 1 << 2
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_EXPORT_SUPPORT = 1 << 4
FUSE_BIG_WRITES = 1 << 5
FUSE_DONT_MASK = 1 << 6
FUSE_FLOCK_LOCKS = 1 << 10
FUSE_AUTO_INVAL_DATA = 1 << 12
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_READDIRPLUS_AUTO = 1 << 14
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_HANDLE_KILLPRIV = 1 << 19
FUSE_ABORT_ERROR = 1 << 21
FUSE_MAX_PAGES = 1 << 22
FUSE_CACHE_SYMLINKS = 1 << 23

# FOPEN_* (fuse_open_out.open_flags)
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3

# FATTR_* (fuse_setattr_in.valid)
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10

FUSE_GETATTR_FH = 1 << 0
FUSE_FSYNC_FDATASYNC = 1 << 0

# structures (little-endian, as the guest writes them)
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
OUT_HEADER = struct.Struct("<IiQ")  # len, error (negative errno), unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr: 88 bytes
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid, generation, entry_valid, attr_valid, *_nsec; then fuse_attr
ATTR_OUT = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy; then fuse_attr
GETATTR_IN = struct.Struct("<IIQ")  # getattr_flags, dummy, fh
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
FORGET_IN = struct.Struct("<Q")  # nlookup
BATCH_FORGET_IN = struct.Struct("<II")  # count, dummy
FORGET_ONE = struct.Struct("<QQ")  # nodeid, nlookup
MKNOD_IN = struct.Struct("<IIII")  # mode, rdev, umask, padding
MKDIR_IN = struct.Struct("<II")  # mode, umask
RENAME_IN = struct.Struct("<Q")  # newdir
RENAME2_IN = struct.Struct("<QII")  # newdir, flags, padding
LINK_IN = struct.Struct("<Q")  # oldnodeid
OPEN_IN = struct.Struct("<II")  # flags, open_flags
OPEN_OUT = struct.Struct("<QII")  # fh, open_flags, padding
CREATE_IN = struct.Struct("<IIII")  # flags, mode, umask, open_flags
RELEASE_IN = struct.Struct("<QIIQ")  # fh, flags, release_flags, lock_owner
FLUSH_IN = struct.Struct("<QIIQ")  # fh, unused, padding, lock_owner
READ_IN = struct.Struct("<QQIIQII")  # fh, offset, size, read_flags, lock_owner, flags, padding
WRITE_IN = struct.Struct("<QQIIQII")  # fh, offset, size, write_flags, lock_owner, flags, padding
WRITE_OUT = struct.Struct("<II")  # size, padding
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize padding spare
FSYNC_IN = struct.Struct("<QII")  # fh, fsync_flags, padding
GETXATTR_IN = struct.Struct("<II")  # size, padding
GETXATTR_OUT = struct.Struct("<II")  # size, padding
ACCESS_IN = struct.Struct("<II")  # mask, padding
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags (later fields ignored)
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # ... max_write, time_gran, max_pages, map_alignment, flags2, unused
INTERRUPT_IN = struct.Struct("<Q")  # unique
FALLOCATE_IN = struct.Struct("<QQQII")  # fh, offset, length, mode, padding
LSEEK_IN = struct.Struct("<QQII")  # fh, offset, whence, padding
LSEEK_OUT = struct.Struct("<Q")
DIRENT = struct.Struct("<QQII")  # ino, off, namelen, type; then the name, padded to 8 bytes
#: bytes of a FUSE_READ/FUSE_WRITE request before the data
RW_HEADER = IN_HEADER.size + READ_IN.size

U64_MAX = (1 << 64) - 1
#: the largest file offset a guest may name (Linux's loff_t is signed)
OFF_MAX = (1 << 63) - 1


class FuseError(Exception):
    """A request that gets ``-errno`` as its reply."""

    def __init__(self, err: int, why: str = "") -> None:
        super().__init__(why or errno.errorcode.get(err, str(err)))
        self.errno = err


@dataclass(frozen=True)
class InHeader:
    len: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int

    @classmethod
    def parse(cls, data: bytes | memoryview) -> InHeader:
        if len(data) < IN_HEADER.size:
            raise FuseError(errno.EINVAL, f"request of {len(data)} bytes, shorter than its header")
        length, opcode, unique, nodeid, uid, gid, pid, _ext, _pad = IN_HEADER.unpack_from(data)
        return cls(length, opcode, unique, nodeid, uid, gid, pid)


class Args:
    """The arguments of one request (after the header), read front to back with every length checked."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes | memoryview) -> None:
        self.data, self.pos = data, 0

    def struct(self, s: struct.Struct) -> tuple:
        if self.pos + s.size > len(self.data):
            raise FuseError(errno.EINVAL, f"arguments of {len(self.data)} bytes, {self.pos + s.size} needed")
        out = s.unpack_from(self.data, self.pos)
        self.pos += s.size
        return out

    def cstring(self, limit: int) -> bytes:
        """A NUL-terminated string of at most ``limit`` bytes (ENAMETOOLONG beyond)."""
        end = bytes(self.data[self.pos : self.pos + limit + 1]).find(b"\0")
        if end < 0:
            if len(self.data) - self.pos > limit:
                raise FuseError(errno.ENAMETOOLONG, "string longer than allowed")
            raise FuseError(errno.EINVAL, "string not terminated")
        out = bytes(self.data[self.pos : self.pos + end])
        self.pos += end + 1
        return out

    def name(self) -> bytes:
        """A single path component: not empty, no '/' (NUL ends it), at most NAME_MAX bytes."""
        return check_name(self.cstring(NAME_MAX))

    def last_name(self) -> bytes:
        """A name that ends the arguments: bytes after its NUL (a name with a NUL inside) are refused."""
        out = self.name()
        if self.pos != len(self.data):
            raise FuseError(errno.EINVAL, f"{len(self.data) - self.pos} bytes after the name {out[:64]!r}")
        return out


def check_name(name: bytes) -> bytes:
    """``name`` if it is one path component a guest may name: ENAMETOOLONG or EINVAL otherwise."""
    if len(name) > NAME_MAX:
        raise FuseError(errno.ENAMETOOLONG, "name longer than NAME_MAX")
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise FuseError(errno.EINVAL, f"bad name {name[:64]!r}")
    return name


def out_header(unique: int, err: int, payload_len: int) -> bytes:
    """A reply's header: ``err`` is a positive errno (0: success)."""
    return OUT_HEADER.pack(OUT_HEADER.size + payload_len, -err, unique)


def pack_attr(
    ino: int,
    size: int,
    blocks: int,
    atime_ns: int,
    mtime_ns: int,
    ctime_ns: int,
    mode: int,
    nlink: int,
    uid: int,
    gid: int,
    rdev: int,
    blksize: int,
) -> bytes:
    def split(ns: int) -> tuple[int, int]:
        s, n = divmod(ns, 1_000_000_000)
        return s & U64_MAX, n

    (a, an), (m, mn), (c, cn) = split(atime_ns), split(mtime_ns), split(ctime_ns)
    return ATTR.pack(
        ino & U64_MAX,
        size & U64_MAX,
        blocks & U64_MAX,
        a,
        m,
        c,
        an,
        mn,
        cn,
        mode & 0xFFFFFFFF,
        nlink & 0xFFFFFFFF,
        uid & 0xFFFFFFFF,
        gid & 0xFFFFFFFF,
        rdev & 0xFFFFFFFF,
        blksize & 0xFFFFFFFF,
        0,
    )


def timeout_split(seconds: float) -> tuple[int, int]:
    """A validity timeout as (seconds, nanoseconds)."""
    s = int(seconds)
    return s, int((seconds - s) * 1e9)


def dirent(ino: int, off: int, dtype: int, name: bytes) -> bytes:
    """One fuse_dirent, padded to 8 bytes."""
    rec = DIRENT.pack(ino & U64_MAX, off, len(name), dtype) + name
    return rec + bytes(-len(rec) % 8)


def dirent_size(name: bytes, plus: bool) -> int:
    n = DIRENT.size + len(name)
    n += -n % 8
    return n + (ENTRY_OUT.size + ATTR.size if plus else 0)

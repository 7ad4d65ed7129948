"""A filesystem in Python, served to a guest over virtio-fs: subclass :class:`Operations`.

The operations are FUSE's low-level ones, by inode number: ``lookup(parent, name)`` returns an :class:`Entry`
(the inode number the guest will use from then on, and its :class:`Attr`); every successful ``lookup``,
``mkdir``, ``create``, ... counts one reference the guest gives back with ``forget(ino, n)``.  The root's
inode number is :data:`ROOT_INO`.  Every method may be called from several threads at once.  Errors are raised
as ``OSError(errno)``; a method not overridden raises ``OSError(ENOSYS)`` (the guest then stops asking for
some, like xattrs).  Names are bytes: one path component, already checked (no '/', no NUL, not '.' or '..',
at most NAME_MAX bytes).

``pyvhost serve fs --ops module:Class`` serves one; ``pyvhost.devices.fs_passthrough`` is the one that shares
a host directory.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

ROOT_INO = 1


def _enosys() -> OSError:
    return OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))


@dataclass
class Attr:
    """An inode's attributes (a ``struct stat``)."""

    ino: int
    mode: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    size: int = 0
    blocks: int = 0
    blksize: int = 4096
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0

    @classmethod
    def from_stat(cls, st: os.stat_result, ino: int | None = None) -> Attr:
        return cls(
            ino if ino is not None else st.st_ino,
            st.st_mode,
            st.st_nlink,
            st.st_uid,
            st.st_gid,
            st.st_rdev,
            st.st_size,
            st.st_blocks,
            st.st_blksize,
            st.st_atime_ns,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )


@dataclass
class Entry:
    """What ``lookup`` (and every call that makes a name) returns: the inode number the guest uses for it
    (``ino``: non-zero, and the same for the same inode as long as the guest holds references to it)."""

    ino: int
    attr: Attr
    generation: int = 0


@dataclass
class DirEntry:
    """One ``readdir`` entry: ``offset`` is what the next ``readdir`` call is given to continue after it."""

    name: bytes
    ino: int
    mode: int  # the file type bits (stat.S_IFDIR, ...) at least
    offset: int


@dataclass
class SetAttr:
    """The changes of a SETATTR: the fields that are not None change."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None  # UTIME_NOW (os.utime semantics: now) is given as -1
    mtime_ns: int | None = None


@dataclass
class StatVfs:
    blocks: int = 0
    bfree: int = 0
    bavail: int = 0
    files: int = 0
    ffree: int = 0
    bsize: int = 4096
    namelen: int = 255
    frsize: int = 4096


@dataclass
class Context:
    """Who in the guest asks."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0


#: SetAttr's atime_ns/mtime_ns for "now"
NOW = -1


def dtype(mode: int) -> int:
    """The ``d_type`` of a file mode (DT_REG, DT_DIR, ...)."""
    return stat.S_IFMT(mode) >> 12


class Operations:
    """Subclass and override what your filesystem does; the rest answers ENOSYS.

    ``read`` returns bytes; a filesystem that can read straight into guest memory overrides ``read_into``
    (given the guest's buffers as memoryviews) instead, likewise ``write_from`` for ``write``.
    """

    #: whether methods may run in several threads at once (False: the device calls one at a time)
    concurrent: bool = True

    def init(self) -> None:
        """The guest mounted the filesystem (FUSE_INIT)."""

    def destroy(self) -> None:
        """The guest unmounted it (FUSE_DESTROY) or went away."""

    def lookup(self, parent: int, name: bytes, ctx: Context) -> Entry:
        raise _enosys()

    def forget(self, ino: int, nlookup: int) -> None:
        """The guest drops ``nlookup`` references to ``ino``."""

    def getattr(self, ino: int, fh: int | None, ctx: Context) -> Attr:
        raise _enosys()

    def setattr(self, ino: int, changes: SetAttr, fh: int | None, ctx: Context) -> Attr:
        raise _enosys()

    def readlink(self, ino: int, ctx: Context) -> bytes:
        raise _enosys()

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Context) -> Entry:
        raise _enosys()

    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Context) -> Entry:
        raise _enosys()

    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Context) -> Entry:
        raise _enosys()

    def link(self, ino: int, newparent: int, newname: bytes, ctx: Context) -> Entry:
        raise _enosys()

    def unlink(self, parent: int, name: bytes, ctx: Context) -> None:
        raise _enosys()

    def rmdir(self, parent: int, name: bytes, ctx: Context) -> None:
        raise _enosys()

    def rename(self, parent: int, name: bytes, newparent: int, newname: bytes, flags: int, ctx: Context) -> None:
        raise _enosys()

    def open(self, ino: int, flags: int, ctx: Context) -> int:
        """Open ``ino`` with ``os.O_*`` ``flags``; return a file handle (any integer)."""
        raise _enosys()

    def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Context) -> tuple[Entry, int]:
        raise _enosys()

    def read(self, ino: int, fh: int, offset: int, size: int) -> bytes:
        raise _enosys()

    def read_into(self, ino: int, fh: int, offset: int, bufs: list[memoryview]) -> int:
        """Read at ``offset`` into ``bufs`` (their total length is the size asked); return the bytes read."""
        data = self.read(ino, fh, offset, sum(len(b) for b in bufs))
        done = 0
        for b in bufs:
            n = min(len(b), len(data) - done)
            if n <= 0:
                break
            b[:n] = data[done : done + n]
            done += n
        return done

    def write(self, ino: int, fh: int, offset: int, data: bytes) -> int:
        raise _enosys()

    def write_from(self, ino: int, fh: int, offset: int, bufs: list[memoryview]) -> int:
        """Write ``bufs`` at ``offset``; return the bytes written."""
        return self.write(ino, fh, offset, b"".join(bufs))

    def flush(self, ino: int, fh: int) -> None:
        """close() of one of the guest's file descriptors."""

    def release(self, ino: int, fh: int) -> None:
        """The last reference to the handle is gone."""

    def fsync(self, ino: int, fh: int, datasync: bool) -> None:
        """Make the file durable (the default: nothing to do)."""

    def opendir(self, ino: int, ctx: Context) -> int:
        return 0

    def readdir(self, ino: int, fh: int, offset: int) -> Iterable[DirEntry]:
        """The entries after ``offset`` (0: from the start), each with the offset of the next one."""
        raise _enosys()

    def releasedir(self, ino: int, fh: int) -> None:
        pass

    def fsyncdir(self, ino: int, fh: int, datasync: bool) -> None:
        pass

    def statfs(self, ino: int) -> StatVfs:
        return StatVfs()

    def access(self, ino: int, mask: int, ctx: Context) -> None:
        raise _enosys()

    def fallocate(self, ino: int, fh: int, mode: int, offset: int, length: int) -> None:
        raise _enosys()

    def lseek(self, ino: int, fh: int, offset: int, whence: int) -> int:
        raise _enosys()

    def getxattr(self, ino: int, name: bytes, ctx: Context) -> bytes:
        raise _enosys()

    def listxattr(self, ino: int, ctx: Context) -> list[bytes]:
        raise _enosys()

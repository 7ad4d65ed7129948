"""A host directory shared with the guest, safe against a hostile one (:class:`Passthrough`).

Every inode the guest knows is an ``O_PATH`` file descriptor held here, under a node id handed out once and
never reused; a node id that was never given out, or was forgotten, is EBADF.  A name from the guest is one
path component (checked by ``fuse``: no '/', no NUL, not '.' or '..', at most NAME_MAX) resolved relative to
its parent's descriptor with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`` and ``O_NOFOLLOW`` (or
``openat(O_NOFOLLOW)`` where openat2 is missing, as strict for a single component): '..', absolute symlinks,
a symlink swapped in during a lookup and /proc magic links never lead outside the shared directory.  The
other system calls work on descriptors too (``*at`` with the parent's descriptor, ``AT_EMPTY_PATH`` on the
inode's own); a file is opened for I/O by reopening the inode's own descriptor through /proc/self/fd (the
inode it names is the one held, whatever the names do meanwhile), and only regular files and directories
are opened.  Device nodes are never created.  The same host inode keeps the same node id while the guest
holds references to it (lookups counted, FORGET given back).  Open inodes and handles are bounded (ENFILE /
EMFILE, logged, when the bound is reached).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import resource
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..fs import NOW, ROOT_INO, Attr, Context, DirEntry, Entry, Operations, SetAttr, StatVfs

log = logging.getLogger(__name__)

SYS_OPENAT2 = 437  # the same number on every architecture (new system calls share one table)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
AT_EMPTY_PATH = 0x1000
AT_FDCWD = -100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
#: open flags a guest may pass on (the access mode aside)
OPEN_FLAGS = os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setfsuid.argtypes = _libc.setfsgid.argtypes = [ctypes.c_uint32]


def perm(mode: int, kind: int) -> int:
    """The permission bits a guest may set: no set-user/group-ID bit on a file (a host user could run it)."""
    return mode & (0o1777 if kind != stat.S_IFDIR else 0o7777)


class OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


_have_openat2 = True


def openat2(dirfd: int, name: bytes, flags: int, mode: int = 0) -> int:
    """``name`` (one component) opened beneath ``dirfd``, never following a final symlink."""
    global _have_openat2
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if _have_openat2:
        how = OpenHow(flags, mode, RESOLVE)
        fd = _libc.syscall(SYS_OPENAT2, dirfd, name, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0 or ctypes.get_errno() != errno.ENOSYS:
            return _check(fd, "openat2")
        _have_openat2 = False
        log.warning("openat2 missing: names resolved with openat(O_NOFOLLOW), one component at a time")
    return os.open(name, flags, mode, dir_fd=dirfd)


def proc_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


@dataclass
class Inode:
    fd: int
    key: tuple[int, int]
    mode: int
    refs: int = 1  # the guest's lookup count
    pins: int = 0  # requests using the descriptor now (it is closed only when both are 0)


@dataclass
class Handle:
    fd: int
    nodeid: int
    refs: int = 1
    pins: int = 0
    listing: list[tuple[bytes, int, int]] | None = None  # a directory's entries, read at offset 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _fd_budget() -> int:
    """File descriptors this process may open (the soft limit raised to the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class Passthrough(Operations):
    """The directory ``root`` as the guest's filesystem."""

    def __init__(
        self,
        root: str,
        readonly: bool = False,
        max_inodes: int | None = None,
        max_handles: int | None = None,
        share: int = 1,
    ) -> None:
        """``share``: how many instances the process runs (``--socket-count``); the default limits are the
        process's file descriptor budget divided among them, so one guest cannot take another's."""
        budget = max((_fd_budget() - 512) // max(share, 1), 256)
        self.max_inodes = max_inodes or budget * 3 // 4
        self.max_handles = max_handles or budget // 4
        self.readonly = readonly
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(fd)
        self.root = Inode(fd, (st.st_dev, st.st_ino), st.st_mode, refs=1 << 62)
        self.lock = threading.Lock()
        self.inodes: dict[int, Inode] = {ROOT_INO: self.root}
        self.by_key: dict[tuple[int, int], int] = {self.root.key: ROOT_INO}
        self.handles: dict[int, Handle] = {}
        self.next_node = ROOT_INO + 1
        self.next_fh = 1
        self.refused = 0
        self.switch_creds = os.geteuid() == 0

    # -- tables ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _node(self, nodeid: int) -> Iterator[Inode]:
        with self.lock:
            node = self.inodes.get(nodeid)
            if node is None:
                self.refused += 1
                log.warning("node %d is not one the guest holds: EBADF", nodeid)
                raise OSError(errno.EBADF, f"node {nodeid} is not one the guest holds")
            node.pins += 1
        try:
            yield node
        finally:
            with self.lock:
                node.pins -= 1
                self._drop_node(nodeid, node)

    @contextlib.contextmanager
    def _dir(self, nodeid: int) -> Iterator[Inode]:
        with self._node(nodeid) as node:
            if not stat.S_ISDIR(node.mode):
                raise OSError(errno.ENOTDIR, f"node {nodeid} is not a directory")
            yield node

    def _drop_node(self, nodeid: int, node: Inode) -> None:
        """(lock held) Close a node neither the guest nor a request holds."""
        if node.refs <= 0 and node.pins <= 0 and self.inodes.get(nodeid) is node:
            del self.inodes[nodeid]
            self.by_key.pop(node.key, None)
            os.close(node.fd)

    @contextlib.contextmanager
    def _handle(self, fh: int, nodeid: int | None = None) -> Iterator[Handle]:
        with self.lock:
            h = self.handles.get(fh)
            if h is None or (nodeid is not None and h.nodeid != nodeid):
                self.refused += 1
                log.warning("file handle %d is not one of node %s: EBADF", fh, nodeid)
                raise OSError(errno.EBADF, f"file handle {fh} is not one of node {nodeid}")
            h.pins += 1
        try:
            yield h
        finally:
            with self.lock:
                h.pins -= 1
                self._drop_handle(fh, h)

    def _drop_handle(self, fh: int, h: Handle) -> None:
        if h.refs <= 0 and h.pins <= 0 and self.handles.get(fh) is h:
            del self.handles[fh]
            os.close(h.fd)

    def _register(self, fd: int) -> Entry:
        """Take ``fd`` (O_PATH) as a node the guest looked up once more; close it if the inode is known."""
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        key = (st.st_dev, st.st_ino)
        with self.lock:
            nodeid = self.by_key.get(key)
            if nodeid is not None:
                self.inodes[nodeid].refs += 1
                os.close(fd)
            else:
                if len(self.inodes) >= self.max_inodes:
                    os.close(fd)
                    log.error("open inode limit (%d) reached: lookup refused (ENFILE)", self.max_inodes)
                    raise OSError(errno.ENFILE, "open inode limit reached")
                nodeid = self.next_node
                self.next_node += 1
                self.inodes[nodeid] = Inode(fd, key, st.st_mode)
                self.by_key[key] = nodeid
        return Entry(nodeid, Attr.from_stat(st))

    def _made(self, fd: int, mode: int | None) -> Entry:
        """A node just made: its permissions exactly as asked (the guest applied its umask; ours does not
        count), then registered."""
        if mode is not None:
            try:
                os.chmod(proc_path(fd), mode)
            except OSError:
                os.close(fd)
                raise
        return self._register(fd)

    def _new_handle(self, fd: int, nodeid: int) -> int:
        with self.lock:
            if len(self.handles) >= self.max_handles:
                os.close(fd)
                log.error("open handle limit (%d) reached: open refused (EMFILE)", self.max_handles)
                raise OSError(errno.EMFILE, "open handle limit reached")
            fh = self.next_fh
            self.next_fh += 1
            self.handles[fh] = Handle(fd, nodeid)
        return fh

    @contextlib.contextmanager
    def _creds(self, ctx: Context) -> Iterator[None]:
        """Create as the guest's user (this thread's fsuid/fsgid), so that ownership and the host's permission
        checks are the guest's; only when running as root (otherwise everything is created as us)."""
        if not self.switch_creds:
            yield
            return
        gid = _libc.setfsgid(ctx.gid)
        uid = _libc.setfsuid(ctx.uid)
        try:
            yield
        finally:
            _libc.setfsuid(uid)
            _libc.setfsgid(gid)

    def _writable(self) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, "read-only")

    def forget(self, ino: int, nlookup: int) -> None:
        with self.lock:
            node = self.inodes.get(ino)
            if node is None or ino == ROOT_INO:
                return
            node.refs -= min(nlookup, node.refs)
            self._drop_node(ino, node)

    def destroy(self) -> None:
        """Drop every node but the root, and every handle (the guest is gone)."""
        with self.lock:
            for nodeid, node in list(self.inodes.items()):
                if nodeid != ROOT_INO:
                    node.refs = 0
                    self._drop_node(nodeid, node)
            for fh, h in list(self.handles.items()):
                h.refs = 0
                self._drop_handle(fh, h)

    def close(self) -> None:
        self.destroy()
        with self.lock:
            if self.inodes.pop(ROOT_INO, None) is not None:
                os.close(self.root.fd)

    # -- names -----------------------------------------------------------------------------------------------
    def lookup(self, parent: int, name: bytes, ctx: Context) -> Entry:
        with self._dir(parent) as p:
            return self._register(openat2(p.fd, name, os.O_PATH))

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Context) -> Entry:
        self._writable()
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
            raise OSError(errno.EPERM, "device nodes are not created")
        with self._dir(parent) as p, self._creds(ctx):
            os.mknod(name, kind | perm(mode, kind), 0, dir_fd=p.fd)
            return self._made(openat2(p.fd, name, os.O_PATH), perm(mode, kind))

    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Context) -> Entry:
        self._writable()
        with self._dir(parent) as p, self._creds(ctx):
            os.mkdir(name, perm(mode, stat.S_IFDIR), dir_fd=p.fd)
            return self._made(openat2(p.fd, name, os.O_PATH), perm(mode, stat.S_IFDIR))

    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Context) -> Entry:
        self._writable()
        with self._dir(parent) as p, self._creds(ctx):
            os.symlink(target, name, dir_fd=p.fd)
            return self._made(openat2(p.fd, name, os.O_PATH), None)

    def link(self, ino: int, newparent: int, newname: bytes, ctx: Context) -> Entry:
        self._writable()
        with self._node(ino) as node, self._dir(newparent) as p:
            if stat.S_ISDIR(node.mode):
                raise OSError(errno.EPERM, "no hard link to a directory")
            _check(_libc.linkat(node.fd, b"", p.fd, newname, AT_EMPTY_PATH), "linkat")
            return self._register(openat2(p.fd, newname, os.O_PATH))

    def unlink(self, parent: int, name: bytes, ctx: Context) -> None:
        self._writable()
        with self._dir(parent) as p:
            os.unlink(name, dir_fd=p.fd)

    def rmdir(self, parent: int, name: bytes, ctx: Context) -> None:
        self._writable()
        with self._dir(parent) as p:
            os.rmdir(name, dir_fd=p.fd)

    def rename(self, parent: int, name: bytes, newparent: int, newname: bytes, flags: int, ctx: Context) -> None:
        self._writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, f"rename flags {flags:#x}")
        with self._dir(parent) as p, self._dir(newparent) as np_:
            if flags:
                _check(_libc.renameat2(p.fd, name, np_.fd, newname, flags), "renameat2")
            else:
                os.rename(name, newname, src_dir_fd=p.fd, dst_dir_fd=np_.fd)

    # -- attributes --------------------------------------------------------------------------------------------
    def getattr(self, ino: int, fh: int | None, ctx: Context) -> Attr:
        with self._node(ino) as node:
            return Attr.from_stat(os.fstat(node.fd))

    def setattr(self, ino: int, changes: SetAttr, fh: int | None, ctx: Context) -> Attr:
        self._writable()
        with self._node(ino) as node:
            kind = stat.S_IFMT(node.mode)
            if changes.mode is not None:
                if kind == stat.S_IFLNK:
                    raise OSError(errno.EOPNOTSUPP, "symlink modes are fixed")
                os.chmod(proc_path(node.fd), perm(changes.mode, kind))
            if changes.uid is not None or changes.gid is not None:
                uid = -1 if changes.uid is None else changes.uid
                gid = -1 if changes.gid is None else changes.gid
                _check(_libc.fchownat(node.fd, b"", uid, gid, AT_EMPTY_PATH), "fchownat")
            if changes.size is not None:
                if kind != stat.S_IFREG:
                    raise OSError(errno.EISDIR if kind == stat.S_IFDIR else errno.EINVAL, "not a regular file")
                if fh is not None:
                    with self._handle(fh, ino) as h:
                        os.ftruncate(h.fd, changes.size)
                else:
                    os.truncate(proc_path(node.fd), changes.size)
            if changes.atime_ns is not None or changes.mtime_ns is not None:
                times = (Timespec * 2)()
                for i, ns in enumerate((changes.atime_ns, changes.mtime_ns)):
                    if ns is None:
                        times[i] = Timespec(0, UTIME_OMIT)
                    elif ns == NOW:
                        times[i] = Timespec(0, UTIME_NOW)
                    else:
                        times[i] = Timespec(*divmod(ns, 1_000_000_000))
                _check(_libc.utimensat(node.fd, b"", times, AT_EMPTY_PATH), "utimensat")
            return Attr.from_stat(os.fstat(node.fd))

    def readlink(self, ino: int, ctx: Context) -> bytes:
        with self._node(ino) as node:
            if not stat.S_ISLNK(node.mode):
                raise OSError(errno.EINVAL, "not a symlink")
            return os.fsencode(os.readlink("", dir_fd=node.fd))

    def statfs(self, ino: int) -> StatVfs:
        with self._node(ino) as node:
            s = os.fstatvfs(node.fd)
        return StatVfs(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize, s.f_namemax, s.f_frsize)

    # -- files -------------------------------------------------------------------------------------------------
    def _open_flags(self, flags: int) -> int:
        acc = flags & os.O_ACCMODE
        if acc not in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
            raise OSError(errno.EINVAL, "bad access mode")
        if self.readonly and (acc != os.O_RDONLY or flags & os.O_TRUNC):
            raise OSError(errno.EROFS, "read-only")
        return acc | (flags & OPEN_FLAGS) | os.O_CLOEXEC | os.O_NOCTTY

    def open(self, ino: int, flags: int, ctx: Context) -> int:
        with self._node(ino) as node:
            if stat.S_ISDIR(node.mode):
                raise OSError(errno.EISDIR, "a directory")
            if stat.S_ISLNK(node.mode):
                raise OSError(errno.ELOOP, "a symlink")
            if not stat.S_ISREG(node.mode):
                raise OSError(errno.ENXIO, "only regular files are opened")
            fd = os.open(proc_path(node.fd), self._open_flags(flags))
            return self._new_handle(fd, ino)

    def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Context) -> tuple[Entry, int]:
        self._writable()
        mode = perm(mode, stat.S_IFREG)
        base = self._open_flags(flags)
        with self._dir(parent) as p, self._creds(ctx):
            try:
                fd, made = openat2(p.fd, name, base | os.O_CREAT | os.O_EXCL, mode), True
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
                fd, made = openat2(p.fd, name, base), False
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise OSError(errno.EEXIST, "not a regular file")
                if made and stat.S_IMODE(st.st_mode) != mode:
                    os.fchmod(fd, mode)  # exactly as asked: the guest applied its umask, ours does not count
                entry = self._register(os.open(proc_path(fd), os.O_PATH | os.O_CLOEXEC))
            except BaseException:
                os.close(fd)
                raise
            try:
                return entry, self._new_handle(fd, entry.ino)
            except BaseException:
                self.forget(entry.ino, 1)
                raise

    def read_into(self, ino: int, fh: int, offset: int, bufs: list[memoryview]) -> int:
        with self._handle(fh, ino) as h:
            return os.preadv(h.fd, bufs, offset) if bufs else 0

    def write_from(self, ino: int, fh: int, offset: int, bufs: list[memoryview]) -> int:
        self._writable()
        with self._handle(fh, ino) as h:
            return os.pwritev(h.fd, bufs, offset) if bufs else 0

    def release(self, ino: int, fh: int) -> None:
        with self.lock:
            h = self.handles.get(fh)
            if h is None or h.nodeid != ino:
                raise OSError(errno.EBADF, f"file handle {fh} is not one of node {ino}")
            h.refs = 0
            self._drop_handle(fh, h)

    def fsync(self, ino: int, fh: int, datasync: bool) -> None:
        with self._handle(fh, ino) as h:
            (os.fdatasync if datasync else os.fsync)(h.fd)

    def fallocate(self, ino: int, fh: int, mode: int, offset: int, length: int) -> None:
        self._writable()
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise OSError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x}")
        with self._handle(fh, ino) as h:
            _check(_libc.fallocate(h.fd, mode, ctypes.c_long(offset), ctypes.c_long(length)), "fallocate")

    def lseek(self, ino: int, fh: int, offset: int, whence: int) -> int:
        with self._handle(fh, ino) as h:
            return os.lseek(h.fd, offset, whence)

    # -- directories -------------------------------------------------------------------------------------------
    def opendir(self, ino: int, ctx: Context) -> int:
        with self._dir(ino) as node:
            fd = os.open(proc_path(node.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            return self._new_handle(fd, ino)

    def readdir(self, ino: int, fh: int, offset: int) -> list[DirEntry]:
        with self._handle(fh, ino) as h, h.lock:
            if offset == 0 or h.listing is None:
                h.listing = self._list(h.fd)
            return [DirEntry(n, i, m, k + 1) for k, (n, i, m) in enumerate(h.listing) if k >= offset]

    @staticmethod
    def _list(fd: int) -> list[tuple[bytes, int, int]]:
        ino = os.fstat(fd).st_ino
        out = [(b".", ino, stat.S_IFDIR), (b"..", ino, stat.S_IFDIR)]
        with os.scandir(fd) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    mode = stat.S_IFDIR
                elif e.is_symlink():
                    mode = stat.S_IFLNK
                elif e.is_file(follow_symlinks=False):
                    mode = stat.S_IFREG
                else:
                    try:
                        mode = stat.S_IFMT(e.stat(follow_symlinks=False).st_mode)
                    except OSError:
                        continue
                out.append((os.fsencode(e.name), e.inode(), mode))
        return out

    def releasedir(self, ino: int, fh: int) -> None:
        self.release(ino, fh)

    def fsyncdir(self, ino: int, fh: int, datasync: bool) -> None:
        self.fsync(ino, fh, datasync)

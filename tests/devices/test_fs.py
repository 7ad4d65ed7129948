"""virtio-fs without a VM: crafted FUSE requests put on the rings by a small driver over a real vhost-user socket.

The requests a guest kernel sends (INIT, LOOKUP, GETATTR, CREATE, WRITE, READ, READDIR[PLUS], ...) work on the
passthrough and on a filesystem written in Python; the escapes a hostile guest can try (``..``, symlinks out
and swapped in, node ids never given out or forgotten, huge offsets, bad names, short requests) each get an
errno, touch nothing outside the shared directory, and the device goes on.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import re
import select
import stat
import struct
import threading
import time
from pathlib import Path

import pytest

from pyvhost import fuse as F
from pyvhost import protocol as P
from pyvhost.devices import fs_passthrough
from pyvhost.devices.builtin import SPECS
from pyvhost.devices.fs import CONFIG, MAX_WRITE, FsDevice
from pyvhost.devices.fs_passthrough import Passthrough
from pyvhost.frontend.net import Frontend, FrontendError
from pyvhost.frontend.packed import new_ring as new_packed_ring
from pyvhost.frontend.ram import PAGE
from pyvhost.frontend.split import DriverRing
from pyvhost.fs import ROOT_INO, Attr, Operations
from pyvhost.protocol import Request as R
from pyvhost.ring.packed import VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED
from pyvhost.ring.split import VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, avail_bytes, desc_bytes, used_bytes

DOC = Path(__file__).resolve().parents[2] / "docs" / "fs.md"
SLOTS = 8
SLOT_BYTES = 512 << 10
DESCS = 8  # descriptors per slot
O_RDWR, O_RDONLY = os.O_RDWR, os.O_RDONLY


class FuseDriver(Frontend):
    """A virtio-fs driver: one hiprio and one request queue, requests placed in per-slot areas of guest RAM."""

    def __init__(self, path: str, request_queues: int = 1, packed: bool = False) -> None:
        super().__init__(
            path,
            queue_size=SLOTS * DESCS,
            num_queues=1 + request_queues,
            ram_size=(1 + request_queues) * SLOTS * SLOT_BYTES + (4 << 20),
            event_idx=False,
            mrg_rxbuf=False,
            packed=packed,
        )
        #: packed rings: the driver's avail and used cursors per queue (position, wrap counter)
        self.cursors: list[list[int]] = []
        self.unique = 0
        self.slots: list[list[int]] = []
        self.areas: list[int] = []
        self.avail_idx: list[int] = []
        self.last_used: list[int] = []
        self.busy: list[dict[int, tuple[int, list[tuple[int, int]]]]] = []

    def setup(self) -> None:
        self.negotiate()
        n = self.queue_size
        for i in range(self.num_queues):
            if self.want_packed:
                self.rings.append(new_packed_ring(self.ram, i, n))  # type: ignore[arg-type]  # same use
                self.cursors.append([0, 1, 0, 1])
            else:
                desc = self.ram.alloc(desc_bytes(n), PAGE)
                avail = self.ram.alloc(avail_bytes(n), 64)
                used = self.ram.alloc(used_bytes(n), PAGE)
                kick, call = (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2))
                ring = DriverRing(i, n, desc, avail, used, 0, self.ram, kick, call)
                ring.avail[0] = 0
                self.rings.append(ring)
            self.areas.append(self.ram.alloc(SLOTS * SLOT_BYTES, PAGE))
            self.slots.append(list(range(SLOTS)))
            self.avail_idx.append(0)
            self.last_used.append(0)
            self.busy.append({})
        self.set_mem_table()
        for ring in self.rings:
            self.start_ring(ring)

    def config(self) -> tuple[bytes, int]:
        reply = self.request(R.GET_CONFIG, P.CONFIG_HDR.pack(0, CONFIG.size, 0) + bytes(CONFIG.size))
        tag, nq = CONFIG.unpack(reply[P.CONFIG_HDR.size :][: CONFIG.size])
        return tag.rstrip(b"\0"), nq

    def post(self, queue: int, readable: list[bytes], writable: list[int], tag: int = 0) -> int:
        """One chain: the ``readable`` segments, then writable segments of the given lengths; its slot."""
        s = self.slots[queue].pop()
        ring, mm = self.rings[queue], self.ram.mm
        off = self.areas[queue] + s * SLOT_BYTES
        segs = [(len(b), b, False) for b in readable] + [(n, None, True) for n in writable]
        assert len(segs) <= DESCS
        outs = []
        packed: list[tuple[int, int]] = []  # (position, second word) of the packed descriptors
        for k, (length, data, w) in enumerate(segs):
            assert off + length <= self.areas[queue] + (s + 1) * SLOT_BYTES
            if data is not None:
                mm[off : off + length] = data
            else:
                mm[off : off + length] = b"\xee" * length
                outs.append((off, length))
            d = s * DESCS + k
            more = k + 1 < len(segs)
            flags = (VRING_DESC_F_NEXT if more else 0) | (VRING_DESC_F_WRITE if w else 0)
            if self.want_packed:  # at the avail cursor, the buffer id (the slot) in every descriptor
                cur = self.cursors[queue]
                flags |= VRING_PACKED_DESC_F_AVAIL if cur[1] else VRING_PACKED_DESC_F_USED
                ring.desc[2 * cur[0]] = self.ram.gpa(off)
                packed.append((cur[0], length | (s << 32) | (flags << 48)))
                cur[0] += 1
                if cur[0] == ring.size:
                    cur[0], cur[1] = 0, cur[1] ^ 1
            else:
                ring.desc[2 * d] = self.ram.gpa(off)
                ring.desc[2 * d + 1] = length | (flags << 32) | ((d + 1 if more else 0) << 48)
            off += -(-length // 8) * 8
        if self.want_packed:
            for pos, word in packed[::-1]:  # the head last: its flags make the chain available
                ring.desc[2 * pos + 1] = word
            self.busy[queue][s] = (tag, outs, len(segs))  # type: ignore[assignment]
            os.eventfd_write(ring.kick_fd, 1)
            return s
        ring.avail[2 + (self.avail_idx[queue] % ring.size)] = s * DESCS
        self.avail_idx[queue] = (self.avail_idx[queue] + 1) & 0xFFFF
        ring.avail[1] = self.avail_idx[queue]
        self.busy[queue][s] = (tag, outs)
        os.eventfd_write(ring.kick_fd, 1)
        return s

    def wait(self, queue: int, timeout: float = 20.0) -> list[tuple[int, int, bytes]]:
        """Completions as (tag, used length, the bytes written), waiting for at least one."""
        ring = self.rings[queue]
        deadline = time.monotonic() + timeout
        while True:
            out = self.used_packed(queue) if self.want_packed else []
            used = self.last_used[queue] if self.want_packed else int(ring.used16[1])
            while self.last_used[queue] != used:
                e = self.last_used[queue] % ring.size
                head, length = int(ring.used32[1 + 2 * e]), int(ring.used32[2 + 2 * e])
                self.last_used[queue] = (self.last_used[queue] + 1) & 0xFFFF
                s = head // DESCS
                tag, outs = self.busy[queue].pop(s)
                data = b"".join(bytes(self.ram.mm[o : o + n]) for o, n in outs)
                out.append((tag, length, data[:length]))
                self.slots[queue].append(s)
            if out:
                return out
            if time.monotonic() > deadline:
                raise FrontendError(f"queue {queue}: no completion in {timeout} s")
            if select.select([ring.call_fd], [], [], 0.05)[0]:
                os.eventfd_read(ring.call_fd)

    def used_packed(self, queue: int) -> list[tuple[int, int, bytes]]:
        """Completions on a packed ring: used descriptors from the used cursor, each moving it by its chain's
        descriptors."""
        ring, cur, out = self.rings[queue], self.cursors[queue], []
        both = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED
        while True:
            word = int(ring.desc[2 * cur[2] + 1])
            if (word >> 48) & both != (both if cur[3] else 0):
                return out
            s, length = (word >> 32) & 0xFFFF, word & 0xFFFFFFFF
            tag, outs, nseg = self.busy[queue].pop(s)  # type: ignore[misc]
            data = b"".join(bytes(self.ram.mm[o : o + n]) for o, n in outs)
            out.append((tag, length, data[:length]))
            self.slots[queue].append(s)
            cur[2] += nseg
            if cur[2] >= ring.size:
                cur[2], cur[3] = cur[2] - ring.size, cur[3] ^ 1

    def raw(self, readable: list[bytes], writable: list[int], queue: int = 1) -> tuple[int, bytes]:
        self.post(queue, readable, writable)
        ((_, length, data),) = self.wait(queue)
        return length, data

    def message(
        self, opcode: int, nodeid: int, args: bytes = b"", length: int | None = None, uid: int = 0
    ) -> tuple[int, bytes]:
        self.unique += 1
        n = F.IN_HEADER.size + len(args) if length is None else length
        return self.unique, F.IN_HEADER.pack(n, opcode, self.unique, nodeid, uid, uid, 4242, 0, 0) + args

    def call(
        self,
        opcode: int,
        nodeid: int = ROOT_INO,
        args: bytes = b"",
        reply: int = 4096,
        data: bytes | None = None,
        queue: int = 1,
        uid: int = 0,
    ) -> tuple[int, bytes]:
        """One request, waited for: (errno, reply payload)."""
        unique, msg = self.message(opcode, nodeid, args, F.IN_HEADER.size + len(args) + len(data or b""), uid)
        readable = [msg] + ([data] if data else [])
        length, out = self.raw(readable, [F.OUT_HEADER.size, reply] if reply else [F.OUT_HEADER.size], queue)
        n, err, u = F.OUT_HEADER.unpack_from(out)
        assert u == unique and n == length == len(out), (n, length, u, unique)
        return -err, out[F.OUT_HEADER.size :]

    # -- helpers for the requests a kernel sends ---------------------------------------------------------
    def init(self, flags: int = 0xFFFFFFFF & ~F.FUSE_MAX_PAGES) -> tuple[int, ...]:
        """INIT as a 7.38 kernel; without FUSE_MAX_PAGES (unless asked), requests stay at 32 pages."""
        err, out = self.call(F.FUSE_INIT, 0, F.INIT_IN.pack(7, 38, 1 << 17, flags) + bytes(48))
        assert err == 0
        return F.INIT_OUT.unpack(out)

    def lookup(self, parent: int, name: bytes) -> tuple[int, tuple]:
        err, out = self.call(F.FUSE_LOOKUP, parent, name + b"\0")
        return err, (entry(out) if not err else ())

    def getattr(self, nodeid: int) -> tuple[int, tuple]:
        err, out = self.call(F.FUSE_GETATTR, nodeid, F.GETATTR_IN.pack(0, 0, 0))
        return err, (F.ATTR.unpack_from(out, F.ATTR_OUT.size) if not err else ())

    def create(self, parent: int, name: bytes, mode: int = 0o644, flags: int = O_RDWR) -> tuple[int, int, int]:
        err, out = self.call(F.FUSE_CREATE, parent, F.CREATE_IN.pack(flags | os.O_CREAT, mode, 0o022, 0) + name + b"\0")
        if err:
            return err, 0, 0
        node = entry(out)[0]
        fh = F.OPEN_OUT.unpack_from(out, F.ENTRY_OUT.size + F.ATTR.size)[0]
        return 0, node, fh

    def open(self, nodeid: int, flags: int = O_RDONLY, opcode: int = F.FUSE_OPEN) -> tuple[int, int]:
        err, out = self.call(opcode, nodeid, F.OPEN_IN.pack(flags, 0))
        return err, (F.OPEN_OUT.unpack(out)[0] if not err else 0)

    def write(self, nodeid: int, fh: int, offset: int, data: bytes) -> tuple[int, int]:
        err, out = self.call(F.FUSE_WRITE, nodeid, F.WRITE_IN.pack(fh, offset, len(data), 0, 0, 0, 0), data=data)
        return err, (F.WRITE_OUT.unpack(out)[0] if not err else 0)

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> tuple[int, bytes]:
        return self.call(F.FUSE_READ, nodeid, F.READ_IN.pack(fh, offset, size, 0, 0, 0, 0), reply=size)

    def release(self, nodeid: int, fh: int, opcode: int = F.FUSE_RELEASE) -> int:
        return self.call(opcode, nodeid, F.RELEASE_IN.pack(fh, 0, 0, 0), reply=0)[0]

    def readdir(self, nodeid: int, plus: bool = False) -> list[tuple]:
        """Every entry of a directory, in as many READDIR[PLUS] calls as it takes (small replies)."""
        err, fh = self.open(nodeid, O_RDONLY, F.FUSE_OPENDIR)
        assert err == 0
        out, offset = [], 0
        while True:
            op = F.FUSE_READDIRPLUS if plus else F.FUSE_READDIR
            err, buf = self.call(op, nodeid, F.READ_IN.pack(fh, offset, 1024, 0, 0, 0, 0), reply=1024)
            assert err == 0
            if not buf:
                break
            pos = 0
            while pos < len(buf):
                node = 0
                if plus:
                    node = F.ENTRY_OUT.unpack_from(buf, pos)[0]
                    pos += F.ENTRY_OUT.size + F.ATTR.size
                ino, offset, namelen, typ = F.DIRENT.unpack_from(buf, pos)
                name = buf[pos + F.DIRENT.size : pos + F.DIRENT.size + namelen]
                out.append((name, ino, typ, node))
                pos += F.dirent_size(name, False)
        assert self.release(nodeid, fh, F.FUSE_RELEASEDIR) == 0
        return out

    def forget(self, nodeid: int, n: int = 1) -> None:
        _, msg = self.message(F.FUSE_FORGET, nodeid, F.FORGET_IN.pack(n))
        assert self.raw([msg], [], queue=0)[0] == 0


def entry(out: bytes) -> tuple:
    """(nodeid, attr fields...) of a fuse_entry_out."""
    return (F.ENTRY_OUT.unpack_from(out)[0], *F.ATTR.unpack_from(out, F.ENTRY_OUT.size))


#: fields of F.ATTR
A_INO, A_SIZE, A_MODE, A_NLINK = 0, 1, 9, 10


def serve_fs(serve, ops: Operations, metadata: str = "direct", **kw) -> FsDevice:
    dev = FsDevice(ops, "myfs", **kw)
    serve(metadata=metadata, device=dev)
    return dev


@pytest.fixture
def share(tmp_path: Path) -> Path:
    """A shared directory beside a directory that must stay untouched."""
    d = tmp_path / "share"
    d.mkdir()
    (d / "hello.txt").write_bytes(b"hello, guest\n")
    (d / "sub").mkdir()
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret").write_bytes(b"top secret\n")
    return d


def snapshot(path: Path) -> dict[str, tuple]:
    """Every file under ``path`` with its content hash, mode and times (what "untouched" means)."""
    out = {}
    for p in sorted(path.rglob("*")):
        st = p.lstat()
        h = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
        out[str(p)] = (h, st.st_mode, st.st_mtime_ns, st.st_size)
    return out


# -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metadata", ["direct", "copy"])
def test_max_pages_fit_the_request_queue(share, sock_path, serve, metadata, errors):
    """With FUSE_MAX_PAGES the device offers requests of up to 256 pages, as many as fit its smallest request
    queue (a chain is never longer than its queue); a WRITE of that size works, one byte more is EINVAL."""
    serve_fs(serve, Passthrough(str(share)), metadata)
    with FuseDriver(sock_path) as fe:
        fe.setup()
        *_head, flags, _bg, _ct, max_write, _tg, max_pages, _ma, _f2 = fe.init(0xFFFFFFFF)
        pages = min(256, fe.queue_size - 8)
        assert flags & F.FUSE_MAX_PAGES and (max_pages, max_write) == (pages, pages * 4096) and pages > 32
        err, node, fh = fe.create(ROOT_INO, b"big.bin")
        blob = os.urandom(max_write)
        assert fe.write(node, fh, 0, blob) == (0, max_write)
        assert fe.read(node, fh, 0, max_write) == (0, blob)
        assert fe.write(node, fh, 0, blob + b"!")[0] == errno.EINVAL
        assert (share / "big.bin").read_bytes() == blob


@pytest.mark.parametrize("layout", ["split", "packed"])
@pytest.mark.parametrize("metadata", ["direct", "copy"])
def test_passthrough_requests(share, sock_path, serve, metadata, errors, layout):
    ops = Passthrough(str(share))
    dev = serve_fs(serve, ops, metadata)
    with FuseDriver(sock_path, packed=layout == "packed") as fe:
        fe.setup()
        assert fe.config() == (b"myfs", 1)
        assert fe.getattr(ROOT_INO)[0] == errno.EIO  # nothing before INIT
        major, minor, _ra, flags, *_rest, max_write, _tg, _mp, _ma, _f2 = fe.init()
        assert (major, minor, max_write) == (7, 31, MAX_WRITE) and flags & F.FUSE_DO_READDIRPLUS
        err, attr = fe.getattr(ROOT_INO)
        assert err == 0 and stat.S_ISDIR(attr[A_MODE])
        # lookup: the same inode gets the same node id, another inode another one
        err, e1 = fe.lookup(ROOT_INO, b"hello.txt")
        assert err == 0 and e1[1 + A_SIZE] == 13 and e1[1 + A_INO] == (share / "hello.txt").stat().st_ino
        assert fe.lookup(ROOT_INO, b"hello.txt")[1][0] == e1[0] != fe.lookup(ROOT_INO, b"sub")[1][0]
        assert fe.lookup(ROOT_INO, b"nope")[0] == errno.ENOENT
        # open + read
        err, fh = fe.open(e1[0])
        assert err == 0
        assert fe.read(e1[0], fh, 0, 4096) == (0, b"hello, guest\n")
        assert fe.read(e1[0], fh, 7, 5) == (0, b"guest")
        assert fe.read(e1[0], fh, 1 << 40, 10) == (0, b"")  # past the end
        assert fe.release(e1[0], fh) == 0
        # create + write (several segments of guest memory) + read back + fsync
        err, node, fh = fe.create(ROOT_INO, b"new.bin")
        assert err == 0
        blob = os.urandom(MAX_WRITE)
        assert fe.write(node, fh, 0, blob) == (0, MAX_WRITE)
        assert fe.write(node, fh, MAX_WRITE, blob[:1000]) == (0, 1000)
        assert fe.call(F.FUSE_FSYNC, node, F.FSYNC_IN.pack(fh, 1, 0), reply=0)[0] == 0
        assert fe.call(F.FUSE_FLUSH, node, F.FLUSH_IN.pack(fh, 0, 0, 0), reply=0)[0] == 0
        assert fe.read(node, fh, 0, MAX_WRITE) == (0, blob)
        assert (share / "new.bin").read_bytes() == blob + blob[:1000]
        assert fe.create(ROOT_INO, b"new.bin", flags=O_RDWR | os.O_EXCL)[0] == errno.EEXIST
        # setattr: truncate and chmod
        setattr_in = F.SETATTR_IN.pack(F.FATTR_SIZE | F.FATTR_MODE, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0o600, 0, 0, 0, 0)
        err, out = fe.call(F.FUSE_SETATTR, node, setattr_in)
        assert err == 0 and F.ATTR.unpack_from(out, F.ATTR_OUT.size)[A_SIZE] == 100
        st = (share / "new.bin").stat()
        assert st.st_size == 100 and stat.S_IMODE(st.st_mode) == 0o600
        assert fe.release(node, fh) == 0
        # mkdir, symlink + readlink, link, rename, readdir(plus), unlink, rmdir
        err, out = fe.call(F.FUSE_MKDIR, ROOT_INO, F.MKDIR_IN.pack(0o755, 0) + b"dir\0")
        assert err == 0 and (share / "dir").is_dir()
        dnode = entry(out)[0]
        err, out = fe.call(F.FUSE_SYMLINK, dnode, b"ln\0../hello.txt\0")
        assert err == 0 and os.readlink(share / "dir" / "ln") == "../hello.txt"
        assert fe.call(F.FUSE_READLINK, entry(out)[0]) == (0, b"../hello.txt")
        err, out = fe.call(F.FUSE_LINK, dnode, F.LINK_IN.pack(node) + b"hard\0")
        assert err == 0 and entry(out)[0] == node and entry(out)[1 + A_NLINK] == 2
        assert fe.call(F.FUSE_RENAME, ROOT_INO, F.RENAME_IN.pack(dnode) + b"new.bin\0moved.bin\0", reply=0)[0] == 0
        assert (share / "dir" / "moved.bin").exists() and not (share / "new.bin").exists()
        names = {n: (ino, t) for n, ino, t, _ in fe.readdir(dnode)}
        assert set(names) == {b".", b"..", b"ln", b"hard", b"moved.bin"}
        assert names[b"ln"][1] == stat.S_IFLNK >> 12 and names[b"hard"][0] == (share / "dir" / "hard").stat().st_ino
        plus = {n: node for n, _, _, node in fe.readdir(dnode, plus=True)}
        assert plus[b"hard"] == plus[b"moved.bin"] == node and plus[b"."] == plus[b".."] == 0
        for name in (b"ln", b"hard", b"moved.bin"):
            assert fe.call(F.FUSE_UNLINK, dnode, name + b"\0", reply=0)[0] == 0
        assert fe.call(F.FUSE_RMDIR, ROOT_INO, b"dir\0", reply=0)[0] == 0
        assert sorted(os.listdir(share)) == ["hello.txt", "sub"]
        # statfs, an opcode not offered, one that does not exist
        err, out = fe.call(F.FUSE_STATFS, ROOT_INO)
        assert err == 0 and F.STATFS_OUT.unpack(out)[6] == 255
        assert fe.call(F.FUSE_GETXATTR, ROOT_INO, F.GETXATTR_IN.pack(0, 0) + b"user.x\0")[0] == errno.ENOSYS
        assert fe.call(F.FUSE_IOCTL, ROOT_INO, bytes(32))[0] == errno.ENOSYS
        assert fe.call(999, ROOT_INO)[0] == errno.ENOSYS
        assert fe.call(F.FUSE_DESTROY, 0, reply=0)[0] == 0
    assert not errors()
    assert dev.stats()["write_bytes"] == MAX_WRITE + 1000
    ops.close()


@pytest.mark.parametrize("metadata,resolver", [("direct", "openat2"), ("copy", "openat2"), ("direct", "openat")])
def test_escape_attempts(share, tmp_path, sock_path, serve, metadata, resolver, errors, monkeypatch):
    if resolver == "openat":  # the fallback where openat2 is missing: as strict
        monkeypatch.setattr(fs_passthrough, "_have_openat2", False)
    outside = tmp_path / "outside"
    os.symlink("/etc/passwd", share / "abs")
    os.symlink("..", share / "up")
    os.symlink("../outside/secret", share / "rel")
    os.symlink(f"/proc/self/fd/{os.open(outside, os.O_PATH)}", share / "magic")
    before, passwd = snapshot(outside), hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    ops = Passthrough(str(share), max_inodes=64, max_handles=8)
    dev = serve_fs(serve, ops, metadata)
    with FuseDriver(sock_path) as fe:
        fe.setup()
        fe.init()
        # names: '..', '.', '/', empty, unterminated, too long
        for bad in (b"..", b".", b"../outside", b"sub/../..", b"/etc/passwd", b""):
            assert fe.lookup(ROOT_INO, bad)[0] == errno.EINVAL, bad
        assert fe.call(F.FUSE_LOOKUP, ROOT_INO, b"hello.txt")[0] == errno.EINVAL  # no NUL
        assert fe.lookup(ROOT_INO, b"hello.txt\0../outside/secret")[0] == errno.EINVAL  # a NUL inside
        assert fe.create(ROOT_INO, b"new\0/etc/passwd")[0] == errno.EINVAL
        symlink = b"ln\0../outside\0/etc/passwd\0"
        assert fe.call(F.FUSE_SYMLINK, ROOT_INO, symlink)[0] == errno.EINVAL
        assert fe.lookup(ROOT_INO, b"x" * 256)[0] == errno.ENAMETOOLONG
        assert fe.lookup(ROOT_INO, b"x" * 255)[0] == errno.ENOENT
        assert fe.create(ROOT_INO, b"a/b")[0] == errno.EINVAL
        assert fe.call(F.FUSE_MKDIR, ROOT_INO, F.MKDIR_IN.pack(0o755, 0) + b"..\0")[0] == errno.EINVAL
        rename = F.RENAME_IN.pack(ROOT_INO) + b"hello.txt\0../outside/x\0"
        assert fe.call(F.FUSE_RENAME, ROOT_INO, rename, reply=0)[0] == errno.EINVAL
        # symlinks out: they are inodes of the share (readlink gives their text); nothing follows them
        for name in (b"abs", b"up", b"rel", b"magic"):
            err, e = fe.lookup(ROOT_INO, name)
            assert err == 0 and stat.S_ISLNK(e[1 + A_MODE]), name
            assert fe.open(e[0], O_RDONLY)[0] == errno.ELOOP
            assert fe.open(e[0], O_RDONLY, F.FUSE_OPENDIR)[0] == errno.ENOTDIR
            assert fe.lookup(e[0], b"passwd")[0] == errno.ENOTDIR  # a symlink is no directory to look in
            chmod = F.SETATTR_IN.pack(F.FATTR_MODE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0o777, 0, 0, 0, 0)
            assert fe.call(F.FUSE_SETATTR, e[0], chmod)[0] == errno.EOPNOTSUPP
            trunc = F.SETATTR_IN.pack(F.FATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
            assert fe.call(F.FUSE_SETATTR, e[0], trunc)[0] == errno.EINVAL
            assert fe.create(ROOT_INO, name, flags=O_RDWR | os.O_TRUNC)[0] in (errno.ELOOP, errno.EEXIST)
            assert fe.call(F.FUSE_MKDIR, e[0], F.MKDIR_IN.pack(0o755, 0) + b"d\0")[0] == errno.ENOTDIR
        assert fe.call(F.FUSE_READLINK, fe.lookup(ROOT_INO, b"abs")[1][0]) == (0, b"/etc/passwd")
        # device nodes are never made (a guest's /dev/mem on the host)
        mknod = F.MKNOD_IN.pack(stat.S_IFCHR | 0o666, os.makedev(1, 1), 0, 0) + b"mem\0"
        assert fe.call(F.FUSE_MKNOD, ROOT_INO, mknod)[0] == errno.EPERM
        # node ids never given out, and forgotten ones; file handles likewise
        for node in (0, 999, 12345, (1 << 64) - 1):
            assert fe.getattr(node)[0] == errno.EBADF, node
        err, e = fe.lookup(ROOT_INO, b"hello.txt")
        fe.lookup(ROOT_INO, b"hello.txt")
        fe.forget(e[0], 1)
        assert fe.getattr(e[0])[0] == 0  # one reference left
        fe.forget(e[0], 5)  # more than held: all of them
        assert fe.getattr(e[0])[0] == errno.EBADF
        assert fe.read(e[0], 1, 0, 10)[0] == errno.EBADF
        err, e = fe.lookup(ROOT_INO, b"hello.txt")
        assert err == 0 and e[1 + A_INO] == (share / "hello.txt").stat().st_ino  # a new node id, same inode
        assert fe.read(e[0], 77, 0, 10)[0] == errno.EBADF
        err, fh = fe.open(e[0])
        sub = fe.lookup(ROOT_INO, b"sub")[1][0]
        assert fe.read(sub, fh, 0, 10)[0] == errno.EBADF  # a handle of another node
        # offsets and sizes: huge, negative (as u64), overflowing
        assert fe.read(e[0], fh, 1 << 63, 10)[0] == errno.EINVAL
        assert fe.read(e[0], fh, (1 << 64) - 1, 10)[0] == errno.EINVAL
        huge = F.READ_IN.pack(fh, 0, 0xFFFFFFFF, 0, 0, 0, 0)
        assert fe.call(F.FUSE_READ, e[0], huge, reply=64) == (0, b"hello, guest\n")  # bounded by the buffers
        err, node, wfh = fe.create(ROOT_INO, b"w")
        assert fe.write(node, wfh, (1 << 63) - 2, b"abcd")[0] == errno.EINVAL
        assert fe.write(node, wfh, (1 << 64) - 8, b"abcd")[0] == errno.EINVAL
        big = F.SETATTR_IN.pack(F.FATTR_SIZE, 0, 0, 1 << 63, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        assert fe.call(F.FUSE_SETATTR, node, big)[0] == errno.EINVAL
        falloc = F.FALLOCATE_IN.pack(wfh, (1 << 62), (1 << 62), 0, 0)
        assert fe.call(F.FUSE_FALLOCATE, node, falloc, reply=0)[0] == errno.EINVAL
        # a WRITE whose size says more than the request holds, or more than offered
        unique, msg = fe.message(F.FUSE_WRITE, node, F.WRITE_IN.pack(wfh, 0, 100, 0, 0, 0, 0) + b"x" * 10)
        _, out = fe.raw([msg], [16])
        assert F.OUT_HEADER.unpack(out) == (16, -errno.EINVAL, unique)
        assert fe.write(node, wfh, 0, b"y" * (MAX_WRITE + 1))[0] == errno.EINVAL
        assert os.path.getsize(share / "w") == 0
        # short and lying headers: completed without a reply, or EINVAL; the device goes on
        assert fe.raw([b"\x01" * 20], [64]) == (0, b"")
        _, msg = fe.message(F.FUSE_GETATTR, ROOT_INO, bytes(16), length=4096)
        assert F.OUT_HEADER.unpack(fe.raw([msg], [256])[1][:16])[1] == -errno.EINVAL
        _, msg = fe.message(F.FUSE_GETATTR, ROOT_INO, bytes(16))
        assert fe.raw([msg], [8]) == (0, b"")  # no room for a reply header
        assert fe.call(F.FUSE_GETATTR, ROOT_INO, bytes(3))[0] == errno.EINVAL  # arguments cut short
        _, msg = fe.message(F.FUSE_BATCH_FORGET, 0, F.BATCH_FORGET_IN.pack(1 << 30, 0) + bytes(16))
        assert fe.raw([msg], [], queue=0)[0] == 0
        _, msg = fe.message(F.FUSE_FORGET, 0, b"")
        assert fe.raw([msg], [], queue=0)[0] == 0
        # the bounds: 8 handles, 64 inodes
        held = len(ops.handles)
        handles = [fe.open(e[0]) for _ in range(10)]
        assert [err for err, _ in handles] == [0] * (8 - held) + [errno.EMFILE] * (2 + held), held
        for i in range(70):
            (share / "sub" / f"f{i}").touch()
        found = [fe.lookup(sub, f"f{i}".encode())[0] for i in range(70)]
        assert found.count(errno.ENFILE) > 0 and found.count(0) > 40
        assert fe.getattr(ROOT_INO)[0] == 0  # and it still answers
    assert snapshot(outside) == before
    assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == passwd
    assert any("limit" in m for m in errors()) and any("shorter than its header" in m for m in errors())
    assert dev.stats()["malformed"] >= 3
    ops.close()


def test_symlink_swapped_in_during_lookups(share, tmp_path, sock_path, serve):
    """A host process swaps a directory of the share and a symlink to / back and forth while the guest looks
    up through it: each lookup finds the directory's child or an errno, never a file outside."""
    outside = tmp_path / "outside"
    (share / "d").mkdir()
    (share / "d" / "inner").write_bytes(b"inside")
    os.symlink("/", share / "evil")
    before = snapshot(outside)
    ops = Passthrough(str(share))
    serve_fs(serve, ops)
    stop = threading.Event()

    def swapper() -> None:
        a, b = str(share / "d"), str(share / "evil")
        while not stop.is_set():
            os.rename(a, str(share / "tmp"))
            os.rename(b, a)
            os.rename(str(share / "tmp"), b)

    t = threading.Thread(target=swapper, daemon=True)
    with FuseDriver(sock_path) as fe:
        fe.setup()
        fe.init()
        t.start()
        seen = set()
        try:
            for _ in range(300):
                for name in (b"d", b"evil"):
                    err, e = fe.lookup(ROOT_INO, name)
                    if err:
                        continue
                    for child in (b"inner", b"etc", b"root"):
                        err2, c = fe.lookup(e[0], child)
                        seen.add((child, err2))
                        if not err2:
                            assert child == b"inner" and c[1 + A_SIZE] == 6
                    fe.forget(e[0])
        finally:
            stop.set()
            t.join(10)
    assert (b"inner", 0) in seen and (b"etc", errno.ENOTDIR) in seen
    assert all(err in (0, errno.ENOENT, errno.ENOTDIR) for _, err in seen)
    assert snapshot(outside) == before
    ops.close()


def test_readonly(share, sock_path, serve):
    before = snapshot(share)
    ops = Passthrough(str(share), readonly=True)
    serve_fs(serve, ops, readonly=True, cache="none")
    with FuseDriver(sock_path) as fe:
        fe.setup()
        fe.init()
        node = fe.lookup(ROOT_INO, b"hello.txt")[1][0]
        assert fe.open(node, O_RDWR)[0] == errno.EROFS
        assert fe.open(node, O_RDONLY | os.O_TRUNC)[0] == errno.EROFS
        err, fh = fe.open(node, O_RDONLY)
        assert err == 0 and fe.read(node, fh, 0, 100) == (0, b"hello, guest\n")
        assert fe.write(node, fh, 0, b"x")[0] == errno.EROFS
        assert fe.create(ROOT_INO, b"x")[0] == errno.EROFS
        assert fe.call(F.FUSE_UNLINK, ROOT_INO, b"hello.txt\0", reply=0)[0] == errno.EROFS
        assert fe.call(F.FUSE_MKDIR, ROOT_INO, F.MKDIR_IN.pack(0o755, 0) + b"d\0")[0] == errno.EROFS
        err, out = fe.call(F.FUSE_OPEN, node, F.OPEN_IN.pack(O_RDONLY, 0))
        assert F.OPEN_OUT.unpack(out)[1] == F.FOPEN_DIRECT_IO  # --cache none
    assert snapshot(share) == before
    ops.close()


class Slow(Operations):
    """Reads of node 2 wait for ``go``; everything else answers at once."""

    def __init__(self) -> None:
        self.go = threading.Event()

    def getattr(self, ino, fh, ctx):
        return Attr(ino, stat.S_IFDIR | 0o755 if ino == ROOT_INO else stat.S_IFREG | 0o644)

    def read(self, ino, fh, offset, size):
        if ino == 2:
            assert self.go.wait(30)
        return b"z" * size


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_requests_complete_out_of_order(sock_path, serve, layout):
    ops = Slow()
    serve_fs(serve, ops, thread_pool_size=4)
    with FuseDriver(sock_path, packed=layout == "packed") as fe:
        fe.setup()
        fe.init()
        _, slow = fe.message(F.FUSE_READ, 2, F.READ_IN.pack(0, 0, 8, 0, 0, 0, 0))
        fe.post(1, [slow], [16, 8], tag=1)
        order = []
        for i in range(2, 6):
            _, msg = fe.message(F.FUSE_GETATTR, ROOT_INO, F.GETATTR_IN.pack(0, 0, 0))
            fe.post(1, [msg], [16, 200], tag=i)
        while len(order) < 4:
            order += [tag for tag, _, _ in fe.wait(1)]
        ops.go.set()
        order += [tag for tag, _, _ in fe.wait(1)]
        assert sorted(order[:4]) == [2, 3, 4, 5] and order[4] == 1


def doc_example() -> dict:
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[0]
    assert 50 <= len(code.splitlines()) <= 110
    ns: dict = {"__name__": "memfs"}
    exec(compile(code, str(DOC), "exec"), ns)
    return ns


def test_doc_example_memfs(sock_path, serve, errors):
    memfs = doc_example()["MemFS"]()
    serve_fs(serve, memfs)
    with FuseDriver(sock_path) as fe:
        fe.setup()
        fe.init()
        err, out = fe.call(F.FUSE_MKDIR, ROOT_INO, F.MKDIR_IN.pack(0o755, 0) + b"docs\0")
        assert err == 0
        d = entry(out)[0]
        err, node, fh = fe.create(d, b"a.txt")
        assert err == 0 and fe.write(node, fh, 3, b"abc") == (0, 3)
        assert fe.read(node, fh, 0, 100) == (0, b"\0\0\0abc")
        assert [n for n, *_ in fe.readdir(d)] == [b"a.txt"]
        assert [n for n, *_, node in fe.readdir(ROOT_INO, plus=True)] == [b"docs"]
        assert fe.lookup(d, b"a.txt")[1][1 + A_SIZE] == 6
        assert fe.call(F.FUSE_RMDIR, ROOT_INO, b"docs\0", reply=0)[0] == errno.ENOTEMPTY
        assert fe.call(F.FUSE_UNLINK, d, b"a.txt\0", reply=0)[0] == 0
        assert fe.call(F.FUSE_RMDIR, ROOT_INO, b"docs\0", reply=0)[0] == 0
        assert fe.getattr(12345)[0] == errno.ENOENT
        assert fe.call(F.FUSE_SYMLINK, ROOT_INO, b"l\0t\0")[0] == errno.ENOSYS
    assert not errors()


def test_cli_arguments():
    p = argparse.ArgumentParser()
    SPECS["fs"].add_arguments(p)
    args = p.parse_args(["--shared-dir", "/tmp", "--tag", "t", "--cache", "always", "--thread-pool-size", "2"])
    dev = SPECS["fs"].create(args)
    try:
        assert isinstance(dev, FsDevice) and dev.config_space() == CONFIG.pack(b"t", 1)
    finally:
        dev.close()
    with pytest.raises(SystemExit):
        SPECS["fs"].create(p.parse_args(["--tag", "t"]))  # neither --shared-dir nor --ops
    with pytest.raises(SystemExit):
        p.parse_args(["--shared-dir", "/tmp", "--ops", "m:C"])  # not both
    assert struct.calcsize("<36sI") == CONFIG.size == 40


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_more_opcodes(share, sock_path, serve, errors, layout):
    """FALLOCATE, LSEEK, RENAME2, GETATTR by handle, BATCH_FORGET, INTERRUPT, ACCESS (not offered)."""
    ops = Passthrough(str(share))
    dev = serve_fs(serve, ops)
    with FuseDriver(sock_path, packed=layout == "packed") as fe:
        fe.setup()
        fe.init()
        err, node, fh = fe.create(ROOT_INO, b"sparse")
        assert err == 0 and fe.write(node, fh, 1 << 20, b"tail") == (0, 4)
        punch = F.FALLOCATE_IN.pack(fh, 1 << 20, 2, 0x01 | 0x02, 0)  # KEEP_SIZE | PUNCH_HOLE
        assert fe.call(F.FUSE_FALLOCATE, node, punch, reply=0)[0] == 0
        assert (share / "sparse").read_bytes()[-4:] == b"\0\0il"
        err, out = fe.call(F.FUSE_LSEEK, node, F.LSEEK_IN.pack(fh, 0, os.SEEK_DATA, 0))
        assert err == 0 and F.LSEEK_OUT.unpack(out)[0] >= 4096  # the hole at the start is skipped
        assert fe.call(F.FUSE_LSEEK, node, F.LSEEK_IN.pack(fh, 0, 9, 0))[0] == errno.EINVAL
        err, out = fe.call(F.FUSE_GETATTR, node, F.GETATTR_IN.pack(F.FUSE_GETATTR_FH, 0, fh))
        assert err == 0 and F.ATTR.unpack_from(out, F.ATTR_OUT.size)[A_SIZE] == (1 << 20) + 4
        noreplace = F.RENAME2_IN.pack(ROOT_INO, 1, 0) + b"sparse\0hello.txt\0"
        assert fe.call(F.FUSE_RENAME2, ROOT_INO, noreplace, reply=0)[0] == errno.EEXIST
        exchange = F.RENAME2_IN.pack(ROOT_INO, 2, 0) + b"sparse\0hello.txt\0"
        assert fe.call(F.FUSE_RENAME2, ROOT_INO, exchange, reply=0)[0] == 0
        assert (share / "sparse").read_bytes() == b"hello, guest\n"
        whiteout = F.RENAME2_IN.pack(ROOT_INO, 4, 0) + b"sparse\0x\0"
        assert fe.call(F.FUSE_RENAME2, ROOT_INO, whiteout, reply=0)[0] == errno.EINVAL
        assert fe.call(F.FUSE_ACCESS, node, F.ACCESS_IN.pack(4, 0), reply=0)[0] == errno.ENOSYS
        assert fe.release(node, fh) == 0
        # BATCH_FORGET of two lookups of two nodes; INTERRUPT (no reply) on the hiprio queue
        a = fe.lookup(ROOT_INO, b"hello.txt")[1][0]
        b = fe.lookup(ROOT_INO, b"sub")[1][0]
        _, msg = fe.message(
            F.FUSE_BATCH_FORGET, 0, F.BATCH_FORGET_IN.pack(2, 0) + F.FORGET_ONE.pack(a, 2) + F.FORGET_ONE.pack(b, 1)
        )
        assert fe.raw([msg], [], queue=0)[0] == 0
        assert fe.getattr(a)[0] == fe.getattr(b)[0] == errno.EBADF  # (create's reference went with a)
        _, msg = fe.message(F.FUSE_INTERRUPT, 0, F.INTERRUPT_IN.pack(12345))
        assert fe.raw([msg], [], queue=0)[0] == 0
        assert fe.getattr(ROOT_INO)[0] == 0
    assert not errors()
    assert dev.stats()["BATCH_FORGET"] == 1 and dev.stats()["INTERRUPT"] == 1
    ops.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="creating as the guest's user needs root")
def test_ownership_and_modes(share, sock_path, serve):
    """New inodes belong to the guest's user, have exactly the permissions asked (our umask aside), and a file
    never gets a set-user/group-ID bit (a host user could run it)."""
    os.chmod(share, 0o777)
    ops = Passthrough(str(share))
    serve_fs(serve, ops)
    old = os.umask(0o077)
    try:
        with FuseDriver(sock_path) as fe:
            fe.setup()
            fe.init()
            create = F.CREATE_IN.pack(O_RDWR | os.O_CREAT, 0o6755, 0, 0) + b"mine\0"
            assert fe.call(F.FUSE_CREATE, ROOT_INO, create, uid=1234)[0] == 0
            st = (share / "mine").stat()
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 1234, 0o755)
            assert fe.call(F.FUSE_MKDIR, ROOT_INO, F.MKDIR_IN.pack(0o2775, 0) + b"dir\0", uid=1234)[0] == 0
            st = (share / "dir").stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (1234, 0o2775)
            root_dir = entry(fe.call(F.FUSE_MKDIR, ROOT_INO, F.MKDIR_IN.pack(0o755, 0) + b"rootdir\0")[1])[0]
            mk = F.MKDIR_IN.pack(0o755, 0) + b"x\0"
            assert fe.call(F.FUSE_MKDIR, root_dir, mk, uid=1234)[0] == errno.EACCES  # the host checks as the user
            suid = F.SETATTR_IN.pack(F.FATTR_MODE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0o4711, 0, 0, 0, 0)
            err, _ = fe.call(F.FUSE_SETATTR, fe.lookup(ROOT_INO, b"mine")[1][0], suid)
            assert err == 0 and stat.S_IMODE((share / "mine").stat().st_mode) == 0o711
    finally:
        os.umask(old)
    ops.close()

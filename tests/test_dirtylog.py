"""The dirty log (dirtylog.py): SET_LOG_BASE parsed and mapped, pages logged by the compiled atomic OR.

An oracle (Hypothesis): random write ranges set exactly the bits of the pages they touch, none other, and
never a byte outside the log (sentinels around it in its file, a PROT_NONE page after its mapping).  Threads
OR-ing bits of the same bytes at once, compiled and without the GIL, lose none.  Hostile SET_LOG_BASE (a log
too small for guest memory, past its fd's end, size + offset overflowing, a pipe, a socket, a directory)
gets a clear error and leaves no fd and no mapping behind.
"""

from __future__ import annotations

import gc
import os
import resource
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvhost import memory
from pyvhost import protocol as P
from pyvhost.dirtylog import (
    MAX_LOG_SIZE,
    NO_LOG,
    DirtyLog,
    DirtyLogError,
    check_ring_log_addr,
    guest_end,
    log_ranges,
    log_size_for,
    log_used,
    log_write,
)
from pyvhost.memory import GuestMemory, MemoryError_
from pyvhost.protocol import LOG_HDR, VHOST_LOG_PAGE, MemRegion
from pyvhost.protocol import Request as R

try:
    from .conftest import mapping_count, open_fds
except ImportError:  # tests/ not a package
    from conftest import mapping_count, open_fds

PAGE = VHOST_LOG_PAGE
SENTINEL = 0xA5


def log_file(size: int, offset: int = 0, tail: int = 0) -> int:
    """A memfd holding a zeroed log of ``size`` bytes at ``offset``, SENTINEL bytes before it and ``tail``
    SENTINEL bytes after it."""
    fd = os.memfd_create("pyvhost-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, offset + size + tail)
    os.pwrite(fd, bytes([SENTINEL]) * offset, 0)
    os.pwrite(fd, bytes([SENTINEL]) * tail, offset + size)
    return fd


def sentinels_intact(fd: int, size: int, offset: int, tail: int) -> bool:
    return (
        os.pread(fd, offset, 0) == bytes([SENTINEL]) * offset
        and os.pread(fd, tail, offset + size) == bytes([SENTINEL]) * tail
    )


def expected(size: int, ranges: list[tuple[int, int]]) -> tuple[set[int], int]:
    """Brute force: the pages a log of ``size`` bytes must show for these writes, and the pages past its end."""
    pages: set[int] = set()
    skipped = 0
    for gpa, length in ranges:
        for p in range(gpa // PAGE, (gpa + length - 1) // PAGE + 1) if length else ():
            if p < size * 8:
                pages.add(p)
            else:
                skipped += 1
    return pages, skipped


def test_constants_from_the_spec():
    assert (P.VHOST_F_LOG_ALL, P.VHOST_VRING_F_LOG, P.VHOST_LOG_PAGE) == (26, 0, 0x1000)
    assert P.ProtocolFeature.LOG_SHMFD == 1 and R.SET_LOG_BASE == 6
    assert log_size_for(0) == 0 and log_size_for(1) == 1 and log_size_for(8 * PAGE) == 1
    assert log_size_for(8 * PAGE + 1) == 2 and log_size_for(1 << 30) == (1 << 30) // PAGE // 8


# =========================================================================================================
# the oracle
@settings(max_examples=150)
@given(
    size=st.integers(1, 40),
    offset=st.integers(0, 3 * 4096),
    tail=st.integers(0, 64),
    data=st.data(),
)
def test_random_writes_set_exactly_their_pages(size, offset, tail, data):
    covers = size * 8 * PAGE
    ranges = data.draw(
        st.lists(
            st.tuples(st.integers(0, covers + 4 * PAGE), st.one_of(st.integers(0, 3 * PAGE), st.integers(0, covers))),
            max_size=12,
        )
    )
    fd = log_file(size, offset, tail)
    try:
        with DirtyLog(fd, size, offset) as dl:
            skipped = sum(dl.write(gpa, length) for gpa, length in ranges)
            want, want_skipped = expected(size, ranges)
            assert set(dl.dirty_pages().tolist()) == want
            assert skipped == dl.skipped == want_skipped
            # the bits are in the shared file, where the front-end reads them
            file_bits = np.unpackbits(np.frombuffer(os.pread(fd, size, offset), np.uint8), bitorder="little")
            assert set(np.flatnonzero(file_bits).tolist()) == want
        assert sentinels_intact(fd, size, offset, tail)
    finally:
        os.close(fd)


@given(ranges=st.lists(st.tuples(st.integers(0, 1 << 24), st.integers(0, 1 << 16)), max_size=20))
def test_compiled_helpers_agree_with_the_oracle(ranges):
    """log_write (one range), log_used (offset into a used area) and the nogil batch kernel, on a plain array."""
    size = 256
    for how in ("write", "used", "batch"):
        bitmap = np.zeros(size + 16, np.uint8)  # 16 bytes past log_len: must stay untouched
        if how == "batch":
            arr = np.array(ranges, dtype=np.int64).reshape(-1, 2)
            skipped = log_ranges(bitmap, size, arr)
        elif how == "write":
            skipped = sum(log_write(bitmap, size, gpa, length) for gpa, length in ranges)
        else:  # the used area at log_guest_addr 0x3000, written at an offset
            skipped = sum(log_used(bitmap, size, 0x3000, gpa, length) for gpa, length in ranges)
        shifted = [(gpa + (0x3000 if how == "used" else 0), length) for gpa, length in ranges]
        want, want_skipped = expected(size, shifted)
        assert set(np.flatnonzero(np.unpackbits(bitmap[:size], bitorder="little")).tolist()) == want, how
        assert skipped == want_skipped, how
        assert not bitmap[size:].any(), how


def test_pages_straddling_length_zero_and_the_last_page():
    fd = log_file(4)
    try:
        with DirtyLog(fd, 4) as dl:
            assert dl.covers == 32 * PAGE
            assert dl.write(PAGE - 1, 2) == 0  # two bytes, two pages
            assert dl.dirty_pages().tolist() == [0, 1]
            assert dl.write(5 * PAGE, 0) == 0 and dl.write(dl.covers + PAGE, 0) == 0  # length 0: nothing
            assert dl.dirty_pages().tolist() == [0, 1]
            assert dl.write(dl.covers - 1, 1) == 0  # the last byte of the last page: bit 7 of the last byte
            assert dl.bitmap[3] == 0x80
            assert dl.write(dl.covers - PAGE, 3 * PAGE) == 2  # the last page logged, two past the end counted
            assert dl.write(dl.covers, 1) == 1 and dl.skipped == 3
            assert dl.write(8 * PAGE, 8 * PAGE) == 0 and dl.bitmap[1] == 0xFF  # a whole byte in one OR
            assert dl.dirty_pages().tolist() == [0, 1, *range(8, 16), 31]
            with pytest.raises(ValueError):
                dl.write(-1, 1)
            with pytest.raises(ValueError):
                dl.write(0, P.ADDR_LIMIT)
    finally:
        os.close(fd)


def test_out_of_range_arguments_log_nothing():
    bitmap = np.zeros(8, np.uint8)
    for gpa, length in ((-1, 1), (0, -1), (P.ADDR_LIMIT, 1), (0, P.ADDR_LIMIT), (P.ADDR_LIMIT - 1, 0)):
        assert log_write(bitmap, 8, gpa, length) == (0 if (gpa, length) == (P.ADDR_LIMIT - 1, 0) else -1)
    assert log_used(bitmap, 8, 0, -1, 1) == -1 and log_used(bitmap, 8, P.ADDR_LIMIT - 1, 1, 1) == -1
    assert log_ranges(bitmap, 8, np.array([[0, 1], [-5, 1]], dtype=np.int64)) == -1  # the good row is logged
    assert bitmap.tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    # logging off: NO_LOG and log_len 0 log nothing and count every page as past the end
    assert log_write(NO_LOG, 0, 0, 3 * PAGE) == 3
    # a log_len larger than the array is bounded by the array
    assert log_write(bitmap, 1 << 20, 8 * 8 * PAGE, PAGE) == 1


def test_log_at_the_end_of_its_mapping_is_followed_by_a_guard_page():
    """A log filling its pages exactly: the page after it is PROT_NONE, and writes past its end touch
    nothing (an out-of-bounds OR would fault there and end the test process)."""
    fd = log_file(PAGE)
    try:
        with DirtyLog(fd, PAGE) as dl:
            end = dl.bitmap.ctypes.data + PAGE
            with open("/proc/self/maps") as f:
                rows = [line.split() for line in f]
            guard = [r for r in rows if int(r[0].split("-")[0], 16) <= end < int(r[0].split("-")[1], 16)]
            assert guard and guard[0][1] == "---p", guard
            assert dl.write(dl.covers - 1, 64 * PAGE) == 64  # 65 pages: the log's last one, 64 past its end
            assert log_write(dl.bitmap, PAGE + 64, dl.covers, 1 << 20) == 256  # a lying log_len too
            assert dl.dirty_pages().tolist() == [PAGE * 8 - 1]
    finally:
        os.close(fd)


# =========================================================================================================
# concurrency: the OR is atomic
def test_threads_or_bits_of_the_same_bytes_and_lose_none():
    """Eight threads set interleaved pages (thread t: pages t, t+8, ...): every byte is ORed by all of them
    at about the same time, in compiled code without the GIL.  A plain load-or-store in ``or8`` loses bits
    here in every run (checked when this test was written); the atomic OR loses none."""
    nthreads, size, rounds = 8, 1 << 16, 48
    pages = size * 8
    fd = log_file(size)
    try:
        with DirtyLog(fd, size) as dl:
            work = [
                np.stack([np.arange(t, pages, nthreads) * PAGE, np.ones(pages // nthreads)], axis=1).astype(np.int64)
                for t in range(nthreads)
            ]
            log_ranges(dl.bitmap, size, work[0][:1])  # compiled (or loaded) before the threads race
            for _ in range(rounds):
                dl.bitmap[:] = 0
                barrier = threading.Barrier(nthreads)
                results: list[int] = []

                def run(ranges: np.ndarray) -> None:
                    barrier.wait()
                    results.append(int(log_ranges(dl.bitmap, size, ranges)))

                threads = [threading.Thread(target=run, args=(w,)) for w in work]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(timeout=120)
                assert results == [0] * nthreads
                assert int((dl.bitmap != 0xFF).sum()) == 0, "bits lost"
    finally:
        os.close(fd)


# =========================================================================================================
# SET_LOG_BASE: parsing, hostile fds and sizes, no leaks
def message(size: int, offset: int, fds: list[int] | None = None, payload: bytes | None = None) -> P.Message:
    return P.Message(
        R.SET_LOG_BASE, P.VHOST_USER_VERSION, LOG_HDR.pack(size, offset) if payload is None else payload, fds or []
    )


def test_log_base_parses_a_good_message_over_a_socket():
    fd = log_file(PAGE, 0x100)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        P.send_message(a, R.SET_LOG_BASE, LOG_HDR.pack(PAGE, 0x100), [fd])
        msg = P.recv_message(b)
        req = P.log_base(msg)
        assert req == P.LogBase(PAGE, 0x100)
        with DirtyLog.from_request(req, msg.fds[0]) as dl:
            msg.close_fds()  # the mapping holds the file, not the fd
            dl.write(0, 1)
            assert os.pread(fd, 1, 0x100) == b"\x01"
    finally:
        os.close(fd)
        a.close()
        b.close()


@pytest.mark.parametrize(
    "size, offset, nfds, payload, text",
    [
        (PAGE, 0, 0, None, "0 fds"),
        (PAGE, 0, 2, None, "2 fds"),
        (0, 0, 1, None, "size 0"),
        (P.ADDR_LIMIT, 0, 1, None, "out of range"),
        ((1 << 64) - 1, 1, 1, None, "out of range"),  # size + offset wraps around 64 bits
        (8, (1 << 64) - 4, 1, None, "out of range"),
        (PAGE, 0, 1, LOG_HDR.pack(PAGE, 0)[:8], "expected 16"),
        (PAGE, 0, 1, LOG_HDR.pack(PAGE, 0) + b"\0" * 8, "expected 16"),
    ],
)
def test_log_base_refuses_bad_messages(size, offset, nfds, payload, text):
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(nfds)]
    msg = message(size, offset, fds, payload)
    with pytest.raises(P.ProtocolError, match=text):
        P.log_base(msg)
    msg.close_fds()


def fd_of(kind: str, stack: list) -> int:
    """A non-mappable fd of ``kind`` (the caller closes what ``stack`` holds)."""
    if kind == "pipe":
        r, w = os.pipe()
        stack += [r, w]
        return r
    if kind == "socket":
        s1, s2 = socket.socketpair()
        stack += [s1, s2]
        return s1.fileno()
    if kind == "directory":
        d = os.open(tempfile.gettempdir(), os.O_RDONLY | os.O_DIRECTORY)
        stack.append(d)
        return d
    if kind == "char device":
        d = os.open("/dev/zero", os.O_RDWR)
        stack.append(d)
        return d
    if kind == "read-only file":  # a regular file of the right size, but not writable: mmap refuses it
        f = tempfile.NamedTemporaryFile()
        f.truncate(PAGE)
        d = os.open(f.name, os.O_RDONLY)
        stack += [d, f]
        return d
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # "closed": a number no fd can have


NOT_MAPPABLE = {"closed": "Bad file descriptor", "read-only file": "Permission denied"}


@pytest.mark.parametrize("kind", ["pipe", "socket", "directory", "char device", "closed", "read-only file"])
def test_a_non_mappable_fd_is_refused_cleanly(kind):
    stack: list = []
    fd = fd_of(kind, stack)
    fds_before, maps_before = open_fds(), mapping_count()
    with pytest.raises(DirtyLogError, match=NOT_MAPPABLE.get(kind, "not mappable")):
        DirtyLog(fd, PAGE)
    assert open_fds() == fds_before and mapping_count() == maps_before
    for x in stack:
        if isinstance(x, int):
            os.close(x)
        else:
            x.close()


@pytest.mark.parametrize(
    "size, offset, file_size, text",
    [
        (PAGE, 2 * PAGE, 2 * PAGE, "past the end"),  # the offset past the fd's end
        (PAGE, 0x80, PAGE, "past the end"),  # offset + size just past it
        (2 * PAGE, 0, PAGE, "past the end"),
        (0, 0, PAGE, "out of range"),
        (MAX_LOG_SIZE + 1, 0, PAGE, "out of range"),
        (8, (1 << 64) - 8, PAGE, "overflows"),  # size + offset wraps around 64 bits
        (8, P.ADDR_LIMIT, PAGE, "overflows"),
        (8, -1, PAGE, "overflows"),
    ],
)
def test_hostile_sizes_and_offsets_are_refused_cleanly(size, offset, file_size, text):
    fd = log_file(file_size)
    fds_before, maps_before = open_fds(), mapping_count()
    try:
        with pytest.raises(DirtyLogError, match=text):
            DirtyLog(fd, size, offset)
        assert open_fds() == fds_before and mapping_count() == maps_before
    finally:
        os.close(fd)


def test_a_log_too_small_for_guest_memory_is_refused():
    """QEMU sizes the log for the memory table; a smaller one could not log the top of guest memory."""
    mem = GuestMemory(arena_size=1 << 32)
    rfd = os.memfd_create("pyvhost-ram", os.MFD_CLOEXEC)
    os.ftruncate(rfd, 1 << 20)
    lfd = log_file(64)
    try:
        mem.add_region(MemRegion(0x4000_0000, 1 << 20, 0x7000_0000, 0), rfd)
        end = guest_end(mem)
        assert end == 0x4010_0000 and log_size_for(end) == 0x8020
        with DirtyLog(lfd, 64) as dl:
            with pytest.raises(DirtyLogError, match="needs 32800 bytes"):
                dl.check_covers(end)
            dl.check_covers(64 * 8 * PAGE)  # exactly covered: fine
            with pytest.raises(DirtyLogError):
                dl.check_covers(64 * 8 * PAGE + 1)
        assert isinstance(DirtyLogError("x"), MemoryError_)  # the back-end's handlers catch it as a memory error
        # the used ring's log address must lie in guest memory
        check_ring_log_addr(mem, 0x4000_0000 + 0x1000, 6 + 8 * 256)
        for addr in (0, 0x4010_0000 - 8, 0x4010_0000, P.ADDR_LIMIT + 4):
            with pytest.raises(DirtyLogError, match="not in guest memory"):
                check_ring_log_addr(mem, addr, 6 + 8 * 256)
    finally:
        mem.close()
        os.close(rfd)
        os.close(lfd)
    empty = GuestMemory(arena_size=1 << 30)
    assert guest_end(empty) == 0
    empty.close()


def test_open_close_leaves_nothing_and_a_live_view_keeps_the_mapping():
    fd = log_file(3 * PAGE, 0x10)
    gc.collect()  # views other tests left behind go now, not in the middle of this count
    fds_before, maps_before = open_fds(), mapping_count()
    for _ in range(3):
        dl = DirtyLog(fd, 3 * PAGE, 0x10)
        dl.write(0, 1)
        dl.close()
        dl.close()  # idempotent
        with pytest.raises(DirtyLogError, match="closed"):
            dl.write(0, 1)
        assert dl.dirty_pages().size == 0
    assert open_fds() == fds_before and mapping_count() == maps_before
    # a view that outlives close (a bug elsewhere): the mapping stays while it lives, no dangling pointer
    dl = DirtyLog(fd, 3 * PAGE, 0x10)
    view = dl.bitmap[:8]
    pending = memory.pending_arenas()
    dl.close()
    assert memory.pending_arenas() == pending + 1
    view[0] |= 2  # still the shared log
    assert os.pread(fd, 1, 0x10) == b"\x03"
    del view
    gc.collect()
    assert memory.pending_arenas() == pending
    assert open_fds() == fds_before and mapping_count() == maps_before
    os.close(fd)


TRUNCATE_SCRIPT = textwrap.dedent("""
    import os
    from pyvhost import sigbus
    from pyvhost.dirtylog import DirtyLog

    sigbus.install()
    fd = os.memfd_create("pyvhost-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4 * 4096)
    dl = DirtyLog(fd, 4 * 4096)
    os.ftruncate(fd, 4096)  # the front-end truncates the log under our mapping
    dl.write(0, 1)
    dl.write(3 * 4096 * 8 * 4096, 1)  # a page of the log's last (truncated) page: SIGBUS, recovered
    print(dl.bus_fault())
    dl.close()
""")


def test_a_truncated_log_file_is_a_recovered_fault_not_a_dead_process():
    p = subprocess.run([sys.executable, "-c", TRUNCATE_SCRIPT], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("the dirty log's file was truncated"), p.stdout
    assert "1 fault(s)" in p.stdout, p.stdout

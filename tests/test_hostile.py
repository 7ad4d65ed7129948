"""A hostile guest: every bounded value of a split ring, out of bounds, on both metadata paths.

Each test sets a Frontend up, then writes one of its rings by hand (descriptor table, avail entries, then the
avail index, then a kick) so that the back-end meets one bad value.  The back-end must break only that queue:
log "vring N broken: <QueueError>: ...", signal the ERR eventfd, publish the completions it made before the
bad chain, keep the other queues running, and keep serving new connections with exact counts.  ``direct`` and
``copy`` must behave identically, so every test runs on both.
"""

from __future__ import annotations

import os
import re
import select
import threading
import time

import numpy as np
import pytest

from pyvhost.errors import QueueError as E
from pyvhost.frontend.net import Frontend, FrontendError
from pyvhost.frontend.split import D_DONE
from pyvhost.protocol import ADDR_LIMIT, MEM_TABLE_HDR, U64, VRING_ADDR
from pyvhost.protocol import Request as R
from pyvhost.ring.split import VRING_DESC_F_INDIRECT as INDIRECT
from pyvhost.ring.split import VRING_DESC_F_NEXT as NEXT
from pyvhost.ring.split import VRING_DESC_F_WRITE as WRITE

try:
    from .conftest import mapping_count, open_fds
except ImportError:  # tests/ not a package
    from conftest import mapping_count, open_fds

PATHS = ["direct", "copy"]
QSIZE = 64
RAM = 16 << 20
FRAME_LEN = 12 + 64  # virtio-net header + the 64-byte frame both devices use
TIMEOUT = 10.0
GOOD = 3  # good chains posted before the bad one


class Guest:
    """Hand-written state of ring ``index`` of a set-up Frontend (the driver side of a split ring)."""

    def __init__(self, fe: Frontend, index: int) -> None:
        self.fe = fe
        self.ram = fe.ram
        self.ring = fe.rings[index]
        self.index = index
        self.size = self.ring.size
        self.idx = int(self.ring.avail[1])
        self.dir = WRITE if index % 2 == 0 else 0  # RX rings take device-writable buffers
        self.err_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fe.command(R.SET_VRING_ERR, U64.pack(index), [self.err_fd])

    # -- writing the ring --------------------------------------------------------------------------------
    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table=None) -> None:
        t = self.ring.desc if table is None else table
        t[2 * i] = np.uint64(addr)
        t[2 * i + 1] = np.uint64(length | flags << 32 | nxt << 48)

    def good(self, *indices: int, table=None) -> None:
        """Descriptor i: a valid one-buffer chain (its own 2 KiB buffer) in this ring's direction."""
        for i in indices:
            self.desc(i, self.ring.buf_gpa(i), FRAME_LEN, self.dir, table=table)

    def good_chains(self, n: int = GOOD) -> list[int]:
        self.good(*range(n))
        return list(range(n))

    def table(self, entries: int) -> tuple[int, np.ndarray]:
        """A fresh indirect table in guest RAM: (its GPA, a uint64 view of it)."""
        off = self.ram.alloc(16 * max(entries, 1), 16)
        return self.ram.gpa(off), self.ram.buf[off : off + 16 * max(entries, 1)].view(np.uint64)

    def post(self, *heads: int, kick: bool = True) -> None:
        for h in heads:
            self.ring.avail[2 + self.idx % self.size] = h
            self.idx += 1
        self.ring.avail[1] = self.idx & 0xFFFF  # the index last, after the entries
        if kick:
            self.kick()

    def kick(self) -> None:
        os.eventfd_write(self.ring.kick_fd, 1)

    # -- reading what the back-end did -------------------------------------------------------------------
    @property
    def used(self) -> int:
        return int(self.ring.used16[1])

    def used_ids(self) -> list[int]:
        return [int(self.ring.used32[1 + 2 * (k % self.size)]) for k in range(self.used)]

    def wait_used(self, n: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while self.used != n:
            assert time.monotonic() < deadline, f"used index {self.used}, expected {n}"
            time.sleep(0.001)

    def wait_err(self) -> int:
        ready, _, _ = select.select([self.err_fd], [], [], TIMEOUT)
        assert ready, "the ERR eventfd was not signalled"
        return os.eventfd_read(self.err_fd)

    def close(self) -> None:
        os.close(self.err_fd)


def traffic(fe: Frontend, direction: str, pair: int, count: int) -> None:
    """``count`` more completions on a well-behaved ring, then stop it and check the exact total."""
    ring = fe.rings[2 * pair + (1 if direction == "tx" else 0)]
    target = int(ring.d[D_DONE]) + count
    fe.run(direction, count=count, pair=pair, timeout=TIMEOUT)  # count more, from this call on
    assert fe.drain(direction, pair=pair)["packets"] == target


def fresh_connection_works(srv, sock_path: str, mode: str, count: int = 1000) -> None:
    srv.ended()
    direction, index = ("tx", 1) if mode == "sink" else ("rx", 0)
    with Frontend(sock_path, queue_size=QSIZE, ram_size=RAM) as fe:
        fe.setup()
        traffic(fe, direction, 0, count)
    stats = srv.ended()[-1]
    assert stats[index]["packets"] == count and stats[index]["error"] == 0 and stats[index]["drops"] == 0
    assert srv.thread.is_alive()


def worker_gone(srv, index: int) -> bool:
    """No worker thread serves ring ``index`` any more (waiting, within TIMEOUT, for one leaving)."""
    workers = [w for grp, w in srv.connection.workers.items() if index in grp]
    for w in workers:
        w.join(TIMEOUT)
    return not any(w.is_alive() for w in workers)


def broken_lines(errors, index: int) -> list[str]:
    return [line for line in errors() if line.startswith(f"vring {index} broken")]


def check_isolated_break(
    serve,
    sock_path,
    errors,
    metadata: str,
    mode: str,
    build,
    expect: E,
    good: int = GOOD,
    before=None,
    direct: bool | None = None,
) -> None:
    """Set up 2 queue pairs; break ring 0 (source) or 1 (sink) with ``build(guest)``; check the break is
    clean, isolated and complete; then the other pair and a new connection must pass exact traffic."""
    srv = serve(mode, metadata, queue_pairs=2)
    index, direction = (1, "tx") if mode == "sink" else (0, "rx")
    with Frontend(sock_path, queue_pairs=2, queue_size=QSIZE, ram_size=RAM) as fe:
        fe.setup()
        g = Guest(fe, index)
        try:
            if before:
                before(g)
            # the path the queue runs on: the one asked for (unless a ring part is unmapped: then copy)
            srv.assert_path(metadata if direct is None else ("direct" if direct else "copy"), [index])
            build(g)
            assert g.wait_err() == 1
            lines = broken_lines(errors, index)
            assert len(lines) == 1, errors()
            assert re.match(
                rf"vring {index} broken: {expect.name}: {re.escape(expect.text)} \(value 0x[0-9a-f]+\)$", lines[0]
            ), lines[0]
            # completions made before the bad chain are published, and only those
            assert g.used == good and g.used_ids() == list(range(good))
            assert srv.connection.vrings[index].broken
            # the same device's other queue pair keeps working
            traffic(fe, direction, 1, 1000)
            # and the broken ring stays stopped, kicks or not: no worker serves it any more
            assert worker_gone(srv, index), f"the worker of broken ring {index} still runs"
            g.idx = int(g.ring.avail[1])
            g.post(*g.good_chains())
            assert g.used == good
        finally:
            g.close()
    stats = srv.ended()[-1]
    assert stats[index]["error"] == expect and stats[index]["chains"] == good
    assert stats[index + 2]["packets"] == 1000 and stats[index + 2]["error"] == 0
    assert [e for e in errors() if "broken" not in e] == []  # nothing else went wrong
    fresh_connection_works(srv, sock_path, mode)


# =========================================================================================================
# the cases: build(g) posts GOOD good chains (heads 0..2) and one bad chain (descriptors from 8 up)
def _idx_jump(delta):
    """(build, expected error, good, before): GOOD chains completed, then the avail index moved by ``delta``."""

    def build(g):
        g.ring.avail[1] = (g.idx + delta) & 0xFFFF
        g.kick()

    return build, E.AVAIL_IDX_JUMP, GOOD, _after_good


def _head(head):
    def build(g):
        g.post(*g.good_chains(), head)

    return build


def _chain(*descs, head=8, raw=False):
    """A bad chain: descs are (index, addr or None for a valid buffer, length, flags, next); the ring's
    direction (WRITE on RX) is added to the flags unless ``raw``."""

    def build(g):
        for i, addr, length, flags, nxt in descs:
            g.desc(i, g.ring.buf_gpa(i) if addr is None else addr, length, flags | (0 if raw else g.dir), nxt)
        g.post(*g.good_chains(), head)

    return build


def _after_good(g):
    g.post(*g.good_chains())
    g.wait_used(GOOD)


def _whole_ring_loop(g):
    # every descriptor chained to the next, the last back to the first: a chain longer than the queue
    for i in range(g.size):
        g.desc(i, g.ring.buf_gpa(i), 16, g.dir | NEXT, (i + 1) % g.size)
    g.post(0)


def _indirect(length=None, entries=2, entry=None, flags=INDIRECT, addr=None, fill=None):
    """A bad chain through an indirect table of ``entries`` entries.  ``entry(g, gpa)`` -> (addr, len, flags,
    next) of entry 0 (default: a valid buffer); ``length`` the descriptor's length (default 16 * entries)."""

    def build(g):
        gpa, t = g.table(entries)
        for j in range(entries):
            g.desc(j, g.ring.buf_gpa(16 + j), FRAME_LEN, g.dir, table=t)
        if entry is not None:
            g.desc(0, *entry(g, gpa), table=t)
        if fill is not None:
            fill(g, t)
        g.desc(8, gpa if addr is None else addr(g, gpa), 16 * entries if length is None else length, flags, 9)
        # and one good indirect chain among the good ones: indirect tables do work
        gpa2, t2 = g.table(2)
        g.desc(0, g.ring.buf_gpa(20), 6, g.dir | NEXT, 1, table=t2)
        g.desc(1, g.ring.buf_gpa(21), FRAME_LEN - 6, g.dir, table=t2)
        g.good(0, 1)
        g.desc(2, gpa2, 32, INDIRECT)
        g.post(0, 1, 2, 8)

    return build


def _ram_end(g, back=0):
    return g.ram.gpa(g.ram.size - back)


SINK = ("sink",)
BOTH = ("sink", "source")
CASES = {
    # name: (modes, build, expected error, good completions, before)
    "avail idx + size + 1": (BOTH, *_idx_jump(QSIZE + 1)),
    "avail idx - 1": (SINK, *_idx_jump(-1)),
    "avail idx + 0x8000": (SINK, *_idx_jump(0x8000)),
    "avail head == size": (BOTH, _head(QSIZE), E.HEAD_OUT_OF_RANGE),
    "avail head 0xffff": (SINK, _head(0xFFFF), E.HEAD_OUT_OF_RANGE),
    "next == size": (BOTH, _chain((8, None, 16, NEXT, QSIZE)), E.NEXT_OUT_OF_RANGE),
    "next 0xffff": (SINK, _chain((8, None, 16, NEXT, 0xFFFF)), E.NEXT_OUT_OF_RANGE),
    "descriptor loop to itself": (BOTH, _chain((8, None, 16, NEXT, 8)), E.CHAIN_TOO_LONG),
    "two-descriptor loop": (SINK, _chain((8, None, 16, NEXT, 9), (9, None, 16, NEXT, 8)), E.CHAIN_TOO_LONG),
    "chain longer than the queue": (BOTH, _whole_ring_loop, E.CHAIN_TOO_LONG, GOOD, _after_good),
    "indirect length 0": (BOTH, _indirect(length=0), E.INDIRECT_BAD_SIZE),
    "indirect length 24": (SINK, _indirect(length=24), E.INDIRECT_BAD_SIZE),
    "indirect length 8": (SINK, _indirect(length=8), E.INDIRECT_BAD_SIZE),
    "indirect 1025 entries": (BOTH, _indirect(entries=1025), E.INDIRECT_BAD_SIZE),
    "indirect length 0xffffffff": (SINK, _indirect(length=0xFFFFFFFF), E.INDIRECT_BAD_SIZE),
    "nested indirect": (BOTH, _indirect(entry=lambda g, gpa: (gpa, 32, INDIRECT, 0)), E.INDIRECT_NESTED),
    "INDIRECT with NEXT": (BOTH, _indirect(flags=INDIRECT | NEXT), E.INDIRECT_WITH_NEXT),
    "indirect table below guest memory": (SINK, _indirect(addr=lambda g, gpa: 0), E.INDIRECT_UNMAPPED),
    "indirect table past guest memory": (BOTH, _indirect(addr=lambda g, gpa: _ram_end(g)), E.INDIRECT_UNMAPPED),
    "indirect table straddling the end": (BOTH, _indirect(addr=lambda g, gpa: _ram_end(g, 16)), E.INDIRECT_UNMAPPED),
    "indirect table at 2**62": (SINK, _indirect(addr=lambda g, gpa: ADDR_LIMIT), E.INDIRECT_UNMAPPED),
    "indirect table at 2**64-32": (SINK, _indirect(addr=lambda g, gpa: 2**64 - 32), E.INDIRECT_UNMAPPED),
    "indirect loop": (
        BOTH,
        _indirect(entry=lambda g, gpa: (g.ring.buf_gpa(16), 16, g.dir | NEXT, 0)),
        E.CHAIN_TOO_LONG,
    ),
    "indirect next out of range": (
        BOTH,
        _indirect(entry=lambda g, gpa: (g.ring.buf_gpa(16), 16, g.dir | NEXT, 2)),
        E.NEXT_OUT_OF_RANGE,
    ),
    "zero-length descriptor": (BOTH, _chain((8, None, 0, 0, 0)), E.ZERO_LENGTH),
    "zero-length second descriptor": (SINK, _chain((8, None, 16, NEXT, 9), (9, None, 0, 0, 0)), E.ZERO_LENGTH),
    "zero-length indirect entry": (
        BOTH,
        _indirect(entry=lambda g, gpa: (g.ring.buf_gpa(16), 0, g.dir, 0)),
        E.ZERO_LENGTH,
    ),
    "buffer below guest memory": (BOTH, _chain((8, 0, FRAME_LEN, 0, 0)), E.BAD_ADDRESS),
    "buffer from below into guest memory": (
        SINK,
        lambda g: _chain((8, g.ram.gpa(0) - 16, FRAME_LEN, 0, 0))(g),
        E.BAD_ADDRESS,
    ),
    "buffer past guest memory": (BOTH, lambda g: _chain((8, _ram_end(g), FRAME_LEN, 0, 0))(g), E.BAD_ADDRESS),
    "buffer straddling the end": (BOTH, lambda g: _chain((8, _ram_end(g, 32), FRAME_LEN, 0, 0))(g), E.BAD_ADDRESS),
    "buffer of 4 GiB from the last byte": (
        SINK,
        lambda g: _chain((8, _ram_end(g, 1), 0xFFFFFFFF, 0, 0))(g),
        E.BAD_ADDRESS,
    ),
    "buffer at 2**62": (SINK, _chain((8, ADDR_LIMIT, FRAME_LEN, 0, 0)), E.BAD_ADDRESS),
    "buffer at 2**64-1": (BOTH, _chain((8, 2**64 - 1, 0xFFFFFFFF, 0, 0)), E.BAD_ADDRESS),
    "bad buffer in an indirect table": (
        BOTH,
        _indirect(entry=lambda g, gpa: (_ram_end(g, 8), 64, g.dir, 0)),
        E.BAD_ADDRESS,
    ),
}


def _dir_cases():
    # sink: a device-writable buffer on TX; source: a device-readable one on RX, or readable after writable
    return {
        "writable descriptor on TX": ("sink", _chain((8, None, FRAME_LEN, WRITE, 0), raw=True), E.BAD_DIRECTION),
        "writable after readable on TX": (
            "sink",
            _chain((8, None, 16, NEXT, 9), (9, None, 64, WRITE, 0), raw=True),
            E.BAD_DIRECTION,
        ),
        "writable indirect entry on TX": (
            "sink",
            _indirect(entry=lambda g, gpa: (g.ring.buf_gpa(16), 64, WRITE, 0)),
            E.BAD_DIRECTION,
        ),
        "readable descriptor on RX": ("source", _chain((8, None, 2048, 0, 0), raw=True), E.BAD_DIRECTION),
        "readable after writable on RX": (
            "source",
            _chain((8, None, 16, WRITE | NEXT, 9), (9, None, 2048, 0, 0), raw=True),
            E.BAD_DIRECTION,
        ),
        "readable indirect entry on RX": (
            "source",
            _indirect(entry=lambda g, gpa: (g.ring.buf_gpa(16), 2048, 0, 0)),
            E.BAD_DIRECTION,
        ),
    }


def _params():
    out = []
    for name, (modes, build, expect, *rest) in CASES.items():
        for mode in modes:
            out.append(pytest.param(mode, build, expect, *(rest + [GOOD, None])[:2], id=f"{mode}-{name}"))
    for name, (mode, build, expect) in _dir_cases().items():
        out.append(pytest.param(mode, build, expect, GOOD, None, id=f"{mode}-{name}"))
    return out


@pytest.mark.parametrize("metadata", PATHS)
@pytest.mark.parametrize("mode,build,expect,good,before", _params())
def test_bad_guest_value_breaks_only_its_queue(serve, sock_path, errors, metadata, mode, build, expect, good, before):
    check_isolated_break(serve, sock_path, errors, metadata, mode, build, expect, good, before)


# -- ring addresses outside guest memory ---------------------------------------------------------------------
def _move_ring(part: str, where):
    """SET_VRING_ADDR with one part of the ring moved to ``where(g)`` (a front-end virtual address)."""

    def before(g):
        a = g.ring.addr()
        addrs = {"desc": a.desc, "used": a.used, "avail": a.avail}
        addrs[part] = where(g)
        g.fe.command(R.SET_VRING_ADDR, VRING_ADDR.pack(g.index, 0, addrs["desc"], addrs["used"], addrs["avail"], 0))

    return before


def _uva_end(g, back=0):
    return g.ram.uva(g.ram.size - back)


def _post_one(g):
    g.good(0)
    g.post(0)


def _straddling_desc(g):
    # the table's first 4 descriptors are the last 64 bytes of guest RAM; the rest lies outside
    t = g.ram.buf[g.ram.size - 64 :].view(np.uint64)
    g.good(0, 1, 2, table=t)
    g.post(0, 1, 2, 5)


def _straddling_avail(g):
    # flags and idx are the last 4 bytes of guest RAM, ring[0] lies outside: the guest says 1 chain is there
    g.ram.buf[g.ram.size - 2 :].view(np.uint16)[0] = 1
    g.kick()


RING_CASES = {
    # name: (before = the SET_VRING_ADDR, build, good completions)
    "desc table past guest memory": (_move_ring("desc", _uva_end), _post_one, 0),
    "desc table straddling the end": (_move_ring("desc", lambda g: _uva_end(g, 64)), _straddling_desc, GOOD),
    "desc table below guest memory": (_move_ring("desc", lambda g: g.ram.uva(0) - 4096), _post_one, 0),
    "avail ring past guest memory": (_move_ring("avail", _uva_end), lambda g: g.kick(), 0),
    "avail ring straddling the end": (_move_ring("avail", lambda g: _uva_end(g, 4)), _straddling_avail, 0),
    "used ring past guest memory": (_move_ring("used", _uva_end), _post_one, 0),
    "used ring straddling the end": (_move_ring("used", lambda g: _uva_end(g, 8)), _post_one, 0),
    "desc table at 2**62 - 4096": (_move_ring("desc", lambda g: ADDR_LIMIT - 4096), _post_one, 0),
}


@pytest.mark.parametrize("metadata", PATHS)
@pytest.mark.parametrize("mode", ["sink", "source"])
@pytest.mark.parametrize("case", list(RING_CASES))
def test_ring_outside_guest_memory(serve, sock_path, errors, caplog, metadata, mode, case):
    before, build, good = RING_CASES[case]
    check_isolated_break(serve, sock_path, errors, metadata, mode, build, E.RING_UNMAPPED, good, before, direct=False)
    index = 1 if mode == "sink" else 0
    started = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"queues ({index},) started")]
    assert any("(copy path" in m for m in started)  # the direct path fell back to copy
    fell_back = [r for r in caplog.records if "does not lie in mapped memory; using the copy path" in r.getMessage()]
    assert bool(fell_back) == (metadata == "direct")


# -- positive controls at the limits: these must NOT break anything ----------------------------------------
@pytest.mark.parametrize("metadata", PATHS)
def test_longest_valid_chains_complete(serve, sock_path, errors, metadata):
    srv = serve("sink", metadata)
    with Frontend(sock_path, queue_size=QSIZE, ram_size=RAM) as fe:
        fe.setup()
        srv.assert_path(metadata, [1])
        g = Guest(fe, 1)
        # a chain of every descriptor of the table
        for i in range(QSIZE):
            g.desc(i, g.ring.buf_gpa(i), 16, NEXT if i < QSIZE - 1 else 0, i + 1)
        g.post(0)
        g.wait_used(1)
        # an indirect table of the most entries allowed, the last one ending exactly at the end of guest RAM
        gpa, t = g.table(1024)
        for j in range(1024):
            g.desc(j, g.ring.buf_gpa(j % QSIZE), 16, NEXT, j + 1, table=t)
        g.desc(1023, _ram_end(g, 16), 16, 0, 0, table=t)
        g.desc(0, gpa, 16 * 1024, INDIRECT)
        g.post(0)
        g.wait_used(2)
        # a buffer ending on the last byte of guest RAM
        g.desc(0, _ram_end(g, FRAME_LEN), FRAME_LEN)
        g.post(0)
        g.wait_used(3)
        assert not select.select([g.err_fd], [], [], 0)[0]
        g.close()
        del t
    stats = srv.ended()[-1]
    assert stats[1]["packets"] == 3 and stats[1]["bytes"] == 16 * QSIZE - 12 + 16 * 1024 - 12 + 64
    assert stats[1]["error"] == 0 and not errors()


# -- a guest that rewrites what it made available ------------------------------------------------------------
TABLE_ENTRIES = 8


@pytest.mark.parametrize("metadata", PATHS)
@pytest.mark.parametrize("mode", ["sink", "source"])
@pytest.mark.parametrize("race", ["plausible", "hostile"])
def test_descriptors_changed_after_being_made_available(serve, sock_path, errors, metadata, mode, race):
    """A racing guest: while the back-end walks chains, another thread keeps rewriting descriptors and
    indirect tables.  ``plausible`` writes only values that are valid on their own (other buffers, lengths,
    NEXT links forward, indirect tables): the queue must keep completing chains and never break.  ``hostile``
    also writes out-of-range values: the queue must end in one clean QueueError.  Either way no access may
    leave guest memory (a fault would kill this process) and every completion names a valid head."""
    srv = serve(mode, metadata, queue_pairs=2)
    index = 1 if mode == "sink" else 0
    rng = np.random.default_rng(1234)
    with Frontend(sock_path, queue_pairs=2, queue_size=QSIZE, ram_size=RAM) as fe:
        fe.setup()
        srv.assert_path(metadata)
        g = Guest(fe, index)
        tables = [g.table(TABLE_ENTRIES) for _ in range(4)]
        # every 8th descriptor is an indirect one, for good: the guest writes a descriptor's two words one
        # after the other, so a descriptor changing kind would be torn (a buffer at a table's address, or a
        # buffer read as a table) -- still safe for the back-end, but no longer a "plausible" guest
        indirect = {i: tables[(i // 8) % len(tables)][0] for i in range(7, QSIZE, 8)}
        g.good(*range(QSIZE))
        for i, gpa in indirect.items():
            g.desc(i, gpa, 16 * TABLE_ENTRIES, INDIRECT)
        for _gpa, t in tables:
            g.good(*range(TABLE_ENTRIES), table=t)
        stop = threading.Event()
        mutations = [0]
        failures: list[BaseException] = []

        def pick(r: np.random.Generator, values: list[int]) -> int:
            return values[int(r.integers(0, len(values)))]

        def plausible(r: np.random.Generator, i: int, n: int, in_table: bool) -> tuple[int, int, int, int]:
            """A valid descriptor i of a table of n: any buffer, any length, maybe NEXT to i+1 (the indirect
            ones of the main table stay as they are)."""
            if not in_table and i in indirect:
                return indirect[i], 16 * TABLE_ENTRIES, INDIRECT, 0
            addr = g.ring.buf_gpa(int(r.integers(0, QSIZE)))
            length = int(r.integers(1, 2049))
            if i + 1 < n and r.integers(0, 4) == 0:
                return addr, length, g.dir | NEXT, i + 1
            return addr, max(length, FRAME_LEN), g.dir, 0

        def hostile(r: np.random.Generator, i: int, n: int, in_table: bool) -> tuple[int, int, int, int]:
            addr, length, flags, nxt = plausible(r, i, n, in_table)
            kind = int(r.integers(0, 12))
            if kind == 0:
                addr = pick(r, [0, _ram_end(g, 8), 2**64 - 1, ADDR_LIMIT])
            elif kind == 1:
                length = pick(r, [0, 0xFFFFFFFF, 24, 16 * 1025])
            elif kind == 2:
                flags ^= pick(r, [WRITE, INDIRECT, NEXT])
            elif kind == 3:
                nxt = int(r.integers(0, 0x10000))
            return addr, length, flags, nxt

        word = plausible if race == "plausible" else hostile

        def mutate() -> None:
            r = np.random.default_rng(99)
            try:
                while not stop.is_set():
                    for _ in range(64):
                        if r.integers(0, 2):
                            i = int(r.integers(0, QSIZE))
                            g.desc(i, *word(r, i, QSIZE, False))
                        else:
                            _gpa, t = tables[int(r.integers(0, len(tables)))]
                            j = int(r.integers(0, TABLE_ENTRIES))
                            g.desc(j, *word(r, j, TABLE_ENTRIES, True), table=t)
                    mutations[0] += 64
                    time.sleep(0)
            except BaseException as e:  # a bug in this test: fail it below
                failures.append(e)

        mutator = threading.Thread(target=mutate, daemon=True)
        mutator.start()
        broken = False
        posted = 0
        deadline = time.monotonic() + 2.0
        try:
            while time.monotonic() < deadline and posted < 3000:
                if select.select([g.err_fd], [], [], 0)[0]:
                    broken = True
                    break
                if QSIZE - (posted - g.used) >= 16:
                    g.post(*(int(h) for h in rng.integers(0, QSIZE, 16)))
                    posted += 16
                time.sleep(0.0002)
        finally:
            stop.set()
            mutator.join()
        assert not failures and mutations[0] > 0, failures
        if not broken and race == "hostile":  # (a break is logged, then signalled)
            broken = bool(select.select([g.err_fd], [], [], TIMEOUT)[0])
        assert srv.thread.is_alive()
        ids = g.used_ids()
        assert len(ids) <= posted and all(0 <= i < QSIZE for i in ids)
        lines = broken_lines(errors, index)
        names = "|".join(e.name for e in E if e is not E.NONE)
        if race == "plausible":
            g.wait_used(posted & 0xFFFF)  # every chain completed, so none can break the ring any more
            assert not broken and not select.select([g.err_fd], [], [], 0)[0] and not lines, lines
            assert not srv.connection.vrings[index].broken
            assert posted >= QSIZE
        else:
            assert broken, "a hostile guest went unnoticed"
            assert len(lines) == 1 and re.match(rf"vring {index} broken: ({names}): ", lines[0]), lines
            assert os.eventfd_read(g.err_fd) == 1
        # the device's other pair still works
        traffic(fe, "tx" if mode == "sink" else "rx", 1, 1000)
        g.close()
        del tables[:]  # no views of guest RAM left when it closes
    stats = srv.ended()[-1]
    assert stats[index + 2]["packets"] == 1000
    assert [e for e in errors() if "broken" not in e] == []
    fresh_connection_works(srv, sock_path, mode)


# -- resources -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metadata", PATHS)
def test_connect_traffic_disconnect_cycles_leak_nothing(serve, sock_path, errors, metadata):
    """200 connect/set up/traffic/disconnect cycles, every 10th also breaking a queue and sending a bad
    memory table with an fd: open fds, mappings and threads stay flat."""
    srv = serve("sink", metadata)
    samples = {}
    for cycle in range(1, 201):
        fe = Frontend(sock_path, queue_size=QSIZE, ram_size=4 << 20)
        fe.setup()
        srv.assert_path(metadata, [1])
        fe.run("tx", count=2 * QSIZE, timeout=TIMEOUT)
        if cycle % 10 == 5:
            g = Guest(fe, 1)
            g.post(QSIZE)  # head out of range
            g.wait_err()
            g.close()
            r, w = os.pipe()
            payload = MEM_TABLE_HDR.pack(1, 0) + fe.ram.region().pack()
            with pytest.raises(FrontendError):
                fe.command(R.SET_MEM_TABLE, payload, [r])
            os.close(r)
            os.close(w)
        fe.close(stop_rings=cycle % 2 == 0)  # half the time with GET_VRING_BASE, half just hanging up
        assert srv.ended()[-1][1]["packets"] == 2 * QSIZE
        if cycle in (10, 200):
            samples[cycle] = (open_fds(), mapping_count(), threading.active_count())
    (fds10, maps10, threads10), (fds200, maps200, threads200) = samples[10], samples[200]
    assert len(fds200) <= len(fds10), sorted(fds200 - fds10)
    assert maps200 <= maps10 + 8, (maps10, maps200)
    assert threads200 <= threads10
    assert len([e for e in errors() if "broken" in e]) == 20

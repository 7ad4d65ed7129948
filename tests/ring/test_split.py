"""Split ring: the copy path is the reference (invariant 5), bounded work on any ring state, notification
suppression, publish-after-fill, and descriptor chain walking (valid chains and every error class)."""

from __future__ import annotations

import faulthandler
import os
import struct
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyvhost.access import Metadata, bind
from pyvhost.devices.net import make_frame, rx_source, tx_sink
from pyvhost.errors import QueueError
from pyvhost.frontend.ram import GuestRam
from pyvhost.frontend.split import DriverRing
from pyvhost.memory import SPACE_GPA, GuestMemory
from pyvhost.protocol import ADDR_LIMIT, MemRegion, VringAddr
from pyvhost.ring.chain import ANY, MAX_INDIRECT, READ_ONLY, WRITE_ONLY, new_sg, walk_chain
from pyvhost.ring.split import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    avail_bytes,
    desc_bytes,
    need_event,
    used_bytes,
)
from pyvhost.ring.state import (
    Q_BATCH,
    Q_BYTES,
    Q_CALLFD,
    Q_CALLS,
    Q_CHAINS,
    Q_DESC,
    Q_DESC_AT,
    Q_DIRECT,
    Q_DROPS,
    Q_ERROR,
    Q_ERROR_VALUE,
    Q_EVENT_IDX,
    Q_HDR_LEN,
    Q_LAST_AVAIL,
    Q_LIMIT,
    Q_MRG,
    Q_NOTIFY_ON,
    Q_PACKETS,
    Q_SIGNALLED,
    Q_SIGNALLED_VALID,
    Q_USED_AT,
    Q_USED_IDX,
    new_queue_state,
)

KiB = 1 << 10
NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
IDLE, MORE, BROKEN = 0, 1, -1
PATHS = [Metadata.COPY, Metadata.DIRECT]

# Guest RAM: one 256 KiB memfd of which the back-end maps two 64 KiB regions, adjacent in GPA and UVA
# (a buffer may straddle the seam and is then split in two segments); everything from 128 KiB is unmapped.
RAM_SIZE = 256 * KiB
REGION = 64 * KiB
MAPPED = 2 * REGION
DESC_OFF, AVAIL_OFF, USED_OFF = 0, 1 * KiB, 2 * KiB
IND_OFF, IND_TABLES, IND_ENTRIES = 4 * KiB, 4, 64  # indirect tables at 4 KiB + t KiB
DATA_OFF = 8 * KiB  # buffers live in [DATA_OFF, MAPPED)


class Env:
    def __init__(self) -> None:
        self.ram = GuestRam(RAM_SIZE)
        self.G = self.ram.gpa_base
        self.mem = GuestMemory(arena_size=1 << 30)
        regions = [
            MemRegion(self.ram.gpa(0), REGION, self.ram.uva(0), 0),
            MemRegion(self.ram.gpa(REGION), REGION, self.ram.uva(REGION), REGION),
        ]
        self.mem.set_table(regions, [self.ram.fd, self.ram.fd])
        self.callfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def gpa(self, off: int) -> int:
        return self.ram.gpa(off)

    def uva(self, off: int) -> int:
        return self.ram.uva(off)

    def take_calls(self) -> int:
        try:
            return os.eventfd_read(self.callfd)
        except BlockingIOError:
            return 0

    def bind(self, addr: VringAddr, size: int, mode: Metadata, q: np.ndarray):
        return bind(self.mem, addr, size, mode, q)

    def close(self) -> None:
        self.mem.close()
        os.close(self.callfd)
        self.ram.close()


@pytest.fixture(scope="module")
def env():
    e = Env()
    yield e
    e.close()


@pytest.fixture(autouse=True)
def watchdog():
    """A kernel that never returns would hang the run: dump the stacks and exit instead."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def run_tx(env: Env, q, views, budget: int = 1, spins: int = 1) -> int:
    sg = new_sg(int(q[0]))
    return int(tx_sink(q, *views.args(), env.mem.arena.view, env.mem.table, sg, budget, spins))


def run_rx(env: Env, q, views, frame, budget: int = 1, spins: int = 1) -> int:
    sgs = np.stack([new_sg(int(q[0]))] * 2)
    return int(
        rx_source(
            q, *views.args(), env.mem.arena.view, env.mem.table, sgs, np.zeros(16, np.uint8), frame, budget, spins
        )
    )


# =========================================================================================================
# Random ring states
u16 = st.integers(0, 0xFFFF)


@dataclass
class State:
    direction: str  # "tx" (tx_sink, READ_ONLY) or "rx" (rx_source, WRITE_ONLY)
    size: int
    placement: str
    offs: tuple[int, int, int]  # desc, avail, used offsets in RAM
    desc: list[list[int]]  # [addr, len, flags, next]
    tables: list[list[list[int]]]  # indirect tables, entries as desc
    avail_ring: list[int]
    avail_flags: int
    avail_idx: int
    used_event: int
    used_flags: int
    used_idx: int
    avail_event: int
    last_avail: int
    nchains: int  # chains the (unmutated) driver made available
    q: dict[int, int] = field(default_factory=dict)
    budget: int = 1
    frame_size: int = 64

    @property
    def delta(self) -> int:
        return (self.avail_idx - self.last_avail) & 0xFFFF


PLACEMENTS = {
    # name: (desc, avail, used) offsets; size is known only later, so these are functions of it
    "normal": lambda n: (DESC_OFF, AVAIL_OFF, USED_OFF),
    "desc_at_end": lambda n: (MAPPED - desc_bytes(n) // 2, AVAIL_OFF, USED_OFF),  # half the table unmapped
    "desc_on_seam": lambda n: (REGION - desc_bytes(n) // 2, AVAIL_OFF, USED_OFF),  # mapped, two regions
    "avail_unmapped": lambda n: (DESC_OFF, 160 * KiB, USED_OFF),
    "avail_on_seam": lambda n: (DESC_OFF, REGION - 4, USED_OFF),  # idx in A, ring in B
    "used_at_end": lambda n: (DESC_OFF, AVAIL_OFF, MAPPED - 8),  # idx mapped, entries not
}


def any_addr(G: int):
    return st.one_of(
        st.integers(G + DATA_OFF, G + MAPPED - 1),
        st.integers(G + REGION - 600, G + REGION + 600),
        st.integers(G + MAPPED - 600, G + MAPPED + (1 << 20)),
        st.integers(0, G - 1),
        st.integers(ADDR_LIMIT - 8, (1 << 64) - 1),
        st.integers(0, IND_TABLES - 1).map(lambda t: G + IND_OFF + t * KiB),
    )


any_len = st.one_of(
    st.integers(0, 700),
    st.sampled_from([0, 1, 15, 16, 17, 32, 1024, 16 * MAX_INDIRECT, 16 * (MAX_INDIRECT + 1), 0xFFFF_FFFF]),
)
any_flags = st.one_of(st.integers(0, 7), u16)


def any_next(size: int):
    return st.one_of(st.integers(0, size - 1), st.integers(0, size - 1), u16)


@st.composite
def buffer_desc(draw, G: int, flags: int, rx: bool):
    """A valid buffer: inside the data area, sometimes straddling the seam between the two regions."""
    length = draw(st.integers(1, 400 if rx else 300))
    if length > 1 and draw(st.integers(0, 4)) == 0:
        addr = G + REGION - draw(st.integers(1, length - 1))
    else:
        addr = draw(st.integers(G + DATA_OFF, G + MAPPED - length))
    return [addr, length, flags, 0]


@st.composite
def ring_states(draw, G: int, direction: str) -> State:
    rx = direction == "rx"
    size = draw(st.sampled_from([4, 8, 16, 32, 64]))
    placement = draw(st.sampled_from(["normal"] * 25 + sorted(set(PLACEMENTS) - {"normal"})))
    mask = size - 1
    # every descriptor starts as garbage (reachable only through a mutated next/head)
    desc = [[draw(any_addr(G)), draw(any_len), draw(any_flags), draw(any_next(size))] for _ in range(size)]
    tables = [
        [[draw(any_addr(G)), draw(any_len), draw(any_flags), draw(any_next(IND_ENTRIES))] for _ in range(8)]
        for _ in range(IND_TABLES)
    ]  # the rest of each table stays zero
    # then a driver builds well-formed chains over a permutation of the descriptors
    free = draw(st.permutations(range(size)))
    heads = []
    in_chains: list[int] = []  # descriptors the chains use
    in_tables: list[tuple[int, int]] = []  # (table, entry) the chains use
    dirflag = WRITE if rx else 0
    ntables = 0
    target = draw(st.integers(0, size))
    while free and len(heads) < target:
        if ntables < IND_TABLES and draw(st.integers(0, 3)) == 0:
            k = draw(st.integers(1, 6))
            t = ntables
            ntables += 1
            for j in range(k):
                e = draw(buffer_desc(G, dirflag, rx))
                e[2] |= NEXT if j < k - 1 else 0
                e[3] = j + 1 if j < k - 1 else draw(any_next(IND_ENTRIES))
                tables[t][j] = e
                in_tables.append((t, j))
            h = free.pop()
            desc[h] = [G + IND_OFF + t * KiB, 16 * k, INDIRECT, draw(any_next(size))]
            heads.append(h)
            in_chains.append(h)
            continue
        k = draw(st.integers(1, min(3, len(free))))
        chain = [free.pop() for _ in range(k)]
        in_chains.extend(chain)
        for j, i in enumerate(chain):
            d = draw(buffer_desc(G, dirflag, rx))
            if j < k - 1:
                d[2] |= NEXT
                d[3] = chain[j + 1]
            else:
                d[3] = draw(any_next(size))  # ignored without NEXT
            desc[i] = d
        heads.append(chain[0])
    last_avail = draw(u16)
    avail_ring = [draw(st.one_of(st.integers(0, mask), u16)) for _ in range(size)]
    for c, h in enumerate(heads):
        avail_ring[(last_avail + c) & mask] = h
    used_idx = draw(u16)
    state = State(
        direction=direction,
        size=size,
        placement=placement,
        offs=PLACEMENTS[placement](size),
        desc=desc,
        tables=tables,
        avail_ring=avail_ring,
        avail_flags=draw(st.sampled_from([0, 0, 1, 0xFFFF])),
        avail_idx=(last_avail + len(heads)) & 0xFFFF,
        used_event=(used_idx + draw(st.integers(-4, 2 * size))) & 0xFFFF if draw(st.booleans()) else draw(u16),
        used_flags=draw(st.sampled_from([0, 1])),
        used_idx=used_idx,
        avail_event=draw(u16),
        last_avail=last_avail,
        nchains=len(heads),
        budget=draw(st.integers(1, 4)),
        frame_size=draw(st.integers(60, 600)),
    )
    state.q = {
        Q_LAST_AVAIL: last_avail,
        Q_USED_IDX: used_idx,
        Q_HDR_LEN: draw(st.sampled_from([12, 12, 10, 0])),
        Q_BATCH: draw(st.one_of(st.integers(1, 8), st.just(256))),
        Q_EVENT_IDX: int(draw(st.booleans())),
        Q_NOTIFY_ON: draw(st.sampled_from([-1, 0, 1])),  # -1: as the back-end starts a worker
        Q_SIGNALLED: draw(u16),
        Q_SIGNALLED_VALID: int(draw(st.booleans())),
        Q_MRG: int(draw(st.booleans())) if rx else 0,
        Q_LIMIT: draw(st.one_of(st.just(-1), st.integers(0, 6))) if rx else -1,
    }
    # mutations: what a buggy or hostile driver does to the well-formed state
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["desc", "desc", "table", "head", "delta", "indlen", "loop", "nest", "zero"]))
        # mostly hit what the chains use (else the change is usually unreachable)
        if kind == "desc":
            i = draw(st.sampled_from(in_chains) if in_chains and draw(st.integers(0, 3)) else st.integers(0, mask))
            f = draw(st.integers(0, 3))
            desc[i][f] = draw([any_addr(G), any_len, any_flags, any_next(size)][f])
        elif kind == "table":
            t, j = draw(
                st.sampled_from(in_tables)
                if in_tables and draw(st.integers(0, 3))
                else st.tuples(st.integers(0, IND_TABLES - 1), st.integers(0, 7))
            )
            f = draw(st.integers(0, 3))
            tables[t][j][f] = draw([any_addr(G), any_len, any_flags, any_next(IND_ENTRIES)][f])
        elif kind == "head":
            avail_ring[draw(st.integers(0, mask))] = draw(st.one_of(st.integers(0, mask), u16))
        elif kind == "delta":
            state.avail_idx = (
                last_avail
                + draw(
                    st.one_of(st.integers(0, size), st.integers(size + 1, 0xFFFF), st.just(size + 1), st.just(0xFFFF))
                )
            ) & 0xFFFF
        elif kind == "indlen":
            i = draw(st.integers(0, mask))
            desc[i][1] = draw(st.sampled_from([0, 8, 15, 16 * IND_ENTRIES, 16 * MAX_INDIRECT, 16 * (MAX_INDIRECT + 1)]))
        elif kind == "loop":  # a descriptor (or table entry) continuing to one of its chain's or itself
            if in_tables and draw(st.booleans()):
                t, j = draw(st.sampled_from(in_tables))
                tables[t][j][2] |= NEXT
                tables[t][j][3] = draw(st.integers(0, j))
            elif in_chains:
                i = draw(st.sampled_from(in_chains))
                desc[i][2] |= NEXT
                desc[i][3] = draw(st.sampled_from(in_chains))
        elif kind == "nest" and in_tables:
            t, j = draw(st.sampled_from(in_tables))
            tables[t][j][2] |= INDIRECT
        elif kind == "zero":
            if in_tables and draw(st.booleans()):
                t, j = draw(st.sampled_from(in_tables))
                tables[t][j][1] = 0
            elif in_chains:
                desc[draw(st.sampled_from(in_chains))][1] = 0
    return state


def lay_out(env: Env, s: State) -> None:
    """Write the state into guest RAM (everything else zero)."""
    img = bytearray(RAM_SIZE)
    for t, table in enumerate(s.tables):
        for j, (a, n, f, x) in enumerate(table):
            struct.pack_into("<QIHH", img, IND_OFF + t * KiB + 16 * j, a, n, f, x)
    d_off, a_off, u_off = s.offs
    for i, (a, n, f, x) in enumerate(s.desc):
        struct.pack_into("<QIHH", img, d_off + 16 * i, a, n, f, x)
    struct.pack_into(f"<HH{s.size}HH", img, a_off, s.avail_flags, s.avail_idx, *s.avail_ring, s.used_event)
    struct.pack_into("<HH", img, u_off, s.used_flags, s.used_idx)
    img[u_off + 4 : u_off + 4 + 8 * s.size] = b"\xee" * (8 * s.size)  # garbage the device must overwrite
    struct.pack_into("<H", img, u_off + 4 + 8 * s.size, s.avail_event)
    env.ram.buf[:] = np.frombuffer(bytes(img), np.uint8)


def ring_addr(env: Env, s: State) -> VringAddr:
    d, a, u = s.offs
    return VringAddr(0, 0, env.uva(d), env.uva(u), env.uva(a), 0)


def run_state(env: Env, s: State, mode: Metadata, frame) -> tuple[int, np.ndarray, int]:
    q = new_queue_state(s.size)
    for k, v in s.q.items():
        q[k] = v
    q[Q_CALLFD] = env.callfd
    views = env.bind(ring_addr(env, s), s.size, mode, q)
    env.take_calls()
    if s.direction == "tx":
        ret = run_tx(env, q, views, s.budget)
    else:
        ret = run_rx(env, q, views, frame, s.budget)
    return ret, q, env.take_calls()


def check_copy_equals_direct(env: Env, s: State) -> None:
    lay_out(env, s)
    snapshot = env.ram.buf.copy()
    frame = make_frame(s.frame_size, seq=s.size)
    ret_c, q_c, calls_c = run_state(env, s, Metadata.COPY, frame)
    ram_c = env.ram.buf.copy()
    env.ram.buf[:] = snapshot
    ret_d, q_d, calls_d = run_state(env, s, Metadata.DIRECT, frame)
    ram_d = env.ram.buf.copy()

    # only a ring whose parts each lie whole in one region is direct; the others fall back to copy
    assert q_d[Q_DIRECT] == (1 if s.placement == "normal" else 0) and q_c[Q_DIRECT] == 0
    event(f"{s.direction} {QueueError(int(q_c[Q_ERROR])).name} direct={int(q_d[Q_DIRECT])}")

    # --- invariant 5: identical results -----------------------------------------------------------------
    assert ret_c == ret_d
    keep = np.ones(len(q_c), bool)
    keep[[Q_DIRECT, Q_DESC_AT, Q_USED_AT]] = False  # how the ring is reached, not what it did
    diff = [i for i in np.flatnonzero(keep) if q_c[i] != q_d[i]]
    assert not diff, f"queue state differs at fields {diff}: copy {q_c[diff]} direct {q_d[diff]}"
    if not np.array_equal(ram_c, ram_d):
        where = np.flatnonzero(ram_c != ram_d)
        raise AssertionError(f"guest memory differs at {len(where)} bytes from offset {where[0]:#x}")
    assert calls_c == calls_d == q_c[Q_CALLS]

    # --- bounded work -------------------------------------------------------------------------------------
    q = q_c
    assert ret_c in (IDLE, MORE, BROKEN)
    advanced = (int(q[Q_USED_IDX]) - s.used_idx) & 0xFFFF
    taken = (int(q[Q_LAST_AVAIL]) - s.last_avail) & 0xFFFF
    available = s.delta if s.delta <= s.size else 0
    assert advanced == taken == q[Q_CHAINS] <= available
    if s.delta > s.size and s.placement != "avail_unmapped":
        assert q[Q_ERROR] == QueueError.AVAIL_IDX_JUMP and ret_c == BROKEN
    if ret_c == BROKEN:
        assert q[Q_ERROR] != QueueError.NONE
    else:
        assert q[Q_ERROR] == QueueError.NONE
    assert q[Q_PACKETS] + q[Q_DROPS] <= q[Q_CHAINS]
    if s.direction == "tx":
        assert q[Q_PACKETS] + q[Q_DROPS] == q[Q_CHAINS]
    if s.placement == "normal":
        # publish after fill: the ring's index is the one we published, and every entry below it is filled
        used = ram_c[USED_OFF : USED_OFF + used_bytes(s.size)]
        assert int(used[2:4].view(np.uint16)[0]) == q[Q_USED_IDX]
        u32 = used[4 : 4 + 8 * s.size].view(np.uint32)
        avail = ram_c[AVAIL_OFF : AVAIL_OFF + avail_bytes(s.size)].view(np.uint16)
        for k in range(advanced):
            slot = (s.used_idx + k) & (s.size - 1)
            assert u32[2 * slot] == avail[2 + ((s.last_avail + k) & (s.size - 1))]
            if s.direction == "tx":
                assert u32[2 * slot + 1] == 0
            else:
                assert u32[2 * slot + 1] <= q[Q_HDR_LEN] + s.frame_size
        # tx writes an entry only for a chain it completes; rx may leave provisional entries past the index
        # (a frame that needed more chains than were available), which the driver never reads
        for k in range(s.size - advanced if s.direction == "tx" else 0):
            slot = (s.used_idx + advanced + k) & (s.size - 1)
            assert u32[2 * slot] == 0xEEEEEEEE and u32[2 * slot + 1] == 0xEEEEEEEE


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.large_base_example],
)
@given(data=st.data())
def test_tx_copy_is_reference(env, data):
    check_copy_equals_direct(env, data.draw(ring_states(env.G, "tx"), label="state"))


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.large_base_example],
)
@given(data=st.data())
def test_rx_copy_is_reference(env, data):
    check_copy_equals_direct(env, data.draw(ring_states(env.G, "rx"), label="state"))


# =========================================================================================================
# Notification suppression
def test_need_event_is_the_spec_formula():
    @given(u16, u16, u16)
    @settings(max_examples=500, deadline=None)
    def check(event_idx, new, old):
        spec = ((new - event_idx - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        crossed = any(((old + i) & 0xFFFF) == event_idx for i in range((new - old) & 0xFFFF))
        assert bool(need_event(event_idx, new, old)) == spec == crossed

    check()
    for e, n, o, want in [
        (0, 1, 0, True),
        (0, 0, 0, False),
        (1, 1, 0, False),
        (0xFFFF, 0, 0xFFFF, True),
        (0xFFFF, 1, 0xFFFE, True),
        (5, 5, 5, False),
        (4, 6, 4, True),
        (3, 8, 6, False),
    ]:
        assert bool(need_event(e, n, o)) == want


class Driver:
    """A well-behaved driver over a DriverRing laid out in the module's guest RAM."""

    def __init__(self, env: Env, size: int = 8, event_idx: bool = False) -> None:
        env.ram.buf[:] = 0
        self.env = env
        self.ring = DriverRing(
            0,
            size,
            DESC_OFF,
            AVAIL_OFF,
            USED_OFF,
            DATA_OFF,
            env.ram,
            os.eventfd(0, os.EFD_CLOEXEC),
            os.eventfd(0, os.EFD_CLOEXEC),
        )
        self.size = size
        self.avail_idx = 0
        self.event_idx = event_idx

    def post(self, n: int, write: bool = False, length: int = 100) -> list[int]:
        heads = []
        for _ in range(n):
            i = self.avail_idx & (self.size - 1)
            self.ring.desc[2 * i] = self.env.gpa(DATA_OFF + i * 2048)
            self.ring.desc[2 * i + 1] = length | ((WRITE if write else 0) << 32)
            self.ring.avail[2 + i] = i
            heads.append(i)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ring.avail[1] = self.avail_idx
        return heads

    def bind(self, mode: Metadata):
        q = new_queue_state(self.size)
        q[Q_CALLFD] = self.env.callfd
        q[Q_EVENT_IDX] = int(self.event_idx)
        q[Q_HDR_LEN] = 12
        self.env.take_calls()
        return q, self.env.bind(self.ring.addr(), self.size, mode, q)

    def close(self) -> None:
        self.ring.close()


@pytest.fixture
def driver(env):
    made = []

    def make(**kw) -> Driver:
        d = Driver(env, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.mark.parametrize("mode", PATHS)
def test_event_idx_suppresses_calls(env, driver, mode):
    drv = driver(event_idx=True)
    q, views = drv.bind(mode)
    ring = drv.ring
    ue = 2 + drv.size  # avail ring word of used_event

    def step(n: int, event_idx: int) -> int:
        ring.avail[ue] = event_idx
        drv.post(n)
        assert run_tx(env, q, views) == MORE
        return env.take_calls()

    assert step(2, 1000) == 1  # the first publish always signals (nothing signalled yet)
    assert q[Q_SIGNALLED_VALID] == 1 and q[Q_SIGNALLED] == 2
    assert step(2, 1000) == 0  # used 2 -> 4 does not cross entry 1000
    assert step(2, 4) == 1  # used 4 -> 6 crosses entry 4
    assert step(2, 3) == 0  # 6 -> 8: entry 3 is behind
    assert step(1, 8) == 1  # 8 -> 9 crosses entry 8
    assert step(3, 0xFFFF) == 0
    assert q[Q_CALLS] == 3 and q[Q_ERROR] == 0
    # going idle with EVENT_IDX asks for the next kick through avail_event, not the flags
    assert run_tx(env, q, views, budget=2) == IDLE
    assert ring.used16[2 + 4 * drv.size] == q[Q_LAST_AVAIL] == 12
    assert q[Q_NOTIFY_ON] == 1


@pytest.mark.parametrize("mode", PATHS)
def test_no_interrupt_flag_without_event_idx(env, driver, mode):
    drv = driver(event_idx=False)
    q, views = drv.bind(mode)
    ring = drv.ring
    ring.avail[0] = VRING_AVAIL_F_NO_INTERRUPT
    ring.avail[2 + drv.size] = 1  # used_event is ignored without EVENT_IDX
    drv.post(3)
    assert run_tx(env, q, views) == MORE
    assert env.take_calls() == 0 and q[Q_CALLS] == 0 and q[Q_USED_IDX] == 3
    assert ring.used16[0] == VRING_USED_F_NO_NOTIFY  # kicks suppressed while the device polls
    ring.avail[0] = 0
    drv.post(2)
    assert run_tx(env, q, views) == MORE
    assert env.take_calls() == 1 and q[Q_CALLS] == 1
    drv.post(1)
    assert run_tx(env, q, views) == MORE
    assert env.take_calls() == 1 and q[Q_CALLS] == 2
    # idle: kicks are asked for again through the flags
    assert run_tx(env, q, views, budget=2) == IDLE
    assert ring.used16[0] == 0 and q[Q_NOTIFY_ON] == 1
    assert env.take_calls() == 0  # nothing published, nothing signalled


@pytest.mark.parametrize("mode", PATHS)
@pytest.mark.parametrize("direction", ["tx", "rx"])
def test_used_entries_filled_below_used_idx(env, driver, mode, direction):
    drv = driver(size=16)
    ring = drv.ring
    ring.used32[1:] = 0xFFFFFFFF
    ring.used16[1] = 0
    # start near the 16-bit wrap, so the entries wrap around the ring and the index wraps too
    q, views = drv.bind(mode)
    drv.avail_idx = 0xFFF8
    q[Q_LAST_AVAIL] = q[Q_USED_IDX] = 0xFFF8
    ring.used16[1] = 0xFFF8
    heads = drv.post(11, write=direction == "rx", length=200)
    q[Q_BATCH] = 4  # three passes: 4 + 4 + 3
    frame = make_frame(100)
    ret = run_tx(env, q, views, budget=3) if direction == "tx" else run_rx(env, q, views, frame, budget=3)
    assert ret == MORE and q[Q_ERROR] == 0
    assert q[Q_USED_IDX] == ring.used16[1] == (0xFFF8 + 11) & 0xFFFF
    for k, h in enumerate(heads):
        slot = (0xFFF8 + k) & 15
        assert ring.used32[1 + 2 * slot] == h
        assert ring.used32[2 + 2 * slot] == (0 if direction == "tx" else 12 + 100)
    for k in range(11, 16):
        slot = (0xFFF8 + k) & 15
        assert ring.used32[1 + 2 * slot] == ring.used32[2 + 2 * slot] == 0xFFFFFFFF
    if direction == "rx":
        for h in heads:
            got = env.ram.buf[DATA_OFF + h * 2048 : DATA_OFF + h * 2048 + 112]
            assert got[10] == 1 and got[11] == 0  # num_buffers
            assert np.array_equal(got[12:], frame)
    assert q[Q_PACKETS] == 11 and q[Q_CHAINS] == 11


# =========================================================================================================
# walk_chain
SIZE = 8


class Chains:
    """Hand-built descriptor table (size 8) and indirect tables in the module's guest RAM."""

    def __init__(self, env: Env, desc_off: int = DESC_OFF) -> None:
        env.ram.buf[:] = 0
        self.env = env
        self.desc_off = desc_off

    def set(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        struct.pack_into("<QIHH", self.env.ram.mm, self.desc_off + 16 * i, addr, length, flags, nxt)

    def table(self, t: int, entries: list[tuple]) -> tuple[int, int]:
        """Write an indirect table; returns (gpa, byte length)."""
        off = IND_OFF + t * KiB if len(entries) <= IND_ENTRIES else 16 * KiB
        for j, e in enumerate(entries):
            a, n, f, x = (tuple(e) + (0, 0))[:4]
            struct.pack_into("<QIHH", self.env.ram.mm, off + 16 * j, a, n, f, x)
        return self.env.gpa(off), 16 * len(entries)

    def walk(self, mode: Metadata, head: int, want: int = ANY, q=None):
        env = self.env
        if q is None:
            q = new_queue_state(SIZE)
        views = env.bind(
            VringAddr(0, 0, env.uva(self.desc_off), env.uva(USED_OFF), env.uva(AVAIL_OFF), 0), SIZE, mode, q
        )
        sg = new_sg(SIZE)
        nread, nseg, rb, wb = walk_chain(q, views.desc, env.mem.arena.view, env.mem.table, head, sg, want)
        return (int(nread), int(nseg), int(rb), int(wb)), [tuple(r) for r in sg[: max(nseg, 0)]], q


def seg(env: Env, gpa: int, length: int) -> tuple[int, int]:
    off = env.mem.translate(SPACE_GPA, gpa, length)
    assert off is not None
    return off, length


@pytest.fixture
def chains(env):
    return Chains(env)


@pytest.mark.parametrize("mode", PATHS)
def test_walk_single(env, chains, mode):
    g = env.gpa(DATA_OFF)
    chains.set(3, g, 100)
    res, sg, q = chains.walk(mode, 3, READ_ONLY)
    assert res == (1, 1, 100, 0) and sg == [seg(env, g, 100)] and q[Q_ERROR] == 0


@pytest.mark.parametrize("mode", PATHS)
def test_walk_chained_mixed(env, chains, mode):
    g = env.gpa(DATA_OFF)
    chains.set(0, g, 10, NEXT, 5)
    chains.set(5, g + 100, 20, NEXT, 2)
    chains.set(2, g + 200, 30, WRITE | NEXT, 7)
    chains.set(7, g + 300, 40, WRITE)
    res, sg, q = chains.walk(mode, 0, ANY)
    assert res == (2, 4, 30, 70) and q[Q_ERROR] == 0
    assert sg == [seg(env, g, 10), seg(env, g + 100, 20), seg(env, g + 200, 30), seg(env, g + 300, 40)]


@pytest.mark.parametrize("mode", PATHS)
def test_walk_indirect(env, chains, mode):
    g = env.gpa(DATA_OFF)
    # out of order inside the table, readable then writable
    gpa, n = chains.table(0, [(g, 12, NEXT, 2), (g + 500, 64, WRITE), (g + 100, 50, NEXT, 1)])
    chains.set(4, gpa, n, INDIRECT)
    res, sg, q = chains.walk(mode, 4)
    assert res == (2, 3, 62, 64) and q[Q_ERROR] == 0
    assert sg == [seg(env, g, 12), seg(env, g + 100, 50), seg(env, g + 500, 64)]


@pytest.mark.parametrize("mode", PATHS)
def test_walk_direct_then_indirect_and_seam_split(env, chains, mode):
    """A readable descriptor, then an indirect one (allowed as the last of a chain); a buffer across the
    seam between two regions becomes two segments."""
    seam = env.gpa(REGION)
    gpa, n = chains.table(1, [(seam - 30, 100, WRITE)])
    chains.set(1, env.gpa(DATA_OFF), 16, NEXT, 6)
    chains.set(6, gpa, n, INDIRECT)
    res, sg, q = chains.walk(mode, 1, ANY)
    assert q[Q_ERROR] == 0
    assert res == (1, 3, 16, 100)
    assert sg == [seg(env, env.gpa(DATA_OFF), 16), seg(env, seam - 30, 30), seg(env, seam, 70)]
    # the same chain is refused by a device that only reads
    res, _, q = chains.walk(mode, 1, READ_ONLY)
    assert res[0] == -1 and q[Q_ERROR] == QueueError.BAD_DIRECTION


def _err_cases(env: Env):
    """(name, build(chains) -> (head, want), expected error, expected value or None)."""
    G = env.gpa
    data = G(DATA_OFF)

    def loop(c):
        c.set(0, data, 8, NEXT, 1)
        c.set(1, data, 8, NEXT, 0)
        return 0, ANY

    def ind(entries, flags=INDIRECT, length=None):
        def build(c):
            gpa, n = c.table(0, entries)
            c.set(2, gpa, n if length is None else length, flags)
            return 2, ANY

        return build

    def one(addr, length, flags=0, want=ANY):
        def build(c):
            c.set(3, addr, length, flags)
            return 3, want

        return build

    def read_after_write(c):
        c.set(0, data, 8, WRITE | NEXT, 4)
        c.set(4, data, 8, 0)
        return 0, ANY

    def many_segments(c):
        seam = G(REGION)
        gpa, n = c.table(0, [(seam - 1, 2, NEXT, j + 1) for j in range(MAX_INDIRECT - 1)] + [(seam - 1, 2)])
        c.set(0, gpa, n, INDIRECT)
        return 0, ANY

    return [
        ("head out of range", lambda c: (SIZE, ANY), QueueError.HEAD_OUT_OF_RANGE, SIZE),
        ("head 0xffff", lambda c: (0xFFFF, ANY), QueueError.HEAD_OUT_OF_RANGE, 0xFFFF),
        (
            "next out of range",
            lambda c: (c.set(0, data, 8, NEXT, SIZE), 0, ANY)[1:],
            QueueError.NEXT_OUT_OF_RANGE,
            SIZE,
        ),
        ("indirect next out of range", ind([(data, 8, NEXT, 1), (data, 8, NEXT, 2)]), QueueError.NEXT_OUT_OF_RANGE, 2),
        ("loop", loop, QueueError.CHAIN_TOO_LONG, 0),
        ("indirect loop", ind([(data, 8, NEXT, 1), (data, 8, NEXT, 0)]), QueueError.CHAIN_TOO_LONG, 2),
        ("too many segments", many_segments, QueueError.CHAIN_TOO_LONG, SIZE + MAX_INDIRECT),
        ("indirect len 0", ind([(data, 8)], length=0), QueueError.INDIRECT_BAD_SIZE, 0),
        ("indirect len 15", ind([(data, 8)], length=15), QueueError.INDIRECT_BAD_SIZE, 15),
        (
            "indirect too big",
            ind([(data, 8)], length=16 * (MAX_INDIRECT + 1)),
            QueueError.INDIRECT_BAD_SIZE,
            16 * (MAX_INDIRECT + 1),
        ),
        ("indirect nested", ind([(data, 8, NEXT, 1), (data, 16, INDIRECT)]), QueueError.INDIRECT_NESTED, 1),
        ("indirect with next", ind([(data, 8)], flags=INDIRECT | NEXT), QueueError.INDIRECT_WITH_NEXT, 2),
        ("indirect unmapped", one(G(MAPPED + 4096), 32, INDIRECT), QueueError.INDIRECT_UNMAPPED, G(MAPPED + 4096)),
        ("indirect straddles end", one(G(MAPPED - 16), 32, INDIRECT), QueueError.INDIRECT_UNMAPPED, G(MAPPED - 16)),
        ("indirect huge addr", one((1 << 64) - 16, 16, INDIRECT), QueueError.INDIRECT_UNMAPPED, (1 << 64) - 16),
        ("zero length", one(data, 0), QueueError.ZERO_LENGTH, data),
        ("zero length in indirect", ind([(data, 8, NEXT, 1), (data + 8, 0)]), QueueError.ZERO_LENGTH, data + 8),
        ("address below memory", one(0x1000, 8), QueueError.BAD_ADDRESS, 0x1000),
        ("address above memory", one(G(MAPPED), 8), QueueError.BAD_ADDRESS, G(MAPPED)),
        ("buffer straddles end", one(G(MAPPED - 8), 16), QueueError.BAD_ADDRESS, G(MAPPED)),
        ("address >= 2**62", one(ADDR_LIMIT, 8), QueueError.BAD_ADDRESS, ADDR_LIMIT),
        ("length to 2**64", one((1 << 64) - 8, 0xFFFF_FFFF), QueueError.BAD_ADDRESS, (1 << 64) - 8),
        ("write for a reader", one(data, 8, WRITE, READ_ONLY), QueueError.BAD_DIRECTION, 3),
        ("read for a writer", one(data, 8, 0, WRITE_ONLY), QueueError.BAD_DIRECTION, 3),
        ("read after write", read_after_write, QueueError.BAD_DIRECTION, 4),
        ("read after write (indirect)", ind([(data, 8, WRITE | NEXT, 1), (data, 8)]), QueueError.BAD_DIRECTION, 1),
    ]


ERR_NAMES = [c[0] for c in _err_cases(type("E", (), {"gpa": staticmethod(lambda o: o)})())]


@pytest.mark.parametrize("mode", PATHS)
@pytest.mark.parametrize("name", ERR_NAMES)
def test_walk_errors(env, chains, mode, name):
    case = {c[0]: c for c in _err_cases(env)}[name]
    _, build, err, value = case
    head, want = build(chains)
    res, _, q = chains.walk(mode, head, want)
    assert res == (-1, 0, 0, 0)
    assert QueueError(int(q[Q_ERROR])) is err
    if value is not None:
        assert int(q[Q_ERROR_VALUE]) & 0xFFFF_FFFF_FFFF_FFFF == value


@pytest.mark.parametrize("mode", PATHS)
def test_walk_first_error_wins(env, chains, mode):
    chains.set(0, env.gpa(DATA_OFF), 0)
    _, _, q = chains.walk(mode, 0)
    assert q[Q_ERROR] == QueueError.ZERO_LENGTH
    res, _, q = chains.walk(mode, SIZE, q=q)
    assert res[0] == -1 and q[Q_ERROR] == QueueError.ZERO_LENGTH and q[Q_ERROR_VALUE] == env.gpa(DATA_OFF)


@pytest.mark.parametrize("mode", PATHS)
def test_walk_ring_unmapped(env, mode):
    """A descriptor table whose second half lies outside guest memory: direct cannot bind it and falls back to
    copy; the walk works on the mapped half and breaks the queue with RING_UNMAPPED on the other."""
    off = MAPPED - desc_bytes(SIZE) // 2
    c = Chains(env, desc_off=off)
    c.set(0, env.gpa(DATA_OFF), 8, NEXT, 1)
    c.set(1, env.gpa(DATA_OFF), 8)
    res, _, q = c.walk(mode, 0)
    assert res == (2, 2, 16, 0) and q[Q_DIRECT] == 0
    c.set(1, env.gpa(DATA_OFF), 8, NEXT, SIZE - 1)
    res, _, q = c.walk(mode, 0)
    assert res[0] == -1 and q[Q_ERROR] == QueueError.RING_UNMAPPED and q[Q_ERROR_VALUE] == q[Q_DESC]


@pytest.mark.parametrize("mode", PATHS)
def test_avail_idx_jump_breaks_before_any_work(env, driver, mode):
    drv = driver(size=8)
    drv.post(3)
    drv.ring.avail[1] = 9  # 9 chains claimed in a ring of 8
    q, views = drv.bind(mode)
    assert run_tx(env, q, views) == BROKEN
    assert q[Q_ERROR] == QueueError.AVAIL_IDX_JUMP and q[Q_ERROR_VALUE] == 9
    assert q[Q_USED_IDX] == 0 and q[Q_CHAINS] == 0 and drv.ring.used16[1] == 0


@pytest.mark.parametrize("mode", PATHS)
def test_chains_before_a_fault_are_completed(env, driver, mode):
    drv = driver(size=8)
    heads = drv.post(4)
    drv.ring.desc[2 * heads[2] + 1] = 0  # third chain: zero length
    q, views = drv.bind(mode)
    assert run_tx(env, q, views) == BROKEN
    assert q[Q_ERROR] == QueueError.ZERO_LENGTH
    assert q[Q_USED_IDX] == drv.ring.used16[1] == 2 and q[Q_LAST_AVAIL] == 2 and q[Q_PACKETS] == 2
    assert q[Q_BYTES] == 2 * (100 - 12)

"""Packed ring (virtio 1.2 §2.8): the copy path is the reference (invariant 5) on generated ring states, bounded
work, exact used descriptors, event suppression both ways, in-order and out-of-order completion, publish after
fill, wrap counters over many laps on sizes that are not powers of two, and every error class on both paths."""

from __future__ import annotations

import faulthandler
import os
import struct
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from pyvhost.access import Metadata, bind_packed
from pyvhost.devices.net import make_frame
from pyvhost.devices.net_packed import loopback, rx_source, tx_sink
from pyvhost.errors import QueueError
from pyvhost.frontend.packed import D_BAD_IDS, D_DONE, D_POSTED, D_USED_WRAP, PackedDriverRing, drive_rx, drive_tx
from pyvhost.frontend.ram import GPA_BASE, GuestRam
from pyvhost.frontend.split import D_BATCH, D_BUFLEN, D_BYTES, D_EVENT_IDX, D_HDR, D_LIMIT
from pyvhost.memory import SPACE_UVA, GuestMemory
from pyvhost.protocol import ADDR_LIMIT, MemRegion, VringAddr
from pyvhost.ring.chain import ANY, MAX_INDIRECT, READ_ONLY, WRITE_ONLY, new_sg
from pyvhost.ring.packed import (
    NOT_AVAIL,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    decode_base,
    encode_base,
    flush_used,
    new_packed_state,
    new_shadow,
    read_head,
    ring_bytes,
    walk_packed,
)
from pyvhost.ring.packed import VRING_PACKED_DESC_F_AVAIL as AV
from pyvhost.ring.packed import VRING_PACKED_DESC_F_USED as US
from pyvhost.ring.split import VRING_DESC_F_INDIRECT as INDIRECT
from pyvhost.ring.split import VRING_DESC_F_NEXT as NEXT
from pyvhost.ring.split import VRING_DESC_F_WRITE as WRITE
from pyvhost.ring.state import (
    Q_AVAIL_WRAP,
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
    Q_USED_WRAP,
)

KiB = 1 << 10
IDLE, MORE, BROKEN = 0, 1, -1
PATHS = [Metadata.COPY, Metadata.DIRECT]
DESC_FMT = "<QIHH"  # addr, len, id, flags

# Guest RAM: one 256 KiB memfd of which the back-end maps two 64 KiB regions, adjacent in GPA and UVA;
# everything from 128 KiB is unmapped.
RAM_SIZE = 256 * KiB
REGION = 64 * KiB
MAPPED = 2 * REGION
DESC_OFF, DRV_OFF, DEV_OFF = 0, 1536, 2048
IND_OFF, IND_TABLES, IND_ENTRIES = 4 * KiB, 4, 64  # indirect tables at 4 KiB + t KiB
DATA_OFF = 8 * KiB  # buffers live in [DATA_OFF, MAPPED)
UNMAPPED = 160 * KiB


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

    def addr(self, desc: int = DESC_OFF, drv: int = DRV_OFF, dev: int = DEV_OFF) -> VringAddr:
        return VringAddr(0, 0, self.uva(desc), self.uva(dev), self.uva(drv), 0)

    def bind(self, addr: VringAddr, size: int, mode: Metadata, q: np.ndarray):
        return bind_packed(self.mem, addr, size, mode, q)

    def put(self, pos: int, addr: int, length: int, bid: int, flags: int, base: int = DESC_OFF) -> None:
        struct.pack_into(DESC_FMT, self.ram.mm, base + 16 * pos, addr, length, bid, flags)

    def get(self, pos: int, base: int = DESC_OFF) -> tuple[int, int, int, int]:
        return struct.unpack_from(DESC_FMT, self.ram.mm, base + 16 * pos)

    def event(self, off: int) -> tuple[int, int]:
        return struct.unpack_from("<HH", self.ram.mm, off)

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


def avail_bits(wrap: int) -> int:
    """What a driver sets to make a descriptor available in lap ``wrap``."""
    return AV if wrap else US


def used_bits(wrap: int) -> int:
    return AV | US if wrap else 0


def run_tx(env: Env, q, views, budget: int = 1, spins: int = 1) -> int:
    n = int(q[0])
    return int(tx_sink(q, *views.args(), env.mem.arena.view, env.mem.table, new_sg(n), new_shadow(n), budget, spins))


def run_rx(env: Env, q, views, frame, budget: int = 1, spins: int = 1) -> int:
    n = int(q[0])
    sgs = np.stack([new_sg(n)] * 2)
    return int(
        rx_source(
            q,
            *views.args(),
            env.mem.arena.view,
            env.mem.table,
            sgs,
            new_shadow(n),
            np.zeros(16, np.uint8),
            frame,
            budget,
            spins,
        )
    )


# =========================================================================================================
# Generated ring states
u16 = st.integers(0, 0xFFFF)


@dataclass
class Chain:
    pos: int  # position of its first descriptor
    wrap: int  # the avail wrap counter there
    ndesc: int
    bid: int
    slots: list[int]
    table: int = -1  # indirect: the table it uses


@dataclass
class State:
    direction: str
    size: int
    placement: str
    offs: tuple[int, int, int]  # desc, driver area, device area offsets in RAM
    ring: list[list[int]]  # [addr, len, id, flags] per position
    tables: list[list[list[int]]]
    drv_event: tuple[int, int]  # off_wrap, flags
    dev_event: tuple[int, int]
    avail: tuple[int, int]  # the device's avail cursor (position, wrap)
    used: tuple[int, int]
    chains: list[Chain]
    mutations: list[str] = field(default_factory=list)
    q: dict[int, int] = field(default_factory=dict)
    budget: int = 1
    frame_size: int = 64

    @property
    def lag(self) -> int:
        return (lin(*self.avail, self.size) - lin(*self.used, self.size)) % (2 * self.size)


def lin(pos: int, wrap: int, size: int) -> int:
    return pos if wrap else pos + size


def adv(pos: int, wrap: int, n: int, size: int) -> tuple[int, int]:
    pos += n
    if pos >= size:
        pos -= size
        wrap ^= 1
    return pos, wrap


PLACEMENTS = {
    "normal": lambda n: (DESC_OFF, DRV_OFF, DEV_OFF),
    "desc_at_end": lambda n: (MAPPED - 16 * (n // 2), DRV_OFF, DEV_OFF),  # the ring's end unmapped
    "desc_on_seam": lambda n: (REGION - 16 * (n // 2), DRV_OFF, DEV_OFF),  # mapped, in two regions
    "driver_unmapped": lambda n: (DESC_OFF, UNMAPPED, DEV_OFF),
    "device_unmapped": lambda n: (DESC_OFF, DRV_OFF, UNMAPPED),
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


@st.composite
def buffer(draw, G: int, rx: bool) -> tuple[int, int]:
    """A valid buffer (addr, len): inside the data area, sometimes straddling the seam between the regions."""
    length = draw(st.integers(1, 400 if rx else 300))
    if length > 1 and draw(st.integers(0, 4)) == 0:
        return G + REGION - draw(st.integers(1, length - 1)), length
    return draw(st.integers(G + DATA_OFF, G + MAPPED - length)), length


@st.composite
def ring_states(draw, G: int, direction: str) -> State:
    rx = direction == "rx"
    size = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 16, 31, 64]))
    placement = draw(st.sampled_from(["normal"] * 20 + sorted(set(PLACEMENTS) - {"normal"})))
    pos, wrap = draw(st.integers(0, size - 1)), draw(st.integers(0, 1))
    lag = 0 if draw(st.integers(0, 3)) else draw(st.integers(0, size))
    upos, uwrap = pos - lag, wrap
    if upos < 0:
        upos, uwrap = upos + size, wrap ^ 1
    room = size - lag

    def lap(i: int) -> int:  # the avail wrap counter the device will have at position i
        return wrap if i >= pos else wrap ^ 1

    # every descriptor starts as one the device must not take: AVAIL differs from the lap's wrap counter
    ring = []
    for i in range(size):
        f = (draw(u16) & ~(AV | US)) | (0 if lap(i) else AV) | draw(st.sampled_from([0, US]))
        ring.append([draw(any_addr(G)), draw(any_len), draw(u16), f])
    tables = [
        [[draw(any_addr(G)), draw(any_len), draw(u16), draw(u16)] for _ in range(8)] for _ in range(IND_TABLES)
    ]  # the rest of each table stays zero
    # then a driver makes chains available from the avail cursor
    ids = draw(st.permutations(range(size)))
    chains: list[Chain] = []
    dirflag = WRITE if rx else 0
    p, w = pos, wrap
    taken = 0
    ntables = 0
    target = draw(st.integers(0, size))
    while len(chains) < target and taken < room:
        bid = ids[len(chains)]
        if ntables < IND_TABLES and draw(st.integers(0, 3)) == 0:
            k = draw(st.integers(1, 6))
            t = ntables
            ntables += 1
            for j in range(k):
                a, n = draw(buffer(G, rx))
                # within a table only WRITE counts: NEXT/AVAIL/USED garbage is ignored, ids too
                junk = draw(st.sampled_from([0, NEXT, AV, US, AV | US | NEXT]))
                tables[t][j] = [a, n, draw(u16), dirflag | junk]
            ring[p] = [G + IND_OFF + t * KiB, 16 * k, bid, INDIRECT | avail_bits(w) | draw(st.sampled_from([0, WRITE]))]
            chains.append(Chain(p, w, 1, bid, [p], t))
            p, w = adv(p, w, 1, size)
            taken += 1
            continue
        k = draw(st.integers(1, min(3, room - taken)))
        c = Chain(p, w, k, bid, [])
        for j in range(k):
            a, n = draw(buffer(G, rx))
            ring[p] = [a, n, bid if j == k - 1 else draw(u16), dirflag | (NEXT if j < k - 1 else 0) | avail_bits(w)]
            c.slots.append(p)
            p, w = adv(p, w, 1, size)
        chains.append(c)
        taken += k
    m = 2 * size
    if draw(st.booleans()):
        e = (lin(upos, uwrap, size) + draw(st.integers(-2, 2 * size))) % m
        off_wrap = (e | 0x8000) if e < size else (e - size)
    else:
        off_wrap = draw(u16)
    state = State(
        direction=direction,
        size=size,
        placement=placement,
        offs=PLACEMENTS[placement](size),
        ring=ring,
        tables=tables,
        drv_event=(off_wrap, draw(st.sampled_from([0, 0, 1, 2, 2, 3, 0xFFFF]))),
        dev_event=(draw(u16), draw(u16)),
        avail=(pos, wrap),
        used=(upos, uwrap),
        chains=chains,
        budget=draw(st.integers(1, 3)),
        frame_size=draw(st.integers(60, 600)),
    )
    state.q = {
        Q_LAST_AVAIL: pos,
        Q_AVAIL_WRAP: wrap,
        Q_USED_IDX: upos,
        Q_USED_WRAP: uwrap,
        Q_HDR_LEN: draw(st.sampled_from([12, 12, 10, 0])),
        Q_BATCH: draw(st.one_of(st.integers(1, 8), st.just(256))),
        Q_EVENT_IDX: int(draw(st.booleans())),
        Q_NOTIFY_ON: draw(st.sampled_from([-1, 0, 1])),
        Q_SIGNALLED: draw(st.integers(0, m - 1)),
        Q_SIGNALLED_VALID: int(draw(st.booleans())),
        Q_MRG: int(draw(st.booleans())) if rx else 0,
        Q_LIMIT: draw(st.one_of(st.just(-1), st.integers(0, 6))) if rx else -1,
    }
    # mutations: what a buggy or hostile driver does to the well-formed state
    direct_chains = [c for c in chains if c.table < 0]
    ind_chains = [c for c in chains if c.table >= 0]
    for _ in range(draw(st.integers(0, 3)) if draw(st.integers(0, 2)) else 0):
        kind = draw(
            st.sampled_from(
                [
                    "flags",
                    "head_used",
                    "id",
                    "next_tail",
                    "ind_in_chain",
                    "ind_next",
                    "ind_len",
                    "nest",
                    "zero",
                    "field",
                    "dir",
                ]
            )
        )
        c = draw(st.sampled_from(chains)) if chains else None
        if kind == "flags":
            i = draw(st.sampled_from(c.slots) if c and draw(st.integers(0, 3)) else st.integers(0, size - 1))
            ring[i][3] = draw(u16)
        elif kind == "head_used" and c:
            ring[c.pos][3] = (ring[c.pos][3] & ~(AV | US)) | used_bits(c.wrap)
        elif kind == "id" and c:
            ring[c.slots[-1]][2] = draw(st.integers(size, 0xFFFF))
        elif kind == "next_tail" and c:
            ring[chains[-1].slots[-1]][3] |= NEXT
        elif kind == "ind_in_chain" and any(len(x.slots) > 1 for x in direct_chains):
            x = draw(st.sampled_from([x for x in direct_chains if len(x.slots) > 1]))
            ring[draw(st.sampled_from(x.slots[1:]))][3] |= INDIRECT
        elif kind == "ind_next" and ind_chains:
            ring[draw(st.sampled_from(ind_chains)).pos][3] |= NEXT
        elif kind == "ind_len" and ind_chains:
            ring[draw(st.sampled_from(ind_chains)).pos][1] = draw(st.sampled_from([0, 8, 15, 16 * (MAX_INDIRECT + 1)]))
        elif kind == "nest" and ind_chains:
            tables[draw(st.sampled_from(ind_chains)).table][0][3] |= INDIRECT
        elif kind == "zero" and c:
            if c.table >= 0:
                tables[c.table][0][1] = 0
            else:
                ring[draw(st.sampled_from(c.slots))][1] = 0
        elif kind == "field" and c:
            i = draw(st.sampled_from(c.slots))
            f = draw(st.integers(0, 1))
            ring[i][f] = draw([any_addr(G), any_len][f])
        elif kind == "dir" and c:
            if c.table >= 0:
                tables[c.table][0][3] ^= WRITE
            else:
                ring[draw(st.sampled_from(c.slots))][3] ^= WRITE
        else:
            continue
        state.mutations.append(kind)
    return state


def lay_out(env: Env, s: State) -> None:
    """Write the state into guest RAM (everything else zero)."""
    img = bytearray(RAM_SIZE)
    for t, table in enumerate(s.tables):
        for j, e in enumerate(table):
            struct.pack_into(DESC_FMT, img, IND_OFF + t * KiB + 16 * j, *e)
    d_off, drv_off, dev_off = s.offs
    for i, e in enumerate(s.ring):
        if d_off + 16 * i + 16 <= RAM_SIZE:
            struct.pack_into(DESC_FMT, img, d_off + 16 * i, *e)
    struct.pack_into("<HH", img, drv_off, *s.drv_event)
    struct.pack_into("<HH", img, dev_off, *s.dev_event)
    env.ram.buf[:] = np.frombuffer(bytes(img), np.uint8)


def run_state(env: Env, s: State, mode: Metadata, frame) -> tuple[int, np.ndarray, int]:
    q = new_packed_state(s.size)
    for k, v in s.q.items():
        q[k] = v
    q[Q_CALLFD] = env.callfd
    views = env.bind(env.addr(*s.offs), s.size, mode, q)
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
    d_off, drv_off, dev_off = s.offs
    whole = all(
        env.mem.translate(SPACE_UVA, env.uva(o), n) is not None
        for o, n in ((d_off, ring_bytes(s.size)), (drv_off, 4), (dev_off, 4))
    )
    assert q_d[Q_DIRECT] == int(whole) and q_c[Q_DIRECT] == 0
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
    q, n = q_c, s.size
    assert ret_c in (IDLE, MORE, BROKEN)
    assert (ret_c == BROKEN) == (q[Q_ERROR] != QueueError.NONE)
    taken = (lin(int(q[Q_LAST_AVAIL]), int(q[Q_AVAIL_WRAP]), n) - lin(*s.avail, n)) % (2 * n)
    advanced = (lin(int(q[Q_USED_IDX]), int(q[Q_USED_WRAP]), n) - lin(*s.used, n)) % (2 * n)
    assert advanced <= taken <= n - s.lag  # never more than the ring holds
    assert taken == advanced  # every chain taken is completed, whatever breaks (an unpublished batch is not taken)
    assert q[Q_PACKETS] + q[Q_DROPS] <= q[Q_CHAINS]
    if s.direction == "tx":
        assert q[Q_PACKETS] + q[Q_DROPS] == q[Q_CHAINS]
    if s.mutations or s.placement != "normal":
        return
    # --- a well-behaved driver: no error, chains taken in order, used descriptors exactly where they belong --
    assert q[Q_ERROR] == QueueError.NONE, QueueError(int(q[Q_ERROR])).name
    done = s.chains[: int(q[Q_CHAINS])]
    assert taken == sum(c.ndesc for c in done)
    written = {}
    p, w = s.used
    for c in done:
        written[p] = (c.bid, w)
        p, w = adv(p, w, c.ndesc, n)
    before = snapshot[DESC_OFF : DESC_OFF + 16 * n]
    after = ram_c[DESC_OFF : DESC_OFF + 16 * n]
    for i in range(n):
        old = struct.unpack_from(DESC_FMT, before, 16 * i)
        new = struct.unpack_from(DESC_FMT, after, 16 * i)
        if i not in written:
            assert new == old, f"descriptor {i} changed"
            continue
        bid, w = written[i]
        assert new[0] == old[0] and new[2] == bid, (i, old, new)
        if s.direction == "tx":
            assert new[1] == 0 and new[3] == used_bits(w)
        else:
            assert new[1] <= q[Q_HDR_LEN] + s.frame_size
            assert new[3] == used_bits(w) | (WRITE if new[1] else 0)


SETTINGS = settings(
    max_examples=int(os.environ.get("PACKED_EXAMPLES", 200)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.large_base_example],
)


def _unpublishable(direction: str) -> State:
    """The regression of issue 16: the descriptor ring's second half lies outside guest memory, the used cursor
    there (one chain in flight), the avail cursor in the first half.  The pass takes the chain at 0, then breaks
    on the chain at 1 (buffer id 4 in a ring of 4) -- first error wins -- and cannot write the used descriptor
    at 3.  The kernels used to move the avail cursor anyway: a chain taken, never completed, and the queue
    broken with PACKED_BAD_ID, not RING_UNMAPPED.  Now nothing is taken."""
    G = GPA_BASE
    wflag = WRITE if direction == "rx" else 0
    ring = [
        [G + DATA_OFF, 300, 0, AV | wflag],
        [G + DATA_OFF + 512, 300, 4, AV | wflag],
        [G, 0, 0, US],
        [G, 0, 0, AV | US],
    ]  # 2 and 3 unmapped: the previous lap's, used
    return State(
        direction=direction,
        size=4,
        placement="desc_at_end",
        offs=PLACEMENTS["desc_at_end"](4),
        ring=ring,
        tables=[[[0, 0, 0, 0]] * 8] * IND_TABLES,
        drv_event=(0, RING_EVENT_FLAGS_ENABLE),
        dev_event=(0, 0),
        avail=(0, 1),
        used=(3, 0),
        chains=[Chain(0, 1, 1, 0, [0])],
        mutations=["id"],
        q={
            Q_LAST_AVAIL: 0,
            Q_AVAIL_WRAP: 1,
            Q_USED_IDX: 3,
            Q_USED_WRAP: 0,
            Q_HDR_LEN: 12,
            Q_BATCH: 256,
            Q_EVENT_IDX: 0,
            Q_NOTIFY_ON: -1,
            Q_SIGNALLED: 0,
            Q_SIGNALLED_VALID: 0,
            Q_MRG: 0,
            Q_LIMIT: -1,
        },
        budget=1,
        frame_size=64,
    )


@SETTINGS
@given(state=ring_states(GPA_BASE, "tx"))
@example(state=_unpublishable("tx"))
def test_tx_copy_is_reference(env, state):
    assert env.G == GPA_BASE
    check_copy_equals_direct(env, state)


@SETTINGS
@given(state=ring_states(GPA_BASE, "rx"))
@example(state=_unpublishable("rx"))
def test_rx_copy_is_reference(env, state):
    assert env.G == GPA_BASE
    check_copy_equals_direct(env, state)


# =========================================================================================================
# A driver over the same memory: many laps, sizes that are not powers of two
class Driver:
    """pyvhost's packed driver ring (frontend_packed) in the module's guest RAM, and the device's view of it."""

    def __init__(self, env: Env, size: int, mode: Metadata, event_idx: bool = False) -> None:
        env.ram.buf[:] = 0
        self.env = env
        self.size = size
        # rings of up to 64 descriptors at the usual places with 2 KiB buffers; bigger ones at 80 KiB with their
        # areas at 100 KiB and 64-byte buffers
        offs = (DESC_OFF, DRV_OFF, DEV_OFF) if size <= 64 else (80 * KiB, 100 * KiB, 100 * KiB + 64)
        self.ring = PackedDriverRing(
            0,
            size,
            *offs,
            DATA_OFF,
            env.ram,
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
        )
        if size > 64:
            self.ring.d[D_BUFLEN] = 64
        self.ring.d[D_EVENT_IDX] = int(event_idx)
        self.ring.d[D_HDR] = 12
        self.q = new_packed_state(size)
        self.q[Q_CALLFD] = env.callfd
        self.q[Q_EVENT_IDX] = int(event_idx)
        self.q[Q_HDR_LEN] = 12
        env.take_calls()
        self.views = env.bind(self.ring.addr(), size, mode, self.q)

    def kicks(self) -> int:
        try:
            return os.eventfd_read(self.ring.kick_fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        self.ring.close()


@pytest.fixture
def driver(env):
    made = []

    def make(*a, **kw) -> Driver:
        d = Driver(env, *a, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.mark.parametrize("mode", PATHS)
@pytest.mark.parametrize("size", [1, 3, 5, 256, 1000])
def test_many_laps_tx(env, driver, mode, size):
    drv = driver(size, mode)
    gpa = drv.ring.buf_gpa(0)
    for it in range(40):
        drive_tx(*drv.ring.views(), gpa, 12 + 64, 1)
        assert run_tx(env, drv.q, drv.views, budget=1 + it % 3) in (MORE, IDLE)
        assert drv.q[Q_ERROR] == 0
    drive_tx(*drv.ring.views(), gpa, 12 + 64, 1)
    total = int(drv.ring.d[D_DONE])
    assert total == drv.q[Q_PACKETS] == drv.q[Q_CHAINS] > 2 * size  # more than two laps
    assert drv.q[Q_BYTES] == 64 * total
    assert drv.ring.d[D_BAD_IDS] == 0
    lap = total // size
    assert drv.q[Q_USED_WRAP] == drv.ring.d[D_USED_WRAP] == (1 if lap % 2 == 0 else 0)
    assert drv.q[Q_LAST_AVAIL] == drv.q[Q_USED_IDX] == total % size


@pytest.mark.parametrize("mode", PATHS)
@pytest.mark.parametrize("size", [3, 7])
def test_many_laps_rx_mergeable(env, driver, mode, size):
    """3000-byte frames into 2048-byte buffers: two buffers (two chains) each, num_buffers = 2, over laps."""
    drv = driver(size, mode)
    drv.q[Q_MRG] = 1
    frame = make_frame(3000)
    for _ in range(30):
        drive_rx(*drv.ring.views(), drv.ring.buf_gpa(0), 1)
        assert run_rx(env, drv.q, drv.views, frame, budget=2) in (MORE, IDLE)
        assert drv.q[Q_ERROR] == 0
    drv.ring.d[D_LIMIT] = drv.ring.d[D_POSTED]  # take back, post nothing (it would overwrite what we check)
    drive_rx(*drv.ring.views(), drv.ring.buf_gpa(0), 1)
    assert drv.ring.d[D_DONE] == drv.q[Q_CHAINS] == 2 * drv.q[Q_PACKETS] > 2 * size
    # the last frame's two buffers: header with num_buffers 2, then the frame across both
    p = (drv.q[Q_USED_IDX] - 2) % size
    (_, l1, id1, f1), (_, l2, id2, f2) = env.get(p), env.get((p + 1) % size)
    assert (l1, l2) == (2048, 3000 + 12 - 2048) and f1 & WRITE and f2 & WRITE
    b1 = env.ram.buf[DATA_OFF + id1 * 2048 :][:l1]
    b2 = env.ram.buf[DATA_OFF + id2 * 2048 :][:l2]
    assert int(b1[10]) | int(b1[11]) << 8 == 2
    assert np.array_equal(np.concatenate([b1[12:], b2]), frame)


@pytest.mark.parametrize("mode", PATHS)
def test_loopback_over_laps(env, mode):
    """Two packed rings (RX at 0, TX at 32 KiB) of odd sizes; every TX frame comes back on RX."""
    env.ram.buf[:] = 0
    rx = PackedDriverRing(0, 5, DESC_OFF, DRV_OFF, DEV_OFF, DATA_OFF, env.ram, os.eventfd(0), os.eventfd(0))
    tx = PackedDriverRing(1, 3, 4 * KiB, 4 * KiB + 512, 4 * KiB + 576, 32 * KiB, env.ram, os.eventfd(0), os.eventfd(0))
    try:
        for r in (rx, tx):
            r.d[D_HDR] = 12
        rq, tq = new_packed_state(5), new_packed_state(3)
        for qq in (rq, tq):
            qq[Q_HDR_LEN] = 12
        rv, tv = env.bind(rx.addr(), 5, mode, rq), env.bind(tx.addr(), 3, mode, tq)
        frame = make_frame(100)
        for i in range(3):
            o = 32 * KiB + i * 2048
            env.ram.buf[o : o + 12] = 0
            env.ram.buf[o + 12 : o + 112] = frame
        for _ in range(40):
            drive_rx(*rx.views(), rx.buf_gpa(0), 1)
            drive_tx(*tx.views(), tx.buf_gpa(0), 112, 1)
            ret = loopback(
                rq,
                *rv.args(),
                tq,
                *tv.args(),
                env.mem.arena.view,
                env.mem.table,
                new_sg(3),
                np.stack([new_sg(5)] * 2),
                new_shadow(5),
                new_shadow(3),
                np.zeros(16, np.uint8),
                4096,
                2,
                1,
            )
            assert ret in (MORE, IDLE) and rq[Q_ERROR] == tq[Q_ERROR] == 0
        drive_rx(*rx.views(), rx.buf_gpa(0), 1)
        drive_tx(*tx.views(), tx.buf_gpa(0), 112, 1)
        assert tq[Q_PACKETS] == rq[Q_PACKETS] == tx.d[D_DONE] == rx.d[D_DONE] > 10
        assert rx.d[D_BYTES] == 100 * rx.d[D_DONE]
    finally:
        rx.close()
        tx.close()


# =========================================================================================================
# Notification suppression
@pytest.mark.parametrize("mode", PATHS)
def test_driver_event_flags(env, driver, mode):
    """Without EVENT_IDX the driver's area flags decide: DISABLE suppresses calls, ENABLE (or anything else)
    asks for them; DESC is only meaningful with EVENT_IDX."""
    drv = driver(8, mode)
    area = drv.ring.driver
    for flags, want in (
        (RING_EVENT_FLAGS_DISABLE, 0),
        (RING_EVENT_FLAGS_ENABLE, 1),
        (RING_EVENT_FLAGS_DESC, 1),
        (3, 1),
        (RING_EVENT_FLAGS_DISABLE, 0),
    ):
        area[1] = flags
        drive_tx(*drv.ring.views(), drv.ring.buf_gpa(0), 100, 1)
        assert run_tx(env, drv.q, drv.views) == MORE
        assert env.take_calls() == want
    assert drv.q[Q_CALLS] == 3


@pytest.mark.parametrize("mode", PATHS)
def test_driver_event_desc(env, driver, mode):
    """EVENT_IDX: a call only when the used cursor crosses the (offset, wrap) the driver asked for."""
    size = 5
    drv = driver(size, mode, event_idx=True)
    ring = drv.ring
    ring.d[D_BATCH] = 2  # two buffers per post

    def step(off: int, wrap: int) -> int:
        ring.driver[0] = off | wrap << 15
        ring.driver[1] = RING_EVENT_FLAGS_DESC
        drive_tx(*ring.views(), ring.buf_gpa(0), 100, 1)  # reclaims, then posts 2
        assert run_tx(env, drv.q, drv.views) == MORE
        return env.take_calls()

    # used cursor (linear, wrap 1 = first lap): 0 -> 2 -> 4 -> 6(=1, wrap 0) -> 8(=3, wrap 0) -> 10(=0, wrap 1)
    assert step(4, 1) == 1  # the first publish always signals; used 0 -> 2
    assert step(4, 1) == 0  # 2 -> 4 does not cross 4
    assert step(4, 1) == 1  # 4 -> 6 crosses it
    assert step(4, 1) == 0  # 6 -> 8: behind
    assert step(4, 0) == 1  # 8 -> 10: position 4 of the second lap (wrap 0) is linear 9: crossed
    assert drv.q[Q_USED_IDX] == 0 and drv.q[Q_USED_WRAP] == 1
    assert step(1, 0) == 0  # 10 -> 12: position 1 of the second lap is linear 6: long behind
    assert drv.q[Q_CALLS] == 3


@pytest.mark.parametrize("mode", PATHS)
def test_device_event_area(env, driver, mode):
    """Kicks: DISABLE while the device polls; when it goes idle ENABLE, or with EVENT_IDX DESC at its avail
    cursor -- and the driver kicks exactly when it makes that descriptor available."""
    for event_idx in (False, True):
        drv = driver(3, mode, event_idx=event_idx)
        ring = drv.ring
        ring.d[D_BATCH] = 2
        drive_tx(*ring.views(), ring.buf_gpa(0), 100, 1)
        assert drv.kicks() == 1  # the area starts zeroed: ENABLE
        assert run_tx(env, drv.q, drv.views) == MORE
        assert tuple(ring.device) == (0, RING_EVENT_FLAGS_DISABLE)
        drive_tx(*ring.views(), ring.buf_gpa(0), 100, 1)  # posts 2 more: no kick while disabled
        assert drv.kicks() == 0
        assert run_tx(env, drv.q, drv.views) == MORE
        assert run_tx(env, drv.q, drv.views, budget=2) == IDLE
        if event_idx:  # the cursor is at 4 = position 1 of lap 2 (wrap 0)
            assert tuple(ring.device) == (1, RING_EVENT_FLAGS_DESC)
        else:
            assert ring.device[1] == RING_EVENT_FLAGS_ENABLE
        drive_tx(*ring.views(), ring.buf_gpa(0), 100, 1)
        assert drv.kicks() == 1


# =========================================================================================================
# Completion order and publish after fill
def take(env: Env, q, views, pos, wrap, want=READ_ONLY):
    f = read_head(q, views.desc, env.mem.arena.view, env.mem.table, pos, wrap)
    assert f >= 0, (f, QueueError(int(q[Q_ERROR])).name)
    res = walk_packed(q, views.desc, env.mem.arena.view, env.mem.table, pos, wrap, f, new_sg(int(q[0])), want, 8)
    return tuple(int(x) for x in res)


@pytest.mark.parametrize("mode", PATHS)
def test_out_of_order_completion(env, mode):
    """Three chains (2, 1 and 3 descriptors; ids 5, 0, 2) completed in the order 0, 2, 5: the used descriptors
    go at the used cursor in completion order, each skipping its own chain's length."""
    env.ram.buf[:] = 0
    size = 8
    g = env.gpa(DATA_OFF)
    layout = [(g, 10, 9, NEXT), (g, 10, 5, 0), (g, 20, 0, 0), (g, 30, 7, NEXT), (g, 30, 7, NEXT), (g, 30, 2, 0)]
    for i, (a, n, b, f) in enumerate(layout):
        env.put(i, a, n, b, f | AV)
    q = new_packed_state(size)
    views = env.bind(env.addr(), size, mode, q)
    chains = []
    pos = 0
    for _ in range(3):
        nread, nseg, rb, wb, ndesc, bid = take(env, q, views, pos, 1)
        chains.append((bid, ndesc))
        pos += ndesc
    assert chains == [(5, 2), (0, 1), (2, 3)]
    assert read_head(q, views.desc, env.mem.arena.view, env.mem.table, 6, 1) == NOT_AVAIL
    shadow = np.array([[0, 0, 1], [2, 7, 3], [5, 0, 2]], dtype=np.int64)
    published, ok = flush_used(q, views.driver, views.desc, env.mem.arena.view, env.mem.table, shadow, 3)
    assert published and ok and q[Q_USED_IDX] == 6 and q[Q_USED_WRAP] == 1 and q[Q_ERROR] == 0
    assert env.get(0)[1:] == (0, 0, AV | US)
    assert env.get(1)[1:] == (7, 2, AV | US | WRITE)  # WRITE: the device wrote 7 bytes
    assert env.get(4)[1:] == (0, 5, AV | US)
    for i in (2, 3, 5):  # skipped: untouched
        assert env.get(i) == layout[i][:3] + (layout[i][3] | AV,)
    # a driver reading from its used cursor gets them in completion order
    got, p = [], 0
    while p < 6:
        _, n, b, f = env.get(p)
        assert f & AV and f & US
        got.append((b, n))
        p += {0: 1, 2: 3, 5: 2}[b]
    assert got == [(0, 0), (2, 7), (5, 0)]


@pytest.mark.parametrize("mode", PATHS)
def test_first_flags_written_last(env, mode):
    """The descriptor ring's end lies outside guest memory: a batch whose second used descriptor cannot be
    written breaks the queue and leaves the first one's flags -- what the driver polls -- unwritten."""
    env.ram.buf[:] = 0
    size = 8
    off = MAPPED - 16 * 4  # positions 0-3 mapped, 4-7 not
    q = new_packed_state(size)
    views = env.bind(env.addr(desc=off), size, mode, q)
    assert q[Q_DIRECT] == 0
    env.put(0, env.gpa(DATA_OFF), 10, 3, AV, base=off)
    shadow = np.array([[3, 0, 4], [1, 0, 1]], dtype=np.int64)  # the second goes at position 4: unmapped
    published, ok = flush_used(q, views.driver, views.desc, env.mem.arena.view, env.mem.table, shadow, 2)
    assert not published and not ok and q[Q_ERROR] == QueueError.RING_UNMAPPED
    assert env.get(0, base=off) == (env.gpa(DATA_OFF), 10, 3, AV)
    assert q[Q_USED_IDX] == 0 and q[Q_USED_WRAP] == 1


# A ring of 4 whose positions 2 and 3 lie outside guest memory, its used cursor at 3 (one descriptor in flight),
# its avail cursor at 0; the other ring of a loopback pair at 3 KiB.
HALF, OTHER = MAPPED - 32, (3 * KiB, 3 * KiB + 512, 3 * KiB + 576)


def _counters(q) -> tuple[int, ...]:
    return tuple(
        int(q[i]) for i in (Q_LAST_AVAIL, Q_AVAIL_WRAP, Q_USED_IDX, Q_USED_WRAP, Q_CHAINS, Q_PACKETS, Q_BYTES, Q_DROPS)
    )


def _half_mapped(env: Env, mode: Metadata, wflag: int):
    """The ring at HALF: a good chain (id 0) at 0, a chain with buffer id 4 (out of range) at 1."""
    env.put(0, env.gpa(DATA_OFF), 2048, 0, AV | wflag, base=HALF)
    env.put(1, env.gpa(DATA_OFF + 2048), 2048, 4, AV | wflag, base=HALF)
    q = new_packed_state(4)
    q[Q_HDR_LEN] = 12
    q[Q_USED_IDX], q[Q_USED_WRAP] = 3, 0
    views = env.bind(env.addr(desc=HALF), 4, mode, q)
    assert q[Q_DIRECT] == 0
    return q, views


def _other(env: Env, mode: Metadata, wflag: int, length: int):
    """A whole ring of 4 at OTHER with two chains (ids 0 and 1) of ``length`` bytes at 16 KiB."""
    for i in range(2):
        env.put(i, env.gpa(16 * KiB + 2048 * i), length, i, AV | wflag, base=OTHER[0])
    q = new_packed_state(4)
    q[Q_HDR_LEN] = 12
    views = env.bind(env.addr(*OTHER), 4, mode, q)
    assert q[Q_DIRECT] == int(mode == Metadata.DIRECT)
    return q, views


def _run_loopback(env: Env, rq, rv, tq, tv) -> int:
    return int(
        loopback(
            rq,
            *rv.args(),
            tq,
            *tv.args(),
            env.mem.arena.view,
            env.mem.table,
            new_sg(4),
            np.stack([new_sg(4)] * 2),
            new_shadow(4),
            new_shadow(4),
            np.zeros(16, np.uint8),
            4096,
            1,
            1,
        )
    )


@pytest.mark.parametrize("mode", PATHS)
@pytest.mark.parametrize("direction", ["tx", "rx"])
def test_unpublished_batch_is_not_taken(env, mode, direction):
    """Issue 16: a pass breaks on its second chain (PACKED_BAD_ID, the first error) and then cannot write the
    first chain's used descriptor (ring unmapped at the used cursor).  The avail cursor used to move past the
    chain anyway -- taken, never completed.  Now the chain stays available and nothing is counted."""
    env.ram.buf[:] = 0
    q, views = _half_mapped(env, mode, WRITE if direction == "rx" else 0)
    before = _counters(q)
    head = env.get(0, base=HALF)
    if direction == "tx":
        ret = run_tx(env, q, views)
    else:
        ret = run_rx(env, q, views, make_frame(64))
    assert ret == BROKEN and q[Q_ERROR] == QueueError.PACKED_BAD_ID and q[Q_ERROR_VALUE] == 4
    assert _counters(q) == before
    assert env.get(0, base=HALF) == head  # not made used


@pytest.mark.parametrize("mode", PATHS)
def test_loopback_rx_unpublished(env, mode):
    """Loopback whose RX batch cannot be published: the TX chain is completed and its frame counted as a TX
    drop (it reached no guest buffer); RX takes nothing.  TX packets == RX packets + RX drops holds."""
    env.ram.buf[:] = 0
    rq, rv = _half_mapped(env, mode, WRITE)
    tq, tv = _other(env, mode, 0, 12 + 64)
    rbefore = _counters(rq)
    assert _run_loopback(env, rq, rv, tq, tv) == BROKEN
    assert rq[Q_ERROR] == QueueError.PACKED_BAD_ID and tq[Q_ERROR] == 0
    assert _counters(rq) == rbefore
    assert _counters(tq) == (1, 1, 1, 1, 1, 0, 0, 1)  # one chain taken and completed, a drop
    assert env.get(0, base=OTHER[0])[3] == AV | US


@pytest.mark.parametrize("mode", PATHS)
def test_loopback_tx_unpublished(env, mode):
    """Loopback whose TX batch cannot be published: its chains stay available, and RX does not publish the
    frames they carried (nothing delivered, nothing counted, on either ring)."""
    env.ram.buf[:] = 0
    tq, tv = _half_mapped(env, mode, 0)
    env.put(0, env.gpa(DATA_OFF), 12 + 64, 0, AV, base=HALF)
    rq, rv = _other(env, mode, WRITE, 2048)
    tbefore, rbefore = _counters(tq), _counters(rq)
    assert _run_loopback(env, rq, rv, tq, tv) == BROKEN
    assert tq[Q_ERROR] == QueueError.PACKED_BAD_ID and rq[Q_ERROR] == 0
    assert _counters(tq) == tbefore and _counters(rq) == rbefore
    assert env.get(0, base=OTHER[0])[3] == AV | WRITE  # the RX buffer is still the driver's


@pytest.mark.parametrize("mode", PATHS)
@pytest.mark.parametrize("kernel", ["tx", "rx", "loopback"])
def test_full_ring_takes_nothing(env, mode, kernel):
    """All 4 descriptors are in flight (avail cursor a whole lap ahead of the used one) and a hostile driver
    makes the head available anyway: no pass takes it (a one-descriptor chain used to be taken, the ring then
    holding more than it can)."""
    env.ram.buf[:] = 0
    wflag = WRITE if kernel == "rx" else 0
    env.put(0, env.gpa(DATA_OFF), 12 + 64, 0, AV | wflag)
    q = new_packed_state(4)
    q[Q_HDR_LEN] = 12
    q[Q_USED_WRAP] = 0  # used (0, lap 0), avail (0, lap 1): 4 in flight
    views = env.bind(env.addr(), 4, mode, q)
    before = _counters(q)
    if kernel == "tx":
        ret = run_tx(env, q, views, budget=2)
    elif kernel == "rx":
        ret = run_rx(env, q, views, make_frame(64), budget=2)
    else:
        rq, rv = _other(env, mode, WRITE, 2048)
        ret = _run_loopback(env, rq, rv, q, views)
        assert _counters(rq)[4:] == (0, 0, 0, 0)
    assert ret in (MORE, IDLE) and q[Q_ERROR] == 0
    assert _counters(q) == before


@pytest.mark.parametrize("mode", PATHS)
def test_cursor_beyond_the_ring_stays_in_it(env, mode):
    """Positions index the ring only bounded to [0, size) (item 5 of issue 16).  The ring ends where guest
    memory ends; cursors set past it (the control plane refuses such a base: this is the kernels' own bound)
    reach position 5 % 4 = 1, never the memory after the ring -- on the copy path that would be RING_UNMAPPED,
    on the direct path a read past the view -- and both paths agree."""
    size, off = 4, MAPPED - 64
    results = []
    for m in (Metadata.COPY, mode):
        env.ram.buf[:] = 0
        for i in range(size):  # not available: AVAIL differs from the wrap counter at 1 (lap 1) and 2 (lap 0)
            env.put(i, env.gpa(DATA_OFF), 12 + 64, i, 0 if i < 2 else AV | US, base=off)
        q = new_packed_state(size)
        q[Q_HDR_LEN] = 12
        q[Q_EVENT_IDX] = 1
        q[Q_NOTIFY_ON] = 0  # polling: going idle writes the device area
        q[Q_LAST_AVAIL] = q[Q_USED_IDX] = size + 1
        views = env.bind(env.addr(desc=off), size, m, q)
        assert q[Q_DIRECT] == int(m == Metadata.DIRECT)
        # nothing available at position 1: the device asks for a kick there, not at 5
        assert run_tx(env, q, views) == IDLE and q[Q_ERROR] == 0
        assert env.event(DEV_OFF) == (1 | 1 << 15, RING_EVENT_FLAGS_DESC)
        env.put(1, env.gpa(DATA_OFF), 12 + 64, 2, AV, base=off)
        assert run_tx(env, q, views) == MORE and q[Q_ERROR] == 0
        assert q[Q_CHAINS] == q[Q_PACKETS] == 1
        assert env.get(1, base=off) == (env.gpa(DATA_OFF), 0, 2, AV | US)
        results.append((q.copy(), env.ram.buf.copy()))
    (q_c, ram_c), (q_m, ram_m) = results
    keep = ~np.isin(np.arange(len(q_c)), [Q_DIRECT, Q_DESC_AT, Q_USED_AT])
    assert np.array_equal(q_c[keep], q_m[keep]) and np.array_equal(ram_c, ram_m)


# =========================================================================================================
# Errors: every class, both paths
def _err_cases(G):
    data = G(DATA_OFF)
    ind0 = G(IND_OFF)

    def table(entries):
        def write(env):
            for j, e in enumerate(entries):
                struct.pack_into(DESC_FMT, env.ram.mm, IND_OFF + 16 * j, *e)

        return write

    # (name, ring descriptors from position 0 (addr, len, id, flags without AVAIL/USED), table, cursor wrap,
    #  want, error, value or None); size 4, cursor at 0 with wrap 1 unless told
    return [
        ("head used this lap", [(data, 8, 0, AV | US)], None, ANY, QueueError.PACKED_BAD_WRAP, AV | US),
        (
            "chain into a used descriptor",
            [(data, 8, 0, NEXT | AV), (data, 8, 1, AV | US)],
            None,
            ANY,
            QueueError.PACKED_BAD_WRAP,
            1 << 16 | AV | US,
        ),
        (
            "chain into a descriptor not made available",
            [(data, 8, 0, NEXT | AV), (data, 8, 1, US)],
            None,
            ANY,
            QueueError.PACKED_BAD_WRAP,
            1 << 16 | US,
        ),
        (
            "chain into a stale descriptor",
            [(data, 8, 0, NEXT | AV), (data, 8, 1, 0)],
            None,
            ANY,
            QueueError.PACKED_BAD_WRAP,
            1 << 16,
        ),
        ("chain over the ring size", [(data, 8, 0, NEXT | AV)] * 4, None, ANY, QueueError.CHAIN_TOO_LONG, 0),
        ("id out of range", [(data, 8, 4, AV)], None, ANY, QueueError.PACKED_BAD_ID, 4),
        ("id 0xffff", [(data, 8, 9, NEXT | AV), (data, 8, 0xFFFF, AV)], None, ANY, QueueError.PACKED_BAD_ID, 0xFFFF),
        (
            "indirect id out of range",
            [(ind0, 16, 4, INDIRECT | AV)],
            table([(data, 8, 0, 0)]),
            ANY,
            QueueError.PACKED_BAD_ID,
            4,
        ),
        (
            "indirect after chained",
            [(data, 8, 0, NEXT | AV), (ind0, 16, 1, INDIRECT | AV)],
            table([(data, 8, 0, 0)]),
            ANY,
            QueueError.PACKED_INDIRECT_IN_CHAIN,
            1,
        ),
        (
            "indirect with next",
            [(ind0, 16, 0, INDIRECT | NEXT | AV)],
            table([(data, 8, 0, 0)]),
            ANY,
            QueueError.INDIRECT_WITH_NEXT,
            0,
        ),
        ("indirect len 0", [(ind0, 0, 0, INDIRECT | AV)], None, ANY, QueueError.INDIRECT_BAD_SIZE, 0),
        ("indirect len 15", [(ind0, 15, 0, INDIRECT | AV)], None, ANY, QueueError.INDIRECT_BAD_SIZE, 15),
        (
            "indirect too big",
            [(ind0, 16 * (MAX_INDIRECT + 1), 0, INDIRECT | AV)],
            None,
            ANY,
            QueueError.INDIRECT_BAD_SIZE,
            16 * (MAX_INDIRECT + 1),
        ),
        (
            "indirect unmapped",
            [(G(MAPPED + 4096), 32, 0, INDIRECT | AV)],
            None,
            ANY,
            QueueError.INDIRECT_UNMAPPED,
            G(MAPPED + 4096),
        ),
        (
            "indirect straddles end",
            [(G(MAPPED - 16), 32, 0, INDIRECT | AV)],
            None,
            ANY,
            QueueError.INDIRECT_UNMAPPED,
            G(MAPPED - 16),
        ),
        (
            "indirect huge addr",
            [((1 << 64) - 16, 16, 0, INDIRECT | AV)],
            None,
            ANY,
            QueueError.INDIRECT_UNMAPPED,
            (1 << 64) - 16,
        ),
        (
            "indirect nested",
            [(ind0, 32, 0, INDIRECT | AV)],
            table([(data, 8, 0, 0), (data, 16, 0, INDIRECT)]),
            ANY,
            QueueError.INDIRECT_NESTED,
            1,
        ),
        ("zero length", [(data, 0, 0, AV)], None, ANY, QueueError.ZERO_LENGTH, data),
        (
            "zero length in indirect",
            [(ind0, 32, 0, INDIRECT | AV)],
            table([(data, 8, 0, 0), (data + 8, 0, 0, 0)]),
            ANY,
            QueueError.ZERO_LENGTH,
            data + 8,
        ),
        ("address above memory", [(G(MAPPED), 8, 0, AV)], None, ANY, QueueError.BAD_ADDRESS, G(MAPPED)),
        ("address >= 2**62", [(ADDR_LIMIT, 8, 0, AV)], None, ANY, QueueError.BAD_ADDRESS, ADDR_LIMIT),
        ("write for a reader", [(data, 8, 0, WRITE | AV)], None, READ_ONLY, QueueError.BAD_DIRECTION, 0),
        ("read for a writer", [(data, 8, 0, AV)], None, WRITE_ONLY, QueueError.BAD_DIRECTION, 0),
        (
            "read after write",
            [(data, 8, 0, WRITE | NEXT | AV), (data, 8, 1, AV)],
            None,
            ANY,
            QueueError.BAD_DIRECTION,
            1,
        ),
        (
            "read after write (indirect)",
            [(ind0, 32, 0, INDIRECT | AV)],
            table([(data, 8, 0, WRITE), (data, 8, 0, 0)]),
            ANY,
            QueueError.BAD_DIRECTION,
            1,
        ),
    ]


ERR_NAMES = [c[0] for c in _err_cases(lambda o: o)]


@pytest.mark.parametrize("mode", PATHS)
@pytest.mark.parametrize("name", ERR_NAMES)
def test_walk_errors(env, mode, name):
    _, descs, table, want, err, value = {c[0]: c for c in _err_cases(env.gpa)}[name]
    env.ram.buf[:] = 0
    size = 4
    for i, d in enumerate(descs):
        env.put(i, *d)
    if table:
        table(env)
    q = new_packed_state(size)
    views = env.bind(env.addr(), size, mode, q)
    arena, tbl = env.mem.arena.view, env.mem.table
    f = read_head(q, views.desc, arena, tbl, 0, 1)
    if f >= 0:
        res = walk_packed(q, views.desc, arena, tbl, 0, 1, f, new_sg(size), want, size)
        assert tuple(int(x) for x in res) == (-1, 0, 0, 0, 0, 0)
    else:
        assert f == -1
    assert QueueError(int(q[Q_ERROR])) is err
    assert int(q[Q_ERROR_VALUE]) & 0xFFFF_FFFF_FFFF_FFFF == value


@pytest.mark.parametrize("mode", PATHS)
def test_indirect_table_flags(env, mode):
    """Within an indirect table only WRITE counts: NEXT/AVAIL/USED bits and ids are ignored, entries are taken
    in order and all of them; the indirect descriptor's own WRITE bit is ignored too."""
    env.ram.buf[:] = 0
    g = env.gpa(DATA_OFF)
    for j, e in enumerate([(g, 10, 77, NEXT | AV), (g + 100, 20, 0, US), (g + 200, 30, 5, WRITE | NEXT)]):
        struct.pack_into(DESC_FMT, env.ram.mm, IND_OFF + 16 * j, *e)
    env.put(0, env.gpa(IND_OFF), 48, 2, INDIRECT | WRITE | AV)
    q = new_packed_state(4)
    views = env.bind(env.addr(), 4, mode, q)
    assert take(env, q, views, 0, 1, ANY) == (2, 3, 30, 30, 1, 2) and q[Q_ERROR] == 0


@pytest.mark.parametrize("mode", PATHS)
def test_ring_unmapped(env, mode):
    """A descriptor ring whose second half lies outside guest memory: direct falls back to copy; chains in the
    mapped half work, the first access beyond breaks the queue with RING_UNMAPPED."""
    env.ram.buf[:] = 0
    size = 4
    off = MAPPED - 32
    q = new_packed_state(size)
    views = env.bind(env.addr(desc=off), size, mode, q)
    assert q[Q_DIRECT] == 0
    env.put(0, env.gpa(DATA_OFF), 8, 0, AV, base=off)
    env.put(1, env.gpa(DATA_OFF), 8, 1, AV | NEXT, base=off)
    assert run_tx(env, q, views) == BROKEN
    assert q[Q_ERROR] == QueueError.RING_UNMAPPED and q[Q_ERROR_VALUE] == q[Q_DESC]
    assert q[Q_CHAINS] == 1 and q[Q_USED_IDX] == q[Q_LAST_AVAIL] == 1  # the chain before the fault completed


@pytest.mark.parametrize("mode", PATHS)
def test_chains_before_a_fault_are_completed(env, driver, mode):
    drv = driver(8, mode)
    drv.ring.d[D_BATCH] = 4
    drive_tx(*drv.ring.views(), drv.ring.buf_gpa(0), 100, 1)
    assert drv.ring.d[D_POSTED] == 4
    env.put(2, *env.get(2)[:2], 8, env.get(2)[3])  # third chain: id 8 in a ring of 8
    assert run_tx(env, drv.q, drv.views) == BROKEN
    assert drv.q[Q_ERROR] == QueueError.PACKED_BAD_ID and drv.q[Q_ERROR_VALUE] == 8
    assert drv.q[Q_USED_IDX] == drv.q[Q_LAST_AVAIL] == 2 and drv.q[Q_PACKETS] == 2
    drv.ring.d[D_LIMIT] = drv.ring.d[D_POSTED]
    drive_tx(*drv.ring.views(), drv.ring.buf_gpa(0), 100, 1)
    assert drv.ring.d[D_DONE] == 2


# =========================================================================================================
def test_vring_base_encoding():
    assert encode_base(0, 1, 0, 1) == 0x8000_8000
    assert encode_base(0x7FFF, 0, 5, 1) == 0x8005_7FFF
    for a, aw, u, uw in [(0, 1, 0, 1), (17, 0, 3, 1), (0x7FFF, 1, 0x7FFF, 0), (1, 0, 1, 0)]:
        assert decode_base(encode_base(a, aw, u, uw)) == (a, aw, u, uw)
    # DPDK's virtio-user sends the avail half only: the used cursor is taken to be the same
    assert decode_base(0x8000) == (0, 1, 0, 1)
    assert decode_base(0x0123) == (0x123, 0, 0x123, 0)

"""Compiled split-ring fuzzer: random ring states generated in compiled code, run through the real kernels.

Guest memory is one memfd of 192 KiB of which the back-end's memory table maps three regions:

    file  [0, 256)            canary
          [256, 64K-64)       region A   GPA gA                 (rings, data)
          [64K-64, 64K+64)    canary
          [64K+64, 128K-128)  region B   GPA gB = end of A      (adjacent to A in GPA, not in the file)
          [128K-128, 128K+192) canary
          [128K+192, 192K-64) region C   GPA gC = end of B + 64K (a hole between B and C)
          [192K-64, 192K)     canary

Region boundaries are not page aligned, so the arena's page-rounded mappings include canary bytes on both
sides of every region: a stray access there would not fault, but it would change a canary, which is checked
after every state.  A stray access further away faults in the arena's PROT_NONE gaps (the campaign runs in a
subprocess, so a fault is a reported crash, not a dead test run).

Each state picks an operation -- ``tx_sink``, ``rx_source``, ``loopback`` or a bare ``walk_chain`` -- a queue
size (1..256), a ring placement (all in A; spread over C and B; or a part straddling a region end or lying in a
hole, which only the copy path can run), builds well-formed chains (direct, chained, indirect, across the A|B
seam) and then applies 0-5 hostile mutations (garbage addresses, lengths, flags, next fields, heads, index
jumps, loops, nested/odd indirect tables).  It runs the kernel on one path, or -- on a sample of the states
whose rings are bindable directly -- on both paths from the same memory image, and checks:

* the kernel returned (IDLE/MORE/BROKEN), BROKEN iff the queue has an error, an index jump always breaks;
* used index advanced == avail entries taken == chains counted <= available <= budget * batch;
* TX: packets + drops == chains; RX: packets + drops <= chains, packets <= limit; used entries name the heads;
* walk_chain: every segment lies inside one region of the arena, byte counts add up, direction respected;
* no canary byte changed;
* on the sample: copy == direct (return value, queue state, every byte of guest memory, scatter lists).
"""

from __future__ import annotations

import mmap
import os
import time

import numpy as np
from numba import njit

from pyvhost.devices import net_packed as NP
from pyvhost.devices.net import loopback, make_frame, rx_source, tx_sink
from pyvhost.errors import QueueError
from pyvhost.memory import SPACE_UVA, GuestMemory, translate
from pyvhost.protocol import ADDR_LIMIT, MemRegion
from pyvhost.ring.chain import READ_ONLY, WRITE_ONLY, walk_chain
from pyvhost.ring.packed import read_head, walk_packed
from pyvhost.ring.state import (
    Q_AVAIL,
    Q_AVAIL_WRAP,
    Q_BATCH,
    Q_CALLFD,
    Q_CHAINS,
    Q_DESC,
    Q_DIRECT,
    Q_DROPS,
    Q_ERROR,
    Q_EVENT_IDX,
    Q_FIELDS,
    Q_HDR_LEN,
    Q_LAST_AVAIL,
    Q_LIMIT,
    Q_MASK,
    Q_MRG,
    Q_NOTIFY_ON,
    Q_PACKED,
    Q_PACKETS,
    Q_SIGNALLED,
    Q_SIGNALLED_VALID,
    Q_SIZE,
    Q_USED,
    Q_USED_IDX,
    Q_USED_WRAP,
)

KiB = 1024
FILE_SIZE = 192 * KiB
A_OFF, A_END = 256, 64 * KiB - 64
B_OFF, B_END = 64 * KiB + 64, 128 * KiB - 128
C_OFF, C_END = 128 * KiB + 192, 192 * KiB - 64
GPA_A = 0x4000_0000
GPA_B = GPA_A + (A_END - A_OFF)
GPA_C = GPA_B + (B_END - B_OFF) + 64 * KiB
CANARY = 0xA5
MAX_N = 256
MAX_IND = 64  # entries of each generated indirect table
N_TABLES = 6
TABLES_OFF = C_OFF + 64 + 2 * 4096 + 64  # 6 tables of 1 KiB in region C
DATA = ((25 * KiB, A_END), (B_OFF, B_END - 8 * KiB), (C_OFF + 16 * KiB, C_END))
MAX_FRAME = 2000

# layout array indices (passed to compiled code)
L_A_OFF, L_A_END, L_B_OFF, L_B_END, L_C_OFF, L_C_END, L_GA, L_GB, L_GC, L_UVA = range(10)

OP_TX, OP_RX, OP_LOOP, OP_WALK = 0, 1, 2, 3
OP_NAMES = ("tx_sink", "rx_source", "loopback", "walk_chain")
IDLE, MORE, BROKEN = 0, 1, -1

# statistics slots
S_STATES, S_DIRECT, S_COPY, S_COMPARED, S_IDLE, S_MORE, S_BROKEN, S_CHAINS, S_PACKETS, S_SEGS = range(10)
S_OPS = 10  # 4 slots: states per op
S_ERR = 16  # 16 slots: broken queues per QueueError
S_PLACE = 32  # 8 slots: states per placement
S_FIELDS = 48

# violation codes
V_NAMES = {
    1: "bad return value",
    2: "BROKEN without an error (or an error without BROKEN)",
    3: "used index / avail taken / chains disagree",
    4: "more chains than were available",
    5: "more chains than budget * batch",
    6: "avail index jump did not break the queue",
    7: "TX packets + drops != chains",
    8: "RX packets + drops > chains or over the limit",
    9: "a used entry does not name the head made available",
    10: "a used entry past the index was written",
    11: "walk_chain segment outside the regions",
    12: "walk_chain byte counts do not add up",
    13: "walk_chain direction",
    14: "walk_chain failed without an error (or vice versa)",
    15: "a canary byte changed",
    16: "copy != direct: return value",
    17: "copy != direct: queue state",
    18: "copy != direct: guest memory",
    19: "copy != direct: scatter list",
    20: "an RX used length is longer than header + frame",
}


# ---------------------------------------------------------------------------------------------------------
# generation helpers (compiled)
@njit(cache=True)
def _u64():
    return (np.uint64(np.random.randint(0, 1 << 32)) << np.uint64(32)) | np.uint64(np.random.randint(0, 1 << 32))


@njit(cache=True)
def _or_u16(k):
    """Half the time a value below k, else any u16."""
    if np.random.randint(0, 2):
        return np.random.randint(0, k)
    return np.random.randint(0, 0x10000)


@njit(cache=True)
def _in_region(lay, off, n):
    return (
        (lay[L_A_OFF] <= off and off + n <= lay[L_A_END])
        or (lay[L_B_OFF] <= off and off + n <= lay[L_B_END])
        or (lay[L_C_OFF] <= off and off + n <= lay[L_C_END])
    )


@njit(cache=True)
def _gpa(lay, off):
    """GPA of a file offset inside a region."""
    if off < lay[L_A_END]:
        return lay[L_GA] + off - lay[L_A_OFF]
    if off < lay[L_B_END]:
        return lay[L_GB] + off - lay[L_B_OFF]
    return lay[L_GC] + off - lay[L_C_OFF]


@njit(cache=True)
def _w16(ram, lay, off, v):
    if _in_region(lay, off, 2):
        ram[off] = v & 0xFF
        ram[off + 1] = (v >> 8) & 0xFF


@njit(cache=True)
def _w32(ram, lay, off, v):
    if _in_region(lay, off, 4):
        for b in range(4):
            ram[off + b] = (v >> (8 * b)) & 0xFF


@njit(cache=True)
def _w64(ram, lay, off, v):
    if _in_region(lay, off, 8):
        for b in range(8):
            ram[off + b] = np.uint8((v >> np.uint64(8 * b)) & np.uint64(0xFF))


@njit(cache=True)
def _r16(ram, off):
    return np.int64(ram[off]) | (np.int64(ram[off + 1]) << 8)


@njit(cache=True)
def _r32(ram, off):
    return (
        np.int64(ram[off])
        | (np.int64(ram[off + 1]) << 8)
        | (np.int64(ram[off + 2]) << 16)
        | (np.int64(ram[off + 3]) << 24)
    )


@njit(cache=True)
def _wdesc(ram, lay, off, addr, length, flags, nxt):
    _w64(ram, lay, off, np.uint64(addr))
    word = (
        np.uint64(length & 0xFFFFFFFF)
        | (np.uint64(flags & 0xFFFF) << np.uint64(32))
        | (np.uint64(nxt & 0xFFFF) << np.uint64(48))
    )
    _w64(ram, lay, off + 8, word)


@njit(cache=True)
def _good_buf(lay, data, maxlen):
    """A valid buffer (gpa, length): inside a data area, or across the A|B seam (two regions, one buffer)."""
    length = np.random.randint(1, maxlen + 1)
    r = np.random.randint(0, 8)
    if r == 0 and length > 1:
        return lay[L_GB] - np.random.randint(1, length), length
    lo, hi = data[r % 3, 0], data[r % 3, 1]
    off = np.random.randint(lo, hi - length + 1)
    return _gpa(lay, off), length


@njit(cache=True)
def _bad_addr(lay):
    k = np.random.randint(0, 11)
    size_b = lay[L_B_END] - lay[L_B_OFF]
    size_c = lay[L_C_END] - lay[L_C_OFF]
    if k == 0:
        return np.uint64(0)
    if k == 1:
        return np.uint64(lay[L_GA] - np.random.randint(1, 65))
    if k == 2:
        return np.uint64(lay[L_GB] + size_b - np.random.randint(0, 65))
    if k == 3:
        return np.uint64(np.random.randint(lay[L_GB] + size_b, lay[L_GC]))
    if k == 4:
        return np.uint64(lay[L_GC] - np.random.randint(1, 65))
    if k == 5:
        return np.uint64(lay[L_GC] + size_c - np.random.randint(0, 65))
    if k == 6:
        return np.uint64(ADDR_LIMIT - np.random.randint(0, 65))
    if k == 7:
        return np.uint64(0xFFFFFFFFFFFFFFFF) - np.uint64(np.random.randint(0, 65))
    if k == 8:
        return _u64()
    if k == 9:
        return np.uint64(_gpa(lay, np.random.randint(4096, 24576)))  # onto the rings in A
    return np.uint64(lay[L_GB] - np.random.randint(1, 33))  # just before the seam


@njit(cache=True)
def _bad_len():
    k = np.random.randint(0, 8)
    if k == 0:
        return 0
    if k == 1:
        return 0xFFFFFFFF
    if k == 2:
        return 16 * 1025
    if k == 3:
        return 16 * 1024
    if k == 4:
        return np.random.randint(1, 16)
    if k == 5:
        return np.random.randint(0, 1 << 32)
    if k == 6:
        return 1
    return np.random.randint(0, 70000)


@njit(cache=True)
def _placement(lay, slot, n, p):
    """(desc, avail, used) file offsets of ring ``slot`` for placement p, and whether all lie in regions."""
    if p == 0:  # all in A
        return 4096 + slot * 12288, 8192 + slot * 12288, 10240 + slot * 12288
    if p == 1:  # spread: desc in C, avail/used in B (bindable)
        tail = lay[L_B_END] - 8192 + slot * 4096
        return lay[L_C_OFF] + 64 + slot * 4096, tail, tail + 1024
    if p == 2:  # desc table straddles the end of A (into a canary)
        return lay[L_A_END] - 16 * max(n // 2, 1), 8192 + slot * 12288, 10240 + slot * 12288
    if p == 3:  # avail flags/idx are the last bytes of B, the ring is outside
        return 4096 + slot * 12288, lay[L_B_END] - 4, 10240 + slot * 12288
    if p == 4:  # used idx is the last bytes of C, the entries are outside
        return 4096 + slot * 12288, 8192 + slot * 12288, lay[L_C_END] - 4
    # p == 5: desc table starts in the canary between A and B and runs into B
    return lay[L_A_END] + 16, 8192 + slot * 12288, 10240 + slot * 12288


@njit(cache=True)
def _gen_ring(ram, lay, data, slot, n, mode, gen, tables_used):
    """Write ring ``slot`` of size n into guest RAM; mode 0 readable, 1 writable, 2 mixed.
    gen gets: [desc, avail, used, placement, last_avail, used_idx, avail_idx, nheads, mutations]."""
    p = 0 if np.random.randint(0, 10) < 6 else np.random.randint(1, 6)
    d_off, a_off, u_off = _placement(lay, slot, n, p)
    mask = n - 1
    # garbage everywhere first (reachable only through a bad head or next)
    for i in range(n):
        f = _or_u16(8)
        _wdesc(ram, lay, d_off + 16 * i, _bad_addr(lay), _bad_len(), f, np.random.randint(0, 0x10000))
    # well-formed chains over a permutation of the descriptors
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = np.random.randint(0, i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    nfree = n
    heads = np.zeros(n, np.int64)
    nheads = 0
    in_chain = np.zeros(n, np.int64)
    nin = 0
    in_table = np.zeros((N_TABLES * MAX_IND, 2), np.int64)
    nint = 0
    target = np.random.randint(0, n + 1)
    wflag = 2 if mode == 1 else 0
    maxlen = 1500 if mode == 1 else 400
    while nfree > 0 and nheads < target:
        if tables_used[0] < N_TABLES and np.random.randint(0, 4) == 0:
            t = tables_used[0]
            tables_used[0] += 1
            k = np.random.randint(1, 9)
            t_off = TABLES_OFF + t * 1024
            for j in range(k):
                a, ln = _good_buf(lay, data, maxlen)
                fl = wflag
                if mode == 2 and j >= k // 2:
                    fl = 2
                nx = 0
                if j < k - 1:
                    fl |= 1
                    nx = j + 1
                _wdesc(ram, lay, t_off + 16 * j, a, ln, fl, nx)
                in_table[nint, 0] = t
                in_table[nint, 1] = j
                nint += 1
            nfree -= 1
            h = perm[nfree]
            _wdesc(ram, lay, d_off + 16 * h, _gpa(lay, t_off), 16 * k, 4, np.random.randint(0, 0x10000))
            heads[nheads] = h
            nheads += 1
            in_chain[nin] = h
            nin += 1
            continue
        k = np.random.randint(1, min(4, nfree) + 1)
        for j in range(k):
            i = perm[nfree - 1 - j]
            a, ln = _good_buf(lay, data, maxlen)
            fl = wflag
            if mode == 2 and j >= k // 2:
                fl = 2
            nx = np.random.randint(0, 0x10000)
            if j < k - 1:
                fl |= 1
                nx = perm[nfree - 2 - j]
            _wdesc(ram, lay, d_off + 16 * i, a, ln, fl, nx)
            in_chain[nin] = i
            nin += 1
        heads[nheads] = perm[nfree - 1]
        nheads += 1
        nfree -= k
    last_avail = np.random.randint(0, 0x10000)
    used_idx = np.random.randint(0, 0x10000)
    avail_idx = (last_avail + nheads) & 0xFFFF
    ring = np.zeros(n, np.int64)
    for s in range(n):
        ring[s] = np.random.randint(0, n) if np.random.randint(0, 4) else np.random.randint(0, 0x10000)
    for c in range(nheads):
        ring[(last_avail + c) & mask] = heads[c]
    # hostile mutations
    nmut = 0 if np.random.randint(0, 3) == 0 else np.random.randint(1, 6)
    for _ in range(nmut):
        kind = np.random.randint(0, 10)
        if kind <= 1:  # a field of a descriptor, mostly one the chains use
            i = in_chain[np.random.randint(0, nin)] if nin > 0 and np.random.randint(0, 4) else np.random.randint(0, n)
            f = np.random.randint(0, 4)
            o = d_off + 16 * i
            if f == 0:
                _w64(ram, lay, o, _bad_addr(lay))
            elif f == 1:
                _w32(ram, lay, o + 8, _bad_len())
            elif f == 2:
                _w16(ram, lay, o + 12, _or_u16(8))
            else:
                _w16(ram, lay, o + 14, _or_u16(n))
        elif kind == 2 and nint > 0:  # a field of an indirect table entry
            e = np.random.randint(0, nint)
            o = TABLES_OFF + in_table[e, 0] * 1024 + 16 * in_table[e, 1]
            f = np.random.randint(0, 4)
            if f == 0:
                _w64(ram, lay, o, _bad_addr(lay))
            elif f == 1:
                _w32(ram, lay, o + 8, _bad_len())
            elif f == 2:
                _w16(ram, lay, o + 12, np.random.randint(0, 8))
            else:
                _w16(ram, lay, o + 14, _or_u16(MAX_IND))
        elif kind == 3:  # an avail entry
            ring[np.random.randint(0, n)] = _or_u16(n)
        elif kind == 4:  # the avail index
            r = np.random.randint(0, 4)
            if r == 0:
                avail_idx = (last_avail + np.random.randint(0, n + 1)) & 0xFFFF
            elif r == 1:
                avail_idx = (last_avail + n + 1) & 0xFFFF
            elif r == 2:
                avail_idx = (last_avail - 1) & 0xFFFF
            else:
                avail_idx = np.random.randint(0, 0x10000)
        elif kind == 5 and nin > 0:  # a loop: a descriptor continuing to one of its chain's or itself
            i = in_chain[np.random.randint(0, nin)]
            o = d_off + 16 * i
            _w16(ram, lay, o + 12, (ram[o + 12] | 1) if _in_region(lay, o + 12, 2) else 1)
            _w16(ram, lay, o + 14, in_chain[np.random.randint(0, nin)])
        elif kind == 6 and nint > 0:  # a loop inside an indirect table
            e = np.random.randint(0, nint)
            o = TABLES_OFF + in_table[e, 0] * 1024 + 16 * in_table[e, 1]
            _w16(ram, lay, o + 12, 1 | (ram[o + 12] & 2))
            _w16(ram, lay, o + 14, np.random.randint(0, in_table[e, 1] + 1))
        elif kind == 7 and nint > 0:  # nested indirect
            e = np.random.randint(0, nint)
            o = TABLES_OFF + in_table[e, 0] * 1024 + 16 * in_table[e, 1]
            _w16(ram, lay, o + 12, ram[o + 12] | 4)
        elif kind == 8:  # an indirect descriptor of odd length, or the table of another
            i = np.random.randint(0, n)
            t = np.random.randint(0, N_TABLES)
            _wdesc(
                ram,
                lay,
                d_off + 16 * i,
                _gpa(lay, TABLES_OFF + t * 1024),
                16 * np.random.randint(0, MAX_IND + 1) + (np.random.randint(0, 16) if np.random.randint(0, 2) else 0),
                4 | (np.random.randint(0, 2) if np.random.randint(0, 4) == 0 else 0),
                0,
            )
        elif kind == 9:  # a whole-table loop, chain longer than the queue
            for i in range(n):
                a, ln = _good_buf(lay, data, 64)
                _wdesc(ram, lay, d_off + 16 * i, a, ln, wflag | 1, (i + 1) & mask)
    # the avail ring: flags, idx, ring, used_event
    _w16(ram, lay, a_off, np.random.randint(0, 2) if np.random.randint(0, 4) else np.random.randint(0, 0x10000))
    _w16(ram, lay, a_off + 2, avail_idx)
    for s in range(n):
        _w16(ram, lay, a_off + 4 + 2 * s, ring[s])
    if np.random.randint(0, 2):
        ue = (used_idx + np.random.randint(-4, 2 * n + 1)) & 0xFFFF
    else:
        ue = np.random.randint(0, 0x10000)
    _w16(ram, lay, a_off + 4 + 2 * n, ue)
    # the used ring: flags, idx, entries (a pattern the device must overwrite only below the index), avail_event
    _w16(ram, lay, u_off, np.random.randint(0, 2))
    _w16(ram, lay, u_off + 2, used_idx)
    for s in range(n):
        _w32(ram, lay, u_off + 4 + 8 * s, 0xEEEEEEEE)
        _w32(ram, lay, u_off + 8 + 8 * s, 0xEEEEEEEE)
    _w16(ram, lay, u_off + 4 + 8 * n, np.random.randint(0, 0x10000))
    gen[0], gen[1], gen[2], gen[3] = d_off, a_off, u_off, p
    gen[4], gen[5], gen[6], gen[7], gen[8] = last_avail, used_idx, avail_idx, nheads, nmut


@njit(cache=True)
def _bindable(table, uva, gen, n):
    return (
        translate(table, SPACE_UVA, uva + gen[0], 16 * n)[0] >= 0
        and translate(table, SPACE_UVA, uva + gen[1], 6 + 2 * n)[0] >= 0
        and translate(table, SPACE_UVA, uva + gen[2], 6 + 8 * n)[0] >= 0
    )


@njit(cache=True)
def _init_q(q, n, callfd, uva, gen, rx):
    q[:] = 0
    q[Q_SIZE] = n
    q[Q_MASK] = n - 1
    q[Q_CALLFD] = callfd
    q[Q_DESC] = uva + gen[0]
    q[Q_AVAIL] = uva + gen[1]
    q[Q_USED] = uva + gen[2]
    q[Q_LAST_AVAIL] = gen[4]
    q[Q_USED_IDX] = gen[5]
    q[Q_BATCH] = np.random.randint(1, 9) if np.random.randint(0, 2) else 256
    r = np.random.randint(0, 4)
    q[Q_HDR_LEN] = 12 if r < 2 else (10 if r == 2 else 0)
    q[Q_EVENT_IDX] = np.random.randint(0, 2)
    q[Q_NOTIFY_ON] = np.random.randint(-1, 2)
    q[Q_SIGNALLED] = np.random.randint(0, 0x10000)
    q[Q_SIGNALLED_VALID] = np.random.randint(0, 2)
    q[Q_MRG] = np.random.randint(0, 2) if rx else 0
    q[Q_LIMIT] = -1
    if rx and np.random.randint(0, 4) == 0:
        q[Q_LIMIT] = np.random.randint(0, 7)


@njit(cache=True)
def _views(arena, table, uva, gen, n, direct, empty64, empty16, empty32):
    """The ring's (desc, avail, used16, used32) as the back-end binds them: views, or empty for copy."""
    if not direct:
        return empty64, empty16, empty16, empty32
    d = translate(table, SPACE_UVA, uva + gen[0], 16 * n)[0]
    a = translate(table, SPACE_UVA, uva + gen[1], 6 + 2 * n)[0]
    u = translate(table, SPACE_UVA, uva + gen[2], 6 + 8 * n)[0]
    u32_len = (6 + 8 * n - 2) // 4 * 4
    return (
        arena[d : d + 16 * n].view(np.uint64),
        arena[a : a + 6 + 2 * n].view(np.uint16),
        arena[u : u + 6 + 8 * n].view(np.uint16),
        arena[u : u + u32_len].view(np.uint32),
    )


@njit(cache=True)
def _run(
    op,
    direct,
    q0,
    q1,
    g0,
    g1,
    n,
    arena,
    table,
    uva,
    sg,
    sgs,
    hdrbuf,
    max_frame,
    frame,
    budget,
    spins,
    want,
    head,
    e64,
    e16,
    e32,
    walk_out,
):
    """Run one op on one path; queue states q0 (and q1 for loopback: q0 = RX, q1 = TX) are updated."""
    q0[Q_DIRECT] = 1 if direct else 0
    q1[Q_DIRECT] = 1 if direct else 0
    d0, a0, u0, w0 = _views(arena, table, uva, g0, n, direct, e64, e16, e32)
    if op == OP_TX:
        return tx_sink(q0, d0, a0, u0, w0, arena, table, sg, budget, spins)
    if op == OP_RX:
        return rx_source(q0, d0, a0, u0, w0, arena, table, sgs, hdrbuf, frame, budget, spins)
    if op == OP_LOOP:
        d1, a1, u1, w1 = _views(arena, table, uva, g1, n, direct, e64, e16, e32)
        return loopback(q0, d0, a0, u0, w0, q1, d1, a1, u1, w1, arena, table, sg, sgs, hdrbuf, max_frame, budget, spins)
    nread, nseg, rb, wb = walk_chain(q0, d0, arena, table, head, sg, want)
    walk_out[0], walk_out[1], walk_out[2], walk_out[3] = nread, nseg, rb, wb
    return 0


@njit(cache=True)
def _check_single(op, ret, q, g, n, ram, budget, frame_len):
    """Invariants of one tx/rx run; 0 or a violation code."""
    if ret != IDLE and ret != MORE and ret != BROKEN:
        return 1
    if (ret == BROKEN) != (q[Q_ERROR] != 0):
        return 2
    adv = (q[Q_USED_IDX] - g[5]) & 0xFFFF
    taken = (q[Q_LAST_AVAIL] - g[4]) & 0xFFFF
    if not (adv == taken == q[Q_CHAINS]):
        return 3
    delta = (g[6] - g[4]) & 0xFFFF
    if delta > n:
        if q[Q_ERROR] != QueueError.AVAIL_IDX_JUMP or q[Q_CHAINS] != 0:
            return 6
    elif q[Q_CHAINS] > delta:
        return 4
    if q[Q_CHAINS] > budget * min(q[Q_BATCH], n):
        return 5
    if op == OP_TX and q[Q_PACKETS] + q[Q_DROPS] != q[Q_CHAINS]:
        return 7
    if op == OP_RX and (q[Q_PACKETS] + q[Q_DROPS] > q[Q_CHAINS] or (q[Q_LIMIT] >= 0 and q[Q_PACKETS] > q[Q_LIMIT])):
        return 8
    # avail and used rings mapped, and (RX) no mutation that could aim a buffer at the rings: the used entries
    # below the index name the heads taken
    if g[3] <= 1 and (op == OP_TX or g[8] == 0):
        for k in range(adv):
            slot = (g[5] + k) & (n - 1)
            head = _r16(ram, g[1] + 4 + 2 * ((g[4] + k) & (n - 1)))
            if op == OP_TX and (_r32(ram, g[2] + 4 + 8 * slot) != head or _r32(ram, g[2] + 8 + 8 * slot) != 0):
                return 9
            if op == OP_RX and _r32(ram, g[2] + 4 + 8 * slot) != head:
                return 9
            if op == OP_RX and _r32(ram, g[2] + 8 + 8 * slot) > q[Q_HDR_LEN] + frame_len:
                return 20
        if op == OP_TX:  # TX writes an entry only for a chain it completes
            for k in range(adv, n):
                slot = (g[5] + k) & (n - 1)
                if _r32(ram, g[2] + 4 + 8 * slot) != 0xEEEEEEEE or _r32(ram, g[2] + 8 + 8 * slot) != 0xEEEEEEEE:
                    return 10
    return 0


@njit(cache=True)
def _check_counts(q, g, n, budget):
    adv = (q[Q_USED_IDX] - g[5]) & 0xFFFF
    taken = (q[Q_LAST_AVAIL] - g[4]) & 0xFFFF
    if not (adv == taken == q[Q_CHAINS]):
        return 3
    delta = (g[6] - g[4]) & 0xFFFF
    if delta <= n and q[Q_CHAINS] > delta:
        return 4
    if q[Q_CHAINS] > budget * min(q[Q_BATCH], n):
        return 5
    return 0


@njit(cache=True)
def _check_walk(q, out, sg, want, regions):
    nread, nseg, rb, wb = out[0], out[1], out[2], out[3]
    if nread < 0:
        if q[Q_ERROR] == 0 or nseg != 0 or rb != 0 or wb != 0:
            return 14
        return 0
    if q[Q_ERROR] != 0:
        return 14
    if nread > nseg or nseg > sg.shape[0]:
        return 12
    sr = 0
    sw = 0
    for i in range(nseg):
        off, ln = sg[i, 0], sg[i, 1]
        inside = False
        for r in range(regions.shape[0]):
            if ln > 0 and regions[r, 0] <= off and off + ln <= regions[r, 0] + regions[r, 1]:
                inside = True
        if not inside:
            return 11
        if i < nread:
            sr += ln
        else:
            sw += ln
    if sr != rb or sw != wb:
        return 12
    if (want == READ_ONLY and nseg != nread) or (want == WRITE_ONLY and nread != 0):
        return 13
    return 0


@njit(cache=True)
def _canaries_ok(ram, lay):
    for lo, hi in (
        (0, lay[L_A_OFF]),
        (lay[L_A_END], lay[L_B_OFF]),
        (lay[L_B_END], lay[L_C_OFF]),
        (lay[L_C_END], ram.shape[0]),
    ):
        for i in range(lo, hi):
            if ram[i] != CANARY:
                return False
    return True


@njit(cache=True)
def fuzz_ring(
    seed,
    count,
    sample,
    ram,
    lay,
    data,
    arena,
    table,
    regions,
    callfd,
    frame_src,
    stats,
    info,
    snap,
    ram_c,
    sgt_c,
    qs,
    gs,
):
    """Run ``count`` states seeded ``seed``; return 0, or a violation code with ``info`` = [state, op,
    placement, size, path (0 copy, 1 direct, 2 both)].  A state depends on the seed and on the states before
    it (memory is not cleared between states), so a failure replays by rerunning the chunk."""
    np.random.seed(seed)
    e64 = np.zeros(0, np.uint64)
    e16 = np.zeros(0, np.uint16)
    e32 = np.zeros(0, np.uint32)
    q0 = qs[0]
    q1 = qs[1]
    q0c = np.zeros(Q_FIELDS, np.int64)
    q1c = np.zeros(Q_FIELDS, np.int64)
    q0i = np.zeros(Q_FIELDS, np.int64)
    q1i = np.zeros(Q_FIELDS, np.int64)
    g0 = gs[0]
    g1 = gs[1]
    hdrbuf = np.zeros(16, np.uint8)
    max_frame = 70000
    sg_tx = np.zeros((MAX_N + 1024, 2), np.int64)
    sg_rx = np.zeros((2, MAX_N + 1024, 2), np.int64)
    walk_out = np.zeros(4, np.int64)
    walk_c = np.zeros(4, np.int64)
    uva = lay[L_UVA]
    tables_used = np.zeros(1, np.int64)
    for s in range(count):
        op = np.random.randint(0, 4)
        n = 1 << np.random.randint(0, 9)
        tables_used[0] = 0
        mode = 0 if op == OP_TX else (1 if op == OP_RX else (0 if op == OP_LOOP else 2))
        _gen_ring(ram, lay, data, 0, n, 1 if op == OP_LOOP else mode, g0, tables_used)
        if op == OP_LOOP:
            _gen_ring(ram, lay, data, 1, n, 0, g1, tables_used)
        _init_q(q0, n, callfd, uva, g0, op != OP_TX)
        if op == OP_LOOP:
            _init_q(q1, n, callfd, uva, g1, False)
            q1[Q_HDR_LEN] = q0[Q_HDR_LEN]
        else:
            q1[:] = 0
        budget = np.random.randint(1, 5)
        spins = np.random.randint(1, 3)
        flen = np.random.randint(60, MAX_FRAME + 1)
        frame = frame_src[:flen]
        want = np.random.randint(0, 3)
        first_slot = g0[1] + 4 + 2 * (g0[4] & (n - 1))
        if g0[7] > 0 and np.random.randint(0, 4) > 0 and _in_region(lay, first_slot, 2):
            head = _r16(ram, first_slot)  # the first chain made available
        elif np.random.randint(0, 8) == 0:
            head = np.random.randint(0, 0x10000)
        else:
            head = np.random.randint(0, n + 1)
        cap = n + 1024
        sg = sg_tx[:cap]
        sgs = sg_rx[:, :cap]
        bind = _bindable(table, uva, g0, n) and (op != OP_LOOP or _bindable(table, uva, g1, n))
        stats[S_STATES] += 1
        stats[S_OPS + op] += 1
        stats[S_PLACE + g0[3]] += 1
        info[0], info[1], info[2], info[3] = s, op, g0[3], n
        both = bind and sample > 0 and s % sample == 0
        if both:
            # the copy path from this image, then the direct path from the same image
            info[4] = 2
            snap[:] = ram
            q0i[:] = q0
            q1i[:] = q1
            ret_c = _run(
                op,
                False,
                q0,
                q1,
                g0,
                g1,
                n,
                arena,
                table,
                uva,
                sg,
                sgs,
                hdrbuf,
                max_frame,
                frame,
                budget,
                spins,
                want,
                head,
                e64,
                e16,
                e32,
                walk_c,
            )
            q0c[:] = q0
            q1c[:] = q1
            ram_c[:] = ram
            sgt_c[:cap] = sg
            ram[:] = snap
            q0[:] = q0i
            q1[:] = q1i
            ret = _run(
                op,
                True,
                q0,
                q1,
                g0,
                g1,
                n,
                arena,
                table,
                uva,
                sg,
                sgs,
                hdrbuf,
                max_frame,
                frame,
                budget,
                spins,
                want,
                head,
                e64,
                e16,
                e32,
                walk_out,
            )
            stats[S_COMPARED] += 1
            stats[S_DIRECT] += 1
            stats[S_COPY] += 1
            if ret != ret_c:
                return 16
            for f in range(Q_FIELDS):
                if f != Q_DIRECT and (q0[f] != q0c[f] or q1[f] != q1c[f]):
                    return 17
            for i in range(ram.shape[0]):
                if ram[i] != ram_c[i]:
                    return 18
            if op == OP_WALK:
                for i in range(4):
                    if walk_out[i] != walk_c[i]:
                        return 19
                for i in range(max(walk_out[1], 0)):
                    if sg[i, 0] != sgt_c[i, 0] or sg[i, 1] != sgt_c[i, 1]:
                        return 19
        else:
            direct = bind and np.random.randint(0, 2) == 1
            info[4] = 1 if direct else 0
            ret = _run(
                op,
                direct,
                q0,
                q1,
                g0,
                g1,
                n,
                arena,
                table,
                uva,
                sg,
                sgs,
                hdrbuf,
                max_frame,
                frame,
                budget,
                spins,
                want,
                head,
                e64,
                e16,
                e32,
                walk_out,
            )
            stats[S_DIRECT if direct else S_COPY] += 1
        # invariants
        if op == OP_WALK:
            v = _check_walk(q0, walk_out, sg, want, regions)
            if v:
                return v
            if walk_out[0] >= 0:
                stats[S_SEGS] += walk_out[1]
        elif op == OP_LOOP:
            if ret != IDLE and ret != MORE and ret != BROKEN:
                return 1
            if (ret == BROKEN) != (q0[Q_ERROR] != 0 or q1[Q_ERROR] != 0):
                return 2
            v = _check_counts(q0, g0, n, budget) or _check_counts(q1, g1, n, budget)
            if v:
                return v
            # every TX chain taken is a packet or a drop; a TX packet is an RX packet or an RX drop
            if q1[Q_PACKETS] + q1[Q_DROPS] != q1[Q_CHAINS] or q1[Q_PACKETS] != q0[Q_PACKETS] + q0[Q_DROPS]:
                return 7
        else:
            v = _check_single(op, ret, q0, g0, n, ram, budget, flen)
            if v:
                return v
        if not _canaries_ok(ram, lay):
            return 15
        if op != OP_WALK:
            stats[S_IDLE if ret == IDLE else (S_MORE if ret == MORE else S_BROKEN)] += 1
            stats[S_CHAINS] += q0[Q_CHAINS] + q1[Q_CHAINS]
            stats[S_PACKETS] += q0[Q_PACKETS] + (q1[Q_PACKETS] if op == OP_LOOP else 0)
        err = q0[Q_ERROR] if q0[Q_ERROR] else q1[Q_ERROR]
        if err:
            stats[S_ERR + err] += 1
    return 0


# ---------------------------------------------------------------------------------------------------------
# packed rings: the same layout, a descriptor ring and two 4-byte event areas per ring
AVAIL_F = 1 << 7
USED_F = 1 << 15
NOT_AVAIL = -2


@njit(cache=True)
def _pbits(w):
    """AVAIL/USED flags of a descriptor the driver makes available in lap ``w``."""
    return AVAIL_F if w else USED_F


@njit(cache=True)
def _lin(pos, wrap, n):
    return pos if wrap else pos + n


@njit(cache=True)
def _pplacement(lay, slot, n, p):
    """(desc ring, driver area, device area) file offsets of packed ring ``slot`` for placement p."""
    if p == 0:
        return 4096 + slot * 12288, 8192 + slot * 12288, 10240 + slot * 12288
    if p == 1:
        tail = lay[L_B_END] - 8192 + slot * 4096
        return lay[L_C_OFF] + 64 + slot * 4096, tail, tail + 1024
    if p == 2:  # the descriptor ring straddles the end of A
        return lay[L_A_END] - 16 * max(n // 2, 1), 8192 + slot * 12288, 10240 + slot * 12288
    if p == 3:  # the driver area lies in the canary after B
        return 4096 + slot * 12288, lay[L_B_END] + 4, 10240 + slot * 12288
    if p == 4:  # the device area lies in the canary after C
        return 4096 + slot * 12288, 8192 + slot * 12288, lay[L_C_END] + 4
    return lay[L_A_END] + 16, 8192 + slot * 12288, 10240 + slot * 12288


@njit(cache=True)
def _gen_packed(ram, lay, data, slot, n, mode, gen, tables_used):
    """Write packed ring ``slot`` of size n; gen gets [desc, driver, device, placement, avail pos, avail wrap,
    used pos, used wrap, chains, mutations]."""
    p = 0 if np.random.randint(0, 10) < 6 else np.random.randint(1, 6)
    d_off, drv_off, dev_off = _pplacement(lay, slot, n, p)
    a = np.random.randint(0, n)
    aw = np.random.randint(0, 2)
    lead = 0 if np.random.randint(0, 4) else np.random.randint(0, n + 1)  # descriptors in flight at the start
    u, uw = a - lead, aw
    if u < 0:
        u += n
        uw ^= 1
    # every descriptor first: a used one of the previous lap (not available), or garbage
    for i in range(n):
        w = aw if i >= a else aw ^ 1  # the lap position i is in, seen from the avail cursor
        if np.random.randint(0, 8):
            fl = AVAIL_F | USED_F if w == 0 else 0  # used in the lap before: AVAIL = USED = !w
        else:
            fl = np.random.randint(0, 0x10000)
        _wdesc(ram, lay, d_off + 16 * i, _bad_addr(lay), _bad_len(), 0, 0)
        _w16(ram, lay, d_off + 16 * i + 12, np.random.randint(0, 0x10000))
        _w16(ram, lay, d_off + 16 * i + 14, fl)
    # the driver's chains, from the avail cursor, within the room the ring has
    room = n - lead
    wflag = 2 if mode == 1 else 0
    maxlen = 1500 if mode == 1 else 400
    pos, w = a, aw
    used_desc = 0
    nheads = 0
    chain_pos = np.zeros(n, np.int64)  # ring positions the chains use
    chain_last = np.zeros(n, np.int64)  # 1: the last descriptor of its chain
    nin = 0
    in_table = np.zeros((N_TABLES * MAX_IND, 2), np.int64)
    nint = 0
    target = np.random.randint(0, n + 1)
    while used_desc < room and nheads < target:
        bid = np.random.randint(0, n)
        if tables_used[0] < N_TABLES and np.random.randint(0, 4) == 0:
            t = tables_used[0]
            tables_used[0] += 1
            k = np.random.randint(1, 9)
            t_off = TABLES_OFF + t * 1024
            for j in range(k):
                ad, ln = _good_buf(lay, data, maxlen)
                fl = wflag
                if mode == 2 and j >= k // 2:
                    fl = 2
                _wdesc(ram, lay, t_off + 16 * j, ad, ln, 0, 0)  # entries are sequential: flags in the top half
                _w16(ram, lay, t_off + 16 * j + 14, fl)
                in_table[nint, 0] = t
                in_table[nint, 1] = j
                nint += 1
            _wdesc(ram, lay, d_off + 16 * pos, _gpa(lay, t_off), 16 * k, 0, 0)
            _w16(ram, lay, d_off + 16 * pos + 12, bid)
            _w16(ram, lay, d_off + 16 * pos + 14, 4 | _pbits(w))
            chain_pos[nin] = pos
            chain_last[nin] = 1
            nin += 1
            used_desc += 1
            pos += 1
            if pos == n:
                pos = 0
                w ^= 1
            nheads += 1
            continue
        k = np.random.randint(1, min(4, room - used_desc) + 1)
        for j in range(k):
            ad, ln = _good_buf(lay, data, maxlen)
            fl = wflag
            if mode == 2 and j >= k // 2:
                fl = 2
            if j < k - 1:
                fl |= 1
            _wdesc(ram, lay, d_off + 16 * pos, ad, ln, 0, 0)
            _w16(ram, lay, d_off + 16 * pos + 12, bid if j == k - 1 else np.random.randint(0, 0x10000))
            _w16(ram, lay, d_off + 16 * pos + 14, fl | _pbits(w))
            chain_pos[nin] = pos
            chain_last[nin] = 1 if j == k - 1 else 0
            nin += 1
            pos += 1
            if pos == n:
                pos = 0
                w ^= 1
        used_desc += k
        nheads += 1
    nmut = 0 if np.random.randint(0, 3) == 0 else np.random.randint(1, 6)
    for _ in range(nmut):
        kind = np.random.randint(0, 10)
        i = chain_pos[np.random.randint(0, nin)] if nin > 0 and np.random.randint(0, 4) else np.random.randint(0, n)
        o = d_off + 16 * i
        if kind == 0:
            _w64(ram, lay, o, _bad_addr(lay))
        elif kind == 1:
            _w32(ram, lay, o + 8, _bad_len())
        elif kind == 2:  # the AVAIL/USED bits (a used descriptor of this lap, or not available)
            if _in_region(lay, o + 14, 2):
                _w16(ram, lay, o + 14, _r16(ram, o + 14) ^ (AVAIL_F if np.random.randint(0, 2) else USED_F))
        elif kind == 3:  # a buffer id
            bid = np.random.randint(n, 0x10000) if np.random.randint(0, 2) else np.random.randint(0, n)
            _w16(ram, lay, o + 12, bid)
        elif kind == 4:  # INDIRECT or NEXT where they do not belong
            if _in_region(lay, o + 14, 2):
                _w16(ram, lay, o + 14, _r16(ram, o + 14) | (4 if np.random.randint(0, 2) else 1))
        elif kind == 5:  # random flags
            _w16(ram, lay, o + 14, np.random.randint(0, 0x10000))
        elif kind == 6 and nint > 0:  # an indirect table entry
            e = np.random.randint(0, nint)
            to = TABLES_OFF + in_table[e, 0] * 1024 + 16 * in_table[e, 1]
            f = np.random.randint(0, 3)
            if f == 0:
                _w64(ram, lay, to, _bad_addr(lay))
            elif f == 1:
                _w32(ram, lay, to + 8, _bad_len())
            else:
                _w16(ram, lay, to + 14, np.random.randint(0, 8))
        elif kind == 7:  # an indirect descriptor of odd length
            t = np.random.randint(0, N_TABLES)
            _wdesc(
                ram,
                lay,
                o,
                _gpa(lay, TABLES_OFF + t * 1024),
                16 * np.random.randint(0, MAX_IND + 1) + (np.random.randint(0, 16) if np.random.randint(0, 2) else 0),
                0,
                0,
            )
            _w16(ram, lay, o + 12, np.random.randint(0, n))
            if _in_region(lay, o + 14, 2):
                _w16(ram, lay, o + 14, (_r16(ram, o + 14) & (AVAIL_F | USED_F)) | 4)
        elif kind == 8:  # every descriptor available and chained: a chain longer than the ring allows
            pp, ww = a, aw
            for _k in range(n):
                ad, ln = _good_buf(lay, data, 64)
                _wdesc(ram, lay, d_off + 16 * pp, ad, ln, 0, 0)
                _w16(ram, lay, d_off + 16 * pp + 14, 1 | wflag | _pbits(ww))
                pp += 1
                if pp == n:
                    pp = 0
                    ww ^= 1
        else:  # the descriptor after the driver's chains made available without a chain behind it
            _w16(ram, lay, d_off + 16 * pos + 14, np.random.randint(0, 8) | _pbits(w))
    # the driver's event suppression area: off_wrap, flags (0 enable, 1 disable, 2 desc, 3 reserved)
    _w16(ram, lay, drv_off, np.random.randint(0, 0x10000))
    _w16(ram, lay, drv_off + 2, np.random.randint(0, 4) if np.random.randint(0, 4) else np.random.randint(0, 0x10000))
    _w16(ram, lay, dev_off, np.random.randint(0, 0x10000))
    _w16(ram, lay, dev_off + 2, np.random.randint(0, 0x10000))
    gen[0], gen[1], gen[2], gen[3] = d_off, drv_off, dev_off, p
    gen[4], gen[5], gen[6], gen[7], gen[8], gen[9] = a, aw, u, uw, nheads, nmut


@njit(cache=True)
def _pbindable(table, uva, gen, n):
    return (
        translate(table, SPACE_UVA, uva + gen[0], 16 * n)[0] >= 0
        and translate(table, SPACE_UVA, uva + gen[1], 4)[0] >= 0
        and translate(table, SPACE_UVA, uva + gen[2], 4)[0] >= 0
    )


@njit(cache=True)
def _init_pq(q, n, callfd, uva, gen, rx):
    _init_q(q, n, callfd, uva, gen, rx)
    q[Q_PACKED] = 1
    q[Q_LAST_AVAIL], q[Q_AVAIL_WRAP], q[Q_USED_IDX], q[Q_USED_WRAP] = gen[4], gen[5], gen[6], gen[7]
    q[Q_SIGNALLED] = np.random.randint(0, 2 * n)


@njit(cache=True)
def _pviews(arena, table, uva, gen, n, direct, empty64, empty16):
    if not direct:
        return empty64, empty16, empty16
    d = translate(table, SPACE_UVA, uva + gen[0], 16 * n)[0]
    a = translate(table, SPACE_UVA, uva + gen[1], 4)[0]
    u = translate(table, SPACE_UVA, uva + gen[2], 4)[0]
    return arena[d : d + 16 * n].view(np.uint64), arena[a : a + 4].view(np.uint16), arena[u : u + 4].view(np.uint16)


@njit(cache=True)
def _run_packed(
    op,
    direct,
    q0,
    q1,
    g0,
    g1,
    n,
    arena,
    table,
    uva,
    sg,
    sgs,
    sh0,
    sh1,
    hdrbuf,
    max_frame,
    frame,
    budget,
    spins,
    want,
    room,
    e64,
    e16,
    walk_out,
):
    q0[Q_DIRECT] = 1 if direct else 0
    q1[Q_DIRECT] = 1 if direct else 0
    d0, r0, v0 = _pviews(arena, table, uva, g0, n, direct, e64, e16)
    if op == OP_TX:
        return NP.tx_sink(q0, d0, r0, v0, arena, table, sg, sh0, budget, spins)
    if op == OP_RX:
        return NP.rx_source(q0, d0, r0, v0, arena, table, sgs, sh0, hdrbuf, frame, budget, spins)
    if op == OP_LOOP:
        d1, r1, v1 = _pviews(arena, table, uva, g1, n, direct, e64, e16)
        return NP.loopback(
            q0, d0, r0, v0, q1, d1, r1, v1, arena, table, sg, sgs, sh0, sh1, hdrbuf, max_frame, budget, spins
        )
    f = read_head(q0, d0, arena, table, q0[Q_LAST_AVAIL], q0[Q_AVAIL_WRAP])
    walk_out[:] = 0
    walk_out[6] = f
    if f < 0:
        return 0
    r = walk_packed(q0, d0, arena, table, q0[Q_LAST_AVAIL], q0[Q_AVAIL_WRAP], f, sg, want, room)
    for i in range(6):
        walk_out[i] = r[i]
    return 0


@njit(cache=True)
def _pcheck_counts(q, g, n, budget, lead0):
    if q[Q_LAST_AVAIL] < 0 or q[Q_LAST_AVAIL] >= n or q[Q_USED_IDX] < 0 or q[Q_USED_IDX] >= n:
        return 3
    if q[Q_CHAINS] > budget * min(q[Q_BATCH], n):
        return 5
    m = 2 * n
    lead = (_lin(q[Q_LAST_AVAIL], q[Q_AVAIL_WRAP], n) - _lin(q[Q_USED_IDX], q[Q_USED_WRAP], n) + m) % m
    if lead != lead0:
        return 3  # every chain taken in a pass is completed in that pass, whatever breaks
    if g[9] == 0 and q[Q_CHAINS] > budget * g[8]:
        return 4
    return 0


@njit(cache=True)
def fuzz_packed(
    seed,
    count,
    sample,
    ram,
    lay,
    data,
    arena,
    table,
    regions,
    callfd,
    frame_src,
    stats,
    info,
    snap,
    ram_c,
    sgt_c,
    qs,
    gs,
):
    """fuzz_ring for packed rings (the net_packed kernels and walk_packed)."""
    np.random.seed(seed)
    e64 = np.zeros(0, np.uint64)
    e16 = np.zeros(0, np.uint16)
    q0 = qs[0]
    q1 = qs[1]
    q0c = np.zeros(Q_FIELDS, np.int64)
    q1c = np.zeros(Q_FIELDS, np.int64)
    q0i = np.zeros(Q_FIELDS, np.int64)
    q1i = np.zeros(Q_FIELDS, np.int64)
    g0 = gs[0]
    g1 = gs[1]
    hdrbuf = np.zeros(16, np.uint8)
    max_frame = 70000
    sg_tx = np.zeros((MAX_N + 1024, 2), np.int64)
    sg_rx = np.zeros((2, MAX_N + 1024, 2), np.int64)
    sh0_all = np.zeros((MAX_N, 3), np.int64)
    sh1_all = np.zeros((MAX_N, 3), np.int64)
    walk_out = np.zeros(7, np.int64)
    walk_c = np.zeros(7, np.int64)
    uva = lay[L_UVA]
    tables_used = np.zeros(1, np.int64)
    for s in range(count):
        op = np.random.randint(0, 4)
        n = 1 << np.random.randint(0, 9) if np.random.randint(0, 2) else np.random.randint(1, MAX_N + 1)
        tables_used[0] = 0
        mode = 0 if op == OP_TX else (1 if op == OP_RX else (0 if op == OP_LOOP else 2))
        _gen_packed(ram, lay, data, 0, n, 1 if op == OP_LOOP else mode, g0, tables_used)
        if op == OP_LOOP:
            _gen_packed(ram, lay, data, 1, n, 0, g1, tables_used)
        _init_pq(q0, n, callfd, uva, g0, op != OP_TX)
        if op == OP_LOOP:
            _init_pq(q1, n, callfd, uva, g1, False)
            q1[Q_HDR_LEN] = q0[Q_HDR_LEN]
        else:
            q1[:] = 0
        m = 2 * n
        lead0 = (_lin(q0[Q_LAST_AVAIL], q0[Q_AVAIL_WRAP], n) - _lin(q0[Q_USED_IDX], q0[Q_USED_WRAP], n) + m) % m
        lead1 = (
            (_lin(q1[Q_LAST_AVAIL], q1[Q_AVAIL_WRAP], n) - _lin(q1[Q_USED_IDX], q1[Q_USED_WRAP], n) + m) % m
            if op == OP_LOOP
            else 0
        )
        budget = np.random.randint(1, 5)
        spins = np.random.randint(1, 3)
        flen = np.random.randint(60, MAX_FRAME + 1)
        frame = frame_src[:flen]
        want = np.random.randint(0, 3)
        room = max(n - lead0, 1)
        cap = n + 1024
        sg = sg_tx[:cap]
        sgs = sg_rx[:, :cap]
        sh0 = sh0_all[:n]
        sh1 = sh1_all[:n]
        bind = _pbindable(table, uva, g0, n) and (op != OP_LOOP or _pbindable(table, uva, g1, n))
        stats[S_STATES] += 1
        stats[S_OPS + op] += 1
        stats[S_PLACE + g0[3]] += 1
        info[0], info[1], info[2], info[3] = s, op, g0[3], n
        if bind and sample > 0 and s % sample == 0:
            info[4] = 2
            snap[:] = ram
            q0i[:] = q0
            q1i[:] = q1
            ret_c = _run_packed(
                op,
                False,
                q0,
                q1,
                g0,
                g1,
                n,
                arena,
                table,
                uva,
                sg,
                sgs,
                sh0,
                sh1,
                hdrbuf,
                max_frame,
                frame,
                budget,
                spins,
                want,
                room,
                e64,
                e16,
                walk_c,
            )
            q0c[:] = q0
            q1c[:] = q1
            ram_c[:] = ram
            sgt_c[:cap] = sg
            ram[:] = snap
            q0[:] = q0i
            q1[:] = q1i
            ret = _run_packed(
                op,
                True,
                q0,
                q1,
                g0,
                g1,
                n,
                arena,
                table,
                uva,
                sg,
                sgs,
                sh0,
                sh1,
                hdrbuf,
                max_frame,
                frame,
                budget,
                spins,
                want,
                room,
                e64,
                e16,
                walk_out,
            )
            stats[S_COMPARED] += 1
            stats[S_DIRECT] += 1
            stats[S_COPY] += 1
            if ret != ret_c:
                return 16
            for f in range(Q_FIELDS):
                if f != Q_DIRECT and (q0[f] != q0c[f] or q1[f] != q1c[f]):
                    return 17
            for i in range(ram.shape[0]):
                if ram[i] != ram_c[i]:
                    return 18
            if op == OP_WALK:
                for i in range(7):
                    if walk_out[i] != walk_c[i]:
                        return 19
                for i in range(max(walk_out[1], 0)):
                    if sg[i, 0] != sgt_c[i, 0] or sg[i, 1] != sgt_c[i, 1]:
                        return 19
        else:
            direct = bind and np.random.randint(0, 2) == 1
            info[4] = 1 if direct else 0
            ret = _run_packed(
                op,
                direct,
                q0,
                q1,
                g0,
                g1,
                n,
                arena,
                table,
                uva,
                sg,
                sgs,
                sh0,
                sh1,
                hdrbuf,
                max_frame,
                frame,
                budget,
                spins,
                want,
                room,
                e64,
                e16,
                walk_out,
            )
            stats[S_DIRECT if direct else S_COPY] += 1
        if op == OP_WALK:
            if walk_out[6] >= 0:  # the head was available: the walk ran
                v = _check_walk(q0, walk_out, sg, want, regions)
                if v:
                    return v
                if walk_out[0] >= 0:
                    if walk_out[4] < 1 or walk_out[4] > room or walk_out[5] >= n:
                        return 12
                    stats[S_SEGS] += walk_out[1]
            elif walk_out[6] == -1 and q0[Q_ERROR] == 0:
                return 14
        else:
            if ret != IDLE and ret != MORE and ret != BROKEN:
                return 1
            if (ret == BROKEN) != (q0[Q_ERROR] != 0 or q1[Q_ERROR] != 0):
                return 2
            v = _pcheck_counts(q0, g0, n, budget, lead0)
            if v:
                return v
            if op == OP_LOOP:
                v = _pcheck_counts(q1, g1, n, budget, lead1)
                if v:
                    return v
                if q1[Q_PACKETS] + q1[Q_DROPS] != q1[Q_CHAINS] or q1[Q_PACKETS] != q0[Q_PACKETS] + q0[Q_DROPS]:
                    return 7
            elif op == OP_TX and q0[Q_PACKETS] + q0[Q_DROPS] != q0[Q_CHAINS]:
                return 7
            elif op == OP_RX and (
                q0[Q_PACKETS] + q0[Q_DROPS] > q0[Q_CHAINS] or (q0[Q_LIMIT] >= 0 and q0[Q_PACKETS] > q0[Q_LIMIT])
            ):
                return 8
            stats[S_IDLE if ret == IDLE else (S_MORE if ret == MORE else S_BROKEN)] += 1
            stats[S_CHAINS] += q0[Q_CHAINS] + q1[Q_CHAINS]
            stats[S_PACKETS] += q0[Q_PACKETS] + (q1[Q_PACKETS] if op == OP_LOOP else 0)
        if not _canaries_ok(ram, lay):
            return 15
        err = q0[Q_ERROR] if q0[Q_ERROR] else q1[Q_ERROR]
        if err:
            stats[S_ERR + err] += 1
    return 0


# ---------------------------------------------------------------------------------------------------------
class RingFuzzEnv:
    """The memfd, the back-end's GuestMemory with regions A, B, C, and the buffers the compiled loop uses."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("pyvhost-fuzz", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, FILE_SIZE)
        self.mm = mmap.mmap(self.fd, FILE_SIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.ram = np.frombuffer(self.mm, dtype=np.uint8)
        self.ram[:] = CANARY
        uva = self.ram.ctypes.data
        self.lay = np.array([A_OFF, A_END, B_OFF, B_END, C_OFF, C_END, GPA_A, GPA_B, GPA_C, uva], np.int64)
        self.data = np.array(DATA, np.int64)
        self.mem = GuestMemory(arena_size=1 << 30)
        regions = [
            MemRegion(GPA_A, A_END - A_OFF, uva + A_OFF, A_OFF),
            MemRegion(GPA_B, B_END - B_OFF, uva + B_OFF, B_OFF),
            MemRegion(GPA_C, C_END - C_OFF, uva + C_OFF, C_OFF),
        ]
        self.mem.set_table(regions, [self.fd] * 3)
        self.regions = np.array([[r.offset, r.desc.memory_size] for r in self.mem.regions], np.int64)
        self.callfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.frame = np.concatenate([make_frame(MAX_FRAME)])
        self.snap = np.zeros(FILE_SIZE, np.uint8)
        self.ram_c = np.zeros(FILE_SIZE, np.uint8)
        self.sgt_c = np.zeros((MAX_N + 1024, 2), np.int64)
        self.qs = np.zeros((2, Q_FIELDS), np.int64)  # the queue states and generator outputs of the last state
        self.gs = np.zeros((2, 10), np.int64)

    def run(
        self, seed: int, count: int, sample: int, stats: np.ndarray, info: np.ndarray, layout: str = "split"
    ) -> int:
        fn = fuzz_packed if layout == "packed" else fuzz_ring
        return int(
            fn(
                seed,
                count,
                sample,
                self.ram,
                self.lay,
                self.data,
                self.mem.arena.view,
                self.mem.table,
                self.regions,
                self.callfd,
                self.frame,
                stats,
                info,
                self.snap,
                self.ram_c,
                self.sgt_c,
                self.qs,
                self.gs,
            )
        )

    def close(self) -> None:
        os.close(self.callfd)
        self.mem.close()
        self.ram = None  # type: ignore[assignment]
        self.mm.close()
        os.close(self.fd)


def describe_stats(stats: np.ndarray) -> dict:
    return {
        "states": int(stats[S_STATES]),
        "per_op": {OP_NAMES[i]: int(stats[S_OPS + i]) for i in range(4)},
        "per_placement": {
            p: int(stats[S_PLACE + i])
            for i, p in enumerate(
                [
                    "all in A",
                    "spread C/B",
                    "desc straddles A end",
                    "avail straddles B end",
                    "used straddles C end",
                    "desc from hole into B",
                ]
            )
        },
        "direct_runs": int(stats[S_DIRECT]),
        "copy_runs": int(stats[S_COPY]),
        "copy_vs_direct_compared": int(stats[S_COMPARED]),
        "returns": {"idle": int(stats[S_IDLE]), "more": int(stats[S_MORE]), "broken": int(stats[S_BROKEN])},
        "chains": int(stats[S_CHAINS]),
        "packets": int(stats[S_PACKETS]),
        "walk_segments": int(stats[S_SEGS]),
        "broken_by": {QueueError(i).name: int(stats[S_ERR + i]) for i in range(1, len(QueueError)) if stats[S_ERR + i]},
    }


def campaign(states: int, seed: int = 1, sample: int = 16, chunk: int = 50_000, layout: str = "split") -> dict:
    """Run ``states`` ring states (``layout`` split or packed) in chunks, chunk k seeded ``seed * 1_000_003 + k``;
    raise AssertionError, with the replay command, on the first violated invariant."""
    env = RingFuzzEnv()
    stats = np.zeros(S_FIELDS, np.int64)
    info = np.zeros(5, np.int64)
    t0 = time.perf_counter()
    try:
        done = 0
        k = 0
        while done < states:
            n = min(chunk, states - done)
            chunk_seed = seed * 1_000_003 + k
            v = env.run(chunk_seed, n, sample, stats, info, layout)
            if v:
                raise AssertionError(
                    f"{layout} ring fuzzer: {V_NAMES.get(v, v)} at state {int(info[0])} of chunk seed {chunk_seed} "
                    f"(op {OP_NAMES[int(info[1])]}, placement {int(info[2])}, size {int(info[3])}, path "
                    f"{['copy', 'direct', 'both'][int(info[4])]}); replay: tools/fuzz.py ring --layout {layout} "
                    f"--replay-seed {chunk_seed} --states {int(info[0]) + 1} --sample {sample}"
                )
            done += n
            k += 1
    finally:
        env.close()
    out = {"layout": layout, **describe_stats(stats)}
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def replay(chunk_seed: int, states: int, sample: int = 16, layout: str = "split") -> dict:
    """Rerun one chunk up to its failing state; returns the violation, the state's queue states and counts."""
    env = RingFuzzEnv()
    stats = np.zeros(S_FIELDS, np.int64)
    info = np.zeros(5, np.int64)
    try:
        v = env.run(chunk_seed, states, sample, stats, info, layout)
        qs = env.qs.copy()
        gs = env.gs.copy()
    finally:
        env.close()
    return {
        "violation": V_NAMES.get(v) if v else None,
        "info": info.tolist(),
        "q": qs.tolist(),
        "gen": gs.tolist(),
        **describe_stats(stats),
    }

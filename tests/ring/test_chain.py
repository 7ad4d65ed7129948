"""Scatter-list helpers of ring/chain.py against numpy: the payload byte sum (sink-read's checksum) over any
segment layout -- unaligned heads and tails, segments of 0-7 bytes, offsets into the chain -- and the copies."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvhost.ring.chain import SG_COLUMNS, byte_sum, sg_copy, sg_sum

ARENA = 1 << 16
_DATA = np.random.default_rng(7).integers(0, 256, ARENA, dtype=np.uint8)


def _mem(fill: int | None = None) -> np.ndarray:
    """A fresh arena copy (random bytes, or every byte ``fill``: the largest sums)."""
    return _DATA.copy() if fill is None else np.full(ARENA, fill, np.uint8)


#: a segment: (arena offset, length); short ones (0-7 bytes) as likely as longer ones
segment = st.tuples(
    st.integers(0, ARENA - 4096),
    st.one_of(st.integers(0, 7), st.integers(8, 64), st.integers(65, 4096)),
)


def _sg(segs: list[tuple[int, int]]) -> np.ndarray:
    sg = np.zeros((max(len(segs), 1), SG_COLUMNS), np.int64)
    for i, (off, n) in enumerate(segs):
        sg[i] = off, n
    return sg


def _chain_bytes(mem: np.ndarray, segs: list[tuple[int, int]]) -> np.ndarray:
    return np.concatenate([mem[o : o + n] for o, n in segs]) if segs else np.zeros(0, np.uint8)


@settings(max_examples=300, deadline=None)
@given(
    base=st.integers(0, 15),
    off=st.integers(0, 4096),
    n=st.one_of(st.integers(0, 16), st.integers(0, 20000)),
    fill=st.sampled_from([None, 255]),
)
def test_byte_sum_is_numpys(base, off, n, fill):
    """Every start and length against every alignment of the array itself (``base``: a view that does not
    start on an 8-byte boundary)."""
    mem = _mem(fill)[base:]
    assert byte_sum(mem, off, n) == int(mem[off : off + n].sum(dtype=np.uint64))


def test_byte_sum_folds_before_a_lane_overflows():
    """All 0xFF bytes over many fold periods: a lane folded late would wrap."""
    mem = np.full(1 << 20, 255, np.uint8)
    for off, n in [(0, 1 << 20), (3, (1 << 20) - 3), (5, 128 * 8), (1, 128 * 8 + 7), (0, 129 * 8)]:
        assert byte_sum(mem, off, n) == 255 * n


@settings(max_examples=300, deadline=None)
@given(segs=st.lists(segment, max_size=8), skip=st.integers(0, 9000), fill=st.sampled_from([None, 255]))
def test_sg_sum_is_numpys(segs, skip, fill):
    """The sum from ``skip`` bytes into the chain equals numpy's over the chain's bytes after ``skip``."""
    mem = _mem(fill)
    want = int(_chain_bytes(mem, segs)[skip:].sum(dtype=np.uint64))
    assert sg_sum(mem, _sg(segs), 0, len(segs), skip) == want


@settings(max_examples=200, deadline=None)
@given(
    src=st.lists(segment, min_size=1, max_size=6),
    dst_lens=st.lists(st.one_of(st.integers(1, 7), st.integers(8, 1800)), min_size=1, max_size=6),
    src_off=st.integers(0, 64),
    dst_off=st.integers(0, 64),
    length=st.integers(0, 12000),
)
def test_sg_copy_is_numpys(src, dst_lens, src_off, dst_off, length):
    """A copy between two chains (destination segments apart from the source's) moves exactly the bytes a
    numpy copy of the concatenated chains would, and writes nothing outside the destination's bytes."""
    mem = _mem()
    dst, at = [], ARENA - 4096 * 3 + 1  # destination segments after every source segment, unaligned
    src = [(o % (ARENA - 4096 * 4), n) for o, n in src]
    for n in dst_lens:
        dst.append((at, n))
        at += n + 3
    before = mem.copy()
    sbytes = _chain_bytes(before, src)
    want = max(0, min(length, len(sbytes) - src_off, sum(dst_lens) - dst_off))
    done = sg_copy(mem, _sg(dst), 0, len(dst), dst_off, _sg(src), 0, len(src), src_off, length)
    assert done == want
    expect = before.copy()
    flat = _chain_bytes(before, dst)
    flat[dst_off : dst_off + want] = sbytes[src_off : src_off + want]
    pos = 0
    for o, n in dst:
        expect[o : o + n] = flat[pos : pos + n]
        pos += n
    np.testing.assert_array_equal(mem, expect)

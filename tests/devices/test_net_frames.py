"""``serve net --mode source``: every frame carries its sequence number and a valid UDP checksum
(devices/net_frame.py), on both ring layouts and both metadata paths; a receiver's check catches a torn or a
stale frame."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvhost.devices.net import make_frame
from pyvhost.devices.net_frame import SEQ_OFF, UDP_CSUM_OFF, check_frame, frame_sum, stamp, udp_checksum_ok
from pyvhost.frontend.net import Frontend
from pyvhost.frontend.packed import PackedDriverRing
from pyvhost.frontend.ram import BUF_SIZE

HDR = 12  # virtio_net_hdr with num_buffers


def completions(fe: Frontend, n: int) -> list[bytes]:
    """The frames of the first ``n`` completions of RX ring 0, in completion order (each buffer used once)."""
    ring = fe.rings[0]
    out = []
    for k in range(n):
        if isinstance(ring, PackedDriverRing):
            word = int(ring.desc[2 * k + 1])
            head, length = (word >> 32) & 0xFFFF, word & 0xFFFFFFFF
        else:
            head, length = int(ring.used32[1 + 2 * k]), int(ring.used32[2 + 2 * k])
        off = ring.bufs_off + head * BUF_SIZE
        out.append(bytes(fe.ram.buf[off + HDR : off + length]))
    return out


@pytest.mark.parametrize("layout", ["split", "packed"])
@pytest.mark.parametrize("metadata", ["direct", "copy"])
@pytest.mark.parametrize("pkt_size", [60, 61, 1500])
def test_source_frames_are_numbered_and_checksummed(serve, sock_path, metadata, layout, pkt_size):
    size = 128
    serve("source", metadata, pkt_size=pkt_size, numbered=True)
    with Frontend(sock_path, queue_size=size, ram_size=8 << 20, packed=layout == "packed") as fe:
        fe.setup()
        fe.run("rx", count=size, batch=size, timeout=30)  # the whole ring posted in one batch: no buffer reused
        frames = completions(fe, size)
        fe.drain("rx")
    assert [len(f) for f in frames] == [pkt_size] * size
    assert [check_frame(f) for f in frames] == list(range(size))


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_plain_frames_when_not_numbered(serve, sock_path, layout):
    """NetDevice(numbered=False) (the Python API's default; serve's --plain-frames): identical frames."""
    serve("source", "direct", pkt_size=100)
    with Frontend(sock_path, queue_size=16, ram_size=8 << 20, packed=layout == "packed") as fe:
        fe.setup()
        fe.run("rx", count=16, batch=16, timeout=30)
        frames = completions(fe, 16)
        fe.drain("rx")
    assert frames == [make_frame(100).tobytes()] * 16


@given(size=st.integers(60, 2000), seq=st.integers(0, 2**63 - 1), flip=st.integers(0, 1999))
def test_stamp_gives_a_valid_checksum_and_check_catches_damage(size, seq, flip):
    frame = make_frame(size)
    stamp(frame, frame_sum(frame, frame.shape[0]), np.int64(seq))
    good = frame.tobytes()
    assert udp_checksum_ok(good) and check_frame(good) == seq
    # a byte changed anywhere the checksum covers (UDP header onwards, or the IP addresses)
    at = 26 + flip % (size - 26)
    bad = bytearray(good)
    bad[at] ^= 0x5A
    assert check_frame(bytes(bad)) is None
    # a stale frame's body with another frame's number (torn at the number)
    torn = bytearray(good)
    torn[SEQ_OFF : SEQ_OFF + 8] = struct.pack("!Q", seq + 1)
    assert check_frame(bytes(torn)) is None
    assert check_frame(good[:SEQ_OFF]) is None  # too short to carry a number
    assert good[UDP_CSUM_OFF : UDP_CSUM_OFF + 2] != b"\0\0"  # zero would mean "no checksum"

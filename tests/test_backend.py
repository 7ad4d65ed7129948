"""End to end: the pyvhost frontend against an in-process pyvhost server, both metadata paths."""

from __future__ import annotations

import select
import time

import numpy as np
import pytest

from pyvhost.devices.net import make_frame
from pyvhost.frontend.net import Frontend
from pyvhost.frontend.ram import BUF_SIZE
from pyvhost.ring.split import VRING_DESC_F_NEXT as NEXT
from pyvhost.ring.split import VRING_DESC_F_WRITE as WRITE

from .test_hostile import QSIZE, RAM, Guest

PATHS = ["direct", "copy"]


@pytest.mark.parametrize("metadata", PATHS)
def test_sink_counts_exactly(serve, sock_path, metadata):
    srv = serve("sink", metadata)
    with Frontend(sock_path) as fe:
        fe.setup()
        srv.assert_path(metadata, [1])
        r = fe.run("tx", count=200_000)
        final = fe.drain("tx")
    assert r["packets"] == final["packets"] == 200_000
    stats = srv.ended()[-1]
    assert stats[1]["packets"] == 200_000 and stats[1]["error"] == 0 and stats[1]["drops"] == 0
    assert stats[1]["bytes"] == 200_000 * 64


@pytest.mark.parametrize("metadata", PATHS)
def test_source_counts_exactly(serve, sock_path, metadata):
    srv = serve("source", metadata, count=150_000, pkt_size=128)
    with Frontend(sock_path) as fe:
        fe.setup()
        srv.assert_path(metadata, [0])
        r = fe.run("rx", count=150_000)
        final = fe.drain("rx")
    assert r["packets"] == final["packets"] == 150_000
    assert final["bytes"] == 150_000 * 128
    stats = srv.ended()[-1]
    assert stats[0]["packets"] == 150_000 and stats[0]["error"] == 0


@pytest.mark.parametrize("metadata", PATHS)
def test_source_mergeable_rx_buffers(serve, sock_path, metadata):
    """A 3000-byte frame does not fit one 2048-byte buffer: with MRG_RXBUF it spans two, num_buffers = 2."""
    srv = serve("source", metadata, count=10, pkt_size=3000)
    with Frontend(sock_path) as fe:
        fe.setup()
        srv.assert_path(metadata, [0])
        fe.run("rx", count=20)
        ring = fe.rings[0]
        frame = make_frame(3000)
        for k in range(10):
            (id1, len1), (id2, len2) = (ring.used32[1 + 2 * i : 3 + 2 * i] for i in (2 * k, 2 * k + 1))
            assert (len1, len2) == (BUF_SIZE, 3000 + 12 - BUF_SIZE)
            b1 = fe.ram.buf[ring.bufs_off + id1 * BUF_SIZE :][:len1]
            b2 = fe.ram.buf[ring.bufs_off + id2 * BUF_SIZE :][:len2]
            assert int(b1[10]) | int(b1[11]) << 8 == 2  # num_buffers
            assert np.array_equal(np.concatenate([b1[12:], b2]), frame)


@pytest.mark.parametrize("metadata", PATHS)
def test_two_queue_pairs_count_separately(serve, sock_path, metadata):
    """MQ: queue 2k receives and 2k+1 transmits; each TX queue has its own worker and counters."""
    srv = serve("sink", metadata, queue_pairs=2)
    with Frontend(sock_path, queue_pairs=2) as fe:
        fe.setup()
        srv.assert_path(metadata, [1, 3])
        assert fe.protocol_features & (1 << 0)  # VHOST_USER_PROTOCOL_F_MQ
        fe.run("tx", count=30_000, pair=0)
        fe.run("tx", count=50_000, pair=1)
        assert fe.drain("tx", pair=0)["packets"] == 30_000
        assert fe.drain("tx", pair=1)["packets"] == 50_000
    stats = srv.ended()[-1]
    assert stats[1]["packets"] == 30_000 and stats[3]["packets"] == 50_000
    assert stats[0]["packets"] == stats[2]["packets"] == 0


def _numbered(seq: int) -> bytes:
    """TX buffer contents for frame ``seq``: the 12-byte header, then a frame of a length and body that name it."""
    return bytes(12) + make_frame(60 + seq % 451, seq).tobytes()


@pytest.mark.parametrize("metadata", PATHS)
def test_loopback_delivers_numbered_frames_exactly(serve, sock_path, metadata):
    """Loopback, frame by frame: 2000 frames, each of its own length and sequence number, posted on TX;
    each must arrive on RX once, in order, with its own length and bytes (a frame taken twice, skipped, torn
    or mixed up with another shows here, unlike with identical frames)."""
    srv = serve("loopback", metadata)
    total = 2000
    with Frontend(sock_path, queue_size=QSIZE, ram_size=RAM) as fe:
        fe.setup()
        srv.assert_path(metadata, [0, 1])
        rx, tx = Guest(fe, 0), Guest(fe, 1)
        try:
            for i in range(QSIZE):
                rx.desc(i, rx.ring.buf_gpa(i), 2048, WRITE)
            rx.post(*range(QSIZE))
            sent = received = 0
            deadline = time.monotonic() + 60
            while received < total:
                assert time.monotonic() < deadline, f"{received} of {total} frames received"
                while sent < total and sent - tx.used < QSIZE:  # post on TX what the ring has room for
                    slot = sent % QSIZE
                    data = _numbered(sent)
                    off = tx.ring.bufs_off + slot * 2048
                    fe.ram.buf[off : off + len(data)] = np.frombuffer(data, np.uint8)
                    tx.desc(slot, tx.ring.buf_gpa(slot), len(data))
                    tx.post(slot)
                    sent += 1
                heads = []
                while (rx.used - received) & 0xFFFF:
                    slot = received % QSIZE
                    head, length = int(rx.ring.used32[1 + 2 * slot]), int(rx.ring.used32[2 + 2 * slot])
                    got = bytes(fe.ram.buf[rx.ring.bufs_off + head * 2048 :][:length])
                    want = _numbered(received)
                    assert length == len(want) and got[12:] == want[12:], (
                        f"frame {received}: {length} bytes, expected {len(want)}"
                    )
                    heads.append(head)
                    received += 1
                if heads:
                    rx.post(*heads)
                else:
                    time.sleep(0.0005)
            assert not select.select([rx.err_fd, tx.err_fd], [], [], 0)[0]
        finally:
            rx.close()
            tx.close()
    stats = srv.ended()[-1]
    lengths = sum(len(_numbered(s)) - 12 for s in range(total))
    assert stats[1]["packets"] == stats[0]["packets"] == total
    assert stats[1]["bytes"] == stats[0]["bytes"] == lengths, stats


@pytest.mark.parametrize("metadata", PATHS)
def test_loopback_scattered_chains_exactly(serve, sock_path, metadata):
    """Loopback copies each frame once, from the TX segments straight into the RX segments: 400 numbered
    frames, each posted as three TX buffers cut at its own places (the virtio-net header split across them or
    sharing one with the frame's first bytes), each received into RX buffers of 40-129 bytes (MRG_RXBUF,
    num_buffers counting them): every frame must arrive once, in order, byte for byte."""
    srv = serve("loopback", metadata)
    total = 400
    rx_len = [40 + (j * 53) % 90 for j in range(QSIZE)]
    with Frontend(sock_path, queue_size=QSIZE, ram_size=RAM) as fe:
        fe.setup()
        srv.assert_path(metadata, [0, 1])
        rx, tx = Guest(fe, 0), Guest(fe, 1)
        try:
            for j in range(QSIZE):
                rx.desc(j, rx.ring.buf_gpa(j), rx_len[j], WRITE)
            rx.post(*range(QSIZE))
            received = 0
            for i in range(total):
                data = _numbered(i)
                c1 = 3 + i % 30
                c2 = c1 + 1 + (i * 7) % 40
                for d, (a, b) in enumerate(((0, c1), (c1, c2), (c2, len(data)))):
                    off = tx.ring.bufs_off + d * BUF_SIZE
                    fe.ram.buf[off : off + b - a] = np.frombuffer(data[a:b], np.uint8)
                    tx.desc(d, tx.ring.buf_gpa(d), b - a, NEXT if d < 2 else 0, d + 1)
                tx.post(0)
                tx.wait_used((i + 1) & 0xFFFF)
                parts, heads = [], []
                deadline = time.monotonic() + 10
                while True:  # the RX chains of frame i: num_buffers of them
                    while rx.used == (received + len(heads)) & 0xFFFF:
                        assert time.monotonic() < deadline, f"frame {i}: {len(heads)} RX buffers so far"
                        time.sleep(0.0002)
                    slot = (received + len(heads)) % QSIZE
                    head, length = int(rx.ring.used32[1 + 2 * slot]), int(rx.ring.used32[2 + 2 * slot])
                    assert length <= rx_len[head]
                    parts.append(bytes(fe.ram.buf[rx.ring.bufs_off + head * BUF_SIZE :][:length]))
                    heads.append(head)
                    got = b"".join(parts)
                    if len(got) >= len(data):
                        break
                assert int(got[10]) | int(got[11]) << 8 == len(heads), f"frame {i}: num_buffers"
                assert len(got) == len(data) and got[12:] == data[12:], f"frame {i}: bytes differ"
                received += len(heads)
                rx.post(*heads)
            assert not select.select([rx.err_fd, tx.err_fd], [], [], 0)[0]
        finally:
            rx.close()
            tx.close()
    stats = srv.ended()[-1]
    assert stats[1]["packets"] == stats[0]["packets"] == total
    assert stats[1]["drops"] == stats[0]["drops"] == 0
    assert stats[0]["bytes"] == sum(len(_numbered(s)) - 12 for s in range(total)), stats


@pytest.mark.parametrize("metadata", PATHS)
def test_sink_read_checksums_every_payload_byte(serve, sock_path, metadata):
    """sink-read reads every payload byte: 500 numbered frames of their own lengths and bytes, the device's
    checksum is the sum of exactly their payload bytes (the headers' bytes left out)."""
    srv = serve("sink-read", metadata)
    total = 500
    with Frontend(sock_path, queue_size=QSIZE, ram_size=RAM) as fe:
        fe.setup()
        srv.assert_path(metadata, [1])
        tx = Guest(fe, 1)
        try:
            for sent in range(total):
                slot = sent % QSIZE
                data = _numbered(sent)
                data = data[:12].replace(bytes(12), bytes(range(1, 13))) + data[12:]  # header bytes are not summed
                off = tx.ring.bufs_off + slot * 2048
                fe.ram.buf[off : off + len(data)] = np.frombuffer(data, np.uint8)
                tx.desc(slot, tx.ring.buf_gpa(slot), len(data))
                tx.post(slot)
                tx.wait_used((sent + 1) & 0xFFFF)
        finally:
            tx.close()
    stats = srv.ended()[-1][1]
    assert stats["packets"] == total and stats["error"] == stats["drops"] == 0
    want = sum(sum(_numbered(s)[12:]) for s in range(total))
    assert srv.device.stats() == {"payload_checksum": {"1": want}}


@pytest.mark.parametrize("metadata", PATHS)
def test_sink_counts_numbered_frames_exactly(serve, sock_path, metadata):
    """Sink, frame by frame: 3000 frames of their own lengths; the byte count names exactly which were
    counted (the sink reads no payload, so lengths are what it can get wrong)."""
    srv = serve("sink", metadata)
    total = 3000
    with Frontend(sock_path, queue_size=QSIZE, ram_size=RAM) as fe:
        fe.setup()
        srv.assert_path(metadata, [1])
        tx = Guest(fe, 1)
        try:
            sent = 0
            while sent < total:
                while sent < total and sent - tx.used < QSIZE:
                    slot = sent % QSIZE
                    data = _numbered(sent)
                    off = tx.ring.bufs_off + slot * 2048
                    fe.ram.buf[off : off + len(data)] = np.frombuffer(data, np.uint8)
                    tx.desc(slot, tx.ring.buf_gpa(slot), len(data))
                    tx.post(slot)
                    sent += 1
                time.sleep(0.0005)
            tx.wait_used(total & 0xFFFF)
            ids = tx.used_ids()[-QSIZE:]
            assert ids == [s % QSIZE for s in range(total - QSIZE, total)]  # completed in order, each once
        finally:
            tx.close()
    stats = srv.ended()[-1][1]
    assert stats["packets"] == total and stats["error"] == stats["drops"] == 0
    assert stats["bytes"] == sum(len(_numbered(s)) - 12 for s in range(total)), stats

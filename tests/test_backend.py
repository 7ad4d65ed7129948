"""End to end: the pyvhost frontend against an in-process pyvhost server, both metadata paths."""

from __future__ import annotations

import pytest

from pyvhost.frontend import Frontend

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
    import numpy as np

    from pyvhost.devices.net import make_frame
    from pyvhost.frontend import BUF_SIZE

    srv = serve("source", metadata, count=10, pkt_size=3000)
    with Frontend(sock_path) as fe:
        fe.setup()
        srv.assert_path(metadata, [0])
        fe.run("rx", count=20)
        ring = fe.rings[0]
        frame = make_frame(3000)
        for k in range(10):
            (id1, len1), (id2, len2) = (ring.used32[1 + 2 * i:3 + 2 * i] for i in (2 * k, 2 * k + 1))
            assert (len1, len2) == (BUF_SIZE, 3000 + 12 - BUF_SIZE)
            b1 = fe.ram.buf[ring.bufs_off + id1 * BUF_SIZE:][:len1]
            b2 = fe.ram.buf[ring.bufs_off + id2 * BUF_SIZE:][:len2]
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

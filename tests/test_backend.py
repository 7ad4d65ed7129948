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
        r = fe.run("rx", count=150_000)
        final = fe.drain("rx")
    assert r["packets"] == final["packets"] == 150_000
    assert final["bytes"] == 150_000 * 128
    stats = srv.ended()[-1]
    assert stats[0]["packets"] == 150_000 and stats[0]["error"] == 0

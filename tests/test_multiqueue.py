"""Multiqueue net (VIRTIO_NET_F_MQ): the features and config a device with several pairs offers, traffic on
every pair, and the ``--cpus`` pinning of the pairs' workers (one thread per pair, each on its CPU)."""

from __future__ import annotations

import argparse
import os
import struct

import pytest

from pyvhost import protocol as P
from pyvhost.cli import cpu_list
from pyvhost.devices.base import VIRTIO_F_VERSION_1
from pyvhost.devices.net import VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ, Mode, multiqueue_features
from pyvhost.frontend.net import Frontend, FrontendError

from .test_invalidation import EXTRA, EXTRA_SIZE, MemSlotsFrontend


def test_cpu_list():
    assert cpu_list("3") == (3,)
    assert cpu_list("0,2,4-6") == (0, 2, 4, 5, 6)
    assert cpu_list("1, 0") == (1, 0)  # the order given: worker k on the k-th
    for bad in ("", "a", "3-1", "-1", "0,,1"):
        with pytest.raises(argparse.ArgumentTypeError):
            cpu_list(bad)


def test_multiqueue_features():
    assert multiqueue_features(1) == 0
    assert multiqueue_features(2) == (1 << VIRTIO_NET_F_MQ) | (1 << VIRTIO_NET_F_CTRL_VQ)
    for bad in (0, 0x8001):
        with pytest.raises(ValueError):
            multiqueue_features(bad)


@pytest.mark.parametrize("mode", [Mode.SINK, Mode.SOURCE])
def test_two_pairs_each_carry_traffic_on_their_pinned_worker(serve, sock_path, mode):
    cpus = sorted(os.sched_getaffinity(0))
    pins = (cpus[-1], cpus[0])  # pair 0 on the last allowed CPU, pair 1 on the first
    srv = serve(mode, queue_pairs=2)
    srv.server.cpus = pins
    direction = "tx" if mode is Mode.SINK else "rx"
    with Frontend(sock_path, queue_pairs=2) as fe:
        fe.setup()
        assert fe.features & (1 << VIRTIO_F_VERSION_1)
        assert P.U64.unpack(fe.request(P.Request.GET_QUEUE_NUM))[0] == 4
        offered = P.U64.unpack(fe.request(P.Request.GET_FEATURES))[0]
        assert offered & (1 << VIRTIO_NET_F_MQ) and offered & (1 << VIRTIO_NET_F_CTRL_VQ)
        assert struct.unpack_from("<H", srv.device.config_space(), 8)[0] == 2  # max_virtqueue_pairs
        workers = dict(srv.connection.workers)
        # a sink's TX queues; a source's RX queues, and its TX queues (a sink: a driver's transmissions never stall)
        assert sorted(workers) == ([(1,), (3,)] if mode is Mode.SINK else [(0,), (1,), (2,), (3,)])
        for group, w in workers.items():
            pin = pins[group[0] // 2]  # both workers of a pair on that pair's CPU
            assert w.cpu == pin and os.sched_getaffinity(w.native_id) == {pin}, group
        for pair in (0, 1):
            r = fe.run(direction, count=2000, pair=pair, timeout=120)
            assert r["packets"] >= 2000 and r["len_errors"] == 0
        finals = [fe.drain(direction, pair)["packets"] for pair in (0, 1)]
    stats = srv.ended()[-1]
    for pair in (0, 1):
        q = stats[2 * pair + (1 if direction == "tx" else 0)]
        assert q["packets"] == finals[pair] >= 2000 and q["error"] == 0 and q["drops"] == 0, stats


def test_a_region_added_once_per_queue_pair_is_held_until_its_last_removal(serve, sock_path, errors):
    """QEMU before 8.1 sends ADD_MEM_REG and REM_MEM_REG once per vhost_dev, i.e. once per queue pair of a
    multiqueue net device: the same region again is one more holder; it is unmapped at its last REM_MEM_REG,
    and one REM_MEM_REG more is refused as before."""
    srv = serve("source", queue_pairs=2)
    extra = os.memfd_create("extra", os.MFD_CLOEXEC)
    os.ftruncate(extra, EXTRA_SIZE)
    try:
        with MemSlotsFrontend(sock_path, queue_pairs=2) as fe:
            fe.setup()
            mem = srv.connection.mem
            n = mem.nregions
            for _ in range(2):  # pair 0's vhost_dev, then pair 1's
                fe.add_region(EXTRA, extra)
            assert mem.nregions == n + 1
            fe.rem_region(EXTRA)
            assert mem.nregions == n + 1  # pair 1 still holds it
            fe.run("rx", count=100, pair=1, timeout=60)
            fe.rem_region(EXTRA)
            assert mem.nregions == n
            with pytest.raises(FrontendError):
                fe.rem_region(EXTRA)
            assert any("REM_MEM_REG: no region" in e for e in errors())
            fe.run("rx", count=100, pair=0, timeout=60)
    finally:
        os.close(extra)

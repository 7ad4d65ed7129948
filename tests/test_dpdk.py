"""Interop with Debian's DPDK 22.11: testpmd's virtio-user drives ``pyvhost serve net``; pyvhost's front-end
drives DPDK's net_vhost PMD.  Counts are exact (or within what a stopping DPDK front-end still holds)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvhost.bench.peers import PmdConsole, parse_testpmd
from pyvhost.frontend.net import Frontend

from .conftest import TESTPMD, assert_log_path, needs_dpdk

pytestmark = [needs_dpdk, pytest.mark.dpdk]
PATHS = ["direct", "copy"]
QUEUE = 256


def start_testpmd(
    tmp: Path, vdev: str, fwd: str, cpu: int, tag: str, extra: list[str] | None = None, interactive: bool = False
) -> tuple[subprocess.Popen, Path]:
    log = tmp / f"testpmd-{tag}.log"
    cmd = [
        "stdbuf",
        "-oL",
        TESTPMD or "dpdk-testpmd",
        "--no-huge",
        "-m",
        "1024",
        "--no-pci",
        "--file-prefix",
        f"pyvhost-test-{tag}-{os.getpid()}",
        "--lcores",
        f"0@{cpu},1@{cpu}",
        "--vdev",
        vdev,
        "--",
        f"--forward-mode={fwd}",
        f"--txd={QUEUE}",
        f"--rxd={QUEUE}",
        "--no-flush-rx",
        *(extra or []),
    ]
    cmd += ["-i"] if interactive else ["--auto-start", "--stats-period", "1"]
    proc = subprocess.Popen(
        cmd,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.PIPE if interactive else subprocess.DEVNULL,
    )
    return proc, log


def serve(tmp: Path, mode: str, metadata: str, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    sock, stats, ready = tmp / "pyvhost.sock", tmp / "stats.json", tmp / "ready"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pyvhost",
            "serve",
            "net",
            "--socket-path",
            str(sock),
            "--mode",
            mode,
            "--metadata",
            metadata,
            "--connections",
            "1",
            "--cpu",
            "0",
            "--stats-json",
            str(stats),
            "--ready-file",
            str(ready),
            *extra,
        ],
        stdout=open(tmp / "pyvhost.log", "w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300  # a cold Numba cache compiles the kernels first (~30 s, more on a busy machine)
    while not ready.exists():
        assert proc.poll() is None, (tmp / "pyvhost.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return proc, sock, stats


def finish(proc: subprocess.Popen, stats: Path, metadata: str | None = None) -> dict:
    """The one connection's per-queue counters, once ``pyvhost serve`` has ended; every ring it started ran on
    the ``metadata`` path (if given)."""
    proc.wait(30)
    if metadata is not None:
        assert_log_path((stats.parent / "pyvhost.log").read_text(), metadata)
    data = json.loads(stats.read_text())
    assert len(data["ended"]) == 1
    return data["ended"][0]


def run_virtio_user(
    tmp: Path,
    sock: Path,
    fwd: str,
    until: tuple[str, int] | float,
    extra: list[str] | None = None,
    until_rx: int | None = None,
    vdev_args: str = "",
    queues: int = 1,
) -> dict:
    """Interactive testpmd on ``sock``: start, run until its port counter ``until[0]`` (e.g. "RX-packets")
    reaches ``until[1]`` (within a generous deadline: no rate is assumed), stop, quit; its final forward
    statistics.  ``vdev_args`` are appended to the virtio-user vdev (e.g. ",packed_vq=1"); ``queues`` > 1: that
    many queue pairs, with the control queue virtio-user emulates (``cq=1``: it enables the pairs).
    (Older callers: ``until`` in seconds to run, or ``until_rx`` packets to receive.)"""
    if until_rx is not None:
        until = ("RX-packets", until_rx)
    if queues > 1:
        vdev_args += ",cq=1"
        extra = [*(extra or []), f"--rxq={queues}", f"--txq={queues}"]
    proc, log = start_testpmd(
        tmp,
        f"net_virtio_user0,path={sock},queues={queues},queue_size={QUEUE}{vdev_args}",
        fwd,
        1,
        "virtio",
        extra,
        interactive=True,
    )
    try:
        con = PmdConsole(proc, log)
        con.wait_for("testpmd> ", 60)
        con.send("start tx_first" if fwd in ("io", "macswap") else "start")
        if not isinstance(until, tuple):
            time.sleep(until)
            until = ("RX-packets", 0)
        counter, target = until
        deadline = time.monotonic() + 120
        while (got := con.port_counter(counter)) < target:
            assert time.monotonic() < deadline, f"testpmd: {counter} {got} of {target} after 120 s"
            time.sleep(0.2)
        con.send("stop")
        con.wait_for("Done.", 30)
        con.send("quit")
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text(errors="replace")
    assert "virtio_user_dev_init fails" not in text, text[-2000:]
    return parse_testpmd(text)


@pytest.mark.parametrize("metadata", PATHS)
def test_testpmd_txonly_to_pyvhost_sink(tmp_path, metadata):
    proc, sock, stats = serve(tmp_path, "sink", metadata)
    res = run_virtio_user(tmp_path, sock, "txonly", ("TX-packets", 100_000))
    counts = finish(proc, stats, metadata)["1"]
    assert res["tx_packets"] >= 100_000
    assert counts["packets"] == res["tx_packets"], (counts, res)
    assert counts["bytes"] == 64 * res["tx_packets"]
    assert counts["error"] == 0 and counts["drops"] == 0


@pytest.mark.parametrize("metadata", PATHS)
def test_pyvhost_source_to_testpmd_rxonly(tmp_path, metadata):
    n = 500_000
    proc, sock, stats = serve(tmp_path, "source", metadata, "--count", str(n))
    res = run_virtio_user(tmp_path, sock, "rxonly", ("RX-packets", n))
    counts = finish(proc, stats, metadata)["0"]
    assert counts["packets"] == n and counts["error"] == 0
    assert res["rx_packets"] == n, res


@pytest.mark.parametrize("metadata", PATHS)
@pytest.mark.parametrize("fwd", ["io", "macswap"])
def test_testpmd_forwarding_through_pyvhost_loopback(tmp_path, metadata, fwd):
    proc, sock, stats = serve(tmp_path, "loopback", metadata)
    res = run_virtio_user(tmp_path, sock, fwd, ("RX-packets", 10_000))  # forwarded through pyvhost and back
    counts = finish(proc, stats, metadata)
    tx, rx = counts["1"], counts["0"]
    assert res["tx_packets"] >= 10_000 and res["rx_packets"] >= 10_000
    # what pyvhost took from TX it returned on RX; a TX chain waits (back-pressure) while RX is full, so when
    # testpmd stops receiving, at most a ring's worth of its last frames may still sit in its TX ring
    assert rx["packets"] == tx["packets"]
    assert 0 <= res["tx_packets"] - tx["packets"] <= QUEUE, (counts, res)
    assert 0 <= rx["packets"] - res["rx_packets"] <= 4 * QUEUE  # testpmd counted them, but for the last few
    assert tx["error"] == rx["error"] == 0 and tx["drops"] == rx["drops"] == 0


def test_testpmd_two_queue_pairs_through_pyvhost_loopback(tmp_path):
    """virtio-user ``queues=2,cq=1`` (its control queue enables pair 1) forwards through ``--queue-pairs 2``
    loopback, a worker per pair pinned to a CPU each (``--cpus``): both pairs carry frames both ways."""
    proc, sock, stats = serve(tmp_path, "loopback", "direct", "--queue-pairs", "2", "--cpus", "0,1")
    res = run_virtio_user(tmp_path, sock, "io", ("RX-packets", 20_000), queues=2)
    counts = finish(proc, stats, "direct")
    log = (tmp_path / "pyvhost.log").read_text()
    assert "queues (0, 1) started (direct/direct path, split rings) on CPU 0" in log, log[-3000:]
    assert "queues (2, 3) started (direct/direct path, split rings) on CPU 1" in log, log[-3000:]
    for pair in (0, 1):
        tx, rx = counts[str(2 * pair + 1)], counts[str(2 * pair)]
        assert tx["packets"] > 0 and rx["packets"] == tx["packets"], counts  # each pair, both directions
        assert tx["error"] == rx["error"] == 0 and tx["drops"] == rx["drops"] == 0
    sent = sum(counts[str(q)]["packets"] for q in (1, 3))
    assert res["rx_packets"] >= 20_000 and 0 <= res["tx_packets"] - sent <= 2 * QUEUE, (counts, res)


@pytest.mark.parametrize("direction", ["tx", "rx"])
def test_pyvhost_frontend_with_dpdk_vhost_pmd(tmp_path, direction):
    sock = tmp_path / "dpdk-vhost.sock"
    proc, log = start_testpmd(
        tmp_path, f"net_vhost0,iface={sock},queues=1", "rxonly" if direction == "tx" else "txonly", 0, "vhost"
    )
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        with Frontend(str(sock), queue_size=QUEUE) as fe:
            fe.setup()
            r = fe.run(direction, count=10_000, timeout=120)
            final = fe.drain(direction)
        assert r["packets"] >= 10_000 and final["packets"] >= r["packets"]
        if direction == "rx":
            assert final["bytes"] == 64 * final["packets"]  # DPDK txonly frames are 64 bytes
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    stats = parse_testpmd(log.read_text(errors="replace"))
    if direction == "tx":
        assert stats["rx_packets"] == final["packets"], stats
    else:
        assert stats["tx_packets"] == final["packets"], stats

"""A Linux guest's virtio-net driver on a packed ring (``virtio-net-pci,packed=on``) against ``pyvhost serve
net`` -- no tap, no network: frames go only between the guest and the back-end process.

source: the guest receives exactly the N frames pyvhost generates (addressed to its MAC);
sink: every frame the guest transmits (ARP requests for an address nobody has) is counted by pyvhost;
loopback: what the guest transmits comes back to it.  Both metadata paths.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "guestkit"))
import guestkit  # noqa: E402

from .conftest import assert_log_path, needs  # noqa: E402

pytestmark = [
    pytest.mark.vm,
    needs(guestkit.qemu_available(), "qemu-system-x86_64 missing: run `make deps`"),
]
MAC = "02:00:00:00:00:02"  # the destination of pyvhost's generated frames
N = 200
SCRIPT = """
ip link set eth0 up
ip addr add 10.201.0.2/24 dev eth0
for i in $(seq 100); do [ "$(cat /sys/class/net/eth0/operstate)" = up ] && break; sleep 0.1; done
echo "RESULT features=$(cat /sys/bus/virtio/drivers/virtio_net/virtio*/features)"
ping -c 4 -W 1 10.201.0.9 > /dev/null 2>&1   # ARP requests for an address nobody has
ip link set eth0 down   # nothing more is sent once the link is down (ARP retries would go on)
sleep 1
echo "RESULT tx=$(cat /sys/class/net/eth0/statistics/tx_packets) rx=$(cat /sys/class/net/eth0/statistics/rx_packets)"
echo "RESULT done=1"
"""


def serve(tmp: Path, mode: str, metadata: str, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    sock, stats, ready = tmp / "vhost.sock", tmp / "stats.json", tmp / "ready"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pyvhost",
            "-v",
            "serve",
            "net",
            "--socket-path",
            str(sock),
            "--mode",
            mode,
            "--metadata",
            metadata,
            "--stats-json",
            str(stats),
            "--ready-file",
            str(ready),
            *extra,
        ],
        stdout=open(tmp / "backend.log", "w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp / "backend.log").read_text()
        time.sleep(0.05)
    return proc, sock, stats


@pytest.mark.parametrize("metadata", ["direct", "copy"])
@pytest.mark.parametrize("mode", ["source", "sink", "loopback"])
def test_guest_driver_on_a_packed_ring(kit, tmp_path, mode, metadata):
    proc, sock, stats_path = serve(tmp_path, mode, metadata, *(["--count", str(N)] if mode == "source" else []))
    try:
        with guestkit.Guest(
            kit, str(sock), SCRIPT, mac=MAC, device_opts="packed=on", workdir=str(tmp_path)
        ) as g:  # entering starts the guest
            res = g.wait(240)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    log = (tmp_path / "backend.log").read_text()
    assert "packed rings" in log, log[-2000:]
    assert_log_path(log, metadata)  # every ring start, on the path asked for
    assert res.get("done") == "1", g.tail()
    assert res["features"][34] == "1"  # VIRTIO_F_RING_PACKED negotiated by the guest driver
    tx, rx = int(res["tx"]), int(res["rx"])
    live = json.loads(stats_path.read_text())
    conns = live["ended"] + ([live["live"]] if live["live"] else [])  # QEMU may connect more than once

    def packets(queue: int) -> int:
        return sum(c.get(str(queue), {}).get("packets", 0) for c in conns)

    assert all(v["error"] == 0 for c in conns for v in c.values()), live
    if mode == "source":
        assert rx == N and packets(0) == N, (live, res)
    elif mode == "sink":
        assert tx >= 3 and packets(1) == tx, (live, res)
    else:
        # every frame sent came back; the guest counts those that arrived before its link went down
        assert tx >= 3 and packets(1) == tx and packets(0) == tx and 3 <= rx <= tx, (live, res)

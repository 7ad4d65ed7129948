"""A real guest on ``pyvhost serve rng``: QEMU (TCG) with two ``vhost-user-rng-pci`` devices, one without a
limit and one with ``--max-bytes/--period``; the guest reads 1 MiB from each through ``/dev/hwrng``.

The limit is checked three ways, none of them an upper bound on time: the device's own count of bytes per window,
the guest's clock (n windows cannot pass in less than n - 1 periods), and the host's (the whole run of the
limited back-end cannot have given more than ``max_bytes`` per period it lasted, plus one window).
"""

from __future__ import annotations

import json
import os
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

MiB = 1 << 20
READ = MiB
#: the limit: 32 KiB per 250 ms, 128 KiB/s (a TCG guest reads 100-400 KiB/s unlimited): 1 MiB takes 31 periods
MAX_BYTES, PERIOD_MS = 32 << 10, 250
GUEST_TIMEOUT = 300
HWRNG = "/sys/class/misc/hw_random"

pytestmark = [
    pytest.mark.vm,
    needs(guestkit.qemu_available(), "qemu-system-x86_64 missing: run `make deps`"),
]

#: read READ bytes from each virtio-rng (they probe in PCI slot order: virtio_rng.0 is the unlimited one)
SCRIPT = f"""
echo "RESULT available=$(tr ' ' , < {HWRNG}/rng_available)"
for i in 0 1; do
  echo virtio_rng.$i > {HWRNG}/rng_current || {{ echo "RESULT select$i=fail"; exit 1; }}
  t0=$(cut -d' ' -f1 /proc/uptime)
  head -c {READ} /dev/hwrng > /tmp/r$i
  t1=$(cut -d' ' -f1 /proc/uptime)
  echo "RESULT current$i=$(cat {HWRNG}/rng_current) bytes$i=$(wc -c < /tmp/r$i) t0_$i=$t0 t1_$i=$t1"
  echo "RESULT gz$i=$(gzip -c /tmp/r$i | wc -c) md5_$i=$(md5sum /tmp/r$i | cut -d' ' -f1)"
done
echo "RESULT same=$(cmp -s /tmp/r0 /tmp/r1 && echo yes || echo no)"
"""


class RngGuest(guestkit.Guest):
    """The kit's guest with two vhost-user-rng devices (sockets ``socket_path`` and ``second``), or one if
    ``second`` is empty; ``device_opts`` go to each device."""

    second: str = ""

    def device_args(self) -> list[str]:
        out = []
        opts = f",{self.device_opts}" if self.device_opts else ""
        for i, sock in enumerate(s for s in (self.socket_path, self.second) if s):
            out += [
                "-chardev",
                f"socket,id=c{i},path={sock}",
                "-device",
                f"vhost-user-rng-pci,chardev=c{i},vectors=0,addr={4 + i:#x}{opts}",
            ]
        return out


@pytest.fixture(scope="module")
def kit() -> guestkit.Kit:
    try:
        return guestkit.build(log=lambda s: None)
    except Exception as e:  # noqa: BLE001
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the guest kit cannot be built here ({e}); run tools/guestkit/build.sh")


class Backend:
    """``pyvhost serve rng`` in a process; its device counters are read from the line it prints at exit."""

    def __init__(self, tmp: Path, name: str, *args: str) -> None:
        self.sock = str(tmp / f"{name}.sock")
        self.log = tmp / f"{name}.log"
        self.out = tmp / f"{name}.out"
        ready = tmp / f"{name}.ready"
        argv = [sys.executable, "-m", "pyvhost", "serve", "rng", "--socket-path", self.sock]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [*argv, "--ready-file", str(ready), *args],
            stdout=open(self.out, "w"),
            stderr=open(self.log, "w"),
        )
        deadline = time.monotonic() + 240  # a cold kernel compile may come first
        while not ready.exists():
            assert self.proc.poll() is None, f"back-end exited:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, "back-end not ready"
            time.sleep(0.05)
        self.ended = 0.0

    def stop(self) -> dict:
        """Stop it (SIGTERM); the device's counters."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.ended = time.monotonic()
        lines = self.out.read_text().splitlines()
        return json.loads(lines[-1])["rng"] if lines else {}


def test_guest_reads_hwrng_within_the_rate_limit(kit, tmp_path):
    free = Backend(tmp_path, "free")
    limited = Backend(tmp_path, "limited", "--max-bytes", str(MAX_BYTES), "--period", str(PERIOD_MS))
    try:
        g = RngGuest(kit, free.sock, SCRIPT, workdir=str(tmp_path), memory_mb=256)
        g.second = limited.sock
        with g:
            g.wait(GUEST_TIMEOUT)
        r = dict(g.results)
    finally:
        free_stats, limited_stats = free.stop(), limited.stop()
    logs = free.log.read_text() + limited.log.read_text()
    assert r.get("exit") == "0", g.tail(60)
    assert r["available"].rstrip(",") == "virtio_rng.0,virtio_rng.1", r
    for i in (0, 1):
        assert r[f"current{i}"] == f"virtio_rng.{i}" and r[f"bytes{i}"] == str(READ), r
        assert int(r[f"gz{i}"]) > READ, r  # random bytes do not compress
    assert r["same"] == "no", r
    assert free_stats["bytes"] >= READ and limited_stats["bytes"] >= READ, (free_stats, limited_stats)
    windows, over = limited_stats["window_bytes"], limited_stats["over_limit"]
    # the device's count per window (a ring stopped while a request waited gives it 1 byte beyond: over_limit)
    assert windows and max(windows) <= MAX_BYTES + over and over <= 2, limited_stats
    period = PERIOD_MS / 1000
    need = -(-READ // MAX_BYTES)
    took = float(r["t1_1"]) - float(r["t0_1"])
    assert took >= (need - 1) * period, r  # the guest's clock: n windows take at least n - 1 periods
    lasted = limited.ended - limited.started  # the host's clock: the whole life of the limited back-end
    assert limited_stats["bytes"] <= MAX_BYTES * (1 + lasted / period) + over, (limited_stats, lasted)
    assert_log_path(logs, "direct", at_least=2)
    assert "Traceback" not in logs and " ERROR " not in logs, logs[-3000:]
    print(
        f"unlimited: {READ} bytes in {float(r['t1_0']) - float(r['t0_0']):.2f} s; "
        f"limited to {MAX_BYTES} B per {PERIOD_MS} ms: {took:.2f} s, {len(windows)} windows, max {max(windows)} B, "
        f"{over} B over the limit at stops"
    )


PACKED_SCRIPT = f"""
echo "RESULT packed=$(cut -c35 /sys/bus/virtio/devices/virtio0/features)"
echo virtio_rng.0 > {HWRNG}/rng_current || {{ echo "RESULT select=fail"; exit 1; }}
head -c {READ} /dev/hwrng > /tmp/r
echo "RESULT current=$(cat {HWRNG}/rng_current) bytes=$(wc -c < /tmp/r) gz=$(gzip -c /tmp/r | wc -c)"
"""


def test_guest_reads_hwrng_on_a_packed_ring(kit, tmp_path):
    """``vhost-user-rng-pci,packed=on``: the guest negotiates VIRTIO_F_RING_PACKED and reads 1 MiB of random
    bytes (they do not compress) through /dev/hwrng; the back-end's ring start is logged packed, no error."""
    rng = Backend(tmp_path, "rng")
    try:
        g = RngGuest(kit, rng.sock, PACKED_SCRIPT, workdir=str(tmp_path), memory_mb=256, device_opts="packed=on")
        with g:
            g.wait(GUEST_TIMEOUT)
        r = dict(g.results)
    finally:
        stats = rng.stop()
    log = rng.log.read_text()
    assert r.get("exit") == "0", g.tail(60)
    assert r["packed"] == "1", "the guest did not negotiate VIRTIO_F_RING_PACKED"
    assert r["current"] == "virtio_rng.0" and r["bytes"] == str(READ), r
    assert int(r["gz"]) > READ, r  # random bytes do not compress
    assert stats["bytes"] >= READ, stats
    starts = [line for line in log.splitlines() if "started (" in line]
    assert starts and all("packed rings" in line for line in starts), starts
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]

"""The processes a benchmark runs and reads: pyvhost's own commands, DPDK's testpmd (virtio-user front-end or
vhost PMD back-end) and qemu-storage-daemon, and the CPU each side is pinned to."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

#: a measurement's two sides on different cores
BACKEND_CPU, FRONTEND_CPU = 0, 1


def pyvhost_cmd(*args: str) -> list[str]:
    """The command line running this pyvhost with ``args``."""
    return [sys.executable, "-m", "pyvhost", *args]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300.0, log: Path | None = None) -> None:
    """Until ``path`` exists (a socket, a ready file), or ``proc`` has exited (then the end of its ``log``)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            tail = f": {log.read_text(errors='replace')[-1500:]}" if log else ""
            raise RuntimeError(f"{str(proc.args)[:200]} exited with {proc.returncode} before it was ready{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear in {timeout} s")
        time.sleep(0.02)


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 30.0) -> None:
    """Signal ``proc`` and wait for it; kill it if it does not go."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_testpmd(
    log: Path,
    vdev: str,
    fwd: str,
    cpu: int,
    prefix: str,
    queue_size: int,
    interactive: bool = False,
    extra: tuple[str, ...] = (),
    burst: int = 32,
) -> tuple[subprocess.Popen, Path]:
    """DPDK's testpmd with one vdev (a virtio-user front-end or a vhost PMD back-end) on ``cpu``, its output
    line-buffered into ``log``; interactive (commands through :class:`PmdConsole`) or started at once.
    ``extra``: more testpmd options (``--port-topology=loop``, ``--txpkts=512``); ``burst``: packets per burst."""
    testpmd = shutil.which("dpdk-testpmd")
    if testpmd is None:
        raise RuntimeError("dpdk-testpmd not found (make deps installs Debian's DPDK)")
    cmd = [
        "stdbuf",
        "-oL",
        testpmd,
        "--no-huge",
        "-m",
        "1024",
        "--no-pci",
        "--file-prefix",
        f"pyvhost-{prefix}",
        "--lcores",
        f"0@{cpu},1@{cpu}",
        "--vdev",
        vdev,
        "--",
        f"--forward-mode={fwd}",
        f"--txd={queue_size}",
        f"--rxd={queue_size}",
        "--no-flush-rx",  # count every received packet
        f"--burst={burst}",
        *extra,
    ]
    # non-interactive testpmd waits for Enter unless it has a stats period; stdin is /dev/null here
    cmd += ["-i"] if interactive else ["--auto-start", "--stats-period", "1"]
    proc = subprocess.Popen(
        cmd,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.PIPE if interactive else subprocess.DEVNULL,
        text=True,
    )
    return proc, log


class PmdConsole:
    """Commands to an interactive testpmd whose output goes (line-buffered) to a log file."""

    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc, self.log = proc, log

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait_for(self, needle: str, timeout: float, after: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            t = self.text()
            if needle in t[after:]:
                return t
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"testpmd did not print {needle!r}: {t[-1500:]}")
            time.sleep(0.01)

    def port_counter(self, key: str) -> int:
        """``show port stats 0`` and the value of ``key`` (e.g. TX-packets) in its answer."""
        before = len(self.text())
        self.send("show port stats 0")
        t = self.wait_for("Tx-pps", 10, after=before)
        m = re.search(key + r":\s+(\d+)", t[before:])
        if not m:
            raise RuntimeError(f"no {key} in testpmd's port stats")
        return int(m.group(1))


def parse_testpmd(text: str) -> dict:
    """The final forward statistics of port 0 in a testpmd log."""
    fwd = text.split("Forward statistics for port 0")[-1] if "Forward statistics for port 0" in text else ""
    total = lambda key: int(m.group(1)) if (m := re.search(key + r":\s+(\d+)", fwd)) else 0  # noqa: E731
    return {"rx_packets": total("RX-packets"), "tx_packets": total("TX-packets"), "tx_dropped": total("TX-dropped")}


def qsd_binary() -> str | None:
    """qemu-storage-daemon, the reference vhost-user-blk back-end, if installed."""
    return shutil.which("qemu-storage-daemon")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

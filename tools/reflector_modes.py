"""Run the reflector (testpmd virtio-user ``flowgen`` through a loopback back-end) several times and print each
run's one-second rates, to see which of its two modes a run fell into (BENCHMARKS.md, "The reflector in six
pairs").  For pyvhost's back-end it also samples the per-queue counters (Prometheus metrics): passes that found
work and chains per pass, and the worker threads' CPU ticks and voluntary context switches.

    .venv/bin/python tools/reflector_modes.py --backend pyvhost --runs 6 --pkt-size 512
    .venv/bin/python tools/reflector_modes.py --backend dpdk --runs 6 --pkt-size 512
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from pyvhost.bench.peers import BACKEND_CPU, FRONTEND_CPU, pyvhost_cmd, start_testpmd, stop, wait_for

METRICS_PORT = 19123


def queue_counters() -> dict[str, float]:
    """``{"chains1": ..., "wakeups1": ...}``: pyvhost's per-queue counters, or {} while it has no connection."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=1).read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        m = re.match(r'pyvhost_queue_(chains|wakeups)_total\{.*queue="(\d+)".*\} (\S+)', line)
        if m:
            out[f"{m[1]}{m[2]}"] = float(m[3])
    return out


def threads(pid: int) -> str:
    """Each thread's state, CPU ticks (user+system) and voluntary context switches."""
    out = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            f = (task / "stat").read_text().rsplit(")", 1)[1].split()
            vol = re.search(r"voluntary_ctxt_switches:\s+(\d+)", (task / "status").read_text())
        except OSError:
            continue
        try:
            wchan = (task / "wchan").read_text() or "-"
        except OSError:
            wchan = "?"
        out.append(f"{f[0]}{int(f[11]) + int(f[12])}/v{vol[1] if vol else '?'}/{wchan}")
    return " ".join(out)


def run(a: argparse.Namespace, n: int, workdir: Path) -> None:
    sock = workdir / f"loop{n}.sock"
    if a.backend == "pyvhost":
        log = open(workdir / f"backend{n}.log", "w")
        cmd = ["serve", "net", "--mode", "loopback", "--socket-path", str(sock), "--cpu", str(BACKEND_CPU)]
        cmd += [
            "--metrics-port",
            str(METRICS_PORT),
            "--batch",
            str(a.burst),
            "--ready-file",
            str(workdir / f"ready{n}"),
        ]
        be = subprocess.Popen(pyvhost_cmd(*cmd), stdout=log, stderr=log)
        wait_for(workdir / f"ready{n}", be)
    else:
        vdev = f"net_vhost0,iface={sock},queues=1"
        extra = ("--port-topology=loop",)
        be, _ = start_testpmd(
            workdir / f"backend{n}.log", vdev, "io", BACKEND_CPU, f"rm-b{n}", a.queue_size, False, extra, a.burst
        )
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    vdev = f"net_virtio_user0,path={sock},queues=1,queue_size={a.queue_size}"
    fe_log = workdir / f"frontend{n}.log"
    try:
        fe, _ = start_testpmd(
            fe_log, vdev, "flowgen", FRONTEND_CPU, f"rm-f{n}", a.queue_size, False, (f"--txpkts={a.pkt_size}",), a.burst
        )
    except BaseException:
        stop(be, signal.SIGTERM)
        raise
    try:
        prev: dict[str, float] = {}
        t0 = time.monotonic()
        while time.monotonic() - t0 < a.seconds:
            time.sleep(1.0)
            if a.backend == "pyvhost":
                now = queue_counters()
                d = {k: now[k] - prev.get(k, 0) for k in now}
                prev = now
                per = d.get("chains1", 0) / max(1, d.get("wakeups1", 0))
                print(
                    f"  {time.monotonic() - t0:4.1f} s  passes {d.get('wakeups1', 0):8.0f}  chains/pass {per:5.1f}  "
                    f"threads {threads(be.pid)}",
                    flush=True,
                )
    finally:
        stop(fe)
        stop(be, signal.SIGTERM)
    rates = [int(x) / 1e6 for x in re.findall(r"Rx-pps:\s+(\d+)", fe_log.read_text(errors="replace"))]
    print(f"run {n}: {a.backend} Rx Mpps per second: {' '.join(f'{r:.1f}' for r in rates)}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("pyvhost", "dpdk"), default="pyvhost")
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--pkt-size", type=int, default=512)
    p.add_argument("--queue-size", type=int, default=256)
    p.add_argument("--burst", type=int, default=32)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="reflector-modes-") as tmp:
        for n in range(1, a.runs + 1):
            run(a, n, Path(tmp))


if __name__ == "__main__":
    main()

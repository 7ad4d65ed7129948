"""``pyvhost bench --device blk``: pyvhost's virtio-blk back-end against qemu-storage-daemon's vhost-user-blk
export, on the same image, through the same front-end (pyvhost's ``BlkFrontend``), in one run.

Workloads: 4 KiB random reads and random writes (IOPS) and 1 MiB sequential reads and writes (MB/s), each at a
fixed queue depth.  The back-end process is pinned to one CPU (``taskset`` for qemu-storage-daemon), the
front-end (this process) to the other; runs of the two back-ends alternate.  The image is a regular file filled
with data first, so reads come from the page cache for both (buffered I/O, as both back-ends do by default).
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .peers import BACKEND_CPU, FRONTEND_CPU, cpu_seconds, qsd_binary, wait_for

#: the longest a measurement window is stretched for a first batch of completions (seconds)
MAX_WINDOW = 60.0
WORKLOADS = [  # name, block size, queue depth, random
    ("randread", 4096, 32, True),
    ("randwrite", 4096, 32, True),
    ("seqread", 1 << 20, 8, False),
    ("seqwrite", 1 << 20, 8, False),
]


@dataclass
class BlkRow:
    backend: str
    workload: str
    block_size: int
    iodepth: int
    iops: float
    mbps: float
    ops: int
    errors: int
    run: int = 0
    #: CPU time the back-end process used per request (less sensitive than rates to a busy machine)
    cpu_us_per_op: float = 0.0
    note: str = ""


def start_backend(kind: str, image: Path, sock: Path, logfile: Path) -> subprocess.Popen:
    if sock.exists():
        sock.unlink()
    if kind == "pyvhost":
        cmd = [
            sys.executable,
            "-m",
            "pyvhost",
            "serve",
            "blk",
            "--socket-path",
            str(sock),
            "--file",
            str(image),
            "--cpu",
            str(BACKEND_CPU),
        ]
    else:
        qsd = qsd_binary()
        if qsd is None:
            raise RuntimeError("qemu-storage-daemon not found (tools/install-debian-deps.sh installs it)")
        cmd = [
            "taskset",
            "-c",
            str(BACKEND_CPU),
            qsd,
            "--blockdev",
            f"driver=file,node-name=file0,filename={image}",
            "--export",
            f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={sock},writable=on,num-queues=1",
        ]
    proc = subprocess.Popen(cmd, stdout=open(logfile, "w"), stderr=subprocess.STDOUT)
    wait_for(sock, proc, 60.0, logfile)
    return proc


def stop_backend(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def drive(
    fe, name: str, bs: int, depth: int, rand: bool, seconds: float, warmup: float, nbytes: int, post=None, failed=None
) -> dict:
    """Keep ``depth`` requests in flight for ``warmup + seconds``; count what completes after the warm-up.
    The window is stretched until ``depth`` requests have completed in it (at most ``MAX_WINDOW`` s), so a
    loaded machine gives a slower rate rather than none; the rate is over the window actually measured.
    ``post(offset)`` queues one request of ``bs`` bytes at byte ``offset`` unpublished and ``failed(c)`` judges
    a completion (defaults: virtio-blk's on a ``BlkFrontend``); ``fe.publish()`` and ``fe.reap()`` do the rest."""
    from ..devices.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT

    rtype = VIRTIO_BLK_T_IN if "read" in name else VIRTIO_BLK_T_OUT
    if post is None:  # writes send what the slot holds
        post = lambda offset: fe.post(rtype, offset // 512, bs, publish=False)  # noqa: E731
    if failed is None:
        failed = lambda c: c.status != VIRTIO_BLK_S_OK  # noqa: E731
    nblocks = nbytes // bs
    rng = random.Random(42)
    pos = 0
    done = errors = 0
    t0 = time.perf_counter()
    t_start, done_start = None, 0
    end = t0 + warmup + seconds
    publish, reap = fe.publish, fe.reap
    outstanding = 0
    while True:
        while outstanding < depth:
            if rand:
                b = rng.randrange(nblocks)
            else:
                b, pos = pos, (pos + 1) % nblocks
            post(b * bs)
            outstanding += 1
        publish()
        cs = reap()
        if cs:
            outstanding -= len(cs)
            done += len(cs)
            errors += sum(1 for c in cs if failed(c))
        now = time.perf_counter()
        if t_start is None and now >= t0 + warmup:
            t_start, done_start = now, done
        if now >= end and (done - done_start >= depth or now >= end + MAX_WINDOW):
            break
    secs = time.perf_counter() - (t_start or t0)
    ops = done - done_start
    while outstanding:  # drain
        cs = reap()
        outstanding -= len(cs)
        done += len(cs)
    return {"ops": ops, "iops": ops / secs, "mbps": ops * bs / secs / 1e6, "errors": errors, "total": done}


def measure(backend: str, run: int, image: Path, workdir: Path, a) -> list[BlkRow]:
    from ..frontend.blk import BlkFrontend

    sock = workdir / f"blk-{backend}-{run}.sock"
    log = workdir / f"blk-{backend}-{run}.log"
    proc = start_backend(backend, image, sock, log)
    rows = []
    try:
        max_bs = max(w[1] for w in WORKLOADS)
        with BlkFrontend(str(sock), queue_size=a.queue_size, max_io=max_bs, poll=True, inflight=False) as fe:
            fe.setup()
            fill = os.urandom(max_bs)
            for s in range(fe.queues[0].slots):  # what every write sends
                off = fe.queues[0].data_off + s * max_bs
                fe.ram.mm[off : off + max_bs] = fill
            nbytes = fe.capacity() * 512
            for name, bs, depth, rand in WORKLOADS:
                depth = min(depth, fe.queues[0].slots)
                c0 = cpu_seconds(proc.pid)
                r = drive(fe, name, bs, depth, rand, a.seconds, a.warmup, nbytes)
                cpu = (cpu_seconds(proc.pid) - c0) / max(1, r["total"]) * 1e6
                rows.append(BlkRow(backend, name, bs, depth, r["iops"], r["mbps"], r["ops"], r["errors"], run, cpu))
            if fe.anomalies:
                rows[-1].errors += len(fe.anomalies)
                rows[-1].note = fe.anomalies[0]
    finally:
        stop_backend(proc)
    return rows


def table(rows: list[BlkRow]) -> str:
    lines = [
        f"{'workload':10} {'bs':>7} {'qd':>3}  {'pyvhost':>22}  {'qemu-storage-daemon':>22}  pyvhost/qsd"
        "   back-end CPU per request: pyvhost / qsd   (pyvhost/qsd of each pair of runs)"
    ]
    for name, bs, _depth, _rand in WORKLOADS:
        cells, meds = [], {}
        for be in ("pyvhost", "qsd"):
            rs = [r for r in rows if r.backend == be and r.workload == name]
            if not rs:
                cells.append(f"{'-':>22}")
                continue
            unit = "iops" if bs <= 4096 else "mbps"
            v = [getattr(r, unit) for r in rs]
            meds[be] = statistics.median(v)
            fmt = (lambda x: f"{x / 1000:.1f}k") if unit == "iops" else (lambda x: f"{x:.0f}")
            cells.append(
                f"{fmt(meds[be]) + (' IOPS' if unit == 'iops' else ' MB/s'):>11} ({fmt(min(v))}–{fmt(max(v))})".rjust(
                    22
                )
            )
        # per pair of runs (pyvhost's run i against qemu-storage-daemon's run i, measured next to each other)
        unit = "iops" if bs <= 4096 else "mbps"
        mine = {r.run: getattr(r, unit) for r in rows if r.backend == "pyvhost" and r.workload == name}
        theirs = {r.run: getattr(r, unit) for r in rows if r.backend == "qsd" and r.workload == name}
        pairs = [mine[k] / theirs[k] for k in sorted(mine) if theirs.get(k)]
        ratio = f"{statistics.median(pairs):.2f}x" if pairs else ""
        runs = f" (runs {', '.join(f'{x:.2f}' for x in pairs)})" if len(pairs) > 1 else ""
        depth = next((r.iodepth for r in rows if r.workload == name), 0)
        cpu = " / ".join(
            f"{statistics.median(r.cpu_us_per_op for r in rows if r.backend == be and r.workload == name):.1f} us"
            for be in ("pyvhost", "qsd")
            if any(r.backend == be and r.workload == name for r in rows)
        )
        lines.append(f"{name:10} {bs:7d} {depth:3d}  {cells[0]}  {cells[1]}  {ratio:>11}   {cpu}{runs}")
    return "\n".join(lines)


def main(a) -> int:
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {FRONTEND_CPU})
    backends = ["pyvhost"] + (["qsd"] if qsd_binary() else [])
    if len(backends) == 1:
        print("note: qemu-storage-daemon not found; measuring pyvhost only", file=sys.stderr)
    rows: list[BlkRow] = []
    with tempfile.TemporaryDirectory(prefix="pyvhost-bench-blk-") as tmp:
        workdir = Path(a.workdir) if a.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        image = workdir / "bench.img"
        with open(image, "wb") as f:  # real data (no holes), in the page cache for both back-ends
            chunk = os.urandom(1 << 20)
            for _ in range(a.image_mb):
                f.write(chunk)
        for run in range(1, a.runs + 1):
            for be in backends:
                print(f"[run {run}/{a.runs}] {be} ...", end="", file=sys.stderr, flush=True)
                try:
                    got = measure(be, run, image, workdir, a)
                except (RuntimeError, OSError, ValueError) as e:
                    got = [BlkRow(be, w[0], w[1], w[2], 0.0, 0.0, 0, 1, run, note=str(e)[:300]) for w in WORKLOADS]
                rows += got
                print(
                    " " + ", ".join(f"{r.workload} {r.iops / 1000:.1f}k IOPS {r.mbps:.0f} MB/s" for r in got),
                    file=sys.stderr,
                    flush=True,
                )
    return report(rows, table(rows), a, plot, lambda r: r.backend)


def report(rows: list, text: str, a, plot_rows: Callable[[list, str], None], name: Callable[[Any], str]) -> int:
    """Print the table, write ``--json`` and ``--plot``, say which rows failed; the exit status (1: a row did)."""
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    if a.plot:
        plot_rows(rows, a.plot)
    bad = [r for r in rows if r.errors or r.ops == 0]
    for r in bad:
        print(f"error: {name(r)} {r.workload}: {r.errors} errors, {r.ops} ops {r.note}", file=sys.stderr)
    return 1 if bad else 0


def plot(rows: list[BlkRow], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(3 * len(WORKLOADS), 3.5))
    for ax, (name, bs, _d, _r) in zip(axes, WORKLOADS):
        unit = "iops" if bs <= 4096 else "mbps"
        bes = [b for b in ("pyvhost", "qsd") if any(r.backend == b for r in rows)]
        meds = [statistics.median(getattr(r, unit) for r in rows if r.backend == b and r.workload == name) for b in bes]
        ax.bar(bes, meds, color=["#ee6677", "#888888"][: len(bes)])
        ax.set_title(f"{name} ({'IOPS' if unit == 'iops' else 'MB/s'})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

"""``pyvhost bench --device scsi``: pyvhost's virtio-scsi target (direct and copy metadata paths) against
pyvhost's virtio-blk (direct) on the same image, each through pyvhost's front-end for it (``ScsiFrontend``:
READ(16)/WRITE(16) on the request queue; ``BlkFrontend``), in one run.

The workloads of ``bench/blk.py`` (4 KiB random reads and writes, IOPS; 1 MiB sequential reads and writes,
MB/s; fixed queue depths).  The back-end is pinned to one CPU, the front-end (this process) to the other; the
three configurations alternate within each round, and every ratio is taken per pair of runs of the same round
(then the median, with the min-max of the pairs).  Each row says which path the back-end logged running.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .blk import WORKLOADS, drive, report, stop_backend
from .net import STARTED, _ratio
from .peers import BACKEND_CPU, FRONTEND_CPU, cpu_seconds, pyvhost_cmd, wait_for

#: (device, metadata path) of each configuration, in the order they run within a round
CONFIGS = [("blk", "direct"), ("scsi", "direct"), ("scsi", "copy")]


@dataclass
class ScsiRow:
    device: str
    metadata: str
    #: the metadata path(s) the back-end logged running its queues
    path: str
    workload: str
    block_size: int
    iodepth: int
    iops: float
    mbps: float
    ops: int
    errors: int
    run: int = 0
    #: CPU time the back-end process used per request
    cpu_us_per_op: float = 0.0
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.device} {self.metadata}"


def start_backend(device: str, metadata: str, image: Path, sock: Path, logfile: Path) -> subprocess.Popen:
    ready = sock.with_suffix(".ready")
    for p in (sock, ready):
        if p.exists():
            p.unlink()
    where = ["--file", str(image)] if device == "blk" else ["--lun", f"0:{image}"]
    cmd = pyvhost_cmd(
        "serve", device, "--socket-path", str(sock), "--metadata", metadata, "--cpu", str(BACKEND_CPU),
        "--ready-file", str(ready), *where,
    )  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=open(logfile, "w"), stderr=subprocess.STDOUT)
    wait_for(ready, proc, 300.0, logfile)
    return proc


def scsi_io(fe, write: bool, nbytes: int):
    """``drive``'s ``post(offset)`` and ``failed(completion)`` for a ``ScsiFrontend``: READ(16)/WRITE(16)."""
    post_rw, block = fe.post_rw, fe.block_size

    def post(offset: int) -> None:
        post_rw(write, offset // block, nbytes, publish=False)

    return post, lambda c: not c.ok


def measure(device: str, metadata: str, run: int, image: Path, workdir: Path, a) -> list[ScsiRow]:
    from ..frontend.blk import BlkFrontend
    from ..frontend.scsi import ScsiFrontend

    sock = workdir / f"{device}-{metadata}-{run}.sock"
    log = workdir / f"{device}-{metadata}-{run}.log"
    proc = start_backend(device, metadata, image, sock, log)
    max_bs = max(w[1] for w in WORKLOADS)
    rows = []
    try:
        fe: BlkFrontend | ScsiFrontend
        if device == "blk":
            fe = BlkFrontend(str(sock), queue_size=a.queue_size, max_io=max_bs, poll=True, inflight=False)
        else:
            fe = ScsiFrontend(str(sock), queue_size=a.queue_size, max_io=max_bs, poll=True)
        with fe:
            fe.setup()
            fill = os.urandom(max_bs)  # what every write sends
            if isinstance(fe, BlkFrontend):
                slots = fe.queues[0].slots
                for s in range(slots):
                    off = fe.queues[0].data_off + s * max_bs
                    fe.ram.mm[off : off + max_bs] = fill
                nbytes = fe.capacity() * 512
            else:
                assert fe.queue is not None
                slots = fe.queue.slots
                fe.fill_slots(fill)
                nbytes = fe.blocks * fe.block_size
            for name, bs, depth, rand in WORKLOADS:
                depth = min(depth, slots)
                post = failed = None
                if isinstance(fe, ScsiFrontend):
                    post, failed = scsi_io(fe, "write" in name, bs)
                c0 = cpu_seconds(proc.pid)
                r = drive(fe, name, bs, depth, rand, a.seconds, a.warmup, nbytes, post, failed)
                cpu = (cpu_seconds(proc.pid) - c0) / max(1, r["total"]) * 1e6
                row = ScsiRow(device, metadata, "", name, bs, depth, r["iops"], r["mbps"], r["ops"], r["errors"], run)
                row.cpu_us_per_op = cpu
                rows.append(row)
            if fe.anomalies:
                rows[-1].errors += len(fe.anomalies)
                rows[-1].note = fe.anomalies[0]
    finally:
        stop_backend(proc)
    found = STARTED.findall(log.read_text(errors="replace"))
    path = "/".join(sorted({p for _q, ps, _r in found for p in ps.split("/")}))
    for row in rows:
        row.path = path
    return rows


def _value(r: ScsiRow) -> float:
    return r.iops if r.block_size <= 4096 else r.mbps


def _cell(rows: list[ScsiRow]) -> str:
    if not rows:
        return "-"
    v = [_value(r) for r in rows]
    if rows[0].block_size <= 4096:
        return f"{statistics.median(v) / 1000:.1f}k IOPS ({min(v) / 1000:.1f}–{max(v) / 1000:.1f})"
    return f"{statistics.median(v):.0f} MB/s ({min(v):.0f}–{max(v):.0f})"


def pair_ratios(num: list[ScsiRow], den: list[ScsiRow]) -> list[float]:
    """Rate ratios of two configurations' runs in the same round (they alternate), round by round."""
    by_run = {r.run: _value(r) for r in den}
    return [_value(r) / by_run[r.run] for r in num if by_run.get(r.run) and _value(r)]


def table(rows: list[ScsiRow]) -> str:
    labels = [f"{d} {m}" for d, m in CONFIGS]
    lines = [
        f"{'workload':10} {'bs':>7} {'qd':>3}  "
        + "  ".join(f"{x:>26}" for x in labels)
        + "  back-end CPU per request   ratios (per pair of runs)"
    ]
    for name, bs, _depth, _rand in WORKLOADS:
        of = {x: [r for r in rows if r.label == x and r.workload == name] for x in labels}
        depth = next((r.iodepth for r in rows if r.workload == name), 0)
        cpu = " / ".join(f"{statistics.median(r.cpu_us_per_op for r in v):.0f}" for v in of.values() if v)
        ratios = [
            _ratio("scsi direct/blk", pair_ratios(of["scsi direct"], of["blk direct"])),
            _ratio("scsi copy/blk", pair_ratios(of["scsi copy"], of["blk direct"])),
            _ratio("scsi direct/copy", pair_ratios(of["scsi direct"], of["scsi copy"])),
        ]
        lines.append(
            f"{name:10} {bs:7d} {depth:3d}  "
            + "  ".join(f"{_cell(v):>26}" for v in of.values())
            + f"  {cpu + ' us':>24}   "
            + "; ".join(x for x in ratios if x)
        )
    return "\n".join(lines)


def main(a) -> int:
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {FRONTEND_CPU})
    rows: list[ScsiRow] = []
    with tempfile.TemporaryDirectory(prefix="pyvhost-bench-scsi-") as tmp:
        workdir = Path(a.workdir) if a.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        image = workdir / "bench.img"
        with open(image, "wb") as f:  # real data (no holes), in the page cache for every back-end
            chunk = os.urandom(1 << 20)
            for _ in range(a.image_mb):
                f.write(chunk)
        for run in range(1, a.runs + 1):
            for device, metadata in CONFIGS:
                print(f"[run {run}/{a.runs}] {device} {metadata} ...", end="", file=sys.stderr, flush=True)
                try:
                    got = measure(device, metadata, run, image, workdir, a)
                except (RuntimeError, OSError, ValueError) as e:
                    got = [
                        ScsiRow(device, metadata, "", w[0], w[1], w[2], 0.0, 0.0, 0, 1, run, note=str(e)[:300])
                        for w in WORKLOADS
                    ]
                rows += got
                print(
                    " " + ", ".join(f"{r.workload} {r.iops / 1000:.1f}k IOPS {r.mbps:.0f} MB/s" for r in got),
                    file=sys.stderr,
                    flush=True,
                )
    return report(rows, table(rows), a, plot, lambda r: r.label)


def plot(rows: list[ScsiRow], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{d} {m}" for d, m in CONFIGS]
    fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(3.2 * len(WORKLOADS), 3.5))
    for ax, (name, bs, _d, _r) in zip(axes, WORKLOADS):
        have = [x for x in labels if any(r.label == x and r.workload == name for r in rows)]
        meds = [statistics.median(_value(r) for r in rows if r.label == x and r.workload == name) for x in have]
        ax.bar(have, meds, color=["#888888", "#ee6677", "#4477aa"][: len(have)])
        ax.set_title(f"{name} ({'IOPS' if bs <= 4096 else 'MB/s'})", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

"""``pyvhost bench``: the metadata paths (and DPDK's vhost back-end) measured side by side, in one run.

Every measurement is two processes pinned to different cores: a back-end (``pyvhost serve net`` or DPDK's
``net_vhost`` PMD in testpmd) and a front-end (``pyvhost drive net`` or DPDK's ``net_virtio_user`` in testpmd).
Runs of the compared configurations alternate, so drift of the machine hits them alike.  Counts are checked:
the packets the front-end saw complete must agree with the back-end's own counters.

Default: pyvhost's front-end, TX (front-end transmits, back-end sinks) and RX (back-end sources, front-end
receives), for the ``copy`` and ``direct`` metadata paths.  ``--peer dpdk`` adds DPDK's vhost PMD as the
back-end to beat, with testpmd's virtio-user as the front-end, and pyvhost's front-end against both.
``--iommu``: pyvhost's front-end plays a vIOMMU whose IOTLB holds 1, 64 or 2,048 entries (sent up front), so
every ring and buffer address is an IOVA: the copy path pays a lookup in that many entries per access, the
direct path only when it binds a ring; with ``--peer dpdk`` also DPDK's net_vhost ``iommu-support=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .peers import BACKEND_CPU, FRONTEND_CPU, PmdConsole, parse_testpmd, pyvhost_cmd, start_testpmd, stop, wait_for

#: Rings' worth of received packets a stopping testpmd front-end may not have counted.
RX_INFLIGHT_RINGS = 4
#: IOTLB sizes of ``--iommu`` (None: the same runs without a vIOMMU, the baseline).
IOMMU_ENTRIES = (None, 1, 64, 2048)


@dataclass
class Row:
    backend: str
    frontend: str
    direction: str
    metadata: str
    pkt_size: int
    queue_size: int
    mpps: float
    packets: int
    errors: int
    ring: str = "split"
    run: int = 0
    first_packet_s: float | None = None
    note: str = ""
    dirty_log: str = "off"
    #: pages the log showed at the end (pyvhost's front-end with the log on; 0 otherwise)
    dirty_pages: int = 0
    iommu: int | None = None  # IOTLB entries (None: no vIOMMU)


@dataclass
class Config:
    backend: str  # pyvhost | dpdk
    frontend: str  # pyvhost | dpdk
    direction: str  # tx | rx
    metadata: str  # copy | direct | "-" for DPDK's back-end
    ring: str = "split"  # split | packed (VIRTIO_F_RING_PACKED, negotiated by the front-end)
    dirty_log: str = "off"  # on: the front-end shares a dirty log and switches VHOST_F_LOG_ALL on (migrating)
    iommu: int | None = None  # pyvhost's front-end plays a vIOMMU with this many IOTLB entries
    rows: list[Row] = field(default_factory=list)

    @property
    def label(self) -> str:
        log = " log" if self.dirty_log == "on" else ""
        iotlb = "" if self.iommu is None else f" iotlb={self.iommu}"
        return f"{self.frontend}->{self.backend} {self.direction} {self.metadata} {self.ring}{iotlb}{log}"


class Runner:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.a = args
        self.dir = workdir
        self.n = 0

    # -- pyvhost back-end ---------------------------------------------------------------------------------
    def start_pyvhost(self, mode: str, metadata: str, sock: Path, count: int = -1):
        ready, stats = self.dir / f"ready{self.n}", self.dir / f"stats{self.n}.json"
        log = open(self.dir / f"pyvhost{self.n}.log", "w")
        cmd = pyvhost_cmd(
            "serve",
            "net",
            "--socket-path",
            str(sock),
            "--mode",
            mode,
            "--metadata",
            metadata,
            "--pkt-size",
            str(self.a.pkt_size),
            "--connections",
            "1",
            "--cpu",
            str(BACKEND_CPU),
            "--ready-file",
            str(ready),
            "--stats-json",
            str(stats),
            "--count",
            str(count),
        )
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        wait_for(ready, proc)
        return proc, stats

    def pyvhost_counts(self, proc: subprocess.Popen, stats: Path, queue: int) -> dict:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            stop(proc)
        data = json.loads(stats.read_text())
        return data["ended"][-1][str(queue)]

    # -- pyvhost front-end ------------------------------------------------------------------------------
    def drive(
        self, sock: Path, direction: str, ring: str = "split", dirty_log: bool = False, iommu: int | None = None
    ) -> dict:
        cmd = pyvhost_cmd(
            "drive",
            "net",
            "--socket-path",
            str(sock),
            "--direction",
            direction,
            "--seconds",
            str(self.a.seconds),
            "--warmup",
            str(self.a.warmup),
            "--pkt-size",
            str(self.a.pkt_size),
            "--queue-size",
            str(self.a.queue_size),
            "--batch",
            str(self.a.batch),
            "--cpu",
            str(FRONTEND_CPU),
        )
        if ring == "packed":
            cmd.append("--packed")
        if dirty_log:
            cmd.append("--dirty-log")
        if iommu is not None:
            cmd += ["--iommu-entries", str(iommu)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=self.a.seconds + self.a.warmup + 120)
        if out.returncode:
            raise RuntimeError(f"pyvhost drive failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    # -- DPDK -------------------------------------------------------------------------------------------
    def testpmd(self, vdev: str, fwd: str, cpu: int, tag: str, interactive: bool = False):
        return start_testpmd(
            self.dir / f"testpmd-{tag}{self.n}.log",
            vdev,
            fwd,
            cpu,
            f"{tag}-{os.getpid()}",
            self.a.queue_size,
            interactive,
        )

    def dpdk_backend(self, sock: Path, fwd: str, iommu: bool = False) -> tuple[subprocess.Popen, Path]:
        vdev = f"net_vhost0,iface={sock},queues=1" + (",iommu-support=1" if iommu else "")
        proc, out = self.testpmd(vdev, fwd, BACKEND_CPU, "vhost")
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"DPDK vhost back-end did not start: {out.read_text()[-2000:]}")
            time.sleep(0.05)
        return proc, out

    def dpdk_frontend(self, sock: Path, fwd: str, ring: str = "split") -> dict:
        """Interactive testpmd virtio-user on ``sock``: start, read the port counters after the warm-up and
        after ``seconds``, stop.  The rate is the counter difference over the time between the reads."""
        vdev = f"net_virtio_user0,path={sock},queues=1,queue_size={self.a.queue_size}"
        if ring == "packed":
            vdev += ",packed_vq=1"
        proc, out = self.testpmd(vdev, fwd, FRONTEND_CPU, "virtio", interactive=True)
        key = "TX-packets" if fwd == "txonly" else "RX-packets"
        try:
            tp = PmdConsole(proc, out)
            tp.wait_for("testpmd> ", 60)
            tp.send("start")
            time.sleep(self.a.warmup)
            t1, c1 = time.perf_counter(), tp.port_counter(key)
            time.sleep(self.a.seconds)
            t2, c2 = time.perf_counter(), tp.port_counter(key)
            tp.send("stop")
            tp.wait_for("Done.", 30)
            tp.send("quit")
            proc.wait(30)
        finally:
            stop(proc)
        res = parse_testpmd(out.read_text(errors="replace"))
        res["mpps"] = (c2 - c1) / (t2 - t1) / 1e6
        return res


# ---------------------------------------------------------------------------------------------------------
def run_frontend(r: Runner, c: Config, sock: Path, fwd: str, row: Row) -> None:
    """Drive ``sock`` with the configuration's front-end (pyvhost's, or testpmd's virtio-user with ``fwd``) and
    put its rate and packet count in ``row``."""
    if c.frontend == "pyvhost":
        res = r.drive(sock, c.direction, c.ring, c.dirty_log == "on", c.iommu)
        row.mpps, row.packets = res["mpps"], res["final"]["packets"]
        row.first_packet_s = res.get("first_packet_s")
        row.dirty_pages = res.get("dirty_pages", 0)
    else:
        res = r.dpdk_frontend(sock, fwd, c.ring)
        row.mpps = res["mpps"]
        row.packets = res["tx_packets"] if c.direction == "tx" else res["rx_packets"]


def measure(r: Runner, c: Config, run: int) -> Row:
    """One run of one configuration."""
    r.n += 1
    sock = r.dir / f"vhost{r.n}.sock"
    a = r.a
    row = Row(
        c.backend,
        c.frontend,
        c.direction,
        c.metadata,
        a.pkt_size,
        a.queue_size,
        0.0,
        0,
        0,
        ring=c.ring,
        run=run,
        dirty_log=c.dirty_log,
        iommu=c.iommu,
    )
    mode = "sink" if c.direction == "tx" else "source"
    dpdk_fwd = "rxonly" if c.direction == "tx" else "txonly"
    fe_fwd = "txonly" if c.direction == "tx" else "rxonly"
    if c.backend == "pyvhost":
        proc, stats = r.start_pyvhost(mode, c.metadata, sock)
        try:
            run_frontend(r, c, sock, fe_fwd, row)
        finally:
            if c.frontend != "pyvhost":
                time.sleep(0.2)
            counts = r.pyvhost_counts(proc, stats, 1 if c.direction == "tx" else 0)
        row.errors = counts["drops"] + (1 if counts["error"] else 0)
        # the back-end's counter must agree with the front-end's: exactly for pyvhost's front-end (it drains);
        # DPDK's virtio-user counts as sent what it put on the ring, and quits without waiting for it to be taken
        # (up to a ring, 256 seen under load), and still holds up to a few rings of received packets when it stops
        # (768 = 3 x 256 seen with DPDK's own back-end as well)
        if c.frontend == "pyvhost":
            slack = 0
        else:
            slack = a.queue_size if c.direction == "tx" else RX_INFLIGHT_RINGS * a.queue_size
        if abs(counts["packets"] - row.packets) > slack:
            row.errors += 1
            row.note = f"counts disagree: front-end {row.packets}, back-end {counts['packets']}"
    else:
        proc, log = r.dpdk_backend(sock, dpdk_fwd, c.iommu is not None)
        try:
            run_frontend(r, c, sock, fe_fwd, row)
        finally:
            time.sleep(0.2)
            stop(proc)
        back = parse_testpmd(log.read_text(errors="replace"))
        back_count = back["rx_packets"] if c.direction == "tx" else back["tx_packets"]
        # DPDK's vhost PMD never dequeues what is still in the TX ring when the front-end quits (up to a ring)
        slack = a.queue_size if c.direction == "tx" else RX_INFLIGHT_RINGS * a.queue_size
        if abs(back_count - row.packets) > slack:
            row.errors += 1
            row.note = f"counts disagree: front-end {row.packets}, DPDK back-end {back_count}"
    if row.packets == 0 or row.mpps == 0:
        row.errors += 1
        row.note = row.note or "no packets or no rate samples"
    return row


def configs(a: argparse.Namespace) -> list[Config]:
    dirs = ["tx", "rx"] if a.direction == "both" else [a.direction]
    paths = ["copy", "direct"] if a.metadata == "both" else [a.metadata]
    rings = ["split", "packed"] if getattr(a, "ring", "split") == "both" else [getattr(a, "ring", "split")]
    logs = ["off", "on"] if getattr(a, "dirty_log", "off") == "both" else [getattr(a, "dirty_log", "off")]
    out: list[Config] = []
    if getattr(a, "iommu", False):  # pyvhost's front-end only: DPDK's virtio-user plays no vIOMMU
        for d in dirs:
            for ring in rings:
                for n in IOMMU_ENTRIES:
                    if a.peer == "dpdk" and n is not None:
                        out.append(Config("dpdk", "pyvhost", d, "-", ring, iommu=n))
                    out += [Config("pyvhost", "pyvhost", d, m, ring, iommu=n) for m in paths]
        return out
    fronts = ["dpdk", "pyvhost"] if a.peer == "dpdk" else ["pyvhost"]
    for fe in fronts:
        # only pyvhost's front-end shares a dirty log (testpmd's virtio-user does not migrate)
        fe_logs = logs if fe == "pyvhost" else [x for x in logs if x == "off"]
        for d in dirs:
            for ring in rings:
                if a.peer == "dpdk" and fe_logs:
                    out.append(Config("dpdk", fe, d, "-", ring, fe_logs[0]))
                # logging off and on next to each other: each round runs them as a pair, one after the other
                out += [Config("pyvhost", fe, d, m, ring, lg) for m in paths for lg in fe_logs]
    return out


def _fmt(rows: list[Row]) -> str:
    v = [x.mpps for x in rows]
    return f"{statistics.median(v):7.2f} ({min(v):.2f}–{max(v):.2f})"


def table(cs: list[Config]) -> str:
    """The result tables: one per front-end, a line per configuration, with the ratios."""
    lines = []
    for fe in dict.fromkeys(c.frontend for c in cs):
        lines.append(f"front-end: {fe}")
        head = f"{'back-end':9} {'path':7} {'ring':6} {'dir':3} {'iotlb':5} {'log':3}"
        lines.append(f"{head} {'Mpps median (min–max)':24} {'errors':>6}  ratio")
        for c in (c for c in cs if c.frontend == fe):
            if not c.rows:
                continue
            med = statistics.median(x.mpps for x in c.rows)
            ratio = ""
            same = {
                x.metadata: x
                for x in cs
                if x.frontend == fe
                and x.direction == c.direction
                and x.ring == c.ring
                and x.rows
                and (x.dirty_log == c.dirty_log or x.backend == "dpdk")
                and x.iommu == c.iommu
            }
            if c.backend == "pyvhost" and c.metadata == "direct" and "copy" in same:
                base = statistics.median(x.mpps for x in same["copy"].rows)
                ratio = f"direct/copy {med / base:.2f}x" if base else ""
            split = [
                x
                for x in cs
                if x.frontend == fe
                and x.backend == c.backend
                and x.direction == c.direction
                and x.metadata == c.metadata
                and x.ring == "split"
                and x.dirty_log == c.dirty_log
                and x.iommu == c.iommu
                and x.rows
            ]
            if c.ring == "packed" and split:
                base = statistics.median(x.mpps for x in split[0].rows)
                ratio += (" " if ratio else "") + (f"packed/split {med / base:.2f}x" if base else "")
            if c.backend == "pyvhost" and "-" in same:
                dp = same["-"].rows
                pairs = [p.mpps / d.mpps for p, d in zip(c.rows, dp) if d.mpps]
                if pairs:
                    ratio += (
                        " " if ratio else ""
                    ) + f"pyvhost/DPDK {statistics.median(pairs):.2f}x (runs {', '.join(f'{x:.2f}' for x in pairs)})"
            off = [
                x
                for x in cs
                if x.frontend == fe
                and x.backend == c.backend
                and x.direction == c.direction
                and x.metadata == c.metadata
                and x.ring == c.ring
                and x.dirty_log == "off"
                and x.rows
            ]
            if c.dirty_log == "on" and off:  # each run against the logging-off run just before it
                pairs = [on.mpps / o.mpps for on, o in zip(c.rows, off[0].rows) if o.mpps]
                if pairs:
                    ratio += (" " if ratio else "") + (
                        f"log on/off {statistics.median(pairs):.2f}x (runs {', '.join(f'{x:.2f}' for x in pairs)})"
                    )
            if c.iommu is not None and c.backend == "pyvhost":
                plain = [x for x in cs if x.frontend == fe and x.backend == c.backend and x.iommu is None and x.rows]
                plain = [x for x in plain if (x.direction, x.metadata, x.ring) == (c.direction, c.metadata, c.ring)]
                if plain:
                    base = statistics.median(x.mpps for x in plain[0].rows)
                    ratio += (" " if ratio else "") + (f"vs no vIOMMU {med / base:.2f}x" if base else "")
            errs = sum(x.errors for x in c.rows)
            iotlb = "-" if c.iommu is None else str(c.iommu)
            lines.append(
                f"{c.backend:9} {c.metadata:7} {c.ring:6} {c.direction:3} {iotlb:5} {c.dirty_log:3} {_fmt(c.rows):24} "
                f"{errs:6d}  {ratio}"
            )
        fp = [x.first_packet_s for c in cs if c.frontend == fe for x in c.rows if x.first_packet_s is not None]
        if fp:
            lines.append(
                f"connect → first completion (pyvhost front-end, warm cache): median {statistics.median(fp):.3f} s, "
                f"max {max(fp):.3f} s"
            )
        lines.append("")
    return "\n".join(lines)


def plot(cs: list[Config], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [c for c in cs if c.rows]
    meds = [statistics.median(x.mpps for x in c.rows) for c in done]
    lo = [m - min(x.mpps for x in c.rows) for m, c in zip(meds, done)]
    hi = [max(x.mpps for x in c.rows) - m for m, c in zip(meds, done)]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(done)), 4))
    colors = ["#888888" if c.backend == "dpdk" else ("#4477aa" if c.metadata == "copy" else "#ee6677") for c in done]
    bars = ax.bar(range(len(done)), meds, yerr=[lo, hi], color=colors, capsize=4)
    for bar, c in zip(bars, done):
        if c.ring == "packed":
            bar.set_hatch("//")
    ax.set_xticks(range(len(done)), [c.label.replace(" ", "\n", 1) for c in done], fontsize=7)
    ax.set_ylabel("Mpps (median, min–max)")
    ax.set_title(f"pyvhost bench: {done[0].rows[0].pkt_size}-byte packets, queue {done[0].rows[0].queue_size}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(a: argparse.Namespace) -> int:
    if (os.cpu_count() or 1) < 2:
        print("note: fewer than 2 CPUs; back-end and front-end share one", file=sys.stderr)
    cs = configs(a)
    total = len(cs) * a.runs
    with tempfile.TemporaryDirectory(prefix="pyvhost-bench-") as tmp:
        workdir = Path(a.workdir) if a.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        r = Runner(a, workdir)
        done = 0
        t0 = time.monotonic()
        for run in range(1, a.runs + 1):
            for c in cs:  # alternate configurations within each round
                done += 1
                print(f"[{done:2d}/{total}] {c.label:36} run {run}/{a.runs} ...", end="", file=sys.stderr, flush=True)
                try:
                    row = measure(r, c, run)
                except (RuntimeError, OSError, ValueError, KeyError, IndexError, subprocess.SubprocessError) as e:
                    row = Row(
                        c.backend,
                        c.frontend,
                        c.direction,
                        c.metadata,
                        a.pkt_size,
                        a.queue_size,
                        0.0,
                        0,
                        1,
                        ring=c.ring,
                        run=run,
                        note=str(e)[:300],
                        dirty_log=c.dirty_log,
                        iommu=c.iommu,
                    )
                c.rows.append(row)
                eta = (time.monotonic() - t0) / done * (total - done)
                print(
                    f" {row.mpps:7.2f} Mpps  errors {row.errors}  (eta {eta:4.0f} s)"
                    f"{'  ' + row.note if row.note else ''}",
                    file=sys.stderr,
                    flush=True,
                )
    print(table(cs))
    rows = [asdict(x) for c in cs for x in c.rows]
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.plot:
        plot(cs, a.plot)
    return 1 if any(x["errors"] for x in rows) else 0

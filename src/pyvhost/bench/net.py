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
``--regions 1,8,64,509``: pyvhost's front-end shares its RAM as that many regions (ADD_MEM_REG), rings and
buffers spread over them: the copy path translates every access in a table of that many rows, the direct path
only when it binds a ring.

``--workload`` picks the work (a comma list): ``tx`` (a sink with no payload access), ``tx-read`` (a sink that
reads every payload byte and reports a checksum, as DPDK's vhost PMD copies every frame into an mbuf), ``rx``
and ``loop`` (the reflector: testpmd virtio-user ``flowgen`` transmits and counts what comes back; pyvhost's
``loopback`` against DPDK's ``net_vhost`` with ``--forward-mode=io --port-topology=loop``; the front-end's
Rx-pps is the measure).  Every ratio is taken per pair of runs of the same round (the runs alternate), then
the median, with the min-max of the pair ratios.  Each pyvhost row carries the metadata path and ring layout
the back-end logged as running (a requested ``direct`` that fell back is an error, never labelled direct),
and every row the back-end's CPU seconds per million packets (from /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .peers import (
    BACKEND_CPU,
    FRONTEND_CPU,
    PmdConsole,
    cpu_seconds,
    parse_testpmd,
    pyvhost_cmd,
    start_testpmd,
    stop,
    wait_for,
)

#: Rings' worth of received packets a stopping testpmd front-end may not have counted.
RX_INFLIGHT_RINGS = 4
#: IOTLB sizes of ``--iommu`` (None: the same runs without a vIOMMU, the baseline).
IOMMU_ENTRIES = (None, 1, 64, 2048)
#: The workloads, what each one's rows are labelled with, the pyvhost back-end's mode for it, and the testpmd
#: forwarding modes of the DPDK back-end and front-end.
WORKLOADS = {
    "tx": ("no payload access", "sink", "rxonly", "txonly"),
    "tx-read": ("payload read", "sink-read", "rxonly", "txonly"),
    "rx": ("one frame repeated", "source", "txonly", "rxonly"),
    "loop": ("reflector", "loopback", "io", "flowgen"),
}
#: "queues (0, 1) started (direct/copy path, split rings)": what the back-end ran (backend.Connection logs it)
STARTED = re.compile(r"queues \(([0-9, ]+)\) started \(([a-z/]+) path, ([a-z]+) rings\)")


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
    workload: str = ""  # what the back-end did with the payload (WORKLOADS)
    gbps: float = 0.0  # frame bytes (without the virtio-net header) per second
    cpu_s_per_mpkt: float | None = None  # back-end CPU seconds (user + system, /proc) per million packets
    cpu_window: str = ""  # "measured": over the rate's window; "connection": from connect to the end
    path: str = ""  # the metadata path(s) the back-end logged as running ("-" for DPDK)
    ring_ran: str = ""  # the ring layout the back-end logged
    dirty_log: str = "off"
    #: pages the log showed at the end (pyvhost's front-end with the log on; 0 otherwise)
    dirty_pages: int = 0
    iommu: int | None = None  # IOTLB entries (None: no vIOMMU)
    regions: int | None = None  # memory regions of pyvhost's front-end's RAM (None: one, not asked)
    queue_pairs: int = 1  # pairs driven at once (a front-end thread and a back-end worker each)


@dataclass
class Config:
    backend: str  # pyvhost | dpdk
    frontend: str  # pyvhost | dpdk
    direction: str  # tx | rx
    metadata: str  # copy | direct | "-" for DPDK's back-end
    ring: str = "split"  # split | packed (VIRTIO_F_RING_PACKED, negotiated by the front-end)
    pkt_size: int = 64
    dirty_log: str = "off"  # on: the front-end shares a dirty log and switches VHOST_F_LOG_ALL on (migrating)
    iommu: int | None = None  # pyvhost's front-end plays a vIOMMU with this many IOTLB entries
    regions: int | None = None  # pyvhost's front-end shares its RAM as this many regions
    queue_pairs: int = 1  # --queue-pairs: pyvhost's front-end and back-end with this many pairs at once
    rows: list[Row] = field(default_factory=list)

    def new_row(self, run: int, queue_size: int, errors: int = 0, note: str = "") -> Row:
        """An empty row of this configuration (its measurement fills in the rest)."""
        return Row(
            self.backend,
            self.frontend,
            self.direction,
            self.metadata,
            self.pkt_size,
            queue_size,
            0.0,
            0,
            errors,
            ring=self.ring,
            run=run,
            note=note,
            dirty_log=self.dirty_log,
            iommu=self.iommu,
            regions=self.regions,
            queue_pairs=self.queue_pairs,
        )

    @property
    def label(self) -> str:
        log = " log" if self.dirty_log == "on" else ""
        iotlb = "" if self.iommu is None else f" iotlb={self.iommu}"
        iotlb += "" if self.regions is None else f" regions={self.regions}"
        qp = f" qp={self.queue_pairs}" if self.queue_pairs > 1 else ""
        return (
            f"{self.frontend}->{self.backend} {self.direction} {self.metadata} {self.ring} {self.pkt_size}B"
            f"{iotlb}{log}{qp}"
        )


class Runner:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.a = args
        self.dir = workdir
        self.n = 0

    # -- pyvhost back-end ---------------------------------------------------------------------------------
    def start_pyvhost(
        self, mode: str, metadata: str, sock: Path, count: int = -1, pkt_size: int = 64, queue_pairs: int = 1
    ):
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
            str(pkt_size),
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
            "--queue-pairs",
            str(queue_pairs),
            "--batch",
            str(self.a.burst),  # the same burst as DPDK's back-end
        )
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        wait_for(ready, proc)
        return proc, stats

    def pyvhost_counts(self, proc: subprocess.Popen, stats: Path, queues: list[int]) -> dict:
        """The back-end's counters of ``queues`` (one per pair measured), added up."""
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            stop(proc)
        history = json.loads(stats.read_text())["ended"]
        if not history:  # stopped with its connection still live: its counters are not final
            log = stats.with_name(stats.name.replace("stats", "pyvhost").replace(".json", ".log"))
            raise RuntimeError(f"the back-end did not end its connection 30 s after the front-end did (log: {log})")
        ended = history[-1]
        qs = [ended[str(q)] for q in queues]
        return {
            "packets": sum(q["packets"] for q in qs),
            "drops": sum(q["drops"] for q in qs),
            "error": any(q["error"] for q in qs),
        }

    # -- pyvhost front-end ------------------------------------------------------------------------------
    def ran(self) -> tuple[str, str]:
        """(metadata paths, ring layout) the last pyvhost back-end logged as running its queues."""
        found = STARTED.findall((self.dir / f"pyvhost{self.n}.log").read_text(errors="replace"))
        paths = sorted({p for _q, ps, _r in found for p in ps.split("/")})
        return "/".join(paths), "/".join(sorted({r for _q, _p, r in found}))

    def drive(
        self,
        sock: Path,
        direction: str,
        ring: str = "split",
        pkt_size: int = 64,
        dirty_log: bool = False,
        iommu: int | None = None,
        regions: int | None = None,
        queue_pairs: int = 1,
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
            str(pkt_size),
            "--queue-size",
            str(self.a.queue_size),
            "--batch",
            str(self.a.batch),
            "--cpu",
            str(FRONTEND_CPU),
            "--queue-pairs",
            str(queue_pairs),
        )
        if ring == "packed":
            cmd.append("--packed")
        if dirty_log:
            cmd.append("--dirty-log")
        if iommu is not None:
            cmd += ["--iommu-entries", str(iommu)]
        if regions is not None:
            cmd += ["--regions", str(regions)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=self.a.seconds + self.a.warmup + 120)
        if out.returncode:
            raise RuntimeError(f"pyvhost drive failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    # -- DPDK -------------------------------------------------------------------------------------------
    def testpmd(self, vdev: str, fwd: str, cpu: int, tag: str, interactive: bool = False, extra: tuple = ()):
        return start_testpmd(
            self.dir / f"testpmd-{tag}{self.n}.log",
            vdev,
            fwd,
            cpu,
            f"{tag}-{os.getpid()}",
            self.a.queue_size,
            interactive,
            extra,
            self.a.burst,
        )

    def dpdk_backend(
        self, sock: Path, fwd: str, pkt_size: int = 64, iommu: bool = False
    ) -> tuple[subprocess.Popen, Path]:
        # io forwarding returns what it receives on the port it came from (the reflector)
        extra = ("--port-topology=loop",) if fwd == "io" else (f"--txpkts={pkt_size}",)
        vdev = f"net_vhost0,iface={sock},queues=1" + (",iommu-support=1" if iommu else "")
        proc, out = self.testpmd(vdev, fwd, BACKEND_CPU, "vhost", extra=extra)
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"DPDK vhost back-end did not start: {out.read_text()[-2000:]}")
            time.sleep(0.05)
        return proc, out

    def dpdk_frontend(
        self, sock: Path, fwd: str, ring: str = "split", pkt_size: int = 64, backend_pid: int = 0
    ) -> dict:
        """Interactive testpmd virtio-user on ``sock``: start, read the port counters after the warm-up and
        after ``seconds``, stop.  The rate is the counter difference over the time between the reads; the
        back-end's CPU time (``backend_pid``) is read with them."""
        vdev = f"net_virtio_user0,path={sock},queues=1,queue_size={self.a.queue_size}"
        if ring == "packed":
            vdev += ",packed_vq=1"
        proc, out = self.testpmd(vdev, fwd, FRONTEND_CPU, "virtio", interactive=True, extra=(f"--txpkts={pkt_size}",))
        key = "TX-packets" if fwd == "txonly" else "RX-packets"
        try:
            tp = PmdConsole(proc, out)
            tp.wait_for("testpmd> ", 60)
            tp.send("start")
            time.sleep(self.a.warmup)
            t1, c1 = time.perf_counter(), tp.port_counter(key)
            u1 = cpu_seconds(backend_pid) if backend_pid else 0.0
            time.sleep(self.a.seconds)
            t2, c2 = time.perf_counter(), tp.port_counter(key)
            u2 = cpu_seconds(backend_pid) if backend_pid else 0.0
            tp.send("stop")
            tp.wait_for("Done.", 30)
            tp.send("quit")
            proc.wait(30)
        finally:
            stop(proc)
        res = parse_testpmd(out.read_text(errors="replace"))
        res["mpps"] = (c2 - c1) / (t2 - t1) / 1e6
        res["cpu_s_per_mpkt"] = (u2 - u1) / ((c2 - c1) / 1e6) if backend_pid and c2 > c1 else None
        return res


# ---------------------------------------------------------------------------------------------------------
def run_frontend(r: Runner, c: Config, sock: Path, fwd: str, row: Row, backend_pid: int) -> None:
    """Drive ``sock`` with the configuration's front-end (pyvhost's, or testpmd's virtio-user with ``fwd``) and
    put its rate, packet count and the back-end's CPU per packet in ``row``."""
    if c.frontend == "pyvhost":
        u0 = cpu_seconds(backend_pid)
        direction = "tx" if c.direction.startswith("tx") else "rx"
        res = r.drive(sock, direction, c.ring, c.pkt_size, c.dirty_log == "on", c.iommu, c.regions, c.queue_pairs)
        row.dirty_pages = res.get("dirty_pages", 0)
        u1 = cpu_seconds(backend_pid)  # the back-end is not reaped yet: its times are still there
        row.mpps, row.packets = res["mpps"], res["final"]["packets"]
        row.first_packet_s = res.get("first_packet_s")
        row.cpu_s_per_mpkt = (u1 - u0) / (row.packets / 1e6) if row.packets else None
        row.cpu_window = "connection"
    else:
        res = r.dpdk_frontend(sock, fwd, c.ring, c.pkt_size, backend_pid)
        row.mpps = res["mpps"]
        row.packets = res["tx_packets"] if c.direction.startswith("tx") else res["rx_packets"]
        row.cpu_s_per_mpkt = res["cpu_s_per_mpkt"]
        row.cpu_window = "measured"
    row.gbps = row.mpps * 1e6 * c.pkt_size * 8 / 1e9


def measure(r: Runner, c: Config, run: int) -> Row:
    """One run of one configuration."""
    r.n += 1
    sock = r.dir / f"vhost{r.n}.sock"
    a = r.a
    label, mode, dpdk_fwd, fe_fwd = WORKLOADS[c.direction]
    row = c.new_row(run, a.queue_size)
    tx = c.direction.startswith("tx")
    row.workload = "frame copied to an mbuf" if c.backend == "dpdk" and tx else label
    # DPDK's virtio-user counts as sent what it put on the ring, and quits without waiting for it to be taken
    # (up to a ring, 256 seen under load), and still holds up to a few rings of received packets when it stops
    # (768 = 3 x 256 seen with DPDK's own back-end as well)
    slack = a.queue_size if tx else RX_INFLIGHT_RINGS * a.queue_size
    if c.backend == "pyvhost":
        proc, stats = r.start_pyvhost(mode, c.metadata, sock, pkt_size=c.pkt_size, queue_pairs=c.queue_pairs)
        try:
            run_frontend(r, c, sock, fe_fwd, row, proc.pid)
        finally:
            if c.frontend != "pyvhost":
                time.sleep(0.2)
            counts = r.pyvhost_counts(proc, stats, [2 * p + (1 if tx else 0) for p in range(c.queue_pairs)])
        row.errors = counts["drops"] + (1 if counts["error"] else 0)
        # the back-end's counter must agree with the front-end's: exactly for pyvhost's front-end (it drains)
        if c.frontend == "pyvhost":
            slack = 0
        if abs(counts["packets"] - row.packets) > slack:
            row.errors += 1
            row.note = f"counts disagree: front-end {row.packets}, back-end {counts['packets']}"
        row.path, row.ring_ran = r.ran()
        if row.path != c.metadata or row.ring_ran != c.ring:  # a fallback is never labelled as requested
            row.errors += 1
            row.note = f"asked {c.metadata} {c.ring}, the back-end ran {row.path or '?'} {row.ring_ran or '?'}"
    else:
        proc, log = r.dpdk_backend(sock, dpdk_fwd, c.pkt_size, c.iommu is not None)
        try:
            run_frontend(r, c, sock, fe_fwd, row, proc.pid)
        finally:
            time.sleep(0.2)
            stop(proc)
        back = parse_testpmd(log.read_text(errors="replace"))
        back_count = back["rx_packets"] if tx else back["tx_packets"]
        # DPDK's vhost PMD never dequeues what is still in the TX ring when the front-end quits (up to a ring)
        if abs(back_count - row.packets) > slack:
            row.errors += 1
            row.note = f"counts disagree: front-end {row.packets}, DPDK back-end {back_count}"
        row.path, row.ring_ran = "-", c.ring
    if row.packets == 0 or row.mpps == 0:
        row.errors += 1
        row.note = row.note or "no packets or no rate samples"
    return row


def workloads(a: argparse.Namespace) -> list[str]:
    """The workloads asked for: ``--workload`` (a comma list), else ``--direction``."""
    if getattr(a, "workload", None):
        out = [w.strip() for w in a.workload.split(",") if w.strip()]
        bad = [w for w in out if w not in WORKLOADS]
        if bad:
            raise SystemExit(f"pyvhost bench: unknown workload {', '.join(bad)} (known: {', '.join(WORKLOADS)})")
        return out
    return ["tx", "rx"] if a.direction == "both" else [a.direction]


def pkt_sizes(a: argparse.Namespace) -> list[int]:
    """``--pkt-size``: one size or a comma list (64,512,1518)."""
    return [int(x) for x in str(a.pkt_size).split(",") if x.strip()]


def regions(a: argparse.Namespace) -> list[int]:
    """``--regions``: a comma list of region counts, each in 1..509."""
    out = [int(x) for x in str(a.regions).split(",") if x.strip()]
    bad = [n for n in out if not 1 <= n <= 509]
    if bad:
        raise SystemExit(f"pyvhost bench: --regions {bad[0]} is not in 1..509 (VHOST_USER_MAX_MEM_SLOTS)")
    return out


def queue_pairs(a: argparse.Namespace) -> list[int]:
    """``--queue-pairs``: one count or a comma list (1,2)."""
    out = [int(x) for x in str(getattr(a, "queue_pairs", "1")).split(",") if x.strip()]
    if not out or min(out) < 1:
        raise SystemExit(f"pyvhost bench: --queue-pairs {a.queue_pairs}: counts of at least 1")
    return out


def configs(a: argparse.Namespace) -> list[Config]:
    paths = ["copy", "direct"] if a.metadata == "both" else [a.metadata]
    rings = ["split", "packed"] if getattr(a, "ring", "split") == "both" else [getattr(a, "ring", "split")]
    logs = ["off", "on"] if getattr(a, "dirty_log", "off") == "both" else [getattr(a, "dirty_log", "off")]
    out: list[Config] = []
    if getattr(a, "regions", None):  # pyvhost's front-end only: it is the one that splits its RAM
        counts = regions(a)
        for size in pkt_sizes(a):
            for d in (w for w in workloads(a) if w in ("tx", "tx-read", "rx")):
                for ring in rings:
                    for k in counts:
                        out += [Config("pyvhost", "pyvhost", d, m, ring, size, regions=k) for m in paths]
        return out
    if getattr(a, "iommu", False):  # pyvhost's front-end only: DPDK's virtio-user plays no vIOMMU
        for size in pkt_sizes(a):
            for d in (w for w in workloads(a) if w in ("tx", "rx")):
                for ring in rings:
                    for n in IOMMU_ENTRIES:
                        if a.peer == "dpdk" and n is not None:
                            out.append(Config("dpdk", "pyvhost", d, "-", ring, size, iommu=n))
                        out += [Config("pyvhost", "pyvhost", d, m, ring, size, iommu=n) for m in paths]
        return out
    fronts = ["dpdk", "pyvhost"] if a.peer == "dpdk" else ["pyvhost"]
    for size in pkt_sizes(a):
        for fe in fronts:
            # only pyvhost's front-end shares a dirty log (testpmd's virtio-user does not migrate)
            fe_logs = logs if fe == "pyvhost" else [x for x in logs if x == "off"]
            if not fe_logs:
                continue
            for d in workloads(a):
                if d == "loop" and fe == "pyvhost":
                    continue  # the reflector is testpmd's flowgen counting what comes back
                for ring in rings:
                    # DPDK's back-end copies every frame into an mbuf: its tx row serves tx and tx-read
                    ref = "tx" if d == "tx-read" else d
                    if a.peer == "dpdk" and not any(
                        (x.backend, x.frontend, x.direction, x.ring, x.pkt_size) == ("dpdk", fe, ref, ring, size)
                        for x in out
                    ):
                        out.append(Config("dpdk", fe, ref, "-", ring, size, fe_logs[0]))
                    # logging off and on next to each other: each round runs them as a pair, one after the other;
                    # pyvhost's front-end with each --queue-pairs count (testpmd's with one)
                    qps = queue_pairs(a) if fe == "pyvhost" else [1]
                    out += [
                        Config("pyvhost", fe, d, m, ring, size, lg, queue_pairs=qp)
                        for m in paths
                        for lg in fe_logs
                        for qp in qps
                    ]
    if "loop" in workloads(a) and a.peer != "dpdk":  # the reflector's front-end is testpmd's, DPDK's back-end aside
        out += [
            Config("pyvhost", "dpdk", "loop", m, ring, size) for size in pkt_sizes(a) for ring in rings for m in paths
        ]
    return out


def pair_ratios(num: list[Row], den: list[Row]) -> list[float]:
    """Rate ratios of the runs of two configurations in the same round (they alternate), round by round."""
    by_run = {x.run: x.mpps for x in den}
    return [x.mpps / by_run[x.run] for x in num if by_run.get(x.run) and x.mpps]


def _ratio(name: str, pairs: list[float]) -> str:
    if not pairs:
        return ""
    return f"{name} {statistics.median(pairs):.2f}x ({min(pairs):.2f}–{max(pairs):.2f}, {len(pairs)} pairs)"


#: runs of one configuration further apart than this (fastest over slowest) get a note under the table
WIDE_SPREAD = 2.0


def _fmt(rows: list[Row]) -> str:
    v = [x.mpps for x in rows]
    return f"{statistics.median(v):7.2f} ({min(v):.2f}–{max(v):.2f})"


def _spread(rows: list[Row]) -> float:
    """The fastest run over the slowest (1.0 with fewer than two runs that moved packets)."""
    v = [x.mpps for x in rows if x.mpps > 0]
    return max(v) / min(v) if len(v) > 1 else 1.0


def _cpu(rows: list[Row]) -> str:
    v = [x.cpu_s_per_mpkt for x in rows if x.cpu_s_per_mpkt is not None]
    return f"{statistics.median(v):.3f}" if v else "-"


def ratios(c: Config, cs: list[Config]) -> str:
    """The ratios of one configuration's rows to its comparison rows, each per pair of alternating runs."""
    like = [
        x
        for x in cs
        if x.frontend == c.frontend
        and x.pkt_size == c.pkt_size
        and x.ring == c.ring
        and x.rows
        and x is not c
        and (x.dirty_log == c.dirty_log or x.backend == "dpdk")
        and x.iommu == c.iommu
        and x.regions == c.regions
        and x.queue_pairs == c.queue_pairs
    ]
    out = []
    if c.backend == "pyvhost" and c.metadata == "direct":
        copy = [x for x in like if x.backend == "pyvhost" and x.metadata == "copy" and x.direction == c.direction]
        if copy:
            out.append(_ratio("direct/copy", pair_ratios(c.rows, copy[0].rows)))
    if c.ring == "packed":
        split = [
            x
            for x in cs
            if x.frontend == c.frontend
            and x.pkt_size == c.pkt_size
            and x.backend == c.backend
            and x.direction == c.direction
            and x.metadata == c.metadata
            and x.ring == "split"
            and x.dirty_log == c.dirty_log
            and x.iommu == c.iommu
            and x.regions == c.regions
            and x.rows
        ]
        if split:
            out.append(_ratio("packed/split", pair_ratios(c.rows, split[0].rows)))
    if c.backend == "pyvhost":
        ref = "tx" if c.direction == "tx-read" else c.direction  # DPDK's tx row copies every frame
        dpdk = [x for x in like if x.backend == "dpdk" and x.direction == ref]
        if dpdk:
            out.append(_ratio("pyvhost/DPDK", pair_ratios(c.rows, dpdk[0].rows)))
    if c.dirty_log == "on":  # each run against the logging-off run just before it
        off = [
            x
            for x in cs
            if (x.frontend, x.backend, x.direction, x.metadata, x.ring, x.pkt_size)
            == (c.frontend, c.backend, c.direction, c.metadata, c.ring, c.pkt_size)
            and x.dirty_log == "off"
            and x.iommu == c.iommu
            and x.queue_pairs == c.queue_pairs
            and x.rows
        ]
        if off:
            out.append(_ratio("log on/off", pair_ratios(c.rows, off[0].rows)))
    if c.queue_pairs > 1:  # the same runs with one pair
        one = [
            x
            for x in cs
            if (x.frontend, x.backend, x.direction, x.metadata, x.ring, x.pkt_size, x.dirty_log, x.iommu)
            == (c.frontend, c.backend, c.direction, c.metadata, c.ring, c.pkt_size, c.dirty_log, c.iommu)
            and x.queue_pairs == 1
            and x.rows
        ]
        if one:
            out.append(_ratio(f"{c.queue_pairs} pairs/1", pair_ratios(c.rows, one[0].rows)))
    if c.iommu is not None and c.backend == "pyvhost":  # the same runs without a vIOMMU
        plain = [
            x
            for x in cs
            if (x.frontend, x.backend, x.direction, x.metadata, x.ring, x.pkt_size)
            == (c.frontend, c.backend, c.direction, c.metadata, c.ring, c.pkt_size)
            and x.iommu is None
            and x.rows
        ]
        if plain:
            out.append(_ratio("vs no vIOMMU", pair_ratios(c.rows, plain[0].rows)))
    if c.regions not in (None, 1):  # the same path and layout with the RAM in one region
        one = [
            x
            for x in cs
            if (x.frontend, x.backend, x.direction, x.metadata, x.ring, x.pkt_size)
            == (c.frontend, c.backend, c.direction, c.metadata, c.ring, c.pkt_size)
            and x.regions == 1
            and x.rows
        ]
        if one:
            out.append(_ratio("vs 1 region", pair_ratios(c.rows, one[0].rows)))
    return "  ".join(x for x in out if x)


def table(cs: list[Config], burst: int | None = None) -> str:
    """The result tables: one per front-end, a line per configuration (the path and ring the back-end ran),
    with the ratios per pair of alternating runs; ``burst``: the back-ends' burst, said in each title."""
    lines = []
    for fe in dict.fromkeys(c.frontend for c in cs):
        lines.append(f"front-end: {fe}" + (f"    (back-end burst: {burst})" if burst else ""))
        lines.append(
            f"{'back-end':9} {'path ran':9} {'ring':6} {'iotlb':5} {'regs':4} {'log':3} {'qp':>2} {'workload':26} "
            f"{'bytes':>5} {'Mpps median (min–max)':24} {'Gbit/s':>6} {'CPU s/Mpkt':>10} {'errors':>6}  "
            "ratios (per pair of runs)"
        )
        for c in (c for c in cs if c.frontend == fe):
            if not c.rows:
                continue
            ran = "/".join(sorted({x.path for x in c.rows if x.path})) or "?"
            work = f"{c.direction} ({c.rows[0].workload})" if c.rows[0].workload else c.direction
            gbps = statistics.median(x.gbps for x in c.rows)
            errs = sum(x.errors for x in c.rows)
            iotlb = "-" if c.iommu is None else str(c.iommu)
            regs = "1" if c.regions is None else str(c.regions)
            lines.append(
                f"{c.backend:9} {ran:9} {c.ring:6} {iotlb:5} {regs:>4} {c.dirty_log:3} {c.queue_pairs:2d} {work:26} "
                f"{c.pkt_size:5d} {_fmt(c.rows):24} {gbps:6.2f} {_cpu(c.rows):>10} {errs:6d}  {ratios(c, cs)}"
            )
        wide = [c for c in cs if c.frontend == fe and _spread(c.rows) > WIDE_SPREAD]
        if wide:
            lines.append(
                f"note: the runs of {len(wide)} row(s) differ by more than {WIDE_SPREAD:g}x "
                f"({', '.join(f'{c.label.strip()} {_spread(c.rows):.1f}x' for c in wide)}): their pair ratios swing "
                "with them; compare over more --runs (the reflector has two modes on both back-ends, BENCHMARKS.md)"
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
    sizes = ",".join(str(x) for x in dict.fromkeys(c.pkt_size for c in done))
    ax.set_title(f"pyvhost bench: {sizes}-byte packets, queue {done[0].rows[0].queue_size}")
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
                    row = c.new_row(run, a.queue_size, errors=1, note=str(e)[:300])
                c.rows.append(row)
                eta = (time.monotonic() - t0) / done * (total - done)
                print(
                    f" {row.mpps:7.2f} Mpps  errors {row.errors}  (eta {eta:4.0f} s)"
                    f"{'  ' + row.note if row.note else ''}",
                    file=sys.stderr,
                    flush=True,
                )
    print(table(cs, a.burst))
    rows = [asdict(x) | {"burst": a.burst} for c in cs for x in c.rows]
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.plot:
        plot(cs, a.plot)
    return 1 if any(x["errors"] for x in rows) else 0

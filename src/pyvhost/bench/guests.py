"""``pyvhost bench --guests 1,8,64``: what each guest costs a back-end process serving many (``--socket-count``).

For each N, one ``pyvhost serve net --socket-count N`` process (sink mode) is started and its resident memory
read from /proc while idle (N sockets listening), then with N pyvhost front-ends connected, their rings running
and TX traffic passed on each.  The cost of a guest is the growth of the process's private and file-backed
memory (RssAnon + RssFile) per connection; guest RAM the back-end touched (rings and buffers: shared memfd
pages, RssShmem) is reported apart, as it is the guest's memory, not the back-end's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .peers import BACKEND_CPU, pyvhost_cmd, stop, wait_for

MB = 1 << 20
#: TX frames each front-end passes before the process is measured
PACKETS = 2000
#: each front-end's guest RAM (rings and buffers of one queue pair fit in it)
GUEST_RAM = 8 << 20


@dataclass
class GuestsRow:
    guests: int
    metadata: str
    #: resident MB of the process with its N sockets listening, none connected
    idle_mb: float
    #: resident MB (private + file-backed) with N guests connected and passing traffic
    connected_mb: float
    #: (connected - idle) / N: what one guest costs beyond its rings and buffers
    per_guest_mb: float
    #: guest RAM the back-end has resident (rings and buffers, shared with the front-ends), all guests
    guest_ram_mb: float
    threads: int
    packets: int
    errors: int


def status(pid: int) -> dict[str, int]:
    """The kB fields (and Threads) of /proc/PID/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0])
    return out


def private_mb(s: dict[str, int]) -> float:
    return (s["RssAnon"] + s["RssFile"]) / 1024


def measure(n: int, metadata: str, workdir: Path) -> GuestsRow:
    from ..frontend.net import Frontend  # the parser imports this module: the datapath only when measuring

    base = workdir / f"g{n}.sock"
    ready = workdir / f"g{n}.ready"
    log = workdir / f"g{n}.log"
    paths = [str(base)] if n == 1 else [f"{base}{i}" for i in range(n)]
    with open(log, "w") as f:
        proc = subprocess.Popen(
            pyvhost_cmd(
                "serve", "net", "--mode", "sink", "--socket-path", str(base), "--socket-count", str(n),
                "--metadata", metadata, "--cpu", str(BACKEND_CPU), "--ready-file", str(ready),
            ),
            stdout=f,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    fronts: list = []
    try:
        wait_for(ready, proc, log=log)
        for p in paths:
            wait_for(Path(p), proc, log=log)
        idle = status(proc.pid)
        packets = errors = 0
        for p in paths:
            fe = Frontend(p, queue_size=256, ram_size=GUEST_RAM)
            fronts.append(fe)
            fe.setup()
            r = fe.run("tx", count=PACKETS)
            packets += r["packets"]
            errors += r["len_errors"]
        connected = status(proc.pid)
    finally:
        for fe in fronts:
            fe.close()
        stop(proc)
    return GuestsRow(
        guests=n,
        metadata=metadata,
        idle_mb=round(private_mb(idle), 1),
        connected_mb=round(private_mb(connected), 1),
        per_guest_mb=round((private_mb(connected) - private_mb(idle)) / n, 2),
        guest_ram_mb=round(connected["RssShmem"] / 1024, 1),
        threads=connected["Threads"],
        packets=packets,
        errors=errors + (packets != n * PACKETS),
    )


def table(rows: list[GuestsRow]) -> str:
    head = (
        f"{'guests':>6} {'path':<7} {'idle MB':>8} {'connected MB':>13} {'MB/guest':>9} {'guest RAM MB':>13} "
        f"{'threads':>8}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r.guests:>6} {r.metadata:<7} {r.idle_mb:>8.1f} {r.connected_mb:>13.1f} {r.per_guest_mb:>9.2f} "
            f"{r.guest_ram_mb:>13.1f} {r.threads:>8}"
        )
    return "\n".join(lines)


def main(a) -> int:
    counts = [int(x) for x in a.guests.split(",") if x.strip()]
    if not counts or min(counts) < 1:
        print(f"--guests {a.guests}: a list of guest counts, each at least 1", file=sys.stderr)
        return 2
    from ..frontend.net import warm_up

    paths = ["copy", "direct"] if a.metadata == "both" else [a.metadata]
    warm_up()
    rows: list[GuestsRow] = []
    with tempfile.TemporaryDirectory(prefix="pyvhost-guests-") as tmp:
        workdir = Path(a.workdir) if a.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for n in counts:
            for metadata in paths:
                print(f"[{n} guests, {metadata}] ...", file=sys.stderr, flush=True)
                rows.append(measure(n, metadata, workdir))
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    bad = [r for r in rows if r.errors]
    for r in bad:
        print(f"error: {r.guests} guests ({r.metadata}): {r.packets} packets, {r.errors} errors", file=sys.stderr)
    return 1 if bad else 0

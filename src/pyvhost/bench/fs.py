"""``pyvhost bench --device fs``: pyvhost's virtio-fs passthrough against QEMU's ``/usr/lib/qemu/virtiofsd`` on
the same kind of directory, measured from inside a Linux guest (QEMU, TCG) that mounts the tag, in one run.

Workloads, run in the guest by a small static C program (``GUEST_PROGRAM``, built here with ``gcc -static`` and
put into the guest's initramfs): 1 MiB sequential writes (``fsync`` at the end) and reads (guest page cache
dropped first) in MB/s; 4 KiB reads at random distinct page offsets (page cache dropped,
``POSIX_FADV_RANDOM`` so each read is one FUSE READ) in IOPS; metadata operations (create + stat + unlink of
one file) per second.  The back-end's CPU time (all its threads, from ``/proc``) is read at each phase's start
and end and given per operation.  Both back-ends run with their default thread pools and ``cache=auto``,
pinned to one CPU (QEMU to the other); runs of the two alternate and the ratio is taken per pair of runs.

The guest comes from the repository's guest kit (``tools/guestkit``: a Debian kernel and a busybox
initramfs, built by ``make deps``), so this benchmark runs from a source checkout with QEMU installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

from .peers import BACKEND_CPU, FRONTEND_CPU, cpu_seconds, pyvhost_cmd, stop, wait_for

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
TAG = "benchfs"
#: 4 KiB random reads and metadata operations per run
RAND_READS = 4096
META_OPS = 500
GUEST_TIMEOUT = 900.0
#: phase, unit of its rate, what one operation is
PHASES = [
    ("seqwrite", "MB/s", "MiB"),
    ("seqread", "MB/s", "MiB"),
    ("randread", "IOPS", "4 KiB read"),
    ("meta", "ops/s", "create+stat+unlink"),
]

GUEST_PROGRAM = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void drop_caches(void) {
    sync();
    int fd = open("/proc/sys/vm/drop_caches", O_WRONLY);
    if (fd >= 0) { if (write(fd, "3\n", 2) != 2) {} close(fd); }
}

static void mark(const char *phase) { printf("RESULT begin_%s=1\n", phase); fflush(stdout); }

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: fsbench DIR MIB RANDREADS METAOPS\n"); return 2; }
    const char *dir = argv[1];
    long mib = atol(argv[2]), nrand = atol(argv[3]), nmeta = atol(argv[4]);
    long errors = 0;
    char path[4096], name[4096];
    snprintf(path, sizeof path, "%s/bench.dat", dir);
    char *buf = aligned_alloc(4096, 1 << 20);
    for (int i = 0; i < (1 << 20); i++) buf[i] = (char)(i * 131 + 7);

    mark("seqwrite");
    double t0 = now();
    int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0644);
    if (fd < 0) { perror("open"); return 1; }
    for (long i = 0; i < mib; i++) {
        long off = 0;
        while (off < (1 << 20)) {
            ssize_t n = write(fd, buf + off, (1 << 20) - off);
            if (n <= 0) { errors++; break; }
            off += n;
        }
    }
    if (fsync(fd)) errors++;
    close(fd);
    printf("RESULT seqwrite_s=%.6f seqwrite_ops=%ld\n", now() - t0, mib);
    fflush(stdout);

    drop_caches();
    mark("seqread");
    t0 = now();
    fd = open(path, O_RDONLY);
    long long total = 0;
    ssize_t n;
    while ((n = read(fd, buf, 1 << 20)) > 0) total += n;
    if (n < 0 || total != (long long)mib << 20) errors++;
    close(fd);
    printf("RESULT seqread_s=%.6f seqread_ops=%ld\n", now() - t0, mib);
    fflush(stdout);

    drop_caches();
    long pages = mib * 256;
    if (nrand > pages) nrand = pages;
    long *order = malloc(sizeof(long) * pages);
    for (long i = 0; i < pages; i++) order[i] = i;
    unsigned long long x = 88172645463325252ULL;
    for (long i = pages - 1; i > 0; i--) {  /* Fisher-Yates with xorshift64 */
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        long j = (long)(x % (unsigned long long)(i + 1));
        long t = order[i]; order[i] = order[j]; order[j] = t;
    }
    mark("randread");
    t0 = now();
    fd = open(path, O_RDONLY);
    posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);
    for (long i = 0; i < nrand; i++)
        if (pread(fd, buf, 4096, order[i] * 4096) != 4096) errors++;
    close(fd);
    printf("RESULT randread_s=%.6f randread_ops=%ld\n", now() - t0, nrand);
    fflush(stdout);

    mark("meta");
    t0 = now();
    for (long i = 0; i < nmeta; i++) {
        struct stat st;
        snprintf(name, sizeof name, "%s/m%ld", dir, i);
        int f = open(name, O_CREAT | O_EXCL | O_WRONLY, 0644);
        if (f < 0) { errors++; continue; }
        close(f);
        if (stat(name, &st) || unlink(name)) errors++;
    }
    printf("RESULT meta_s=%.6f meta_ops=%ld\n", now() - t0, nmeta);
    unlink(path);
    printf("RESULT fsbench_errors=%ld\n", errors);
    fflush(stdout);
    return errors != 0;
}
"""


@dataclass
class FsRow:
    backend: str
    workload: str
    rate: float
    ops: int
    seconds: float
    errors: int
    run: int = 0
    #: CPU time the back-end process used per operation of the workload (microseconds)
    cpu_us_per_op: float = 0.0
    note: str = ""


def guestkit_module() -> ModuleType:
    """The repository's guest kit (``tools/guestkit/guestkit.py``), loaded from the source checkout."""
    path = Path(__file__).resolve().parents[3] / "tools" / "guestkit" / "guestkit.py"
    if not path.exists():
        raise RuntimeError(f"the fs benchmark boots a guest from the repository's guest kit; {path} is missing")
    spec = importlib.util.spec_from_file_location("guestkit", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("guestkit", mod)
    spec.loader.exec_module(mod)
    return mod


def guest_program(cache: Path) -> bytes:
    """The guest's benchmark program, compiled static once per source (cached by the hash of its text)."""
    digest = hashlib.sha256(GUEST_PROGRAM.encode()).hexdigest()[:16]
    exe = cache / f"fsbench-{digest}"
    if not exe.exists():
        cc = shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            raise RuntimeError("the fs benchmark compiles its guest program: gcc is missing")
        cache.mkdir(parents=True, exist_ok=True)
        src = cache / f"fsbench-{digest}.c"
        src.write_text(GUEST_PROGRAM)
        tmp = exe.with_suffix(".tmp")
        subprocess.run([cc, "-O2", "-static", "-o", str(tmp), str(src)], check=True, capture_output=True)
        tmp.rename(exe)
    return exe.read_bytes()


def start_backend(kind: str, shared: Path, sock: Path, log: Path) -> subprocess.Popen:
    if sock.exists():
        sock.unlink()
    if kind == "pyvhost":
        ready = sock.with_suffix(".ready")
        ready.unlink(missing_ok=True)
        cmd = pyvhost_cmd("serve", "fs", "--socket-path", str(sock), "--shared-dir", str(shared), "--tag", TAG)
        cmd += ["--cache", "auto", "--cpu", str(BACKEND_CPU), "--ready-file", str(ready)]
    else:
        if not os.path.exists(VIRTIOFSD):
            raise RuntimeError(f"{VIRTIOFSD} not found (Debian's qemu-system-common)")
        ready = sock
        cmd = ["taskset", "-c", str(BACKEND_CPU), VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={shared}"]
        cmd += ["-o", "cache=auto", "-o", "sandbox=chroot"]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    wait_for(ready, proc, 300.0, log)
    return proc


def measure(gk: ModuleType, kit, program: bytes, backend: str, run: int, workdir: Path, mib: int) -> list[FsRow]:
    """One guest boot on one back-end: the four phases, their rates and the back-end's CPU per operation."""

    class FsGuest(gk.Guest):  # type: ignore[name-defined,misc]
        """The kit's guest with a vhost-user-fs device."""

        def device_args(self) -> list[str]:
            return [
                "-chardev",
                f"socket,id=c0,path={self.socket_path}",
                "-device",
                f"vhost-user-fs-pci,chardev=c0,tag={TAG},queue-size=1024,vectors=0",
            ]

    shared = workdir / f"share-{backend}-{run}"
    shared.mkdir(parents=True, exist_ok=True)
    sock = workdir / f"fs-{backend}-{run}.sock"
    proc = start_backend(backend, shared, sock, workdir / f"fs-{backend}-{run}.log")
    script = (
        f"mkdir -p /mnt && mount -t virtiofs {TAG} /mnt || {{ echo 'RESULT mount=fail'; exit 1; }}\n"
        f"/fsbench /mnt {mib} {RAND_READS} {META_OPS}\n"
        "rc=$?\ncd / && umount /mnt\nexit $rc\n"
    )
    rows = []
    try:
        guest = FsGuest(kit, str(sock), "chmod 755 /fsbench\n" + script, workdir=str(workdir), memory_mb=1024)
        guest.files = {"fsbench": program}
        with guest:
            # pin QEMU away from the back-end (the guest's vCPU thread does the work)
            if (os.cpu_count() or 1) >= 2 and guest.proc is not None:
                subprocess.run(
                    ["taskset", "-a", "-p", "-c", str(FRONTEND_CPU), str(guest.proc.pid)], capture_output=True
                )
            for phase, _unit, _what in PHASES:
                guest.expect(f"begin_{phase}", GUEST_TIMEOUT)
                c0 = cpu_seconds(proc.pid)
                secs = float(guest.expect(f"{phase}_s", GUEST_TIMEOUT))
                cpu = cpu_seconds(proc.pid) - c0
                ops = int(guest.results[f"{phase}_ops"])
                rows.append(
                    FsRow(backend, phase, ops / secs if secs > 0 else 0.0, ops, secs, 0, run, cpu / max(1, ops) * 1e6)
                )
            errors = int(guest.expect("fsbench_errors", GUEST_TIMEOUT))
            guest.wait(GUEST_TIMEOUT)
        if errors or guest.results.get("exit") != "0":
            rows[-1].errors = max(1, errors)
            rows[-1].note = f"guest program: {errors} errors, exit {guest.results.get('exit')}"
    finally:
        stop(proc)
    return rows


def table(rows: list[FsRow]) -> str:
    lines = [
        f"{'workload':9} {'pyvhost':>22}  {'virtiofsd':>22}  pyvhost/virtiofsd"
        "   back-end CPU per op: pyvhost / virtiofsd   (ratio of each pair of runs)"
    ]
    for phase, unit, what in PHASES:
        cells, per = [], {}
        for be in ("pyvhost", "virtiofsd"):
            v = [r.rate for r in rows if r.backend == be and r.workload == phase]
            if not v:
                cells.append(f"{'-':>22}")
                continue
            cells.append(f"{statistics.median(v):.0f} {unit} ({min(v):.0f}–{max(v):.0f})".rjust(22))
            per[be] = statistics.median(r.cpu_us_per_op for r in rows if r.backend == be and r.workload == phase)
        mine = {r.run: r.rate for r in rows if r.backend == "pyvhost" and r.workload == phase}
        theirs = {r.run: r.rate for r in rows if r.backend == "virtiofsd" and r.workload == phase}
        pairs = [mine[k] / theirs[k] for k in sorted(mine) if theirs.get(k)]
        ratio = f"{statistics.median(pairs):.2f}x" if pairs else ""
        runs = f" (runs {', '.join(f'{x:.2f}' for x in pairs)})" if len(pairs) > 1 else ""
        cpu = " / ".join(f"{per[be]:.0f} us" for be in ("pyvhost", "virtiofsd") if be in per)
        lines.append(f"{phase:9} {cells[0]}  {cells[1]}  {ratio:>17}   {cpu} per {what}{runs}")
    return "\n".join(lines)


def main(a) -> int:
    gk = guestkit_module()
    if not gk.qemu_available():
        raise SystemExit("the fs benchmark boots a guest: qemu-system-x86_64 is missing (make deps)")
    kit = gk.build(log=lambda s: print(s, file=sys.stderr))
    program = guest_program(gk.cache_dir())
    backends = ["pyvhost"] + (["virtiofsd"] if os.path.exists(VIRTIOFSD) else [])
    if len(backends) == 1:
        print(f"note: {VIRTIOFSD} not found; measuring pyvhost only", file=sys.stderr)
    mib = a.fs_mb
    rows: list[FsRow] = []
    with tempfile.TemporaryDirectory(prefix="pyvhost-bench-fs-") as tmp:
        workdir = Path(a.workdir) if a.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for run in range(1, a.runs + 1):
            order = backends if run % 2 else backends[::-1]
            for be in order:
                print(f"[run {run}/{a.runs}] {be} ...", end="", file=sys.stderr, flush=True)
                try:
                    got = measure(gk, kit, program, be, run, workdir, mib)
                except (RuntimeError, OSError, ValueError, TimeoutError) as e:
                    got = [FsRow(be, p[0], 0.0, 0, 0.0, 1, run, note=str(e)[-300:]) for p in PHASES]
                rows += got
                print(" " + ", ".join(f"{r.workload} {r.rate:.0f}" for r in got), file=sys.stderr, flush=True)
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    bad = [r for r in rows if r.errors or r.ops == 0]
    for r in bad:
        print(f"error: {r.backend} {r.workload}: {r.errors} errors, {r.ops} ops {r.note}", file=sys.stderr)
    return 1 if bad else 0

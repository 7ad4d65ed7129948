"""A minimal Linux guest for testing pyvhost devices under QEMU, built from Debian packages only.

``build()`` fetches (``apt-get download``) the current bookworm ``linux-image-*-amd64`` and ``busybox-static``,
extracts the kernel and its virtio modules (with their dependencies, read from each module's ``.modinfo``), and
writes a gzip'ed cpio (newc) initramfs whose ``/init`` loads the modules, runs ``/test.sh``, prints its
machine-readable lines (``RESULT key=value``) on the serial console and powers off.  Everything is cached
under ``$PYVHOST_GUEST_CACHE`` (default ``~/.cache/pyvhost/guest``), keyed by the kernel package.

``Guest`` boots that kernel with a test script (appended to the initramfs as a second cpio archive) on QEMU
(TCG) with a vhost-user virtio-net device, reads the console as it comes, and enforces a timeout.

``tools_archive()`` adds dynamically linked tools a test asks for (``Guest.tools``: ``ethtool``), each with its
shared libraries and the dynamic loader from the same Debian packages, as one more cached cpio archive: the
base kit stays as it is.

``NetNS`` is a network namespace a test creates (and deletes), with a tap device inside it.

Command line:  ``python3 tools/guestkit/guestkit.py build``  (prints the paths of kernel and initramfs).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

#: virtio modules the guest loads, in load order (their dependencies are added before them).
MODULES = [
    "virtio",
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    "fuse",
    "virtiofs",
    "virtio_rng",
    "vmw_vsock_virtio_transport",
    "evdev",
    "virtio_input",
    "virtio_scsi",
    "sd_mod",
    "crc32c_generic",
    "ext4",
]

QEMU = "qemu-system-x86_64"

#: tools a guest may ask for (``Guest.tools``): name -> (its package, its path in the package, the packages of
#: its shared libraries, the library files it needs besides the loader)
TOOLS = {
    "ethtool": ("ethtool", "sbin/ethtool", ("libmnl0", "libc6"), ("libmnl.so.0", "libm.so.6", "libc.so.6")),
}
#: where the tools' libraries go in the guest, and the dynamic loader's path (x86_64 ELF interpreter)
GUEST_LIBDIR = "lib/x86_64-linux-gnu"
LOADER = "ld-linux-x86-64.so.2"

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
echo 1 > /proc/sys/kernel/printk 2>/dev/null
for m in $(cat /etc/modules.order); do
  if [ -e /sys/module/$m ]; then continue; fi
  insmod /lib/modules/$m.ko || echo "RESULT modfail=$m"
done
ip link set lo up
echo "RESULT boot=ok uptime=$(cut -d' ' -f1 /proc/uptime)"
if [ -f /test.sh ]; then
  sh /test.sh
  echo "RESULT exit=$?"
else
  echo "RESULT exit=none"
fi
echo "RESULT done=1"
sync
poweroff -f
"""


def cache_dir() -> Path:
    return Path(os.environ.get("PYVHOST_GUEST_CACHE", Path.home() / ".cache" / "pyvhost" / "guest"))


@dataclass
class Kit:
    kernel: Path
    initrd: Path
    version: str


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def kernel_package() -> str:
    """The bookworm kernel image package ``linux-image-amd64`` currently depends on."""
    if os.environ.get("PYVHOST_GUEST_KERNEL_PKG"):
        return os.environ["PYVHOST_GUEST_KERNEL_PKG"]
    out = _run(["apt-cache", "depends", "linux-image-amd64"])
    m = re.search(r"Depends: (linux-image-[0-9][^\s]*-amd64)\b", out)
    if not m:
        raise RuntimeError(f"cannot tell the current kernel package from apt-cache:\n{out}")
    return m.group(1)


def _download(pkg: str, dest: Path) -> Path:
    """``apt-get download`` one package into ``dest`` (once); return the .deb."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"{pkg}_*.deb"))
    if not found:
        subprocess.run(["apt-get", "download", "-q", pkg], cwd=dest, check=True, capture_output=True)
        found = sorted(dest.glob(f"{pkg}_*.deb"))
    if not found:
        raise RuntimeError(f"apt-get download {pkg} gave no .deb in {dest}")
    return found[-1]


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        data = lzma.decompress(data)
    elif path.name.endswith(".zst"):
        raise RuntimeError(f"{path}: zstd-compressed modules are not handled")
    return data


def module_depends(ko: bytes) -> list[str]:
    """The ``depends=`` field of a module's .modinfo section."""
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", ko)
    if not m or not m.group(1):
        return []
    return [d.decode() for d in m.group(1).split(b",") if d]


def resolve_modules(moddir: Path, wanted: list[str]) -> list[tuple[str, bytes]]:
    """The modules of ``wanted`` that are not built in, with their dependencies first, as (name, contents)."""
    builtin = set()
    bfile = moddir / "modules.builtin"
    if bfile.exists():
        builtin = {
            Path(line.strip()).name.split(".ko")[0].replace("-", "_")
            for line in bfile.read_text().splitlines()
            if line.strip()
        }
    paths = {}
    for p in (moddir / "kernel").rglob("*.ko*"):
        paths[p.name.split(".ko")[0].replace("-", "_")] = p
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, stack: tuple[str, ...] = ()) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        if name in stack:
            raise RuntimeError(f"module dependency loop: {' -> '.join(stack + (name,))}")
        if name not in paths:
            raise RuntimeError(f"module {name} is neither built in nor in {moddir}")
        ko = _read_module(paths[name])
        for dep in module_depends(ko):
            visit(dep, stack + (name,))
        seen.add(name)
        order.append((name, ko))

    for w in wanted:
        visit(w)
    return order


# -- cpio (newc) --------------------------------------------------------------------------------------------
class Cpio:
    """A gzip'ed cpio archive in the "newc" format the kernel unpacks into its initramfs."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        nameb = name.encode() + b"\x00"
        hdr = "070701" + "".join(
            f"{v:08X}" for v in (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(nameb), 0)
        )
        self.ino += 1
        self.buf.write(hdr.encode() + nameb)
        self.buf.write(b"\x00" * (-(110 + len(nameb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\x00" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return gzip.compress(self.buf.getvalue(), compresslevel=6, mtime=0)


def initramfs_name() -> str:
    """The base initramfs's file name, keyed by what goes into it (the modules and the init script): checkouts
    that want different modules share the cache without rebuilding over one another."""
    key = hashlib.sha256("\n".join([*MODULES, INIT]).encode()).hexdigest()[:12]
    return f"initramfs-{key}.cpio.gz"


def build(force: bool = False, log=print) -> Kit:
    """Build (or find in the cache) the guest kernel and base initramfs."""
    base = cache_dir()
    try:
        pkg = kernel_package()
    except (OSError, subprocess.CalledProcessError, RuntimeError):
        cached = sorted(base.glob(f"linux-image-*/{initramfs_name()}"))
        if cached and not force:  # no apt lists (offline): use what is cached
            d = cached[-1].parent
            return Kit(d / "vmlinuz", d / initramfs_name(), d.name)
        raise
    out = base / pkg
    kit = Kit(out / "vmlinuz", out / initramfs_name(), pkg)
    if not force and kit.kernel.exists() and kit.initrd.exists():
        return kit
    log(f"guestkit: building {out}")
    debs = base / "debs"
    kdeb = _download(pkg, debs)
    bdeb = _download("busybox-static", debs)
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        t = Path(tmp)
        subprocess.run(["dpkg-deb", "-x", str(kdeb), str(t / "k")], check=True)
        subprocess.run(["dpkg-deb", "-x", str(bdeb), str(t / "b")], check=True)
        (vmlinuz,) = (t / "k" / "boot").glob("vmlinuz-*")
        (moddir,) = (t / "k" / "lib" / "modules").iterdir()
        mods = resolve_modules(moddir, MODULES)
        busybox = (t / "b" / "bin" / "busybox").read_bytes()
        c = Cpio()
        for d in (
            "bin",
            "sbin",
            "dev",
            "etc",
            "lib",
            "lib/modules",
            "proc",
            "sys",
            "tmp",
            "root",
            "usr",
            "usr/bin",
            "usr/sbin",
        ):
            c.dir(d)
        c.file("bin/busybox", busybox, 0o755)
        c.symlink("bin/sh", "busybox")
        c.file("init", INIT.encode(), 0o755)
        c.file("etc/modules.order", "".join(f"{n}\n" for n, _ in mods).encode())
        for name, ko in mods:
            c.file(f"lib/modules/{name}.ko", ko)
        out.mkdir(parents=True, exist_ok=True)
        # each builder writes its own files and renames them into place: kits built at once never mix
        shutil.copyfile(vmlinuz, t / "vmlinuz")
        (t / "initramfs").write_bytes(c.finish())
        (t / "modules").write_text(f"{moddir.name} modules: {' '.join(n for n, _ in mods)}\n")
        os.replace(t / "vmlinuz", kit.kernel)
        os.replace(t / "modules", kit.initrd.with_suffix(".modules"))
        os.replace(t / "initramfs", kit.initrd)
    log(f"guestkit: kernel {moddir.name}, modules {' '.join(n for n, _ in mods)}")
    return kit


def tools_archive(names: list[str]) -> bytes:
    """A cpio archive (cached) with the tools ``names`` (:data:`TOOLS`) in ``/usr/sbin``, their libraries in
    ``/lib/x86_64-linux-gnu`` and the loader in ``/lib64``; appended to the initramfs like the script."""
    base = cache_dir()
    out = base / f"tools-{'-'.join(sorted(names))}.cpio.gz"
    if out.exists():
        return out.read_bytes()
    debs = base / "debs"
    c = Cpio()
    c.dir(GUEST_LIBDIR)
    c.dir("lib64")
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        t = Path(tmp)
        libs: dict[str, bytes] = {}
        for name in sorted(names):
            pkg, path, lib_pkgs, lib_files = TOOLS[name]
            for p in (pkg, *lib_pkgs):
                subprocess.run(["dpkg-deb", "-x", str(_download(p, debs)), str(t)], check=True)
            c.file(f"usr/sbin/{name}", (t / path).read_bytes(), 0o755)
            for lib in (*lib_files, LOADER):
                # (symlinks to one file; an absolute one, /lib64's loader, would point out of the packages)
                (found,) = {f.resolve() for f in t.glob(f"**/{lib}") if f.resolve().is_relative_to(t.resolve())}
                libs[lib] = found.read_bytes()
    for lib, data in sorted(libs.items()):
        c.file(f"{GUEST_LIBDIR}/{lib}", data, 0o755)
    c.symlink(f"lib64/{LOADER}", f"../{GUEST_LIBDIR}/{LOADER}")
    data = c.finish()
    tmp_out = out.with_suffix(f".{os.getpid()}.tmp")
    tmp_out.write_bytes(data)
    os.replace(tmp_out, out)
    return data


def script_archive(script: str, files: dict[str, bytes] | None = None) -> bytes:
    """A second initramfs archive with ``/test.sh`` (and more files), appended to the base one."""
    c = Cpio()
    c.file("test.sh", script.encode(), 0o755)
    for name, data in (files or {}).items():
        c.file(name.lstrip("/"), data, 0o644)
    return c.finish()


# -- QEMU ---------------------------------------------------------------------------------------------------
def qemu_available() -> bool:
    return shutil.which(QEMU) is not None


def parse_result(line: str) -> dict[str, str]:
    """``RESULT a=1 b=two`` -> {"a": "1", "b": "two"} (the line may have console noise before RESULT)."""
    i = line.find("RESULT ")
    if i < 0:
        return {}
    out = {}
    for tok in line[i + 7 :].split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            out[k] = v
    return out


@dataclass
class Guest:
    """One QEMU guest with a vhost-user virtio-net device on ``socket_path``, running ``script``."""

    kit: Kit
    socket_path: str
    script: str
    mac: str = "52:54:00:12:34:56"
    memory_mb: int = 512
    reconnect: bool = False
    append: str = ""
    extra_args: list[str] = field(default_factory=list)
    workdir: str | None = None
    #: more virtio-net-pci properties, e.g. "packed=on"
    device_opts: str = ""
    #: more files for the guest's root (name -> bytes), beside /test.sh
    files: dict[str, bytes] = field(default_factory=dict)
    #: dynamically linked tools the script uses (:data:`TOOLS`, e.g. ``["ethtool"]``)
    tools: list[str] = field(default_factory=list)
    #: virtual CPUs
    smp: int = 1
    #: virtio-net queue pairs (``queues=N`` on the vhost-user netdev, ``mq=on`` on the device when N > 1)
    queue_pairs: int = 1
    #: behind a virtual IOMMU: an intel-iommu (interrupt remapping, device IOTLB) on a split-irqchip q35, the
    #: device on a PCIe root port (ATS needs PCIe; without it the guest sends no invalidations to the device)
    #: with ``iommu_platform=on,ats=on``, and the guest kernel's ``intel_iommu=on``
    viommu: bool = False

    def __post_init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.results: dict[str, str] = {}
        self._events: queue.Queue[str | None] = queue.Queue()
        self._reader: threading.Thread | None = None
        #: notified on every console line and at the console's end (``_ended``)
        self._line = threading.Condition()
        self._ended = False
        self._tmp = tempfile.mkdtemp(prefix="pyvhost-guest-", dir=self.workdir)
        self.log_path = Path(self._tmp) / "console.log"

    def device_args(self) -> list[str]:
        """The QEMU arguments of the vhost-user device (virtio-net here; a subclass may give another)."""
        chardev = f"socket,id=c0,path={self.socket_path}" + (",reconnect=1" if self.reconnect else "")
        mq = self.queue_pairs > 1
        return [
            "-chardev",
            chardev,
            "-netdev",
            "vhost-user,id=n0,chardev=c0" + (f",queues={self.queue_pairs}" if mq else ""),
            "-device",
            f"virtio-net-pci,netdev=n0,vectors=0,mac={self.mac},romfile={self.iommu_opts()}"
            + (",mq=on" if mq else "")
            + (f",{self.device_opts}" if self.device_opts else ""),
        ]

    def machine_args(self) -> list[str]:
        """``-machine`` and, with :attr:`viommu`, the IOMMU and the root port the device goes on (``rp0``)."""
        if not self.viommu:
            return ["-machine", "q35"]
        return [
            "-machine",
            "q35,kernel-irqchip=split",
            "-device",
            "intel-iommu,intremap=on,device-iotlb=on",
            "-device",
            "pcie-root-port,id=rp0,bus=pcie.0,chassis=1",
        ]

    def iommu_opts(self) -> str:
        """The device properties that put a virtio device behind the vIOMMU (empty without :attr:`viommu`)."""
        return ",bus=rp0,iommu_platform=on,ats=on" if self.viommu else ""

    def command(self, initrd: str) -> list[str]:
        m = self.memory_mb
        append = f"console=ttyS0 quiet panic=-1 oops=panic {self.append}"
        if self.viommu:
            append += " intel_iommu=on no_timer_check"
        return [
            QEMU,
            *self.machine_args(),
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            str(self.smp),
            "-m",
            str(m),
            "-object",
            f"memory-backend-memfd,id=mem,size={m}M,share=on",
            "-numa",
            "node,memdev=mem",
            *self.device_args(),
            "-kernel",
            str(self.kit.kernel),
            "-initrd",
            initrd,
            "-append",
            " ".join(append.split()),
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            *self.extra_args,
        ]

    def start(self) -> Guest:
        initrd = Path(self._tmp) / "initrd.gz"
        tools = tools_archive(self.tools) if self.tools else b""
        initrd.write_bytes(self.kit.initrd.read_bytes() + tools + script_archive(self.script, self.files))
        self.proc = subprocess.Popen(
            self.command(str(initrd)), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "w", errors="replace") as log:
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                log.write(line + "\n")
                log.flush()
                with self._line:
                    self.lines.append(line)
                    self._line.notify_all()
                r = parse_result(line)
                if r:
                    self.results.update(r)
                    for k in r:
                        self._events.put(k)
        with self._line:
            self._ended = True
            self._line.notify_all()
        self._events.put(None)

    def expect(self, key: str, timeout: float) -> str:
        """Wait until a RESULT line has set ``key``; return its value."""
        deadline = time.monotonic() + timeout
        while key not in self.results:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"guest: no RESULT {key}= within {timeout:.0f} s\n{self.tail()}")
            try:
                if self._events.get(timeout=left) is None:
                    self._events.put(None)
                    if key in self.results:
                        break
                    raise RuntimeError(f"guest ended without RESULT {key}=\n{self.tail()}")
            except queue.Empty:
                continue
        return self.results[key]

    def expect_line(self, pattern: str, timeout: float) -> str:
        """Wait until a console line matches ``pattern`` (a regular expression); return that line."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._line:
            while True:
                for line in self.lines[seen:]:
                    if rx.search(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._ended:
                    raise RuntimeError(f"guest ended without a line matching {pattern!r}\n{self.tail()}")
                if left <= 0:
                    raise TimeoutError(f"guest: no line matching {pattern!r} within {timeout:.0f} s\n{self.tail()}")
                self._line.wait(left)

    def wait(self, timeout: float) -> dict[str, str]:
        """Wait for the guest to power off (killed after ``timeout``); return its results."""
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"guest still running after {timeout:.0f} s (killed)\n{self.tail()}") from None
        if self._reader:
            self._reader.join(5)
        return self.results

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self._reader:
            self._reader.join(5)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# -- network namespace with a tap -------------------------------------------------------------------------
class NetNS:
    """A network namespace of the test's own (deleted on close); commands run inside it with ``run``/``popen``."""

    def __init__(self, name: str) -> None:
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        self.run("ip", "link", "set", "lo", "up")

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*cmd), check=check, capture_output=True, text=True, timeout=timeout)

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*cmd), **kw)

    def add_tap(self, tap: str, address: str, multi_queue: bool = False) -> None:
        """A persistent tap in the namespace with ``address`` (a /24 of the test's own), up; ``multi_queue``: made
        with IFF_MULTI_QUEUE (a back-end then attaches a queue per pair)."""
        self.run(
            "ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr", *(["multi_queue"] if multi_queue else [])
        )
        self.run("ip", "addr", "add", address, "dev", tap)
        self.run("ip", "link", "set", tap, "up")

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["build"]:
        kit = build(force="--force" in argv)
        print(f"kernel {kit.kernel}\ninitrd {kit.initrd}")
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A real guest on ``pyvhost serve input --events FIFO``: QEMU with ``vhost-user-input-pci``, which QEMU 7.2 only
realizes with KVM ("vhost initialization failed: requires kvm" under TCG) -- so this test runs where ``/dev/kvm``
runs the kit's kernel, and is skipped, saying so plainly, where it does not (the protocol is checked without a VM
in tests/devices/test_input.py).  Where that is decides ``tools/guestkit/kvmprobe.py`` when the module is
collected, in well under a second (a real vCPU run, and no PVM); a KVM that passes it and still does not start
the kernel costs at most KVM_BOOT_TIMEOUT.

The guest finds its virtio-input device by name in sysfs, opens ``/dev/input/eventN`` (and says so); the host
then writes events into the back-end's FIFO as JSON lines, and the guest reads them from evdev: every one
arrives, in order.  The guest also sets the Caps Lock LED through evdev, which reaches the back-end on the
status queue and is reported in its counters.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "guestkit"))
import guestkit  # noqa: E402
import kvmprobe  # noqa: E402

from .conftest import assert_log_path, needs  # noqa: E402

GUEST_TIMEOUT = 300
#: a KVM guest's kernel speaks (early console) within a second or two of QEMU's start; a /dev/kvm that passes the
#: probe and has not started the kit's kernel by then will not: the test then skips, saying so
KVM_BOOT_TIMEOUT = 15
#: the kernel's first words from start_kernel on the early console (``earlyprintk``; ``loglevel=6`` lets this
#: KERN_NOTICE line out under ``quiet``, and the few others of a quiet boot until the guest's init sets it to 1)
KERNEL_FIRST_LINE = r"Kernel command line: "
EARLY_CONSOLE = "earlyprintk=ttyS0 loglevel=6"
NAME = "pyvhost test keyboard"
#: keys pressed and released, each press and release followed by a report: 4 evdev events each
KEYS = ["KEY_A", "KEY_B", "KEY_C", "KEY_1", "KEY_ENTER", "KEY_SPACE", "KEY_LEFTSHIFT", "KEY_F1"]
MOVES = [(dx, -dx) for dx in (1, 5, -7, 20)]  # REL_X/REL_Y, then a report: 3 events each
KEY_CODES = {"KEY_A": 30, "KEY_B": 48, "KEY_C": 46, "KEY_1": 2, "KEY_ENTER": 28, "KEY_SPACE": 57,
             "KEY_LEFTSHIFT": 42, "KEY_F1": 59}  # fmt: skip
EV_SYN, EV_KEY, EV_REL, EV_LED, LED_CAPSL = 0, 1, 2, 0x11, 1


KVM_UNUSABLE = kvmprobe.unusable_reason()

pytestmark = [
    pytest.mark.vm,
    needs(guestkit.qemu_available(), "qemu-system-x86_64 missing: run `make deps`"),
    # a plain skip, in CI too: KVM is the machine's, not something CI installs
    pytest.mark.skipif(
        KVM_UNUSABLE is not None,
        reason=f"{KVM_UNUSABLE}; QEMU 7.2 realizes vhost-user-input-pci only with KVM: this guest test did not run",
    ),
]

#: find the device, read every event the host sends, set Caps Lock; RESULT lines for the host
SCRIPT = f"""
dev=
for d in /sys/class/input/event*; do
  [ "$(cat $d/device/name 2>/dev/null)" = "{NAME}" ] && dev=/dev/input/${{d##*/}}
done
echo "RESULT device=${{dev:-none}}"
[ -n "$dev" ] || exit 1
echo "RESULT serial=$(cat /sys/class/input/${{dev##*/}}/device/uniq 2>/dev/null | tr ' ' _)"
dd if=$dev of=/tmp/ev bs=24 count=$1 2>/dev/null &
reader=$!
while ! ls -l /proc/$reader/fd 2>/dev/null | grep -q "$dev"; do sleep 0.1; done
echo "RESULT reading=1"
wait $reader
echo "RESULT events=$(od -An -v -tx1 -w24 /tmp/ev | cut -c49- | tr -d ' \\n')"
printf '\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\21\\0\\1\\0\\1\\0\\0\\0' > $dev
printf '\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0' > $dev
echo "RESULT led=set"
"""


def stream() -> tuple[list[str], list[tuple[int, int, int]]]:
    """The JSON lines the host writes, and the (type, code, value) the guest's evdev must give back."""
    lines, want = [], []

    def add(t: str, c: str | int, v: int, tn: int, cn: int) -> None:
        lines.append(json.dumps({"type": t, "code": c, "value": v}))
        want.append((tn, cn, v))

    for k in KEYS:
        for v in (1, 0):
            add("EV_KEY", k, v, EV_KEY, KEY_CODES[k])
            add("EV_SYN", "SYN_REPORT", 0, EV_SYN, 0)
    for dx, dy in MOVES:
        add("EV_REL", "REL_X", dx, EV_REL, 0)
        add("EV_REL", "REL_Y", dy, EV_REL, 1)
        add("EV_SYN", "SYN_REPORT", 0, EV_SYN, 0)
    return lines, want


class InputGuest(guestkit.Guest):
    """The kit's guest under KVM with a vhost-user-input-pci device."""

    def device_args(self) -> list[str]:
        return ["-chardev", f"socket,id=c0,path={self.socket_path}", "-device", "vhost-user-input-pci,chardev=c0"]

    def command(self, initrd: str) -> list[str]:
        cmd = super().command(initrd)
        cmd[cmd.index("-accel") + 1] = "kvm"
        cmd[cmd.index("-cpu") + 1] = "host,-arch-capabilities"  # a nested KVM may refuse that MSR
        return cmd


def test_guest_reads_host_events_in_order(kit, tmp_path):
    lines, want = stream()
    fifo = tmp_path / "events"
    os.mkfifo(fifo)
    sock, log, out, ready = (str(tmp_path / n) for n in ("input.sock", "input.log", "input.out", "ready"))
    argv = [sys.executable, "-m", "pyvhost", "serve", "input", "--socket-path", sock, "--ready-file", ready]
    argv += ["--events", str(fifo), "--name", NAME, "--serial", "kvm-1"]
    backend = subprocess.Popen(argv, stdout=open(out, "w"), stderr=open(log, "w"))
    writer = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)  # the back-end opens it read-write too: never EOF
    t0 = time.monotonic()
    try:
        deadline = time.monotonic() + 240  # a cold kernel compile may come first
        while not os.path.exists(ready):
            assert backend.poll() is None, Path(log).read_text()
            assert time.monotonic() < deadline, "back-end not ready"
            time.sleep(0.05)
        script = SCRIPT.replace("$1", str(len(want)))
        with InputGuest(kit, sock, script, workdir=str(tmp_path), memory_mb=256, append=EARLY_CONSOLE) as g:
            try:
                g.expect_line(KERNEL_FIRST_LINE, KVM_BOOT_TIMEOUT)
            except TimeoutError:  # QEMU still runs, the kernel has not started (QEMU ending is a failure)
                said = [line for line in g.lines if re.search(r"[A-Za-z]{3}", line)] or ["nothing"]
                pytest.skip(f"/dev/kvm passed kvmprobe, but QEMU on it did not start the kit's kernel within "
                            f"{KVM_BOOT_TIMEOUT} s (no {KERNEL_FIRST_LINE!r} on the console, its last words "
                            f"{said[-1]!r}); this guest test did not run")  # fmt: skip
            g.expect("boot", GUEST_TIMEOUT)
            assert g.expect("device", GUEST_TIMEOUT) != "none", g.tail(60)
            g.expect("reading", GUEST_TIMEOUT)
            os.write(writer, ("\n".join(lines) + "\n").encode())
            g.wait(GUEST_TIMEOUT)
        r = dict(g.results)
    finally:
        os.close(writer)
        if backend.poll() is None:
            backend.send_signal(signal.SIGTERM)
            try:
                backend.wait(30)
            except subprocess.TimeoutExpired:
                backend.kill()
                backend.wait()
    took = time.monotonic() - t0
    logs = Path(log).read_text()
    assert r.get("exit") == "0", g.tail(60)
    assert r["serial"] == "kvm-1", r
    raw = bytes.fromhex(r["events"])
    got = [(int.from_bytes(raw[i : i + 2], "little"), int.from_bytes(raw[i + 2 : i + 4], "little"),
            int.from_bytes(raw[i + 4 : i + 8], "little", signed=True)) for i in range(0, len(raw), 8)]  # fmt: skip
    assert got == want
    stats = json.loads(Path(out).read_text().splitlines()[-1])["input"]
    assert stats["leds"].get(str(LED_CAPSL)) == 1 and stats["events"] >= len(want), stats
    assert "input status: type 17 code 1 value 1" in logs, logs[-3000:]
    assert_log_path(logs, "direct", at_least=1)
    assert "Traceback" not in logs and " ERROR " not in logs, logs[-3000:]
    print(f"{len(want)} events host -> guest evdev in order, Caps Lock LED back; {took:.1f} s")

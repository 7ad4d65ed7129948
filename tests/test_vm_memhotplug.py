"""Memory hot-plug in a real guest: QEMU (TCG, ``-m 512M,slots=4,maxmem=1G``) on ``pyvhost serve blk`` gets a
256 MiB ``pc-dimm`` (``memory-backend-memfd,share=on``) by QMP while the guest writes to its disk; with
CONFIGURE_MEM_SLOTS offered, QEMU 7.2 sends the new region by ADD_MEM_REG while the ring runs.  The guest onlines
the memory, fills most of its old memory so that its next I/O buffers come from the new one, and reads back with
O_DIRECT: every byte exact, on both metadata paths.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "guestkit"))
import guestkit  # noqa: E402
from migration import BlkMigGuest  # noqa: E402

from .conftest import assert_log_path, needs  # noqa: E402
from .test_vm_blk import Disk  # noqa: E402

MiB = 1 << 20
GUEST_TIMEOUT = 300
DATA_MIB = 16
DIMM = 256 * MiB
#: copies of the data the guest writes (the image's last sector aside)
COPIES = 7

pytestmark = [
    pytest.mark.vm,
    needs(guestkit.qemu_available(), "qemu-system-x86_64 missing: run `make deps`"),
]

SCRIPT = f"""
memtotal() {{ grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2; }}
memfree() {{ grep MemFree /proc/meminfo | tr -s ' ' | cut -d' ' -f2; }}
online() {{ cat /sys/devices/system/memory/memory*/online 2>/dev/null | grep -c 1; }}
m0=$(memtotal)
b0=$(online)
dd if=/dev/urandom of=/tmp/a bs=1M count={DATA_MIB} 2>/dev/null
echo "RESULT a_md5=$(md5sum /tmp/a | cut -d' ' -f1)"
# most of the old memory taken: what the guest allocates after the plug comes mostly from the DIMM
fill=$(( $(memfree) / 1024 - 96 ))
dd if=/dev/zero of=/tmp/fill bs=1M count=$fill 2>/dev/null
echo "RESULT filled=$fill"
echo "RESULT writing=1"
n=0; werr=0
while [ "$(memtotal)" = "$m0" ] && [ $n -lt 2000 ]; do
  dd if=/tmp/a of=/dev/vda bs=1M oflag=direct 2>/tmp/e || {{ werr=$((werr + 1)); echo "dd $n: $(cat /tmp/e)"; }}
  n=$((n + 1))
done
echo "RESULT passes_before=$n"
for b in /sys/devices/system/memory/memory*; do
  [ "$(cat $b/online)" = 0 ] && echo online > $b/state
done
echo "RESULT plugged_kib=$(( $(memtotal) - m0 )) blocks=$(( $(online) - b0 ))"
dd if=/dev/zero of=/tmp/fill2 bs=1M count=64 2>/dev/null
for i in 1 2 3 4 5 6; do
  dd if=/tmp/a of=/dev/vda bs=1M seek=$((i * {DATA_MIB})) oflag=direct 2>/tmp/e || {{
    werr=$((werr + 1)); echo "dd copy $i: $(cat /tmp/e)"; }}
done
ok=0
for i in 0 1 2 3 4 5 6; do
  s=$(dd if=/dev/vda bs=1M skip=$((i * {DATA_MIB})) count={DATA_MIB} iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$s" = "$(md5sum /tmp/a | cut -d' ' -f1)" ] && ok=$((ok + 1))
done
echo "RESULT werr=$werr copies_ok=$ok"
echo "RESULT ioerr=$(dmesg | grep -c -i 'I/O error')"
"""


@dataclass
class HotplugGuest(BlkMigGuest):
    """The blk guest with a QMP socket and room for DIMMs."""

    def command(self, initrd: str) -> list[str]:
        cmd = super().command(initrd)
        i = cmd.index("-m")
        cmd[i + 1] = f"{self.memory_mb}M,slots=4,maxmem=1G"
        return cmd


@pytest.mark.parametrize("metadata", ["direct", "copy"])
def test_memory_hotplug_while_the_guest_writes(kit, tmp_path, metadata):
    d = Disk(tmp_path, "--metadata", metadata)
    d.start()
    try:
        g = HotplugGuest(kit, d.sock, SCRIPT, workdir=str(tmp_path), append="memhp_default_state=online")
        with g:
            g.expect("writing", GUEST_TIMEOUT)
            g.qmp.cmd("object-add", **{"qom-type": "memory-backend-memfd", "id": "hp0", "size": DIMM, "share": True})
            g.qmp.cmd("device_add", driver="pc-dimm", id="dimm0", memdev="hp0")
            g.expect("werr", GUEST_TIMEOUT)
            g.wait(GUEST_TIMEOUT)
        log = d.logs[-1].read_text()
    finally:
        d.stop()
    r = g.results
    assert r.get("exit") == "0", g.tail()
    assert int(r["plugged_kib"]) == DIMM >> 10, g.tail()
    assert int(r["passes_before"]) < 2000, "the guest never saw the memory"
    assert r["werr"] == "0" and r["copies_ok"] == str(COPIES) and r["ioerr"] == "0", g.tail()
    added = [line for line in log.splitlines() if "memory region added" in line]
    assert added and "256 MiB" in added[-1], log[-3000:]
    assert "ERROR" not in log, log[-3000:]
    assert_log_path(log, metadata, at_least=2)  # the ring restarted after the ADD_MEM_REG, on its path
    with open(d.image, "rb") as f:
        data = f.read(COPIES * DATA_MIB * MiB)
    first = hashlib.md5(data[: DATA_MIB * MiB]).hexdigest()
    assert first == r["a_md5"]
    assert all(
        hashlib.md5(data[i * DATA_MIB * MiB : (i + 1) * DATA_MIB * MiB]).hexdigest() == first for i in range(COPIES)
    )

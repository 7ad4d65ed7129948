"""The example device of docs/writing-a-device.md, run as written: served by pyvhost, driven by BlkFrontend."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest

from pyvhost.access import Metadata
from pyvhost.backend import Server
from pyvhost.devices.blk import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_IN
from pyvhost.frontend.blk import BlkFrontend

DOC = Path(__file__).resolve().parents[2] / "docs" / "writing-a-device.md"


def example() -> dict:
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    assert 40 <= len(code.splitlines()) <= 70  # a complete device in about 50 lines
    ns: dict = {"__name__": "ramdisk"}
    exec(compile(code, str(DOC), "exec"), ns)
    return ns


@pytest.mark.parametrize("metadata", ["direct", "copy"])
def test_doc_example_ramdisk(sock_path, metadata):
    dev = example()["RamDisk"](size=4 << 20)
    srv = Server(dev, sock_path, Metadata(metadata))
    t = threading.Thread(target=srv.serve, daemon=True)
    t.start()
    try:
        with BlkFrontend(sock_path) as fe:
            fe.setup()
            assert fe.config["capacity"] == (4 << 20) // 512
            blocks = {i: os.urandom(4096) for i in range(0, 64, 3)}
            for i, data in blocks.items():  # many in flight, completed by the pool in any order
                fe.post(1, 8 * i, data=data, tag=i)
            done = []
            while len(done) < len(blocks):
                done += [c for c in fe.wait()]
            assert all(c.status == VIRTIO_BLK_S_OK for c in done)
            for i, data in blocks.items():
                assert fe.read(8 * i, 4096) == (VIRTIO_BLK_S_OK, data)
            assert fe.flush() == VIRTIO_BLK_S_OK
            assert fe.read(fe.capacity(), 512)[0] == VIRTIO_BLK_S_IOERR
            assert fe.io(8, 0, 20)[0] == VIRTIO_BLK_S_UNSUPP  # GET_ID: not implemented by the example
            assert fe.io(VIRTIO_BLK_T_IN, 0, 4096)[0] == VIRTIO_BLK_S_OK
            assert fe.anomalies == []
    finally:
        srv.stop()
        t.join(10)
        srv.close()
        dev.pool.shutdown()

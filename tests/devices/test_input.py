"""virtio-input through pyvhost's front-end and a small driver of its two rings: the config space byte for byte
(SET_CONFIG of select/subsel as QEMU sends it, GET_CONFIG of the answer), events in order with none lost when
the driver has no buffer posted, the status queue, malformed chains, a ring stopped with buffers held, event
streams.  The expected bytes are written out here from virtio 1.2 §5.8 and linux/input-event-codes.h, not
computed with the device's own helpers."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from pyvhost import protocol as P
from pyvhost.devices.input import InputDevice, keyboard_mouse, parse_event
from pyvhost.frontend.chains import RingDriver, ring_driver
from pyvhost.frontend.net import Frontend, FrontendError
from pyvhost.protocol import Request as R
from pyvhost.ring.packed import encode_base

EV_SYN, EV_KEY, EV_REL, EV_ABS, EV_LED = 0, 1, 2, 3, 0x11
KEY_A, KEY_B, BTN_LEFT, REL_X, LED_CAPSL = 30, 48, 0x110, 0, 1
NAME = b"pyvhost keyboard and mouse"
EVENT = struct.Struct("<HHi")


def ev(t: int, c: int, v: int) -> bytes:
    return EVENT.pack(t, c, v)


@pytest.fixture(params=["direct", "copy", "direct-packed", "copy-packed"])
def input_dev(serve, sock_path, request):
    """An input device (with an absolute pointer, 0..32767) on each metadata path, a started front-end, the two
    rings' drivers, and the status events the device reported."""
    seen: list[tuple[int, int, int]] = []
    dev = InputDevice(keyboard_mouse(abs_max=32767), on_status=lambda *e: seen.append(e))
    metadata, _, layout = request.param.partition("-")
    srv = serve(device=dev, metadata=metadata)
    fe = Frontend(sock_path, num_queues=2, queue_size=64, packed=layout == "packed")
    fe.setup()
    srv.assert_path(metadata, [0, 1])
    try:
        yield dev, fe, ring_driver(fe, 0), ring_driver(fe, 1), seen
    finally:
        fe.close()
        dev.close()


def set_config(fe: Frontend, offset: int, data: bytes) -> None:
    fe.command(R.SET_CONFIG, P.CONFIG_HDR.pack(offset, len(data), 0) + data)


def get_config(fe: Frontend, offset: int = 0, size: int = 136) -> bytes:
    reply = fe.request(R.GET_CONFIG, P.CONFIG_HDR.pack(offset, size, 0) + bytes(size))
    assert P.CONFIG_HDR.unpack_from(reply)[:2] == (offset, size)
    return reply[P.CONFIG_HDR.size :]


def query(fe: Frontend, select: int, subsel: int) -> bytes:
    """As QEMU's vhost-user-input does: the whole config with select/subsel in it, then read 128 bytes."""
    set_config(fe, 0, bytes([select, subsel]) + b"\xee" * 134)  # the rest is the front-end's stale copy
    return get_config(fe, 0, 128)


def test_config_space_byte_for_byte(input_dev):
    _, fe, _, _, _ = input_dev
    keys = bytes([0xFE]) + b"\xff" * 30 + bytes([0x01, 0, 0, 0xFF])  # KEY_ESC..KEY_MICMUTE, BTN_LEFT..BTN_TASK
    cases = {
        (0x01, 0): NAME,
        (0x02, 0): b"pyvhost-input",
        (0x03, 0): struct.pack("<HHHH", 0x06, 0x1AF4, 0x1100, 1),  # BUS_VIRTUAL
        (0x10, 0): b"",  # no properties
        (0x11, EV_KEY): keys,
        (0x11, EV_REL): bytes([0x43, 0x01]),  # REL_X, REL_Y, REL_HWHEEL (6), REL_WHEEL (8)
        (0x11, EV_ABS): bytes([0x03]),  # ABS_X, ABS_Y
        (0x11, EV_LED): bytes([0x07]),  # NUML, CAPSL, SCROLLL
        (0x11, EV_SYN): b"",
        (0x11, 0x15): b"",  # EV_FF: none
        (0x12, 0): struct.pack("<iiiii", 0, 32767, 0, 0, 0),  # ABS_X
        (0x12, 1): struct.pack("<iiiii", 0, 32767, 0, 0, 0),
        (0x12, 2): b"",  # ABS_Z: not an axis of this device
        (0x01, 1): b"",  # a name has no subsel 1
        (0x00, 0): b"",  # VIRTIO_INPUT_CFG_UNSET
        (0x7F, 3): b"",  # no such select
    }
    for (select, subsel), u in cases.items():
        got = query(fe, select, subsel)
        want = bytes([select, subsel, len(u), 0, 0, 0, 0, 0]) + u.ljust(128, b"\0")
        assert got == want[:128], (select, subsel, got)
        assert get_config(fe) == want  # the whole 136 bytes too
    # a driver writing subsel alone (offset 1), then select alone (offset 0)
    set_config(fe, 1, bytes([EV_LED]))
    set_config(fe, 0, bytes([0x11]))
    assert get_config(fe, 0, 3) == bytes([0x11, EV_LED, 1])
    assert get_config(fe, 8, 1) == bytes([0x07])
    # malformed: beyond the config space -- refused, the connection goes on, the selection unchanged
    with pytest.raises(FrontendError):
        set_config(fe, 130, bytes(10))
    with pytest.raises(FrontendError):
        set_config(fe, 136, b"\x01")
    reply = fe.request(R.GET_CONFIG, P.CONFIG_HDR.pack(100, 100, 0) + bytes(100))
    assert reply[P.CONFIG_HDR.size :] == bytes(100)  # a failed GET_CONFIG carries no config bytes
    assert get_config(fe, 0, 3) == bytes([0x11, EV_LED, 1])


def test_events_in_order_none_lost_without_buffers(input_dev):
    dev, _, evq, _, _ = input_dev
    sent = [(EV_KEY, KEY_A, 1), (EV_SYN, 0, 0), (EV_KEY, KEY_A, 0), (EV_SYN, 0, 0)]
    sent += [(EV_REL, REL_X, -5 * i) for i in range(1, 7)] + [(EV_ABS, 1, 32767), (EV_SYN, 0, 0)]
    heads = [evq.post(8) for _ in range(4)]
    for e in sent:
        dev.send(*e)
    got = evq.wait(4)
    assert [h for h, _ in got] == heads and all(n == 8 for _, n in got)
    data = [bytes(evq.buf(h)[:8]) for h in heads]
    assert data == [ev(*e) for e in sent[:4]]
    time.sleep(0.05)
    assert evq.used() == [] and dev.stats()["pending"] == len(sent) - 4  # the rest wait for buffers
    for _ in range(len(sent) - 4):
        heads.append(evq.post(8))
    got = evq.wait(len(sent) - 4)
    assert [bytes(evq.buf(h)[:8]) for h, _ in got] == [ev(*e) for e in sent[4:]]
    assert dev.wait_delivered(1) and dev.stats()["events"] == len(sent)
    # a buffer split over two descriptors (a guest whose buffer crosses a page) gets its event whole
    head = evq.post(3, 5)
    first, second = evq.chains[head]
    dev.send(EV_KEY, BTN_LEFT, 1)
    assert evq.wait(1) == [(head, 8)]
    assert bytes(evq.buf(first)[:3]) + bytes(evq.buf(second)[:5]) == ev(EV_KEY, BTN_LEFT, 1)
    with pytest.raises(ValueError):
        dev.send(EV_KEY, 0x2FF, 1)  # not a key of this device
    with pytest.raises(ValueError):
        dev.send(EV_REL, REL_X, 1 << 31)


def test_status_queue_reports_leds(input_dev):
    dev, _, _, stq, seen = input_dev
    stq.post(ev(EV_LED, LED_CAPSL, 1))
    stq.post(ev(EV_LED, 0, 1))
    got = stq.wait(2)
    assert [n for _, n in got] == [0, 0]  # the device writes nothing into status buffers
    assert seen == [(EV_LED, LED_CAPSL, 1), (EV_LED, 0, 1)]
    assert dev.stats()["leds"] == {"0": 1, "1": 1}


def test_malformed_chains_never_written_outside(input_dev, errors):
    dev, fe, evq, stq, seen = input_dev
    # an event buffer of 4 bytes: completed empty, nothing written (the bytes after it are ours)
    head = evq.post(4, kick=False)
    evq.buf(head)[:] = 0xA5
    os.eventfd_write(evq.ring.kick_fd, 1)
    wrong = evq.post(b"readable")  # wrong direction: the device would have to write into a readable buffer
    dev.send(EV_KEY, KEY_B, 1)
    got = evq.wait(2)
    assert sorted(got) == sorted([(head, 0), (wrong, 0)])
    assert (np.asarray(evq.buf(head)) == 0xA5).all()
    # status: short, and with a device-writable segment
    short = stq.post(b"\x11\x00\x01\x00")
    stq.post(ev(EV_LED, LED_CAPSL, 0), kick=False)
    writable = stq.post(ev(EV_LED, LED_CAPSL, 0), 8, kick=False)
    os.eventfd_write(stq.ring.kick_fd, 1)
    got = dict(stq.wait(3))
    assert got[short] == 0 and got[writable] == 0
    assert seen == [(EV_LED, LED_CAPSL, 0)]
    s = dev.stats()
    assert s["bad_event_buffers"] == 2 and s["bad_status_buffers"] == 2
    assert any("event buffer needs 8" in e for e in errors()) and any("status buffer" in e for e in errors())
    # the queues go on
    ok = evq.post(8)
    assert evq.wait(1) == [(ok, 8)] and bytes(evq.buf(ok)[:8]) == ev(EV_KEY, KEY_B, 1)


def test_stopped_ring_hands_held_buffers_back(input_dev):
    dev, fe, evq, _, _ = input_dev
    held = [evq.post(8) for _ in range(3)]
    for h in held:
        evq.buf(h)[:] = 0x5A
    deadline = time.monotonic() + 10
    while dev.stats()["buffers_held"] < 3:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    base = fe.stop_ring(evq.ring)
    assert base == (encode_base(3, 1, 3, 1) if fe.want_packed else 3)  # packed: both cursors, each with its wrap
    got = evq.used()
    assert sorted(got) == sorted((h, 8) for h in held)
    assert all(bytes(evq.buf(h)[:8]) == bytes(8) for h in held)  # EV_SYN SYN_REPORT 0
    dev.send(EV_KEY, KEY_A, 1)  # waits for the ring to come back
    fe.start_ring(evq.ring, base)
    h = evq.post(8)
    assert evq.wait(1) == [(h, 8)] and bytes(evq.buf(h)[:8]) == ev(EV_KEY, KEY_A, 1)


def test_event_stream_lines(tmp_path, caplog):
    assert parse_event('{"type": "EV_KEY", "code": "KEY_A", "value": 1}') == (EV_KEY, KEY_A, 1)
    assert parse_event('{"type": 1, "code": "BTN_LEFT", "value": 0}') == (EV_KEY, BTN_LEFT, 0)
    assert parse_event('{"type": "EV_SYN", "code": "SYN_REPORT", "value": 0}') == (0, 0, 0)
    assert parse_event('{"type": "EV_REL", "code": 1, "value": -3}') == (EV_REL, 1, -3)
    for bad in (
        '{"type": "EV_KEY", "code": "REL_X", "value": 1}',  # a code of another type
        '{"type": "KEY_A", "code": "KEY_A", "value": 1}',
        '{"type": "EV_KEY", "code": "KEY_NOPE", "value": 1}',
        '{"type": "EV_KEY", "code": "KEY_A", "value": true}',
        '{"type": "EV_KEY", "code": "KEY_A"}',
        "[1, 30, 1]",
    ):
        with pytest.raises(ValueError):
            parse_event(bad)
    path = tmp_path / "events.jsonl"
    path.write_text(
        '# a comment\n{"type": "EV_KEY", "code": "KEY_A", "value": 1}\nnot json\n'
        '{"type": "EV_KEY", "code": "KEY_F24", "value": 1}\n\n{"type": "EV_SYN", "code": "SYN_REPORT", "value": 0}\n'
    )
    dev = InputDevice()
    try:
        dev.read_events(str(path)).join(10)
        assert list(dev.pending) == [ev(EV_KEY, KEY_A, 1), ev(EV_KEY, 194, 1), ev(EV_SYN, 0, 0)]
        assert dev.stats()["bad_lines"] == 1
    finally:
        dev.close()


def test_serve_input_events_file(tmp_path, sock_path):
    """``pyvhost serve input --events FILE``: the file's events reach a driver that posts buffers, in order."""
    path = tmp_path / "events.jsonl"
    path.write_text('{"type": "EV_KEY", "code": "KEY_B", "value": 1}\n{"type": "EV_SYN", "code": 0, "value": 0}\n')
    ready = tmp_path / "ready"
    argv = [sys.executable, "-m", "pyvhost", "serve", "input", "--socket-path", sock_path, "--events", str(path)]
    proc = subprocess.Popen([*argv, "--ready-file", str(ready)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240  # a cold kernel compile may come first
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "back-end not ready"
            time.sleep(0.05)
        with Frontend(sock_path, num_queues=2, queue_size=16) as fe:
            fe.setup()
            evq = RingDriver(fe, 0)
            heads = [evq.post(8) for _ in range(2)]
            assert sorted(evq.wait(2)) == sorted((h, 8) for h in heads)
            assert [bytes(evq.buf(h)[:8]) for h in heads] == [ev(EV_KEY, KEY_B, 1), ev(EV_SYN, 0, 0)]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert json.loads(out.decode().splitlines()[-1])["input"]["events"] == 2, err.decode()[-2000:]

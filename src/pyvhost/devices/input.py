"""virtio-input (virtio 1.2 §5.8): a keyboard and mouse whose events come from the host.

The config space answers the driver's queries: it writes ``select`` and ``subsel`` (QEMU's vhost-user-input sends
them with SET_CONFIG, the whole 136-byte config at offset 0) and reads the answer -- ``size`` and the union --
with GET_CONFIG.  What the device says it is (name, serial, device ids, property bits, the codes of each event
type, the axes' ranges) is a :class:`Profile`.

Events reach the guest on the event queue, one ``virtio_input_event`` per buffer, in the order :meth:`send` got
them: the device holds the buffers the driver posts and fills one per event.  When the driver has no buffer
posted, events wait (up to ``MAX_PENDING``; beyond, :meth:`send` blocks): none is lost.  The status queue
carries the driver's events for the device (LEDs); each is logged and handed to ``on_status``.

A ring that stops (GET_VRING_BASE, a memory change, a disconnect) gets its held event buffers back each with an
EV_SYN/SYN_REPORT in it (8 zero bytes): Linux's driver reads every completed event buffer as an event whatever
its used length, and a report with nothing before it is dropped by its input core.  Events not yet delivered
wait for the next driver.

Event streams (``pyvhost serve input --events FILE|-``) are JSON lines, ``{"type": "EV_KEY", "code": "KEY_A",
"value": 1}``, types and codes given by name (``linux/input-event-codes.h``) or by number.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO

from . import input_codes as C
from .chain_device import ChainDevice, Request

log = logging.getLogger(__name__)

VIRTIO_ID_INPUT = 18
EVENTQ, STATUSQ = 0, 1

# config select values (virtio 1.2 §5.8.5)
VIRTIO_INPUT_CFG_UNSET = 0x00
VIRTIO_INPUT_CFG_ID_NAME = 0x01
VIRTIO_INPUT_CFG_ID_SERIAL = 0x02
VIRTIO_INPUT_CFG_ID_DEVIDS = 0x03
VIRTIO_INPUT_CFG_PROP_BITS = 0x10
VIRTIO_INPUT_CFG_EV_BITS = 0x11
VIRTIO_INPUT_CFG_ABS_INFO = 0x12

#: struct virtio_input_config: u8 select, u8 subsel, u8 size, u8 reserved[5], then a 128-byte union
CONFIG_HDR = struct.Struct("<BBB5x")
UNION_SIZE = 128
CONFIG_SIZE = CONFIG_HDR.size + UNION_SIZE
#: struct virtio_input_event: le16 type, le16 code, le32 value
EVENT = struct.Struct("<HHi")
#: struct virtio_input_absinfo: le32 min, max, fuzz, flat, res
ABSINFO = struct.Struct("<iiiii")
#: struct virtio_input_devids: le16 bustype, vendor, product, version
DEVIDS = struct.Struct("<HHHH")
#: linux/input.h
BUS_VIRTUAL = 0x06
#: Red Hat's PCI vendor id, the one virtio devices carry; product: ours
VENDOR, PRODUCT = 0x1AF4, 0x1100
#: events waiting for event buffers, at most (then send() blocks)
MAX_PENDING = 4096
#: status events remembered (``status_events``)
STATUS_HISTORY = 256
#: code names allowed for each event type in an event stream
CODE_PREFIXES = {
    C.EV_SYN: ("SYN_",),
    C.EV_KEY: ("KEY_", "BTN_"),
    C.EV_REL: ("REL_",),
    C.EV_ABS: ("ABS_",),
    C.EV_MSC: ("MSC_",),
    C.EV_SW: ("SW_",),
    C.EV_LED: ("LED_",),
    C.EV_SND: ("SND_",),
    C.EV_REP: ("REP_",),
}


@dataclass(frozen=True)
class AbsInfo:
    """The range of an absolute axis (struct virtio_input_absinfo)."""

    min: int
    max: int
    fuzz: int = 0
    flat: int = 0
    res: int = 0


@dataclass(frozen=True)
class Profile:
    """What the device tells the driver it is."""

    name: str = "pyvhost keyboard and mouse"
    serial: str = "pyvhost-input"
    ids: tuple[int, int, int, int] = (BUS_VIRTUAL, VENDOR, PRODUCT, 1)  # bustype, vendor, product, version
    props: frozenset[int] = frozenset()
    #: event type -> the codes it has (EV_SYN is implied)
    codes: dict[int, frozenset[int]] = field(default_factory=dict)
    #: absolute axis -> its range (each also in codes[EV_ABS])
    abs: dict[int, AbsInfo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for what in (self.name, self.serial):
            if len(what.encode()) > UNION_SIZE:
                raise ValueError(f"{what!r}: longer than {UNION_SIZE} bytes")
        for t, codes in self.codes.items():
            if not 0 < t <= C.EV_MAX or any(not 0 <= c < UNION_SIZE * 8 for c in codes):
                raise ValueError(f"event type {t}: type or code out of range")
        if set(self.abs) != set(self.codes.get(C.EV_ABS, ())):
            raise ValueError("every absolute axis needs an AbsInfo, and only they")

    def has(self, type_: int, code: int) -> bool:
        if type_ == C.EV_SYN:
            return 0 <= code <= C.SYN_MAX
        return code in self.codes.get(type_, ())


def keyboard_mouse(abs_max: int = 0) -> Profile:
    """A keyboard (KEY_ESC .. KEY_MICMUTE, three LEDs) and a mouse (buttons, x/y, wheels); with ``abs_max``, an
    absolute pointer too (ABS_X/ABS_Y from 0 to abs_max, as a tablet)."""
    keys = set(range(C.KEY_ESC, C.KEY_MICMUTE + 1)) | set(range(C.BTN_LEFT, C.BTN_TASK + 1))
    codes = {
        C.EV_KEY: frozenset(keys),
        C.EV_REL: frozenset({C.REL_X, C.REL_Y, C.REL_HWHEEL, C.REL_WHEEL}),
        C.EV_LED: frozenset({C.LED_NUML, C.LED_CAPSL, C.LED_SCROLLL}),
    }
    axes = {}
    if abs_max:
        axes = {C.ABS_X: AbsInfo(0, abs_max), C.ABS_Y: AbsInfo(0, abs_max)}
        codes[C.EV_ABS] = frozenset(axes)
    return Profile(codes=codes, abs=axes)


def bitmap(bits: Iterable[int]) -> bytes:
    """A little-endian bitmap of ``bits``, up to its last non-zero byte (as QEMU's virtio-input sizes it)."""
    out = bytearray(UNION_SIZE)
    for b in bits:
        out[b // 8] |= 1 << (b % 8)
    return bytes(out).rstrip(b"\0")


def answer(profile: Profile, select: int, subsel: int) -> bytes:
    """The union's contents for ``select``/``subsel`` (empty: nothing there, size 0)."""
    if select == VIRTIO_INPUT_CFG_ID_NAME and subsel == 0:
        return profile.name.encode()
    if select == VIRTIO_INPUT_CFG_ID_SERIAL and subsel == 0:
        return profile.serial.encode()
    if select == VIRTIO_INPUT_CFG_ID_DEVIDS and subsel == 0:
        return DEVIDS.pack(*profile.ids)
    if select == VIRTIO_INPUT_CFG_PROP_BITS and subsel == 0:
        return bitmap(profile.props)
    if select == VIRTIO_INPUT_CFG_EV_BITS:
        return bitmap(profile.codes.get(subsel, ()))
    if select == VIRTIO_INPUT_CFG_ABS_INFO and subsel in profile.abs:
        a = profile.abs[subsel]
        return ABSINFO.pack(a.min, a.max, a.fuzz, a.flat, a.res)
    return b""


def _number(what: object, kind: str, prefixes: tuple[str, ...]) -> int:
    if isinstance(what, bool) or not isinstance(what, int | str):
        raise ValueError(f"{kind} {what!r}: a name or a number")
    if isinstance(what, int):
        return what
    if not what.startswith(prefixes) or what not in C.NAMES:
        raise ValueError(f"{kind} {what!r}: not one of {'/'.join(p + '*' for p in prefixes)}")
    return C.NAMES[what]


def parse_event(line: str) -> tuple[int, int, int]:
    """One JSON line ``{"type": .., "code": .., "value": ..}`` -> (type, code, value); names or numbers."""
    obj = json.loads(line)
    if not isinstance(obj, dict) or set(obj) != {"type", "code", "value"}:
        raise ValueError('expected {"type": .., "code": .., "value": ..}')
    t = _number(obj["type"], "type", ("EV_",))
    code = _number(obj["code"], "code", CODE_PREFIXES.get(t, ("?",)))
    value = obj["value"]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"value {value!r}: an integer")
    return t, code, value


def _put(bufs: list[memoryview], data: bytes) -> None:
    """Write ``data`` at the start of a chain's writable buffers (a buffer may be split where regions end)."""
    off = 0
    for b in bufs:
        n = min(len(b), len(data) - off)
        b[:n] = data[off : off + n]
        off += n
        if off == len(data):
            return


StatusCallback = Callable[[int, int, int], None]


class InputDevice(ChainDevice):
    """A virtio-input device described by ``profile``; :meth:`send` injects events, ``on_status(type, code, value)``
    hears the driver's status events (LEDs)."""

    device_id = VIRTIO_ID_INPUT
    num_queues = 2
    access_platform = True  # every access through the chain API; held buffers handed back on a stop

    def __init__(self, profile: Profile | None = None, on_status: StatusCallback | None = None) -> None:
        self.profile = profile or keyboard_mouse()
        self.on_status = on_status
        self.cond = threading.Condition()
        self.select = self.subsel = 0
        self.bufs: collections.deque[Request] = collections.deque()
        self.pending: collections.deque[bytes] = collections.deque()
        self.counters = collections.Counter[str]()
        self.leds: dict[int, int] = {}
        self.status_events: collections.deque[tuple[int, int, int]] = collections.deque(maxlen=STATUS_HISTORY)
        self.closed = False
        self.reader: threading.Thread | None = None

    # -- config space -------------------------------------------------------------------------------------
    def config_space(self) -> bytes:
        with self.cond:
            select, subsel = self.select, self.subsel
        u = answer(self.profile, select, subsel)
        return CONFIG_HDR.pack(select, subsel, len(u)) + u.ljust(UNION_SIZE, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver writes ``select`` and ``subsel`` (virtio 1.2 §5.8.6.1); other bytes are read-only and what
        a front-end writes there with them (QEMU sends the whole config) is ignored."""
        if offset < 0 or offset + len(data) > CONFIG_SIZE:
            raise ValueError(f"SET_CONFIG offset {offset} size {len(data)} beyond the {CONFIG_SIZE}-byte config")
        with self.cond:
            head = bytearray((self.select, self.subsel))
            for i, b in enumerate(data[: max(0, 2 - offset)]):
                head[offset + i] = b
            self.select, self.subsel = head

    # -- the queues ---------------------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        if req.queue == STATUSQ:
            self._status(req)
            return
        if req.readable or sum(len(b) for b in req.writable) < EVENT.size:
            self._bad(req, f"an event buffer needs {EVENT.size} device-writable bytes and nothing readable")
            return
        with self.cond:
            if self.closed:
                req.complete(0)
                return
            self.bufs.append(req)
            self._deliver()

    def _status(self, req: Request) -> None:
        raw = b"".join(bytes(b) for b in req.readable)  # read once, then checked and used
        if req.writable or len(raw) < EVENT.size:
            self._bad(req, f"a status buffer is one event, {EVENT.size} device-readable bytes")
            return
        t, code, value = EVENT.unpack_from(raw)
        with self.cond:
            self.counters["status"] += 1
            self.status_events.append((t, code, value))
            if t == C.EV_LED:
                self.leds[code] = value
        log.info("input status: type %d code %d value %d", t, code, value)
        if self.on_status is not None:
            try:
                self.on_status(t, code, value)
            except Exception:
                log.exception("input: the status callback failed")
        req.complete(0)

    def _bad(self, req: Request, why: str) -> None:
        name = "bad_status_buffers" if req.queue == STATUSQ else "bad_event_buffers"
        self.counters[name] += 1
        if self.counters[name] == 1:
            log.error(
                "input queue %d: chain %d (%d readable bytes, %d writable bytes): %s; completed empty (further ones "
                "are counted in %s)",
                req.queue,
                req.head,
                sum(len(b) for b in req.readable),
                sum(len(b) for b in req.writable),
                why,
                name,
            )
        req.complete(0)

    def _deliver(self) -> None:
        """Fill held buffers with waiting events, in order (under ``cond``: completions are published in the
        order they are made, so one thread at a time)."""
        while self.pending and self.bufs:
            req = self.bufs.popleft()
            _put(req.writable, self.pending.popleft())
            self.counters["events"] += 1
            req.complete(EVENT.size)
        self.cond.notify_all()

    def stopping(self, queue: int) -> None:
        if queue != EVENTQ:
            return
        with self.cond:
            held = list(self.bufs)
            self.bufs.clear()
            for req in held:
                _put(req.writable, bytes(EVENT.size))  # EV_SYN SYN_REPORT 0: see the module's docstring
                req.complete(EVENT.size)

    def driver_gone(self) -> None:
        with self.cond:
            self.select = self.subsel = 0

    # -- the host side ------------------------------------------------------------------------------------
    def send(self, type_: int, code: int, value: int, timeout: float | None = None) -> None:
        """Queue one event for the guest (delivered as soon as the driver has a buffer posted).  Raises
        ValueError for an event the profile does not have, TimeoutError if ``MAX_PENDING`` events still wait
        after ``timeout`` seconds (None: wait as long as it takes)."""
        if not self.profile.has(type_, code):
            raise ValueError(f"event type {type_} code {code}: not in the device's profile")
        if not -(1 << 31) <= value < 1 << 31:
            raise ValueError(f"event value {value}: not a 32-bit integer")
        data = EVENT.pack(type_, code, value)
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.pending) < MAX_PENDING or self.closed, timeout):
                raise TimeoutError(f"{MAX_PENDING} events still wait for event buffers")
            if self.closed:
                raise RuntimeError("the input device is closed")
            self.pending.append(data)
            self._deliver()

    def wait_delivered(self, timeout: float) -> bool:
        """Wait until every event sent so far is in the guest's buffers."""
        with self.cond:
            return self.cond.wait_for(lambda: not self.pending, timeout)

    def read_events(self, path: str) -> threading.Thread:
        """Send the events of a JSON-lines stream (``-``: standard input) from a thread of its own; a FIFO is
        opened read-write, so that its writers may come and go."""
        if path == "-":
            stream: IO[bytes] = os.fdopen(os.dup(0), "rb")
        else:
            fifo = stat.S_ISFIFO(os.stat(path).st_mode)
            stream = os.fdopen(os.open(path, (os.O_RDWR if fifo else os.O_RDONLY) | os.O_CLOEXEC), "rb")
        self.reader = threading.Thread(target=self._read, args=(stream, path), name="input-events", daemon=True)
        self.reader.start()
        return self.reader

    def _read(self, stream: IO[bytes], path: str) -> None:
        n = 0
        with stream:
            for n, raw in enumerate(stream, 1):
                line = raw.decode(errors="replace").strip()
                if not line or line.startswith("#"):
                    continue
                try:
                    self.send(*parse_event(line))
                except (ValueError, TypeError) as e:
                    self.counters["bad_lines"] += 1
                    log.error("input events %s line %d: %s: skipped", path, n, e)
                except RuntimeError:
                    return
        log.info("input events %s: end after %d lines", path, n)

    def stats(self) -> dict:
        with self.cond:
            return {
                **self.counters,
                "pending": len(self.pending),
                "buffers_held": len(self.bufs),
                "leds": {str(k): v for k, v in sorted(self.leds.items())},
            }

    def close(self) -> None:
        with self.cond:
            self.closed = True
            held = list(self.bufs)
            self.bufs.clear()
            for req in held:
                _put(req.writable, bytes(EVENT.size))
                req.complete(EVENT.size)
            self.cond.notify_all()

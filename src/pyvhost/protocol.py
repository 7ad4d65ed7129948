"""vhost-user wire format (QEMU ``docs/interop/vhost-user.rst``).

One message is a 12-byte header (request, flags, size) followed by ``size`` bytes of payload; file descriptors
travel beside it as SCM_RIGHTS ancillary data.  This module parses and builds messages and validates every
size and fd count *before* any handler sees the request.  It knows nothing about device state.
"""

from __future__ import annotations

import array
import enum
import os
import socket
import struct
from dataclasses import dataclass, field

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size  # 12

VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 0x1 << 2
VHOST_USER_NEED_REPLY_MASK = 0x1 << 3

#: Largest payload we accept: SET_CONFIG carries 12 + 256 bytes, SET_MEM_TABLE 8 + 8 * 32; nothing needs more.
MAX_PAYLOAD = 4096
#: Most fds one message may carry (SET_MEM_TABLE: one per region).
MAX_FDS = 8
#: Regions a SET_MEM_TABLE may carry (VHOST_MEMORY_BASELINE_NREGIONS).
MEMORY_BASELINE_NREGIONS = 8
#: Memory slots with CONFIGURE_MEM_SLOTS (ADD/REM_MEM_REG); QEMU and DPDK use 509 at most.
MAX_MEM_SLOTS = 509
#: Payload flag of SET_VRING_KICK/CALL/ERR: no fd is passed.
VHOST_USER_VRING_NOFD_MASK = 0x1 << 8
VHOST_USER_VRING_IDX_MASK = 0xFF
#: Feature bit that turns on protocol-feature negotiation.
VHOST_USER_F_PROTOCOL_FEATURES = 30
#: GET/SET_CONFIG payload limit.
VHOST_USER_MAX_CONFIG_SIZE = 256


class Request(enum.IntEnum):
    """Front-end → back-end request ids."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class BackendRequest(enum.IntEnum):
    """Back-end → front-end request ids, sent on the backend channel (SET_BACKEND_REQ_FD)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3


class ProtocolFeature(enum.IntEnum):
    """Bits of GET/SET_PROTOCOL_FEATURES."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


class ProtocolError(Exception):
    """A message that is malformed or not allowed now; the connection answers it with a failure.

    ``message`` is set when the header was read whole, so that a reply still owed can be sent."""

    def __init__(self, text: str, message: Message | None = None) -> None:
        super().__init__(text)
        self.message = message


class ConnectionClosed(Exception):
    """The peer closed the socket (or sent a partial header)."""


# ---------------------------------------------------------------------------------------------------------
# Payload layouts
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log
MEM_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
MEM_TABLE_HDR = struct.Struct("<II")  # nregions, padding
SINGLE_REGION_HDR = struct.Struct("<Q")  # padding
CONFIG_HDR = struct.Struct("<III")  # offset, size, flags
LOG_HDR = struct.Struct("<QQ")  # mmap_size, mmap_offset
INFLIGHT = struct.Struct("<QQHH")  # mmap_size, mmap_offset, num_queues, queue_size
IOTLB = struct.Struct("<QQQBB6x")  # iova, size, uaddr, perm, type

#: Largest address or size accepted anywhere (no real x86-64/arm64 address is this high); keeps all
#: address arithmetic far from 64-bit overflow.
ADDR_LIMIT = 1 << 62


@dataclass(frozen=True)
class MemRegion:
    """One region of a memory table."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def pack(self) -> bytes:
        return MEM_REGION.pack(self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset)


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass
class Message:
    """One parsed message: request id, flags, raw payload and the fds that came with it."""

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    @property
    def name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return f"UNKNOWN({self.request})"

    def close_fds(self) -> None:
        """Close every fd not taken by a handler (handlers set the slot to -1 when they keep one)."""
        for i, fd in enumerate(self.fds):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
                self.fds[i] = -1

    def take_fd(self, i: int = 0) -> int:
        """Take ownership of fd ``i`` (the message will no longer close it)."""
        fd = self.fds[i]
        self.fds[i] = -1
        return fd

    # -- typed views of the payload; each checks the size first -------------------------------------------
    def _need(self, n: int, exact: bool = False) -> None:
        if len(self.payload) < n or (exact and len(self.payload) != n):
            raise ProtocolError(f"{self.name}: payload of {len(self.payload)} bytes, expected {n}")

    def u64(self) -> int:
        self._need(U64.size)
        return U64.unpack_from(self.payload)[0]

    def vring_state(self) -> tuple[int, int]:
        self._need(VRING_STATE.size)
        return VRING_STATE.unpack_from(self.payload)

    def vring_addr(self) -> VringAddr:
        self._need(VRING_ADDR.size)
        return VringAddr(*VRING_ADDR.unpack_from(self.payload))

    def iotlb(self) -> IotlbMsg:
        """The vhost_iotlb_msg of an IOTLB_MSG (or of a back-end's MISS), checked (see :meth:`IotlbMsg.unpack`)."""
        self._need(IOTLB.size)
        return IotlbMsg.unpack(self.payload, self.name)

    def mem_table(self) -> list[MemRegion]:
        self._need(MEM_TABLE_HDR.size)
        nregions, _ = MEM_TABLE_HDR.unpack_from(self.payload)
        if nregions > MEMORY_BASELINE_NREGIONS:
            raise ProtocolError(f"SET_MEM_TABLE: {nregions} regions, at most {MEMORY_BASELINE_NREGIONS}")
        self._need(MEM_TABLE_HDR.size + nregions * MEM_REGION.size)
        regions = [
            MemRegion(*MEM_REGION.unpack_from(self.payload, MEM_TABLE_HDR.size + i * MEM_REGION.size))
            for i in range(nregions)
        ]
        if len(self.fds) != nregions:
            raise ProtocolError(f"SET_MEM_TABLE: {nregions} regions but {len(self.fds)} fds")
        return regions

    def single_region(self) -> MemRegion:
        self._need(SINGLE_REGION_HDR.size + MEM_REGION.size)
        return MemRegion(*MEM_REGION.unpack_from(self.payload, SINGLE_REGION_HDR.size))

    def config(self) -> tuple[int, int, int, bytes]:
        self._need(CONFIG_HDR.size)
        offset, size, flags = CONFIG_HDR.unpack_from(self.payload)
        if size > VHOST_USER_MAX_CONFIG_SIZE or offset > VHOST_USER_MAX_CONFIG_SIZE:
            raise ProtocolError(f"{self.name}: config offset {offset} size {size} over {VHOST_USER_MAX_CONFIG_SIZE}")
        data = self.payload[CONFIG_HDR.size : CONFIG_HDR.size + size]
        return offset, size, flags, data


# ---------------------------------------------------------------------------------------------------------
# Dirty logging for live migration (vhost-user.rst, "Migration"): VHOST_F_LOG_ALL, SET_LOG_BASE, VHOST_VRING_F_LOG
#: Feature bit (``VHOST_F_LOG_ALL``): while negotiated, every write into guest memory is logged.
VHOST_F_LOG_ALL = 26
#: Bit of SET_VRING_ADDR's flags (``VHOST_VRING_F_LOG``): ``log_guest_addr`` is valid, the used ring is logged there.
VHOST_VRING_F_LOG = 0
#: Guest-physical bytes per bit of the dirty log (``VHOST_LOG_PAGE``).
VHOST_LOG_PAGE = 0x1000


@dataclass(frozen=True)
class LogBase:
    """SET_LOG_BASE's payload (the "log description"): the log is [mmap_offset, mmap_offset + mmap_size) of
    the fd that came with the message."""

    mmap_size: int
    mmap_offset: int


def log_base(msg: Message) -> LogBase:
    """Parse and check SET_LOG_BASE: a payload of exactly LOG_HDR, exactly one fd (the log is shared by fd:
    ``LOG_SHMFD``), a size above 0, size and offset below ADDR_LIMIT (so their sum cannot overflow 64 bits).
    The fd itself (its type, its size) is checked where it is mapped (``dirtylog.DirtyLog``).

    QEMU reads a reply to SET_LOG_BASE whenever ``LOG_SHMFD`` is negotiated, NEED_REPLY or not (DPDK sends it
    with an empty payload)."""
    msg._need(LOG_HDR.size, exact=True)
    if len(msg.fds) != 1:
        raise ProtocolError(f"SET_LOG_BASE: {len(msg.fds)} fds, expected the log's fd")
    size, offset = LOG_HDR.unpack_from(msg.payload)
    if size == 0:
        raise ProtocolError("SET_LOG_BASE: log of size 0")
    if size >= ADDR_LIMIT or offset >= ADDR_LIMIT:
        raise ProtocolError(f"SET_LOG_BASE: size {size:#x} / offset {offset:#x} out of range (overflow)")
    return LogBase(size, offset)


# IOTLB messages: VHOST_USER_IOTLB_MSG carries a struct vhost_iotlb_msg (linux/vhost_types.h) both ways.
VHOST_IOTLB_MISS = 1
VHOST_IOTLB_UPDATE = 2
VHOST_IOTLB_INVALIDATE = 3
VHOST_IOTLB_ACCESS_FAIL = 4
#: Permission bits of an IOTLB entry or of the access a MISS asks for (vhost_types.h VHOST_ACCESS_*).
VHOST_ACCESS_RO = 0x1
VHOST_ACCESS_WO = 0x2
VHOST_ACCESS_RW = 0x3
_IOTLB_TYPES = {
    VHOST_IOTLB_MISS: "MISS",
    VHOST_IOTLB_UPDATE: "UPDATE",
    VHOST_IOTLB_INVALIDATE: "INVALIDATE",
    VHOST_IOTLB_ACCESS_FAIL: "ACCESS_FAIL",
}
_ADDR_SPACE = 1 << 64


@dataclass(frozen=True)
class IotlbMsg:
    """One struct vhost_iotlb_msg: an IOVA range, the front-end address it maps to, permission, type."""

    iova: int
    size: int
    uaddr: int
    perm: int
    type: int

    @property
    def end(self) -> int:
        """One past the last IOVA of the range."""
        return self.iova + self.size

    def pack(self) -> bytes:
        return IOTLB.pack(self.iova, self.size, self.uaddr, self.perm, self.type)

    @classmethod
    def unpack(cls, payload: bytes, what: str = "IOTLB_MSG") -> IotlbMsg:
        """Parse and check one message; ProtocolError names what is wrong.

        Only the fields a type uses are checked -- QEMU leaves ``perm`` and ``uaddr`` of an INVALIDATE
        uninitialised, and QEMU, DPDK and the kernel send a MISS without a size:
        UPDATE: size > 0, perm RO/WO/RW, [iova, iova+size) and [uaddr, uaddr+size) below ADDR_LIMIT;
        INVALIDATE: size > 0 (as the kernel's vhost refuses it), iova+size not past 2^64 (a range above
        ADDR_LIMIT is accepted: nothing can be mapped there, and an invalidation is never refused for being
        too wide); MISS, ACCESS_FAIL: perm RO/WO/RW.
        """
        if len(payload) < IOTLB.size:
            raise ProtocolError(f"{what}: payload of {len(payload)} bytes, expected {IOTLB.size}")
        msg = cls(*IOTLB.unpack_from(payload))
        kind = _IOTLB_TYPES.get(msg.type)
        if kind is None:
            raise ProtocolError(f"{what}: unknown IOTLB message type {msg.type}")
        if msg.type in (VHOST_IOTLB_UPDATE, VHOST_IOTLB_INVALIDATE) and msg.size == 0:
            raise ProtocolError(f"{what}: IOTLB {kind} of size 0 at iova {msg.iova:#x}")
        if msg.type != VHOST_IOTLB_INVALIDATE and msg.perm not in (VHOST_ACCESS_RO, VHOST_ACCESS_WO, VHOST_ACCESS_RW):
            raise ProtocolError(f"{what}: IOTLB {kind} with permission {msg.perm:#x} (not RO, WO or RW)")
        if msg.end > _ADDR_SPACE:
            raise ProtocolError(f"{what}: IOTLB {kind} iova {msg.iova:#x} + size {msg.size:#x} wraps past 2^64")
        if msg.type == VHOST_IOTLB_UPDATE:
            for name, start in (("iova", msg.iova), ("uaddr", msg.uaddr)):
                if start + msg.size > ADDR_LIMIT:
                    raise ProtocolError(
                        f"{what}: IOTLB UPDATE {name} {start:#x} + size {msg.size:#x} beyond {ADDR_LIMIT:#x}"
                    )
        return msg


# Payload sizes each request must carry (minimum); requests not listed take any payload we accept.
_MIN_PAYLOAD = {
    Request.SET_FEATURES: U64.size,
    Request.SET_PROTOCOL_FEATURES: U64.size,
    Request.SET_MEM_TABLE: MEM_TABLE_HDR.size,
    Request.SET_VRING_NUM: VRING_STATE.size,
    Request.SET_VRING_BASE: VRING_STATE.size,
    Request.GET_VRING_BASE: VRING_STATE.size,
    Request.SET_VRING_ADDR: VRING_ADDR.size,
    Request.SET_VRING_KICK: U64.size,
    Request.SET_VRING_CALL: U64.size,
    Request.SET_VRING_ERR: U64.size,
    Request.SET_VRING_ENABLE: VRING_STATE.size,
    Request.ADD_MEM_REG: SINGLE_REGION_HDR.size + MEM_REGION.size,
    Request.REM_MEM_REG: SINGLE_REGION_HDR.size + MEM_REGION.size,
    Request.GET_CONFIG: CONFIG_HDR.size,
    Request.SET_CONFIG: CONFIG_HDR.size,
    Request.SET_STATUS: U64.size,
}


#: Room for the ancillary data of one recvmsg(): MAX_FDS descriptors, no more (more sets MSG_CTRUNC).
_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def _recv_part(sock: socket.socket, n: int, fds: list[int]) -> tuple[bytes, bool]:
    """Read up to ``n`` bytes and their fds (close-on-exec, appended to ``fds``); return the bytes and whether
    the kernel truncated the fd list (MSG_CTRUNC: the fds that did not fit were closed by the kernel)."""
    data, ancdata, flags, _addr = sock.recvmsg(n, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(cdata[: len(cdata) - len(cdata) % got.itemsize])
            fds.extend(got)
    return data, bool(flags & socket.MSG_CTRUNC)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def recv_message(sock: socket.socket) -> Message:
    """Read one whole message and its fds; raise ProtocolError for a malformed one.

    The header's size is checked against MAX_PAYLOAD before the payload is read, so a hostile size can
    neither make us allocate nor desynchronise the stream silently: the connection is failed instead.
    Fds arrive close-on-exec; a message whose fd list was truncated (more than MAX_FDS sent) is read whole,
    then refused with every fd it brought closed, never half-used.
    """
    fds: list[int] = []
    truncated = False
    try:
        data, cut = _recv_part(sock, HEADER_SIZE, fds)
        truncated |= cut
        if not data:
            raise ConnectionClosed("peer closed the connection")
        while len(data) < HEADER_SIZE:
            more, cut = _recv_part(sock, HEADER_SIZE - len(data), fds)
            truncated |= cut
            if not more:
                raise ConnectionClosed("peer closed the connection inside a header")
            data += more
        request, flags, size = HEADER.unpack(data)
        if size > MAX_PAYLOAD:
            raise ConnectionClosed(f"request {request}: payload size {size} over {MAX_PAYLOAD}; stream unusable")
        payload = b""
        while len(payload) < size:
            chunk, cut = _recv_part(sock, size - len(payload), fds)
            truncated |= cut
            if not chunk:
                raise ConnectionClosed("peer closed the connection inside a payload")
            payload += chunk
        msg = Message(request, flags, payload, fds)
    except BaseException:
        _close_all(fds)
        raise
    if truncated:
        n = len(msg.fds)
        msg.close_fds()
        raise ProtocolError(
            f"{msg.name}: fd list truncated (more than {MAX_FDS} fds sent, {n} received); all closed", msg
        )
    if (flags & VHOST_USER_VERSION_MASK) != VHOST_USER_VERSION:
        msg.close_fds()
        raise ProtocolError(f"request {request}: unsupported version in flags {flags:#x}", msg)
    if len(msg.fds) > MAX_FDS:
        n = len(msg.fds)
        msg.close_fds()
        raise ProtocolError(f"{msg.name}: {n} fds, at most {MAX_FDS}", msg)
    need = None if flags & VHOST_USER_REPLY_MASK else _MIN_PAYLOAD.get(request)  # type: ignore[call-overload]
    if need is not None and size < need:
        msg.close_fds()
        raise ProtocolError(f"{msg.name}: payload of {size} bytes, expected at least {need}", msg)
    return msg


def pack_message(request: int, payload: bytes = b"", flags: int = VHOST_USER_VERSION) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


def send_message(
    sock: socket.socket,
    request: int,
    payload: bytes = b"",
    fds: list[int] | None = None,
    flags: int = VHOST_USER_VERSION,
) -> None:
    """Send one message with optional fds (SCM_RIGHTS)."""
    data = pack_message(request, payload, flags)
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def send_reply(sock: socket.socket, request: int, payload: bytes = b"") -> None:
    send_message(sock, request, payload, flags=VHOST_USER_VERSION | VHOST_USER_REPLY_MASK)


def recv_reply(sock: socket.socket, request: int) -> Message:
    """Front-end side: read the reply to ``request`` and check it is one."""
    msg = recv_message(sock)
    if msg.request != request or not (msg.flags & VHOST_USER_REPLY_MASK):
        msg.close_fds()
        raise ProtocolError(f"expected reply to {Request(request).name}, got {msg.name} flags {msg.flags:#x}")
    return msg

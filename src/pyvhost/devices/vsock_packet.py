"""The virtio-vsock wire format (virtio 1.2 §5.10.6): the packet header, its ops, types and flags."""

from __future__ import annotations

import struct
from dataclasses import dataclass

VIRTIO_ID_VSOCK = 19
#: the CID of the host (virtio 1.2 §5.10.4: "the host CID is 2")
VMADDR_CID_HOST = 2
#: struct virtio_vsock_hdr: src_cid, dst_cid, src_port, dst_port, len, type, op, flags, buf_alloc, fwd_cnt
HDR = struct.Struct("<QQIIIHHIII")
HDR_LEN = HDR.size  # 44
#: struct virtio_vsock_event: id
EVENT = struct.Struct("<I")
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0

VIRTIO_VSOCK_TYPE_STREAM = 1
VIRTIO_VSOCK_TYPE_SEQPACKET = 2

VIRTIO_VSOCK_OP_INVALID = 0
VIRTIO_VSOCK_OP_REQUEST = 1
VIRTIO_VSOCK_OP_RESPONSE = 2
VIRTIO_VSOCK_OP_RST = 3
VIRTIO_VSOCK_OP_SHUTDOWN = 4
VIRTIO_VSOCK_OP_RW = 5
VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6
VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7

VIRTIO_VSOCK_SHUTDOWN_RCV = 1
VIRTIO_VSOCK_SHUTDOWN_SEND = 2
VIRTIO_VSOCK_SHUTDOWN_BOTH = VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND


@dataclass
class Header:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0

    def pack(self) -> bytes:
        return HDR.pack(
            self.src_cid,
            self.dst_cid,
            self.src_port,
            self.dst_port,
            self.len,
            self.type,
            self.op,
            self.flags,
            self.buf_alloc,
            self.fwd_cnt,
        )

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        """The header at the start of ``data`` (at least HDR_LEN bytes)."""
        return cls(*HDR.unpack_from(data))

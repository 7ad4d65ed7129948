"""The numbered frames ``serve net --mode source`` sends: a sequence number and a valid UDP checksum in each.

A source frame is :func:`~pyvhost.devices.net.make_frame`'s UDP/IPv4 frame (Ethernet 14 bytes, IPv4 20, UDP 8,
then the payload).  With ``NetDevice(numbered=True)`` (what ``serve`` does unless ``--plain-frames``; the queue's
``Q_SEQ``) the source stamps each frame before delivering it:

* payload bytes 0..7: the frame's sequence number on its queue (big-endian u64; 0 for the first frame a queue
  delivers after the back-end (re)started it, +1 for each frame delivered -- a frame dropped for want of room
  keeps its number for the next one);
* the UDP checksum (RFC 768: one's complement sum over the pseudo-header, the UDP header and the payload),
  made valid for that number -- a guest's stack verifies it (the virtio-net header says nothing about it), so
  a torn or stale frame is dropped and counted (``UdpInCsumErrors``), and a receiver that checks sequence
  numbers sees a frame lost, repeated or out of order.

The checksum is updated incrementally (the sum of the rest of the frame once per step, the number's four
16-bit words per frame): a few stores per frame.  :func:`check_frame` is the receiver's side.
"""

from __future__ import annotations

import struct

import numpy as np

from ..jit import helper, inline_helper

#: offsets in the frame: IPv4 source and destination addresses, UDP header, UDP checksum, sequence number
IP_ADDRS_OFF = 26
UDP_OFF = 34
UDP_CSUM_OFF = 40
SEQ_OFF = 42
SEQ_LEN = 8
#: IANA protocol number of UDP (the pseudo-header's)
IPPROTO_UDP = 17


@helper
def frame_sum(frame, length):
    """One's complement partial sum (not folded) of the frame's UDP pseudo-header, header and payload, with the
    checksum and the sequence number counted as zero: what :func:`stamp` adds a number to."""
    s = 0
    for o in range(IP_ADDRS_OFF, UDP_OFF, 2):
        s += (np.int64(frame[o]) << 8) | np.int64(frame[o + 1])
    s += IPPROTO_UDP + (length - UDP_OFF)
    o = UDP_OFF
    while o + 1 < length:
        if o != UDP_CSUM_OFF and (o < SEQ_OFF or o >= SEQ_OFF + SEQ_LEN):
            s += (np.int64(frame[o]) << 8) | np.int64(frame[o + 1])
        o += 2
    if o < length:  # an odd length: the last byte padded with a zero
        s += np.int64(frame[o]) << 8
    return s


@inline_helper
def stamp(frame, base, seq):
    """Write ``seq`` into the frame and the UDP checksum that goes with it (``base``: :func:`frame_sum`)."""
    s = base
    for i in range(4):
        word = (seq >> (48 - 16 * i)) & 0xFFFF
        frame[SEQ_OFF + 2 * i] = word >> 8
        frame[SEQ_OFF + 2 * i + 1] = word & 0xFF
        s += word
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    c = ~s & 0xFFFF
    if c == 0:
        c = 0xFFFF  # RFC 768: a computed zero is sent as all ones (zero means "no checksum")
    frame[UDP_CSUM_OFF] = c >> 8
    frame[UDP_CSUM_OFF + 1] = c & 0xFF


def udp_checksum_ok(frame: bytes) -> bool:
    """Whether a frame's UDP checksum is valid (the one's complement sum over everything folds to 0xFFFF)."""
    if len(frame) < SEQ_OFF + SEQ_LEN:
        return False
    (udp_len,) = struct.unpack_from("!H", frame, UDP_OFF + 4)
    end = UDP_OFF + udp_len
    if end > len(frame) or udp_len < 8:
        return False
    data = frame[UDP_OFF:end] + (b"\0" if udp_len & 1 else b"")
    s = sum(struct.unpack_from("!4H", frame, IP_ADDRS_OFF)) + IPPROTO_UDP + udp_len
    s += sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s == 0xFFFF


def check_frame(frame: bytes) -> int | None:
    """The sequence number of a source frame (Ethernet onwards, no virtio-net header), or None if its UDP
    checksum is wrong (torn, stale, corrupt)."""
    if not udp_checksum_ok(frame):
        return None
    return struct.unpack_from("!Q", frame, SEQ_OFF)[0]
